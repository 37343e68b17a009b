"""eval.py refuses bad input before it works, in one line (exit 2): a missing or mistyped --data, an --out it
could not write, a tokenizer that is not the data's or the checkpoint's; and it never leaves a half-written json."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import eval as ev
from model import ModelConfig, Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data folder (sentencepiece tokenizer, two val shards, one task) and a dense checkpoint trained on it."""
    from tokenizer import Tokenizer, train_sentencepiece
    root = tmp_path_factory.mktemp("evalfaults")
    text = root / "text.txt"
    text.write_text("\n".join(f"the cat sat on mat {i}. def f(x): return x + {i}" for i in range(100)))
    data = root / "data"
    (data / "tasks").mkdir(parents=True)
    train_sentencepiece(str(text), str(data / "tokenizer"), vocab_size=300, num_threads=1)
    tok = Tokenizer(str(data / "tokenizer.model"))
    meta = {"vocab_size": 300, "dtype": "uint16", "bos_id": 1, "eos_id": 2, "tokenizer": "tokenizer.model",
            "tokenizer_sha256": tok.fingerprint, "domains": {}}
    rng = np.random.default_rng(0)
    for name in ("prose", "code"):
        rng.integers(3, 300, 200).astype(np.uint16).tofile(data / f"{name}.val.bin")
        meta["domains"][name] = {"train_tokens": 0, "val_tokens": 200, "train_docs": 0, "val_docs": 1}
    (data / "meta.json").write_text(json.dumps(meta))
    (data / "tasks" / "toy.jsonl").write_text(
        "".join(json.dumps({"context": "the cat sat on", "choices": ["mat", "the cat"], "label": 0}) + "\n"
                for _ in range(3)))
    torch.manual_seed(0)
    ckpt = root / "ckpt"
    checkpoint.save_pretrained(Transformer(ModelConfig(**TINY, tokenizer_sha256=tok.fingerprint)), str(ckpt))
    return {"root": root, "data": str(data), "ckpt": str(ckpt), "sha": tok.fingerprint}


def args(setup, *extra):
    return [f"--ckpt={setup['ckpt']}", f"--data={setup['data']}", "--max_windows=2", "--seq_len=16",
            "--device=cpu", "--start_token=eos", *extra]


def test_a_good_run_works(setup, tmp_path):
    r = ev.main(args(setup, f"--out={tmp_path / 'r.json'}"))
    assert set(r["val"]["domains"]) == {"prose", "code"} and r["tasks"]["toy"]["n"] == 3
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["toy"]["acc"] == r["tasks"]["toy"]["acc"]


@pytest.mark.parametrize("data", ["missing", "notdata"])
def test_missing_or_mistyped_data_is_a_user_error(setup, data):
    """Used to evaluate nothing and exit 0."""
    path = setup["root"] / data
    if data == "notdata":
        path.mkdir(exist_ok=True)  # a folder, but not one data/prepare.py made
    with pytest.raises(ev.UserError, match="--data="):
        ev.main(args(setup, f"--data={path}"))


def test_cli_prints_one_line_and_exits_2(setup):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--ckpt={setup['ckpt']}",
                        f"--data={setup['root'] / 'typo'}"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("eval.py: error: --data=") and "Traceback" not in p.stderr


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_bad_out_fails_before_the_work(setup, monkeypatch, where):
    """Used to fail only after the whole evaluation (a folder) or crash after it (a file in the way)."""
    if where == "folder":
        out = setup["root"]
    else:
        (setup["root"] / "afile").write_text("x")
        out = setup["root"] / "afile" / "r.json"

    def no_work(cfg):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(ev, "load_model", no_work)
    with pytest.raises(ev.UserError, match="--out="):
        ev.main(args(setup, f"--out={out}"))


def test_tokenizer_not_the_datas_is_refused(setup, tmp_path):
    """Used to be accepted: the loss and the scores of another vocabulary's ids."""
    from tokenizer import train_sentencepiece
    text = tmp_path / "other.txt"
    text.write_text("\n".join(f"a completely different corpus, line {i} of it" for i in range(100)))
    train_sentencepiece(str(text), str(tmp_path / "other"), vocab_size=296, num_threads=1)
    with pytest.raises(ev.UserError, match="tokenizer mismatch"):
        ev.main(args(setup, f"--tokenizer={tmp_path / 'other.model'}"))


def test_checkpoint_of_another_tokenizer_is_refused(setup, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_pretrained(Transformer(ModelConfig(**TINY, tokenizer_sha256="0" * 64)), str(ckpt))
    with pytest.raises(ev.UserError, match="tokenizer mismatch.*config.json"):
        ev.main(args(setup, f"--ckpt={ckpt}"))


def test_out_is_written_atomically(setup, tmp_path, monkeypatch):
    """A failure while writing the json leaves the previous file as it was (it used to be truncated first)."""
    out = tmp_path / "r.json"
    out.write_text('{"old": true}')

    def broken(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ev.json, "dumps", broken)
    monkeypatch.setattr(ev.json, "dump", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        ev.main(args(setup, f"--out={out}", "--tasks=none"))
    assert out.read_text() == '{"old": true}' and os.listdir(tmp_path) == ["r.json"]


@pytest.mark.parametrize("bad, match", [("--ckpt=/no/such/ckpt", "--ckpt="), ("--start_token=bso", "--start_token="),
                                        ("--dtype=fp8", "--dtype="), ("--batch_size=0", "--batch_size="),
                                        ("--temperature=-1", "--temperature=-1.0 must be >= 0"),
                                        ("--top_k=0", "--top_k=0 must be >= 1")])
def test_bad_settings(setup, bad, match):
    with pytest.raises(ev.UserError, match=match):
        ev.main(args(setup, bad))


@pytest.mark.parametrize("where", ["ckpt/config.json", "data/meta.json"])
def test_out_inside_an_input_is_refused(setup, where):
    """Used to write the report over the checkpoint's config (the model no longer loaded) or the data's meta."""
    target = setup["root"] / where
    before = target.read_bytes()
    with pytest.raises(ev.UserError, match="input --(ckpt|data)="):
        ev.main(args(setup, f"--out={target}"))
    assert target.read_bytes() == before


def test_a_seq_len_beyond_the_model_is_lowered_with_a_note(setup, capsys):
    r = ev.main(args(setup, "--seq_len=1000", "--tasks=none"))
    assert "--seq_len=1000 lowered to the model's 64 positions" in capsys.readouterr().out
    assert "x 64 tokens" in r["val_setup"]
