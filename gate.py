"""
The noisy top-k gate: which k of the E experts each token goes to, and by how much (SPEC §3).

This is the gate of Shazeer et al. (2017), "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer" (arXiv 1701.06538, §2.1 and Appendix A), as LLaMA-MoE uses it:

    clean  = g(x)                                            # (T, E) router logits
    noisy  = clean + z * (softplus(W_noise x) + eps)         # training only, z ~ N(0, 1)
    ids    = top-k of noisy                                  # (T, k)
    scores = softmax over the k selected logits (fp32)       # (T, k), each row sums to 1

The MoE layer (model.py) then computes y = sum_j scores_j * s * E_j(x), with s the rescale factor N/k;
the factor is NOT applied here, so the scores stay a probability distribution over the chosen experts.

Training also needs the experts to be used evenly, or a few experts take every token and the others never
learn. Two per-batch statistics measure that, and the balance loss asks for both to be even:

    importance_j = sum over tokens of the score given to expert j           (differentiable)
    load_j       = expected number of tokens that keep j in their top k     (differentiable through the noise)
    balance_loss = w * (cv^2(importance) + cv^2(load))

A second way to balance needs no loss at all (loss-free balancing, DeepSeek-V3, Wang et al. 2024,
arXiv 2408.15664): a per-expert bias b is added to the logits for the top-k CHOICE only (never to the
scores), and after every optimizer step it moves by a fixed step gamma towards an even load:

    ids = top-k of (logits + b);   b_j += gamma * sign(mean load - load_j)      (update_bias below)

An overloaded expert is chosen a little less often at the next step, an idle one a little more, and the
gradient of the language-model loss is left alone. train.py's --balance picks loss, bias or both.

Read top to bottom: the output record, cv^2, the load estimate, the module, then loss-free balancing.
"""

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

GATE_TYPES = ("linear", "mlp")


class GateOutput(NamedTuple):
    expert_ids: torch.Tensor    # (T, k) int64, per token the chosen experts, best first
    scores: torch.Tensor        # (T, k) float32, softmax over the chosen logits; rows sum to 1
    balance_loss: torch.Tensor  # () float32, weight already applied
    importance: torch.Tensor    # (E,) float32, sum of scores per expert; sums to T
    load: torch.Tensor          # (E,) float32, expected tokens per expert (noisy training) or counts
    counts: torch.Tensor        # (E,) int64, tokens actually routed to each expert in this call


# -----------------------------------------------------------------------------
# cv^2: how uneven a distribution over experts is

def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, var / mean^2 (Shazeer et al. 2017, eq. 7).

    It is 0 for a perfectly even vector and grows as the mass piles on few experts; dividing by mean^2
    makes it independent of the batch size. The variance is the UNBIASED one (divide by E - 1), torch's
    default: that is what the paper's released code computes, and the fixture's eval.balance_loss is
    reproduced by it and not by the population variance (tests/test_gate.py pins this). With that
    convention a one-hot vector (every token on one expert) scores exactly E.
    eps keeps an all-zero vector (an empty batch) from dividing by zero.
    """
    x = x.float()                                # (E,)
    if x.numel() < 2:
        # One expert is trivially balanced, and the unbiased variance of one value is undefined (nan).
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


# -----------------------------------------------------------------------------
# The load estimate (Shazeer et al. 2017, Appendix A)
#
# Counting tokens per expert gives no gradient: a token either goes to an expert or not. With noise in the
# routing there is a smooth stand-in: the probability that token t keeps expert j in its top k if the noise
# on (t, j) alone were drawn again, the other noisy logits held as they are. Expert j stays in when its
# noisy logit beats the k-th largest of the OTHER experts' noisy logits:
#   - j is in the top k now   -> the k-th largest of the others is the (k+1)-th largest overall;
#   - j is out of the top k   -> the k-th largest of the others is the k-th largest overall.
# With threshold h, clean logit c and noise std sigma: P(c + sigma * z > h) = Phi((c - h) / sigma).

def normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) of the standard normal; erfc keeps the far left tail accurate."""
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


def top_k_mask(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, k) expert ids -> (T, E) bool, True where the expert is among the token's chosen ones."""
    mask = torch.zeros(expert_ids.shape[0], num_experts, dtype=torch.bool, device=expert_ids.device)
    return mask.scatter_(1, expert_ids, True)


def keep_probability(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                     in_top_k: torch.Tensor, k: int) -> torch.Tensor:
    """Per token and expert, P(expert stays in the token's top k under a fresh draw of its own noise).

    clean, noisy, noise_std: (T, E) float; in_top_k: (T, E) bool, the current routing. Returns (T, E).
    """
    num_experts = clean.shape[-1]
    if k >= num_experts:
        # Every expert is always chosen: the probability is exactly 1 (and there is no (k+1)-th logit).
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values       # (T, k+1), largest first
    threshold_if_in = top[:, k:k + 1]            # (T, 1) the (k+1)-th largest noisy logit
    threshold_if_out = top[:, k - 1:k]           # (T, 1) the k-th largest noisy logit
    prob_if_in = normal_cdf((clean - threshold_if_in) / noise_std)     # (T, E)
    prob_if_out = normal_cdf((clean - threshold_if_out) / noise_std)   # (T, E)
    # "Currently in the top k" is read from the routing itself, which is the noisy-logit comparison
    # noisy_j > threshold_if_in of Shazeer et al.; the released LLaMA-MoE code compares the noise term
    # alone instead (see tests/test_gate.py for where the two part).
    return torch.where(in_top_k, prob_if_in, prob_if_out)


def load_estimate(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                  in_top_k: torch.Tensor, k: int) -> torch.Tensor:
    """Expected tokens per expert, (T, E) -> (E,): the keep probabilities summed over the tokens."""
    return keep_probability(clean, noisy, noise_std, in_top_k, k).sum(0)


def balance_loss(importance: torch.Tensor, load: torch.Tensor, weight: float) -> torch.Tensor:
    """w * (cv^2(importance) + cv^2(load)) for one layer (SPEC §3); model.py sums it over the layers."""
    return weight * (cv_squared(importance) + cv_squared(load))


# -----------------------------------------------------------------------------
# The gate module

class TopKGate(nn.Module):
    """Noisy top-k router for one MoE layer.

    dim: token width d.  num_experts: E.  top_k: k, experts per token (1..E).
    gate_type: "linear" = Linear(d, E); "mlp" = Linear(d, E) -> tanh -> Linear(E, E), the network of the
        paper's release. No biases, as in the release (and as Mixtral's router, so a linear gate exports).
    noise: add the learned noise in training mode (never in eval mode).
    noise_eps: floor of the noise std (> 0); it also keeps the load estimate from dividing by zero.
    balance_loss_weight: w of the balance loss (0.01 in the paper).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, gate_type: str = "linear",
                 noise: bool = True, noise_eps: float = 0.01, balance_loss_weight: float = 0.01):
        super().__init__()
        # Settings are checked where the user gives them (ModelConfig); here they are invariants.
        assert 1 <= top_k <= num_experts and gate_type in GATE_TYPES and noise_eps > 0 and balance_loss_weight >= 0
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.gate_type, self.noise, self.noise_eps = gate_type, noise, noise_eps
        self.balance_loss_weight = balance_loss_weight

        if gate_type == "linear":
            self.gate_network = nn.Linear(dim, num_experts, bias=False)
        else:
            self.gate_network = nn.Sequential(
                nn.Linear(dim, num_experts, bias=False),
                nn.Tanh(),
                nn.Linear(num_experts, num_experts, bias=False),
            )
        # W_noise starts at zero, so every expert starts with the same noise std softplus(0) + eps ~ 0.70
        # and training learns where more or less exploration pays (Shazeer et al. 2017, §2.1).
        self.weight_noise = nn.Linear(dim, num_experts, bias=False)
        nn.init.zeros_(self.weight_noise.weight)
        self.weight_noise.weight.requires_grad_(noise)  # unused without noise (DDP refuses unused parameters)
        # Loss-free balancing's bias (E,): a buffer, not a parameter (no gradient; update_bias moves it). It is
        # saved with the model, so a resumed run and the exported model route exactly as the trained one.
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"gate_type={self.gate_type!r}, noise={self.noise}, noise_eps={self.noise_eps}, "
                f"balance_loss_weight={self.balance_loss_weight}")

    def noise_std(self, x: torch.Tensor) -> torch.Tensor:
        """(T, d) -> (T, E): softplus(W_noise x) + eps, the per-token, per-expert noise scale."""
        return F.softplus(self.weight_noise(x).float()) + self.noise_eps

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, E) fp32 logits -> expert_ids (T, k) int64, best first, and their scores (T, k) fp32.
        The bias steers the choice only; the scores are the unbiased logits of the chosen experts."""
        expert_ids = (logits + self.expert_bias.float()).topk(self.top_k, dim=-1).indices  # (T, k) int64
        return expert_ids, F.softmax(logits.gather(1, expert_ids), dim=-1)              # rows sum to 1

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode routing alone, (T, d) -> (expert_ids, scores): what forward() chooses without noise,
        minus the balance statistics. model.py's decoding path calls it once per layer and token."""
        return self.choose(self.gate_network(x).float())

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> GateOutput:
        """x: (T, d) tokens. noise: optional (T, E) standard-normal draws to use instead of fresh ones
        (to replay a recorded run); it is ignored whenever no noise is added (eval mode, or noise=False)."""
        assert x.dim() == 2 and x.shape[-1] == self.dim, "the MoE layer flattens (B, S, d) to (T, d)"
        T, E, k = x.shape[0], self.num_experts, self.top_k
        noisy_routing = self.training and self.noise

        # Routing decisions and the softmax are made in fp32 whatever the model dtype (SPEC §3): in bf16,
        # close logits tie and the scores lose precision.
        clean = self.gate_network(x).float()                           # (T, E)
        if noisy_routing:
            if noise is None:
                noise = torch.randn_like(clean)                        # (T, E) ~ N(0, 1)
            assert noise.shape == (T, E)
            std = self.noise_std(x)                                    # (T, E)
            logits = clean + noise.to(device=clean.device, dtype=torch.float32) * std
        else:
            logits = clean

        expert_ids, scores = self.choose(logits)                       # (T, k), (T, k)
        bias = self.expert_bias.float()                                # (E,)

        # importance_j = sum of the scores that went to j. Scattering into a dense (T, E) table and summing
        # over tokens keeps it differentiable and, unlike atomic index_add on a GPU, bit-for-bit repeatable.
        routed = clean.new_zeros(T, E).scatter(1, expert_ids, scores)  # (T, E), 0 where not chosen
        importance = routed.sum(0)                                     # (E,)
        chosen = top_k_mask(expert_ids, E)                             # (T, E) bool
        counts = chosen.sum(0)                                         # (E,) int64 (static shape: no graph break)
        if noisy_routing:
            load = load_estimate(clean + bias, logits + bias, std, chosen, k)  # (E,)
        else:
            # No noise, no smooth estimate: the counts, which carry no gradient (only importance does).
            load = counts.float()                                      # (E,)

        loss = balance_loss(importance, load, self.balance_loss_weight)
        return GateOutput(expert_ids, scores, loss, importance, load, counts)


# -----------------------------------------------------------------------------
# Loss-free balancing (DeepSeek-V3): the bias update, and how even a layer's routing is

@torch.no_grad()
def update_bias(gate: TopKGate, counts: torch.Tensor, rate: float) -> None:
    """After an optimizer step: counts (E,) tokens routed to each expert in that step (summed over ranks, so
    every rank makes the same move). Each expert's bias moves by `rate` up if it is below the mean load,
    down if above, not at all if exactly at it."""
    c = counts.float()
    gate.expert_bias += rate * torch.sign(c.mean() - c).to(gate.expert_bias)


def routing_evenness(counts: torch.Tensor, min_share: float = 0.01) -> tuple[int, float]:
    """counts (E,) -> (experts in use, busiest share): how many experts get at least `min_share` of the
    routed (token, expert) pairs, and the share of the busiest one. An even router over E experts gives
    (E, 1/E); a collapsed one that sends every token to the same k experts gives (k, 1/k)."""
    share = counts.double() / counts.sum().clamp(min=1)
    return int((share >= min_share).sum()), float(share.max())
