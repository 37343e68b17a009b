"""
Chapter: training. Continual pretraining of LLaMA-MoE (SPEC.md section 5), and the demo's dense base.

One file, read top to bottom, no framework: plain PyTorch, DistributedDataParallel or FSDP2 (`fully_shard`).

    python train.py config/demo_dense.py                        # one process (the demo's dense base)
    torchrun --standalone --nproc_per_node=2 train.py           # the default: continual-pretrain the demo MoE
    torchrun --standalone --nproc_per_node=8 train.py config/llama2_7b_moe_4of16.py       # one node, FSDP2
    torchrun --nnodes=14 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 --rdzv_id=moe \
        train.py config/llama2_7b_moe_4of16.py                    # the paper's 112 GPUs, same line on every node
    python train.py config/demo_dense.py --resume               # continue out_dir's latest checkpoint exactly
    python train.py --distill_from=out/demo_dense/final --distill_alpha=0.5   # CPT + KL to the dense parent

Settings: the TrainConfig dataclass below holds every key and its default (= the demo MoE run); config files
(plain Python assignments) and then --key=value arguments override them, left to right (configurator.py).
The ranks, the lock on out_dir, where the run starts, checkpoints and the log are train_state.py's.

Read top to bottom:
  1. TrainConfig      - every setting, with the paper's values where it has them (SPEC.md section 5)
  2. check_config     - values that cannot work, refused before anything runs
  3. the model        - from scratch / a checkpoint folder; DDP or FSDP2; activation checkpointing; compile
  4. get_lr + AdamW   - linear warmup, cosine to a 10% floor; no weight decay on 1-D parameters
  5. data streams     - DomainSampler (sample.py), one stream per micro-batch slot of the global batch
  6. evaluation       - per-domain validation loss, expert load, dynamic domain weights
  7. distillation     - KL(parent || student) on the same tokens, in chunks of positions
  8. train()          - set up, then the loop: batch, forward, loss, backward, clip, step, log/eval/checkpoint
"""
import contextlib
import functools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import train_state
from configurator import UserError, load_config, need, run_cli, setting, user_input
from gate import GATE_TYPES, routing_evenness, update_bias
from model import ModelConfig, MoEFeedForward, Transformer, rope_inv_freq
from sample import DomainSampler, eval_windows, load_meta
from tokenizer import check_same_tokenizer
from train_state import (Log, all_reduce, check_finite, commit_start, export, load_training_state, resolve_start,
                         save_checkpoint, setup_distributed, together)


# ----------------------------------------------------------------------------------------------------------
# 1. Settings. The defaults ARE the demo MoE run (`torchrun --standalone --nproc_per_node=2 train.py`);
#    config/*.py files override them. Paper values (SPEC.md section 5) are marked "paper".

@dataclass
class TrainConfig:
    # --- where from, where to ---
    init_from: str = "out/demo_moe"       # "scratch" | a checkpoint folder (HF dense LLaMA, split MoE) | "resume"
    out_dir: str = "out/demo_moe_cpt"     # checkpoints ckpt_NNNNNNN/, log.jsonl, final/ (+ final_mixtral/)
    data_dir: str = "data/embedded"       # token shards written by data/prepare.py
    # --- the model init_from="scratch" builds: model.ModelConfig's keys (= HF LlamaConfig's), passed on by name
    #     (scratch_config). With a checkpoint folder its config.json decides; a num_experts that disagrees is refused.
    vocab_size: int | None = setting(None, ge=1)  # None -> the data's (meta.json)
    hidden_size: int = setting(256, ge=1)
    intermediate_size: int = setting(688, ge=1)  # 688 = 16 * 43 = 8 * 86: splits evenly into 16 or 8 experts
    num_hidden_layers: int = setting(4, ge=1)
    num_attention_heads: int = setting(4, ge=1)
    num_key_value_heads: int = setting(2, ge=1)
    rope_theta: float = setting(10000.0, gt=0)
    tie_word_embeddings: bool = False
    num_experts: int = setting(0, ge=0)  # > 0: an MoE from scratch (throughput runs; the paper splits instead)
    num_experts_per_tok: int = setting(4, ge=1)
    expert_intermediate_size: int = setting(0, ge=0)
    gate_type: str = setting("linear", choices=GATE_TYPES)
    # --- data (SPEC.md section 4) ---
    weights: str | dict = "uniform"       # sample.py: uniform | proportional | sheared | llama | {domain: w}
    dynamic_weights: bool = False         # Sheared-LLaMA's rule, applied at every evaluation
    reference_losses: dict | str | None = None  # for dynamic weights off SlimPajama: {domain: loss} or "first"
    seq_len: int = setting(256, ge=1)  # paper: 4096
    micro_batch: int = setting(4, ge=1)  # sequences per rank per forward/backward
    global_batch_tokens: int = setting(8192, ge=1)  # tokens per optimizer step (paper: 3584 * 4096 ~ 15M)
    # --- optimisation (SPEC.md section 5) ---
    learning_rate: float = setting(2e-4, gt=0)  # paper
    min_lr_ratio: float = setting(0.1, ge=0, le=1)  # cosine floor = 10% of the peak (paper: 2e-5)
    warmup_steps: int = setting(10, ge=0)  # paper: 100
    max_steps: int = setting(60, ge=1)  # paper: 13.6k
    lr_decay_steps: int | None = setting(None, ge=1)  # where the cosine reaches the floor; None -> max_steps
    weight_decay: float = setting(0.1, ge=0)  # paper
    beta1: float = setting(0.9, ge=0, lt=1)  # paper
    beta2: float = setting(0.95, ge=0, lt=1)  # paper
    grad_clip: float = setting(1.0, ge=0)  # paper; 0 = no clipping
    # --- balancing the experts (gate.py) ---
    # "loss" (paper: w * (cv^2 importance + cv^2 load)) | "bias" (loss-free, DeepSeek-V3: a routing bias
    # moved after each step) | "both"
    balance: str = setting("loss", choices=("loss", "bias", "both"))
    bias_rate: float = setting(1e-3, gt=0)  # gamma, the bias step per optimizer step (DeepSeek-V3: 1e-3)
    # --- distillation from the dense parent (beyond the paper; section 7) ---
    distill_from: str | None = None       # a dense checkpoint folder or .gguf with the student's vocabulary
    distill_alpha: float = setting(0.0, ge=0)  # loss = lm + balance + alpha * KL(parent || student)
    distill_temperature: float = setting(1.0, gt=0)  # both distributions softened by T; the KL is scaled by T^2
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = setting(20, ge=0)  # steps; 0 = never (the paper: every 2.5B tokens)
    eval_windows: int = setting(8, ge=1)  # validation windows per domain (spread over the split)
    log_interval: int = setting(5, ge=1)
    checkpoint_interval: int = setting(30, ge=0)  # steps; 0 = only at the end and on SIGTERM/SIGINT
    keep_checkpoints: int = setting(2, ge=1)  # the last K checkpoints stay (a divergence may have spoilt the last)
    export: bool = True                   # at the end: out_dir/final (HF) and out_dir/final_mixtral when possible
    overwrite: bool = False               # a fresh run may replace an earlier run's files in out_dir
    # --- system ---
    parallel: str = setting("ddp", choices=("ddp", "fsdp"))  # FSDP2: fully_shard per block, then the root
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))  # "auto": cuda if present
    dtype: str = setting("auto", choices=("auto", "bfloat16", "float32"))  # "auto": bf16 on cuda, fp32 on cpu
    compile: bool = False                 # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward (the paper: on)
    peak_flops: float | None = setting(None, gt=0)  # per device, for MFU; None: a table or CPU_FLOPS_PER_CORE
    seed: int = 0


# The TrainConfig keys that are ModelConfig fields (the scratch model's shape).
MODEL_KEYS = [f.name for f in fields(TrainConfig) if f.name in {g.name for g in fields(ModelConfig)}]
MOE_KEYS = ("num_experts", "num_experts_per_tok", "expert_intermediate_size", "gate_type")

# Peak dense bf16 tensor-core FLOP/s per GPU (no sparsity), from the vendors' data sheets: MFU's denominator.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                  "A10": 125e12, "L4": 121e12}
# A CPU core's fp32 peak: this machine is an AMD EPYC Zen 4 (avx512 on two 256-bit FMA pipes): 2 pipes x 8 fp32
# lanes x 2 FLOP (multiply + add) = 32 FLOP per cycle at ~3.0 GHz = 96 GFLOP/s per core (a 1-thread 2048x1024x1024
# fp32 matmul measured 88 GFLOP/s, best of 20). Per process: times its threads. Override with --peak_flops.
CPU_FLOPS_PER_CORE = 2 * 8 * 2 * 3.0e9

DEMO_MOE_HINT = ("the demo MoE is made by the README's pipeline: `python data/prepare.py`, "
                 "`python train.py config/demo_dense.py`, then `python split.py --src=out/demo_dense/final "
                 "--dst=out/demo_moe --num_experts=16 --top_k=4`")


# ----------------------------------------------------------------------------------------------------------
# 2. Values that cannot work are refused here, before a process group, a model or a file is touched.

def check_config(cfg):
    """What relates settings to each other (each setting's own range is declared in TrainConfig)."""
    need(not cfg.dynamic_weights or cfg.eval_interval > 0,
         "--dynamic_weights=True moves the domain weights at each evaluation, but --eval_interval=0 never "
         "evaluates: set --eval_interval (e.g. 20) or --dynamic_weights=False")
    need(not cfg.distill_alpha or cfg.distill_from,
         f"--distill_alpha={cfg.distill_alpha} needs --distill_from=<the dense parent's folder or .gguf>")
    need(not cfg.distill_from or cfg.distill_alpha > 0,
         "--distill_from is set but --distill_alpha=0: give the KL a weight, e.g. --distill_alpha=0.5")


# ----------------------------------------------------------------------------------------------------------
# 3. The model: which config, where the weights come from, how it is spread over ranks.

def scratch_config(cfg, meta):
    """The demo's dense base (or an MoE for throughput runs), from the ModelConfig keys of TrainConfig."""
    keys = {k: getattr(cfg, k) for k in MODEL_KEYS if cfg.num_experts or k not in MOE_KEYS}
    keys["vocab_size"] = cfg.vocab_size or meta["vocab_size"]
    with user_input("the scratch model's settings"):
        return ModelConfig(**keys, max_position_embeddings=cfg.seq_len, bos_token_id=meta.get("bos_id"),
                           eos_token_id=meta.get("eos_id"))


def active_params(mc):
    """Parameters one token passes through (SPEC.md section 2: k of E experts). The embedding is a lookup,
    not a matmul, so it is left out (as in the 6N rule); a tied lm_head still counts once as the head."""
    d, hd, L = mc.hidden_size, mc.head_dim, mc.num_hidden_layers
    attn = d * hd * (2 * mc.num_attention_heads + 2 * mc.num_key_value_heads) + 2 * d  # q,o + k,v + 2 norms
    if mc.is_moe:
        E, k = mc.num_experts, mc.num_experts_per_tok
        gate = d * E + (E * E if mc.gate_type == "mlp" else 0) + d * E  # router + noise projection
        ffn = sum(gate + k * 3 * d * w + 3 * d * mc.shared_intermediate_size
                  for w in mc.layer_list("expert_intermediate_size"))
    else:
        ffn = L * 3 * d * mc.intermediate_size
    return L * attn + ffn + d + mc.vocab_size * d  # final norm + lm_head


def flops_per_token(mc, seq_len):
    """Training FLOPs per token: 6 per active weight (2 forward + 4 backward), plus attention's own
    QK^T and AV products, 12 * layers * heads * head_dim * seq_len (PaLM, appendix B). Recomputation by
    activation checkpointing is not counted: that is model FLOPs utilisation, not hardware."""
    return 6 * active_params(mc) + 12 * mc.num_hidden_layers * mc.num_attention_heads * mc.head_dim * seq_len


def peak_flops(cfg, d):
    if cfg.peak_flops:
        return cfg.peak_flops
    if d.device.type == "cuda":  # ordered: "H100 PCIe" before "H100"; an unknown GPU: nan until --peak_flops
        name = torch.cuda.get_device_name(d.device)
        return next((value for key, value in GPU_PEAK_FLOPS.items() if key in name), float("nan"))
    return CPU_FLOPS_PER_CORE * torch.get_num_threads()


def build_model(cfg, d, mc, weights_path):
    """-> (model to call in training, the Transformer inside it). weights_path None = fresh init (seeded)."""
    def full_weights():
        if weights_path is None:
            torch.manual_seed(cfg.seed)  # every rank draws the same initial weights
            return Transformer(mc)
        with user_input(weights_path):
            return checkpoint.load_pretrained(weights_path, dtype=torch.float32)  # fp32 master weights

    fsdp = cfg.parallel == "fsdp" and d.distributed
    if fsdp:
        # FSDP2: every rank builds the model on the meta device (no memory), shards it, and only rank 0
        # holds a full copy, which it broadcasts shard by shard. Peak host memory: one model, on rank 0.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = together(d, d.master, lambda: full_weights().state_dict(), f"rank 0 could not load {weights_path}") or {}
        with torch.device("meta"):
            model = Transformer(mc)
    else:
        model = full_weights().to(d.device)
    model.train()
    for block in model.model.layers:
        if cfg.activation_checkpointing:  # keep only the block's input, recompute the inside in backward; a new
            # forward on the instance keeps the parameter names (no wrapper module in the state dict)
            block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=False)
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
# 4. Optimizer and learning-rate schedule (SPEC.md section 5)

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
# 5. Data streams. The global batch is n_streams micro-batches; micro-batch slot s always reads stream s,
#    DomainSampler(rank=s, world_size=n_streams), and its gate noise is seeded by (seed, step, s). Rank r
#    runs slots r*accum ... r*accum + accum-1. So the batch does not depend on how the slots are laid out:
#    1 process x 2 accumulation steps sees exactly what 2 ranks x 1 step see (the DDP/FSDP tests rely on
#    it), and a run may resume on a different number of ranks with the same global and micro batch.

def batch_layout(cfg, world):
    per_forward = cfg.micro_batch * cfg.seq_len
    unit = per_forward * world
    if cfg.global_batch_tokens % unit:
        raise UserError(f"global_batch_tokens={cfg.global_batch_tokens} does not divide into micro-batches: it must be "
                        f"a multiple of micro_batch * seq_len * world_size = {cfg.micro_batch} * {cfg.seq_len} * "
                        f"{world} = {unit} (gradient accumulation takes the rest); e.g. "
                        f"--global_batch_tokens={max(1, round(cfg.global_batch_tokens / unit)) * unit}")
    n_streams = cfg.global_batch_tokens // per_forward
    return n_streams, n_streams // world  # (slots per optimizer step, accumulation steps per rank)


def make_streams(cfg, d, n_streams, accum):
    """This rank's streams; the validation windows are read once here too, so bad data stops the run now."""
    first = d.rank * accum
    with user_input("the data (--data_dir, --weights, --seq_len)"):
        streams = [DomainSampler(cfg.data_dir, "train", cfg.micro_batch, cfg.seq_len, cfg.weights,
                                 dynamic=cfg.dynamic_weights, reference_losses=cfg.reference_losses, seed=cfg.seed,
                                 rank=s, world_size=n_streams) for s in range(first, first + accum)]
        for domain in streams[0].domains if cfg.eval_interval else ():
            next(iter(eval_windows(cfg.data_dir, domain, cfg.seq_len, cfg.micro_batch, cfg.eval_windows)), None)
    return streams


def noise_seed(seed, step, slot):
    """One seed per (run, step, micro-batch slot): the gate's noise (SPEC.md section 3) is the same whichever
    rank runs the slot, and after a resume."""
    return int(np.random.SeedSequence([seed, step, slot]).generate_state(1, np.uint64)[0])


# ----------------------------------------------------------------------------------------------------------
# 6. Evaluation: per-domain validation loss (clean routing, no noise), and the load of each expert

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
                logits = model(x).logits                                 # (b, S, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            if i < len(mine):
                total += torch.stack([loss.double(), torch.tensor(y.numel(), dtype=torch.float64, device=d.device)])
        all_reduce(total, d)
        losses[domain] = (total[0] / total[1]).item()
    model.train()
    return losses


# ----------------------------------------------------------------------------------------------------------
# 7. Distillation from the dense parent (beyond the paper): the split MoE also learns to match the parent's next-token
#    distribution on the same tokens, loss = lm + balance + alpha * T^2 * KL(p_parent || p_student) at temperature
#    T (Hinton et al. 2015; T^2 keeps the gradient's scale independent of T). The parent runs in eval mode without
#    gradients, under the same autocast, as a plain module on every rank (never wrapped by DDP/FSDP: it has nothing
#    to synchronise). Its head is applied KL_CHUNK positions at a time, and each slice's softmaxes are recomputed in
#    backward rather than kept, so the extra memory is one slice's (b, KL_CHUNK, vocab), not (b, S, vocab) twice more.

KL_CHUNK = 128


def load_parent(cfg, d, mc):
    """-> kl(x, logits): distill_kl of the student's logits (b, S, vocab) against the parent on the same tokens x."""
    with user_input(f"--distill_from={cfg.distill_from}"):
        parent = checkpoint.load_pretrained(cfg.distill_from, dtype=compute_dtype(cfg, d), device=d.device)
    pc = parent.config
    if pc.vocab_size != mc.vocab_size:
        raise UserError(f"--distill_from={cfg.distill_from} has a vocabulary of {pc.vocab_size} ids, the model "
                        f"{mc.vocab_size}: distil from the parent the model was split from")
    if cfg.seq_len > pc.max_position_embeddings:
        raise UserError(f"--seq_len={cfg.seq_len} exceeds the parent's max_position_embeddings "
                        f"{pc.max_position_embeddings} (--distill_from={cfg.distill_from})")
    with user_input(f"--distill_from={cfg.distill_from}"):
        check_same_tokenizer({"the data and model": mc.tokenizer_sha256, "the parent": pc.tokenizer_sha256},
                             "distil from the parent the model was split from")
    parent.requires_grad_(False).eval()
    head = parent.lm_head.weight
    parent.lm_head = torch.nn.Identity()  # forward's logits are now (b, S, d); distill_kl applies the head per slice

    def kl(x, logits):
        with torch.no_grad():
            hidden = parent(x).logits                                    # (b, S, d)
        return distill_kl(logits, hidden, head, cfg.distill_temperature)
    return kl


def kl_slice(student_logits, parent_hidden, head, temperature):
    """Summed KL(p_parent || p_student) over one slice of positions."""
    parent_logp = F.log_softmax((parent_hidden @ head.T).float() / temperature, dim=-1)   # (b, c, vocab)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)            # (b, c, vocab)
    return (parent_logp.exp() * (parent_logp - student_logp)).sum()


def distill_kl(logits, parent_hidden, head, temperature=1.0, chunk=KL_CHUNK):
    """T^2 * mean over positions of KL(p_parent || p_student): logits (b, S, vocab) of the student,
    parent_hidden (b, S, d) the parent's final hidden states, head (vocab, d) its lm_head weight."""
    b, S, _ = logits.shape
    total = 0.0
    for i in range(0, S, chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            kl_slice, logits[:, i:i + chunk], parent_hidden[:, i:i + chunk], head, temperature, use_reentrant=False)
    return total * temperature ** 2 / (b * S)


# ----------------------------------------------------------------------------------------------------------
# 8. The training loop

STOP = {"signal": None}


def request_stop(signum, frame):
    """SIGTERM / SIGINT: finish the current step, checkpoint, exit. A second Ctrl-C interrupts at once."""
    STOP["signal"] = signum
    signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "?"
    h, m, s = int(seconds) // 3600, int(seconds) // 60 % 60, int(seconds) % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def evaluate_and_log(cfg, d, step, model, streams, autocast, load_counts, log):
    val = evaluate(cfg, d, model, streams[0].domains, autocast)
    counts = all_reduce(load_counts.clone(), d)
    load_counts.zero_()
    shares = counts.double() / counts.sum(1, keepdim=True).clamp(min=1)  # (layers, E); an even router: 1/E each
    loads = [(float(s.min()), float(s.max())) for s in shares] if counts.numel() and counts.sum() > 0 else []
    # Dynamic weights move only on the eval_interval grid, never at a run's last step: a run stopped at
    # any step and resumed must see the same weights as one that went straight through.
    if cfg.dynamic_weights and step % cfg.eval_interval == 0:
        for s in streams:  # SPEC.md section 4: every stream applies the same all-reduced losses
            s.update_weights(val)
    mean = sum(val.values()) / len(val)
    text = (f"[eval] step {step} | val loss {mean:.4f} | " + " ".join(f"{k} {v:.3f}" for k, v in val.items())
            + "\n[eval] weights " + " ".join(f"{k} {v:.3f}" for k, v in streams[0].weights.items()))
    if loads:
        text += (f"\n[eval] expert load min/max share per layer (even = {1 / counts.shape[1]:.3f}): "
                 + " ".join(f"L{i} {lo:.3f}/{hi:.3f}" for i, (lo, hi) in enumerate(loads)))
    log(text, dict(kind="eval", step=step, val_loss=val, mean_val_loss=mean, weights=streams[0].weights,
                   expert_load_min_max=loads))


def train(cfg):
    """Set up the ranks, take out_dir's lock (rank 0), run; always release both, also on errors."""
    d = setup_distributed(cfg)
    lock = None
    try:
        lock = together(d, d.master, lambda: train_state.acquire_lock(cfg.out_dir),
                        f"rank 0 could not lock {cfg.out_dir!r}")
        result = run(cfg, d)
        if d.distributed:
            # Every rank done before any tears its process group down: a rank that destroyed gloo while
            # another still used it aborted at exit now and then ("terminate called without an active
            # exception", SIGABRT) after a complete run.
            dist.barrier()
        return result
    finally:
        train_state.release_lock(lock)
        if d.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, d):
    # --- everything the run reads, checked before anything in out_dir changes (train_state.py) ---
    with user_input(f"--data_dir={cfg.data_dir}"):
        meta = load_meta(cfg.data_dir)
    n_streams, accum = batch_layout(cfg, d.world)
    start = resolve_start(cfg, meta, n_streams, scratch_config,
                          DEMO_MOE_HINT if cfg.init_from == TrainConfig.init_from else "")
    mc = start.config
    streams = make_streams(cfg, d, n_streams, accum)
    model, raw = build_model(cfg, d, mc, start.weights)
    optimizer = make_optimizer(cfg, model)
    fsdp = cfg.parallel == "fsdp" and d.distributed
    if start.resume_from:
        with user_input(start.resume_from):
            load_training_state(start, d, model, raw, optimizer, streams, fsdp)
    parent_kl = load_parent(cfg, d, mc) if cfg.distill_from else None
    commit_start(cfg, d, start)  # only now: delete an overwritten run / cut the log back to the checkpoint

    dtype = compute_dtype(cfg, d)
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 and not fsdp
                else contextlib.nullcontext())  # FSDP2 casts through its MixedPrecisionPolicy instead
    eval_model = raw if not fsdp else model  # DDP's wrapper is for backward only; FSDP must be called
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    tokens_per_step = cfg.global_batch_tokens
    flops_step = flops_per_token(mc, cfg.seq_len) * tokens_per_step
    peak = peak_flops(cfg, d) * d.world
    moe_layers = [b.mlp for b in raw.model.layers if isinstance(b.mlp, MoEFeedForward)]
    load_counts = torch.zeros(len(moe_layers), mc.num_experts, dtype=torch.int64, device=d.device)
    log_counts = torch.zeros_like(load_counts)     # (L, E) this rank's routed tokens since the last log line
    step_counts = torch.zeros_like(load_counts)    # (L, E) this rank's routed tokens in the current step
    balance_loss_on, bias_on = cfg.balance in ("loss", "both"), cfg.balance in ("bias", "both")
    run_state = dict(init_from=start.init_from, n_streams=n_streams, seq_len=cfg.seq_len, world_size=d.world,
                     config=asdict(cfg))
    log = Log(d, os.path.join(cfg.out_dir, "log.jsonl"))
    of_total = f" of {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M" if not fsdp else ""
    log(f"[train] {'resuming ' + start.resume_from if start.resume_from else 'model from ' + start.init_from}: "
        f"{'MoE ' + str(mc.num_experts) + ' experts, top-' + str(mc.num_experts_per_tok) if mc.is_moe else 'dense'}, "
        f"{mc.num_hidden_layers} layers, d={mc.hidden_size}; active params {active_params(mc) / 1e6:.2f}M"
        + of_total + (f"; distilling from {cfg.distill_from}" if parent_kl else ""),
        dict(kind="run", world_size=d.world, accum=accum, n_streams=n_streams, start_step=start.step,
             active_params=active_params(mc), flops_per_token=flops_step / tokens_per_step, peak_flops=peak,
             config=asdict(cfg), model=asdict(mc)))
    log(f"[train] {d.world} rank(s) on {d.device.type} ({cfg.parallel if d.distributed else 'one process'}), "
        f"{cfg.micro_batch} x {cfg.seq_len} tokens x {accum} accumulation x {d.world} = {tokens_per_step:,} "
        f"tokens/step; steps {start.step} -> {cfg.max_steps}; domains {streams[0].domains}")
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    STOP["signal"] = None

    step, exit_code, ckpt, losses, window, train_s = start.step, 0, start.resume_from, [], [0.0, 0], 0.0
    try:
        if cfg.eval_interval and step == 0:
            evaluate_and_log(cfg, d, 0, eval_model, streams, autocast, load_counts, log)
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = get_lr(step, cfg.learning_rate, cfg.warmup_steps, decay_steps, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = torch.zeros(5, dtype=torch.float64, device=d.device)  # sums of lm, balance, kl; SIGINT, SIGTERM
            step_counts.zero_()
            for micro in range(accum):
                x, y, _ = streams[micro].next_batch()
                x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                torch.manual_seed(noise_seed(cfg.seed, step, streams[micro].rank))  # the gate's noise
                last = micro == accum - 1
                if fsdp:  # average gradients across ranks once per step, on the last micro-batch
                    model.set_requires_gradient_sync(last)
                with model.no_sync() if d.distributed and not fsdp and not last else contextlib.nullcontext():
                    with autocast:
                        out = model(x, y)                                # model.ModelOutput
                        logits, lm_loss = out.logits, out.loss
                        kl = parent_kl(x, logits) if parent_kl else lm_loss.new_zeros(())
                        # LM loss + the MoE balance loss (SPEC.md section 3) + the parent's distribution (section 7)
                        loss = lm_loss + balance_loss_on * out.balance_loss + cfg.distill_alpha * kl
                    (loss / accum).backward()  # DDP/FSDP average over ranks: together, the global batch mean
                stats[:3] += torch.stack([lm_loss.detach(), out.balance_loss.detach(), kl.detach()]).double()
                for i, gate in enumerate(out.routing):  # one GateOutput per MoE layer
                    step_counts[i] += gate.counts
            stats[3], stats[4] = STOP["signal"] == signal.SIGINT, STOP["signal"] == signal.SIGTERM
            lm, balance, kl = (all_reduce(stats, d)[:3] / n_streams).tolist()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
            check_finite(cfg, step, lm + balance + kl, norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            load_counts += step_counts
            log_counts += step_counts
            if bias_on and moe_layers:  # loss-free balancing: every rank moves its biases by the same summed counts
                for m, c in zip(moe_layers, all_reduce(step_counts.clone(), d)):
                    update_bias(m.gate, c, cfg.bias_rate)
            step += 1
            if d.device.type == "cuda":
                torch.cuda.synchronize()
            window[0] += time.perf_counter() - t0
            window[1] += 1
            train_s += time.perf_counter() - t0
            losses.append(lm)

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                step_time = window[0] / window[1]
                tok_s, mfu = tokens_per_step / step_time, flops_step / step_time / peak
                # Per layer: experts with >= 1% of the routed tokens, and the busiest expert's share (gate.py)
                evenness = [routing_evenness(c) for c in all_reduce(log_counts.clone(), d)] if moe_layers else []
                log_counts.zero_()
                log(f"step {step}/{cfg.max_steps} | loss {lm:.4f} | balance {balance:.4f}"
                    + (f" | kl {kl:.4f}" if parent_kl else "") + f" | lr {lr:.2e} | grad norm {norm:.3f} | "
                    f"{tok_s:,.0f} tok/s | MFU {100 * mfu:.2f}% | ETA {format_eta((cfg.max_steps - step) * step_time)}"
                    + (f" | experts in use >= {min(n for n, _ in evenness)}/{mc.num_experts}, busiest share <= "
                       f"{max(b for _, b in evenness):.3f}" if evenness else ""),
                    dict(kind="train", step=step, loss=lm, balance_loss=balance, **(dict(kl=kl) if parent_kl else {}),
                         experts_in_use=[n for n, _ in evenness], busiest_share=[b for _, b in evenness],
                         lr=lr, grad_norm=norm, tokens=step * tokens_per_step, tokens_per_s=tok_s, mfu=mfu,
                         step_time_s=step_time, train_s=train_s))
                window = [0.0, 0]
            if cfg.eval_interval and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
                evaluate_and_log(cfg, d, step, eval_model, streams, autocast, load_counts, log)
            stop = stats[3] > 0 or stats[4] > 0
            if stop or step == cfg.max_steps or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0):
                ckpt = save_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state)
                log(f"[checkpoint] {ckpt}")
            if stop:
                exit_code = 130 if stats[3] > 0 else 0
                log(f"[train] stopped by {'SIGINT' if exit_code else 'SIGTERM'} after step {step}; "
                    f"continue with --resume (checkpoint {ckpt})")
                break
        if step == cfg.max_steps and cfg.export and exit_code == 0:
            export(cfg, d, model, raw)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        log.close()
    return dict(losses=losses, step=step, exit_code=exit_code, checkpoint=ckpt)


def config_from_args(argv):
    """TrainConfig from config files and --key=value (configurator.py); --resume = --init_from=resume."""
    cfg = load_config(TrainConfig(), argv, doc=__doc__, aliases={"resume": ("init_from", "resume")})
    check_config(cfg)
    return cfg


def main(argv=None):
    return train(config_from_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(run_cli(main)["exit_code"])
