"""
Chapter: the domain mixture. Which text does the MoE see during continual pretraining?

LLaMA-MoE continues pretraining on SlimPajama's 7 domains (SPEC §4). Every training sequence is packed
from ONE domain, and that domain is drawn with probability equal to its weight. The weights are either
static (uniform, LLaMA's original mixture, Sheared-LLaMA's final weights - the paper's choice) or dynamic:
after each evaluation they move toward domains whose validation loss is still far above a reference
model's loss (Sheared-LLaMA's rule, SPEC §4).

This file reads the token shards written by data/prepare.py and turns them into (B, T) batches:

    meta.json + {domain}.{split}.bin  --load_shards-->  {domain: flat token array}
    flat token array  --cut into windows of T+1 tokens-->  window slots 0 .. n-1 per domain
    per window: draw a domain by weight, take that domain's next slot in a seeded shuffle -> x, y

Read top to bottom: the paper's numbers, the shard reader, the weights, the dynamic rule, the shuffle,
the sampler, the evaluation windows that train.py and eval.py share, and split.py's sample text.

    python sample.py --data_dir=data/embedded --weights=uniform --seq_len=256 --batch_size=8
"""

import copy
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from configurator import UserError, load_config, run_cli, setting
from data.jsonl import SLIMPAJAMA_DOMAINS

# -----------------------------------------------------------------------------------------------------
# 1. The paper's numbers for SlimPajama's 7 domains (SPEC §4; SLIMPAJAMA_DOMAINS: the names data/jsonl.py
#    gives them, in the paper's order: commoncrawl, c4, github, wikipedia, book, arxiv, stackexchange)

# LLaMA's original pretraining mixture.
LLAMA_WEIGHTS = dict(zip(SLIMPAJAMA_DOMAINS, (0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02)))
# StaticSheared: the final weights of Sheared-LLaMA's dynamic batch loading; LLaMA-MoE's choice
# (best downstream, though not lowest loss).
SHEARED_WEIGHTS = dict(zip(SLIMPAJAMA_DOMAINS, (0.361, 0.492, 0.008, 0.031, 0.091, 0.007, 0.010)))
# Reference losses R_i of the dynamic rule: LLaMA-2 7B on SlimPajama validation - the dense model
# LLaMA-MoE is split from, so "excess loss" means "how far the MoE still is from its own parent".
LLAMA2_7B_REFERENCE_LOSSES = dict(zip(SLIMPAJAMA_DOMAINS, (1.6917, 2.0749, 0.6984, 1.5899, 1.9252, 1.2408, 1.4975)))

PRESETS = ("uniform", "llama", "sheared", "proportional")
WEIGHT_TOLERANCE = 1e-6  # weights must sum to 1 within this; we never renormalise silently
PREPARE_HINT = "make it with `python data/prepare.py`"

# -----------------------------------------------------------------------------------------------------
# 2. Reading the shards: the one reader of the format data/prepare.py writes (its docstring has it all)
#
#   meta.json: {"vocab_size", "dtype": "uint16"|"uint32", "bos_id", "eos_id", "tokenizer", "tokenizer_sha256",
#               "domains": {name: {"train_tokens", "val_tokens", "train_docs", "val_docs"}}}
#   {name}.{split}.bin: the split's documents' tokens back to back, each document followed by eos_id.


def load_meta(data_dir):
    """meta.json of a shard folder, with a clear error (and the fix) when it is not there."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data folder {data_dir!r} does not exist: {PREPARE_HINT}")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {data_dir!r} is not a shard folder; {PREPARE_HINT}")
    with open(path) as f:
        meta = json.load(f)
    if not meta.get("domains"):
        raise ValueError(f"{path} lists no domains; rebuild the shards: {PREPARE_HINT}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"{path}: dtype must be 'uint16' or 'uint32', got {meta.get('dtype')!r}")
    return meta


def load_shards(data_dir, split="train"):
    """{domain: np.memmap of token ids} for one split, in meta.json's domain order.

    Memory-mapped, so a 300 GB SlimPajama domain costs no RAM until a window is read."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    shards = {}
    for name, info in meta["domains"].items():
        path = os.path.join(data_dir, f"{name}.{split}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shard {path} is missing (meta.json lists domain {name!r}): {PREPARE_HINT}")
        size = os.path.getsize(path)
        if size == 0:  # np.memmap cannot map an empty file, and an empty domain cannot be sampled
            raise ValueError(f"shard {path} is empty: domain {name!r} has no {split} tokens; {PREPARE_HINT}")
        if size % dtype.itemsize:
            raise ValueError(f"shard {path} has {size} bytes, not a whole number of {dtype} tokens: "
                             f"it is truncated; {PREPARE_HINT}")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        expected = info.get(f"{split}_tokens")
        if expected is not None and expected != len(tokens):
            raise ValueError(f"shard {path} holds {len(tokens)} tokens but meta.json says {expected}: "
                             f"the folder mixes two runs or a write was cut short; {PREPARE_HINT}")
        shards[name] = tokens
    return shards


# -----------------------------------------------------------------------------------------------------
# 3. Domain weights: presets, user weights by name, and the checks


def parse_weights(text):
    """'c4=0.7,github=0.3' -> {'c4': 0.7, 'github': 0.3} (the command-line form of user weights)."""
    weights = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        try:
            if not eq:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"cannot read weights {text!r}: expected one of {', '.join(PRESETS)} "
                             f"or name=value pairs like 'c4=0.7,github=0.3'") from None
    return weights


def preset_weights(name, domains, train_tokens):
    """The built-in strategies of SPEC §4 (+ 'proportional', i.e. natural sampling by size)."""
    if name == "uniform":  # StaticUniform: 1/K each
        return {d: 1.0 / len(domains) for d in domains}
    if name == "proportional":  # each domain as often as its share of training tokens
        total = sum(train_tokens[d] for d in domains)
        if total <= 0:
            raise ValueError(f"'proportional' weights need train_tokens per domain in meta.json; {PREPARE_HINT}")
        return {d: train_tokens[d] / total for d in domains}
    # 'llama' and 'sheared' are the paper's numbers for exactly the 7 SlimPajama domains
    if set(domains) != set(SLIMPAJAMA_DOMAINS):
        raise ValueError(f"weights {name!r} are the paper's numbers for the 7 SlimPajama domains "
                         f"({', '.join(SLIMPAJAMA_DOMAINS)}); this data has domains {list(domains)}: "
                         f"use 'uniform', 'proportional' or weights by name like 'a=0.5,b=0.5'")
    return dict(LLAMA_WEIGHTS if name == "llama" else SHEARED_WEIGHTS)


def check_weights(weights, domains, renormalize=False):
    """User weights by name -> a complete {domain: weight} in `domains` order. Domains not named get 0."""
    unknown = sorted(set(weights) - set(domains))
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown} in weights; valid domains: {list(domains)}")
    full = {}
    for d in domains:
        w = float(weights.get(d, 0.0))
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of domain {d!r} is {w}: weights must be finite and >= 0")
        full[d] = w
    total = sum(full.values())
    if total <= 0:
        raise ValueError(f"all domain weights are 0: give at least one of {list(domains)} a positive weight")
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        if not renormalize:
            raise ValueError(f"weights sum to {total:.8g}, not 1 (tolerance {WEIGHT_TOLERANCE:g}): fix them, "
                             f"or pass renormalize=True (--renormalize) to divide them by their sum")
        full = {d: w / total for d, w in full.items()}
    return full


def resolve_weights(weights, domains, train_tokens, renormalize=False):
    """Any accepted form ('sheared', {'c4': 1.0}, 'c4=0.5,github=0.5') -> {domain: weight}, checked."""
    if isinstance(weights, str):
        if weights in PRESETS:
            weights = preset_weights(weights, domains, train_tokens)
        else:
            weights = parse_weights(weights)
    if not isinstance(weights, dict):
        raise ValueError(f"weights must be a preset name, a 'name=value,...' string or a dict, got {type(weights)}")
    return check_weights(weights, domains, renormalize)


# -----------------------------------------------------------------------------------------------------
# 4. Dynamic weights: Sheared-LLaMA's rule (SPEC §4)
#
#   a = softmax(log w + eta * (L - R)),   w <- (1 - c) * a + c / K          eta = 1, c = 1e-4
#
# A domain whose validation loss L_i sits above its reference R_i gets more weight, exponentially in the
# gap; the c/K term keeps every domain drawable. We implement the SPEC formula as written (no clipping of
# L - R at 0, which Sheared-LLaMA's own algorithm applies). LLaMA-MoE found this rule unstable in loss.


def dynamic_update(weights, losses, references, eta=1.0, c=1e-4):
    """(K,) weights, (K,) losses, (K,) reference losses -> (K,) new weights, all float64."""
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore"):  # log 0 = -inf: a weight-0 domain stays out of the softmax
        z = np.log(w) + eta * (np.asarray(losses, np.float64) - np.asarray(references, np.float64))
    a = np.exp(z - z.max())  # shift by the max: same softmax, no overflow
    a /= a.sum()
    return (1.0 - c) * a + c / len(w)


# -----------------------------------------------------------------------------------------------------
# 5. Window slots and a shuffle that needs no table
#
# A domain of N tokens holds n = (N - 1) // T window slots: slot s is tokens[s*T : s*T + T + 1], so
# x = window[:-1], y = window[1:] and every token is a target in exactly one slot. A window ignores
# document boundaries (the eos tokens between documents stay in it): that is packing.
#
# Each epoch of a domain visits its slots in a seeded random order, the same order on every rank, and
# rank r takes positions r, r + W, r + 2W, ... of it: the ranks' windows are disjoint and together cover
# the epoch. SlimPajama's CommonCrawl has ~80M slots of 4096 tokens; a permutation table would cost
# 650 MB per rank, so the order is a keyed bijection computed on the fly: a 4-round Feistel network on
# 2h-bit numbers (2^2h >= n), "cycle-walked" (re-applied) until it lands below n. A bijection on [0, 2^2h)
# walked this way is a bijection on [0, n), and since 2^2h < 4n it takes < 4 walks on average.

MASK64 = (1 << 64) - 1


def mix64(x):
    """A 64-bit integer hash (the splitmix64 finaliser): the Feistel round function."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def shuffle_keys(seed, domain_idx, epoch):
    """4 round keys for one (domain, epoch): shared by all ranks, new every epoch."""
    seq = np.random.SeedSequence(seed, spawn_key=(1, domain_idx, epoch))
    return [int(k) for k in seq.generate_state(4, dtype=np.uint64)]


def shuffled_slot(i, n, keys):
    """Position i of a keyed random permutation of range(n) -> the slot visited at that position."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2*half bits cover 0 .. n-1
    mask = (1 << half) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        x = (left << half) | right
        if x < n:
            return x


# -----------------------------------------------------------------------------------------------------
# 6. The sampler


class DomainSampler:
    """Domain-weighted (B, T) batches; each window packed from one domain drawn by weight (SPEC §4).

    weights: 'uniform' | 'llama' | 'sheared' | 'proportional' | {name: w} | 'name=w,name=w' (must sum to 1;
    names not given get 0). dynamic=True enables update_weights(); its reference losses default to
    LLaMA-2 7B's for the 7 SlimPajama domains. For other domains there are no published references, so
    we REQUIRE a choice rather than invent one: reference_losses={name: loss} (e.g. the dense base
    model's per-domain validation loss from eval.py, the analogue of the paper's LLaMA-2 7B numbers), or
    reference_losses='first' to take the losses of the first update as the reference (that update then
    leaves the weights as they are, but for the c/K smoothing).

    Deterministic in (seed, rank, world_size); state_dict() resumes the identical stream.
    """

    def __init__(self, data_dir, split="train", batch_size=8, seq_len=256, weights="uniform", dynamic=False,
                 eta=1.0, c=1e-4, reference_losses=None, seed=0, rank=0, world_size=1, renormalize=False):
        self.data_dir, self.split = data_dir, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.dynamic, self.eta, self.c = dynamic, eta, c

        meta = load_meta(data_dir)
        self.shards = load_shards(data_dir, split)
        self.domains = list(self.shards)
        self.eos_id = meta.get("eos_id")
        train_tokens = {d: meta["domains"][d].get("train_tokens", 0) for d in self.domains}
        self._w = np.array([resolve_weights(weights, self.domains, train_tokens, renormalize)[d]
                            for d in self.domains])  # (K,)
        self._reference = self._initial_reference(reference_losses) if dynamic else None

        # n_slots[d] windows of T+1 tokens per domain; every domain we may draw needs one slot per rank.
        # With dynamic weights every domain gets at least c/K, so every domain must be drawable.
        self.n_slots = [(len(self.shards[d]) - 1) // seq_len for d in self.domains]
        for k, d in enumerate(self.domains):
            if (self._w[k] > 0 or dynamic) and self.n_slots[k] < world_size:
                raise ValueError(
                    f"domain {d!r} has {len(self.shards[d])} {split} tokens: {self.n_slots[k]} window(s) of "
                    f"seq_len+1 = {seq_len + 1} tokens, fewer than one per rank (world_size={world_size}); "
                    f"lower seq_len, give {d!r} weight 0 (static weights only), or add data")

        # The stream's state: domain-choice RNG (one per rank), a cursor (epoch, position) per domain.
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0, rank))))
        self._epoch = [0] * len(self.domains)
        self._pos = [0] * len(self.domains)
        self._keys = {}  # domain -> (epoch, Feistel keys), recomputed on demand, not saved
        self.tokens_seen = 0  # this rank's target tokens so far
        self.history = []  # one entry per update_weights: {"tokens", "losses", "weights"}
        self.last_windows = []  # (domain, epoch, start token) of each row of the last batch, for inspection

    @property
    def weights(self):
        return {d: float(w) for d, w in zip(self.domains, self._w)}

    def _initial_reference(self, reference_losses):
        if reference_losses == "first":
            return None  # set by the first update_weights
        if reference_losses is None:
            if set(self.domains) != set(SLIMPAJAMA_DOMAINS):
                raise ValueError(
                    f"dynamic weights need reference losses for domains {self.domains}: the built-in ones "
                    f"(LLaMA-2 7B) cover only the 7 SlimPajama domains; pass reference_losses={{name: loss}} "
                    f"(e.g. the dense base model's per-domain val loss from eval.py) or reference_losses='first'")
            reference_losses = LLAMA2_7B_REFERENCE_LOSSES
        return self._loss_vector(reference_losses, "reference_losses")

    def _loss_vector(self, losses, what="val_losses"):
        """{domain: loss} covering exactly our domains -> (K,) float64 array in domain order."""
        if not isinstance(losses, dict) or set(losses) != set(self.domains):
            got = sorted(losses) if isinstance(losses, dict) else type(losses).__name__
            raise ValueError(f"{what} must give a loss for each domain {self.domains}; got {got}")
        vec = np.array([float(losses[d]) for d in self.domains])
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"{what} must be finite, got {losses}")
        return vec

    # -- drawing windows --------------------------------------------------------------------------------

    def _next_start(self, k):
        """This rank's next window of domain k -> its first token's offset in the shard."""
        n, r, W = self.n_slots[k], self.rank, self.world_size
        per_rank = (n - r + W - 1) // W  # positions r, r+W, ... below n
        if self._pos[k] >= per_rank:  # this rank finished its share of the epoch: reshuffle
            self._epoch[k] += 1
            self._pos[k] = 0
        epoch = self._epoch[k]
        if self._keys.get(k, (None,))[0] != epoch:  # keys of this domain's current epoch, cached
            self._keys[k] = (epoch, shuffle_keys(self.seed, k, epoch))
        slot = shuffled_slot(r + self._pos[k] * W, n, self._keys[k][1])
        self._pos[k] += 1
        self.last_windows.append((k, self._epoch[k], slot * self.seq_len))
        return slot * self.seq_len

    def next_batch(self):
        """-> x (B, T) int64, y (B, T) int64 (x shifted by one), domain_idx (B,) int64 into self.domains."""
        B, T = self.batch_size, self.seq_len
        # Draw each row's domain by inverse CDF: u ~ U[0, 1) lands in domain k with probability w_k.
        cdf = np.cumsum(self._w)
        cdf /= cdf[-1]  # so u < cdf[-1] always; a weight-0 domain has an empty interval
        domain_idx = np.searchsorted(cdf, self._rng.random(B), side="right")  # (B,)
        self.last_windows = []
        windows = np.empty((B, T + 1), dtype=np.int64)  # (B, T+1)
        for b, k in enumerate(domain_idx):
            start = self._next_start(int(k))
            windows[b] = self.shards[self.domains[k]][start:start + T + 1]
        self.tokens_seen += B * T
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), torch.from_numpy(domain_idx.astype(np.int64))

    # -- dynamic weights --------------------------------------------------------------------------------

    def update_weights(self, val_losses):
        """Sheared-LLaMA's rule (SPEC §4) with per-domain validation losses -> the new {domain: weight}.

        In a distributed run, pass the same (all-reduced) losses on every rank so the weights agree."""
        assert self.dynamic, "static weights never change: build the sampler with dynamic=True"
        losses = self._loss_vector(val_losses)
        if self._reference is None:  # reference_losses='first'
            self._reference = losses.copy()
        self._w = dynamic_update(self._w, losses, self._reference, self.eta, self.c)
        self.history.append({"tokens": self.tokens_seen, "losses": dict(zip(self.domains, losses.tolist())),
                             "weights": self.weights})
        if self.rank == 0:
            print("[sample] dynamic weights: " + " ".join(f"{d}={w:.4f}" for d, w in self.weights.items()))
        return self.weights

    # -- resuming ---------------------------------------------------------------------------------------

    def state_dict(self):
        """Plain Python (json- and torch.save-able): everything the rest of the stream depends on."""
        return copy.deepcopy({
            "domains": self.domains, "split": self.split, "seq_len": self.seq_len, "seed": self.seed,
            "rank": self.rank, "world_size": self.world_size,
            "weights": self._w.tolist(), "rng": self._rng.bit_generator.state,
            "epoch": self._epoch, "pos": self._pos,
            "tokens_seen": self.tokens_seen,
            "reference_losses": None if self._reference is None else self._reference.tolist(),
            "history": self.history,
        })

    def load_state_dict(self, state):
        # The stream is defined by these; a different one cannot continue it. (batch_size may differ:
        # the stream is a sequence of windows, batches only group it.)
        for key in ("domains", "split", "seq_len", "seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved sampler has {key}={state[key]!r}, this one "
                                 f"{getattr(self, key)!r}; build the sampler with the saved settings")
        state = copy.deepcopy(state)
        self._w = np.array(state["weights"], dtype=np.float64)
        self._rng.bit_generator.state = state["rng"]
        self._epoch, self._pos = list(state["epoch"]), list(state["pos"])
        self.tokens_seen = state["tokens_seen"]
        ref = state["reference_losses"]
        self._reference = None if ref is None else np.array(ref, dtype=np.float64)
        self.history = state["history"]


# -----------------------------------------------------------------------------------------------------
# 7. Evaluation windows: a fixed, deterministic walk over one domain's validation split


def eval_windows(data_dir, domain, seq_len, batch_size=1, max_windows=None, split="val"):
    """-> iterator of (x (b, T), y (b, T)) int64, b <= batch_size, over `domain`'s split.

    All window slots in order, or max_windows of them evenly spread over the split (so a few windows
    still see the whole split, not just its first documents). The tail shorter than T+1 tokens is unused.
    Checks run now, not at the first next()."""
    shards = load_shards(data_dir, split)
    if domain not in shards:
        raise ValueError(f"unknown domain {domain!r}; valid domains: {list(shards)}")
    tokens = shards[domain]
    n = (len(tokens) - 1) // seq_len
    if n == 0:
        raise ValueError(f"domain {domain!r} has {len(tokens)} {split} tokens, fewer than seq_len+1 = {seq_len + 1}")
    m = n if max_windows is None else min(max_windows, n)
    slots = (np.arange(m) * n) // m  # (m,) evenly spread, distinct since m <= n

    def walk():
        for i in range(0, m, batch_size):
            windows = np.stack([tokens[s * seq_len:s * seq_len + seq_len + 1] for s in slots[i:i + batch_size]])
            windows = torch.from_numpy(windows.astype(np.int64))  # (b, T+1)
            yield windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    return walk()


# -----------------------------------------------------------------------------------------------------
# 8. Sample text for profiling a model (split.py's importance and carving): random train windows, or a text file

def sample_sequences(data, n, seq_len, seed=0, tokenizer=None, vocab_size=None):
    """n windows of seq_len + 1 tokens from `data` -> (tokens (n, seq_len+1) int64, domain (n,) int64 or None).

    data: a shard folder (windows drawn at random from each domain's *train* split, n/#domains each, so held-out
    validation text stays unseen) or a text file (tokenised with `tokenizer`, cut into consecutive windows).
    Ids >= vocab_size (text tokenised for another model) are refused. Raises ValueError / OSError."""
    rng = np.random.default_rng(seed)
    if os.path.isdir(data):
        shards = load_shards(data, "train")                                   # {domain: memmap}
        rows, domains = [], []
        for di, (name, tokens) in enumerate(shards.items()):
            if len(tokens) <= seq_len:
                raise ValueError(f"domain {name!r} has {len(tokens)} train tokens, fewer than seq_len+1 = "
                                 f"{seq_len + 1}: lower --seq_len")
            count = n // len(shards) + (di < n % len(shards))
            for s in rng.integers(0, len(tokens) - seq_len, size=count):
                rows.append(np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64))
                domains.append(di)
        tokens, domains = torch.from_numpy(np.stack(rows)), torch.tensor(domains)
    else:
        from tokenizer import Tokenizer
        with open(data, encoding="utf-8") as f:
            ids = Tokenizer(tokenizer).encode(f.read(), bos=True, eos=True)
        have = (len(ids) - 1) // seq_len
        if have < n:
            raise ValueError(f"{len(ids)} tokens make {have} windows of {seq_len + 1}, need {n}: give more text, "
                             f"or lower --seq_len or the number of sequences (--importance_seqs, --profile_seqs)")
        ids = torch.tensor(ids[:n * seq_len + 1])
        tokens, domains = torch.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]), None
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= the model's vocab_size {vocab_size}: the data was "
                         f"tokenised for another model")
    return tokens, domains


# -----------------------------------------------------------------------------------------------------
# 9. A look at the mixture from the command line

@dataclass
class SampleConfig:
    data_dir: str = "data/embedded"
    split: str = setting("train", choices=("train", "val"))
    weights: str = "uniform"     # uniform | llama | sheared | proportional | name=w,name=w
    renormalize: bool = False    # divide user weights by their sum
    seq_len: int = setting(256, ge=1)
    batch_size: int = setting(8, ge=1)
    batches: int = setting(200, ge=0)
    seed: int = 0


def main(argv=None):
    """Draw batches and compare the domain frequencies with the weights."""
    cfg = load_config(SampleConfig(), sys.argv[1:] if argv is None else argv, doc=__doc__)
    try:
        sampler = DomainSampler(cfg.data_dir, cfg.split, cfg.batch_size, cfg.seq_len, cfg.weights,
                                seed=cfg.seed, renormalize=cfg.renormalize)
    except (FileNotFoundError, ValueError) as e:  # the sampler's checks are the user's errors here
        raise UserError(str(e)) from None
    counts = np.zeros(len(sampler.domains), dtype=np.int64)
    for _ in range(cfg.batches):
        x, y, domain_idx = sampler.next_batch()
        counts += np.bincount(domain_idx.numpy(), minlength=len(sampler.domains))
    print(f"{'domain':<16}{'tokens':>14}{'windows':>10}{'weight':>9}{'drawn':>9}")
    for k, d in enumerate(sampler.domains):
        print(f"{d:<16}{len(sampler.shards[d]):>14,}{sampler.n_slots[k]:>10,}{sampler._w[k]:>9.4f}"
              f"{counts[k] / max(1, counts.sum()):>9.4f}")
    if cfg.batches:
        print(f"last x[0, :16] ({sampler.domains[domain_idx[0]]}): {x[0, :16].tolist()}")
    return counts


if __name__ == "__main__":
    run_cli(main)
