"""fileio.py: atomic outputs, and what a killed writer leaves behind."""
import os
import subprocess
import sys

import pytest

from fileio import (atomic_dir, atomic_write, check_output_dir, check_output_file, clean_stale_temporaries,
                    replace_dir)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_keeps_the_old_folder_on_error(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dst) as tmp:
            open(os.path.join(tmp, "a"), "w").write("new")
            raise RuntimeError("killed midway")
    assert (dst / "a").read_text() == "old" and os.listdir(tmp_path) == ["out"]


def test_stale_temporaries_are_removed_and_a_lost_output_is_put_back(tmp_path):
    dst = tmp_path / "ckpt"
    pid = dead_pid()
    # A writer killed between replace_dir's two renames: no dst, the complete old folder as dst.old<PID>,
    # its new folder as dst.tmp<PID>. The old output comes back; the temporary goes.
    (tmp_path / f"ckpt.old{pid}").mkdir()
    (tmp_path / f"ckpt.old{pid}" / "w").write_text("old")
    (tmp_path / f"ckpt.tmp{pid}").mkdir()
    clean_stale_temporaries(dst)
    assert (dst / "w").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    live = tmp_path / f"ckpt.tmp{os.getppid()}"  # a live writer's temporary stays
    live.mkdir()
    clean_stale_temporaries(dst)
    assert live.exists()


def test_atomic_write_gives_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.json", "{}")
        atomic_write(tmp_path / "g.bin", b"\0")
    finally:
        os.umask(old)
    assert oct((tmp_path / "f.json").stat().st_mode & 0o777) == "0o644"
    assert (tmp_path / "g.bin").read_bytes() == b"\0"


# ---------------------------------------------------------------------------------------------------------
# The one rule for output paths (every script and save_pretrained)

MODEL = ("config.json", "*.safetensors")


def test_an_existing_file_never_becomes_a_folder(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("mine")
    with pytest.raises(ValueError, match="is a file.*never turned into a folder"):
        check_output_dir(str(readme), "--dst", "a model", MODEL, overwrite=True)
    assert readme.read_text() == "mine" and os.listdir(tmp_path) == ["README.md"]


def test_a_folder_is_replaced_only_with_overwrite_and_only_if_it_holds_that_output(tmp_path):
    check_output_dir(str(tmp_path / "new"), "--dst", "a model", MODEL, overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), "--dst", "a model", MODEL, overwrite=False)  # empty: fine
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="exists: pass --overwrite=True"):
        check_output_dir(str(model), "--dst", "a model", MODEL, overwrite=False)
    check_output_dir(str(model), "--dst", "a model", MODEL, overwrite=True)
    (model / "notes.txt").write_text("mine")  # a user's file: never replaced, even with --overwrite
    with pytest.raises(ValueError, match=r"holds files that are not a model \(notes.txt\)"):
        check_output_dir(str(model), "--dst", "a model", MODEL, overwrite=True)


def test_an_output_is_never_an_input_inside_one_or_around_one(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for dst in (src, src / "moe", tmp_path):
        with pytest.raises(ValueError, match="the input --src="):
            check_output_dir(str(dst), "--dst", "a model", MODEL, overwrite=True, inputs=[("--src", str(src))])
    with pytest.raises(ValueError, match="input --ckpt="):
        check_output_file(str(src / "config.json"), "--out", inputs=[("--ckpt", str(src))])
    with pytest.raises(ValueError, match="is a folder"):
        check_output_file(str(src), "--out")
    check_output_file(str(tmp_path / "eval.json"), "--out", inputs=[("--ckpt", str(src))])


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    dst, tmp = tmp_path / "out", tmp_path / "out.tmp1"
    dst.mkdir()
    (dst / "a").write_text("old")
    tmp.mkdir()
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:  # moving the new folder in
            raise OSError(28, "No space left on device")
        return real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        replace_dir(str(tmp), str(dst))
    monkeypatch.undo()
    assert (dst / "a").read_text() == "old"


def test_a_parked_file_is_never_deleted_as_stale(tmp_path):
    pid = dead_pid()
    (tmp_path / "out").mkdir()
    parked = tmp_path / f"out.old{pid}"
    parked.write_text("someone's original")
    clean_stale_temporaries(str(tmp_path / "out"))
    assert parked.read_text() == "someone's original"
