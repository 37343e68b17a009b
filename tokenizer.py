"""
Chapter: the tokenizer.

LLaMA models come with one of two tokenizer files, both named `tokenizer.model`:

  * LLaMA-1 / LLaMA-2: a sentencepiece BPE model (a binary protobuf), 32,000 pieces,
    <unk>=0, <s>=1 (bos), </s>=2 (eos), byte fallback for anything outside the vocabulary.
  * LLaMA-3: a tiktoken BPE file, one "base64(token bytes) rank" pair per line
    (128,000 ranks), split into pre-tokens by a regex before the merges run, plus
    256 special tokens appended after the last rank (<|begin_of_text|> = 128000, ...).

`Tokenizer(path)` reads either and hides the difference behind encode / decode /
bos_id / eos_id / vocab_size, so the data pipeline (data/prepare.py) and eval.py never ask
which one they have. `train_sentencepiece` trains the small BPE our embedded demo uses
(data/prepare.py, SPEC.md §4), set up so that decode(encode(x)) == x for any text,
whitespace of source code included.
"""

import base64
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
# file format detection and loading

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+\s*$")


def _sniff_kind(path):
    """'tiktoken' when the first line looks like 'base64 rank', else 'sentencepiece'."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise ValueError(f"tokenizer file {path} is empty; expected a sentencepiece model "
                         f"or a tiktoken BPE file (LLaMA's tokenizer.model)")
    first_line = head.split(b"\n", 1)[0]
    return "tiktoken" if _TIKTOKEN_LINE.match(first_line) else "sentencepiece"


def load_tiktoken_ranks(path):
    """Parse a tiktoken BPE file: {token bytes: rank}. Ranks are token ids of the base vocab."""
    ranks = {}
    with open(path, "rb") as f:
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


# -----------------------------------------------------------------------------
# the tokenizer

class Tokenizer:
    """encode / decode for a LLaMA tokenizer.model of either kind (sentencepiece or tiktoken)."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():  # a Hugging Face model folder: the file sits inside
            raise IsADirectoryError(f"{path} is a folder; pass the tokenizer file itself, "
                                    f"e.g. {path / 'tokenizer.model'}")
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file {path} not found; for the embedded demo run "
                                    f"`python data/prepare.py`, which trains data/embedded/tokenizer.model")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"tokenizer file {path} is not readable (check its permissions)")
        self.path = str(path)
        self.kind = _sniff_kind(path)
        if self.kind == "tiktoken":
            self._init_tiktoken()
        else:
            self._init_sentencepiece()

    def _init_tiktoken(self):
        import tiktoken
        ranks = load_tiktoken_ranks(self.path)
        n = len(ranks)
        self.special_tokens = {tok: n + i for i, tok in enumerate(llama3_special_tokens())}
        self._tt = tiktoken.Encoding(name=Path(self.path).name, pat_str=LLAMA3_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self._tt.n_vocab  # ranks + 256 specials: 128256 for LLaMA-3
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]

    def _init_sentencepiece(self):
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.path} is neither a sentencepiece model (LLaMA-1/2 tokenizer.model) "
                             f"nor a tiktoken BPE file (LLaMA-3 tokenizer.model: 'base64token rank' lines): "
                             f"{e}") from None
        self._sp = sp
        self.vocab_size = sp.vocab_size()
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
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
        if self.kind == "tiktoken":
            ids = []
            for chunk in _tiktoken_chunks(text):
                # disallowed_special=() : special-token text in a chunk is plain text here
                ids.extend(self._tt.encode(chunk, allowed_special=set(), disallowed_special=()))
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
        tiktoken writes special tokens out as their text (<|end_of_text|>)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}) for {self.path}: {bad[:5]}")
        if self.kind == "tiktoken":
            return self._tt.decode(ids)
        return self._sp.decode(ids)

    @property
    def fingerprint(self):
        """sha256 (hex) that identifies this vocabulary: recorded in a dataset's meta.json and in every
        checkpoint trained on it, so a model is never fed token ids from another tokenizer."""
        if getattr(self, "_fingerprint", None) is None:
            import hashlib
            with open(self.path, "rb") as f:
                self._fingerprint = hashlib.sha256(f.read()).hexdigest()
        return self._fingerprint

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, kind={self.kind}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")


def _tiktoken_chunks(text):
    """Split text into pieces tiktoken's regex can take: each <= TIKTOKEN_MAX_CHARS and without a
    run of whitespace / non-whitespace longer than TIKTOKEN_MAX_RUN. Cuts happen only inside such
    monster runs or between runs, so text under TIKTOKEN_MAX_CHARS without such runs tokenizes
    exactly as a single call would."""
    if len(text) <= TIKTOKEN_MAX_RUN:
        return [text]
    chunks, current, size = [], [], 0
    for m in re.finditer(r"\s+|\S+", text):
        run = m.group(0)
        pieces = [run[i:i + TIKTOKEN_MAX_RUN] for i in range(0, len(run), TIKTOKEN_MAX_RUN)]
        for j, p in enumerate(pieces):
            # each later piece of a cut run starts a new chunk, so no call sees the whole run
            if current and (j > 0 or size + len(p) > TIKTOKEN_MAX_CHARS):
                chunks.append("".join(current))
                current, size = [], 0
            current.append(p)
            size += len(p)
    if current:
        chunks.append("".join(current))
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
