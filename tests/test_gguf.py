"""checkpoint.py's GGUF reader against its peers: the model it was written from, and transformers' own GGUF
loader on the same file. The files are written here with the gguf package (random tiny LLaMAs, quantized
with gguf.quants), plus the real SmolLM2 file when it is on this machine. Bad files: clear errors."""
import os

import numpy as np
import pytest
import torch

import checkpoint
from conftest import SMOLLM2_GGUF, smollm2_gguf
from model import Transformer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128)
GGUF_NAMES = {  # llama.cpp's tensor names, written independently of checkpoint.py's table
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
# One storage type per tensor kind, so that every type is read: F32, F16, Q8_0 and Q4_1 (the real file's
# types), and in a second file the other types gguf.quants can also write (the K-quants it only reads).
MIXED = {"token_embd": Q.Q8_0, "output": Q.F16, "attn_q": Q.Q4_1, "attn_k": Q.Q8_0, "attn_v": Q.F16,
         "attn_output": Q.Q4_1, "ffn_gate": Q.Q8_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16}
MIXED2 = {"token_embd": Q.BF16, "output": Q.Q4_0, "attn_q": Q.Q5_0, "attn_k": Q.Q5_1, "attn_v": Q.Q4_0,
          "attn_output": Q.BF16, "ffn_gate": Q.Q5_1, "ffn_up": Q.Q5_0, "ffn_down": Q.Q4_0}


def byte_chars():
    """GPT-2's byte -> printable character map (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = byte_chars() + [m.replace(" ", "") for m in MERGES] + SPECIALS


def hf_llama(seed=0, tied=True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=len(TOKENS), tie_word_embeddings=tied, attn_implementation="eager",
                                   bos_token_id=len(TOKENS) - 2, eos_token_id=len(TOKENS) - 1, **CFG)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)  # HF starts norms at 1: randomise so a swapped norm cannot hide
    return m


def permute_like_llama_cpp(w, n_heads):
    """What llama.cpp's converter does to q/k rows: per head, rotate-half order -> interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, types=None, arch="llama", skip=(), meta=None, extra=None):
    """Write `hf` (a LlamaForCausalLM) as llama.cpp would: names, q/k row order, types per tensor kind."""
    types = types or {}
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") and c.rope_parameters
                         else c.rope_theta)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * (len(TOKENS) - len(SPECIALS)) + [3] * len(SPECIALS))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            layer, rest = name.split(".", 3)[2:]
            gname = f"blk.{layer}.{GGUF_NAMES[rest]}"
        else:
            gname = GGUF_NAMES[name]
        if gname in skip:
            continue
        t = p.detach().float().numpy()
        if gname.endswith("attn_q.weight"):
            t = permute_like_llama_cpp(t, c.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            t = permute_like_llama_cpp(t, c.num_key_value_heads)
        kind = gname.split(".")[-2]
        qtype = Q.F32 if t.ndim == 1 else types.get(kind, Q.F32)
        data = gguf.quants.quantize(t, qtype)
        w.add_tensor(gname, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    for gname, (data, qtype) in (extra or {}).items():
        w.add_tensor(gname, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def ours_logits(path, idx):
    model = checkpoint.load_pretrained(path)
    with torch.no_grad():
        return model(idx)[0]


def transformers_logits(path, idx):
    ref = transformers.LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                        attn_implementation="eager").eval()
    with torch.no_grad():
        return ref(idx).logits


IDX = torch.randint(0, len(TOKENS), (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [True, False])
def test_f32_file_reproduces_the_model_it_was_written_from(tmp_path, tied):
    # No quantization: the GGUF path (names, llama.cpp's q/k order undone, tied head) must give back the
    # original model's logits, independently of any other loader.
    hf = hf_llama(tied=tied)
    path = write_gguf(tmp_path / "f32.gguf", hf)
    with torch.no_grad():
        want = hf(IDX).logits
    model = checkpoint.load_pretrained(path)
    assert model.config.tie_word_embeddings == tied
    assert (model.model.embed_tokens.weight is model.lm_head.weight) == tied
    with torch.no_grad():
        got = model(IDX)[0]
    assert (got - want).abs().max().item() < 1e-5
    # GGUF -> Hugging Face folder: what we save from it, transformers loads to the same logits.
    checkpoint.save_pretrained(model, tmp_path / "hf")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        assert (back(IDX).logits - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("tied, types", [(True, MIXED), (False, MIXED), (False, MIXED2)])
def test_quantized_file_matches_transformers_gguf_loader(tmp_path, tied, types):
    pytest.importorskip("accelerate")
    path = write_gguf(tmp_path / "mixed.gguf", hf_llama(seed=1, tied=tied), types=types)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type for t in reader.tensors} == {Q.F32} | {types[t] for t in types if tied or t != "output"}
    got, want = ours_logits(path, IDX), transformers_logits(str(path), IDX)
    assert (got - want).abs().max().item() < 1e-5
    # Quantization did change the weights: the comparison is not between two unquantized models.
    with torch.no_grad():
        assert (hf_llama(seed=1, tied=tied)(IDX).logits - want).abs().max().item() > 1e-4


def test_metadata_maps_onto_the_config(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), meta=dict(add_rope_scaling_type=gguf.RopeScalingType.LINEAR,
                                                                 add_rope_scaling_factor=2.0))
    c = checkpoint.load_pretrained(path).config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (len(TOKENS), 64, 128, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 16)
    assert (c.max_position_embeddings, c.rope_theta) == (128, 10000.0)
    assert abs(c.rms_norm_eps - 1e-5) < 1e-10
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (c.bos_token_id, c.eos_token_id) == (len(TOKENS) - 2, len(TOKENS) - 1)


def test_llama3_rope_freqs_tensor_becomes_llama3_scaling(tmp_path):
    # LLaMA-3.1 files carry per-frequency divisors (llama.cpp's converter formula, written out here).
    import math
    hd, base, factor, lo, hi, old = 16, 10000.0, 8.0, 1.0, 4.0, 8192
    divisors = []
    for f in 1.0 / base ** (np.arange(0, hd, 2) / hd):
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            divisors.append(1.0)
        elif wavelen > old / lo:
            divisors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    # head size 16: wavelengths 6.3 .. 19869 positions, so all three regimes (1, blended, factor) occur
    path = write_gguf(tmp_path / "l3.gguf", hf_llama(),
                      extra={"rope_freqs.weight": (np.array(divisors, dtype=np.float32), None)})
    model = checkpoint.load_pretrained(path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    want = torch.tensor(1.0 / base ** (np.arange(0, hd, 2) / hd) / np.array(divisors), dtype=torch.float32)
    torch.testing.assert_close(model.inv_freq, want, rtol=1e-5, atol=0)


def test_tokenizer_fingerprint_is_recorded_when_tokenizer_py_reads_the_file(tmp_path):
    from tokenizer import Tokenizer
    path = write_gguf(tmp_path / "t.gguf", hf_llama())
    try:
        want = Tokenizer(str(path)).fingerprint
    except Exception:  # a tokenizer.py without GGUF support: the model loads, with no fingerprint
        want = None
    assert checkpoint.load_pretrained(path).config.tokenizer_sha256 == want


# ------------------------------------------------------------------------------------------------------
# Bad files: each a clear error naming the file (and the tensor) and the reason.

def test_other_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "g.gguf", hf_llama(), arch="gpt2")
    with pytest.raises(ValueError, match=r"g\.gguf: general.architecture is 'gpt2'.*only 'llama'"):
        checkpoint.load_pretrained(path)


def test_truncated_file_is_refused(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", hf_llama(), types=MIXED)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])  # the last tensor, output_norm.weight (64 floats), is cut short
    with pytest.raises(ValueError, match=rf"t\.gguf: not a readable GGUF file \(ValueError: tensor 'output_norm\.weight' "
                                         rf"ends at byte {len(data)} but the file has {len(data) - 100}\).*truncated"):
        checkpoint.load_pretrained(path)


def test_missing_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_llama(), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"m\.gguf: missing tensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
        checkpoint.load_pretrained(path)


def test_type_the_gguf_package_cannot_dequantize_is_refused(tmp_path):
    # Q8_1 is a ggml type (32 weights -> 40 bytes) that gguf.quants has no dequantizer for.
    path = write_gguf(tmp_path / "q.gguf", hf_llama(), skip={"blk.0.ffn_up.weight"},
                      extra={"blk.0.ffn_up.weight": (np.zeros((128, 2 * 40), dtype=np.uint8), Q.Q8_1)})
    with pytest.raises(ValueError, match=r"q\.gguf: tensor 'blk\.0\.ffn_up\.weight' is stored as Q8_1"):
        checkpoint.load_pretrained(path)


def test_unknown_type_number_is_refused(tmp_path):
    # A type id no ggml release defines (the file's tensor table is patched by hand): the reader cannot
    # even size the tensor data.
    path = write_gguf(tmp_path / "u.gguf", hf_llama())
    reader = gguf.GGUFReader(str(path))
    field = next(t for t in reader.tensors if t.name == "output_norm.weight").field
    type_offset = field.offset + sum(part.nbytes for part in field.parts[:4])  # name len, name, n_dims, dims
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[type_offset:type_offset + 4], "little") == int(Q.F32)
    data[type_offset:type_offset + 4] = (77).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"u\.gguf: not a readable GGUF file .*tensor 'output_norm\.weight' has "
                                         r"ggml type 77, unknown to this gguf package"):
        checkpoint.load_pretrained(path)


def test_unexpected_tensor_is_refused(tmp_path):
    path = write_gguf(tmp_path / "b.gguf", hf_llama(),
                      extra={"blk.0.attn_q.bias": (np.zeros(64, dtype=np.float32), None)})
    with pytest.raises(ValueError, match=r"b\.gguf: unexpected tensor 'blk\.0\.attn_q\.bias'"):
        checkpoint.load_pretrained(path)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"x\.gguf: a single file is read only if it is GGUF"):
        checkpoint.load_pretrained(path)


# ------------------------------------------------------------------------------------------------------
# The real file: SmolLM2-135M-Instruct, Q4_1 (skipped when it is not on this machine).

SMOLLM2 = SMOLLM2_GGUF
needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason=f"{SMOLLM2} not present "
                                   f"(python data/smollm2.py fetches it; or set LLAMA_MOE_SMOLLM2_GGUF)")
# "The capital of France is" in SmolLM2's tokenizer (the ids transformers' tokenizer gives for this file)
PROMPT = [504, 3575, 282, 4649, 314]


@pytest.fixture(scope="module")
def smollm2():
    return checkpoint.load_pretrained(SMOLLM2)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(smollm2):
    pytest.importorskip("accelerate")
    idx = torch.tensor([PROMPT])
    model = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_key_value_heads, c.vocab_size) == (30, 576, 3, 49152)
    assert c.tie_word_embeddings
    with torch.no_grad():
        got = model(idx)[0]
    want = transformers_logits(SMOLLM2, idx)
    assert (got - want).abs().max().item() < 1e-4
    # Greedy continuation: " Paris."
    out = model.generate(idx, 3, temperature=0)[0, len(PROMPT):].tolist()
    assert out[0] == int(want[0, -1].argmax())


# ------------------------------------------------------------------------------------------------------
# Dense -> MoE -> Mixtral: transformers' MixtralForCausalLM generates what our split model generates.

def split_random(dense, E, k, seed=0):
    """IndependentRandom (SPEC.md section 2), written out: per layer shuffle the d_h neurons into E experts of
    d_h / E; attention, norms and embeddings are copied; a small random linear gate, no noise."""
    from dataclasses import replace
    c = dense.config
    torch.manual_seed(seed)
    moe = Transformer(replace(c, num_experts=E, num_experts_per_tok=k, gate_noise=False,
                              expert_intermediate_size=c.intermediate_size // E))
    sd = moe.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dense.state_dict().items():
            if ".mlp." not in name:
                sd[name].copy_(p)
        for layer, block in enumerate(dense.model.layers):
            ix = torch.randperm(c.intermediate_size, generator=g).view(E, -1)        # (E, d_e)
            e, ffn = moe.model.layers[layer].mlp.experts, block.mlp
            e.gate_up_proj.copy_(torch.cat([ffn.gate_proj.weight[ix], ffn.up_proj.weight[ix]], dim=1))  # (E, 2 d_e, d)
            e.down_proj.copy_(ffn.down_proj.weight[:, ix].permute(1, 0, 2))          # (d, E, d_e) -> (E, d, d_e)
            moe.model.layers[layer].mlp.gate.gate_network.weight.normal_(0.0, 0.1, generator=g)
    return moe.eval()


@pytest.mark.parametrize("source", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_split_model_exports_to_mixtral_and_generates_the_same(source, tmp_path, request):
    if source == "tiny":
        dense, E, k = checkpoint.load_pretrained(write_gguf(tmp_path / "d.gguf", hf_llama(), types=MIXED)), 4, 2
        prompt = IDX[:1, :6]
    else:
        if not os.path.exists(SMOLLM2):
            pytest.skip(f"{SMOLLM2} not present")
        dense, E, k, prompt = request.getfixturevalue("smollm2"), 16, 4, torch.tensor([PROMPT])
    moe = split_random(dense, E, k)
    checkpoint.save_pretrained(moe, tmp_path / "mixtral", format="mixtral")
    mixtral, info = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mixtral.generation_config.eos_token_id = None  # never stop early: compare every step
    want = mixtral.eval().generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = moe.generate(prompt, 8, temperature=0)
    assert torch.equal(got, want)
    with torch.no_grad():  # and the logits agree, not only their argmax
        assert (moe(got)[0] - mixtral(got).logits).abs().max().item() < 1e-4
