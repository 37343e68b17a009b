"""The paper's released format (model_type llama_moe): our model reproduces the paper's own code on it.

tests/fixtures/llama_moe_tiny/ holds two tiny random checkpoints (MLP gate and linear gate) and the inputs
and outputs that the paper's modeling code (pjlab-sys4nlp/llama-moe) produced on them: see its README.
"""
import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
from gate import cv_squared, normal_cdf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "llama_moe_tiny")
VARIANTS = ["mlp", "linear"]
TOL = 1e-5


def load(variant):
    path = os.path.join(FIXTURES, variant)
    return checkpoint.load_pretrained(path), load_file(os.path.join(path, "reference.safetensors"))


def run(model, ref, noise=False):
    """Forward on the fixture's input_ids -> (model.ModelOutput: logits, LM loss, balance loss, one gate output
    per MoE layer; the per-layer hidden states).
    With noise=True the gates replay the recorded standard-normal draws of the reference run."""
    hidden = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, i, o: hidden.append(o))]
    hooks += [b.register_forward_hook(lambda m, i, o: hidden.append(o[0])) for b in model.model.layers]  # (x, gate)
    originals = []
    if noise:
        for L, moe in enumerate(model.moe_layers()):
            originals.append(moe.gate.forward)
            moe.gate.forward = functools.partial(moe.gate.forward, noise=ref[f"train_noisy.noise.{L}"])
    try:
        idx = ref["input_ids"]
        # labels = input_ids, shifted inside the reference code: position t predicts token t+1
        targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1)
        with torch.no_grad():
            out = model(idx, targets)
    finally:
        for h in hooks:
            h.remove()
        for moe, fwd in zip(model.moe_layers(), originals):
            moe.gate.forward = fwd
    hidden[-1] = model.model.norm(hidden[-1])  # Hugging Face's last hidden state is after the final norm
    return out, hidden


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_is_read(variant):
    model, _ = load(variant)
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok, c.expert_intermediate_size) == (4, 2, 48)
    assert c.gate_type == variant and c.score_scale == 2.0 and c.gate_noise and c.gate_noise_eps == 0.01
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 96, 64)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_mode_matches_reference(variant):
    model, ref = load(variant)
    out, hidden = run(model.eval(), ref)
    assert (out.logits - ref["logits"]).abs().max() < TOL
    for i, h in enumerate(hidden):
        assert (h - ref[f"hidden_states.{i}"]).abs().max() < TOL, f"hidden state {i}"
    for L, g in enumerate(out.routing):
        assert (g.importance - ref[f"eval.gate_importance.{L}"]).abs().max() < TOL
        assert torch.equal(g.load, ref[f"eval.gate_load.{L}"])
    assert abs(out.balance_loss.item() - ref["eval.balance_loss"].item()) < 1e-7
    assert abs(out.loss.item() + out.balance_loss.item() - ref["eval.loss_with_labels"].item()) < TOL  # theirs adds it


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_without_noise_matches_reference(variant):
    model, ref = load(variant)
    for moe in model.moe_layers():
        moe.gate.noise = False
    out, _ = run(model.train(), ref)
    assert (out.logits - ref["train_nonoise.logits"]).abs().max() < TOL
    for L, g in enumerate(out.routing):
        assert (g.importance - ref[f"train_nonoise.gate_importance.{L}"]).abs().max() < TOL
        assert torch.equal(g.load, ref[f"train_nonoise.gate_load.{L}"])
    assert abs(out.balance_loss.item() - ref["train_nonoise.balance_loss"].item()) < 1e-7


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_with_recorded_noise_matches_reference(variant):
    model, ref = load(variant)
    out, _ = run(model.train(), ref, noise=True)
    assert (out.logits - ref["train_noisy.logits"]).abs().max() < TOL
    for L, g in enumerate(out.routing):
        assert (g.importance - ref[f"train_noisy.gate_importance.{L}"]).abs().max() < TOL
    # The load differs by design (see test_where_the_two_load_formulas_part); the LM loss must not.
    ce = out.loss.item()  # model(x, y).loss is the LM loss alone
    ref_ce = ref["train_noisy.loss_with_labels"].item() - ref["train_noisy.balance_loss"].item()
    assert abs(ce - ref_ce) < TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_where_the_two_load_formulas_part(variant):
    """Rebuild both load estimates from the replayed run. Ours (SPEC.md section 3) must agree with a direct
    recomputation; the reference's numbers must equal the released variant; and they differ exactly in the
    (token, expert) cells where `noise term > threshold` and `noisy logit > threshold` disagree."""
    model, ref = load(variant)
    inputs = []
    hooks = [m.gate.register_forward_hook(lambda mod, args, kw_out: inputs.append(args[0]))
             for m in model.moe_layers()]
    gates = run(model.train(), ref, noise=True)[0].routing
    for h in hooks:
        h.remove()
    k = model.config.num_experts_per_tok
    for L, (moe, x, g) in enumerate(zip(model.moe_layers(), inputs, gates)):
        with torch.no_grad():
            clean = moe.gate.gate_network(x).float()
            std = moe.gate.noise_std(x)
            noise_term = ref[f"train_noisy.noise.{L}"] * std
            noisy = clean + noise_term
            top = noisy.topk(k + 1, dim=-1).values
            t_in, t_out = top[:, k:k + 1], top[:, k - 1:k]
            p_in, p_out = normal_cdf((clean - t_in) / std), normal_cdf((clean - t_out) / std)
            ours = torch.where(noisy > t_in, p_in, p_out)          # Shazeer et al.: the noisy logit
            released = torch.where(noise_term > t_in, p_in, p_out)  # the release: the noise term alone
        assert (g.load - ours.sum(0)).abs().max() < 1e-5
        assert (released.sum(0) - ref[f"train_noisy.gate_load.{L}"]).abs().max() < 1e-4
        parted = (noisy > t_in) != (noise_term > t_in)
        assert parted.any(), "the fixture should exercise the difference"
        assert torch.equal((ours != released), parted)
    # The reference's balance loss: the sum over layers of w * (cv^2(importance) + cv^2(released load)).
    total = sum(0.01 * (cv_squared(ref[f"train_noisy.gate_importance.{L}"]) +
                        cv_squared(ref[f"train_noisy.gate_load.{L}"])) for L in range(len(gates)))
    assert abs(total.item() - ref["train_noisy.balance_loss"].item()) < 1e-7


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_moe_round_trip(variant, tmp_path):
    src = os.path.join(FIXTURES, variant)
    model, _ = load(variant)
    checkpoint.save_pretrained(model, tmp_path / "out", format="llama_moe")
    original = load_file(os.path.join(src, "model.safetensors"))
    saved = load_file(tmp_path / "out" / "model.safetensors")
    original = {k: v for k, v in original.items() if not k.endswith("rotary_emb.inv_freq")}
    assert sorted(saved) == sorted(original)
    for key in original:
        assert torch.equal(saved[key], original[key]), key
    raw_in = json.load(open(os.path.join(src, "config.json")))
    raw_out = json.load(open(tmp_path / "out" / "config.json"))
    for key in ("model_type", "num_experts", "num_selects", "size_experts", "gate_network", "score_scale_factor",
                "gate_use_softmax", "gate_add_noise", "gate_noise_epsilon", "gate_balance_loss_weight",
                "gate_type", "calculator_type", "multiply_gate_scores", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                "vocab_size", "tie_word_embeddings"):
        assert raw_out[key] == raw_in[key], key
    again = checkpoint.load_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 257, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(idx)[0], model.eval()(idx)[0])


def test_linear_gate_exports_to_mixtral(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, ref = load("linear")
    checkpoint.save_pretrained(model, tmp_path / "mixtral", format="mixtral")
    mixtral, info = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        got = mixtral.eval()(ref["input_ids"]).logits
    assert (got - ref["logits"]).abs().max() < TOL
    # ... and our loader reads the Mixtral folder back to the same eval logits.
    back = checkpoint.load_pretrained(tmp_path / "mixtral")
    with torch.no_grad():
        assert (back(ref["input_ids"])[0] - ref["logits"]).abs().max() < TOL


def test_mlp_gate_refuses_mixtral(tmp_path):
    model, _ = load("mlp")
    with pytest.raises(ValueError, match="MLP gate"):
        checkpoint.save_pretrained(model, tmp_path / "mixtral", format="mixtral")
    assert not os.path.exists(tmp_path / "mixtral")  # nothing half-written


@pytest.mark.parametrize("edit, message", [
    ({"gate_type": "SwitchBalancedGate"}, "gate_type 'SwitchBalancedGate' is not supported"),
    ({"size_experts": [[40, 56, 48, 48], [48] * 4]}, "experts of different sizes"),
    ({"num_experts_residual": 2, "size_experts_residual": 64}, "residual"),
    ({"gate_network": "conv"}, "gate_network 'conv'"),
])
def test_unsupported_llama_moe_settings_are_refused(edit, message, tmp_path):
    import shutil
    dst = tmp_path / "ck"
    shutil.copytree(os.path.join(FIXTURES, "mlp"), dst)
    raw = json.load(open(dst / "config.json"))
    raw.update(edit)
    json.dump(raw, open(dst / "config.json", "w"))
    with pytest.raises(ValueError, match=message):
        checkpoint.load_pretrained(dst)
