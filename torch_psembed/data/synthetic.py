"""A seeded, streamed click-log simulator with a known ground-truth click model.

Each sample has one feasign in each of ``num_slots`` slots. In slot ``s`` the feasign is drawn by popularity
rank ``r`` from a truncated Zipf law (exponent ``a_s``, vocabulary ``V_s``); the id behind a rank drifts by
day: position ``r`` gets a new id every ``1 / churn`` days (at a phase hashed from ``(s, r)``), so every day
brings new ids and the old ones stop appearing: the table grows and eviction has work.

Clicks are drawn from ``p = sigmoid(bias + sum_s w(f_s) + sum_{(a,b)} c_ab <v(f_a), v(f_b)>)``, where the
per-feasign weight ``w`` and the latent vectors ``v`` are generated from a hash of the feasign, so nothing
big is ever stored, and the pairwise terms make a model with feature crosses (MLP, FM) beat LR. The true
``p`` travels with each batch, so the best possible (oracle) AUC of a day is known.

Everything is a pure function of ``(seed, day, split, chunk)``: chunks can be generated in any order by any
process, which is how the data is split over ranks and DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

import numpy as np
import torch

from ..config import _check_number, _is_int
from .hashing import feasigns, mix64, normal, uniform01

__all__ = ["SimulatorConfig", "ClickLogSimulator"]

_SPLITS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class SimulatorConfig:
    """The click log's shape.

    Args:
        num_slots (int): slots per sample (one feasign each). Default: 26.
        samples_per_day (int): training samples per day. Default: 200_000.
        test_samples (int): held-out samples per day used for next-day evaluation. Default: 50_000.
        vocab_min, vocab_max (int): per-slot vocabulary sizes are log-uniform in this range.
        zipf_min, zipf_max (float): per-slot Zipf exponents are uniform in this range (> 1).
        churn (float): fraction of rank positions that get a new id each day, in (0, 1]. Default: 0.2.
        first_order_std (float): std of the sum of per-feasign weights (logit scale). Default: 1.2.
        num_pairs (int): pairwise interaction terms between slots. Default: 8.
        pair_std (float): std of the sum of the pairwise terms. Default: 0.8.
        latent_dim (int): width of the latent vectors of the pairwise terms. Default: 4.
        ctr (float): approximate mean click rate. Default: 0.15.
        chunk_size (int): samples per generated chunk (= a training batch). Default: 1024.
        seed (int): everything derives from it. Default: 0.
    """

    num_slots: int = 26
    samples_per_day: int = 200_000
    test_samples: int = 50_000
    vocab_min: int = 100
    vocab_max: int = 200_000
    zipf_min: float = 1.05
    zipf_max: float = 1.35
    churn: float = 0.2
    first_order_std: float = 1.2
    num_pairs: int = 8
    pair_std: float = 0.8
    latent_dim: int = 4
    ctr: float = 0.15
    chunk_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise ValueError(f"SimulatorConfig.{what}")

        def need_int(name: str, low: int, high: int) -> None:
            v = getattr(self, name)
            need(_is_int(v) and low <= v <= high, f"{name} must be an int in [{low}, {high}], got {v!r}")

        need_int("num_slots", 2, 2**31)
        need_int("samples_per_day", 1, 2**40)
        need_int("test_samples", 1, 2**40)
        need_int("vocab_min", 1, 2**40 - 1)
        need_int("vocab_max", 1, 2**40 - 1)
        need(self.vocab_min <= self.vocab_max, f"vocab_min must be <= vocab_max, got {self.vocab_min}, {self.vocab_max}")
        _check_number("SimulatorConfig", "zipf_min", self.zipf_min, 1.0, math.inf, low_open=True, high_open=True)
        _check_number("SimulatorConfig", "zipf_max", self.zipf_max, 1.0, math.inf, low_open=True, high_open=True)
        need(self.zipf_min <= self.zipf_max, f"zipf_min must be <= zipf_max, got {self.zipf_min}, {self.zipf_max}")
        _check_number("SimulatorConfig", "churn", self.churn, 0.0, 1.0, low_open=True)
        _check_number("SimulatorConfig", "first_order_std", self.first_order_std, 0.0, math.inf, high_open=True)
        _check_number("SimulatorConfig", "pair_std", self.pair_std, 0.0, math.inf, high_open=True)
        need_int("num_pairs", 0, self.num_slots * (self.num_slots - 1) // 2)
        need_int("latent_dim", 1, 4096)
        _check_number("SimulatorConfig", "ctr", self.ctr, 0.0, 1.0, low_open=True, high_open=True)
        need_int("chunk_size", 1, 2**31)
        need_int("seed", 0, 2**63 - 1)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class ClickLogSimulator:
    """Generates the click log of :class:`SimulatorConfig` chunk by chunk.

    Examples::

        >>> sim = ClickLogSimulator(SimulatorConfig(samples_per_day=2048, chunk_size=1024))
        >>> batch = sim.chunk(day=0, split="train", index=0)
        >>> batch["keys"].shape, batch["labels"].shape
        (torch.Size([26624]), torch.Size([1024]))
    """

    def __init__(self, config: SimulatorConfig = SimulatorConfig()) -> None:
        if not isinstance(config, SimulatorConfig):
            raise TypeError(f"config must be a SimulatorConfig, got {type(config).__name__}")
        self.config = c = config
        rng = np.random.default_rng([c.seed, 0x51A7])
        S = c.num_slots
        self.vocab = np.exp(rng.uniform(math.log(c.vocab_min), math.log(c.vocab_max), S)).astype(np.int64)
        # exp(log(n)) may round below n and the cast truncates: clipped into the documented range (the
        # shipped configs' seeds draw no such value, so their data did not change)
        self.vocab = np.clip(self.vocab, c.vocab_min, c.vocab_max)
        self.zipf = rng.uniform(c.zipf_min, c.zipf_max, S)
        raw = rng.uniform(0.3, 1.0, S)
        self.sigma = raw * (c.first_order_std / math.sqrt(float(np.sum(raw**2))))
        # pairwise terms between distinct slots, preferring small-vocabulary slots (learnable crosses)
        order = np.argsort(self.vocab, kind="stable")
        cand = [(int(a), int(b)) for i, a in enumerate(order) for b in order[i + 1 :]]
        cand.sort(key=lambda ab: (max(self.vocab[ab[0]], self.vocab[ab[1]]), ab))
        pool = cand[: max(c.num_pairs * 3, c.num_pairs)]
        pick = rng.choice(len(pool), size=c.num_pairs, replace=False) if c.num_pairs else np.zeros(0, np.int64)
        self.pairs = np.array([pool[i] for i in sorted(pick)], dtype=np.int64).reshape(-1, 2)
        self.pair_coef = (c.pair_std / math.sqrt(max(c.num_pairs, 1))) / math.sqrt(c.latent_dim)
        total_std = math.sqrt(c.first_order_std**2 + (c.pair_std**2 if c.num_pairs else 0.0))
        logit = math.log(c.ctr / (1 - c.ctr))
        self.bias = logit * math.sqrt(1.0 + math.pi * total_std**2 / 8.0)
        self.lifetime = 1.0 / c.churn
        self._slot_ids = np.arange(S, dtype=np.uint64)
        self._pair_slots = np.unique(self.pairs)  # the slots in some pair, and each pair's two positions there
        self._pair_a = np.searchsorted(self._pair_slots, self.pairs[:, 0])
        self._pair_b = np.searchsorted(self._pair_slots, self.pairs[:, 1])

    # -- pieces of the model (exposed for tests) ----------------------------------------------------------
    def ranks(self, u: np.ndarray) -> np.ndarray:
        """Zipf ranks (0-based) of uniforms ``u`` of shape ``(B, num_slots)``: truncated continuous inverse CDF."""
        a = self.zipf[None, :]
        V = self.vocab[None, :].astype(np.float64)
        x = (1.0 - u * (1.0 - (V + 1.0) ** (1.0 - a))) ** (1.0 / (1.0 - a))
        return np.minimum(np.floor(x).astype(np.int64) - 1, self.vocab[None, :] - 1)

    def ids(self, ranks: np.ndarray, day: int) -> np.ndarray:
        """Feasigns (int64) of ``ranks`` (``(B, num_slots)``) on ``day``: rank position + its id generation."""
        S = self.config.num_slots
        r = ranks.astype(np.uint64)
        slots = np.broadcast_to(self._slot_ids[None, :], ranks.shape)
        seed = np.uint64(self.config.seed)
        with np.errstate(over="ignore"):
            phase = uniform01(mix64(r * np.uint64(0x100000001B3) ^ (slots << np.uint64(48)) ^ mix64(seed + np.uint64(7))))
        gen = np.floor((day + phase * self.lifetime) / self.lifetime).astype(np.uint64)
        values = (gen << np.uint64(40)) | r
        salt = mix64(np.full(S, self.config.seed, np.uint64) ^ np.uint64(0xC0FFEE))
        return feasigns(values ^ salt[None, :], slots)

    def weights(self, keys: np.ndarray) -> np.ndarray:
        """The ground-truth first-order logit of each sample, ``sum_s sigma_s * N(hash(f_s))``; keys ``(B, S)``."""
        h = mix64(keys.view(np.uint64) ^ np.uint64(0x1234567)).reshape(keys.shape)
        return (normal(h) * self.sigma[None, :]).sum(axis=1)

    def latent(self, keys: np.ndarray) -> np.ndarray:
        """Latent vectors ``(..., latent_dim)`` of feasigns ``keys``."""
        k = keys.view(np.uint64)[..., None]
        j = np.arange(1, self.config.latent_dim + 1, dtype=np.uint64)
        return normal(mix64(k ^ (j * np.uint64(0x9E3779B97F4A7C15))))

    def probability(self, keys: np.ndarray) -> np.ndarray:
        """True click probability of each sample (keys ``(B, num_slots)`` int64)."""
        z = self.bias + self.weights(keys)
        if len(self.pairs):
            # The latent vectors are a pure function of the feasign, and the paired slots have small
            # vocabularies: compute them once per distinct feasign of those slots (~1.5k of 16k in a
            # 1024-sample chunk), then gather. Same values as latent() on every column, ~2x faster chunks.
            sub = keys[:, self._pair_slots]
            uniq, inverse = np.unique(sub, return_inverse=True)
            lat = self.latent(uniq)[inverse.reshape(sub.shape)]  # (B, len(pair_slots), latent_dim)
            va = lat[:, self._pair_a]
            vb = lat[:, self._pair_b]
            z = z + self.pair_coef * (va * vb).sum(axis=(1, 2))
        return 1.0 / (1.0 + np.exp(-z))

    # -- streaming ----------------------------------------------------------------------------------------
    def num_samples(self, split: str) -> int:
        _check_split(split)
        return self.config.samples_per_day if split == "train" else self.config.test_samples

    def num_chunks(self, split: str) -> int:
        return -(-self.num_samples(split) // self.config.chunk_size)

    def chunk(self, day: int, split: str, index: int) -> Dict[str, torch.Tensor]:
        """Chunk ``index`` of ``split`` on ``day``: a batch dict (see ``torch_psembed.data``)."""
        _check_split(split)
        if not isinstance(day, int) or day < 0:
            raise ValueError(f"day must be an int >= 0, got {day!r}")
        n_chunks = self.num_chunks(split)
        if not 0 <= index < n_chunks:
            raise ValueError(f"index must be in [0, {n_chunks}) for split {split!r}, got {index!r}")
        c = self.config
        size = min(c.chunk_size, self.num_samples(split) - index * c.chunk_size)
        rng = np.random.default_rng([c.seed, day, _SPLITS[split], index])
        u = rng.random((size, c.num_slots))
        keys = self.ids(self.ranks(u), day)
        p = self.probability(keys)
        labels = (rng.random(size) < p).astype(np.float32)
        S = c.num_slots
        return {
            "labels": torch.from_numpy(labels),
            "keys": torch.from_numpy(np.ascontiguousarray(keys.reshape(-1))),
            "offsets": torch.arange(size * S, dtype=torch.int64),
            "slots": torch.arange(S, dtype=torch.int32).repeat(size),
            "prob": torch.from_numpy(p.astype(np.float32)),
        }


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
