"""
Chapter 1: LLaMA (1/2/3) and its Mixture-of-Experts variant.

Read top to bottom:
  1. ModelConfig   - the hyper-parameters, named exactly like Hugging Face's LlamaConfig so a real
                     config.json maps onto it field by field.
  2. RMSNorm, RoPE, Attention, FeedForward - the dense LLaMA block (SPEC.md section 1).
  3. MoEFeedForward - the LLaMA-MoE layer (SPEC.md sections 2, 3, 7): gate -> permute -> experts -> unpermute.
  4. Transformer   - the stack, forward(idx, targets) -> (logits, loss), generate() with a KV cache.
Files (every checkpoint format, GGUF) are checkpoint.py's: checkpoint.load_pretrained / save_pretrained.

Shapes: B batch, S sequence, d hidden, H query heads, Hkv key/value heads, hd head dim, T = B*S tokens,
E experts, k selected experts, d_e expert width.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gate import GATE_TYPES, TopKGate
from moe_kernels import permute, unpermute, grouped_swiglu


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
    # of Hugging Face checkpoints, whose q/k weights are permuted for it).
    freqs = torch.outer(positions.float(), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
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

    def forward(self, x, cos, sin, start_pos=None):
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_head, self.hd).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)    # (B, Hkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal, mask = True, None
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
        self.last_gate = None  # the gate's output of the latest forward: routing analysis and logging read it

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # (B, S, d) -> (T, d)
        g = self.gate(x)                                               # ids (T, k), scores (T, k)
        self.last_gate = g
        # Dropless grouping: every (token, expert) pair gets a row; rows of one expert are contiguous.
        x_perm, row_map, counts = permute(x, g.expert_ids, self.num_experts)  # (T*k, d)
        e = self.experts
        y_perm = grouped_swiglu(x_perm, counts, e.gate_up_proj, e.down_proj)  # (T*k, d)
        # Rescaling (SPEC.md section 2): only k of E experts fire, so their weighted sum is scaled by s (= E/k).
        w = 1 + (g.scores - g.scores.detach()) if self.unit_weights else g.scores  # (T, k): exactly 1, or softmax
        y = unpermute(y_perm, row_map, (w * self.score_scale).to(y_perm.dtype))  # (T, d)
        if self.shared is not None:  # the shared block (SharingInter, activation): always on and unscaled
            y = y + self.shared(x)
        return y.view(shape)


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

    def forward(self, x, cos, sin, start_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        self.aux_loss = None  # summed MoE balance loss of the latest forward
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

    def forward(self, idx, targets=None, start_pos=None, last_only=False):
        """idx (B, S) -> (logits (B, S, vocab), LM loss or None). start_pos: the KV cache's write position
        (setup_cache). last_only (no targets): logits of the last position only, (B, 1, vocab): generation
        reads nothing else, and a long prompt's (S, vocab) logits would be most of its prefill's memory."""
        B, S = idx.shape
        # (One host sync; skipped under torch.compile, where it would break the graph.)
        if not torch.compiler.is_compiling() and idx.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) but range over "
                                 f"[{lo}, {hi}]: is the tokenizer the model's own?")
        offset = start_pos or 0
        if offset + S > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {offset + S} positions exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(offset, offset + S, device=idx.device))
        x = self.model.embed_tokens(idx)                                 # (B, S, d)
        for block in self.model.layers:
            x = block(x, cos, sin, start_pos)
        x = self.model.norm(x)
        moe = self.moe_layers()
        self.aux_loss = sum(m.last_gate.balance_loss for m in moe) if moe else x.new_zeros(())
        if targets is None:
            return self.lm_head(x[:, -1:] if last_only else x), None     # (B, 1 or S, vocab)
        logits = self.lm_head(x)                                         # (B, S, vocab)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss  # the LM loss alone; training adds self.aux_loss (SPEC.md section 3) itself

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample continuations of idx (B, S); temperature 0 means greedy. The KV cache makes each step O(S)."""
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
            pos = 0
            for _ in range(max_new_tokens):
                if use_cache:
                    logits, _ = self(idx[:, pos:], start_pos=pos, last_only=True)
                    pos = idx.size(1)
                else:
                    logits, _ = self(idx, last_only=True)
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)
                idx = torch.cat((idx, nxt), dim=1)
        finally:
            self.clear_cache()
            self.train(was_training)
        return idx

    def setup_cache(self, batch, length):
        """Give every layer a KV cache of `batch` rows and `length` positions; forward(..., start_pos=p) then
        writes positions p.. and attends over 0..p+S (generation, and eval.py's shared-context scoring)."""
        w = self.lm_head.weight
        for block in self.model.layers:
            a = block.self_attn
            a.kv_cache = tuple(torch.zeros(batch, a.n_kv, length, a.hd, dtype=w.dtype, device=w.device)
                               for _ in range(2))

    def share_cache_prefix(self, length):
        """Copy row 0's first `length` cached positions into every row: a prefix (a question's context) run
        once, then continued by each row (its choices) with forward(..., start_pos=length)."""
        for block in self.model.layers:
            for t in block.self_attn.kv_cache:
                t[1:, :, :length] = t[:1, :, :length]

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None
