"""The routed experts as one grouped SwiGLU over contiguous row slices (SPEC.md §2 and §7).

After kernels.permute the (T*k, d) rows are grouped by expert: expert j owns rows
bounds[j]:bounds[j+1], bounds = [0, cumsum(counts)]. Expert j is a SwiGLU FFN of width d_e:

    G = X_j W_gate[j]^T,  U = X_j W_up[j]^T,  H = silu(G) * U,  Y_j = H W_down[j]^T

Why a hand-written backward (PERF.md): slicing the grouped buffer and letting autograd differentiate
each slice builds a full-size zero gradient per slice and concatenates them, 4.7x slower than a dense FFN
of the same FLOPs on the CPU. Here forward and backward each write into one preallocated buffer per
tensor, the elementwise SwiGLU math runs once over all rows, and only the matmuls go per expert.

Matmuls per expert run one of two ways:
  * torch._grouped_mm (one kernel for all experts, offsets stay on the device, no host sync): used on
    CUDA, where per-expert launches and a host sync would dominate. A one-time probe per (dtype, d, d_e)
    checks it against the loop, since its rules vary by version, dtype and shape (its 16-byte stride rule
    is met by padding the expert width with zero weights).
  * one matmul per expert on its slice, written into preallocated buffers: on the CPU in the C++
    extension (experts_cpu.cpp: the forward is one parallel region and the backward two, each thread
    taking whole row blocks of one expert), elsewhere the Python loop below, which is also the readable
    version of the C++. The counts -> bounds host sync happens once in the forward and once in the
    backward. On the CPU torch._grouped_mm is itself a loop over experts and measured no faster.
LLAMA_MOE_GROUPED_MM=1 / 0 forces the choice (=1 still goes through the probe).

Like permute/unpermute this is a torch.library custom op, so torch.compile can trace through it.
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.ops import cpu_extension

# ----------------------------------------------------------------------------------------------
# Path 1: one plain matmul per expert over its contiguous slice
# (experts_cpu.cpp does the same on the CPU, in two parallel regions instead of dozens of ops)
# ----------------------------------------------------------------------------------------------

def expert_bounds(counts: Tensor) -> list:
    """(E,) token counts -> [0, c0, c0+c1, ..., N]: the one host sync of the loop path."""
    return [0] + torch.cumsum(counts, 0).tolist()


def _forward_loop(x, bounds, w_gate, w_up, w_down):
    """x (N, d), w_gate / w_up (E, d_e, d), w_down (E, d, d_e) -> y (N, d), gu (N, 2 d_e) = [G | U]."""
    d_e = w_down.shape[2]
    w_gu = torch.cat([w_gate, w_up], dim=1)                         # (E, 2 d_e, d): one matmul for G and U
    gu = x.new_empty(x.shape[0], 2 * d_e)                           # (N, 2 d_e), kept for backward
    y = x.new_empty(x.shape[0], w_down.shape[1])                    # (N, d)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            torch.mm(x[a:b], w_gu[j].t(), out=gu[a:b])              # (n_j, d) @ (d, 2 d_e)
    h = F.silu(gu[:, :d_e]) * gu[:, d_e:]                           # (N, d_e): all experts in one op
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            torch.mm(h[a:b], w_down[j].t(), out=y[a:b])             # (n_j, d_e) @ (d_e, d)
    return y, gu


def _swiglu_grads(grad_h, gu):
    """Elementwise part of the backward, over all rows at once.

    h = silu(g) * u  ->  dL/dU = grad_h * silu(g),  dL/dG = grad_h * u * silu'(g).
    Returns h (N, d_e), recomputed rather than stored, and grad_gu (N, 2 d_e) = [dL/dG | dL/dU].
    """
    d_e = grad_h.shape[1]
    g, u = gu[:, :d_e], gu[:, d_e:]
    silu = F.silu(g)
    grad_gu = torch.empty_like(gu)
    torch.mul(grad_h, silu, out=grad_gu[:, d_e:])                   # dL/dU
    grad_gu[:, :d_e] = torch.ops.aten.silu_backward(grad_h * u, g)  # dL/dG, silu' fused
    return silu * u, grad_gu


def _backward_loop(grad_y, x, bounds, gu, w_gate, w_up, w_down, need_x, need_w):
    E, d, d_e = w_down.shape
    w_gu = torch.cat([w_gate, w_up], dim=1)                         # (E, 2 d_e, d)
    rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    grad_h = x.new_empty(x.shape[0], d_e)                           # (N, d_e)
    for j, r in enumerate(rows):
        if r.stop > r.start:
            torch.mm(grad_y[r], w_down[j], out=grad_h[r])           # (n_j, d) @ (d, d_e)
    h, grad_gu = _swiglu_grads(grad_h, gu)
    grad_x = torch.empty_like(x) if need_x else None
    grad_wg = grad_wu = grad_wd = None
    if need_w:  # one preallocated buffer per weight; an expert without tokens gets exactly zero
        grad_wg, grad_wu, grad_wd = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    for j, r in enumerate(rows):
        if r.stop == r.start:
            continue
        if need_x:
            torch.mm(grad_gu[r], w_gu[j], out=grad_x[r])            # [dG | dU] @ [W_gate; W_up]: (n_j, d)
        if need_w:
            torch.mm(grad_y[r].t(), h[r], out=grad_wd[j])           # (d, n_j) @ (n_j, d_e)
            torch.mm(grad_gu[r, :d_e].t(), x[r], out=grad_wg[j])    # (d_e, n_j) @ (n_j, d)
            torch.mm(grad_gu[r, d_e:].t(), x[r], out=grad_wu[j])
    return grad_x, grad_wg, grad_wu, grad_wd


# ----------------------------------------------------------------------------------------------
# Path 2: torch._grouped_mm (CUDA). offs = ends of the expert slices, int32, on the device: no sync
# (and so no check that the counts sum to N either: that would be the sync this path avoids).
# _grouped_mm wants every row stride to be a multiple of 16 bytes, so the expert width is padded with
# zero weights to dp (d_e = 86 -> 88 in bf16). Padding changes nothing: zero weights give g = u = 0,
# silu(0) * 0 = 0, and zero columns of W_down add exact zeros.
# ----------------------------------------------------------------------------------------------

def _padded_width(d_e, dtype):
    multiple = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-d_e // multiple) * multiple


def _padded_gate_up(w_gate, w_up, dp):
    """[W_gate; W_up], each padded to dp rows: (E, 2 dp, d)."""
    extra = dp - w_gate.shape[1]
    return torch.cat([F.pad(w_gate, (0, 0, 0, extra)), F.pad(w_up, (0, 0, 0, extra))], dim=1)


def _forward_grouped(x, offs, w_gate, w_up, w_down):
    d_e = w_down.shape[2]
    dp = _padded_width(d_e, x.dtype)
    w_gu = _padded_gate_up(w_gate, w_up, dp)                                      # (E, 2 dp, d)
    w_dn = F.pad(w_down, (0, dp - d_e))                                           # (E, d, dp)
    gu = torch._grouped_mm(x, w_gu.transpose(1, 2), offs=offs)                    # (N, 2 dp)
    h = F.silu(gu[:, :dp]) * gu[:, dp:]                                           # (N, dp)
    y = torch._grouped_mm(h, w_dn.transpose(1, 2), offs=offs)                     # (N, d)
    return y, torch.cat([gu[:, :d_e], gu[:, dp:dp + d_e]], dim=1)                 # gu unpadded: (N, 2 d_e)


def _backward_grouped(grad_y, x, offs, counts, gu, w_gate, w_up, w_down, need_x, need_w):
    d_e = w_down.shape[2]
    dp = _padded_width(d_e, x.dtype)
    w_gu = _padded_gate_up(w_gate, w_up, dp)                                      # (E, 2 dp, d)
    w_dn = F.pad(w_down, (0, dp - d_e))                                           # (E, d, dp)
    gu = torch.cat([F.pad(gu[:, :d_e], (0, dp - d_e)), F.pad(gu[:, d_e:], (0, dp - d_e))], dim=1)
    grad_h = torch._grouped_mm(grad_y, w_dn, offs=offs)                           # (N, dp)
    h, grad_gu = _swiglu_grads(grad_h, gu)                                        # (N, dp), (N, 2 dp)
    grad_x = torch._grouped_mm(grad_gu, w_gu, offs=offs) if need_x else None      # (N, d)
    grad_wg = grad_wu = grad_wd = None
    if need_w:
        # 2D x 2D with offsets: the groups split the shared N dimension -> one (rows, cols) block per expert.
        grad_wd = torch._grouped_mm(grad_y.t(), h, offs=offs)                     # (E, d, dp)
        grad_wgu = torch._grouped_mm(grad_gu.t(), x, offs=offs)                   # (E, 2 dp, d)
        empty = (counts == 0).view(-1, 1, 1)  # an expert without rows must get exactly zero, on the device
        grad_wd = grad_wd.masked_fill(empty, 0)[:, :, :d_e].contiguous()
        grad_wgu = grad_wgu.masked_fill(empty, 0)
        grad_wg, grad_wu = grad_wgu[:, :d_e].contiguous(), grad_wgu[:, dp:dp + d_e].contiguous()
    return grad_x, grad_wg, grad_wu, grad_wd


_grouped_ok = {}  # (device type, dtype, d, d_e) -> bool, filled by _probe_grouped_mm


def _probe_grouped_mm(device, dtype, d, d_e) -> bool:
    """Run both paths once on a small uneven routing (with an empty expert) and compare."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.tensor([5, 0, 16, 11], device=device)
    E, N = counts.numel(), int(counts.sum())
    x = torch.randn(N, d, generator=gen).to(device, dtype)
    w_gu = (torch.randn(E, 2 * d_e, d, generator=gen) / d ** 0.5).to(device, dtype)
    w_down = (torch.randn(E, d, d_e, generator=gen) / d_e ** 0.5).to(device, dtype)
    grad_y = torch.randn(N, d, generator=gen).to(device, dtype)
    try:
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        y1, gu1 = _forward_grouped(x, offs, w_gu[:, :d_e], w_gu[:, d_e:], w_down)
        g1 = _backward_grouped(grad_y, x, offs, counts, gu1, w_gu[:, :d_e], w_gu[:, d_e:], w_down, True, True)
    except (RuntimeError, NotImplementedError):
        return False
    bounds = expert_bounds(counts)
    y0, gu0 = _forward_loop(x, bounds, w_gu[:, :d_e], w_gu[:, d_e:], w_down)
    g0 = _backward_loop(grad_y, x, bounds, gu0, w_gu[:, :d_e], w_gu[:, d_e:], w_down, True, True)
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
    return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip((y1, *g1), (y0, *g0)))


def _key(x, d_e):
    return (x.device.type, x.dtype, x.shape[1], d_e)


def use_grouped_mm(x: Tensor, d_e: int) -> bool:
    """Whether this call goes through torch._grouped_mm (see the module docstring)."""
    forced = os.environ.get("LLAMA_MOE_GROUPED_MM", "").strip()
    if forced == "0" or not hasattr(torch, "_grouped_mm"):
        return False
    if forced != "1" and x.device.type != "cuda":
        return False
    key = _key(x, d_e)
    if key not in _grouped_ok:
        _grouped_ok[key] = _probe_grouped_mm(x.device, x.dtype, x.shape[1], d_e)
    return _grouped_ok[key]


# ----------------------------------------------------------------------------------------------
# Custom ops with their autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("llama_moe::grouped_swiglu", mutates_args=())
def _grouped_swiglu_op(x: Tensor, counts: Tensor, w_gate: Tensor, w_up: Tensor,
                       w_down: Tensor) -> tuple[Tensor, Tensor]:
    if use_grouped_mm(x, w_down.shape[2]):
        try:
            return _forward_grouped(x, torch.cumsum(counts, 0, dtype=torch.int32), w_gate, w_up, w_down)
        except RuntimeError:
            _grouped_ok[_key(x, w_down.shape[2])] = False  # a shape the probe did not cover: loop from now on
    bounds = expert_bounds(counts)
    if bounds[-1] != x.shape[0]:
        raise ValueError(f"grouped_swiglu: counts sum to {bounds[-1]} but x_perm has {x.shape[0]} rows.")
    ext = cpu_extension() if x.device.type == "cpu" else None
    if ext is not None:
        return ext.experts_forward(x, bounds, w_gate, w_up, w_down)
    return _forward_loop(x, bounds, w_gate, w_up, w_down)


@_grouped_swiglu_op.register_fake
def _(x, counts, w_gate, w_up, w_down):
    return x.new_empty(x.shape[0], w_down.shape[1]), x.new_empty(x.shape[0], 2 * w_down.shape[2])


@torch.library.custom_op("llama_moe::grouped_swiglu_backward", mutates_args=())
def _grouped_swiglu_backward_op(grad_y: Tensor, x: Tensor, counts: Tensor, gu: Tensor, w_gate: Tensor,
                                w_up: Tensor, w_down: Tensor, need_x: bool,
                                need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = None
    if use_grouped_mm(x, w_down.shape[2]):
        try:
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            grads = _backward_grouped(grad_y, x, offs, counts, gu, w_gate, w_up, w_down, need_x, need_w)
        except RuntimeError:
            _grouped_ok[_key(x, w_down.shape[2])] = False
    if grads is None:
        bounds = expert_bounds(counts)
        ext = cpu_extension() if x.device.type == "cpu" else None
        if ext is not None:
            grads = ext.experts_backward(grad_y, x, bounds, gu.contiguous(), w_gate, w_up, w_down, need_x, need_w)
        else:
            grads = _backward_loop(grad_y, x, bounds, gu, w_gate, w_up, w_down, need_x, need_w)
    # custom ops return tensors, never None: an empty tensor stands for "not needed"
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_grouped_swiglu_backward_op.register_fake
def _(grad_y, x, counts, gu, w_gate, w_up, w_down, need_x, need_w):
    empty = x.new_empty(0)
    return ((torch.empty_like(x) if need_x else empty),
            *((torch.empty_like(w) if need_w else empty) for w in (w_gate, w_up, w_down)))


def _setup(ctx, inputs, output):
    x, counts, w_gate, w_up, w_down = inputs
    ctx.save_for_backward(x, counts, output[1], w_gate, w_up, w_down)
    # gu is returned only to be saved: no gradient flows into it, and autograd must not fill a zero
    # (N, 2 d_e) gradient for it on every backward (it did, measurably, before these two lines).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_gu):
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None, None
    x, counts, gu, w_gate, w_up, w_down = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[2:])
    gx, gwg, gwu, gwd = _grouped_swiglu_backward_op(grad_y.contiguous(), x, counts, gu, w_gate, w_up, w_down,
                                                    need_x, need_w)
    return (gx if need_x else None), None, *((g if need_w else None) for g in (gwg, gwu, gwd))


_grouped_swiglu_op.register_autograd(_backward, setup_context=_setup)

# Autocast does not reach inside custom ops: without this, under torch.autocast(bf16) the expert matmuls
# (most of an MoE model's FLOPs) would run in fp32, and the C++ kernel would see autocast half-enabled.
# Registered, the op's float inputs are cast to bf16 and it runs with autocast off, like a matmul would.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("llama_moe::grouped_swiglu", _device, torch.bfloat16)


def grouped_swiglu(x_perm: Tensor, counts: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Each expert's SwiGLU on its own contiguous rows.

    x_perm (N, d) grouped by expert (from permute), counts (E,) rows per expert (sum N),
    w_gate (E, d_e, d), w_up (E, d_e, d), w_down (E, d, d_e) -> (N, d). Differentiable in x and weights.
    """
    if x_perm.dim() != 2 or w_gate.dim() != 3 or w_up.shape != w_gate.shape or w_down.dim() != 3:
        raise ValueError(f"grouped_swiglu: need x (N, d), w_gate/w_up (E, d_e, d), w_down (E, d, d_e); got "
                         f"{tuple(x_perm.shape)}, {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}.")
    E, d_e, d = w_gate.shape
    if x_perm.shape[1] != d or tuple(w_down.shape) != (E, d, d_e) or counts.shape != (E,):
        raise ValueError(f"grouped_swiglu: shapes disagree: x {tuple(x_perm.shape)}, w_gate {tuple(w_gate.shape)}, "
                         f"w_down {tuple(w_down.shape)} (want ({E}, {d}, {d_e})), counts {tuple(counts.shape)} "
                         f"(want ({E},)).")
    if not (x_perm.dtype == w_gate.dtype == w_up.dtype == w_down.dtype):
        raise ValueError(f"grouped_swiglu: x and weights must share a dtype; got {x_perm.dtype}, {w_gate.dtype}, "
                         f"{w_up.dtype}, {w_down.dtype}.")
    y, _gu = _grouped_swiglu_op(x_perm.contiguous(), counts, w_gate.contiguous(), w_up.contiguous(),
                                w_down.contiguous())
    return y
