"""Kernels for the MoE feed-forward (SPEC.md §7): group tokens by expert, run the experts, put them back.

    from moe_kernels import permute, unpermute, grouped_swiglu

    x_perm, row_map, tokens_per_expert = permute(x, expert_ids, num_experts)  # (T, d) -> (T*k, d), by expert
    y_perm = grouped_swiglu(x_perm, tokens_per_expert, w_gate_up, w_down)  # each expert on its own rows
    y = unpermute(y_perm, row_map, scores)                                     # (T*k, d) -> (T, d), weighted sum

The same computation in plain torch, as a reader's reference: moe_kernels/reference.py (moe_ffn).
ops.py picks the CUDA extension, the C++ CPU extension or the plain-torch reference; `backend_name(device)`
says which permute backend is in use. experts.py holds the grouped expert SwiGLU; `expert_path(device,
dtype)` says which way its matmuls run (torch._grouped_mm, the C++ CPU kernel or a loop of torch.mm).
"""
from moe_kernels.experts import expert_path, grouped_swiglu, last_expert_path
from moe_kernels.ops import backend_name, permute, unpermute

__all__ = ["permute", "unpermute", "grouped_swiglu", "backend_name", "expert_path",
           "last_expert_path"]
