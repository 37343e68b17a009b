"""GGUF out (gguf_file.save_gguf) and self-contained folders (checkpoint.save_pretrained + hf_tokenizer).

Small random models written here: our reader gives back the logits (exact in F32, within the quantization
error in Q8_0), transformers' GGUF loader agrees on a dense file, the tokenizer inside gives the same ids, every
folder format carries a tokenizer transformers' AutoTokenizer reads with our ids. Bad input: refused before
anything is written. llama.cpp itself is checked outside CI (experiments/llamacpp_parity.py, README)."""
import json
import os

import pytest
import torch

import checkpoint
from configurator import UserError
from gguf_file import gguf_arch, read_gguf_metadata
from model import ModelConfig, Transformer
from test_tokenizer import BPE_TEXTS, LAYOUTS, MIXED, TRAIN_TEXT, train_byte_level, write_tiny_tiktoken
from tokenizer import Tokenizer, train_sentencepiece

gguf = pytest.importorskip("gguf")

HARD = BPE_TEXTS + ["x = 1234567890  # digits\n\n\tindent", "  two leading, trailing two  ", "naïve 日本 🤖"]


@pytest.fixture(scope="module", params=LAYOUTS)
def bpe_tok(request, tmp_path_factory):
    return Tokenizer(train_byte_level(tmp_path_factory.mktemp(request.param) / "tokenizer.json", request.param))


@pytest.fixture(scope="module")
def smollm_tok(tmp_path_factory):
    return Tokenizer(train_byte_level(tmp_path_factory.mktemp("smollm") / "tokenizer.json", "smollm"))


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    (d / "train.txt").write_text(TRAIN_TEXT)
    return Tokenizer(train_sentencepiece([d / "train.txt"], d / "tiny", vocab_size=400, num_threads=1))


@pytest.fixture(scope="module")
def tt_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tt") / "tokenizer.model"
    write_tiny_tiktoken(path)
    return Tokenizer(path)


def tiny(tok=None, seed=0, **moe):
    """A random tiny LLaMA (or MoE) whose vocabulary fits `tok`; weights large enough that routing matters."""
    torch.manual_seed(seed)
    base = dict(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                bos_token_id=tok.bos_id if tok else 1, eos_token_id=tok.eos_id if tok else 2)
    if moe:
        base.update(num_experts=4, num_experts_per_tok=2, expert_intermediate_size=32, gate_noise=False)
    model = Transformer(ModelConfig(**{**base, **moe}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


MOES = {  # name -> (ModelConfig fields, the llama.cpp architecture it is written as)
    "dense": ({}, "llama"),
    "moe": ({"score_scale": 2.0}, "llama"),
    "per-layer": ({"expert_intermediate_size": [32, 24], "score_scale": [2.0, 0.5]}, "llama"),
    "shared": ({"shared_intermediate_size": 48}, "granitemoe"),
    "bias": ({"shared_intermediate_size": 40}, "glm4moe"),
    "unit-all": ({"num_experts_per_tok": 4, "expert_weighting": "unit", "shared_intermediate_size": 16,
                  "gate_type": "mlp", "expert_intermediate_size": [32, 16]}, "llama"),
    "unit-one": ({"num_experts_per_tok": 1, "expert_weighting": "unit"}, "llama"),
}


def build(name, tok):
    fields, arch = MOES[name]
    model = tiny(tok, num_experts=4, **fields) if name != "dense" else tiny(tok)
    if name == "bias":
        for layer in model.moe_layers():
            layer.gate.expert_bias.normal_(0, 1.0)
    return model, arch


def ids_of(tok):
    return torch.tensor([tok.encode("the quick brown fox 123, jumps over\n\tthe lazy dog")])


@pytest.mark.parametrize("name", list(MOES))
def test_f32_round_trip_gives_our_logits(tmp_path, smollm_tok, name):
    model, arch = build(name, smollm_tok)
    ids = ids_of(smollm_tok)
    path = checkpoint.save_pretrained(model, tmp_path / "m.gguf", format="gguf", tokenizer=smollm_tok, gguf_type="f32")
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == arch
    back = checkpoint.load_pretrained(path)
    with torch.no_grad():
        want, got = model(ids)[0], back(ids)[0]
    if name == "dense":
        assert torch.equal(got, want)  # the same floats in the same order
    else:  # s folded into the down projections; zero-padded neurons; k = E experts side by side: rounding only
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert back.config.tokenizer_sha256 == smollm_tok.fingerprint


@pytest.mark.parametrize("gtype, atol", [("f16", 5e-3), ("bf16", 5e-2), ("q8_0", 8e-2)])
@pytest.mark.parametrize("name", ["dense", "moe", "shared"])
def test_quantized_round_trip_is_within_the_quantization_error(tmp_path, smollm_tok, name, gtype, atol):
    """Each weight read back equals gguf's own quantize -> dequantize of it; the logits move by its error only."""
    model, _ = build(name, smollm_tok)
    ids = ids_of(smollm_tok)
    path = checkpoint.save_pretrained(model, tmp_path / "m.gguf", format="gguf", tokenizer=smollm_tok, gguf_type=gtype)
    Q = gguf.GGMLQuantizationType
    want = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gtype]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == Q.F32
    if name != "dense":
        assert types["blk.0.ffn_gate_inp.weight"] == Q.F32  # the router stays F32, as llama.cpp's converter keeps it
    back = checkpoint.load_pretrained(path)
    q, k = back.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    round_trip = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(k.detach().numpy(), want), want))
    torch.testing.assert_close(q, round_trip, rtol=0, atol=0)
    with torch.no_grad():
        err = (back(ids)[0] - model(ids)[0]).abs().max().item()
    assert 0 < err < atol


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_reads_our_dense_gguf(tmp_path, smollm_tok, tied):
    transformers = pytest.importorskip("transformers")
    model = tiny(smollm_tok)
    if not tied:
        model = Transformer(ModelConfig(**{**model.config.__dict__, "tie_word_embeddings": False}))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
        model.eval()
    checkpoint.save_pretrained(model, tmp_path / "d.gguf", format="gguf", tokenizer=smollm_tok)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), gguf_file="d.gguf", dtype=torch.float32)
    ids = ids_of(smollm_tok)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=1e-4)


def test_tokenizer_inside_gives_our_ids(tmp_path, bpe_tok, sp_tok, tt_tok):
    """Every tokenizer kind: the GGUF's own tokenizer encodes the hard strings as the original does, and has its
    fingerprint (so data prepared with the original trains / evaluates the model read from the GGUF)."""
    for i, tok in enumerate((bpe_tok, sp_tok, tt_tok)):
        model = tiny(tok)
        path = checkpoint.save_pretrained(model, tmp_path / f"{i}.gguf", format="gguf", tokenizer=tok)
        inside = Tokenizer(path)
        assert inside.fingerprint == tok.fingerprint, tok
        assert (inside.bos_id, inside.eos_id, inside.add_bos) == (tok.bos_id, tok.eos_id, tok.add_bos)
        for text in HARD + MIXED:
            assert inside.encode(text) == tok.encode(text), (tok, text)
        fields = gguf.GGUFReader(str(path)).fields
        assert len(fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size  # [PAD] fillers
        # our fast metadata parser (what Tokenizer reads) gives exactly the gguf package's values, every key
        assert read_gguf_metadata(path) == {k: f.contents() for k, f in fields.items() if not k.startswith("GGUF.")}


def test_metadata_of_a_truncated_gguf_is_one_clear_error(tmp_path, smollm_tok):
    path = checkpoint.save_pretrained(tiny(smollm_tok), tmp_path / "m.gguf", format="gguf", tokenizer=smollm_tok)
    cut = tmp_path / "cut.gguf"
    with open(path, "rb") as f:
        cut.write_bytes(f.read(200))  # the header and the first keys: cut inside the metadata
    with pytest.raises(ValueError, match="not a readable GGUF file"):
        read_gguf_metadata(cut)


@pytest.mark.parametrize("format", ["llama", "native", "mixtral", "llama_moe"])
def test_every_folder_carries_a_tokenizer_transformers_reads(tmp_path, bpe_tok, format):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    model = tiny(bpe_tok) if format == "llama" else tiny(bpe_tok, num_experts=4)
    checkpoint.save_pretrained(model, tmp_path / "f", format=format, tokenizer=bpe_tok)
    assert Tokenizer(tmp_path / "f").fingerprint == bpe_tok.fingerprint
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "f"))
    for text in HARD:
        assert hf(text, add_special_tokens=False)["input_ids"] == bpe_tok.encode(text, allowed_special="all"), text
    with open(tmp_path / "f" / "generation_config.json") as f:
        assert json.load(f) == {"bos_token_id": bpe_tok.bos_id, "eos_token_id": bpe_tok.eos_id}


def test_sentencepiece_and_tiktoken_folders_read_by_transformers(tmp_path, sp_tok, tt_tok):
    """tokenizer.model (ours reads it) + tokenizer.json (transformers reads it, no protobuf needed): same ids."""
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    for name, tok in (("sp", sp_tok), ("tt", tt_tok)):
        checkpoint.save_pretrained(tiny(tok), tmp_path / name, tokenizer=tok)
        assert Tokenizer(tmp_path / name).fingerprint == tok.fingerprint
        hf = AutoTokenizer.from_pretrained(str(tmp_path / name))
        for text in HARD + MIXED:
            if "\u2581" in text:
                continue  # a literal U+2581: ours keeps its bytes, transformers reads a space (hf_tokenizer.py)
            assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text), (name, text)
        assert hf("hi")["input_ids"][:1] == [tok.bos_id]  # both add bos


def test_a_loaded_model_saves_with_its_own_tokenizer(tmp_path, smollm_tok):
    model = tiny(smollm_tok)
    model.config.tokenizer_sha256 = smollm_tok.fingerprint
    checkpoint.save_pretrained(model, tmp_path / "a", tokenizer=smollm_tok)
    again = checkpoint.load_pretrained(tmp_path / "a")
    checkpoint.save_pretrained(again, tmp_path / "b")              # no tokenizer given: the source's
    checkpoint.save_pretrained(again, tmp_path / "b.gguf", format="gguf")
    assert Tokenizer(tmp_path / "b").fingerprint == Tokenizer(tmp_path / "b.gguf").fingerprint == smollm_tok.fingerprint


# --- bad input: refused before anything is written ---------------------------------------------------------

def test_refusals_write_nothing(tmp_path, smollm_tok, bpe_tok, sp_tok):
    dst = tmp_path / "m.gguf"

    def refused(model, match, tok=smollm_tok, error=ValueError, **kw):
        with pytest.raises(error, match=match):
            checkpoint.save_pretrained(model, dst, format="gguf", tokenizer=tok, **kw)
        assert not dst.exists() and os.listdir(tmp_path) == []

    refused(tiny(smollm_tok, num_experts=4, gate_type="mlp"), r"MLP gate; save format='native', or split with "
                                                              r"--gate_type=linear")
    refused(tiny(smollm_tok, num_experts=4, expert_weighting="unit"), r"'unit' expert weighting of 2 of 4 experts "
                                                                      r"has no llama.cpp graph")
    refused(tiny(smollm_tok), "carries its tokenizer: pass tokenizer=", tok=None)
    refused(tiny(smollm_tok, vocab_size=300), "the tokenizer has .* ids but the model only 300 embeddings")
    refused(tiny(smollm_tok), "gguf_type 'q4_k'", gguf_type="q4_k")
    trained_with = tiny(smollm_tok)
    trained_with.config.tokenizer_sha256 = sp_tok.fingerprint
    refused(trained_with, "tokenizer mismatch: tokenizer .* comes from another tokenizer than the model")
    odd = Tokenizer(smollm_tok.path)
    odd._bpe = dict(odd._bpe, pattern=r"\w+|\s+")  # a split regex llama.cpp has no name for
    refused(tiny(smollm_tok), "regex llama.cpp has no name", tok=odd)
    odd._bpe = dict(smollm_tok._bpe, merges=[])
    refused(tiny(smollm_tok), "has no merges, and a GGUF cannot hold", tok=odd)
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(ValueError, match="is a folder: a GGUF is one file"):
        checkpoint.save_pretrained(tiny(smollm_tok), tmp_path / "dir.gguf", format="gguf", tokenizer=smollm_tok)


def test_an_existing_file_is_replaced_only_with_overwrite(tmp_path, smollm_tok):
    dst = tmp_path / "m.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists: pass overwrite=True"):
        checkpoint.save_pretrained(tiny(smollm_tok), dst, format="gguf", tokenizer=smollm_tok)
    assert dst.read_bytes() == b"keep me"
    checkpoint.save_pretrained(tiny(smollm_tok), dst, format="gguf", tokenizer=smollm_tok, overwrite=True)
    assert checkpoint.load_pretrained(dst).config.vocab_size == 640
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]  # no temporary left


def test_gguf_arch_names_what_fits():
    c = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    moe = dict(c, num_experts=4, expert_intermediate_size=8)
    assert gguf_arch(ModelConfig(**c)) == ("llama", False)
    assert gguf_arch(ModelConfig(**moe)) == ("llama", False)
    assert gguf_arch(ModelConfig(**moe, shared_intermediate_size=8)) == ("granitemoe", False)
    assert gguf_arch(ModelConfig(**moe), has_bias=True) == ("glm4moe", False)
    assert gguf_arch(ModelConfig(**moe, num_experts_per_tok=4, expert_weighting="unit", gate_type="mlp")) == ("llama", True)


# --- split.py --format=gguf --------------------------------------------------------------------------------

def test_split_writes_a_gguf_llama_cpp_runs(tmp_path, smollm_tok):
    import split
    src = tmp_path / "dense"
    dense = tiny(smollm_tok)
    dense.config.tokenizer_sha256 = smollm_tok.fingerprint
    checkpoint.save_pretrained(dense, src, tokenizer=smollm_tok)
    dst = tmp_path / "moe.gguf"
    args = [f"--src={src}", f"--dst={dst}", "--format=gguf", "--num_experts=4", "--top_k=2", "--gguf_type=f32"]
    split.main(args)
    moe = checkpoint.load_pretrained(dst)
    assert moe.config.num_experts == 4 and Tokenizer(dst).fingerprint == smollm_tok.fingerprint
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        split.main(args)
    split.main(args + ["--overwrite"])
    for where, match in ((src / "moe.gguf", "inside the input --src"), (tmp_path, "is a folder")):
        with pytest.raises(UserError, match=match):  # one file, never inside an input, never a folder
            split.main([f"--src={src}", f"--dst={where}"] + args[2:] + ["--overwrite"])
    assert not (src / "moe.gguf").exists()  # nothing written into --src
    with pytest.raises(UserError, match=r"--format=gguf: cannot write a GGUF: 'unit' expert weighting"):
        split.main([f"--src={src}", f"--dst={tmp_path / 'carved.gguf'}", "--format=gguf", "--method=activation",
                    "--num_experts=4", "--top_k=2", "--shared_size=40", "--data=unused"])
    with pytest.raises(UserError, match="MLP gate"):
        split.main(args[:2] + ["--format=gguf", "--gate_type=mlp", f"--dst={tmp_path / 'mlp.gguf'}"])
    assert not (tmp_path / "carved.gguf").exists() and not (tmp_path / "mlp.gguf").exists()
    split.main([f"--src={src}", f"--dst={tmp_path / 'folder'}", "--num_experts=4", "--top_k=2"])
    assert Tokenizer(tmp_path / "folder").fingerprint == smollm_tok.fingerprint  # folders carry it too


# --- train.py's export -------------------------------------------------------------------------------------

def test_train_exports_carry_the_data_tokenizer(tmp_path):
    """A run on shards whose folder holds a 64-id byte-level tokenizer: final/, final_mixtral/ and final.gguf
    all carry it (transformers reads the folders), and final.gguf gives final/'s logits."""
    import train
    from test_train import TINY, make_shards
    data = make_shards(tmp_path / "shards")
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {c: i + 3 for i, c in enumerate(chars + list("12345678") + ["ab"])}           # ids 3..63
    specials = ["<|endoftext|>", "<s>", "</s>"]
    spec = {"version": "1.0", "added_tokens": [{"id": i, "content": t, "special": True} for i, t in enumerate(specials)],
            "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {**vocab, **{t: i for i, t in enumerate(specials)}}, "merges": ["a b"]}}
    (tmp_path / "shards" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "shards" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = Tokenizer(tmp_path / "shards")
    meta = json.loads((tmp_path / "shards" / "meta.json").read_text())
    meta.update(tokenizer="tokenizer.json", tokenizer_sha256=tok.fingerprint)
    (tmp_path / "shards" / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--export=False"] + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=1",
                                                          "--export=True"]
    train.main(args)
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    for folder in ("final", "final_mixtral", "final.gguf", "ckpt_0000001/model"):
        assert Tokenizer(out / folder).fingerprint == tok.fingerprint, folder
        if not folder.endswith(".gguf"):
            assert AutoTokenizer.from_pretrained(str(out / folder))("abc XYZ 1234")["input_ids"] == tok.encode("abc XYZ 1234")
    final, gg = checkpoint.load_pretrained(out / "final"), checkpoint.load_pretrained(out / "final.gguf")
    ids = torch.tensor([tok.encode("abc def ghi")])
    with torch.no_grad():
        torch.testing.assert_close(gg(ids)[0], final(ids)[0], rtol=0, atol=2e-5)
