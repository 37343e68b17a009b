"""eval.py's multiple-choice scoring against lm-evaluation-harness 0.4.13 (its `hf` backend) on the same items:
questions per second, side by side in one process and thread count, and whether the predictions agree.

    python -m venv --system-site-packages /work/lmeval-venv && /work/lmeval-venv/bin/pip install lm-eval==0.4.13
    /work/lmeval-venv/bin/python experiments/lm_eval_speed.py --items=20 --threads=1

The dense SmolLM2 parent (--parent, a GGUF) is written once as a Hugging Face LLaMA folder with the data's
tokenizer.json, so both sides read the same weights and the same tokenizer. Each of the data's tasks becomes an
lm-eval `multiple_choice` task over the same `--items` questions (context, " " + bare choice, label), scored by
lm-eval at its default batch size 1; ours is multiple_choice.score_task as eval.py runs it. Timed: the scoring
alone (models loaded before the clock starts), ours, then lm-eval, then ours again (the median of ours counts).
"""
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import multiple_choice as mc  # noqa: E402
from configurator import UserError, load_config, run_cli  # noqa: E402
from fileio import atomic_write  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


@dataclass
class SpeedConfig:
    parent: str = "data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
    data: str = "data/smollm2"          # its tasks/*.jsonl and tokenizer.json
    items: int = 20                     # questions per task, spread evenly over the file
    threads: int = 1
    work: str = "out/lm_eval_speed"     # the Hugging Face folder and lm-eval's task files
    out: str = ""                       # json with the figures


def hf_folder(cfg):
    """The parent as a Hugging Face LLaMA folder with the data's tokenizer (written once)."""
    path = os.path.join(cfg.work, "hf")
    if not os.path.isfile(os.path.join(path, "config.json")):
        checkpoint.save_pretrained(checkpoint.load_pretrained(cfg.parent), path, format="llama")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(cfg.data, name)) as f:
                atomic_write(os.path.join(path, name), f.read())
    return path


def lm_eval_task(name, items, folder):
    """One lm-eval task yaml over `items` (bare choices, their delimiter) -> the task's name."""
    data = os.path.join(folder, f"{name}.jsonl")
    atomic_write(data, "".join(json.dumps({"context": it["context"], "choices": it["choices"], "label": it["label"]})
                               + "\n" for it in items))
    delimiters = {it["target_delimiter"] for it in items}
    assert len(delimiters) == 1, "one target_delimiter per task"
    task = f"speed_{name}"
    atomic_write(os.path.join(folder, f"{task}.yaml"), "\n".join([
        f"task: {task}", "dataset_path: json", f"dataset_kwargs:\n  data_files:\n    test: {data}",
        "test_split: test", "output_type: multiple_choice", 'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"', "doc_to_target: label", f"target_delimiter: {json.dumps(delimiters.pop())}",
        "metric_list:\n  - metric: acc\n  - metric: acc_norm", ""]))
    return task


def weight_multiply_adds(model, tok, tasks, start):
    """Multiply-adds with the weights (attention's own products left out) that each side spends on the tasks:
    ours, one row per question (multiple_choice.question_row) with the output layer at the scored tokens only;
    lm-eval, one forward of context + choice minus its last token per choice, the output layer at every
    position, and one forward per context whose choices are all one token (its logits cache). At equal
    speed of the matrix products, their ratio is the speedup one can get without computing less per token."""
    body = sum(p.numel() for p in model.model.layers.parameters()) + model.model.norm.weight.numel()
    head = model.lm_head.weight.numel()
    ours = theirs = 0
    for items in tasks.values():
        for i in range(len(items)):
            group = [mc.encode_request(tok, items[i]["context"], items[i]["target_delimiter"] + c, start)
                     for c in items[i]["choices"]]
            row_ids = mc.question_row(group, model.config.max_position_embeddings)[0]
            ours += len(row_ids) * body + sum(len(cont) for _, cont in group) * head
            if all(len(cont) == 1 and ctx == group[0][0] for ctx, cont in group):
                theirs += len(group[0][0]) * (body + head)
            else:
                theirs += sum(len(ctx) + len(cont) - 1 for ctx, cont in group) * (body + head)
    return ours, theirs


def main(argv):
    cfg = load_config(SpeedConfig(), argv, doc=__doc__)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm_eval is not installed here: run this with the venv named in the docstring") from None
    torch.set_num_threads(cfg.threads)
    task_dir = os.path.join(cfg.data, "tasks")
    tasks = {f.removesuffix(".jsonl"): mc.read_task(os.path.join(task_dir, f)) for f in sorted(os.listdir(task_dir))
             if f.endswith(".jsonl")}
    tasks = {n: [items[i] for i in mc.pick_items(len(items), cfg.items)] for n, items in tasks.items()}
    n_questions = sum(len(v) for v in tasks.values())
    hf = hf_folder(cfg)
    model = checkpoint.load_pretrained(hf).eval()
    tok = Tokenizer(os.path.join(hf, "tokenizer.json"))
    start = [tok.bos_id] if tok.add_bos else []   # eval.py's --start_token=auto, lm-eval's default

    def ours():
        t = time.perf_counter()
        res = {n: mc.score_task(model, tok, items, start=start) for n, items in tasks.items()}
        return time.perf_counter() - t, res

    folder = tempfile.mkdtemp(dir=cfg.work)
    names = {lm_eval_task(n, items, folder): n for n, items in tasks.items()}
    manager = TaskManager(include_path=folder)

    lm = HFLM(pretrained=hf, dtype="float32", batch_size=1, device="cpu")  # loaded before the clock starts

    def theirs():
        t = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, log_samples=True)
        return time.perf_counter() - t, res

    t_ours = [ours()[0]]
    t_theirs, res_theirs = theirs()
    t_ours.append(ours()[0])
    _, res_ours = ours()
    agree, total, worst = 0, 0, 0.0
    for task, name in names.items():
        samples = sorted(res_theirs["samples"][task], key=lambda s: s["doc_id"])
        for s, d in zip(samples, res_ours[name]["details"]):
            lls = np.array([float(r[0]) for r in s["filtered_resps"]])  # per choice (loglik, is_greedy)
            worst = max(worst, float(np.abs(lls - np.array(d["loglikelihoods"])).max()))
            agree += int(np.argmax(lls)) == d["pred"]
            total += 1
    mine = statistics.median(t_ours)
    macs_ours, macs_theirs = weight_multiply_adds(model, tok, tasks, start)
    figures = {"questions": n_questions, "threads": cfg.threads, "ours_s": t_ours, "lm_eval_s": t_theirs,
               "ours_q_per_s": n_questions / mine, "lm_eval_q_per_s": n_questions / t_theirs,
               "speedup": t_theirs / mine, "same_prediction": f"{agree}/{total}", "max_abs_loglik_diff": worst,
               "weight_multiply_adds_ours": macs_ours, "weight_multiply_adds_lm_eval": macs_theirs}
    print(f"{n_questions} questions ({', '.join(f'{n} {len(v)}' for n, v in tasks.items())}), {cfg.threads} thread(s)")
    print(f"  ours (multiple_choice.score_task): {figures['ours_q_per_s']:.2f} questions/s (median of {t_ours})")
    print(f"  lm-eval 0.4.13 hf, batch 1:        {figures['lm_eval_q_per_s']:.2f} questions/s "
          f"({t_theirs:.1f} s)")
    print(f"  ours / lm-eval: {figures['speedup']:.2f}x (goal >= 3x); acc predictions identical on {agree}/{total}; "
          f"largest log-likelihood difference {worst:.1e}")
    print(f"  multiply-adds with the weights: ours {macs_ours / 1e12:.2f} T, lm-eval {macs_theirs / 1e12:.2f} T: "
          f"{macs_theirs / macs_ours:.2f}x, the speedup at equal matrix-product speed")
    mm = {"ours": macs_ours / mine, "lm-eval": macs_theirs / t_theirs}
    print(f"  weight multiply-adds per second: ours {mm['ours'] / 1e9:.1f} G, lm-eval {mm['lm-eval'] / 1e9:.1f} G")
    if cfg.out:
        atomic_write(cfg.out, json.dumps(figures, indent=1))


if __name__ == "__main__":
    run_cli(main)
