# The demo's continual pretraining on a real parent (README "Quick start"): SmolLM2-135M-Instruct (a pretrained
# LLaMA: 30 layers, d 576, FFN 1536, GQA 9/3, vocab 49,152), carved by split.py into 192 shared neurons and 14
# routed experts of 96 with 2 active (25% of the FFN per token, as the paper's 4 of 16), the router fitted to the
# data and W_down refitted (carve.py), continually pretrained on the embedded corpus in SmolLM2's own tokenizer.
# demo.sh runs, in order:
#   python data/prepare.py --tokenizer=data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf --out=data/smollm2
#   python split.py --src=data/downloads/SmolLM2-135M-Instruct.Q4_1.gguf --dst=out/smollm2_moe \
#       --method=activation --num_experts=14 --top_k=2 --router_init=fit --data=data/smollm2 --profile_seqs=48 --overwrite
#   torchrun --standalone --nproc_per_node=2 train.py config/smollm2_moe.py --overwrite=True
init_from = "out/smollm2_moe"
out_dir = "out/smollm2_moe_cpt"
data_dir = "data/smollm2"

# The carved model starts close to its parent, so the paper's peak lr (2e-4, SPEC section 5) with a short
# warm-up, then the cosine to the 10% floor. RESULTS.md ("Carving") measures 2e-4 against the 1e-3 that the
# random split needed, and the balancing choices.
learning_rate = 2e-4
min_lr_ratio = 0.1
warmup_steps = 3
max_steps = 36            # 73,728 tokens: the time eval.py and decoding saved (README, "What the demo shows") buys 6 more steps
weight_decay = 0.1
grad_clip = 1.0
balance = "loss"

weights = "uniform"
seq_len = 256
micro_batch = 4
global_batch_tokens = 2048   # 2 ranks x 4 sequences x 256 tokens, no accumulation

eval_interval = 0            # eval.py measures before and after; no mid-run evaluation in the demo
log_interval = 5
checkpoint_interval = 0    # one checkpoint, at the end (and on SIGTERM)
keep_checkpoints = 2
