# The demo's dense base: a small LLaMA trained from scratch on the embedded corpus (data/prepare.py), so
# that split.py has a real dense model to cut into experts (SPEC.md section 2). ~4 minutes on 2 CPU cores:
#   python train.py config/demo_dense.py                                  (or torchrun --nproc_per_node=2)
# Then: python split.py --src=out/demo_dense/final --dst=out/demo_moe --num_experts=16 --top_k=4 --method=random
init_from = "scratch"
out_dir = "out/demo_dense"
data_dir = "data/embedded"

# LLaMA-2's shape, scaled down: 4 layers, d=256, grouped-query attention (4 query heads share 2 key/value
# heads), SwiGLU width 688 = 16 x 43 = 8 x 86, so the split gives 16 experts of 43 or 8 of 86 neurons.
vocab_size = None            # the tokenizer's 8192, read from data/embedded/meta.json
hidden_size = 256
intermediate_size = 688
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
seq_len = 256

# From scratch a small model wants a larger learning rate than continual pretraining (SPEC.md section 5's
# 2e-4 is for a 7B model that already knows language); same AdamW, warmup and 10% cosine floor otherwise.
learning_rate = 2e-3
warmup_steps = 15
max_steps = 150              # 150 x 4096 = 614k tokens, ~9% of the corpus
weights = "proportional"     # every domain as often as its size: the base model should see all of it
micro_batch = 8
global_batch_tokens = 4096   # 16 sequences of 256 tokens per step: many small steps suit a small model

eval_interval = 50           # per-domain validation loss at steps 0, 50, 100, 150
eval_windows = 8
log_interval = 10
checkpoint_interval = 50
