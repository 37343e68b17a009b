"""carve.py and what it adds to split.py: the activation construction, routers from the data, unit weights,
and loss-free bias balancing (gate.py, train.py)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import checkpoint
import carve
from configurator import UserError
from gate import TopKGate, routing_evenness, update_bias
from split import SplitConfig, split_model
from test_split import ROOT, expert_neurons, match_to_dense, neurons, tiny_dense, write_shards


def act_cfg(data_dir, **kw):
    return SplitConfig(**{**dict(num_experts=4, top_k=2, method="activation", profile_seqs=4, seq_len=16,
                                 batch_size=2, data=data_dir), **kw})


@pytest.mark.parametrize("propagate,refit", [("dense", False), ("moe", False), ("moe", True)])
def test_carving_sees_the_forward_of_the_model_it_builds(propagate, refit, tmp_path):
    """Layer by layer, the carving sees exactly the FFN inputs and activations of a forward pass: of the dense
    model (propagate=dense), or of the MoE model it builds (propagate=moe: later layers see the new experts)."""
    data = write_shards(tmp_path / "data", 64)
    cfg = act_cfg(data, shared_size=16, router_init="fit", propagate=propagate)
    dense = tiny_dense(0)
    tokens = torch.randint(0, 64, (3, 10))
    seen = []
    plan_layer = lambda layer, x, a: (seen.append((x, a)),
                                      *carve.activation_experts(a, 4, 16, 0.1)[::-1],
                                      torch.randn(4, 32))[1:]
    plans = list(carve.carve_layers(dense, tokens, plan_layer, 2, "unit", 1.0, 2, propagate, refit=refit))
    from split import build_moe
    model = dense if propagate == "dense" else build_moe(dense, plans, 4, 2, 20, 16, 1.0, "unit")
    want = []
    hooks = [b.mlp.register_forward_pre_hook(lambda m, args: want.append(args[0].flatten(0, 1)))
             for b in model.model.layers]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for (x, a), w in zip(seen, want):
        torch.testing.assert_close(x, w, rtol=1e-3 if refit else 1e-5, atol=1e-3 if refit else 1e-5)


def test_activation_split_is_an_exact_partition(tmp_path):
    data = write_shards(tmp_path / "data", 64)
    dense = tiny_dense(3)
    moe = split_model(dense, act_cfg(data, shared_size=16, refit_down=False))
    c = moe.config
    assert (c.num_experts, c.expert_intermediate_size, c.shared_intermediate_size) == (4, 20, 16)
    assert c.expert_weighting == "unit" and c.score_scale == 1.0  # CMoE: unit weights, no E/k rescale
    for layer in range(2):
        mlp, ffn = moe.model.layers[layer].mlp, dense.model.layers[layer].mlp
        routed = match_to_dense(expert_neurons(mlp), ffn).tolist()
        s = mlp.shared
        shared = match_to_dense(neurons(s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight), ffn).tolist()
        assert sorted(routed + shared) == list(range(96))  # every neuron exactly once


def test_refit_down_brings_the_routed_output_closer_to_the_dense_one():
    """carve.refit_down: on the sample it is fitted to, the routed layer's output (a * n) W^T moves closer to the
    dense a W_down^T than with the parent's own W_down; with every neuron on (n = 1) it IS the parent's."""
    torch.manual_seed(0)
    a = torch.randn(500, 4) @ torch.randn(4, 24)   # correlated neurons, as real ones are: the kept stand in
    w = torch.randn(8, 24)
    n = (torch.rand(500, 24) < 0.5).float()
    err = lambda w2: float(((a * n) @ w2.T - a @ w.T).pow(2).mean())  # noqa: E731
    assert err(carve.refit_down(a, n, w)) < 0.8 * err(w)
    assert torch.equal(carve.refit_down(a, torch.ones_like(n), w), w)


def test_shared_block_holds_the_most_often_marked_neurons():
    torch.manual_seed(0)
    a = torch.randn(200, 43) * 0.1
    a[:, [3, 17, 29]] += 5.0                     # three neurons fire on every token
    shared, experts = carve.activation_experts(a, num_experts=4, shared_size=3, mark_ratio=0.1)
    assert shared.tolist() == [3, 17, 29]
    assert sorted(torch.cat(experts).tolist()) == sorted(set(range(43)) - {3, 17, 29})
    assert [len(e) for e in experts] == [10] * 4


def test_co_activating_neurons_are_grouped():
    """Two groups of neurons that fire on disjoint halves of the tokens end up in different experts."""
    torch.manual_seed(0)
    a = torch.randn(100, 16) * 0.01
    a[:50, :8] += 1.0
    a[50:, 8:] += 1.0
    _, experts = carve.activation_experts(a, num_experts=2, shared_size=0, mark_ratio=0.5)
    assert sorted(sorted(e.tolist()) for e in experts) == [list(range(8)), list(range(8, 16))]


@pytest.mark.parametrize("method", ["random", "activation"])
def test_every_expert_active_with_unit_weights_is_the_dense_model(method, tmp_path):
    data = write_shards(tmp_path / "data", 64)
    dense = tiny_dense(1)
    kw = dict(shared_size=16) if method == "activation" else {}
    moe = split_model(dense, act_cfg(data, method=method, num_experts=4, top_k=4, scale=1.0,
                                     expert_weighting="unit", router_init="fit", **kw))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        want = dense(idx).logits
        got = moe(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_unit_weights_pass_the_router_gradient():
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    moe = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                                  num_attention_heads=4, num_experts=4, num_experts_per_tok=2,
                                  expert_intermediate_size=24, expert_weighting="unit", gate_noise=False))
    loss = moe(torch.randint(0, 64, (2, 8)), targets=torch.randint(0, 64, (2, 8))).loss
    loss.backward()
    assert moe.model.layers[0].mlp.gate.gate_network.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("how", ["centroid", "fit"])
def test_router_init_is_deterministic_and_picks_the_best_experts(how, tmp_path):
    data = write_shards(tmp_path / "data", 64)
    a = split_model(tiny_dense(2), act_cfg(data, router_init=how, shared_size=16))
    b = split_model(tiny_dense(2), act_cfg(data, router_init=how, shared_size=16))
    c = split_model(tiny_dense(2), act_cfg(data, router_init=how, shared_size=16, seed=1))
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    # On separable data the closed-form router reproduces the target choice.
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    scores = torch.stack([x[:, 0], -x[:, 0], x[:, 1], -x[:, 1]], dim=1)       # (T, 4)
    w = carve.router_weights(x, scores, 1, how)
    agree = ((x @ w.T).argmax(1) == scores.argmax(1)).float().mean()
    assert agree > 0.8, agree
    assert abs(float((x @ w.T).std()) - 1.0) < 1e-4                           # unit logit spread


def test_bad_settings_are_one_line_errors_before_anything_is_written(tmp_path):
    data = write_shards(tmp_path / "data", 64)
    dense = tiny_dense(0)
    cases = [
        (dict(shared_size=96), "--shared_size=96"),                       # the shared block takes every neuron
        (dict(profile_seqs=0), "--profile_seqs=0"),
        (dict(shared_size=15), r"do not split into 4 equal experts.*e\.g\. 12\)"),  # 81 over 4: 12 would do
        (dict(router_init="fit", gate_type="mlp"), "cannot hold them"),
        (dict(router_init="nearest"), "--router_init='nearest'"),
        (dict(mark_ratio=0.0), "--mark_ratio=0.0"),
        (dict(format="mixtral"), "expert_weighting .unit."),               # unit weights
        (dict(data=None), "--data"),
    ]
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            split_model(dense, act_cfg(data, **kw))
    src = tmp_path / "dense"
    checkpoint.save_pretrained(dense, src)
    dst = tmp_path / "moe"
    r = subprocess.run([sys.executable, "split.py", f"--src={src}", f"--dst={dst}", "--method=activation",
                        "--num_experts=4", "--top_k=2", "--shared_size=15", f"--data={data}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and not dst.exists(), r.stderr


# ----------------------------------------------------------------------------------------------------------
# Loss-free balancing

def test_bias_balancing_evens_a_skewed_load():
    torch.manual_seed(0)
    gate = TopKGate(16, 8, 2, noise=False).eval()
    with torch.no_grad():
        gate.gate_network.weight.normal_(0, 0.1)
        gate.gate_network.weight[0] += 0.1                                   # expert 0 is everyone's favourite
    x = torch.randn(512, 16) + 1.0
    before = routing_evenness(gate(x).counts)
    for _ in range(300):
        update_bias(gate, gate(x).counts, 0.01)
    after = routing_evenness(gate(x).counts)
    assert after[1] < before[1] and after[1] < 2.0 / 8, (before, after)     # busiest share falls near 1/8
    assert after[0] == 8
    # the bias changes the choice only: the scores are the softmax of the unbiased logits of the chosen ones
    g = gate(x)
    want = F.softmax(gate.gate_network(x).gather(1, g.expert_ids), dim=-1)
    torch.testing.assert_close(g.scores, want)


def test_bias_is_saved_and_loaded_with_the_model(tmp_path):
    dense = tiny_dense(0)
    moe = split_model(dense, SplitConfig(num_experts=4, top_k=2))
    moe.model.layers[1].mlp.gate.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
    checkpoint.save_pretrained(moe, tmp_path / "m")
    back = checkpoint.load_pretrained(tmp_path / "m")
    assert torch.equal(back.model.layers[1].mlp.gate.expert_bias, torch.tensor([0.5, -0.25, 0.0, 1.0]))
    with pytest.raises(ValueError, match="balancing bias"):                  # Mixtral has no router bias
        checkpoint.save_pretrained(moe, tmp_path / "mx", format="mixtral")
    assert not os.path.exists(tmp_path / "mx")
