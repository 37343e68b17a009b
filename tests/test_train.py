"""Tests for train.py: the training loop of SPEC.md section 5, on CPU with gloo.

Everything runs on a tiny MoE (d=32, 2 layers, 4 experts, top-2) and tiny shards this file writes in the
format data/prepare.py writes, so nothing depends on data/prepare.py. One-process runs call train.main in this
process; 2-process runs go through torchrun exactly as users launch them. The multi-process runs share one
module fixture (4 torchrun launches) and are marked `slow`; CI still runs them.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train
import checkpoint
import train_state
from configurator import UserError
from model import Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--init_from=scratch", "--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2",
        "--num_attention_heads=4", "--num_key_value_heads=2", "--num_experts=4", "--num_experts_per_tok=2",
        "--expert_intermediate_size=16", "--seq_len=16", "--micro_batch=2", "--global_batch_tokens=64",
        "--learning_rate=1e-2", "--warmup_steps=2", "--log_interval=1", "--eval_windows=2",
        "--checkpoint_interval=0", "--export=False"]
# Dynamic domain weights with eval every 2 steps: the weight update must agree across ranks too.
DYNAMIC = ["--dynamic_weights=True", "--reference_losses='first'", "--eval_interval=2"]
STEPS = 5


def make_shards(root):
    """Two domains of 3000 train / 400 val tokens, vocab 64, meta.json as data/prepare.py writes it."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    meta = {"vocab_size": 64, "dtype": "uint16", "bos_id": 1, "eos_id": 2, "tokenizer": "tokenizer.model",
            "domains": {}}
    for k, name in enumerate(("prose", "code")):
        info = {}
        for split, n in (("train", 3000), ("val", 400)):
            # a learnable pattern per domain (ids 3..32 or 33..62), with a little noise
            tokens = (3 + 30 * k + (np.arange(n) * (k + 2)) % 29 + rng.integers(0, 2, n)).astype(np.uint16)
            tokens.tofile(os.path.join(root, f"{name}.{split}.bin"))
            info.update({f"{split}_tokens": n, f"{split}_docs": 1})
        meta["domains"][name] = info
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


def records(out_dir, kind="train"):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def losses(out_dir):
    """step -> (loss, balance loss), the last record per step (a resumed run appends to the same log)."""
    return {r["step"]: (r["loss"], r["balance_loss"]) for r in records(out_dir)}


def torchrun(args, nproc=2, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "train.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """The reference: one process, 2 accumulation steps (= 2 micro-batch slots), 5 steps."""
    out = str(tmp_path_factory.mktemp("single"))
    result = train.main(TINY + DYNAMIC + [f"--data_dir={data}", f"--out_dir={out}", f"--max_steps={STEPS}",
                                          "--export=True"])
    assert result["step"] == STEPS and result["exit_code"] == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    """2 processes: DDP and FSDP2 uninterrupted, and FSDP2 stopped at step 2 then resumed to 5."""
    outs = {name: str(tmp_path_factory.mktemp(name)) for name in ("ddp", "fsdp", "fsdp_resumed")}
    outs["elastic"] = str(tmp_path_factory.mktemp("elastic") / "run")
    common = TINY + DYNAMIC + [f"--data_dir={data}"]
    torchrun(common + [f"--out_dir={outs['ddp']}", "--parallel=ddp", f"--max_steps={STEPS}"])
    torchrun(common + [f"--out_dir={outs['fsdp']}", "--parallel=fsdp", f"--max_steps={STEPS}"])
    torchrun(common + [f"--out_dir={outs['fsdp_resumed']}", "--parallel=fsdp", "--max_steps=2",
                       f"--lr_decay_steps={STEPS}"])
    shutil.copytree(outs["fsdp_resumed"], outs["elastic"])  # the step-2 checkpoint, for a 1-process resume
    torchrun(common + [f"--out_dir={outs['fsdp_resumed']}", "--parallel=fsdp", "--resume",
                       f"--max_steps={STEPS}"])
    return outs


# ---------------------------------------------------------------------------------------------------------
# The learning-rate schedule (SPEC.md section 5)

def test_lr_schedule_matches_the_formula():
    peak, warmup, decay, ratio = 2e-4, 100, 1000, 0.1
    floor = ratio * peak

    def lr(s):
        return train.get_lr(s, peak, warmup, decay, ratio)

    assert lr(0) == pytest.approx(peak / 100, rel=1e-12)            # linear warmup from peak / warmup
    assert lr(49) == pytest.approx(peak * 50 / 100, rel=1e-12)
    assert lr(99) == pytest.approx(peak, rel=1e-12)                 # warmup ends at the peak
    assert lr(100) == pytest.approx(peak, rel=1e-12)                # the cosine starts at the peak
    assert lr(550) == pytest.approx((peak + floor) / 2, rel=1e-12)  # half way: the mean of peak and floor
    for s in (137, 300, 777, 999):
        expected = floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (s - warmup) / (decay - warmup)))
        assert lr(s) == pytest.approx(expected, rel=1e-12)
    assert lr(1000) == pytest.approx(2e-5, rel=1e-12)               # the 10% floor (paper: 2e-5)
    assert lr(5000) == pytest.approx(2e-5, rel=1e-12)               # and it stays there
    values = [lr(s) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_logged_lr_is_the_schedule(single):
    for r in records(single):
        assert r["lr"] == train.get_lr(r["step"] - 1, 1e-2, 2, STEPS, 0.1)


def test_active_params_counts_k_of_e_experts():
    cfg = train.config_from_args(TINY)
    mc = train.scratch_config(cfg, {"vocab_size": 64})
    model = Transformer(mc)
    every = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert train.active_params(mc) == every - experts * (4 - 2) // 4
    dense = train.scratch_config(train.config_from_args(TINY + ["--num_experts=0"]), {"vocab_size": 64})
    model = Transformer(dense)
    assert train.active_params(dense) == sum(p.numel() for p in model.parameters()) - 64 * 32


def test_weight_decay_skips_one_dimensional_parameters():
    cfg = train.config_from_args(TINY)
    model = Transformer(train.scratch_config(cfg, {"vocab_size": 64}))
    decay, no_decay = train.make_optimizer(cfg, model).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert "model.layers.0.mlp.gate.gate_network.weight" in decayed and "model.layers.1.mlp.experts.gate_up_proj" in decayed


# ---------------------------------------------------------------------------------------------------------
# One process: a run, its exports, and exact resumption

def test_single_run_learns_and_exports(single):
    got = losses(single)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS][0] < got[1][0] - 0.2  # a learnable pattern: the loss falls
    evals = records(single, "eval")
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    for e in evals:
        assert set(e["val_loss"]) == {"prose", "code"} and sum(e["weights"].values()) == pytest.approx(1)
        assert len(e["expert_load_min_max"]) == (0 if e["step"] == 0 else 2)  # (min, max) per MoE layer
    assert evals[-1]["weights"] != evals[0]["weights"]  # dynamic weights moved
    ckpt = train_state.latest_checkpoint(single)
    assert ckpt.endswith("ckpt_0000005") and not any(n.endswith(".tmp") for n in os.listdir(single))
    final = checkpoint.load_pretrained(os.path.join(single, "final"))
    saved = checkpoint.load_pretrained(os.path.join(ckpt, "model"))
    for (n, a), (_, b) in zip(final.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), n
    with open(os.path.join(single, "final_mixtral", "config.json")) as f:
        assert json.load(f)["model_type"] == "mixtral"


def test_resume_is_bit_identical_one_process(single, data, tmp_path):
    out = str(tmp_path / "resumed")
    args = TINY + DYNAMIC + [f"--data_dir={data}", f"--out_dir={out}"]
    first = train.main(args + ["--max_steps=2", f"--lr_decay_steps={STEPS}"])
    assert first["step"] == 2
    second = train.main(args + ["--resume", f"--max_steps={STEPS}"])
    assert second["step"] == STEPS
    assert losses(out) == losses(single)  # every step's loss and balance loss, exactly


def test_bias_balancing_resumes_bit_identically(data, tmp_path):
    """--balance=bias (loss-free balancing): the bias moves every step, is saved with the model, and a run
    stopped at step 2 and resumed matches a straight run exactly, biases included."""
    args = TINY + [f"--data_dir={data}", "--balance=bias", "--bias_rate=0.05"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main(args + [f"--out_dir={straight}", f"--max_steps={STEPS}"])
    train.main(args + [f"--out_dir={resumed}", "--max_steps=2", f"--lr_decay_steps={STEPS}"])
    train.main(args + [f"--out_dir={resumed}", "--resume", f"--max_steps={STEPS}"])
    assert losses(resumed) == losses(straight)
    a, b = (checkpoint.load_pretrained(os.path.join(train_state.latest_checkpoint(o), "model"))
            for o in (straight, resumed))
    biases = [m.gate.expert_bias for m in a.moe_layers()]
    assert any(bool(x.any()) for x in biases)                     # it moved (by multiples of the rate)
    assert all(torch.equal(x, m.gate.expert_bias) for x, m in zip(biases, b.moe_layers()))
    rec = records(straight)[-1]
    assert len(rec["experts_in_use"]) == 2 and all(1 <= n <= 4 for n in rec["experts_in_use"])


# ---------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo): same global batch -> same losses; exact resumption under FSDP2

@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(parallel, single, two_ranks):
    ref, got = losses(single), losses(two_ranks[parallel])
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step][0] == pytest.approx(ref[step][0], rel=1e-5), step
        assert got[step][1] == pytest.approx(ref[step][1], rel=1e-4, abs=1e-7), step


@pytest.mark.slow
def test_fsdp_resume_is_bit_identical_two_processes(two_ranks):
    assert losses(two_ranks["fsdp_resumed"]) == losses(two_ranks["fsdp"])
    ckpt = train_state.latest_checkpoint(two_ranks["fsdp_resumed"])
    assert sorted(os.listdir(ckpt)) == ["model", "optimizer.pt", "rank0.pt", "rank1.pt", "state.json"]


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_in_one_process(single, two_ranks, data):
    """Data streams belong to micro-batch slots, not ranks: one process picks up both ranks' streams."""
    out = two_ranks["elastic"]
    result = train.main(TINY + DYNAMIC + [f"--data_dir={data}", f"--out_dir={out}", "--resume",
                                          f"--max_steps={STEPS}"])
    assert result["step"] == STEPS
    ref, got = losses(single), losses(out)
    for step in range(1, STEPS + 1):
        assert got[step][0] == pytest.approx(ref[step][0], rel=1e-5), step


# ---------------------------------------------------------------------------------------------------------
# Crashes and signals

def start(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) early:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for train.py")
        time.sleep(0.1)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(data, tmp_path):
    out = str(tmp_path / "killed")
    args = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=3", "--checkpoint_interval=1",
                   "--eval_interval=0"]
    proc = start(args, {"TRAIN_TEST_CHECKPOINT_PAUSE": "2:120"})  # checkpoint 2 stalls half written
    paused = os.path.join(out, f"ckpt_0000002.tmp{proc.pid}", "PAUSED")
    wait_for(lambda: os.path.exists(paused), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed = losses(out)
    assert train_state.latest_checkpoint(out) == os.path.join(out, "ckpt_0000001")
    ckpt = train_state.latest_checkpoint(out)
    checkpoint.load_pretrained(os.path.join(ckpt, "model"))  # the previous checkpoint loads
    with open(os.path.join(ckpt, "state.json")) as f:
        assert json.load(f)["step"] == 1
    # ... and continues exactly: step 2 again gives the loss the killed run logged before it died.
    result = train.main(args + ["--resume", "--max_steps=2"])
    assert result["step"] == 2 and losses(out)[2] == killed[2]
    # the killed run's temporary is gone (its process is dead) and the last 2 checkpoints are kept
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_0000001", "ckpt_0000002"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(data, tmp_path):
    out = str(tmp_path / "stopped")
    proc = start(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=100000", "--eval_interval=0"])
    wait_for(lambda: os.path.exists(os.path.join(out, "log.jsonl")) and records(out), proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "stopped by SIGTERM" in output
    step = max(losses(out))
    assert train_state.latest_checkpoint(out) == os.path.join(out, f"ckpt_{step:07d}")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(data, tmp_path):
    out = str(tmp_path / "nan")
    # A dense model and an absurd learning rate: the first update blows the weights up to ~1e30.
    args = TINY + [f"--data_dir={data}", f"--out_dir={out}", "--num_experts=0", "--learning_rate=1e30",
                   "--warmup_steps=1", "--grad_clip=0", "--max_steps=5", "--checkpoint_interval=1",
                   "--eval_interval=0"]
    with pytest.raises(FloatingPointError, match=r"at step 2\b.*ckpt_0000001"):
        train.main(args)
    assert train_state.latest_checkpoint(out) == os.path.join(out, "ckpt_0000001")


# ---------------------------------------------------------------------------------------------------------
# Bad input: each a clear error that names the problem and the fix

def test_unknown_key_suggests_close_ones(tmp_path):
    with pytest.raises(UserError, match="learning_rate"):
        train.config_from_args(["--learning_rat=1e-3"])
    config = tmp_path / "typo.py"
    config.write_text("import math\nmax_step = 10\n")
    with pytest.raises(UserError, match="did you mean --max_steps"):
        train.config_from_args([str(config)])
    with pytest.raises(UserError, match="must be float"):
        train.config_from_args(["--learning_rate=fast"])


def test_config_file_then_overrides(tmp_path):
    config = tmp_path / "c.py"
    config.write_text("import math\n_private = 1\nlearning_rate = 1e-3\nmax_steps = 10\n")
    cfg = train.config_from_args([str(config), "--max_steps=20", "--compile", "--weights=a=0.5,b=0.5"])
    assert (cfg.learning_rate, cfg.max_steps, cfg.compile, cfg.weights) == (1e-3, 20, True, "a=0.5,b=0.5")
    assert train.config_from_args(["--resume"]).init_from == "resume"


def test_batch_that_does_not_divide(data, tmp_path):
    with pytest.raises(UserError, match=r"multiple of micro_batch \* seq_len \* world_size"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}", "--global_batch_tokens=100"])
    with pytest.raises(UserError, match="2 \\* 16 \\* 3 = 96"):  # and across ranks: 64 tokens over 3 ranks
        train.batch_layout(train.config_from_args(TINY), 3)


def test_resume_without_a_checkpoint(data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path / 'empty'}", "--resume"])


def test_missing_data_folder(tmp_path):
    with pytest.raises(UserError, match="data/prepare.py"):
        train.main(TINY + [f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path}"])


def test_missing_model_folder(data, tmp_path):
    with pytest.raises(UserError, match="not a checkpoint folder"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}", f"--init_from={tmp_path / 'no_model'}"])


def test_checkpoint_of_a_different_shape(single, data, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(single, out)
    with pytest.raises(UserError, match="different shape.*hidden_size: checkpoint 32, this run 48"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--resume", "--hidden_size=48",
                           f"--max_steps={STEPS + 1}"])


def test_activation_checkpointing_changes_nothing_but_memory(single, data, tmp_path):
    out = str(tmp_path / "recompute")
    train.main(TINY + DYNAMIC + [f"--data_dir={data}", f"--out_dir={out}", "--activation_checkpointing",
                                 "--max_steps=2", f"--lr_decay_steps={STEPS}"])
    ref = losses(single)
    assert losses(out) == {1: ref[1], 2: ref[2]}


def test_fresh_run_refuses_an_earlier_runs_checkpoints(data, tmp_path):
    # Mixing two runs' checkpoints in one out_dir would let --resume pick the wrong one.
    out = tmp_path / "run"
    os.makedirs(out / "ckpt_0000010")
    with pytest.raises(UserError, match="--overwrite=True"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=1"])
    assert os.path.isdir(out / "ckpt_0000010")  # nothing lost
    result = train.main(TINY + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=1", "--overwrite=True"])
    assert result["exit_code"] == 0 and not os.path.exists(out / "ckpt_0000010")
