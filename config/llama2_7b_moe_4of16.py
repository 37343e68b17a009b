# The paper's run (SPEC.md section 5): LLaMA-MoE-3.5B (4 of 16 experts) continual-pretrained on SlimPajama,
# ~200B tokens. For GPU nodes; the paper used 112 A100-80G:
#   torchrun --nnodes=14 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 --rdzv_id=moe \
#       train.py config/llama2_7b_moe_4of16.py
# Inputs (made once, beforehand):
#   python split.py --src=/models/Llama-2-7b-hf --dst=checkpoints/llama2_7b_moe_4of16 \
#       --num_experts=16 --top_k=4 --method=random                  # IndependentRandom, the paper's best
#   python data/prepare.py --jsonl='SlimPajama-627B/train/chunk*/*.jsonl.zst' \
#       --tokenizer=/models/Llama-2-7b-hf/tokenizer.model --out=data/slimpajama
init_from = "checkpoints/llama2_7b_moe_4of16"
out_dir = "out/llama2_7b_moe_4of16"
data_dir = "data/slimpajama"
weights = "sheared"                  # StaticSheared: the paper's choice (SPEC.md section 4)

seq_len = 4096
global_batch_tokens = 3584 * 4096    # ~15M tokens per step
micro_batch = 2                      # 112 GPUs: 3584 / (2 x 112) = 16 accumulation steps; 8 GPUs: 224
learning_rate = 2e-4
min_lr_ratio = 0.1                   # floor 2e-5
warmup_steps = 100
max_steps = 13600                    # 13.6k steps x 15M ~ 200B tokens
weight_decay = 0.1
beta1, beta2 = 0.9, 0.95
grad_clip = 1.0

# The paper: ZeRO-1 data parallel, bf16, activation checkpointing. FSDP2 shards more than ZeRO-1 (weights and
# gradients too), which a 6.7B-parameter MoE in fp32 master weights needs on 80 GB cards.
parallel = "fsdp"
dtype = "bfloat16"
activation_checkpointing = True

eval_interval = 170                  # ~2.5B tokens, the paper's evaluation interval
eval_windows = 32
log_interval = 1
checkpoint_interval = 200            # ~25 minutes of this run between checkpoints
