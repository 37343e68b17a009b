"""model.py against the reference peer: Hugging Face transformers' LlamaForCausalLM, plus checkpoint I/O errors."""
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import checkpoint
from model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

# Tiny random configs covering what real LLaMAs use: MHA and GQA, tied and untied embeddings,
# llama3 and linear rope scaling, odd sizes.
CONFIGS = {
    "mha_tied": dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_llama3": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "odd_sizes": dict(vocab_size=101, hidden_size=72, intermediate_size=200, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5),
    "mqa_linear_rope": dict(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=1,
                            rope_scaling={"type": "linear", "factor": 2.0}),
}


def hf_model(kw, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(max_position_embeddings=128, attn_implementation="eager", **kw)
    m = transformers.LlamaForCausalLM(cfg).eval()
    # HF initialises norms to 1; randomise them so a swapped norm cannot hide.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def hf_logits(m, idx):
    with torch.no_grad():
        return m(idx).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_both_ways(name, tmp_path):
    ref = hf_model(CONFIGS[name])
    ref.save_pretrained(tmp_path / "hf")
    idx = torch.randint(0, CONFIGS[name]["vocab_size"], (2, 40))
    want = hf_logits(ref, idx)

    ours = checkpoint.load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        got = ours(idx).logits
    assert (got - want).abs().max().item() < 1e-5

    # And back: what we save, transformers loads with no missing or unexpected keys, same logits.
    checkpoint.save_pretrained(ours, tmp_path / "ours")
    back, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True,
                                                               attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (hf_logits(back.eval(), idx) - want).abs().max().item() < 1e-5


def test_loss_matches_transformers(tmp_path):
    ref = hf_model(CONFIGS["odd_sizes"])
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load_pretrained(tmp_path)
    idx = torch.randint(0, 101, (2, 16))
    with torch.no_grad():
        want = ref(idx, labels=idx).loss  # HF shifts labels inside
        got = ours(idx[:, :-1], targets=idx[:, 1:]).loss
    assert abs(got.item() - want.item()) < 1e-5


def test_greedy_generation_with_cache_equals_without(tmp_path, monkeypatch):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(**CONFIGS["gqa_llama3"], max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 128, (2, 7))
    projected = []  # positions each generation step hands the output projection: the last one only
    hook = model.lm_head.register_forward_pre_hook(lambda module, args: projected.append(args[0].shape[1]))
    with monkeypatch.context() as env:  # the torch decode path (the C++ one reads lm_head's weight directly)
        env.setenv("LLAMA_MOE_KERNELS", "reference")
        a = model.generate(prompt, 20, temperature=0, use_cache=True)
        b = model.generate(prompt, 20, temperature=0, use_cache=False)
    hook.remove()
    assert projected == [1] * 40  # not the prompt's 7 positions at prefill
    assert a.shape == (2, 27)
    assert torch.equal(a, b)
    assert torch.equal(model.generate(prompt, 20, temperature=0), a)  # the default decode path (C++ ops if built)
    # And it agrees with transformers' own greedy decoding.
    ref = hf_model(CONFIGS["gqa_llama3"])
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load_pretrained(tmp_path)
    ref.generation_config.eos_token_id = None  # never stop early: compare 12 greedy steps exactly
    want = ref.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 12, temperature=0), want)


def test_sampling_respects_top_k():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**CONFIGS["mha_tied"], max_position_embeddings=64)).eval()
    prompt = torch.randint(0, 97, (1, 5))
    logits = model(prompt).logits
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    for seed in range(10):
        torch.manual_seed(seed)
        out = model.generate(prompt, 1, temperature=1.0, top_k=3)
        assert out[0, -1].item() in allowed


def test_sharded_checkpoint_loads(tmp_path):
    ref = hf_model(CONFIGS["odd_sizes"])
    ref.save_pretrained(tmp_path / "hf")
    ours = checkpoint.load_pretrained(tmp_path / "hf")
    checkpoint.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(os.listdir(tmp_path / "sharded"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
    idx = torch.randint(0, 101, (1, 12))
    again = checkpoint.load_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ours(idx)[0])
    # transformers reads our shards too
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager")
    assert (hf_logits(back.eval(), idx) - hf_logits(ref, idx)).abs().max().item() < 1e-5


def test_bf16_checkpoint_keeps_bf16_unless_asked(tmp_path):
    ref = hf_model(CONFIGS["mha_tied"]).to(torch.bfloat16)
    ref.save_pretrained(tmp_path)
    assert checkpoint.load_pretrained(tmp_path).lm_head.weight.dtype == torch.bfloat16
    m32 = checkpoint.load_pretrained(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    assert m32.lm_head.weight is m32.model.embed_tokens.weight  # still tied after loading


def test_transformers_v4_style_config_is_read(tmp_path):
    # Older checkpoints (and most on the hub) carry rope_theta + rope_scaling instead of rope_parameters.
    ref = hf_model(CONFIGS["gqa_llama3"])
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ours = checkpoint.load_pretrained(tmp_path)
    idx = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        assert (ours(idx)[0][:, -1] - hf_logits(ref, idx)[:, -1]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------------
# Bad input: each a clear error naming the file / key and what is wrong.

@pytest.fixture
def saved(tmp_path):
    model = Transformer(ModelConfig(**CONFIGS["odd_sizes"], max_position_embeddings=64))
    checkpoint.save_pretrained(model, tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.load_pretrained(tmp_path)


def test_missing_weights_file(saved):
    os.remove(saved / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        checkpoint.load_pretrained(saved)


def _rewrite(saved, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(saved / "model.safetensors")
    edit(sd)
    save_file(sd, saved / "model.safetensors")


def test_missing_tensor(saved):
    _rewrite(saved, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoint.load_pretrained(saved)


def test_extra_tensor(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        checkpoint.load_pretrained(saved)


def test_wrong_shape(saved):
    _rewrite(saved, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(71)))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has shape \(71,\).*\(72,\)"):
        checkpoint.load_pretrained(saved)


def _edit_config(saved, **kw):
    raw = json.loads((saved / "config.json").read_text())
    raw.update(kw)
    (saved / "config.json").write_text(json.dumps(raw))


def test_unsupported_rope_scaling(saved):
    _edit_config(saved, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        checkpoint.load_pretrained(saved)


def test_hidden_not_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        ModelConfig(hidden_size=72, num_attention_heads=5, num_key_value_heads=5)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(hidden_size=72, num_attention_heads=6, num_key_value_heads=4)


def test_token_ids_out_of_range():
    model = Transformer(ModelConfig(**CONFIGS["mha_tied"], max_position_embeddings=64))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 2]]))


def test_unknown_model_type(saved):
    _edit_config(saved, model_type="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        checkpoint.load_pretrained(saved)


def test_save_is_atomic_and_replaces(saved):
    # A second save over the same folder replaces it whole, leaving no temporary folders behind.
    model = checkpoint.load_pretrained(saved)
    checkpoint.save_pretrained(model, saved)
    assert sorted(os.listdir(saved.parent)) == ["ck"]


def test_native_moe_round_trip(tmp_path):
    # Our own MoE format (stacked experts, a shared block, per-layer scale) saves and loads back exactly.
    cfg = ModelConfig(**CONFIGS["odd_sizes"], max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                      expert_intermediate_size=50, shared_intermediate_size=24, gate_type="mlp",
                      score_scale=[2.0, 1.5, 1.0])
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    checkpoint.save_pretrained(model, tmp_path / "moe", max_shard_bytes=100_000)
    back = checkpoint.load_pretrained(tmp_path / "moe")
    assert back.config == model.config
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sorted(sd) == sorted(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    idx = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], back(idx)[0])


def tiny_moe(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CONFIGS["gqa_llama3"], max_position_embeddings=64, num_experts=4,
                                   num_experts_per_tok=2, expert_intermediate_size=32, **kw))


def test_moe_under_bf16_autocast_runs_experts_in_bf16():
    # Autocast must reach the custom expert op (it holds most of the FLOPs), with one thread as under torchrun.
    model = tiny_moe()
    seen = []
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype))  # (y, gate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16))).loss
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    assert seen == [torch.bfloat16] and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_bf16_model_keeps_fp32_rope_frequencies():
    model = tiny_moe().to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_generate_is_greedy_and_restores_training_mode():
    model = tiny_moe().train()  # training mode would add gate noise: generate must not
    prompt = torch.randint(0, 128, (1, 5))
    a, b = model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0)
    assert torch.equal(a, b) and model.training


@pytest.mark.parametrize("kw", [{}, dict(shared_intermediate_size=24, expert_weighting="unit", score_scale=1.5)])
def test_moe_decoding_path_gives_the_plain_paths_greedy_tokens(kw):
    # generate() prefills through forward() and then runs decode_step, whose MoE layers run the chosen experts
    # directly (no gate statistics, no permute): the same tokens as recomputing everything every step.
    torch.manual_seed(3)
    model = tiny_moe(**kw).eval()
    prompt = torch.randint(0, 128, (2, 6))  # two rows: T*k = 4 expert rows per layer and step
    fast = model.generate(prompt, 16, temperature=0)
    assert torch.equal(fast, model.generate(prompt, 16, temperature=0, use_cache=False))
    # One step's logits agree with forward's last position, not just their argmax.
    model.setup_cache(2, 32)
    try:
        model(fast[:, :10], start_pos=0)
        step = model.decode_step(fast[:, 10:11], 10)
    finally:
        model.clear_cache()
    torch.testing.assert_close(step, model(fast[:, :11]).logits[:, -1], rtol=1e-5, atol=1e-5)


def test_cached_forward_continues_a_prefill_in_chunks():
    # forward(..., start_pos=p) after positions 0..p-1 are cached: each new query sees the cache and the new
    # tokens before it (setup_cache's promise), so a prompt prefilled in two chunks gives the full forward's logits.
    torch.manual_seed(4)
    model = tiny_moe().eval()
    idx = torch.randint(0, 128, (2, 12))
    model.setup_cache(2, 16)
    try:
        first = model(idx[:, :5], start_pos=0).logits
        rest = model(idx[:, 5:], start_pos=5).logits
    finally:
        model.clear_cache()
    torch.testing.assert_close(torch.cat((first, rest), 1), model(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~1 min on 2 cores: inductor compiles the layer's kernels
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_decoding_gives_the_eager_tokens(monkeypatch):
    # generate(compile=True) decodes through torch.compile'd layers (the MoE's fused chosen-expert form); with the
    # C++ decoding ops (fp32 CPU) it runs them eagerly instead, so the torch code is asked for here.
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "reference")
    import model as model_lib
    torch.manual_seed(4)
    model = tiny_moe(shared_intermediate_size=24).eval()
    prompt = torch.randint(0, 128, (1, 5))
    fast = model.generate(prompt, 8, temperature=0, compile=True)
    assert not model_lib._COMPILED.get("broken"), "torch.compile failed: the test ran the eager fallback"
    assert torch.equal(fast, model.generate(prompt, 8, temperature=0, use_cache=False))


def test_chosen_experts_fused_equals_the_loop():
    # The static-shape form torch.compile fuses (run eagerly here) computes what the decoding loop computes.
    from model import chosen_experts, chosen_experts_fused
    torch.manual_seed(0)
    x, gate_up, down = torch.randn(3, 16), torch.randn(5, 2 * 8, 16), torch.randn(5, 16, 8)
    ids, w = torch.rand(3, 5).topk(2, dim=-1).indices, torch.rand(3, 2)
    want = torch.stack([sum(w[t, i] * (F.silu(gate_up[j, :8] @ x[t]) * (gate_up[j, 8:] @ x[t])) @ down[j].T
                            for i, j in enumerate(ids[t].tolist())) for t in range(3)])
    torch.testing.assert_close(chosen_experts(x, ids, w, gate_up, down), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_experts_fused(x, ids, w, gate_up, down), want, rtol=1e-5, atol=1e-5)


def test_forward_returns_the_balance_loss_and_routing_it_computed():
    model = tiny_moe(balance_loss_weight=1.0).train()
    out = model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))
    assert len(out.routing) == len(model.moe_layers()) == 2 and out.loss.ndim == 0
    assert all(g.expert_ids.shape == (16, 2) and int(g.counts.sum()) == 32 for g in out.routing)
    torch.testing.assert_close(out.balance_loss, sum(g.balance_loss for g in out.routing))
    assert out.balance_loss > 0 and out.balance_loss.requires_grad
    dense = Transformer(ModelConfig(**CONFIGS["gqa_llama3"], max_position_embeddings=64))(torch.zeros(1, 3, dtype=torch.long))
    assert dense.routing == () and dense.balance_loss.item() == 0 and dense.loss is None


def test_gate_without_noise_has_no_trainable_noise_projection(tmp_path):
    model = tiny_moe(gate_noise=False)
    assert not model.model.layers[0].mlp.gate.weight_noise.weight.requires_grad
    checkpoint.save_pretrained(model, tmp_path / "mx", format="mixtral")
    back = checkpoint.load_pretrained(tmp_path / "mx")  # Mixtral: no noise projection on disk
    assert all(not m.gate.weight_noise.weight.requires_grad for m in back.moe_layers())


def test_moe_docstring_loop_equals_the_fast_path():
    # The plain-torch loop shown in MoEFeedForward's docstring is run as written and must give forward()'s output.
    import textwrap
    import torch.nn.functional as F
    from model import MoEFeedForward
    doc = MoEFeedForward.__doc__
    code = textwrap.dedent(doc[doc.index("        g = self.gate"):])
    layer = tiny_moe(shared_intermediate_size=24).eval().model.layers[1].mlp
    x = torch.randn(13, 64)
    env = dict(self=layer, x=x, e=layer.experts, E=layer.num_experts, s=layer.score_scale, F=F, torch=torch)
    with torch.no_grad():
        exec(code, env)
        torch.testing.assert_close(env["y"], layer(x)[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Damaged checkpoints: the error names the file, says what is wrong and what to do.

@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:len(b) // 2], "truncated or damaged"),
    (lambda b: b"", "empty"),
    (lambda b: os.urandom(len(b)), "truncated or damaged"),
])
def test_damaged_safetensors_names_the_file(saved, damage, reason):
    f = saved / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=rf"{f}: .*{reason}.*export the checkpoint again"):
        checkpoint.load_pretrained(saved)


@pytest.mark.parametrize("text, reason", [("{\"hidden_size\": 72,", "not valid JSON"),
                                          ("[1, 2]", "expected a JSON object")])
def test_malformed_config_json_names_the_file(saved, text, reason):
    (saved / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"{saved / 'config.json'}: {reason}"):
        checkpoint.load_pretrained(saved)


def test_config_missing_a_required_key_names_it(tmp_path):
    checkpoint.save_pretrained(tiny_moe(gate_noise=False), tmp_path / "mx", format="mixtral")
    raw = json.loads((tmp_path / "mx" / "config.json").read_text())
    del raw["num_local_experts"]
    (tmp_path / "mx" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config\.json: a mixtral config\.json needs the key 'num_local_experts'"):
        checkpoint.load_pretrained(tmp_path / "mx")


def test_malformed_shard_index_names_the_file(tmp_path):
    model = Transformer(ModelConfig(**CONFIGS["odd_sizes"], max_position_embeddings=64))
    checkpoint.save_pretrained(model, tmp_path / "ck", max_shard_bytes=60_000)
    (tmp_path / "ck" / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not a valid shard index"):
        checkpoint.load_pretrained(tmp_path / "ck")


def test_missing_tensor_error_names_the_folder_and_the_fix(saved):
    _rewrite(saved, lambda sd: sd.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=rf"{saved}: missing tensors.*export or download it again"):
        checkpoint.load_pretrained(saved)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'}: no such checkpoint folder"):
        checkpoint.load_pretrained(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------------
# Saving: copies only what must be copied, one file mode, no stale temporaries.

@pytest.mark.parametrize("format", ["native", "mixtral", "llama_moe"])
def test_save_copies_only_storage_sharing_tensors(tmp_path, monkeypatch, format):
    # Expert slices of one stack share storage: safetensors needs them apart, everything else is written
    # from the model's own memory (a second copy of a 7B model is 13 GiB).
    from safetensors.torch import load_file
    model = tiny_moe(gate_noise=False)
    clones = []
    original = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or original(t, *a, **k))
    checkpoint.save_pretrained(model, tmp_path / "ck", format=format)
    monkeypatch.undo()
    E, L = model.config.num_experts, model.config.num_hidden_layers
    # gate_up_proj: 2E slices of one storage -> 2E - 1 copies; down_proj: E - 1, except in mixtral, which
    # folds the scale into w2 (new tensors already)
    expected = {"native": 0, "mixtral": (2 * E - 1) * L, "llama_moe": (3 * E - 2) * L}[format]
    assert len(clones) == expected
    back = checkpoint.load_pretrained(tmp_path / "ck")
    if format != "mixtral":  # (mixtral holds s * w2 and s = 1)
        sd, sd2 = model.state_dict(), back.state_dict()
        assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    idx = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        assert (back(idx)[0] - model.eval()(idx)[0]).abs().max() < 1e-5
    if format == "llama_moe":  # bit-identical slices on disk
        saved = load_file(tmp_path / "ck" / "model.safetensors")
        assert torch.equal(saved["model.layers.1.mlp.calculator.experts.weight_up.3"],
                           model.model.layers[1].mlp.experts.gate_up_proj[3].chunk(2)[1])


def test_saved_files_share_one_mode_and_stale_temporaries_go(tmp_path):
    stale = tmp_path / "ck.tmp999999999"  # left by a killed save of a process that no longer runs
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    old = os.umask(0o022)
    try:
        checkpoint.save_pretrained(Transformer(ModelConfig(**CONFIGS["odd_sizes"], max_position_embeddings=64)), 
            tmp_path / "ck", max_shard_bytes=60_000)
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / "ck" / f).st_mode & 0o777 for f in os.listdir(tmp_path / "ck")}
    assert len(modes) > 3 and set(modes.values()) == {0o644}, modes
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_a_missing_expert_half_is_named(tmp_path):
    """Mixtral stores each expert's gate (w1) and up (w3) apart: one of them missing names the expert."""
    from safetensors.torch import load_file, save_file
    checkpoint.save_pretrained(tiny_moe(gate_noise=False), tmp_path / "mx", format="mixtral")
    path = tmp_path / "mx" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj \(up half of experts \[2\]\)"):
        checkpoint.load_pretrained(tmp_path / "mx")
    tensors["model.layers.1.block_sparse_moe.experts.2.w4.weight"] = torch.zeros(3)  # a name no model has
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w4"):
        checkpoint.load_pretrained(tmp_path / "mx")


def test_an_expert_stored_twice_or_out_of_range_is_refused(tmp_path):
    """Per-expert checkpoints (Mixtral): an expert written twice (another one then missing) used to pass the
    per-name count and leave uninitialised memory; an index past the config's experts was a raw IndexError."""
    from safetensors.torch import load_file, save_file
    checkpoint.save_pretrained(tiny_moe(gate_noise=False), tmp_path / "mx", format="mixtral")
    path = tmp_path / "mx" / "model.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if ".experts.1.w1." in k)
    first = {k: v for k, v in tensors.items() if k != name}              # expert 1 missing here ...
    copy = {name.replace(".experts.1.", ".experts.0."): tensors[name]}    # ... and expert 0 again in a shard
    save_file(first, path, metadata={"format": "pt"})
    save_file(copy, tmp_path / "mx" / "extra.safetensors", metadata={"format": "pt"})
    with open(tmp_path / "mx" / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {**{k: "model.safetensors" for k in first}, **{k: "extra.safetensors" for k in copy}}}, f)
    with pytest.raises(ValueError, match="already read from another tensor"):
        checkpoint.load_pretrained(tmp_path / "mx")
    beyond = dict(tensors)
    beyond[name.replace(".experts.1.", ".experts.9.")] = beyond.pop(name)
    os.remove(tmp_path / "mx" / "model.safetensors.index.json")
    save_file(beyond, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expert 9, but the config has"):
        checkpoint.load_pretrained(tmp_path / "mx")
