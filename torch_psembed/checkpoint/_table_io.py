"""Saving and loading a table: one process, several in-process parts, or every server of a sharded table.

The work is split into *server steps*: module-level functions ``fn(local_c_table, server_index, num_servers,
*args)`` that run next to each ``_C.Table`` part (through ``backend.collective`` when the table is sharded, in
this process otherwise), and the *writer step* (the manifest), done by one trainer. A save is:

1. ``_srv_begin_save``: agree on a save id (server 0's), create ``PATH`` and, unless the caller fixed it,
   choose the bucket count from the table's size (``_format.auto_num_buckets``);
2. ``_srv_write_part``: each server creates ``PATH/.tmp-<id>/`` (if no other did yet) and writes its rows of one moment, grouped by bucket: a checkpoint streams
   them from the table into the bucket files (``_C.Table.save_buckets``: mutating calls wait until every
   file is written, nothing but one bucket per thread is held in memory); a base/delta takes the snapshot
   (``_C.Table.export_buckets``) and writes each file from a slice of it, keeping the side-effect inputs in
   memory; every file is fsynced;
3. the writer renames ``.tmp-<id>`` to ``data-<id>`` and atomically replaces ``PATH/manifest.json`` (the
   commit point: until it is replaced, ``PATH`` still holds the previous save, whole);
4. ``_srv_finish``: each server sees the new manifest, then applies ``commit_save`` (base/delta) and drops
   older ``data-*`` directories.

A load maps and verifies every file on every server first (``_srv_stage_load``: sizes, checksums, flags,
buckets and values), and changes the tables only when all of them succeeded (``_srv_apply_load``:
``_C.Table.load_segments`` inserts the mapped bucket files as they are).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointMismatchError, CorruptCheckpointError
from . import _format as F
from . import _rows as R
from ._output_dir import check_out

# Per-server scratch between the steps of one save/load, keyed by (id(local table), operation).
_STASH: Dict[Tuple[int, str], Any] = {}
_STASH_LOCK = threading.RLock()


def _stash_put(local, op: str, value: Any) -> None:
    with _STASH_LOCK:
        _STASH[(id(local), op)] = value


def _stash_pop(local, op: str) -> Any:
    with _STASH_LOCK:
        return _STASH.pop((id(local), op), None)


# -- how a save/load reaches the parts of a table ---------------------------------------------------------

class _Group:
    """Runs a server step on every part of a table and tells whether this process writes the manifest."""

    def run(self, fn: Callable, *args) -> List[Any]:
        raise NotImplementedError

    is_writer: bool = True

    def flush(self) -> None:
        pass


class LocalParts(_Group):
    """Parts held in this process: ``tables[i]`` owns the keys with ``_C.route(key, len(tables)) == i``."""

    def __init__(self, tables: Sequence[Any]) -> None:
        if not tables:
            raise ValueError("tables must hold at least one _C.Table")
        self.tables = list(tables)

    def run(self, fn, *args):
        n = len(self.tables)
        return [fn(t, i, n, *args) for i, t in enumerate(self.tables)]


class _Collective(_Group):
    """A sharded table: ``backend.collective`` flushes in-flight pushes, barriers and runs fn on every server."""

    def __init__(self, backend) -> None:
        self.backend = backend
        rank = getattr(backend, "trainer_rank", None)
        if rank is None:
            rank = getattr(backend, "rank", None)
        if rank is None:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.is_writer = int(rank) == 0

    def run(self, fn, *args):
        return list(self.backend.collective(fn, *args))


def group_of(table) -> _Group:
    backend = table._backend
    if getattr(backend, "is_sharded", False):
        return _Collective(backend)
    return LocalParts([backend])


# -- the chain of saves a table is at (which base, how many deltas) -------------------------------------------

_CHAIN_ATTR = "_psembed_chain"


def chain_of(table) -> Dict[str, Any]:
    return dict(getattr(table, _CHAIN_ATTR, None) or {"base_id": None, "sequence": 0, "chain_id": None})


def set_chain(table, chain: Dict[str, Any]) -> None:
    setattr(table, _CHAIN_ATTR, {"base_id": chain["base_id"], "sequence": int(chain["sequence"]),
                                 "chain_id": chain.get("chain_id")})


def manifest_chain(m: Dict[str, Any]) -> Dict[str, Any]:
    """The chain position a save records (a manifest without ``chain_id``, older than it, has null)."""
    return {"base_id": m["base_id"], "sequence": int(m["sequence"]), "chain_id": m.get("chain_id")}


# -- server steps (module level so that they pickle) ----------------------------------------------------------

def _srv_begin(local, index, num, path):
    os.makedirs(path, exist_ok=True)
    return uuid.uuid4().hex


def _srv_begin_save(local, index, num, path):
    """``_srv_begin``, plus this part's key count (the save's bucket count depends on the table's size)."""
    return _srv_begin(local, index, num, path), len(local)


def _srv_write_part(local, index, num, path, save_id, mode, num_buckets):
    tmp = os.path.join(path, ".tmp-" + save_id)
    os.makedirs(tmp, exist_ok=True)
    if mode == "checkpoint" and hasattr(local, "save_buckets"):
        # Streamed: the table writes its rows of one moment straight to the bucket files.
        part = R.stream_part(local, tmp, index, num_buckets)
        part.update(day=int(local.day), dim=int(local.dim), base_width=int(local.base_width),
                    mf_width=int(local.mf_width))
        return part
    bucketed = hasattr(local, "export_buckets")
    if bucketed:  # rows of one moment, already grouped by bucket and sorted inside one
        snap = local.export_buckets(mode, num_buckets, F.BUCKET_SALT)
    else:
        snap = local.export(mode)
    day = int(local.day)
    # The table's pending tombstones at the snapshot (a base carries none, a delta all of them): commit_save
    # drops those, and keeps the ones of keys deleted while the files were written for the next delta.
    table_tombstones = int(snap["pending_tombstones"])
    if mode in ("base", "delta"):
        # What commit_save needs once the files are durable; nothing else of the snapshot is kept.
        _stash_put(local, "save:" + save_id, (
            np.ascontiguousarray(snap["keys"]),
            np.ascontiguousarray(snap["base"][:, 2]),
            table_tombstones,
        ))
    part = R.write_buckets(tmp, index, snap) if bucketed else R.write_part(tmp, index, snap, num_buckets)
    part.update(day=day, dim=int(local.dim), base_width=int(local.base_width), mf_width=int(local.mf_width))
    return part


def _srv_finish(local, index, num, path, save_id, mode):
    """Commit the side effects iff the manifest now names this save; server 0 removes stale directories."""
    pending = _stash_pop(local, "save:" + save_id)
    committed = F.peek_manifest(os.path.join(path, F.MANIFEST), "save_id") == save_id
    if committed and pending is not None:
        keys, delta_scores, tombstones = pending
        local.commit_save(mode, keys, delta_scores, tombstones)
    if index == 0:
        _remove_stale(path, keep=F.data_dir_name(save_id) if committed else None, save_id=save_id)
    return committed


def _srv_abort(local, index, num, path, save_id):
    _stash_pop(local, "save:" + save_id)
    if index == 0:
        shutil.rmtree(os.path.join(path, ".tmp-" + save_id), ignore_errors=True)
    return True


# The folders a writer makes: data-<id> and .tmp-<id>, the id a uuid4's 32 hex digits. Only those are ever
# deleted: a folder of the user's that happens to start with "data-" (even a save copied there) is not ours.
_OWN_FOLDER = re.compile(r"(data|\.tmp)-[0-9a-f]{32}")


def _remove_stale(path: str, keep: Optional[str], save_id: str) -> None:
    """Delete what the manifest does not name: older ``data-<id>`` directories and the temporary directories
    of saves that were killed (one directory takes one save at a time); nothing a writer did not make."""
    mpath = os.path.join(path, F.MANIFEST)
    current = F.peek_manifest(mpath, "data_dir")
    if current is None:
        if os.path.lexists(mpath):  # there, but unreadable: what it names is unknown, so keep everything
            return
        current = keep
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if _OWN_FOLDER.fullmatch(name) and name != current:
            shutil.rmtree(full, ignore_errors=True)
        elif name == F.MANIFEST + ".tmp":
            try:
                os.remove(full)
            except OSError:
                pass


def _srv_stage_load(local, index, num, path, m):
    """Read and verify every file; keep this server's keys in memory. Returns None or (file, message)."""
    layout = m["layout"]
    for k in ("dim", "base_width", "mf_width"):
        if int(getattr(local, k)) != int(layout[k]):
            p = os.path.join(path, F.MANIFEST)
            return (p, f"{p}: saved {k} is {layout[k]}, the table's is {getattr(local, k)}")
    # The values are checked here, before any table changes, and only here: load_segments then skips its
    # own check of the same rows. A _C.Table checks them in C++ (check_segments); numpy otherwise.
    checker = local if hasattr(local, "check_segments") else None
    try:
        segments, tomb = R.read_segments(path, m, owner=(index, num), check_values_too=checker is None,
                                         check_values_with=checker)
    except CorruptCheckpointError as e:
        return (e.path, str(e))
    except OSError as e:
        return (e.filename or path, f"{e.filename or path}: {e.strerror or e}")
    _stash_put(local, "load:" + m["save_id"], (segments, tomb))
    return None


def _srv_drop_load(local, index, num, save_id):
    _stash_pop(local, "load:" + save_id)
    return True


def _srv_apply_load(local, index, num, save_id, mode, day, track_tombstones):
    staged = _stash_pop(local, "load:" + save_id)
    if staged is None:
        raise RuntimeError(f"server {index}: no staged rows for save {save_id}")
    segments, tombstones = staged
    if mode == "delta":
        if tombstones.size:
            local.erase(tombstones)
            # Published by this delta: a table restored from a checkpoint held some of them as pending and
            # would list them again in its own next delta.
            local.forget_tombstones(tombstones)
    else:
        local.clear()
        if mode == "checkpoint" and tombstones.size:
            # The checkpoint's pending list, in order: the next delta publishes it.
            local.set_tombstones(np.ascontiguousarray(tombstones, dtype=np.int64))
    segments = [s for s in segments if s["keys"].size]
    if segments:
        _load_segments(local, segments)
    local.day = int(day)
    if hasattr(local, "track_tombstones"):
        local.track_tombstones = bool(track_tombstones)
    return int(sum(s["keys"].shape[0] for s in segments))


def _load_segments(local, segments: List[Dict[str, np.ndarray]]) -> None:
    """Insert the staged rows: ``_C.Table.load_segments`` takes the mapped files as they are and loads them in
    parallel, GIL released, without checking the values again (``_srv_stage_load`` checked them)."""
    if hasattr(local, "load_segments"):
        local.load_segments([(s["keys"], s["base"], s["has_mf"], s["mf"]) for s in segments], check=False)
        return
    rows = {c: np.concatenate([s[c] for s in segments]) for c in F.ROW_COLUMNS}
    local.load_rows(rows["keys"], rows["base"], rows["has_mf"], rows["mf"])


# -- save ---------------------------------------------------------------------------------------------------

def save_group(
    group: _Group,
    config_dict: Dict[str, Any],
    chain: Dict[str, Any],
    path,
    mode: str,
    num_buckets: Optional[int] = None,
) -> Dict[str, Any]:
    """Save every part of ``group`` to ``path``. Returns the summary; ``summary["chain"]`` is the new chain.
    ``num_buckets=None`` takes ``_format.auto_num_buckets`` of the table's key count."""
    if mode not in F.MODES:
        raise ValueError(f"mode must be one of {F.MODES}, got {mode!r}")
    F.check_num_buckets(num_buckets)
    path = _check_path(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"path must be a directory (or not exist yet), got the file {path}")
    # An earlier table save there is replaced; a serving export (or an unknown manifest) is refused, as
    # pse.export and tools merge refuse the mirror case (OutputError): the save would delete its data.
    check_out([], path, F.FORMAT_NAME)
    t0 = time.perf_counter()
    group.flush()
    begun = group.run(_srv_begin_save, path)
    save_id = begun[0][0]
    if num_buckets is None:
        num_buckets = F.auto_num_buckets(sum(rows for _, rows in begun))
    try:
        parts = group.run(_srv_write_part, path, save_id, mode, num_buckets)
    except BaseException:
        group.run(_srv_abort, path, save_id)
        raise
    t_write = time.perf_counter() - t0

    base_id, sequence, chain_id = chain.get("base_id"), int(chain.get("sequence", 0)), chain.get("chain_id")
    if mode == "base":
        new_chain = {"base_id": save_id, "sequence": 0, "chain_id": None}
    elif mode == "delta":
        if base_id is None and chain_id is None and sequence == 0:
            # The first delta of a table that has no base yet names the chain it starts (as a base does with
            # base_id), so that its successors load only after it, not after another table's deltas.
            chain_id = save_id
        new_chain = {"base_id": base_id, "sequence": sequence + 1, "chain_id": chain_id}
    else:
        new_chain = {"base_id": base_id, "sequence": sequence, "chain_id": chain_id}
    manifest = _make_manifest(config_dict, mode, save_id, new_chain, parts, num_buckets)

    error: Optional[BaseException] = None
    if group.is_writer:
        try:
            tmp = os.path.join(path, ".tmp-" + save_id)
            F.fsync_dir(tmp)
            os.rename(tmp, os.path.join(path, manifest["data_dir"]))
            F.fsync_dir(path)
            F.write_manifest(path, manifest)
        except BaseException as e:  # the other trainers wait in the next step: always reach it
            error = e
    committed = group.run(_srv_finish, path, save_id, mode)
    if error is not None:
        raise error
    if not all(committed):
        raise RuntimeError(f"save to {path} was not committed (the writing trainer failed); the previous save stays")
    return {
        "path": path,
        "mode": mode,
        "save_id": save_id,
        "day": manifest["day"],
        "rows": manifest["rows"],
        "rows_with_mf": manifest["rows_with_mf"],
        "tombstones": manifest["tombstones"],
        "bytes": F.total_bytes(manifest),
        "parts": len(parts),
        "seconds": time.perf_counter() - t0,
        "write_seconds": t_write,
        "chain": new_chain,
    }


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.path.abspath(os.fspath(path))


def _make_manifest(config_dict, mode, save_id, chain, parts, num_buckets) -> Dict[str, Any]:
    from .. import _C

    parts = sorted(parts, key=lambda p: p["part"])
    p0 = parts[0]
    for p in parts[1:]:
        for k in ("dim", "base_width", "mf_width"):
            if p[k] != p0[k]:
                raise RuntimeError(f"server {p['part']} has {k}={p[k]}, server 0 has {p0[k]}")
    files = [e for p in parts for e in p["files"]]
    return {
        "format": F.FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        "mode": mode,
        "save_id": save_id,
        "base_id": chain["base_id"],
        "sequence": chain["sequence"],
        "chain_id": chain.get("chain_id"),
        "day": int(p0["day"]),
        "created_unix": time.time(),
        "writer": f"torch_psembed {_C.__version__}",
        "config": config_dict,
        "signature": F.config_signature(config_dict),
        "layout": F.layout_for(p0["dim"], p0["base_width"], p0["mf_width"]),
        "num_buckets": num_buckets,
        "bucket_rule": F.BUCKET_RULE,
        "num_parts": len(parts),
        "rows": sum(p["rows"] for p in parts),
        "rows_with_mf": sum(p["rows_with_mf"] for p in parts),
        "tombstones": sum(p["tombstones"] for p in parts),
        "parts": [{k: p[k] for k in ("part", "rows", "rows_with_mf", "tombstones", "day")} for p in parts],
        "data_dir": F.data_dir_name(save_id),
        "files": files,
    }


# -- load ---------------------------------------------------------------------------------------------------

def check_compatible(m: Dict[str, Any], config_dict: Dict[str, Any], path: str) -> None:
    saved = m["signature"]
    have = F.config_signature(config_dict)
    if saved != have:
        diffs = "; ".join(F.describe_difference(saved, have))
        raise CheckpointMismatchError(f"{path}: saved with a different model config ({diffs})")


def chain_has_serving_view(m: Dict[str, Any]) -> bool:
    """Whether a table loaded from manifest ``m`` sits on a chain with a committed base or delta, i.e. whether
    a serving view may hold its keys, so that its deletions must become tombstones."""
    return m["mode"] in ("base", "delta") or m["base_id"] is not None or int(m["sequence"]) > 0


def check_chain(m: Dict[str, Any], chain: Dict[str, Any], path: str) -> None:
    """A delta loads only onto its own base, right after the delta before it.

    Deltas saved before any base (``base_id`` null) are told apart by ``chain_id``, the save id of the first
    of them: that one loads onto a table that holds no such chain, the others onto the table that holds it.
    Saves older than ``chain_id`` have none (null) and chain as before: by sequence alone."""
    if m["mode"] != "delta":
        return
    want_seq = int(m["sequence"]) - 1
    if chain.get("base_id") != m["base_id"]:
        raise CheckpointMismatchError(
            f"{path}: delta {m['sequence']} follows base {m['base_id']}, but the table holds base "
            f"{chain.get('base_id')} (load that base, then its deltas in order)"
        )
    if m["base_id"] is None:
        cid = m.get("chain_id")
        want = None if cid == m["save_id"] else cid  # the chain's first delta starts it
        held = chain.get("chain_id")
        if held != want:
            what = "starts its deltas" if want is None else f"follows the deltas started by save {cid}"
            have = "no such deltas" if held is None else f"the deltas started by save {held}"
            raise CheckpointMismatchError(
                f"{path}: delta {m['sequence']} of a table with no base yet {what}, but the table holds {have} "
                "(load one table's deltas, in order)"
            )
    if int(chain.get("sequence", 0)) != want_seq:
        raise CheckpointMismatchError(
            f"{path}: delta {m['sequence']} is out of order: the table is at delta {chain.get('sequence', 0)} of "
            f"base {m['base_id']}, so the next delta to load is {int(chain.get('sequence', 0)) + 1}"
        )


def load_group(group: _Group, config_dict: Dict[str, Any], chain: Dict[str, Any], path) -> Dict[str, Any]:
    """Load ``path`` into every part of ``group``; nothing changes unless every file verified."""
    path = _check_path(path)
    t0 = time.perf_counter()
    m = F.read_manifest(path)
    check_compatible(m, config_dict, path)
    check_chain(m, chain, path)
    group.flush()
    try:
        results = group.run(_srv_stage_load, path, m)
    except BaseException:
        group.run(_srv_drop_load, m["save_id"])  # a server failed otherwise (e.g. memory): free the others
        raise
    bad = [r for r in results if r is not None]
    if bad:
        group.run(_srv_drop_load, m["save_id"])
        where, msg = bad[0]
        raise CorruptCheckpointError(msg, where)
    loaded = group.run(_srv_apply_load, m["save_id"], m["mode"], m["day"], chain_has_serving_view(m))
    return {
        "path": path,
        "mode": m["mode"],
        "save_id": m["save_id"],
        "day": m["day"],
        "rows": int(sum(loaded)),
        "tombstones": m["tombstones"],
        "bytes": F.total_bytes(m),
        "seconds": time.perf_counter() - t0,
        "chain": manifest_chain(m),
    }


# -- the SparseTable entry points -----------------------------------------------------------------------------

# One save or load of a table at a time, per process. A save's commit drops the pending tombstones its
# snapshot saw by their count (_C.Table.commit_save), and a load replaces or trims that list: another save or
# load of the same table between a snapshot and its commit would drop a deletion that no save has written.
# The chain position is read before and written after, too.
_TABLE_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_TABLE_LOCKS_GUARD = threading.Lock()


def _table_lock(table) -> threading.Lock:
    with _TABLE_LOCKS_GUARD:
        lock = _TABLE_LOCKS.get(table)
        if lock is None:
            lock = _TABLE_LOCKS[table] = threading.Lock()
        return lock


def save_table(table, path, mode: str = "checkpoint", num_buckets: Optional[int] = None) -> Dict[str, Any]:
    """Save ``table`` to directory ``path`` (see :meth:`SparseTable.save` and docs/format.md)."""
    with _table_lock(table):
        summary = save_group(group_of(table), table.config.to_dict(), chain_of(table), path, mode, num_buckets)
        set_chain(table, summary["chain"])
    return summary


def load_table(table, path) -> Dict[str, Any]:
    """Load directory ``path`` into ``table`` (see :meth:`SparseTable.load`)."""
    with _table_lock(table):
        summary = load_group(group_of(table), table.config.to_dict(), chain_of(table), path)
        set_chain(table, summary["chain"])
    return summary
