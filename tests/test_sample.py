"""Tests for sample.py: the domain mixture of SPEC §4.

Every test builds its own tiny shard folder (meta.json + {domain}.{split}.bin written with numpy, the
format data/prepare.py documents), so nothing here depends on data/prepare.py. Tokens encode their domain:
domain k uses ids 1000*(k+1) .. 1000*(k+1)+999, and EOS = 1 belongs to no domain.
"""

import json
import math
import os

import numpy as np
import pytest
import torch

import sample
from configurator import run_cli
from sample import DomainSampler, eval_windows, load_shards

EOS = 1
SPEC_ORDER = ("commoncrawl", "c4", "github", "wikipedia", "book", "arxiv", "stackexchange")


def domain_tokens(k, n_docs, rng):
    """Documents of domain k (ids 1000*(k+1) + [0, 999]), each followed by EOS, back to back."""
    parts = []
    for _ in range(n_docs):
        parts.append(1000 * (k + 1) + rng.integers(0, 1000, size=int(rng.integers(3, 40))))
        parts.append([EOS])
    return np.concatenate(parts)


def make_shards(root, docs, dtype="uint16", seed=0):
    """docs: {domain: number of train docs} (val gets a third as many) -> the folder path."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    meta = {"vocab_size": 1000 * (len(docs) + 1), "dtype": dtype, "bos_id": 2, "eos_id": EOS,
            "tokenizer": "tokenizer.model", "domains": {}}
    for k, (name, n_docs) in enumerate(docs.items()):
        info = {}
        for split, n in (("train", n_docs), ("val", max(1, n_docs // 3))):
            tokens = domain_tokens(k, n, rng).astype(dtype)
            tokens.tofile(os.path.join(root, f"{name}.{split}.bin"))
            info[f"{split}_tokens"], info[f"{split}_docs"] = len(tokens), n
        meta["domains"][name] = info
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f)
    return str(root)


@pytest.fixture
def slimpajama(tmp_path):
    return make_shards(tmp_path / "sp", {d: 60 + 10 * i for i, d in enumerate(SPEC_ORDER)})


@pytest.fixture
def abc(tmp_path):
    return make_shards(tmp_path / "abc", {"a": 30, "b": 20, "c": 12})


# ---------------------------------------------------------------------------------------------------
# The paper's numbers


def test_builtin_weights_equal_spec(slimpajama):
    llama = [0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02]
    sheared = [0.361, 0.492, 0.008, 0.031, 0.091, 0.007, 0.010]
    refs = [1.6917, 2.0749, 0.6984, 1.5899, 1.9252, 1.2408, 1.4975]
    assert [sample.LLAMA_WEIGHTS[d] for d in SPEC_ORDER] == llama
    assert [sample.SHEARED_WEIGHTS[d] for d in SPEC_ORDER] == sheared
    assert [sample.LLAMA2_7B_REFERENCE_LOSSES[d] for d in SPEC_ORDER] == refs
    assert abs(sum(llama) - 1.0) < 1e-12 and abs(sum(sheared) - 1.0) < 1e-12

    for name, expected in (("llama", llama), ("sheared", sheared), ("uniform", [1 / 7] * 7)):
        s = DomainSampler(slimpajama, batch_size=2, seq_len=8, weights=name)
        assert [s.weights[d] for d in SPEC_ORDER] == pytest.approx(expected, abs=1e-15)

    meta = json.load(open(os.path.join(slimpajama, "meta.json")))
    total = sum(v["train_tokens"] for v in meta["domains"].values())
    s = DomainSampler(slimpajama, batch_size=2, seq_len=8, weights="proportional")
    for d in SPEC_ORDER:
        assert s.weights[d] == pytest.approx(meta["domains"][d]["train_tokens"] / total)


# ---------------------------------------------------------------------------------------------------
# Drawing


def test_domain_frequencies_match_weights(slimpajama):
    """20,000 windows at a fixed seed: each domain's count within 4 binomial sigmas of n * w."""
    s = DomainSampler(slimpajama, batch_size=100, seq_len=8, weights="sheared", seed=123)
    counts = np.zeros(7, dtype=np.int64)
    for _ in range(200):
        _, _, domain_idx = s.next_batch()
        counts += np.bincount(domain_idx.numpy(), minlength=7)
    n = counts.sum()
    assert n == 20_000
    for k, d in enumerate(s.domains):
        p = sample.SHEARED_WEIGHTS[d]
        assert abs(counts[k] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (d, counts[k], n * p)


def test_zero_weight_domain_is_never_drawn(abc):
    s = DomainSampler(abc, batch_size=64, seq_len=4, weights={"a": 0.5, "c": 0.5})
    drawn = torch.cat([s.next_batch()[2] for _ in range(20)])
    assert s.domains.index("b") not in drawn.tolist()
    assert set(drawn.tolist()) == {s.domains.index("a"), s.domains.index("c")}


def test_no_window_crosses_a_domain(abc):
    s = DomainSampler(abc, batch_size=16, seq_len=24, weights="uniform", seed=5)
    shards = load_shards(abc, "train")
    saw_packing = False
    for _ in range(30):
        x, y, domain_idx = s.next_batch()
        assert x.shape == y.shape == (16, 24) and x.dtype == y.dtype == domain_idx.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
        for row, (k, _, start) in enumerate(s.last_windows):
            assert k == domain_idx[row]
            window = torch.cat([x[row], y[row, -1:]])
            assert window.tolist() == shards[s.domains[k]][start:start + 25].tolist()
            in_domain = (window // 1000 == k + 1) | (window == EOS)
            assert bool(in_domain.all()), f"window of domain {s.domains[k]} holds foreign tokens"
            # packing: a window spans document boundaries inside its domain
            saw_packing |= bool((window[1:-1] == EOS).any())
    assert saw_packing


def test_two_ranks_draw_disjoint_windows(abc):
    """Over an epoch of each domain, the ranks' windows are disjoint and together cover every slot."""
    T, W = 6, 2
    seen = {}  # (rank, domain, epoch) -> list of window starts
    for rank in range(W):
        s = DomainSampler(abc, batch_size=8, seq_len=T, weights="uniform", seed=9, rank=rank, world_size=W)
        for _ in range(150):
            s.next_batch()
            for k, epoch, start in s.last_windows:
                seen.setdefault((rank, k, epoch), []).append(start)
        assert min(s._epoch) >= 2, "draw more: every domain should finish two epochs"
    for k in range(3):
        n_slots = s.n_slots[k]
        for epoch in (0, 1):
            r0, r1 = seen[(0, k, epoch)], seen[(1, k, epoch)]
            assert len(set(r0)) == len(r0) and len(set(r1)) == len(r1)  # no window twice in an epoch
            assert not set(r0) & set(r1), f"ranks share windows of domain {k} in epoch {epoch}"
            assert sorted(r0 + r1) == [i * T for i in range(n_slots)]  # together: the whole epoch
        assert seen[(0, k, 0)] != seen[(0, k, 1)]  # a new shuffle each epoch


def test_shuffle_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 100, 1000):
        keys = sample.shuffle_keys(seed=3, domain_idx=1, epoch=4)
        assert sorted(sample.shuffled_slot(i, n, keys) for i in range(n)) == list(range(n))


def test_same_seed_same_stream_other_seed_other_stream(abc):
    a, b, c = (DomainSampler(abc, batch_size=4, seq_len=8, seed=s) for s in (0, 0, 1))
    xa, xb, xc = (torch.cat([smp.next_batch()[0] for _ in range(5)]) for smp in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


# ---------------------------------------------------------------------------------------------------
# Dynamic weights (SPEC §4): a = softmax(log w + eta (L - R)); w <- (1 - c) a + c / K


def by_hand(w, L, R, eta, c):
    z = [math.log(wi) + eta * (Li - Ri) for wi, Li, Ri in zip(w, L, R)]
    e = [math.exp(zi) for zi in z]
    a = [ei / sum(e) for ei in e]
    return [(1 - c) * ai + c / len(w) for ai in a]


def test_dynamic_update_matches_hand_computation(abc):
    R = {"a": 2.0, "b": 1.5, "c": 3.0}
    s = DomainSampler(abc, batch_size=2, seq_len=8, weights="a=0.5,b=0.3,c=0.2", dynamic=True,
                      eta=2.0, c=0.01, reference_losses=R)
    w = [0.5, 0.3, 0.2]
    for L in ({"a": 2.5, "b": 1.4, "c": 3.1}, {"a": 2.1, "b": 1.9, "c": 2.0}):
        w = by_hand(w, [L[d] for d in "abc"], [R[d] for d in "abc"], eta=2.0, c=0.01)
        new = s.update_weights(L)
        assert [new[d] for d in "abc"] == pytest.approx(w, rel=1e-12)
        assert sum(new.values()) == pytest.approx(1.0, abs=1e-12)
    assert len(s.history) == 2 and s.history[-1]["weights"] == new


def test_dynamic_update_default_references_are_llama2_7b(slimpajama):
    s = DomainSampler(slimpajama, batch_size=2, seq_len=8, weights="llama", dynamic=True)
    refs = [1.6917, 2.0749, 0.6984, 1.5899, 1.9252, 1.2408, 1.4975]
    L = [r + 0.1 * i for i, r in enumerate(refs)]  # commoncrawl on target, stackexchange 0.6 above
    new = s.update_weights(dict(zip(SPEC_ORDER, L)))
    expected = by_hand([0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02], L, refs, eta=1.0, c=1e-4)
    assert [new[d] for d in SPEC_ORDER] == pytest.approx(expected, rel=1e-12)


def test_dynamic_reference_first(abc):
    s = DomainSampler(abc, batch_size=2, seq_len=8, weights="uniform", dynamic=True, c=0.1,
                      reference_losses="first")
    L1, L2 = {"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 3.5, "b": 2.0, "c": 0.5}
    assert s.update_weights(L1) == pytest.approx({d: 1 / 3 for d in "abc"})  # L == R: only smoothing
    expected = by_hand([1 / 3] * 3, [3.5, 2.0, 0.5], [3.0, 2.0, 1.0], eta=1.0, c=0.1)
    new = s.update_weights(L2)
    assert [new[d] for d in "abc"] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# Resuming


def test_resumed_sampler_continues_the_identical_stream(abc):
    kwargs = dict(batch_size=8, seq_len=8, weights="a=0.2,b=0.3,c=0.5", dynamic=True,
                  reference_losses="first", seed=7, rank=1, world_size=2)
    s = DomainSampler(abc, **kwargs)
    for _ in range(12):
        s.next_batch()
    s.update_weights({"a": 2.0, "b": 1.0, "c": 1.5})
    for _ in range(9):  # past epoch boundaries of the small domains
        s.next_batch()
    s.update_weights({"a": 2.5, "b": 0.9, "c": 1.2})
    state = json.loads(json.dumps(s.state_dict()))  # plain Python: survives json (and torch.save)
    expected = [s.next_batch() for _ in range(15)]

    resumed = DomainSampler(abc, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.weights == pytest.approx(s.history[-1]["weights"])
    for want, got in zip(expected, (resumed.next_batch() for _ in range(15))):
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    # the reference of 'first' was restored too: the next update agrees
    assert resumed.update_weights({"a": 1.0, "b": 1.0, "c": 1.0}) == s.update_weights({"a": 1.0, "b": 1.0, "c": 1.0})


def test_resume_refuses_another_stream(abc):
    state = DomainSampler(abc, batch_size=2, seq_len=8, seed=1).state_dict()
    with pytest.raises(ValueError, match="cannot resume.*seed=1"):
        DomainSampler(abc, batch_size=2, seq_len=8, seed=2).load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# Evaluation windows


def test_eval_windows_walk_the_val_split(abc):
    tokens = load_shards(abc, "val")["b"]
    n = (len(tokens) - 1) // 5
    full = list(eval_windows(abc, "b", seq_len=5, batch_size=3))
    x = torch.cat([b[0] for b in full])
    y = torch.cat([b[1] for b in full])
    assert x.shape == (n, 5) and all(b[0].shape[0] <= 3 for b in full)
    assert x.flatten().tolist() == tokens[:n * 5].tolist() and torch.equal(x[:, 1:], y[:, :-1])
    few = torch.cat([b[0] for b in eval_windows(abc, "b", seq_len=5, max_windows=4)])
    again = torch.cat([b[0] for b in eval_windows(abc, "b", seq_len=5, max_windows=4)])
    assert torch.equal(few, again) and few.shape == (4, 5)
    assert torch.equal(few[-1], x[(3 * n) // 4])  # spread over the split, not its first 4 windows
    with pytest.raises(ValueError, match="unknown domain 'z'; valid domains"):
        eval_windows(abc, "z", seq_len=5)


# ---------------------------------------------------------------------------------------------------
# Bad input: each a clear message naming the problem and the fix


def test_missing_folder_and_meta(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: make it with `python data/prepare.py`"):
        load_shards(str(tmp_path / "nope"), "train")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"meta.json not found.*python data/prepare.py"):
        DomainSampler(str(tmp_path / "empty"), batch_size=2, seq_len=4)


def test_missing_empty_and_truncated_shards(abc):
    os.remove(os.path.join(abc, "b.val.bin"))
    with pytest.raises(FileNotFoundError, match=r"b\.val\.bin is missing.*python data/prepare.py"):
        load_shards(abc, "val")
    open(os.path.join(abc, "c.train.bin"), "wb").close()
    with pytest.raises(ValueError, match=r"c\.train\.bin is empty.*python data/prepare.py"):
        DomainSampler(abc, batch_size=2, seq_len=4)
    np.arange(5, dtype=np.uint16).tofile(os.path.join(abc, "c.train.bin"))
    with pytest.raises(ValueError, match=r"c\.train\.bin holds 5 tokens but meta.json says"):
        load_shards(abc, "train")


def test_bad_weights(abc, slimpajama):
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['x'\] in weights; valid domains: \['a', 'b', 'c'\]"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights={"a": 0.5, "x": 0.5})
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['github'\]"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights="a=0.5,github=0.5")
    with pytest.raises(ValueError, match=r"weight of domain 'b' is -0.2: weights must be finite and >= 0"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights={"a": 1.2, "b": -0.2})
    with pytest.raises(ValueError, match=r"weights sum to 0.9, not 1 \(tolerance 1e-06\).*renormalize=True"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights="a=0.5,b=0.4")
    s = DomainSampler(abc, batch_size=2, seq_len=4, weights="a=0.5,b=0.4", renormalize=True)
    assert s.weights == pytest.approx({"a": 5 / 9, "b": 4 / 9, "c": 0.0})
    with pytest.raises(ValueError, match=r"cannot read weights 'a=0.5,b'.*name=value pairs"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights="a=0.5,b")
    with pytest.raises(ValueError, match=r"cannot read weights 'shearedd'.*uniform, llama, sheared, proportional"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights="shearedd")
    with pytest.raises(ValueError, match=r"'llama' are the paper's numbers for the 7 SlimPajama domains"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights="llama")
    with pytest.raises(ValueError, match=r"all domain weights are 0"):
        DomainSampler(abc, batch_size=2, seq_len=4, weights={"a": 0.0})
    # user weights by name work on the 7 domains too; only the named ones are drawn
    s = DomainSampler(slimpajama, batch_size=2, seq_len=4, weights="github=0.25,arxiv=0.75")
    assert s.weights["github"] == 0.25 and s.weights["commoncrawl"] == 0.0


def test_windows_no_domain_can_fill(abc):
    with pytest.raises(ValueError, match=r"domain 'a' has \d+ train tokens: 0 window\(s\) of seq_len\+1 = 100001"):
        DomainSampler(abc, batch_size=2, seq_len=100_000)


def test_dynamic_needs_references_and_complete_losses(abc):
    with pytest.raises(ValueError, match=r"dynamic weights need reference losses.*reference_losses='first'"):
        DomainSampler(abc, batch_size=2, seq_len=4, dynamic=True)
    s = DomainSampler(abc, batch_size=2, seq_len=4, dynamic=True, reference_losses={"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match=r"val_losses must give a loss for each domain \['a', 'b', 'c'\]"):
        s.update_weights({"a": 1.0, "b": 1.0})


def test_cli_key_value_and_one_line_errors(abc, capsys):
    counts = sample.main([f"--data_dir={abc}", "--batches=20", "--batch_size=4", "--seq_len=8", "--seed=1"])
    assert counts.sum() == 80
    for argv, says in (([f"--data_dir={abc}", "--seq_len=2.5"], "--seq_len"),
                       ([f"--data_dir={abc}", "--weights=a=0.5,b=0.4"], "sum to"),
                       (["--data_dir=/nonexistent/folder"], "does not exist")):
        with pytest.raises(SystemExit) as e:
            run_cli(sample.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err


def test_uint32_shards_read_with_meta_dtype(tmp_path):
    """LLaMA-3-size vocabularies: ids above 65,535 come back intact (not wrapped by a uint16 view)."""
    root = tmp_path / "big"
    root.mkdir()
    ids = {"a": np.array([70000, 128000, 5, 128001] * 10, dtype=np.uint32),
           "b": np.array([9, 100000, 128001] * 10, dtype=np.uint32)}
    meta = {"vocab_size": 128256, "dtype": "uint32", "bos_id": 128000, "eos_id": 128001, "domains": {}}
    for name, arr in ids.items():
        for split in ("train", "val"):
            arr.tofile(root / f"{name}.{split}.bin")
        meta["domains"][name] = {"train_tokens": arr.size, "val_tokens": arr.size}
    (root / "meta.json").write_text(json.dumps(meta))
    shards = load_shards(str(root), "train")
    assert shards["a"].tolist() == ids["a"].tolist() and shards["b"].dtype == np.uint32
