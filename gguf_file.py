"""
Chapter: GGUF, llama.cpp's one-file format - the model (and its tokenizer, gguf_tokenizer.py), read and written.

A GGUF file holds key/value metadata ("llama.block_count", "tokenizer.ggml.tokens", ...) and tensors named
"blk.L.attn_q.weight", each stored as floats or in one of ggml's block quantizations (Q8_0: 32 weights share
one fp16 scale; Q4_1: 32 4-bit weights share a scale and a minimum; the K-quants nest blocks of 256). Both
directions use the `gguf` package that llama.cpp itself publishes for its writer and (de)quantizers; the header is
parsed here (open_gguf), in a tenth of a second where the package's reader takes seconds for a large vocabulary.
Two things differ from a Hugging Face folder besides the names:
  - ggml lists a tensor's dims innermost first ([d, vocab]); numpy's view of it is (vocab, d).
  - llama.cpp's "llama" graph rotates (x_2i, x_2i+1) pairs of a head (Meta's layout), while Hugging Face and
    we rotate (x_i, x_i+hd/2) (rotate-half). Its converter reorders the rows of attn_q / attn_k within each
    head (permute_rope_rows); unpermute_rope_rows undoes that exactly. Architectures with "NEOX" rotary
    embeddings (glm4moe) rotate halves like us: their rows are stored as they are.

Which llama.cpp graph runs our model (gguf_arch says, before anything is written):
    dense LLaMA                                   -> "llama"
    MoE, linear router, softmax over the top-k    -> "llama" with expert tensors (as Mixtral GGUFs are); the
                                                     rescale factor s is folded into ffn_down_exps
    ... plus SharingInter's always-on shared block -> "granitemoe" (llama's graph + an ungated shared FFN)
    ... with a nonzero loss-free balancing bias   -> "glm4moe" with expert_gating_func = softmax_weight: top-k
                                                     of (logits + bias), softmax over the chosen raw logits
    "unit" weighting with every expert chosen     -> "llama", dense: the experts side by side are one FFN
    refused: an MLP router, "unit" weighting of k < E experts (no llama.cpp graph weights experts by 1)
Unequal expert widths are padded with zero neurons (silu(0) * 0 = 0: exact).

Read top to bottom:
  1. Names and files  - tensor names, opening a file with clear errors.
  2. Reading          - metadata -> ModelConfig, tensors dequantized one at a time.
  3. Writing          - which graph, the tensors, the metadata (gguf_tokenizer.py's too), the file (atomically).
"""
import mmap
import os
import struct
from collections import namedtuple

import numpy as np
import torch

from model import ModelConfig, rope_inv_freq

# ----------------------------------------------------------------------------------------------------------
# 1. Names and files

GGUF_NAMES = {  # GGUF name (with L for the layer) -> ours
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.L.attn_norm.weight": "model.layers.L.input_layernorm.weight",
    "blk.L.attn_q.weight": "model.layers.L.self_attn.q_proj.weight",
    "blk.L.attn_k.weight": "model.layers.L.self_attn.k_proj.weight",
    "blk.L.attn_v.weight": "model.layers.L.self_attn.v_proj.weight",
    "blk.L.attn_output.weight": "model.layers.L.self_attn.o_proj.weight",
    "blk.L.ffn_norm.weight": "model.layers.L.post_attention_layernorm.weight",
    "blk.L.ffn_gate.weight": "model.layers.L.mlp.gate_proj.weight",
    "blk.L.ffn_up.weight": "model.layers.L.mlp.up_proj.weight",
    "blk.L.ffn_down.weight": "model.layers.L.mlp.down_proj.weight",
    # experts: (E, d_e, d) per half; checkpoint.from_hf_names puts the halves into gate_up_proj
    "blk.L.ffn_gate_inp.weight": "model.layers.L.mlp.gate.gate_network.weight",
    "blk.L.ffn_gate_exps.weight": "model.layers.L.mlp.experts.gate_proj",
    "blk.L.ffn_up_exps.weight": "model.layers.L.mlp.experts.up_proj",
    "blk.L.ffn_down_exps.weight": "model.layers.L.mlp.experts.down_proj",
    "blk.L.exp_probs_b.bias": "model.layers.L.mlp.gate.expert_bias",
    "blk.L.ffn_gate_shexp.weight": "model.layers.L.mlp.shared.gate_proj.weight",
    "blk.L.ffn_up_shexp.weight": "model.layers.L.mlp.shared.up_proj.weight",
    "blk.L.ffn_down_shexp.weight": "model.layers.L.mlp.shared.down_proj.weight",
}
ARCHS = ("llama", "granitemoe", "glm4moe")
NEOX_ARCHS = ("glm4moe",)                  # rotate-half rotary embeddings: q / k rows stored as they are
RENAMED = {"glm4moe": {"blk.L.ffn_norm.weight": "blk.L.post_attention_norm.weight"}}  # its pre-FFN norm
SOFTMAX_WEIGHT = 3                         # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX_WEIGHT


def is_gguf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def unpermute_rope_rows(w, n_heads):
    """Undo llama.cpp's q/k row order. Its converter maps each head's rows (2, hd/2) -> (hd/2, 2), i.e.
    rotate-half row order [x_0..x_{hd/2-1}, x_{hd/2}..] becomes interleaved [x_0, x_{hd/2}, x_1, ...]."""
    rows, cols = w.shape
    # (H*hd, d) -> (H, hd/2, 2, d) -> swap -> (H, 2, hd/2, d) -> (H*hd, d)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rope_rows(w, n_heads):
    """Ours -> llama.cpp's q/k row order (the inverse of unpermute_rope_rows)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# GGUF metadata value types (GGUF spec): scalars by struct format; 8 is a string, 9 an array.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUFFile = namedtuple("GGUFFile", "meta tensors")  # {key: value}, [GGUFTensor] in file order
GGUFTensor = namedtuple("GGUFTensor", "name tensor_type shape data")  # shape: ggml dims, innermost first;
# data: a read-only numpy view of the file, (..., rows, row) for float types, raw bytes per row for block types


def open_gguf(path, tensors=True):
    """A GGUF file -> GGUFFile(meta, tensors). The header is parsed here with struct: metadata values as gguf's
    field.contents() gives them (strings decoded, arrays as lists), each tensor a view of a read-only mapping of
    the file (nothing is read until used). The gguf package's own reader builds a numpy view per string, seconds
    for a 49k-token vocabulary; this takes ~0.1 s. tensors=False: the metadata alone (the tokenizer's need)."""
    def string(off):
        n, = struct.unpack_from("<Q", mm, off)
        return mm[off + 8:off + 8 + n].decode("utf-8"), off + 8 + n

    def value(off, vtype):
        if vtype == 8:
            return string(off)
        if vtype == 9:
            etype, count = struct.unpack_from("<IQ", mm, off)
            off += 12
            if etype in GGUF_SCALARS and etype != 7:  # numbers: one numpy read for the whole array
                arr = np.frombuffer(mm, dtype=np.dtype(GGUF_SCALARS[etype]), count=count, offset=off)
                return arr.tolist(), off + arr.nbytes
            out = []
            for _ in range(count):
                v, off = value(off, etype)
                out.append(v)
            return out, off
        v, = struct.unpack_from(GGUF_SCALARS[vtype], mm, off)
        return v, off + struct.calcsize(GGUF_SCALARS[vtype])

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", mm, 0)
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r}, version {version}: GGUF version 2 or 3 expected")
            meta, off = {}, 24
            for _ in range(n_kv):
                key, off = string(off)
                vtype, = struct.unpack_from("<I", mm, off)
                meta[key], off = value(off + 4, vtype)
            infos = []
            for _ in range(n_tensors if tensors else 0):  # name, n_dims, dims, type, offset in the data
                name, off = string(off)
                n_dims, = struct.unpack_from("<I", mm, off)
                dims = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
                ggml_type, offset = struct.unpack_from("<IQ", mm, off + 4 + 8 * n_dims)
                infos.append((name, dims, ggml_type, offset))
                off += 16 + 8 * n_dims
        return GGUFFile(meta, tensor_views(path, infos, off + -off % int(meta.get("general.alignment", 32)), size))
    except (struct.error, KeyError, ValueError, UnicodeDecodeError, OverflowError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); the file is truncated "
                         f"or damaged ({size} bytes): download or convert it again") from None


def tensor_views(path, infos, start, size):
    """The tensors of open_gguf's header as read-only views of the file; the first one the file cuts short, or
    of a type this gguf package does not know, is named."""
    if not infos:
        return []
    import gguf
    data, out = np.memmap(path, mode="r"), []
    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
              gguf.GGMLQuantizationType.F64: np.float64}
    for name, dims, ggml_type, offset in infos:
        if ggml_type not in gguf.GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name!r} has ggml type {ggml_type}, unknown to this gguf package (a newer "
                             f"llama.cpp type?): upgrade gguf, or convert the model with a common type")
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        begin = start + offset
        end = begin + int(np.prod(dims)) * type_size // block
        if end > size:
            raise ValueError(f"tensor {name!r} ends at byte {end} but the file has {size}")
        shape = tuple(reversed(dims))  # numpy order: outermost first
        raw = data[begin:end]
        view = (raw.view(floats[qtype]).reshape(shape) if qtype in floats else
                raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        out.append(GGUFTensor(name, qtype, np.array(dims), view))
    return out


def read_gguf_metadata(path):
    """A GGUF's key-value metadata -> {key: value} (open_gguf without the tensors)."""
    return open_gguf(path, tensors=False).meta


def gguf_value(reader, key, default=KeyError):
    """A metadata value; a missing key raises KeyError unless a default is given."""
    return reader.meta[key] if default is KeyError else reader.meta.get(key, default)


# ----------------------------------------------------------------------------------------------------------
# 2. Reading

def gguf_config(reader, path):
    """{arch}.* metadata -> ModelConfig (the names of llama.cpp's convert_hf_to_gguf.py)."""
    arch = gguf_value(reader, "general.architecture", None)
    if arch not in ARCHS:
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files (LLaMA 1/2/3, "
                         f"SmolLM, TinyLlama, Mixtral, ...) and the MoE files this project writes (granitemoe, "
                         f"glm4moe) are read: convert other models to a Hugging Face folder")
    tensors = {t.name: t for t in reader.tensors}

    def get(key, default=KeyError):
        return gguf_value(reader, f"{arch}.{key}", default)

    try:
        d = int(get("embedding_length"))
        n_head = int(get("attention.head_count"))
        head_dim = int(get("attention.key_length", d // n_head))
        if int(get("rope.dimension_count", head_dim)) != head_dim:
            raise ValueError(f"{path}: {arch}.rope.dimension_count differs from the head size {head_dim} "
                             f"(partial rotary embeddings are not supported)")
        if "token_embd.weight" not in tensors:
            raise ValueError(f"{path}: tensor 'token_embd.weight' is missing: the file is incomplete")
        kw = dict(
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),  # ggml dims: [d, vocab]
            hidden_size=d,
            intermediate_size=int(get("feed_forward_length", 0)),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=int(get("attention.head_count_kv", n_head)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length")),
            tie_word_embeddings="output.weight" not in tensors,  # llama.cpp then reuses token_embd
            bos_token_id=gguf_value(reader, "tokenizer.ggml.bos_token_id", None),
            eos_token_id=gguf_value(reader, "tokenizer.ggml.eos_token_id", None),
        )
        if get("expert_count", 0):
            kw.update(gguf_moe_config(get, path, arch, tensors))
    except KeyError as e:
        raise ValueError(f"{path}: metadata key {e.args[0]!r} is missing: the file is not a complete {arch} "
                         f"GGUF; convert the model again") from None
    kw["rope_scaling"] = gguf_rope_scaling(reader, path, arch, kw, tensors.get("rope_freqs.weight"))
    try:
        return ModelConfig(**kw)
    except ValueError as e:  # sizes that do not fit together
        raise ValueError(f"{path}: {e}") from None


def gguf_moe_config(get, path, arch, tensors):
    """The MoE fields of an expert GGUF (get: gguf_config's {arch}.* reader), refusing the routing llama.cpp's
    graph has that ours has not."""
    if "blk.0.ffn_gate_exps.weight" not in tensors:
        raise ValueError(f"{path}: {arch}.expert_count is set but blk.0.ffn_gate_exps.weight is missing "
                         f"(merged gate_up expert tensors are not read): convert the model again")
    width = int(tensors["blk.0.ffn_gate_exps.weight"].shape[1])    # ggml dims [d, d_e, E]
    scale = 1.0
    if arch == "granitemoe":
        neutral = {"logit_scale": 1.0, "residual_scale": 0.0, "embedding_scale": 0.0, "attention_scale": 0.0}
        odd = [k for k, v in neutral.items() if float(get(k, v)) not in (v, 1.0)]
        if odd:
            raise ValueError(f"{path}: granitemoe scales {odd} are not 1: IBM's Granite models are not read "
                             f"(only the granitemoe files this project writes)")
    if arch == "glm4moe":
        if int(get("expert_gating_func", 0)) != SOFTMAX_WEIGHT or int(get("leading_dense_block_count", 0)) \
                or int(get("nextn_predict_layers", 0)) or "blk.0.attn_q_norm.weight" in tensors:
            raise ValueError(f"{path}: a GLM-4.5 style glm4moe file (sigmoid routing, dense or MTP layers, q/k "
                             f"norms) is not read; only the glm4moe files this project writes")
        scale = float(get("expert_weights_scale", 1.0)) or 1.0
    shared = 0
    if "blk.0.ffn_gate_shexp.weight" in tensors:
        shared = int(tensors["blk.0.ffn_gate_shexp.weight"].shape[1])
    experts = int(get("expert_count"))
    return dict(num_experts=experts, num_experts_per_tok=int(get("expert_used_count")),
                expert_intermediate_size=width, shared_intermediate_size=shared, score_scale=scale,
                intermediate_size=width * experts, gate_type="linear", gate_noise=False)


def gguf_rope_scaling(reader, path, arch, kw, rope_freqs):
    """The rope_scaling dict ModelConfig understands, from {arch}.rope.scaling.* or a rope_freqs tensor."""
    kind = gguf_value(reader, f"{arch}.rope.scaling.type", "none")
    factor = gguf_value(reader, f"{arch}.rope.scaling.factor", 1.0)
    if kind == "linear" and factor != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind not in ("none", "linear"):
        raise ValueError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (only linear, and "
                         f"LLaMA-3.1's scaling stored as rope_freqs)")
    if rope_freqs is None:
        return None
    # LLaMA-3.1/3.2: the converter stores per-frequency divisors instead of the parameters. They follow
    # from factor, low/high_freq_factor and the original context; Meta's releases all use low 1, high 4 and
    # 8192 positions, with factor = the largest divisor. Check that this reproduces the stored divisors.
    import gguf
    divisors = torch.from_numpy(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).copy()).float()
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    base = rope_inv_freq(ModelConfig(**dict(kw, rope_scaling=None)))
    ours = rope_inv_freq(ModelConfig(**dict(kw, rope_scaling=scaling)))
    if divisors.shape != base.shape or not torch.allclose(ours, base / divisors, rtol=1e-5, atol=0):
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' holds rotary scaling factors that are not "
                         f"LLaMA-3's (factor {scaling['factor']}, low 1, high 4, 8192 positions); convert the "
                         f"model to a Hugging Face folder with its rope_scaling instead")
    return scaling


def read_gguf(path):
    """-> (ModelConfig, a generator of (our name, float32 tensor, path)) dequantizing one tensor at a time."""
    import gguf
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    arch = gguf_value(reader, "general.architecture")
    try:  # the tokenizer fingerprint, when tokenizer.py can read this file's vocabulary
        from tokenizer import Tokenizer
        config.tokenizer_sha256 = Tokenizer(path).fingerprint
    except Exception:
        config.tokenizer_sha256 = None
    names = {RENAMED.get(arch, {}).get(k, k): v for k, v in GGUF_NAMES.items()}
    rope_heads = {"blk.L.attn_q.weight": config.num_attention_heads, "blk.L.attn_k.weight": config.num_key_value_heads}

    def tensors():
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # already folded into config.rope_scaling
            layer, key = None, t.name
            if t.name.startswith("blk."):
                _, layer, rest = t.name.split(".", 2)
                key = f"blk.L.{rest}"
            if key not in names:
                raise ValueError(f"{path}: unexpected tensor {t.name!r} of type {t.tensor_type.name} for a "
                                 f"{arch} model (biases, merged or per-layer tensors of another layout): not "
                                 f"supported")
            name = names[key].replace(".L.", f".{layer}.")
            try:
                w = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy in reversed ggml dims, float32
            except NotImplementedError:
                raise ValueError(f"{path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf "
                                 f"package cannot dequantize: convert the model with a supported type "
                                 f"(F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_K, Q6_K, ...)") from None
            if not w.flags.writeable:  # F32 comes back as a view of the read-only file mapping
                w = w.copy()
            w = torch.from_numpy(w.astype(np.float32, copy=False))
            if arch not in NEOX_ARCHS and key in rope_heads:
                w = unpermute_rope_rows(w, rope_heads[key])
            yield name, w, f"{path} (tensor {t.name!r})"

    return config, tensors()


# ----------------------------------------------------------------------------------------------------------
# 3. Writing

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def gguf_arch(config, has_bias=False):
    """Which llama.cpp architecture runs this model exactly -> (arch, dense: experts written as one FFN).
    Raises ValueError, one line naming what would fit, for a model no llama.cpp graph computes."""
    if not config.is_moe:
        return "llama", False
    E, k = config.num_experts, config.num_experts_per_tok
    if config.expert_weighting == "unit" and k == E:  # every expert at weight s, always: one dense FFN
        return "llama", True
    if config.expert_weighting == "unit" and k > 1:
        raise ValueError(f"cannot write a GGUF: 'unit' expert weighting of {k} of {E} experts has no llama.cpp "
                         f"graph (they all weight the chosen experts by router scores); save format='native', "
                         f"or split with --expert_weighting=softmax or --top_k={E}")
    if config.gate_type != "linear":
        raise ValueError("cannot write a GGUF: llama.cpp's routers are one linear layer and this model has an "
                         "MLP gate; save format='native', or split with --gate_type=linear")
    if has_bias:
        return "glm4moe", False
    return ("granitemoe" if config.shared_intermediate_size else "llama"), False


def model_arch(model):
    """gguf_arch for a built model: a nonzero loss-free balancing bias counts."""
    has_bias = model.config.is_moe and any(bool(m.gate.expert_bias.any()) for m in model.moe_layers())
    return gguf_arch(model.config, has_bias)


def pad(w, size, dim=0):
    """w with zeros appended along dim (the neurons) up to `size`: zero neurons add nothing to a SwiGLU FFN."""
    extra = list(w.shape)
    extra[dim] = size - w.shape[dim]
    return w if extra[dim] == 0 else torch.cat([w, w.new_zeros(extra)], dim)


def gguf_tensors(model, arch, dense):
    """(GGUF name, float32 tensor) in llama.cpp's layout, one at a time."""
    c = model.config
    rename = RENAMED.get(arch, {})
    ours_to_gguf = {v: rename.get(k, k) for k, v in GGUF_NAMES.items()}
    state = model.state_dict()
    scales = c.layer_list("score_scale") if c.is_moe else None
    width = max(c.layer_list("expert_intermediate_size")) if c.is_moe else 0
    shared = c.shared_intermediate_size
    if arch == "glm4moe" and shared:  # its shared block is expert_shared_count experts wide
        shared = -(-shared // width) * width

    def out(name, t):
        return name, t.detach().to("cpu", torch.float32)

    yield out("token_embd.weight", state["model.embed_tokens.weight"])
    yield out("output_norm.weight", state["model.norm.weight"])
    if not c.tie_word_embeddings:
        yield out("output.weight", state["lm_head.weight"])
    if c.rope_scaling and c.rope_scaling.get("rope_type", c.rope_scaling.get("type")) == "llama3":
        base = rope_inv_freq(ModelConfig(**{**c.__dict__, "rope_scaling": None}))
        yield out("rope_freqs.weight", base / rope_inv_freq(c))  # the divisors llama.cpp applies
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, t in state.items():
            if not ours.startswith(p) or ".mlp." in ours:
                continue
            key = ours_to_gguf[ours.replace(p, "model.layers.L.")]
            if arch not in NEOX_ARCHS and key.endswith(("attn_q.weight", "attn_k.weight")):
                t = permute_rope_rows(t, c.num_attention_heads if "attn_q" in key else c.num_key_value_heads)
            yield out(key.replace(".L.", f".{i}."), t)
        b = f"blk.{i}."
        if not c.is_moe:
            for part in ("gate", "up", "down"):
                yield out(f"{b}ffn_{part}.weight", state[f"{p}mlp.{part}_proj.weight"])
            continue
        gate_up, down = state[f"{p}mlp.experts.gate_up_proj"], state[f"{p}mlp.experts.down_proj"]
        gate, up = gate_up.chunk(2, dim=1)                                        # 2 x (E, d_e, d)
        down = down * scales[i]                                                   # (E, d, d_e), s folded in
        if dense:  # the experts side by side (then the shared block): one FFN of width E d_e + shared
            parts = [(gate.flatten(0, 1), up.flatten(0, 1), down.permute(1, 0, 2).flatten(1))]
            if shared:
                parts.append(tuple(state[f"{p}mlp.shared.{n}_proj.weight"] for n in ("gate", "up", "down")))
            gate, up, down = (torch.cat(ts, dim=1 if j == 2 else 0) for j, ts in enumerate(zip(*parts)))
            rows = width * c.num_experts + shared  # the widest layer's: llama.cpp has one FFN width
            for part, t, dim in (("gate", gate, 0), ("up", up, 0), ("down", down, 1)):
                yield out(f"{b}ffn_{part}.weight", pad(t, rows, dim))
            continue
        yield out(f"{b}ffn_gate_inp.weight", state[f"{p}mlp.gate.gate_network.weight"])
        yield out(f"{b}ffn_gate_exps.weight", pad(gate, width, 1))                  # (E, d_e, d)
        yield out(f"{b}ffn_up_exps.weight", pad(up, width, 1))                      # (E, d_e, d)
        yield out(f"{b}ffn_down_exps.weight", pad(down, width, 2))                  # (E, d, d_e)
        if arch == "glm4moe":
            yield out(f"{b}exp_probs_b.bias", state[f"{p}mlp.gate.expert_bias"])
        if shared:
            for part, dim in (("gate", 0), ("up", 0), ("down", 1)):
                yield out(f"{b}ffn_{part}_shexp.weight", pad(state[f"{p}mlp.shared.{part}_proj.weight"], shared, dim))


def gguf_type_of(name, array, gtype):
    """The ggml type a tensor is written in: llama.cpp's converter's rules (norms, 1-D tensors, biases and
    the router stay F32; a row that is no whole number of quantization blocks falls back to F16)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if array.ndim <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")) or not name.endswith(".weight"):
        return Q.F32
    qtype = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if array.shape[-1] % block == 0 else Q.F16


def add_metadata(w, key, value):
    """One key of our {key: value} dict, typed as llama.cpp reads it (token types int32, scores float32)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def save_gguf(model, path, tokenizer, gguf_type="auto", overwrite=False):
    """Write `model` as one GGUF file llama.cpp runs, its tokenizer inside. gguf_type: f32, f16, bf16, q8_0
    (quantized with the gguf package's own code) or auto (the model's dtype). Everything that can be refused
    (the architecture, the type, the tokenizer, an existing file) is refused before a byte is written; the
    file is written under a temporary name and renamed into place. Memory: the model plus the file's tensors
    (gguf's writer holds them until it writes; no copy for F32 tensors of an F32 model but the reordered ones)."""
    import gguf
    from fileio import atomic_file
    from gguf_tokenizer import tokenizer_metadata
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: a GGUF is one file (e.g. {os.path.join(path, 'model.gguf')})")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists: pass overwrite=True (--overwrite) to replace it")
    if gguf_type == "auto":
        gguf_type = {torch.float16: "f16", torch.bfloat16: "bf16"}.get(model.lm_head.weight.dtype, "f32")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)} or auto")
    arch, dense = model_arch(model)
    if tokenizer is None:
        raise ValueError("a GGUF carries its tokenizer: pass tokenizer= (a Tokenizer or its path), e.g. the "
                         "model's source folder or GGUF, or the data folder it was trained on")
    tok_meta = tokenizer_metadata(tokenizer, model.config.vocab_size)
    c = model.config
    w = gguf.GGUFWriter(None, arch)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    scaling = c.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if c.is_moe and not dense:
        width = max(c.layer_list("expert_intermediate_size"))
        w.add_feed_forward_length(width)
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(width)
        if arch == "granitemoe":
            w.add_logit_scale(1.0)
            if c.shared_intermediate_size:
                w.add_expert_shared_feed_forward_length(c.shared_intermediate_size)
        if arch == "glm4moe":
            w.add_expert_shared_count(-(-c.shared_intermediate_size // width))
            w.add_uint32(gguf.Keys.LLM.EXPERT_GATING_FUNC.format(arch=arch), SOFTMAX_WEIGHT)
            w.add_expert_weights_norm(True)
            w.add_expert_weights_scale(1.0)
            w.add_leading_dense_block_count(0)
    elif c.is_moe:
        w.add_feed_forward_length(max(c.layer_list("expert_intermediate_size")) * c.num_experts
                                  + c.shared_intermediate_size)
    else:
        w.add_feed_forward_length(c.intermediate_size)
    for key, value in tok_meta.items():
        add_metadata(w, key, value)
    for name, t in gguf_tensors(model, arch, dense):
        array = t.numpy()
        qtype = gguf_type_of(name, array, gguf_type)
        data = array if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(array, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    with atomic_file(path, "wb") as f:  # gguf's writer opens the temporary f.name itself; atomic_file syncs, renames
        try:
            w.write_header_to_file(path=f.name)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return path

