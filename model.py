"""
Chapter 1: LLaMA (1/2/3) and its Mixture-of-Experts variant.

Read top to bottom:
  1. ModelConfig   - the hyper-parameters, named exactly like Hugging Face's LlamaConfig so a real
                     config.json maps onto it field by field.
  2. RMSNorm, RoPE, Attention, FeedForward - the dense LLaMA block (SPEC.md section 1).
  3. MoEFeedForward - the LLaMA-MoE layer (SPEC.md sections 2, 3, 7): gate -> permute -> experts -> unpermute,
                     and for the few rows of a decoding step, only the chosen experts' weights.
  4. Transformer   - the stack, forward(idx, targets) -> ModelOutput(logits, loss, balance_loss, routing).
  5. Generation    - a preallocated KV cache, prefill through forward(), then decode_step() per token.
Files (every checkpoint format, GGUF) are checkpoint.py's: checkpoint.load_pretrained / save_pretrained.

Shapes: B batch, S sequence, d hidden, H query heads, Hkv key/value heads, hd head dim, T = B*S tokens,
E experts, k selected experts, d_e expert width.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from gate import GATE_TYPES, GateOutput, TopKGate
from moe_kernels import permute, unpermute, grouped_swiglu
from moe_kernels import decode as fast_decode


# ----------------------------------------------------------------------------------------------------------
# 1. Config

# How the k chosen experts' outputs are weighted (times the rescale factor s in both cases):
#   "softmax" - the paper (SPEC section 2): softmax over the k chosen logits, rows sum to 1.
#   "unit"    - each chosen expert added at weight 1 (CMoE, Pei et al. 2025): with every expert chosen and
#               s = 1 the MoE is exactly the dense FFN. The router still learns: the weight is computed as
#               1 + (score - score.detach()), which is exactly 1 but passes the score's gradient on.
EXPERT_WEIGHTINGS = ("softmax", "unit")

@dataclass
class ModelConfig:
    # --- dense LLaMA (names as in transformers' LlamaConfig) ---
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None    # None -> multi-head attention (= num_attention_heads)
    head_dim: int | None = None               # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    initializer_range: float = 0.02
    tokenizer_sha256: str | None = None       # Tokenizer.fingerprint of the vocabulary the model was trained on
    # --- Mixture of Experts (SPEC.md sections 2-3); num_experts == 0 means a dense model ---
    num_experts: int = 0
    num_experts_per_tok: int = 2              # k
    expert_intermediate_size: int | list = 0  # d_e; a list gives one width per layer
    shared_intermediate_size: int = 0         # SharingInter's always-on block (0 = none)
    score_scale: float | list | None = None   # rescaling factor s; None -> num_experts / k; a list: per layer
    gate_type: str = "linear"                 # "linear": Linear(d, E); "mlp": Linear(d, E) -> tanh -> Linear(E, E)
    expert_weighting: str = "softmax"         # one of EXPERT_WEIGHTINGS: how the k chosen outputs are added
    gate_noise: bool = True                   # noisy top-k during training (never at eval)
    gate_noise_eps: float = 0.01
    balance_loss_weight: float = 0.01

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                 f"{self.num_attention_heads}: pick sizes that divide, or set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention needs it)")
        rope_inv_freq(self)  # validates rope_scaling early, with a clear message
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts "
                                 f"({self.num_experts})")
            if self.gate_type not in GATE_TYPES:
                raise ValueError(f"gate_type {self.gate_type!r} is not supported: use 'linear' or 'mlp'")
            if self.expert_weighting not in EXPERT_WEIGHTINGS:
                raise ValueError(f"expert_weighting {self.expert_weighting!r} is not supported: use one of "
                                 f"{', '.join(EXPERT_WEIGHTINGS)}")
            if not self.gate_noise_eps > 0:
                raise ValueError(f"gate_noise_eps {self.gate_noise_eps} must be > 0: it is the smallest noise std, "
                                 f"and the load estimate divides by the std (the paper uses 0.01)")
            if not self.balance_loss_weight >= 0:
                raise ValueError(f"balance_loss_weight {self.balance_loss_weight} must be >= 0 (the paper uses "
                                 f"0.01; 0 turns the balance loss off)")
            for name in ("expert_intermediate_size", "score_scale"):
                value = getattr(self, name)
                if isinstance(value, list) and len(value) != self.num_hidden_layers:
                    raise ValueError(f"{name} has {len(value)} entries, expected one per layer "
                                     f"({self.num_hidden_layers})")
            if min(self.layer_list("expert_intermediate_size")) <= 0:
                raise ValueError("an MoE config needs expert_intermediate_size > 0 (the width d_e of one expert)")

    @property
    def is_moe(self):
        return self.num_experts > 0

    def layer_list(self, name):
        """A per-layer view of a field that may be one number or a list (expert width, score scale)."""
        value = getattr(self, name)
        if name == "score_scale" and value is None:  # SPEC.md section 2: default rescale factor N / k
            value = self.num_experts / self.num_experts_per_tok
        return list(value) if isinstance(value, list) else [value] * self.num_hidden_layers


# ----------------------------------------------------------------------------------------------------------
# 2. The dense LLaMA block

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 has too few mantissa bits for a mean of squares), as LLaMA does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(config):
    """Inverse frequencies of rotary embeddings, (hd/2,), with LLaMA-3 or linear context scaling."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        # Position interpolation: positions / factor, i.e. every frequency / factor.
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # LLaMA-3.1: keep high frequencies (short wavelengths), divide low ones by `factor`, blend in between.
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}: this code supports 'llama3', 'linear' and no "
                     f"scaling (null); remove rope_scaling from config.json or convert the model")


def rope_cos_sin(inv_freq, positions):
    # (S,) x (hd/2,) -> (S, hd/2) -> (S, hd): the two halves share frequencies (the rotate-half layout
    # of Hugging Face checkpoints, whose q/k weights are permuted for it). Positions (B, S) give (B, 1, S, hd),
    # one row of angles per sequence, broadcast over the heads.
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    if positions.dim() == 2:
        emb = emb[:, None]
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, H, S, hd); rotate each (x_i, x_{i+hd/2}) pair by the position's angle.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, d, bias=False)
        self.kv_cache = None  # (k, v) each (B, Hkv, max_len, hd) while generating

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        """mask (B, 1, S, S) bool, True where query i may see key j (no cache): replaces the causal mask."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)    # (B, Hkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None
        if start_pos is not None:  # cached: append to the cache, attend over everything so far
            cache_k, cache_v = self.kv_cache
            cache_k[:B, :, start_pos:start_pos + S] = k
            cache_v[:B, :, start_pos:start_pos + S] = v
            k, v = cache_k[:B, :, :start_pos + S], cache_v[:B, :, :start_pos + S]
            if start_pos > 0:  # new query i (position start_pos + i) sees cached keys 0 .. start_pos + i
                causal = False
                if S > 1:
                    mask = torch.ones(S, start_pos + S, dtype=torch.bool, device=x.device).tril(start_pos)
        # Grouped-query attention: each group of H/Hkv query heads shares one key/value head.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_head * self.hd))

    def decode(self, x, cos, sin, pos, visible):
        """One new position per row with every shape fixed (torch.compile traces it once): x (B, 1, d), pos (1,)
        int64, visible (1, 1, 1, L) bool = which of the cache's L positions exist. Writes the new key and value
        at pos and attends over the whole preallocated cache, the unwritten positions masked out."""
        B = x.shape[0]
        q = self.q_proj(x).view(B, 1, self.n_head, self.hd).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k_proj(x).view(B, 1, self.n_kv, self.hd).transpose(1, 2)    # (B, Hkv, 1, hd)
        v = self.v_proj(x).view(B, 1, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache_k, cache_v = self.kv_cache                                      # (B, Hkv, L, hd) each
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        y = F.scaled_dot_product_attention(q, cache_k, cache_v, attn_mask=visible,
                                           enable_gqa=self.n_kv != self.n_head)  # (B, H, 1, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, 1, self.n_head * self.hd))


class FeedForward(nn.Module):
    """SwiGLU: FFN(x) = W_down(silu(W_gate x) * W_up x). Neuron i = (row i of W_gate, row i of W_up, column i of W_down)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------
# 3. The MoE feed-forward (LLaMA-MoE, SPEC.md sections 2, 3 and 7)

class Experts(nn.Module):
    """E SwiGLU experts of width d_e, stacked so that one grouped matmul runs them all.

    gate_up_proj[j] = [W_gate; W_up] of expert j, one (2 d_e, d) tensor: its rows i and d_e + i and column i
    of down_proj[j] are one neuron of the dense FFN it was cut from. Gate and up live in one tensor because
    the grouped matmul wants them so: stored apart, every forward would copy both into one (~180 MB per
    layer at 7B). Mixtral and llama_moe checkpoints keep their per-expert names (w1/w3, weight_gate/weight_up)."""

    def __init__(self, num_experts, dim, width):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * width, dim))  # (E, 2 d_e, d)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, width))         # (E, d, d_e)


class MoEFeedForward(nn.Module):
    """y = sum over the k chosen experts j of score_j * s * E_j(x)  (+ the shared block), SPEC.md sections 2-3.

    forward() computes it dropless and fast (permute -> one grouped matmul -> unpermute). In plain torch,
    one loop over the experts, the same numbers up to rounding:

        g = self.gate(x)                                     # x (T, d); ids, scores (T, k)
        y = torch.zeros_like(x)                              # (T, d)
        for j in range(E):
            tok, slot = (g.expert_ids == j).nonzero(as_tuple=True)   # the tokens_per_expert[j] rows for j
            h = x[tok]                                               # (n_j, d)
            gate, up = (h @ e.gate_up_proj[j].T).chunk(2, dim=-1)   # (n_j, 2 d_e) -> 2 x (n_j, d_e)
            h = (F.silu(gate) * up) @ e.down_proj[j].T                # (n_j, d_e) -> (n_j, d)
            y.index_add_(0, tok, h * (g.scores[tok, slot] * s)[:, None])     # weight by score * s
        y = y + self.shared(x)                               # shared block only: always on, unscaled
        # (expert_weighting "unit": g.scores above is replaced by ones that carry the scores' gradient)
    """

    def __init__(self, config, layer_idx):
        super().__init__()
        d, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
        self.num_experts, self.top_k = E, k
        self.score_scale = float(config.layer_list("score_scale")[layer_idx])
        self.unit_weights = config.expert_weighting == "unit"
        self.gate = TopKGate(d, E, k, gate_type=config.gate_type, noise=config.gate_noise,
                             noise_eps=config.gate_noise_eps, balance_loss_weight=config.balance_loss_weight)
        self.experts = Experts(E, d, config.layer_list("expert_intermediate_size")[layer_idx])
        self.shared = FeedForward(d, config.shared_intermediate_size) if config.shared_intermediate_size else None

    def forward(self, x):
        """(B, S, d) -> (y (B, S, d), the gate's GateOutput: routing, balance loss and counts of these tokens)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (B, S, d) -> (T, d)
        g = self.gate(x)                                               # ids (T, k), scores (T, k)
        # Dropless grouping: every (token, expert) pair gets a row; rows of one expert are contiguous.
        x_perm, row_map, counts = permute(x, g.expert_ids, self.num_experts)  # (T*k, d)
        e = self.experts
        y_perm = grouped_swiglu(x_perm, counts, e.gate_up_proj, e.down_proj)  # (T*k, d)
        # Rescaling (SPEC.md section 2): only k of E experts fire, so their weighted sum is scaled by s (= E/k).
        w = 1 + (g.scores - g.scores.detach()) if self.unit_weights else g.scores  # (T, k): exactly 1, or softmax
        y = unpermute(y_perm, row_map, (w * self.score_scale).to(y_perm.dtype))  # (T, d)
        if self.shared is not None:  # the shared block (SharingInter, activation): always on and unscaled
            y = y + self.shared(x)
        return y.view(shape), g

    def decode(self, x, fused=False):
        """The same y for the few rows of a decoding step (no gradient, eval-mode routing), (B, 1, d) -> (B, 1, d).
        With T*k rows, permute -> grouped matmul -> unpermute is mostly fixed cost around a handful of
        matrix-vector products: run each row's k experts straight from the stacked weights instead.
        fused: the static-shape form (chosen_experts_fused), for torch.compile; else a loop (chosen_experts)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (T, d)
        ids, scores = self.gate.route(x)                               # (T, k), (T, k)
        w = torch.ones_like(scores) if self.unit_weights else scores  # "unit": exactly 1 (no gradient here)
        e = self.experts
        run = chosen_experts_fused if fused else chosen_experts
        y = run(x, ids, (w * self.score_scale).to(x.dtype), e.gate_up_proj, e.down_proj)  # (T, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(shape)


def chosen_experts(x, ids, weights, gate_up, down):
    """x (T, d), ids and weights (T, k), gate_up (E, 2 d_e, d), down (E, d, d_e) -> (T, d): each row through
    its k experts, reading only those experts' weights (views of the stacks, no copy). One host sync (ids)."""
    y = torch.zeros_like(x)                                            # (T, d)
    for t, (row_ids, row_w) in enumerate(zip(ids.tolist(), weights.tolist())):
        for j, w in zip(row_ids, row_w):
            gate, up = F.linear(x[t], gate_up[j]).chunk(2)             # (2 d_e,) -> 2 x (d_e,)
            y[t] += w * F.linear(F.silu(gate) * up, down[j])           # (d_e,) -> (d,)
    return y


def chosen_experts_fused(x, ids, weights, gate_up, down):
    """The same as one static-shape expression, for torch.compile: there the gather and the products fuse into
    one loop that reads each chosen row of weights once (eagerly, gate_up[ids] would copy the experts)."""
    h = (gate_up[ids] * x[:, None, None, :]).sum(-1)                  # (T, k, 2 d_e, d) -> (T, k, 2 d_e)
    gate, up = h.chunk(2, dim=-1)                                      # 2 x (T, k, d_e)
    a = F.silu(gate) * up * weights[..., None]                         # (T, k, d_e)
    return (down[ids] * a[:, :, None, :]).sum((1, 3))                  # (T, k, d, d_e) -> (T, d)


def next_token(logits, temperature, top_k):
    """logits (B, vocab) fp32 -> (B, 1): argmax when temperature is 0, else a sample (top_k: of the k best)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1)


def block_decode(block, x, cos, sin, pos, visible, fused=False):
    """Block.decode as a function of the block: torch.compile of it is one graph that every layer of the same
    shapes reuses (the weights are its inputs), compiled once instead of once per layer."""
    return block.decode(x, cos, sin, pos, visible, fused)


_COMPILED = {}


def compiled_block_decode():
    """torch.compile(block_decode) with the MoE's fused chosen-expert products, built once per process; if
    compiling fails (no C++ compiler, an unsupported platform) it says so once and runs block_decode eagerly.
    Compilation happens at the first call, so the fallback wraps the calls."""
    if "fn" not in _COMPILED:
        compiled = torch.compile(block_decode, dynamic=False)

        def layer_fn(block, *args):
            if not _COMPILED.get("broken"):
                try:
                    return compiled(block, *args, fused=True)
                except Exception as e:  # the compiler's errors share no base class
                    print(f"[model] torch.compile failed ({type(e).__name__}: {str(e)[:200]}): decoding eagerly")
                    _COMPILED["broken"] = True
            return block_decode(block, *args)
        _COMPILED["fn"] = layer_fn
    return _COMPILED["fn"]


# ----------------------------------------------------------------------------------------------------------
# 4. The transformer

class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # The one FFN slot: dense SwiGLU, or the MoE layer that split.py builds from it.
        self.mlp = (MoEFeedForward(config, layer_idx) if config.is_moe
                    else FeedForward(config.hidden_size, config.intermediate_size))

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        """-> (x (B, S, d), the MoE gate's GateOutput or None for a dense FFN)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEFeedForward):
            y, gate = self.mlp(h)
            return x + y, gate
        return x + self.mlp(h), None

    def decode(self, x, cos, sin, pos, visible, fused=False):
        """One cached decoding step, (B, 1, d) -> (B, 1, d): the same sum, static shapes, the MoE on its few-rows
        path (Attention.decode and MoEFeedForward.decode say how)."""
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, pos, visible)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp.decode(h, fused) if isinstance(self.mlp, MoEFeedForward) else self.mlp(h))


class ModelOutput(NamedTuple):
    """What Transformer.forward computes. The LM loss and the balance loss are kept apart: evaluation reports
    the first alone, training adds the second (SPEC.md section 3)."""
    logits: torch.Tensor        # (B, S, vocab); (B, 1, vocab) with last_only
    loss: torch.Tensor | None   # () next-token cross-entropy over targets != -100; None without targets
    balance_loss: torch.Tensor  # () the MoE balance loss summed over layers, weight applied (0 for dense)
    routing: tuple[GateOutput, ...]  # one per MoE layer, in layer order (() for a dense model)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.rope_table = self.cache_positions = None  # (cos, sin) (L, hd) and arange(L) with a KV cache
        self.decode_plan = None  # the C++ decoding step's arguments (moe_kernels/decode.py plan), per KV cache
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    def _apply(self, fn, *args, **kwargs):
        # model.to(torch.bfloat16) would round the RoPE frequencies to bf16 (an angle error of radians at
        # position 4096); recompute them in fp32 on whatever device the model moved to.
        super()._apply(fn, *args, **kwargs)
        if not self.inv_freq.is_meta:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def init_weights(self):
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                nn.init.ones_(p)
            elif "weight_noise" in name:  # SPEC.md section 3: the noise projection starts at zero
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def moe_layers(self):
        return [b.mlp for b in self.model.layers if isinstance(b.mlp, MoEFeedForward)]

    def forward(self, idx, targets=None, start_pos=None, last_only=False, positions=None, mask=None) -> ModelOutput:
        """idx (B, S) -> ModelOutput(logits (B, S, vocab), LM loss or None, balance loss, routing). start_pos:
        the KV cache's write position (setup_cache). last_only (no targets): logits of the last position only,
        (B, 1, vocab): generation reads nothing else, and a long prompt's (S, vocab) logits would be most of
        its prefill's memory. positions (B, S) int64 and mask (B, 1, S, S) bool (no cache): each token's RoPE
        position and the tokens it sees, for rows that hold several sequences sharing a prefix
        (multiple_choice.py); default 0..S-1, causal."""
        B, S = idx.shape
        # (One host sync; skipped under torch.compile, where it would break the graph.)
        if not torch.compiler.is_compiling() and idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) but range over "
                                 f"[{lo}, {hi}]: is the tokenizer the model's own?")
        if positions is None:
            end = (start_pos or 0) + S
            positions = torch.arange(end - S, end, device=idx.device)   # (S,)
        else:
            end = int(positions.max()) + 1 if positions.numel() else 0
        if end > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {end} positions exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = rope_cos_sin(self.inv_freq, positions)                # (S, hd) or (B, 1, S, hd)
        x = self.model.embed_tokens(idx)                                 # (B, S, d)
        routing = []
        for block in self.model.layers:
            x, gate = block(x, cos, sin, start_pos, mask)
            if gate is not None:
                routing.append(gate)
        x = self.model.norm(x)
        balance = sum(g.balance_loss for g in routing) if routing else x.new_zeros((), dtype=torch.float32)
        if targets is None:
            return ModelOutput(self.lm_head(x[:, -1:] if last_only else x), None, balance, tuple(routing))
        logits = self.lm_head(x)                                         # (B, S, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss, balance, tuple(routing))

    # ------------------------------------------------------------------------------------------------------
    # 5. Generation: prefill the prompt through forward() into a preallocated KV cache, then one decode_step
    # per token. A profile of the 135M demo model at batch 1 on CPU (1 thread) showed decoding bound by reading
    # weights (matrix products ~half the time) and by fixed per-op costs: in the 16/4 MoE, permute, unpermute
    # and the gate's balance statistics took ~1/4 as long as all matrix products together. decode_step runs the
    # same modules without them (bench.py --what=decode measures it).

    def decode_step(self, idx, pos, compiled=False):
        """idx (B, 1), the tokens at position pos (the cache holds 0..pos-1) -> logits (B, vocab) for pos + 1.
        compiled: run the layers through compiled_block_decode (torch.compile; eager if that fails). fp32 on the
        CPU, one C++ call runs the whole step instead (moe_kernels/decode.py step; LLAMA_MOE_KERNELS=reference:
        the torch code here), compiled or not: an opaque call leaves the compiler nothing to fuse."""
        cos, sin = (t[pos:pos + 1] for t in self.rope_table)             # (1, hd), precomputed
        at = self.cache_positions[pos:pos + 1]                           # (1,) int64, no host-to-device copy
        x = self.model.embed_tokens(idx)                                 # (B, 1, d)
        if fast_decode.available(x):  # the whole step in one C++ call, its weights gathered once per generation
            if self.decode_plan is None:
                self.decode_plan = fast_decode.plan(self)
            return fast_decode.step(self.decode_plan, x, cos, sin, at)  # (B, vocab)
        visible = (self.cache_positions <= pos).view(1, 1, 1, -1)        # (1, 1, 1, L)
        layer_fn = compiled_block_decode() if compiled else block_decode
        for block in self.model.layers:
            x = layer_fn(block, x, cos, sin, at, visible)
        return self.lm_head(self.model.norm(x))[:, -1]                   # (B, vocab)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, compile=False):
        """Sample continuations of idx (B, S); temperature 0 means greedy. The KV cache makes each step O(S).
        use_cache=False recomputes the whole sequence every step (the plain path the tests compare with).
        compile: decode through torch.compile'd layers (compiled_block_decode): one compilation per process
        and layer shape, ~20 s on a CPU, which pays for an MoE decoding hundreds of tokens (bench.py
        --what=decode measures it); without a working compiler the eager path runs instead, and with the C++
        decoding ops (fp32 on the CPU, see decode_step) the compiler is not used."""
        B, S = idx.shape
        total = S + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ValueError(f"prompt + new tokens = {total} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        was_training = self.training
        self.eval()  # no gate noise, no dropout-like randomness: greedy decoding must be reproducible
        if use_cache:
            self.setup_cache(B, total)
        try:
            for step in range(max_new_tokens):
                if not use_cache:
                    logits = self(idx, last_only=True).logits[:, -1]             # (B, vocab)
                elif step == 0:  # prefill: the whole prompt in one forward
                    logits = self(idx, start_pos=0, last_only=True).logits[:, -1]
                else:
                    logits = self.decode_step(idx[:, -1:], idx.size(1) - 1, compile)
                idx = torch.cat((idx, next_token(logits.float(), temperature, top_k)), dim=1)
        finally:
            self.clear_cache()
            self.train(was_training)
        return idx

    def setup_cache(self, batch, length):
        """Give every layer a KV cache of `batch` rows and `length` positions; forward(..., start_pos=p) then
        writes positions p.. and attends over 0..p+S (generation)."""
        w = self.lm_head.weight
        for block in self.model.layers:
            a = block.self_attn
            a.kv_cache = tuple(torch.zeros(batch, a.n_kv, length, a.hd, dtype=w.dtype, device=w.device)
                               for _ in range(2))
        self.cache_positions = torch.arange(length, device=w.device)                       # (L,) for decode_step
        self.rope_table = rope_cos_sin(self.inv_freq, self.cache_positions)                 # (L, hd) each
        self.decode_plan = None  # it names the caches: gathered again at the next fast decode_step

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None
        self.rope_table = self.cache_positions = self.decode_plan = None

