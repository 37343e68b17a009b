"""
Chapter: the tokenizer as Hugging Face keeps it - tokenizer.json (+ tokenizer_config.json), read and written.

Reading: the byte-level BPE layouts real models ship (GPT-2, LLaMA-3, SmolLM), for tokenizer.py's Tokenizer.
Writing: every folder this project writes that a model loads from carries its tokenizer, in a form both
`Tokenizer(folder)` and transformers' `AutoTokenizer.from_pretrained(folder)` read with the same ids:
  - a byte-level BPE (tokenizer.json or a GGUF's 'gpt2' vocabulary): tokenizer.json;
  - LLaMA-3's tiktoken tokenizer.model: a copy, plus tokenizer.json with the merges recovered from the ranks;
  - a sentencepiece BPE (LLaMA-1/2, our embedded demo's): tokenizer.model (a copy, or the model a GGUF holds),
    plus tokenizer.json as transformers converts LLaMA's: a byte-fallback BPE whose merges rank by the merged
    piece's score (what sentencepiece's BPE merges by), so AutoTokenizer needs no protobuf. One difference
    stays: a literal U+2581 in the text, which our own tokenizer keeps as its bytes, reads there as a space.
and tokenizer_config.json naming bos / eos and whether bos is added.
"""
import json
from pathlib import Path

from tokenizer import GPT2_PATTERN, SMOLLM_PATTERN


# ----------------------------------------------------------------------------------------------------------
# Reading

def _json_token_name(value):
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _hf_split_pattern(pre, where):
    """The split regex a tokenizer.json's pre_tokenizer runs, for the byte-level layouts real models
    use: ByteLevel (GPT-2 regex); Sequence[Split(regex, isolated), ByteLevel(no regex)] (LLaMA-3);
    Sequence[Digits(individual), ByteLevel] (SmolLM, StarCoder). Anything else is refused."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre]
    names = [(s or {}).get("type") for s in steps]
    last = steps[-1] if steps and steps[-1] else {}
    if last.get("type") == "ByteLevel" and not last.get("add_prefix_space", False):
        if len(steps) == 1 and last.get("use_regex", True):
            return GPT2_PATTERN
        first = steps[0]
        if (len(steps) == 2 and first.get("type") == "Split" and not last.get("use_regex", True)
                and str(first.get("behavior", "")).lower() == "isolated" and not first.get("invert", False)
                and "Regex" in (first.get("pattern") or {})):
            return first["pattern"]["Regex"]
        if (len(steps) == 2 and first.get("type") == "Digits" and first.get("individual_digits")
                and last.get("use_regex", True)):
            return SMOLLM_PATTERN
    raise ValueError(f"{where}: pre_tokenizer {names} is not a layout we read; supported: ByteLevel, "
                     f"Sequence[Split(Regex, isolated), ByteLevel(use_regex=false)], "
                     f"Sequence[Digits(individual_digits), ByteLevel] (all with add_prefix_space=false)")


def _template_bos(post, specials):
    """(adds bos?, bos id) from a TemplateProcessing post-processor (maybe inside a Sequence):
    a SpecialToken before the text ("$A") is what Hugging Face prepends by default."""
    if not post:
        return None, None
    if post.get("type") == "Sequence":
        for p in post.get("processors", []):
            found = _template_bos(p, specials)
            if found[0] is not None:
                return found
        return None, None
    if post.get("type") != "TemplateProcessing":
        return None, None
    single = post.get("single") or []
    first = single[0] if single else {}
    if "SpecialToken" not in first:
        return False, None
    name = first["SpecialToken"].get("id")
    ids = ((post.get("special_tokens") or {}).get(name) or {}).get("ids") or []
    return True, (ids[0] if ids else specials.get(name))


def read_tokenizer_json(path):
    """A tokenizer.json with a byte-level BPE model -> {"vocab", "merges", "pattern", "specials", "bos", "eos",
    "add_bos"}; tokenizer_config.json beside it, when present, names bos / eos and add_bos_token."""
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type = {model.get('type')!r}; only byte-level BPE "
                         f"tokenizer.json files are supported (for sentencepiece models pass tokenizer.model)")
    for key, ok in (("byte_fallback", False), ("continuing_subword_prefix", ""), ("end_of_word_suffix", ""),
                    ("dropout", None)):
        if model.get(key) not in (ok, None):
            raise ValueError(f"{path}: model.{key} = {model.get(key)!r} is not supported "
                             f"(byte-level BPE has {ok!r})")
    if spec.get("normalizer"):
        raise ValueError(f"{path}: normalizer {spec['normalizer'].get('type')!r} is not supported; "
                         f"byte-level BPE tokenizers have none")
    pattern = _hf_split_pattern(spec.get("pre_tokenizer"), path)
    vocab = model.get("vocab") or {}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    if not vocab:
        raise ValueError(f"{path}: model.vocab is empty")
    specials = {a["content"]: a["id"] for a in spec.get("added_tokens") or []}
    cfg_path = Path(path).with_name("tokenizer_config.json")
    cfg = {}
    if cfg_path.is_file():
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    template_bos, template_bos_id = _template_bos(spec.get("post_processor"), specials)

    def token_id(name):
        return None if name is None else specials.get(name, vocab.get(name))

    bos = token_id(_json_token_name(cfg.get("bos_token")))
    bos = template_bos_id if bos is None else bos
    eos = token_id(_json_token_name(cfg.get("eos_token")))
    for name in ("<|begin_of_text|>", "<s>", "<|endoftext|>"):
        bos = token_id(name) if bos is None else bos
    for name in ("<|end_of_text|>", "</s>", "<|endoftext|>"):
        eos = token_id(name) if eos is None else eos
    add_bos = template_bos if template_bos is not None else bool(cfg.get("add_bos_token", False))
    return dict(vocab=vocab, merges=merges, pattern=pattern, specials=specials, bos=bos, eos=eos, add_bos=add_bos)


# ----------------------------------------------------------------------------------------------------------
# Writing

def save_tokenizer(tok, folder):
    """tokenizer.json + tokenizer_config.json, and tokenizer.model for a sentencepiece or tiktoken model, into
    `folder`. Returns the file Tokenizer(folder) reads (tokenizer.model before tokenizer.json)."""
    from fileio import atomic_write
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first = folder / "tokenizer.json"
    if tok._sp is not None or tok._tt is not None and tok._bpe is None:  # sentencepiece, tiktoken
        first = folder / "tokenizer.model"
        if tok._model_file is not None:
            atomic_write(first, tok._model_file)
        elif not (first.exists() and first.samefile(tok.path)):
            atomic_write(first, Path(tok.path).read_bytes())
    names = {i: t for t, i in tok.special_tokens.items()}
    atomic_write(folder / "tokenizer.json", json.dumps(tokenizer_json(tok), ensure_ascii=False))
    atomic_write(folder / "tokenizer_config.json", json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names.get(tok.bos_id),
        "eos_token": names.get(tok.eos_id), "add_bos_token": tok.add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False}, ensure_ascii=False, indent=1))
    return first


def tokenizer_json(tok):
    """The tokenizer.json (as a dict) of a Tokenizer. A byte-level BPE: ignore_merges (a pre-token that is
    itself a token is taken whole, as tiktoken does). A sentencepiece BPE: see the chapter's docstring."""
    names = {i: t for t, i in tok.special_tokens.items()}
    spec = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None}
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True}
    if tok.add_bos and tok.bos_id in names:
        bos = names[tok.bos_id]
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    if tok._sp is not None:
        sp = tok._sp
        pieces = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
        vocab = {p: i for i, p in enumerate(pieces)}
        merges = []
        for i, p in enumerate(pieces):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i):
                continue
            splits = sorted(((p[:c], p[c:]) for c in range(1, len(p)) if p[:c] in vocab and p[c:] in vocab),
                            key=lambda m: (vocab[m[0]], vocab[m[1]]))
            merges += [(sp.get_score(i), a, b) for a, b in splits]
        merges.sort(key=lambda m: -m[0])  # a stable sort: equal scores keep their order
        unk = next((p for i, p in enumerate(pieces) if sp.is_unknown(i)), None)
        names.update({vocab[unk]: unk} if unk is not None else {})
        space = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
        spec["normalizer"] = ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"}, space]}
                              if tok._dummy_prefix else space)
        decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]
        if tok._dummy_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        spec.update(pre_tokenizer=None, decoder={"type": "Sequence", "decoders": decoders},
                    model={**bpe, "unk_token": unk, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                           "vocab": vocab, "merges": [[a, b] for _, a, b in merges]})
    else:
        src = tok.byte_level()
        pattern = src["pattern"]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
        if pattern == GPT2_PATTERN:
            pre = byte_level
        elif pattern == SMOLLM_PATTERN:
            pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                dict(byte_level, use_regex=False)]}
        spec.update(pre_tokenizer=pre, decoder=byte_level,
                    model={**bpe, "vocab": src["vocab"], "merges": [[a, b] for a, b in src["merges"]]})
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in sorted(names.items())]
    return spec
