"""
Chapter: evaluation. What did the MoE gain, and where do its experts specialise?

Three questions, asked of any checkpoint folder (ours, Hugging Face LLaMA, Mixtral, the paper's llama_moe):

  1. Language modelling: per-domain validation loss and perplexity on the held-out shards that
     data/prepare.py wrote (the number the paper's continual-pretraining curves track, SPEC §4-5).
  2. Downstream: multiple-choice tasks scored by log-likelihood, exactly the way lm-eval-harness scores
     SciQ, PIQA, ARC, HellaSwag... (SPEC §6): acc and length-normalised acc_norm, 0 or k shots.
  3. Routing: which experts each domain's tokens go to, per layer, and how different the domains are
     (SPEC §6: "deeper layers show stronger routing preference per domain than shallow layers").

Plus --generate, to read what the model writes. Everything is printed as tables and, with --out, written
as json (the experiment scripts in experiments/ read that json).

    python eval.py --ckpt out/demo_moe_cpt/final --data data/embedded
    python eval.py --ckpt out/demo_moe_cpt/final --data data/embedded --shots 3 --out runs/eval.json
    python eval.py --ckpt /models/Llama-2-7b-hf --data data/llama2_tokenized --dtype bfloat16 --max_windows 8
    python eval.py --ckpt out/demo_moe_cpt/final --generate "def fibonacci(n):" --max_new_tokens 64

Read top to bottom: the settings, loading, validation loss (+ routing counts from the same forward passes),
multiple choice, the routing statistics, generation, the tables, main.
"""

import argparse
import filecmp
import json
import math
import os
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F

from model import Transformer, MoEFeedForward
from sample import load_meta, eval_windows
from tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------------
# 1. Settings

@dataclass
class EvalConfig:
    ckpt: str                         # checkpoint folder: config.json + safetensors
    data: str = "data/embedded"       # shard folder (meta.json, {domain}.val.bin, tokenizer.model, tasks/)
    tasks: str | None = None          # folder of *.jsonl or comma-separated files; None -> {data}/tasks; "none"
    tokenizer: str | None = None      # None -> {ckpt}/tokenizer.model, {ckpt}/original/..., {data}/tokenizer.model
    seq_len: int = 256                # validation window length (capped by the model's max positions)
    batch_size: int = 8               # windows (or choices) per forward pass
    max_windows: int = 32             # validation windows per domain, spread evenly; 0 = every window
    shots: int = 0                    # few-shot examples per multiple-choice question
    max_items: int = 100              # questions per task, spread evenly over the file; 0 = all
    seed: int = 1234                  # few-shot draws (lm-eval-harness's default seed is 1234 too)
    doc_start: str = "auto"           # token before every prompt: auto | bos | eos | none (see doc_start_id)
    routing: bool = True              # count routed experts during the validation pass (MoE only)
    heatmap: str | None = None        # PNG path; None -> next to --out (routing.png) when --out is given
    generate: str | None = None       # prompt to sample from
    num_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 50
    out: str | None = None            # json with every number printed
    device: str | None = None         # None -> cuda if available, else cpu
    dtype: str = "float32"            # float32 | bfloat16 | float16


# ----------------------------------------------------------------------------------------------------------
# 2. Loading: the model (any format model.py reads) and the tokenizer that goes with it

def load_model(cfg):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise ValueError(f"--dtype {cfg.dtype!r} is not supported: use one of {', '.join(dtypes)}")
    # from_pretrained reads config.json's model_type: llama, mixtral, llama_moe or our native MoE.
    return Transformer.from_pretrained(cfg.ckpt, dtype=dtypes[cfg.dtype], device=device).eval()


def find_tokenizer(cfg):
    """The tokenizer file: --tokenizer, else one inside the checkpoint (Hugging Face LLaMA-2 keeps
    tokenizer.model at the top, LLaMA-3 under original/), else the data folder's (our demo models)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    candidates = [os.path.join(cfg.ckpt, "tokenizer.model"), os.path.join(cfg.ckpt, "original", "tokenizer.model")]
    if cfg.data and os.path.isfile(os.path.join(cfg.data, "meta.json")):
        candidates.append(os.path.join(cfg.data, load_meta(cfg.data).get("tokenizer", "tokenizer.model")))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no tokenizer.model found (looked at {', '.join(candidates)}): pass "
                            f"--tokenizer path/to/tokenizer.model, or --data a folder made by data/prepare.py")


def doc_start_id(cfg, tok, tokenizer_path):
    """The token every prompt (question or --generate text) starts after.

    lm-eval-harness feeds a prefix token only when the context is empty; otherwise the prompt starts cold.
    A tiny model trained on our shards has never seen a cold start: data/prepare.py writes each document
    followed by eos, so every document it learnt from began right after an eos. We give it that eos.
    A Hugging Face LLaMA was trained with bos at document starts, so it gets bos. 'auto' tells the two
    apart by the tokenizer: the data folder's own file (same bytes) means a model of our shards."""
    choice = cfg.doc_start
    if choice == "auto":
        ours = None
        if cfg.data and os.path.isfile(os.path.join(cfg.data, "meta.json")):
            ours = os.path.join(cfg.data, load_meta(cfg.data).get("tokenizer", "tokenizer.model"))
        same = ours is not None and os.path.isfile(ours) and filecmp.cmp(ours, tokenizer_path, shallow=False)
        choice = "eos" if same else "bos"
    if choice == "none":
        return []
    if choice in ("bos", "eos"):
        return [tok.bos_id if choice == "bos" else tok.eos_id]
    raise ValueError(f"--doc_start {cfg.doc_start!r}: use auto, bos, eos or none")


def check_data_tokenizer(cfg):
    """Validation shards are token ids: they mean something only under the tokenizer that wrote them. A
    checkpoint that ships its own tokenizer.model (Hugging Face LLaMA) must match the data folder's, i.e. the
    data must have been prepared with it (data/prepare.py --tokenizer copies it in)."""
    theirs = [p for p in (os.path.join(cfg.ckpt, "tokenizer.model"),
                          os.path.join(cfg.ckpt, "original", "tokenizer.model")) if os.path.isfile(p)]
    ours = os.path.join(cfg.data, load_meta(cfg.data).get("tokenizer", "tokenizer.model"))
    if theirs and os.path.isfile(ours) and not filecmp.cmp(theirs[0], ours, shallow=False):
        raise ValueError(f"{cfg.data} was tokenised with {ours}, but the checkpoint's tokenizer is {theirs[0]}: "
                         f"its validation loss would be meaningless. Prepare the data with the model's tokenizer "
                         f"(python data/prepare.py --jsonl ... --tokenizer {theirs[0]} --out DIR) and pass --data DIR")


def moe_layer_ids(model):
    """Indices of the layers whose FFN is an MoE layer (all of them after split.py; none for dense LLaMA)."""
    return [i for i, block in enumerate(model.model.layers) if isinstance(block.mlp, MoEFeedForward)]


# ----------------------------------------------------------------------------------------------------------
# 3. Validation loss per domain, and routing counts from the same forward passes
#
# The loss is the plain next-token cross-entropy in nats, averaged over every target token of the windows.
# model(x, targets) would add the MoE balance loss (SPEC §3) - a training signal, not a property of the
# language model - so we compute the cross-entropy from the logits ourselves: a dense model and its MoE are
# then compared on the same quantity. Windows come from sample.eval_windows: a fixed, evenly spread set of
# slots per domain, so two checkpoints are always scored on the same tokens.

@torch.no_grad()
def validation(model, data_dir, seq_len, batch_size=8, max_windows=32, routing=True):
    """-> ({domain: {"loss", "ppl", "tokens"}}, routing counts or None).

    Routing counts (when the model has MoE layers): "selected" (L, D, E) int64 = how often each expert was
    among a token's k choices; "top1" (L, D, E) = how often it was the first choice. D in meta.json order."""
    domains = list(load_meta(data_dir)["domains"])
    seq_len = min(seq_len, model.config.max_position_embeddings)
    device = model.lm_head.weight.device
    layers = moe_layer_ids(model) if routing else []
    E = model.config.num_experts
    selected = torch.zeros(len(layers), len(domains), max(E, 1), dtype=torch.int64)  # (L, D, E)
    top1 = torch.zeros_like(selected)
    results = {}
    for di, domain in enumerate(domains):
        nll, count = 0.0, 0
        for x, y in eval_windows(data_dir, domain, seq_len, batch_size, max_windows or None):
            logits, _ = model(x.to(device))                                   # (b, T, V)
            nll += F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
            for li, layer in enumerate(layers):
                ids = model.model.layers[layer].mlp.last_gate.expert_ids       # (b*T, k), best first
                selected[li, di] += torch.bincount(ids.flatten(), minlength=E).cpu()
                top1[li, di] += torch.bincount(ids[:, 0], minlength=E).cpu()
        loss = nll / count
        results[domain] = {"loss": loss, "ppl": math.exp(loss), "tokens": count}
    counts = {"layers": layers, "domains": domains, "selected": selected, "top1": top1} if layers else None
    return results, counts


# ----------------------------------------------------------------------------------------------------------
# 4. Multiple choice by log-likelihood (lm-eval-harness's `loglikelihood` requests)
#
# For a question with context c and choices a_1..a_n, the model's answer is the choice with the highest
#     log P(a_i | c) = sum over the tokens of a_i of log p(token | everything before it).
# acc compares raw sums, which favours short choices (fewer tokens, fewer negative terms). acc_norm divides
# each sum by the choice's length before comparing; we use the UTF-8 byte length (lm-eval-harness divides
# by len(choice) in characters, identical for ASCII text; bytes do not depend on the script, and do not
# depend on the tokenizer either, which is why neither harness divides by the token count).
#
# Tokenisation follows lm-eval-harness's _encode_pair: encode context+choice as one string and take the
# tokens after the context's own encoding as the continuation; spaces that end the context are moved to
# the front of the choice first, because BPE vocabularies glue a space to the word after it (" Paris").

def read_task(path):
    """A jsonl file of {"context": str, "choices": [str, ...], "label": int} -> list of items, checked."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid json ({e})") from None
            ok = (isinstance(item, dict) and isinstance(item.get("context"), str)
                  and isinstance(item.get("choices"), list) and len(item["choices"]) >= 2
                  and all(isinstance(c, str) and c for c in item["choices"])
                  and isinstance(item.get("label"), int) and 0 <= item["label"] < len(item["choices"]))
            if not ok:
                raise ValueError(f"{path}:{lineno}: expected {{\"context\": str, \"choices\": [>= 2 non-empty str], "
                                 f"\"label\": index into choices}}, got {line.strip()[:120]!r}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no questions in the file")
    return items


def find_tasks(cfg):
    """{task name: jsonl path}. A missing default folder is not an error (the data may have no tasks)."""
    if cfg.tasks == "none":
        return {}
    if cfg.tasks is None:
        folder = os.path.join(cfg.data, "tasks") if cfg.data else None
        if not folder or not os.path.isdir(folder):
            return {}
        paths = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".jsonl")]
    elif os.path.isdir(cfg.tasks):
        paths = [os.path.join(cfg.tasks, f) for f in sorted(os.listdir(cfg.tasks)) if f.endswith(".jsonl")]
    else:
        paths = cfg.tasks.split(",")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"task file {p} not found: --tasks takes a folder of .jsonl files or "
                                    f"comma-separated .jsonl paths")
    return {os.path.basename(p)[:-len(".jsonl")] if p.endswith(".jsonl") else os.path.basename(p): p for p in paths}


def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) the way lm-eval-harness cuts them."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def fewshot_context(items, i, shots, seed):
    """The prompt for question i: `shots` solved examples from the same file, then the question.

    lm-eval-harness's layout: each example is its context followed by its correct choice, examples joined
    by a blank line ("\\n\\n", its fewshot_delimiter). The examples are drawn without replacement from the
    other questions (never the question itself), with a generator seeded by (seed, i): the prompt of a
    question does not depend on which other questions are evaluated or in what order."""
    if shots == 0:
        return items[i]["context"]
    pool = [j for j in range(len(items)) if j != i]
    if shots > len(pool):
        raise ValueError(f"--shots {shots} needs at least {shots + 1} questions in the task, it has {len(items)}")
    picks = np.random.default_rng([seed, i]).choice(pool, size=shots, replace=False)
    demos = [items[j]["context"] + items[j]["choices"][items[j]["label"]] for j in picks]
    return "\n\n".join(demos + [items[i]["context"]])


@torch.no_grad()
def loglikelihoods(model, requests, prefix=(), batch_size=8):
    """requests: [(context ids, continuation ids)] -> [(sum of log-probs of the continuation, is_greedy)].

    Each sequence is prefix + context + continuation, cut from the left to the model's window; the model
    reads all but the last token, and position p's log-softmax scores token p+1. Requests are run longest
    first (as lm-eval-harness does: similar lengths share a batch, little padding) and padded on the right:
    causal attention never lets a position see the padding after it, and dropless routing (model.py)
    routes each token on its own, so neither padding nor batch-mates change a score. (The paper's release
    drops tokens over an expert's capacity; there the batch would matter.)"""
    max_len = model.config.max_position_embeddings
    device = model.lm_head.weight.device
    rows = []
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a choice encodes to no tokens after its context: is it empty?")
        if len(cont) > max_len:
            raise ValueError(f"a choice of {len(cont)} tokens does not fit the model's {max_len} positions")
        seq = (list(prefix) + list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((seq[:-1], cont))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = len(rows[batch[0]][0])                                       # longest first
        idx = torch.zeros(len(batch), width, dtype=torch.int64)              # (b, S), right-padded with 0
        for b, i in enumerate(batch):
            idx[b, :len(rows[i][0])] = torch.tensor(rows[i][0])
        logits, _ = model(idx.to(device))                                    # (b, S, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        for b, i in enumerate(batch):
            (inp, cont), n = rows[i], len(rows[i][1])
            target = torch.tensor(cont, device=device)                       # (n,)
            lp = logp[b, len(inp) - n:len(inp)]                              # (n, V): predicts the n choice tokens
            out[i] = (lp.gather(-1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
    return out


def pick_items(n_items, max_items=0):
    """Indices of the questions to score: all of them, or max_items spread evenly over the file. Task files
    are often grouped by source (ours: 60 questions per domain in a row), so the first N would not be a fair
    sample."""
    if not max_items or max_items >= n_items:
        return list(range(n_items))
    return [(i * n_items) // max_items for i in range(max_items)]


def score_task(model, tok, items, shots=0, seed=1234, prefix=(), batch_size=8, indices=None):
    """Score items[i] for i in indices (default: all) -> {"acc", "acc_norm", their stderr, "n", "chance"}
    plus per-question details. Few-shot examples come from the whole file (minus the question itself)."""
    indices = list(range(len(items))) if indices is None else list(indices)
    requests = []  # one per (question, choice), question by question
    for i in indices:
        context = fewshot_context(items, i, shots, seed)
        requests += [encode_pair(tok, context, choice) for choice in items[i]["choices"]]
    results = iter(loglikelihoods(model, requests, prefix, batch_size))
    correct, correct_norm, details = [], [], []
    for item in (items[i] for i in indices):
        lls = np.array([next(results)[0] for _ in item["choices"]])
        nbytes = np.array([len(choice.encode("utf-8")) for choice in item["choices"]], dtype=np.float64)
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / nbytes))  # ties: the first, as lm-eval
        correct.append(pred == item["label"])
        correct_norm.append(pred_norm == item["label"])
        details.append({"loglikelihoods": lls.tolist(), "pred": pred, "pred_norm": pred_norm, "label": item["label"]})
    n = len(indices)

    def stderr(xs):  # lm-eval-harness's mean_stderr: sample standard deviation / sqrt(n)
        return float(np.std(xs, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

    return {"acc": float(np.mean(correct)), "acc_stderr": stderr(correct),
            "acc_norm": float(np.mean(correct_norm)), "acc_norm_stderr": stderr(correct_norm),
            "n": n, "chance": float(np.mean([1.0 / len(items[i]["choices"]) for i in indices])), "details": details}


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
    return {"layers": counts["layers"], "domains": counts["domains"],
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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------------
# 6. Generation

def generate_samples(model, tok, prompt, prefix=(), num_samples=1, max_new_tokens=64, temperature=0.8, top_k=50):
    device = model.lm_head.weight.device
    ids = list(prefix) + tok.encode(prompt)
    room = model.config.max_position_embeddings - len(ids)
    if room <= 0:
        raise ValueError(f"the prompt has {len(ids)} tokens, the model holds {model.config.max_position_embeddings}")
    idx = torch.tensor([ids] * num_samples, dtype=torch.int64, device=device)  # (n, S)
    out = model.generate(idx, min(max_new_tokens, room), temperature=temperature, top_k=top_k)
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
        print(f"\nmultiple choice ({results['shots']}-shot; acc_norm = by byte length; +- is the standard error; "
              f"n per task: --max_items, 0 = all)")
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
        print(f"{'layer':>5}{'JS':>8}{'fav':>8}  favourite expert per domain ({', '.join(r['domains'])})")
        for i, layer in enumerate(r["layers"]):
            print(f"{layer:>5}{r['js'][i]:>8.3f}{r['favourite_share'][i]:>8.3f}  {r['favourite_expert'][i]}")
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
    model = load_model(cfg)
    with open(os.path.join(cfg.ckpt, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    results = {"ckpt": cfg.ckpt, "settings": asdict(cfg), "model": {
        "format": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_experts": model.config.num_experts,
        "num_experts_per_tok": model.config.num_experts_per_tok if model.config.is_moe else 0}}
    has_data = cfg.data and os.path.isfile(os.path.join(cfg.data, "meta.json"))
    tasks = find_tasks(cfg) if (cfg.data or cfg.tasks) else {}
    need_tok = bool(tasks) or cfg.generate is not None
    tok = prefix = None
    if need_tok:
        tok_path = find_tokenizer(cfg)
        tok = Tokenizer(tok_path)
        if tok.vocab_size > model.config.vocab_size:
            raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, the model only "
                             f"{model.config.vocab_size}: pass the model's own tokenizer with --tokenizer")
        prefix = doc_start_id(cfg, tok, tok_path)
        results["tokenizer"], results["doc_start"] = tok_path, prefix

    if has_data:
        meta = load_meta(cfg.data)
        if meta["vocab_size"] > model.config.vocab_size:
            raise ValueError(f"{cfg.data} was tokenised with {meta['vocab_size']} token ids but the model has "
                             f"{model.config.vocab_size}: prepare the data with the model's tokenizer")
        check_data_tokenizer(cfg)
        t = time.time()
        val, counts = validation(model, cfg.data, cfg.seq_len, cfg.batch_size, cfg.max_windows, cfg.routing)
        seq = min(cfg.seq_len, model.config.max_position_embeddings)
        results["val_setup"] = (f"{cfg.max_windows or 'all'} windows x {seq} tokens per domain" if cfg.max_windows
                                else f"all windows x {seq} tokens")
        # The mean weighs every domain equally (as the paper's per-domain curves do), not by token count.
        results["val"] = {"domains": val, "mean_loss": float(np.mean([r["loss"] for r in val.values()]))}
        results["wall_s_val"] = round(time.time() - t, 2)
        if counts is not None:
            results["routing"] = routing_report(counts)
            heatmap = cfg.heatmap or (os.path.join(os.path.dirname(os.path.abspath(cfg.out)), "routing.png")
                                      if cfg.out else None)
            results["heatmap"] = (save_heatmap(results["routing"], heatmap) if heatmap
                                  else "not written (no --out or --heatmap)")
    elif cfg.data and cfg.tasks is None:
        print(f"[eval] no shard folder at {cfg.data!r} (meta.json missing): skipping validation loss and routing")

    if tasks:
        t = time.time()
        results["shots"], results["tasks"] = cfg.shots, {}
        for name, path in tasks.items():
            items = read_task(path)
            results["tasks"][name] = score_task(model, tok, items, cfg.shots, cfg.seed, prefix, cfg.batch_size,
                                                pick_items(len(items), cfg.max_items))
        results["tasks_mean"] = {m: float(np.mean([r[m] for r in results["tasks"].values()]))
                                 for m in ("acc", "acc_norm")}
        results["wall_s_tasks"] = round(time.time() - t, 2)

    if cfg.generate is not None:
        results["samples"] = generate_samples(model, tok, cfg.generate, prefix, cfg.num_samples,
                                              cfg.max_new_tokens, cfg.temperature, cfg.top_k)
    results["wall_s"] = round(time.time() - t0, 2)
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a checkpoint: per-domain loss, multiple choice, routing.")
    defaults = EvalConfig(ckpt="")
    for name, value in asdict(defaults).items():
        flag = f"--{name}"
        if name == "routing":
            p.add_argument("--no_routing", dest="routing", action="store_false", help="skip the routing counts")
        elif name == "ckpt":
            p.add_argument(flag, required=True, help="checkpoint folder (config.json + safetensors)")
        else:
            kind = {"int": int, "float": float}.get(type(value).__name__, str)
            if name == "top_k":
                kind = int
            p.add_argument(flag, type=kind, default=value)
    return EvalConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    results = evaluate(cfg)
    print_tables(results)
    print(f"\n[eval] {results['wall_s']:.1f} s" + (f", json: {cfg.out}" if cfg.out else ""))
    return results


if __name__ == "__main__":
    main()
