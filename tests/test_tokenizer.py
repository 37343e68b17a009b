"""Tokenizer: both LLaMA tokenizer formats, built in the test, round-trip any text (issue 3)."""

import base64
import os
import sys
from pathlib import Path

import pytest

from tokenizer import (LLAMA3_NUM_SPECIAL, Tokenizer, _tiktoken_chunks, llama3_special_tokens,
                       train_sentencepiece)

# mixed text: code with tabs / trailing spaces / blank lines, accents, CJK, emoji, RTL, digits
MIXED = [
    "def f(x):\n\tif x  >  0:   # two spaces, a tab\n        return x ** 2  \n\n\n",
    "  leading spaces and trailing   ",
    "Ünïcödé: naïve café — 日本語のテキスト, 🤖🚀, עברית, Ελληνικά, ﬁ ligature, full-width ＡＢＣ",
    "numbers 3.14159 and 1,000,000; windows\r\nline ends\r\n",
    "a literal lower-one-eighth block ▁ and ▁▁ twice",
    "",
    " ",
    "\x00\x07 control chars \u200b zero-width",
]

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 5 + "\n"
    + "def add(a, b):\n    return a + b\n\n" * 20
    + "To be, or not to be, that is the question.\n" * 10
    + "for i in range(10):\n        print(i, i * i)\n" * 20
    + "Whether 'tis nobler in the mind to suffer the slings and arrows.\n" * 10
)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    text = d / "train.txt"
    text.write_text(TRAIN_TEXT)
    return train_sentencepiece([text], d / "tiny", vocab_size=400, num_threads=1)


def write_tiny_tiktoken(path):
    """A LLaMA-3 style BPE file: the 256 single bytes, then a few merges, ranks 0..n-1."""
    tokens = [bytes([b]) for b in range(256)]
    tokens += [b"th", b"the", b" t", b" the", b"in", b"ing", b"  ", b"    ", b"er", b"re", b"\n\n"]
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    path.write_text("\n".join(lines) + "\n")
    return len(tokens)


@pytest.fixture(scope="module")
def tt_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    n = write_tiny_tiktoken(path)
    return path, n


# --- sentencepiece ------------------------------------------------------------------------

def test_sentencepiece_round_trip(sp_model):
    tok = Tokenizer(sp_model)
    assert tok.kind == "sentencepiece"
    assert tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    for text in MIXED + [TRAIN_TEXT]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)
    # the trained merges are used: common text is much shorter than its bytes
    assert len(tok.encode(TRAIN_TEXT)) < 0.5 * len(TRAIN_TEXT.encode())


def test_sentencepiece_specials(sp_model):
    tok = Tokenizer(sp_model)
    ids = tok.encode("hello", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "hello"  # sentencepiece drops control ids when decoding
    # "<s>" in text is plain text unless allowed
    plain = tok.encode("<s>hi")
    assert tok.bos_id not in plain and tok.decode(plain) == "<s>hi"
    allowed = tok.encode("<s>hi</s>", allowed_special="all")
    assert allowed[0] == tok.bos_id and allowed[-1] == tok.eos_id
    assert allowed[1:-1] == tok.encode("hi")
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_llama2_style_sentencepiece(tmp_path):
    """LLaMA-1/2's tokenizer.model is a sentencepiece BPE with a dummy prefix: " " is added in front
    of the text when encoding and removed when decoding. Train one with those options here."""
    import sentencepiece as spm
    text = tmp_path / "t.txt"
    text.write_text(TRAIN_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "llama2ish"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    tok = Tokenizer(tmp_path / "llama2ish.model")
    assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id) == (1, 2)
    for t in MIXED:
        if "\u2581" not in t:
            assert tok.decode(tok.encode(t)) == t, repr(t)
    # as with Meta's own tokenizer, a literal U+2581 in the text reads back as a space
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


# --- tiktoken (LLaMA-3 layout) --------------------------------------------------------------

def test_llama3_special_layout():
    specials = llama3_special_tokens()
    assert len(specials) == LLAMA3_NUM_SPECIAL == 256 and len(set(specials)) == 256
    # with LLaMA-3's 128000 ranks these are the ids Meta's tokenizer uses
    ids = {s: 128000 + i for i, s in enumerate(specials)}
    assert ids["<|begin_of_text|>"] == 128000 and ids["<|end_of_text|>"] == 128001
    assert ids["<|start_header_id|>"] == 128006 and ids["<|end_header_id|>"] == 128007
    assert ids["<|eot_id|>"] == 128009
    assert ids["<|reserved_special_token_0|>"] == 128002
    assert ids["<|reserved_special_token_4|>"] == 128008
    assert ids["<|reserved_special_token_250|>"] == 128255


def test_tiktoken_round_trip(tt_model):
    path, n = tt_model
    tok = Tokenizer(path)
    assert tok.kind == "tiktoken"
    assert tok.vocab_size == n + 256
    assert tok.bos_id == n and tok.eos_id == n + 1
    for text in MIXED + [TRAIN_TEXT]:
        ids = tok.encode(text)
        assert all(0 <= i < n for i in ids)  # plain text never yields a special id
        assert tok.decode(ids) == text, repr(text)
    # the merges apply inside pre-tokens: " the" is one token, "the" is one token
    assert tok.encode(" the") == [n - 8]
    assert tok.encode("the") == [n - 10]
    # the LLaMA-3 pattern splits digits in groups of at most three (no merges across groups)
    assert tok.decode(tok.encode("1234567")) == "1234567"


def test_tiktoken_specials(tt_model):
    path, n = tt_model
    tok = Tokenizer(path)
    eot = tok.special_tokens["<|eot_id|>"]
    assert eot == n + 9
    text = "hi<|eot_id|>there"
    plain = tok.encode(text)
    assert eot not in plain and tok.decode(plain) == text
    only = tok.encode(text, allowed_special={"<|eot_id|>"})
    assert only.count(eot) == 1 and tok.decode(only) == text
    ids = tok.encode("x", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|begin_of_text|>x<|end_of_text|>"
    # "all" allows every special, and the longest match wins
    both = tok.encode("<|begin_of_text|><|end_of_text|>", allowed_special="all")
    assert both == [tok.bos_id, tok.eos_id]


def test_tiktoken_long_runs_round_trip(tt_model):
    path, _ = tt_model
    tok = Tokenizer(path)
    text = "a" * 60_000 + " " * 30_000 + "end\n" + "word " * 20_000
    chunks = _tiktoken_chunks(text)
    assert "".join(chunks) == text and len(chunks) > 1
    assert tok.decode(tok.encode(text)) == text


# --- bad input ------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "nope.model")


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in folder .*tokenizer.model / tokenizer.json"):
        Tokenizer(tmp_path)


def test_empty_and_garbage_files(tmp_path):
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer(empty)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not a tokenizer at all" * 10)
    with pytest.raises(ValueError, match="neither a sentencepiece model"):
        Tokenizer(junk)


def test_bad_tiktoken_line_is_named(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("IQ== 0\nIg== 1\nthis line is broken\n")
    with pytest.raises(ValueError, match=r"bad.model:3"):
        Tokenizer(path)
    gap = tmp_path / "gap.model"
    gap.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(ValueError, match="ranks must be"):
        Tokenizer(gap)


def test_unreadable_file(tmp_path, sp_model, monkeypatch):
    path = tmp_path / "locked.model"
    path.write_bytes(Path(sp_model).read_bytes())
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: pretend the permission check says no
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(PermissionError, match="not readable"):
        Tokenizer(path)


def test_decode_out_of_range(sp_model, tt_model):
    for tok in (Tokenizer(sp_model), Tokenizer(tt_model[0])):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([0, tok.vocab_size])
        with pytest.raises(ValueError, match="out of range"):
            tok.decode([-1])


def test_train_sentencepiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        train_sentencepiece([tmp_path / "missing.txt"], tmp_path / "m", vocab_size=300)
    small = tmp_path / "small.txt"
    small.write_text("tiny text\n")
    with pytest.raises(ValueError, match="too small"):
        train_sentencepiece([small], tmp_path / "m", vocab_size=100)
    with pytest.raises(ValueError, match="lower it"):
        train_sentencepiece([small], tmp_path / "m", vocab_size=5000, num_threads=1)
