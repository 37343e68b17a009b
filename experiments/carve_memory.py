"""
Experiment: peak memory of `split.py --method=activation --router_init=fit` on a LLaMA-2-7B-shaped checkpoint.

LLaMA-2 7B's layer shapes (d 4096, FFN 11008, 32 heads, vocabulary 32000) in bf16 with synthetic weights,
--layers of them (32 = the real depth, 13.5 GB; the default 4 keeps the run to a few minutes and makes the
fixed costs - Python, torch, embeddings, the profile - weigh MORE against the model, not less). The checkpoint
is written to --out, then split.py runs in a fresh process, which prints its own peak RSS; this prints that
against the checkpoint's size.

    python experiments/carve_memory.py --layers=4 --out=runs/carve_memory
"""
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from configurator import load_config, run_cli  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402


@dataclass
class MemConfig:
    out: str = "runs/carve_memory"
    layers: int = 4
    profile_seqs: int = 16             # split.py's default: 16 x 256 = 4,096 profiled tokens
    seq_len: int = 256


def main(argv):
    cfg = load_config(MemConfig(), argv, doc=__doc__)
    src, data, dst = (os.path.join(cfg.out, n) for n in ("dense", "data", "moe"))
    if not os.path.exists(os.path.join(src, "config.json")):
        config = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=cfg.layers, num_attention_heads=32, max_position_embeddings=4096)
        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device="cpu").to(torch.bfloat16)
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        model.inv_freq = torch.ones(1)  # unused by save_pretrained
        checkpoint.save_pretrained(model, src)
        del model
    if not os.path.exists(os.path.join(data, "meta.json")):  # a shard folder of random tokens, one domain
        os.makedirs(data, exist_ok=True)
        rng = np.random.default_rng(0)
        for split in ("train", "val"):
            rng.integers(3, 32000, size=200_000).astype(np.uint16).tofile(os.path.join(data, f"text.{split}.bin"))
        with open(os.path.join(data, "meta.json"), "w") as f:
            json.dump({"vocab_size": 32000, "dtype": "uint16", "bos_id": 1, "eos_id": 2,
                       "domains": {"text": {"train_tokens": 200_000, "val_tokens": 200_000}}}, f)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
    r = subprocess.run([sys.executable, "split.py", f"--src={src}", f"--dst={dst}", "--method=activation",
                        "--num_experts=14", "--top_k=2", "--router_init=fit", f"--data={data}", "--overwrite",
                        f"--profile_seqs={cfg.profile_seqs}", f"--seq_len={cfg.seq_len}"],
                       cwd=ROOT, capture_output=True, text=True)
    print(r.stdout + r.stderr)
    peak = float(re.search(r"peak memory \(RSS\) ([0-9.]+) GiB", r.stdout).group(1))
    print(f"{cfg.layers} LLaMA-2-7B-shaped layers, bf16: checkpoint {size / 2**30:.2f} GiB, split.py peak RSS "
          f"{peak:.2f} GiB = {peak / (size / 2**30):.2f}x the model")


if __name__ == "__main__":
    run_cli(main)
