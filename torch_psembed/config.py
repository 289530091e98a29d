"""Configuration dataclasses for sparse tables.

These mirror the C++ options one to one; ``TableConfig.to_dict()`` is what crosses into ``_C.Table``.
Defaults follow the reference CTR accessor (``docs/semantics.md``): a feasign gets its mf vector once its
show/click score reaches ``embedx_threshold``, and it is evicted when its decayed score drops below
``delete_threshold`` or it went unseen for more than ``delete_after_unseen_days`` days.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

__all__ = [
    "CtrAccessorConfig",
    "SGD",
    "AdaGrad",
    "StdAdaGrad",
    "Adam",
    "FTRL",
    "SparseOptimizer",
    "TableConfig",
]

_DEFAULT_BOUNDS = (-10.0, 10.0)


def _is_number(v: object) -> bool:
    """A real number (Python or numpy), not a bool (``True`` is an int, but never a meant rate)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _set_float(obj: object, name: str, value: float) -> None:
    # Normalised to a Python float in the frozen dataclass, so that to_dict() is plain JSON (a numpy
    # float32 there would not serialise into a checkpoint manifest).
    object.__setattr__(obj, name, float(value))


def _check_number(owner: str, name: str, v: object, low: float, high: float, low_open: bool = False,
                  high_open: bool = False, allow_inf: bool = False) -> None:
    """Raises naming ``owner.name`` unless v is a number in the interval (finite unless allow_inf)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = _is_number(v) and not math.isnan(v) and (allow_inf or math.isfinite(v))
    if ok:
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        raise ValueError(f"{owner}.{name} must be {kind} in {lo}{low}, {high}{hi}, got {v!r}")


_LARGEST_FLOAT32_BELOW_1 = 1.0 - 2.0**-24
_FLOAT32_MAX = 3.4028234663852886e38


def _as_float32(v: float) -> float:
    """v rounded to float32, as the table stores it."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _check_bounds(obj: object, owner: str) -> None:
    bounds = obj.weight_bounds
    ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(_is_number(b) for b in bounds)
    if not ok or not bounds[0] <= bounds[1]:  # NaN fails the comparison
        raise ValueError(f"{owner}.weight_bounds must be (low, high) numbers with low <= high (+-inf allowed: "
                         f"weights saturate at +-3.4e38), got {bounds!r}")
    object.__setattr__(obj, "weight_bounds", (float(bounds[0]), float(bounds[1])))


def _check_finite_nonneg(obj: object, owner: str, *names: str) -> None:
    for name in names:
        _check_number(owner, name, getattr(obj, name), 0.0, math.inf, high_open=True)
        _set_float(obj, name, getattr(obj, name))


def _check_bool(owner: str, name: str, v: object) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{owner}.{name} must be a bool, got {v!r}")


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``w -= learning_rate * g`` (the raw merged gradient; no show scaling)."""

    learning_rate: float = 0.05
    initial_range: float = 0.0
    weight_bounds: Tuple[float, float] = _DEFAULT_BOUNDS

    def __post_init__(self) -> None:
        _check_finite_nonneg(self, type(self).__name__, "learning_rate", "initial_range")
        _check_bounds(self, type(self).__name__)


@dataclass(frozen=True)
class AdaGrad(SGD):
    """AdaGrad with one accumulator shared by the whole block (Paddle's ``SparseAdaGradSGDRule``).

    ``w_i -= lr * g_i/s * sqrt(G0 / (G0 + G))`` with the old ``G``, then ``G += mean((g/s)**2)``, where ``s``
    is the pushed show when the accessor's ``show_scale`` is on.
    """

    initial_range: float = 1e-4
    initial_g2sum: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(type(self).__name__, "initial_g2sum", self.initial_g2sum, 0.0, math.inf, low_open=True,
                      high_open=True)
        _set_float(self, "initial_g2sum", self.initial_g2sum)


@dataclass(frozen=True)
class StdAdaGrad(AdaGrad):
    """AdaGrad with one accumulator per dimension (Paddle's ``StdAdaGradSGDRule``)."""


@dataclass(frozen=True)
class Adam(SGD):
    """Adam with per-dimension moments and per-key bias-correction powers (no show scaling)."""

    learning_rate: float = 0.001
    initial_range: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("beta1", "beta2"):
            _check_number("Adam", name, getattr(self, name), 0.0, 1.0, high_open=True)
            _set_float(self, name, getattr(self, name))
            if _as_float32(getattr(self, name)) >= 1.0:
                # The table keeps the betas (and their powers) in float32: a beta that rounds to 1 there
                # divides by 1 - beta1**t = 0, or stops every step with 1 - beta2**t = 0.
                raise ValueError(f"Adam.{name} must be below 1 in float32 (at most {_LARGEST_FLOAT32_BELOW_1!r}), "
                                 f"got {getattr(self, name)!r}")
        _check_number("Adam", "epsilon", self.epsilon, 0.0, math.inf, low_open=True, high_open=True)
        _set_float(self, "epsilon", self.epsilon)


@dataclass(frozen=True)
class FTRL(SGD):
    """FTRL-Proximal (McMahan et al. 2013) with per-coordinate ``z`` and ``n``; raw gradients.

    The step size is ``alpha``; when ``alpha`` is None the ``learning_rate`` is used as ``alpha``.
    """

    alpha: Optional[float] = None
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_finite_nonneg(self, "FTRL", "beta", "l1", "l2")
        if self.alpha is not None:
            _check_number("FTRL", "alpha", self.alpha, 0.0, math.inf, low_open=True, high_open=True)
            _set_float(self, "alpha", self.alpha)
        elif self.learning_rate == 0.0:  # alpha falls back to it, and the table needs alpha > 0
            raise ValueError("FTRL's step size alpha must be > 0: got alpha=None and learning_rate=0.0 (the "
                             "default alpha)")
        # The table's float32 loop divides by (beta + sqrt(n)) / alpha + l2, and n (float32 state) rounds to 0
        # for a gradient under ~1e-19: with beta / alpha and l2 both 0 in float32 (both 0, or too small to be
        # stored) the weight would jump to a bound.
        beta, l2, inv_alpha = (_as_float32(min(v, _FLOAT32_MAX))
                               for v in (self.beta, self.l2, 1.0 / self.effective_alpha))
        if _as_float32(beta * inv_alpha) == 0.0 and l2 == 0.0:
            raise ValueError(f"FTRL needs beta > 0 or l2 > 0 in float32 (beta / alpha and l2 as the table stores "
                             f"them; with both 0 the weight divides by sqrt(n), which float32 state cannot hold for "
                             f"tiny gradients), got beta {self.beta!r}, l2 {self.l2!r}, alpha {self.effective_alpha!r}")

    @property
    def effective_alpha(self) -> float:
        return self.learning_rate if self.alpha is None else self.alpha


SparseOptimizer = Union[SGD, AdaGrad, StdAdaGrad, Adam, FTRL]

# Names the C++ side knows; do not rename (they are stored in checkpoint manifests).
_RULE_NAMES = {SGD: "sgd", AdaGrad: "adagrad", StdAdaGrad: "std_adagrad", Adam: "adam", FTRL: "ftrl"}


def optimizer_to_dict(opt: SparseOptimizer) -> Dict[str, Any]:
    name = _RULE_NAMES.get(type(opt))
    if name is None:
        raise TypeError(f"expected one of SGD, AdaGrad, StdAdaGrad, Adam, FTRL, got {type(opt).__name__}")
    d = dataclasses.asdict(opt)
    d["weight_bounds"] = list(opt.weight_bounds)
    if isinstance(opt, FTRL):
        d["alpha"] = opt.effective_alpha
    d["name"] = name
    return d


def optimizer_from_dict(d: Dict[str, Any]) -> SparseOptimizer:
    by_name = {v: k for k, v in _RULE_NAMES.items()}
    d = dict(d)
    cls = by_name[d.pop("name")]
    d["weight_bounds"] = tuple(d["weight_bounds"])
    return cls(**d)


@dataclass(frozen=True)
class CtrAccessorConfig:
    """The show/click lifecycle of a feasign: score, admission, save and eviction thresholds.

    ``score = (show - click) * nonclk_coeff + click * click_coeff``.
    """

    nonclk_coeff: float = 0.1
    click_coeff: float = 1.0
    embedx_threshold: float = 10.0
    base_threshold: float = 1.5
    delta_threshold: float = 0.25
    delta_keep_days: int = 16
    show_click_decay_rate: float = 0.98
    delete_threshold: float = 0.8
    delete_after_unseen_days: int = 30
    show_scale: bool = True
    create_probability_from_score: bool = False

    def __post_init__(self) -> None:
        _check_finite_nonneg(self, "CtrAccessorConfig", "nonclk_coeff", "click_coeff", "embedx_threshold",
                             "base_threshold", "delta_threshold", "delete_threshold")
        _check_number("CtrAccessorConfig", "show_click_decay_rate", self.show_click_decay_rate, 0.0, 1.0)
        _set_float(self, "show_click_decay_rate", self.show_click_decay_rate)
        for name in ("delta_keep_days", "delete_after_unseen_days"):
            v = getattr(self, name)
            if not _is_int(v) or not 0 <= v < 2**63:
                raise ValueError(f"CtrAccessorConfig.{name} must be an int in [0, 2**63), got {v!r}")
            object.__setattr__(self, name, int(v))
        for name in ("show_scale", "create_probability_from_score"):
            _check_bool("CtrAccessorConfig", name, getattr(self, name))
            object.__setattr__(self, name, bool(getattr(self, name)))

    def score(self, show, click):
        """The show/click score (works on floats and numpy arrays)."""
        return (show - click) * self.nonclk_coeff + click * self.click_coeff


_NAN_POLICIES = ("raise", "skip")


@dataclass(frozen=True)
class TableConfig:
    """Everything that defines a sparse table.

    Args:
        dim (int): width of the mf vector (the lr weight adds one column).
        accessor (CtrAccessorConfig): show/click lifecycle thresholds.
        lr_optimizer, mf_optimizer: the sparse rule for the 1-dim lr weight and for the mf block.
        seed (int): seed of the counter-based generator for initial values and admission draws.
        num_shards (int): internal shards (hash maps with their own lock). Default: 64.
        num_threads (int): threads used by one pull/push call; 0 means the CPUs this process may run on
            (its CPU affinity: ``taskset``, a container's cpuset; a cgroup CPU quota is not seen).
        spin_wait_us (int): microseconds the table's threads poll for the next parallel step of a
            call (and the caller for its step's last tasks, at least 50 whatever this is) before
            sleeping. Default 0: the pool's threads sleep at once.
            In a process that does little but table calls (a PS server), 50 made back-to-back 2-thread
            pulls and pushes 0-14% faster; beside torch's own threads (a PSEmbedding training step on 2
            cores) it made most steps slower in one series of runs (up to 33% on Zipf ids) and gave mixed
            results in another, so it is off by default (docs/benchmarks.md, "Table", sessions 15, 18).
        nan_policy (str): ``"raise"`` (default) rejects a push with a NaN/Inf gradient;
            ``"skip"`` drops those rows and counts them in ``stats()["rejected"]``.
        max_keys (int or None): the most rows the table holds, a bound on its memory; ``None`` (default):
            no bound. Each of the ``num_shards`` internal shards holds at most ``max_keys // num_shards``
            rows (a sharded table: each server ``max_keys // num_servers``, split the same way). A push does
            not insert a new key into a full shard: the key reads zeros, as one refused by admission does, and
            is counted in ``stats()["capacity_rejected"]``; rows already in the table keep training, and
            room comes back when ``shrink()`` or ``end_day()`` deletes rows. As shards fill one by one, the
            first refusals come a little before the table holds ``max_keys`` rows. Loads are not bounded: a
            checkpoint loads whole. Must be at least ``num_shards``.
    """

    dim: int = 8
    accessor: CtrAccessorConfig = field(default_factory=CtrAccessorConfig)
    lr_optimizer: SparseOptimizer = field(default_factory=lambda: AdaGrad(initial_range=0.0))
    mf_optimizer: SparseOptimizer = field(default_factory=lambda: AdaGrad(initial_range=1e-4))
    seed: int = 0
    num_shards: int = 64
    num_threads: int = 0
    spin_wait_us: int = 0
    nan_policy: str = "raise"
    max_keys: Optional[int] = None

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or not 1 <= self.dim <= 4096:
            raise ValueError(f"TableConfig.dim must be an int in [1, 4096], got {self.dim!r}")
        if not isinstance(self.accessor, CtrAccessorConfig):
            raise TypeError(f"TableConfig.accessor must be a CtrAccessorConfig, got {type(self.accessor).__name__}")
        for name in ("lr_optimizer", "mf_optimizer"):
            opt = getattr(self, name)
            if type(opt) not in _RULE_NAMES:
                raise TypeError(
                    f"TableConfig.{name} must be one of SGD, AdaGrad, StdAdaGrad, Adam, FTRL, got {type(opt).__name__}"
                )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**64:
            raise ValueError(f"TableConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if not _is_int(self.num_shards) or not 1 <= self.num_shards <= 65536:
            raise ValueError(f"TableConfig.num_shards must be an int in [1, 65536], got {self.num_shards!r}")
        if not _is_int(self.num_threads) or not 0 <= self.num_threads <= 4096:
            raise ValueError(f"TableConfig.num_threads must be an int in [0, 4096] (0: the CPUs this process may "
                             f"run on), got {self.num_threads!r}")
        for name in ("dim", "seed", "num_shards", "num_threads"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if not _is_int(self.spin_wait_us) or not 0 <= self.spin_wait_us <= 1_000_000:
            raise ValueError(f"TableConfig.spin_wait_us must be an int in [0, 1000000], got {self.spin_wait_us!r}")
        object.__setattr__(self, "spin_wait_us", int(self.spin_wait_us))
        if self.nan_policy not in _NAN_POLICIES:
            raise ValueError(f"TableConfig.nan_policy must be one of {_NAN_POLICIES}, got {self.nan_policy!r}")
        if self.max_keys is not None:
            if not _is_int(self.max_keys) or not self.num_shards <= self.max_keys < 2**63:
                raise ValueError(f"TableConfig.max_keys must be None or an int in [num_shards, 2**63) (each of the "
                                 f"{self.num_shards} shards holds max_keys // num_shards rows), got {self.max_keys!r}")
            object.__setattr__(self, "max_keys", int(self.max_keys))

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (JSON-serialisable) that ``_C.Table`` and checkpoint manifests take."""
        return {
            "dim": self.dim,
            "accessor": dataclasses.asdict(self.accessor),
            "lr_optimizer": optimizer_to_dict(self.lr_optimizer),
            "mf_optimizer": optimizer_to_dict(self.mf_optimizer),
            "seed": self.seed,
            "num_shards": self.num_shards,
            "num_threads": self.num_threads,
            "spin_wait_us": self.spin_wait_us,
            "nan_policy": self.nan_policy,
            "max_keys": self.max_keys,
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TableConfig":
        # The plain fields are taken as they are; one missing from d (a dict from an older version) takes
        # the field's default.
        structured = ("dim", "accessor", "lr_optimizer", "mf_optimizer")
        optional = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name not in structured and f.name in d}
        return cls(
            dim=d["dim"],
            accessor=CtrAccessorConfig(**d["accessor"]),
            lr_optimizer=optimizer_from_dict(d["lr_optimizer"]),
            mf_optimizer=optimizer_from_dict(d["mf_optimizer"]),
            **optional,
        )

    def model_signature(self) -> Dict[str, Any]:
        """The part of the config a saved model must match to be loaded (not threads/shards)."""
        d = self.to_dict()
        return {k: d[k] for k in ("dim", "lr_optimizer", "mf_optimizer")}
