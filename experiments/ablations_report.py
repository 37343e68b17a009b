"""
The report of experiments/ablations.py: reads its finished stages and writes RESULTS.md's section on the
paper's ablations (between the two ABLATIONS markers; the rest of the file is left as it is). Every number is
read from a stage folder; the verdicts are computed from them, with the tie rule written next to them.

    python experiments/ablations_report.py                    # RESULTS.md from runs/ablations_smollm2
    python experiments/ablations_report.py --smoke=True --out=runs/abl_smoke --results=/tmp/smoke.md

Settings: experiments/ablations.py's own (`--help` lists them), so that the report describes the stages as they
were run: pass the ones you ran it with (the runner's --parts and --dry_run mean nothing here). The routing
plot, experiments/results_routing.png beside --results, is drawn with matplotlib when it is installed; without
it the report prints the curves as text and RESULTS.md says so.
"""
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from configurator import UserError, run_cli  # noqa: E402
from experiments.ablations import (CPT_METHODS, METHODS, SHEARED_LIKE, P, active_width, git_commit,  # noqa: E402
                                   mean_step_time, reference_losses, run_name, seeds, settings, shape,
                                   shape_name, train_log, variants)
from fileio import atomic_file, atomic_write, check_output_file  # noqa: E402
from gate import routing_evenness  # noqa: E402

BEGIN = "<!-- ABLATIONS:BEGIN (experiments/ablations_report.py writes this section) -->"
END = "<!-- ABLATIONS:END -->"
TITLE = "# RESULTS: the paper's ablations on SmolLM2-135M-Instruct"   # a new results file's first line


# ----------------------------------------------------------------------------------------------------------
# 1. Reading the stages

def load_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


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
        self.random_noise, self.dense_noise = self.seed_noise("random"), self.seed_noise("dense")
        # Two seeds: their spread |a - b| estimates the standard deviation of one run's loss as spread / sqrt(2),
        # so the SE of a difference between two runs is about the spread itself: a tie is within 2 x that.
        noise = [x for x in (self.random_noise, self.dense_noise) if x is not None]
        self.tie = 2 * max(noise + [0.0]) if noise else None

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


# ----------------------------------------------------------------------------------------------------------
# 2. Table cells and verdict rules

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


def fmt(x, digits=3):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pm(acc, se):
    return "-" if acc is None else f"{acc:.3f} ± {se:.3f}"


def diff_verdict(a, b, tie, lower_better=True):
    """'first better' / 'second better' / 'tie' (within tie) / 'cannot tell' for two numbers a and b."""
    if a is None or b is None or tie is None:
        return "cannot tell"
    d = a - b
    if abs(d) <= tie:
        return "tie"
    return "first better" if (d < 0) == lower_better else "second better"


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


# ----------------------------------------------------------------------------------------------------------
# 3. Routing

def experts_in_use(routing, i):
    """How many experts get >= 1% of layer i's routed selections (domains averaged); k of E = collapsed:
    every token picks the same k experts, whatever its domain (and JS is then 0)."""
    dist = torch.tensor(routing["distribution"][i], dtype=torch.float64)  # (domains, E), each row sums to 1
    return routing_evenness(dist.mean(0))[0]


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


def routing_series(cfg, R):
    """[(label, eval.json's routing)] of every CPT method at the split and after CPT, where measured."""
    sn = shape_name(cfg.cpt_shape)
    series = [(f"{m} at the split", (R.split.get((sn, m)) or {}).get("routing")) for m in CPT_METHODS]
    series += [(f"{m} after CPT", (R.c(m) or {}).get("routing")) for m in CPT_METHODS]
    return [(lab, r) for lab, r in series if r]


def matplotlib_pyplot():
    """matplotlib.pyplot drawing into files (no display), or None: matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_routing(plt, series, path):
    """JS per layer, one line per run -> a PNG at path."""
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


SHADES = " .:-=+*#%@"  # light to dark


def text_plot(series):
    """JS per layer as one row of characters per run: darker = larger, '@' = the largest JS anywhere."""
    top = max(max(r["js"]) for _, r in series) or 1.0
    width = max(len(label) for label, _ in series)
    layers = series[0][1]["layers"]
    lines = [f"JS per layer (layers {layers[0]}..{layers[-1]}, left to right; ' ' = 0 ... '@' = {top:.3f}):"]
    for label, r in series:
        cells = "".join(SHADES[min(int(v / top * len(SHADES)), len(SHADES) - 1)] for v in r["js"])
        lines.append(f"  {label:<{width}} |{cells}|")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# 4. The sections of RESULTS.md, in order (each a list of lines)

def section_setup(cfg, R):
    tasks = R.task_names()
    tokens = cfg.cpt_steps * cfg.batch_tokens
    total = sum(s["wall_s"] for s in R.stages.values())
    L = []
    w = L.append
    w(f"Produced by `python experiments/ablations.py` at commit {git_commit()}; every number below is read from "
      f"the run folders under `{cfg.out}/` (rewrite this section from them with "
      f"`python experiments/ablations_report.py`). Sum of the stages' wall times: **{total / 60:.1f} min** on "
      f"this machine's {os.cpu_count()} CPU cores (per stage: the last section).\n")
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
      f"random {fmt(R.random_noise, 4)}, dense {fmt(R.dense_noise, 4)} nats). Two seeds estimate one run's "
      f"standard deviation as spread / sqrt(2), so the SE of a difference between two runs is about the spread: "
      f"a difference within 2 x the larger spread ({fmt(R.tie, 4)} nats) is called a tie. Two seeds make this a "
      f"rough estimate: differences near the threshold are weak evidence either way. Accuracies: a difference "
      f"within 2 x sqrt(SE1² + SE2²) is a tie.\n")
    notes = P(cfg, "notes.md")
    if os.path.isfile(notes):
        with open(notes) as f:
            w("### Notes on this run\n\n" + f.read().strip() + "\n")
    return L


def section_parent_and_construction(cfg, R):
    tasks, domains = R.task_names(), R.domains()
    L = []
    w = L.append
    w("## 0. The dense parent\n")
    w(header("model", tasks, domains))
    w(row("SmolLM2-135M-Instruct (dense)", R.parent, tasks, domains))
    w("")

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
    return L


def section_cpt(cfg, R):
    tasks, domains = R.task_names(), R.domains()
    tokens = cfg.cpt_steps * cfg.batch_tokens
    L = []
    w = L.append
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
    w(f"\nSeed-to-seed spread of the mean val loss: random {fmt(R.random_noise, 4)}, "
      f"dense {fmt(R.dense_noise, 4)} nats.\n")
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
    return L


def section_data(cfg, R):
    tasks, domains = R.task_names(), R.domains()
    L = []
    w = L.append
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
    return L


def section_routing(cfg, R, series, plotted):
    """The JS table of series (routing_series); plotted: whether experiments/results_routing.png was drawn."""
    L = []
    w = L.append
    w("## 4. Routing specialisation by layer (SPEC §6: deeper layers prefer domains more)\n")
    w("JS = generalised Jensen-Shannon divergence of the 6 domains' expert-selection distributions / log2(6): "
      "0 = every domain uses the experts alike. Measured by eval.py on the validation windows.\n")
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
        if plotted:
            w("\n![JS per layer](experiments/results_routing.png)\n\n"
              "JS per layer: one colour per method, dashed at the split, solid after CPT.\n")
        else:
            w("\n(No plot: matplotlib was not installed where this section was written; the table above holds "
              "the numbers. With it, `python experiments/ablations_report.py` draws "
              "experiments/results_routing.png.)\n")
    else:
        w("(no routing statistics yet)\n")
    return L


def section_active(cfg, R):
    tasks, domains = R.task_names(), R.domains()
    E, k = shape(cfg.cpt_shape)
    tokens = cfg.cpt_steps * cfg.batch_tokens
    L = []
    w = L.append
    w(f"## 5. MoE vs a dense model with the same active FFN width ({active_width(cfg)} neurons per layer)\n")
    w(f"The split MoE ({cfg.cpt_shape}, random) after CPT against the parent with every FFN pruned to the "
      f"{active_width(cfg)} neurons of highest Taylor importance (experiments/prune_ffn.py), trained on the same "
      f"tokens. Both run the same attention and the same active FFN width per token; the MoE holds {E // k}x more "
      f"FFN parameters. The paper compared with *other* dense models of similar active size trained from scratch "
      f"(Open-LLaMA-3B-v2, Sheared-LLaMA-2.7B), on 200B tokens; this is a pruning control at {tokens / 1e3:.0f}k.\n")
    w(header("model", tasks, domains, ["val loss before CPT"]))
    w(row("dense parent (full FFN)", R.parent, tasks, domains, ["-"]))
    w(row("pruned dense + CPT", R.c("pruned-dense"), tasks, domains, [fmt(R.pruned["val"] if R.pruned else None)]))
    at = R.split.get((shape_name(cfg.cpt_shape), "random"))
    w(row("MoE random + CPT", R.c("random"), tasks, domains, [fmt(at["val"] if at else None)]))
    w("")
    return L


def section_distill(cfg, R):
    tasks, domains = R.task_names(), R.domains()
    L = []
    w = L.append
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
    return L


def section_verdicts(cfg, R):
    return ["## 7. The paper's claims (SPEC §6) and what we measured\n", verdicts(cfg, R, R.tie)]


def section_commands(cfg, R):
    L = []
    w = L.append
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
    return L


def section_earlier():
    """experiments/results_demo_scale.md, the earlier experiment's results, kept with its headings demoted."""
    old = os.path.join(ROOT, "experiments", "results_demo_scale.md")
    if not os.path.isfile(old):
        return []
    with open(old) as f:
        text = f.read().strip()
    return ["---\n\n# Earlier results on the from-scratch demo base (4 layers, d = 128)\n",
            "Kept for the record; produced by the earlier version of this script on a 5M-parameter model trained "
            "from scratch, where every multiple-choice score was at chance. Its headings are demoted by one level.\n",
            "\n".join(("#" + line) if line.startswith("#") else line for line in text.splitlines())]


# ----------------------------------------------------------------------------------------------------------
# 5. The paper's claims: a verdict each

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
# 6. Writing RESULTS.md

def check_paths(cfg):
    """Refuse, before anything is written, a --out without finished stages and a --results that is not a file."""
    if not any("done.json" in files for _, _, files in os.walk(cfg.out)):
        raise UserError(f"--out={cfg.out} holds no finished stage (no done.json): run experiments/ablations.py "
                        f"first, or name the --out it wrote")
    try:
        check_output_file(cfg.results, "--results", [("--out", cfg.out)])
    except ValueError as e:
        raise UserError(str(e)) from None


def replace_section(text, section, path):
    """text (of the file at path) with its part from BEGIN to END replaced by section; without the markers,
    section is appended (after TITLE when the file is new or empty)."""
    if (BEGIN in text) != (END in text) or (BEGIN in text and text.index(BEGIN) > text.index(END)):
        raise UserError(f"--results={path} holds only one of the markers {BEGIN!r} and {END!r} (or END before BEGIN): "
                        f"restore the pair around the old section, or delete both to append a new one")
    if BEGIN in text:
        return text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    return (text.rstrip() if text.strip() else TITLE) + "\n\n" + section + "\n"


def write_results(cfg):
    """RESULTS.md's section, and experiments/results_routing.png beside it, from the stages under cfg.out."""
    check_paths(cfg)
    text = ""
    if os.path.isfile(cfg.results):
        with open(cfg.results, encoding="utf-8") as f:
            text = f.read()
    R = Runs(cfg)
    series = routing_series(cfg, R)
    plt = matplotlib_pyplot() if series else None
    L = [*section_setup(cfg, R), *section_parent_and_construction(cfg, R), *section_cpt(cfg, R),
         *section_data(cfg, R), *section_routing(cfg, R, series, plt is not None), *section_active(cfg, R),
         *section_distill(cfg, R), *section_verdicts(cfg, R), *section_commands(cfg, R), *section_earlier()]
    new = replace_section(text, BEGIN + "\n\n" + "\n".join(L) + "\n\n" + END, cfg.results)
    if plt is not None:  # beside RESULTS.md, so that the repository's copy is committed with it
        png = os.path.join(os.path.dirname(os.path.abspath(cfg.results)), "experiments", "results_routing.png")
        plot_routing(plt, series, png)
    elif series:
        print(text_plot(series))
    atomic_write(cfg.results, new)
    print(f"wrote {cfg.results} (section: the paper's ablations, from {cfg.out})")


def main(argv):
    cfg = settings(argv, __doc__)
    os.chdir(ROOT)  # relative paths are from the repository root, as in the runner
    write_results(cfg)


if __name__ == "__main__":
    run_cli(main)
