"""fileio.py: atomic outputs, and what a killed writer leaves behind."""
import os
import subprocess
import sys

import pytest

from fileio import atomic_dir, atomic_write, clean_stale_temporaries


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
