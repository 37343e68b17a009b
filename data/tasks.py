"""
Evaluation tasks made from held-out (val) text, written to OUT/tasks/*.jsonl by data/prepare.py.

One multiple-choice item per line: {"context", "choices" (4), "label" (index of the true one), "domain"}.
Choices are continuations appended verbatim to the context (they carry their leading space); eval.py
scores each choice by the model's log-likelihood given the context.

  cloze         LAMBADA-style: the word that ends a sentence              build_cloze
  continuation  HellaSwag-style: the sentence that follows a passage      build_continuation
  quiz          question answering from the bsdgames quiz files           build_quiz
"""

import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

from data.jsonl import decode_counting

CLOZE_HOW = ("LAMBADA-style cloze: a passage of up to 600 characters from a held-out (val) document "
             "that ends in a sentence-final word; context = the passage without that word, choices = "
             "' ' + the true word and 3 distractor words drawn by frequency from the same domain's "
             "val vocabulary with the same capitalisation; label = index of the true word.")
CONT_HOW = ("HellaSwag-style continuation: context = up to 600 characters of a val document ending "
            "at a sentence end; true ending = the next sentence (whitespace collapsed); 3 distractors "
            "= sentences of similar length (0.5x-2x) from other val documents of the same domain.")
QUIZ_HOW = ("Question answering from the Debian bsdgames quiz files: one real question/answer pair "
            "per item (column 0 -> column j of one record), context '{question field}: {question}\\n"
            "{answer field}:', 3 distractors = other answers in the same column of the same file; "
            "quiz markup expanded ({optional} text kept, first of [a|b] alternatives).")

_WORD = re.compile(r"(?<![\w'’-])[A-Za-z][a-z]{2,}(?![\w'’-])")
# a plain word after a non-blank + one space, ending a sentence: "... the pepper when he pleases."
# (not "    self." in indented code, not "os.path")
_CLOZE_END = re.compile(r"(?<=\S) ([A-Za-z][a-z]{2,})[.!?](?=\s|$)")
# sentence ends: . ! ? (plus closing quotes) before whitespace, or a paragraph break
_SENT_END = re.compile(r"[.!?][\"')\]]*(?=\s)|(?=\n[ \t]*\n)")


def _context_before(text, end, max_chars):
    """text[start:end] with start <= max_chars back, moved forward to a word boundary."""
    start = max(0, end - max_chars)
    if start > 0:
        m = re.search(r"\s", text[start:end])
        start = start + m.end() if m else start
    return text[start:end]


def _mc_item(rng, context, true_choice, distractors, domain):
    choices = [true_choice] + distractors
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(true_choice), "domain": domain}


def build_cloze(val_texts, rng, per_domain, max_context=600, min_context=200):
    items = []
    for domain in sorted(val_texts):
        docs = val_texts[domain]
        # occurrences, not distinct words: draws follow the domain's word frequencies, like the target
        vocab = [w for t in docs for w in _WORD.findall(t)]
        by_case = {True: [w for w in vocab if w[0].isupper()], False: [w for w in vocab if w.islower()]}
        cands = []
        for d, text in enumerate(docs):
            last = -max_context
            for m in _CLOZE_END.finditer(text):
                if m.start() >= min_context and m.start() - last >= max_context:  # no overlapping passages
                    cands.append((d, m.start(1), m.group(1)))
                    last = m.start()
        for d, pos, word in sorted(rng.sample(cands, min(per_domain, len(cands)))):
            context = _context_before(docs[d], pos - 1, max_context)
            same_case = by_case[word[0].isupper()]  # "Hamlet" gets capitalised rivals, "pleases" lower case
            distractors = []
            for _ in range(200 if same_case else 0):
                w = rng.choice(same_case)
                if w.lower() != word.lower() and w not in distractors:
                    distractors.append(w)
                if len(distractors) == 3:
                    break
            if len(distractors) == 3:
                items.append(_mc_item(rng, context, " " + word, [" " + w for w in distractors], domain))
    return items


def _sentences(text):
    """[(start, end)] of sentences: cut after . ! ? (and closing quotes) followed by whitespace,
    and at blank lines (a heading or a verse ends there without a full stop)."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
            start = m.end()
    return spans


def _is_prose_sentence(s):
    """A sentence worth asking about: 25-250 characters, 4+ words, starts like a sentence and is
    mostly letters (so code lines and '%' separators don't become endings or tell-tale distractors)."""
    return (25 <= len(s) <= 250 and len(s.split()) >= 4 and (s[0].isupper() or s[0] in "\"'(")
            and sum(c.isalpha() or c == " " for c in s) >= 0.85 * len(s))


def build_continuation(val_texts, rng, per_domain, max_context=600, min_context=150):
    items = []
    for domain in sorted(val_texts):
        docs = val_texts[domain]
        endings, cands = [], []  # endings: (doc, position, sentence); cands: (doc, context end, sentence)
        for d, text in enumerate(docs):
            spans = _sentences(text)
            for (a, b), (c, e) in zip(spans, spans[1:]):
                sent = " ".join(text[c:e].split())
                if _is_prose_sentence(sent):
                    endings.append((d, c, sent))
                    if b >= min_context:
                        cands.append((d, b, sent))
        for d, b, sent in sorted(rng.sample(cands, min(per_domain, len(cands)))):
            # other documents' sentences; a domain with one val document uses far-away sentences
            others = [e for e in endings if e[0] != d] or [e for e in endings if abs(e[1] - b) > 2000]
            fits = [s for _, _, s in others if 0.5 <= len(s) / len(sent) <= 2 and s != sent]
            distractors = []
            for s in rng.sample(fits, min(len(fits), 50)):
                if s not in distractors:
                    distractors.append(s)
                if len(distractors) == 3:
                    break
            if len(distractors) == 3:
                context = _context_before(docs[d], b, max_context)
                items.append(_mc_item(rng, context, " " + sent, [" " + s for s in distractors], domain))
    return items


def expand_quiz(field):
    """bsdgames quiz markup -> one plain answer: {optional} kept, [a|b] and a|b -> a, \\x -> x."""
    def alternatives(i, closer):
        alts = [""]
        while i < len(field):
            c = field[i]
            if c == "\\" and i + 1 < len(field):
                alts[-1] += field[i + 1]
                i += 2
            elif c in "{[":
                text, i = alternatives(i + 1, "}" if c == "{" else "]")
                alts[-1] += text
            elif c == "|":
                alts.append("")
                i += 1
            elif c == closer:
                return alts[0], i + 1
            else:
                alts[-1] += c
                i += 1
        return alts[0], i
    return " ".join(alternatives(0, None)[0].split())


def split_quiz_fields(line):
    """Split a quiz record at ':' outside {} / [] and not escaped."""
    out, cur, depth, i = [], "", 0, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            cur += line[i:i + 2]
            i += 2
            continue
        depth += (c in "{[") - (c in "}]")
        if c == ":" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    return out + [cur]


def read_quiz(quiz_dir):
    """{file name: (field names, [records])} from the quiz index and its data files."""
    quiz_dir = Path(quiz_dir)
    index = quiz_dir / "index"
    if not index.exists():
        raise FileNotFoundError(f"{index} not found (apt-get install bsdgames)")
    quizzes = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = split_quiz_fields(line)
        if len(parts) < 3:
            continue
        path = quiz_dir / Path(parts[0]).name
        if not path.exists():
            continue
        text, _ = decode_counting(path.read_bytes())
        text = re.sub(r"\\\n", "", text)  # a trailing backslash continues the record
        records = [[expand_quiz(f) for f in split_quiz_fields(ln)] for ln in text.splitlines() if ln.strip()]
        quizzes[path.name] = ([expand_quiz(p) for p in parts[1:]], records)
    return quizzes


def build_quiz(quiz_dir, rng, n_items):
    quizzes = read_quiz(quiz_dir)
    cands, answers = [], defaultdict(list)
    for name in sorted(quizzes):
        names, records = quizzes[name]
        for rec in records:
            for j in range(1, min(len(rec), len(names))):
                if rec[0] and rec[j]:
                    cands.append((name, j, rec[0], rec[j]))
                    answers[name, j].append(rec[j])
    # round-robin over the files, so the 100-line files don't crowd out the 20-line ones
    per_file = defaultdict(list)
    for c in cands:
        per_file[c[0]].append(c)
    queues = [rng.sample(per_file[name], len(per_file[name])) for name in sorted(per_file)]
    items = []
    while queues and len(items) < n_items:
        for queue in list(queues):
            if not queue:
                queues.remove(queue)
                continue
            name, j, q, a = queue.pop()
            pool = sorted({x for x in answers[name, j] if x.lower() != a.lower()})
            if len(pool) < 3 or len(items) == n_items:
                continue
            names = quizzes[name][0]
            context = f"{names[0]}: {q}\n{names[j]}:"
            items.append(_mc_item(rng, context, " " + a, [" " + x for x in rng.sample(pool, 3)], f"quiz/{name}"))
    return items


def write_tasks(out_dir, val_texts, cfg):
    """Write OUT/tasks/{cloze,continuation,quiz}.jsonl; return the manifest's description of them.
    (OUT is the dataset's temporary folder: the whole dataset appears at once, see prepare.py.)"""
    task_dir = Path(out_dir) / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    built = {"cloze": (build_cloze(val_texts, rng, cfg.task_items_per_domain), CLOZE_HOW),
             "continuation": (build_continuation(val_texts, rng, cfg.task_items_per_domain), CONT_HOW)}
    try:
        built["quiz"] = (build_quiz(cfg.quiz_dir, rng, cfg.quiz_items), QUIZ_HOW)
    except FileNotFoundError as e:
        print(f"skip  quiz task: {e}")
    info = {}
    for name, (items, how) in built.items():
        (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items),
                                                encoding="utf-8")
        info[name] = {"file": f"tasks/{name}.jsonl", "items": len(items),
                      "per_domain": dict(sorted(Counter(it["domain"].split("/")[0] for it in items).items())),
                      "how": how}
    return info
