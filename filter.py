"""
Chapter: cleaning the corpus before continual pretraining (SPEC §4).

LLaMA-MoE filtered SlimPajama two ways before training: removing advertisements and removing non-fluent
text (about 15% of it). Both lowered the training loss; the fluency-filtered data was better downstream
and was kept. The paper does not say HOW either was detected, so both detectors here are our design:

  1. ad_score(text) in [0, 1]: lexical and structural signals of advertising (URLs, prices, calls to
     action, contact details, promotional words, exclamation marks, shouting, repeated boilerplate lines),
     each turned into a probability-like strength and combined by noisy-OR. Threshold configurable.
  2. fluency: perplexity, in bits per character, under a small reference language model - a character
     5-gram with interpolated Kneser-Ney smoothing trained on clean text. Per domain, the least fluent
     `fluency_percentile` % (default 15, the paper's share) is removed: code and prose have very different
     perplexities, so one global threshold would remove mostly one domain.

    python filter.py --input=docs.jsonl --out=filtered/ [--fluency=False] [--ads=False] [--reference=clean.txt]

Input (--input, several separated by commas; globs allowed): .jsonl or .jsonl.zst lines {"text": ...,
"domain": ...} or SlimPajama's {"text": ..., "meta": {"redpajama_set_name": "RedPajamaC4"}} (-> domain "c4"),
read by data/jsonl.py (which refuses a truncated or non-zstd .zst file, naming it); a line without either
gets domain "unknown". Or .txt: documents separated by blank lines (so one paragraph = one document; use
jsonl for multi-paragraph documents), domain = the file's name without extension.
Output in --out: kept.jsonl and removed.jsonl (each input record plus "domain", "source" file:line and
"filter" with the scores and the reason), report.json, and a printed per-domain report.

Nothing is lost: every input document ends in exactly one of kept.jsonl / removed.jsonl (the report's
counts add up); a line that is not a JSON document is skipped and listed with file:line; undecodable bytes
are replaced and counted. A text holding a lone surrogate ("\\ud800": valid JSON, not encodable as UTF-8)
is scored like any other text and written back with the same escape, so its record leaves unchanged; the
report counts them. The three outputs are one result, written only after all documents are scored and as
one folder (fileio.atomic_dir: a killed run leaves the previous --out as it was, never a new kept.jsonl
beside an old removed.jsonl). So --out must be new or hold only a previous result, and an --out that
would overwrite an input is refused. "Tokens" in the report are whitespace-separated
words (no tokenizer needed). The whole input is held in memory (the percentile needs every score): for
SlimPajama, run it per chunk file.
"""

import glob
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, asdict

import numpy as np

from configurator import UserError, load_config, run_cli, setting
from data.jsonl import SLIMPAJAMA_SETS, decode_counting, read_jsonl, slimpajama_set
from fileio import atomic_dir, check_output_dir


@dataclass
class FilterConfig:
    input: str = ""  # .jsonl, .jsonl.zst or .txt file(s), separated by commas; globs allowed
    out: str = ""  # folder for kept.jsonl, removed.jsonl, report.json
    reference: str = ""  # clean text (.txt or .jsonl) for the n-gram model; "" = 2-fold cross-fitting on the input
    ads: bool = True
    fluency: bool = True
    ad_threshold: float = setting(0.5, ge=0, le=1)  # remove a document whose ad_score is >= this
    fluency_percentile: float = setting(15.0, ge=0, lt=100)  # per domain, remove this % of documents with the highest bits/char
    # n-gram order of the character reference model; its tables grow with order x characters, so it is bounded
    order: int = setting(5, ge=1, le=12)
    examples: int = setting(3, ge=0)  # removed examples per domain and filter in the report


OUTPUTS = ("kept.jsonl", "removed.jsonl", "report.json")  # one result: written together (atomic_dir)


# -----------------------------------------------------------------------------------------------------
# 1. Advertisement score
#
# Ads are short, dense in commercial signals, and ask the reader to DO something. One signal alone proves
# little - code has URLs and author e-mails, a dictionary defines "sale", an economics text quotes prices,
# a README says "subscribe to the mailing list" - so each signal is a rate per 100 words, saturated to a
# strength in [0, max_p], and the strengths are combined by noisy-OR: score = 1 - prod(1 - p_i).
# It takes two or three kinds of evidence together to pass 0.5.

URL = re.compile(r"(?:https?://|www\.)\S+|\b[\w-]+\.(?:com|net|biz|shop|store|info|co\.uk)\b", re.I)
# A price tag: "$19.99", "49 EUR", "20% off". Amounts in millions or billions are news, not offers:
# the optional group catches them so that count_prices can leave them out.
PRICE = re.compile(r"(?:[$€£¥]\s?\d[\d,]*(?:\.\d+)?|\b\d[\d,]*(?:\.\d+)?\s?(?:USD|EUR|GBP|dollars|euros)\b)"
                   r"(\s?(?:million|billion|trillion|bn)\b)?|\b\d{1,2}\s?%\s?off\b()|\bfrom just\b()", re.I)
CALL_TO_ACTION = re.compile(r"\b(?:" + "|".join([
    r"buy (?:now|today|one)", r"shop (?:now|today|the|our|early|top)", r"order (?:now|today|online|by \d|your)",
    r"click (?:here|the link|below)", r"call (?:now|today|us)", r"sign up", r"subscribe", r"limited time",
    r"free (?:shipping|delivery|trial|quote|estimate|returns|consultation|video|webinar)",
    r"add to cart", r"don'?t miss", r"act now", r"book (?:now|online|direct)", r"visit (?:our|us)",
    r"get (?:yours|your free|started|approved)", r"hurry", r"while supplies last", r"apply now",
    r"download (?:now|our app)", r"register now", r"contact us", r"claim (?:your|the)", r"money[- ]back",
    r"risk[- ]free", r"satisfaction guaranteed", r"special offer", r"offer (?:ends|expires|valid)",
    r"use (?:promo )?code", r"promo code", r"enroll now", r"join (?:now|today)", r"switch (?:online|to)",
    r"no credit card", r"selling fast", r"(?:spots|seats|stock|quantities) (?:are |is )?limited",
    r"limited stock", r"before it'?s gone", r"reserve your", r"check your eligibility", r"bad credit",
    r"never pay full price", r"follow us",
]) + r")\b", re.I)
PHONE = re.compile(r"(?:\+\d{1,3}[\s.-]?)?\(?\b\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}\b|\b1-800-\d{3}-\d{4}\b"
                   r"|\+\d{2}\s\d{2}\s\d{4}\s\d{4}")
EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+\.[\w.-]+\b")
# Promotional vocabulary, counted as DISTINCT words: an ad piles up many different ones, while a text
# about free software or a sale in a dictionary repeats one or two.
PROMO_WORDS = frozenset("""
    sale discount discounts deal deals offer offers cheap cheapest lowest bargain bonus exclusive
    guaranteed guarantee coupon coupons promo clearance bestseller bestselling free save saves savings
    shipping delivery affordable unbeatable amazing premium luxury shop buy purchase satisfied rewards
    winner lucky trial instant hurry warranty estimate quote quotes incredible brands stunning
    unforgettable arrivals special
""".split())
SHOUT = re.compile(r"\b[A-Z]{3,}\b")
EXCLAIM = re.compile(r"!(?=[\s!]|$)")  # an exclamation mark, not "!=" or "#!/bin/sh"
WORD = re.compile(r"[A-Za-z']+")


def saturate(rate, scale):
    """0 at rate 0, 1 - 1/e at rate == scale, -> 1: diminishing returns for more of the same evidence."""
    return 1.0 - math.exp(-rate / scale)


def count_prices(text):
    return sum(1 for m in PRICE.finditer(text) if not m.group(1))  # group 1: "... million", not a price


def repeated_line_fraction(text):
    """Share of a document's (non-trivial) lines that occur more than once: menus, 'Add to cart' lists."""
    lines = [ln.strip().lower() for ln in text.splitlines() if len(ln.strip()) >= 8]
    if len(lines) < 3:
        return 0.0
    counts = Counter(lines)
    return sum(c for c in counts.values() if c > 1) / len(lines)


def ad_signals(text):
    """{signal: strength in [0, max_p]} - the evidence behind ad_score, kept for the report."""
    words = WORD.findall(text)
    per100 = 100.0 / max(len(words), 30)  # short documents are not scored as denser than 30 words
    sentences = max(1, len(re.findall(r"[.!?]+(?:\s|$)", text)))
    lower = [w.lower() for w in words]
    alpha = [w for w in words if len(w) >= 3]
    return {
        # name: max_p * saturate(rate, scale), max_p = how much this signal alone can prove
        "call_to_action": 0.60 * saturate(len(CALL_TO_ACTION.findall(text)) * per100, 2.0),
        "price": 0.45 * saturate(count_prices(text) * per100, 2.0),
        "promo_words": 0.55 * saturate(len(PROMO_WORDS.intersection(lower)) / max(len(words), 30), 0.06),
        "url": 0.25 * saturate(len(URL.findall(text)) * per100, 2.0),
        "contact": 0.30 * saturate((len(PHONE.findall(text)) + len(EMAIL.findall(text))) * per100, 2.0),
        "exclamation": 0.35 * saturate(len(EXCLAIM.findall(text)) / sentences, 0.4),
        "shouting": 0.25 * saturate(len(SHOUT.findall(text)) / max(len(alpha), 10), 0.05),
        "repeated_lines": 0.40 * repeated_line_fraction(text),
    }


def noisy_or(signals):
    """1 - prod(1 - p_i): the chance that at least one piece of evidence is right, if they were independent."""
    return 1.0 - math.prod(1.0 - p for p in signals.values())


def ad_score(text):
    """Probability-like advertisement score in [0, 1]."""
    return noisy_or(ad_signals(text))


# -----------------------------------------------------------------------------------------------------
# 2. Fluency: a character n-gram reference model with interpolated Kneser-Ney smoothing
#
# P_n(c | h) = max(N_n(hc) - D_n, 0) / N_n(h.) + D_n * T_n(h) / N_n(h.) * P_{n-1}(c | h[1:])
#   N_N   = raw counts of the highest order; for lower orders, N_n(g) = the number of distinct characters
#           seen before g (continuation count: "in how many contexts does g appear", Kneser-Ney's idea);
#   N_n(h.) = sum over c of N_n(hc); T_n(h) = how many distinct c follow h; D_n = n1 / (n1 + 2 n2) from
#   the count-of-counts; P_0 = uniform over the characters seen plus one "unknown".
# An unseen history skips straight to the lower order. Each document is framed by order-1 BOS marks and
# an EOS mark, so its first characters and its end are predicted too.

BOS, EOS = "\x02", "\x03"


def frame(text, order):
    return BOS * (order - 1) + text + EOS


def train_char_lm(texts, order=5):
    """Clean texts -> the model: per order n, counts of n-grams and per-history totals and types."""
    top = Counter()
    for text in texts:
        t = frame(text, order)
        top.update(t[i:i + order] for i in range(len(t) - order + 1))
    counts = {order: top}
    for n in range(order - 1, 0, -1):  # continuation counts from the distinct (n+1)-grams
        counts[n] = Counter(g[1:] for g in counts[n + 1])
    model = {"order": order, "vocab": len({ch for g in counts[1] for ch in g}) + 1, "levels": {}}
    for n, cnt in counts.items():
        total, types = Counter(), Counter()
        for g, c in cnt.items():
            total[g[:-1]] += c
            types[g[:-1]] += 1
        of = Counter(cnt.values())
        discount = of[1] / (of[1] + 2 * of[2]) if of[1] else 0.5
        model["levels"][n] = (cnt, total, types, min(max(discount, 0.1), 0.9))
    return model


def char_probs(model, text):
    """-> (len(text) + 1,) probabilities of each character of the framed text (and of EOS)."""
    order = model["order"]
    t = frame(text, order)
    probs = np.empty(len(t) - order + 1)
    for i in range(order - 1, len(t)):
        c = t[i]
        p = 1.0 / model["vocab"]
        for n in range(1, order + 1):  # from the unigram up, each order interpolating the one below
            cnt, total, types, d = model["levels"][n]
            h = t[i - n + 1:i]
            tot = total.get(h)
            if tot:
                p = (max(cnt.get(h + c, 0) - d, 0.0) + d * types[h] * p) / tot
        probs[i - order + 1] = p
    return probs


def bits_per_char(model, text):
    """Cross-entropy of the text under the model in bits per character: lower = more fluent."""
    return float(-np.log2(char_probs(model, text)).mean())


def fluency_scores(texts, reference_texts=None, order=5):
    """bits/char for every text. With no reference, 2-fold cross-fitting: the model that scores a document
    never saw it (a model scoring its own training text would find everything fluent)."""
    if reference_texts is not None:
        model = train_char_lm(reference_texts, order)
        return [bits_per_char(model, t) for t in texts]
    scores = [0.0] * len(texts)
    for fold in (0, 1):
        model = train_char_lm([t for i, t in enumerate(texts) if i % 2 != fold], order)
        for i in range(fold, len(texts), 2):
            scores[i] = bits_per_char(model, texts[i])
    return scores


# -----------------------------------------------------------------------------------------------------
# 3. Reading documents (nothing lost silently)


def record_domain(record):
    """A record's own "domain", else its SlimPajama source ('RedPajamaC4' -> 'c4'), else "unknown"."""
    if isinstance(record.get("domain"), str):
        return record["domain"]
    name = slimpajama_set(record)
    if name is None:
        return "unknown"
    return SLIMPAJAMA_SETS.get(name) or name.lower()


def read_documents(path, stats):
    """-> list of (record dict with "text", domain, "file:line"); bad lines go to stats["bad_lines"]."""
    if not os.path.isfile(path):
        raise UserError(f"--input file {path} not found")
    if path.endswith(".txt"):
        domain = os.path.basename(path)[:-len(".txt")]
        with open(path, "rb") as f:
            text, replaced = decode_counting(f.read())
        if replaced:
            stats["non_utf8"].append(path)  # replaced by U+FFFD, kept, and counted
        docs, line = [], 1
        for block in re.split(r"(\n(?:[ \t]*\n)+)", text):  # keep the separators to count lines
            if block.strip():
                docs.append(({"text": block.strip()}, domain, f"{path}:{line}"))
            line += block.count("\n")
        return docs
    if not path.endswith((".jsonl", ".jsonl.zst")):
        raise UserError(f"--input {path}: expected a .jsonl, .jsonl.zst or .txt file")
    docs = []
    for line in read_jsonl(path, lambda where, why: stats["bad_lines"].append(f"{where}: {why}")):
        if line.replaced:
            stats["non_utf8"].append(line.where)
        docs.append((line.record, record_domain(line.record), line.where))
    return docs


def read_reference(path):
    """Clean text for the reference model: a .txt (one text) or a .jsonl of {"text": ...}."""
    stats = {"bad_lines": [], "non_utf8": []}
    if path.endswith(".txt") and os.path.isfile(path):
        with open(path, "rb") as f:
            texts = [decode_counting(f.read())[0]]
    else:
        texts = [record["text"] for record, _, _ in read_documents(path, stats)]
    if not any(t.strip() for t in texts):
        raise UserError(f"--reference={path} holds no text: the fluency model would learn nothing "
                        f"(give clean text, or leave --reference out to cross-fit on the input)")
    return texts


# -----------------------------------------------------------------------------------------------------
# 4. Filtering and the report


def words(text):
    return len(text.split())  # the report's "tokens": whitespace-separated words


def filter_documents(docs, config, reference_texts=None):
    """docs: [(record, domain, where)] -> (kept, removed), each a list of output records."""
    out = []
    for record, domain, where in docs:
        out.append({**record, "domain": domain, "source": where, "filter": {"removed_by": None}})
    if config.ads:  # 1. advertisements: a fixed threshold on the score
        for rec in out:
            signals = ad_signals(rec["text"])
            score = noisy_or(signals)
            rec["filter"]["ad_score"] = round(score, 4)
            rec["filter"]["ad_signals"] = {k: round(v, 3) for k, v in signals.items() if v > 0.01}
            if score >= config.ad_threshold:
                rec["filter"]["removed_by"] = "ads"
    if config.fluency:  # 2. fluency on what the ad filter kept: per-domain percentile of bits/char
        alive = [rec for rec in out if rec["filter"]["removed_by"] is None]
        scores = fluency_scores([rec["text"] for rec in alive], reference_texts, config.order)
        for rec, bpc in zip(alive, scores):
            rec["filter"]["bits_per_char"] = round(bpc, 4)
        for domain in sorted({rec["domain"] for rec in alive}):
            group = [rec for rec in alive if rec["domain"] == domain]
            cut = float(np.percentile([r["filter"]["bits_per_char"] for r in group], 100 - config.fluency_percentile))
            for rec in group:
                rec["filter"]["fluency_threshold"] = round(cut, 4)
                if rec["filter"]["bits_per_char"] > cut:
                    rec["filter"]["removed_by"] = "fluency"
    kept = [rec for rec in out if rec["filter"]["removed_by"] is None]
    removed = [rec for rec in out if rec["filter"]["removed_by"] is not None]
    return kept, removed


def build_report(kept, removed, stats, config, inputs):
    domains = {}
    for rec in kept + removed:
        d = domains.setdefault(rec["domain"], {"documents": 0, "words": 0, "kept": {"documents": 0, "words": 0},
                                               "removed": {f: {"documents": 0, "words": 0, "examples": []}
                                                           for f in ("ads", "fluency")}})
        n = words(rec["text"])
        d["documents"] += 1
        d["words"] += n
        reason = rec["filter"]["removed_by"]
        slot = d["kept"] if reason is None else d["removed"][reason]
        slot["documents"] += 1
        slot["words"] += n
        if reason is not None and len(slot["examples"]) < config.examples:
            score = rec["filter"]["ad_score"] if reason == "ads" else rec["filter"]["bits_per_char"]
            slot["examples"].append({"source": rec["source"], "score": score,
                                     "text": " ".join(rec["text"].split())[:160]})
    return {
        "inputs": inputs, "config": asdict(config), "tokens_are": "whitespace-separated words",
        "documents": len(kept) + len(removed), "kept": len(kept), "removed": len(removed),
        "bad_lines": {"count": len(stats["bad_lines"]), "where": stats["bad_lines"][:100]},
        "non_utf8": {"count": len(stats["non_utf8"]), "where": stats["non_utf8"][:100]},
        "lone_surrogates": sum(has_lone_surrogate(rec["text"]) for rec in kept + removed),
        "domains": domains,
    }


def print_report(report):
    pct = lambda a, b: f"{100.0 * a / b:5.1f}%" if b else "   - "  # noqa: E731
    print(f"{'domain':<16}{'docs':>8}{'words':>11} | {'ads: docs':>10}{'words':>8} | {'fluency: docs':>14}"
          f"{'words':>8} | {'kept docs':>10}")
    for name, d in sorted(report["domains"].items()):
        a, f = d["removed"]["ads"], d["removed"]["fluency"]
        print(f"{name:<16}{d['documents']:>8}{d['words']:>11} | {pct(a['documents'], d['documents']):>10}"
              f"{pct(a['words'], d['words']):>8} | {pct(f['documents'], d['documents']):>14}"
              f"{pct(f['words'], d['words']):>8} | {d['kept']['documents']:>10}")
    print(f"total: {report['documents']} documents, {report['kept']} kept, {report['removed']} removed "
          f"(tokens = whitespace words); {report['bad_lines']['count']} bad line(s) skipped, "
          f"{report['non_utf8']['count']} with non-UTF-8 bytes replaced")
    for where in report["bad_lines"]["where"][:5]:
        print(f"  skipped {where}")
    for name, d in sorted(report["domains"].items()):
        for reason, r in d["removed"].items():
            for ex in r["examples"]:
                print(f"  [{name}] removed by {reason} (score {ex['score']}) {ex['source']}: {ex['text'][:100]!r}")


def has_lone_surrogate(text):
    return any("\ud800" <= c <= "\udfff" for c in text)


def jsonl_line(rec):
    """One output line. A lone surrogate cannot be written as UTF-8, so such a record keeps JSON's
    \\uXXXX escapes (ensure_ascii): it reads back as exactly the string that came in."""
    line = json.dumps(rec, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(rec, ensure_ascii=True)
    return line + "\n"


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(jsonl_line(rec))


def input_files(spec):
    """--input: paths separated by commas, each a file or a glob."""
    files = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise UserError(f"--input {item!r} matches no file")
        files += matches
    if not files:
        raise UserError("--input is required: .jsonl, .jsonl.zst or .txt file(s), separated by commas")
    return files


def check_config(config, inputs):
    """Every setting and path is checked before any input is read or output written."""
    if not config.out:
        raise UserError("--out is required: a folder for kept.jsonl, removed.jsonl and report.json")
    if not (config.ads or config.fluency):
        raise UserError("--ads=False and --fluency=False leave nothing to do: enable at least one filter")
    check_out(config, inputs)


def check_out(config, inputs):
    """fileio's rule: --out is a folder holding at most an earlier filter result, and no input is in it."""
    reads = [("--input", p) for p in inputs] + ([("--reference", config.reference)] if config.reference else [])
    try:
        check_output_dir(config.out, "--out", "a filter result", OUTPUTS, overwrite=True, inputs=reads)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv=None):
    config = load_config(FilterConfig(), sys.argv[1:] if argv is None else argv, doc=__doc__)
    inputs = input_files(config.input)
    check_config(config, inputs)
    stats = {"bad_lines": [], "non_utf8": []}
    docs = [doc for path in inputs for doc in read_documents(path, stats)]
    reference = read_reference(config.reference) if config.reference and config.fluency else None
    kept, removed = filter_documents(docs, config, reference)
    assert len(kept) + len(removed) == len(docs)  # every document ends in exactly one of the two
    report = build_report(kept, removed, stats, config, inputs)
    # The three files appear together, or not at all. A symlinked --out: its target is replaced, not the link.
    with atomic_dir(os.path.realpath(config.out)) as tmp:
        write_jsonl(os.path.join(tmp, "kept.jsonl"), kept)
        write_jsonl(os.path.join(tmp, "removed.jsonl"), removed)
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=True)
        check_out(config, inputs)  # again: something may have been put there while we scored
    print_report(report)
    return report


if __name__ == "__main__":
    run_cli(main)
