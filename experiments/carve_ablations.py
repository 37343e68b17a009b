"""
Experiment: carving vs splitting on a real parent, SmolLM2-135M-Instruct (carve.py; SPEC.md sections 2, 3, 5).
Not part of CI. Every number of RESULTS.md's section "Carving" is read from the run folders this script writes.

    python experiments/carve_ablations.py                         # every stage (~1.5 h on 2 idle cores)
    python experiments/carve_ablations.py --parts=split           # construction x router x weighting at the split
    python experiments/carve_ablations.py --report_only=True      # rewrite the RESULTS.md section from the folders
    python experiments/carve_ablations.py --dry_run=True          # print every stage's commands

Parts (a stage = a folder OUT/<part>/<name> with log.txt and done.json; a finished stage is skipped, so an
interrupted run continues where it stopped; delete a folder to redo it):
  split    split.py at the 16/4 budget (25% of the FFN active per token) with each construction x router init x
           weighting of SPLITS, then eval.py's validation loss and routing, no training
  cpt      continual pretraining (train.py, one process, CPT_STEPS x 2,048 tokens) of the runs in CPTS, then
           eval.py with the tasks and a greedy sample; recipes (lr, balancing) on the best construction
  control  the parent pruned to the MoE's active width (384 neurons, experiments/prune_ffn.py), trained the same

The parent is read from its GGUF; the data is the demo's corpus in its tokenizer (data/smollm2, demo.sh).
"""
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import UserError, load_config, run_cli  # noqa: E402
from fileio import atomic_write  # noqa: E402


@dataclass
class CarveExp:
    out: str = "runs/carve"
    parent: str = "data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
    data: str = "data/smollm2"
    results: str = "RESULTS.md"
    parts: str = "split,cpt,control"
    only: str = ""                     # comma-separated stage names to run (default: all of the parts)
    eval_items: int = 100              # questions per task after CPT (cloze, continuation, quiz)
    dry_run: bool = False
    report_only: bool = False


# The 16/4 budget: 384 of 1536 neurons per token. random/sharing: 16 experts of 96, 4 active.
# activation: 192 shared (2 experts' worth) + 14 routed experts of 96, 2 active (CMoE's S2A2E16).
R16 = "--num_experts=16 --top_k=4"
A14 = "--method=activation --num_experts=14 --top_k=2"
SPLITS = {  # name -> (split.py arguments, what it is); in the order they run
    "activation_fit": (f"{A14} --router_init=fit", "activation, fitted router, unit weights, W_down refitted"),
    "random": (f"--method=random {R16}", "IndependentRandom, random router, softmax x E/k (the paper)"),
    "activation_fit_norefit": (f"{A14} --router_init=fit --refit_down=False", "activation, fitted router, unit "
                               "weights, the parent's W_down"),
    "random_fit_refit": (f"--method=random {R16} --router_init=fit --refit_down=True",
                         "IndependentRandom, fitted router, softmax x E/k, W_down refitted"),
    "activation_fit_nonoise": (f"{A14} --router_init=fit --gate_noise=False", "activation_fit without the "
                               "training noise of the gate (the same weights)"),
    "activation_centroid": (f"{A14} --router_init=centroid", "activation, centroid router, unit, refitted"),
    "activation_random": (f"{A14} --router_init=random", "activation, random router, unit, refitted"),
    "activation_fit_softmax": (f"{A14} --router_init=fit --expert_weighting=softmax --scale=2",
                               "activation, fitted router, softmax x k, refitted"),
    "activation_fit_dense": (f"{A14} --router_init=fit --propagate=dense", "activation, fitted router, unit, "
                             "refitted, profiled on the dense parent's hidden states only"),
    "random_fit": (f"--method=random {R16} --router_init=fit", "IndependentRandom, fitted router, softmax x E/k"),
    "sharing_inter": (f"--method=sharing_inter {R16}", "SharingInter, random router, softmax x E/k"),
    "sharing_inter_fit_refit": (f"--method=sharing_inter {R16} --router_init=fit --refit_down=True",
                                "SharingInter, fitted router, softmax x E/k, refitted"),
}
CPT_STEPS = 30
CPT = ("--seq_len=256 --micro_batch=2 --global_batch_tokens=2048 --weights=uniform --eval_interval=0 "
       "--log_interval=5 --checkpoint_interval=0 --min_lr_ratio=0.1 --weight_decay=0.1")
RECIPE = "--learning_rate=2e-4 --warmup_steps=3"          # the LLaMA-MoE paper's peak lr, a 10% warm-up
CPTS = {  # name -> (split stage, train.py arguments, seed, what it is)
    "activation_fit": ("activation_fit", RECIPE, 0, "activation + fit, lr 2e-4, balance loss"),
    "random": ("random", RECIPE, 0, "random (the paper), lr 2e-4"),
    "activation_fit_lr1e-3": ("activation_fit", "--learning_rate=1e-3 --warmup_steps=3", 0,
                              "activation + fit, lr 1e-3"),
    "activation_fit_bias": ("activation_fit", RECIPE + " --balance=bias --bias_rate=1e-3", 0,
                            "activation + fit, loss-free bias balancing"),
    "activation_fit_both": ("activation_fit", RECIPE + " --balance=both --bias_rate=1e-3", 0,
                            "activation + fit, balance loss and bias"),
    "activation_fit_nonoise": ("activation_fit_nonoise", RECIPE, 0, "activation + fit, no gate noise"),
    "activation_fit_distill": ("activation_fit", RECIPE + " --distill_from=PARENT --distill_alpha=1.0", 0,
                               "activation + fit, distilled from the parent (alpha 1)"),
    "random_fit_refit": ("random_fit_refit", RECIPE, 0, "random + fit + refit, lr 2e-4"),
    "random_lr1e-3": ("random", "--learning_rate=1e-3 --warmup_steps=4", 0, "random, lr 1e-3 (the old demo)"),
    "activation_fit_s1": ("activation_fit", RECIPE, 1, "activation + fit, seed 1"),
    "random_s1": ("random", RECIPE, 1, "random, seed 1"),
}
CONTROLS = {"pruned": (RECIPE, 0), "pruned_s1": (RECIPE, 1)}
EVAL = "--max_windows=8 --batch_size=1 --seq_len=256"
GENERATE = ["--generate=The capital of France is", "--max_new_tokens=24", "--temperature=0"]


# ----------------------------------------------------------------------------------------------------------
# Stages

def run_stage(cfg, folder, commands):
    """Run commands (argument lists) in order into folder/log.txt; done.json marks the stage finished."""
    if os.path.exists(os.path.join(folder, "done.json")):
        return
    print(f"=== {folder}", flush=True)
    for c in commands:
        print("   ", shlex.join(c), flush=True)
    if cfg.dry_run:
        return
    os.makedirs(folder, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(folder, "log.txt"), "a") as log:
        for c in commands:
            log.write(f"$ {shlex.join(c)}\n")
            log.flush()
            if subprocess.run(c, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode:
                raise UserError(f"stage {folder} failed: see {folder}/log.txt")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    atomic_write(os.path.join(folder, "done.json"), json.dumps(dict(
        commands=[shlex.join(c) for c in commands], wall_s=time.time() - t0, load=os.getloadavg()[0],
        commit=commit, finished=time.strftime("%Y-%m-%d %H:%M")), indent=1))
    print(f"    done in {time.time() - t0:.0f} s", flush=True)


def py(script, *args):
    return [sys.executable, script, *args]


def split_stage(cfg, name):
    folder = os.path.join(cfg.out, "split", name)
    args = SPLITS[name][0].split()
    run_stage(cfg, folder, [
        py("split.py", f"--src={cfg.parent}", f"--dst={folder}/model", f"--data={cfg.data}", "--overwrite", *args),
        py("eval.py", f"--ckpt={folder}/model", f"--data={cfg.data}", *EVAL.split(), "--tasks=none",
           f"--out={folder}/eval.json", *GENERATE)])


def train_and_eval(cfg, folder, init, args, seed):
    run_stage(cfg, folder, [
        py("train.py", f"--init_from={init}", f"--out_dir={folder}/run", f"--data_dir={cfg.data}",
           f"--max_steps={CPT_STEPS}", f"--seed={seed}", "--overwrite=True", "--export=True", *CPT.split(),
           *args.replace("PARENT", cfg.parent).split()),
        py("eval.py", f"--ckpt={folder}/run/final", f"--data={cfg.data}", *EVAL.split(),
           f"--max_items={cfg.eval_items}", f"--out={folder}/eval.json", *GENERATE)])


def main(argv):
    cfg = load_config(CarveExp(), argv, doc=__doc__)
    parts = cfg.parts.split(",")
    only = set(cfg.only.split(",")) if cfg.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    if not cfg.report_only:
        if "split" in parts:
            for name in SPLITS:
                if want(name):
                    split_stage(cfg, name)
        if "cpt" in parts:
            for name, (src, args, seed, _) in CPTS.items():
                if want(name):
                    split_stage(cfg, src)
                    train_and_eval(cfg, os.path.join(cfg.out, "cpt", name),
                                   os.path.join(cfg.out, "split", src, "model"), args, seed)
        if "control" in parts:
            pruned = os.path.join(cfg.out, "control", "model")
            run_stage(cfg, os.path.join(cfg.out, "control", "prune"), [
                py("experiments/prune_ffn.py", f"--src={cfg.parent}", f"--dst={pruned}", "--keep=384",
                   f"--data={cfg.data}"),
                py("eval.py", f"--ckpt={pruned}", f"--data={cfg.data}", *EVAL.split(), "--tasks=none",
                   f"--out={cfg.out}/control/prune/eval.json")])
            for name, (args, seed) in CONTROLS.items():
                if want(name):
                    train_and_eval(cfg, os.path.join(cfg.out, "control", name), pruned, args, seed)
    if not cfg.dry_run:
        from experiments.carve_report import write_report
        write_report(cfg.out, cfg.results, dict(SPLITS=SPLITS, CPTS=CPTS, CONTROLS=CONTROLS, CPT_STEPS=CPT_STEPS,
                                                CPT=CPT, EVAL=EVAL))


if __name__ == "__main__":
    run_cli(main)
