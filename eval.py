"""
Chapter: evaluation. What did the MoE gain, and where do its experts specialise?

Three questions, asked of any checkpoint (a folder: ours, Hugging Face LLaMA, Mixtral, the paper's llama_moe;
or a llama.cpp .gguf file):

  1. Language modelling: per-domain validation loss and perplexity on the held-out shards that
     data/prepare.py wrote (the number the paper's continual-pretraining curves track, SPEC §4-5).
  2. Downstream: multiple-choice tasks scored by log-likelihood exactly as lm-evaluation-harness 0.4 scores
     SciQ, PIQA, ARC, HellaSwag... (SPEC §6): acc, acc_norm (per character) and acc_bytes, with standard
     errors, 0 or k shots. The scoring is its own chapter, multiple_choice.py.
  3. Routing: which experts each domain's tokens go to, per layer, and how different the domains are
     (SPEC §6: "deeper layers show stronger routing preference per domain than shallow layers").

Plus --generate, to read what the model writes. Everything is printed as tables and, with --out, written
as json (the experiment scripts in experiments/ read that json).

    python eval.py --ckpt=out/demo_moe_cpt/final --data=data/embedded
    python eval.py --ckpt=out/demo_moe_cpt/final --shots=3 --out=runs/eval.json
    python eval.py --ckpt=SmolLM2-135M-Instruct.Q4_1.gguf --data=data/smollm --max_items=200
    python eval.py --ckpt=out/demo_moe_cpt/final --data=none --generate="def fibonacci(n):"

Settings are `--key=value` (configurator.py); `python eval.py --help` lists them. Read top to bottom: the
settings, loading and the identity checks, validation loss (+ routing counts from the same forward passes),
where the tasks are, the routing statistics, generation, the tables, main.
"""

import json
import math
import os
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch

import checkpoint
from configurator import UserError, load_config, run_cli, setting
from gate import routing_evenness
from fileio import atomic_file, atomic_write, check_output_file
from model import MoEFeedForward
from multiple_choice import pick_items, prefix_token, read_task, score_task
from sample import load_meta, eval_windows
from tokenizer import Tokenizer, check_same_tokenizer


# ----------------------------------------------------------------------------------------------------------
# 1. Settings

@dataclass
class EvalConfig:
    ckpt: str = ""                    # checkpoint folder (config.json + safetensors) or a .gguf file
    data: str = "data/embedded"       # shard folder (meta.json, {domain}.val.bin, tasks/); "none": no data
    tasks: str | None = None          # folder of *.jsonl or comma-separated files; None -> {data}/tasks; "none"
    tokenizer: str | None = None      # None -> the checkpoint's own (.gguf, tokenizer.model/.json), else the data's
    seq_len: int = setting(256, ge=1)        # validation window length (<= the model's max positions)
    batch_size: int = setting(8, ge=1)       # validation windows per forward pass (a question's choices run together)
    max_windows: int = setting(32, ge=0)     # validation windows per domain, spread evenly; 0 = every window
    shots: int = setting(0, ge=0)            # few-shot examples per multiple-choice question
    max_items: int = setting(100, ge=0)      # questions per task, spread evenly over the file; 0 = all
    seed: int = 1234                  # few-shot draws (lm-eval-harness's default seed is 1234 too)
    # before every prompt: auto (lm-eval: bos iff the tokenizer adds it) | bos | eos | none
    start_token: str = setting("auto", choices=("auto", "bos", "eos", "none"))
    routing: bool = True              # count routed experts during the validation pass (MoE only)
    heatmap: str | None = None        # PNG path; None -> next to --out (routing.png) when --out is given
    generate: str | None = None       # prompt to sample from
    num_samples: int = setting(1, ge=1)
    max_new_tokens: int = setting(64, ge=0)     # prompt + new tokens <= the model's max positions
    temperature: float = setting(0.8, ge=0)     # 0 = greedy
    top_k: int | None = setting(50, ge=1)       # None = the whole vocabulary
    out: str | None = None            # json with every number printed
    device: str | None = setting(None, choices=("cpu", "cuda"))  # None -> cuda if available, else cpu
    dtype: str = setting("float32", choices=("float32", "bfloat16", "float16"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_settings(cfg):
    """Everything that can be checked before a model is loaded: bad values, missing inputs, and outputs that
    could not be written (a folder, a read-only place) fail now, not after an hour of evaluation."""
    if not cfg.ckpt:
        raise UserError("--ckpt is required: a checkpoint folder (config.json + safetensors) or a .gguf file")
    if not os.path.exists(cfg.ckpt):
        raise UserError(f"--ckpt={cfg.ckpt}: no such checkpoint folder or .gguf file")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but this torch sees no CUDA device: use --device=cpu (or leave it unset)")
    if cfg.data != "none":
        if not os.path.isdir(cfg.data) or not os.path.isfile(os.path.join(cfg.data, "meta.json")):
            what = "does not exist" if not os.path.exists(cfg.data) else "is not a shard folder (no meta.json)"
            raise UserError(f"--data={cfg.data} {what}: pass a folder made by data/prepare.py, "
                            f"or --data=none to skip validation loss and the data's tasks")
        try:
            load_meta(cfg.data)
        except (OSError, ValueError) as e:
            raise UserError(f"--data={cfg.data}: {e}") from None
    elif cfg.tasks is None and cfg.generate is None:
        raise UserError("--data=none with no --tasks and no --generate: nothing to evaluate")
    inputs = [("--ckpt", cfg.ckpt), ("--data", cfg.data), ("--tasks", cfg.tasks), ("--tokenizer", cfg.tokenizer)]
    for key in ("out", "heatmap"):
        if getattr(cfg, key):
            try:
                check_output_file(getattr(cfg, key), f"--{key}", inputs)
            except ValueError as e:
                raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------
# 2. Loading: the model, its tokenizer, and the checks that model, tokenizer and data speak the same ids
#
# A token id means something only under the tokenizer that made it. Three records of "which tokenizer" can
# meet here: Tokenizer.fingerprint (the tokenizer we load), meta.json's "tokenizer_sha256" (the one that
# wrote the data's shards) and config.json's "tokenizer_sha256" (the one the model was trained on). Any two
# that are present must agree, else the loss and the scores are silently meaningless.

def load_model(cfg):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        # from_pretrained reads config.json's model_type (llama, mixtral, llama_moe, ours) or a .gguf file.
        model = checkpoint.load_pretrained(cfg.ckpt, dtype=DTYPES[cfg.dtype], device=device)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--ckpt={cfg.ckpt}: {e}") from None
    return model.eval()


def model_format(ckpt):
    if os.path.isfile(ckpt):
        return "gguf"
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f).get("model_type", "?")


def data_tokenizer_path(data):
    """The tokenizer meta.json names: a file in the data folder, or an absolute path (a .gguf, a folder)."""
    return os.path.join(data, load_meta(data).get("tokenizer", "tokenizer.model"))


def find_tokenizer(cfg):
    """--tokenizer; else the checkpoint's own (a .gguf carries one; a folder may hold tokenizer.model,
    tokenizer.json, or LLaMA-3's original/tokenizer.model); else the data folder's (our demo models)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if os.path.isfile(cfg.ckpt):
        return cfg.ckpt
    for name in ("tokenizer.model", "tokenizer.json", os.path.join("original", "tokenizer.model")):
        if os.path.isfile(os.path.join(cfg.ckpt, name)):
            return os.path.join(cfg.ckpt, name)
    if cfg.data != "none" and os.path.exists(data_tokenizer_path(cfg.data)):
        return data_tokenizer_path(cfg.data)
    raise UserError(f"no tokenizer found in {cfg.ckpt}" + ("" if cfg.data == "none" else f" or {cfg.data}") +
                    ": pass --tokenizer=path/to/tokenizer.model (or tokenizer.json, or the model's .gguf)")


def load_tokenizer(path):
    try:
        return Tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"tokenizer {path}: {e}") from None


def check_vocabulary(cfg, tok, model):
    """Refuse a tokenizer, data folder or checkpoint that disagree on the vocabulary (see above)."""
    have = {"the tokenizer " + tok.path: tok.fingerprint,
            f"the checkpoint {cfg.ckpt} (config.json)": model.config.tokenizer_sha256}
    if cfg.data != "none":
        meta = load_meta(cfg.data)
        have[f"the data {cfg.data} (meta.json)"] = meta.get("tokenizer_sha256")
        if meta["vocab_size"] > model.config.vocab_size:
            raise UserError(f"--data={cfg.data} holds token ids up to {meta['vocab_size'] - 1} but the model has "
                            f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
    try:
        check_same_tokenizer(have, "the scores would be meaningless. Prepare the data with the model's tokenizer "
                                   "(python data/prepare.py --tokenizer=...) and pass --data=DIR, or pass the "
                                   "model's own tokenizer with --tokenizer")
    except ValueError as e:
        raise UserError(str(e)) from None
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, the model only "
                        f"{model.config.vocab_size}: pass the model's own tokenizer with --tokenizer")


def start_tokens(choice, tok):
    """The token(s) every prompt (question or --generate text) starts after, and why.

    auto follows lm-evaluation-harness 0.4 (`--model hf`): a prompt is encoded the way the model's Hugging
    Face tokenizer encodes by default, i.e. with BOS in front when the tokenizer adds it (LLaMA-1/2/3: yes;
    GPT-2-style byte-level BPE such as SmolLM2: no) - Tokenizer.add_bos. `eos` is what a model of our own
    shards saw before each document (data/prepare.py ends every document with eos); `bos` / `none` force."""
    if choice == "auto":
        return ([tok.bos_id], "auto: bos (the tokenizer adds it, as lm-eval)") if tok.add_bos else \
            ([], "auto: none (the tokenizer adds no bos, as lm-eval)")
    if choice in ("bos", "eos"):
        token = tok.bos_id if choice == "bos" else tok.eos_id
        if token is None or token < 0:
            raise UserError(f"--start_token={choice}: tokenizer {tok.path} has no {choice} token")
        return [token], choice
    return [], "none"


def moe_layer_ids(model):
    """Indices of the layers whose FFN is an MoE layer (all of them after split.py; none for dense LLaMA)."""
    return [i for i, block in enumerate(model.model.layers) if isinstance(block.mlp, MoEFeedForward)]


# ----------------------------------------------------------------------------------------------------------
# 3. Validation loss per domain, and routing counts from the same forward passes
#
# The loss is the plain next-token cross-entropy in nats, averaged over every target token of the windows:
# model(x, y).loss is exactly that (the MoE balance loss, a training signal, is kept apart in .balance_loss),
# so a dense model and its MoE are compared on the same quantity. Windows come from sample.eval_windows: a
# fixed, evenly spread set of slots per domain, so two checkpoints are always scored on the same tokens.

@torch.no_grad()
def validation(model, data_dir, seq_len, batch_size=8, max_windows=32, routing=True):
    """-> ({domain: {"loss", "ppl", "tokens"}}, routing counts or None).

    Routing counts (when the model has MoE layers): "selected" (L, D, E) int64 = how often each expert was
    among a token's k choices; "top1" (L, D, E) = how often it was the first choice. D in meta.json order."""
    domains = list(load_meta(data_dir)["domains"])
    device = model.lm_head.weight.device
    layers = moe_layer_ids(model) if routing else []
    E = model.config.num_experts
    selected = torch.zeros(len(layers), len(domains), max(E, 1), dtype=torch.int64)  # (L, D, E)
    top1 = torch.zeros_like(selected)
    results = {}
    for di, domain in enumerate(domains):
        nll, count, batch_losses = 0.0, 0, []
        for x, y in eval_windows(data_dir, domain, seq_len, batch_size, max_windows or None):
            out = model(x.to(device), y.to(device))                         # model.ModelOutput
            loss = out.loss                                                 # mean over the b*T targets
            nll += loss.item() * y.numel()
            count += y.numel()
            batch_losses.append(loss.item())  # --batch_size=1: one per window, for the standard error
            for li, gate in enumerate(out.routing if layers else ()):        # one per MoE layer, in order
                ids = gate.expert_ids                                           # (b*T, k), best first
                selected[li, di] += torch.bincount(ids.flatten(), minlength=E).cpu()
                top1[li, di] += torch.bincount(ids[:, 0], minlength=E).cpu()
        loss = nll / count
        results[domain] = {"loss": loss, "ppl": math.exp(loss), "tokens": count, "batch_losses": batch_losses}
    counts = {"layers": layers, "domains": domains, "selected": selected, "top1": top1} if layers else None
    return results, counts


# ----------------------------------------------------------------------------------------------------------
# 4. Multiple-choice tasks: where they are (the scoring is its own chapter, multiple_choice.py)

def find_tasks(cfg):
    """{task name: jsonl path}: --tasks, else the data folder's tasks/ (which may be absent)."""
    if cfg.tasks == "none":
        return {}
    if cfg.tasks is None:
        folder = os.path.join(cfg.data, "tasks") if cfg.data != "none" else None
        if not folder or not os.path.isdir(folder):
            return {}
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")]
    elif os.path.isdir(cfg.tasks):
        paths = [os.path.join(cfg.tasks, f) for f in sorted(os.listdir(cfg.tasks)) if f.endswith(".jsonl")]
        if not paths:
            raise UserError(f"--tasks={cfg.tasks}: the folder holds no .jsonl files")
    else:
        paths = cfg.tasks.split(",")
    for p in paths:
        if not os.path.isfile(p):
            raise UserError(f"task file {p} not found: --tasks takes a folder of .jsonl files or "
                            f"comma-separated .jsonl paths")
    return {os.path.basename(p).removesuffix(".jsonl"): p for p in paths}


# ----------------------------------------------------------------------------------------------------------
# 5. Routing statistics: does each domain have its own experts?
#
# Per layer l and domain d, p_{l,d} is the distribution of the experts selected for d's tokens (all k slots).
# Specialisation, two ways:
#   JS: the generalised Jensen-Shannon divergence of the D domains' distributions, equal weights,
#           JS = H(mean_d p_d) - mean_d H(p_d)          (entropies in bits)
#       0 when all domains route alike, log2(D) at most (disjoint supports); we divide by log2(D) to get
#       [0, 1]. (With D*k > E the domains cannot all be disjoint and 1 is out of reach.)
#   favourite share: each domain's favourite expert is the one most often ranked first for its tokens;
#       the share of all tokens whose first choice is their own domain's favourite. It measures how much
#       one expert dominates a domain, not how domains differ: a collapsed gate sending everything to one
#       expert scores 1 here and 0 on JS. Read the two together.

def entropy_bits(p):
    """Entropy in bits along the last axis, with 0 log 0 = 0."""
    p = np.asarray(p, dtype=np.float64)
    logs = np.log2(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(-1)


def js_divergence(p):
    """(D, E) rows = distributions -> generalised JS divergence / log2(D), in [0, 1]."""
    p = np.asarray(p, dtype=np.float64)
    if p.shape[0] < 2:
        return float("nan")  # one domain: nothing to compare
    js = entropy_bits(p.mean(0)) - entropy_bits(p).mean()
    return float(max(js, 0.0) / math.log2(p.shape[0]))  # max: clip -1e-16 rounding noise


def routing_report(counts):
    """Routing counts from validation() -> per-layer distributions, JS and favourite shares (json-able)."""
    selected = counts["selected"].double().numpy()                      # (L, D, E)
    top1 = counts["top1"].double().numpy()                              # (L, D, E)
    dist = selected / selected.sum(-1, keepdims=True)                   # (L, D, E), rows sum to 1
    favourite = top1.argmax(-1)                                         # (L, D)
    fav_hits = np.take_along_axis(top1, favourite[..., None], -1)[..., 0].sum(-1)  # (L,)
    evenness = [routing_evenness(torch.from_numpy(s.sum(0))) for s in selected]   # per layer, all domains
    return {"layers": counts["layers"], "domains": counts["domains"],
            "experts_in_use": [n for n, _ in evenness],          # experts with >= 1% of the routed pairs
            "busiest_share": [b for _, b in evenness],           # the share of the most-used expert
            "tokens": {d: int(top1[0, i].sum()) for i, d in enumerate(counts["domains"])},
            "js": [js_divergence(dist[l]) for l in range(len(dist))],
            "favourite_share": (fav_hits / top1.sum((-1, -2))).tolist(),
            "favourite_expert": favourite.tolist(),
            "distribution": dist.tolist()}


SHADES = " .:-=+*#%@"  # light to dark, for the text heatmap


def text_heatmap(report):
    """Layers x experts per domain as characters (darker = larger share), domains side by side."""
    dist = np.array(report["distribution"])                             # (L, D, E)
    top = dist.max() or 1.0  # the darkest character stands for the largest share anywhere
    E = dist.shape[-1]
    names = [d[:E].ljust(E) for d in report["domains"]]
    lines = ["layer | " + " | ".join(names)]
    for l, layer in enumerate(report["layers"]):
        cells = ["".join(SHADES[min(int(v / top * len(SHADES)), len(SHADES) - 1)] for v in dist[l, d])
                 for d in range(dist.shape[1])]
        lines.append(f"{layer:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def save_heatmap(report, path):
    """A PNG: one panel per domain, layers (rows) x experts (columns), colour = share of the domain's
    selections. matplotlib is optional (not in requirements.txt): without it we say so and skip."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no heatmap image, see the text heatmap"
    dist = np.array(report["distribution"])                             # (L, D, E)
    L, D, E = dist.shape
    fig, axes = plt.subplots(1, D, figsize=(1.2 + 0.35 * E * D, 0.9 + 0.35 * L), squeeze=False)
    for d, ax in enumerate(axes[0]):
        im = ax.imshow(dist[:, d, :], vmin=0.0, vmax=dist.max(), cmap="viridis", aspect="auto")
        ax.set_title(report["domains"][d], fontsize=8)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_yticks(range(L), [str(l) for l in report["layers"]], fontsize=6)
        ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=6)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of selections")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# 6. Generation

def generate_samples(model, tok, prompt, start=(), num_samples=1, max_new_tokens=64, temperature=0.8, top_k=50):
    device = model.lm_head.weight.device
    ids = list(start) + tok.encode(prompt)
    ids = ids or [prefix_token(tok)]  # an empty prompt with no start token: begin after bos (or eos)
    room = model.config.max_position_embeddings - len(ids)
    if room <= 0:
        raise UserError(f"--generate: the prompt has {len(ids)} tokens, the model holds "
                        f"{model.config.max_position_embeddings}")
    if max_new_tokens > room:
        print(f"[eval] note: --max_new_tokens={max_new_tokens} lowered to {room}, the positions the model has "
              f"left after the prompt's {len(ids)}")
        max_new_tokens = room
    idx = torch.tensor([ids] * num_samples, dtype=torch.int64, device=device)  # (n, S)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    return [prompt + tok.decode(row[len(ids):].tolist()) for row in out]


# ----------------------------------------------------------------------------------------------------------
# 7. Tables

def print_tables(results):
    if "val" in results:
        v = results["val"]
        print(f"\nvalidation loss (nats/token; {results['val_setup']})")
        print(f"{'domain':<16}{'loss':>8}{'ppl':>10}{'tokens':>10}")
        for d, r in v["domains"].items():
            print(f"{d:<16}{r['loss']:>8.4f}{r['ppl']:>10.2f}{r['tokens']:>10,}")
        print(f"{'mean':<16}{v['mean_loss']:>8.4f}{math.exp(v['mean_loss']):>10.2f}")
    if results.get("tasks"):
        print(f"\nmultiple choice ({results['shots']}-shot, start token {results['start_token']}; lm-eval's "
              f"acc_norm = loglik / characters of the choice; +- one standard error)")
        print(f"{'task':<18}{'n':>5}{'acc':>16}{'acc_norm':>16}{'chance':>8}")
        for name, r in results["tasks"].items():
            print(f"{name:<18}{r['n']:>5}{r['acc']:>9.3f} +-{r['acc_stderr']:.3f}"
                  f"{r['acc_norm']:>9.3f} +-{r['acc_norm_stderr']:.3f}{r['chance']:>8.3f}")
        print(f"{'average':<18}{'':>5}{results['tasks_mean']['acc']:>9.3f}{'':>7}"
              f"{results['tasks_mean']['acc_norm']:>9.3f}")
    if results.get("routing"):
        r = results["routing"]
        print("\nrouting per layer (JS: domains' expert distributions, 0 = alike, 1 = disjoint;\n"
              "fav: share of tokens whose first expert is their domain's favourite)")
        print(f"{'layer':>5}{'JS':>8}{'fav':>8}{'in use':>8}{'busiest':>9}  favourite expert per domain "
              f"({', '.join(r['domains'])})")
        for i, layer in enumerate(r["layers"]):
            print(f"{layer:>5}{r['js'][i]:>8.3f}{r['favourite_share'][i]:>8.3f}{r['experts_in_use'][i]:>8}"
                  f"{r['busiest_share'][i]:>9.3f}  {r['favourite_expert'][i]}")
        top = max(max(max(row) for row in layer) for layer in r["distribution"])
        print(f"\nshare of each domain's selections per expert ('{SHADES[-1]}' = {top:.2f}, "
              f"'{SHADES[0]}' = 0; uniform would be {1 / len(r['distribution'][0][0]):.2f})")
        print(text_heatmap(r))
        print(f"heatmap: {results['heatmap']}")
    for i, s in enumerate(results.get("samples", [])):
        print(f"\n--- sample {i} ---\n{s}")


# ----------------------------------------------------------------------------------------------------------
# 8. Putting it together

def evaluate(cfg):
    """Run every part the settings ask for -> a json-able dict (also written to cfg.out)."""
    t0 = time.time()
    check_settings(cfg)
    tasks = find_tasks(cfg)
    model = load_model(cfg)
    positions = model.config.max_position_embeddings
    if cfg.seq_len > positions:
        print(f"[eval] note: --seq_len={cfg.seq_len} lowered to the model's {positions} positions")
        cfg.seq_len = positions
    tok_path = find_tokenizer(cfg)
    tok = load_tokenizer(tok_path)
    check_vocabulary(cfg, tok, model)
    start, start_how = start_tokens(cfg.start_token, tok)
    print(f"[eval] {cfg.ckpt}: tokenizer {tok_path}; start token: {start_how} {start}")
    results = {"ckpt": cfg.ckpt, "settings": asdict(cfg), "model": {
        "format": model_format(cfg.ckpt),
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_experts": model.config.num_experts,
        "num_experts_per_tok": model.config.num_experts_per_tok if model.config.is_moe else 0},
        "tokenizer": tok_path, "start_token": start_how, "start_ids": start}

    if cfg.data != "none":
        t = time.time()
        val, counts = validation(model, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_windows, cfg.routing)
        results["val_setup"] = (f"{cfg.max_windows or 'all'} windows x {cfg.seq_len} tokens per domain"
                                if cfg.max_windows else f"all windows x {cfg.seq_len} tokens")
        # The mean weighs every domain equally (as the paper's per-domain curves do), not by token count.
        results["val"] = {"domains": val, "mean_loss": float(np.mean([r["loss"] for r in val.values()]))}
        results["wall_s_val"] = round(time.time() - t, 2)
        if counts is not None:
            results["routing"] = routing_report(counts)
            heatmap = cfg.heatmap or (os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "routing.png")
                                      if cfg.out else None)
            results["heatmap"] = (save_heatmap(results["routing"], heatmap) if heatmap
                                  else "not written (no --out or --heatmap)")

    if tasks:
        t = time.time()
        results["shots"], results["tasks"] = cfg.shots, {}
        for name, path in tasks.items():
            items = read_task(path)
            results["tasks"][name] = score_task(model, tok, items, cfg.shots, cfg.seed, start,
                                                pick_items(len(items), cfg.max_items))
        results["tasks_mean"] = {m: float(np.mean([r[m] for r in results["tasks"].values()]))
                                 for m in ("acc", "acc_norm", "acc_bytes")}
        results["wall_s_tasks"] = round(time.time() - t, 2)
        n = sum(r["n"] for r in results["tasks"].values())
        print(f"[eval] multiple choice: {n} questions in {results['wall_s_tasks']:.1f} s "
              f"({n / max(results['wall_s_tasks'], 1e-9):.2f} questions/s)")

    if cfg.generate is not None:
        results["samples"] = generate_samples(model, tok, cfg.generate, start, cfg.num_samples,
                                              cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    results["wall_s"] = round(time.time() - t0, 2)
    if cfg.out:
        atomic_write(cfg.out, json.dumps(results, indent=1))
    return results


def main(argv=None):
    cfg = load_config(EvalConfig(), argv or [], doc=__doc__)
    results = evaluate(cfg)
    print_tables(results)
    print(f"\n[eval] {results['wall_s']:.1f} s" + (f", json: {cfg.out}" if cfg.out else ""))
    return results


if __name__ == "__main__":
    run_cli(main)
