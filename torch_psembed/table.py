"""SparseTable: the hash-table embedding store keyed by 64-bit feasigns.

``SparseTable`` checks its torch/numpy inputs, then forwards to a *backend*: the local C++ table
(``_C.Table``) in one process, or the sharded RPC client when ``pse.init()`` started more than one rank.
The backend protocol (numpy in, numpy out) is documented in ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from . import _C
from .config import TableConfig

__all__ = ["SparseTable"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _as_bool(name: str, x: object) -> bool:
    """x when it is a bool (Python or numpy); raises naming ``name`` otherwise (``bool("no")`` is True)."""
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__} {x!r}")
    return bool(x)


def _dtype_name(dtype: np.dtype) -> str:
    """dtype's name, with its byte order when that is not the machine's (``float32`` alone would hide it)."""
    return dtype.name if dtype.isnative else f"{dtype.name} ({'big' if dtype.byteorder == '>' else 'little'}-endian)"


def _as_key(key: object) -> Optional[int]:
    """``key`` as the int64 value of a feasign, or None when it cannot be one (``key in table`` is then False).

    Ints in ``[-2**63, 2**64)``: a key's signed and unsigned spellings are one key (``-1`` and ``2**64 - 1``).
    A tensor must hold one integer (raises otherwise, as a 2-element tensor has no single truth value)."""
    if isinstance(key, torch.Tensor):
        if key.numel() != 1 or key.dtype.is_floating_point or key.dtype.is_complex or key.dtype == torch.bool:
            raise TypeError(f"a key must be one integer, got a {key.dtype} tensor of shape {tuple(key.shape)}")
        key = int(key.item())
    if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)):
        return None
    key = int(key)
    if not -(2**63) <= key < 2**64:
        return None
    return key - 2**64 if key >= 2**63 else key


def _as_numpy(name: str, x: ArrayLike, dtype: np.dtype, ndim: int) -> np.ndarray:
    """A zero-copy numpy view of ``x``; raises naming ``name`` when it is not what the table takes."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got a tensor on {x.device}")
        if x.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
        expected = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
        if x.dtype != expected:
            raise TypeError(f"{name} must have dtype {expected}, got {x.dtype}")
        if not x.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() first")
        arr = x.detach().numpy()
    elif isinstance(x, np.ndarray):
        if x.dtype != dtype:
            raise TypeError(f"{name} must have dtype {_dtype_name(np.dtype(dtype))}, got {_dtype_name(x.dtype)}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous; call np.ascontiguousarray first")
        arr = x
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    return arr


class SparseTable:
    r"""A sparse embedding table keyed by 64-bit feasigns, with the CTR feature lifecycle.

    Each feasign row holds show/click statistics, a 1-dim lr weight and, once admitted, a ``dim``-wide mf
    vector, each with its optimizer state. Rows are created by :meth:`push`; :meth:`pull` never inserts.

    Args:
        config (TableConfig): dimensions, accessor thresholds and sparse rules. Default: ``TableConfig()``.
        name (str): the table's name; tables with the same name on different ranks are one sharded table.

    Shapes:
        - ``pull(keys)``: keys ``(N,)`` int64 -> ``(N, 1 + dim)`` float32 (lr, then mf);
          with ``with_stats=True`` -> ``(N, 3 + dim)`` (show, click, lr, mf).
        - ``push(keys, grads, shows, clicks)``: ``(N,)``, ``(N, 1 + dim)``, ``(N,)``, ``(N,)``.

    Examples::

        >>> import torch, torch_psembed as pse
        >>> table = pse.SparseTable(pse.TableConfig(dim=4))
        >>> keys = torch.tensor([7, -1, 7])
        >>> table.pull(keys).shape
        torch.Size([3, 5])
        >>> table.push(keys, torch.ones(3, 5), torch.ones(3), torch.zeros(3))
        0
        >>> len(table), 7 in table
        (2, True)
    """

    def __init__(self, config: Optional[TableConfig] = None, name: str = "table") -> None:
        self.config = config if config is not None else TableConfig()
        if not isinstance(self.config, TableConfig):
            raise TypeError(f"config must be a TableConfig, got {type(self.config).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        # The data plane carries names up to this length: a longer one made every sharded pull fail, and a
        # push after its local part was applied (checked for local tables too, so a script runs either way).
        if len(name.encode("utf-8", "surrogatepass")) > _C.MAX_TABLE_NAME_BYTES:
            raise ValueError(f"name must have at most {_C.MAX_TABLE_NAME_BYTES} bytes in UTF-8, got "
                             f"{len(name.encode('utf-8', 'surrogatepass'))}")
        self.name = name
        self._backend = _make_backend(self.config, name)

    # -- data path --------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.config.dim

    def pull(self, keys: ArrayLike, with_stats: bool = False) -> torch.Tensor:
        """Rows of ``keys``; unknown keys and keys without mf read zeros in the missing part.

        Args:
            keys: int64 ``(N,)``, CPU, contiguous (values are read as unsigned 64-bit feasigns).
            with_stats (bool): prepend each row's show and click.

        Returns:
            float32 ``(N, 1 + dim)`` (lr, then mf), or ``(N, 3 + dim)`` with stats (show, click, lr, mf).
        """
        k = _as_numpy("keys", keys, np.int64, 1)
        return torch.from_numpy(self._backend.pull(k, _as_bool("with_stats", with_stats)))

    def prefetch(self, keys: ArrayLike, with_stats: bool = False) -> None:
        """Start the pull that the next ``pull(keys, with_stats)`` returns.

        On a sharded table that pull (dedup, requests, assembly) then runs on the table's prefetch thread
        while the caller computes (pipelining: call it with the next batch's ids any time after this step's
        pull); the rows obey the staleness bound of that pull, with ``max_staleness=0`` nothing can start
        early, and an error of the prefetch is raised by the pull that takes it (see
        ``docs/distributed.md``, "Prefetch"). A local table has nothing to overlap: only the keys are checked.
        """
        k = _as_numpy("keys", keys, np.int64, 1)
        with_stats = _as_bool("with_stats", with_stats)
        start = getattr(self._backend, "prefetch", None)
        if start is not None:
            start(k, with_stats)

    def push(
        self,
        keys: ArrayLike,
        grads: ArrayLike,
        shows: ArrayLike,
        clicks: ArrayLike,
        slots: Optional[ArrayLike] = None,
    ) -> int:
        """Apply gradients with show/click counts; repeated keys are merged. Returns rows skipped (NaN/Inf).

        Args:
            keys: int64 ``(N,)``; repeated keys are merged (gradients, shows and clicks summed).
            grads: float32 ``(N, 1 + dim)``, finite (or ``nan_policy="skip"`` drops the rows that are not).
            shows, clicks: float32 ``(N,)``, finite and >= 0.
            slots: int32 ``(N,)`` in ``[0, 2**24)`` (a checkpoint stores slots as float32), or None to keep
                each row's slot.

        Bad input raises a ``TypeError``/``ValueError`` naming the argument, and the table is unchanged.
        """
        k = _as_numpy("keys", keys, np.int64, 1)
        g = _as_numpy("grads", grads, np.float32, 2)
        s = _as_numpy("shows", shows, np.float32, 1)
        c = _as_numpy("clicks", clicks, np.float32, 1)
        sl = None if slots is None else _as_numpy("slots", slots, np.int32, 1)
        return int(self._backend.push(k, g, s, c, sl))

    # -- table-wide operations ---------------------------------------------------------------------------
    def shrink(self) -> int:
        """Decay show/click once and delete rows by the delete predicates. Returns the number deleted."""
        return int(self._backend.shrink())

    def new_day(self) -> None:
        """``unseen_days += 1`` for every row."""
        self._backend.new_day()

    def end_day(self, day: int) -> int:
        """Close day ``day``: decay by the days elapsed, age rows, delete. Idempotent for the same day."""
        if isinstance(day, bool) or not isinstance(day, (int, np.integer)) or not 0 <= int(day) < 2**63 - 1:
            raise ValueError(f"day must be an int in [0, 2**63 - 1), got {day!r}")
        day = int(day)
        return int(self._backend.end_day(day))

    @property
    def day(self) -> int:
        """The last day given to :meth:`end_day` (-1 before the first)."""
        return int(self._backend.day)

    def flush(self) -> None:
        """Wait until every push issued by this process has been applied (a no-op in one process)."""
        flush = getattr(self._backend, "flush", None)
        if flush is not None:
            flush()

    def stats(self) -> Dict[str, Any]:
        """``keys``, ``keys_with_mf``, ``bytes`` and the counters (global totals when sharded)."""
        return dict(self._backend.stats())

    def save(self, path: str, mode: str = "checkpoint", num_buckets: Optional[int] = None) -> Dict[str, Any]:
        """Save to directory ``path``; ``mode`` is ``checkpoint``, ``base`` or ``delta`` (see docs/format.md).

        ``num_buckets`` fixes how keys are partitioned into files (4 per bucket and server); by default one
        bucket per 65,536 keys of the table, 1 to 64, so a small table's frequent delta saves write a few
        files, not hundreds. It does not depend on the number of ranks, so a save from N ranks loads into
        M. Collective when the table is sharded.
        """
        from .checkpoint import save_table

        return save_table(self, path, mode, num_buckets=num_buckets)

    def load(self, path: str) -> Dict[str, Any]:
        """Load a saved directory (a checkpoint restores exactly; base/delta rebuild the serving view)."""
        from .checkpoint import load_table

        return load_table(self, path)

    def __len__(self) -> int:
        return len(self._backend)

    def __contains__(self, key: object) -> bool:
        k = _as_key(key)
        return k is not None and k in self._backend

    def __repr__(self) -> str:
        return f"SparseTable(name={self.name!r}, dim={self.dim}, keys={len(self)})"

    _NOT_COPYABLE = (
        "a SparseTable cannot be pickled or copied (torch.save(model), copy.deepcopy, a spawned process's "
        "arguments): its rows live in its C++ table or on its servers. Save them with table.save(path) and "
        "load them into a new table with table.load(path); to share one table, pass the same SparseTable"
    )

    def __reduce__(self):
        raise TypeError(self._NOT_COPYABLE)

    def __deepcopy__(self, memo):
        raise TypeError(self._NOT_COPYABLE)


def _make_backend(config: TableConfig, name: str):
    """The local C++ table, or the sharded client when a multi-rank runtime is up."""
    from .distributed import runtime

    if runtime.is_distributed():
        return runtime.make_table_backend(config, name)
    return new_c_table(config.to_dict())


def new_c_table(config_dict: Dict[str, Any]):
    """A new ``_C.Table``, as every SparseTable backend starts (a local table, or a server's part).

    No base or delta is saved yet, so no serving view holds its keys and deletions need no tombstones: the
    first committed base/delta save (or a load of a chain that has one) turns them on (docs/lifecycle.md,
    "Tombstones").
    """
    table = _C.Table(config_dict)
    table.track_tombstones = False
    return table
