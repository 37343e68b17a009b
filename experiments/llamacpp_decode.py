"""Batch-1 decode tokens/s: ours (Transformer.decode_step, eager and compiled) against llama.cpp's llama-bench on the
same F32 weights and thread count, rounds interleaved (ours dense, ours MoE, llama.cpp dense, llama.cpp MoE, ...),
medians.

    python experiments/llamacpp_decode.py --dense=DIR --moe=DIR --dense_gguf=F --moe_gguf=F --llama_bench=PATH

The folders are what the GGUFs were converted from (a Hugging Face LLaMA and its Mixtral-format split; README
"Benchmarks" has the commands), so both sides decode the same numbers. llama-bench runs `-p 0 -n new_tokens`
(decode only, after an empty prompt); ours decodes new_tokens after a prompt_tokens prompt, timing decode alone.
"""
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import checkpoint  # noqa: E402
from bench import generation  # noqa: E402
from configurator import UserError, load_config, run_cli  # noqa: E402
from fileio import atomic_write  # noqa: E402


@dataclass
class Config:
    dense: str = "out/lm_eval_speed/hf"
    moe: str = "out/llamacpp/moe16x4"
    dense_gguf: str = "out/llamacpp/dense-f32.gguf"
    moe_gguf: str = "out/llamacpp/moe16x4-f32.gguf"
    llama_bench: str = ""
    threads: int = 1
    prompt_tokens: int = 32
    new_tokens: int = 64
    rounds: int = 5
    compile: bool = True
    out: str = ""


def llama_bench(cfg, gguf):
    """Decode tokens/s of one llama-bench run."""
    cmd = [cfg.llama_bench, "-m", gguf, "-t", str(cfg.threads), "-p", "0", "-n", str(cfg.new_tokens), "-r", "1",
           "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout)[0]["avg_ts"]


def main(argv):
    cfg = load_config(Config(), argv, doc=__doc__)
    for path in (cfg.dense, cfg.moe, cfg.dense_gguf, cfg.moe_gguf, cfg.llama_bench):
        if not path or not os.path.exists(path):
            raise UserError(f"{path or '--llama_bench'}: not found (see the docstring)")
    torch.set_num_threads(cfg.threads)
    ours = {"dense": checkpoint.load_pretrained(cfg.dense), "moe": checkpoint.load_pretrained(cfg.moe)}
    prompt = torch.randint(0, 1000, (1, cfg.prompt_tokens), generator=torch.Generator().manual_seed(0))
    runs, records = {}, {}
    for name, model in ours.items():
        for compiled in (False, True) if cfg.compile else (False,):
            key = f"ours {name}, {'compiled' if compiled else 'eager'}"
            records[key] = {"times": []}
            runs[key] = generation(model, prompt, cfg.new_tokens, compiled, "cpu", records[key])
            runs[key]()  # warm-up (and compilation)
            records[key]["times"].clear()
    tok_s = {k: [] for k in runs} | {"llama.cpp dense": [], "llama.cpp moe": []}
    for _ in range(cfg.rounds):
        for key, run in runs.items():
            run()
            tok_s[key].append(cfg.new_tokens / records[key]["times"][-1][1])
        tok_s["llama.cpp dense"].append(llama_bench(cfg, cfg.dense_gguf))
        tok_s["llama.cpp moe"].append(llama_bench(cfg, cfg.moe_gguf))
    med = {k: statistics.median(v) for k, v in tok_s.items()}
    load = os.getloadavg()[0]
    print(f"decode tokens/s, batch 1, {cfg.threads} thread(s), F32, median of {cfg.rounds} interleaved rounds "
          f"(load average {load:.1f} at the end)")
    for k, v in med.items():
        print(f"   {k:28s} {v:8.2f}")
    for side in ("ours dense, eager", "ours dense, compiled", "ours moe, eager", "ours moe, compiled"):
        if side in med:
            other = "llama.cpp moe" if "moe" in side else "llama.cpp dense"
            print(f"   {side} / {other}: {med[side] / med[other]:.2f}x")
    print(f"   MoE / dense: llama.cpp {med['llama.cpp moe'] / med['llama.cpp dense']:.2f}x, ours eager "
          f"{med['ours moe, eager'] / med['ours dense, eager']:.2f}x" +
          (f", ours compiled {med['ours moe, compiled'] / med['ours dense, compiled']:.2f}x" if cfg.compile else ""))
    if cfg.out:
        atomic_write(cfg.out, json.dumps({"tok_s": tok_s, "median": med, "config": vars(cfg)}, indent=1))


if __name__ == "__main__":
    run_cli(main)
