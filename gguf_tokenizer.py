"""
Chapter: the tokenizer inside a GGUF - llama.cpp's tokenizer.ggml.* metadata, read and written.

A GGUF carries its tokenizer as metadata, not as a file: the tokens with their types (normal, control, byte,
...), and either a sentencepiece BPE's scores (tokenizer.ggml.model 'llama', LLaMA-1/2) or a byte-level BPE's
merges plus the *name* of its pre-tokenizer (model 'gpt2', tokenizer.ggml.pre, e.g. "smollm"; tokenizer.py
says what the split regexes are). tokenizer.py's Tokenizer reads a .gguf through read_gguf_tokenizer, and
gguf_file.save_gguf writes tokenizer_metadata into the files it makes. What a GGUF cannot hold is refused when
writing, never approximated. Files we write also hold the sentencepiece or tiktoken tokenizer.model itself
(MODEL_FILE_KEY), so reading one back gives the same tokenizer, fingerprint included.

Read top to bottom:
  1. llama.cpp's names - token types, pre-tokenizer names.
  2. Reading           - the metadata -> a tokenizer spec; a sentencepiece model rebuilt from a vocabulary.
  3. Writing           - a Tokenizer -> {GGUF key: value}.
"""
import base64
import re

from gguf_file import read_gguf_metadata
from tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, SMOLLM_PATTERN

# ----------------------------------------------------------------------------------------------------------
# 1. llama.cpp's names

# llama.cpp's token types (tokenizer.ggml.token_type; sentencepiece numbers its piece types the same way)
GGUF_TOKEN_NORMAL, GGUF_TOKEN_UNKNOWN, GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED = 1, 2, 3, 4
GGUF_TOKEN_UNUSED, GGUF_TOKEN_BYTE = 5, 6
PAD_TOKEN = re.compile(r"\[PAD\d+\]")      # the filler of ids a tokenizer lacks (as llama.cpp's converter)
MODEL_FILE_KEY = "llama_moe.tokenizer.model"  # ours: the sentencepiece / tiktoken tokenizer.model, base64
# tokenizer.ggml.pre (llama.cpp's name for the pre-tokenizer) -> split regex (tokenizer.py says what they are)
GGUF_PRE_PATTERNS = {"gpt-2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN,
                     "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "llama-v3": LLAMA3_PATTERN}
GGUF_PRE_NAMES = {GPT2_PATTERN: "gpt-2", SMOLLM_PATTERN: "smollm", LLAMA3_PATTERN: "llama-bpe"}  # for writing
# llama.cpp adds BOS by default to the LLaMA-3 family only (a GGUF's add_bos_token key overrides it);
# it also takes a pre-token that is itself a vocabulary entry whole ("ignore_merges"), as tiktoken does.
GGUF_PRE_ADDS_BOS = {"llama-bpe", "llama3", "llama-v3"}


# ----------------------------------------------------------------------------------------------------------
# 2. Reading

def read_gguf_tokenizer(path):
    """The tokenizer a GGUF carries as metadata (llama.cpp's keys; no tensor data is touched), as a dict:
    {"kind": "bpe", vocab, merges, specials, pre, pattern, bos, eos, add_bos} for a byte-level BPE ('gpt2'),
    {"kind": "sentencepiece", proto, bos, eos, add_bos} for a sentencepiece BPE (model 'llama'),
    {"kind": "tiktoken", model_file} for a byte-level BPE we wrote from LLaMA-3's tiktoken file, which the file
    holds too (MODEL_FILE_KEY): read from it, the tokenizer keeps its fingerprint."""
    meta = read_gguf_metadata(path)

    def get(key, default=None):
        return meta.get(key, default)

    model = get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.model key); pass the model's "
                         f"tokenizer.json or tokenizer.model instead")
    if model == "llama":
        return read_sentencepiece_vocab(path, get)
    if model != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model = {model!r} is not supported; supported: "
                         f"'gpt2' (byte-level BPE), 'llama' (sentencepiece BPE)")
    if get(MODEL_FILE_KEY) is not None:  # LLaMA-3's tiktoken file, which the byte-level vocabulary was made from
        return dict(kind="tiktoken", model_file=base64.b64decode(get(MODEL_FILE_KEY)))
    pre = get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_PATTERNS:
        raise ValueError(f"{path}: tokenizer.ggml.pre = {pre!r} is not a pre-tokenizer we know; "
                         f"supported: {', '.join(sorted(GGUF_PRE_PATTERNS))}")
    tokens, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{path}: a gpt2 tokenizer needs tokenizer.ggml.tokens and "
                         f"tokenizer.ggml.merges; {'tokens' if not tokens else 'merges'} missing")
    types = get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    # control (<|im_start|>) and user-defined tokens are matched whole, never merged
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                if ty in (GGUF_TOKEN_CONTROL, GGUF_TOKEN_USER_DEFINED)}
    vocab = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if not (ty == GGUF_TOKEN_UNUSED and PAD_TOKEN.fullmatch(t)):  # fillers up to the model's vocab size
            vocab.setdefault(t, i)
    pairs = []
    for k, m in enumerate(merges):
        cut = m.find(" ", 1)  # llama.cpp splits at the first space after the first character
        if cut < 0:
            raise ValueError(f"{path}: merge {k} {m!r} is not 'left right'")
        pairs.append((m[:cut], m[cut + 1:]))
    return dict(kind="bpe", vocab=vocab, merges=pairs, specials=specials, pre=pre, pattern=GGUF_PRE_PATTERNS[pre],
                vocab_size=len(tokens), bos=get("tokenizer.ggml.bos_token_id"),
                eos=get("tokenizer.ggml.eos_token_id"),
                add_bos=bool(get("tokenizer.ggml.add_bos_token", pre in GGUF_PRE_ADDS_BOS)))


def read_sentencepiece_vocab(path, get):
    """tokenizer.ggml.model = llama: a sentencepiece BPE vocabulary (pieces, scores, types), as llama.cpp's
    convert script copies it out of a LLaMA-1/2 tokenizer.model. Files we write also hold that
    tokenizer.model itself (MODEL_FILE_KEY), which is then used as it is; otherwise the model is rebuilt
    (sentencepiece_model_proto) with llama.cpp's defaults: a dummy-prefix space unless
    tokenizer.ggml.add_space_prefix says no, BOS added by default."""
    tokens, scores = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.scores")
    types = get("tokenizer.ggml.token_type") or [GGUF_TOKEN_NORMAL] * len(tokens or [])
    if not tokens or scores is None or len(scores) != len(tokens) or len(types) != len(tokens):
        raise ValueError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.tokens, .scores and "
                         f".token_type of one length each")
    if GGUF_TOKEN_UNKNOWN not in types:
        raise ValueError(f"{path}: the sentencepiece vocabulary has no unknown-type token (<unk>)")
    bos, eos = get("tokenizer.ggml.bos_token_id", -1), get("tokenizer.ggml.eos_token_id", -1)
    original = get(MODEL_FILE_KEY)
    if original is not None:
        proto = base64.b64decode(original)
    else:
        proto = sentencepiece_model_proto(tokens, scores, types, bool(get("tokenizer.ggml.add_space_prefix", True)),
                                          bool(get("tokenizer.ggml.remove_extra_whitespaces", False)),
                                          (types.index(GGUF_TOKEN_UNKNOWN), bos, eos))
    return dict(kind="sentencepiece", proto=proto, bos=None if bos < 0 else bos, eos=None if eos < 0 else eos,
                add_bos=bool(get("tokenizer.ggml.add_bos_token", True)), original=original is not None)


def _varint(n):
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, value):
    """One protobuf field: int / bool -> varint, float -> fixed32, str / bytes -> length-delimited."""
    import struct
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3 | 0) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def sentencepiece_model_proto(pieces, scores, types, add_dummy_prefix=True, remove_extra_whitespaces=False,
                              unk_bos_eos=(0, 1, 2)):
    """A sentencepiece BPE ModelProto (what a LLaMA-1/2 tokenizer.model holds) from a GGUF's
    sentencepiece-style vocabulary, serialised by hand (the protobuf package is not a dependency).
    Field numbers from sentencepiece_model.proto; token types share sentencepiece's numbering
    (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)."""
    body = b"".join(_field(1, _field(1, p) + _field(2, float(s)) + _field(3, int(t)))
                    for p, s, t in zip(pieces, scores, types))
    trainer = _field(3, 2) + _field(35, 6 in types)   # model_type = BPE; byte_fallback when <0xXX> pieces exist
    unk, bos, eos = unk_bos_eos
    trainer += _field(40, unk) + _field(41, bos) + _field(42, eos) + _field(43, -1)  # unk / bos / eos / pad ids
    trainer += b"".join(_field(k, pieces[i]) for k, i in ((45, unk), (46, bos), (47, eos)) if 0 <= i < len(pieces))
    normalizer = (_field(1, "identity") + _field(3, bool(add_dummy_prefix))
                  + _field(4, bool(remove_extra_whitespaces)) + _field(5, True))  # escape spaces as U+2581
    return body + _field(2, trainer) + _field(3, normalizer)


# ----------------------------------------------------------------------------------------------------------
# 3. Writing

def tokenizer_metadata(tok, vocab_size):
    """{GGUF key: value} of a Tokenizer, or ValueError when GGUF cannot carry it."""
    if tok.vocab_size > vocab_size:
        raise ValueError(f"cannot write a GGUF: the tokenizer has {tok.vocab_size} ids but the model only "
                         f"{vocab_size} embeddings: it is not this model's tokenizer")
    meta = {}
    if tok._sp is not None:
        sp = tok._sp
        pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
        types = [GGUF_TOKEN_UNKNOWN if sp.is_unknown(i) else GGUF_TOKEN_CONTROL if sp.is_control(i)
                 else GGUF_TOKEN_UNUSED if sp.is_unused(i) else GGUF_TOKEN_BYTE if sp.is_byte(i)
                 else GGUF_TOKEN_NORMAL for i in range(len(pieces))]
        scores = [float(sp.get_score(i)) for i in range(len(pieces))]
        proto = tok._model_file if tok._model_file is not None else open(tok.path, "rb").read()
        extra = len(pieces)
        pieces += [f"[PAD{i}]" for i in range(extra, vocab_size)]
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
                     "tokenizer.ggml.scores": scores + [0.0] * (vocab_size - extra),
                     "tokenizer.ggml.token_type": types + [GGUF_TOKEN_UNUSED] * (vocab_size - extra),
                     "tokenizer.ggml.add_space_prefix": bool(tok._dummy_prefix),
                     "tokenizer.ggml.remove_extra_whitespaces": sp.decode(sp.encode("a  b")) == "a b",
                     MODEL_FILE_KEY: base64.b64encode(proto).decode()})
    else:
        bpe = tok.byte_level()
        pre = GGUF_PRE_NAMES.get(bpe["pattern"])
        if pre is None:
            raise ValueError(f"cannot write a GGUF tokenizer: {tok.path} splits text with a regex llama.cpp has no "
                             f"name (tokenizer.ggml.pre) for; it knows GPT-2's, SmolLM's and LLaMA-3's")
        tokens = [None] * vocab_size
        types = [GGUF_TOKEN_UNUSED] * vocab_size
        for t, i in bpe["vocab"].items():
            if tokens[i] is None:
                tokens[i], types[i] = t, GGUF_TOKEN_NORMAL
        for t, i in tok.special_tokens.items():
            tokens[i], types[i] = t, GGUF_TOKEN_CONTROL
        tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
                     "tokenizer.ggml.token_type": types,
                     "tokenizer.ggml.merges": [f"{a} {b}" for a, b in bpe["merges"]]})
        if tok._tt is not None and tok._bpe is None:  # tiktoken: the file itself rides along (same fingerprint)
            data = tok._model_file if tok._model_file is not None else open(tok.path, "rb").read()
            meta[MODEL_FILE_KEY] = base64.b64encode(data).decode()
        if not bpe["merges"]:
            raise ValueError(f"cannot write a GGUF tokenizer: {tok.path} has no merges, and a GGUF cannot hold the "
                             f"empty tokenizer.ggml.merges list llama.cpp requires")
        if any(" " in a for a, _ in bpe["merges"]):
            raise ValueError(f"cannot write a GGUF tokenizer: {tok.path} has a merge whose left part holds a "
                             f"space, which llama.cpp's 'left right' merges cannot carry")
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = int(value)
    meta["tokenizer.ggml.add_bos_token"] = bool(tok.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    return meta
