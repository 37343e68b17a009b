#!/usr/bin/env bash
# The main job, end to end, on the embedded corpus (README "Quick start"): set-up, then
#   corpus -> dense base -> split into 16 experts (4 active) -> continual pretraining (torchrun, 2 ranks) -> eval.
# Run from anywhere: `bash demo.sh`. Each stage prints its progress; the whole run takes ~15 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")"
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

stage "set-up: Python packages (torch CPU build, sentencepiece, tiktoken, safetensors, ...)"
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

stage "1/5 corpus: data/prepare.py -> data/embedded/ (tokenizer, token shards, eval tasks)"
python data/prepare.py

stage "2/5 dense base: train.py config/demo_dense.py -> out/demo_dense/final"
torchrun --standalone --nproc_per_node=2 train.py config/demo_dense.py --overwrite=True

stage "3/5 split: 16 experts, 4 active, IndependentRandom, rescale 4 -> out/demo_moe"
python split.py --src out/demo_dense/final --dst out/demo_moe --num_experts 16 --top_k 4 --method random --overwrite

stage "4/5 continual pretraining: torchrun, 2 processes (DDP over gloo) -> out/demo_moe_cpt"
torchrun --standalone --nproc_per_node=2 train.py --overwrite=True

stage "5/5 evaluation: per-domain loss, tasks, routing"
python eval.py --ckpt out/demo_moe_cpt/final --data data/embedded --out out/demo_eval.json

stage "done in $(( $(date +%s) - start ))s"
