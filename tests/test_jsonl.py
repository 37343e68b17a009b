"""data/jsonl.py: the one jsonl / jsonl.zst reader of data/prepare.py and filter.py.

A truncated .jsonl.zst was read as a shorter file (143 of 400 documents, one "line skipped"
warning) and a file that is not zstd raised a raw ZstdError. Both are now errors that name the file.
"""

import json

import pytest

import filter as flt
from configurator import UserError
from data import jsonl as J

zstandard = pytest.importorskip("zstandard")


def lines(n):
    return b"".join(json.dumps({"text": f"document number {i} " * 20, "domain": "web"}).encode() + b"\n"
                    for i in range(n))


def read_all(path):
    bad = []
    got = [line.record["text"] for line in J.read_jsonl(str(path), lambda where, why: bad.append(where))]
    return got, bad


def test_zst_round_trip_and_several_frames(tmp_path):
    data = lines(400)
    packed = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "two.jsonl.zst").write_bytes(packed + packed)  # two frames back to back: one valid file
    got, bad = read_all(tmp_path / "two.jsonl.zst")
    assert len(got) == 800 and not bad
    (tmp_path / "misnamed.jsonl").write_bytes(packed)  # zstd content, plain name: read by its magic number
    assert len(read_all(tmp_path / "misnamed.jsonl")[0]) == 400


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_zst_is_an_error_naming_the_file(tmp_path, cut):
    packed = zstandard.ZstdCompressor().compress(lines(400))
    path = tmp_path / "chunk.jsonl.zst"
    path.write_bytes(packed[:int(len(packed) * cut)])
    with pytest.raises(UserError, match=rf"{path} is truncated"):
        read_all(path)


def test_not_zstd_is_an_error_naming_the_file(tmp_path):
    plain = tmp_path / "plain.jsonl.zst"
    plain.write_bytes(lines(3))  # plain text with a .zst name
    with pytest.raises(UserError, match=rf"{plain} is not a zstd file"):
        read_all(plain)
    garbage = tmp_path / "garbage.jsonl.zst"
    garbage.write_bytes(J.ZSTD_MAGIC + b"\x00garbage that is not a frame" * 10)
    with pytest.raises(UserError, match=rf"{garbage} is not a valid zstd file"):
        read_all(garbage)


def test_bad_lines_are_reported_as_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "cut in the midd\n\n["a list"]\n{"text": 3}\n{"text": "caf\xe9"}\n')
    bad = []
    got = list(J.read_jsonl(str(path), lambda where, why: bad.append((where, why))))
    assert [line.record["text"] for line in got] == ["ok", "caf\ufffd"]
    assert got[1].where == f"{path}:6" and got[1].replaced == 1
    assert [w for w, _ in bad] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert "not JSON" in bad[0][1]


def test_filter_uses_the_same_reader(tmp_path):
    """filter.py refuses the truncated file too (before: it read the first part silently)."""
    packed = zstandard.ZstdCompressor().compress(lines(400))
    path = tmp_path / "chunk.jsonl.zst"
    path.write_bytes(packed[:len(packed) // 2])
    with pytest.raises(UserError, match="is truncated"):
        flt.main([f"--input={path}", f"--out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()
