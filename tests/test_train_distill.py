"""Distillation from the dense parent (train.py section 7): loss = lm + balance + alpha * T^2 * KL(parent || student).

The chunked KL is checked against torch's own full-vocabulary F.kl_div (value and gradient); a student that
IS its parent has KL 0; a 2-step run logs lm, balance and kl separately, in one process and under DDP.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import train
from configurator import UserError
from test_train import TINY, make_shards, records, torchrun

DENSE = [a for a in TINY if not a.startswith(("--num_experts", "--expert_intermediate_size"))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def parent(data, tmp_path_factory):
    """A dense model trained 3 steps: out/final."""
    out = str(tmp_path_factory.mktemp("parent"))
    train.main(DENSE + [f"--data_dir={data}", f"--out_dir={out}", "--max_steps=3", "--eval_interval=0",
                        "--export=True"])
    return os.path.join(out, "final")


@pytest.mark.parametrize("temperature, chunk", [(1.0, 3), (2.0, 4), (0.5, 100)])
def test_chunked_kl_matches_the_full_vocabulary_kl(temperature, chunk):
    torch.manual_seed(0)
    b, S, V, d = 2, 10, 50, 8
    logits = torch.randn(b, S, V, requires_grad=True)
    hidden, head = torch.randn(b, S, d), torch.randn(V, d)
    got = train.distill_kl(logits, hidden, head, temperature, chunk=chunk)
    # torch's KL(target || input) with both as log-probabilities, summed over everything, per position
    want = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(hidden @ head.T / temperature, -1),
                    log_target=True, reduction="sum") / (b * S) * temperature ** 2
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    g_got, = torch.autograd.grad(got, logits)
    g_want, = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
    assert train.distill_kl(hidden @ head.T, hidden, head, temperature, chunk=chunk).item() == pytest.approx(0, abs=1e-5)


def test_student_equal_to_parent_has_zero_kl(parent, data, tmp_path):
    out = str(tmp_path / "self")
    train.main(DENSE + [f"--data_dir={data}", f"--out_dir={out}", f"--init_from={parent}", "--max_steps=2",
                        "--eval_interval=0", f"--distill_from={parent}", "--distill_alpha=0.5"])
    steps = records(out)
    assert abs(steps[0]["kl"]) < 1e-6  # before the first update the student is the parent
    assert steps[1]["kl"] > 1e-6       # after it, no longer


def test_two_step_moe_run_logs_lm_balance_and_kl(parent, data, tmp_path):
    out = str(tmp_path / "moe")
    args = TINY + [f"--data_dir={data}", "--max_steps=2", "--eval_interval=0"]
    train.main(args + [f"--out_dir={out}", f"--distill_from={parent}", "--distill_alpha=1.0",
                       "--distill_temperature=2.0"])
    plain = str(tmp_path / "plain")
    train.main(args + [f"--out_dir={plain}"])
    got, ref = records(out), records(plain)
    assert [r["step"] for r in got] == [1, 2]
    assert all(r["kl"] > 0 and r["balance_loss"] > 0 for r in got)
    assert got[0]["loss"] == ref[0]["loss"]  # the LM loss is logged alone (same batch, same weights at step 1)
    assert got[1]["loss"] != ref[1]["loss"]  # ... and the KL's gradient changed the update
    assert "kl" not in ref[0]


def test_distillation_settings_are_checked(parent, data, tmp_path):
    with pytest.raises(UserError, match="needs --distill_from"):
        train.config_from_args(["--distill_alpha=0.5"])
    with pytest.raises(UserError, match="distill_alpha=0"):
        train.config_from_args([f"--distill_from={parent}"])
    with pytest.raises(UserError, match="vocabulary of 64 ids, the model 80"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}", "--vocab_size=80", "--max_steps=1",
                           f"--distill_from={parent}", "--distill_alpha=1.0"])
    with pytest.raises(UserError, match="--distill_from=.*nowhere"):
        train.main(TINY + [f"--data_dir={data}", f"--out_dir={tmp_path}", "--max_steps=1",
                           f"--distill_from={tmp_path / 'nowhere'}", "--distill_alpha=1.0"])


@pytest.mark.slow
def test_distillation_under_ddp_matches_one_process(parent, data, tmp_path):
    args = TINY + [f"--data_dir={data}", "--max_steps=2", "--eval_interval=0", f"--distill_from={parent}",
                   "--distill_alpha=0.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train.main(args + [f"--out_dir={one}"])
    torchrun(args + [f"--out_dir={two}", "--parallel=ddp"])
    for a, b in zip(records(one), records(two)):
        assert b["step"] == a["step"]
        for key in ("loss", "balance_loss", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
