"""A plain numpy model of one torch_psembed sparse table (one process, no shards).

Transcribed from the formulas only: docs/architecture.md ("Row semantics", "The _C module") and the shared
reference ``ctr_accessor_semantics.md`` sections 1, 2 and 4, plus the rule formulas of issue 2. It is
deliberately slow and obvious: a dict ``key -> Row`` and one Python loop per merged key.

Numerics: every stored field is float32 (as in the C++ table); each update is computed in float64 from the
stored float32 values and rounded back to float32 when stored, saturating at +-FLT_MAX (a value past
float32's range stores the nearest finite one, never an infinity; weight bounds are clipped to +-FLT_MAX).
So the reference and the C++ table differ by a few float32 ulps per step, not by the accumulation of a
different storage precision.

Random numbers follow the documented counter-based generator::

    u(seed, key, stream, i) = (splitmix64(seed ^ mix64(key) ^ (stream << 56) + i) >> 40) * 2**-24

read with C operator precedence (``+`` binds tighter than ``^``), where ``mix64`` is the splitmix64 finalizer
and ``splitmix64(x)`` adds the golden gamma to ``x`` and then applies the finalizer. Streams: 1 = lr init,
2 = mf init, 3 = admission draw with ``i = (day_index << 48) | (push_id mod 2**48)``, where ``day_index`` is
the table's day + 1 (0 before the first end_day) and ``push_id`` names the push: the table's own count of
pushes with at least one key (0, 1, ...) unless the caller passes one (a trainer's ``(trainer << 32) | count``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

__all__ = [
    "GOLDEN_GAMMA",
    "mix64",
    "splitmix64",
    "uniform",
    "make_rule",
    "Row",
    "CtrTableRef",
]

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_U64 = np.uint64


def _u64(x) -> np.ndarray:
    """uint64 view of int64 keys (bits preserved), or a uint64 array from Python ints."""
    a = np.asarray(x)
    if a.dtype == np.int64:
        return a.view(np.uint64)
    if a.dtype == np.uint64:
        return a
    return np.array(x, dtype=np.uint64)


def mix64(x) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    z = _u64(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> _U64(30))) * _M1
        z = (z ^ (z >> _U64(27))) * _M2
        z = z ^ (z >> _U64(31))
    return z


def splitmix64(x) -> np.ndarray:
    """One splitmix64 output for state ``x``: the finalizer of ``x + golden_gamma``."""
    with np.errstate(over="ignore"):
        return mix64(_u64(x) + GOLDEN_GAMMA)


def uniform(seed: int, keys, stream: int, i) -> np.ndarray:
    """``u(seed, key, stream, i)`` in [0, 1) as float64 (exact multiples of 2**-24)."""
    k = _u64(np.atleast_1d(keys))
    ii = np.asarray(i, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = _U64(seed) ^ mix64(k) ^ ((_U64(stream) << _U64(56)) + ii)
    return (splitmix64(x) >> _U64(40)).astype(np.float64) * 2.0**-24



FLT_MAX = float(np.finfo(np.float32).max)


def _store(x) -> np.ndarray:
    """x as stored by the table: float32, saturated at +-FLT_MAX."""
    return np.clip(np.asarray(x, np.float64), -FLT_MAX, FLT_MAX).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Sparse rules. Each takes float32 w/state, a float64 gradient and the scale; returns new float32 w/state.
# ----------------------------------------------------------------------------------------------------------


class _Rule:
    uses_scale = False

    def __init__(self, opt: dict):
        self.lr = float(opt["learning_rate"])
        self.initial_range = float(opt["initial_range"])
        lo, hi = opt["weight_bounds"]
        self.lo, self.hi = (min(max(float(b), -FLT_MAX), FLT_MAX) for b in (lo, hi))

    def bounds(self):
        return (self.lo, self.hi)

    def clip(self, w: np.ndarray) -> np.ndarray:
        return np.clip(w, self.lo, self.hi).astype(np.float32)

    def state_dim(self, d: int) -> int:
        return 0

    def init_state(self, d: int) -> np.ndarray:
        return np.zeros(self.state_dim(d), np.float32)


class _SGD(_Rule):
    def update(self, w, state, g, scale):
        return self.clip(w.astype(np.float64) - self.lr * g), state


class _AdaGrad(_Rule):
    uses_scale = True

    def __init__(self, opt):
        super().__init__(opt)
        self.g0 = float(opt["initial_g2sum"])

    def state_dim(self, d):
        return 1

    def update(self, w, state, g, scale):
        gh = g / scale
        G = float(state[0])
        w2 = w.astype(np.float64) - self.lr * gh * math.sqrt(self.g0 / (self.g0 + G))  # the old G
        G2 = G + float(np.mean(gh * gh))
        return self.clip(w2), _store([G2])


class _StdAdaGrad(_AdaGrad):
    def state_dim(self, d):
        return d

    def update(self, w, state, g, scale):
        gh = g / scale
        G = state.astype(np.float64)
        w2 = w.astype(np.float64) - self.lr * gh * np.sqrt(self.g0 / (self.g0 + G))
        return self.clip(w2), _store(G + gh * gh)


class _Adam(_Rule):
    def __init__(self, opt):
        super().__init__(opt)
        self.b1 = float(opt["beta1"])
        self.b2 = float(opt["beta2"])
        self.eps = float(opt["epsilon"])

    def state_dim(self, d):
        return 2 * d + 2

    def init_state(self, d):
        s = np.zeros(2 * d + 2, np.float32)
        s[2 * d] = self.b1
        s[2 * d + 1] = self.b2
        return s

    def update(self, w, state, g, scale):
        d = w.shape[0]
        st = state.astype(np.float64)
        m, v, b1pow, b2pow = st[:d], st[d : 2 * d], st[2 * d], st[2 * d + 1]
        lr_t = self.lr * math.sqrt(1.0 - b2pow) / (1.0 - b1pow)
        m = self.b1 * m + (1.0 - self.b1) * g
        v = self.b2 * v + (1.0 - self.b2) * g * g
        # m and v are stored as float32 before the step reads them (as a float32 row would).
        m32, v32 = _store(m), _store(v)
        w2 = w.astype(np.float64) - lr_t * m32.astype(np.float64) / (np.sqrt(v32.astype(np.float64)) + self.eps)
        out = np.concatenate([m32, v32, np.array([b1pow * self.b1, b2pow * self.b2], np.float32)])
        return self.clip(w2), out.astype(np.float32)


class _FTRL(_Rule):
    """FTRL-Proximal; state is ``z[d]`` then ``n[d]``."""

    def __init__(self, opt):
        super().__init__(opt)
        alpha = opt.get("alpha")
        self.alpha = float(self.lr if alpha is None else alpha)
        self.beta = float(opt["beta"])
        self.l1 = float(opt["l1"])
        self.l2 = float(opt["l2"])

    def state_dim(self, d):
        return 2 * d

    def update(self, w, state, g, scale):
        d = w.shape[0]
        st = state.astype(np.float64)
        z, n = st[:d], st[d:]
        w0 = w.astype(np.float64)
        sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / self.alpha
        z = z + g - sigma * w0
        n = n + g * g
        z32, n32 = _store(z), _store(n)
        zz, nn = z32.astype(np.float64), n32.astype(np.float64)
        w2 = np.where(
            np.abs(zz) <= self.l1,
            0.0,
            -(zz - np.sign(zz) * self.l1) / ((self.beta + np.sqrt(nn)) / self.alpha + self.l2),
        )
        return self.clip(w2), np.concatenate([z32, n32]).astype(np.float32)


_RULES = {"sgd": _SGD, "adagrad": _AdaGrad, "std_adagrad": _StdAdaGrad, "adam": _Adam, "ftrl": _FTRL}


def make_rule(opt: dict) -> _Rule:
    """A reference rule from ``config.optimizer_to_dict(opt)``."""
    return _RULES[opt["name"]](opt)


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    show: np.float32
    click: np.float32
    delta_score: np.float32
    unseen_days: np.float32
    slot: np.float32
    lr_w: np.ndarray  # float32[1]
    lr_state: np.ndarray
    mf: Optional[np.ndarray] = None  # float32[dim] once created
    mf_state: Optional[np.ndarray] = None


def _f32(x) -> np.float32:
    return _store(x)[()]


class CtrTableRef:
    """The reference table. ``config`` is ``TableConfig.to_dict()`` (the same dict ``_C.Table`` takes)."""

    def __init__(self, config: dict):
        self.dim = int(config["dim"])
        acc = config["accessor"]
        self.acc = dict(acc)
        self.nonclk = float(acc["nonclk_coeff"])
        self.clk = float(acc["click_coeff"])
        self.seed = int(config.get("seed", 0))
        self.lr_rule = make_rule(config["lr_optimizer"])
        self.mf_rule = make_rule(config["mf_optimizer"])
        self.rows: Dict[int, Row] = {}
        self.tombstones: List[int] = []
        # Deletions become tombstones only on a save chain with a base or delta (a bare table lists them all;
        # SparseTable starts with this off; the snapshot of a base or delta turns it on, and its commit).
        self.track_tombstones = True
        self.pushes = 0  # pushes with keys so far: the next own push id
        self.day = -1
        self.admission_rejected = 0

    # -- helpers -----------------------------------------------------------------------------------------
    @property
    def lr_state_dim(self) -> int:
        return self.lr_rule.state_dim(1)

    @property
    def mf_state_dim(self) -> int:
        return self.mf_rule.state_dim(self.dim)

    @property
    def base_width(self) -> int:
        return 5 + 1 + self.lr_state_dim

    @property
    def mf_width(self) -> int:
        return self.dim + self.mf_state_dim

    def score(self, show, click) -> float:
        return (float(show) - float(click)) * self.nonclk + float(click) * self.clk

    def _init_block(self, rule: _Rule, key: int, stream: int, d: int) -> np.ndarray:
        u = uniform(self.seed, np.array([key] * d, dtype=np.int64), stream, np.arange(d, dtype=np.uint64))
        return rule.clip((2.0 * u - 1.0) * rule.initial_range)

    def _new_row(self, key: int) -> Row:
        return Row(
            show=_f32(0),
            click=_f32(0),
            delta_score=_f32(0),
            unseen_days=_f32(0),
            slot=_f32(-1),
            lr_w=self._init_block(self.lr_rule, key, 1, 1),
            lr_state=self.lr_rule.init_state(1),
        )

    def _create_mf(self, key: int, row: Row) -> None:
        row.mf = self._init_block(self.mf_rule, key, 2, self.dim)
        row.mf_state = self.mf_rule.init_state(self.dim)

    def _admit(self, key: int, show: float, click: float, push_id: int) -> bool:
        if not self.acc.get("create_probability_from_score", False):
            return True
        s = self.score(show, click)
        if s <= 0:
            return False
        if s >= 1:
            return True
        i = ((self.day + 1) << 48) | (push_id % (1 << 48))
        u = float(uniform(self.seed, np.array([key], np.int64), 3, i)[0])
        return u < s

    # -- data path ---------------------------------------------------------------------------------------
    def pull(self, keys, with_stats: bool = False) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.int64)
        off = 2 if with_stats else 0
        out = np.zeros((keys.shape[0], off + 1 + self.dim), np.float32)
        for j, k in enumerate(keys.tolist()):
            r = self.rows.get(k)
            if r is None:
                continue
            if with_stats:
                out[j, 0], out[j, 1] = r.show, r.click
            out[j, off] = r.lr_w[0]
            if r.mf is not None:
                out[j, off + 1 :] = r.mf
        return out

    def push(self, keys, grads, shows, clicks, slots=None, push_id=None) -> int:
        keys = np.asarray(keys, dtype=np.int64)
        if keys.shape[0] and push_id is None:
            push_id = self.pushes
            self.pushes += 1
        grads = np.asarray(grads, dtype=np.float32)
        shows = np.asarray(shows, dtype=np.float32)
        clicks = np.asarray(clicks, dtype=np.float32)
        merged: Dict[int, list] = {}  # key -> [g (float32 sum in input order), show, click, slot]
        with np.errstate(over="ignore"):  # a float32 sum past the range is inf until the merge ends
            for j, k in enumerate(keys.tolist()):
                slot = None if slots is None else float(slots[j])
                if k not in merged:
                    merged[k] = [grads[j].copy(), np.float32(shows[j]), np.float32(clicks[j]), slot]
                else:
                    m = merged[k]
                    m[0] = (m[0] + grads[j]).astype(np.float32)
                    m[1] = np.float32(m[1] + shows[j])
                    m[2] = np.float32(m[2] + clicks[j])
                    if slot is not None:
                        m[3] = slot
        for m in merged.values():  # the merged sums, saturated once (an inf sum stays inf while it is summed)
            m[0], m[1], m[2] = _store(m[0]), _f32(m[1]), _f32(m[2])
        for k, (g, show, click, slot) in merged.items():
            row = self.rows.get(k)
            if row is None:
                if not self._admit(k, show, click, push_id):
                    self.admission_rejected += 1
                    continue
                row = self._new_row(k)
                self.rows[k] = row
            row.show = _f32(float(row.show) + float(show))
            row.click = _f32(float(row.click) + float(click))
            row.delta_score = _f32(float(row.delta_score) + self.score(show, click))
            row.unseen_days = _f32(0)
            if slot is not None:
                row.slot = _f32(slot)
            scale = float(show) if (self.acc["show_scale"] and float(show) > 0) else 1.0
            g64 = g.astype(np.float64)
            lr_scale = scale if self.lr_rule.uses_scale else 1.0
            row.lr_w, row.lr_state = self.lr_rule.update(row.lr_w, row.lr_state, g64[:1], lr_scale)
            if row.mf is not None:
                mf_scale = scale if self.mf_rule.uses_scale else 1.0
                row.mf, row.mf_state = self.mf_rule.update(row.mf, row.mf_state, g64[1:], mf_scale)
            elif self.score(row.show, row.click) >= float(self.acc["embedx_threshold"]):
                self._create_mf(k, row)  # this push's mf gradient is dropped
        return 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _should_delete(self, r: Row) -> bool:
        return self.score(r.show, r.click) < float(self.acc["delete_threshold"]) or float(r.unseen_days) > float(
            self.acc["delete_after_unseen_days"]
        )

    def _decay_and_delete(self, factor: float, age: int) -> int:
        dead = []
        for k, r in self.rows.items():
            r.show = _f32(float(r.show) * factor)
            r.click = _f32(float(r.click) * factor)
            r.unseen_days = _f32(float(r.unseen_days) + age)
            if self._should_delete(r):
                dead.append(k)
        for k in dead:
            del self.rows[k]
            if self.track_tombstones:
                self.tombstones.append(k)
        return len(dead)

    def shrink(self) -> int:
        return self._decay_and_delete(float(self.acc["show_click_decay_rate"]), 0)

    def new_day(self) -> None:
        for r in self.rows.values():
            r.unseen_days = _f32(float(r.unseen_days) + 1)

    def end_day(self, day: int) -> int:
        elapsed = 1 if self.day < 0 else day - self.day
        if elapsed == 0:
            return 0
        if elapsed < 0:
            raise ValueError(f"day {day} is before the table's day {self.day}")
        n = self._decay_and_delete(float(self.acc["show_click_decay_rate"]) ** elapsed, elapsed)
        self.day = day
        return n

    # -- saves -------------------------------------------------------------------------------------------
    def save_predicate(self, mode: str, r: Row) -> bool:
        if mode in ("checkpoint",):
            return True
        if mode == "serving":
            return r.mf is not None
        ok = self.score(r.show, r.click) >= float(self.acc["base_threshold"]) and float(r.unseen_days) <= float(
            self.acc["delta_keep_days"]
        )
        if mode == "delta":  # both in float32, as the reference's accessor has them
            ok = ok and np.float32(r.delta_score) >= np.float32(self.acc["delta_threshold"])
        else:  # base: the delta predicate with delta_threshold := 0
            ok = ok and float(r.delta_score) >= 0.0
        return ok

    def export(self, mode: str) -> dict:
        keys = sorted((k for k, r in self.rows.items() if self.save_predicate(mode, r)), key=lambda k: k % 2**64)
        base = np.zeros((len(keys), self.base_width), np.float32)
        has_mf = np.zeros(len(keys), np.uint8)
        mf = []
        for j, k in enumerate(keys):
            r = self.rows[k]
            base[j, :5] = [r.show, r.click, r.delta_score, r.unseen_days, r.slot]
            base[j, 5] = r.lr_w[0]
            base[j, 6:] = r.lr_state
            if r.mf is not None:
                has_mf[j] = 1
                mf.append(np.concatenate([r.mf, r.mf_state]))
        mf_arr = np.array(mf, np.float32).reshape(len(mf), self.mf_width)
        if mode in ("base", "delta"):  # deletions while the save is written must reach the next delta
            self.track_tombstones = True
        tomb = self.tombstones if mode in ("checkpoint", "delta") else []
        return {
            "keys": np.array(keys, np.int64).reshape(-1),
            "base": base,
            "has_mf": has_mf,
            "mf": mf_arr,
            "tombstones": np.array(tomb, np.int64),
        }

    def commit_save(self, mode: str, keys, delta_scores, tombstones: int) -> None:
        if mode not in ("base", "delta"):
            return
        self.track_tombstones = True
        # `tombstones` is the count the snapshot saw; keys listed after it were deleted since, and a row of
        # theirs is a new one, not the saved row: no subtraction
        deleted_since = set(self.tombstones[int(tombstones) :])
        for k, d in zip(np.asarray(keys, np.int64).tolist(), np.asarray(delta_scores, np.float32).tolist()):
            r = self.rows.get(k)
            if r is not None and k not in deleted_since:
                r.delta_score = _f32(float(r.delta_score) - d)
        self.tombstones = self.tombstones[int(tombstones) :]  # base and delta alike

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, key: int) -> bool:
        return int(key) in self.rows
