# The demo's continual pretraining (SPEC.md section 5, scaled down): the MoE that split.py cut from the demo's
# dense base trains on the embedded corpus for ~3 minutes on 2 CPU cores. These are train.py's defaults,
# written out so the recipe reads in one place:
#   torchrun --standalone --nproc_per_node=2 train.py          (= ... train.py config/demo_moe.py)
# It needs out/demo_moe: python train.py config/demo_dense.py, then
#   python split.py --src=out/demo_dense/final --dst=out/demo_moe --num_experts=16 --top_k=4 --method=random
init_from = "out/demo_moe"
out_dir = "out/demo_moe_cpt"
data_dir = "data/embedded"

# The paper's optimiser (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, peak 2e-4, cosine to a 10% floor);
# the warmup is cut from 100 steps to 10 because the whole demo is 60 steps.
learning_rate = 2e-4
min_lr_ratio = 0.1
warmup_steps = 10
max_steps = 60
weight_decay = 0.1
grad_clip = 1.0

# Data: every domain equally often (the paper's 'sheared' weights name SlimPajama's 7 domains, which the
# embedded corpus does not have). Try dynamic_weights = True with reference_losses = "first".
weights = "uniform"
seq_len = 256
micro_batch = 4
global_batch_tokens = 8192   # 2 ranks x 4 accumulation x 4 x 256

# Beyond the paper: also match the dense parent's next-token distribution (train.py section 7), e.g.
#   --distill_from=out/demo_dense/final --distill_alpha=0.5      (loss = lm + balance + 0.5 * KL)
distill_from = None
distill_alpha = 0.0

eval_interval = 20           # per-domain validation loss + expert load
eval_windows = 8
log_interval = 5
checkpoint_interval = 30
keep_checkpoints = 2         # the last two stay: a divergence may have spoilt the newest
