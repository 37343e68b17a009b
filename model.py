"""
Chapter 1: LLaMA (1/2/3) and its Mixture-of-Experts variant, plus checkpoint I/O.

Read top to bottom:
  1. ModelConfig   - the hyper-parameters, named exactly like Hugging Face's LlamaConfig so a real
                     config.json maps onto it field by field.
  2. RMSNorm, RoPE, Attention, FeedForward - the dense LLaMA block (SPEC.md section 1).
  3. MoEFeedForward - the LLaMA-MoE layer (SPEC.md sections 2, 3, 7): gate -> permute -> experts -> unpermute.
  4. Transformer   - the stack, forward(idx, targets) -> (logits, loss), generate() with a KV cache.
  5. Checkpoint I/O - from_pretrained / save_pretrained for Hugging Face LLaMA, Mixtral, the paper's own
                     `llama_moe` format, and our native MoE format (config.json + safetensors everywhere).

Shapes: B batch, S sequence, d hidden, H query heads, Hkv key/value heads, hd head dim, T = B*S tokens,
E experts, k selected experts, d_e expert width.
"""
import json
import math
import os
import shutil
from dataclasses import dataclass, fields, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from gate import TopKGate
from kernels import permute, unpermute, grouped_swiglu


# ----------------------------------------------------------------------------------------------------------
# 1. Config

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
            if self.gate_type not in ("linear", "mlp"):
                raise ValueError(f"gate_type {self.gate_type!r} is not supported: use 'linear' or 'mlp'")
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
        causal = True
        if start_pos is not None:  # generation: append to the cache, attend over everything so far
            cache_k, cache_v = self.kv_cache
            cache_k[:B, :, start_pos:start_pos + S] = k
            cache_v[:B, :, start_pos:start_pos + S] = v
            k, v = cache_k[:B, :, :start_pos + S], cache_v[:B, :, :start_pos + S]
            causal = start_pos == 0  # prefill is causal; one new token may see the whole cache
            if S > 1 and start_pos > 0:
                raise ValueError("the KV cache takes a prompt once (start_pos 0), then one token at a time")
        # Grouped-query attention: each group of H/Hkv query heads shares one key/value head.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=self.n_kv != self.n_head)
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
    Expert j's row i of gate_proj / up_proj and column i of down_proj are one neuron of the dense FFN it was cut from."""

    def __init__(self, num_experts, dim, width):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, width, dim))  # (E, d_e, d)
        self.up_proj = nn.Parameter(torch.empty(num_experts, width, dim))    # (E, d_e, d)
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, width))  # (E, d, d_e)


class MoEFeedForward(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        d, E, k = config.hidden_size, config.num_experts, config.num_experts_per_tok
        self.num_experts, self.top_k = E, k
        self.score_scale = float(config.layer_list("score_scale")[layer_idx])
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
        y_perm = grouped_swiglu(x_perm, counts, e.gate_proj, e.up_proj, e.down_proj)  # (T*k, d)
        # Rescaling (SPEC.md section 2): only k of E experts fire, so their weighted sum is scaled by s (= E/k).
        y = unpermute(y_perm, row_map, (g.scores * self.score_scale).to(y_perm.dtype))  # (T, d)
        if self.shared is not None:  # SharingInter: the shared block is always on and unscaled
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

    def forward(self, idx, targets=None, start_pos=None):
        B, S = idx.shape
        # (A host sync; skipped under torch.compile, where it would break the graph.)
        if not torch.compiler.is_compiling() and idx.numel() and (
                int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}) but range over "
                             f"[{int(idx.min())}, {int(idx.max())}]: is the tokenizer the model's own?")
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
            return self.lm_head(x[:, -1:] if start_pos is not None else x), None
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
            w = self.lm_head.weight
            for block in self.model.layers:
                a = block.self_attn
                a.kv_cache = tuple(torch.zeros(B, a.n_kv, total, a.hd, dtype=w.dtype, device=w.device)
                                   for _ in range(2))
        try:
            pos = 0
            for _ in range(max_new_tokens):
                if use_cache:
                    logits, _ = self(idx[:, pos:], start_pos=pos)
                    pos = idx.size(1)
                else:
                    logits, _ = self(idx)
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
            for block in self.model.layers:
                block.self_attn.kv_cache = None
            self.train(was_training)
        return idx

    # ------------------------------------------------------------------------------------------------------
    # 5. Checkpoint I/O

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, format="auto", max_shard_bytes=5 * 2**30):
        save_pretrained(self, path, format=format, max_shard_bytes=max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------
# 5. Checkpoint formats. Every format is a folder: config.json + model.safetensors (or shards + an index).
#    - "llama":     Hugging Face LlamaForCausalLM (dense models). Tensor names equal ours.
#    - "native":    our MoE: the LLaMA names plus mlp.gate.*, stacked mlp.experts.{gate,up,down}_proj, mlp.shared.*
#    - "mixtral":   Hugging Face MixtralForCausalLM (linear gate, no shared block; scale folded into w2).
#    - "llama_moe": the paper's released format (model_type llama_moe), one tensor per expert.

NATIVE_MODEL_TYPE = "llama_moe_stacked"
LLAMA_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "initializer_range"]


def config_from_hf(raw, path="config.json"):
    """Map a Hugging Face / llama_moe / our config.json dict onto ModelConfig."""
    mtype = raw.get("model_type")
    if mtype not in ("llama", "mixtral", "llama_moe", NATIVE_MODEL_TYPE):
        raise ValueError(f"{path}: model_type {mtype!r} is not supported (expected llama, mixtral, llama_moe "
                         f"or {NATIVE_MODEL_TYPE})")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError(f"{path}: only LLaMA's silu activation without attention/MLP biases is supported")
    kw = {k: raw[k] for k in LLAMA_KEYS if k in raw}
    if raw.get("tokenizer_sha256"):
        kw["tokenizer_sha256"] = raw["tokenizer_sha256"]
    rope = raw.get("rope_parameters")  # transformers >= 5 nests rope_theta inside rope_parameters
    if rope:
        rope = dict(rope)
        kw["rope_theta"] = rope.pop("rope_theta", kw.get("rope_theta", 10000.0))
        kw["rope_scaling"] = rope if rope.get("rope_type", rope.get("type")) not in (None, "default") else None
    if isinstance(kw.get("eos_token_id"), list):
        kw["eos_token_id"] = kw["eos_token_id"][0]
    if mtype == "mixtral":
        if raw.get("sliding_window"):
            raise ValueError(f"{path}: Mixtral sliding_window attention is not supported (set it to null)")
        kw.update(num_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
                  expert_intermediate_size=raw["intermediate_size"], score_scale=1.0, gate_type="linear",
                  gate_noise=False, balance_loss_weight=raw.get("router_aux_loss_coef", 0.01))
        kw["intermediate_size"] = raw["intermediate_size"] * raw["num_local_experts"]
    elif mtype == "llama_moe":
        kw.update(llama_moe_config(raw, path))
    elif mtype == NATIVE_MODEL_TYPE:
        kw.update({f.name: raw[f.name] for f in fields(ModelConfig) if f.name in raw and f.name not in kw})
    return ModelConfig(**kw)


def llama_moe_config(raw, path):
    """The paper's config keys (its modeling_llama_moe_hf.py) -> our MoE fields; refuse what we cannot express."""
    if raw.get("gate_type", "TopKBalancedNoisyGate") != "TopKBalancedNoisyGate":
        raise ValueError(f"{path}: gate_type {raw['gate_type']!r} is not supported; only TopKBalancedNoisyGate "
                         f"(the released checkpoints' gate)")
    if raw.get("calculator_type", "UniversalCalculator") != "UniversalCalculator":
        raise ValueError(f"{path}: calculator_type {raw['calculator_type']!r} is not supported (UniversalCalculator only)")
    if not raw.get("gate_use_softmax", True) or not raw.get("multiply_gate_scores", True):
        raise ValueError(f"{path}: gate_use_softmax and multiply_gate_scores must be true (routing = softmax over "
                         f"the top-k logits, outputs weighted by it)")
    if raw.get("gate_network", "mlp") not in ("mlp", "linear"):
        raise ValueError(f"{path}: gate_network {raw['gate_network']!r} is not supported ('mlp' or 'linear')")
    if any(k in raw for k in ("size_experts_residual", "num_experts_residual")):
        raise ValueError(f"{path}: residual (shared) experts of the llama_moe_residual variant are not supported")
    sizes = raw.get("size_experts")
    if sizes is None:
        sizes = [[raw["intermediate_size"] // raw["num_experts"]] * raw["num_experts"]] * raw["num_hidden_layers"]
    widths = []
    for layer, row in enumerate(sizes):
        if len(set(row)) != 1:
            raise ValueError(f"{path}: layer {layer} has experts of different sizes {sorted(set(row))}; stacked "
                             f"experts need one size per layer")
        widths.append(row[0])
    scale = raw.get("score_scale_factor", 1.0)
    return dict(num_experts=raw["num_experts"], num_experts_per_tok=raw["num_selects"],
                expert_intermediate_size=widths[0] if len(set(widths)) == 1 else widths,
                score_scale=list(scale) if isinstance(scale, list) else float(scale),
                gate_type=raw.get("gate_network", "mlp"), gate_noise=raw.get("gate_add_noise", True),
                gate_noise_eps=raw.get("gate_noise_epsilon", 0.01),
                balance_loss_weight=raw.get("gate_balance_loss_weight", 0.01) if raw.get("gate_use_balance", True) else 0.0)


def read_safetensors(path):
    """Yield (name, tensor) one at a time from model.safetensors or its shards: never the whole model at once."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (PyTorch .bin "
                                f"checkpoints are not read: convert them to safetensors first)")
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise FileNotFoundError(f"{fpath}: shard named in model.safetensors.index.json is missing")
        with safe_open(fpath, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name), fpath


def from_hf_names(name, mtype):
    """Map one stored tensor name to (our name, expert index or None); None for tensors to skip."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some exporters store; it carries no learned state
        return None
    if mtype == "mixtral":
        # model.layers.L.block_sparse_moe.gate.weight / .experts.J.w{1,2,3}.weight
        name = name.replace("block_sparse_moe.gate.weight", "mlp.gate.gate_network.weight")
        if ".block_sparse_moe.experts." in name:
            head, rest = name.split(".block_sparse_moe.experts.")
            j, w = rest.split(".")[:2]
            which = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[w]
            return f"{head}.mlp.experts.{which}", int(j)
    elif mtype == "llama_moe":
        # model.layers.L.mlp.calculator.experts.weight_{gate,up,down}.J
        if ".mlp.calculator.experts.weight_" in name:
            head, rest = name.split(".mlp.calculator.experts.weight_")
            which, j = rest.split(".")
            return f"{head}.mlp.experts.{which}_proj", int(j)
    return name, None


def read_config_json(path):
    """The raw config.json dict of a checkpoint folder, with a clear error when there is none."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a checkpoint folder needs config.json + safetensors "
                                f"(as written by save_pretrained or Hugging Face)")
    with open(cfg_path) as f:
        return json.load(f)


def load_pretrained(path, dtype=None, device=None):
    raw = read_config_json(path)
    config = config_from_hf(raw, os.path.join(path, "config.json"))
    mtype = raw["model_type"]
    device = torch.device(device or "cpu")
    # Build on the meta device: shapes only, no memory. Real tensors are then assigned one by one, so the
    # peak is one model copy plus one tensor (a 7B model loads in ~1x its size).
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())  # a tied lm_head is the embedding and is listed once
    loaded = {}  # our name -> how many tensors (experts) arrived for it
    for stored_name, tensor, fpath in read_safetensors(path):
        mapped = from_hf_names(stored_name, mtype)
        if mapped is None:
            continue
        name, expert = mapped
        if name not in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some exporters write the tied head anyway
            raise ValueError(f"{fpath}: unexpected tensor {stored_name!r} for a {mtype} model with this "
                             f"config.json (wrong checkpoint, or config and weights disagree)")
        full_shape = tuple(expected[name].shape)
        want = full_shape[1:] if expert is not None else full_shape
        if tuple(tensor.shape) != want:
            raise ValueError(f"{fpath}: tensor {stored_name!r} has shape {tuple(tensor.shape)}, config.json "
                             f"implies {want}")
        tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if expert is None:
            set_tensor(model, name, tensor)
        else:  # one tensor per expert on disk: stack into (E, ...) as they stream in
            param = model.get_parameter(name)
            if param.is_meta:
                param = set_tensor(model, name, torch.empty(full_shape, dtype=tensor.dtype, device=device))
            param.data[expert] = tensor
        loaded[name] = loaded.get(name, 0) + 1
    missing = []
    for name, p in expected.items():
        # Mixtral and llama_moe store one tensor per expert; our native format stores the stack once.
        want = config.num_experts if ".mlp.experts." in name and mtype in ("mixtral", "llama_moe") else 1
        if loaded.get(name, 0) == want:
            continue
        if name.endswith("gate.weight_noise.weight") and name not in loaded:
            # Mixtral has no noise projection; SPEC.md section 3 starts it at zero anyway.
            set_tensor(model, name, torch.zeros(p.shape, dtype=dtype or model.model.embed_tokens.weight.dtype,
                                                device=device))
            continue
        missing.append(name if want == 1 else f"{name} ({loaded.get(name, 0)} of {want} experts)")
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all): the checkpoint is incomplete or does not match config.json")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    return model.eval()


def set_tensor(model, name, tensor):
    """Replace a (meta) parameter by a real tensor, keeping whether it trains (a gate without noise has a
    frozen noise projection, which DDP would otherwise wait for)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    param = nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad and tensor.is_floating_point())
    setattr(module, attr, param)
    return param


def export_tensors(model, format):
    """(name, tensor) pairs in the target format's naming, one at a time."""
    config = model.config
    scales = config.layer_list("score_scale") if config.is_moe else None
    for name, t in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if format in ("llama", "native") or ".mlp." not in name or ".mlp.shared." in name:
            yield name, t
            continue
        layer = int(name.split(".")[2])
        head = name.split(".mlp.")[0]
        if format == "mixtral":
            if name.endswith("gate.gate_network.weight"):
                yield f"{head}.block_sparse_moe.gate.weight", t
            elif ".mlp.experts." in name:
                which = name.rsplit(".", 1)[1]
                w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[which]
                for j in range(t.size(0)):
                    # Fold the rescale factor into w2: Mixtral's routing is our eval routing with s = 1.
                    yield (f"{head}.block_sparse_moe.experts.{j}.{w}.weight",
                           t[j] * scales[layer] if which == "down_proj" else t[j])
            # gate.weight_noise is dropped: Mixtral has no noise, and eval never used it
        elif format == "llama_moe":
            if ".mlp.experts." in name:
                which = name.rsplit(".", 1)[1].replace("_proj", "")
                for j in range(t.size(0)):
                    yield f"{head}.mlp.calculator.experts.weight_{which}.{j}", t[j]
            else:
                yield name, t


def export_config(model, format):
    c = model.config
    dense = {k: getattr(c, k) for k in LLAMA_KEYS}
    base = dict(dense, hidden_act="silu", attention_bias=False, mlp_bias=False,
                torch_dtype=str(model.lm_head.weight.dtype).replace("torch.", ""))
    if c.tokenizer_sha256:  # extra key, ignored by transformers: which tokenizer's ids the model expects
        base["tokenizer_sha256"] = c.tokenizer_sha256
    if format == "llama":
        return dict(base, architectures=["LlamaForCausalLM"], model_type="llama")
    if format == "native":
        return dict(asdict(c), architectures=["LlamaMoEStacked"], model_type=NATIVE_MODEL_TYPE,
                    torch_dtype=base["torch_dtype"])
    widths = c.layer_list("expert_intermediate_size")
    if format == "mixtral":
        problems = []
        if c.gate_type != "linear":
            problems.append("an MLP gate (Mixtral's router is one linear layer)")
        if c.shared_intermediate_size:
            problems.append("an always-on shared block (Mixtral has none)")
        if len(set(widths)) != 1:
            problems.append("expert widths that differ between layers")
        if problems:
            raise ValueError("cannot export to Mixtral format: the model has " + " and ".join(problems)
                             + "; save it with format='native' or 'llama_moe' instead")
        base.pop("intermediate_size")
        return dict(base, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=widths[0],
                    num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                    router_aux_loss_coef=c.balance_loss_weight, output_router_logits=False,
                    sliding_window=None, router_jitter_noise=0.0)
    if format == "llama_moe":
        if c.shared_intermediate_size:
            raise ValueError("cannot save a shared (SharingInter) block in llama_moe format: use format='native'")
        scales = c.layer_list("score_scale")
        return dict(base, architectures=["LlamaMoEForCausalLM"], model_type="llama_moe",
                    num_experts=c.num_experts, num_selects=c.num_experts_per_tok,
                    size_experts=[[w] * c.num_experts for w in widths], gate_type="TopKBalancedNoisyGate",
                    gate_network=c.gate_type, gate_use_softmax=True, gate_use_balance=True,
                    gate_balance_loss_weight=c.balance_loss_weight, gate_add_noise=c.gate_noise,
                    gate_noise_epsilon=c.gate_noise_eps, calculator_type="UniversalCalculator",
                    multiply_gate_scores=True, score_scale_factor=scales[0] if len(set(scales)) == 1 else scales,
                    add_weight_norm=False, drop_tokens=True, dropped_padding="zero", capacity_factor=1.25)
    raise ValueError(f"unknown checkpoint format {format!r}: use llama, native, mixtral or llama_moe")


def save_pretrained(model, path, format="auto", max_shard_bytes=5 * 2**30):
    """Write config.json + safetensors (sharded above max_shard_bytes) atomically: into a temporary folder
    that is renamed into place, so a killed process never leaves a half-written checkpoint under `path`."""
    from safetensors.torch import save_file
    if format == "auto":
        format = "native" if model.config.is_moe else "llama"
    if format == "llama" and model.config.is_moe:
        raise ValueError("an MoE model cannot be saved in dense llama format: use native, mixtral or llama_moe")
    if format != "llama" and not model.config.is_moe:
        raise ValueError(f"format {format!r} is for MoE models; a dense model saves as 'llama'")
    config = export_config(model, format)  # raises before anything is written
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # Greedy sharding in state-dict order, as transformers does: a new shard starts when the next tensor
    # would push the current one past the limit. A first pass plans the shards from sizes alone, so that
    # each shard is then written and freed before the next is gathered: peak memory = model + one shard.
    plan, size = [[]], 0
    for name, t in export_tensors(model, format):
        nbytes = t.numel() * t.element_size()
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    shard_of = {n: i for i, shard in enumerate(plan) for n in shard}
    weight_map, total, current = {}, 0, {}
    for name, t in export_tensors(model, format):
        # clone: expert slices share storage, which safetensors refuses; the copy lives for one shard only
        current[name] = t.detach().to("cpu").clone()
        total += t.numel() * t.element_size()
        weight_map[name] = names[shard_of[name]]
        if len(current) == len(plan[shard_of[name]]):
            save_file(current, os.path.join(tmp, names[shard_of[name]]), metadata={"format": "pt"})
            current = {}
    if len(plan) > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    replace_dir(tmp, path)


def replace_dir(tmp, path):
    """Move a finished folder into place; the old one is removed only once the new one is there."""
    old = f"{path}.old{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
