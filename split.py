"""
Chapter: split.py - turn a dense LLaMA into LLaMA-MoE (SPEC.md section 2).

Every SwiGLU feed-forward of the dense model, FFN(x) = W_down(silu(W_gate x) * W_up x), is cut into E experts.
Intermediate neuron i is the triple (row i of W_gate, row i of W_up, column i of W_down); expert j owns a set S_j
of neurons and is the FFN restricted to them:

    E_j(x) = W_down[:, S_j] (silu(W_gate[S_j] x) * W_up[S_j] x)

With disjoint S_j that cover every neuron, sum_j E_j(x) == FFN(x) exactly: nothing is lost by the cut itself,
only by routing each token to k of the E experts. A gate (gate.py, SPEC section 3) is added in front.

Read top to bottom:
  1. SplitConfig       - what to build, and the sizes that follow from it (expert width, shared block, scale).
  2. Choosing neurons  - IndependentRandom, IndependentClustering (balanced k-means), and upcycling.
  3. Importance        - sample text -> clusters -> first-order Taylor scores per neuron; SharingInner and
                         SharingInter choose neurons with them.
  4. build_moe         - slice the dense weights into an MoE Transformer (model.py), layer by layer.
  5. split_checkpoint  - the whole thing on a checkpoint folder, and the command line.

Shapes: d hidden, d_h dense intermediate size, E experts, k experts per token, d_e expert width,
C importance clusters (= E), B batch, S sequence length, T = B*S tokens.

Memory (section 4): the dense checkpoint is read once (model.py streams it onto a meta-initialised model);
each layer's expert tensors are gathered from the dense FFN, which is then dropped, so the split itself holds
about one model plus one layer's FFN (upcycling excepted: E copies of the FFN). Writing goes through
model.save_pretrained (temporary folder + rename), which adds what it needs to serialise the shards.
The sharing methods also run forward + backward passes over sample text first (section 3 says how much).
"""
import argparse
import os
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from model import Transformer, config_from_hf, export_config, read_config_json, set_tensor

METHODS = ("random", "clustering", "sharing_inner", "sharing_inter", "upcycle")
INDEPENDENT = ("random", "clustering")      # disjoint experts covering all neurons: width d_h / E
NEEDS_IMPORTANCE = ("sharing_inner", "sharing_inter")


# ----------------------------------------------------------------------------------------------------------
# 1. Config

@dataclass
class SplitConfig:
    num_experts: int = 16                 # E
    top_k: int = 4                        # k experts per token
    method: str = "random"                # one of METHODS
    seed: int = 0
    scale: float | None = None            # rescale factor s; None -> E/k (1 for upcycle); 1 turns it off
    expert_size: int | None = None        # d_e; None -> chosen so active params match k/E of the dense FFN
    shared_size: int | None = None        # SharingInter's always-on block; None -> one expert's worth d_h/E
    gate_type: str = "linear"             # "linear" | "mlp" (SPEC section 3)
    gate_std: float = 0.02                # std of the gate network's random normal init
    clustering_features: str = "up"       # IndependentClustering clusters rows of W_up (or W_gate)
    importance_seqs: int = 8              # sample sequences per cluster for the Taylor importance
    seq_len: int = 256                    # tokens per importance sequence
    batch_size: int = 4                   # sequences per forward+backward of the importance pass


def check_config(cfg, d_h):
    """Validate a SplitConfig against the dense intermediate size d_h; return (expert_size, shared_size, scale).

    Sizes (ours where the paper leaves them open): the active width of a token, shared + k * d_e, equals
    k/E of the dense FFN, k * d_h / E, so a split 4/16 of LLaMA-2 7B activates 2752 of 11008 neurons per layer.
      - random / clustering: d_e = d_h / E exactly (disjoint experts covering every neuron).
      - sharing_inner:       d_e = d_h // E, experts may overlap.
      - sharing_inter:       shared = d_h // E (one expert's worth), d_e = (k * d_h/E - shared) / k.
      - upcycle:             d_e = d_h (every expert a full copy; active width k * d_h, the baseline).
    """
    E, k, m = cfg.num_experts, cfg.top_k, cfg.method
    if m not in METHODS:
        raise ValueError(f"unknown method {m!r}: use one of {', '.join(METHODS)}")
    if E < 1:
        raise ValueError(f"num_experts must be >= 1, got {E}")
    if not 1 <= k <= E:
        raise ValueError(f"top_k {k} must be in 1..num_experts ({E}): each token picks k of the E experts")
    if cfg.gate_type not in ("linear", "mlp"):
        raise ValueError(f"gate {cfg.gate_type!r} is not supported: use 'linear' or 'mlp'")
    if cfg.clustering_features not in ("up", "gate"):
        raise ValueError(f"clustering_features {cfg.clustering_features!r}: use 'up' (W_up rows) or 'gate' (W_gate rows)")
    if cfg.shared_size and m != "sharing_inter":
        raise ValueError(f"--shared_size is for method sharing_inter only (got method {m!r})")
    shared = 0
    if m in INDEPENDENT:
        if d_h % E:
            ok = [n for n in range(2, min(d_h, 256) + 1) if d_h % n == 0]
            raise ValueError(f"intermediate_size {d_h} is not divisible by num_experts {E}: the independent methods "
                             f"give every expert d_h/E neurons. Expert counts that divide it (<= 256): {ok}")
        width = d_h // E
        if cfg.expert_size not in (None, width):
            raise ValueError(f"--expert_size {cfg.expert_size} does not fit method {m!r}: disjoint experts that "
                             f"cover all {d_h} neurons have exactly d_h/E = {width}; drop --expert_size")
    elif m == "upcycle":
        width = d_h
        if cfg.expert_size not in (None, d_h):
            raise ValueError(f"--expert_size does not apply to upcycle: every expert is the full FFN ({d_h})")
    elif m == "sharing_inner":
        width = cfg.expert_size or d_h // E
    else:  # sharing_inter
        shared = d_h // E if cfg.shared_size is None else cfg.shared_size
        width = cfg.expert_size if cfg.expert_size is not None else (k * (d_h // E) - shared) // k
        if width < 1 or shared < 1:
            raise ValueError(f"sharing_inter needs shared_size >= 1 and expert_size >= 1 (got {shared} and {width}); "
                             f"with top_k 1 the default leaves no room for routed experts: pass both sizes")
        if shared + E * width > d_h:
            raise ValueError(f"sharing_inter: shared_size {shared} + num_experts {E} x expert_size {width} = "
                             f"{shared + E * width} exceeds the {d_h} neurons (routed experts are disjoint "
                             f"from each other and from the shared block): make them smaller")
    if not 1 <= width <= d_h:
        raise ValueError(f"expert_size {width} must be in 1..intermediate_size ({d_h})")
    # SPEC section 2: the k chosen experts hold only k/E of the neurons, so the layer's output shrinks; the paper
    # multiplies the routed outputs by s = E/k (its default; its ablation finds that better than s = 1). Note the
    # arithmetic: scores sum to 1, so with scores ~1/k the weighted sum of k experts is ~1/E of the FFN and E/k
    # brings it to ~1/k of it, not all the way. Upcycled experts are each the full FFN, so their weighted sum
    # already is the FFN: s = 1 is their default.
    scale = cfg.scale if cfg.scale is not None else (1.0 if m == "upcycle" else E / k)
    if not scale > 0:
        raise ValueError(f"scale must be > 0 (1 turns rescaling off), got {scale}")
    return width, shared, float(scale)


# ----------------------------------------------------------------------------------------------------------
# 2. Choosing the neurons of each expert: the independent methods

def split_random(d_h, E, seed=0):
    """IndependentRandom (the paper's best): d_h/E labels per expert, shuffled, so every neuron lands in
    exactly one expert. -> E index tensors of d_h/E neurons each (sorted: expert order follows the dense order)."""
    if d_h % E:
        raise ValueError(f"{d_h} neurons do not split into {E} equal experts")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(E).repeat_interleave(d_h // E)[torch.randperm(d_h, generator=g)]  # (d_h,)
    return [torch.nonzero(labels == j).squeeze(1) for j in range(E)]


def balanced_assign(cost, capacity):
    """Assign P points to C bins, at most `capacity` per bin, lowest cost first. cost: (P, C) -> (P,) int64 bin
    per point, -1 for points left over when P > C * capacity.

    The rule is the greedy one: walk all (point, bin) pairs by increasing cost and take a pair when the point is
    free and the bin has room. We compute the same answer (for distinct costs it is the unique stable matching)
    without a Python loop over P*C pairs: every free point proposes to its best bin not yet tried, every bin keeps
    its `capacity` cheapest proposers and sends the rest back, until nobody is sent back."""
    P, C = cost.shape
    order = cost.argsort(dim=1, stable=True)                 # (P, C) each point's bins, best first
    tried = torch.zeros(P, dtype=torch.long)                 # how many bins each point has proposed to
    owner = torch.full((P,), -1, dtype=torch.long)           # (P,) current bin, -1 = free
    free = torch.arange(P)
    while True:
        free = free[tried[free] < C]                         # a point refused by every bin stays out
        if free.numel() == 0:
            return owner
        owner[free] = order[free, tried[free]]
        tried[free] += 1
        bounced = []
        for c in owner[free].unique().tolist():              # only bins that received proposals can overflow
            members = torch.nonzero(owner == c).squeeze(1)
            if members.numel() > capacity:
                worst = cost[members, c].argsort(stable=True)[capacity:]
                bounced.append(members[worst])
        if not bounced:
            return owner
        free = torch.cat(bounced)
        owner[free] = -1


def balanced_kmeans(X, C, seed=0, iters=50):
    """k-means with exactly equal clusters: X (P, dim) -> labels (P,) in 0..C-1, each used P/C times.
    k-means++ start; each step assigns with the capacity-P/C greedy above, then moves centroids to their means."""
    P = X.shape[0]
    if P % C:
        raise ValueError(f"{P} points do not split into {C} equal clusters")
    X = X.float()
    g = torch.Generator().manual_seed(seed)
    # k-means++: the first centroid at random, then each next one drawn with probability ~ squared distance to
    # the nearest centroid so far, so the start already spreads over the groups.
    sq = X.pow(2).sum(1, keepdim=True)                                        # (P, 1)

    def sq_dist(centroids):  # (P, C) as one matmul, |x|^2 - 2 x.c + |c|^2 (torch.cdist is slower on CPU)
        return (sq - 2 * X @ centroids.T + centroids.pow(2).sum(1)).clamp_min(0)

    centroids = X[torch.randint(P, (1,), generator=g)]                        # (1, dim)
    for _ in range(C - 1):
        d2 = sq_dist(centroids).min(dim=1).values                             # (P,)
        pick = torch.multinomial(d2 + 1e-12, 1, generator=g)
        centroids = torch.cat([centroids, X[pick]])
    labels = None
    for _ in range(iters):
        new = balanced_assign(sq_dist(centroids), P // C)                     # (P,)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros(C, X.shape[1]).index_add_(0, labels, X) / (P // C)  # (C, dim) cluster means
    return labels


def split_clustering(W, E, seed=0):
    """IndependentClustering: one vector per neuron, its row of W (d_h, d) (W_up, or W_gate as an option), scaled
    to unit length so that clusters group directions, not magnitudes; balanced k-means into E clusters of exactly
    d_h/E neurons. -> E sorted index tensors."""
    X = F.normalize(W.float(), dim=1)                                         # (d_h, d) unit rows
    labels = balanced_kmeans(X, E, seed)
    return [torch.nonzero(labels == j).squeeze(1) for j in range(E)]


def split_upcycle(d_h, E):
    """Sparse upcycling (the baseline): every expert is a full copy of the FFN. Note the size: E copies of every
    FFN (LLaMA-2 7B, 16 experts: ~140 GB in bf16), so this is for small models and comparisons."""
    return [torch.arange(d_h) for _ in range(E)]


# ----------------------------------------------------------------------------------------------------------
# 3. Importance: which neurons matter for which kind of text (SPEC section 2, for the sharing methods)
#
# Sample text is split into E clusters; for each cluster we run forward + backward on the dense model and score
# neuron i of every layer by the first-order Taylor estimate of the loss change when it is removed:
#     importance_i = mean over the cluster's tokens of |a_i * dL/da_i|,   a = silu(W_gate x) * (W_up x)
# a is exactly the input of W_down, so a forward pre-hook on down_proj sees it. L is the mean next-token loss
# of the batch (what training minimises), so every token's gradient carries the batch's 1/T.

def sample_sequences(data, n, seq_len, seed=0, tokenizer=None):
    """n windows of seq_len + 1 tokens from `data` -> (tokens (n, seq_len+1) int64, domain (n,) int64 or None).

    data: a shard folder (data/prepare.py's format; windows drawn at random from each domain's *train* split,
    n/#domains each, so held-out validation text stays unseen) or a text file (tokenised with `tokenizer`,
    cut into consecutive windows)."""
    rng = np.random.default_rng(seed)
    if os.path.isdir(data):
        from sample import load_shards
        shards = load_shards(data, "train")                                   # {domain: memmap}
        rows, domains = [], []
        for di, tokens in enumerate(shards.values()):
            if len(tokens) <= seq_len:
                raise ValueError(f"{data}: domain {list(shards)[di]!r} has {len(tokens)} train tokens, fewer "
                                 f"than seq_len+1 = {seq_len + 1}: lower --seq_len")
            count = n // len(shards) + (di < n % len(shards))
            for s in rng.integers(0, len(tokens) - seq_len, size=count):
                rows.append(np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64))
                domains.append(di)
        return torch.from_numpy(np.stack(rows)), torch.tensor(domains)
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data!r} is neither a shard folder nor a text file")
    if tokenizer is None:
        raise ValueError("a text file needs a tokenizer: pass --tokenizer (default: tokenizer.model in --src)")
    from tokenizer import Tokenizer
    with open(data, encoding="utf-8") as f:
        ids = Tokenizer(tokenizer).encode(f.read(), bos=True, eos=True)
    have = (len(ids) - 1) // seq_len
    if have < n:
        raise ValueError(f"{data}: {len(ids)} tokens make {have} windows of {seq_len + 1}, need {n}: give more "
                         f"text, or lower --seq_len / --importance_seqs")
    tokens = torch.tensor(ids[:n * seq_len + 1])
    return torch.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]), None


@torch.no_grad()
def mean_hidden_states(model, tokens, batch_size=4):
    """(n, S+1) tokens -> (n, d): each sequence's final (normed) hidden state averaged over positions."""
    out = []
    hook = model.model.norm.register_forward_hook(lambda mod, args, y: out.append(y.float().mean(1)))
    try:
        for i in range(0, tokens.size(0), batch_size):
            model(tokens[i:i + batch_size, :-1].to(model.lm_head.weight.device))
    finally:
        hook.remove()
    return torch.cat(out).cpu()


def importance_clusters(model, tokens, domains, C, seed=0, batch_size=4):
    """Group sample sequences into C clusters of text (ours, the paper clusters by topic):
      - by domain when the data has at least C domains (domain i joins cluster i mod C);
      - otherwise balanced k-means on the mean hidden states, so each cluster is a kind of text the model itself
        tells apart, and each gets the same number of sequences (with fewer domains than experts, repeating
        domains would give identical clusters, hence identical experts for SharingInner).
    -> C index tensors into the rows of `tokens`."""
    if domains is not None and int(domains.max()) + 1 >= C:
        return [torch.nonzero(domains % C == c).squeeze(1) for c in range(C)]
    labels = balanced_kmeans(F.normalize(mean_hidden_states(model, tokens, batch_size), dim=1), C, seed)
    return [torch.nonzero(labels == c).squeeze(1) for c in range(C)]


def taylor_importance(model, batches_per_cluster):
    """Per layer a (C, d_h) float32 tensor: mean over cluster c's tokens of |a_i * dL/da_i| (see above).

    batches_per_cluster: C lists of token batches (B, S+1) int64 (inputs and shifted targets in one).
    One forward + backward per batch over the whole dense model. The weights get no gradient (no weight-gradient
    memory): instead the embedding output is made a leaf that requires grad, so autograd still reaches every a.
    A pre-hook on each down_proj registers a tensor hook on its input a; during backward that hook receives
    dL/da and adds |a * dL/da| summed over tokens to the layer's scores, so no gradient is kept around.
    (a must not be detached: dL/da of layer l flows through the FFNs of every later layer.)
    Memory: the model + one batch's activations saved for backward, 0.14 MB per token per layer at LLaMA-2 7B
    sizes in bf16 (measured): the default batch of 4 x 256 tokens adds ~4.6 GB to the 13.5 GB model."""
    layers = model.model.layers
    C = len(batches_per_cluster)
    scores = [torch.zeros(C, b.mlp.down_proj.in_features) for b in layers]   # L x (C, d_h)
    cluster = [0]                                                              # the cluster being scored

    def make_hook(layer):
        def accumulate(a, grad):                                               # a, grad: (B, S, d_h)
            scores[layer][cluster[0]] += (a.detach().float() * grad.float()).abs().sum(dim=(0, 1)).cpu()

        def hook(module, args):
            a = args[0]
            a.register_hook(lambda grad: accumulate(a, grad))
        return hook

    hooks = [b.mlp.down_proj.register_forward_pre_hook(make_hook(i)) for i, b in enumerate(layers)]
    hooks.append(model.model.embed_tokens.register_forward_hook(
        lambda module, args, y: y.detach().requires_grad_(True)))               # (B, S, d) leaf
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    try:
        for c, batches in enumerate(batches_per_cluster):
            cluster[0], n_tokens = c, 0
            for batch in batches:
                batch = batch.to(device)
                with torch.enable_grad():
                    _, loss = model(batch[:, :-1], targets=batch[:, 1:])
                    loss.backward()
                n_tokens += batch[:, 1:].numel()
            if n_tokens == 0:
                raise ValueError(f"importance cluster {c} has no text: give more sample data")
            for s in scores:
                s[c] /= n_tokens
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)
    return scores


def split_sharing_inner(importance, m):
    """SharingInner: expert j = the top-m neurons by cluster j's importance. importance (E, d_h) -> E sorted
    index tensors of m neurons; experts may overlap, so broadly important neurons end up in several experts."""
    return [row.topk(m).indices.sort().values for row in importance]


def split_sharing_inter(importance, shared_size, expert_size):
    """SharingInter: importance (E, d_h) -> (shared (shared_size,), E routed index tensors of expert_size).

    The shared block (always on) takes the neurons most experts want, as in the paper's release: count how many
    experts' top-expert_size sets pick each neuron; the most-picked join the shared block (ties: the larger
    summed importance first, ours); they are removed and the counts redone on what is left, until the block is
    full. The remaining neurons go to routed experts greedily by importance (the best (expert, neuron) pair
    first), disjoint from each other and from the shared block."""
    E, d_h = importance.shape
    imp = importance.float()
    if shared_size + E * expert_size > d_h:
        raise ValueError(f"shared_size {shared_size} + {E} x expert_size {expert_size} exceeds {d_h} neurons")
    total = imp.sum(0)                                                        # (d_h,) tie-breaker
    taken = torch.zeros(d_h, dtype=torch.bool)
    shared = []
    while len(shared) < shared_size:
        masked = imp.masked_fill(taken, float("-inf"))                        # (E, d_h) remaining neurons only
        top = masked.topk(min(expert_size, int((~taken).sum())), dim=1).indices
        count = torch.bincount(top.flatten(), minlength=d_h)                  # (d_h,) experts picking each neuron
        best = int(count.max())
        cand = torch.nonzero(count == best).squeeze(1)
        cand = cand[total[cand].argsort(descending=True, stable=True)][:shared_size - len(shared)]
        shared += cand.tolist()
        taken[cand] = True
    shared = torch.tensor(sorted(shared), dtype=torch.long)
    # Routed experts: the greedy balanced assignment of section 2, on -importance, over the neurons left.
    rest = torch.nonzero(~taken).squeeze(1)                                   # (d_h - shared,)
    owner = balanced_assign(-imp[:, rest].T, expert_size)                    # (d_h - shared,) expert or -1
    return shared, [rest[owner == j] for j in range(E)]


# ----------------------------------------------------------------------------------------------------------
# 4. Building the MoE model from the dense one

def moe_config(dense_config, num_experts, top_k, expert_size, shared_size, scale, gate_type):
    """The dense ModelConfig plus the MoE fields (model.py); intermediate_size keeps the dense width."""
    return replace(dense_config, num_experts=num_experts, num_experts_per_tok=top_k,
                   expert_intermediate_size=expert_size, shared_intermediate_size=shared_size,
                   score_scale=scale, gate_type=gate_type)


def build_moe(dense, expert_indices, shared_indices, num_experts, top_k, scale, gate_type="linear", seed=0,
              gate_std=0.02, free_dense=False):
    """Slice a dense Transformer into an MoE Transformer.

    expert_indices: per layer, E index tensors of equal length d_e (expert j of layer L = those neurons).
    shared_indices: per layer an index tensor (the always-on block) or None.
    The MoE model is built on the meta device (shapes only) and its tensors assigned one by one: attention,
    norms and embeddings are the dense tensors themselves (moved when free_dense, copied otherwise), each
    expert stack is gathered from the dense FFN, and with free_dense the dense FFN is dropped right after, so
    memory stays at about one model (the dense model is unusable afterwards). Gate init (SPEC section 3): the
    gate network random normal with std gate_std (small, so the first routing is close to uniform), the noise
    projection zero. Returned in eval mode, like Transformer.from_pretrained."""
    L = dense.config.num_hidden_layers
    if len(expert_indices) != L:
        raise ValueError(f"expert_indices has {len(expert_indices)} layers, the model {L}")
    widths = {len(ix) for layer in expert_indices for ix in layer}
    if len(widths) != 1 or any(len(layer) != num_experts for layer in expert_indices):
        raise ValueError(f"every layer needs {num_experts} experts of one width, got widths {sorted(widths)}")
    shared_sizes = {0 if s is None else len(s) for s in (shared_indices or [None] * L)}
    if len(shared_sizes) != 1:
        raise ValueError(f"the shared block must have one size in every layer, got {sorted(shared_sizes)}")
    config = moe_config(dense.config, num_experts, top_k, widths.pop(), shared_sizes.pop(), scale, gate_type)
    with torch.device("meta"):
        moe = Transformer(config)

    def take(t):
        return t.detach() if free_dense else t.detach().clone()

    for name, p in dense.named_parameters():   # a tied lm_head is the embedding and listed once
        if ".mlp." not in name:
            set_tensor(moe, name, take(p))
    if config.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    moe.inv_freq = dense.inv_freq.clone()
    g = torch.Generator().manual_seed(seed)
    for layer in range(L):
        ffn = dense.model.layers[layer].mlp
        wg, wu, wd = ffn.gate_proj.weight.detach(), ffn.up_proj.weight.detach(), ffn.down_proj.weight.detach()
        ix = torch.stack(list(expert_indices[layer])).to(wg.device)          # (E, d_e)
        head = f"model.layers.{layer}.mlp"
        set_tensor(moe, f"{head}.experts.gate_proj", wg[ix])                 # (d_h, d)[(E, d_e)] -> (E, d_e, d)
        set_tensor(moe, f"{head}.experts.up_proj", wu[ix])                   # (E, d_e, d)
        set_tensor(moe, f"{head}.experts.down_proj", wd[:, ix].permute(1, 0, 2).contiguous())  # (d, E, d_e) -> (E, d, d_e)
        if shared_indices is not None and shared_indices[layer] is not None:
            s = shared_indices[layer].to(wg.device)                           # (shared,)
            set_tensor(moe, f"{head}.shared.gate_proj.weight", wg[s])
            set_tensor(moe, f"{head}.shared.up_proj.weight", wu[s])
            set_tensor(moe, f"{head}.shared.down_proj.weight", wd[:, s].contiguous())
        for pname, p in moe.model.layers[layer].mlp.gate.named_parameters():
            if pname.startswith("weight_noise"):
                t = torch.zeros(p.shape)
            else:
                t = torch.randn(p.shape, generator=g) * gate_std
            set_tensor(moe, f"{head}.gate.{pname}", t.to(device=wg.device, dtype=wg.dtype))
        if free_dense:
            dense.model.layers[layer].mlp = None  # drop this layer's dense FFN now: peak stays ~1 model
        del ffn, wg, wu, wd
    left = [n for n, p in moe.named_parameters() if p.is_meta]
    assert not left, f"build_moe left tensors unset: {left[:3]}"
    return moe.eval()


# ----------------------------------------------------------------------------------------------------------
# 5. The whole split

def choose_experts(dense, cfg, importance=None):
    """Per layer the E expert index tensors and the shared block (or None), by cfg.method.
    importance: per layer (E, d_h) Taylor scores (taylor_importance), needed by the sharing methods."""
    d_h = dense.config.intermediate_size
    width, shared_size, _ = check_config(cfg, d_h)
    E, experts, shared = cfg.num_experts, [], []
    if cfg.method in NEEDS_IMPORTANCE and importance is None:
        raise ValueError(f"method {cfg.method!r} ranks neurons by importance on sample text: pass --data "
                         f"(a shard folder or a text file)")
    for layer, block in enumerate(dense.model.layers):
        # A different seed per layer: the same permutation everywhere would be an arbitrary coupling of layers.
        seed = cfg.seed * 1000 + layer
        if cfg.method == "random":
            experts.append(split_random(d_h, E, seed))
        elif cfg.method == "clustering":
            W = (block.mlp.up_proj if cfg.clustering_features == "up" else block.mlp.gate_proj).weight.detach()
            experts.append(split_clustering(W, E, seed))
        elif cfg.method == "upcycle":
            experts.append(split_upcycle(d_h, E))
        elif cfg.method == "sharing_inner":
            experts.append(split_sharing_inner(importance[layer], width))
        else:
            s, routed = split_sharing_inter(importance[layer], shared_size, width)
            experts.append(routed)
            shared.append(s)
    return experts, (shared or None)


def importance_batches(dense, cfg, data, tokenizer=None):
    """Sample text -> E clusters of token batches, the input of taylor_importance."""
    E = cfg.num_experts
    n = E * cfg.importance_seqs
    tokens, domains = sample_sequences(data, n, cfg.seq_len, cfg.seed, tokenizer)
    if int(tokens.max()) >= dense.config.vocab_size:
        raise ValueError(f"{data}: token id {int(tokens.max())} >= the model's vocab_size "
                         f"{dense.config.vocab_size}: the data was tokenised for another model")
    clusters = importance_clusters(dense, tokens, domains, E, cfg.seed, cfg.batch_size)
    return [[tokens[ix[i:i + cfg.batch_size]] for i in range(0, len(ix), cfg.batch_size)] for ix in clusters]


def split_model(dense, cfg, data=None, tokenizer=None, free_dense=False):
    """Dense Transformer -> MoE Transformer by cfg (SplitConfig). data: sample text for the sharing methods."""
    if dense.config.is_moe:
        raise ValueError("the source is already an MoE model: split.py cuts a dense LLaMA")
    width, shared_size, scale = check_config(cfg, dense.config.intermediate_size)
    importance = None
    if cfg.method in NEEDS_IMPORTANCE:
        if data is None:
            raise ValueError(f"method {cfg.method!r} ranks neurons by importance on sample text: pass --data "
                             f"(a shard folder or a text file)")
        importance = taylor_importance(dense, importance_batches(dense, cfg, data, tokenizer))
    experts, shared = choose_experts(dense, cfg, importance)
    return build_moe(dense, experts, shared, cfg.num_experts, cfg.top_k, scale, cfg.gate_type, cfg.seed,
                     cfg.gate_std, free_dense=free_dense)


def check_source(src):
    """The source must be a dense LLaMA checkpoint folder; say what it is otherwise."""
    raw = read_config_json(src)
    if raw.get("model_type") != "llama":
        raise ValueError(f"{src} is a {raw.get('model_type')!r} checkpoint: split.py needs a dense LLaMA "
                         f"(model_type 'llama'); an MoE model is split already")
    return raw


def split_checkpoint(src, dst, cfg, format="native", data=None, tokenizer=None, overwrite=False, device=None):
    """Read a dense LLaMA folder, split it, write the MoE checkpoint to dst (atomically). Returns the model."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("--dst must differ from --src (the dense checkpoint is the input)")
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists: pass --overwrite to replace it, or choose another --dst")
    raw = check_source(src)
    d_h = raw.get("intermediate_size")
    if not isinstance(d_h, int):
        raise ValueError(f"{src}/config.json has no integer intermediate_size")
    width, shared_size, scale = check_config(cfg, d_h)
    if cfg.method in NEEDS_IMPORTANCE and data is None:
        raise ValueError(f"method {cfg.method!r} ranks neurons by importance on sample text: pass --data "
                         f"(a shard folder or a text file)")
    # Ask model.py now whether the format can hold this model (Mixtral: linear gate, no shared block), on a
    # meta-device model that costs nothing, instead of failing after the whole split.
    probe_cfg = moe_config(config_from_hf(raw, src), cfg.num_experts, cfg.top_k, width, shared_size, scale,
                           cfg.gate_type)
    with torch.device("meta"):
        export_config(Transformer(probe_cfg), format)
    if data is not None and cfg.method in NEEDS_IMPORTANCE and not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r} does not exist (a shard folder or a text file)")
    if tokenizer is None and data is not None and os.path.isfile(data):
        tokenizer = os.path.join(src, "tokenizer.model")
    dense = Transformer.from_pretrained(src, device=device)
    moe = split_model(dense, cfg, data, tokenizer, free_dense=True)
    del dense
    moe.save_pretrained(dst, format=format)
    return moe


def main(argv=None):
    p = argparse.ArgumentParser(description="Build LLaMA-MoE from a dense LLaMA checkpoint (SPEC.md section 2).")
    p.add_argument("--src", required=True, help="dense LLaMA folder (config.json + safetensors)")
    p.add_argument("--dst", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--num_experts", type=int, default=16)
    p.add_argument("--top_k", type=int, default=4)
    p.add_argument("--method", default="random", choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=None, help="rescale factor; default E/k (upcycle: 1); 1 = off")
    p.add_argument("--expert_size", type=int, default=None, help="expert width d_e (sharing methods)")
    p.add_argument("--shared_size", type=int, default=None, help="shared block width (sharing_inter)")
    p.add_argument("--data", default=None, help="sample text for importance: shard folder or text file")
    p.add_argument("--tokenizer", default=None, help="for a text --data; default SRC/tokenizer.model")
    p.add_argument("--importance_seqs", type=int, default=8, help="sample sequences per cluster")
    p.add_argument("--seq_len", type=int, default=256, help="tokens per importance sequence")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per importance forward+backward")
    p.add_argument("--gate", default="linear", choices=("linear", "mlp"))
    p.add_argument("--clustering_features", default="up", choices=("up", "gate"))
    p.add_argument("--format", default="native", choices=("native", "mixtral", "llama_moe"))
    p.add_argument("--device", default=None, help="where to run (default cpu; importance is faster on cuda)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    cfg = SplitConfig(num_experts=a.num_experts, top_k=a.top_k, method=a.method, seed=a.seed, scale=a.scale,
                      expert_size=a.expert_size, shared_size=a.shared_size, gate_type=a.gate,
                      clustering_features=a.clustering_features, importance_seqs=a.importance_seqs,
                      seq_len=a.seq_len, batch_size=a.batch_size)
    moe = split_checkpoint(a.src, a.dst, cfg, a.format, a.data, a.tokenizer, a.overwrite, a.device)
    c = moe.config
    print(f"wrote {a.dst} ({a.format}): {c.num_hidden_layers} layers x {c.num_experts} experts of "
          f"{c.expert_intermediate_size} neurons, top-{c.num_experts_per_tok}, shared {c.shared_intermediate_size}, "
          f"scale {c.score_scale}, {c.gate_type} gate")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: the message, not a traceback
        raise SystemExit(f"split.py: error: {e}")
