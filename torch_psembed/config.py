"""Configuration dataclasses for sparse tables.

These mirror the C++ options one to one; ``TableConfig.to_dict()`` is what crosses into ``_C.Table``.
Defaults follow the reference CTR accessor (``docs/semantics.md``): a feasign gets its mf vector once its
show/click score reaches ``embedx_threshold``, and it is evicted when its decayed score drops below
``delete_threshold`` or it went unseen for more than ``delete_after_unseen_days`` days.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

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


def _check_bounds(name: str, bounds: Tuple[float, float]) -> None:
    if len(bounds) != 2 or not bounds[0] <= bounds[1]:
        raise ValueError(f"{name}.weight_bounds must be (low, high) with low <= high, got {bounds!r}")


def _check_finite_nonneg(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{owner}.{name} must be a finite number >= 0, got {v!r}")


@dataclass(frozen=True)
class SGD:
    """Plain SGD: ``w -= learning_rate * g`` (the raw merged gradient; no show scaling)."""

    learning_rate: float = 0.05
    initial_range: float = 0.0
    weight_bounds: Tuple[float, float] = _DEFAULT_BOUNDS

    def __post_init__(self) -> None:
        _check_finite_nonneg(type(self).__name__, learning_rate=self.learning_rate, initial_range=self.initial_range)
        _check_bounds(type(self).__name__, self.weight_bounds)


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
        if not self.initial_g2sum > 0:
            raise ValueError(f"{type(self).__name__}.initial_g2sum must be > 0, got {self.initial_g2sum!r}")


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
            b = getattr(self, name)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Adam.{name} must be in [0, 1), got {b!r}")
        if not self.epsilon > 0:
            raise ValueError(f"Adam.epsilon must be > 0, got {self.epsilon!r}")


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
        _check_finite_nonneg("FTRL", beta=self.beta, l1=self.l1, l2=self.l2)
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"FTRL.alpha must be > 0, got {self.alpha!r}")

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
        _check_finite_nonneg(
            "CtrAccessorConfig",
            nonclk_coeff=self.nonclk_coeff,
            click_coeff=self.click_coeff,
            embedx_threshold=self.embedx_threshold,
            base_threshold=self.base_threshold,
            delta_threshold=self.delta_threshold,
            delete_threshold=self.delete_threshold,
        )
        if not 0.0 <= self.show_click_decay_rate <= 1.0:
            raise ValueError(
                f"CtrAccessorConfig.show_click_decay_rate must be in [0, 1], got {self.show_click_decay_rate!r}"
            )
        for name in ("delta_keep_days", "delete_after_unseen_days"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"CtrAccessorConfig.{name} must be an int >= 0, got {v!r}")

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
        num_threads (int): threads used by one pull/push call; 0 means the cores available.
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
        if not isinstance(self.dim, int) or not 1 <= self.dim <= 4096:
            raise ValueError(f"TableConfig.dim must be an int in [1, 4096], got {self.dim!r}")
        if not isinstance(self.accessor, CtrAccessorConfig):
            raise TypeError(f"TableConfig.accessor must be a CtrAccessorConfig, got {type(self.accessor).__name__}")
        for name in ("lr_optimizer", "mf_optimizer"):
            opt = getattr(self, name)
            if type(opt) not in _RULE_NAMES:
                raise TypeError(
                    f"TableConfig.{name} must be one of SGD, AdaGrad, StdAdaGrad, Adam, FTRL, got {type(opt).__name__}"
                )
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"TableConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        if not isinstance(self.num_shards, int) or not 1 <= self.num_shards <= 65536:
            raise ValueError(f"TableConfig.num_shards must be an int in [1, 65536], got {self.num_shards!r}")
        if not isinstance(self.num_threads, int) or self.num_threads < 0:
            raise ValueError(f"TableConfig.num_threads must be an int >= 0, got {self.num_threads!r}")
        if not isinstance(self.spin_wait_us, int) or isinstance(self.spin_wait_us, bool) \
                or not 0 <= self.spin_wait_us <= 1_000_000:
            raise ValueError(f"TableConfig.spin_wait_us must be an int in [0, 1000000], got {self.spin_wait_us!r}")
        if self.nan_policy not in _NAN_POLICIES:
            raise ValueError(f"TableConfig.nan_policy must be one of {_NAN_POLICIES}, got {self.nan_policy!r}")
        if self.max_keys is not None and (not isinstance(self.max_keys, int) or isinstance(self.max_keys, bool)
                                          or not self.num_shards <= self.max_keys < 2**63):
            raise ValueError(f"TableConfig.max_keys must be None or an int in [num_shards, 2**63) (each of the "
                             f"{self.num_shards} shards holds max_keys // num_shards rows), got {self.max_keys!r}")

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
