"""Tokenizer: both LLaMA tokenizer formats, built in the test, round-trip any text."""

import base64
import os
from pathlib import Path

import conftest
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


# --- byte-level BPE: Hugging Face tokenizer.json and GGUF -------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

BPE_TRAIN_TEXT = (
    TRAIN_TEXT
    + "x = [1, 22, 333, 4444]  # 12 items\n    y  =  42\r\n" * 10
    + "日本語のテキストです。中文也可以。 🤖🚀 emoji 😀\n" * 10
    + "Ünïcödé naïve café — ﬁ ligature, full-width ＡＢＣ\n" * 5
)

# code, digits, CJK, emoji, CRLF, leading / repeated spaces, special tokens
BPE_TEXTS = MIXED + [
    TRAIN_TEXT[:500],
    "for i in range(10):\n        print(i, i * i)\n",
    "digits 0 1 22 333 4444 55555 3.14159 1,000,000 x2 2x",
    "spaces before digits:  5,   66,\t7,\n    8\n\n9",
    "   leading spaces, then text",
    "CRLF\r\nline\r\n\r\nends\r",
    "日本語のテキスト、中文，한국어 🤖🚀😀👍🏽 ‍ family 👨‍👩‍👧",
    "she's, they're, I'll, we've, it'd, I'm — don't",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>glued<|im_end|>",
    "a<|im_start|b  unfinished specials <|im_end",
]

# pre-tokenizer layouts real byte-level models ship: GPT-2, LLaMA-3, SmolLM / StarCoder
LAYOUTS = ["gpt2", "llama3", "smollm"]


def train_byte_level(path, layout, vocab_size=600, full_alphabet=True, bos=None):
    """Train a byte-level BPE tokenizer.json with the `tokenizers` package."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizer import LLAMA3_PATTERN
    tk = HFTokenizer(models.BPE())
    if layout == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif layout == "llama3":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if full_alphabet else [])
    tk.train_from_iterator([BPE_TRAIN_TEXT], trainer)
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return path


def hf_fast(path):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def hf_ids(hf, text):
    """transformers matches added tokens anywhere in the text; ours only where allowed (all here)."""
    return hf(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module", params=LAYOUTS)
def bpe_json(request, tmp_path_factory):
    return train_byte_level(tmp_path_factory.mktemp(request.param) / "tokenizer.json", request.param)


def test_tokenizer_json_matches_transformers(bpe_json):
    tok, hf = Tokenizer(bpe_json), hf_fast(bpe_json)
    assert tok.kind == "tokenizer.json"
    assert tok.vocab_size == len(hf) and tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    assert tok._remap is None  # trained ids grow with the merges: rank = id
    for text in BPE_TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert ids == hf_ids(hf, text), repr(text)
        assert tok.decode(ids) == hf.decode(ids) == text, repr(text)
    # merges are really used, and special-token text is plain text unless allowed
    assert len(tok.encode(BPE_TRAIN_TEXT)) < 0.5 * len(BPE_TRAIN_TEXT.encode())
    plain = tok.encode("<|im_start|>hi")
    assert tok.special_tokens["<|im_start|>"] not in plain and tok.decode(plain) == "<|im_start|>hi"


def test_long_text_is_cut_where_no_pre_token_spans(bpe_json, monkeypatch):
    """Text longer than one tiktoken call is cut only after a letter / digit that a space follows, so
    the ids are those transformers gives for the whole text."""
    import tokenizer as tokmod
    tok, hf = Tokenizer(bpe_json), hf_fast(bpe_json)
    text = "".join(BPE_TEXTS[:12]) * 4
    monkeypatch.setattr(tokmod, "TIKTOKEN_MAX_CHARS", 300)
    monkeypatch.setattr(tokmod, "TIKTOKEN_MAX_RUN", 250)
    chunks = _tiktoken_chunks(text)
    assert len(chunks) > 5 and "".join(chunks) == text and max(map(len, chunks)) <= 300
    assert tok.encode(text) == hf_ids(hf, text)


def test_tokenizer_json_ranks_follow_merges_not_ids(tmp_path):
    """A vocabulary whose ids do not grow with its merges: ranks come from the merge order (and are
    mapped back to ids); bytes the vocabulary lacks are dropped, as transformers does."""
    import json
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", "gpt2", full_alphabet=False)
    spec = json.loads(src.read_text())
    vocab = spec["model"]["vocab"]
    n, keep = len(vocab), set(range(len(SPECIALS)))
    spec["model"]["vocab"] = {t: (i if i in keep else n - 1 - i + len(SPECIALS)) for t, i in vocab.items()}
    shuffled = tmp_path / "shuffled" / "tokenizer.json"
    shuffled.parent.mkdir()
    shuffled.write_text(json.dumps(spec, ensure_ascii=False))
    tok, hf = Tokenizer(shuffled), hf_fast(shuffled)
    assert tok._remap is not None
    for text in BPE_TEXTS + ["unseen bytes: \x01\x02 ~ Ω ж"]:
        assert tok.encode(text, allowed_special="all") == hf_ids(hf, text), repr(text)


def test_tokenizer_json_bos_eos_from_template_and_config(tmp_path):
    import json
    path = train_byte_level(tmp_path / "a" / "tokenizer.json", "llama3", bos="<|im_start|>")
    tok, hf = Tokenizer(path), hf_fast(path)
    assert tok.add_bos is True and tok.bos_id == 1  # from the TemplateProcessing post-processor
    assert tok.eos_id == 0  # no config: the conventional name <|endoftext|>
    text = "hello world"
    assert tok.encode(text, bos=tok.add_bos) == hf(text)["input_ids"]
    # tokenizer_config.json beside it names bos / eos and add_bos_token (no template here)
    path = train_byte_level(tmp_path / "b" / "tokenizer.json", "smollm")
    assert Tokenizer(path).add_bos is False
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>", "add_bos_token": True}))
    tok = Tokenizer(tmp_path / "b")  # the folder finds its tokenizer.json
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    ids = tok.encode("x", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tok.decode(ids) == "<|im_start|>x<|im_end|>"


def test_tokenizer_json_refusals(tmp_path):
    import json
    src = json.loads(train_byte_level(tmp_path / "src" / "tokenizer.json", "gpt2").read_text())

    def variant(name, change):
        spec = json.loads(json.dumps(src))
        change(spec)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(spec))
        return path

    wordpiece = variant("wp", lambda s: s["model"].update(type="WordPiece"))
    with pytest.raises(ValueError, match="model.type = 'WordPiece'"):
        Tokenizer(wordpiece)
    metaspace = variant("ms", lambda s: s.update(pre_tokenizer={"type": "Metaspace", "replacement": "\u2581"}))
    with pytest.raises(ValueError, match=r"pre_tokenizer \['Metaspace'\] is not a layout we read"):
        Tokenizer(metaspace)
    prefix = variant("px", lambda s: s["pre_tokenizer"].update(add_prefix_space=True))
    with pytest.raises(ValueError, match="pre_tokenizer"):
        Tokenizer(prefix)
    broken = variant("br", lambda s: s["model"]["merges"].append("Ġ zzzq"))
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer(broken)
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer(bad)


# --- GGUF ------------------------------------------------------------------------------------

def write_gguf(path, tokenizer_json=None, model="gpt2", pre="smollm", add_bos=None, arch="llama",
               tensors=()):
    """A GGUF holding the tokenizer of a tokenizer.json (llama.cpp's keys), written with gguf.GGUFWriter."""
    import json
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer_json is not None:
        spec = json.loads(Path(tokenizer_json).read_text())
        tokens = [None] * len(spec["model"]["vocab"])
        for t, i in spec["model"]["vocab"].items():
            tokens[i] = t
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
    for name, value in tensors:
        w.add_tensor(name, np.asarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def has_whitespace_run_before_digit(text):
    import re
    return re.search(r"\s{2,}\d", text) is not None


def test_gguf_matches_transformers_and_the_original_tokenizer(tmp_path):
    """pre=smollm: our GGUF tokenizer equals the tokenizer.json it was made from (SmolLM's own
    Digits + ByteLevel pre-tokenizer, as llama.cpp runs it) on every text, and transformers' GGUF
    loader on every text but those with a whitespace run before a digit: that loader ignores
    tokenizer.ggml.pre = smollm and runs the plain GPT-2 regex ("x  5" -> "x", " ", " 5")."""
    from transformers import AutoTokenizer
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", "smollm")
    (tmp_path / "g").mkdir()  # alone in its folder: transformers would prefer a tokenizer.json beside it
    path = write_gguf(tmp_path / "g" / "tiny.gguf", src)
    tok, orig = Tokenizer(path), hf_fast(src)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "g"), gguf_file="tiny.gguf")
    assert tok.kind == "gguf" and tok.pre == "smollm"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (len(hf), 1, 2, False)
    assert tok.special_tokens == {s: i for i, s in enumerate(SPECIALS)}
    compared = 0
    for text in BPE_TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert ids == hf_ids(orig, text), repr(text)
        assert tok.decode(ids) == text
        if not has_whitespace_run_before_digit(text):
            assert ids == hf_ids(hf, text), repr(text)
            compared += 1
    assert compared >= len(BPE_TEXTS) - 3
    # the difference, spelled out: two spaces before a digit stay one token ("ĠĠ") here
    two = tok.encode("x  5")
    assert two == hf_ids(orig, "x  5") and len(two) == 3 and tok.decode(two[1:2]) == "  "


@pytest.mark.parametrize("layout,pre", [("gpt2", "gpt-2"), ("llama3", "llama-bpe")])
def test_gguf_other_pre_tokenizers_match_transformers(tmp_path, layout, pre):
    from transformers import AutoTokenizer
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", layout)
    (tmp_path / "g").mkdir()
    path = write_gguf(tmp_path / "g" / "t.gguf", src, pre=pre)
    tok = Tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "g"), gguf_file="t.gguf")
    # llama.cpp adds BOS by default for the LLaMA-3 family only
    assert tok.add_bos is (pre == "llama-bpe")
    for text in BPE_TEXTS:
        assert tok.encode(text, allowed_special="all") == hf_ids(hf, text), repr(text)


def write_sentencepiece_gguf(path, sp_path, add_space_prefix=None):
    """A LLaMA-2 style GGUF vocabulary (tokenizer.ggml.model = llama) from a sentencepiece model,
    as llama.cpp's convert script writes it: pieces, scores, sentencepiece token types."""
    import gguf
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    n = sp.vocab_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_gguf_sentencepiece_vocab_matches_its_model(tmp_path, dummy_prefix):
    """tokenizer.ggml.model = llama: the rebuilt sentencepiece model encodes exactly as the
    tokenizer.model the GGUF was made from (LLaMA-2 style: dummy prefix, byte fallback, split digits).
    (transformers' GGUF loader is no reference here: it turns scores into merges for its own BPE and
    then differs from sentencepiece on runs of spaces, e.g. "  leading spaces".)"""
    import sentencepiece as spm
    text = tmp_path / "t.txt"
    text.write_text(BPE_TRAIN_TEXT)
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=dummy_prefix, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2, num_threads=1)
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf", tmp_path / "sp.model",
                                    add_space_prefix=None if dummy_prefix else False)
    tok = Tokenizer(path)
    assert tok.kind == "gguf" and tok._sp is not None
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (500, 1, 2, True)
    assert tok.special_tokens == {"<s>": 1, "</s>": 2}
    for t in MIXED + BPE_TEXTS:
        ids = tok.encode(t)
        assert ids == ref.encode(t), repr(t)
        assert tok.decode(ids) == ref.decode(ids)
    ids = tok.encode("<s>hi</s>", allowed_special="all")
    assert ids[0] == 1 and ids[-1] == 2


def test_gguf_fingerprint_is_the_tokenizer_not_the_weights(tmp_path):
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", "smollm")
    a = write_gguf(tmp_path / "a.gguf", src, tensors=[("w", [1.0, 2.0])])
    b = write_gguf(tmp_path / "b.gguf", src, tensors=[("w", [3.0, 4.0]), ("v", [5.0])])
    c = write_gguf(tmp_path / "c.gguf", src, pre="gpt-2")
    fa, fb, fc = (Tokenizer(p).fingerprint for p in (a, b, c))
    assert a.read_bytes() != b.read_bytes() and fa == fb
    assert fc != fa and len(fa) == 64
    assert Tokenizer(write_gguf(tmp_path / "d.gguf", src, add_bos=True)).add_bos is True


def test_gguf_refusals(tmp_path):
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", "gpt2")
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre = 'qwen9' .*supported: gpt-2, llama-bpe"):
        Tokenizer(write_gguf(tmp_path / "pre.gguf", src, pre="qwen9"))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre = None"):
        Tokenizer(write_gguf(tmp_path / "nopre.gguf", src, pre=None))
    with pytest.raises(ValueError, match=r"tokenizer.ggml.model = 'bert' is not supported"):
        Tokenizer(write_gguf(tmp_path / "bert.gguf", src, model="bert"))
    with pytest.raises(ValueError, match=r"'llama' tokenizer needs tokenizer.ggml.tokens, .scores"):
        Tokenizer(write_gguf(tmp_path / "spm.gguf", src, model="llama"))  # no scores
    with pytest.raises(ValueError, match="holds no tokenizer"):
        Tokenizer(write_gguf(tmp_path / "weights_only.gguf", None, tensors=[("w", [1.0])]))
    whole = write_gguf(tmp_path / "whole.gguf", src).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer(cut)


def test_folder_finds_its_tokenizer(tmp_path, sp_model):
    import shutil
    spf = tmp_path / "sp"
    spf.mkdir()
    shutil.copy(sp_model, spf / "tokenizer.model")
    assert Tokenizer(spf).kind == "sentencepiece"
    gf = tmp_path / "gguf"
    gf.mkdir()
    write_gguf(gf / "model-Q4.gguf", train_byte_level(tmp_path / "src" / "tokenizer.json", "smollm"))
    assert Tokenizer(gf).kind == "gguf"
    write_gguf(gf / "model-F16.gguf", tmp_path / "src" / "tokenizer.json")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        Tokenizer(gf)


@pytest.mark.parametrize("layout,pre", [("smollm", "smollm"), ("llama3", "llama-bpe"), ("gpt2", "gpt-2")])
def test_save_gguf_tokenizer_as_tokenizer_json(tmp_path, layout, pre):
    """save() writes a GGUF's tokenizer as tokenizer.json + tokenizer_config.json: same fingerprint,
    same ids, and transformers loading that folder agrees with us on every text (whitespace before
    digits included, unlike its GGUF loader), adding BOS exactly when add_bos says so."""
    from transformers import AutoTokenizer
    src = train_byte_level(tmp_path / "src" / "tokenizer.json", layout)
    gg = Tokenizer(write_gguf(tmp_path / "t.gguf", src, pre=pre))
    out = tmp_path / "ckpt"
    assert gg.save(out) == out / "tokenizer.json"
    back = Tokenizer(out)
    assert back.kind == "tokenizer.json" and back.fingerprint == gg.fingerprint
    assert (back.vocab_size, back.bos_id, back.eos_id, back.add_bos, back.special_tokens) == \
        (gg.vocab_size, gg.bos_id, gg.eos_id, gg.add_bos, gg.special_tokens)
    hf = AutoTokenizer.from_pretrained(str(out))
    for text in BPE_TEXTS:
        ids = gg.encode(text, allowed_special="all")
        assert back.encode(text, allowed_special="all") == ids, repr(text)
        assert hf(text)["input_ids"] == ([gg.bos_id] if gg.add_bos else []) + ids, repr(text)
    # the fingerprint follows the ids: another split regex is another tokenizer
    other = Tokenizer(write_gguf(tmp_path / "o.gguf", src, pre="gpt-2" if pre != "gpt-2" else "smollm"))
    assert other.fingerprint != gg.fingerprint


def test_save_sentencepiece_kinds(tmp_path, sp_model):
    tok = Tokenizer(sp_model)
    copy = tok.save(tmp_path / "a")
    assert copy.name == "tokenizer.model" and Tokenizer(tmp_path / "a").fingerprint == tok.fingerprint
    gg = Tokenizer(write_sentencepiece_gguf(tmp_path / "sp.gguf", sp_model))
    gg.save(tmp_path / "b")
    back = Tokenizer(tmp_path / "b")
    assert back.kind == "sentencepiece" and back.fingerprint == gg.fingerprint
    for text in MIXED:
        assert back.encode(text) == gg.encode(text), repr(text)


# --- the real SmolLM2 GGUF (skipped when absent) -------------------------------------------------

def smollm2_gguf():
    found = conftest.smollm2_gguf()
    return Path(found) if found else None


REAL_TEXTS = BPE_TEXTS + [
    Path(__file__).read_text()[:4000],
    "The capital of France is Paris. Numbers: 2024-11-27, 3.14, 1e-5, 0xFF, 100,000 and 7th.",
    "Ελληνικά, русский текст, עברית, العربية, हिन्दी, ไทย, Tiếng Việt",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "<jupyter_code>import numpy as np<jupyter_output><empty_output>",
]


def smollm2_reference(path):
    """transformers' tokenizer for the GGUF, and the same vocabulary + merges with SmolLM2's own
    pre-tokenizer (its tokenizer.json on the Hub: Sequence[Digits(individual_digits), ByteLevel];
    llama.cpp's "smollm": the regexes "\\p{N}" then GPT-2's, one after the other)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    orig = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    orig.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return hf, orig


@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF not present (set LLAMA_MOE_SMOLLM2_GGUF)")
def test_real_smollm2_gguf_matches_transformers():
    path = smollm2_gguf()
    tok = Tokenizer(path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos, tok.pre) == (49152, 1, 2, False, "smollm")
    assert len(tok.special_tokens) == 17 and tok.special_tokens["<|im_end|>"] == 2
    hf, orig = smollm2_reference(path)
    for text in REAL_TEXTS:
        ids = tok.encode(text, allowed_special="all")
        assert tok.decode(ids) == text, repr(text)
        assert ids == orig.encode(text).ids, repr(text)
        if not has_whitespace_run_before_digit(text):
            assert ids == hf_ids(hf, text), repr(text)
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]


@pytest.mark.skipif(smollm2_gguf() is None, reason="SmolLM2 GGUF not present (set LLAMA_MOE_SMOLLM2_GGUF)")
def test_real_smollm2_saved_as_tokenizer_json(tmp_path):
    """The SmolLM2 tokenizer written by save(): transformers reading that folder gives our ids on
    every text, whitespace before digits included."""
    from transformers import AutoTokenizer
    tok = Tokenizer(smollm2_gguf())
    tok.save(tmp_path)
    assert Tokenizer(tmp_path).fingerprint == tok.fingerprint
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in REAL_TEXTS:
        assert hf(text)["input_ids"] == tok.encode(text, allowed_special="all"), repr(text)


def embedded_val_texts(data_dir):
    """{domain: [document text]} from the embedded corpus's val shards (each document ends with eos)."""
    import json
    import numpy as np
    meta = json.loads((data_dir / "meta.json").read_text())
    shard_tok = Tokenizer(data_dir / meta["tokenizer"])
    out = {}
    for domain in meta["domains"]:
        ids = np.fromfile(data_dir / f"{domain}.val.bin", dtype=meta["dtype"])
        ends = np.flatnonzero(ids == meta["eos_id"])
        starts = np.concatenate([[0], ends[:-1] + 1])
        out[domain] = [shard_tok.decode(ids[a:b].tolist()) for a, b in zip(starts, ends)]
    return out


EMBEDDED = Path(os.environ.get("LLAMA_MOE_EMBEDDED", Path(__file__).resolve().parents[1] / "data" / "embedded"))


@pytest.mark.skipif(smollm2_gguf() is None or not (EMBEDDED / "meta.json").is_file(),
                    reason="needs the SmolLM2 GGUF and the embedded corpus (python data/prepare.py)")
def test_real_smollm2_on_embedded_validation_text():
    """Every validation document of every domain tokenizes exactly as SmolLM2's own tokenizer."""
    path = smollm2_gguf()
    tok = Tokenizer(path)
    _, orig = smollm2_reference(path)
    for domain, docs in embedded_val_texts(EMBEDDED).items():
        assert docs, domain
        for k, text in enumerate(docs):
            assert tok.encode(text) == orig.encode(text, add_special_tokens=False).ids, f"{domain} doc {k}"


def test_check_same_tokenizer_names_the_two_that_differ():
    from tokenizer import check_same_tokenizer
    check_same_tokenizer({"a": "1" * 64, "b": None, "c": "1" * 64}, "fix it")  # None: not recorded, not checked
    check_same_tokenizer({}, "fix it")
    with pytest.raises(ValueError, match=r"^tokenizer mismatch: c comes from another tokenizer than a "
                                         r"\(tokenizer_sha256 222222222222\.\.\. vs 111111111111\.\.\.\): fix it$"):
        check_same_tokenizer({"a": "1" * 64, "b": None, "c": "2" * 64, "d": "3" * 64}, "fix it")
