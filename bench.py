"""Speed of the MoE: its kernels, and batch-1 generation against its dense parent, side by side in one run.

    python bench.py                       # the kernels, CPU fp32 (bf16 on a GPU when there is one)
    python bench.py --json=out.json       # also write the figures
    python bench.py --threads=1 --tokens=8192 --dim=2048
    python bench.py --what=decode --threads=1     # generation: dense vs MoE tokens/s, prefill and decode
    python bench.py --what=decode --threads=1 --moe=out/smollm2_moe_cpt/final --stack_layers=0  # a real MoE

--what=kernels asks two questions (SPEC.md §7):
 1. permute + unpermute are pure memory movement: how close do they come to tensor.copy_ of the same bytes?
 2. the MoE layer (gate -> permute -> grouped_swiglu -> unpermute), forward + backward: how close to a
    dense SwiGLU FFN of the same active width (it does the same multiply-adds), and how much faster than
    the naive per-expert loop with boolean masks + index_add (transformers' Mixtral)?
--what=decode asks the paper's question: is the MoE cheaper to run than its parent? Batch-1 greedy generation,
prefill (the prompt, one forward) and decode (one Transformer.decode_step per token) timed apart, for
  * SmolLM2-135M (--parent, when present) and MoEs of its shapes: the demo's split (16 experts, 4 active,
    rescaled) and the carved layout (192 shared neurons + 14 experts of 96, 2 active);
  * a stack of --stack_layers layers of LLaMA-2-7B's shapes (d 4096, FFN 11008, vocab 32000), split alike.
The MoEs' neurons are partitioned at random and routed by a random gate: speed depends on the shapes alone.
Every model decodes eagerly and, with --compile, through torch.compile'd layers (model.compiled_block_decode).
fp32 on the CPU, decode_step runs the C++ decoding ops (moe_kernels/decode.py), which decode eagerly even when
compiling is asked for, so there the compiled rows are left out; --torch_decode adds rows ("..., eager torch",
"..., compiled torch") decoded by model.py's plain torch code instead, to see what the ops gain in the same run.
Timings are interleaved (A, B, C, A, B, C, ...) and the median is reported, so a neighbour stealing the
CPU for a while hurts every row alike: compare the ratios, not the absolute numbers, across runs.
"""
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from configurator import UserError, load_config, need, run_cli, setting
from fileio import atomic_write, check_output_file
import checkpoint
from gate import TopKGate
from model import ModelConfig, Transformer
from split import build_moe
from moe_kernels import backend_name, expert_path, grouped_swiglu, permute, unpermute
from moe_kernels import decode as fast_decode


@dataclass
class BenchConfig:
    what: str = setting("kernels", choices=("kernels", "decode"))  # kernels: the MoE layer's kernels; decode: batch-1 generation, dense vs MoE
    tokens: int = setting(4096, ge=1)         # T
    dim: int = setting(512, ge=1)             # d
    experts: int = setting(16, ge=1)          # E
    top_k: int = setting(4, ge=1)             # k <= E
    expert_width: int = setting(86, ge=1)     # d_e: a dense intermediate of 1376 split 16 ways; active width k*d_e = 344
    repeats: int = setting(15, ge=1)          # timed rounds (median reported)
    warmup: int = setting(3, ge=0)            # untimed rounds first (builds, allocator, caches)
    device: str = setting("cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16", "float64"))  # auto: float32 on CPU, bfloat16 on CUDA
    threads: int = setting(0, ge=0)           # CPU threads for this run; 0 = torch's default (all cores)
    seed: int = 0
    json: str = ""              # also write the figures to this file
    # --what=decode
    parent: str = "data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf"  # dense .gguf or folder; "none"/absent: skipped
    prompt_tokens: int = setting(32, ge=1)    # prefill length
    new_tokens: int = setting(64, ge=1)       # decode steps per generation
    decode_repeats: int = setting(5, ge=1)    # timed generations per model (median reported)
    moe: str = ""               # an MoE checkpoint made from --parent (e.g. the demo's): timed against it instead
    stack_layers: int = setting(2, ge=0)      # LLaMA-2-7B-shaped layers (0: no such stack); fp32: ~1.6 GB per layer pair
    compile: bool = True        # also decode the MoEs with torch.compile'd chosen-expert products
    torch_decode: bool = False  # also decode each model through model.py's torch code (LLAMA_MOE_KERNELS=reference) in the same run


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def check_config(cfg: BenchConfig):
    """What relates the settings to each other and to this machine (each one's range is declared above)."""
    need(cfg.top_k <= cfg.experts, f"--top_k={cfg.top_k} must be <= experts ({cfg.experts}): each token picks k "
         f"of the E experts")
    need(cfg.device == "cpu" or torch.cuda.is_available(), f"--device={cfg.device} is not available here; use "
         f"--device=cpu")
    need(not cfg.moe or (os.path.exists(cfg.moe) and os.path.exists(cfg.parent)), f"--moe={cfg.moe} is timed "
         f"against --parent={cfg.parent}: both must exist (python data/smollm2.py fetches the SmolLM2 parent)")
    try:
        check_output_file(cfg.json, "--json") if cfg.json else None
    except ValueError as e:
        raise UserError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(fns: dict, cfg: BenchConfig):
    """Seconds per call for each fn, run round-robin so that noise hits all of them alike.
    Returns (median, best) dicts: the median is the figure; the best shows what a quiet machine gives."""
    for _ in range(cfg.warmup):
        for fn in fns.values():
            fn()
    samples = {name: [] for name in fns}
    for _ in range(cfg.repeats):
        for name, fn in fns.items():
            sync(cfg.device)
            start = time.perf_counter()
            fn()
            sync(cfg.device)
            samples[name].append(time.perf_counter() - start)
    return ({name: statistics.median(s) for name, s in samples.items()},
            {name: min(s) for name, s in samples.items()})


def with_backend(name, fn):
    """Run fn with LLAMA_MOE_KERNELS forced to `name` (ops.py reads the variable on every call)."""
    def run():
        old = os.environ.get("LLAMA_MOE_KERNELS")
        os.environ["LLAMA_MOE_KERNELS"] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["LLAMA_MOE_KERNELS"]
            else:
                os.environ["LLAMA_MOE_KERNELS"] = old
    return run


# ----------------------------------------------------------------------------------------------
# The layers compared
# ----------------------------------------------------------------------------------------------

def make_router(cfg, dtype):
    """gate.TopKGate with the noise off: the eval-mode routing."""
    gate = TopKGate(cfg.dim, cfg.experts, cfg.top_k, noise=False).to(cfg.device, dtype)

    def route(x):
        g = gate(x)
        return g.expert_ids, g.scores, g.balance_loss
    return route, gate.parameters(), "gate.TopKGate(noise=False)"


def moe_layer(route, w_gate_up, w_down, cfg):
    """The MoE feed-forward as model.py builds it: gate -> permute -> grouped_swiglu -> unpermute."""
    scale = cfg.experts / cfg.top_k  # SPEC §2 rescaling

    def forward(x):
        ids, scores, aux = route(x)
        x_perm, row_map, counts = permute(x, ids, cfg.experts)                 # (T*k, d)
        y_perm = grouped_swiglu(x_perm, counts, w_gate_up, w_down)             # (T*k, d)
        return unpermute(y_perm, row_map, (scores * scale).to(x.dtype)), aux  # (T, d)
    return forward


def naive_moe_layer(route, w_gate_up, w_down, cfg):
    """transformers' Mixtral loop: a boolean mask per expert, gather its tokens, index_add the outputs."""
    scale = cfg.experts / cfg.top_k
    w_gate, w_up = w_gate_up.chunk(2, dim=1)                                   # 2 x (E, d_e, d), views

    def forward(x):
        ids, scores, aux = route(x)
        out = torch.zeros_like(x)
        expert_mask = F.one_hot(ids, cfg.experts).permute(2, 1, 0)             # (E, k, T)
        for e in range(cfg.experts):
            slot, token = torch.where(expert_mask[e])                          # host sync per expert
            if token.numel() == 0:
                continue
            h = x[token]                                                       # (n_e, d)
            h = F.linear(F.silu(F.linear(h, w_gate[e])) * F.linear(h, w_up[e]), w_down[e])
            out.index_add_(0, token, h * (scores[token, slot, None] * scale).to(x.dtype))
        return out, aux
    return forward


def dense_swiglu(w_gate, w_up, w_down):
    def forward(x):
        return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down), None
    return forward


def forward_backward(layer, x, grad, params):
    def run():
        for p in params:
            p.grad = None
        y, aux = layer(x)
        outputs, grads = [y], [grad]
        if aux is not None:  # the balance loss is part of the layer's training cost
            outputs.append(aux), grads.append(torch.ones_like(aux))
        torch.autograd.backward(outputs, grads)
    return run


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def main(argv):
    cfg = load_config(BenchConfig(), argv, doc=__doc__)
    check_config(cfg)
    dtype = DTYPES[cfg.dtype] if cfg.dtype != "auto" else (
        torch.bfloat16 if torch.device(cfg.device).type == "cuda" else torch.float32)
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:  # e.g. 1 when a neighbour keeps one of two cores busy (then every fork/join waits)
        torch.set_num_threads(cfg.threads)
    if cfg.what == "decode":
        return bench_decode(cfg, dtype)
    T, d, E, k, d_e = cfg.tokens, cfg.dim, cfg.experts, cfg.top_k, cfg.expert_width
    P, elt = T * k, torch.empty((), dtype=dtype).element_size()
    dev = cfg.device
    results = {"config": asdict(cfg), "dtype": str(dtype)}

    backend = backend_name(dev)  # builds the extension now, outside the timings
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    experts_path = {"grouped_mm": "torch._grouped_mm", "cpu_extension": "C++ row blocks (experts_cpu.cpp)",
                    "loop": "loop of torch.mm"}[expert_path(dev, dtype)]
    print(f"device {dev} ({threads} threads, load average {load:.1f}), {dtype}, T={T} d={d} E={E} k={k} "
          f"d_e={d_e} (active {k * d_e}); permute backend: {backend}; expert matmuls: {experts_path}")

    # ---- 1. permute + unpermute bandwidth ------------------------------------------------------
    x = torch.randn(T, d, device=dev, dtype=dtype)
    ids = torch.rand(T, E, device=dev).topk(k, dim=-1).indices            # (T, k) distinct experts per token
    scores = torch.rand(T, k, device=dev).softmax(-1)
    x_perm, row_map, counts = permute(x, ids, E)
    src, dst = torch.randn(P, d, device=dev, dtype=dtype), torch.empty(P, d, device=dev, dtype=dtype)
    # Ideal traffic: permute reads P rows and writes P rows; unpermute reads P rows and writes T rows.
    moved = (2 * P * d + P * d + T * d) * elt
    # copy_ on the same bytes: a copy reads and writes, so copy half of them each way.
    copy_src = torch.randn(moved // (2 * elt), device=dev, dtype=dtype)
    copy_dst = torch.empty_like(copy_src)
    times, best = time_side_by_side({
        "copy_": lambda: copy_dst.copy_(copy_src),
        "permute": lambda: permute(x, ids, E),
        "unpermute": lambda: unpermute(x_perm, row_map, scores),
        "permute+unpermute": lambda: unpermute(permute(x, ids, E)[0], row_map, scores),
        "reference permute+unpermute": with_backend("reference", lambda: unpermute(permute(x, ids, E)[0], row_map, scores)),
        "x[idx] gather (torch)": lambda: torch.index_select(src, 0, row_map, out=dst),
    }, cfg)
    nbytes = {"copy_": moved, "permute": 2 * P * d * elt, "unpermute": (P * d + T * d) * elt,
              "permute+unpermute": moved, "reference permute+unpermute": moved,
              "x[idx] gather (torch)": 2 * P * d * elt}
    bandwidth = {name: nbytes[name] / times[name] / 1e9 for name in times}       # GB/s at the median
    best_bw = {name: nbytes[name] / best[name] / 1e9 for name in times}          # GB/s at the best
    print(f"\n1. permute + unpermute, forward ({moved / 1e6:.1f} MB moved by the pair; GB/s = bytes read + written)")
    print(f"   {'what':34s} {'median ms':>10s} {'GB/s':>7s} {'vs copy_':>9s} | {'best ms':>8s} {'GB/s':>7s} {'vs copy_':>9s}")
    for name in times:
        print(f"   {name:34s} {times[name] * 1e3:10.3f} {bandwidth[name]:7.1f} {bandwidth[name] / bandwidth['copy_']:8.2f}x"
              f" | {best[name] * 1e3:8.3f} {best_bw[name]:7.1f} {best_bw[name] / best_bw['copy_']:8.2f}x")
    ratio_copy = bandwidth["permute+unpermute"] / bandwidth["copy_"]
    ratio_ref = times["reference permute+unpermute"] / times["permute+unpermute"]
    goal = 0.8 if torch.device(dev).type == "cpu" else 0.85
    print(f"   permute+unpermute at {ratio_copy:.2f}x copy_ bandwidth (best {best_bw['permute+unpermute'] / best_bw['copy_']:.2f}x;"
          f" goal >= {goal}x: {'met' if ratio_copy >= goal else 'MISSED'}), {ratio_ref:.1f}x faster than the plain-torch reference")
    results["bandwidth_GBps"] = bandwidth
    results["bandwidth_ms"] = {n: t * 1e3 for n, t in times.items()}
    results["bandwidth_best_ms"] = {n: t * 1e3 for n, t in best.items()}

    # ---- 2. the MoE layer, forward + backward -------------------------------------------------
    route, router_params, router_name = make_router(cfg, dtype)
    router_params = list(router_params)
    std = d ** -0.5
    w_gate_up = (torch.randn(E, 2 * d_e, d, device=dev) * std).to(dtype).requires_grad_()   # (E, 2 d_e, d)
    w_down = (torch.randn(E, d, d_e, device=dev) * (k * d_e) ** -0.5).to(dtype).requires_grad_()
    # The dense FFN of equal active width: k experts' worth of neurons.
    dense_w = [(torch.randn(k * d_e, d, device=dev) * std).to(dtype).requires_grad_(),
               (torch.randn(k * d_e, d, device=dev) * std).to(dtype).requires_grad_(),
               (torch.randn(d, k * d_e, device=dev) * (k * d_e) ** -0.5).to(dtype).requires_grad_()]
    xl = torch.randn(T, d, device=dev, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, d, device=dev, dtype=dtype)
    expert_params = [w_gate_up, w_down, xl] + router_params
    moe = moe_layer(route, w_gate_up, w_down, cfg)
    layers = {
        f"dense SwiGLU FFN, width {k * d_e}": forward_backward(dense_swiglu(*dense_w), xl, grad, dense_w + [xl]),
        "MoE layer (these kernels)": forward_backward(moe, xl, grad, expert_params),
        "MoE layer, plain torch (=reference)": with_backend("reference", forward_backward(moe, xl, grad, expert_params)),
        "naive loop, masks + index_add": forward_backward(naive_moe_layer(route, w_gate_up, w_down, cfg),
                                                          xl, grad, expert_params),
    }
    times, best = time_side_by_side(layers, cfg)
    dense_name = next(iter(layers))
    print(f"\n2. MoE layer forward + backward (router: {router_name})")
    print(f"   {'what':40s} {'median ms':>10s} {'vs dense':>9s} | {'best ms':>8s} {'vs dense':>9s}")
    for name in times:
        print(f"   {name:40s} {times[name] * 1e3:10.2f} {times[name] / times[dense_name]:8.2f}x"
              f" | {best[name] * 1e3:8.2f} {best[name] / best[dense_name]:8.2f}x")
    moe_name, naive_name = "MoE layer (these kernels)", "naive loop, masks + index_add"
    vs_dense = times[moe_name] / times[dense_name]
    vs_naive = times[naive_name] / times[moe_name]
    naive_goal = 1.5 if torch.device(dev).type == "cpu" else 2.0
    print(f"   MoE layer at {vs_dense:.2f}x dense (best {best[moe_name] / best[dense_name]:.2f}x; goal <= 1.3x: "
          f"{'met' if vs_dense <= 1.3 else 'MISSED'}); {vs_naive:.2f}x faster than the naive loop (best "
          f"{best[naive_name] / best[moe_name]:.2f}x; goal >= {naive_goal}x here: {'met' if vs_naive >= naive_goal else 'MISSED'})")
    results["layer_ms"] = {n: t * 1e3 for n, t in times.items()}
    results["layer_best_ms"] = {n: t * 1e3 for n, t in best.items()}
    results["ratios"] = {"pair_vs_copy": ratio_copy, "pair_speedup_vs_reference": ratio_ref,
                         "moe_vs_dense": vs_dense, "naive_vs_moe": vs_naive}
    results["load_average"] = [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    print(f"   (load average {results['load_average'][1]:.1f} at the end: with more runnable processes than cores,"
          f" every figure above is inflated)")
    results["expert_path"] = expert_path(dev, dtype)
    if cfg.json:
        atomic_write(cfg.json, json.dumps(results, indent=2))
        print(f"\nwrote {cfg.json}")



# ----------------------------------------------------------------------------------------------
# --what=decode: batch-1 generation, dense parent vs its MoEs
# ----------------------------------------------------------------------------------------------

def moe_of(dense, num_experts, top_k, shared=0, seed=0):
    """An MoE with the shapes of a split of `dense`: its FFN neurons partitioned at random, a random router.
    shared = 0: the paper's split, E experts of d_h / E, rescaled by E / k. shared > 0: the carved layout,
    `shared` neurons always on and E experts of the rest, unit weights (carve.py). The dense model stays."""
    d_h, L = dense.config.intermediate_size, dense.config.num_hidden_layers
    d_e = (d_h - shared) // num_experts
    g = torch.Generator().manual_seed(seed)
    plans = []
    for _ in range(L):
        perm = torch.randperm(d_h, generator=g)                                   # (d_h,)
        plans.append((list(perm[shared:shared + num_experts * d_e].view(num_experts, d_e)),
                      perm[:shared] if shared else None, None, None))
    return build_moe(dense, plans, num_experts, top_k, d_e, shared, 1.0 if shared else num_experts / top_k,
                     "unit" if shared else "softmax", seed=seed)


def decode_weight_bytes(model):
    """Bytes of weights one decode step reads: everything but the embedding table (one row is read) and,
    in an MoE layer, the experts not chosen. The bound on the MoE/dense decode ratio is the ratio of these."""
    c, total = model.config, 0
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight" and not c.tie_word_embeddings:
            continue
        if ".experts." in name:
            total += p.numel() * c.num_experts_per_tok // c.num_experts * p.element_size()
        elif "weight_noise" not in name:  # the gate's noise projection is not used when decoding
            total += p.numel() * p.element_size()
    return total


def generation(model, prompt, new_tokens, how, device, out):
    """One greedy batch-1 generation as model.generate runs it, prefill and decode timed apart; how: "eager" or
    "compiled", + " torch" for model.py's torch code (LLAMA_MOE_KERNELS=reference, read by every decode_step).
    Appends (prefill s, decode s) to out["times"] and keeps the tokens in out["tokens"]."""
    compiled, torch_code, env = how.startswith("compiled"), how.endswith(" torch"), os.environ.get("LLAMA_MOE_KERNELS")

    def run():
        P = prompt.size(1)
        model.setup_cache(1, P + new_tokens + 1)
        if torch_code:
            os.environ["LLAMA_MOE_KERNELS"] = "reference"
        try:
            sync(device)
            t0 = time.perf_counter()
            logits = model(prompt, start_pos=0, last_only=True).logits[:, -1]   # (1, vocab)
            tok = logits.argmax(-1, keepdim=True)                                # (1, 1)
            sync(device)
            t1 = time.perf_counter()
            tokens = [tok]
            for i in range(new_tokens):
                tok = model.decode_step(tok, P + i, compiled).argmax(-1, keepdim=True)
                tokens.append(tok)
            sync(device)
            out["times"].append((t1 - t0, time.perf_counter() - t1))
            out["tokens"] = torch.cat(tokens, 1).tolist()
        finally:
            model.clear_cache()
            if torch_code:  # back as it was
                os.environ.pop("LLAMA_MOE_KERNELS") if env is None else os.environ.update(LLAMA_MOE_KERNELS=env)
    return run


@torch.no_grad()
def time_models(family, models, cfg, device):
    """models: {name: (Transformer, how it decodes)}, timed round-robin -> rows of figures for the table."""
    vocab = min(m.config.vocab_size for m, _ in models.values())
    prompt = torch.randint(0, vocab, (1, cfg.prompt_tokens), generator=torch.Generator().manual_seed(cfg.seed))
    prompt = prompt.to(device)
    records = {name: {"times": []} for name in models}
    runs = {name: generation(m, prompt, cfg.new_tokens, fn, device, records[name]) for name, (m, fn) in models.items()}
    for run in runs.values():  # warm-up: allocator, caches, and torch.compile's first (compiling) call
        run()
    for r in records.values():
        r["times"].clear()
    for _ in range(cfg.decode_repeats):
        for run in runs.values():
            run()
    rows = []
    for name, (m, _) in models.items():
        prefill = statistics.median(t for t, _ in records[name]["times"])
        decode = statistics.median(t for _, t in records[name]["times"])
        rows.append({"family": family, "model": name, "params": sum(p.numel() for p in m.parameters()),
                     "decode_weight_MB": decode_weight_bytes(m) / 1e6,
                     "prefill_tok_s": cfg.prompt_tokens / prefill, "decode_tok_s": cfg.new_tokens / decode,
                     "tokens": records[name]["tokens"]})
    dense = {r["model"].split(", ", 1)[1]: r for r in rows if r["model"].startswith("dense, ")}  # mode -> row
    print(f"\n{family}: prompt {cfg.prompt_tokens} tokens, {cfg.new_tokens} greedy tokens, batch 1, median of "
          f"{cfg.decode_repeats}")
    print(f"   {'model':50s} {'params':>8s} {'MB/token':>9s} {'bound':>6s} {'prefill tok/s':>14s} {'decode tok/s':>13s}"
          f" {'decode vs dense':>16s} {'tokens':>7s}")
    for r in rows:
        base = dense[r["model"].rsplit(", ", 1)[1]]  # the dense model decoded the same way
        r["bound"] = base["decode_weight_MB"] / r["decode_weight_MB"]
        r["prefill_vs_dense"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_vs_dense"] = r["decode_tok_s"] / base["decode_tok_s"]
        # The same model decoded every way must choose the same tokens (as its eager decode).
        twin = next(q for q in rows if q["model"] == r["model"].rsplit(", ", 1)[0] + ", eager")
        same = "same" if r["tokens"] == twin["tokens"] else "DIFFER"
        print(f"   {r['model']:50s} {r['params'] / 1e6:7.1f}M {r['decode_weight_MB']:9.1f} {r['bound']:5.2f}x"
              f" {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.2f} {r['decode_vs_dense']:15.2f}x {same:>7s}")
    best = {}  # "dense", then each MoE, in order: its faster way of decoding
    for r in rows:
        kind = r["model"].rsplit(", ", 1)[0]
        if kind not in best or r["decode_tok_s"] > best[kind]["decode_tok_s"]:
            best[kind] = r
    for kind in list(best)[1:]:
        ratio = best[kind]["decode_tok_s"] / best["dense"]["decode_tok_s"]
        print(f"   fastest {kind} / fastest dense decode: {ratio:.2f}x ({best[kind]['model']} vs "
              f"{best['dense']['model']}; goal >= 1.6x on CPU fp32: {'met' if ratio >= 1.6 else 'MISSED'})")
    return rows


def both_ways(named_models, cfg):
    """{name: model} -> {"name, eager": (model, "eager"), "name, compiled": (model, "compiled")} (compiled if asked),
    and with --torch_decode the same again on model.py's torch code ("name, eager torch", ...). Where decode_step
    runs the C++ decoding ops (fp32 CPU) a compiled decode is the eager one, so that row is left out."""
    with torch.no_grad():
        cpp = fast_decode.available(next(iter(named_models.values())).lm_head.weight.new_zeros(1))
    ways = ("eager", "compiled") if cfg.compile else ("eager",)
    hows = ways[:1] if cpp else ways
    hows += tuple(f"{how} torch" for how in ways) if cfg.torch_decode else ()
    return {f"{name}, {how}": (m, how) for name, m in named_models.items() for how in hows}


def moe_variants(dense, cfg, shared_carved):
    """The dense model and its two MoE layouts, each decoded eagerly and (with --compile) compiled."""
    return both_ways({"dense": dense, "split 16 experts, 4 active": moe_of(dense, 16, 4),
                      f"carved {shared_carved} shared + 14, 2 active": moe_of(dense, 14, 2, shared_carved)},
                     cfg)


def bench_decode(cfg, dtype):
    dev = cfg.device
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {dev} ({torch.get_num_threads()} threads, load average {load:.1f}), {dtype}; "
          f"decode = Transformer.decode_step, prefill = one forward of the prompt")
    results = {"config": asdict(cfg), "dtype": str(dtype), "rows": []}
    if cfg.parent != "none" and os.path.exists(cfg.parent):
        dense = checkpoint.load_pretrained(cfg.parent, dtype=dtype, device=dev)
        if cfg.moe:  # a real MoE made from this parent (the demo's), against it
            moe = checkpoint.load_pretrained(cfg.moe, dtype=dtype, device=dev)
            need(moe.config.is_moe and moe.config.vocab_size == dense.config.vocab_size, f"--moe={cfg.moe} is not "
                 f"an MoE with --parent's vocabulary: pass one that split.py made from --parent={cfg.parent}")
            models = both_ways({"dense": dense, f"MoE {cfg.moe}": moe}, cfg)
            results["rows"] += time_models(f"{cfg.parent} and {cfg.moe}", models, cfg, dev)
            del moe
        else:
            shared = 2 * dense.config.intermediate_size // 16   # carve.py's layout: two experts' worth, 192 here
            results["rows"] += time_models(f"SmolLM2-135M ({cfg.parent})", moe_variants(dense, cfg, shared), cfg, dev)
        del dense
    elif cfg.parent != "none":
        print(f"\n--parent={cfg.parent} not found: no SmolLM2 rows (python data/smollm2.py fetches it)")
    if cfg.stack_layers:
        config = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=cfg.stack_layers, num_attention_heads=32, max_position_embeddings=4096)
        torch.manual_seed(cfg.seed)
        with torch.device(dev):
            dense = Transformer(config).to(dtype).eval()
        results["rows"] += time_models(f"LLaMA-2-7B shapes, {cfg.stack_layers} layers", moe_variants(dense, cfg, 1376),
                                       cfg, dev)
    results["load_average"] = [load, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")]
    print(f"\nbound = the dense model's weight bytes per decode step / this model's (MB/token; the embedding table "
          f"and unchosen experts are not read).\ntokens: whether this decode chose the eager decode's "
          f"tokens. Load average {results['load_average'][1]:.1f} at the end.")
    if cfg.json:
        atomic_write(cfg.json, json.dumps(results, indent=2))
        print(f"\nwrote {cfg.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
