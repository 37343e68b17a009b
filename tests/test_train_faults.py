"""Faults and bad input for train.py: nothing lost, nothing silent.

Each case is one a user met: `--overwrite=True` with an input that turns out to be wrong must leave the old
run byte-identical; values that cannot work are refused before anything runs; two runs into one out_dir,
a resumed log, leftovers of killed processes, a diverging run, a tokenizer that is not the data's.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
import train_state
from configurator import UserError
from test_train import REPO, TINY, make_shards, records

DENSE = [a for a in TINY if not a.startswith(("--num_experts", "--expert_intermediate_size"))]
QUICK = ["--eval_interval=0", "--max_steps=2"]


def snapshot(folder):
    """{relative path: sha256} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def earlier_run(data, tmp_path_factory):
    """A finished dense run: ckpt_0000001, ckpt_0000002, final/, log.jsonl (max_position_embeddings 16)."""
    out = str(tmp_path_factory.mktemp("earlier") / "run")
    train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}", "--checkpoint_interval=1",
                                "--export=True"])
    return out


@pytest.fixture
def old_run(earlier_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(earlier_run, out)
    return out


# ---------------------------------------------------------------------------------------------------------
# --overwrite=True checks everything before it deletes anything

@pytest.mark.parametrize("bad", [
    ["--init_from=/no/such/model"],                      # a mistyped --init_from
    ["--seq_len=32", "--global_batch_tokens=128"],       # over the model's 16 positions
    ["--weights=nosuchdomain=1"],                         # data weights that name no domain
])
def test_overwrite_with_a_bad_input_deletes_nothing(old_run, earlier_run, data, bad):
    before = snapshot(old_run)
    init = [f"--init_from={earlier_run}/final"]
    with pytest.raises(UserError):
        train.main(DENSE + QUICK + init + [f"--data_dir={data}", f"--out_dir={old_run}", "--overwrite=True"] + bad)
    assert snapshot(old_run) == before


@pytest.mark.parametrize("inside", ["final", "ckpt_0000002/model"])
def test_overwrite_refuses_to_delete_its_own_input(old_run, data, inside):
    before = snapshot(old_run)
    with pytest.raises(UserError, match="inside.*--overwrite=True would delete"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={old_run}", "--overwrite=True",
                                    f"--init_from={os.path.join(old_run, inside)}"])
    assert snapshot(old_run) == before


def test_overwrite_that_cannot_move_the_old_run_leaves_it_whole(old_run, earlier_run, data, monkeypatch):
    """One file of the old run cannot be moved aside (a permission problem): nothing of it is lost."""
    before = snapshot(old_run)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the second of the old run's files
            raise PermissionError(13, "Permission denied")
        return real(src, dst)
    monkeypatch.setattr(train_state.os, "replace", replace)
    with pytest.raises(UserError, match="could not move .* aside .*left whole"):
        train.main(DENSE + QUICK + [f"--init_from={earlier_run}/final", f"--data_dir={data}",
                                    f"--out_dir={old_run}", "--overwrite=True"])
    monkeypatch.undo()
    assert snapshot(old_run) == before


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's identity: recorded from the data into every checkpoint, a mismatch refused

def with_fingerprint(data, root, fingerprint):
    shutil.copytree(data, root)
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    meta["tokenizer_sha256"] = fingerprint
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


def test_tokenizer_fingerprint_is_recorded_and_a_mismatch_refused(data, tmp_path):
    data_a = with_fingerprint(data, tmp_path / "a", "a" * 64)
    data_b = with_fingerprint(data, tmp_path / "b", "b" * 64)
    out = str(tmp_path / "run")
    train.main(DENSE + QUICK + [f"--data_dir={data_a}", f"--out_dir={out}", "--export=True"])
    for folder in (os.path.join(out, "ckpt_0000002", "model"), os.path.join(out, "final")):
        with open(os.path.join(folder, "config.json")) as f:
            assert json.load(f)["tokenizer_sha256"] == "a" * 64
    with pytest.raises(UserError, match="another tokenizer"):
        train.main(DENSE + QUICK + [f"--data_dir={data_b}", f"--out_dir={tmp_path / 'next'}",
                                    f"--init_from={out}/final"])
    # data made before fingerprints were recorded (no key in meta.json) is not checked
    train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={tmp_path / 'old_data'}",
                                f"--init_from={out}/final", "--max_steps=1"])


# ---------------------------------------------------------------------------------------------------------
# Values that cannot work

@pytest.mark.parametrize("arg, message", [
    ("--grad_clip=-1", "grad_clip=-1.0 must be >= 0"),
    ("--max_steps=2.5", "max_steps.*must be int"),
    ("--eval_windows=0", "eval_windows=0 must be >= 1"),
    ("--weight_decay=-1", "weight_decay=-1.0 must be >= 0"),
    ("--hidden_size=0", "hidden_size=0 must be >= 1"),
    ("--learning_rate=-1", "learning_rate=-1.0 must be > 0"),
    ("--beta2=1.5", r"beta2=1.5 must be in \[0, 1\)"),
    ("--bias_rate=1e999", "bias_rate=inf must be a finite number"),
    ("--warmup_steps=-1", "warmup_steps=-1 must be >= 0"),
    ("--dynamic_weights=True", "eval_interval=0 never evaluates"),
])
def test_values_that_cannot_work_are_refused(data, tmp_path, arg, message):
    extra = ["--eval_interval=0"] if arg == "--dynamic_weights=True" else ["--eval_interval=1"]
    with pytest.raises(UserError, match=message):
        train.main(TINY + ["--max_steps=1", f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}"] + extra + [arg])
    assert not os.path.exists(tmp_path / "run")


def test_num_experts_with_a_dense_init_is_refused(earlier_run, data, tmp_path):
    with pytest.raises(UserError, match="dense model.*split.py"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--num_experts=16",
                                    f"--init_from={earlier_run}/final"])


def test_resume_with_nothing_left_to_do_is_refused(old_run, data):
    with pytest.raises(UserError, match="already at step 2"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={old_run}", "--resume"])


def test_user_error_is_one_line_and_exit_code_2(data, tmp_path):
    proc = subprocess.run([sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={tmp_path}",
                           "--grad_clip=-1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("train.py: error: --grad_clip")


def test_config_names_resolve_from_another_folder(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "demo_dense.py", "--help"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the last K stay; divergence names what went non-finite

def test_keeps_the_last_k_checkpoints(data, tmp_path):
    out = str(tmp_path / "run")
    train.main(DENSE + [f"--data_dir={data}", f"--out_dir={out}", "--eval_interval=0", "--max_steps=4",
                        "--checkpoint_interval=1"])
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == ["ckpt_0000003", "ckpt_0000004"]
    out = str(tmp_path / "run3")
    train.main(DENSE + [f"--data_dir={data}", f"--out_dir={out}", "--eval_interval=0", "--max_steps=4",
                        "--checkpoint_interval=1", "--keep_checkpoints=3"])
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt_")) == [f"ckpt_000000{i}" for i in (2, 3, 4)]


def test_non_finite_grad_norm_stops_and_says_so(data, tmp_path, monkeypatch):
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return norm * float("inf") if len(calls) == 2 else norm  # step 2's gradient overflows

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"non-finite grad norm at step 2 .*ckpt_0000001"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}", "--checkpoint_interval=1"])
    assert train_state.latest_checkpoint(out).endswith("ckpt_0000001")


# ---------------------------------------------------------------------------------------------------------
# One run per out_dir; a resumed log has each step once; leftovers of killed processes are removed

def test_a_second_run_into_the_same_out_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    os.makedirs(out)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / "train.lock").write_text(f"{holder.pid}@{socket.gethostname()}\n")
        with pytest.raises(UserError, match=f"in use by another training run \\(process {holder.pid}"):
            train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}"])
        assert not os.path.exists(out / "log.jsonl")
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its stale lock is taken over, and released at the end
    result = train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}"])
    assert result["step"] == 2 and not os.path.exists(out / "train.lock")


@pytest.mark.parametrize("content", ["", "garbage\n"])
def test_an_empty_or_unreadable_lock_is_stale(data, tmp_path, content):
    out = tmp_path / "run"
    os.makedirs(out)
    (out / "train.lock").write_text(content)  # e.g. left by a disk that filled while the lock was written
    assert train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}"])["step"] == 2
    assert not os.path.exists(out / "train.lock")


def test_out_dir_that_is_a_file_is_refused(data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is a file"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={tmp_path / 'notes.txt'}"])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumable(data, tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError ("... unexpected pos ..."): one line, no temporary left,
    the lock released, and --resume continues from the last complete checkpoint once there is space."""
    out = tmp_path / "run"
    real = torch.save

    def save(obj, path, *a, **kw):
        if "ckpt_0000002" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 4032")
        return real(obj, path, *a, **kw)
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(UserError, match="writing checkpoint .*ckpt_0000002 failed .*disk full"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}", "--checkpoint_interval=1"])
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["ckpt_0000001", "log.jsonl"]  # no temporary, no lock
    result = train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}", "--resume",
                                         "--checkpoint_interval=1"])
    assert result["step"] == 2


def test_resumed_log_has_each_step_once(data, tmp_path):
    out = str(tmp_path / "run")
    args = DENSE + [f"--data_dir={data}", f"--out_dir={out}", "--eval_interval=2", "--checkpoint_interval=2"]
    train.main(args + ["--max_steps=3"])
    shutil.rmtree(os.path.join(out, "ckpt_0000003"))  # as if killed after logging step 3, before its checkpoint
    train.main(args + ["--resume", "--max_steps=4"])
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in records(out, "eval")] == [0, 2, 4]


def test_stale_temporaries_of_dead_processes_are_removed(data, tmp_path):
    out = tmp_path / "run"
    pid = dead_pid()
    for name in (f"final.tmp{pid}", f"ckpt_0000007.tmp{pid}"):
        os.makedirs(out / name)
        (out / name / "model.safetensors").write_bytes(b"half written")
    train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={out}"])
    assert not [n for n in os.listdir(out) if ".tmp" in n]


@pytest.mark.parametrize("damaged", ["optimizer.pt", "rank0.pt", "state.json"])
def test_a_damaged_checkpoint_is_named(old_run, data, damaged):
    path = os.path.join(old_run, "ckpt_0000002", damaged)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match=f"ckpt_0000002/{damaged}.*(damaged|not valid json)"):
        train.main(DENSE + QUICK + [f"--data_dir={data}", f"--out_dir={old_run}", "--resume", "--max_steps=3"])
