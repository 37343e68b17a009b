"""Plain-torch permute / unpermute: the readable definition the C++ and CUDA kernels must match.

SPEC.md §7. With T tokens and top-k routing there are P = T*k (token, expert) pairs, pair p = t*k + j.
permute gathers token rows into a (P, d) buffer grouped by expert (ascending), token order kept inside
each expert (a *stable* grouping), so every expert later sees one contiguous slice of rows.
unpermute sends the expert outputs back and sums each token's k rows weighted by its gate scores.

The three *_fwd / *_bwd functions below are the whole backend interface; moe_kernels/permute_cpu.cpp and
moe_kernels/permute_cuda.cu implement the same three with the same meaning:

    permute_fwd(x, expert_ids, num_experts)            -> (x_perm, row_map, counts)
    unpermute_fwd(y_perm, row_map, scores, top_k)      -> out
    unpermute_bwd(grad_out, y_perm, row_map, scores, top_k, need_y, need_scores) -> (grad_y, grad_scores)

Arguments arrive already checked and contiguous (moe_kernels/ops.py does that once for every backend).
Accumulation dtype: float64 for float64 rows, float32 for everything else (bf16/fp16 rows are
summed in fp32 and rounded once at the end). The order of the additions is fixed,
out = s0*y0, then out += s_j*y_j for j = 1..k-1, so the fp32 C++ kernel can match this file bit for bit.

At the end, moe_ffn is the whole MoE feed-forward as a plain loop over experts, and naive_experts the
expert part of it on grouped rows (what moe_kernels/experts.py computes fast).
"""
import torch
import torch.nn.functional as F


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision rows are summed in fp32: k additions in bf16 would lose ~k/2 ulp for nothing.
    return torch.float64 if dtype == torch.float64 else torch.float32


def group_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """Stable grouping of the P = T*k pairs by expert.

    Returns row_map (P,) int64 (pair -> row of the grouped buffer) and counts (E,) int64.
    A stable argsort is the plain-torch way; the kernels use a histogram + prefix scan instead
    (a counting sort), which needs no comparison sort at all.
    """
    flat = expert_ids.reshape(-1).long()                            # (T, k) -> (P,)
    counts = torch.bincount(flat, minlength=num_experts)            # (E,) tokens per expert
    order = torch.argsort(flat, stable=True)                        # (P,) row -> pair
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(flat.numel(), device=flat.device)  # invert: pair -> row
    return row_map, counts


def permute_fwd(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """x (T, d), expert_ids (T, k) -> x_perm (P, d), row_map (P,), counts (E,)."""
    T, k = expert_ids.shape
    row_map, counts = group_by_expert(expert_ids, num_experts)
    token_of_pair = torch.arange(T * k, device=x.device) // k       # (P,) pair p belongs to token p // k
    x_perm = torch.empty(T * k, x.shape[1], dtype=x.dtype, device=x.device)
    x_perm[row_map] = x[token_of_pair]                              # x_perm[row_map[p]] = x[p // k]
    return x_perm, row_map, counts


def unpermute_fwd(y_perm: torch.Tensor, row_map: torch.Tensor, scores, top_k: int):
    """y_perm (P, d), row_map (P,), scores (T, k) or None (= all ones) -> out (T, d).

    out[t] = sum_j scores[t, j] * y_perm[row_map[t*k + j]]
    """
    acc = accumulation_dtype(y_perm.dtype)
    T, d = row_map.numel() // top_k, y_perm.shape[1]
    rows = y_perm[row_map].to(acc).view(T, top_k, d)                # (P, d) -> (T, k, d), token order
    s = None if scores is None else scores.to(acc)                  # (T, k)
    out = rows[:, 0] if s is None else s[:, 0, None] * rows[:, 0]
    for j in range(1, top_k):                                       # fixed order: see module docstring
        out = out + (rows[:, j] if s is None else s[:, j, None] * rows[:, j])
    return out.to(y_perm.dtype).reshape(T, d)


def unpermute_bwd(grad_out, y_perm, row_map, scores, top_k: int, need_y: bool, need_scores: bool):
    """Backward of unpermute (SPEC §7): a permute of grad_out, plus dot products for the scores.

    grad_y[row_map[p]]  = scores[p] * grad_out[p // k]         (P, d)  -- a weighted permute
    grad_scores[t, j]   = <grad_out[t], y_perm[row_map[t*k+j]]>  (T, k)
    Unneeded outputs come back as empty tensors (custom ops cannot return None).
    """
    acc = accumulation_dtype(y_perm.dtype)
    T, d = row_map.numel() // top_k, y_perm.shape[1]
    g = grad_out.to(acc)                                            # (T, d)
    grad_y = y_perm.new_empty(0)
    grad_scores = y_perm.new_empty(0) if scores is None else scores.new_empty(0)
    if need_y:
        g_rep = g.repeat_interleave(top_k, dim=0)                   # (T, d) -> (P, d), pair order
        if scores is not None:
            g_rep = g_rep * scores.to(acc).reshape(-1, 1)
        grad_y = torch.empty_like(y_perm)
        grad_y[row_map] = g_rep.to(y_perm.dtype)
    if need_scores and scores is not None:
        rows = y_perm[row_map].to(acc).view(T, top_k, d)            # (T, k, d)
        grad_scores = (rows * g[:, None, :]).sum(-1).to(scores.dtype)  # (T, k)
    return grad_y, grad_scores


# ----------------------------------------------------------------------------------------------
# The whole MoE feed-forward in plain torch (SPEC.md §2): what permute -> grouped_swiglu -> unpermute
# compute, written for reading. The tests compare the kernels against these two functions.
# ----------------------------------------------------------------------------------------------

def swiglu(x, w_gate_up, w_down):
    """One SwiGLU FFN: x (n, d), w_gate_up (2 d_e, d) = [W_gate; W_up], w_down (d, d_e) -> (n, d)."""
    g, u = (x @ w_gate_up.T).chunk(2, dim=-1)                             # (n, 2 d_e) -> 2 x (n, d_e)
    return (F.silu(g) * u) @ w_down.T


def moe_ffn(x, expert_ids, scores, w_gate_up, w_down):
    """out[t] = sum_j scores[t, j] * expert_{expert_ids[t, j]}(x[t]).

    x (T, d), expert_ids (T, k), scores (T, k), w_gate_up (E, 2 d_e, d), w_down (E, d, d_e) -> (T, d).
    """
    T, k = expert_ids.shape
    out = torch.zeros(T, k, x.shape[1], dtype=x.dtype, device=x.device)   # (T, k, d): one row per choice
    for e in range(w_gate_up.shape[0]):
        t, j = torch.where(expert_ids == e)                                # the (token, slot) pairs of e
        out[t, j] = swiglu(x[t], w_gate_up[e], w_down[e])                  # (n_e, d)
    return (scores[:, :, None] * out).sum(1)                               # (T, k, d) -> (T, d)


def naive_experts(x_perm, tokens_per_expert, w_gate_up, w_down):
    """grouped_swiglu in plain torch: expert e on its slice of the expert-grouped rows, (N, d) -> (N, d)."""
    rows = torch.split(x_perm, tokens_per_expert.tolist())                # E slices of (n_e, d)
    return torch.cat([swiglu(r, w_gate_up[e], w_down[e]) for e, r in enumerate(rows)])
