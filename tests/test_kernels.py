"""moe_kernels/: permute, unpermute (C++ CPU extension, CUDA extension, plain-torch reference) and grouped_swiglu,
each compared with the plain-torch definitions in moe_kernels/reference.py.

The CPU extension is compiled once into the kernel cache (moe_kernels/ops.py); the first test that needs it
pays the build (about half a minute on 2 cores), every later one only loads it.
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import moe_kernels
from moe_kernels import experts, grouped_swiglu, ops, permute, reference, unpermute
from moe_kernels.reference import moe_ffn, naive_experts

ROOT = Path(__file__).resolve().parent.parent

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@pytest.fixture(params=["cpu", "reference"])
def backend(request, monkeypatch):
    """Run a test once with the C++ CPU extension and once with the plain-torch reference."""
    monkeypatch.setenv("LLAMA_MOE_KERNELS", request.param)
    return request.param


def routing(T, E, k, seed=0, distinct=True, dtype=torch.int64, device="cpu"):
    """(T, k) expert ids: distinct experts per token (what top-k gives) unless distinct=False."""
    gen = torch.Generator().manual_seed(seed)
    if distinct:
        ids = torch.rand(T, E, generator=gen).topk(k, dim=-1).indices
    else:
        ids = torch.randint(0, E, (T, k), generator=gen)
    return ids.to(device=device, dtype=dtype)


def check_permute_definition(x, ids, E, x_perm, row_map, counts):
    """The definition of permute, spelled out pair by pair."""
    T, k = ids.shape
    flat = ids.reshape(-1).long().cpu()
    assert counts.tolist() == torch.bincount(flat, minlength=E).tolist()
    rm = row_map.cpu()
    assert sorted(rm.tolist()) == list(range(T * k)), "row_map must be a permutation"
    # grouped by expert ascending, token order kept inside an expert (stable)
    expected_order = sorted(range(T * k), key=lambda p: (flat[p].item(), p))
    assert [int(rm[p]) for p in expected_order] == list(range(T * k))
    for p in range(T * k):
        assert torch.equal(x_perm[rm[p]], x[p // k])


# ---------------------------------------------------------------------------------------------
# permute / unpermute: meaning, backends, edge cases
# ---------------------------------------------------------------------------------------------

def test_cpu_extension_builds():
    # If this fails the others still pass on the reference: the warning names the compiler error.
    assert moe_kernels.backend_name("cpu") == "cpu"


def test_killed_build_leaves_no_hang():
    """A build killed midway leaves torch's `lock` file behind; torch alone would wait for it forever. The
    next process must see that no live builder holds the build and go on at once."""
    assert moe_kernels.backend_name("cpu") == "cpu"  # built, so the next load only checks and loads
    for build_dir in ops.cache_dir().glob("cpu-*"):
        (build_dir / "lock").touch()
    script = "from moe_kernels import ops; assert ops.cpu_extension() is not None"
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (13, 4, 1), (13, 4, 4), (13, 1, 1), (40, 6, 3)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_permute_matches_definition(backend, T, E, k, id_dtype):
    x = torch.randn(T, 5)
    ids = routing(T, E, k, seed=T + E + k, dtype=id_dtype)
    check_permute_definition(x, ids, E, *permute(x, ids, E))


def test_permute_expert_without_tokens(backend):
    x = torch.randn(20, 3)
    ids = routing(20, 5, 2, distinct=False) % 4  # expert 4 never chosen
    ids[ids == 2] = 0                            # expert 2 neither: a hole in the middle
    x_perm, row_map, counts = permute(x, ids, 5)
    assert counts[2] == 0 and counts[4] == 0
    check_permute_definition(x, ids, 5, x_perm, row_map, counts)


def test_non_contiguous_inputs(backend):
    big = torch.randn(9, 16)
    x = big[:, ::2]                               # (9, 8), stride 2
    ids = routing(9, 4, 2).t().contiguous().t()  # (9, 2) column-major
    assert not x.is_contiguous() and not ids.is_contiguous()
    x_perm, row_map, counts = permute(x, ids, 4)
    check_permute_definition(x, ids, 4, x_perm, row_map, counts)
    scores = torch.rand(2, 9).t()                 # non-contiguous scores
    y = unpermute(x_perm, row_map, scores)
    torch.testing.assert_close(y, x * scores.sum(1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_unpermute_is_weighted_sum(backend, dtype):
    T, E, k, d = 11, 5, 3, 7
    ids = routing(T, E, k)
    y_perm = torch.randn(T * k, d).to(dtype)
    _, row_map, _ = permute(torch.zeros(T, d, dtype=dtype), ids, E)
    scores = torch.rand(T, k)
    out = unpermute(y_perm, row_map, scores)
    expected = torch.stack([sum(scores[t, j] * y_perm[row_map[t * k + j]].double() for j in range(k))
                            for t in range(T)])
    assert out.dtype == dtype
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_extension_equals_reference_bit_for_bit(monkeypatch, dtype):
    """Same operations in the same order (products rounded, then summed j = 0..k-1, fp32 accumulation)."""
    T, E, k, d = 300, 8, 4, 67  # odd width: the vector loops' tails count too
    x = torch.randn(T, d).to(dtype)
    ids = routing(T, E, k, distinct=False)
    scores = torch.rand(T, k)
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "cpu")
    ext = [permute(x, ids, E), None]
    ext[1] = unpermute(ext[0][0], ext[0][1], scores)
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "reference")
    ref = [permute(x, ids, E), None]
    ref[1] = unpermute(ref[0][0], ref[0][1], scores)
    for a, b in zip(ext[0], ref[0]):
        assert torch.equal(a, b)
    assert torch.equal(ext[1], ref[1])


def test_backward_extension_matches_reference(monkeypatch):
    T, E, k, d = 50, 6, 2, 9
    ids = routing(T, E, k)
    grads = {}
    for name in ("cpu", "reference"):
        monkeypatch.setenv("LLAMA_MOE_KERNELS", name)
        torch.manual_seed(0)
        x = torch.randn(T, d, requires_grad=True)
        scores = torch.rand(T, k, requires_grad=True)
        x_perm, row_map, _ = permute(x, ids, E)
        out = unpermute(x_perm.sin(), row_map, scores)
        out.backward(torch.randn(T, d))
        grads[name] = (x.grad, scores.grad)
    for a, b in zip(grads["cpu"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,E,k", [(1, 3, 2), (7, 4, 1), (6, 3, 3), (5, 1, 1)])
def test_gradcheck_permute_unpermute(backend, T, E, k):
    """float64 gradcheck of the registered backward formulas (x, y_perm and scores), every edge shape."""
    ids = routing(T, E, k, seed=1)
    x = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    scores = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, ids, E)[0], (x,))
    _, row_map, _ = permute(x.detach(), ids, E)
    y_perm = torch.randn(T * k, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, s: unpermute(y, row_map, s), (y_perm, scores))
    # the composition, with a nonlinearity between so the row map matters
    assert torch.autograd.gradcheck(lambda x, s: unpermute(permute(x, ids, E)[0].tanh(), row_map, s), (x, scores))


def test_reference_autograd_agrees_with_registered_backward():
    """The reference is plain torch, so autograd can differentiate it directly: an independent check of
    the hand-written backward (SPEC §7: permute' = unweighted unpermute, unpermute' = permute + dots)."""
    T, E, k, d = 9, 4, 2, 5
    ids = routing(T, E, k)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    s = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, d, dtype=torch.float64)
    x_perm, row_map, _ = reference.permute_fwd(x, ids, E)
    reference.unpermute_fwd(x_perm.exp(), row_map, s, k).backward(g)
    direct = (x.grad.clone(), s.grad.clone())
    x.grad = s.grad = None
    x_perm, row_map, _ = permute(x, ids, E)
    unpermute(x_perm.exp(), row_map, s).backward(g)
    torch.testing.assert_close(x.grad, direct[0])
    torch.testing.assert_close(s.grad, direct[1])


def test_torch_compile_fullgraph():
    ids = routing(16, 4, 2)

    def f(x, scores):
        x_perm, row_map, counts = permute(x, ids, 4)
        return unpermute(x_perm * 2.0 + 1.0, row_map, scores), counts

    x = torch.randn(16, 8, requires_grad=True)
    scores = torch.rand(16, 2, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, counts = compiled(x, scores)
    out_ref, counts_ref = f(x, scores)
    torch.testing.assert_close(out, out_ref)
    assert torch.equal(counts, counts_ref)
    grads = torch.autograd.grad(out.sum(), (x, scores))
    grads_ref = torch.autograd.grad(out_ref.sum(), (x, scores))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Bad input: a Python ValueError naming the problem, never a crash
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [4, -1])
def test_out_of_range_expert_id(backend, bad):
    ids = routing(6, 4, 2)
    ids[3, 1] = bad
    with pytest.raises(ValueError, match="expert_ids must lie in"):
        permute(torch.randn(6, 3), ids, 4)


def test_bad_dtypes_and_shapes(backend):
    x, ids = torch.randn(6, 3), routing(6, 4, 2)
    with pytest.raises(ValueError, match="int32/int64"):
        permute(x, ids.float(), 4)
    with pytest.raises(ValueError, match="float tensor"):
        permute(x.long(), ids, 4)
    with pytest.raises(ValueError, match="tokens"):
        permute(x[:5], ids, 4)
    with pytest.raises(ValueError, match=r"\(T, d\)"):
        permute(x[None], ids, 4)
    with pytest.raises(ValueError, match="num_experts"):
        permute(x, ids, 0)
    x_perm, row_map, _ = permute(x, ids, 4)
    with pytest.raises(ValueError, match="shapes disagree"):
        unpermute(x_perm, row_map, torch.rand(6, 3))
    with pytest.raises(ValueError, match="row_map"):
        unpermute(x_perm, row_map.int(), torch.rand(6, 2))
    with pytest.raises(ValueError, match="row_map must lie in"):
        unpermute(x_perm, row_map + 1, torch.rand(6, 2))


def test_bad_backend_name(monkeypatch):
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "fast")
    with pytest.raises(ValueError, match="LLAMA_MOE_KERNELS"):
        permute(torch.randn(2, 3), routing(2, 2, 1), 2)


def test_k_zero_is_an_error_not_a_crash():
    """k = 0 used to divide by zero inside the C++ kernel (T = P / top_k: SIGFPE, the process died). Run in
    a subprocess so that a regression fails this test instead of killing the test run."""
    script = textwrap.dedent("""
        import torch, moe_kernels
        from moe_kernels import ops
        for name, call in [
            ("unpermute", lambda: moe_kernels.unpermute(torch.empty(0, 3), torch.empty(0, dtype=torch.long),
                                                    torch.empty(4, 0))),
            ("permute", lambda: moe_kernels.permute(torch.randn(4, 3), torch.empty(4, 0, dtype=torch.long), 2)),
            ("raw unpermute_fwd", lambda: ops.cpu_extension().unpermute_fwd(
                torch.empty(0, 3), torch.empty(0, dtype=torch.long), None, 0)),
            ("raw unpermute_bwd", lambda: ops.cpu_extension().unpermute_bwd(
                torch.empty(4, 3), torch.empty(0, 3), torch.empty(0, dtype=torch.long), None, 0, True, False)),
            ("raw permute_fwd", lambda: ops.cpu_extension().permute_fwd(
                torch.randn(4, 3), torch.empty(4, 0, dtype=torch.long), 2)),
        ]:
            try:
                call()
                print(name, "no error")
            except (ValueError, RuntimeError) as err:
                print(name, type(err).__name__, ">= 1" in str(err))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"crashed with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split("\n")[:5] == [
        "unpermute ValueError True", "permute ValueError True", "raw unpermute_fwd RuntimeError True",
        "raw unpermute_bwd RuntimeError True", "raw permute_fwd RuntimeError True"], proc.stdout


def test_cpu_ops_check_every_tensor_device():
    """The C++ ops are reachable directly (torch.ops.llama_moe_cpu.*): a tensor on another device (here
    "meta", which has no data) must be refused by name, never handed to a loop as a pointer."""
    ext = ops.cpu_extension()
    x, ids = torch.randn(6, 4), routing(6, 3, 2)
    x_perm, row_map, counts = permute(x, ids, 3)
    scores, g = torch.rand(6, 2), torch.randn(6, 4)
    meta = lambda t: t.to("meta")  # noqa: E731
    cases = [
        ("expert_ids", lambda: ext.permute_fwd(x, meta(ids), 3)),
        ("x", lambda: ext.permute_fwd(meta(x), ids, 3)),
        ("row_map", lambda: ext.unpermute_fwd(x_perm, meta(row_map), scores, 2)),
        ("scores", lambda: ext.unpermute_fwd(x_perm, row_map, meta(scores), 2)),
        ("y_perm", lambda: ext.unpermute_fwd(meta(x_perm), row_map, scores, 2)),
        ("grad_out", lambda: ext.unpermute_bwd(meta(g), x_perm, row_map, scores, 2, True, True)),
        ("scores", lambda: ext.unpermute_bwd(g, x_perm, row_map, meta(scores), 2, True, True)),
        ("row_map", lambda: ext.unpermute_bwd(g, x_perm, meta(row_map), scores, 2, True, True)),
    ]
    for name, call in cases:
        with pytest.raises(RuntimeError, match=f"{name} must be a CPU tensor"):
            call()
    w_gu, w_down = torch.randn(3, 10, 4), torch.randn(3, 4, 5)
    bounds = [0] + counts.cumsum(0).tolist()
    with pytest.raises(RuntimeError, match="must be on the CPU"):
        ext.experts_forward(x_perm, bounds, meta(w_gu), w_down)
    with pytest.raises(RuntimeError, match="must be on the CPU"):
        ext.experts_backward(x_perm, x_perm, bounds, torch.randn(12, 10), w_gu, meta(w_down), True, True)


def test_cpu_ops_check_values():
    """Out-of-range ids and rows through the raw ops: an error, not a write outside the buffer."""
    ext = ops.cpu_extension()
    x, ids = torch.randn(6, 4), routing(6, 3, 2)
    ids[2, 1] = 3
    with pytest.raises(RuntimeError, match=r"expert_ids\[5\] = 3 lies outside \[0, 3\)"):
        ext.permute_fwd(x, ids, 3)
    rows = torch.arange(12)
    rows[7] = -1
    with pytest.raises(RuntimeError, match=r"row_map\[7\] = -1 lies outside"):
        ext.unpermute_fwd(torch.randn(12, 4), rows, torch.rand(6, 2), 2)
    with pytest.raises(RuntimeError, match="bounds must be"):
        ext.experts_forward(torch.randn(12, 4), [0, 5, 3, 12], torch.randn(3, 10, 4), torch.randn(3, 4, 5))


def test_values_are_read_once_at_the_boundary(backend, monkeypatch):
    """permute checks the gate's ids (one host sync on a GPU); its own row_map and tokens_per_expert are
    not read again by unpermute / grouped_swiglu. Tensors from elsewhere are still checked."""
    checked = []
    real = ops._check_in_range
    monkeypatch.setattr(ops, "_check_in_range", lambda t, upper, what: (checked.append(what), real(t, upper, what)))
    monkeypatch.setattr(experts, "_check_in_range", ops._check_in_range)
    x, ids = torch.randn(8, 6), routing(8, 4, 2)
    w = [t.detach() for t in expert_weights(4, 3, 6)]
    x_perm, row_map, counts = permute(x, ids, 4)
    y = unpermute(grouped_swiglu(x_perm, counts, *w), row_map, torch.rand(8, 2))
    assert checked == ["permute: expert_ids"]
    unpermute(x_perm, row_map.clone(), torch.rand(8, 2))
    grouped_swiglu(x_perm, counts.clone(), *w)
    assert checked[1:] == ["unpermute: row_map", "grouped_swiglu: tokens_per_expert"]
    assert torch.isfinite(y).all()
    # permute's own tensors, edited in place afterwards, are no longer trusted: checked, and refused
    row_map[0] = 10 ** 6
    with pytest.raises(ValueError, match="unpermute: row_map must lie in"):
        unpermute(x_perm, row_map, torch.rand(8, 2))
    counts[0] += 1
    with pytest.raises(ValueError, match="grouped_swiglu: tokens_per_expert sum to"):
        grouped_swiglu(x_perm, counts, *w)


def test_moe_layer_under_inference_mode(backend):
    """inference_mode tensors carry no version counter: permute's own outputs are then checked, not trusted."""
    x, ids = torch.randn(8, 6), routing(8, 4, 2)
    w = [t.detach() for t in expert_weights(4, 3, 6)]
    with torch.inference_mode():
        x_perm, row_map, counts = permute(x, ids, 4)
        y = unpermute(grouped_swiglu(x_perm, counts, *w), row_map, torch.ones(8, 2))
    torch.testing.assert_close(y, reference.moe_ffn(x, ids, torch.ones(8, 2), *w))


def test_storage_offset_views(backend):
    """x = big[1:] is contiguous but starts one row into its storage (misaligned for wide loads)."""
    big, big_s = torch.randn(14, 5), torch.rand(14, 2)
    x, scores = big[1:], big_s[1:]
    assert x.storage_offset() == 5 and x.is_contiguous()
    ids = routing(13, 4, 2)
    x_perm, row_map, counts = permute(x, ids, 4)
    check_permute_definition(x, ids, 4, x_perm, row_map, counts)
    out = unpermute(x_perm, row_map, scores)
    torch.testing.assert_close(out, x * scores.sum(1, keepdim=True))


def test_zero_tokens(backend):
    """T = 0 (an empty batch shard): empty outputs, zero counts, gradients of the right shapes."""
    x = torch.randn(0, 6, requires_grad=True)
    ids, scores = torch.empty(0, 2, dtype=torch.long), torch.rand(0, 2, requires_grad=True)
    w = expert_weights(4, 3, 6)
    x_perm, row_map, counts = permute(x, ids, 4)
    assert x_perm.shape == (0, 6) and row_map.shape == (0,) and counts.tolist() == [0, 0, 0, 0]
    y = unpermute(grouped_swiglu(x_perm, counts, *w), row_map, scores)
    assert y.shape == (0, 6)
    y.sum().backward()
    assert x.grad.shape == (0, 6) and scores.grad.shape == (0, 2)
    assert all(torch.all(t.grad == 0) for t in w)


# ---------------------------------------------------------------------------------------------
# grouped_swiglu
# ---------------------------------------------------------------------------------------------

def expert_weights(E, d_e, d, dtype=torch.float32, seed=0):
    """[w_gate_up (E, 2 d_e, d), w_down (E, d, d_e)], as model.py's Experts stores them."""
    gen = torch.Generator().manual_seed(seed)
    w = [torch.randn(E, 2 * d_e, d, generator=gen) / d ** 0.5, torch.randn(E, d, d_e, generator=gen) / d_e ** 0.5]
    return [t.to(dtype).requires_grad_() for t in w]


@pytest.mark.parametrize("grouped_mm", ["0", "1"])
@pytest.mark.parametrize("counts,d_e", [([7, 0, 12, 5], 12), ([24, 0, 0, 0], 6), ([1, 1, 1, 1], 5)])
def test_grouped_swiglu_matches_naive(backend, monkeypatch, grouped_mm, counts, d_e):
    """Values and all gradients, fp32. Odd widths exercise the zero padding of the C++ and grouped_mm
    paths. grouped_mm=1 runs the torch._grouped_mm code of experts.py on the CPU (torch's fallback there)."""
    monkeypatch.setenv("LLAMA_MOE_GROUPED_MM", grouped_mm)
    counts = torch.tensor(counts)
    E, d, N = 4, 16, int(counts.sum())
    x = torch.randn(N, d, requires_grad=True)
    w = expert_weights(E, d_e, d)
    g = torch.randn(N, d)
    y = grouped_swiglu(x, counts, *w)
    grads = torch.autograd.grad(y, [x, *w], g)
    y0 = naive_experts(x, counts, *w)
    grads0 = torch.autograd.grad(y0, [x, *w], g)
    torch.testing.assert_close(y, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for gw in grads[1:]:  # experts without tokens: exactly zero weight gradient
        assert torch.all(gw[counts == 0] == 0)
    expected = "grouped_mm" if grouped_mm == "1" else ("cpu_extension" if backend == "cpu" else "loop")
    assert moe_kernels.last_expert_path() == {"forward": expected, "backward": expected}


def test_moe_pipeline_matches_plain_moe_ffn(backend):
    """permute -> grouped_swiglu -> unpermute == reference.moe_ffn (the readable loop), values and gradients."""
    T, E, k, d, d_e = 30, 5, 2, 8, 6
    ids = routing(T, E, k, seed=3)
    x = torch.randn(T, d, requires_grad=True)
    scores = torch.rand(T, k, requires_grad=True)
    w = expert_weights(E, d_e, d)
    g = torch.randn(T, d)
    x_perm, row_map, counts = permute(x, ids, E)
    y = unpermute(grouped_swiglu(x_perm, counts, *w), row_map, scores)
    y0 = moe_ffn(x, ids, scores, *w)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(y, [x, scores, *w], g), torch.autograd.grad(y0, [x, scores, *w], g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_expert_path_choice(monkeypatch):
    """grouped_mm only where torch has a native kernel: bf16, CUDA capability 9.x/10.x, torch >= 2.9.
    Decided from facts about the device, never by running it (a probe could kill the CUDA context)."""
    monkeypatch.delenv("LLAMA_MOE_GROUPED_MM", raising=False)
    monkeypatch.delenv("LLAMA_MOE_KERNELS", raising=False)
    assert moe_kernels.expert_path("cpu", torch.float32) == "cpu_extension"
    assert moe_kernels.expert_path("cpu", torch.bfloat16) == "cpu_extension"
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: None, raising=False)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(experts, "_torch_version", lambda: (2, 9))
    cuda = torch.device("cuda", 0)
    assert experts.grouped_mm_native(cuda, torch.bfloat16)
    assert moe_kernels.expert_path(cuda, torch.bfloat16) == "grouped_mm"
    assert not experts.grouped_mm_native(cuda, torch.float32)      # fp32/fp16: a host-syncing fallback
    assert not experts.grouped_mm_native(cuda, torch.float16)
    assert moe_kernels.expert_path(cuda, torch.float32) == "loop"
    capability[0] = (10, 0)
    assert experts.grouped_mm_native(cuda, torch.bfloat16)
    capability[0] = (8, 0)                                         # A100: fallback
    assert not experts.grouped_mm_native(cuda, torch.bfloat16)
    capability[0] = (9, 0)
    monkeypatch.setattr(experts, "_torch_version", lambda: (2, 8))
    assert not experts.grouped_mm_native(cuda, torch.bfloat16)
    monkeypatch.setattr(experts, "_torch_version", lambda: (2, 9))
    monkeypatch.setenv("LLAMA_MOE_GROUPED_MM", "0")
    assert moe_kernels.expert_path(cuda, torch.bfloat16) == "loop"
    monkeypatch.setenv("LLAMA_MOE_GROUPED_MM", "1")
    assert moe_kernels.expert_path("cpu", torch.float32) == "grouped_mm"


def test_grouped_path_error_propagates_and_does_not_disable_it(monkeypatch):
    """An error inside torch._grouped_mm (an OOM, say) reaches the caller, and the next call uses the
    grouped path again: nothing is swallowed, nothing is switched off for the rest of the process."""
    monkeypatch.setenv("LLAMA_MOE_GROUPED_MM", "1")
    real = torch._grouped_mm
    fail = [True]

    def flaky(*args, **kwargs):
        if fail[0]:
            fail[0] = False
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_grouped_mm", flaky)
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 8)
    w = [t.detach() for t in expert_weights(3, 8, 8)]
    with pytest.raises(torch.OutOfMemoryError):
        grouped_swiglu(x, counts, *w)
    y = grouped_swiglu(x, counts, *w)
    assert moe_kernels.last_expert_path()["forward"] == "grouped_mm"
    torch.testing.assert_close(y, naive_experts(x, counts, *w), rtol=1e-5, atol=1e-6)


def test_grouped_swiglu_gradcheck(backend):
    counts = torch.tensor([3, 0, 4])
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = expert_weights(3, 4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a, b: grouped_swiglu(x, counts, a, b), (x, *w))


def test_grouped_swiglu_bad_input():
    x = torch.randn(7, 5)
    w = [t.detach() for t in expert_weights(3, 4, 5)]
    with pytest.raises(ValueError, match="tokens_per_expert sum to"):
        grouped_swiglu(x, torch.tensor([3, 0, 3]), *w)
    with pytest.raises(ValueError, match="shapes disagree"):
        grouped_swiglu(x, torch.tensor([3, 4]), *w)
    with pytest.raises(ValueError, match="share a dtype"):
        grouped_swiglu(x.double(), torch.tensor([3, 0, 4]), *w)


def test_moe_pipeline_with_all_experts_equals_dense_ffn(backend):
    """k = E and every score 1: gate-free MoE == the dense SwiGLU FFN of the concatenated experts (SPEC §2)."""
    T, E, d_e, d = 10, 3, 4, 8
    x = torch.randn(T, d)
    w_gate_up, w_down = [t.detach() for t in expert_weights(E, d_e, d)]
    ids = torch.stack([torch.randperm(E) for _ in range(T)])  # every expert, in a scrambled slot order
    x_perm, row_map, counts = permute(x, ids, E)
    y = unpermute(grouped_swiglu(x_perm, counts, w_gate_up, w_down), row_map, torch.ones(T, E))
    w_gate, w_up = w_gate_up[:, :d_e], w_gate_up[:, d_e:]                  # (E, d_e, d) each
    dense = F.linear(F.silu(F.linear(x, w_gate.reshape(E * d_e, d))) * F.linear(x, w_up.reshape(E * d_e, d)),
                     w_down.permute(1, 0, 2).reshape(d, E * d_e))
    torch.testing.assert_close(y, dense, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------

def assert_cuda_equals_reference(monkeypatch, x, ids, scores, E):
    """permute + unpermute through the CUDA extension equal the plain-torch reference bit for bit."""
    results = {}
    for name in ("cuda", "reference"):
        monkeypatch.setenv("LLAMA_MOE_KERNELS", name)
        x_perm, row_map, counts = permute(x, ids, E)
        results[name] = (x_perm, row_map, counts, unpermute(x_perm, row_map, scores))
    for a, b in zip(results["cuda"], results["reference"]):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [512, 67])  # 16-byte vector path and the scalar fallback
def test_cuda_extension_equals_reference(monkeypatch, dtype, d):
    T, E, k = 700, 16, 4
    x = torch.randn(T, d, device="cuda").to(dtype)
    ids = routing(T, E, k, device="cuda", dtype=torch.int32)
    scores = torch.rand(T, k, device="cuda")
    assert_cuda_equals_reference(monkeypatch, x, ids, scores, E)


@needs_cuda
def test_cuda_gradcheck(monkeypatch):
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "cuda")
    ids = routing(9, 4, 2, device="cuda")
    x = torch.randn(9, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    s = torch.rand(9, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    _, row_map, _ = permute(x.detach(), ids, 4)
    assert torch.autograd.gradcheck(lambda x, s: unpermute(permute(x, ids, 4)[0].tanh(), row_map, s), (x, s))


def cuda_results(monkeypatch, x, ids, E, scores, grad, offset=0):
    """permute -> unpermute forward and backward with the CUDA extension and with the reference.
    offset=1: x and scores are given with one extra leading row and used as views x[1:], scores[1:]
    (contiguous, but starting one row into their storage)."""
    results = {}
    for name in ("cuda", "reference"):
        monkeypatch.setenv("LLAMA_MOE_KERNELS", name)
        x_leaf = x.detach().clone().requires_grad_()
        s_leaf = scores.detach().clone().requires_grad_()
        xg, sg = x_leaf[offset:], s_leaf[offset:]
        x_perm, row_map, counts = permute(xg, ids, E)
        out = unpermute(x_perm * 2, row_map, sg)
        out.backward(grad)
        results[name] = (x_perm, row_map, counts, out, x_leaf.grad[offset:], s_leaf.grad[offset:])
    return results


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [512, 67])  # 16-byte vector path and the scalar fallback
def test_cuda_backward_kernels(monkeypatch, dtype, d):
    """unpermute_bwd (grad of y_perm: a weighted permute; grad of scores: dot products) and permute's
    backward (an unweighted unpermute), against the reference."""
    T, E, k = 700, 16, 4
    x = torch.randn(T, d, device="cuda").to(dtype)
    ids = routing(T, E, k, device="cuda")
    scores, grad = torch.rand(T, k, device="cuda"), torch.randn(T, d, device="cuda").to(dtype)
    res = cuda_results(monkeypatch, x, ids, E, scores, grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res["cuda"][4], res["reference"][4], rtol=tol, atol=tol)   # dL/dx
    torch.testing.assert_close(res["cuda"][5], res["reference"][5], rtol=tol, atol=tol)   # dL/dscores (order of the sum differs)


@needs_cuda
@pytest.mark.parametrize("dtype,d", [(torch.float32, 6), (torch.bfloat16, 4), (torch.float16, 12)])
def test_cuda_8_byte_copy_path(monkeypatch, dtype, d):
    """Rows of 24, 8 and 24 bytes: a multiple of 8 but not of 16, so permute copies 8-byte words."""
    T, E, k = 333, 8, 2
    x = torch.randn(T, d, device="cuda").to(dtype)
    ids = routing(T, E, k, device="cuda", dtype=torch.int32)
    res = cuda_results(monkeypatch, x, ids, E, torch.rand(T, k, device="cuda"), torch.randn(T, d, device="cuda").to(dtype))
    for a, b in zip(res["cuda"][:4], res["reference"][:4]):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [512, 6, 67])
def test_cuda_storage_offset_views(monkeypatch, dtype, d):
    """x = big[1:]: contiguous, but its first row starts d elements into the storage, so 16-byte accesses
    may be misaligned and the kernels must pick a narrower width."""
    T, E, k = 257, 8, 2
    big = torch.randn(T + 1, d, device="cuda").to(dtype)
    ids = routing(T, E, k, device="cuda")
    big_scores = torch.rand(T + 1, k, device="cuda")
    grad = torch.randn(T + 1, d, device="cuda").to(dtype)[1:]  # the incoming gradient is a view too
    res = cuda_results(monkeypatch, big, ids, E, big_scores, grad, offset=1)
    for a, b in zip(res["cuda"][:4], res["reference"][:4]):
        assert torch.equal(a, b)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(res["cuda"][4:], res["reference"][4:]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # unpermute reading a y_perm that is itself such a view
    y_perm = torch.randn(T * k + 1, d, device="cuda").to(dtype)[1:]
    row_map, scores = res["reference"][1], big_scores[1:]
    outs = {}
    for name in ("cuda", "reference"):
        monkeypatch.setenv("LLAMA_MOE_KERNELS", name)
        outs[name] = unpermute(y_perm, row_map, scores)
    assert torch.equal(outs["cuda"], outs["reference"])


@needs_cuda
def test_cuda_zero_tokens(monkeypatch):
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "cuda")
    x = torch.randn(0, 64, device="cuda", requires_grad=True)
    scores = torch.rand(0, 2, device="cuda", requires_grad=True)
    w = [t.detach().cuda().requires_grad_() for t in expert_weights(4, 16, 64)]
    x_perm, row_map, counts = permute(x, torch.empty(0, 2, dtype=torch.long, device="cuda"), 4)
    assert x_perm.shape == (0, 64) and counts.tolist() == [0, 0, 0, 0]
    y = unpermute(grouped_swiglu(x_perm, counts, *w), row_map, scores)
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and scores.grad.shape == (0, 2)
    assert all(torch.all(t.grad == 0) for t in w)


@needs_cuda
def test_cuda_many_experts_many_tokens(monkeypatch):
    """E = 128, T = 16384, k = 4: 65,536 pairs in 256 chunks of the grouping kernel."""
    T, E, k, d = 16384, 128, 4, 64
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    ids = routing(T, E, k, device="cuda")
    scores = torch.rand(T, k, device="cuda")
    assert_cuda_equals_reference(monkeypatch, x, ids, scores, E)


@needs_cuda
def test_cuda_ops_check_every_tensor_device():
    """A CPU tensor handed to torch.ops.llama_moe_cuda.* must be refused, not read as a device pointer."""
    ext = torch.ops.llama_moe_cuda if ops.backend_name("cuda") == "cuda" else pytest.skip("no CUDA extension")
    x, ids = torch.randn(6, 4, device="cuda"), routing(6, 3, 2, device="cuda")
    x_perm, row_map, _ = permute(x, ids, 3)
    scores, g = torch.rand(6, 2, device="cuda"), torch.randn(6, 4, device="cuda")
    for name, call in [
        ("expert_ids", lambda: ext.permute_fwd(x, ids.cpu(), 3)),
        ("row_map", lambda: ext.unpermute_fwd(x_perm, row_map.cpu(), scores, 2)),
        ("scores", lambda: ext.unpermute_fwd(x_perm, row_map, scores.cpu(), 2)),
        ("grad_out", lambda: ext.unpermute_bwd(g.cpu(), x_perm, row_map, scores, 2, True, True)),
        ("row_map", lambda: ext.unpermute_bwd(g, x_perm, row_map.cpu(), scores, 2, True, True)),
        ("scores", lambda: ext.unpermute_bwd(g, x_perm, row_map, scores.cpu(), 2, True, True)),
    ]:
        with pytest.raises(RuntimeError, match=f"{name} must be on cuda"):
            call()
    with pytest.raises(RuntimeError, match="top_k must be >= 1"):
        ext.unpermute_fwd(x_perm[:0], row_map[:0], None, 0)


@needs_cuda
@pytest.mark.parametrize("counts", [[0, 300, 500, 224], [300, 500, 224, 0], [0, 1024, 0, 0]])
def test_cuda_grouped_swiglu_bf16(counts):
    """bf16 forward and backward against the plain loop, with empty first / last experts (whose weight
    gradient must be exactly zero); on sm90/sm100 with torch >= 2.9 the grouped path must be the one taken."""
    counts = torch.tensor(counts, device="cuda")
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = [t.detach().cuda().requires_grad_() for t in expert_weights(4, 128, 256, dtype=torch.bfloat16)]
    g = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    y = grouped_swiglu(x, counts, *w)
    grads = torch.autograd.grad(y, [x, *w], g)
    if experts.grouped_mm_native(x.device, torch.bfloat16):
        assert moe_kernels.last_expert_path() == {"forward": "grouped_mm", "backward": "grouped_mm"}
    # the reference in fp32 from the same bf16 values
    x32, w32 = x.detach().float().requires_grad_(), [t.detach().float().requires_grad_() for t in w]
    y0 = naive_experts(x32, counts, *w32)
    grads0 = torch.autograd.grad(y0, [x32, *w32], g.float())
    torch.testing.assert_close(y.float(), y0, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, grads0):
        torch.testing.assert_close(a.float(), b, rtol=3e-2, atol=3e-2 * float(b.abs().max()))
    for gw in grads[1:]:
        assert torch.all(gw[counts == 0] == 0)


@needs_cuda
def test_cuda_grouped_swiglu_fp32_takes_the_loop():
    """fp32 on a GPU: torch._grouped_mm would be a fallback that syncs the host per call; the loop runs."""
    counts = torch.tensor([5, 0, 7], device="cuda")
    x = torch.randn(12, 32, device="cuda")
    w = [t.detach().cuda() for t in expert_weights(3, 16, 32)]
    y = grouped_swiglu(x, counts, *w)
    assert moe_kernels.last_expert_path()["forward"] == "loop"
    torch.testing.assert_close(y, naive_experts(x, counts, *w), rtol=1e-5, atol=1e-5)


def test_cuda_never_built_without_cuda(monkeypatch):
    if CUDA:
        pytest.skip("CUDA present")
    built = []
    monkeypatch.setattr(ops, "_build_extension", lambda name: built.append(name))
    monkeypatch.setattr(ops, "_built", {})
    assert ops.backend_name("cuda") == "reference"
    assert built == []


# ---------------------------------------------------------------------------------------------
# A failing build: one clear warning and the reference takes over (an error when forced)
# ---------------------------------------------------------------------------------------------

def test_failed_build_falls_back_to_reference(monkeypatch):
    def broken(name):
        raise RuntimeError("Error building extension\npermute_cpu.cpp:1:1: error: no compiler today")
    monkeypatch.setattr(ops, "_build_extension", broken)
    monkeypatch.setattr(ops, "_built", {})
    monkeypatch.delenv("LLAMA_MOE_KERNELS", raising=False)
    with pytest.warns(RuntimeWarning, match="no compiler today.*Falling back to the plain-torch reference"):
        assert ops.backend_name("cpu") == "reference"
    x, ids = torch.randn(5, 3), routing(5, 3, 2)
    check_permute_definition(x, ids, 3, *permute(x, ids, 3))  # still correct, through the reference
    monkeypatch.setenv("LLAMA_MOE_KERNELS", "cpu")
    for _ in range(2):  # forced: an error every time, not only on the first call
        with pytest.raises(RuntimeError, match="LLAMA_MOE_KERNELS=cpu"):
            permute(x, ids, 3)


# ---------------------------------------------------------------------------------------------
# bench.py: bad settings are one-line user errors; a tiny run works end to end
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg,message", [("--top_k=0", "--top_k=0 must be >= 1"),
                                         ("--top_k=17", "--top_k=17 must be <= experts (16)"),
                                         ("--tokens=0", "--tokens=0 must be >= 1"),
                                         ("--dtype=int8", "--dtype='int8' must be one of 'auto'")])
def test_bench_refuses_bad_settings(arg, message):
    """--top_k=0 used to reach the C++ kernel and die of SIGFPE; now it is refused before any work."""
    proc = subprocess.run([sys.executable, "bench.py", arg], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_bench_tiny_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "bench.py", "--tokens=64", "--dim=16", "--experts=4", "--top_k=2",
                           "--expert_width=8", "--repeats=1", "--warmup=0", "--device=cpu", f"--json={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["expert_path"] == moe_kernels.expert_path("cpu", torch.float32)
    assert "expert matmuls:" in proc.stdout and set(results["ratios"]) >= {"pair_vs_copy", "moe_vs_dense"}


def test_bench_decode_times_a_real_moe_against_its_parent(tmp_path):
    """--what=decode --moe=<checkpoint>: a split made from --parent, timed side by side with it, same tokens."""
    import checkpoint
    from model import ModelConfig, Transformer
    from split import SplitConfig, split_model
    torch.manual_seed(0)
    dense = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    checkpoint.save_pretrained(dense, tmp_path / "dense")
    checkpoint.save_pretrained(split_model(dense, SplitConfig(num_experts=4, top_k=2)), tmp_path / "moe")
    out = tmp_path / "speed.json"
    base = [sys.executable, "bench.py", "--what=decode", "--threads=1", "--stack_layers=0", "--compile=False",
            "--prompt_tokens=4", "--new_tokens=3", "--decode_repeats=1", f"--parent={tmp_path / 'dense'}"]
    proc = subprocess.run(base + [f"--moe={tmp_path / 'moe'}", f"--json={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dense, eager", f"MoE {tmp_path / 'moe'}, eager"}
    assert rows[f"MoE {tmp_path / 'moe'}, eager"]["decode_tok_s"] > 0 and "fastest MoE" in proc.stdout
    # fp32 on the CPU decode_step runs the C++ ops, where compiling changes nothing: no compiled rows then;
    # --torch_decode adds model.py's torch code, eagerly and compiled.
    proc = subprocess.run([a for a in base if a != "--compile=False"] + [f"--moe={tmp_path / 'moe'}", f"--json={out}",
                          "--torch_decode=True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["model"].split(", ")[-1] for r in json.loads(out.read_text())["rows"]} == {
        "eager", "eager torch", "compiled torch"}
    proc = subprocess.run(base + [f"--moe={tmp_path / 'dense'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # a dense model is no MoE: refused in one line
    assert proc.returncode == 2 and "is not an MoE" in proc.stderr and proc.stderr.strip().count("\n") == 0
