"""Batch-1 decoding on the CPU in one C++ call per token (decode_cpu.cpp), for model.py's decode path.

Decoding one token reads every weight once, 2 flops per weight: the speed is how fast memory delivers the
weights, plus a fixed cost per torch op. model.py's plain-torch decode spends ~25 ops per layer, and batch-1
matrix products read weights slower than plain loops do (decode_cpu.cpp says why). `step` runs the whole
decoding step after the embedding as one op instead, with the arguments `plan` gathered once per generation;
model.decode_step calls it when `available(x)` (fp32 CPU tensors, no gradient recorded, the CPU extension built,
LLAMA_MOE_KERNELS not asking for "reference"), else runs its torch code, which stays the reference: the tests
check that both give the same tokens. The same C++ pieces are ops of their own too, so that the tests can hold
each against the torch module it replaces.

What each op computes, in plain torch (x (T, d) or (B, 1, d); norm = the block's RMSNorm, or none):
    linear(x, w, norm)           norm(x) @ w.T                                           (T, n)
    experts(x, ids, w, gu, down) model.chosen_experts: sum_j w[t, j] * Expert_{ids[t, j]}(x[t])   (T, d)
  and the halves of a block, residual included, shaped like x:
    swiglu(ffn, x, norm)         x + ffn(norm(x))                                        (model.FeedForward)
    moe(layer, x, norm)          x + layer.decode(norm(x)): routing, experts, shared block (model.MoEFeedForward)
    attention(attn, norm, x, cos, sin, pos)
                                 x + attn.decode(norm(x), ...), attending over positions 0..pos only
    step(plan, x, cos, sin, pos) model.lm_head(model.model.norm(every block's decode in turn, from x)), (B, vocab)
The ops are registered in C++ with their schemas; the shape-only ("fake") versions below let torch.compile
trace them as opaque calls.
"""
import weakref

import torch
from torch import Tensor

from moe_kernels.ops import cpu_extension

_ops = None  # torch.ops.llama_moe_cpu once the extension is loaded and the fakes registered


def available(x: Tensor) -> bool:
    """Whether the C++ decoding ops serve tensors like x (fp32 on the CPU; the weights are assumed alike).
    False under LLAMA_MOE_KERNELS=reference (or =cuda), when the extension did not build, while gradients are
    recorded (the ops have no backward) and under autocast (the torch code then computes in its dtype)."""
    global _ops
    if (x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):
        return False
    ext = cpu_extension()  # None: forced away from the CPU extension, or it did not build (warned once)
    if ext is None:
        return False
    if _ops is None:
        _register_fakes()
        _ops = ext
    return True


_placed = weakref.WeakKeyDictionary()  # model -> data_ptr of its lm_head weight when its weights were placed


def place_weights(model):
    """Copy the model's CPU weights into memory backed by 2 MB pages (decode_cpu.cpp huge_page_pack says why: ~15%
    faster reads when decoding), one mapping per block holding its weights in the order a decoding step reads them,
    one more for the rest (embedding, final norm, output layer). Once per model, again if its weights were replaced
    since (to(), load_state_dict into new tensors). The values, the Parameter objects and their sharing (tied
    embeddings) stay; only where the numbers live changes. Peak memory: one extra copy of the largest pack."""
    if _placed.get(model) == model.lm_head.weight.data_ptr():
        return
    packs = [[p for p in block.parameters() if p.device.type == "cpu"] for block in model.model.layers]
    in_blocks = {id(p) for pack in packs for p in pack}
    packs.append([p for p in model.parameters() if p.device.type == "cpu" and id(p) not in in_blocks])
    with torch.no_grad():
        for pack in packs:
            for p, placed in zip(pack, _ops.huge_page_pack([p.data for p in pack])):
                p.data = placed
    _placed[model] = model.lm_head.weight.data_ptr()


def _register_fakes():
    """Output shapes only, for torch.compile (which traces with tensors that hold no data)."""
    reg = torch.library.register_fake
    reg("llama_moe_cpu::decode_linear")(lambda x, norm_weight, eps, w: x.new_empty(x.numel() // x.shape[-1], w.shape[0]))
    reg("llama_moe_cpu::decode_experts")(lambda x, ids, weights, gate_up, down: x.new_empty(x.shape[0], down.shape[1]))
    for block_half in ("decode_swiglu", "decode_moe", "decode_attention"):  # x + f(norm(x)): x's shape
        reg(f"llama_moe_cpu::{block_half}")(lambda x, *args: x.new_empty(x.shape))
    reg("llama_moe_cpu::decode_layers")(lambda x, *args: x.new_empty(x.numel() // x.shape[-1], args[-1].shape[0]))


def _norm_args(norm):
    return (None, 0.0) if norm is None else (norm.weight, norm.eps)


def linear(x: Tensor, w: Tensor, norm=None) -> Tensor:
    """x (T, d) (or (B, 1, d): T = B) -> norm(x) @ w.T, (T, n); w (n, d). The lm_head with the final norm."""
    return _ops.decode_linear(x, *_norm_args(norm), w)


def experts(x: Tensor, ids: Tensor, weights: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """model.chosen_experts in one op: x (T, d), ids and weights (T, k), gate_up (E, 2 d_e, d), down (E, d, d_e)
    -> (T, d), reading only the chosen experts' rows. (decode_moe runs the same code after its routing.)"""
    return _ops.decode_experts(x, ids, weights, gate_up, down)


def _swiglu_weights(ffn):
    """A model.FeedForward's (w_gate, w_up, w_down), or three None for no block."""
    return [None] * 3 if ffn is None else [ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight]


def _ffn_slots(mlp):
    """A block's feed-forward in decode_cpu.cpp's order: routed experts (gate weight, the "mlp" gate's second
    weight, expert_bias, gate_up, down), then a SwiGLU block (the dense FFN, or the MoE's shared block); None where
    absent."""
    if not hasattr(mlp, "experts"):  # a dense model.FeedForward
        return [None] * 5 + _swiglu_weights(mlp)
    gate = mlp.gate.gate_network
    gate_w = [gate.weight, None] if mlp.gate.gate_type == "linear" else [gate[0].weight, gate[2].weight]
    return gate_w + [mlp.gate.expert_bias, mlp.experts.gate_up_proj, mlp.experts.down_proj] + _swiglu_weights(mlp.shared)


def swiglu(ffn, x: Tensor, norm=None) -> Tensor:
    """x + ffn(norm(x)) for a model.FeedForward, x (B, 1, d) or (T, d), shaped like x."""
    return _ops.decode_swiglu(x, *_norm_args(norm), *_swiglu_weights(ffn))


def moe(layer, x: Tensor, norm=None) -> Tensor:
    """x + layer.decode(norm(x)) for a model.MoEFeedForward in one op: the gate's eval-mode routing
    (TopKGate.route), the chosen experts weighted by softmax or unit weights times score_scale, the shared block."""
    gate, gate2, bias, gate_up, down, *shared = _ffn_slots(layer)
    return _ops.decode_moe(x, *_norm_args(norm), gate, gate2, bias, layer.top_k, layer.unit_weights,
                           layer.score_scale, gate_up, down, *shared)


def attention(attn, norm, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> Tensor:
    """x + attn.decode(norm(x), ...) for a model.Attention in one op: x (B, 1, d), cos and sin (1, hd) for position
    pos ((1,) int64). Writes the new key and value into attn.kv_cache at pos, attends over positions 0..pos."""
    cache_k, cache_v = attn.kv_cache                                                 # (B, Hkv, L, hd) each
    return _ops.decode_attention(x, *_norm_args(norm), attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                                 attn.o_proj.weight, cos, sin, cache_k, cache_v, pos)


def _layer_slots(block):
    """A model.Block's weights in decode_cpu.cpp's 14 slots (decode_layers' Slot order), None where absent."""
    a = block.self_attn
    return [block.input_layernorm.weight, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
            block.post_attention_layernorm.weight] + _ffn_slots(block.mlp)


def plan(model):
    """Everything decode_layers needs from a model.Transformer with its KV cache set up, gathered once per
    generation (reading ~450 module attributes every token would cost ~0.1 ms): its weights first placed on
    2 MB pages (place_weights)."""
    place_weights(model)
    blocks = model.model.layers
    scalars = [(m.top_k, int(m.unit_weights), m.score_scale) if hasattr(m, "experts") else (0, 0, 1.0)
               for m in (b.mlp for b in blocks)]
    top_k, unit, scale = (list(v) for v in zip(*scalars))
    return dict(weights=[w for b in blocks for w in _layer_slots(b)], top_k=top_k, unit_weights=unit,
                score_scale=scale, eps=model.model.norm.eps, caches=[c for b in blocks for c in b.self_attn.kv_cache],
                final_norm=model.model.norm.weight, lm_head=model.lm_head.weight)


def step(plan, x: Tensor, cos: Tensor, sin: Tensor, pos: Tensor) -> Tensor:
    """Every block, the final norm and the output layer in one C++ call: x (B, 1, d), the embedded tokens at
    position pos ((1,) int64), cos and sin (1, hd) -> logits (B, vocab). Writes each block's KV cache at pos."""
    p = plan
    return _ops.decode_layers(x, p["weights"], p["top_k"], p["unit_weights"], p["score_scale"], p["eps"], cos, sin,
                              p["caches"], pos, p["final_norm"], p["lm_head"])
