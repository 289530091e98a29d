"""Tools for saved tables and serving exports: ``python -m torch_psembed.tools inspect|verify|merge|export``.

The functions here are what the command line runs; they are usable from Python too.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..checkpoint import _format as F
from ..checkpoint import _rows as R
from ..checkpoint import _table_io as T
from ..checkpoint._output_dir import OutputError, check_out
from ..checkpoint.export import _rows_from_paths, read_serving
from ..errors import CheckpointMismatchError, CorruptCheckpointError

__all__ = ["inspect_path", "verify", "merge", "check_out", "OutputError", "MAX_NUM_BUCKETS"]

# The bucket counts a save may have (the automatic count stays within 1 to DEFAULT_NUM_BUCKETS, 64).
MAX_NUM_BUCKETS = F.MAX_NUM_BUCKETS


def _kind(path: str) -> str:
    """``"table"`` or ``"serving"``, from the manifest's format field."""
    fmt = F.peek_manifest(os.path.join(path, F.MANIFEST), "format")  # None: read_manifest names the problem
    return "serving" if fmt == F.SERVING_FORMAT_NAME else "table"


def inspect_path(path) -> Dict[str, Any]:
    """The manifest of a save or export, with its kind, total bytes and bytes per key (no data is read)."""
    path = os.path.abspath(os.fspath(path))
    kind = _kind(path)
    m = F.read_manifest(path, F.SERVING_FORMAT_NAME if kind == "serving" else F.FORMAT_NAME)
    total = F.total_bytes(m)
    return {"path": path, "kind": kind, "manifest": m, "bytes": total, "bytes_per_key": total / max(1, m["rows"])}


def verify(path) -> Dict[str, Any]:
    """Read every file of a save or export and check it as a load would: sizes, checksums, row counts, key
    order and the values (a save: the checks of ``SparseTable.load``; an export: those of
    ``InferenceEmbedding.load``; docs/format.md).

    Raises CorruptCheckpointError naming the first bad file; returns ``{"path", "files", "rows", "bytes"}``.
    """
    path = os.path.abspath(os.fspath(path))
    kind = _kind(path)
    if kind == "serving":
        d = read_serving(path)
        m = d["manifest"]
        rows = int(d["keys"].shape[0])
    else:
        m = F.read_manifest(path)
        rows_set = R.read_rows(path, m)
        rows = int(rows_set["keys"].shape[0])
        if rows != m["rows"] or int(rows_set["mf"].shape[0]) != m["rows_with_mf"]:
            mp = os.path.join(path, F.MANIFEST)
            raise CorruptCheckpointError(f"{mp}: row totals disagree with its files", mp)
        if rows and np.unique(rows_set["keys"]).shape[0] != rows:
            raise CorruptCheckpointError(f"{path}: a key appears twice", path)
    return {"path": path, "files": len(m["files"]), "rows": rows, "bytes": F.total_bytes(m)}


def merge(paths: Sequence, out, num_buckets: Optional[int] = None) -> Dict[str, Any]:
    """Apply deltas to a base (or checkpoint) in order and write the result as a base-mode save at ``out``.

    The result keeps the chain position of the last delta, so a table that loads it can go on with the next
    delta of the same base.

    ``paths[0]`` must be a base or checkpoint save (CheckpointMismatchError otherwise). ``out`` may not be one of
    ``paths``, a file or a serving export (OutputError); an earlier table save there is replaced atomically.
    ``num_buckets`` is None (the rule of ``SparseTable.save``) or an int in [1, MAX_NUM_BUCKETS].
    """
    F.check_num_buckets(num_buckets)
    paths = [os.path.abspath(os.fspath(p)) for p in paths]
    if not paths:
        raise ValueError("merge needs a base or checkpoint save, then its deltas")
    out = check_out(paths, out, F.FORMAT_NAME)
    head = F.read_manifest(paths[0])
    if head["mode"] not in ("base", "checkpoint"):
        raise CheckpointMismatchError(f"{paths[0]}: a {head['mode']} save; a merge must start from a base or "
                                      "checkpoint save (then its deltas in order)")
    rows, first, last = _rows_from_paths(paths)
    # the rule of SparseTable.save (one bucket per 65,536 rows) applied to the merged rows, unless given
    nb = int(num_buckets) if num_buckets is not None else F.auto_num_buckets(rows["keys"].shape[0])
    os.makedirs(out, exist_ok=True)
    save_id = uuid.uuid4().hex
    tmp = os.path.join(out, ".tmp-" + save_id)
    os.makedirs(tmp)
    try:
        rows["tombstones"] = rows["tombstones"][:0]
        part = R.write_part(tmp, 0, rows, nb)
        lay = first["layout"]
        part.update(day=int(last["day"]), dim=lay["dim"], base_width=lay["base_width"], mf_width=lay["mf_width"])
        chain = T.manifest_chain(last)
        manifest = T._make_manifest(first["config"], "base", save_id, chain, [part], nb)
        manifest["merged_from"] = [{"path": p, "save_id": s} for p, s in zip(paths, _ids(paths))]
        F.fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half written is left behind
        raise
    os.rename(tmp, os.path.join(out, manifest["data_dir"]))
    F.fsync_dir(out)
    F.write_manifest(out, manifest)
    T._remove_stale(out, keep=manifest["data_dir"], save_id=save_id)
    return manifest


def _ids(paths):
    return [F.read_manifest(p)["save_id"] for p in paths]
