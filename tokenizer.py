"""
Chapter: the tokenizer.

LLaMA-family models come with their tokenizer in one of four forms:

  * LLaMA-1 / LLaMA-2 `tokenizer.model`: a sentencepiece BPE model (a binary protobuf), 32,000
    pieces, <unk>=0, <s>=1 (bos), </s>=2 (eos), byte fallback for anything outside the vocabulary.
  * LLaMA-3 `tokenizer.model`: a tiktoken BPE file, one "base64(token bytes) rank" pair per line
    (128,000 ranks), split into pre-tokens by a regex before the merges run, plus 256 special
    tokens appended after the last rank (<|begin_of_text|> = 128000, ...).
  * a Hugging Face `tokenizer.json` with a byte-level BPE (GPT-2's scheme: what LLaMA-3 and SmolLM
    folders on the Hub ship): a vocabulary spelled in GPT-2's byte alphabet, the merges best first,
    the pre-tokenizer (a split regex), the added (special) tokens.
  * a `.gguf` checkpoint, which carries the same byte-level BPE as metadata (tokenizer.ggml.*:
    tokens, token types, merges, and the *name* of the pre-tokenizer, e.g. "smollm"), or a
    sentencepiece vocabulary.

`Tokenizer(path)` reads any of them, or a checkpoint folder holding one, and hides the difference
behind encode / decode / bos_id / eos_id / vocab_size / special_tokens / add_bos, so the data
pipeline (data/prepare.py) and eval.py never ask which one they have. The file formats are read in
their own chapters: hf_tokenizer.py (tokenizer.json, and writing every kind as one), gguf_tokenizer.py
(GGUF metadata, read and written). `save(folder)` writes a tokenizer for us and for transformers. Both
byte-level BPE forms run
through tiktoken: its ranks are the merge order (= the token ids, for real vocabularies), so it
merges in the order the merges list says (build_byte_level_bpe says how far that is checked). `train_sentencepiece` trains the small BPE our embedded
demo uses (data/prepare.py, SPEC.md §4), set up so that decode(encode(x)) == x for any text,
whitespace of source code included.
"""

import base64
import contextlib
import hashlib
import os
import re
from pathlib import Path

# -----------------------------------------------------------------------------
# LLaMA-3's tiktoken facts (from Meta's release; the split regex and the special-token layout)

# Pre-tokenization: contractions, words with one optional leading non-letter, numbers in
# groups of at most 3 digits, punctuation runs, newlines, other whitespace. BPE merges only
# happen inside one pre-token, which is why " the" and "the" are different tokens.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens():
    """The 256 special tokens of LLaMA-3, in id order (the first gets id = number of ranks)."""
    named = {  # position among the specials -> text; the rest are reserved placeholders
        0: "<|begin_of_text|>", 1: "<|end_of_text|>",
        6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "<|eot_id|>",
    }
    out, reserved = [], 0
    for i in range(LLAMA3_NUM_SPECIAL):
        if i in named:
            out.append(named[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out  # reserved tokens 0..3 sit at 2..5, 4 at 8, 5..250 at 10..255


# tiktoken's regex engine is fine with ordinary text but can blow its stack on very long
# runs of one character class (e.g. a 1 MB line of base64 in a SlimPajama GitHub file).
# Meta's loader cuts such runs; we do the same with our own limits.
TIKTOKEN_MAX_CHARS = 400_000   # per call into tiktoken
TIKTOKEN_MAX_RUN = 25_000      # longest run of whitespace / non-whitespace handed over at once


# -----------------------------------------------------------------------------
# byte-level BPE facts (GPT-2 and its descendants: SmolLM, LLaMA-3 as a tokenizer.json or a GGUF)

# GPT-2's split regex (also what a Hugging Face ByteLevel pre-tokenizer with use_regex=True runs).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# SmolLM (StarCoder's pre-tokenizer) runs two splits one after the other: every digit is cut out on
# its own, then the GPT-2 regex runs on the text between digits (llama.cpp's "smollm": regex list
# {"\p{N}", gpt2}; Hugging Face: Sequence[Digits(individual_digits), ByteLevel]). tiktoken takes one
# regex, so we fold the two into one: a digit matches alone, and a whitespace run that a digit
# follows ends there, as it would at the end of a between-digits piece ("a  5" -> "a", "  ", "5").
# (A plain " ?\p{N}" would give "a", " ", " 5": what transformers' GGUF loader does, see the README.)
SMOLLM_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"

def gpt2_bytes_to_unicode():
    """GPT-2's byte -> character table. Byte-level vocabularies spell every token with printable
    characters: the 188 printable bytes stand for themselves, the other 68 (space, control bytes,
    ...) are shifted to U+0100.. in byte order, so " the" is spelled "Ġthe" (Ġ = U+0120 = 256 + 32)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def build_byte_level_bpe(vocab, merges, specials, pattern, where):
    """A tiktoken Encoding for a byte-level BPE given as (vocab, merges), the way GGUF and
    tokenizer.json store it. Returns (encoding, rank_to_id or None, id -> bytes list).

    vocab: {spelled token: id}; merges: [(left, right)] best first; specials: {text: id} (never
    merged, matched in text by Tokenizer.encode). tiktoken merges the adjacent pair whose joined bytes
    have the lowest rank, so rank = the merge's position reproduces the merges' order. When token ids
    grow with the merges (GPT-2, SmolLM, LLaMA-3: true), rank = id and tiktoken's output is the ids;
    otherwise ranks follow the merges and rank_to_id maps back. Single bytes that the vocabulary lacks
    get ranks no id maps to (-1): Hugging Face and llama.cpp drop such bytes, and so do we.

    One difference remains in principle: tiktoken joins any adjacent pair whose bytes form a token,
    also a pair the merges list lacks (and takes a pre-token that is a token whole). Vocabularies
    learned by BPE do not meet that in practice: for SmolLM2 (49,152 tokens) tiktoken and the
    merges-list BPE of `tokenizers` agree id for id on the whole embedded validation corpus
    (269 documents, 459k tokens) and on every test text."""
    import tiktoken
    to_char = gpt2_bytes_to_unicode()
    to_byte = {c: b for b, c in to_char.items()}
    special_ids = set(specials.values())
    n = max([*vocab.values(), *special_ids]) + 1
    id_bytes = [b""] * n  # for decode: every id, merged or not
    for tok, i in vocab.items():
        if i in special_ids:
            continue
        # a token spelled outside the byte alphabet is taken as its UTF-8 text (transformers does too)
        id_bytes[i] = bytes(to_byte[c] for c in tok) if all(c in to_byte for c in tok) else tok.encode()
    for tok, i in specials.items():
        id_bytes[i] = tok.encode()

    base = {}  # byte -> id of the single-byte token
    for b in range(256):
        i = vocab.get(to_char[b])
        if i is not None and i not in special_ids:
            base[b] = i
    merged = []  # (bytes, id) in merge order
    for k, (left, right) in enumerate(merges):
        i = vocab.get(left + right)
        if i is None:
            raise ValueError(f"{where}: merge {k} ({left!r} + {right!r}) makes {left + right!r}, which is not "
                             f"in the vocabulary; the file is damaged")
        merged.append((id_bytes[i], i))
    ids_in_order = [i for _, i in merged]
    rank_is_id = all(a < b for a, b in zip(ids_in_order, ids_in_order[1:])) and len(base) == 256
    ranks, rank_to_id = {}, []
    if rank_is_id:
        ranks = {bytes([b]): i for b, i in base.items()}
        ranks.update(merged)
    else:
        for b in range(256):  # ranks 0..255: the bytes; 256 + k: merge k
            ranks[bytes([b])] = b
            rank_to_id.append(base.get(b, -1))
        for tok_bytes, i in merged:
            if tok_bytes not in ranks:  # a repeated merge result keeps its first (best) rank
                ranks[tok_bytes] = len(rank_to_id)
                rank_to_id.append(i)
            else:
                rank_to_id.append(-1)
    try:
        enc = tiktoken.Encoding(name=Path(str(where)).name, pat_str=pattern, mergeable_ranks=ranks,
                                special_tokens={})
    except ValueError as e:
        raise ValueError(f"{where}: tiktoken cannot compile the split regex {pattern!r}: {e}") from None
    return enc, (None if rank_is_id else rank_to_id), id_bytes


# -----------------------------------------------------------------------------
# file format detection and loading

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+\s*$")


def _sniff_kind(path):
    """'gguf' (magic bytes), 'tokenizer.json' (a JSON object), 'tiktoken' when the first line looks
    like 'base64 rank', else 'sentencepiece'."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise ValueError(f"tokenizer file {path} is empty; expected a sentencepiece model, a tiktoken BPE "
                         f"file (LLaMA's tokenizer.model), a tokenizer.json or a .gguf")
    if head[:4] == b"GGUF":
        return "gguf"
    if head.lstrip()[:1] == b"{":
        return "tokenizer.json"
    first_line = head.split(b"\n", 1)[0]
    return "tiktoken" if _TIKTOKEN_LINE.match(first_line) else "sentencepiece"


def load_tiktoken_ranks(path, data=None):
    """Parse a tiktoken BPE file (or its bytes, `data`): {token bytes: rank}. Ranks are token ids of the base vocab."""
    ranks = {}
    with open(path, "rb") if data is None else contextlib.nullcontext(data.splitlines()) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{lineno}: expected 'base64token rank', got {line[:60]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad base64 token {parts[0][:40]!r} ({e})") from None
            ranks[token] = int(parts[1])
    if not ranks:
        raise ValueError(f"{path} holds no 'base64token rank' lines")
    # the specials are numbered after the ranks, so the ranks must be exactly 0..n-1
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    return ranks


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def find_tokenizer(folder):
    """The tokenizer a checkpoint folder carries: tokenizer.model (sentencepiece or tiktoken: LLaMA
    1-3 and our own checkpoints), else tokenizer.json (Hugging Face folders of byte-level models such
    as SmolLM; LLaMA-1/2 folders ship both, and their tokenizer.json is not byte-level), else the one
    .gguf in it."""
    folder = Path(folder)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{folder} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:4])}); "
                         f"pass the one whose tokenizer you want")
    raise FileNotFoundError(f"no tokenizer in folder {folder}: looked for {' / '.join(TOKENIZER_FILES)} "
                            f"and a single *.gguf; pass the tokenizer file itself")


# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """encode / decode for a LLaMA-family tokenizer: tokenizer.model (sentencepiece or tiktoken),
    tokenizer.json (Hugging Face byte-level BPE), a .gguf's own tokenizer, or a checkpoint folder."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():  # a checkpoint / Hugging Face folder: use the tokenizer it carries
            path = find_tokenizer(path)
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} not found; for the embedded demo run "
                                    f"`python data/prepare.py`, which trains data/embedded/tokenizer.model")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"tokenizer file {path} is not readable (check its permissions)")
        self.path = str(path)
        self.kind = _sniff_kind(path)
        self._sp = self._tt = self._remap = self._id_bytes = self._fingerprint = None
        self._bpe = self._model_file = self._tt_bpe = None  # _model_file: a tokenizer.model a GGUF held
        self.pre = None  # a GGUF's tokenizer.ggml.pre
        if self.kind == "tiktoken":
            self._init_tiktoken()
        elif self.kind == "gguf":
            self._init_gguf()
        elif self.kind == "tokenizer.json":
            self._init_hf_json()
        else:
            self._init_sentencepiece()

    def _init_tiktoken(self, data=None):
        import tiktoken
        ranks = load_tiktoken_ranks(self.path, data)
        n = len(ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
        self._tt = tiktoken.Encoding(name=Path(self.path).name, pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self._tt.n_vocab  # ranks + 256 specials: 128256 for LLaMA-3
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True  # Meta's LLaMA-3 and its Hugging Face tokenizer prepend <|begin_of_text|>

    def _init_gguf(self):
        """The tokenizer a GGUF carries as metadata (gguf_tokenizer.read_gguf_tokenizer reads it)."""
        from gguf_tokenizer import read_gguf_tokenizer
        spec = read_gguf_tokenizer(self.path)
        if spec["kind"] == "sentencepiece":
            self._init_sentencepiece(spec["proto"])
            if not spec["original"]:  # a literal U+2581 reads as a space, as in llama.cpp and sentencepiece
                self._lower_block_ids = None
            self.bos_id, self.eos_id, self.add_bos = spec["bos"], spec["eos"], spec["add_bos"]
            # the model is the tokenizer: save() writes it as tokenizer.model, same fingerprint
            self._model_file = spec["proto"]
            self._fingerprint = hashlib.sha256(spec["proto"]).hexdigest()
            return
        if spec["kind"] == "tiktoken":  # LLaMA-3's tokenizer.model, held whole by a GGUF we wrote
            self._init_tiktoken(spec["model_file"])
            self._model_file = spec["model_file"]
            self._fingerprint = hashlib.sha256(spec["model_file"]).hexdigest()
            return
        self.special_tokens = spec["specials"]
        self._init_byte_level(spec["vocab"], spec["merges"], spec["pattern"])
        self.vocab_size = spec["vocab_size"]
        self.bos_id, self.eos_id, self.add_bos, self.pre = spec["bos"], spec["eos"], spec["add_bos"], spec["pre"]

    def _init_byte_level(self, vocab, merges, pattern):
        self._tt, self._remap, self._id_bytes = build_byte_level_bpe(
            vocab, merges, self.special_tokens, pattern, self.path)
        self._bpe = {"vocab": vocab, "merges": merges, "pattern": pattern}

    def _byte_level_fingerprint(self):
        """sha256 of what decides the ids: the split regex, each id's bytes, the merges, the special
        tokens, bos / eos. Not the weights (the same tokenizer in two quantizations agrees) and not the
        file layout: a GGUF and the tokenizer.json `save` writes from it share the fingerprint."""
        import json
        canon = json.dumps({"format": "byte-level-bpe", "pattern": self._bpe["pattern"],
                            "ids": [b.hex() for b in self._id_bytes],
                            "merges": [f"{a} {b}" for a, b in self._bpe["merges"]],
                            "special": sorted((i, t) for t, i in self.special_tokens.items()),
                            "bos": self.bos_id, "eos": self.eos_id}, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def _init_hf_json(self):
        """A Hugging Face tokenizer.json with a byte-level BPE model (hf_tokenizer.read_tokenizer_json)."""
        from hf_tokenizer import read_tokenizer_json
        spec = read_tokenizer_json(self.path)
        self.special_tokens = spec["specials"]
        self._init_byte_level(spec["vocab"], spec["merges"], spec["pattern"])
        self.vocab_size = len(self._id_bytes)
        self.bos_id, self.eos_id, self.add_bos = spec["bos"], spec["eos"], spec["add_bos"]

    def _init_sentencepiece(self, proto=None):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            if proto is None:
                sp.Load(self.path)
            else:
                sp.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as e:
            if proto is not None:
                raise ValueError(f"{self.path}: sentencepiece refuses the vocabulary in this GGUF: {e}") from None
            raise ValueError(f"{self.path} is neither a sentencepiece model (LLaMA-1/2 tokenizer.model) "
                             f"nor a tiktoken BPE file (LLaMA-3 tokenizer.model: 'base64token rank' lines): "
                             f"{e}") from None
        self._sp = sp
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        self.add_bos = True  # as Meta's LLaMA-1/2 and Hugging Face's LlamaTokenizer do
        # sentencepiece never matches control pieces (<s>, </s>) in text, so we do it ourselves
        # when the caller allows it (encode(..., allowed_special=...)).
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self.vocab_size) if sp.is_control(i)}
        # sentencepiece writes spaces as U+2581 "▁" inside pieces, so a literal "▁" in the text
        # would decode as a space. With byte fallback and no dummy prefix (our own models) we can
        # encode it as its three UTF-8 bytes instead and keep the round trip exact.
        self._dummy_prefix = "".join(sp.encode("a", out_type=str)).startswith("\u2581")
        byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "\u2581".encode()]
        has_bytes = all(sp.is_byte(i) for i in byte_ids)
        self._lower_block_ids = byte_ids if (has_bytes and not self._dummy_prefix) else None

    # --- encode ------------------------------------------------------------------------

    def encode(self, text, bos=False, eos=False, allowed_special=frozenset()):
        """text -> list of token ids.

        allowed_special: a set of special-token strings (or "all") that are turned into their
        ids where they appear in the text; any other special-token text is encoded as plain
        text, like Meta's LLaMA-3 loader does (so untrusted text can't inject <|eot_id|>).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if allowed_special == "all":
            allowed = set(self.special_tokens)
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"not special tokens of {self.path}: {sorted(unknown)[:5]}")
        for flag, name, tid in ((bos, "bos", self.bos_id), (eos, "eos", self.eos_id)):
            if flag and tid is None:
                raise ValueError(f"{self.path} names no {name} token; encode with {name}=False")
        ids = [self.bos_id] if bos else []
        for piece, is_special in self._split_specials(text, allowed):
            if is_special:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        if eos:
            ids.append(self.eos_id)
        return ids

    def _split_specials(self, text, allowed):
        """Cut text around allowed special-token strings: [(piece, is_special), ...]."""
        if not allowed:
            return [(text, False)]
        # longest first so that a special never matches a prefix of a longer one
        pattern = "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True))
        out, pos = [], 0
        for m in re.finditer(pattern, text):
            out.append((text[pos:m.start()], False))
            out.append((m.group(0), True))
            pos = m.end()
        out.append((text[pos:], False))
        return out

    def _encode_plain(self, text):
        if self._tt is not None:
            ids = []
            for chunk in _tiktoken_chunks(text):
                # disallowed_special=() : special-token text in a chunk is plain text here
                ids.extend(self._tt.encode(chunk, allowed_special=set(), disallowed_special=()))
            if self._remap is not None:  # ranks -> ids; -1 marks a byte the vocabulary lacks
                ids = [i for i in map(self._remap.__getitem__, ids) if i >= 0]
            return ids
        if self._lower_block_ids is None or "\u2581" not in text:
            return self._sp.encode(text)
        ids = []
        for i, part in enumerate(text.split("\u2581")):
            if i:
                ids.extend(self._lower_block_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    # --- decode ------------------------------------------------------------------------

    def decode(self, ids):
        """list of token ids -> text. sentencepiece drops control ids (bos/eos) from the text;
        the BPE kinds write special tokens out as their text (<|end_of_text|>)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}) for {self.path}: {bad[:5]}")
        if self._id_bytes is not None:  # byte-level BPE: bytes per id, invalid UTF-8 shown as U+FFFD
            return b"".join(self._id_bytes[i] for i in ids).decode("utf-8", errors="replace")
        if self._tt is not None:
            return self._tt.decode(ids)
        return self._sp.decode(ids)

    @property
    def fingerprint(self):
        """sha256 (hex) that identifies this vocabulary: recorded in a dataset's meta.json and in every
        checkpoint trained on it, so a model is never fed token ids from another tokenizer. For a GGUF
        it hashes the tokenizer metadata (not the weights); otherwise the tokenizer file."""
        if self._fingerprint is None and self._bpe is not None:
            self._fingerprint = self._byte_level_fingerprint()
        if self._fingerprint is None:
            with open(self.path, "rb") as f:
                self._fingerprint = hashlib.sha256(f.read()).hexdigest()
        return self._fingerprint

    def save(self, folder):
        """Write this tokenizer into a (checkpoint) folder for us and for transformers (hf_tokenizer.save):
        returns the file Tokenizer(folder) reads, tokenizer.model or tokenizer.json."""
        from hf_tokenizer import save_tokenizer
        return save_tokenizer(self, folder)

    def byte_level(self):
        """{"vocab", "merges", "pattern"} of a byte-level BPE; for LLaMA-3's tiktoken file the merges are
        recovered from the ranks (each token of rank r splits, by BPE over the ranks below r, into the two
        tokens that made it) and the tokens spelled in GPT-2's byte alphabet, as tokenizer.json has them."""
        if self._bpe is None and self._tt is not None and self._tt_bpe is None:
            ranks = self._tt._mergeable_ranks
            to_char = gpt2_bytes_to_unicode()
            spell = lambda b: "".join(to_char[x] for x in b)  # noqa: E731
            merges = []
            for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                if len(token) < 2:
                    continue
                parts = [bytes([b]) for b in token]
                while len(parts) > 2:
                    pair = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1], rank))
                    if ranks.get(parts[pair] + parts[pair + 1], rank) >= rank:
                        break
                    parts[pair:pair + 2] = [parts[pair] + parts[pair + 1]]
                if len(parts) != 2:
                    raise ValueError(f"{self.path}: token of rank {rank} is not the merge of two lower ranks")
                merges.append((spell(parts[0]), spell(parts[1])))
            self._tt_bpe = {"vocab": {spell(t): r for t, r in ranks.items()}, "merges": merges,
                            "pattern": LLAMA3_PATTERN}
        if self._bpe is None and self._tt_bpe is None:
            raise ValueError(f"{self.path} is a sentencepiece model, not a byte-level BPE")
        return self._bpe or self._tt_bpe

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})")


def check_same_tokenizer(named_fingerprints, fix):
    """A token id means something only under the tokenizer that made it. named_fingerprints: {what: sha256}
    (a Tokenizer's fingerprint, meta.json's or config.json's tokenizer_sha256), None where none was recorded
    (not checked). Raises ValueError, one line naming the first two that differ and `fix`."""
    known = [(what, sha) for what, sha in named_fingerprints.items() if sha]
    for what, sha in known[1:]:
        if sha != known[0][1]:
            raise ValueError(f"tokenizer mismatch: {what} comes from another tokenizer than {known[0][0]} "
                             f"(tokenizer_sha256 {sha[:12]}... vs {known[0][1][:12]}...): {fix}")


def _tiktoken_chunks(text):
    """Split text into pieces tiktoken's regex can take: each <= TIKTOKEN_MAX_CHARS and without a
    run of whitespace / non-whitespace longer than TIKTOKEN_MAX_RUN.

    Monster runs are cut every TIKTOKEN_MAX_RUN characters (the only place the ids can differ from
    one call). Other cuts go right after a letter or digit that a space follows: no split regex we
    use (GPT-2, SmolLM, LLaMA-3) puts a letter / digit and the space after it in one pre-token, and
    none looks behind, so the ids are exactly those of one call."""
    if len(text) <= TIKTOKEN_MAX_RUN:
        return [text]
    segments, start = [], 0
    monster = r"\s{%d,}|\S{%d,}" % (TIKTOKEN_MAX_RUN + 1, TIKTOKEN_MAX_RUN + 1)
    for m in re.finditer(monster, text):
        segments.append(text[start:m.start()])
        run = m.group(0)
        segments.extend(run[i:i + TIKTOKEN_MAX_RUN] for i in range(0, len(run), TIKTOKEN_MAX_RUN))
        start = m.end()
    segments.append(text[start:])
    chunks = []
    for seg in segments:
        while len(seg) > TIKTOKEN_MAX_CHARS:
            cut = seg.rfind(" ", 1, TIKTOKEN_MAX_CHARS + 1)
            while cut > 0 and not seg[cut - 1].isalnum():
                cut = seg.rfind(" ", 1, cut)
            if cut <= 0:  # no safe place (e.g. a long line of CJK text): cut anyway
                cut = TIKTOKEN_MAX_CHARS
            chunks.append(seg[:cut])
            seg = seg[cut:]
        if seg:
            chunks.append(seg)
    return chunks


# -----------------------------------------------------------------------------
# training a small sentencepiece BPE for the embedded demo

def train_sentencepiece(text_files, model_prefix, vocab_size=8192, input_sentence_size=2_000_000,
                        num_threads=None, seed_sentencepiece_size=200_000, verbose=False):
    """Train a byte-fallback BPE on local text files; returns the path of `{model_prefix}.model`.

    The options make the model lossless for any input, code whitespace included:
      identity normalisation (no NFKC: keeps full-width forms, ligatures, tabs as they are),
      no extra-whitespace removal and no dummy prefix (leading / repeated spaces survive),
      whitespace-only pieces (indentation "        " becomes one token, as in code models),
      byte fallback (any character outside the vocabulary becomes its UTF-8 bytes: no <unk>),
      split digits (numbers tokenized digit by digit, as LLaMA does).
    Ids follow LLaMA-2's layout: <unk>=0, <s>=1 (bos), </s>=2 (eos), no pad.
    """
    import sentencepiece as spm
    files = [str(f) for f in ([text_files] if isinstance(text_files, (str, os.PathLike)) else text_files)]
    if not files:
        raise ValueError("train_sentencepiece needs at least one text file")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"training text {f} not found")
        if os.path.getsize(f) == 0:
            raise ValueError(f"training text {f} is empty")
    if vocab_size < 256 + 3 + 16:
        raise ValueError(f"vocab_size {vocab_size} too small: the 256 byte pieces and 3 control "
                         f"pieces alone take 259 ids")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(files), model_prefix=str(model_prefix), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            character_coverage=0.9995,       # the rarest 0.05% of characters go to bytes
            max_sentence_length=16384,       # bytes; a "sentence" is one line of the files
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            seed_sentencepiece_size=seed_sentencepiece_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        hint = ("; the text is too small for this vocab_size, lower it"
                if "Vocabulary size" in str(e) or "vocab_size" in str(e) else "")
        raise ValueError(f"sentencepiece training on {files[:3]} failed: {e}{hint}") from None
    return f"{model_prefix}.model"
