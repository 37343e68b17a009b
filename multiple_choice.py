"""
Chapter: multiple choice by log-likelihood, as lm-evaluation-harness 0.4 scores SciQ, PIQA, ARC, HellaSwag...
(SPEC section 6). eval.py reads the task files it finds and reports what score_task returns.

    import multiple_choice as mc
    items = mc.read_task("data/smollm2/tasks/quiz.jsonl")
    scores = mc.score_task(model, tok, items, shots=0, start=[tok.bos_id])   # acc, acc_norm, acc_bytes, ...

Read top to bottom: the task file, tokenisation as lm-eval cuts it, few-shot prompts, the batched
log-likelihoods (the time of an evaluation goes here), the metrics.
"""
import contextlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from configurator import UserError

# An item is a context c, bare choices a_1..a_n and a target delimiter (" " by default). Choice i is scored as
#     ll_i = log P(delimiter + a_i | c) = sum over the continuation's tokens of log p(token | everything before)
# and three metrics compare the n scores (ties go to the first, np.argmax):
#     acc        argmax_i ll_i                       favours short choices (fewer negative terms)
#     acc_norm   argmax_i ll_i / len(a_i)            length in characters of the bare choice (no delimiter)
#     acc_bytes  argmax_i ll_i / len(a_i in UTF-8)   the same in bytes (differs from acc_norm off ASCII)
# Each with lm-eval's standard error of a mean, sample standard deviation / sqrt(n) = sqrt(p(1-p) / (n-1)).
#
# Tokenisation follows lm-eval's _encode_pair: spaces that end the context move to the front of the
# continuation (BPE glues a space to the word after it: " Paris"), context+continuation is encoded as one
# string, and the continuation is what follows the context's own encoding. An empty context (possible with
# --start_token=none or a tokenizer without bos) is scored after lm-eval's prefix token (bos, else eos).


def read_task(path):
    """A jsonl file of {"context": str, "choices": [str, ...], "label": int, "target_delimiter": str
    (optional, default " ")} -> list of items, checked, choices bare.

    Files that predate bare choices wrote every choice with its leading space (" Paris") and no delimiter;
    such an item is read as delimiter " " + the bare choice: the same text, lm-eval's lengths for acc_norm."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid json ({e})") from None
            ok = (isinstance(item, dict) and isinstance(item.get("context"), str)
                  and isinstance(item.get("choices"), list) and len(item["choices"]) >= 2
                  and all(isinstance(c, str) and c for c in item["choices"])
                  and isinstance(item.get("label"), int) and 0 <= item["label"] < len(item["choices"])
                  and isinstance(item.get("target_delimiter", " "), str))
            if not ok:
                raise UserError(f"{path}:{lineno}: expected {{\"context\": str, \"choices\": [>= 2 non-empty str], "
                                f"\"label\": index into choices}}, got {line.strip()[:120]!r}")
            choices, delimiter = item["choices"], item.get("target_delimiter")
            if delimiter is None:
                legacy = all(c.startswith(" ") and len(c) > 1 for c in choices)
                choices, delimiter = ([c[1:] for c in choices] if legacy else choices), " "
            items.append({"context": item["context"], "choices": choices, "label": item["label"],
                          "target_delimiter": delimiter})
    if not items:
        raise UserError(f"{path}: no questions in the file")
    return items



def prefix_token(tok):
    """lm-eval's prefix_token_id: what an empty context is scored after (its bos, else its eos)."""
    return tok.bos_id if tok.bos_id is not None and tok.bos_id >= 0 else tok.eos_id



def encode_pair(tok, context, continuation):
    """(context ids, continuation ids) the way lm-eval's _encode_pair cuts them (context not empty)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def encode_request(tok, context, continuation, start=()):
    """-> (ids the model reads first, continuation ids to score): start + context, then the continuation.
    With nothing to condition on (empty context, no start token) the continuation is scored after lm-eval's
    prefix token - or, when the continuation itself begins with that token, after its own first token."""
    if context:
        ctx, cont = encode_pair(tok, context, continuation)
        ctx = list(start) + ctx
    else:
        ctx, cont = list(start), tok.encode(continuation)
    if not ctx:
        first = prefix_token(tok)
        ctx, cont = ([first], cont) if not cont or cont[0] != first else (cont[:1], cont[1:])
    return ctx, cont


def fewshot_context(items, i, shots, seed):
    """The prompt for question i: `shots` solved examples from the same file, then the question.

    lm-eval's layout: each example is its context, its target delimiter and its correct choice, followed by
    a blank line ("\\n\\n", its fewshot_delimiter). The examples are drawn without replacement from the other
    questions (never the question itself), with a generator seeded by (seed, i): the prompt of a question
    does not depend on which other questions are evaluated or in what order."""
    if shots == 0:
        return items[i]["context"]
    pool = [j for j in range(len(items)) if j != i]
    if shots > len(pool):
        raise UserError(f"--shots={shots} needs at least {shots + 1} questions in the task, it has {len(items)}")
    picks = np.random.default_rng([seed, i]).choice(pool, size=shots, replace=False)
    demos = [items[j]["context"] + items[j]["target_delimiter"] + items[j]["choices"][items[j]["label"]]
             for j in picks]
    return "\n\n".join(demos + [items[i]["context"]])


@contextlib.contextmanager
def logits_only_at(model, rows, cols):
    """Inside the block, model(idx) returns logits (N, V) only at positions (rows[j], cols[j]), not (B, S, V).

    A choice is a few tokens after a long context: projecting every position onto the vocabulary (49,152
    for SmolLM2: 0.2 GB of float32 per 1,000 positions) would spend most of the time and memory on logits
    no one reads. The hook hands the output projection only the hidden states we score."""
    handle = model.lm_head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols],))
    try:
        yield
    finally:
        handle.remove()


# Packing short questions: a question whose rows are at most PACK_WIDTH tokens (a quiz line, a short cloze) is
# run as full rows (context + choice, no cache), many questions to one forward of at most PACK_TOKENS padded
# tokens. At that length a forward costs what reading the weights costs, whatever the rows hold: the profile of
# the demo's quiz task showed ~2 forwards per question of ~15 tokens each, so packing 30 questions into one
# forward removes most of its time. Longer questions are bound by their context's multiply-adds instead, and
# keep the cached shared context.
PACK_WIDTH = 64
PACK_TOKENS = 2048


@torch.no_grad()
def loglikelihoods(model, groups, pack_width=PACK_WIDTH, pack_tokens=PACK_TOKENS):
    """groups: one list of (context ids, continuation ids) per question -> the same nesting of
    (sum of the continuation's log-probs, is_greedy).

    Each row is context + continuation, cut from the left to the model's window; position p's log-softmax
    scores token p+1. A long question's shared context runs once, then its choices run together, right-padded;
    short questions run as full rows, packed several to a forward (pack_width, pack_tokens; see above).

    What this batching can change: under a causal mask a position never sees the padding after it nor another
    row, and both dense FFNs and our dropless routing (model.py) act on each token alone - so a score does
    not depend, in exact arithmetic, on the other choices or on the padding. In floating point a different
    batch shape may run the matmuls in another order: the last digits of a dense model's log-likelihood move
    (~1e-6 relative). In an MoE those last digits also reach the gate, and a token whose k-th and (k+1)-th
    expert scores are within rounding of each other can switch experts: its layer output then changes by a
    whole expert, and the log-likelihood by much more (0.08 was seen on one choice of the split SmolLM2 when
    questions were packed 8 vs 16 rows to a batch). Scores are bit-reproducible for the same items and shots."""
    max_len = model.config.max_position_embeddings
    rows = []  # per question: [(input ids, continuation ids)]
    for group in groups:
        rows.append([])
        for ctx, cont in group:
            if not cont:
                raise UserError("a choice encodes to no tokens after its context: is it empty?")
            if len(cont) > max_len:
                raise UserError(f"a choice of {len(cont)} tokens does not fit the model's {max_len} positions")
            seq = (list(ctx) + list(cont))[-(max_len + 1):]
            rows[-1].append((seq[:-1], cont))
    width = [max(len(inp) for inp, _ in r) for r in rows]
    order = sorted(range(len(rows)), key=lambda q: -width[q])  # longest first: a pack's first row is its widest
    out = [[None] * len(r) for r in rows]
    pack = []  # (question, choice, input ids, continuation ids) of short questions
    for q in order:
        if width[q] <= pack_width:
            if pack and (len(pack) + len(rows[q])) * width[pack[0][0]] > pack_tokens:
                score_rows(model, pack, [], out)
                pack = []
            pack += [(q, c, inp, cont) for c, (inp, cont) in enumerate(rows[q])]
            continue
        # Shared context (the speed-up that makes evaluating a 30-layer model on CPU practical): a question's
        # choices share their context, so its first P tokens (P <= every choice's first scored position) run
        # once into the KV cache, and the choices continue from there as one batch, each query seeing the
        # cached context and its own earlier tokens (model.py's cached attention). Same positions, same keys:
        # the same scores as running each full row (tests/test_eval.py checks it against the full rows).
        group = rows[q]
        P = min(len(inp) - len(cont) for inp, cont in group)                     # positions before any scored one
        first = group[0][0]
        while P and any(inp[:P] != first[:P] for inp, _ in group[1:]):
            P -= 1
        score_rows(model, [(q, c, inp[P:], cont) for c, (inp, cont) in enumerate(group)], first[:P], out)
    if pack:
        score_rows(model, pack, [], out)
    return out


def score_rows(model, batch, prefix, out):
    """One forward: batch = [(question, choice, input ids, continuation ids)], each row continuing `prefix` (ids
    that every row shares, run once into the KV cache; [] for none). Writes out[question][choice]."""
    device = model.lm_head.weight.device
    P, S = len(prefix), max(len(inp) for _, _, inp, _ in batch)
    idx = torch.zeros(len(batch), S, dtype=torch.int64)                          # (R, S), right-padded with 0
    r_at, c_at, targets = [], [], []
    for b, (_, _, inp, cont) in enumerate(batch):
        idx[b, :len(inp)] = torch.tensor(inp)
        r_at += [b] * len(cont)
        c_at += range(len(inp) - len(cont), len(inp))                             # predict the n choice tokens
        targets += cont
    r_at, c_at = torch.tensor(r_at, device=device), torch.tensor(c_at, device=device)
    try:
        if P:
            model.setup_cache(len(batch), P + S)
            zero = torch.zeros(1, dtype=torch.int64, device=device)
            with logits_only_at(model, zero, zero):                               # no logits needed here
                model(torch.tensor([prefix], device=device), start_pos=0)         # the context, once: (1, P)
            model.share_cache_prefix(P)
        with logits_only_at(model, r_at, c_at):
            logits = model(idx.to(device), start_pos=P if P else None).logits     # (N, V), N = choice tokens
    finally:
        if P:
            model.clear_cache()
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
    targets = torch.tensor(targets, device=device)                                # (N,)
    token_lp = logp.gather(-1, targets[:, None])[:, 0].cpu()                      # (N,)
    hit = (logp.argmax(-1) == targets).cpu()                                      # (N,)
    at = 0
    for q, c, _, cont in batch:
        out[q][c] = (token_lp[at:at + len(cont)].sum().item(), bool(hit[at:at + len(cont)].all()))
        at += len(cont)


def pick_items(n_items, max_items=0):
    """Indices of the questions to score: all of them, or max_items spread evenly over the file. Task files
    are often grouped by source (ours: 60 questions per domain in a row), so the first N would not be a fair
    sample."""
    if not max_items or max_items >= n_items:
        return list(range(n_items))
    return [(i * n_items) // max_items for i in range(max_items)]


def mean_stderr(xs):
    """lm-eval's mean_stderr: sample standard deviation / sqrt(n); for 0/1 scores sqrt(p(1-p) / (n-1))."""
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else float("nan")


def score_task(model, tok, items, shots=0, seed=1234, start=(), indices=None):
    """Score items[i] for i in indices (default: all) -> {"acc", "acc_norm", "acc_bytes", their "_stderr",
    "n", "chance"} plus per-question details. Few-shot examples come from the whole file (minus the question)."""
    indices = list(range(len(items))) if indices is None else list(indices)
    groups = []
    for i in indices:
        context, delim = fewshot_context(items, i, shots, seed), items[i]["target_delimiter"]
        groups.append([encode_request(tok, context, delim + choice, start) for choice in items[i]["choices"]])
    results = loglikelihoods(model, groups)
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    details = []
    for i, scored in zip(indices, results):
        item = items[i]
        lls = np.array([ll for ll, _ in scored])
        chars = np.array([len(c) for c in item["choices"]], dtype=np.float64)
        nbytes = np.array([len(c.encode("utf-8")) for c in item["choices"]], dtype=np.float64)
        pred, pred_norm, pred_bytes = int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))
        for metric, p in (("acc", pred), ("acc_norm", pred_norm), ("acc_bytes", pred_bytes)):
            hits[metric].append(float(p == item["label"]))
        details.append({"index": i, "loglikelihoods": lls.tolist(), "is_greedy": [g for _, g in scored],
                        "pred": pred, "pred_norm": pred_norm, "label": item["label"]})
    out = {}
    for metric, xs in hits.items():
        out[metric], out[metric + "_stderr"] = float(np.mean(xs)), mean_stderr(xs)
    return dict(out, n=len(indices), chance=float(np.mean([1.0 / len(items[i]["choices"]) for i in indices])),
                details=details)
