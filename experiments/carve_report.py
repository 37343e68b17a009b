"""
The report of experiments/carve_ablations.py: reads its run folders, writes RESULTS.md's section "Carving"
(between the two CARVE markers; the rest of the file is left as it is). Every number is read from a folder;
verdicts are computed from them, with the tie rule written next to them.
"""
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from compare import window_stats  # noqa: E402

BEGIN, END = "<!-- CARVE:BEGIN (experiments/carve_ablations.py writes this section) -->", "<!-- CARVE:END -->"


def load(folder):
    path = os.path.join(folder, "eval.json")
    if not os.path.exists(os.path.join(folder, "done.json")) or not os.path.exists(path):
        return None
    with open(path) as f:
        r = json.load(f)
    with open(os.path.join(folder, "done.json")) as f:
        r["done"] = json.load(f)
    r["mean"], r["se"] = window_stats(r["val"])
    return r


def evenness(r):
    """(fewest experts in use in any layer, largest busiest-expert share in any layer) or None (dense)."""
    routing = r.get("routing")
    if not routing:
        return None
    return min(routing["experts_in_use"]), max(routing["busiest_share"])


def sample(r):
    text = (r.get("samples") or [""])[0]
    text = text.split("The capital of France is", 1)[-1]
    return json.dumps(text[:60])


def task_cells(r):
    if "tasks" not in r:
        return ["–"] * 3
    return [f"{r['tasks'][t]['acc_norm']:.3f} ± {r['tasks'][t]['acc_norm_stderr']:.3f}"
            for t in ("cloze", "continuation", "quiz")]


def write_report(out, results_path, spec):
    splits = {n: load(os.path.join(out, "split", n)) for n in spec["SPLITS"]}
    cpts = {n: load(os.path.join(out, "cpt", n)) for n in spec["CPTS"]}
    controls = {n: load(os.path.join(out, "control", n)) for n in spec["CONTROLS"]}
    pruned0 = load(os.path.join(out, "control", "prune"))
    L = []
    L += [BEGIN, "", "## Carving: experts and routers from the parent's activations (carve.py)", "",
          "Measured by `python experiments/carve_ablations.py` (stages in `runs/carve/`; "
          "`--report_only=True` rewrites this section). Parent SmolLM2-135M-Instruct (Q4_1 GGUF, fp32 compute), "
          f"the demo corpus in its tokenizer. Validation: {spec['EVAL']} (8 windows of 256 tokens per domain, "
          "6 domains; loss in nats/token, mean over the 48 windows ± their standard error). Every MoE has the "
          "16/4 active budget: 384 of 1,536 FFN neurons per token. `activation` = 192 shared neurons + 14 routed "
          "experts of 96, 2 active; `random` and `sharing_inter` = 16 experts of 96, 4 active (SharingInter: 96 "
          "shared + 16 x 72, as split.py sizes it). The sections after this one are the earlier ablations of "
          "`experiments/ablations.py` (other protocol: 4 validation windows per domain, CPT at lr 1e-3); they are "
          "unchanged.", ""]
    L += ["### At the split, no training", "",
          "| stage | construction, router, weighting | val loss ± SE | fewest experts in use (≥1%) in a layer | "
          "largest busiest-expert share | greedy continuation of \"The capital of France is\" | split + eval time |",
          "|---|---|---|---|---|---|---|"]
    for n, r in splits.items():
        if r is None:
            L.append(f"| {n} | {spec['SPLITS'][n][1]} | not run | | | | |")
            continue
        ev = evenness(r)
        L.append(f"| {n} | {spec['SPLITS'][n][1]} | **{r['mean']:.3f}** ± {r['se']:.3f} | {ev[0]} | {ev[1]:.3f} | "
                 f"{sample(r)} | {r['done']['wall_s']:.0f} s |")
    if pruned0:
        L.append(f"| control: parent pruned to 384 neurons | dense, Taylor importance | **{pruned0['mean']:.3f}** ± "
                 f"{pruned0['se']:.3f} | – | – | – | {pruned0['done']['wall_s']:.0f} s |")
    L += ["", f"### After continual pretraining ({spec['CPT_STEPS']} steps x 2,048 tokens = "
          f"{spec['CPT_STEPS'] * 2048:,} tokens)", "",
          f"One process, fp32, AdamW, cosine to 10% of the peak; common settings `{spec['CPT']}`. Tasks: 100 "
          "questions each, acc_norm ± lm-eval's standard error (chance 0.25).", "",
          "| run | what | val loss ± SE | cloze | continuation | quiz | fewest experts in use | busiest share | "
          "greedy continuation | train + eval time |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(n, spec["CPTS"][n][3], r) for n, r in cpts.items()]
    rows += [(n, f"dense parent pruned to 384, {spec['CONTROLS'][n][0]}, seed {spec['CONTROLS'][n][1]}", r)
             for n, r in controls.items()]
    for n, what, r in rows:
        if r is None:
            L.append(f"| {n} | {what} | not run | | | | | | | |")
            continue
        ev = evenness(r) or ("–", float("nan"))
        L.append(f"| {n} | {what} | **{r['mean']:.3f}** ± {r['se']:.3f} | " + " | ".join(task_cells(r)) +
                 f" | {ev[0]} | {ev[1]:.3f} | {sample(r)} | {r['done']['wall_s'] / 60:.1f} min |")
    L += ["", "### Verdicts", ""] + verdicts(splits, cpts, controls) + ["", END]
    text = open(results_path).read() if os.path.exists(results_path) else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(L) + text[text.index(END) + len(END):]
    else:
        head, sep, rest = text.partition("\n## ")
        text = head.rstrip() + "\n\n" + "\n".join(L) + "\n\n" + (sep.lstrip("\n") + rest if sep else "")
    with open(results_path + ".tmp", "w") as f:
        f.write(text)
    os.replace(results_path + ".tmp", results_path)
    print(f"wrote {results_path} (section: Carving)")


def spread(a, b):
    return abs(a["mean"] - b["mean"]) if a and b else None


def verdicts(splits, cpts, controls):
    out = []
    best = min((r["mean"], n) for n, r in splits.items() if r) if any(splits.values()) else None
    if best:
        out.append(f"- **At the split (goal ≤ 6.0 nats):** best {best[1]} at {best[0]:.3f} — "
                   f"{'met' if best[0] <= 6.0 else 'not met'}. The paper's random split: "
                   f"{splits['random']['mean']:.3f}." if splits.get("random") else "")
    a, r = cpts.get("activation_fit"), cpts.get("random")
    a1, r1 = cpts.get("activation_fit_s1"), cpts.get("random_s1")
    p0, p1 = controls.get("pruned"), controls.get("pruned_s1")
    noise = max([s for s in (spread(a, a1), spread(r, r1), spread(p0, p1)) if s is not None] or [float("nan")])
    if a:
        out.append(f"- **After CPT (goal ≤ 4.0):** activation + fit {a['mean']:.3f}"
                   + (f" / seed 1 {a1['mean']:.3f}" if a1 else "") + f" — {'met' if a['mean'] <= 4.0 else 'not met'}.")
        c = a["tasks"]["cloze"]
        z = (c["acc_norm"] - 0.25) / max(c["acc_norm_stderr"], 1e-9)
        out.append(f"- **Cloze above chance by ≥ 3 SE:** {c['acc_norm']:.3f} ± {c['acc_norm_stderr']:.3f} is "
                   f"{z:.1f} SE above 0.25 — {'met' if z >= 3 else 'not met'}.")
        ev, ev1 = evenness(a), evenness(a1) if a1 else None
        out.append(f"- **No collapsed router (≥ 8 experts with ≥ 1% of the tokens in every layer):** fewest in "
                   f"use {ev[0]} of 14 routed — {'met' if ev[0] >= 8 else 'not met'}"
                   + (f"; seed 1: {ev1[0]} — {'met' if ev1[0] >= 8 else 'not met'}" if ev1 else "") + ".")
    if a and p0:
        diff = p0["mean"] - a["mean"]
        tie = 2 * noise if not math.isnan(noise) else float("nan")
        out.append(f"- **MoE vs the parent pruned to the same active width, same tokens:** pruned {p0['mean']:.3f}"
                   + (f" / seed 1 {p1['mean']:.3f}" if p1 else "") + f", activation + fit {a['mean']:.3f}: "
                   f"the MoE is {diff:+.3f} nats better. Seed spread (largest of the finished seed pairs; the "
                   f"control's own pair only if pruned_s1 ran) {noise:.3f}; "
                   f"a tie is within 2 x spread = {tie:.3f}: "
                   + ("the MoE wins (one seed pair makes the spread a rough estimate)." if diff > tie else "a tie or a loss: the paper's headline does not hold here."
                      if not math.isnan(tie) else "no seed pair measured yet."))
    if a and r:
        out.append(f"- **The paper's IndependentRandom after the same CPT:** {r['mean']:.3f}"
                   + (f" / seed 1 {r1['mean']:.3f}" if r1 else "") + f" against activation + fit {a['mean']:.3f}.")
    for name, what in (("activation_fit_lr1e-3", "lr 1e-3 instead of 2e-4"), ("activation_fit_bias", "bias "
                       "balancing instead of the loss"), ("activation_fit_both", "loss and bias together"),
                       ("activation_fit_nonoise", "no gate noise in training"),
                       ("activation_fit_distill", "distillation from the parent (same tokens, ~2x the step time)")):
        x = cpts.get(name)
        if a and x:
            ev, ev0 = evenness(x), evenness(a)
            out.append(f"- **{what}:** {x['mean']:.3f} vs {a['mean']:.3f} ({x['mean'] - a['mean']:+.3f}); fewest "
                       f"experts in use {ev[0]} vs {ev0[0]}, busiest share {ev[1]:.3f} vs {ev0[1]:.3f}.")
    if math.isnan(noise):
        out.append("- **Noise:** no seed pair has finished, so no difference between CPT runs above can be called "
                   "more than a tie; the loss SE over the 48 validation windows (~0.13) is the within-run scale.")
    return [o for o in out if o]
