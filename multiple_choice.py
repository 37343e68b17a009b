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


# One row per question (the time of an evaluation goes here). A question's n choices share their context, so
# instead of n full rows (context + choice, lm-eval's batch of 1) the question becomes one row: the shared
# prefix once, then each choice's own tokens, with each token's RoPE position and a mask that lets a choice's
# tokens see the prefix and their own earlier tokens, never another choice:
#
#     row       c0 c1 c2 c3 | a1 a2 | b1 b2 b3          (prefix, then choice a, then choice b)
#     position   0  1  2  3 |  4  5 |  4  5  6
#     a2 sees    c0..c3, a1, a2;   b1 sees c0..c3, b1
#
# Every token then computes exactly what it computes in its choice's full row: same tokens before it, same
# positions. The forward runs each distinct token once (cloze items: the context alone, their choices are one
# token each); lm-eval runs the context again for each choice of more than one token. Short questions are laid
# end to end in one row of at least ROW_TOKENS tokens (a mask keeps each to itself): at a few dozen tokens a
# forward costs the reading of the weights, at a few hundred its multiply-adds, and one row has no padding.
# Longer rows gain nothing (the attention over a row grows with its square), and many rows to a forward would
# be padded to the longest: on the 2-core CPU one row of 128-384 tokens per forward measured fastest (README,
# "Evaluation and results").
ROW_TOKENS = 256


def question_row(group, max_len):
    """group: one question's [(context ids, continuation ids)] -> (row ids, positions, segment of each token
    (0 = shared prefix, c + 1 = choice c), [(row indices whose logits score choice c, its continuation ids)]).

    Each choice's input is lm-eval's: context + continuation without its last token, cut from the left to the
    model's window. The prefix is what all inputs have in common; choice c adds the rest of its input."""
    inputs = []
    for ctx, cont in group:
        if not cont:
            raise UserError("a choice encodes to no tokens after its context: is it empty?")
        if len(cont) > max_len:
            raise UserError(f"a choice of {len(cont)} tokens does not fit the model's {max_len} positions")
        inputs.append((list(ctx) + list(cont))[-(max_len + 1):-1])
    P = min(len(inp) for inp in inputs)
    while P and any(inp[:P] != inputs[0][:P] for inp in inputs[1:]):
        P -= 1                                                           # the longest common prefix
    ids, pos, seg = inputs[0][:P], list(range(P)), [0] * P
    scored = []
    for c, (inp, (_, cont)) in enumerate(zip(inputs, group)):
        at = len(ids) - P                                                # row index of input position p >= P: at + p
        ids, pos, seg = ids + inp[P:], pos + list(range(P, len(inp))), seg + [c + 1] * (len(inp) - P)
        first = len(inp) - len(cont)                                     # the position that predicts cont[0]
        scored.append(([p if p < P else at + p for p in range(first, len(inp))], cont))
    return ids, pos, seg, scored


@torch.no_grad()
def loglikelihoods(model, groups, row_tokens=ROW_TOKENS):
    """groups: one list of (context ids, continuation ids) per question -> the same nesting of
    (sum of the continuation's log-probs, is_greedy).

    Questions (question_row) are laid end to end into rows of at most max(row_tokens, the longest question)
    tokens, longest first, each into the first row with room (first-fit decreasing); one row per forward.

    What this layout can change: a token sees exactly the tokens of its own choice's full row, and both dense
    FFNs and our dropless routing (model.py) act on each token alone - so a score does not depend, in exact
    arithmetic, on the other choices or questions in the row. In floating point another row length may run
    the matmuls in another order: the last digits of a dense model's log-likelihood move (~1e-6 relative). In
    an MoE those last digits also reach the gate, and a token whose k-th and (k+1)-th expert scores are within
    rounding of each other can switch experts: its layer output then changes by a whole expert, and the
    log-likelihood by much more (0.08 was seen on one choice of the split SmolLM2 when questions were batched
    8 vs 16 rows to a forward). Scores are bit-reproducible for the same items and shots."""
    questions = [question_row(group, model.config.max_position_embeddings) for group in groups]
    order = sorted(range(len(questions)), key=lambda q: -len(questions[q][0]))   # longest first
    width = max(row_tokens, len(questions[order[0]][0])) if order else 0
    rows, room = [], []                                                   # rows: lists of question numbers
    for q in order:
        n = len(questions[q][0])
        r = next((r for r, free in enumerate(room) if free >= n), None)
        if r is None:
            rows.append([]), room.append(width)
            r = len(rows) - 1
        rows[r].append(q)
        room[r] -= n
    out = [[None] * len(group) for group in groups]
    for row in rows:
        score_row(model, questions, row, out)
    return out


def score_row(model, questions, row, out):
    """One forward of one row: the questions numbered in `row` (question_row's), end to end. Writes out[q][c]."""
    device = model.lm_head.weight.device
    ids, pos, seg, owner, scored_at, targets = [], [], [], [], [], []
    for slot, q in enumerate(row):
        q_ids, q_pos, q_seg, scored = questions[q]
        for at, cont in scored:
            scored_at += [len(ids) + a for a in at]
            targets += cont
        ids, pos, seg, owner = ids + q_ids, pos + q_pos, seg + q_seg, owner + [slot] * len(q_ids)
    seg, owner = torch.tensor(seg), torch.tensor(owner)                            # (S,) each
    # Query i sees key j <= i of its own question, in the shared prefix (segment 0) or in its own choice.
    mask = (owner[None, :] == owner[:, None]) & ((seg[None, :] == 0) | (seg[None, :] == seg[:, None]))
    mask &= torch.ones(len(ids), len(ids), dtype=torch.bool).tril()                # (S, S)
    zero = torch.zeros(len(scored_at), dtype=torch.int64, device=device)
    with logits_only_at(model, zero, torch.tensor(scored_at, device=device)):
        logits = model(torch.tensor([ids], device=device), positions=torch.tensor([pos], device=device),
                       mask=mask[None, None].to(device)).logits                    # (N, V), N = choice tokens
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
    targets = torch.tensor(targets, device=device)                                # (N,)
    token_lp = logp.gather(-1, targets[:, None])[:, 0].cpu()                      # (N,)
    hit = (logp.argmax(-1) == targets).cpu()                                      # (N,)
    at = 0
    for q in row:
        for c, (_, cont) in enumerate(questions[q][3]):
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
