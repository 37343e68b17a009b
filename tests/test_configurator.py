"""configurator.py: the one --key=value convention every CLI shares, and its refusals."""
import os
from dataclasses import dataclass

import pytest

from configurator import UserError, load_config, run_cli


@dataclass
class Settings:
    steps: int = 10
    lr: float = 1e-3
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
