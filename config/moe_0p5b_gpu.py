# A ~0.5B-parameter MoE (16 experts, top-4) from scratch, for bf16 throughput (tokens/s, MFU) on one GPU:
#   python train.py config/moe_0p5b_gpu.py                 # or torchrun --nproc_per_node=8 ... --parallel=fsdp
# 502M parameters, 226M active per token (attention + 4 of 16 experts + gate + lm_head). A few steps on
# the embedded corpus (its 8192 ids fit the 32000-entry vocabulary), no exports: a speed measurement.
init_from = "scratch"
out_dir = "out/moe_0p5b_gpu"
data_dir = "data/embedded"
vocab_size = 32000
hidden_size = 1536
intermediate_size = 4096             # the dense width the experts would be cut from
num_hidden_layers = 16
num_attention_heads = 12             # head_dim 128
num_key_value_heads = 4
num_experts = 16
num_experts_per_tok = 4
expert_intermediate_size = 256       # 4096 / 16: 4 active experts = a quarter of the dense FFN

seq_len = 2048
micro_batch = 8
global_batch_tokens = 65536          # 32 sequences: 4 accumulation steps on one GPU
learning_rate = 3e-4
warmup_steps = 5
max_steps = 30
dtype = "bfloat16"
parallel = "fsdp"

eval_interval = 0
log_interval = 5
checkpoint_interval = 0
export = False
