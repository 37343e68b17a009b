"""
Reading jsonl / jsonl.zst corpora: the one reader that data/prepare.py and filter.py share, and the one
map of SlimPajama's source names to our domain names (sample.py's paper weights use the same names).

SlimPajama ships as chunk folders of `*.jsonl.zst`, one JSON object per line:
    {"text": "...", "meta": {"redpajama_set_name": "RedPajamaC4"}}

What the reader promises, so that nothing is lost silently:
  * a file that ends before its zstandard frame does (a cut download) is an error naming the file,
    not a shorter corpus; a file named .zst that is not zstd is an error naming the file;
  * a line that is not a JSON object with a string "text" is skipped and reported as file:line;
  * bytes that are not UTF-8 become U+FFFD and are counted per line.
Files are streamed: a SlimPajama chunk never sits in memory whole.
"""

import glob
import json
import os
from pathlib import Path
from typing import NamedTuple

from configurator import UserError

# SlimPajama's meta.redpajama_set_name -> our domain name, in the paper's order (SPEC §4)
SLIMPAJAMA_SETS = {
    "RedPajamaCommonCrawl": "commoncrawl",
    "RedPajamaC4": "c4",
    "RedPajamaGithub": "github",
    "RedPajamaWikipedia": "wikipedia",
    "RedPajamaBook": "book",
    "RedPajamaArXiv": "arxiv",
    "RedPajamaStackExchange": "stackexchange",
}
SLIMPAJAMA_DOMAINS = tuple(SLIMPAJAMA_SETS.values())

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20  # compressed bytes read at a time


def decode_counting(raw):
    """bytes -> (text, number of replaced characters). Bad bytes never stop the pipeline: they become
    U+FFFD and are counted, so a report can say how dirty a source was."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # each replacement adds one U+FFFD that "ignore" would not: the difference is the count
        return text, len(text) - len(raw.decode("utf-8", errors="ignore"))


def jsonl_files(pattern):
    """A glob, a single file, or a folder (every *.jsonl / *.jsonl.zst below it), sorted."""
    p = Path(pattern)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.name.endswith((".jsonl", ".jsonl.zst")))
    else:
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise UserError(f"no .jsonl / .jsonl.zst files match {pattern!r}: pass a file, a folder or a glob "
                        f"(quoted, e.g. 'SlimPajama/train/chunk1/*.jsonl.zst')")
    for f in files:
        if not os.access(f, os.R_OK):
            raise UserError(f"{f} is not readable (check its permissions)")
    return files


def _zstd_blocks(f, path):
    """Decompressed bytes of a .zst file, block by block; raises if the last frame is unfinished."""
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path} is zstd-compressed: `pip install zstandard` to read it "
                        f"(or decompress it first with `zstd -d`)") from None
    dec = zstandard.ZstdDecompressor()
    obj, started = dec.decompressobj(), False
    while chunk := f.read(CHUNK):
        while chunk:
            if obj.eof:  # a file may hold several frames back to back
                obj = dec.decompressobj()
            try:
                out = obj.decompress(chunk)
            except zstandard.ZstdError as e:
                raise UserError(f"{path} is not a valid zstd file ({e}): re-download it, or if it is plain "
                                f"jsonl, rename it to .jsonl") from None
            started = True
            if out:
                yield out
            chunk = obj.unused_data if obj.eof else b""  # the next frame's start, if any
    if started and not obj.eof:
        raise UserError(f"{path} is truncated: its zstd frame ends early (an interrupted download or copy?); "
                        f"re-download it, or remove it from the input")


def iter_lines(path):
    """(line number, raw line bytes, compressed bytes consumed so far) for a .jsonl or .jsonl.zst file.
    The format is decided by the file's first bytes (zstd's magic number), so a misnamed file is read
    right or refused, never read as garbage."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        compressed = f.read(4) == ZSTD_MAGIC
        f.seek(0)
        if not compressed and path.endswith(".zst"):
            raise UserError(f"{path} is not a zstd file (no zstd magic number): re-download it, or if it is "
                            f"plain jsonl, rename it to .jsonl")
        blocks = _zstd_blocks(f, path) if compressed else iter(lambda: f.read(CHUNK), b"")
        lineno, rest = 0, b""
        for block in blocks:
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                lineno += 1
                yield lineno, line, f.tell()
        if rest:
            yield lineno + 1, rest, f.tell()


class Line(NamedTuple):
    where: str      # "file:line", for reports
    record: dict    # the parsed JSON object (its "text" is a str)
    replaced: int   # characters that were not valid UTF-8 and became U+FFFD
    position: int   # compressed bytes of the file consumed so far (progress)


def read_jsonl(path, on_bad):
    """Yield a Line for every JSON object with a string "text" in one file. Blank lines are skipped;
    other lines are reported with on_bad("file:line", why) and skipped."""
    for lineno, raw, position in iter_lines(path):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        text, replaced = decode_counting(raw)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            on_bad(where, f"not JSON ({e.msg})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            on_bad(where, 'not an object with a string "text"')
            continue
        yield Line(where, record, replaced, position)


def slimpajama_set(record):
    """meta.redpajama_set_name of a SlimPajama record, or None."""
    meta = record.get("meta")
    name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None
