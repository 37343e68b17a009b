"""
How much does each way of cutting experts cost right after the split, before any continual pretraining?
(SPEC.md section 2.)

A small dense LLaMA is trained for a few minutes on the embedded corpus (or given with --dense), then cut with
every method of split.py for 8/2 and 16/4 experts, with the rescale factor s = E/k and without (s = 1), and each
model's held-out loss is measured on the same validation windows (mean over domains of the per-domain mean
next-token loss; eval mode: clean top-k routing, gates still at their random init).

    python experiments/split_table.py                       # trains out/split_table/dense first (~4 min, CPU)
    python experiments/split_table.py --dense=out/split_table/dense
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
from configurator import UserError, load_config, run_cli  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from sample import DomainSampler, eval_windows, load_meta  # noqa: E402
from split import METHODS, SplitConfig, build_moe, check_split, choose_experts, importance_batches  # noqa: E402
from split import taylor_importance  # noqa: E402


@dataclass
class TableConfig:
    data: str = "data/embedded"
    dense: str | None = None               # a trained dense LLaMA folder; None: train one first
    out: str = "out/split_table/dense"     # where a freshly trained dense model goes
    train_seconds: float = 240
    eval_windows: int = 8                  # validation windows per domain
    seq_len: int = 128
    seed: int = 0


def train_dense(data, out, seconds, seed=0):
    """A small dense LLaMA trained for `seconds` of wall time on uniform domain mixing; saved as HF LLaMA."""
    meta = load_meta(data)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=meta["vocab_size"], hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=meta["bos_id"], eos_token_id=meta["eos_id"])
    model = Transformer(config).train()
    sampler = DomainSampler(data, "train", batch_size=16, seq_len=128, weights="uniform", seed=seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=2e-3, betas=(0.9, 0.95))
    start, step = time.time(), 0
    while time.time() - start < seconds:
        # warmup 20 steps, then cosine over the time budget down to 10% (SPEC section 5's shape)
        frac = min(1.0, (time.time() - start) / seconds)
        lr = 2e-3 * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y, _ = sampler.next_batch()
        loss = model(x, targets=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"  step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f} s)", flush=True)
        step += 1
    checkpoint.save_pretrained(model.eval(), out)
    print(f"trained {step} steps ({step * 16 * 128 / 1e6:.1f}M tokens) -> {out}")


@torch.no_grad()
def held_out_loss(model, windows):
    """Mean over domains of the mean next-token cross-entropy (model(x, y)'s loss: the LM loss alone)."""
    per_domain = []
    for batches in windows.values():
        per_domain.append(torch.stack([model(x, y).loss for x, y in batches]).mean().item())
    return sum(per_domain) / len(per_domain)


def main(argv):
    a = load_config(TableConfig(), argv, doc=__doc__)
    if not os.path.isdir(a.data):
        raise UserError(f"--data={a.data} is not a shard folder: make it with `python data/prepare.py`")
    t0 = time.time()
    if a.dense is None:
        train_dense(a.data, a.out, a.train_seconds, a.seed)
        a.dense = a.out
    dense = checkpoint.load_pretrained(a.dense)
    domains = list(load_meta(a.data)["domains"])
    windows = {d: list(eval_windows(a.data, d, a.seq_len, batch_size=8, max_windows=a.eval_windows))
               for d in domains}
    rows = [("dense", "-", held_out_loss(dense, windows), None)]
    for E, k in ((8, 2), (16, 4)):
        cfg = SplitConfig(num_experts=E, top_k=k, seed=a.seed, importance_seqs=4, seq_len=a.seq_len, data=a.data)
        # Importance depends on the clusters of sample text only (not on the method): compute it once per E.
        importance = taylor_importance(dense, importance_batches(dense, cfg))
        for method in [m for m in METHODS if m != "activation"]:  # activation: experiments/carve_ablations.py
            mcfg = SplitConfig(**{**cfg.__dict__, "method": method})
            width, shared, _, _ = check_split(mcfg, dense.config)
            experts, shared_ix = choose_experts(dense, mcfg, width, shared, importance)
            losses = []
            for scale in (E / k, 1.0):
                moe = build_moe(dense, [(e, s, None, None) for e, s in zip(experts, shared_ix)], E, k, width, shared,
                                scale, seed=a.seed)
                losses.append(held_out_loss(moe, windows))
                del moe
            rows.append((method, f"{k}/{E}", losses[0], losses[1]))
            print(f"  {method:14s} {k}/{E}: s=E/k {losses[0]:.3f}  s=1 {losses[1]:.3f}  "
                  f"(d_e {width}, shared {shared}; {time.time() - t0:.0f} s)", flush=True)
    c = dense.config
    print(f"\nDense: d {c.hidden_size}, d_h {c.intermediate_size}, {c.num_hidden_layers} layers, vocab {c.vocab_size}; "
          f"held-out = {a.eval_windows} windows x {a.seq_len} tokens per domain, {len(domains)} domains, "
          f"mean of per-domain losses; no training after the split.\n")
    print("| method | k/E | loss, rescaled (s = E/k) | loss, s = 1 |")
    print("|---|---|---|---|")
    for method, ke, with_s, without_s in rows:
        print(f"| {method} | {ke} | {with_s:.3f} | {'-' if without_s is None else f'{without_s:.3f}'} |")


if __name__ == "__main__":
    run_cli(main)
