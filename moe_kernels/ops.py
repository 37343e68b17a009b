"""permute / unpermute as torch.library custom ops, backed by the fastest kernel that builds here.

Three backends implement the same three functions (see moe_kernels/reference.py for their meaning):
    "cuda"       moe_kernels/permute_cuda.cu  (CUDA tensors; built only when torch.cuda.is_available())
    "cpu"        moe_kernels/permute_cpu.cpp  (CPU tensors; with experts_cpu.cpp for grouped_swiglu)
    "reference"  moe_kernels/reference.py     (plain torch, any device; also the fallback)
LLAMA_MOE_KERNELS=cuda|cpu|reference forces a backend. How the extensions are built and cached is in the
performance appendix at the end of this file.

Why custom ops (torch.library.custom_op) rather than plain Python functions: torch.compile can then
trace a model through them as single opaque nodes (register_fake tells it the output shapes), and
autograd uses the formulas of SPEC §7 below instead of differentiating through index ops.

Validation happens once, in the public functions at the bottom: shapes, dtypes and devices always (free),
values (expert ids in range, a row_map that really indexes y_perm) only where they come from outside.
A row_map or tokens_per_expert that permute itself returned is known to be valid and is not read again:
reading values of a GPU tensor is a host sync, which stalls the GPU's queue and breaks CUDA-graph capture.
Under torch.compile and during CUDA-graph capture the value checks are skipped altogether.
"""
import fcntl
import hashlib
import os
import sys
import warnings
import weakref
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from moe_kernels import reference

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)

# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _check_permute_args(x, expert_ids, num_experts):
    if not isinstance(x, Tensor) or not isinstance(expert_ids, Tensor):
        raise ValueError("permute(x, expert_ids, num_experts): x and expert_ids must be tensors.")
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"permute: x must be a (T, d) float tensor (fp32/fp64/bf16/fp16); got shape "
                         f"{tuple(x.shape)} dtype {x.dtype}. Flatten (B, S, d) to (B*S, d) first.")
    if expert_ids.dim() != 2 or expert_ids.dtype not in ID_DTYPES:
        raise ValueError(f"permute: expert_ids must be a (T, k) int32/int64 tensor (the gate's top-k indices); "
                         f"got shape {tuple(expert_ids.shape)} dtype {expert_ids.dtype}.")
    if expert_ids.shape[1] < 1:
        raise ValueError(f"permute: expert_ids has shape {tuple(expert_ids.shape)}: every token needs k >= 1 "
                         "experts (top_k = 0 would route nothing).")
    if expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"permute: x has {x.shape[0]} tokens but expert_ids has {expert_ids.shape[0]} rows.")
    if expert_ids.device != x.device:
        raise ValueError(f"permute: x is on {x.device} but expert_ids on {expert_ids.device}; move both to one device.")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"permute: num_experts must be a positive int, got {num_experts!r}.")


def _check_unpermute_args(y_perm, row_map, scores):
    if not isinstance(y_perm, Tensor) or y_perm.dim() != 2 or y_perm.dtype not in FLOAT_DTYPES:
        raise ValueError("unpermute: y_perm must be a (T*k, d) float tensor (fp32/fp64/bf16/fp16).")
    if not isinstance(row_map, Tensor) or row_map.dim() != 1 or row_map.dtype != torch.int64:
        raise ValueError("unpermute: row_map must be the (T*k,) int64 tensor returned by permute.")
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.dtype not in FLOAT_DTYPES:
        raise ValueError("unpermute: scores must be a (T, k) float tensor (the gate's scores).")
    if scores.shape[1] < 1:
        raise ValueError(f"unpermute: scores has shape {tuple(scores.shape)}: k must be >= 1 (with k = 0 the "
                         "number of tokens T cannot be recovered from row_map, and no expert output exists).")
    if not (y_perm.shape[0] == row_map.shape[0] == scores.shape[0] * scores.shape[1]):
        raise ValueError(f"unpermute: shapes disagree: y_perm {tuple(y_perm.shape)}, row_map {tuple(row_map.shape)}, "
                         f"scores {tuple(scores.shape)}; need y_perm rows == row_map length == T*k.")
    if not (y_perm.device == row_map.device == scores.device):
        raise ValueError(f"unpermute: y_perm ({y_perm.device}), row_map ({row_map.device}) and scores "
                         f"({scores.device}) must be on the same device.")


def checking_values() -> bool:
    """Whether the public functions read tensor values to validate them: not while torch.compile traces
    (there are no values then) and not while a CUDA graph is captured (a host sync would break it)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_in_range(ids: Tensor, upper: int, what: str):
    """Raise ValueError unless 0 <= ids < upper. An out-of-range id would make the kernels read or write
    outside their buffers (a crash, or on a GPU a dead CUDA context), so it is caught here first."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)  # one pass; on a GPU, one host sync
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        raise ValueError(f"{what} must lie in [0, {upper}); found values from {lo} to {hi}.")


# Tensors permute returned (row_map, tokens_per_expert), remembered by identity while they live, with
# their version counter (bumped by every in-place write): while unchanged, their values are valid by
# construction, so unpermute and grouped_swiglu need not read them again. Edited in place, they are checked.
_made_by_permute = {}  # id(tensor) -> (weakref to it, its _version then)


def _remember(t: Tensor):
    if t.is_inference():  # tensors made under torch.inference_mode have no version counter: always checked
        return
    key = id(t)
    _made_by_permute[key] = (weakref.ref(t, lambda _ref, key=key: _made_by_permute.pop(key, None)), t._version)


def made_by_permute(t: Tensor) -> bool:
    ref, version = _made_by_permute.get(id(t), (None, None))
    return ref is not None and ref() is t and not t.is_inference() and t._version == version


# ----------------------------------------------------------------------------------------------
# The custom ops (arguments checked and contiguous by now)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("llama_moe::permute", mutates_args=())
def _permute_op(x: Tensor, expert_ids: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    return _impl(x.device).permute_fwd(x, expert_ids, num_experts)


@_permute_op.register_fake
def _(x, expert_ids, num_experts):
    P = expert_ids.shape[0] * expert_ids.shape[1]
    return (x.new_empty(P, x.shape[1]), x.new_empty(P, dtype=torch.int64),
            x.new_empty(num_experts, dtype=torch.int64))


@torch.library.custom_op("llama_moe::unpermute", mutates_args=())
def _unpermute_op(y_perm: Tensor, row_map: Tensor, scores: Optional[Tensor], top_k: int) -> Tensor:
    return _impl(y_perm.device).unpermute_fwd(y_perm, row_map, scores, top_k)


@_unpermute_op.register_fake
def _(y_perm, row_map, scores, top_k):
    return y_perm.new_empty(row_map.shape[0] // top_k, y_perm.shape[1])


@torch.library.custom_op("llama_moe::unpermute_backward", mutates_args=())
def _unpermute_backward_op(grad_out: Tensor, y_perm: Tensor, row_map: Tensor, scores: Optional[Tensor],
                           top_k: int, need_y: bool, need_scores: bool) -> tuple[Tensor, Tensor]:
    return _impl(y_perm.device).unpermute_bwd(grad_out, y_perm, row_map, scores, top_k, need_y, need_scores)


@_unpermute_backward_op.register_fake
def _(grad_out, y_perm, row_map, scores, top_k, need_y, need_scores):
    grad_y = torch.empty_like(y_perm) if need_y else y_perm.new_empty(0)
    ref = y_perm if scores is None else scores
    grad_scores = torch.empty_like(scores) if (need_scores and scores is not None) else ref.new_empty(0)
    return grad_y, grad_scores


# Autograd (SPEC §7). permute: x_perm[row_map[p]] = x[p // k], so dL/dx[t] = sum_j dL/dx_perm[row_map[t*k+j]],
# which is unpermute with all scores 1. unpermute: see reference.unpermute_bwd.

def _permute_setup(ctx, inputs, output):
    _, expert_ids, _ = inputs
    _, row_map, _ = output
    ctx.save_for_backward(row_map)
    ctx.top_k = expert_ids.shape[1]


def _permute_backward(ctx, grad_x_perm, _grad_row_map, _grad_counts):
    (row_map,) = ctx.saved_tensors
    grad_x = _unpermute_op(grad_x_perm.contiguous(), row_map, None, ctx.top_k)  # (P, d) -> (T, d)
    return grad_x, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    y_perm, row_map, scores, top_k = inputs
    ctx.save_for_backward(y_perm, row_map, scores)
    ctx.top_k = top_k


def _unpermute_backward(ctx, grad_out):
    y_perm, row_map, scores = ctx.saved_tensors
    need_y, _, need_scores, _ = ctx.needs_input_grad
    grad_y, grad_scores = _unpermute_backward_op(grad_out.contiguous(), y_perm, row_map, scores, ctx.top_k,
                                                 need_y, need_scores and scores is not None)
    return (grad_y if need_y else None), None, (grad_scores if need_scores else None), None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ----------------------------------------------------------------------------------------------
# Public functions (`from moe_kernels import permute, unpermute`): the one place inputs are validated
# ----------------------------------------------------------------------------------------------

def permute(x: Tensor, expert_ids: Tensor, num_experts: int):
    """Group token rows by expert.

    x (T, d), expert_ids (T, k) int32|int64, k >= 1
      -> x_perm (T*k, d), row_map (T*k,) int64, tokens_per_expert (E,) int64.
    Pair p = t*k + j. Rows of x_perm are grouped by expert ascending, token order kept inside an expert;
    x_perm[row_map[p]] = x[p // k]; expert e owns rows tokens_per_expert[:e].sum() ... [:e+1].sum() - 1.
    """
    _check_permute_args(x, expert_ids, num_experts)
    checking = checking_values()
    if checking:
        _check_in_range(expert_ids, num_experts, "permute: expert_ids")
    x_perm, row_map, tokens_per_expert = _permute_op(x.contiguous(), expert_ids.contiguous(), num_experts)
    if checking:
        _remember(row_map), _remember(tokens_per_expert)
    return x_perm, row_map, tokens_per_expert


def unpermute(y_perm: Tensor, row_map: Tensor, scores: Tensor) -> Tensor:
    """Scatter expert outputs back to tokens: out[t] = sum_j scores[t, j] * y_perm[row_map[t*k + j]].

    y_perm (T*k, d), row_map (T*k,) from permute, scores (T, k), k >= 1 -> (T, d) in y_perm's dtype.
    """
    _check_unpermute_args(y_perm, row_map, scores)
    if checking_values() and not made_by_permute(row_map):
        _check_in_range(row_map, y_perm.shape[0], "unpermute: row_map")
    return _unpermute_op(y_perm.contiguous(), row_map.contiguous(), scores.contiguous(), scores.shape[1])


# ==============================================================================================
# Performance appendix: building the C++/CUDA extensions and choosing a backend
#
# Extensions are compiled on first use with torch.utils.cpp_extension.load into a cache folder
# ($LLAMA_MOE_KERNEL_CACHE, default ~/.cache/llama_moe_kernels/torch-<version>), so later runs only load
# the .so. A build that fails prints one warning and the reference takes over; when LLAMA_MOE_KERNELS
# names the backend, a failing build is an error instead.
# ==============================================================================================

HERE = Path(__file__).resolve().parent
BACKENDS = ("cuda", "cpu", "reference")
_built = {}         # backend name -> torch.ops namespace of the loaded extension; None = cannot be had
_build_errors = {}  # backend name -> why not


def cache_dir() -> Path:
    """Where compiled extensions live. One folder per torch version: the C++ ABI changes between them."""
    root = os.environ.get("LLAMA_MOE_KERNEL_CACHE") or Path.home() / ".cache" / "llama_moe_kernels"
    path = Path(root) / f"torch-{torch.__version__}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build_extension(name: str):
    """Compile (or load from the cache) one extension; returns its torch.ops namespace."""
    from torch.utils import cpp_extension  # imported lazily: it is slow to import and rarely needed

    if name == "cpu":
        # experts_cpu.cpp: the grouped expert SwiGLU of experts.py; decode_cpu.cpp: decode.py's batch-1 decoding
        # ops. All built into the same library.
        sources = [HERE / "permute_cpu.cpp", HERE / "experts_cpu.cpp", HERE / "decode_cpu.cpp"]
        namespace = "llama_moe_cpu"
        # -fopenmp: at::parallel_for is an OpenMP pragma in a header, so without it the loops run serially.
        # -ffp-contract=off: no fused multiply-add, so the fp32 sums match reference.py bit for bit (decode_cpu.cpp
        # asks for FMA explicitly with intrinsics: its ops promise fp32 rounding, not bit equality).
        cflags, cuda_flags, ldflags = ["-O3", "-fopenmp", "-ffp-contract=off"], [], ["-fopenmp"]
    else:
        sources, namespace = [HERE / "permute_cuda.cu"], "llama_moe_cuda"
        cflags, cuda_flags, ldflags = ["-O3"], ["-O3", "--fmad=false"], []
    # One folder per source version: checkouts with different sources (several worktrees, an older
    # commit) then each keep their own build instead of rebuilding over one another.
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in sources) + repr(cflags + cuda_flags).encode())
    build_dir = cache_dir() / f"{name}-{digest.hexdigest()[:12]}"
    build_dir.mkdir(exist_ok=True)
    # torch's builder marks a build with a `lock` file and waits forever while it exists, so a build killed
    # midway (Ctrl-C, SIGKILL) would hang every later process. We hold an OS lock (flock) around torch's: the
    # kernel drops it the moment its holder dies. Whoever holds ours knows any `lock` left there is stale.
    with open(build_dir / "builder.pid", "a+") as baton:
        try:
            fcntl.flock(baton, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            baton.seek(0)
            print(f"moe_kernels: waiting for process {baton.read().strip() or '?'} to finish building the {name} "
                  f"extension in {build_dir}", file=sys.stderr)
            fcntl.flock(baton, fcntl.LOCK_EX)
        baton.seek(0), baton.truncate(), baton.write(str(os.getpid())), baton.flush()
        (build_dir / "lock").unlink(missing_ok=True)  # left by a killed build: its builder no longer holds ours
        cpp_extension.load(
            name=f"llama_moe_permute_{name}", sources=[str(s) for s in sources], build_directory=str(build_dir),
            extra_cflags=cflags, extra_cuda_cflags=cuda_flags, extra_ldflags=ldflags,
            is_python_module=False,  # the .cpp registers its ops with TORCH_LIBRARY: no pybind11 to compile
            verbose=os.environ.get("LLAMA_MOE_KERNELS_VERBOSE") == "1",
        )
    return getattr(torch.ops, namespace)


def _get_backend(name: str, forced: bool):
    """The backend's functions, building on first use; None if it cannot be had (after one warning).
    forced=True (LLAMA_MOE_KERNELS names it) turns "cannot be had" into an error."""
    if name == "reference":
        return reference
    if name not in _built:
        _built[name] = None
        if name == "cuda" and not torch.cuda.is_available():
            # Never even try nvcc on a machine whose torch has no GPU: there would be nothing to run it on.
            _build_errors[name] = "torch.cuda.is_available() is False"
        else:
            try:
                _built[name] = _build_extension(name)
            except Exception as err:  # noqa: BLE001 - any build problem means "use the reference"
                lines = str(err).strip().splitlines() or [""]
                first_error = next((line for line in lines if "error:" in line), lines[-1])  # the compiler's
                _build_errors[name] = f"{type(err).__name__}: {first_error.strip()[:300]}"
                if not forced:
                    warnings.warn(f"kernels: the {name} extension could not be built or loaded "
                                  f"({_build_errors[name]}). Falling back to the plain-torch reference (correct "
                                  "but slower). Set LLAMA_MOE_KERNELS_VERBOSE=1 to see the compiler output, or "
                                  "LLAMA_MOE_KERNELS=reference to skip the build.", RuntimeWarning, stacklevel=3)
    if forced and _built[name] is None:
        raise RuntimeError(f"kernels: LLAMA_MOE_KERNELS={name}, but the {name} extension could not be built or "
                           f"loaded ({_build_errors[name]}). Unset it or set it to 'reference'; "
                           "LLAMA_MOE_KERNELS_VERBOSE=1 shows the compiler output.")
    return _built[name]


def backend_name(device) -> str:
    """Which backend serves tensors on `device`: the env override, else cuda ext -> cpu ext -> reference."""
    device = torch.device(device)
    forced = os.environ.get("LLAMA_MOE_KERNELS", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"LLAMA_MOE_KERNELS={forced!r}: expected one of {', '.join(BACKENDS)} (or unset).")
        if forced != "reference" and forced != device.type:
            raise ValueError(f"LLAMA_MOE_KERNELS={forced} cannot serve tensors on {device.type}; "
                             f"move the tensors or set LLAMA_MOE_KERNELS to {device.type} or reference.")
        _get_backend(forced, forced=True)
        return forced
    if device.type in ("cuda", "cpu") and _get_backend(device.type, forced=False) is not None:
        return device.type
    return "reference"


def _impl(device):
    name = backend_name(device)
    return reference if name == "reference" else _built[name]


def cpu_extension():
    """The CPU extension's ops (building it on first use), or None if it failed to build or
    LLAMA_MOE_KERNELS asks for another backend (=reference means: plain torch everywhere)."""
    forced = os.environ.get("LLAMA_MOE_KERNELS", "").strip().lower()
    if forced and forced != "cpu":
        return None
    return _get_backend("cpu", forced=forced == "cpu")

