"""eval.py: multiple-choice scoring against hand-computed log-probs, routing statistics on planted models,
and a Mixtral export giving the same numbers as the native checkpoint."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval as ev
from model import ModelConfig, Transformer


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
    """One token per character of CHARS; enough for encode_pair and the scorer."""
    bos_id, eos_id, vocab_size = 0, 0, len(CHARS)

    def encode(self, text):
        return [CHARS.index(ch) for ch in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


class Bigram(torch.nn.Module):
    """logits[b, s] = log P(. | idx[b, s]): log_softmax of them gives back log P exactly (rows sum to 1)."""

    def __init__(self, max_positions=64):
        super().__init__()
        table = torch.tensor([PROBS[i] for i in range(len(CHARS))], dtype=torch.float64)
        self.register_buffer("table", table.log().float())
        self.lm_head = torch.nn.Linear(1, 1)  # eval.py finds the device through lm_head
        self.config = SimpleNamespace(max_position_embeddings=max_positions)
        self.calls = 0

    def forward(self, idx, targets=None):
        self.calls += 1
        return self.table[idx], None


ITEMS = [
    # after "a": "c" has log .4 = -0.916 (1 byte); "bb" has log .5 + log .6 = -1.204 (2 bytes, -0.602 per byte)
    {"context": "a", "choices": ["c", "bb"], "label": 1},
    # after "c": "é" has log .4 = -0.916 over 2 bytes (-0.458/byte; -0.916 per character); "bb" as above
    {"context": "c", "choices": ["é", "bb"], "label": 0},
]


def test_mc_scores_match_hand_computed_logprobs():
    model, tok = Bigram(), CharTokenizer()
    r = ev.score_task(model, tok, ITEMS, prefix=[0])
    want = [[math.log(0.4), math.log(0.5) + math.log(0.6)], [math.log(0.4), math.log(0.5) + math.log(0.6)]]
    got = [d["loglikelihoods"] for d in r["details"]]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    # acc takes raw sums: "c" (wrong) then "é" (right). acc_norm divides by bytes: "bb" (right), then "é"
    # (right: -0.458 > -0.602 per byte; per *character* "é" would lose, -0.916 < -0.602).
    assert [d["pred"] for d in r["details"]] == [0, 0]
    assert [d["pred_norm"] for d in r["details"]] == [1, 0]
    assert r["acc"] == 0.5 and r["acc_norm"] == 1.0
    assert r["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 1))  # sqrt(p(1-p)/(n-1)), lm-eval's formula
    assert r["n"] == 2 and r["chance"] == 0.5


def test_loglikelihoods_padding_truncation_and_greedy():
    tok = CharTokenizer()
    requests = [ev.encode_pair(tok, "a", "bb"), ev.encode_pair(tok, "ccccca", "c"), ev.encode_pair(tok, "a", "c")]
    one = ev.loglikelihoods(Bigram(), requests, prefix=[0], batch_size=1)
    batched = ev.loglikelihoods(Bigram(), requests, prefix=[0], batch_size=3)  # right-padded batch
    # A 3-position model: the long context is cut from the left; a bigram only needs the last token.
    short = ev.loglikelihoods(Bigram(max_positions=3), requests, prefix=[0], batch_size=3)
    for a, b, c in zip(one, batched, short):
        assert a[0] == pytest.approx(b[0], abs=1e-6) and a[0] == pytest.approx(c[0], abs=1e-6)
    assert one[1][0] == pytest.approx(math.log(0.4), abs=1e-6)
    # greedy: "b" after "a" is the argmax, "bb" continues with argmax "b"; "c" after "a" is not
    assert [g for _, g in one] == [True, False, False]


def test_encode_pair_moves_trailing_space_into_the_choice():
    ctx, cont = ev.encode_pair(CharTokenizer(), "a ", "b")
    assert ctx == [1] and cont == [5, 2]
    # and the score is then log P(" " | a) + log P(b | " ")
    (ll, _), = ev.loglikelihoods(Bigram(), [(ctx, cont)], prefix=[0])
    assert ll == pytest.approx(math.log(0.01) + math.log(0.5), abs=1e-6)


def test_fewshot_prompts_are_seeded_and_exclude_the_question():
    items = [{"context": f"q{i}=", "choices": [f"x{i}", f"y{i}"], "label": i % 2} for i in range(6)]
    for i in range(6):
        prompt = ev.fewshot_context(items, i, shots=3, seed=7)
        parts = prompt.split("\n\n")
        assert len(parts) == 4 and parts[-1] == f"q{i}="
        for demo in parts[:3]:
            j = int(demo[1:demo.index("=")])
            assert j != i and demo == f"q{j}=" + items[j]["choices"][items[j]["label"]]
        assert len(set(parts[:3])) == 3
        assert prompt == ev.fewshot_context(items, i, shots=3, seed=7)
    assert any(ev.fewshot_context(items, i, 3, seed=7) != ev.fewshot_context(items, i, 3, seed=8) for i in range(6))
    assert ev.fewshot_context(items, 2, shots=0, seed=7) == "q2="
    with pytest.raises(ValueError, match="shots"):
        ev.fewshot_context(items, 0, shots=6, seed=7)


def test_read_task_rejects_bad_items(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"context": "a", "choices": ["b", "c"], "label": 0}) + "\n"
                    + json.dumps({"context": "a", "choices": ["b", "c"], "label": 2}) + "\n")
    with pytest.raises(ValueError, match=r"t.jsonl:2"):
        ev.read_task(str(path))


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
    model.save_pretrained(str(tmp_path / "native"), format="native")
    model.save_pretrained(str(tmp_path / "mixtral"), format="mixtral")

    out = {}
    for fmt in ("native", "mixtral"):
        out[fmt] = ev.main(["--ckpt", str(tmp_path / fmt), "--data", data, "--seq_len", "32", "--max_windows", "4",
                            "--shots", "1", "--out", str(tmp_path / f"{fmt}.json"), "--device", "cpu",
                            "--generate", "the cat", "--max_new_tokens", "4", "--temperature", "0"])
    a, b = out["native"], out["mixtral"]
    assert (a["model"]["format"], b["model"]["format"]) == ("llama_moe_stacked", "mixtral")
    assert a["doc_start"] == [2]  # the data folder's own tokenizer: documents start after eos
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


def test_max_items_spreads_over_the_file_and_fewshot_uses_the_whole_file():
    assert ev.pick_items(10, 0) == list(range(10)) and ev.pick_items(3, 5) == [0, 1, 2]
    assert ev.pick_items(360, 4) == [0, 90, 180, 270]  # not the first 4 (one domain's block)
    items = ITEMS * 3  # 6 questions, two kinds
    r = ev.score_task(Bigram(), CharTokenizer(), items, prefix=[0], indices=[1, 4])
    assert r["n"] == 2 and [d["label"] for d in r["details"]] == [0, 1]


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


def test_checkpoint_tokenizer_must_match_the_data(tmp_path):
    data = planted_data(tmp_path)
    (tmp_path / "data" / "tokenizer.model").write_bytes(b"ours")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "tokenizer.model").write_bytes(b"theirs")
    with pytest.raises(ValueError, match="tokenised with"):
        ev.check_data_tokenizer(ev.EvalConfig(ckpt=str(ckpt), data=data))
    (ckpt / "tokenizer.model").write_bytes(b"ours")  # the data was prepared with the model's tokenizer
    ev.check_data_tokenizer(ev.EvalConfig(ckpt=str(ckpt), data=data))
