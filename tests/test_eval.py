"""eval.py: multiple-choice scoring against hand-computed log-probs, routing statistics on planted models,
and a Mixtral export giving the same numbers as the native checkpoint."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import checkpoint
import eval as ev
import multiple_choice as mc
from model import ModelConfig, ModelOutput, Transformer


# ----------------------------------------------------------------------------------------------------------
# Multiple choice: a bigram "model" whose log-probs we know by construction

CHARS = ["<eos>", "a", "b", "c", "é", " "]  # id = position; "é" is 2 bytes in UTF-8, 1 character
# P(next | previous): row = previous token id. Each row sums to 1.
PROBS = {
    0: [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
    1: [0.04, 0.03, 0.5, 0.4, 0.02, 0.01],   # after "a": b .5, c .4
    2: [0.1, 0.1, 0.6, 0.1, 0.05, 0.05],     # after "b": b .6
    3: [0.04, 0.03, 0.5, 0.01, 0.4, 0.02],   # after "c": b .5, é .4
    4: [1 / 6] * 6,
    5: [0.1, 0.1, 0.5, 0.1, 0.1, 0.1],       # after " ": b .5
}


class CharTokenizer:
    """One token per character of CHARS; no bos of its own unless told (add_bos as Hugging Face's flag)."""
    bos_id, eos_id, vocab_size, add_bos, path = 0, 0, len(CHARS), False, "chars"

    def encode(self, text):
        return [CHARS.index(ch) for ch in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


class Bigram(torch.nn.Module):
    """logits[b, s] = log P(. | idx[b, s]) through an lm_head (as Transformer computes its logits), so
    log_softmax gives back log P exactly (rows sum to 1)."""

    def __init__(self, max_positions=64):
        super().__init__()
        table = torch.tensor([PROBS[i] for i in range(len(CHARS))], dtype=torch.float64).log()
        self.lm_head = torch.nn.Linear(len(CHARS), len(CHARS), bias=False)
        self.lm_head.weight.data = table.T.float().contiguous()    # one-hot(prev) @ W.T = row prev of log P
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.calls, self.head_rows = 0, []

    def forward(self, idx, positions=None, mask=None):
        # A bigram's logits at a position depend on that position's token alone: positions and mask (which
        # questions and choices share a row, multiple_choice.score_rows) change nothing here.
        self.calls += 1
        x = torch.nn.functional.one_hot(idx, len(CHARS)).float()   # (B, S, V)
        logits = self.lm_head(x)
        self.head_rows.append(logits.shape[:-1])
        return ModelOutput(logits, None, logits.new_zeros(()), ())


L = {ch: {nxt: math.log(p) for nxt, p in zip(CHARS, PROBS[i])} for i, ch in enumerate(CHARS)}  # L[prev][next]


def item(context, choices, label, delimiter=None):
    d = {"context": context, "choices": choices, "label": label}
    if delimiter is not None:
        d["target_delimiter"] = delimiter
    return d


def parsed(items, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return mc.read_task(str(path))


def test_lm_eval_layout_hand_computed(tmp_path):
    """Context + " " + bare choice; acc on sums, acc_norm per character of the bare choice, acc_bytes per
    UTF-8 byte; lm-eval's standard error sqrt(p(1-p)/(n-1))."""
    items = parsed([item("a", ["bb", "c"], 1),               # " bb": L[a][ ]+L[ ][b]+L[b][b]; " c": L[a][ ]+L[ ][c]
                    item("c", ["é", "bb"], 0, delimiter=""),  # "é": L[c][é] = log .4; "bb": L[c][b] + L[b][b]
                    item("a", ["c", "bb"], 0, delimiter="")], tmp_path)
    r = mc.score_task(Bigram(), CharTokenizer(), items, start=[0])
    want = [[L["a"][" "] + L[" "]["b"] + L["b"]["b"], L["a"][" "] + L[" "]["c"]],
            [L["c"]["é"], L["c"]["b"] + L["b"]["b"]],
            [L["a"]["c"], L["a"]["b"] + L["b"]["b"]]]
    got = [d["loglikelihoods"] for d in r["details"]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # item 0: " bb" -5.81 beats " c" -6.91 on every metric (label 1: wrong everywhere)
    # item 1: sums: "é" -0.92 > "bb" -1.20 (right); per character "bb" -0.60 > "é" -0.92 (wrong);
    #         per byte "é" -0.46 (2 bytes) > "bb" -0.60 (right)
    # item 2: sums: "c" -0.92 > "bb" -1.20 (right); per character and byte "bb" -0.60 > "c" -0.92 (wrong)
    assert [d["pred"] for d in r["details"]] == [0, 0, 0]
    assert [d["pred_norm"] for d in r["details"]] == [0, 1, 1]
    assert r["acc"] == pytest.approx(2 / 3) and r["acc_norm"] == 0.0 and r["acc_bytes"] == pytest.approx(1 / 3)
    assert r["acc_stderr"] == pytest.approx(math.sqrt((2 / 3) * (1 / 3) / 2))
    assert r["acc_bytes_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2)) and r["acc_norm_stderr"] == 0
    assert r["n"] == 3 and r["chance"] == 0.5


def test_read_task_bare_choices_and_files_with_leading_spaces(tmp_path):
    items = parsed([item("x:", [" Paris", " Rome"], 0),          # written with the space: read as " " + bare
                    item("x:", ["Paris", " Rome"], 1),           # mixed: kept as written, delimiter " "
                    item("x:", [" a", " b"], 1, delimiter="")], tmp_path)
    assert [(i["choices"], i["target_delimiter"]) for i in items] == [
        (["Paris", "Rome"], " "), (["Paris", " Rome"], " "), ([" a", " b"], "")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(item("a", ["b", "c"], 0)) + "\n" + json.dumps(item("a", ["b", "c"], 2)) + "\n")
    with pytest.raises(ev.UserError, match=r"bad.jsonl:2"):
        mc.read_task(str(bad))


def test_empty_context_is_scored_after_the_prefix_token():
    """lm-eval: an empty context is replaced by its prefix token (bos, else eos), or - when the continuation
    begins with that very token - by the continuation's first token. Used to raise RuntimeError."""
    tok, model = CharTokenizer(), Bigram()
    assert mc.encode_request(tok, "", "ab") == ([0], [1, 2])
    assert mc.encode_request(tok, "", "ab", start=[5]) == ([5], [1, 2])  # a start token is enough context
    tok.encode = lambda text: [0] + [CHARS.index(ch) for ch in text]  # a continuation starting with the token
    assert mc.encode_request(tok, "", "ab") == ([0], [1, 2])
    r = mc.score_task(model, CharTokenizer(), [{"context": "", "choices": ["b", "c"], "label": 0,
                                                "target_delimiter": ""}], start=[])
    np.testing.assert_allclose(r["details"][0]["loglikelihoods"], [L["<eos>"]["b"], L["<eos>"]["c"]], atol=1e-6)
    assert mc.encode_request(tok, "a", "b", start=[5]) == ([5, 0, 1], [2])  # (this tok encodes a leading 0)


def test_start_token_follows_the_tokenizers_default():
    class Tok(CharTokenizer):
        bos_id, eos_id = 3, 4
    tok = Tok()
    tok.add_bos = True   # LLaMA tokenizers: lm-eval's hf model puts bos first
    assert ev.start_tokens("auto", tok)[0] == [3]
    tok.add_bos = False  # GPT-2-style byte-level BPE (SmolLM2): nothing before the prompt
    assert ev.start_tokens("auto", tok)[0] == []
    assert ev.start_tokens("eos", tok)[0] == [4] and ev.start_tokens("bos", tok)[0] == [3]
    assert ev.start_tokens("none", tok)[0] == []
    tok.bos_id = None
    with pytest.raises(ev.UserError, match="no bos"):
        ev.start_tokens("bos", tok)
    assert mc.prefix_token(tok) == 4  # no bos: an empty context is scored after eos


def test_loglikelihoods_rows_truncation_greedy_and_the_context_once():
    tok = CharTokenizer()
    groups = [[mc.encode_pair(tok, "a", "bb"), mc.encode_pair(tok, "a", "c")], [mc.encode_pair(tok, "ccccca", "c")]]
    groups = [[([0] + ctx, cont) for ctx, cont in g] for g in groups]
    # One question, one row: its shared prefix (the context) once, then each choice's own input tokens.
    ids, pos, seg, scored = mc.question_row(groups[0], max_len=64)
    # "a" + "bb" reads [bos, a, b] and "a" + "c" reads [bos, a]: the prefix is [bos, a], "bb" adds its first b
    # (position 2); "bb" is scored at row indices 1 (after a) and 2 (after b), "c" at index 1 too.
    assert ids == [0, 1, 2] and pos == [0, 1, 2] and seg == [0, 0, 1]
    assert scored == [([1, 2], [2, 2]), ([1], [3])]
    # Choices that disagree inside the context share only their common prefix; each continues at its positions.
    ids, pos, seg, scored = mc.question_row([([0, 1, 2], [3]), ([0, 2, 2, 2], [1, 4])], max_len=64)
    assert ids == [0, 1, 2, 2, 2, 2, 1] and pos == [0, 1, 2, 1, 2, 3, 4] and seg == [0, 1, 1, 2, 2, 2, 2]
    assert scored == [([2], [3]), ([5, 6], [1, 4])]
    model = Bigram()
    got = mc.loglikelihoods(model, groups, row_tokens=0)  # a row per question
    # Two forwards; the output projection ran at the choice tokens only.
    assert model.calls == 2 and model.head_rows == [(1,), (3,)]  # longest question first: 1 choice token; 2 + 1
    packed = Bigram()   # both questions end to end in one row
    assert mc.loglikelihoods(packed, groups) == got
    assert packed.calls == 1 and packed.head_rows == [(4,)]
    short = mc.loglikelihoods(Bigram(max_positions=3), groups)  # long context cut from the left
    np.testing.assert_allclose([x[0] for g in short for x in g], [x[0] for g in got for x in g], atol=1e-6)
    assert got[0][1][0] == pytest.approx(L["a"]["c"], abs=1e-6)
    assert got[0][0][0] == pytest.approx(L["a"]["b"] + L["b"]["b"], abs=1e-6)
    # greedy: "b" after "a" is the argmax, "bb" continues with argmax "b"; "c" after "a" is not
    assert [[g for _, g in q] for q in got] == [[True, False], [False]]


def tiny(moe, **kw):
    torch.manual_seed(0)
    cfg = dict(TINY_MOE, initializer_range=0.3, **kw)
    if not moe:
        cfg = {k: v for k, v in cfg.items() if "expert" not in k}
    return Transformer(ModelConfig(**cfg)).double().eval()


@pytest.mark.parametrize("row_tokens", [0, 64])
@pytest.mark.parametrize("moe", [False, True])
def test_choice_scores_equal_full_logits(moe, row_tokens):
    """What the docstring promises: scores from one row per question (its shared context once, each choice's
    own tokens after it, a mask keeping choices apart), logits at the choice tokens only, equal the plain
    full-row computation - exactly in exact arithmetic; in float64 (no near-tie of expert scores at this
    precision) to 1e-10 for a dense model and an MoE alike. Contexts that differ (few-shot) only share their
    common prefix. row_tokens 64: the three questions end to end in one row, each seeing only itself. A model
    of 9 positions cuts the 11-token context from the left, each choice as lm-eval cuts its own row."""
    for max_len in (64, 9):
        model = tiny(moe, max_position_embeddings=max_len)
        rng = np.random.default_rng(0)
        contexts = [rng.integers(0, 16, n_ctx).tolist() for n_ctx in (3, 11, 7)]   # a question's choices share it
        groups = [[(ctx, rng.integers(0, 16, rng.integers(1, 5)).tolist()) for _ in range(4)] for ctx in contexts]
        groups[2][1] = (groups[2][1][0][:4] + [(groups[2][1][0][4] + 1) % 16] + groups[2][1][0][5:],
                        groups[2][1][1])                                   # one choice whose context differs at 4
        want = []
        for group in groups:
            want.append([])
            for ctx, cont in group:
                idx = torch.tensor([(ctx + cont)[-(max_len + 1):-1]])
                logp = torch.log_softmax(model(idx)[0][0, -len(cont):], -1)          # (n, V) full logits
                want[-1].append(logp.gather(-1, torch.tensor(cont)[:, None]).sum().item())
        got = mc.loglikelihoods(model, groups, row_tokens=row_tokens)
        np.testing.assert_allclose([[ll for ll, _ in q] for q in got], want, rtol=0, atol=1e-10)


def test_validation_loss_is_the_lm_loss_without_the_balance_loss(tmp_path):
    data = planted_data(tmp_path)
    model = tiny(True, balance_loss_weight=10.0)
    val, _ = ev.validation(model, data, seq_len=16, batch_size=4, max_windows=5)
    nll = count = 0
    for x, y in ev.eval_windows(data, "alpha", 16, 4, 5):
        out = model(x)
        nll += torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        assert out.balance_loss.item() > 0.1
    assert val["alpha"]["loss"] == pytest.approx(nll / count, rel=1e-6) and val["alpha"]["tokens"] == count


def test_encode_pair_moves_trailing_space_into_the_choice():
    ctx, cont = mc.encode_pair(CharTokenizer(), "a ", "b")
    assert ctx == [1] and cont == [5, 2]
    # and the score is then log P(" " | a) + log P(b | " ")
    [[(ll, _)]] = mc.loglikelihoods(Bigram(), [[([0] + ctx, cont)]])
    assert ll == pytest.approx(L["a"][" "] + L[" "]["b"], abs=1e-6)


def test_fewshot_prompts_are_seeded_and_exclude_the_question(tmp_path):
    items = parsed([item(f"q{i}=", [f"x{i}", f"y{i}"], i % 2) for i in range(6)], tmp_path)
    for i in range(6):
        prompt = mc.fewshot_context(items, i, shots=3, seed=7)
        parts = prompt.split("\n\n")
        assert len(parts) == 4 and parts[-1] == f"q{i}="
        for demo in parts[:3]:
            j = int(demo[1:demo.index("=")])
            assert j != i and demo == f"q{j}= " + items[j]["choices"][items[j]["label"]]  # lm-eval: q + " " + a
        assert len(set(parts[:3])) == 3
        assert prompt == mc.fewshot_context(items, i, shots=3, seed=7)
    assert any(mc.fewshot_context(items, i, 3, seed=7) != mc.fewshot_context(items, i, 3, seed=8) for i in range(6))
    assert mc.fewshot_context(items, 2, shots=0, seed=7) == "q2="
    with pytest.raises(ev.UserError, match="shots"):
        mc.fewshot_context(items, 0, shots=6, seed=7)


# ----------------------------------------------------------------------------------------------------------
# Routing statistics

def test_js_divergence_values():
    assert ev.js_divergence([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]) == pytest.approx(1.0)
    assert ev.js_divergence([[0.3, 0.7], [0.3, 0.7], [0.3, 0.7]]) == pytest.approx(0.0, abs=1e-12)
    # H([.75, .25]) - (H([1, 0]) + H([.5, .5])) / 2 = 0.811278 - 0.5, over log2(2) = 1
    assert ev.js_divergence([[1.0, 0.0], [0.5, 0.5]]) == pytest.approx(0.311278, abs=1e-6)
    # three disjoint domains: log2(3) bits, normalised to 1
    assert ev.js_divergence(np.eye(3)) == pytest.approx(1.0)


def write_shards(folder, domains, vocab_size, tokenizer=None):
    """A shard folder in data/prepare.py's format with val splits only: {name: token array}."""
    os.makedirs(folder, exist_ok=True)
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "bos_id": 1, "eos_id": 2, "tokenizer": "tokenizer.model",
            "domains": {}}
    for name, tokens in domains.items():
        np.asarray(tokens, dtype=np.uint16).tofile(os.path.join(folder, f"{name}.val.bin"))
        meta["domains"][name] = {"train_tokens": 0, "val_tokens": len(tokens), "train_docs": 0, "val_docs": 1}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(folder)


TINY_MOE = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
                max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, expert_intermediate_size=4,
                gate_noise=False)


def planted_model(gate_scale):
    """Attention and experts write nothing back (o_proj = down_proj = 0), so every layer's gate sees the
    normalised embedding. Tokens 0-7 ("alpha") point along dimension 0, tokens 8-15 ("beta") along 1;
    experts 0 and 1 read dimension 0, experts 2 and 3 dimension 1. gate_scale = 0 makes every logit 0."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY_MOE)).eval()
    with torch.no_grad():
        emb = model.model.embed_tokens.weight                    # (16, 8)
        emb.normal_(0, 0.05)
        emb[:8, 0], emb[8:, 1] = 1.0, 1.0
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.experts.down_proj.zero_()
            w = block.mlp.gate.gate_network.weight              # (E=4, d=8)
            w.zero_()
            w[0, 0], w[1, 0], w[2, 1], w[3, 1] = 10.0, 9.0, 10.0, 9.0
            w.mul_(gate_scale)
    return model


def planted_data(tmp_path):
    rng = np.random.default_rng(0)
    return write_shards(tmp_path / "data", {"alpha": rng.integers(0, 8, 200), "beta": rng.integers(8, 16, 200)}, 16)


def test_planted_routing_shows_full_specialisation(tmp_path):
    data = planted_data(tmp_path)
    val, counts = ev.validation(planted_model(1.0), data, seq_len=16, batch_size=4, max_windows=5)
    r = ev.routing_report(counts)
    assert r["layers"] == [0, 1, 2] and r["domains"] == ["alpha", "beta"]
    assert r["tokens"] == {"alpha": 80, "beta": 80} and val["alpha"]["tokens"] == 80
    assert r["js"] == pytest.approx([1.0, 1.0, 1.0])
    assert r["favourite_share"] == pytest.approx([1.0, 1.0, 1.0])
    assert r["favourite_expert"] == [[0, 2]] * 3
    np.testing.assert_allclose(r["distribution"][0], [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # text heatmap: names cut to E characters, full share = "@", none = " "
    assert ev.text_heatmap(r).splitlines()[:2] == ["layer | alph | beta", "    0 | @@   |   @@"]


def test_uniform_gate_shows_no_specialisation(tmp_path):
    data = planted_data(tmp_path)
    _, counts = ev.validation(planted_model(0.0), data, seq_len=16, batch_size=4, max_windows=5)
    r = ev.routing_report(counts)
    assert r["js"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    # both domains route identically, so their distributions are equal
    np.testing.assert_array_equal(np.array(r["distribution"])[:, 0], np.array(r["distribution"])[:, 1])


def test_dense_model_has_no_routing(tmp_path):
    data = planted_data(tmp_path)
    dense = Transformer(ModelConfig(**{k: v for k, v in TINY_MOE.items() if "expert" not in k})).eval()
    val, counts = ev.validation(dense, data, seq_len=16, max_windows=2)
    assert counts is None and set(val) == {"alpha", "beta"}
    # a near-uniform random model: loss close to log(vocab)
    assert val["alpha"]["loss"] == pytest.approx(math.log(16), abs=0.1)
    assert val["alpha"]["ppl"] == pytest.approx(math.exp(val["alpha"]["loss"]))


# ----------------------------------------------------------------------------------------------------------
# The same model in native and Mixtral format, through eval.py's command line

def test_mixtral_export_gives_same_numbers_as_native(tmp_path):
    from tokenizer import train_sentencepiece
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the cat sat on mat {i}. def f(x): return x + {i}" for i in range(100)))
    data = str(tmp_path / "data")
    os.makedirs(data)
    # written as DATA/tokenizer.model, the file meta.json names
    train_sentencepiece(str(text), os.path.join(data, "tokenizer"), vocab_size=300, num_threads=1)
    rng = np.random.default_rng(1)
    write_shards(data, {"prose": rng.integers(3, 150, 300), "code": rng.integers(150, 300, 300)}, 300)
    os.makedirs(os.path.join(data, "tasks"))
    with open(os.path.join(data, "tasks", "toy.jsonl"), "w") as f:
        for i in range(4):
            f.write(json.dumps({"context": "the cat sat on", "choices": [" mat", " the cat", f" {i}"],
                                "label": i % 3}) + "\n")

    torch.manual_seed(0)
    # E/k = 2: folding the scale into w2 is exact in floating point, so the two loads agree to the bit.
    model = Transformer(ModelConfig(**dict(TINY_MOE, vocab_size=300, hidden_size=16, initializer_range=0.2)))
    checkpoint.save_pretrained(model, str(tmp_path / "native"), format="native")
    checkpoint.save_pretrained(model, str(tmp_path / "mixtral"), format="mixtral")

    out = {}
    for fmt in ("native", "mixtral"):
        out[fmt] = ev.main([f"--ckpt={tmp_path / fmt}", f"--data={data}", "--seq_len=32", "--max_windows=4",
                            "--shots=1", f"--out={tmp_path / f'{fmt}.json'}", "--device=cpu", "--start_token=eos",
                            "--generate=the cat", "--max_new_tokens=4", "--temperature=0", "--batch_size=4"])
    a, b = out["native"], out["mixtral"]
    assert (a["model"]["format"], b["model"]["format"]) == ("llama_moe_stacked", "mixtral")
    assert a["start_ids"] == [2] and a["start_token"] == "eos"  # what a model of our shards saw before a document
    for d in ("prose", "code"):
        assert a["val"]["domains"][d]["loss"] == pytest.approx(b["val"]["domains"][d]["loss"], rel=1e-6)
    la = [x["loglikelihoods"] for x in a["tasks"]["toy"]["details"]]
    lb = [x["loglikelihoods"] for x in b["tasks"]["toy"]["details"]]
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert a["tasks"]["toy"]["acc"] == b["tasks"]["toy"]["acc"]
    assert a["tasks"]["toy"]["acc_norm"] == b["tasks"]["toy"]["acc_norm"]
    assert a["routing"]["distribution"] == b["routing"]["distribution"]
    assert a["routing"]["js"] == b["routing"]["js"] and 0 < a["routing"]["js"][0] < 1
    # greedy decoding: the same continuation from both formats
    assert len(a["samples"]) == 1 and a["samples"][0].startswith("the cat") and a["samples"] == b["samples"]
    saved = json.loads((tmp_path / "mixtral.json").read_text())
    assert saved["val"]["mean_loss"] == pytest.approx(b["val"]["mean_loss"])


def test_max_items_spreads_over_the_file(tmp_path):
    assert mc.pick_items(10, 0) == list(range(10)) and mc.pick_items(3, 5) == [0, 1, 2]
    assert mc.pick_items(360, 4) == [0, 90, 180, 270]  # not the first 4 (one domain's block)
    items = parsed([item("a", ["b", "c"], i % 2) for i in range(6)], tmp_path)
    r = mc.score_task(Bigram(), CharTokenizer(), items, start=[0], indices=[1, 4])
    assert r["n"] == 2 and [(d["index"], d["label"]) for d in r["details"]] == [(1, 1), (4, 0)]


def test_heatmap_png_or_a_note_when_matplotlib_is_missing(tmp_path):
    report = {"layers": [0, 1], "domains": ["a", "b"], "distribution": [[[0.5, 0.5], [1.0, 0.0]]] * 2}
    path = str(tmp_path / "routing.png")
    got = ev.save_heatmap(report, path)
    try:
        import matplotlib  # noqa: F401  (optional dependency)
    except ImportError:
        assert "matplotlib is not installed" in got and not os.path.exists(path)
    else:
        assert got == path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_shows_a_dash_for_a_row_evaluated_without_tasks(tmp_path, capsys):
    import compare
    val = {"domains": {"a": {"loss": 2.0, "batch_losses": [1.9, 2.1]}}, "mean_loss": 2.0}
    task = {"acc_norm": 0.6, "acc_norm_stderr": 0.05, "chance": 0.25, "n": 100}
    rows = {"with": {"val": val, "val_setup": "2 windows", "tasks": {"cloze": task}},
            "without": {"val": val, "val_setup": "2 windows"}}
    for name, r in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    compare.main([str(tmp_path / "with.json"), str(tmp_path / "without.json")])
    out = capsys.readouterr().out.splitlines()
    assert "0.600 +-0.050" in out[2] and out[3].split()[-3] == "-"
    (tmp_path / "other.json").write_text(json.dumps(dict(rows["with"], tasks={"quiz": task})))
    with pytest.raises(compare.UserError, match="different tasks"):
        compare.main([str(tmp_path / "with.json"), str(tmp_path / "other.json")])
    garbage = tmp_path / "log.jsonl"
    garbage.write_text('not json\n{"kind": "eval", "step": 3}\n[1, 2]\n')
    with pytest.raises(compare.UserError, match="holds no train.py training record"):  # used to report 0 tokens
        compare.main([str(tmp_path / "with.json"), f"--train_logs={garbage}"])
