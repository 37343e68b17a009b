"""The routed experts as one grouped SwiGLU over contiguous row slices (SPEC.md §2 and §7).

After moe_kernels.permute the (T*k, d) rows are grouped by expert: expert j owns rows
bounds[j]:bounds[j+1], bounds = [0, cumsum(tokens_per_expert)]. Expert j is a SwiGLU FFN of width d_e;
with W_gu[j] = [W_gate[j]; W_up[j]] (2 d_e, d), the gate and up projections stacked:

    [G | U] = X_j W_gu[j]^T,  H = silu(G) * U,  Y_j = H W_down[j]^T

moe_kernels/reference.py has the same thing as a plain loop (naive_experts) that the tests compare against.

Why a hand-written backward: slicing the grouped buffer and letting autograd differentiate each slice
builds a full-size zero gradient per slice and concatenates them, measured 4.7x slower than a dense FFN of
the same FLOPs on the 2-core CPU. Here forward and backward each write into one preallocated buffer per
tensor, the elementwise SwiGLU math runs once over all rows, and only the matmuls go per expert.

Which path runs the matmuls (`expert_path(device, dtype)` says, `last_expert_path()` says what ran):
  * "grouped_mm": torch._grouped_mm, one kernel for all experts, offsets stay on the device, no host
    sync. Taken only where it is a native kernel: bf16 tensors on a CUDA GPU of compute capability 9.x
    or 10.x (H100/H200, B200) with torch >= 2.9. Elsewhere torch runs it as a fallback that copies the
    offsets to the host on every call (5 host syncs per layer per step), and on older builds an expert
    without tokens can be a device-side assert, which kills the CUDA context: so no probing, no trying.
  * "cpu_extension": experts_cpu.cpp, for CPU tensors: the forward is one parallel region and the
    backward two, each thread taking whole row blocks of one expert.
  * "loop": one torch.mm per expert on its slice, written into preallocated buffers (the readable
    version of the C++; fp32/fp16 on a GPU, other GPUs, the reference backend). The tokens_per_expert ->
    bounds host sync happens once in the forward and once in the backward.
LLAMA_MOE_GROUPED_MM=0 forces the loop; =1 forces torch._grouped_mm wherever torch has it (also on the
CPU, where the tests use it to run this file's grouped code).

Weights: W_gu is one stored (E, 2 d_e, d) tensor (model.py's Experts.gate_up_proj), so that no path
concatenates weights in forward or backward (separate W_gate / W_up would cost a copy of both per forward,
~180 MB per layer at 7B, and a split of their gradient).
torch._grouped_mm needs every row stride to be a multiple of 16 bytes: for bf16 d_e % 8 == 0 (true for
common widths such as 688 or 1376). Other widths are padded with zero weights on every call (d_e = 86 ->
88), a copy of the weights that choosing such a width costs. Padding changes nothing: zero weights give
g = u = 0, silu(0) * 0 = 0, and zero columns of W_down add exact zeros.

Like permute/unpermute this is a torch.library custom op, so torch.compile can trace through it.
"""
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_kernels.ops import _check_in_range, checking_values, cpu_extension, made_by_permute

# ----------------------------------------------------------------------------------------------
# Which path
# ----------------------------------------------------------------------------------------------

GROUPED_MM_MIN_TORCH = (2, 9)
GROUPED_MM_CAPABILITIES = (9, 10)  # compute capability majors with a native kernel: sm90, sm100


def _torch_version() -> tuple:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def grouped_mm_native(device, dtype) -> bool:
    """Whether torch._grouped_mm is a native kernel for these tensors (see the module docstring)."""
    device = torch.device(device)
    if not hasattr(torch, "_grouped_mm") or dtype != torch.bfloat16 or device.type != "cuda":
        return False
    if _torch_version() < GROUPED_MM_MIN_TORCH:
        return False
    return torch.cuda.get_device_capability(device)[0] in GROUPED_MM_CAPABILITIES


def expert_path(device, dtype) -> str:
    """The path grouped_swiglu takes for tensors of this device and dtype: "grouped_mm", "cpu_extension"
    or "loop". Decided from the device, dtype and torch version alone: nothing is run to find out."""
    forced = os.environ.get("LLAMA_MOE_GROUPED_MM", "").strip()
    if forced == "1" and hasattr(torch, "_grouped_mm"):
        return "grouped_mm"
    if forced != "0" and grouped_mm_native(device, dtype):
        return "grouped_mm"
    if torch.device(device).type == "cpu" and cpu_extension() is not None:
        return "cpu_extension"
    return "loop"


_last_path = {"forward": None, "backward": None}


def last_expert_path() -> dict:
    """The paths the latest grouped_swiglu forward and backward took, e.g. {"forward": "grouped_mm", ...}."""
    return dict(_last_path)


# ----------------------------------------------------------------------------------------------
# Path "loop": one plain matmul per expert over its contiguous slice
# (experts_cpu.cpp does the same on the CPU, in two parallel regions instead of dozens of ops)
# ----------------------------------------------------------------------------------------------

def expert_bounds(tokens_per_expert: Tensor) -> list:
    """(E,) token counts -> [0, c0, c0+c1, ..., N]: the one host sync of the loop path."""
    return [0] + torch.cumsum(tokens_per_expert, 0).tolist()


def _forward_loop(x, bounds, w_gu, w_down):
    """x (N, d), w_gu (E, 2 d_e, d), w_down (E, d, d_e) -> y (N, d), gu (N, 2 d_e) = [G | U]."""
    d_e = w_down.shape[2]
    gu = x.new_empty(x.shape[0], 2 * d_e)                           # (N, 2 d_e), kept for backward
    y = x.new_empty(x.shape[0], w_down.shape[1])                    # (N, d)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b > a:
            torch.mm(x[a:b], w_gu[j].t(), out=gu[a:b])              # (n_j, d) @ (d, 2 d_e): G and U at once
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


def _backward_loop(grad_y, x, bounds, gu, w_gu, w_down, need_x, need_w):
    d_e = w_down.shape[2]
    rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    grad_h = x.new_empty(x.shape[0], d_e)                           # (N, d_e)
    for j, r in enumerate(rows):
        if r.stop > r.start:
            torch.mm(grad_y[r], w_down[j], out=grad_h[r])           # (n_j, d) @ (d, d_e)
    h, grad_gu = _swiglu_grads(grad_h, gu)
    grad_x = torch.empty_like(x) if need_x else None
    grad_wgu = grad_wd = None
    if need_w:  # one preallocated buffer per weight; an expert without tokens gets exactly zero
        grad_wgu, grad_wd = torch.zeros_like(w_gu), torch.zeros_like(w_down)
    for j, r in enumerate(rows):
        if r.stop == r.start:
            continue
        if need_x:
            torch.mm(grad_gu[r], w_gu[j], out=grad_x[r])            # [dG | dU] @ [W_gate; W_up]: (n_j, d)
        if need_w:
            torch.mm(grad_y[r].t(), h[r], out=grad_wd[j])           # (d, n_j) @ (n_j, d_e)
            torch.mm(grad_gu[r].t(), x[r], out=grad_wgu[j])         # (2 d_e, n_j) @ (n_j, d)
    return grad_x, grad_wgu, grad_wd


# ----------------------------------------------------------------------------------------------
# Path "grouped_mm": offs = ends of the expert slices, int32, on the device: no sync (and so no
# check that the counts sum to N here either: grouped_swiglu checks that once, at the boundary).
# ----------------------------------------------------------------------------------------------

def _aligned_width(d_e, dtype):
    """d_e rounded up so that a row of d_e elements is a multiple of 16 bytes."""
    multiple = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return -(-d_e // multiple) * multiple


def _pad_halves(t, d_e, dp, dim):
    """[A | B] with halves of d_e along `dim` -> [A 0 | B 0] with halves of dp (zeros appended)."""
    a, b = t.narrow(dim, 0, d_e), t.narrow(dim, d_e, d_e)
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, dp - d_e]
    return torch.cat([F.pad(a, pad), F.pad(b, pad)], dim=dim)


def _unpad_halves(t, d_e, dp, dim):
    return torch.cat([t.narrow(dim, 0, d_e), t.narrow(dim, dp, d_e)], dim=dim)


def _forward_grouped(x, offs, w_gu, w_down):
    d_e = w_down.shape[2]
    dp = _aligned_width(d_e, x.dtype)
    if dp != d_e:  # odd widths only (see the module docstring): a padded copy of the weights
        w_gu, w_down = _pad_halves(w_gu, d_e, dp, 1), F.pad(w_down, (0, dp - d_e))
    gu = torch._grouped_mm(x, w_gu.transpose(1, 2), offs=offs)                    # (N, 2 dp)
    h = F.silu(gu[:, :dp]) * gu[:, dp:]                                           # (N, dp)
    y = torch._grouped_mm(h, w_down.transpose(1, 2), offs=offs)                   # (N, d)
    return y, (gu if dp == d_e else _unpad_halves(gu, d_e, dp, 1))                # gu: (N, 2 d_e)


def _backward_grouped(grad_y, x, offs, tokens_per_expert, gu, w_gu, w_down, need_x, need_w):
    d_e = w_down.shape[2]
    dp = _aligned_width(d_e, x.dtype)
    if dp != d_e:
        w_gu, w_down = _pad_halves(w_gu, d_e, dp, 1), F.pad(w_down, (0, dp - d_e))
        gu = _pad_halves(gu, d_e, dp, 1)
    grad_h = torch._grouped_mm(grad_y, w_down, offs=offs)                         # (N, dp)
    h, grad_gu = _swiglu_grads(grad_h, gu)                                        # (N, dp), (N, 2 dp)
    grad_x = torch._grouped_mm(grad_gu, w_gu, offs=offs) if need_x else None      # (N, d)
    grad_wgu = grad_wd = None
    if need_w:
        # 2D x 2D with offsets: the groups split the shared N dimension -> one (rows, cols) block per expert.
        grad_wd = torch._grouped_mm(grad_y.t(), h, offs=offs)                     # (E, d, dp)
        grad_wgu = torch._grouped_mm(grad_gu.t(), x, offs=offs)                   # (E, 2 dp, d)
        empty = (tokens_per_expert == 0).view(-1, 1, 1)  # an expert without rows gets exactly zero, on the device
        grad_wd.masked_fill_(empty, 0)
        grad_wgu.masked_fill_(empty, 0)
        if dp != d_e:
            grad_wd, grad_wgu = grad_wd[:, :, :d_e].contiguous(), _unpad_halves(grad_wgu, d_e, dp, 1)
    return grad_x, grad_wgu, grad_wd


# ----------------------------------------------------------------------------------------------
# Custom ops with their autograd
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("llama_moe::grouped_swiglu", mutates_args=())
def _grouped_swiglu_op(x: Tensor, tokens_per_expert: Tensor, w_gu: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor]:
    path = _last_path["forward"] = expert_path(x.device, x.dtype)
    if path == "grouped_mm":
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        return _forward_grouped(x, offs, w_gu, w_down)
    bounds = expert_bounds(tokens_per_expert)
    if bounds[-1] != x.shape[0]:  # the loop paths have the bounds on the host anyway: a free check
        raise ValueError(f"grouped_swiglu: tokens_per_expert sum to {bounds[-1]} but x_perm has {x.shape[0]} rows.")
    if path == "cpu_extension":
        return cpu_extension().experts_forward(x, bounds, w_gu, w_down)
    return _forward_loop(x, bounds, w_gu, w_down)


@_grouped_swiglu_op.register_fake
def _(x, tokens_per_expert, w_gu, w_down):
    return x.new_empty(x.shape[0], w_down.shape[1]), x.new_empty(x.shape[0], 2 * w_down.shape[2])


@torch.library.custom_op("llama_moe::grouped_swiglu_backward", mutates_args=())
def _grouped_swiglu_backward_op(grad_y: Tensor, x: Tensor, tokens_per_expert: Tensor, gu: Tensor, w_gu: Tensor,
                                w_down: Tensor, need_x: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    path = _last_path["backward"] = expert_path(x.device, x.dtype)
    if path == "grouped_mm":
        offs = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
        grads = _backward_grouped(grad_y, x, offs, tokens_per_expert, gu, w_gu, w_down, need_x, need_w)
    elif path == "cpu_extension":
        grads = cpu_extension().experts_backward(grad_y, x, expert_bounds(tokens_per_expert), gu.contiguous(),
                                                 w_gu, w_down, need_x, need_w)
    else:
        grads = _backward_loop(grad_y, x, expert_bounds(tokens_per_expert), gu, w_gu, w_down, need_x, need_w)
    # custom ops return tensors, never None: an empty tensor stands for "not needed"
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_grouped_swiglu_backward_op.register_fake
def _(grad_y, x, tokens_per_expert, gu, w_gu, w_down, need_x, need_w):
    empty = x.new_empty(0)
    return ((torch.empty_like(x) if need_x else empty),
            *((torch.empty_like(w) if need_w else empty) for w in (w_gu, w_down)))


def _setup(ctx, inputs, output):
    x, tokens_per_expert, w_gu, w_down = inputs
    ctx.save_for_backward(x, tokens_per_expert, output[1], w_gu, w_down)
    # gu is returned only to be saved: no gradient flows into it, and autograd must not fill a zero
    # (N, 2 d_e) gradient for it on every backward (it did, measurably, before these two lines).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_gu):
    if grad_y is None:  # y did not reach the loss
        return None, None, None, None
    x, tokens_per_expert, gu, w_gu, w_down = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = any(ctx.needs_input_grad[2:])
    gx, gwgu, gwd = _grouped_swiglu_backward_op(grad_y.contiguous(), x, tokens_per_expert, gu, w_gu, w_down,
                                                need_x, need_w)
    return (gx if need_x else None), None, (gwgu if need_w else None), (gwd if need_w else None)


_grouped_swiglu_op.register_autograd(_backward, setup_context=_setup)

# Autocast does not reach inside custom ops: without this, under torch.autocast(bf16) the expert matmuls
# (most of an MoE model's FLOPs) would run in fp32, and the C++ kernel would see autocast half-enabled.
# Registered, the op's float inputs are cast to bf16 and it runs with autocast off, like a matmul would.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("llama_moe::grouped_swiglu", _device, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Public functions: the one place inputs are validated
# ----------------------------------------------------------------------------------------------

def grouped_swiglu(x_perm: Tensor, tokens_per_expert: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """Each expert's SwiGLU on its own contiguous rows, with the gate and up weights stored as one tensor.

    x_perm (N, d) grouped by expert (from permute), tokens_per_expert (E,) (sum N),
    w_gate_up (E, 2 d_e, d) = [W_gate; W_up] along dim 1, w_down (E, d, d_e) -> (N, d).
    Differentiable in x and the weights.
    """
    if x_perm.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3 or w_gate_up.shape[1] % 2:
        raise ValueError(f"grouped_swiglu: need x (N, d), w_gate_up (E, 2 d_e, d), w_down (E, d, d_e); got "
                         f"{tuple(x_perm.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}.")
    E, d_e, d = w_gate_up.shape[0], w_gate_up.shape[1] // 2, w_gate_up.shape[2]
    if x_perm.shape[1] != d or tuple(w_down.shape) != (E, d, d_e) or tokens_per_expert.shape != (E,):
        raise ValueError(f"grouped_swiglu: shapes disagree: x {tuple(x_perm.shape)}, w_gate_up "
                         f"{tuple(w_gate_up.shape)}, w_down {tuple(w_down.shape)} (want ({E}, {d}, {d_e})), "
                         f"tokens_per_expert {tuple(tokens_per_expert.shape)} (want ({E},)).")
    if not (x_perm.dtype == w_gate_up.dtype == w_down.dtype):
        raise ValueError(f"grouped_swiglu: x and weights must share a dtype; got {x_perm.dtype}, "
                         f"{w_gate_up.dtype}, {w_down.dtype}.")
    if not (x_perm.device == w_gate_up.device == w_down.device == tokens_per_expert.device):
        raise ValueError(f"grouped_swiglu: x ({x_perm.device}), the weights ({w_gate_up.device}, {w_down.device}) "
                         f"and tokens_per_expert ({tokens_per_expert.device}) must be on one device.")
    if tokens_per_expert.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"grouped_swiglu: tokens_per_expert must be int32/int64, got {tokens_per_expert.dtype}.")
    if checking_values() and not made_by_permute(tokens_per_expert):
        # counts from elsewhere: read them once here (a host sync), so the grouped path need not
        _check_in_range(tokens_per_expert, x_perm.shape[0] + 1, "grouped_swiglu: tokens_per_expert")
        total = int(tokens_per_expert.sum())
        if total != x_perm.shape[0]:
            raise ValueError(f"grouped_swiglu: tokens_per_expert sum to {total} but x_perm has "
                             f"{x_perm.shape[0]} rows.")
    y, _gu = _grouped_swiglu_op(x_perm.contiguous(), tokens_per_expert, w_gate_up.contiguous(), w_down.contiguous())
    return y
