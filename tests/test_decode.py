"""The C++ decoding ops (moe_kernels/decode_cpu.cpp via moe_kernels/decode.py) against model.py's torch code.

They sum in another order (and with fused multiply-adds), so single ops agree to fp32 rounding; whole greedy
generations must choose the same tokens. Sizes are odd on purpose: the kernels work in blocks of 8 and 32."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import (Attention, FeedForward, ModelConfig, MoEFeedForward, RMSNorm, Transformer, chosen_experts,
                   rope_cos_sin, rope_inv_freq)
from moe_kernels import decode

TOL = dict(rtol=1e-5, atol=1e-5)


def tol(d):
    """For sums of d products of unit-scale numbers: their rounding error grows with d (and cancels away less)."""
    return dict(rtol=1e-5, atol=1e-5 * max(1, d / 64))


@pytest.fixture(autouse=True)
def cpu_extension(monkeypatch):
    monkeypatch.delenv("LLAMA_MOE_KERNELS", raising=False)
    with torch.no_grad():
        assert decode.available(torch.zeros(1)), "the CPU extension did not build (test_kernels says why)"


def random_norm(d, eps=1e-5):
    norm = RMSNorm(d, eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


@pytest.mark.parametrize("T, d, n", [(1, 576, 1536), (1, 77, 45), (3, 37, 8), (2, 5, 3)])
@pytest.mark.parametrize("normed", [False, True])
def test_linear(T, d, n, normed):
    torch.manual_seed(0)
    x, w = torch.randn(T, d), torch.randn(n, d)
    norm = random_norm(d) if normed else None
    with torch.no_grad():
        want = (norm(x) if normed else x) @ w.T
        torch.testing.assert_close(decode.linear(x, w, norm), want, **tol(d))


@pytest.mark.parametrize("T, d, h", [(1, 64, 160), (1, 37, 53), (3, 72, 200)])
@pytest.mark.parametrize("normed", [False, True])
def test_swiglu(T, d, h, normed):
    torch.manual_seed(1)
    ffn, x = FeedForward(d, h), torch.randn(T, 1, d)
    norm = random_norm(d) if normed else None
    with torch.no_grad():
        want = x + ffn(norm(x) if normed else x)
        torch.testing.assert_close(decode.swiglu(ffn, x, norm), want, **tol(max(d, h)))


@pytest.mark.parametrize("T, k, E, d, d_e", [(1, 2, 5, 16, 8), (1, 4, 16, 64, 24), (3, 2, 4, 37, 13), (2, 3, 3, 9, 5)])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_experts(T, k, E, d, d_e, id_dtype):
    torch.manual_seed(2)
    # weights scaled as trained ones are (unit-scale outputs), so that the tolerance means the same at every size
    x, gate_up, down = torch.randn(T, d), torch.randn(E, 2 * d_e, d) / d ** 0.5, torch.randn(E, d, d_e) / d_e ** 0.5
    ids, w = torch.rand(T, E).topk(k, dim=-1).indices, torch.rand(T, k)
    ids[-1] = ids[0]  # two tokens on the same experts (when T > 1)
    want = chosen_experts(x, ids, w, gate_up, down)
    torch.testing.assert_close(decode.experts(x, ids.to(id_dtype), w, gate_up, down), want, **tol(d))


@pytest.mark.parametrize("kw", [dict(), dict(gate_type="mlp", num_experts_per_tok=3),
                                dict(shared_intermediate_size=19, expert_weighting="unit", score_scale=1.5),
                                dict(num_experts_per_tok=5)])
@pytest.mark.parametrize("T", [1, 2])
def test_moe_layer(kw, T):
    # The whole MoE feed-forward of a decoding step: norm, routing (with a loss-free-balancing bias), experts, shared.
    torch.manual_seed(6)
    cfg = ModelConfig(hidden_size=37, intermediate_size=100, num_attention_heads=1, num_experts=5,
                      **{"num_experts_per_tok": 2, "expert_intermediate_size": 13, **kw})
    layer, norm = MoEFeedForward(cfg, 0).eval(), random_norm(37)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 37 ** -0.5)
        layer.gate.expert_bias.normal_(0, 0.3)
        x = torch.randn(T, 1, 37)
        want = x + layer.decode(norm(x))
        torch.testing.assert_close(decode.moe(layer, x, norm), want, **TOL)


def test_experts_refuse_an_id_out_of_range():
    x, gate_up, down = torch.randn(1, 8), torch.randn(3, 4, 8), torch.randn(3, 8, 2)
    with pytest.raises(RuntimeError, match="expert id 3 is not in"):
        decode.experts(x, torch.tensor([[0, 3]]), torch.ones(1, 2), gate_up, down)


def test_ops_refuse_weights_that_do_not_fit():
    # The C++ ops read weights as plain contiguous arrays of the checked shape: anything else is an error, never a
    # wrong read (a model's weights are contiguous; place_weights makes them so).
    x, w = torch.randn(1, 8), torch.randn(8, 5)
    with pytest.raises(RuntimeError, match="w must be contiguous"):
        decode.linear(x, w.t())
    ffn = FeedForward(8, 12)
    with pytest.raises(RuntimeError, match=r"w_down must have shape \[8, 12\]"):
        decode._ops.decode_swiglu(x, None, 0.0, ffn.gate_proj.weight, ffn.up_proj.weight, ffn.gate_proj.weight)
    with pytest.raises(RuntimeError, match=r"w_gate must have shape \[12, 9\].*got \[12, 8\]"):
        decode.swiglu(ffn, torch.randn(1, 9))  # x's width against the weights
    with pytest.raises(RuntimeError, match="x has 9 features, the weights expect 8"):
        decode.linear(torch.randn(1, 9), w.t().contiguous())


@pytest.mark.parametrize("B, hidden, heads, kv_heads, head_dim, pos", [(1, 64, 8, 2, 8, 0), (1, 42, 6, 3, 10, 5),
                                                                        (2, 36, 4, 4, 6, 8), (1, 48, 4, 1, 34, 3)])
def test_attention(B, hidden, heads, kv_heads, head_dim, pos):
    torch.manual_seed(3)
    cfg = ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    attn, norm, L = Attention(cfg), random_norm(hidden), 9
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(L))
    cache = [torch.randn(B, kv_heads, L, head_dim) for _ in range(2)]  # positions > pos: stale, must be ignored
    x, at = torch.randn(B, 1, hidden), torch.tensor([pos])
    visible = (torch.arange(L) <= pos).view(1, 1, 1, L)
    with torch.no_grad():
        attn.kv_cache = tuple(c.clone() for c in cache)
        want = x + attn.decode(norm(x), cos[pos:pos + 1], sin[pos:pos + 1], at, visible)
        want_cache = attn.kv_cache
        attn.kv_cache = tuple(c.clone() for c in cache)
        got = decode.attention(attn, norm, x, cos[pos:pos + 1], sin[pos:pos + 1], at)
    torch.testing.assert_close(got, want, **TOL)
    for c, want_c in zip(attn.kv_cache, want_cache):  # the new key (after RoPE) and value written at pos
        torch.testing.assert_close(c, want_c, **TOL)


def test_ops_trace_into_one_graph():
    # torch.compile sees each op as one opaque call (the registered fakes give the shapes), the cache writes too.
    torch.manual_seed(4)
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    attn, norm, ffn = Attention(cfg), random_norm(32), FeedForward(32, 48)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(4))
    attn.kv_cache = tuple(torch.zeros(1, 2, 4, 8) for _ in range(2))

    def layer(x, pos):
        return decode.swiglu(ffn, decode.attention(attn, norm, x, cos[:1], sin[:1], pos), norm)

    x = torch.randn(1, 1, 32)
    with torch.no_grad():
        got = torch.compile(layer, backend="aot_eager", fullgraph=True)(x, torch.tensor([0]))
        k_written = attn.kv_cache[0][:, :, 0].clone()
        attn.kv_cache[0].zero_()
        torch.testing.assert_close(got, layer(x, torch.tensor([0])), **TOL)
    torch.testing.assert_close(k_written, attn.kv_cache[0][:, :, 0])


def test_the_whole_step_traces_as_one_call():
    # torch.compile of a decoding step (gpt-fast's way) sees decode_layers as one opaque call: its fake gives the
    # logits' shape, and the compiled step writes the caches and returns what the eager one does.
    torch.manual_seed(6)
    model = tiny(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=50)
    prompt = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        model.setup_cache(1, 16)
        model(prompt, start_pos=0)
        want = model.decode_step(prompt[:, -1:], 6)
        k_written = model.model.layers[0].self_attn.kv_cache[0][:, :, 6].clone()
        model.model.layers[0].self_attn.kv_cache[0][:, :, 6] = 0
        got = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)(prompt[:, -1:], 6)
        k_again = model.model.layers[0].self_attn.kv_cache[0][:, :, 6].clone()
        model.clear_cache()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.shape == (1, 101) and torch.equal(k_again, k_written)
    # The fake's shapes and the schema's declared writes (the caches) against what the C++ does.
    model.setup_cache(1, 16)
    with torch.no_grad():
        model.decode_step(prompt[:, -1:], 0)
        p, x = model.decode_plan, model.model.embed_tokens(prompt[:, -1:])
        cos, sin = (t[1:2] for t in model.rope_table)
        args = (x, p["weights"], p["top_k"], p["unit_weights"], p["score_scale"], p["eps"], cos, sin, p["caches"],
                model.cache_positions[1:2], p["final_norm"], p["lm_head"])
        torch.library.opcheck(torch.ops.llama_moe_cpu.decode_layers.default, args,
                              test_utils=("test_schema", "test_faketensor"))
    model.clear_cache()


def tiny(**kw):
    return Transformer(ModelConfig(vocab_size=101, hidden_size=72, intermediate_size=200, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   max_position_embeddings=64, **kw)).eval()


@pytest.mark.parametrize("kw", [{}, dict(tie_word_embeddings=True),
                                dict(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=50),
                                dict(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=27,
                                     shared_intermediate_size=19, expert_weighting="unit", score_scale=1.5),
                                dict(num_experts=6, num_experts_per_tok=3, expert_intermediate_size=33, gate_type="mlp")])
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_tokens_equal_the_torch_path(kw, batch, monkeypatch):
    torch.manual_seed(5)
    model = tiny(**kw)
    prompt = torch.randint(0, 101, (batch, 6))
    fast = model.generate(prompt, 24, temperature=0)
    model.setup_cache(batch, 32)  # and one step's logits, not just their argmax
    try:
        with torch.no_grad():  # (recording gradients, decode_step runs the torch code: the ops have no backward)
            model(fast[:, :10], start_pos=0)
            assert decode.available(prompt.float())
            step = model.decode_step(fast[:, 10:11], 10)
            monkeypatch.setenv("LLAMA_MOE_KERNELS", "reference")
            assert not decode.available(prompt.float())
            model(fast[:, :10], start_pos=0)
            want = model.decode_step(fast[:, 10:11], 10)
    finally:
        model.clear_cache()
    torch.testing.assert_close(step, want, **TOL)
    assert torch.equal(fast, model.generate(prompt, 24, temperature=0))


@torch.no_grad()
def test_only_fp32_without_autocast_takes_the_fast_path():
    assert decode.available(torch.zeros(1))
    assert not decode.available(torch.zeros(1, dtype=torch.bfloat16))
    assert not decode.available(torch.zeros(1, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not decode.available(torch.zeros(1))
    with torch.enable_grad():
        assert not decode.available(torch.zeros(1))
    model = tiny().to(torch.float64)
    prompt = torch.randint(0, 101, (1, 5))
    assert model.generate(prompt, 4, temperature=0).shape == (1, 9)


def test_place_weights_keeps_values_parameters_and_ties():
    model = tiny(tie_word_embeddings=True)
    before = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    decode.place_weights(model)
    for name, p in model.named_parameters():
        assert p is before[name][0] and torch.equal(p, before[name][1])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    if sys.platform == "linux":  # each block's weights in one 2 MB-aligned run, in the order decoding reads them
        for block in model.model.layers:
            ps = list(block.parameters())
            assert ps[0].data_ptr() % (2 << 20) == 0
            for p, q in zip(ps, ps[1:]):
                assert q.data_ptr() == p.data_ptr() + -(-p.nbytes // 64) * 64
        assert model.lm_head.weight.data_ptr() % (2 << 20) == 0
    ptr = model.lm_head.weight.data_ptr()
    decode.place_weights(model)  # once per model: not copied again
    assert model.lm_head.weight.data_ptr() == ptr


@pytest.mark.slow  # ~20 s: a second process
def test_plain_cpp_loops_agree_too():
    # Without AVX2/FMA (forced here by LLAMA_MOE_DECODE_PLAIN) the ops run plain C++ loops: the same checks pass.
    env = {**os.environ, "LLAMA_MOE_DECODE_PLAIN": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "linear or swiglu or experts or moe_layer or attention or greedy"],
                          env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
