"""configurator.py: the one --key=value convention every CLI shares, and its refusals."""
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from configurator import UserError, load_config, run_cli, setting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train.py", "eval.py", "split.py", "sample.py", "filter.py", "compare.py", "bench.py",
           "data/prepare.py", "data/smollm2.py", "experiments/ablations.py", "experiments/ablations_report.py",
           "experiments/carve_ablations.py", "experiments/carve_memory.py", "experiments/prune_ffn.py",
           "experiments/split_table.py", "experiments/lm_eval_speed.py", "experiments/llamacpp_decode.py"]


@dataclass
class Settings:
    steps: int = setting(10, ge=1)
    lr: float = setting(1e-3, gt=0)
    beta: float = setting(0.9, ge=0, lt=1)
    mode: str = setting("a", choices=("a", "b"))
    cap: int | None = setting(None, ge=0)
    out: str | None = None
    flag: bool = False
    weights: str | dict = "uniform"


def test_values_are_typed_and_applied_left_to_right(tmp_path):
    conf = tmp_path / "c.py"
    conf.write_text("steps = 3\nlr = 1\nimport math\n_helper = 2\n")
    cfg = load_config(Settings(), [str(conf), "--steps=5", "--flag", "--weights={'a': 1.0}", "--out=123"])
    assert (cfg.steps, cfg.lr, cfg.flag, cfg.weights, cfg.out) == (5, 1.0, True, {"a": 1.0}, "123")
    assert isinstance(cfg.lr, float)


@pytest.mark.parametrize("arg, words", [
    ("--steps=2.5", "must be int"),           # an int key refuses a float instead of rounding it
    ("--flag=1", "must be bool"),
    ("--lr=fast", "must be float"),
    ("--stpes=3", "did you mean --steps"),
    ("--out", "needs a value"),               # a bare flag only switches a boolean on
    ("--steps=0", "--steps=0 must be >= 1"),  # declared ranges, checked after the last override
    ("--lr=-1", "--lr=-1.0 must be > 0"),
    ("--beta=1", r"--beta=1.0 must be in \[0, 1\)"),
    ("--mode=c", "--mode=.c. must be one of 'a', 'b'"),
    ("--lr=1e999", "must be a finite number"),
    ("--cap=-1", "--cap=-1 must be >= 0"),
])
def test_bad_settings_are_user_errors(arg, words):
    with pytest.raises(UserError, match=words):
        load_config(Settings(), [arg])


def test_a_non_python_positional_is_not_executed(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "x"}\n')
    with pytest.raises(UserError, match="config files are Python"):
        load_config(Settings(), [str(data)])
    with pytest.raises(UserError, match="not found"):
        load_config(Settings(), ["no_such_config.py"])


def test_config_names_resolve_against_the_project_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from elsewhere: config/ is found next to the scripts
    have = sorted(os.listdir(os.path.join(os.path.dirname(os.path.dirname(__file__)), "config")))
    assert have, "the repository ships config files"
    from train import TrainConfig
    load_config(TrainConfig(), [os.path.join("config", have[0])])


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise UserError("data folder 'x' not found: run python data/prepare.py")
    with pytest.raises(SystemExit) as e:
        run_cli(main, [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: data folder 'x' not found" in err


def test_ranges_allow_none_and_the_boundaries(tmp_path):
    cfg = load_config(Settings(), ["--cap=None", "--beta=0", "--steps=1", "--mode=b"])
    assert (cfg.cap, cfg.beta, cfg.steps, cfg.mode) == (None, 0.0, 1, "b")
    conf = tmp_path / "c.py"
    conf.write_text("steps = 0\n")
    with pytest.raises(UserError, match="steps=0 must be >= 1"):  # a config file is checked like the command line
        load_config(Settings(), [str(conf)])
    load_config(Settings(), [str(conf), "--steps=2"])  # ... after the last override, not before


@pytest.mark.parametrize("text", ["x = 1\0\n", "x = (\n", "x = undefined_name\n", b"\xff\xfe = 1\n"])
def test_a_broken_config_file_is_one_line(tmp_path, text):
    conf = tmp_path / "c.py"
    conf.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError, match="cannot be run as Python"):
        load_config(Settings(), [str(conf)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_prints_its_help(script):
    """--help: usage text and exit 0, never a traceback (a docstring with a lone surrogate once crashed it)."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Traceback" not in run.stderr and len(run.stdout) > 100
