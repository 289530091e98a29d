"""The server side: the shards of every sharded table that this process owns.

This is the only module of ``distributed/`` that drives ``_C`` tables. Its module-level functions are the
remote endpoints: the RPC transport calls them by reference (``rpc_async(to, server.pull, ...)``) and the
colocated fast path calls them directly. Each endpoint checks its request and raises a Python exception on a
malformed one; the transport sends the exception back to the caller and the server keeps serving.

With the TCP data plane (``tcp_transport.py``, the default) remote pulls and pushes bypass these endpoints:
``start_data_plane`` starts a ``_C.DataServer`` and every table created here is registered with it, so it
serves them in C++ with the same checks (``csrc/net/data_server.h``).

Thread safety: endpoints run concurrently on the RPC thread pool. ``_lock`` guards the registry (``_tables``,
``_done``); the ``_C.Table`` objects are thread-safe themselves (one lock per internal shard).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch


__all__ = [
    "create_table", "pull", "push", "call", "ping", "mark_done", "report_failure", "local_table",
    "start_data_plane", "stop_data_plane",
]

_lock = threading.Lock()
# name -> (config dict, _C.Table). Written only under _lock; a table is never removed while serving.
_tables: Dict[str, Tuple[dict, Any]] = {}
# The server index of this process and the number of servers (set by configure()).
_server_index: int = -1
_num_servers: int = 0
# Ranks of the trainers that finished (called shutdown). Guarded by _done_cv.
_done_cv = threading.Condition(_lock)
_done: set = set()
# This process's _C.DataServer while the TCP data plane is up (start_data_plane .. stop_data_plane).
_data_server = None


def configure(server_index: int, num_servers: int) -> None:
    """Called once by ``runtime.init`` on a serving rank (server_index = -1 on a pure trainer)."""
    global _server_index, _num_servers
    with _lock:
        _server_index = server_index
        _num_servers = num_servers
        _tables.clear()
        _done.clear()


def reset() -> None:
    """Drop every table (``runtime.shutdown``)."""
    with _lock:
        _tables.clear()
        if _data_server is not None:
            _data_server.clear()


def start_data_plane(host: str) -> int:
    """Start serving this process's tables over TCP on ``host`` (any free port); returns the port."""
    global _data_server
    from .. import _C

    with _lock:
        if _data_server is None:
            _data_server = _C.DataServer(host, 0)
            for name, (_, table) in _tables.items():
                _data_server.register(name, table)
        return _data_server.port


def data_plane_seconds() -> Tuple[float, float]:
    """(pull, push) seconds this process's data server spent inside its tables; (0, 0) without one."""
    ds = _data_server
    return (ds.pull_seconds, ds.push_seconds) if ds is not None else (0.0, 0.0)


def stop_data_plane() -> None:
    """Stop the data server (closes its connections; idempotent)."""
    global _data_server
    with _lock:
        ds, _data_server = _data_server, None
    if ds is not None:
        ds.stop()


def _table(name: Any):
    if not isinstance(name, str):
        raise TypeError(f"table name must be a str, got {type(name).__name__}")
    entry = _tables.get(name)
    if entry is None:
        raise ValueError(
            f"no table named {name!r} on server {_server_index}; create it with SparseTable(config, name={name!r})"
        )
    return entry[1]


def local_table(name: str):
    """The ``_C.Table`` holding this server's part of ``name`` (raises ValueError if unknown)."""
    return _table(name)


def _as_array(name: str, x: Any, dtype: np.dtype, ndim: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            raise TypeError(f"{name} must not require grad (send tensor.detach()); got requires_grad=True")
        if x.layout != torch.strided or x.device.type != "cpu":
            raise TypeError(f"{name} must be a dense CPU tensor, got layout {x.layout} on device {x.device}")
        try:
            x = x.resolve_conj().resolve_neg().numpy()
        except (RuntimeError, TypeError) as e:
            raise TypeError(f"{name} cannot be read as a numpy array ({e})") from None
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {x.dtype.name}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x)


# -- endpoints --------------------------------------------------------------------------------------------
def create_table(name: Any, config: Any) -> bool:
    """Create table ``name`` from a ``TableConfig.to_dict()``; True if created, False if it already existed.

    Raises ValueError when a table of that name exists with a different config.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"table name must be a non-empty str, got {name!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (TableConfig.to_dict()), got {type(config).__name__}")
    with _lock:
        entry = _tables.get(name)
        if entry is not None:
            if entry[0] != config:
                diff = sorted(k for k in set(entry[0]) | set(config) if entry[0].get(k) != config.get(k))
                detail = ", ".join(f"{k}: existing {entry[0].get(k)!r}, requested {config.get(k)!r}" for k in diff)
                raise ValueError(f"table {name!r} already exists with a different config ({detail})")
            return False
        from ..table import new_c_table  # at call time: table.py imports distributed lazily too

        table = new_c_table(config)
        _tables[name] = (dict(config), table)
        if _data_server is not None:
            _data_server.register(name, table)
        return True


def pull(name: Any, keys: Any, with_stats: bool = False) -> torch.Tensor:
    """Rows of ``keys`` from this server's part of ``name`` (float32 tensor)."""
    table = _table(name)
    k = _as_array("keys", keys, np.int64, 1)
    return torch.from_numpy(table.pull(k, bool(with_stats)))


def push(name: Any, keys: Any, grads: Any, shows: Any, clicks: Any, slots: Any = None, push_id: Any = None) -> int:
    """Apply a (merged) push to this server's part of ``name``; returns the rows skipped.

    ``push_id`` (the trainer's ``(trainer << 32) | push count``) names the push for admission draws.
    """
    table = _table(name)
    k = _as_array("keys", keys, np.int64, 1)
    g = _as_array("grads", grads, np.float32, 2)
    s = _as_array("shows", shows, np.float32, 1)
    c = _as_array("clicks", clicks, np.float32, 1)
    sl = None if slots is None else _as_array("slots", slots, np.int32, 1)
    if push_id is not None and (not isinstance(push_id, int) or isinstance(push_id, bool) or push_id < 0):
        raise ValueError(f"push_id must be an int >= 0 or None, got {push_id!r}")
    return int(table.push(k, g, s, c, sl, push_id))


def call(name: Any, fn: Callable, args: Sequence[Any] = ()) -> Any:
    """``fn(local_table, server_index, num_servers, *args)``: the collective hook's server half."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    table = _table(name)
    return fn(table, _server_index, _num_servers, *tuple(args))


def ping() -> bool:
    """Liveness probe."""
    return True


def mark_done(rank: int) -> None:
    """Trainer ``rank`` called ``pse.shutdown()``: it will send no more requests."""
    with _done_cv:
        _done.add(int(rank))
        _done_cv.notify_all()


_failure_reports: list = []  # (dead rank, reporting rank, message), guarded by _lock


def report_failure(dead_rank: int, reporter: int, message: str) -> None:
    """Rank ``reporter`` found rank ``dead_rank`` unavailable and is about to stop."""
    with _lock:
        _failure_reports.append((int(dead_rank), int(reporter), str(message)[:300]))


def first_failure_report():
    """The first failure another rank reported to this one, or None."""
    with _lock:
        return _failure_reports[0] if _failure_reports else None


def done_ranks() -> frozenset:
    with _lock:
        return frozenset(_done)


def wait_done(timeout: float) -> frozenset:
    """Wait up to ``timeout`` seconds for another trainer to finish; returns the finished ranks."""
    with _done_cv:
        _done_cv.wait(timeout)
        return frozenset(_done)


# -- functions for call()/collective(): module level so they pickle by reference ---------------------------
def op_shrink(table, server: int, num_servers: int) -> int:
    return int(table.shrink())


def op_new_day(table, server: int, num_servers: int) -> None:
    table.new_day()


def op_end_day(table, server: int, num_servers: int, day: int) -> int:
    return int(table.end_day(day))


def op_get_day(table, server: int, num_servers: int) -> int:
    return int(table.day)


def op_stats(table, server: int, num_servers: int) -> Dict[str, Any]:
    return dict(table.stats())


def op_data_plane_seconds(table, server: int, num_servers: int) -> Tuple[float, float]:
    return data_plane_seconds()


def op_len(table, server: int, num_servers: int) -> int:
    return len(table)


def op_contains(table, server: int, num_servers: int, key: int) -> bool:
    return int(key) in table


def op_config(table, server: int, num_servers: int) -> Optional[dict]:
    return _tables_config(table)


def _tables_config(table) -> Optional[dict]:
    with _lock:
        for cfg, t in _tables.values():
            if t is table:
                return dict(cfg)
    return None
