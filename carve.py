"""
Chapter: carve.py - experts and routers from what the parent does on real text (beyond the paper).

split.py's four methods (SPEC.md section 2) group neurons by weights (random, clustering) or by gradients
(sharing). They all leave the router random, so the first tokens go to experts chosen by chance, and the
parent's knowledge has to be found again by continual pretraining. This chapter reads the parent's
activations on a little sample text instead, in the way of CMoE (Pei et al. 2025, arXiv 2502.04416) and
LLaMA-MoE v2 (Qu et al. 2024, arXiv 2411.15708):

  1. carve_layers    - run the dense parent over the sample one layer at a time; at each layer hand the FFN
                       inputs x (T, d) and activations a = silu(W_gate x) * W_up x (T, d_h) to the caller, who
                       plans the layer (experts, shared block, router); then move the hidden states on through
                       the MoE layer just planned, so the next layer is carved for the inputs it will really see.
  2. activation_experts - the construction (split.py --method=activation):
       - per token, mark the neurons with the largest |a| (the top `mark_ratio` of the width);
       - a neuron's activation rate = how often it is marked. The highest-rate neurons form the shared block,
         which every token uses (CMoE's shared experts);
       - the others are grouped by balanced k-means on their marks across tokens (neurons that fire on the
         same tokens go together), so each routed expert is a set of neurons that work as a team.
  3. expert_scores   - how much each expert would give each sample token: the norm of its output.
  4. router weights (split.py --router_init, for every construction):
       - "centroid": row j = the mean FFN input of the tokens that have expert j among their k best, minus the
         mean of all tokens (LLaMA-MoE v2 starts its router from centroids of hidden states);
       - "fit": the least-squares linear map from x to the k-hot target "these are my k best experts", solved
         in closed form (ridge regression, one (d, d) solve).
     Both are scaled so the logits have unit spread over the sample, so the training noise (std ~0.7 at
     the start, gate.py) perturbs the routing without drowning it.
  5. refit_down      - (ours) once the routing is fixed, W_down is refitted by ridge least squares so that the
                       shared and chosen neurons reproduce the dense layer's output as well as they can: the
                       neurons that stay take over part of the work of those a token no longer reaches.

Shapes: T sample tokens, d hidden, d_h dense FFN width, E routed experts, k chosen per token, d_e expert width.
Memory: the dense model plus one layer's sample - x and a for T tokens (at LLaMA-2 7B sizes and T = 16,384:
0.27 and 0.72 GB in fp32), the marks, and the refit's (d_h, d_h) system (0.5 GB) - whatever the depth: the
hidden states move on layer by layer, and each layer's dense FFN is freed as soon as its experts are cut.
"""
import torch
import torch.nn.functional as F

from model import rope_cos_sin


# ----------------------------------------------------------------------------------------------------------
# 1. Profiling, streamed layer by layer

@torch.no_grad()
def carve_layers(dense, tokens, plan_layer, top_k, weighting, scale, batch_size=4, propagate="moe", refit=False):
    """Run the dense model over tokens (n, S) one layer at a time and yield each layer's plan.

    plan_layer(layer, x (T, d), a (T, d_h)) -> (experts, shared or None, gate weight (E, d)): the caller
    decides the layer from its FFN inputs x and activations a (fp32). refit: W_down is refitted for that
    routing (refit_down) and yielded as the plan's fourth element (else None). The hidden states then move on to the
    next layer through the MoE layer just planned (propagate="moe": each layer is carved for the inputs it will
    really see, errors of earlier layers included) or through the dense FFN ("dense"). A layer's plan is
    yielded after its output is computed, so the caller may cut (and free) that FFN as soon as it receives it.
    The hidden states of all n sequences are kept between layers ((n, S, d)); attention runs a batch at a time."""
    device = dense.lm_head.weight.device
    n, S = tokens.shape
    cos, sin = rope_cos_sin(dense.inv_freq, torch.arange(S, device=device))  # (S, hd) each
    h = dense.model.embed_tokens(tokens.to(device))                          # (n, S, d)
    for layer, block in enumerate(dense.model.layers):
        mlp, xs, acts = block.mlp, [], []
        for i in range(0, n, batch_size):
            hb = h[i:i + batch_size]
            h[i:i + batch_size] = hb = hb + block.self_attn(block.input_layernorm(hb), cos, sin)  # (b, S, d)
            x = block.post_attention_layernorm(hb)                           # (b, S, d) the FFN's input
            xs.append(x.flatten(0, 1).float())
            acts.append((F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)).flatten(0, 1).float())  # (b*S, d_h)
        x, a = torch.cat(xs), torch.cat(acts)                                # (T, d), (T, d_h)
        experts, shared, gate_weight = plan_layer(layer, x, a)
        w_down = mlp.down_proj.weight.detach().float()                      # (d, d_h)
        nw = neuron_weights(x, a.shape[1], experts, shared, gate_weight, top_k, weighting, scale)  # (T, d_h)
        if refit:
            w_down = refit_down(a, nw, w_down)
        y = a @ w_down.T if propagate == "dense" else (a * nw) @ w_down.T   # (T, d)
        h += y.view_as(h).to(h.dtype)
        del xs, acts, x, a, nw, y
        yield experts, shared, gate_weight, (w_down if refit else None)


def neuron_weights(x, d_h, experts, shared, gate_weight, top_k, weighting, scale):
    """Per token, the weight the planned MoE layer gives each neuron's activation: the routing weight of the
    expert that holds it (0 when not chosen; model.py's weighting times s), 1 in the shared block.
    x (T, d) -> (T, d_h); the MoE layer's output is then (a * weights) @ W_down^T, a the dense activations.
    (A neuron in no expert weighs 0; one in two experts, as SharingInner allows, the sum of both weights.)"""
    logits = x @ gate_weight.T.float()                                       # (T, E)
    top, ids = logits.topk(top_k, dim=1)                                     # (T, k)
    w = torch.ones_like(top) if weighting == "unit" else F.softmax(top, dim=1)
    per_expert = torch.zeros_like(logits).scatter_(1, ids, w * scale)        # (T, E), 0 where not chosen
    n = torch.zeros(x.shape[0], d_h)
    for j, ix in enumerate(experts):
        n[:, ix] += per_expert[:, j:j + 1]
    if shared is not None:
        n[:, shared] = 1.0
    return n


def refit_down(a, n, w_down, ridge=1e-2):
    """Least-squares refit of W_down for the routing: the MoE layer passes a * n (only the chosen neurons) to
    W_down; choose W_down' = W_down + D so that (a * n) W_down'^T is as close as possible to the dense output
    a W_down^T on the sample, with a ridge term lam |D|^2 (lam = ridge x the mean diagonal of the Gram matrix):
        D^T = (A~^T A~ + lam I)^-1 A~^T (A - A~) W_down^T,    A~ = a * n   (T, d_h)
    The neurons that fire in place of the dropped experts take over part of their output; where nothing was
    dropped (n = 1) D is exactly 0. One (d_h, d_h) solve."""
    at = a * n                                                               # (T, d_h)
    gram = at.T @ at                                                         # (d_h, d_h)
    gram.diagonal().add_(ridge * gram.diagonal().mean().clamp(min=1e-12))
    rhs = at.T @ ((a - at) @ w_down.T)                                       # (d_h, d)
    return w_down + torch.linalg.solve(gram, rhs).T                          # (d, d_h)


# ----------------------------------------------------------------------------------------------------------
# 2. The construction: shared block by activation rate, routed experts by co-activation

COACTIVATION_TOKENS = 4096

def activation_marks(a, mark_ratio):
    """a (T, d_h) -> (T, d_h) bool: per token, the ceil(mark_ratio * d_h) neurons with the largest |a|."""
    m = max(1, int(round(mark_ratio * a.shape[1])))
    top = a.abs().topk(m, dim=1).indices                                     # (T, m)
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, top, True)


def activation_experts(a, num_experts, shared_size, mark_ratio=0.1, seed=0):
    """One layer's activations a (T, d_h) -> (shared (shared_size,), E sorted index tensors of
    (d_h - shared_size) / E neurons). Shared and routed together cover every neuron exactly once."""
    d_h = a.shape[1]
    marks = activation_marks(a, mark_ratio)                                  # (T, d_h)
    rate = marks.float().mean(0)                                             # (d_h,) activation rate
    order = rate.argsort(descending=True, stable=True)                      # most often marked first
    shared, rest = order[:shared_size].sort().values, order[shared_size:].sort().values
    # Co-activation: neuron i's vector is its marks over the T tokens, scaled to unit length, so that
    # k-means groups neurons by WHICH tokens they fire on, not by how often (a never-marked neuron is the
    # zero vector and lands wherever there is room).
    # At most COACTIVATION_TOKENS evenly spaced tokens: the k-means cost grows with the vector length, and
    # 4,096 tokens already tell co-firing neurons apart (the router and the refit use every token).
    step = -(-marks.shape[0] // COACTIVATION_TOKENS)                         # ceil(T / 4096)
    features = F.normalize(marks[::step, rest].T.float(), dim=1)            # (d_h - shared, <= 4096)
    from split import balanced_kmeans  # split.py's clustering (imported here: split.py imports this chapter)
    labels = balanced_kmeans(features, num_experts, seed)                   # (d_h - shared,)
    return shared, [rest[labels == j] for j in range(num_experts)]


# ----------------------------------------------------------------------------------------------------------
# 3. What each expert would give each token

def expert_scores(a, w_down, experts):
    """a (T, d_h) activations, w_down (d, d_h), E index tensors -> (T, E): the norm of each expert's output
    W_down[:, S_j] a[S_j] for every token (the 'oracle' router would pick the k largest)."""
    w = w_down.float()
    return torch.stack([(a[:, ix] @ w[:, ix].T).norm(dim=1) for ix in experts], dim=1)  # (T, E)


# ----------------------------------------------------------------------------------------------------------
# 4. Router weights from the data

def router_weights(x, scores, top_k, how, ridge=1e-3):
    """x (T, d) FFN inputs, scores (T, E) from expert_scores -> the linear gate's weight (E, d), fp32.

    Targets are each token's k best experts. "centroid": per expert the mean x of its tokens minus the mean
    of all x (the common part tells no expert apart). "fit": W = argmin |X W^T - Y|^2 + ridge * tr(X^T X)/d
    |W|^2 with Y the k-hot targets, one linear solve. Then scaled so the logits' std over the sample is 1."""
    T, E = scores.shape
    best = scores.topk(top_k, dim=1).indices                                 # (T, k)
    targets = torch.zeros(T, E).scatter_(1, best, 1.0)                       # (T, E) k-hot
    if how == "centroid":
        members = targets / targets.sum(0).clamp(min=1)                      # (T, E) each column averages
        w = members.T @ x - x.mean(0)                                        # (E, d)
    else:  # "fit": ridge regression, normal equations in float64 for a well-conditioned solve
        X = x.double()
        gram = X.T @ X                                                       # (d, d)
        reg = ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), X.T @ targets.double())
        w = w.T.float()                                                      # (E, d)
    logits = x @ w.T                                                         # (T, E)
    return w / logits.std().clamp(min=1e-12)
