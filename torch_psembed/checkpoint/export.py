"""Serving export: ``key -> (lr, mf)`` for the rows with an mf vector, in a compact dtype.

Layout of an export directory ``OUT`` (documented in docs/format.md)::

    OUT/manifest.json                         format "torch_psembed.serving", the commit point
    OUT/data-<id>/part-PPP.keys               int64[n], ascending as int64
    OUT/data-<id>/part-PPP.values             dtype[n, 1 + dim]: lr, mf   (float32, float16 or bfloat16 bits)
    OUT/data-<id>/part-PPP.stats              float32[n, 2]: show, click  (only with with_stats=True)
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from ..errors import CheckpointMismatchError, CorruptCheckpointError
from . import _format as F
from ._output_dir import check_out
from . import _rows as R
from . import _table_io as T

__all__ = ["export", "read_serving", "DTYPES"]

# dtype name -> (numpy storage dtype, bytes per value)
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
ROW_SETS = ("mf", "all")
LR_COLUMN = 5  # lr_w in the base columns: show, click, delta_score, unseen_days, slot, lr_w, ...


def _to_storage(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # an overflow is refused by name after the cast (serving_arrays)
            return x.astype(np.float16)
    # bfloat16: torch rounds to nearest even; keep the bits as uint16.
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def serving_arrays(rows: Dict[str, np.ndarray], dim: int, dtype: str, with_stats: bool, which: str):
    """``(keys, values, stats)`` of a row set: keys ascending as int64, values ``[n, 1 + dim]`` in ``dtype``."""
    if which == "mf":
        rows = R.take_rows(rows, rows["has_mf"].astype(bool))
    n = rows["keys"].shape[0]
    vals = np.zeros((n, 1 + dim), np.float32)
    vals[:, 0] = rows["base"][:, LR_COLUMN]
    has = rows["has_mf"].astype(bool)
    vals[has, 1:] = rows["mf"][:, :dim]
    order = np.argsort(rows["keys"], kind="stable")
    keys = rows["keys"][order]
    vals = vals[order]
    stored = _to_storage(vals, dtype)
    if dtype != "float32" and np.isfinite(vals).all() and not bool(torch.isfinite(values_tensor(stored, dtype)).all()):
        limit = "65504" if dtype == "float16" else "about 3.39e38"
        raise ValueError(f"dtype={dtype!r} overflows for some weights (|w| > {limit}); export with dtype='float32'")
    stats = np.ascontiguousarray(rows["base"][order, :2]) if with_stats else None
    return keys, stored, stats


def _write_serving_part(dirpath, part, keys, values, stats) -> Dict[str, Any]:
    files = []
    for col, arr in (("keys", keys), ("values", values), ("stats", stats)):
        if arr is None:
            continue
        name = f"part-{part:03d}.{col}"
        entry = {"name": name, "column": col, "part": part, "rows": int(arr.shape[0])}
        entry.update(F.write_array(os.path.join(dirpath, name), arr))
        files.append(entry)
    return {"part": part, "rows": int(keys.shape[0]), "files": files}


def _srv_export_part(local, index, num, out, export_id, dtype, with_stats, which):
    tmp = os.path.join(out, ".tmp-" + export_id)
    os.makedirs(tmp, exist_ok=True)
    snap = local.export("serving" if which == "mf" else "checkpoint")
    keys, values, stats = serving_arrays(snap, int(local.dim), dtype, with_stats, which)
    part = _write_serving_part(tmp, index, keys, values, stats)
    part["day"] = int(local.day)
    return part


def _srv_export_done(local, index, num, out, export_id):
    if index == 0:
        T._remove_stale(out, keep=F.data_dir_name(export_id), save_id=export_id)
    return True


def _commit_serving(out, export_id, parts, dim, dtype, with_stats, which, source) -> Dict[str, Any]:
    from .. import _C

    parts = sorted(parts, key=lambda p: p["part"])
    manifest = {
        "format": F.SERVING_FORMAT_NAME,
        "format_version": F.FORMAT_VERSION,
        "save_id": export_id,
        "created_unix": time.time(),
        "writer": f"torch_psembed {_C.__version__}",
        "dim": int(dim),
        "dtype": dtype,
        "rows_exported": which,
        "columns": ["lr"] + [f"mf_w{i}" for i in range(dim)],
        "with_stats": bool(with_stats),
        "rows": sum(p["rows"] for p in parts),
        "num_parts": len(parts),
        "day": parts[0].get("day", -1),
        "source": source,
        "data_dir": F.data_dir_name(export_id),
        "files": [e for p in parts for e in p["files"]],
    }
    tmp = os.path.join(out, ".tmp-" + export_id)
    F.fsync_dir(tmp)
    os.rename(tmp, os.path.join(out, manifest["data_dir"]))
    F.fsync_dir(out)
    F.write_manifest(out, manifest)
    return manifest


def _rows_from_paths(paths: Sequence[str]):
    """The serving view of a saved chain: a checkpoint or base (or one delta alone), then deltas in order."""
    cur = chain = first = m = None
    for i, p in enumerate(paths):
        m = F.read_manifest(p)
        if i == 0:
            first = m
        else:
            if m["signature"] != first["signature"]:
                raise CheckpointMismatchError(f"{p}: saved with a different model config than {paths[0]}")
            if m["mode"] != "delta":
                raise CheckpointMismatchError(f"{p}: a {m['mode']} save can only come first, not after {paths[0]}")
            T.check_chain(m, chain, p)
        rows = R.read_rows(p, m)  # verified as SparseTable.load verifies: files, keys, values, optimizer state
        if i == 0:
            cur = R.sort_by_key(rows)
            cur["tombstones"] = np.zeros(0, np.int64)
        else:
            cur = R.apply_delta(cur, rows)
        chain = T.manifest_chain(m)
    return cur, first, m


def export(table_or_path, out, dtype: str = "float16", *, with_stats: bool = False, rows: str = "mf") -> Dict[str, Any]:
    r"""Write the serving files of a table, or of saved directories, to directory ``out``.

    The files map each key to its lr weight and mf vector (``1 + dim`` values in ``dtype``), for the rows that
    have an mf vector; :class:`InferenceEmbedding` loads them. The export is atomic like a save: ``out``
    holds the previous export until the new manifest replaces it.

    Args:
        table_or_path: a :class:`~torch_psembed.SparseTable` (all its ranks when sharded; collective), a saved
            directory, or a list ``[base_or_checkpoint, delta1, delta2, ...]`` applied in order.
        out (str): the export directory (created when missing; an earlier export there is replaced). It may
            not be one of the saved directories read, a file, or a table save (``OutputError``, a ValueError).
        dtype (str, optional): ``"float16"``, ``"bfloat16"`` or ``"float32"``. Default: ``"float16"``
        with_stats (bool, optional): also write show and click (float32), which ``output="cvm_lr_mf"``
            needs. Default: ``False``
        rows (str, optional): ``"mf"`` (rows with an mf vector) or ``"all"`` (every row; mf reads zeros where
            there is none). Default: ``"mf"``

    Returns:
        dict: the manifest written (``rows``, ``dtype``, ``files``, ...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if rows not in ROW_SETS:
        raise ValueError(f"rows must be one of {ROW_SETS}, got {rows!r}")
    from ..table import SparseTable

    if isinstance(table_or_path, (str, os.PathLike)):
        sources = [table_or_path]
    elif isinstance(table_or_path, (list, tuple)):
        sources = list(table_or_path)
    else:  # a table (or a wrong argument, refused below)
        sources = []
    out = check_out(sources, out, F.SERVING_FORMAT_NAME)  # not an input, a file or a table save

    if isinstance(table_or_path, SparseTable):
        group = T.group_of(table_or_path)
        export_id = group.run(T._srv_begin, out)[0]
        try:
            parts = group.run(_srv_export_part, out, export_id, dtype, bool(with_stats), rows)
        except BaseException:
            group.run(T._srv_abort, out, export_id)
            raise
        manifest = None
        error = None
        if group.is_writer:
            try:
                source = {"table": table_or_path.name, "config": table_or_path.config.to_dict()}
                manifest = _commit_serving(out, export_id, parts, table_or_path.dim, dtype, with_stats, rows, source)
            except BaseException as e:
                error = e
        group.run(_srv_export_done, out, export_id)
        if error is not None:
            raise error
        return manifest if manifest is not None else F.read_manifest(out, F.SERVING_FORMAT_NAME)

    if isinstance(table_or_path, (str, os.PathLike)):
        paths: List[str] = [os.fspath(table_or_path)]
    elif isinstance(table_or_path, (list, tuple)) and table_or_path and all(
        isinstance(p, (str, os.PathLike)) for p in table_or_path
    ):
        paths = [os.fspath(p) for p in table_or_path]
    else:
        raise TypeError(
            "table_or_path must be a SparseTable, a saved directory or a list of saved directories, "
            f"got {type(table_or_path).__name__}"
        )
    merged, first, last = _rows_from_paths(paths)
    dim = int(first["signature"]["dim"])  # = its layout's dim and every delta's (read_manifest, check of signatures)
    keys, values, stats = serving_arrays(merged, dim, dtype, bool(with_stats), rows)
    os.makedirs(out, exist_ok=True)
    import uuid

    export_id = uuid.uuid4().hex
    tmp = os.path.join(out, ".tmp-" + export_id)
    os.makedirs(tmp)
    part = _write_serving_part(tmp, 0, keys, values, stats)
    part["day"] = last["day"]
    source = {"paths": [os.path.abspath(p) for p in paths], "config": first["config"],
              "base_id": last["base_id"], "sequence": last["sequence"]}
    manifest = _commit_serving(out, export_id, [part], dim, dtype, with_stats, rows, source)
    T._remove_stale(out, keep=manifest["data_dir"], save_id=export_id)
    return manifest


def values_tensor(values: np.ndarray, dtype: str) -> torch.Tensor:
    """The values of an export as a tensor of their dtype (bfloat16 is stored as its uint16 bits); no copy."""
    t = torch.from_numpy(values)
    return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t


def serving_rows_problem(keys: torch.Tensor, values: torch.Tensor, stats=None):
    """The first problem of serving rows, as ``(argument, row, what)``, or None.

    Keys strictly ascending as int64 (a lookup is a binary search), values finite (any float dtype; a NaN or an
    infinity in a row poisons every output pooled with it), stats (show, click) finite and >= 0 (the cvm
    columns take their logarithm). The one check of :func:`read_serving` (per file) and of the
    :class:`InferenceEmbedding` constructor (per argument): CPU tensors, shapes already checked.
    """
    k = keys.numpy()
    i = R.first_unordered(k)
    if i >= 0:
        what = f"duplicates row {i - 1}" if k[i] == k[i - 1] else f"is below key {int(k[i - 1])} of row {i - 1}"
        return "keys", i, f"{what}: the keys are not strictly ascending as int64 (sorted, no duplicates)"
    if values.numel():
        ok = torch.isfinite(values).all(dim=1)
        if not bool(ok.all()):
            return "values", int(torch.argmin(ok.to(torch.uint8))), "a value is not finite"
    if stats is not None and stats.numel():
        ok = torch.isfinite(stats).all(dim=1)
        if not bool(ok.all()):
            return "stats", int(torch.argmin(ok.to(torch.uint8))), "show or click is not finite"
        neg = (stats < 0).any(dim=1)
        if bool(neg.any()):
            return "stats", int(torch.argmax(neg.to(torch.uint8))), "show and click must be >= 0"
    return None


def read_serving(path) -> Dict[str, Any]:
    """Read and verify an export directory: ``{"manifest", "keys", "values", "stats"}`` (keys ascending).

    Besides sizes and checksums, each part's rows are checked (:func:`serving_rows_problem`: keys strictly
    ascending, values finite, stats finite and >= 0) and no key may be in two parts; CorruptCheckpointError
    names the file and the row."""
    path = os.path.abspath(os.fspath(path))
    m = F.read_manifest(path, F.SERVING_FORMAT_NAME)
    mpath = os.path.join(path, F.MANIFEST)
    try:
        dim = int(m["dim"])
        dtype = m["dtype"]
        with_stats = bool(m["with_stats"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptCheckpointError(f"{mpath}: malformed manifest ({e})", mpath) from None
    if dtype not in DTYPES or dim < 1:
        raise CorruptCheckpointError(f"{mpath}: unknown dtype {dtype!r} or bad dim {dim!r}", mpath)
    by_part: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for e in m["files"]:
        by_part.setdefault(e["part"], {})[e["column"]] = e
    need = ("keys", "values", "stats") if with_stats else ("keys", "values")
    ddir = F.data_path(path, m)
    n = 0
    for p, cols in sorted(by_part.items()):
        for c in need:
            if c not in cols:
                raise CorruptCheckpointError(f"{mpath}: part {p} lists no {c} file", mpath)
            if cols[c]["rows"] != cols["keys"]["rows"]:
                raise CorruptCheckpointError(f"{mpath}: part {p}: {c} has {cols[c]['rows']} rows, keys has "
                                             f"{cols['keys']['rows']}", mpath)
        n += cols["keys"]["rows"]
    # Every file's size before anything is allocated: the arrays below take the row count the manifest
    # claims, which only the files on disk bound (a manifest claiming 2^40 rows named no file of that size).
    for e in m["files"]:
        F.check_size(os.path.join(ddir, e["name"]), e)
    keys = np.empty(n, np.int64)
    values = np.empty((n, 1 + dim), DTYPES[dtype])
    stats = np.empty((n, 2), np.float32) if with_stats else None
    off = 0
    for p, cols in sorted(by_part.items()):
        r = cols["keys"]["rows"]
        files = {c: os.path.join(ddir, cols[c]["name"]) for c in need}
        F.read_into(files["keys"], keys[off:off + r], cols["keys"])
        F.read_into(files["values"], values[off:off + r], cols["values"])
        if with_stats:
            F.read_into(files["stats"], stats[off:off + r], cols["stats"])
        problem = serving_rows_problem(torch.from_numpy(keys[off:off + r]),
                                       values_tensor(values[off:off + r], dtype),
                                       torch.from_numpy(stats[off:off + r]) if with_stats else None)
        if problem is not None:
            column, i, what = problem
            raise CorruptCheckpointError(f"{files[column]}: row {i} (key {int(keys[off + i])}): {what}", files[column])
        off += r
    if n > 1 and not np.all(keys[1:] > keys[:-1]):
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = values[order]
        stats = stats[order] if stats is not None else None
        if np.any(keys[1:] == keys[:-1]):
            k = int(keys[1:][keys[1:] == keys[:-1]][0])
            raise CorruptCheckpointError(f"{ddir}: key {k} appears in more than one part", ddir)
    return {"manifest": m, "keys": keys, "values": values, "stats": stats}
