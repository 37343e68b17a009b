"""split.py: the four ways of cutting experts (SPEC.md section 2), the MoE model they build, Mixtral round trip, CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
from configurator import UserError
from model import ModelConfig, Transformer, rope_cos_sin
from split import (SplitConfig, balanced_assign, build_moe, main, split_checkpoint, split_clustering, split_model,
                   split_random, split_sharing_inner, split_sharing_inter, taylor_importance)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_dense(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**TINY, **kw})).eval()
    with torch.no_grad():  # larger than the 0.02 init so that every neuron matters, norms not all ones
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.2)
    return model


def neurons(w_gate, w_up, w_down):
    """One row per neuron: (row of W_gate, row of W_up, column of W_down) concatenated -> (n, 3d)."""
    return torch.cat([w_gate, w_up, w_down.T], dim=1)


def expert_neurons(moe_layer):
    e = moe_layer.experts  # (E, 2 d_e, d), (E, d, d_e) -> (E * d_e, 3d), expert-major
    gate, up = e.gate_up_proj.chunk(2, dim=1)                             # 2 x (E, d_e, d)
    return neurons(gate.flatten(0, 1), up.flatten(0, 1), e.down_proj.permute(1, 0, 2).flatten(1))


def match_to_dense(rows, dense_ffn):
    """Index of the dense neuron each row equals exactly; fails if a row matches none."""
    dense = neurons(dense_ffn.gate_proj.weight, dense_ffn.up_proj.weight, dense_ffn.down_proj.weight)
    dist = torch.cdist(rows.detach(), dense.detach(), compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.min(dim=1)
    assert best.values.max().item() == 0.0, "an expert neuron is not a neuron of the dense FFN"
    return best.indices


# ----------------------------------------------------------------------------------------------------------
# Independent methods

@pytest.mark.parametrize("method", ["random", "clustering"])
def test_independent_methods_use_every_neuron_exactly_once(method):
    dense = tiny_dense()
    moe = split_model(dense, SplitConfig(num_experts=4, top_k=2, method=method))
    assert moe.config.expert_intermediate_size == 96 // 4 and moe.config.score_scale == 2.0
    for layer in range(2):
        got = match_to_dense(expert_neurons(moe.model.layers[layer].mlp), dense.model.layers[layer].mlp)
        assert sorted(got.tolist()) == list(range(96))  # a permutation: each neuron in exactly one expert
    # the rest of the model is the dense model's
    assert torch.equal(moe.model.layers[1].self_attn.q_proj.weight, dense.model.layers[1].self_attn.q_proj.weight)
    gate = moe.model.layers[0].mlp.gate
    assert gate.weight_noise.weight.abs().sum() == 0 and gate.gate_network.weight.abs().sum() > 0


@pytest.mark.parametrize("method", ["random", "clustering"])
def test_all_experts_with_score_one_reproduce_dense_logits(method, monkeypatch):
    dense = tiny_dense(1)
    moe = split_model(dense, SplitConfig(num_experts=4, top_k=4, method=method, scale=1.0))
    for mlp in moe.moe_layers():  # force every score to 1: sum_j E_j(x) == FFN(x) (SPEC section 2)
        real = mlp.gate.forward
        monkeypatch.setattr(mlp.gate, "forward", lambda x, real=real: real(x)._replace(
            scores=torch.ones(x.shape[0], 4)))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = dense(idx).logits
        got = moe(idx).logits
    assert (got - want).abs().max().item() < 1e-5
    # and the default scale with k < E is not the dense model (the test above could not pass by accident)
    moe2 = split_model(dense, SplitConfig(num_experts=4, top_k=2, method=method))
    with torch.no_grad():
        assert (moe2(idx)[0] - want).abs().max().item() > 1e-3


def test_split_random_is_a_seeded_partition():
    parts = split_random(96, 8, seed=3)
    assert [len(p) for p in parts] == [12] * 8
    assert sorted(torch.cat(parts).tolist()) == list(range(96))
    assert all(torch.equal(a, b) for a, b in zip(parts, split_random(96, 8, seed=3)))
    assert not all(torch.equal(a, b) for a, b in zip(parts, split_random(96, 8, seed=4)))


# ----------------------------------------------------------------------------------------------------------
# Clustering

def greedy_reference(cost, capacity):
    """The rule in words: all (point, bin) pairs by increasing cost; take when the point is free and the bin has room."""
    P, C = cost.shape
    owner, room = [-1] * P, [capacity] * C
    for flat in np.argsort(cost.numpy().ravel(), kind="stable"):
        p, c = divmod(int(flat), C)
        if owner[p] < 0 and room[c] > 0:
            owner[p], room[c] = c, room[c] - 1
    return owner


@pytest.mark.parametrize("P,C,cap", [(60, 4, 15), (50, 3, 10)])  # exactly full; more points than room
def test_balanced_assign_is_the_greedy_rule(P, C, cap):
    cost = torch.rand(P, C, generator=torch.Generator().manual_seed(P))
    assert balanced_assign(cost, cap).tolist() == greedy_reference(cost, cap)


def test_clustering_is_balanced_and_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    E, per, d = 6, 16, 24
    centers = F.normalize(torch.randn(E, d, generator=g), dim=1) * 3
    truth = torch.arange(E).repeat_interleave(per)
    W = centers[truth] + 0.3 * torch.randn(E * per, d, generator=g)       # planted groups of rows
    perm = torch.randperm(E * per, generator=g)
    W, truth = W[perm], truth[perm]
    parts = split_clustering(W, E, seed=1)
    assert [len(p) for p in parts] == [per] * E                           # exactly balanced
    assert sorted(torch.cat(parts).tolist()) == list(range(E * per))
    assert sorted(sorted(p.tolist()) for p in parts) == sorted(
        sorted(torch.nonzero(truth == j).squeeze(1).tolist()) for j in range(E))
    # unbalanced planted groups are still cut into equal clusters
    W2 = torch.cat([W[truth == 0], W])[:E * per]
    assert [len(p) for p in split_clustering(W2, E)] == [per] * E


# ----------------------------------------------------------------------------------------------------------
# Importance and the sharing methods

def brute_force_importance(model, batches):
    """mean over tokens of |a_i * dL/da_i| with a computed by hand as an explicit tensor in a re-written forward."""
    L = model.config.num_hidden_layers
    total, count = [0.0] * L, 0
    for batch in batches:
        x_idx, y = batch[:, :-1], batch[:, 1:]
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(x_idx.shape[1]))
        h = model.model.embed_tokens(x_idx)
        acts = []
        for block in model.model.layers:
            h = h + block.self_attn(block.input_layernorm(h), cos, sin)
            z = block.post_attention_layernorm(h)
            a = F.silu(z @ block.mlp.gate_proj.weight.T) * (z @ block.mlp.up_proj.weight.T)  # (B, S, d_h)
            a.retain_grad()
            acts.append(a)
            h = h + a @ block.mlp.down_proj.weight.T
        logits = model.lm_head(model.model.norm(h))
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        grads = torch.autograd.grad(loss, acts)
        for i, (a, g) in enumerate(zip(acts, grads)):
            total[i] = total[i] + (a * g).abs().sum(dim=(0, 1)).detach()
        count += y.numel()
    return [t / count for t in total]


def test_taylor_importance_equals_brute_force():
    model = tiny_dense(2)
    g = torch.Generator().manual_seed(0)
    clusters = [[torch.randint(0, 64, (2, 9), generator=g), torch.randint(0, 64, (3, 9), generator=g)],
                [torch.randint(0, 64, (2, 9), generator=g)]]
    got = taylor_importance(model, clusters)
    assert len(got) == 2 and got[0].shape == (2, 96)
    for c, batches in enumerate(clusters):
        want = brute_force_importance(model, batches)
        for layer in range(2):
            assert torch.allclose(got[layer][c], want[layer], rtol=1e-4, atol=1e-9)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_sharing_inner_takes_each_clusters_top_m():
    imp = torch.rand(4, 96, generator=torch.Generator().manual_seed(0))
    parts = split_sharing_inner(imp, 30)
    for row, part in zip(imp, parts):
        assert len(part) == 30 == len(set(part.tolist()))
        assert row[part].min() >= row.topk(30).values.min()


def test_sharing_inter_shared_block_and_disjoint_experts():
    E, d_h, shared_size, m = 4, 96, 10, 12
    imp = torch.rand(E, d_h, generator=torch.Generator().manual_seed(1))
    imp[:, :6] += 5.0  # neurons 0..5 matter to every cluster: they must be shared
    shared, experts = split_sharing_inter(imp, shared_size, m)
    assert len(shared) == shared_size and set(range(6)) <= set(shared.tolist())
    assert [len(e) for e in experts] == [m] * E
    used = shared.tolist() + torch.cat(experts).tolist()
    assert len(used) == len(set(used))  # disjoint from each other and from the shared block
    # routed experts = the greedy rule (best (expert, neuron) pair first) on the neurons left
    rest = [i for i in range(d_h) if i not in set(shared.tolist())]
    owner = greedy_reference(-imp[:, rest].T, m)
    for j in range(E):
        assert experts[j].tolist() == [rest[i] for i, o in enumerate(owner) if o == j]


def write_shards(path, vocab, domains=("a", "b", "c"), n=600, tokenizer_sha256=None):
    """A tiny shard folder in data/prepare.py's format."""
    os.makedirs(path)
    rng = np.random.default_rng(0)
    meta = {"vocab_size": vocab, "dtype": "uint16", "bos_id": 1, "eos_id": 2, "tokenizer": "tokenizer.model",
            "tokenizer_sha256": tokenizer_sha256, "domains": {}}
    for i, name in enumerate(domains):
        for split in ("train", "val"):
            # each domain draws from its own slice of the vocabulary, so the domains are different kinds of text
            rng.integers(10 * i, 10 * i + 20, size=n).astype(np.uint16).tofile(os.path.join(path, f"{name}.{split}.bin"))
        meta["domains"][name] = {"train_tokens": n, "val_tokens": n, "train_docs": 1, "val_docs": 1}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(path)


@pytest.mark.parametrize("method", ["sharing_inner", "sharing_inter"])
def test_sharing_methods_build_configured_sizes(method, tmp_path):
    data = write_shards(tmp_path / "data", 64)
    dense = tiny_dense(3)
    cfg = SplitConfig(num_experts=4, top_k=2, method=method, importance_seqs=2, seq_len=16, batch_size=2, data=data)
    moe = split_model(dense, cfg)
    c = moe.config
    if method == "sharing_inner":  # defaults: d_h / E each, no shared block
        assert (c.expert_intermediate_size, c.shared_intermediate_size) == (24, 0)
    else:  # shared = d_h / E, experts (k * d_h/E - shared) / k: active width k/E of the dense FFN
        assert (c.expert_intermediate_size, c.shared_intermediate_size) == (12, 24)
    for layer in range(2):
        mlp, ffn = moe.model.layers[layer].mlp, dense.model.layers[layer].mlp
        got = match_to_dense(expert_neurons(mlp), ffn).view(4, -1)
        assert all(len(set(e.tolist())) == e.numel() for e in got)
        if method == "sharing_inter":
            s = mlp.shared
            shared = match_to_dense(neurons(s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight), ffn)
            used = shared.tolist() + got.flatten().tolist()
            assert len(used) == len(set(used)) == 24 + 4 * 12
    with pytest.raises(UserError, match="--data"):
        split_model(dense, SplitConfig(num_experts=4, top_k=2, method=method))


def test_sample_text_of_another_tokenizer_is_refused(tmp_path):
    data = write_shards(tmp_path / "data", 64, tokenizer_sha256="cd" * 32)
    cfg = SplitConfig(num_experts=4, top_k=2, method="sharing_inner", importance_seqs=2, seq_len=16, data=data)
    with pytest.raises(UserError, match="another tokenizer"):
        split_model(tiny_dense(tokenizer_sha256="ab" * 32), cfg)
    split_model(tiny_dense(tokenizer_sha256="cd" * 32), cfg)  # the same tokenizer: accepted


# ----------------------------------------------------------------------------------------------------------
# Round trip through transformers: LLaMA -> split -> Mixtral

def test_llama_to_mixtral_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items()}, attn_implementation="eager")
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "llama")
    cfg = SplitConfig(src=str(tmp_path / "llama"), dst=str(tmp_path / "mixtral"), format="mixtral", num_experts=4,
                      top_k=2, method="random", gate_std=1.0)  # a decisive gate: no near-ties
    moe = split_checkpoint(cfg)
    mixtral, info = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "mixtral", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        want = moe.eval()(idx).logits
        got = mixtral.eval()(idx).logits
    assert (got - want).abs().max().item() < 1e-5
    assert moe.config.score_scale == 2.0  # the rescale factor went into w2, not lost


# ----------------------------------------------------------------------------------------------------------
# Command line and bad input

def test_cli_writes_loads_and_refuses_existing_destination(tmp_path, capsys):
    src, dst = str(tmp_path / "dense"), str(tmp_path / "moe")
    checkpoint.save_pretrained(tiny_dense(4, tokenizer_sha256="ab" * 32), src)
    main([f"--src={src}", f"--dst={dst}", "--num_experts=4", "--top_k=1", "--method=clustering"])
    moe = checkpoint.load_pretrained(dst)
    assert (moe.config.num_experts, moe.config.num_experts_per_tok, moe.config.score_scale) == (4, 1, 4.0)
    assert moe.config.tokenizer_sha256 == "ab" * 32  # the experts read the source's token ids
    before = {f: os.path.getmtime(os.path.join(dst, f)) for f in os.listdir(dst)}
    with pytest.raises(UserError, match="--overwrite"):
        main([f"--src={src}", f"--dst={dst}", "--num_experts=4", "--top_k=2"])
    assert {f: os.path.getmtime(os.path.join(dst, f)) for f in os.listdir(dst)} == before
    main([f"--src={src}", f"--dst={dst}", "--num_experts=4", "--top_k=2", "--scale=1", "--overwrite"])
    assert checkpoint.load_pretrained(dst).config.score_scale == 1.0
    out = capsys.readouterr().out
    assert "wrote" in out and "peak memory (RSS)" in out


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_text("my notes"), "is a file"),                              # README.md, say
    (lambda p: (p.mkdir(), (p / "thesis.tex").write_text("mine")), "not a model"),  # a folder of the user's
])
def test_dst_that_is_not_a_model_is_never_replaced(tmp_path, make, match):
    src, dst = str(tmp_path / "dense"), tmp_path / "dst"
    checkpoint.save_pretrained(tiny_dense(4), src)
    make(dst)
    before = sorted(os.walk(dst)) if dst.is_dir() else dst.read_text()
    with pytest.raises(UserError, match=match):
        main([f"--src={src}", f"--dst={dst}", "--num_experts=4", "--top_k=1", "--overwrite"])
    assert (sorted(os.walk(dst)) if dst.is_dir() else dst.read_text()) == before
    with pytest.raises(ValueError, match=match):  # the same rule in the API
        checkpoint.save_pretrained(tiny_dense(4), str(dst))
    assert not [n for n in os.listdir(tmp_path) if ".old" in n or ".tmp" in n]


@pytest.mark.parametrize("args,match", [
    (["--num_experts=5"], r"not divisible.*\[2, 3, 4, 6, 8"),     # 96 % 5 != 0, says what works
    (["--num_experts=4", "--top_k=5"], "top_k=5"),
    (["--num_experts=4", "--top_k=2.5"], "--top_k"),             # ints refuse floats (configurator)
    (["--method=sharing_inner", "--num_experts=4"], "--data"),
    (["--num_experts=4", "--gate_type=mlp", "--format=mixtral"], "MLP gate"),
    (["--num_experts=4", "--method=sharing_inter", "--data=x", "--format=mixtral"], "shared"),
    (["--num_experts=4", "--method=sharing_inner", "--data=no/such/text.txt"], "--data"),
    (["--num_experts=4", "--method=sharing_inter", "--shared_size=50", "--expert_size=20", "--data=x"], "exceeds"),
    (["--num_experts=4", "--expert_size=10"], "--expert_size"),
    (["--num_experts=4", "--scale=0"], "--scale"),
    (["--num_experts=4", "--format=gguf"], "--format"),
    (["--num_experts=4", "--num_expert=4"], "did you mean --num_experts"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, match):
    """... and before the weights are read (a 7B source is 13 GB): here they are unreadable, yet the settings'
    error is the one reported."""
    src, dst = str(tmp_path / "dense"), str(tmp_path / "moe")
    checkpoint.save_pretrained(tiny_dense(), src)
    with open(os.path.join(src, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    open(tmp_path / "x", "w").close()
    with pytest.raises(UserError, match=match):
        main([f"--src={src}", f"--dst={dst}", "--top_k=2"] + [a.replace("=x", f"={tmp_path / 'x'}") for a in args])
    assert sorted(os.listdir(tmp_path)) == ["dense", "x"]


def test_source_must_be_a_dense_llama_and_stay_untouched(tmp_path):
    moe_dir, dense_dir = str(tmp_path / "moe"), str(tmp_path / "runs" / "dense")
    dense = tiny_dense()
    checkpoint.save_pretrained(build_moe(dense, [(split_random(96, 4), None, None, None)] * 2, 4, 2, 24, 0, 2.0), moe_dir)  # native MoE format
    with pytest.raises(UserError, match="dense LLaMA"):
        main([f"--src={moe_dir}", f"--dst={tmp_path / 'out'}", "--num_experts=4", "--top_k=2"])
    with pytest.raises(UserError, match="does not exist"):
        main([f"--src={tmp_path / 'nowhere'}", f"--dst={tmp_path / 'out'}"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="config.json"):  # a folder that is not a checkpoint: the loader says why
        main([f"--src={tmp_path / 'empty'}", f"--dst={tmp_path / 'out'}"])
    checkpoint.save_pretrained(dense, dense_dir)
    files = {f: open(os.path.join(dense_dir, f), "rb").read() for f in os.listdir(dense_dir)}
    for dst in (dense_dir, os.path.join(dense_dir, "moe"), str(tmp_path / "runs")):  # src = dst, inside, around
        with pytest.raises(UserError, match="--dst"):
            main([f"--src={dense_dir}", f"--dst={dst}", "--num_experts=4", "--top_k=2", "--overwrite"])
    assert {f: open(os.path.join(dense_dir, f), "rb").read() for f in os.listdir(dense_dir)} == files
    assert sorted(os.listdir(tmp_path)) == ["empty", "moe", "runs"] and os.listdir(tmp_path / "runs") == ["dense"]


def test_cli_user_error_is_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "split.py"), f"--src={tmp_path / 'nowhere'}",
                        f"--dst={tmp_path / 'out'}"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("split.py: error: --src=") and "Traceback" not in r.stderr


def test_split_holds_about_one_model_in_memory(tmp_path):
    """The source is copied out of its file map tensor by tensor and each dense FFN is dropped once its experts
    are cut, so the split's peak resident memory is about one model, not the file map plus the experts (~1.7x).
    Measured in a fresh process, against the same process building the model on the meta device only."""
    src = str(tmp_path / "dense")
    torch.manual_seed(0)
    config = dict(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)
    checkpoint.save_pretrained(Transformer(ModelConfig(**config)), src)   # 54M fp32 parameters: 218 MB
    size = os.path.getsize(os.path.join(src, "model.safetensors"))
    code = ("import sys, torch, split; from model import ModelConfig\n"
            "split.Transformer.save_pretrained = lambda *a, **k: None  # the split alone, not the writer\n"
            "cfg = split.SplitConfig(src=sys.argv[2], dst=sys.argv[3])\n"
            "if sys.argv[1] == 'split':\n"
            "    split.split_checkpoint(cfg)\n"
            "else:  # Python, torch and a model on the meta device (one-time allocations, ~70 MB)\n"
            f"    with torch.device('meta'): split.Transformer(ModelConfig(**{config}))\n"
            "print(split.peak_rss_gib())")
    peak = {}
    for what in ("baseline", "split"):
        r = subprocess.run([sys.executable, "-c", code, what, src, str(tmp_path / "moe")], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        peak[what] = float(r.stdout.split()[-1])
    extra = (peak["split"] - peak["baseline"]) * 2**30 / size
    # Measured 1.24-1.26x here (4 runs); holding the file map and the experts at once is ~1.7x. The bound sits
    # between the two, not at the edge of the measured values (1.3 failed by chance once).
    assert 0.9 < extra < 1.45, f"the split held {extra:.2f}x the model's size ({peak})"


def test_importance_memory_does_not_grow_with_the_sample_batches():
    """The Taylor-importance pass (sharing methods) holds the model plus ONE batch's graph, however many batches
    it scores: a hook that kept each batch's activation alive once grew it by a graph per batch. In a fresh
    process the peak (VmHWM) after scoring 2 batches must not rise when 8 batches of the same shape follow
    (each batch saves ~60 MB of activations here, so a leak of even two of them shows)."""
    code = ("import torch, split; from model import ModelConfig, Transformer\n"
            "torch.manual_seed(0)\n"
            "m = Transformer(ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=1024,\n"
            "                            num_hidden_layers=4, num_attention_heads=4))\n"
            "batches = lambda n: [[torch.randint(0, 1024, (2, 257)) for _ in range(n)] for _ in range(2)]\n"
            "split.taylor_importance(m, batches(1)); first = split.peak_rss_gib()\n"
            "split.taylor_importance(m, batches(4)); print(first, split.peak_rss_gib())")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, LLAMA_MOE_KERNELS="reference"))
    assert r.returncode == 0, r.stderr
    first, after = map(float, r.stdout.split()[-2:])
    assert after - first < 0.1, f"8 batches raised the peak from {first:.2f} to {after:.2f} GiB"
