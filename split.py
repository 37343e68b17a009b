"""
Chapter: split.py - turn a dense LLaMA into LLaMA-MoE (SPEC.md section 2).

Every SwiGLU feed-forward of the dense model, FFN(x) = W_down(silu(W_gate x) * W_up x), is cut into E experts.
Intermediate neuron i is the triple (row i of W_gate, row i of W_up, column i of W_down); expert j owns a set S_j
of neurons and is the FFN restricted to them:

    E_j(x) = W_down[:, S_j] (silu(W_gate[S_j] x) * W_up[S_j] x)

With disjoint S_j that cover every neuron, sum_j E_j(x) == FFN(x) exactly: nothing is lost by the cut itself,
only by routing each token to k of the E experts. A gate (gate.py, SPEC section 3) is added in front.

    python split.py --src=llama-2-7b-hf --dst=llama-moe-4of16 --num_experts=16 --top_k=4 --method=random
    python split.py --src=SmolLM2-135M-Instruct.Q4_1.gguf --dst=out/moe --num_experts=16 --top_k=4 --overwrite
    python split.py --src=SmolLM2-135M-Instruct.Q4_1.gguf --dst=out/moe.gguf --format=gguf --gguf_type=q8_0

The output carries the source's tokenizer (a folder: tokenizer.json ...; a GGUF: inside), so transformers,
llama.cpp and its converter take it as it is.

Read top to bottom:
  1. SplitConfig, check_split - the settings, validated once, and the sizes that follow (expert width d_e,
                               shared block, rescale factor s).
  2. Choosing neurons        - IndependentRandom, IndependentClustering (balanced k-means), and upcycling.
  3. Importance              - sample text -> clusters -> first-order Taylor scores per neuron; SharingInner and
                               SharingInter choose neurons with them.
  4. build_moe               - slice the dense weights into an MoE Transformer (model.py), layer by layer.
  5. The whole split         - split_model (in memory), split_checkpoint and the command line.

Shapes: d hidden, d_h dense intermediate size, E experts, k experts per token, d_e expert width,
C importance clusters (= E), B batch, S sequence length, T = B*S tokens.

Memory: about one model. The source is read one tensor at a time into memory of its own (checkpoint.py's
own_memory=True); each layer's experts are gathered from the dense FFN, which is dropped right after, so the split
holds one model plus one layer's FFN (upcycling excepted: E copies of every FFN). Measured on a 1.25 GiB bf16
checkpoint, 16/4 random: a peak RSS of 1.7 GiB up to the save, 0.3 GiB of it Python and torch; writing adds only
what save_pretrained copies. The sharing methods first run forward + backward passes over sample text (section 3).
"""
import os
import resource
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

import carve
import checkpoint
from checkpoint import MODEL_FILES
from configurator import check_ranges, load_config, need, run_cli, setting, user_input
from fileio import check_output_dir, check_output_file
from gate import GATE_TYPES
from gguf_file import GGUF_TYPES, gguf_arch
from gguf_tokenizer import tokenizer_metadata
from model import EXPERT_WEIGHTINGS, Transformer
from sample import load_meta, sample_sequences
from tokenizer import check_same_tokenizer

METHODS = ("random", "clustering", "sharing_inner", "sharing_inter", "upcycle", "activation")
INDEPENDENT = ("random", "clustering")      # disjoint experts covering all neurons: width d_h / E
NEEDS_IMPORTANCE = ("sharing_inner", "sharing_inter")
ROUTER_INITS = ("random", "centroid", "fit")  # the paper's random gate, or carve.py's two from the data
FORMATS = ("native", "mixtral", "llama_moe", "gguf")


# ----------------------------------------------------------------------------------------------------------
# 1. Settings, checked once where a split starts (split_model, the command line); everything below assumes them

@dataclass
class SplitConfig:
    src: str = ""                         # dense LLaMA: checkpoint folder (config.json + safetensors) or .gguf
    dst: str = ""                         # output folder, written atomically
    overwrite: bool = False               # replace an existing dst
    format: str = setting("native", choices=FORMATS)  # checkpoint.py's formats for MoE models; gguf: one file
    gguf_type: str = setting("auto", choices=GGUF_TYPES + ("auto",))  # --format=gguf; auto: the source's dtype
    num_experts: int = setting(16, ge=1)  # E
    top_k: int = setting(4, ge=1)         # k experts per token, <= E
    method: str = setting("random", choices=METHODS)
    seed: int = 0
    scale: float | None = setting(None, gt=0)  # rescale factor s; None -> E/k (1 for upcycle, activation); 1 = off
    # None -> unit for activation, else softmax
    expert_weighting: str | None = setting(None, choices=EXPERT_WEIGHTINGS)
    expert_size: int | None = setting(None, ge=1)  # d_e; None -> chosen so active params match k/E of the dense FFN
    shared_size: int | None = setting(None, ge=0)  # always-on block (sharing_inter, activation); None -> see check_split
    gate_type: str = setting("linear", choices=GATE_TYPES)  # SPEC section 3
    gate_std: float = setting(0.02, gt=0)  # std of the gate network's random normal init (router_init=random)
    gate_noise: bool = True               # noisy top-k in training (SPEC section 3); False: clean routing always
    router_init: str = setting("random", choices=ROUTER_INITS)  # centroid and fit profile --data (carve.py)
    mark_ratio: float = setting(0.1, gt=0, le=1)  # activation: share of the width marked active per token
    profile_seqs: int = setting(64, ge=1)  # activation / router_init: sample sequences profiled (x seq_len tokens)
    propagate: str = setting("moe", choices=("moe", "dense"))  # carving: hidden states move on through the new MoE layers, or "dense"
    refit_down: bool | None = None        # carving: refit W_down for the routing (carve.py); None -> activation only
    clustering_features: str = setting("up", choices=("up", "gate"))  # IndependentClustering clusters rows of W_up (or W_gate)
    data: str | None = None               # sample text (sharing, activation, router_init): shards or a text file
    tokenizer: str | None = None          # for a text --data; None -> the source's own tokenizer (--src)
    importance_seqs: int = setting(8, ge=1)  # sample sequences per cluster for the Taylor importance
    seq_len: int = setting(256, ge=1)     # tokens per importance sequence
    batch_size: int = setting(1, ge=1)    # sequences per forward+backward of the importance pass (memory: see
                                          # taylor_importance; SmolLM2: 1.56 GiB peak at 1, 3.28 at 4)
    device: str | None = setting(None, choices=("cpu", "cuda"))  # where to run (default cpu; importance is faster on cuda)


def check_split(cfg, config):
    """Validate cfg against the dense ModelConfig -> (d_e, shared, s), the sizes of the split.

    Sizes (ours where the paper leaves them open): a token's active width, shared + k * d_e, is k/E of the dense
    FFN, k * d_h / E, so a split 4/16 of LLaMA-2 7B activates 2752 of 11008 neurons per layer.
      - random / clustering: d_e = d_h / E exactly (disjoint experts covering every neuron).
      - sharing_inner:       d_e = d_h // E, experts may overlap.
      - sharing_inter:       shared = d_h // E (one expert's worth), d_e = (k * d_h/E - shared) / k.
      - upcycle:             d_e = d_h (every expert a full copy; active width k * d_h, the baseline).
      - activation:          E and k count the ROUTED experts; shared = two experts' worth 2 d_h / (E + 2) and
                             d_e = (d_h - shared) / E, an exact partition. E=14, k=2 is CMoE's "S2A2E16": of
                             16 expert-sized blocks 2 are shared and 2 routed per token, 25% of the FFN active."""
    check_ranges(cfg)  # each setting's own range (SplitConfig); the rest relates them to the model
    E, k, m, d_h = cfg.num_experts, cfg.top_k, cfg.method, config.intermediate_size
    need(not config.is_moe, f"--src={cfg.src or 'the model'} is an MoE model already: split.py cuts a dense LLaMA")
    need(k <= E, f"--top_k={k} must be <= --num_experts ({E}): each token picks k of the E experts")
    need(cfg.shared_size is None or m in ("sharing_inter", "activation"),
         "--shared_size is for --method=sharing_inter or activation only")
    need(cfg.router_init == "random" or cfg.gate_type == "linear", f"--router_init={cfg.router_init} sets a "
         f"linear router's weights; --gate_type={cfg.gate_type} cannot hold them: use --gate_type=linear")
    need(cfg.router_init == "random" or m != "upcycle", "--router_init from the data needs experts that differ; "
         "upcycled experts are identical copies: use --router_init=random")
    weighting = cfg.expert_weighting or ("unit" if m == "activation" else "softmax")
    if m in INDEPENDENT:
        need(d_h % E == 0, f"intermediate_size {d_h} is not divisible by --num_experts={E}: the independent "
             f"methods give every expert d_h/E neurons. Expert counts that divide it (<= 256): "
             f"{[n for n in range(2, min(d_h, 256) + 1) if d_h % n == 0]}")
        d_e, shared = d_h // E, 0
    elif m == "upcycle":
        d_e, shared = d_h, 0
    elif m == "sharing_inner":
        d_e, shared = cfg.expert_size or d_h // E, 0
    elif m == "activation":
        shared = 2 * d_h // (E + 2) if cfg.shared_size is None else cfg.shared_size
        need(0 <= shared < d_h, f"--shared_size={shared} must be in 0..intermediate_size-1 ({d_h - 1}): the "
             f"routed experts need neurons too")
        need((d_h - shared) % E == 0, f"activation: the {d_h - shared} neurons outside the shared block "
             f"({shared}) do not split into {E} equal experts: choose --shared_size so that {d_h} - shared_size "
             f"is a multiple of {E} (e.g. {shared - (shared - d_h) % E})")
        d_e = (d_h - shared) // E
    else:  # sharing_inter
        shared = d_h // E if cfg.shared_size is None else cfg.shared_size
        d_e = (k * (d_h // E) - shared) // k if cfg.expert_size is None else cfg.expert_size
        need(d_e >= 1 and shared >= 1, f"sharing_inter needs shared_size >= 1 and expert_size >= 1 (got {shared} "
             f"and {d_e}); with top_k 1 the default leaves no room for routed experts: pass both sizes")
        need(shared + E * d_e <= d_h, f"sharing_inter: shared_size {shared} + num_experts {E} x expert_size {d_e} "
             f"= {shared + E * d_e} exceeds the {d_h} neurons (routed experts are disjoint from each other and "
             f"from the shared block): make them smaller")
    need(cfg.expert_size in (None, d_e), f"--expert_size={cfg.expert_size} does not fit --method={m}, whose "
         f"experts have {d_e} neurons (disjoint and covering all {d_h}, or the full FFN for upcycle): drop it")
    need(1 <= d_e <= d_h, f"--expert_size={d_e} must be in 1..intermediate_size ({d_h})")
    # SPEC section 2: the k chosen experts hold only k/E of the neurons, so the layer's output shrinks; the paper
    # multiplies the routed outputs by s = E/k (its default; its ablation finds that better than s = 1). Note the
    # arithmetic: scores sum to 1, so with scores ~1/k the weighted sum of k experts is ~1/E of the FFN and E/k
    # brings it to ~1/k of it, not all the way. Upcycled experts are each the full FFN, so their weighted sum
    # already is the FFN: s = 1 is their default.
    scale = float(cfg.scale if cfg.scale is not None else (1.0 if m in ("upcycle", "activation") else E / k))
    if cfg.format != "native":  # what the output format can hold: asked now, not when saving after the whole split
        moe = replace(config, num_experts=E, num_experts_per_tok=k, expert_intermediate_size=d_e,
                      shared_intermediate_size=shared, gate_type=cfg.gate_type, expert_weighting=weighting)
        with user_input(f"--format={cfg.format}"):
            if cfg.format == "gguf":
                gguf_arch(moe)  # which llama.cpp graph runs the split, or why none does
            else:
                checkpoint.check_hf_moe_format(cfg.format, moe)
    if m in NEEDS_IMPORTANCE or needs_profile(cfg):
        check_data(cfg, config)
    return d_e, shared, scale, weighting


def needs_profile(cfg):
    """The activation construction and the data-driven routers read the parent's activations (carve.py)."""
    return cfg.method == "activation" or cfg.router_init != "random" or bool(cfg.refit_down)


def check_data(cfg, config):
    """The sample text of the sharing methods: there, and tokenised with the model's tokenizer where we can tell."""
    need(cfg.data, f"--method={cfg.method} --router_init={cfg.router_init} reads sample text: pass --data=... "
         f"(a shard folder or a text file)")
    need(os.path.exists(cfg.data), f"--data={cfg.data!r} does not exist (a shard folder or a text file)")
    if os.path.isdir(cfg.data):
        with user_input(f"--data={cfg.data}"):
            check_same_tokenizer({"the model": config.tokenizer_sha256,
                                  "the data": load_meta(cfg.data).get("tokenizer_sha256")},
                                 "prepare it with the model's own tokenizer")
    else:
        need(cfg.tokenizer or cfg.src, f"--data={cfg.data} is a text file: pass --tokenizer=... to tokenise it")


# ----------------------------------------------------------------------------------------------------------
# 2. Choosing the neurons of each expert: the independent methods

def split_random(d_h, E, seed=0):
    """IndependentRandom (the paper's best): d_h/E labels per expert, shuffled, so every neuron lands in
    exactly one expert. -> E index tensors of d_h/E neurons each (sorted: expert order follows the dense order)."""
    assert d_h % E == 0, (d_h, E)
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
    assert P % C == 0, (P, C)
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


# ----------------------------------------------------------------------------------------------------------
# 3. Importance: which neurons matter for which kind of text (SPEC section 2, for the sharing methods)
#
# Sample text is split into E clusters; for each cluster we run forward + backward on the dense model and score
# neuron i of every layer by the first-order Taylor estimate of the loss change when it is removed:
#     importance_i = mean over the cluster's tokens of |a_i * dL/da_i|,   a = silu(W_gate x) * (W_up x)
# a is exactly the input of W_down, so a forward pre-hook on down_proj sees it. L is the mean next-token loss
# of the batch (what training minimises), so every token's gradient carries the batch's 1/T.

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
    sizes in bf16 (measured): a batch of 4 x 256 tokens adds ~4.6 GB to the 13.5 GB model."""
    layers = model.model.layers
    C = len(batches_per_cluster)
    scores = [torch.zeros(C, b.mlp.down_proj.in_features) for b in layers]   # L x (C, d_h)
    cluster = [0]                                                              # the cluster being scored

    def make_hook(layer):
        def accumulate(a, grad):                                               # a, grad: (B, S, d_h)
            scores[layer][cluster[0]] += (a.float() * grad.float()).abs().sum(dim=(0, 1)).cpu()

        def hook(module, args):
            # The closure holds a DETACHED view: one holding `a` itself would make a cycle (a -> its hook ->
            # the closure -> a) that keeps every batch's autograd graph alive until the garbage collector runs.
            a = args[0].detach()
            args[0].register_hook(lambda grad: accumulate(a, grad))
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
                    loss = model(batch[:, :-1], targets=batch[:, 1:]).loss
                    loss.backward()
                n_tokens += batch[:, 1:].numel()
            assert n_tokens, f"importance cluster {c} has no text"
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
    assert shared_size + E * expert_size <= d_h, (shared_size, E, expert_size, d_h)
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

def build_moe(dense, layer_plans, num_experts, top_k, d_e, shared, scale, weighting="softmax",
              gate_type="linear", seed=0, gate_std=0.02, free_dense=False, gate_noise=True):
    """Slice a dense Transformer into an MoE Transformer (eval mode, like Transformer.from_pretrained).

    layer_plans: per layer, in order, (expert_indices, shared_indices, gate_weight, w_down): E index tensors of d_e
    neurons each (expert j = those neurons), the always-on block's indices (or None), the linear gate's weight
    (E, d) (or None: random normal with std gate_std, SPEC section 3), and a refitted W_down (d, d_h) to slice
    instead of the dense one (or None). It may be a generator that profiles layer L+1 only after layer L was cut
    (carve.py), which is how the data-driven split streams. Attention, norms and embeddings are the dense tensors
    themselves (moved when free_dense, else copied); each expert stack is gathered from the dense FFN, which
    free_dense drops right after, so memory stays at about one model (the dense model is unusable afterwards).
    The noise projection starts at zero."""
    # The dense config plus the MoE fields; intermediate_size and the tokenizer fingerprint stay the dense model's.
    config = replace(dense.config, num_experts=num_experts, num_experts_per_tok=top_k, expert_intermediate_size=d_e,
                     shared_intermediate_size=shared, score_scale=scale, gate_type=gate_type,
                     expert_weighting=weighting, gate_noise=gate_noise)
    with torch.device("meta"):
        moe = Transformer(config)
    state = {name: t if free_dense else t.clone() for name, t in dense.state_dict().items() if ".mlp." not in name}
    g = torch.Generator().manual_seed(seed)
    n_layers = 0
    for layer, (experts, shared_ix, gate_weight, w_down) in enumerate(layer_plans):
        block = dense.model.layers[layer]
        assert len(experts) == num_experts and all(len(ix) == d_e for ix in experts)
        assert (shared_ix is None and not shared) or len(shared_ix) == shared
        wg, wu, wd = (w.weight.detach() for w in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj))
        if w_down is not None:
            wd = w_down.to(wd)
        ix = torch.stack(list(experts)).to(wg.device)                      # (E, d_e)
        head = f"model.layers.{layer}.mlp"
        gate_up = wg.new_empty(num_experts, 2 * d_e, wg.shape[1])          # (E, 2 d_e, d) = [W_gate[ix]; W_up[ix]]
        for j in range(num_experts):  # gathered straight into place: no (E, d_e, d) temporaries
            torch.index_select(wg, 0, ix[j], out=gate_up[j, :d_e])         # (d_e, d)
            torch.index_select(wu, 0, ix[j], out=gate_up[j, d_e:])         # (d_e, d)
        state[f"{head}.experts.gate_up_proj"] = gate_up
        state[f"{head}.experts.down_proj"] = wd[:, ix].permute(1, 0, 2).contiguous()  # (d, E, d_e) -> (E, d, d_e)
        if shared:
            s = shared_ix.to(wg.device)                                     # (shared,)
            state[f"{head}.shared.gate_proj.weight"] = wg[s]                # (shared, d)
            state[f"{head}.shared.up_proj.weight"] = wu[s]                  # (shared, d)
            state[f"{head}.shared.down_proj.weight"] = wd[:, s].contiguous()  # (d, shared)
        for name, p in moe.model.layers[layer].mlp.gate.named_parameters():
            if "weight_noise" in name:
                t = torch.zeros(p.shape)
            elif gate_weight is not None:
                t = gate_weight                                             # (E, d) from the data (carve.py)
            else:
                t = torch.randn(p.shape, generator=g) * gate_std
            state[f"{head}.gate.{name}"] = t.to(device=wg.device, dtype=wg.dtype)
        state[f"{head}.gate.expert_bias"] = torch.zeros(num_experts, device=wg.device, dtype=wg.dtype)
        del wg, wu, wd
        if free_dense:
            block.mlp = None  # drop this layer's dense FFN now: the peak stays at ~one model
        n_layers += 1
    assert n_layers == dense.config.num_hidden_layers
    moe.load_state_dict(state, assign=True)   # strict: every tensor of the MoE is set, each exactly once
    if config.tie_word_embeddings:
        moe.lm_head.weight = moe.model.embed_tokens.weight
    moe.inv_freq = dense.inv_freq.clone()
    return moe.eval()


# ----------------------------------------------------------------------------------------------------------
# 5. The whole split

def choose_experts(dense, cfg, d_e, shared_size, importance=None):
    """Per layer the E expert index tensors and the shared block (or None), by cfg.method (all but activation,
    which profile_plans chooses while it profiles). importance: per layer (E, d_h) Taylor scores."""
    d_h, E = dense.config.intermediate_size, cfg.num_experts
    experts, shared = [], []
    for layer, block in enumerate(dense.model.layers):
        # A different seed per layer: the same permutation everywhere would be an arbitrary coupling of layers.
        seed = cfg.seed * 1000 + layer
        if cfg.method == "random":
            experts.append(split_random(d_h, E, seed))
        elif cfg.method == "clustering":
            W = (block.mlp.up_proj if cfg.clustering_features == "up" else block.mlp.gate_proj).weight.detach()
            experts.append(split_clustering(W, E, seed))
        elif cfg.method == "upcycle":  # the baseline: every expert a full copy (LLaMA-2 7B, 16 experts: ~140 GB bf16)
            experts.append([torch.arange(d_h) for _ in range(E)])
        elif cfg.method == "sharing_inner":
            experts.append(split_sharing_inner(importance[layer], d_e))
        else:
            s, routed = split_sharing_inter(importance[layer], shared_size, d_e)
            experts.append(routed)
            shared.append(s)
    return experts, (shared or [None] * len(experts))


def importance_batches(dense, cfg):
    """cfg.data's sample text -> E clusters of token batches, the input of taylor_importance."""
    with user_input(f"--data={cfg.data}"):
        tokens, domains = sample_sequences(cfg.data, cfg.num_experts * cfg.importance_seqs, cfg.seq_len, cfg.seed,
                                           cfg.tokenizer or cfg.src, dense.config.vocab_size)
    clusters = importance_clusters(dense, tokens, domains, cfg.num_experts, cfg.seed, cfg.batch_size)
    return [[tokens[ix[i:i + cfg.batch_size]] for i in range(0, len(ix), cfg.batch_size)] for ix in clusters]


def profile_plans(dense, cfg, shared_size, weighting, scale, chosen=None):
    """Yield each layer's (experts, shared, gate weight) while carving the parent layer by layer (carve.py):
    the activation construction (when chosen is None) or the given experts, and the router by cfg.router_init."""
    with user_input(f"--data={cfg.data}"):
        tokens, _ = sample_sequences(cfg.data, cfg.profile_seqs, cfg.seq_len, cfg.seed, cfg.tokenizer or cfg.src,
                                     dense.config.vocab_size)
    d = dense.config.hidden_size

    def plan_layer(layer, x, a):
        seed = cfg.seed * 1000 + layer
        if chosen is None:
            shared, experts = carve.activation_experts(a, cfg.num_experts, shared_size, cfg.mark_ratio, seed)
            shared = shared if shared_size else None
        else:
            experts, shared = chosen[0][layer], chosen[1][layer]
        if cfg.router_init == "random":  # SPEC section 3's init, drawn here so the carving knows the routing
            weight = torch.randn(cfg.num_experts, d, generator=torch.Generator().manual_seed(seed)) * cfg.gate_std
        else:
            scores = carve.expert_scores(a, dense.model.layers[layer].mlp.down_proj.weight.detach(), experts)
            weight = carve.router_weights(x, scores, cfg.top_k, cfg.router_init)     # (E, d)
        return experts, shared, weight

    refit = cfg.method == "activation" if cfg.refit_down is None else cfg.refit_down
    yield from carve.carve_layers(dense, tokens[:, :-1], plan_layer, cfg.top_k, weighting, scale, cfg.batch_size,
                                  cfg.propagate, refit)


def split_model(dense, cfg, sizes=None, free_dense=False):
    """Dense Transformer -> MoE Transformer by cfg (SplitConfig). Validates cfg first, unless the caller already
    did: sizes = check_split(cfg, dense.config). free_dense: build in place of the dense model (see build_moe)."""
    d_e, shared, scale, weighting = sizes or check_split(cfg, dense.config)
    if cfg.method == "activation":
        plans = profile_plans(dense, cfg, shared, weighting, scale)
    else:
        importance = None
        if cfg.method in NEEDS_IMPORTANCE:
            importance = taylor_importance(dense, importance_batches(dense, cfg))
        chosen = choose_experts(dense, cfg, d_e, shared, importance)
        plans = (profile_plans(dense, cfg, shared, weighting, scale, chosen) if needs_profile(cfg) else
                 ((e, s, None, None) for e, s in zip(*chosen)))
    return build_moe(dense, plans, cfg.num_experts, cfg.top_k, d_e, shared, scale, weighting, cfg.gate_type,
                     cfg.seed, cfg.gate_std, free_dense=free_dense, gate_noise=cfg.gate_noise)


def check_paths(cfg):
    """Where the split reads and writes: checked before anything is read or written."""
    need(cfg.src and cfg.dst, "--src=... (a dense LLaMA folder or .gguf file) and --dst=... (the output folder) "
         "are required")
    need(os.path.exists(cfg.src), f"--src={cfg.src} does not exist: give a dense LLaMA checkpoint folder "
         f"(config.json + safetensors) or a .gguf file")
    inputs = [("--src", cfg.src), ("--data", cfg.data), ("--tokenizer", cfg.tokenizer)]
    with user_input("--dst"):
        if cfg.format == "gguf":  # one file
            check_output_file(cfg.dst, "--dst", inputs)
        else:
            check_output_dir(cfg.dst, "--dst", "a model", MODEL_FILES, cfg.overwrite, inputs)
    need(cfg.format != "gguf" or cfg.overwrite or not os.path.exists(cfg.dst), f"--dst={cfg.dst} exists: pass "
         f"--overwrite=True to replace it, or choose another --dst")


def split_checkpoint(cfg):
    """Read cfg.src, split it, write the MoE checkpoint to cfg.dst (atomically). Returns the model.
    Everything is checked before the weights are read, and nothing is written before the split is done."""
    check_paths(cfg)
    with user_input(f"--src={cfg.src}"):  # a folder or a .gguf: its config first, the split checked against it
        config, mtype, tensors = checkpoint.open_checkpoint(cfg.src, own_memory=True)
    sizes = check_split(cfg, config)
    if cfg.format == "gguf":  # the source's tokenizer goes inside: one GGUF can carry, checked before any weight
        with user_input("--format=gguf needs the source's tokenizer inside the file"):
            tokenizer_metadata(checkpoint.Tokenizer(cfg.src), config.vocab_size)
    with user_input(f"--src={cfg.src}"):  # each tensor copied out of its file, one at a time (memory: one model)
        dense = checkpoint.fill_model(config, mtype, tensors, cfg.src, device=cfg.device)
    moe = split_model(dense, cfg, sizes, free_dense=True)
    del dense
    moe.source = cfg.src  # save_pretrained writes the source's tokenizer into the split (or the GGUF)
    with user_input(f"--dst={cfg.dst}"):  # a tokenizer GGUF cannot carry, or none: said before anything is written
        checkpoint.save_pretrained(moe, cfg.dst, format=cfg.format, gguf_type=cfg.gguf_type, overwrite=cfg.overwrite)
    return moe


def main(argv):
    cfg = load_config(SplitConfig(), argv, doc=__doc__)
    moe = split_checkpoint(cfg)
    c = moe.config
    size = sum(p.numel() * p.element_size() for p in moe.parameters()) / 2**30
    print(f"wrote {cfg.dst} ({cfg.format}): {c.num_hidden_layers} layers x {c.num_experts} experts of "
          f"{c.expert_intermediate_size} neurons, top-{c.num_experts_per_tok}, shared {c.shared_intermediate_size}, "
          f"scale {c.score_scale}, {c.expert_weighting} weights, {c.gate_type} gate ({cfg.router_init} init)")
    print(f"peak memory (RSS) {peak_rss_gib():.2f} GiB for a {size:.2f} GiB model")


def peak_rss_gib():
    """This process's peak resident memory (Linux's VmHWM; ru_maxrss would also count a parent's memory at fork)."""
    if not os.path.exists("/proc/self/status"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30  # bytes on macOS
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20  # kB


if __name__ == "__main__":
    run_cli(main)
