"""Kernels for the MoE feed-forward (SPEC.md §7): group tokens by expert, run the experts, put them back.

    from kernels import permute, unpermute, grouped_swiglu

    x_perm, row_map, counts = permute(x, expert_ids, num_experts)        # (T, d) -> (T*k, d), by expert
    y_perm = grouped_swiglu(x_perm, counts, w_gate, w_up, w_down)       # each expert on its own rows
    y = unpermute(y_perm, row_map, scores)                               # (T*k, d) -> (T, d), weighted sum

ops.py picks the CUDA extension, the C++ CPU extension or the plain-torch reference (reference.py);
experts.py holds the grouped expert SwiGLU. `backend_name(device)` says which permute backend is in use.
"""
from kernels.experts import grouped_swiglu
from kernels.ops import backend_name, permute, unpermute

__all__ = ["permute", "unpermute", "grouped_swiglu", "backend_name"]
