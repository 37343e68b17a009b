"""
llama.cpp runs what we write: logits parity, greedy tokens, tokenizer ids, Q8_0 error, batch-1 decode speed.

Outside CI (README "Run it in llama.cpp" says how llama.cpp is built). From the dense parent GGUF it writes, under
--out: the dense model and the 16/4 random split (split.py's defaults) as our GGUFs in F32 and Q8_0, both as Hugging
Face folders (llama / mixtral, tokenizer inside) converted by llama.cpp's own convert_hf_to_gguf.py to F32 and
Q8_0; then it runs every file in llama.cpp (the llama-cpp-python binding over the library built from its sdist:
F32 KV cache, 1 thread) and compares with our model on the same file, and with the F32 logits of the same weights;
last, llama-bench decodes 128 tokens at batch 1 on 1 thread for each model.

    LLAMA_CPP_LIB_PATH=/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \
    PYTHONPATH=/work/llamacpp/llama_cpp_python-0.3.36 /work/llamacpp-venv/bin/python \
        experiments/llamacpp_parity.py --src=data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf --out=out/llamacpp
"""
import argparse
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
from split import SplitConfig, split_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Numbers: 2024-11-27, 3.14, 1e-5, 0xFF, 100,000 and 7th.   Spaces   before 42.",
    "Ελληνικά, русский текст, 日本語のテキスト 🤖",
    "<|im_start|>user\nWhat is a mixture of experts?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 32


def llama(path, n_ctx=512):
    from llama_cpp import Llama
    return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, n_threads_batch=1,
                 type_k=0, type_v=0, flash_attn=False, verbose=False)  # 0 = GGML_TYPE_F32: an F32 KV cache


def llama_run(llm, ids, steps):
    """(logits of the prompt (S, V), the greedy continuation) in llama.cpp."""
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return logits, out


@torch.no_grad()
def ours_run(model, ids, steps):
    x = torch.tensor([ids])
    logits = model(x)[0][0].float().numpy()
    out = []
    for _ in range(steps):
        nxt = int(model(x)[0][0, -1].argmax())
        out.append(nxt)
        x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return logits, out


@torch.no_grad()
def router_gap(model, ids):
    """The smallest gap, over tokens and layers, between the k-th and (k+1)-th largest router logit."""
    if not model.config.is_moe:
        return float("inf")
    gaps, k = [], model.config.num_experts_per_tok
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out: gaps.append(
        mod.gate.gate_network(inp[0].reshape(-1, inp[0].shape[-1])).float().topk(k + 1).values.diff().abs()[:, -1].min()))
        for layer in model.model.layers]
    model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return float(min(gaps))


def convert(llama_cpp_dir, folder, outtype, outfile):
    if not os.path.exists(outfile):
        subprocess.run([sys.executable, os.path.join(llama_cpp_dir, "convert_hf_to_gguf.py"), folder,
                        "--outtype", outtype, "--outfile", outfile], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return outfile


def main():
    torch.set_num_threads(2)
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", default="out/llamacpp")
    ap.add_argument("--llama_cpp", default="/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
    ap.add_argument("--router_init", default="random", help="split.py's --router_init (fit: carve.py's, from --data)")
    ap.add_argument("--data", default=None, help="sample text for --router_init=fit (data/prepare.py shards)")
    ap.add_argument("--models", default="dense,moe", help="which of dense, moe to write and check")
    ap.add_argument("--types", default="f32,q8_0", help="which GGUF types to check")
    ap.add_argument("--bench", action="store_true", help="also run llama-bench (1 thread, tg128)")
    ap.add_argument("--gguf", default="", help="check these F32 GGUFs (comma-separated; e.g. train.py's final.gguf) "
                                               "instead of writing the dense parent and its split")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tok = Tokenizer(a.src)
    files, models = {}, {}
    for path in filter(None, a.gguf.split(",")):
        files[f"{os.path.basename(path).replace(' ', '_')} ours f32"] = path
    for name in (a.models.split(",") if not a.gguf else []):
        if not os.path.exists(os.path.join(a.out, f"{name}_hf")):  # written once; delete --out to write again
            if not models:
                models["dense"] = checkpoint.load_pretrained(a.src, dtype=torch.float32)
                models["moe"] = split_model(models["dense"], SplitConfig(src=a.src, num_experts=16, top_k=4,
                                                                         router_init=a.router_init, data=a.data))
                models["moe"].source = a.src
            model = models[name]
            for gtype in ("f32", "q8_0"):
                checkpoint.save_pretrained(model, os.path.join(a.out, f"{name}_{gtype}.gguf"), format="gguf",
                                           gguf_type=gtype, overwrite=True)
            checkpoint.save_pretrained(model, os.path.join(a.out, f"{name}_hf"),
                                       format="llama" if name == "dense" else "mixtral")
        for gtype in ("f32", "q8_0"):
            files[f"{name} ours {gtype}"] = os.path.join(a.out, f"{name}_{gtype}.gguf")
        folder = os.path.join(a.out, f"{name}_hf")
        for gtype in ("f32", "q8_0"):
            files[f"{name} convert_hf_to_gguf {gtype}"] = convert(a.llama_cpp, folder, gtype,
                                                                  os.path.join(a.out, f"{name}_hf_{gtype}.gguf"))
    prompts = [tok.encode(p, bos=tok.add_bos, allowed_special="all") for p in PROMPTS]
    reference = {}  # our F32 logits and greedy tokens of each model (its F32 GGUF read back)
    print(f"{'file':34} {'ours vs llama.cpp':>18} {'greedy':>7} {'tok ids':>8} {'vs F32 max':>11} {'mean':>9} {'top-1':>6}")
    for label, path in files.items():
        name, how, gtype = label.split(" ")
        if gtype not in a.types.split(","):
            continue
        ours = checkpoint.load_pretrained(path)
        exact = checkpoint.load_pretrained(path, dtype=torch.float64) if gtype == "f32" else None
        llm = llama(path)
        diffs, same_greedy, same_ids, ref_max, ref_mean, top1, gaps, f64 = [], 0, 0, [], [], [], [], []
        for i, (text, ids) in enumerate(zip(PROMPTS, prompts)):
            lc_ids = llm.tokenize(text.encode(), add_bos=tok.add_bos, special=True)
            same_ids += lc_ids == ids
            steps = GREEDY_TOKENS if gtype == "f32" else 0  # greedy tokens compared on the F32 files
            lc_logits, lc_greedy = llama_run(llm, ids, steps)
            our_logits, our_greedy = ours_run(ours, ids, steps)
            diffs.append(np.abs(lc_logits - our_logits).max())
            if exact is not None:  # the same weights computed in float64: how close each F32 gets to exact
                with torch.no_grad():
                    x = exact(torch.tensor([ids]))[0][0].numpy()
                f64.append((np.abs(our_logits - x).max(), np.abs(lc_logits - x).max()))
            same_greedy += lc_greedy == our_greedy
            if how == "ours" and gtype == "f32":
                reference[name, i] = our_logits
                gaps.append(router_gap(ours, ids))
            ref = reference.get((name, i))
            if ref is not None:
                ref_max.append(np.abs(lc_logits - ref).max())
                ref_mean.append(np.abs(lc_logits - ref).mean())
                top1.append(np.mean(lc_logits.argmax(-1) == ref.argmax(-1)))
        greedy = f"{same_greedy:>4}/{len(prompts)}" if gtype == "f32" else "      -"
        print(f"{os.path.basename(path):34} {max(diffs):18.2e} {greedy} "
              f"{same_ids:>5}/{len(prompts)} {max(ref_max):11.4f} {np.mean(ref_mean):9.5f} {np.mean(top1):6.3f}")
        del llm
        if f64:
            print(f"{'':34} against the same weights in float64: ours (F32) within {max(o for o, _ in f64):.1e}, "
                  f"llama.cpp (F32) within {max(c for _, c in f64):.1e}")
        if gaps and ours.config.is_moe:
            print(f"{'':34} smallest gap between the k-th and (k+1)-th router logit of any token and layer: "
                  f"{min(gaps):.1e} (a tie closer than float rounding may route either way)")
    if a.bench and not a.gguf:
        bench = os.path.join(a.llama_cpp, "build", "bin", "llama-bench")
        for label in ("dense ours f32", "moe ours f32", "dense ours q8_0", "moe ours q8_0"):
            subprocess.run([bench, "-m", files[label], "-t", "1", "-p", "0", "-n", "128", "-r", "3"], check=True)


if __name__ == "__main__":
    main()
