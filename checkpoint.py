"""
Chapter 2: checkpoint I/O - every format a model is read from or written to.

The model chapter (model.py) knows nothing of files: `load_pretrained(path)` / `save_pretrained(model, path)`
here read and write every format. Every folder format is config.json + model.safetensors (or shards
of at most 5 GiB + model.safetensors.index.json, as transformers writes them):

    "llama"      Hugging Face LlamaForCausalLM (dense models). Tensor names equal ours.
    "native"     our MoE: the LLaMA names plus mlp.gate.*, stacked mlp.experts.{gate_up,down}_proj, mlp.shared.*
    "mixtral"    Hugging Face MixtralForCausalLM (linear gate, no shared block; scale folded into w2).
    "llama_moe"  the paper's released format (model_type llama_moe), one tensor per expert.

and one single-file format, llama.cpp's:

    "gguf"       one .gguf file, quantized or not, the tokenizer inside (gguf_file.py reads and writes it).

Every folder written carries the model's tokenizer (tokenizer.json + tokenizer_config.json, and tokenizer.model
for sentencepiece / tiktoken models; hf_tokenizer.py) and generation_config.json, so that transformers'
AutoTokenizer / AutoModelForCausalLM and llama.cpp's convert_hf_to_gguf.py take the folder as it is.

Read top to bottom:
  1. Configs       - config.json of each format -> ModelConfig.
  2. Reading       - stream tensors one at a time onto a model built on the meta device (peak ~1 model).
  3. Writing       - name tensors for the target format, shard, write atomically (fileio.atomic_dir).

Every error names the file (and tensor), says what is wrong and what to do.
"""
import json
import os
from dataclasses import asdict, fields

import torch
import torch.nn as nn

from fileio import atomic_dir, atomic_write, check_output_dir
from gguf_file import is_gguf, read_gguf, save_gguf
from model import ModelConfig, Transformer, rope_inv_freq
from tokenizer import Tokenizer, check_same_tokenizer

NATIVE_MODEL_TYPE = "llama_moe_stacked"
LLAMA_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
              "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "initializer_range"]
# What a model folder consists of (fileio.check_output_dir: a folder holding anything else is never replaced).
MODEL_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
               "special_tokens_map.json", "generation_config.json", "chat_template*")
MAX_SHARD_BYTES = 5 * 2**30  # 5 GiB, transformers' default shard limit


# ----------------------------------------------------------------------------------------------------------
# 1. Configs

def read_config_json(path):
    """The raw config.json dict of a checkpoint folder, with a clear error when it is absent or unreadable."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: a checkpoint folder needs config.json + safetensors "
                                f"(as written by save_pretrained or Hugging Face)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e}): the file is damaged or half-written; "
                         f"restore it or export the checkpoint again") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object of model settings, found {type(raw).__name__}")
    return raw


def config_from_hf(raw, path="config.json"):
    """Map a Hugging Face / llama_moe / our config.json dict onto ModelConfig."""
    mtype = raw.get("model_type")
    if mtype not in ("llama", "mixtral", "llama_moe", NATIVE_MODEL_TYPE):
        raise ValueError(f"{path}: model_type {mtype!r} is not supported (expected llama, mixtral, llama_moe "
                         f"or {NATIVE_MODEL_TYPE})")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError(f"{path}: only LLaMA's silu activation without attention/MLP biases is supported")
    try:
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
    except KeyError as e:
        raise ValueError(f"{path}: a {mtype} config.json needs the key {e.args[0]!r}, which is missing: "
                         f"export the checkpoint again or add the key") from None
    except TypeError as e:  # a value of the wrong type (a string for a size, ...)
        raise ValueError(f"{path}: a setting has the wrong type ({e}): fix config.json") from None


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


# ----------------------------------------------------------------------------------------------------------
# 2. Reading

def load_pretrained(path, dtype=None, device=None):
    """A checkpoint folder (any format above) or a .gguf file -> Transformer in eval mode."""
    config, mtype, tensors = open_checkpoint(path)
    return fill_model(config, mtype, tensors, path, dtype, device)


def open_checkpoint(path, own_memory=False):
    """-> (ModelConfig, format, a lazy generator of its tensors): the config is read, no weight yet, so a
    caller can check what it is about to load first. own_memory: see read_safetensors (a GGUF is always
    dequantized into memory of its own)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        if not is_gguf(path):
            raise ValueError(f"{path}: a single file is read only if it is GGUF; for Hugging Face / our "
                             f"checkpoints pass the folder holding config.json")
        config, tensors = read_gguf(path)
        return config, "gguf", tensors
    if os.path.isdir(path):
        raw = read_config_json(path)
        config = config_from_hf(raw, os.path.join(path, "config.json"))
        return config, raw["model_type"], read_safetensors(path, own_memory)
    raise FileNotFoundError(f"{path}: no such checkpoint folder or .gguf file")


def fill_model(config, mtype, tensors, path, dtype=None, device=None):
    """Stream (stored name, tensor, file) triples onto a model built on the meta device.

    Shapes only, no memory, until real tensors are assigned one by one: the peak is one model copy plus one
    tensor (a 7B model loads in ~1x its size)."""
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.named_parameters())  # a tied lm_head is the embedding and is listed once
    expected.update((n, b) for n, b in model.named_buffers() if n.endswith("gate.expert_bias"))
    loaded = {}  # our name -> the (expert, half) cells that arrived for it (see cells())
    for stored_name, tensor, fpath in tensors:
        mapped = from_hf_names(stored_name, mtype)
        if mapped is None:
            continue
        name, expert, half = mapped
        if name not in expected:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # some exporters write the tied head anyway
            raise ValueError(f"{fpath}: unexpected tensor {stored_name!r} for a {mtype} model with this "
                             f"config (wrong checkpoint, or config and weights disagree)")
        full_shape = tuple(expected[name].shape)
        if expert is not None and not 0 <= expert < full_shape[0]:
            raise ValueError(f"{fpath}: tensor {stored_name!r} is expert {expert}, but the config has "
                             f"{full_shape[0]} experts: the checkpoint's shards or config are inconsistent; "
                             f"export it again")
        index, want = piece(full_shape, expert, half)
        if tuple(tensor.shape) != want:
            raise ValueError(f"{fpath}: tensor {stored_name!r} has shape {tuple(tensor.shape)}, the config "
                             f"implies {want}")
        new_cells = cells(full_shape, name, expert, half)
        if new_cells & loaded.get(name, set()):
            raise ValueError(f"{fpath}: tensor {stored_name!r} holds weights already read from another tensor "
                             f"(stored twice, or in two layouts): the checkpoint's shards are inconsistent; "
                             f"export it again")
        tensor = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if expert is None and half is None:
            set_tensor(model, name, tensor)
        else:  # one expert (or one half) per stored tensor: assemble the stack as they stream in
            param = model.get_parameter(name)
            if param.is_meta:
                param = set_tensor(model, name, torch.empty(full_shape, dtype=tensor.dtype, device=device))
            param.data[index] = tensor
        loaded.setdefault(name, set()).update(new_cells)
    missing = []
    for name, p in expected.items():
        want = cells(tuple(p.shape), name, None, None)
        have = loaded.get(name, set())
        if have == want:
            continue
        if name.endswith(("gate.weight_noise.weight", "gate.expert_bias")) and not have:
            # Mixtral has no noise projection and no balancing bias; both start at zero anyway.
            set_tensor(model, name, torch.zeros(p.shape, dtype=dtype or model.model.embed_tokens.weight.dtype,
                                                device=device))
            continue
        if len(want) == 1:
            missing.append(name)
            continue
        for h, part in ((None, ""), (0, "gate half of "), (1, "up half of ")):
            gone = sorted(j for j, hh in want - have if hh == h and j is not None)
            if gone:
                experts = f"{len(gone)} experts" if len(gone) > 8 else f"experts {gone}"
                missing.append(f"{name} ({part}{experts})")
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(missing)} in all): the checkpoint is incomplete or does not match its config; "
                         f"export or download it again")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(config).to(device)
    model.source = os.fspath(path)  # where save_pretrained looks for the tokenizer when none is given
    return model.eval()


def read_safetensors(path, own_memory=False):
    """Yield (name, tensor, file) one at a time from model.safetensors or its shards: never the whole model.

    By default the tensors are views of a memory map of each file (safetensors' zero-copy load): nothing is
    read until used, but every page read stays resident while any view of that file lives. own_memory=True
    copies each tensor out of a map of its own that closes at once, so the file is read once and only the
    copies stay: what a program that makes new tensors from the old (split.py) needs to stay at one model."""
    from safetensors import SafetensorError, safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid shard index (a JSON object with a 'weight_map' of tensor "
                             f"name -> shard file) ({type(e).__name__}: {e}): export the checkpoint again") from None
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (PyTorch .bin "
                                f"checkpoints are not read: convert them to safetensors first)")
    for fname in files:
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise FileNotFoundError(f"{fpath}: shard named in model.safetensors.index.json is missing")
        if os.path.getsize(fpath) == 0:
            raise ValueError(f"{fpath}: the file is empty (0 bytes), probably an interrupted copy or save: "
                             f"copy or export the checkpoint again")
        try:
            if not own_memory:
                with safe_open(fpath, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name), fpath
                continue
            with safe_open(fpath, framework="pt") as f:
                names = list(f.keys())
            for name in names:
                with safe_open(fpath, framework="pt") as f:  # a map of its own, closed at once
                    yield name, f.get_tensor(name).clone(), fpath
        except (SafetensorError, OSError) as e:  # a damaged header, or data shorter than the header says
            raise ValueError(f"{fpath}: not a readable safetensors file ({e}); it is truncated or damaged "
                             f"({os.path.getsize(fpath)} bytes): copy or export the checkpoint again") from None


def from_hf_names(name, mtype):
    """Map one stored tensor name to (our name, expert, half), or None for a tensor to skip.

    expert: the index of the one expert the tensor holds (None: all of them, or not an expert tensor);
    half: 0 / 1 for the gate / up half of experts.gate_up_proj (None: the whole tensor)."""
    if name.endswith("rotary_emb.inv_freq"):  # a buffer some exporters store; it carries no learned state
        return None
    which = expert = None
    if mtype == "mixtral":
        # model.layers.L.block_sparse_moe.gate.weight / .experts.J.w{1,2,3}.weight
        name = name.replace("block_sparse_moe.gate.weight", "mlp.gate.gate_network.weight")
        if ".block_sparse_moe.experts." in name:
            head, rest = name.split(".block_sparse_moe.experts.")
            j, w = (rest.split(".") + [""])[:2]
            if w not in ("w1", "w2", "w3") or not j.isdigit():
                return name, None, None  # not a tensor of this model: fill_model says so, naming it
            which, expert = {"w1": "gate", "w3": "up", "w2": "down"}[w], int(j)
    elif mtype == "llama_moe":
        # model.layers.L.mlp.calculator.experts.weight_{gate,up,down}.J
        if ".mlp.calculator.experts.weight_" in name:
            head, rest = name.split(".mlp.calculator.experts.weight_")
            which, j = rest.split(".")
            if which not in ("gate", "up", "down") or not j.isdigit():
                return name, None, None  # not a tensor of this model: fill_model says so, naming it
            expert = int(j)
    elif mtype == "gguf" and name.endswith((".mlp.experts.gate_proj", ".mlp.experts.up_proj")):
        # gguf_file names llama.cpp's ffn_gate_exps / ffn_up_exps so: the two halves of our gate_up_proj
        head, rest = name.split(".mlp.experts.")
        which = rest[:-len("_proj")]
    if which is None:
        return name, None, None
    if which == "down":
        return f"{head}.mlp.experts.down_proj", expert, None
    return f"{head}.mlp.experts.gate_up_proj", expert, {"gate": 0, "up": 1}[which]


def piece(full_shape, expert, half):
    """Where a stored tensor goes in our parameter of full_shape: (index, the shape it must have)."""
    index, shape = [slice(None)] * len(full_shape), list(full_shape)
    if half is not None:          # the gate or the up half of (E, 2 d_e, d): rows [0, d_e) or [d_e, 2 d_e)
        shape[1] //= 2
        index[1] = slice(half * shape[1], (half + 1) * shape[1])
    if expert is not None:        # one expert of the (E, ...) stack
        index[0] = expert
        shape.pop(0)
    return tuple(index), tuple(shape)


def cells(full_shape, name, expert, half):
    """The (expert, half) cells of a parameter that a stored tensor covers; a complete parameter is covered
    exactly once (this is how a missing or a twice-stored expert is found)."""
    experts = [expert] if expert is not None else (range(full_shape[0]) if ".mlp.experts." in name else [None])
    halves = [half] if half is not None else ((0, 1) if name.endswith("gate_up_proj") else [None])
    return {(j, h) for j in experts for h in halves}


def set_tensor(model, name, tensor):
    """Replace a (meta) parameter by a real tensor, keeping whether it trains (a gate without noise has a
    frozen noise projection, which DDP would otherwise wait for)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._buffers:  # the gate's balancing bias
        module.register_buffer(attr, tensor)
        return tensor
    param = nn.Parameter(tensor, requires_grad=getattr(module, attr).requires_grad and tensor.is_floating_point())
    setattr(module, attr, param)
    return param


# ----------------------------------------------------------------------------------------------------------
# 3. Writing

# One tensor per expert on disk: (gate, up, down) names of expert j of the MoE layer at `head`.
EXPERT_NAMES = {
    "mixtral": ("{head}.block_sparse_moe.experts.{j}.w1.weight", "{head}.block_sparse_moe.experts.{j}.w3.weight",
                "{head}.block_sparse_moe.experts.{j}.w2.weight"),
    "llama_moe": ("{head}.mlp.calculator.experts.weight_gate.{j}", "{head}.mlp.calculator.experts.weight_up.{j}",
                  "{head}.mlp.calculator.experts.weight_down.{j}"),
}


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
        if ".mlp.experts." in name:
            gate_name, up_name, down_name = EXPERT_NAMES[format]
            for j in range(t.size(0)):
                if name.endswith("gate_up_proj"):
                    gate, up = t[j].chunk(2)                                     # 2 x (d_e, d), views
                    yield gate_name.format(head=head, j=j), gate
                    yield up_name.format(head=head, j=j), up
                elif format == "mixtral":  # the rescale factor folded into w2: its routing is ours with s = 1
                    yield down_name.format(head=head, j=j), t[j] * scales[layer]
                else:  # llama_moe keeps score_scale_factor in its config
                    yield down_name.format(head=head, j=j), t[j]
        elif name.endswith("gate.expert_bias"):
            continue  # all zeros (export_config refuses a model whose bias is not): no tensor for it
        elif format == "llama_moe":
            yield name, t
        elif name.endswith("gate.gate_network.weight"):  # mixtral's linear router
            yield f"{head}.block_sparse_moe.gate.weight", t
        # (mixtral: gate.weight_noise is dropped: Mixtral has no noise, and eval never used it)


HF_MOE_FORMATS = ("mixtral", "llama_moe")


def check_hf_moe_format(format, c, has_bias=False):
    """ValueError naming all that Mixtral's or llama_moe's config (format) cannot hold of the MoE whose ModelConfig
    is c (has_bias: a nonzero loss-free balancing bias). Neither routes with a bias or adds experts at unit weight:
    refused, not approximated. split.py asks before it splits, export_config before a file is written."""
    mixtral, name = format == "mixtral", {"mixtral": "Mixtral"}.get(format, format)
    problems = []
    if c.expert_weighting != "softmax":
        problems.append(f"expert_weighting {c.expert_weighting!r} (it weights by a softmax over the chosen logits)")
    if has_bias:
        problems.append("a loss-free balancing bias in the routing (it has no router bias)")
    if mixtral and c.gate_type != "linear":
        problems.append("an MLP gate (Mixtral's router is one linear layer)")
    if c.shared_intermediate_size:
        problems.append(f"an always-on shared block ({name} has none)")
    if mixtral and len(set(c.layer_list("expert_intermediate_size"))) != 1:
        problems.append("expert widths that differ between layers")
    if problems:
        raise ValueError(f"cannot export to {name} format: the model has "
                         + " and ".join(problems) + "; save it with format='native' instead (split.py --format=native)")


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
    if format in HF_MOE_FORMATS:
        check_hf_moe_format(format, c, any(bool(m.gate.expert_bias.any()) for m in model.moe_layers()))
    if format == "mixtral":
        base.pop("intermediate_size")
        return dict(base, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=widths[0],
                    num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok,
                    router_aux_loss_coef=c.balance_loss_weight, output_router_logits=False,
                    sliding_window=None, router_jitter_noise=0.0)
    if format == "llama_moe":
        scales = c.layer_list("score_scale")
        return dict(base, architectures=["LlamaMoEForCausalLM"], model_type="llama_moe",
                    num_experts=c.num_experts, num_selects=c.num_experts_per_tok,
                    size_experts=[[w] * c.num_experts for w in widths], gate_type="TopKBalancedNoisyGate",
                    gate_network=c.gate_type, gate_use_softmax=True, gate_use_balance=True,
                    gate_balance_loss_weight=c.balance_loss_weight, gate_add_noise=c.gate_noise,
                    gate_noise_epsilon=c.gate_noise_eps, calculator_type="UniversalCalculator",
                    multiply_gate_scores=True, score_scale_factor=scales[0] if len(set(scales)) == 1 else scales,
                    add_weight_norm=False, drop_tokens=True, dropped_padding="zero", capacity_factor=1.25)
    raise ValueError(f"unknown checkpoint format {format!r}: use llama, native, mixtral, llama_moe or gguf")


def unshare(tensors):
    """safetensors writes no two tensors of one file that view the same memory (older releases refuse it
    even for disjoint slices): copy all but the first of each group that shares storage - the per-expert
    slices of a stacked tensor - and nothing else, so saving a model needs no second copy of it."""
    seen = set()
    out = {}
    for name, t in tensors.items():
        key = (t.device, t.untyped_storage().data_ptr())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def model_tokenizer(model, tokenizer=None):
    """The Tokenizer a model's files should carry: `tokenizer` (a Tokenizer, or a path Tokenizer reads) when
    given, refused if it is not the one the model was trained with (config.tokenizer_sha256); else the one
    beside the checkpoint the model was loaded from, when it is that one; else None."""
    want = model.config.tokenizer_sha256
    if tokenizer is not None:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
        check_same_tokenizer({"the model": want, f"tokenizer {tok.path}": tok.fingerprint},
                             "pass the model's own tokenizer")
        return tok
    source = getattr(model, "source", None)
    if source is None:
        return None
    try:
        tok = Tokenizer(source)
    except (OSError, ValueError):
        return None
    return tok if not want or tok.fingerprint == want else None


def save_pretrained(model, path, format="auto", max_shard_bytes=MAX_SHARD_BYTES, tokenizer=None, gguf_type="auto",
                    overwrite=False):
    """Write config.json + safetensors (shards of at most max_shard_bytes, 5 GiB by default) atomically:
    into a temporary folder renamed into place (fileio.atomic_dir), so a killed process never leaves a
    half-written checkpoint under `path`, and the temporaries of dead processes are cleaned. The folder also
    gets the tokenizer (model_tokenizer says which) and generation_config.json.

    format="gguf": one file `path` for llama.cpp instead (gguf_file.save_gguf: gguf_type f32, f16, bf16, q8_0 or
    auto = the model's dtype; the tokenizer is required; an existing file is replaced only with overwrite)."""
    from safetensors.torch import save_file
    tok = model_tokenizer(model, tokenizer)
    if format == "gguf":
        return save_gguf(model, path, tok, gguf_type=gguf_type, overwrite=overwrite)
    if format == "auto":
        format = "native" if model.config.is_moe else "llama"
    if format == "llama" and model.config.is_moe:
        raise ValueError("an MoE model cannot be saved in dense llama format: use native, mixtral or llama_moe")
    if format != "llama" and not model.config.is_moe:
        raise ValueError(f"format {format!r} is for MoE models; a dense model saves as 'llama'")
    config = export_config(model, format)  # raises before anything is written
    check_output_dir(path, "path", "a model", MODEL_FILES, overwrite=True)  # never a file, nor a user's folder
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
    with atomic_dir(path) as tmp:
        weight_map, total, current = {}, 0, {}
        for name, t in export_tensors(model, format):
            current[name] = t.detach().to("cpu").contiguous()  # no copy for a contiguous CPU tensor
            total += t.numel() * t.element_size()
            weight_map[name] = names[shard_of[name]]
            if len(current) == len(plan[shard_of[name]]):
                save_file(unshare(current), os.path.join(tmp, names[shard_of[name]]), metadata={"format": "pt"})
                current = {}
        if len(plan) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        c = model.config
        atomic_write(os.path.join(tmp, "generation_config.json"), json.dumps(
            {k: v for k, v in (("bos_token_id", c.bos_token_id), ("eos_token_id", c.eos_token_id)) if v is not None}))
        if tok is not None:
            tok.save(tmp)
    return path
