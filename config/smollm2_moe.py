# The demo's continual pretraining on a real parent (README "Quick start"): SmolLM2-135M-Instruct (a pretrained
# LLaMA: 30 layers, d 576, FFN 1536, GQA 9/3, vocab 49,152), split by split.py into 16 experts of 96 neurons
# with 4 active (IndependentRandom, rescaled by 16/4 = 4), continually pretrained on the embedded corpus
# tokenized with SmolLM2's own tokenizer. demo.sh runs, in order:
#   python data/prepare.py --tokenizer=data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf --out=data/smollm2
#   python split.py --src=data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf --dst=out/smollm2_moe \
#       --num_experts=16 --top_k=4 --method=random --overwrite
#   torchrun --standalone --nproc_per_node=2 train.py config/smollm2_moe.py --overwrite=True
init_from = "out/smollm2_moe"
out_dir = "out/smollm2_moe_cpt"
data_dir = "data/smollm2"

# A split of a pretrained model starts far above its parent (the experts' sum is no longer the FFN), so the
# first steps do the most: a short warmup, then the cosine to the 10% floor (SPEC section 5's shape).
learning_rate = 1e-3
min_lr_ratio = 0.1
warmup_steps = 4
max_steps = 36
weight_decay = 0.1
grad_clip = 1.0

weights = "uniform"
seq_len = 256
micro_batch = 2
global_batch_tokens = 2048   # 2 ranks x 2 sequences x 256 tokens x 2 accumulation

eval_interval = 0            # eval.py measures before and after; no mid-run evaluation in the demo
log_interval = 5
checkpoint_interval = 18
keep_checkpoints = 2
