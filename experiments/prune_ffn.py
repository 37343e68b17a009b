"""
Experiment tool: a dense LLaMA whose FFN keeps only its most important neurons (the active-parameter control of experiments/ablations.py).

The paper's headline compares LLaMA-MoE with dense models of about the same *activated* size. Our closest
control: the parent itself, every FFN cut to the width one MoE token activates (k * d_h / E neurons: 384 of
SmolLM2's 1536 for 4/16 and for 2/8), keeping the neurons with the largest first-order Taylor importance
(SPEC.md section 2, the same score the sharing methods use: split.taylor_importance), summed over the
importance clusters. Attention, norms and embeddings stay as they are, so this model and the split MoE have
the same attention and the same active FFN width; the MoE additionally holds E/k times the FFN parameters.

    python experiments/prune_ffn.py --src=parent.gguf --dst=runs/x/pruned --keep=384 --data=runs/x/data
    python experiments/prune_ffn.py --src=parent.gguf --dst=runs/x/parent      # --keep=0: convert only

--keep=0 writes the model unchanged (a .gguf -> a checkpoint folder that train.py and eval.py read quickly).
"""
import os
import sys
from dataclasses import dataclass, replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
from configurator import UserError, load_config, run_cli  # noqa: E402
from model import Transformer  # noqa: E402
import split  # noqa: E402


@dataclass
class PruneConfig:
    src: str = ""                 # dense LLaMA: checkpoint folder or .gguf
    dst: str = ""                 # output checkpoint folder (written atomically by save_pretrained)
    keep: int = 0                 # FFN neurons kept per layer; 0 = keep all (plain conversion)
    data: str | None = None       # shard folder of sample text for the importance (needed when keep > 0)
    clusters: int = 16            # importance clusters (as the 16-expert sharing split)
    importance_seqs: int = 2      # sample sequences per cluster
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0


def prune_ffn(dense, keep, importance):
    """Dense Transformer -> dense Transformer with intermediate_size = keep.
    importance: per layer (C, d_h) Taylor scores; a neuron's score is its sum over the C clusters."""
    config = replace(dense.config, intermediate_size=keep)
    with torch.device("meta"):
        pruned = Transformer(config)
    state = {n: t for n, t in dense.state_dict().items() if ".mlp." not in n}
    for layer, block in enumerate(dense.model.layers):
        top = importance[layer].sum(0).topk(keep).indices.sort().values         # (keep,) neuron ids, in order
        head, m = f"model.layers.{layer}.mlp", block.mlp
        state[f"{head}.gate_proj.weight"] = m.gate_proj.weight.detach()[top].clone()      # (keep, d)
        state[f"{head}.up_proj.weight"] = m.up_proj.weight.detach()[top].clone()          # (keep, d)
        state[f"{head}.down_proj.weight"] = m.down_proj.weight.detach()[:, top].clone()   # (d, keep)
    pruned.load_state_dict(state, assign=True)
    if config.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    pruned.inv_freq = dense.inv_freq.clone()
    return pruned.eval()


def main(argv):
    cfg = load_config(PruneConfig(), argv, doc=__doc__)
    if not cfg.src or not cfg.dst or not os.path.exists(cfg.src):
        raise UserError("--src=<dense checkpoint folder or .gguf> (existing) and --dst=<folder> are required")
    dense = checkpoint.load_pretrained(cfg.src, dtype=torch.float32)
    d_h = dense.config.intermediate_size
    if cfg.keep:
        if not 0 < cfg.keep <= d_h:
            raise UserError(f"--keep={cfg.keep} must be in 1..{d_h} (the parent's FFN width)")
        if not cfg.data:
            raise UserError("--keep needs --data=<shard folder>: the Taylor importance is measured on sample text")
        scfg = split.SplitConfig(src=cfg.src, num_experts=cfg.clusters, data=cfg.data,
                                 importance_seqs=cfg.importance_seqs, seq_len=cfg.seq_len,
                                 batch_size=cfg.batch_size, seed=cfg.seed)
        importance = split.taylor_importance(dense, split.importance_batches(dense, scfg))
        dense = prune_ffn(dense, cfg.keep, importance)
    checkpoint.save_pretrained(dense, cfg.dst)
    print(f"wrote {cfg.dst}: dense, FFN {dense.config.intermediate_size} of {d_h} neurons per layer, "
          f"{sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    run_cli(main)
