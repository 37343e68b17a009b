"""
Chapter: training. Continual pretraining of LLaMA-MoE (SPEC.md section 5), and the demo's dense base.

One file, read top to bottom, no framework: plain PyTorch, DistributedDataParallel or FSDP2 (`fully_shard`).

    python train.py config/demo_dense.py                        # one process (the demo's dense base)
    torchrun --standalone --nproc_per_node=2 train.py           # the default: continual-pretrain the demo MoE
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b_moe_4of16.py       # one node, FSDP2
    torchrun --nnodes=14 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=moe \
        train.py config/llama2_7b_moe_4of16.py                    # the paper's 112 GPUs, same line on every node
    python train.py config/demo_dense.py --resume               # continue out_dir's latest checkpoint exactly

Settings: the TrainConfig dataclass below holds every key and its default (= the demo MoE run); a config
file (plain Python assignments) and then --key=value arguments override them, left to right.

Read top to bottom:
  1. TrainConfig      - every setting, with the paper's values where it has them (SPEC.md section 5)
  2. load_config      - config files + --key=value, with suggestions for mistyped keys
  3. distributed      - torchrun's environment -> rank, world, device; gloo on CPU, nccl on GPU
  4. the model        - from scratch / a checkpoint folder; DDP or FSDP2; activation checkpointing; compile
  5. get_lr + AdamW   - linear warmup, cosine to a 10% floor; no weight decay on 1-D parameters
  6. data streams     - DomainSampler (sample.py), one stream per micro-batch slot of the global batch
  7. evaluation       - per-domain validation loss, expert load, dynamic domain weights
  8. checkpoints      - atomic folders ckpt_NNNNNNN/ (HF model + optimizer + sampler + RNG + step)
  9. train(), run()   - the loop: accumulate, clip, step, log, evaluate, checkpoint, stop cleanly; export
"""
import datetime
import difflib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from ast import literal_eval
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import ModelConfig, MoEFeedForward, Transformer, config_from_hf, rope_inv_freq
from sample import DomainSampler, eval_windows, load_meta


# ----------------------------------------------------------------------------------------------------------
# 1. Settings. The defaults ARE the demo MoE run (`torchrun --standalone --nproc_per_node=2 train.py`);
#    config/*.py files override them. Paper values (SPEC.md section 5) are marked "paper".

@dataclass
class TrainConfig:
    # --- where from, where to ---
    init_from: str = "out/demo_moe"       # "scratch" | a checkpoint folder (HF dense LLaMA, split MoE) | "resume"
    out_dir: str = "out/demo_moe_cpt"     # checkpoints ckpt_NNNNNNN/, log.jsonl, final/ (+ final_mixtral/)
    data_dir: str = "data/embedded"       # token shards written by data/prepare.py
    # --- the model built by init_from="scratch" (names as model.ModelConfig = HF LlamaConfig) ---
    vocab_size: int | None = None         # None -> the data's (meta.json)
    hidden_size: int = 256
    intermediate_size: int = 688          # 688 = 16 * 43 = 8 * 86: splits evenly into 16 or 8 experts
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    num_experts: int = 0                  # > 0: an MoE from scratch (throughput runs; the paper splits instead)
    num_experts_per_tok: int = 4
    expert_intermediate_size: int = 0
    gate_type: str = "linear"             # "linear" | "mlp" (SPEC.md section 3)
    # --- data (SPEC.md section 4) ---
    weights: str | dict = "uniform"       # sample.py: uniform | proportional | sheared | llama | {domain: w}
    dynamic_weights: bool = False         # Sheared-LLaMA's rule, applied at every evaluation
    reference_losses: dict | str | None = None  # for dynamic weights off SlimPajama: {domain: loss} or "first"
    seq_len: int = 256                    # paper: 4096
    micro_batch: int = 4                  # sequences per rank per forward/backward
    global_batch_tokens: int = 8192       # tokens per optimizer step (paper: 3584 * 4096 ~ 15M)
    # --- optimisation (SPEC.md section 5) ---
    learning_rate: float = 2e-4           # paper
    min_lr_ratio: float = 0.1             # cosine floor = 10% of the peak (paper: 2e-5)
    warmup_steps: int = 10                # paper: 100
    max_steps: int = 60                   # paper: 13.6k
    lr_decay_steps: int | None = None     # where the cosine reaches the floor; None -> max_steps
    weight_decay: float = 0.1             # paper
    beta1: float = 0.9                    # paper
    beta2: float = 0.95                   # paper
    grad_clip: float = 1.0                # paper; 0 = no clipping
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 20               # steps; 0 = never (the paper: every 2.5B tokens)
    eval_windows: int = 8                 # validation windows per domain (spread over the split)
    log_interval: int = 5
    checkpoint_interval: int = 30         # steps; 0 = only at the end and on SIGTERM/SIGINT
    export: bool = True                   # at the end: out_dir/final (HF) and out_dir/final_mixtral when possible
    overwrite: bool = False               # a fresh run may replace an earlier run's checkpoints in out_dir
    # --- system ---
    parallel: str = "ddp"                 # "ddp" | "fsdp" (FSDP2, fully_shard per block, then the root)
    device: str = "auto"                  # "auto" (cuda if present) | "cpu" | "cuda"
    dtype: str = "auto"                   # "auto" (bfloat16 on cuda, float32 on cpu) | "bfloat16" | "float32"
    compile: bool = False                 # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward (the paper: on)
    peak_flops: float | None = None       # per device, for MFU; None -> a table (GPU) or CPU_FLOPS_PER_CORE
    seed: int = 0


# Peak dense bf16 tensor-core FLOP/s per GPU (no sparsity), from the vendors' data sheets: MFU's denominator.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10": 125e12, "L4": 121e12}
# A CPU core's fp32 peak: this machine is an AMD EPYC Zen 4 (avx512 executed on two 256-bit FMA pipes):
# 2 pipes x 8 fp32 lanes x 2 FLOP (multiply + add) = 32 FLOP per cycle; at ~3.0 GHz (the VM reports 2.6 GHz
# nominal, but a 1-thread 2048x1024x1024 fp32 matmul measured 88 GFLOP/s best of 20, PERF.md's 2-core BLAS
# up to 190) that is 96 GFLOP/s per core. Per process: times its threads. Override with --peak_flops.
CPU_FLOPS_PER_CORE = 2 * 8 * 2 * 3.0e9

DEMO_MOE_HINT = ("the demo MoE is made by the README's pipeline: `python data/prepare.py`, "
                 "`python train.py config/demo_dense.py`, then `python split.py --src out/demo_dense/final "
                 "--dst out/demo_moe --num_experts 16 --top_k 4`")


# ----------------------------------------------------------------------------------------------------------
# 2. Configuration: exec config files, then --key=value (values parsed with literal_eval, else kept as text)

def set_key(cfg, key, value, where):
    valid = [f.name for f in fields(cfg)]
    if key not in valid:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
        raise ValueError(f"unknown config key {key!r} ({where}): {hint}")
    default = getattr(TrainConfig, key, None)
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ValueError(f"{key} ({where}) must be True or False, got {value!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # --learning_rate=1 means 1.0
    if (isinstance(default, (int, float)) and not isinstance(default, bool)
            and not isinstance(value, (int, float))):
        raise ValueError(f"{key} ({where}) must be a number, got {value!r}")
    setattr(cfg, key, value)


def load_config(argv):
    """nanoGPT-style: `train.py config/a.py --key=value ...`, applied left to right. --resume = --init_from=resume."""
    cfg = TrainConfig()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__)
            print("keys and defaults:\n" + "\n".join(f"  --{f.name}={getattr(cfg, f.name)!r}" for f in fields(cfg)))
            raise SystemExit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if key == "resume" and not eq:
                key, text = "init_from", "resume"
            elif not eq:
                text = "True"  # a bare --flag switches a boolean on
            try:
                value = literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a path, a domain-weight string like 'a=0.5,b=0.5', ...
            set_key(cfg, key, value, f"from {arg}")
        else:
            if not os.path.isfile(arg):
                have = sorted(os.listdir("config")) if os.path.isdir("config") else []
                raise FileNotFoundError(f"config file {arg!r} not found (configs in config/: {have}); "
                                        f"settings are passed as --key=value")
            namespace = {"__file__": arg}
            with open(arg) as f:
                exec(compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue  # helpers and imports inside a config file are not settings
                set_key(cfg, key, value, f"in {arg}")
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {cfg.parallel!r}")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {cfg.dtype!r}")
    for key in ("seq_len", "micro_batch", "global_batch_tokens", "max_steps", "log_interval"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")


# ----------------------------------------------------------------------------------------------------------
# 3. Distributed set-up. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT via its rendezvous);
#    without them this is one plain process.

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def master(self):
        return self.rank == 0


def setup_distributed(cfg):
    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU: use --device=cpu (or auto)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if distributed and not dist.is_initialized():
        # nccl moves GPU tensors between GPUs; gloo is the CPU backend (tests, and this 2-core demo).
        # A long timeout: rank 0 alone writes a full checkpoint while the others wait at a barrier.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return Dist(rank, world, local_rank, device, distributed)


def all_reduce(t, d, op=None):
    if d.distributed:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier(d):
    if d.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# 4. The model: which config, where the weights come from, how it is spread over ranks.

# Fields that decide tensor shapes: a checkpoint and a run that disagree on any of them cannot continue.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                "expert_intermediate_size", "shared_intermediate_size", "gate_type")


def scratch_config(cfg, meta):
    """The demo's dense base (or an MoE for throughput runs), sized by the config keys."""
    moe = dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
               expert_intermediate_size=cfg.expert_intermediate_size, gate_type=cfg.gate_type) if cfg.num_experts else {}
    return ModelConfig(vocab_size=cfg.vocab_size or meta["vocab_size"], hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.seq_len,
                       tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=meta.get("bos_id"),
                       eos_token_id=meta.get("eos_id"), **moe)


def folder_config(path, hint=""):
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"init_from {path!r} is not a checkpoint folder (no config.json): use 'scratch', "
                                f"'resume' or a folder with config.json + safetensors" + (f"; {hint}" if hint else ""))
    with open(cfg_path) as f:
        return config_from_hf(json.load(f), cfg_path)


def shape_mismatch(a, b):
    fields_ = SHAPE_FIELDS + (() if a.is_moe else ("intermediate_size",))
    return [f"{k}: checkpoint {getattr(a, k)!r}, this run {getattr(b, k)!r}" for k in fields_
            if getattr(a, k) != getattr(b, k)]


def active_params(mc):
    """Parameters one token passes through (SPEC.md section 2: k of E experts). The embedding is a lookup,
    not a matmul, so it is left out (as in the 6N rule); a tied lm_head still counts once as the head."""
    d, hd = mc.hidden_size, mc.head_dim
    attn = d * hd * (2 * mc.num_attention_heads + 2 * mc.num_key_value_heads) + 2 * d  # q,o + k,v + 2 norms
    total = 0
    for layer in range(mc.num_hidden_layers):
        if mc.is_moe:
            E, k = mc.num_experts, mc.num_experts_per_tok
            gate = d * E + (E * E if mc.gate_type == "mlp" else 0) + d * E  # router + noise projection
            ffn = k * 3 * d * mc.layer_list("expert_intermediate_size")[layer] + 3 * d * mc.shared_intermediate_size
            total += attn + gate + ffn
        else:
            total += attn + 3 * d * mc.intermediate_size
    return total + d + mc.vocab_size * d  # final norm + lm_head


def flops_per_token(mc, seq_len):
    """Training FLOPs per token: 6 per active weight (2 forward + 4 backward), plus attention's own
    QK^T and AV products, 12 * layers * heads * head_dim * seq_len (PaLM, appendix B). Recomputation by
    activation checkpointing is not counted: that is model FLOPs utilisation, not hardware."""
    return 6 * active_params(mc) + 12 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq_len


def peak_flops(cfg, d):
    if cfg.peak_flops:
        return cfg.peak_flops
    if d.device.type == "cuda":
        name = torch.cuda.get_device_name(d.device)
        for key, value in GPU_PEAK_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
            if key in name:
                return value
        return float("nan")  # unknown GPU: MFU shows nan until --peak_flops is given
    return CPU_FLOPS_PER_CORE * torch.get_num_threads()


def checkpointed(forward):
    """Activation checkpointing of one block: keep only its input, recompute the inside in backward.
    Replacing the instance's forward keeps parameter names (no wrapper module in the state dict)."""
    def forward_with_recompute(*args):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return forward_with_recompute


def build_model(cfg, d, mc, weights_path):
    """-> (model to call in training, the Transformer inside it). weights_path None = fresh init (seeded)."""
    def full_weights():
        if weights_path is None:
            torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
            return Transformer(mc)
        return Transformer.from_pretrained(weights_path, dtype=torch.float32)  # fp32 master weights

    fsdp = cfg.parallel == "fsdp" and d.distributed
    if fsdp:
        # FSDP2: every rank builds the model on the meta device (no memory), shards it, and only rank 0
        # holds a full copy, which it broadcasts shard by shard. Peak host memory: one model, on rank 0.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = full_weights().state_dict() if d.master else {}
        with torch.device("meta"):
            model = Transformer(mc)
    else:
        model = full_weights().to(d.device)
    model.train()
    for block in model.model.layers:
        if cfg.activation_checkpointing:
            block.forward = checkpointed(block.forward)
        if cfg.compile:
            block.compile()  # per block: MoE routing has data-dependent shapes, blocks compile independently
    raw = model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(d.device.type, (d.world,))
        # bf16 compute, fp32 gradient reduction and fp32 master weights in the optimizer (SPEC.md section 5).
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if compute_dtype(cfg, d) == torch.bfloat16 else MixedPrecisionPolicy())
        for block in model.model.layers:  # one all-gather per block: only one block's full weights at a time
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embeddings, final norm, lm_head
        model.to_empty(device=d.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        model.inv_freq = rope_inv_freq(mc).to(d.device)  # a non-persistent buffer: to_empty left it garbage
        del full
    elif d.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model, raw


def compute_dtype(cfg, d):
    if cfg.dtype == "auto":
        return torch.bfloat16 if d.device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


# ----------------------------------------------------------------------------------------------------------
# 5. Optimizer and learning-rate schedule (SPEC.md section 5)

def get_lr(step, peak, warmup_steps, decay_steps, min_ratio):
    """Learning rate of update number `step` (0-based): linear warmup over warmup_steps to the peak, then a
    cosine from the peak at step warmup_steps down to min_ratio * peak at decay_steps, flat after that."""
    floor = min_ratio * peak
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def make_optimizer(cfg, model):
    """AdamW, weight decay on matrices only. 1-D parameters (RMSNorm gains; LLaMA has no biases) get none:
    decay would pull a gain toward 0, i.e. shrink the normalised signal, which is not a regulariser.
    The gate's weights (router and noise projection) are matrices and ARE decayed, as in the paper's release
    (Hugging Face Trainer decays everything but biases and norms): it also keeps the router logits' scale
    in check, so the top-k softmax does not saturate onto a few experts (SPEC.md section 3)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


# ----------------------------------------------------------------------------------------------------------
# 6. Data streams. The global batch is n_streams micro-batches; micro-batch slot s always reads stream s,
#    DomainSampler(rank=s, world_size=n_streams), and its gate noise is seeded by (seed, step, s). Rank r
#    runs slots r*accum ... r*accum + accum-1. So the batch does not depend on how the slots are laid out:
#    1 process x 2 accumulation steps sees exactly what 2 ranks x 1 step see (the DDP/FSDP tests rely on
#    it), and a run may resume on a different number of ranks with the same global and micro batch.

def batch_layout(cfg, world):
    per_forward = cfg.micro_batch * cfg.seq_len
    if cfg.global_batch_tokens % (per_forward * world):
        raise ValueError(
            f"global_batch_tokens={cfg.global_batch_tokens} does not divide into micro-batches: it must be a "
            f"multiple of micro_batch * seq_len * world_size = {cfg.micro_batch} * {cfg.seq_len} * {world} = "
            f"{per_forward * world} (gradient accumulation takes the rest); e.g. "
            f"--global_batch_tokens={max(1, round(cfg.global_batch_tokens / (per_forward * world))) * per_forward * world}")
    n_streams = cfg.global_batch_tokens // per_forward
    return n_streams, n_streams // world  # (slots per optimizer step, accumulation steps per rank)


def make_streams(cfg, d, n_streams, accum):
    first = d.rank * accum
    return [DomainSampler(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, cfg.weights,
                          dynamic=cfg.dynamic_weights, reference_losses=cfg.reference_losses, seed=cfg.seed,
                          rank=s, world_size=n_streams) for s in range(first, first + accum)]


def noise_seed(seed, step, slot):
    """One seed per (run, step, micro-batch slot): the gate's noise (SPEC.md section 3) is the same whichever
    rank runs the slot, and after a resume."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------------------------------------
# 7. Evaluation: per-domain validation loss (clean routing, no noise), and the load of each expert

@torch.no_grad()
def evaluate(cfg, d, model, domains, autocast):
    """{domain: mean next-token loss} on eval_windows windows per domain. Ranks split the windows; under FSDP
    every rank must run the same number of forwards (each one all-gathers weights), so the short ranks
    repeat a batch and drop its result."""
    model.eval()
    losses = {}
    for domain in domains:
        batches = list(eval_windows(cfg.data_dir, domain, cfg.seq_len, cfg.micro_batch, cfg.eval_windows))
        mine = batches[d.rank::d.world]
        total = torch.zeros(2, dtype=torch.float64, device=d.device)  # (sum of losses, tokens)
        for i in range(math.ceil(len(batches) / d.world)):
            x, y = mine[i] if i < len(mine) else batches[0]
            x, y = x.to(d.device), y.to(d.device)
            with autocast:
                logits, _ = model(x)                                     # (b, S, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            if i < len(mine):
                total += torch.stack([loss.double(), torch.tensor(y.numel(), dtype=torch.float64, device=d.device)])
        all_reduce(total, d)
        losses[domain] = (total[0] / total[1]).item()
    model.train()
    return losses


def expert_load_shares(counts):
    """(layers, E) token counts -> per layer (min share, max share); a perfectly even router gives 1/E each."""
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)
    return [(float(s.min()), float(s.max())) for s in shares]


# ----------------------------------------------------------------------------------------------------------
# 8. Checkpoints. out_dir/ckpt_NNNNNNN/ = model/ (save_pretrained: HF llama or native MoE), optimizer.pt
#    (full state, keys are parameter names), rank{r}.pt (this rank's sampler streams + RNG states),
#    state.json (step, settings). Written as ckpt_NNNNNNN.tmp and renamed when complete: a rename is atomic,
#    so a crash at any moment leaves the previous checkpoint whole. Only then is the previous one deleted.
#    Under FSDP2 the model and optimizer are gathered to rank 0 as full state dicts (our choice over sharded
#    DCP: the checkpoint stays a plain HF folder that any script can read, and a run can resume with another
#    world size or parallel mode; the price is one full copy in rank 0's host memory while saving).

CKPT_RE = re.compile(r"ckpt_(\d{7})$")


def latest_checkpoint(out_dir):
    if not os.path.isdir(out_dir):
        return None
    found = sorted(n for n in os.listdir(out_dir) if CKPT_RE.match(n))  # .tmp folders never match
    return os.path.join(out_dir, found[-1]) if found else None


def full_state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def gather_model(model, raw, d):
    """The whole model as a CPU Transformer on rank 0 (None elsewhere); collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    state = get_model_state_dict(model if isinstance(model, Transformer) else raw,
                                 options=full_state_options(cpu_offload=True))
    if not d.master:
        return None
    with torch.device("meta"):
        full = Transformer(raw.config)
    full.load_state_dict(state, assign=True)
    if raw.config.tie_word_embeddings:
        full.lm_head.weight = full.model.embed_tokens.weight
    return full


def fsync_tree(path):
    """Flush every file to disk before the rename makes the checkpoint visible (survives power loss too)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def pause_for_tests(step):
    """Test hook: TRAIN_TEST_CHECKPOINT_PAUSE=STEP:SECONDS stalls rank 0 halfway through writing checkpoint
    STEP, so that tests can kill -9 it mid-write. Unset in normal runs."""
    spec = os.environ.get("TRAIN_TEST_CHECKPOINT_PAUSE")
    if spec and int(spec.split(":")[0]) == step:
        return float(spec.split(":")[1])
    return 0.0


def save_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    final = os.path.join(cfg.out_dir, f"ckpt_{step:07d}")
    tmp = final + ".tmp"
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    barrier(d)
    full = gather_model(model, raw, d)
    optim = get_optimizer_state_dict(model if isinstance(model, Transformer) else raw, optimizer,
                                     options=full_state_options(cpu_offload=True))
    torch.save({"streams": {s.rank: s.state_dict() for s in streams}, "rng": rng_states()},
               os.path.join(tmp, f"rank{d.rank}.pt"))
    if d.master:
        full.save_pretrained(os.path.join(tmp, "model"))
        pause = pause_for_tests(step)
        if pause:
            open(os.path.join(tmp, "PAUSED"), "w").close()
            time.sleep(pause)
        torch.save(optim, os.path.join(tmp, "optimizer.pt"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(run_state, step=step), f, indent=1)
    barrier(d)  # every rank's file is in tmp
    if d.master:
        fsync_tree(tmp)
        os.replace(tmp, final)  # the commit point
        for name in os.listdir(cfg.out_dir):  # now the older checkpoints (and stray tmps) can go
            path = os.path.join(cfg.out_dir, name)
            if name.startswith("ckpt_") and path != final:
                shutil.rmtree(path, ignore_errors=True)
    barrier(d)
    return final


def rng_states():
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def load_training_state(ckpt, cfg, d, model, raw, optimizer, streams, saved_world):
    """Optimizer, sampler streams and RNG states from a checkpoint (the model was built from ckpt/model)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    fsdp = isinstance(model, Transformer) and d.distributed and cfg.parallel == "fsdp"
    # Under FSDP only rank 0 reads the optimizer file and broadcasts; otherwise each rank reads it.
    optim = torch.load(os.path.join(ckpt, "optimizer.pt"), map_location="cpu") if d.master or not fsdp else {}
    set_optimizer_state_dict(model if isinstance(model, Transformer) else raw, optimizer, optim,
                             options=full_state_options(broadcast_from_rank0=fsdp))
    # Streams are numbered by micro-batch slot, not by rank: find ours in whichever rank file holds them.
    wanted = {s.rank: s for s in streams}
    for r in range(saved_world):
        # our own files (numpy RNG state inside), so not restricted to weights_only
        saved = torch.load(os.path.join(ckpt, f"rank{r}.pt"), map_location="cpu", weights_only=False)
        for slot, state in saved["streams"].items():
            if slot in wanted:
                wanted.pop(slot).load_state_dict(state)
        if r == d.rank and saved_world == d.world:
            set_rng_states(saved["rng"])
    if wanted:
        raise ValueError(f"{ckpt}: no saved state for data streams {sorted(wanted)}; the checkpoint is incomplete")


# ----------------------------------------------------------------------------------------------------------
# 9. The training loop

STOP = {"signal": None}


def request_stop(signum, frame):
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit. A second Ctrl-C interrupts at once."""
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


def log_line(d, text, jsonl=None, record=None):
    if not d.master:
        return
    print(text, flush=True)
    if jsonl is not None and record is not None:
        jsonl.write(json.dumps(record) + "\n")
        jsonl.flush()


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg):
    """Set up the ranks, run, and always take the process group down again (also on errors)."""
    d = setup_distributed(cfg)
    try:
        return run(cfg, d)
    finally:
        if d.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, d):
    meta = load_meta(cfg.data_dir)  # a missing data folder stops here, naming the command that makes it
    n_streams, accum = batch_layout(cfg, d.world)

    # --- where the model comes from ---
    resume_from, start_step, run_state = None, 0, {}
    init_from = cfg.init_from
    if init_from == "resume":
        resume_from = latest_checkpoint(cfg.out_dir)
        if resume_from is None:
            raise FileNotFoundError(f"init_from='resume' but {cfg.out_dir!r} holds no checkpoint (ckpt_NNNNNNN/): "
                                    f"start the run with init_from='scratch' or a model folder, or point "
                                    f"--out_dir at the run to continue")
        with open(os.path.join(resume_from, "state.json")) as f:
            run_state = json.load(f)
        start_step, init_from = run_state["step"], run_state["init_from"]
        if run_state["n_streams"] != n_streams or run_state["seq_len"] != cfg.seq_len:
            raise ValueError(f"{resume_from} was written with {run_state['n_streams']} micro-batches of "
                             f"{run_state['seq_len']} tokens per step; this run has {n_streams} of {cfg.seq_len}: "
                             f"keep global_batch_tokens, micro_batch and seq_len as they were to continue exactly")
    elif latest_checkpoint(cfg.out_dir):
        # A fresh run must not mix its checkpoints with an earlier run's: --resume would pick the wrong one.
        if not cfg.overwrite:
            raise FileExistsError(f"{cfg.out_dir!r} holds checkpoints of an earlier run "
                                  f"({os.path.basename(latest_checkpoint(cfg.out_dir))}): --resume continues it, "
                                  f"--overwrite=True starts over (deleting them), or pick another --out_dir")
        if d.world > 1:
            dist.barrier()  # every rank has looked at out_dir before rank 0 empties it
        if d.master:
            for name in os.listdir(cfg.out_dir):
                if CKPT_RE.match(name) or name in ("final", "final_mixtral", "log.jsonl"):
                    path = os.path.join(cfg.out_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if d.world > 1:
            dist.barrier()
    if init_from == "scratch":
        mc = scratch_config(cfg, meta)
    elif resume_from and not os.path.isdir(init_from):
        mc = None  # the run's starting folder is gone: the checkpoint alone defines the model
    else:
        mc = folder_config(init_from, DEMO_MOE_HINT if init_from == TrainConfig.init_from else "")
    if resume_from:
        saved = folder_config(os.path.join(resume_from, "model"))
        problems = shape_mismatch(saved, mc) if mc else []
        if problems:
            raise ValueError(f"cannot resume: {resume_from} holds a model of a different shape ("
                             + "; ".join(problems) + "): use the settings of that run, or another out_dir")
        mc = saved
    if meta["vocab_size"] > mc.vocab_size:
        raise ValueError(f"the data's vocabulary ({meta['vocab_size']} ids, {cfg.data_dir}/meta.json) is larger "
                         f"than the model's ({mc.vocab_size}): tokenize the data with the model's tokenizer")
    if cfg.seq_len > mc.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{mc.max_position_embeddings}")
    streams = make_streams(cfg, d, n_streams, accum)
    domains = streams[0].domains
    weights_path = os.path.join(resume_from, "model") if resume_from else (None if init_from == "scratch" else init_from)
    model, raw = build_model(cfg, d, mc, weights_path)
    optimizer = make_optimizer(cfg, model)
    if resume_from:
        load_training_state(resume_from, cfg, d, model, raw, optimizer, streams, run_state["world_size"])
    dtype = compute_dtype(cfg, d)
    fsdp = cfg.parallel == "fsdp" and d.distributed
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 and not fsdp
                else nullcontext())  # FSDP2 casts through its MixedPrecisionPolicy instead
    eval_model = raw if not fsdp else model  # DDP's wrapper is for backward only; FSDP must be called

    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    tokens_per_step = cfg.global_batch_tokens
    flops_step = flops_per_token(mc, cfg.seq_len) * tokens_per_step
    peak = peak_flops(cfg, d) * d.world
    moe_layers = [b.mlp for b in raw.model.layers if isinstance(b.mlp, MoEFeedForward)]
    load_counts = torch.zeros(len(moe_layers), mc.num_experts, dtype=torch.int64, device=d.device)
    run_state = dict(init_from=init_from, n_streams=n_streams, seq_len=cfg.seq_len, world_size=d.world,
                     config=asdict(cfg))

    os.makedirs(cfg.out_dir, exist_ok=True)
    jsonl = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if d.master else None
    n_total = sum(p.numel() for p in raw.parameters()) if not fsdp else None
    log_line(d, f"[train] {'resuming ' + resume_from if resume_from else 'model from ' + init_from}: "
                f"{'MoE ' + str(mc.num_experts) + ' experts, top-' + str(mc.num_experts_per_tok) if mc.is_moe else 'dense'}, "
                f"{mc.num_hidden_layers} layers, d={mc.hidden_size}; active params {active_params(mc) / 1e6:.2f}M"
                + (f" of {n_total / 1e6:.2f}M" if n_total else ""), jsonl,
             dict(kind="run", world_size=d.world, accum=accum, n_streams=n_streams, start_step=start_step,
                  active_params=active_params(mc), flops_per_token=flops_step / tokens_per_step,
                  peak_flops=peak, config=asdict(cfg), model=asdict(mc)))
    log_line(d, f"[train] {d.world} rank(s) on {d.device.type} ({cfg.parallel if d.distributed else 'one process'}),"
                f" {cfg.micro_batch} x {cfg.seq_len} tokens x {accum} accumulation x {d.world} = "
                f"{tokens_per_step:,} tokens/step; steps {start_step} -> {cfg.max_steps}; domains {domains}")

    handlers = {}
    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, request_stop)
    STOP["signal"] = None

    def eval_and_log(step):
        val = evaluate(cfg, d, eval_model, domains, autocast)
        # Dynamic weights move only on the eval_interval grid, never at a run's last step: a run stopped at
        # any step and resumed must see the same weights as one that went straight through.
        update = cfg.dynamic_weights and step % cfg.eval_interval == 0
        counts = load_counts.clone()
        all_reduce(counts, d)
        load_counts.zero_()
        loads = expert_load_shares(counts) if moe_layers and counts.sum() > 0 else []  # none before step 1
        if update:  # SPEC.md section 4: every stream applies the same all-reduced losses
            for s in streams:
                s.update_weights(val)
        mean = sum(val.values()) / len(val)
        text = (f"[eval] step {step} | val loss {mean:.4f} | " + " ".join(f"{k} {v:.3f}" for k, v in val.items())
                + "\n[eval] weights " + " ".join(f"{k} {v:.3f}" for k, v in streams[0].weights.items()))
        if loads:
            text += (f"\n[eval] expert load min/max share per layer (even = {1 / mc.num_experts:.3f}): "
                     + " ".join(f"L{i} {lo:.3f}/{hi:.3f}" for i, (lo, hi) in enumerate(loads)))
        log_line(d, text, jsonl, dict(kind="eval", step=step, val_loss=val, mean_val_loss=mean,
                                      weights=streams[0].weights, expert_load_min_max=loads))

    losses, step, exit_code, ckpt = [], start_step, 0, resume_from
    window_time, window_steps = 0.0, 0
    try:
        if cfg.eval_interval and step == 0:
            eval_and_log(0)
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = get_lr(step, cfg.learning_rate, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # stats: (sum of losses, sum of balance losses, SIGINT seen, SIGTERM seen) over this rank's slots
            stats = torch.zeros(4, dtype=torch.float64, device=d.device)
            for micro in range(accum):
                x, y, _ = streams[micro].next_batch()
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                torch.manual_seed(noise_seed(cfg.seed, step, streams[micro].rank))
                last = micro == accum - 1
                # Average gradients across ranks only once per step, on the last micro-batch.
                if fsdp:
                    model.set_requires_gradient_sync(last)
                sync = model.no_sync() if d.distributed and not fsdp and not last else nullcontext()
                with sync:
                    with autocast:
                        _, loss = model(x, y)
                        loss = loss + raw.aux_loss  # LM loss + the MoE balance loss (SPEC.md section 3)
                    (loss / accum).backward()  # DDP/FSDP average over ranks: together, the global batch mean
                stats[0] += loss.detach().double()
                stats[1] += raw.aux_loss.detach().double()
                for i, m in enumerate(moe_layers):
                    load_counts[i] += m.last_gate.counts
            stats[2] = float(STOP["signal"] == signal.SIGINT)
            stats[3] = float(STOP["signal"] == signal.SIGTERM)
            all_reduce(stats, d)
            loss_value = stats[0].item() / n_streams
            aux_value = stats[1].item() / n_streams
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
            if not (math.isfinite(loss_value) and math.isfinite(norm)):
                raise FloatingPointError(
                    f"non-finite loss {loss_value} (grad norm {norm}) at step {step + 1}: stopping before the "
                    f"update; the last good checkpoint is {latest_checkpoint(cfg.out_dir) or 'none (none was saved)'}"
                    f" - resume it with --resume and a lower learning_rate, or check the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            window_time += time.perf_counter() - t0
            window_steps += 1
            losses.append(loss_value - aux_value)

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                step_time = window_time / window_steps
                tok_s = tokens_per_step / step_time
                mfu = flops_step / step_time / peak
                log_line(d, f"step {step}/{cfg.max_steps} | loss {loss_value - aux_value:.4f} | balance "
                            f"{aux_value:.4f} | lr {lr:.2e} | grad norm {norm:.3f} | {tok_s:,.0f} tok/s | "
                            f"MFU {100 * mfu:.2f}% | ETA {format_eta((cfg.max_steps - step) * step_time)}", jsonl,
                         dict(kind="train", step=step, loss=loss_value - aux_value, balance_loss=aux_value, lr=lr,
                              grad_norm=norm, tokens=step * tokens_per_step, tokens_per_s=tok_s, mfu=mfu,
                              step_time_s=step_time))
                window_time, window_steps = 0.0, 0
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                eval_and_log(step)
            stop = stats[2] > 0 or stats[3] > 0
            if stop or step == cfg.max_steps or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
                ckpt = save_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state)
                log_line(d, f"[checkpoint] {ckpt}")
            if stop:
                exit_code = 130 if stats[2] > 0 else 0
                log_line(d, f"[train] stopped by {'SIGINT' if exit_code else 'SIGTERM'} after step {step}; "
                            f"continue with --resume (checkpoint {ckpt})")
                break
        if step == cfg.max_steps and cfg.export and exit_code == 0:
            export(cfg, d, model, raw)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if jsonl is not None:
            jsonl.close()
    return dict(losses=losses, step=step, exit_code=exit_code, checkpoint=ckpt)


def export(cfg, d, model, raw):
    """The trained model for other tools: out_dir/final in Hugging Face format (dense -> llama, MoE -> our
    native format), and out_dir/final_mixtral for MoE models Mixtral can express (SPEC.md section 3)."""
    full = gather_model(model, raw, d)
    if not d.master:
        return
    final = os.path.join(cfg.out_dir, "final")
    full.save_pretrained(final)
    print(f"[export] {final} ({'native MoE' if full.config.is_moe else 'llama'} format)", flush=True)
    if full.config.is_moe:
        try:
            full.save_pretrained(os.path.join(cfg.out_dir, "final_mixtral"), format="mixtral")
            print(f"[export] {cfg.out_dir}/final_mixtral (Mixtral format, rescale factor folded into w2)", flush=True)
        except ValueError as err:  # e.g. an MLP gate or a shared block: model.py says which
            print(f"[export] Mixtral format skipped: {err}", flush=True)


def main(argv=None):
    return train(load_config(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
