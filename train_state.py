"""
Chapter: a training run's state on disk. What train.py's loop needs before its first step and at each
checkpoint, kept out of the loop so that the loop reads straight through.

out_dir/ holds one run:
    train.lock          who is writing here (PID@host); a second run into the same out_dir is refused
    log.jsonl           one json record per log line (kind: run | train | eval)
    ckpt_NNNNNNN/       the last `keep_checkpoints` checkpoints: model/ (save_pretrained: HF llama or native
                        MoE), optimizer.pt (full state, keys are parameter names), rank{r}.pt (that rank's
                        sampler streams + RNG states), state.json (step, settings)
    final/, final_mixtral/   the exported model at the end

Read top to bottom:
  0. the ranks        - torchrun's environment -> rank, world, device; gloo on CPU, nccl on GPU
  1. the lock         - one run per out_dir; a dead process's lock is taken over
  2. where to start   - resolve_start: scratch / a model folder / resume, every input checked, nothing touched;
                        commit_start: only then delete an overwritten run, or cut the log back to the checkpoint
  3. checkpoints      - save (atomic folder, keep the last K), load (optimizer, streams, RNG)
  4. outputs          - log.jsonl, the stop on a non-finite loss or gradient, the final export
"""
import contextlib
import datetime
import json
import math
import os
import pickle
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from configurator import UserError
from fileio import atomic_write, clean_stale_temporaries, fsync_tree, is_inside, pid_alive, replace_dir
from checkpoint import config_from_hf
from gguf_file import model_arch as gguf_arch
from model import ModelConfig, Transformer
from tokenizer import Tokenizer, check_same_tokenizer

CKPT_RE = re.compile(r"ckpt_(\d{7})$")
TMP_RE = re.compile(r"^(.+)\.(?:tmp|old)\d+$")
RUN_FILES = ("final", "final_mixtral", "final.gguf", "log.jsonl")  # besides ckpt_*: what a fresh run replaces
LOCK = "train.lock"


# ----------------------------------------------------------------------------------------------------------
# 0. The ranks. torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/PORT via its rendezvous);
#    without them this is one plain process.

@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool
    pid0: int  # rank 0's process id: names the checkpoint temporaries every rank writes into

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
        raise UserError("--device=cuda but torch sees no GPU: use --device=cpu (or auto)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    pid0 = torch.tensor([os.getpid() if rank == 0 else 0], device=device)
    if distributed and not dist.is_initialized():
        # nccl moves GPU tensors between GPUs; gloo is the CPU backend (tests, and this 2-core demo).
        # A long timeout: rank 0 alone writes a full checkpoint while the others wait at a barrier.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    d = Dist(rank, world, local_rank, device, distributed, 0)
    d.pid0 = int(all_reduce(pid0, d))
    return d


def all_reduce(t, d, op=None):
    if d.distributed:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def agree(ok, d):
    """True on every rank if `ok` is true on every rank (for decisions one rank makes, e.g. the lock)."""
    return bool(all_reduce(torch.tensor([0 if ok else 1], device=d.device), d).item() == 0)


def together(d, here, fn, failed):
    """fn() on the ranks where `here` is true (rank 0, say) -> its result, None elsewhere. A UserError there
    stops every rank, not only that one (the others would wait for it at the next collective): they raise
    "{failed} (its message says why)"."""
    result, error = None, None
    if here:
        try:
            result = fn()
        except UserError as e:
            error = e
    if not agree(error is None, d):
        raise error or UserError(f"{failed} (its message says why)")
    return result


def barrier(d):
    if d.distributed:
        dist.barrier()


def checkpoints(out_dir):
    """out_dir's checkpoint folders, oldest first (temporaries `ckpt_N.tmp<PID>` never match)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if CKPT_RE.match(n)]


def latest_checkpoint(out_dir):
    found = checkpoints(out_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------
# 1. The lock: two runs writing one out_dir would interleave log.jsonl and delete each other's checkpoints.

def acquire_lock(out_dir):
    """Create out_dir/train.lock holding 'PID@host'. A lock of a dead process on this host is taken over;
    a live one (or one from another host, which we cannot check) is refused. -> the lock's path.
    The lock appears with its content (written beside it, then hard-linked into place, which fails if a lock
    exists), so an empty or unreadable lock was never a live one's: it is stale, e.g. left by a full disk."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out_dir={out_dir} is a file: pass a folder for the run's checkpoints and log")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    me = f"{os.getpid()}@{socket.gethostname()}"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        atomic_write(tmp, me + "\n")
        for _ in range(3):
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                pass
            try:
                with open(path) as f:
                    holder = f.read().strip()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except OSError:
                holder = ""
            pid, _, host = holder.partition("@")
            if not pid.isdigit() or (host == socket.gethostname() and not pid_alive(int(pid))):
                os.remove(path)  # empty, unreadable, or its process is gone: a stale lock
                continue
            raise UserError(f"{out_dir!r} is in use by another training run (process {holder}, lock file {path}): "
                            f"wait for it or pick another --out_dir; if that process is gone, delete the lock file")
    except OSError as e:
        raise UserError(f"cannot write the lock {path} ({e.strerror}): is the disk full or the folder "
                        f"read-only? Free space or pick another --out_dir") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    raise UserError(f"could not take the lock {path}: another run keeps creating it")


def release_lock(path):
    """Remove the lock; an out_dir that a refused run created and left empty goes too."""
    if path and os.path.exists(path):
        os.remove(path)
        try:
            os.rmdir(os.path.dirname(path))  # only succeeds when empty
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------
# 2. Where the run starts. Everything is read and checked here; nothing in out_dir changes until
#    commit_start, which train.py calls once the model, data and optimizer are built.

SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
                "expert_intermediate_size", "shared_intermediate_size", "gate_type")


@dataclass
class Start:
    init_from: str                 # "scratch" or the model folder the run began from (also after a resume)
    weights: str | None            # the folder to load weights from now; None: a fresh, seeded init
    config: ModelConfig
    resume_from: str | None = None
    step: int = 0
    saved_world: int = 1           # ranks that wrote the checkpoint's rank files
    clear: list = field(default_factory=list)  # an overwritten run's files, deleted by commit_start


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid json ({e}): {what}") from None


def folder_config(path, hint=""):
    """The ModelConfig of a checkpoint folder, with the fix in the message when it is not one."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path!r} is not a checkpoint folder (no config.json): use 'scratch', 'resume' or a "
                        f"folder with config.json + safetensors" + (f"; {hint}" if hint else ""))
    cfg_path = os.path.join(path, "config.json")
    try:
        return config_from_hf(read_json(cfg_path, "the checkpoint is damaged"), cfg_path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_path}: {e}") from None


def shape_mismatch(a, b):
    names = SHAPE_FIELDS + (() if a.is_moe else ("intermediate_size",))
    return [f"{k}: checkpoint {getattr(a, k)!r}, this run {getattr(b, k)!r}" for k in names
            if getattr(a, k) != getattr(b, k)]


def resolve_start(cfg, meta, n_streams, scratch_config, hint=""):
    """Decide where the run starts and check every input against every other; raise UserError on the first
    problem. Reads only. `scratch_config(cfg, meta)` builds the config of a model from scratch."""
    init_from, start = cfg.init_from, None
    if init_from == "resume":
        ckpt = latest_checkpoint(cfg.out_dir)
        if ckpt is None:
            raise UserError(f"--init_from=resume but {cfg.out_dir!r} holds no checkpoint (ckpt_NNNNNNN/): start "
                            f"the run with --init_from=scratch or a model folder, or point --out_dir at the run")
        state = read_json(os.path.join(ckpt, "state.json"), "the checkpoint is incomplete; delete it to resume "
                                                            "from the one before")
        missing = {"step", "init_from", "n_streams", "seq_len", "world_size"} - set(state)
        if missing:
            raise UserError(f"{ckpt}/state.json lacks {sorted(missing)}: the checkpoint is damaged; delete it to "
                            f"resume from the one before")
        if state["n_streams"] != n_streams or state["seq_len"] != cfg.seq_len:
            raise UserError(f"{ckpt} was written with {state['n_streams']} micro-batches of {state['seq_len']} "
                            f"tokens per step; this run has {n_streams} of {cfg.seq_len}: keep "
                            f"global_batch_tokens, micro_batch and seq_len as they were to continue exactly")
        if cfg.max_steps <= state["step"]:
            raise UserError(f"--max_steps={cfg.max_steps} but {ckpt} is already at step {state['step']}: "
                            f"nothing to do; raise --max_steps to train further")
        init_from = state["init_from"]
        start = Start(init_from, os.path.join(ckpt, "model"), folder_config(os.path.join(ckpt, "model")),
                      ckpt, state["step"], state["world_size"])
    else:
        found = checkpoints(cfg.out_dir) + [os.path.join(cfg.out_dir, n) for n in RUN_FILES
                                            if os.path.exists(os.path.join(cfg.out_dir, n))]
        if found and not cfg.overwrite:
            raise UserError(f"{cfg.out_dir!r} holds an earlier run ({', '.join(map(os.path.basename, found))}): "
                            f"--resume continues it, --overwrite=True starts over (deleting them), or pick "
                            f"another --out_dir")
        for path in found:  # --overwrite must never delete what this run reads
            for key in ("init_from", "distill_from", "data_dir"):
                value = getattr(cfg, key, None)
                if value and value != "scratch" and is_inside(value, path):
                    raise UserError(f"--{key}={value} lies inside {path}, which --overwrite=True would delete: "
                                    f"copy it out of --out_dir first, or pick another --out_dir")
        start = Start(init_from, None if init_from == "scratch" else init_from, None, clear=found)

    # The model the run began from: the scratch settings or the folder's config.json.
    if init_from == "scratch":
        mc = scratch_config(cfg, meta)
    elif start.resume_from and not os.path.isdir(init_from):
        mc = None  # the run's starting folder is gone: the checkpoint alone defines the model
    else:
        mc = folder_config(init_from, hint)
        if cfg.num_experts and cfg.num_experts != mc.num_experts:
            kind = f"an MoE of {mc.num_experts} experts" if mc.is_moe else "a dense model"
            raise UserError(f"--num_experts={cfg.num_experts}, but --init_from={init_from} is {kind}, which the "
                            f"run would train unchanged: make the MoE with split.py (python split.py --src="
                            f"{init_from} --dst=DST --num_experts={cfg.num_experts} ...) and start from DST, "
                            f"or drop --num_experts")
    if start.resume_from:
        problems = shape_mismatch(start.config, mc) if mc else []
        if problems:
            raise UserError(f"cannot resume: {start.resume_from} holds a model of a different shape ("
                            + "; ".join(problems) + "): use the settings of that run, or another out_dir")
    else:
        start.config = mc
    mc = start.config

    data_meta = os.path.join(cfg.data_dir, "meta.json")
    if meta["vocab_size"] > mc.vocab_size:
        raise UserError(f"the data's vocabulary ({meta['vocab_size']} ids, {data_meta}) is larger than the "
                        f"model's ({mc.vocab_size}): tokenize the data with the model's tokenizer")
    if cfg.seq_len > mc.max_position_embeddings:
        raise UserError(f"--seq_len={cfg.seq_len} exceeds the model's max_position_embeddings "
                        f"{mc.max_position_embeddings}: lower --seq_len")
    data_tok = meta.get("tokenizer_sha256")  # absent in datasets made before it was recorded: not checked
    where = start.weights or init_from
    try:
        check_same_tokenizer({f"the model ({where}/config.json)": mc.tokenizer_sha256,
                              f"the data ({data_meta})": data_tok},
                             f"prepare the data with the model's tokenizer (data/prepare.py --tokenizer={where})")
    except ValueError as e:
        raise UserError(str(e)) from None
    if data_tok:
        mc.tokenizer_sha256 = data_tok  # every checkpoint of this run records the data's tokenizer
    return start


def commit_start(cfg, d, start):
    """The point of no return, after everything was checked and built: rank 0 deletes the run that
    --overwrite=True replaces, or, on a resume, cuts log.jsonl back to the checkpoint's step (the steps
    after it will be logged again), and removes temporaries that killed processes left behind."""
    barrier(d)  # every rank has read out_dir before anything in it changes
    together(d, d.master and start.clear, lambda: set_aside(cfg.out_dir, start.clear),
             f"rank 0 could not replace the earlier run in {cfg.out_dir!r}")
    if d.master:
        if start.resume_from:
            truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), start.step)
        for name in os.listdir(cfg.out_dir):
            m = TMP_RE.match(name)
            if m:
                clean_stale_temporaries(os.path.join(cfg.out_dir, m.group(1)))
    barrier(d)


def set_aside(out_dir, paths):
    """--overwrite: move the earlier run's files into one temporary folder (renames, which do not depend on
    deleting anything), then delete that folder. A rename that fails puts the others back and leaves the old
    run whole and raises UserError. Whatever cannot be deleted stays in the temporary folder,
    which the next run removes as a dead process's leftover."""
    trash, moved, path = os.path.join(out_dir, f"replaced.tmp{os.getpid()}"), [], out_dir
    try:
        os.makedirs(trash, exist_ok=True)
        for path in paths:
            os.replace(path, os.path.join(trash, os.path.basename(path)))
            moved.append(path)
    except OSError as e:
        for path in reversed(moved):
            os.replace(os.path.join(trash, os.path.basename(path)), path)
        shutil.rmtree(trash, ignore_errors=True)
        raise UserError(f"--overwrite=True could not move {path} aside ({e.strerror}); the earlier run is left "
                        f"whole: fix the permissions or pick another --out_dir") from None
    shutil.rmtree(trash, ignore_errors=True)


def truncate_log(path, step):
    """Drop the train/eval records after `step` (a resumed run logs those steps again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if record.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        atomic_write(path, "".join(keep))


# ----------------------------------------------------------------------------------------------------------
# 3. Checkpoints: written into ckpt_NNNNNNN.tmp<PID> and renamed when complete (a rename is atomic, so a
#    crash at any moment leaves the previous checkpoints whole); only then are the oldest beyond K deleted.
#    Under FSDP2 the model and optimizer are gathered to rank 0 as full state dicts (our choice over sharded
#    DCP: the checkpoint stays a plain HF folder that any script can read, and a run can resume with another
#    world size or parallel mode; the price is one full copy in rank 0's host memory while saving).

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


def pause_for_tests(step):
    """Test hook: TRAIN_TEST_CHECKPOINT_PAUSE=STEP:SECONDS stalls rank 0 halfway through writing checkpoint
    STEP, so that tests can kill -9 it mid-write. Unset in normal runs."""
    spec = os.environ.get("TRAIN_TEST_CHECKPOINT_PAUSE")
    return float(spec.split(":")[1]) if spec and int(spec.split(":")[0]) == step else 0.0


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


def save_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state):
    """Write ckpt_NNNNNNN atomically; a failed write (a full disk) leaves no temporary folder behind and
    becomes one line: the earlier checkpoints are whole, so --resume works once space is freed."""
    final = os.path.join(cfg.out_dir, f"ckpt_{step:07d}")
    tmp = f"{final}.tmp{d.pid0}"  # rank 0's PID on every rank: all write into one folder
    try:
        return write_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state, final, tmp)
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk is an OSError, or from torch.save a RuntimeError ("... unexpected pos ...", "file write failed")
        if not isinstance(e, OSError) and not any(w in str(e) for w in ("unexpected pos", "write failed")):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"writing checkpoint {final} failed ({first}): is the disk full? Free space, then --resume "
                        f"continues from the last complete checkpoint") from None


def write_checkpoint(cfg, d, step, model, raw, optimizer, streams, run_state, final, tmp):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(d)
    full = gather_model(model, raw, d)
    optim = get_optimizer_state_dict(model if isinstance(model, Transformer) else raw, optimizer,
                                     options=full_state_options(cpu_offload=True))
    torch.save({"streams": {s.rank: s.state_dict() for s in streams}, "rng": rng_states()},
               os.path.join(tmp, f"rank{d.rank}.pt"))
    if d.master:
        checkpoint.save_pretrained(full, os.path.join(tmp, "model"), tokenizer=data_tokenizer(cfg))
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
        replace_dir(tmp, final)  # the commit point
        for old in checkpoints(cfg.out_dir)[:-cfg.keep_checkpoints]:  # keep the last K
            shutil.rmtree(old, ignore_errors=True)
    barrier(d)
    return final


def load_file(path, **kw):
    try:
        return torch.load(path, map_location="cpu", **kw)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} cannot be read ({str(e).splitlines()[0]}): the checkpoint is damaged; delete "
                        f"its folder to resume from the one before") from None


def load_training_state(start, d, model, raw, optimizer, streams, fsdp):
    """Optimizer, sampler streams and RNG states from a checkpoint (the model was built from ckpt/model)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    ckpt = start.resume_from
    # Under FSDP only rank 0 reads the optimizer file and broadcasts; otherwise each rank reads it.
    optim = together(d, d.master or not fsdp, lambda: load_file(os.path.join(ckpt, "optimizer.pt")),
                     f"{ckpt}/optimizer.pt cannot be read on rank 0") or {}
    set_optimizer_state_dict(model if isinstance(model, Transformer) else raw, optimizer, optim,
                             options=full_state_options(broadcast_from_rank0=fsdp))
    # Streams are numbered by micro-batch slot, not by rank: find ours in whichever rank file holds them.
    wanted = {s.rank: s for s in streams}
    for r in range(start.saved_world):
        # our own files (numpy RNG state inside), so not restricted to weights_only
        saved = load_file(os.path.join(ckpt, f"rank{r}.pt"), weights_only=False)
        for slot, state in saved["streams"].items():
            if slot in wanted:
                wanted.pop(slot).load_state_dict(state)
        if r == d.rank and start.saved_world == d.world:
            set_rng_states(saved["rng"])
    if wanted:
        raise UserError(f"{ckpt}: no saved state for data streams {sorted(wanted)}; the checkpoint is "
                        f"incomplete: delete it to resume from the one before")


# ----------------------------------------------------------------------------------------------------------
# 4. The run's other outputs: the log, the stop on divergence, and the exported model.

class Log:
    """Rank 0 prints each line and appends its record to out_dir/log.jsonl."""
    def __init__(self, d, path):
        self.jsonl = open(path, "a") if d.master else None

    def __call__(self, text, record=None):
        if self.jsonl is None:
            return
        print(text, flush=True)
        if record is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def close(self):
        if self.jsonl is not None:
            self.jsonl.close()


class Diverged(UserError, FloatingPointError):
    """A non-finite loss or gradient norm: stop before the update spoils the weights."""


def check_finite(cfg, step, loss, norm):
    if math.isfinite(loss) and math.isfinite(norm):
        return
    which = "loss" if not math.isfinite(loss) else "grad norm"
    kept = [os.path.basename(c) for c in checkpoints(cfg.out_dir)]
    raise Diverged(f"non-finite {which} at step {step + 1} (loss {loss}, grad norm {norm}): stopped before the "
                   f"update; checkpoints kept in {cfg.out_dir}: {', '.join(kept) or 'none (none was saved)'} - "
                   f"--resume continues the newest (delete it to go back further) with a lower learning_rate, "
                   f"or check the data")


_TOKENIZERS = {}


def data_tokenizer(cfg):
    """The tokenizer the data was prepared with (data/prepare.py writes it beside the shards), read once: every
    folder a run writes (checkpoints, final/) carries it. None, said once, when the data folder has none."""
    if cfg.data_dir not in _TOKENIZERS:
        try:
            _TOKENIZERS[cfg.data_dir] = Tokenizer(cfg.data_dir)
        except (OSError, ValueError) as err:
            _TOKENIZERS[cfg.data_dir] = None
            print(f"[export] no tokenizer in --data_dir={cfg.data_dir} ({err}): model folders hold no tokenizer",
                  flush=True)
    return _TOKENIZERS[cfg.data_dir]


def export(cfg, d, model, raw):
    """The trained model for other tools, each with the data's tokenizer: out_dir/final in Hugging Face format
    (dense -> llama, MoE -> our native format), out_dir/final_mixtral for MoE models Mixtral can express (SPEC.md
    section 3), and out_dir/final.gguf for llama.cpp when one of its graphs computes the model (gguf_file.py)."""
    full = gather_model(model, raw, d)
    if not d.master:
        return
    tok = data_tokenizer(cfg)
    final = os.path.join(cfg.out_dir, "final")
    checkpoint.save_pretrained(full, final, tokenizer=tok)
    print(f"[export] {final} ({'native MoE' if full.config.is_moe else 'llama'} format)", flush=True)
    if full.config.is_moe:
        try:
            checkpoint.save_pretrained(full, os.path.join(cfg.out_dir, "final_mixtral"), format="mixtral", tokenizer=tok)
            print(f"[export] {cfg.out_dir}/final_mixtral (Mixtral format, rescale factor folded into w2)", flush=True)
        except ValueError as err:  # e.g. an MLP gate or a shared block: checkpoint.export_config says which
            print(f"[export] Mixtral format skipped: {err}", flush=True)
    try:
        path = checkpoint.save_pretrained(full, os.path.join(cfg.out_dir, "final.gguf"), format="gguf", tokenizer=tok,
                                          overwrite=True)
        print(f"[export] {path} (GGUF for llama.cpp, {gguf_arch(full)[0]} architecture)", flush=True)
    except ValueError as err:  # routing no llama.cpp graph has, or no tokenizer: said, not written
        print(f"[export] GGUF skipped: {err}", flush=True)
