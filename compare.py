"""
Side by side: several eval.py results (json) as ONE table - the demo's dense parent / split / split+CPT.

    python compare.py out/demo/dense.json out/demo/split.json out/demo/cpt.json --names=dense,split,split+CPT \
        --train_logs=,,out/smollm2_moe_cpt/log.jsonl

Rows: the models. Columns: mean validation loss +- its standard error, each domain's loss, each task's acc_norm
+- standard error (lm-eval's), the continual-pretraining tokens a model saw (from train.py's log.jsonl) and the
wall time of that training. Then each model's greedy sample for the same prompt.

The standard error of the mean validation loss treats each validation window as one sample: eval.py with
--batch_size=1 records one loss per window, and SE = sample std / sqrt(windows). A difference between two rows
larger than ~2 SE of both is more than the window-to-window noise of this validation set (the same windows
for every row, so this is a conservative yardstick).
"""
import json
import math
import os
from dataclasses import dataclass

from configurator import UserError, load_config, run_cli


@dataclass
class CompareConfig:
    names: str = ""        # comma-separated row names; default: the json files' names
    train_logs: str = ""   # comma-separated log.jsonl per row (empty: no training) for tokens and wall time


def window_stats(val):
    """(mean loss over domains, its standard error over windows) from eval.py's "val" block."""
    windows = [x for d in val["domains"].values() for x in d.get("batch_losses", [])]
    if len(windows) < 2:
        return val["mean_loss"], float("nan")
    m = sum(windows) / len(windows)
    sd = math.sqrt(sum((x - m) ** 2 for x in windows) / (len(windows) - 1))
    return val["mean_loss"], sd / math.sqrt(len(windows))


def training(log_path):
    """(tokens, seconds) of a train.py run from its log.jsonl: the last train line's tokens, summed step times."""
    if not log_path:
        return 0, 0.0
    if not os.path.isfile(log_path):
        raise UserError(f"--train_logs: {log_path} not found (train.py writes log.jsonl into its out_dir)")
    tokens, seconds = 0, 0.0
    with open(log_path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run (train.py drops such lines on resume)
            if isinstance(rec, dict) and rec.get("kind") == "train" and isinstance(rec.get("tokens"), int):
                tokens = rec["tokens"]
                seconds = rec.get("train_s", 0.0)  # time in training steps (after a resume: since the resume)
    if not tokens:
        raise UserError(f"--train_logs: {log_path} holds no train.py training record (kind 'train'): pass the "
                        f"log.jsonl in a train.py out_dir, or leave that row's entry empty")
    return tokens, seconds


def table(results, names, logs):
    domains = list(results[0]["val"]["domains"])
    with_tasks = [r for r in results if r.get("tasks")]
    tasks = list(with_tasks[0]["tasks"]) if with_tasks else []
    head = (f"{'model':<11}{'val loss':>16}" + "".join(f"{d[:10]:>11}" for d in domains)
            + "".join(f"{t[:12] + ' acc_norm':>22}" for t in tasks) + f"{'CPT tokens':>12}{'CPT time':>10}")
    lines = [head, "-" * len(head)]
    for name, r, log in zip(names, results, logs):
        mean, se = window_stats(r["val"])
        tokens, seconds = training(log)
        row = f"{name:<11}{mean:>9.3f} +-{se:.3f}" + "".join(f"{r['val']['domains'][d]['loss']:>11.3f}" for d in domains)
        for t in tasks:  # a row evaluated without tasks (eval.py --tasks=none) shows a dash
            x = r.get("tasks", {}).get(t)
            row += f"{x['acc_norm']:>15.3f} +-{x['acc_norm_stderr']:.3f}" if x else f"{'-':>22}"
        row += f"{tokens:>12,}{seconds / 60:>9.1f}m"
        lines.append(row)
    chance = "  ".join(f"{t}: {with_tasks[0]['tasks'][t]['chance']:.2f} (n={with_tasks[0]['tasks'][t]['n']})"
                       for t in tasks)
    lines.append(f"chance: {chance}; +- one standard error; val loss in nats/token, "
                 f"{results[0]['val_setup']}, SE over windows")
    return "\n".join(lines)


def main(argv):
    files = [a for a in argv if not a.startswith("--")]
    cfg = load_config(CompareConfig(), [a for a in argv if a.startswith("--")], doc=__doc__)
    if len(files) < 1:
        raise UserError("name eval.py json files to compare: python compare.py a.json b.json ...")
    results = []
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"{path} not found: write it with python eval.py ... --out={path}")
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not an eval.py json ({e}): run eval.py ... --out={path} again") from None
        if "val" not in results[-1]:
            raise UserError(f"{path} has no validation losses: run eval.py with --data")
        if set(results[-1]["val"]["domains"]) != set(results[0]["val"]["domains"]):
            raise UserError(f"{path} and {files[0]} evaluated different domains: compare evaluations made with "
                            f"the same --data and --tasks")
        with_tasks = [r for r in results if r.get("tasks")]
        for key in ("tasks",) if results[-1].get("tasks") and len(with_tasks) > 1 else ():  # none: a dash row
            if set(results[-1][key]) != set(with_tasks[0][key]):
                raise UserError(f"{path} and {files[0]} evaluated different {'domains' if key == 'val' else 'tasks'}: "
                                f"compare evaluations made with the same --data and --tasks")
    names = cfg.names.split(",") if cfg.names else [os.path.basename(p)[:-5] for p in files]
    logs = cfg.train_logs.split(",") if cfg.train_logs else [""] * len(files)
    if len(names) != len(files) or len(logs) != len(files):
        raise UserError(f"--names and --train_logs need one entry per json file ({len(files)})")
    print(table(results, names, logs))
    for name, r in zip(names, results):
        for s in r.get("samples", []):
            print(f"\n--- {name}: {s!r}")


if __name__ == "__main__":
    run_cli(main)
