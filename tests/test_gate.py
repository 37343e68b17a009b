"""
Tests for gate.py, the noisy top-k gate of SPEC §3 (Shazeer et al. 2017). Read top to bottom:
routing (eval is clean and repeatable, training is noisy, noise can be replayed), the balance loss
(0 when even, large when collapsed), the load estimate (it is the probability it claims to be, checked
by Monte Carlo), gradients, the paper's own numbers (the llama_moe_tiny fixture made by the released
code: variance convention, layer-0 routing), the released code's variant of the load, and bad input.
"""

from pathlib import Path

import pytest
import torch

from gate import (
    GateOutput, TopKGate, cv_squared, keep_probability, load_estimate, normal_cdf, top_k_mask,
)

T, D, E, K = 32, 16, 6, 2


def make_gate(gate_type="linear", seed=0, **kwargs):
    torch.manual_seed(seed)
    gate = TopKGate(D, E, K, gate_type=gate_type, **kwargs)
    # W_noise starts at zero; give it some values so the noise std differs per token and expert.
    with torch.no_grad():
        gate.weight_noise.weight.normal_(0.0, 0.3)
    return gate


def tokens(n=T, seed=1):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def clean_logits(gate, x):
    with torch.no_grad():
        return gate.gate_network(x).float()


# -----------------------------------------------------------------------------
# Routing

@pytest.mark.parametrize("gate_type", ["linear", "mlp"])
def test_parameter_names_and_shapes(gate_type):
    gate = TopKGate(D, E, K, gate_type=gate_type)
    shapes = {name: tuple(p.shape) for name, p in gate.named_parameters()}
    if gate_type == "linear":
        assert shapes == {"gate_network.weight": (E, D), "weight_noise.weight": (E, D)}
    else:
        assert shapes == {"gate_network.0.weight": (E, D), "gate_network.2.weight": (E, E),
                          "weight_noise.weight": (E, D)}
    assert torch.count_nonzero(gate.weight_noise.weight) == 0   # zero init (SPEC §3)


@pytest.mark.parametrize("gate_type", ["linear", "mlp"])
def test_eval_is_clean_top_k_and_repeatable(gate_type):
    gate = make_gate(gate_type).eval()
    x = tokens()
    a, b = gate(x), gate(x)
    assert isinstance(a, GateOutput)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    # Eval routing is exactly softmax over the top-k CLEAN logits (Mixtral's routing).
    top, ids = clean_logits(gate, x).topk(K, dim=-1)
    assert torch.equal(a.expert_ids, ids)
    torch.testing.assert_close(a.scores, torch.softmax(top, dim=-1), rtol=0, atol=0)
    # Without noise the load is the token count, as a float with no gradient.
    assert torch.equal(a.load, a.counts.float())
    assert not a.load.requires_grad
    assert a.counts.dtype == torch.int64 and a.counts.sum() == T * K
    assert a.expert_ids.dtype == torch.int64 and a.expert_ids.shape == (T, K)


def test_scores_are_fp32_and_sum_to_one_per_token():
    gate = make_gate("mlp").to(torch.bfloat16)
    x = tokens().to(torch.bfloat16)
    for mode in (gate.eval, gate.train):
        mode()
        out = gate(x)
        assert out.scores.dtype == torch.float32 and out.scores.shape == (T, K)
        torch.testing.assert_close(out.scores.sum(-1), torch.ones(T), rtol=0, atol=1e-6)
        # Scores are not rescaled here (the N/k factor is model.py's), so importance sums to T.
        torch.testing.assert_close(out.importance.sum(), torch.tensor(float(T)), rtol=1e-6, atol=0)
        assert (out.scores[:, 0] >= out.scores[:, 1]).all()   # best expert first


def test_training_adds_noise():
    gate = make_gate("linear").train()
    x = tokens(256)
    clean_ids = clean_logits(gate, x).topk(K, dim=-1).indices
    torch.manual_seed(10)
    a = gate(x)
    torch.manual_seed(11)
    b = gate(x)
    assert not torch.equal(a.scores, b.scores)           # fresh noise each call
    assert (a.expert_ids != clean_ids).any(dim=-1).float().mean() > 0.05   # and it changes routing
    assert a.load.requires_grad and not torch.equal(a.load, a.counts.float())
    # noise=False: training routes like eval.
    quiet = make_gate("linear", noise=False).train()
    assert torch.equal(quiet(x).expert_ids, clean_ids)


def test_replayed_noise_is_deterministic_and_equals_the_drawn_noise():
    gate = make_gate("mlp").train()
    x = tokens()
    z = torch.randn(T, E, generator=torch.Generator().manual_seed(5))
    a, b = gate(x, noise=z), gate(x, noise=z)
    for ta, tb in zip(a, b):
        assert torch.equal(ta, tb)
    # The replay means exactly: noisy = clean + z * (softplus(W_noise x) + eps).
    with torch.no_grad():
        noisy = clean_logits(gate, x) + z * gate.noise_std(x)
    assert torch.equal(a.expert_ids, noisy.topk(K, dim=-1).indices)
    # The gate draws one randn (T, E) per call, so a seeded run and its recorded draws agree.
    torch.manual_seed(123)
    drawn = gate(x)
    torch.manual_seed(123)
    replayed = gate(x, noise=torch.randn(T, E))
    for ta, tb in zip(drawn, replayed):
        assert torch.equal(ta, tb)
    # In eval mode there is no noise, so a given draw changes nothing.
    gate.eval()
    assert torch.equal(gate(x, noise=z).scores, gate(x).scores)


# -----------------------------------------------------------------------------
# The balance loss

def identity_gate(num_experts, top_k, **kwargs):
    """Gate with d = E and gate_network = identity, so the logits are the input rows themselves."""
    gate = TopKGate(num_experts, num_experts, top_k, **kwargs)
    with torch.no_grad():
        gate.gate_network.weight.copy_(torch.eye(num_experts))
    return gate


def test_cv_squared_conventions():
    assert cv_squared(torch.full((8,), 3.0)) == 0
    # Unbiased variance: a one-hot vector over E experts has cv^2 exactly E (population variance: E - 1).
    torch.testing.assert_close(cv_squared(torch.tensor([5.0, 0, 0, 0])), torch.tensor(4.0))
    assert cv_squared(torch.tensor([7.0])) == 0     # one expert: balanced by definition, not nan
    assert cv_squared(torch.zeros(4)) == 0          # empty batch: no division by zero


def test_balanced_routing_gives_zero_loss():
    # Token t favours experts t and t+1 (mod E) equally: every expert gets 2 tokens and score 2 * 0.5.
    gate = identity_gate(4, 2, balance_loss_weight=0.01).eval()
    x = torch.zeros(4, 4)
    for t in range(4):
        x[t, t] = x[t, (t + 1) % 4] = 3.0
    out = gate(x)
    assert torch.equal(out.counts, torch.tensor([2, 2, 2, 2]))
    torch.testing.assert_close(out.importance, torch.ones(4))
    assert out.balance_loss == 0


def test_balanced_noisy_routing_gives_zero_loss():
    # With noise, make the batch symmetric under a cyclic shift of the experts: token t is a shifted
    # copy of token 0, with shifted noise. Importance and the load estimate are then even by symmetry.
    gate = identity_gate(4, 2, balance_loss_weight=0.01).train()
    with torch.no_grad():
        gate.weight_noise.weight.copy_(0.5 * torch.eye(4))
    base_x, base_z = torch.tensor([1.0, -0.5, 0.3, 2.0]), torch.tensor([0.2, 1.1, -0.7, 0.4])
    x = torch.stack([base_x.roll(t) for t in range(4)])
    z = torch.stack([base_z.roll(t) for t in range(4)])
    out = gate(x, noise=z)
    torch.testing.assert_close(out.importance, torch.ones(4))
    torch.testing.assert_close(out.load, out.load.mean().expand(4))
    assert out.balance_loss.abs() < 1e-10


def test_collapsed_routing_gives_a_large_loss():
    # Every token prefers expert 0 (k = 1): importance and counts are one-hot, each cv^2 = E.
    w = 0.01
    gate = identity_gate(4, 1, balance_loss_weight=w).eval()
    x = torch.tensor([[5.0, 1.0, 0.0, -1.0]]).repeat(16, 1)
    out = gate(x)
    assert torch.equal(out.counts, torch.tensor([16, 0, 0, 0]))
    torch.testing.assert_close(out.balance_loss, torch.tensor(w * (4 + 4)))
    # k = 2, every token on experts {0, 1} with equal scores: [a, a, 0, 0] has cv^2 = 4/3 (unbiased).
    gate2 = identity_gate(4, 2, balance_loss_weight=w).eval()
    x2 = torch.tensor([[5.0, 5.0, 0.0, -1.0]]).repeat(16, 1)
    torch.testing.assert_close(gate2(x2).balance_loss, torch.tensor(w * 8 / 3))


# -----------------------------------------------------------------------------
# The load estimate is the probability it claims to be (Shazeer et al. 2017, Appendix A)

def noisy_setup(n_tokens=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n_tokens, E, generator=g)
    std = torch.rand(n_tokens, E, generator=g) * 0.8 + 0.2
    noisy = clean + torch.randn(n_tokens, E, generator=g) * std
    mask = top_k_mask(noisy.topk(K, dim=-1).indices, E)
    return clean, std, noisy, mask


def test_keep_probability_matches_monte_carlo_redraw_of_one_noise():
    # The estimate for (t, j): redraw the noise of (t, j) only, keep every other noisy logit, and ask
    # how often j is still in t's top k. Count that directly over 20k draws per expert.
    clean, std, noisy, mask = noisy_setup()
    n_draws = 20_000
    g = torch.Generator().manual_seed(4)
    estimate = keep_probability(clean, noisy, std, mask, K)                 # (T, E)
    monte_carlo = torch.empty_like(estimate)
    for j in range(E):
        trial = noisy.expand(n_draws, -1, -1).clone()                       # (N, T, E)
        trial[..., j] = clean[:, j] + torch.randn(n_draws, clean.shape[0], generator=g) * std[:, j]
        kept = (trial.topk(K, dim=-1).indices == j).any(-1)                 # (N, T)
        monte_carlo[:, j] = kept.float().mean(0)
    # One Bernoulli mean of 20k draws has a standard error <= 0.0035.
    torch.testing.assert_close(estimate, monte_carlo, rtol=0, atol=0.015)
    load, load_mc = estimate.sum(0), monte_carlo.sum(0)                    # (E,)
    torch.testing.assert_close(load, load_estimate(clean, noisy, std, mask, K))
    assert ((load.sum() - load_mc.sum()).abs() / load_mc.sum()) < 0.02


def test_load_estimate_averages_to_the_expected_token_count():
    # Averaged over the noise, the conditional probability is the plain probability of being routed,
    # so the mean load estimate equals the mean count of tokens per expert.
    g = torch.Generator().manual_seed(6)
    n_draws, n_tokens = 20_000, 4
    clean = torch.randn(n_tokens, E, generator=g).repeat(n_draws, 1)       # (N*T, E)
    std = (torch.rand(n_tokens, E, generator=g) * 0.8 + 0.2).repeat(n_draws, 1)
    noisy = clean + torch.randn(clean.shape, generator=g) * std
    ids = noisy.topk(K, dim=-1).indices
    estimate = load_estimate(clean, noisy, std, top_k_mask(ids, E), K) / n_draws   # (E,)
    counted = torch.bincount(ids.reshape(-1), minlength=E).float() / n_draws       # (E,)
    torch.testing.assert_close(estimate, counted, rtol=0, atol=0.03)
    assert ((estimate.sum() - counted.sum()).abs() / counted.sum()) < 0.02


def test_gate_load_equals_load_estimate_of_its_own_logits():
    gate = make_gate("linear").train()
    x = tokens()
    z = torch.randn(T, E, generator=torch.Generator().manual_seed(7))
    out = gate(x, noise=z)
    with torch.no_grad():
        clean, std = clean_logits(gate, x), gate.noise_std(x)
        noisy = clean + z * std
        expected = load_estimate(clean, noisy, std, top_k_mask(out.expert_ids, E), K)
    torch.testing.assert_close(out.load.detach(), expected)


def test_top_k_equal_to_num_experts_keeps_every_expert():
    gate = TopKGate(D, E, E).train()
    out = gate(tokens())
    assert torch.equal(out.counts, torch.full((E,), T))
    torch.testing.assert_close(out.load, torch.full((E,), float(T)))
    torch.testing.assert_close(out.scores.sum(-1), torch.ones(T))
    assert torch.isfinite(out.balance_loss)


def test_one_expert_and_one_token():
    out = TopKGate(D, 1, 1).train()(tokens(1))
    assert out.expert_ids.tolist() == [[0]] and out.balance_loss == 0
    out = make_gate().train()(tokens(1))
    assert out.expert_ids.shape == (1, K) and torch.isfinite(out.balance_loss)


# -----------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("gate_type", ["linear", "mlp"])
def test_balance_loss_trains_the_gate_and_the_noise(gate_type):
    torch.manual_seed(0)
    gate = TopKGate(D, E, K, gate_type=gate_type).train()   # W_noise at its zero init
    out = gate(tokens(), noise=torch.randn(T, E))
    out.balance_loss.backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Without noise only importance carries a gradient; W_noise gets none.
    gate.zero_grad(set_to_none=True)
    gate.noise = False
    gate(tokens()).balance_loss.backward()
    assert gate.weight_noise.weight.grad is None
    assert next(gate.gate_network.parameters()).grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# The paper's numbers: the fixture made by the released LLaMA-MoE code (its README lists the tensors)

FIXTURE_DIRS = [Path(__file__).resolve().parent / "fixtures" / "llama_moe_tiny",
                Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "llama_moe_tiny"]


def fixture_file(variant, name):
    for root in FIXTURE_DIRS:
        path = root / variant / name
        if path.exists():
            from safetensors.torch import load_file
            return load_file(str(path))
    pytest.skip("llama_moe_tiny fixture not found (tests/fixtures/ or ../shared/fixtures/)")


def fixture_reference(variant):
    return fixture_file(variant, "reference.safetensors")


@pytest.mark.parametrize("variant", ["mlp", "linear"])
@pytest.mark.parametrize("run", ["eval", "train_noisy", "train_nonoise"])
def test_fixture_balance_loss_pins_the_unbiased_variance(variant, run):
    ref = fixture_reference(variant)
    n_layers, w = 2, 0.01
    imp = [ref[f"{run}.gate_importance.{layer}"] for layer in range(n_layers)]
    load = [ref[f"{run}.gate_load.{layer}"] for layer in range(n_layers)]
    expected = ref[f"{run}.balance_loss"].reshape(())
    # Per layer w * (cv^2(importance) + cv^2(load)), summed over the layers, with the unbiased variance.
    ours = sum(w * (cv_squared(i) + cv_squared(l)) for i, l in zip(imp, load))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=0)
    # The population variance misses by the factor (E - 1) / E = 3/4: the convention is pinned.
    population = sum(w * (i.var(unbiased=False) / i.mean() ** 2 + l.var(unbiased=False) / l.mean() ** 2)
                     for i, l in zip(imp, load))
    assert (population - expected).abs() > 0.2 * expected
    # Its scores are unscaled (importance sums to the 22 tokens) and, without noise, load counts k per token.
    for i, l in zip(imp, load):
        torch.testing.assert_close(i.sum(), torch.tensor(22.0), rtol=1e-5, atol=0)
        if run != "train_noisy":
            assert l.sum() == 22 * 2


# Routing, importance and the reference's noisy load, matched layer by layer on the full model (whose gate
# inputs model.py computes): tests/test_compat.py.


# -----------------------------------------------------------------------------
# The released code's variant of the load estimate, and exactly where it parts from ours
#
# The paper's release decides "expert j is currently in the top k" by comparing the NOISE TERM alone,
# z * std, with the (k+1)-th largest noisy logit; Shazeer et al. (and gate.py) compare the NOISY LOGIT,
# clean + z * std. Written here, not in gate.py, only to show the difference.

def released_keep_probability(clean, noise_term, noise_std, k):
    noisy = clean + noise_term                                   # (T, E)
    top = noisy.topk(k + 1, dim=-1).values                       # (T, k+1)
    threshold_if_in, threshold_if_out = top[:, k:k + 1], top[:, k - 1:k]
    looks_in = noise_term > threshold_if_in                      # the variant: noise term, not noisy logit
    return torch.where(looks_in, normal_cdf((clean - threshold_if_in) / noise_std),
                       normal_cdf((clean - threshold_if_out) / noise_std))


def test_released_variant_equals_ours_when_clean_logits_are_zero():
    # With clean = 0 the noise term IS the noisy logit. (The release zero-initialises its linear gate,
    # so at the start of training the two coincide.)
    _, std, _, _ = noisy_setup()
    clean = torch.zeros_like(std)
    noise_term = torch.randn(std.shape, generator=torch.Generator().manual_seed(8)) * std
    mask = top_k_mask(noise_term.topk(K, dim=-1).indices, E)
    assert torch.equal(released_keep_probability(clean, noise_term, std, K),
                       keep_probability(clean, clean + noise_term, std, mask, K))


def test_released_variant_differs_exactly_where_the_clean_logit_crosses_the_threshold():
    clean, std, noisy, mask = noisy_setup(n_tokens=64, seed=9)
    noise_term = noisy - clean
    ours = keep_probability(clean, noisy, std, mask, K)
    theirs = released_keep_probability(clean, noise_term, std, K)
    threshold_if_in = noisy.topk(K + 1, dim=-1).values[:, K:K + 1]
    # (t, j) is classified differently iff noise_term > h and clean + noise_term > h disagree, i.e.
    # the clean logit alone moves j across h = the (k+1)-th noisy logit.
    misread = (noise_term > threshold_if_in) != mask
    assert misread.any() and (~misread).any()
    differs = ours != theirs
    assert torch.equal(differs, misread)
    # In the top k but read as out (needs clean > 0): the release uses the higher k-th threshold -> lower.
    in_read_out = mask & misread
    assert (clean[in_read_out] > 0).all() and (theirs[in_read_out] < ours[in_read_out]).all()
    # Out of the top k but read as in (needs clean < 0): the lower (k+1)-th threshold -> higher.
    out_read_in = ~mask & misread
    assert (clean[out_read_in] < 0).all() and (theirs[out_read_in] > ours[out_read_in]).all()


# -----------------------------------------------------------------------------
# Bad settings are refused once, where the user gives them (ModelConfig, with a message that says the fix);
# inside, TopKGate only asserts its invariants.

@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts_per_tok=0), "num_experts_per_tok 0 must be in 1..num_experts"),
    (dict(num_experts_per_tok=E + 1), "num_experts_per_tok 7 must be in 1..num_experts"),
    (dict(gate_type="conv"), "gate_type 'conv' is not supported"),
    (dict(gate_noise_eps=0.0), "gate_noise_eps 0.0 must be > 0"),
    (dict(balance_loss_weight=-1.0), "balance_loss_weight -1.0 must be >= 0"),
])
def test_bad_gate_settings_are_refused_by_the_config(kwargs, match):
    from model import ModelConfig
    args = dict(hidden_size=D, num_attention_heads=2, num_hidden_layers=1, intermediate_size=4 * D,
                num_experts=E, num_experts_per_tok=K, expert_intermediate_size=D) | kwargs
    with pytest.raises(ValueError, match=match):
        ModelConfig(**args)


@pytest.mark.parametrize("kwargs", [dict(top_k=0), dict(top_k=E + 1), dict(gate_type="conv"),
                                    dict(noise_eps=0.0), dict(balance_loss_weight=-1.0)])
def test_gate_asserts_its_invariants(kwargs):
    with pytest.raises(AssertionError):
        TopKGate(**(dict(dim=D, num_experts=E, top_k=K) | kwargs))


def test_gate_asserts_flat_tokens():
    gate = make_gate().train()
    with pytest.raises(AssertionError):
        gate(torch.randn(2, T, D))                   # (B, S, d): the MoE layer flattens first
    with pytest.raises(AssertionError):
        gate(tokens(), noise=torch.randn(T, E + 1))
