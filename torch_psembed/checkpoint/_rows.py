"""Row sets as numpy arrays: bucketed writing, verified reading, selection and merging.

A *row set* is a dict ``{"keys": int64[n], "base": f32[n, base_width], "has_mf": u8[n], "mf": f32[m, mf_width],
"tombstones": int64[k]}`` where ``mf`` holds the rows with ``has_mf == 1`` in order: exactly what
``_C.Table.export`` returns and ``_C.Table.load_rows`` takes.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CorruptCheckpointError
from . import _format as F

# Threads for file I/O, checksums and fsync (all release the GIL). More threads than cores on purpose: the
# fsyncs of many files then share journal commits (on ext4, 256 small files: 0.9 s with 1 thread, 0.13 s
# with 16).
IO_THREADS = 16


def empty_rows(base_width: int, mf_width: int) -> Dict[str, np.ndarray]:
    return {
        "keys": np.zeros(0, np.int64),
        "base": np.zeros((0, base_width), np.float32),
        "has_mf": np.zeros(0, np.uint8),
        "mf": np.zeros((0, mf_width), np.float32),
        "tombstones": np.zeros(0, np.int64),
    }


def mf_index(has_mf: np.ndarray) -> np.ndarray:
    """Position in ``mf`` of each row (meaningful only where ``has_mf == 1``)."""
    return np.cumsum(has_mf, dtype=np.int64) - 1


def take_rows(rows: Dict[str, np.ndarray], sel: np.ndarray) -> Dict[str, np.ndarray]:
    """Rows ``sel`` (an index array or a boolean mask) of a row set; tombstones are kept as they are."""
    if sel.dtype == np.bool_:
        sel = np.flatnonzero(sel)
    has = np.take(rows["has_mf"], sel)
    mf_rows = np.take(mf_index(rows["has_mf"]), sel[has.astype(bool)])
    return {
        "keys": np.take(rows["keys"], sel),
        "base": np.take(rows["base"], sel, axis=0),
        "has_mf": has,
        "mf": np.take(rows["mf"], mf_rows, axis=0),
        "tombstones": rows["tombstones"],
    }


def sort_by_key(rows: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Rows ordered by key read as uint64 (the order ``_C.Table.export`` uses)."""
    order = np.argsort(rows["keys"].view(np.uint64), kind="stable")
    return take_rows(rows, order)


def check_row_set(rows: Dict[str, np.ndarray], base_width: int, mf_width: int, where: str) -> None:
    n = rows["keys"].shape[0]
    if rows["base"].shape != (n, base_width):
        raise ValueError(f"{where}: base has shape {rows['base'].shape}, expected ({n}, {base_width})")
    if rows["has_mf"].shape != (n,):
        raise ValueError(f"{where}: has_mf has shape {rows['has_mf'].shape}, expected ({n},)")
    m = int(np.count_nonzero(rows["has_mf"]))
    if rows["mf"].shape != (m, mf_width):
        raise ValueError(f"{where}: mf has shape {rows['mf'].shape}, expected ({m}, {mf_width})")


# -- writing ---------------------------------------------------------------------------------------------------

def write_part(dirpath: str, part: int, rows: Dict[str, np.ndarray], num_buckets: int) -> Dict[str, Any]:
    """Write one writer part of a save into ``dirpath`` (bucketed, checksummed, fsynced).

    ``rows`` is a row set in any order. Returns the part's manifest fragment: ``{"part", "rows",
    "rows_with_mf", "tombstones", "files": [...]}``. Buckets without rows get no files. Rows keep their
    input order inside a bucket. (A table save uses :func:`write_buckets`, which needs no reordering.)
    """
    keys = rows["keys"]
    n = keys.shape[0]
    buckets = F.bucket_of(keys, num_buckets) if n else np.zeros(0, np.int32)
    counts = np.bincount(buckets, minlength=num_buckets)
    # Stable radix sort on a small integer type: O(n) and keeps the input order inside each bucket.
    order = np.argsort(buckets.astype(np.uint8 if num_buckets <= 256 else np.uint16), kind="stable")
    del buckets
    bounds = np.concatenate([[0], np.cumsum(counts)])
    has_all = rows["has_mf"]
    mf_pos = mf_index(has_all)

    def columns(b: int):
        # Each thread gathers its own bucket (numpy fancy indexing releases the GIL): no whole-table
        # reordered copy is ever made. np.take(axis=0) copies rows about 3x faster than fancy indexing.
        idx = order[bounds[b]:bounds[b + 1]]
        has = np.take(has_all, idx)
        return (np.take(keys, idx), np.take(rows["base"], idx, axis=0), has,
                np.take(rows["mf"], np.take(mf_pos, idx[has.astype(bool)]), axis=0))

    files = _write_files(dirpath, part, np.flatnonzero(counts), columns, rows["tombstones"])
    return {
        "part": part,
        "rows": int(n),
        "rows_with_mf": int(rows["mf"].shape[0]),
        "tombstones": int(rows["tombstones"].shape[0]),
        "files": files,
    }


def write_buckets(dirpath: str, part: int, snap: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Like :func:`write_part`, from a ``_C.Table.export_buckets`` snapshot: rows already grouped by
    bucket (and sorted by key inside one), so each file is written straight from a slice, no copy."""
    rb = snap["row_begin"]
    mf_rows = snap["mf_rows"]

    def columns(b: int):
        lo, hi = int(rb[b]), int(rb[b + 1])
        return (snap["keys"][lo:hi], snap["base"][lo:hi], snap["has_mf"][lo:hi],
                snap["mf"][lo:lo + int(mf_rows[b])])

    files = _write_files(dirpath, part, np.flatnonzero(np.diff(rb)), columns, snap["tombstones"])
    return {
        "part": part,
        "rows": int(rb[-1]),
        "rows_with_mf": int(mf_rows.sum()),
        "tombstones": int(snap["tombstones"].shape[0]),
        "files": files,
    }


def stream_part(local, dirpath: str, part: int, num_buckets: int) -> Dict[str, Any]:
    """A checkpoint-mode part written by ``_C.Table.save_buckets``: the rows go from the table to the files
    bucket by bucket (no snapshot of the whole table in memory), and each file is fsynced in the background
    as soon as it is written, so the disk works while the next buckets are copied. Same files and fragment
    as :func:`write_buckets` of
    ``export_buckets("checkpoint")``."""
    paths = [os.path.join(dirpath, F.bucket_file(b, part, c)) for b in range(num_buckets) for c in F.ROW_COLUMNS]
    r = local.save_buckets("checkpoint", num_buckets, F.BUCKET_SALT, paths, sync=True)
    files = []
    for b, c, rows, nbytes, crc in r["files"]:
        col = F.ROW_COLUMNS[c]
        files.append({"name": F.bucket_file(b, part, col), "column": col, "bucket": int(b), "part": part,
                      "rows": int(rows), "bytes": int(nbytes), "crc32": int(crc)})
    tomb = r["tombstones"]
    tomb_entry = {"name": F.tombstone_file(part), "column": "tombstones", "bucket": None, "part": part,
                  "rows": int(tomb.shape[0])}

    tomb_entry.update(F.write_array(os.path.join(dirpath, tomb_entry["name"]),
                                    np.ascontiguousarray(tomb, dtype=np.int64)))
    return {
        "part": part,
        "rows": int(r["rows"]),
        "rows_with_mf": int(r["mf_rows"]),
        "tombstones": int(tomb.shape[0]),
        "files": files + [tomb_entry],
    }


def _write_files(dirpath: str, part: int, buckets, columns, tombstones: np.ndarray) -> List[Dict[str, Any]]:
    """Write the four column files of every bucket in ``buckets`` (``columns(b)`` gives the arrays) and
    the part's tombstone file, from IO_THREADS threads (checksum, write and fsync release the GIL)."""

    def bucket_job(b: int) -> List[Dict[str, Any]]:
        out = []
        for col, arr in zip(F.ROW_COLUMNS, columns(b)):
            name = F.bucket_file(b, part, col)
            entry = {"name": name, "column": col, "bucket": b, "part": part, "rows": int(arr.shape[0])}
            entry.update(F.write_array(os.path.join(dirpath, name), arr))
            out.append(entry)
        return out

    def tomb_job() -> List[Dict[str, Any]]:
        tomb = np.ascontiguousarray(tombstones, dtype=np.int64)
        name = F.tombstone_file(part)
        entry = {"name": name, "column": "tombstones", "bucket": None, "part": part, "rows": int(tomb.shape[0])}
        entry.update(F.write_array(os.path.join(dirpath, name), tomb))
        return [entry]

    with ThreadPoolExecutor(IO_THREADS) as pool:
        futures = [pool.submit(bucket_job, int(b)) for b in buckets]
        futures.append(pool.submit(tomb_job))
        return [e for f in futures for e in f.result()]


# -- reading ---------------------------------------------------------------------------------------------------

def read_rows(
    path: str,
    m: Dict[str, Any],
    owner: Optional[Tuple[int, int]] = None,
    check_buckets: bool = True,
    check_values: bool = True,
) -> Dict[str, np.ndarray]:
    """Read and verify every file of save ``m`` at ``path``; returns the row set (bucket, part order) in
    fresh arrays. ``owner`` and the checks are those of :func:`read_segments`; with ``check_values`` (the
    default) the values too, with the checks of ``SparseTable.load``: what export, merge and verify read is
    what a load would accept."""
    segments, tomb = read_segments(path, m, owner=owner, check_buckets=check_buckets, check_values_too=check_values)
    layout = m["layout"]
    segments.append(empty_rows(int(layout["base_width"]), int(layout["mf_width"])))
    out = {c: np.concatenate([s[c] for s in segments]) for c in F.ROW_COLUMNS}
    out["tombstones"] = tomb
    return out


def read_segments(
    path: str,
    m: Dict[str, Any],
    owner: Optional[Tuple[int, int]] = None,
    check_buckets: bool = True,
    check_values_too: bool = False,
    check_values_with: Any = None,
) -> Tuple[List[Dict[str, np.ndarray]], np.ndarray]:
    """Read and verify every file of save ``m`` at ``path``: ``(segments, tombstones)``, one row set
    (without tombstones) per (bucket, part) file group, in (bucket, part) order.

    The files are memory-mapped, read-only: a segment's arrays are views of the page cache (no copy, no
    fresh memory), valid as long as they are referenced, even after the files are deleted. (Do not
    truncate the files of a save while it is being loaded: docs/format.md.) With ``owner=(index, n)``
    only the keys with ``_C.route(key, n) == index`` are kept (rows and tombstones), copied out of the
    mapping, so memory holds this owner's rows only. Every group is verified from IO_THREADS threads:
    size, crc32, has_mf flags and count, keys strictly ascending as uint64 (:func:`check_key_order`), keys
    in their bucket (``check_buckets``), and with ``check_values_too`` the values (:func:`check_values`,
    numpy). ``check_values_with``, a ``_C.Table``, checks the values of the rows kept instead, with its
    ``check_segments`` (the checks of ``load_segments``, in C++, in parallel; see
    :func:`check_segment_values`). Either way the optimizer state is checked too (:func:`check_state`).
    A key held by the files of two parts (each part owns its keys) is refused as well. Raises
    CorruptCheckpointError naming the file on any problem (the first group in order that has one).
    """
    from .. import _C

    groups = F.group_files(m)
    row_groups = sorted((k for k in groups if k[0] is not None), key=lambda k: (k[0], k[1]))
    tomb_groups = sorted((k for k in groups if k[0] is None), key=lambda k: k[1])
    mpath = os.path.join(path, F.MANIFEST)
    ddir = F.data_path(path, m)
    layout = m["layout"]
    for key in row_groups:
        cols = groups[key]
        missing = [c for c in F.ROW_COLUMNS if c not in cols]
        if missing:
            raise CorruptCheckpointError(f"{mpath}: bucket {key[0]} part {key[1]} lists no {missing[0]} file", mpath)
        r = cols["keys"]["rows"]
        for c in ("base", "has_mf"):
            if cols[c]["rows"] != r:
                p = os.path.join(ddir, cols[c]["name"])
                raise CorruptCheckpointError(f"{p}: {cols[c]['rows']} rows, but its keys file has {r}", p)
    # Every file's size before anything is mapped or allocated.
    for key in row_groups + tomb_groups:
        for entry in groups[key].values():
            F.check_size(os.path.join(ddir, entry["name"]), entry)
    split = owner is not None and owner[1] > 1
    ranges = F.column_ranges(m) if (check_values_too or check_values_with is not None) else None

    def files_of(key) -> Dict[str, str]:
        return {c: os.path.join(ddir, groups[key][c]["name"]) for c in F.ROW_COLUMNS}

    def group_job(key) -> Dict[str, np.ndarray]:
        cols = groups[key]
        files = files_of(key)
        seg = {c: F.map_array(files[c], cols[c], c, layout) for c in F.ROW_COLUMNS}
        has = seg["has_mf"]
        if has.size and has.max() > 1:
            raise CorruptCheckpointError(f"{files['has_mf']}: holds a value other than 0 or 1", files["has_mf"])
        got = int(np.count_nonzero(has))
        if got != cols["mf"]["rows"]:
            raise CorruptCheckpointError(f"{files['mf']}: holds {cols['mf']['rows']} rows, but has_mf marks {got}",
                                         files["mf"])
        if check_buckets and has.size:
            if not F.all_in_bucket(seg["keys"], m["num_buckets"], key[0]):
                p = files["keys"]
                raise CorruptCheckpointError(f"{p}: holds keys of another bucket than {key[0]}", p)
        check_key_order(seg["keys"], files["keys"])
        if check_values_too:
            check_values(seg, files)
        if ranges is not None:
            check_state(seg, files, ranges)
        if split:
            seg = take_rows(dict(seg, tombstones=None), _C.route(seg["keys"], owner[1]) == owner[0])
            del seg["tombstones"]
        return seg

    def tomb_job(key) -> np.ndarray:
        e = groups[key]["tombstones"]
        return np.array(F.map_array(os.path.join(ddir, e["name"]), e, "tombstones", layout))

    with ThreadPoolExecutor(IO_THREADS) as pool:
        seg_futures = [pool.submit(group_job, k) for k in row_groups]
        tomb_futures = [pool.submit(tomb_job, k) for k in tomb_groups]
        segments = [f.result() for f in seg_futures]
        tombs = [f.result() for f in tomb_futures]
        # A key in the files of two parts of one bucket (the rows kept): each part owns its keys.
        by_bucket: Dict[int, List[int]] = {}
        for i, k in enumerate(row_groups):
            if segments[i]["keys"].size:
                by_bucket.setdefault(k[0], []).append(i)
        shared = [pool.submit(_check_parts_disjoint, [segments[i]["keys"] for i in idx],
                              [files_of(row_groups[i])["keys"] for i in idx], not split)
                  for idx in by_bucket.values() if len(idx) > 1]
        for f in shared:
            f.result()
    tomb = np.concatenate(tombs) if tombs else np.zeros(0, np.int64)
    if split and tomb.size:
        tomb = tomb[_C.route(tomb, owner[1]) == owner[0]]
    if check_values_with is not None:
        check_segment_values(check_values_with, segments, [groups[k] for k in row_groups], ddir)
    return segments, tomb


def first_unordered(keys: np.ndarray) -> int:
    """The first row ``i`` whose key is not above row ``i - 1``'s (in the order of ``keys``' dtype), or -1."""
    if keys.shape[0] < 2:
        return -1
    up = keys[1:] > keys[:-1]
    if up.all():
        return -1
    return int(np.argmin(up)) + 1


def check_key_order(keys: np.ndarray, path: str) -> None:
    """The keys of a bucket file are strictly ascending as uint64 (docs/format.md): refuse a duplicate (a load
    would keep one of the rows and drop the other) or a key out of order, naming ``path`` and the row."""
    u = keys.view(np.uint64)
    i = first_unordered(u)
    if i < 0:
        return
    k, prev = int(keys[i]), int(keys[i - 1])
    what = f"duplicates row {i - 1}" if u[i] == u[i - 1] else f"is below key {prev} of row {i - 1}"
    raise CorruptCheckpointError(f"{path}: row {i}: key {k} {what}: the keys are not strictly ascending as uint64",
                                 path)


def _check_parts_disjoint(keys: List[np.ndarray], paths: List[str], file_rows: bool) -> None:
    """No key in two of the ``keys`` arrays (each strictly ascending as uint64: the files of one bucket's parts,
    ``file_rows`` when they are the files' whole rows, not the rows one server keeps)."""
    u = np.concatenate([k.view(np.uint64) for k in keys])
    u.sort(kind="stable")  # sorted runs: a merge
    dup = np.flatnonzero(u[1:] == u[:-1])
    if not dup.size:
        return
    k = u[dup[0]]
    holders = [j for j, a in enumerate(keys) if _holds(a.view(np.uint64), k)][:2]
    first, second = paths[holders[0]], paths[holders[1]]
    row = f"row {int(np.searchsorted(keys[holders[1]].view(np.uint64), k))}: " if file_rows else ""
    key = int(np.array([k], np.uint64).view(np.int64)[0])
    raise CorruptCheckpointError(
        f"{second}: {row}key {key} is also in {os.path.basename(first)}: each key belongs to one part", second)


def _holds(sorted_keys: np.ndarray, k) -> bool:
    i = int(np.searchsorted(sorted_keys, k))
    return i < sorted_keys.shape[0] and sorted_keys[i] == k


def check_segment_values(table, segments: List[Dict[str, np.ndarray]], group_files: List[Dict[str, Any]],
                         ddir: str) -> None:
    """The values of ``segments`` (row sets, one per file group ``group_files[i]``) checked by
    ``table.check_segments``: the rules ``load_segments`` applies (finite floats, show/click >= 0,
    unseen_days an integer in [0, 65535], slot an int32, has_mf 0/1). A refusal is CorruptCheckpointError
    naming the file (base, has_mf or mf) of the segment, the row (among the rows kept) and its key."""
    try:
        table.check_segments([(s["keys"], s["base"], s["has_mf"], s["mf"]) for s in segments])
    except ValueError as e:
        msg = str(e)
        found = re.match(r"segment (\d+): (.*)", msg)
        if found is None or int(found.group(1)) >= len(group_files):
            raise CorruptCheckpointError(f"{ddir}: {msg}", ddir) from None
        seg, rest = int(found.group(1)), found.group(2)
        column = "mf" if rest.startswith("mf row") else "has_mf" if "has_mf" in rest else "base"
        p = os.path.join(ddir, group_files[seg][column]["name"])
        row = re.match(r"(mf )?row (\d+)", rest)
        if row is not None:
            i = int(row.group(2))
            if row.group(1):  # the i-th mf row belongs to the i-th row with has_mf == 1
                i = int(np.flatnonzero(segments[seg]["has_mf"])[i])
            rest += f" (key {int(segments[seg]['keys'][i])})"
        raise CorruptCheckpointError(f"{p}: {rest}", p) from None


MAX_UNSEEN_DAYS = 65535  # _C's saturation point (kMaxUnseenDays)
INT32_MAX = 2147483647


def _path_of(where, column: str) -> str:
    return where if isinstance(where, str) else where[column]


def check_values(rows: Dict[str, np.ndarray], where) -> None:
    """Refuse, as CorruptCheckpointError, the values ``_C.Table.load_rows`` would refuse.

    The same rules and messages as load_rows / ``check_segments`` (finite floats, show/click >= 0, unseen_days
    an integer in [0, 65535], slot an int32, has_mf 0/1), checked vectorised before the table is touched, so a
    refused load changes nothing. ``where`` names the files: a path, or ``{column: path}`` (the error then names
    the ``.base``, ``.has_mf`` or ``.mf`` file). Whole-array reductions first (about 25 ms per million rows);
    the offending row is located only on failure.
    """
    base, mf, has, keys = rows["base"], rows["mf"], rows["has_mf"], rows["keys"]

    def bad(column, msg, row_mask):
        i = int(np.flatnonzero(row_mask)[0])
        p = _path_of(where, column)
        raise CorruptCheckpointError(f"{p}: row {i}: {msg(i)} (key {int(keys[i])})", p)

    if has.size and has.max() > 1:
        bad("has_mf", lambda i: f"has_mf is {int(has[i])}, not 0 or 1", has > 1)
    if base.size:
        if not np.isfinite(base).all():
            rows_bad = ~np.isfinite(base).all(axis=1)
            bad("base", lambda i: f"base column {int(np.argmin(np.isfinite(base[i])))} is not finite", rows_bad)
        if min(base[:, 0].min(), base[:, 1].min()) < 0:
            bad("base", lambda i: "show and click must be >= 0", (base[:, 0] < 0) | (base[:, 1] < 0))
        u = base[:, 3]
        if u.min() < 0 or u.max() > MAX_UNSEEN_DAYS or not np.array_equal(u, np.floor(u)):
            bad("base", lambda i: f"unseen_days (base column 3) must be an integer in [0, {MAX_UNSEEN_DAYS}], "
                                  f"got {float(u[i]):.9g}",
                (u < 0) | (u > MAX_UNSEEN_DAYS) | (u != np.floor(u)))
        sl = base[:, 4]
        # Compared in float64 as load_rows does: float32(2**31 - 1) rounds up to 2**31, which it refuses.
        if float(np.abs(sl).max()) > INT32_MAX or not np.array_equal(sl, np.floor(sl)):
            bad("base", lambda i: f"slot (base column 4) must be an int32, got {float(sl[i]):.9g}",
                (np.abs(sl.astype(np.float64)) > INT32_MAX) | (sl != np.floor(sl)))
    if mf.size and not np.isfinite(mf).all():
        j = int(np.flatnonzero(~np.isfinite(mf).all(axis=1))[0])
        c = int(np.argmin(np.isfinite(mf[j])))
        i = int(np.flatnonzero(has)[j])
        p = _path_of(where, "mf")
        raise CorruptCheckpointError(f"{p}: mf row {j} column {c} is not finite (key {int(keys[i])})", p)


def check_state(rows: Dict[str, np.ndarray], where, ranges) -> None:
    """Refuse optimizer state no training can produce: a negative sum of squares (AdaGrad/StdAdaGrad g2sum,
    Adam's v, FTRL's n) or an Adam beta power outside [0, 1] (``ranges``: :func:`_format.column_ranges`).
    The next push would turn it into wrong weights (a negative g2sum drives them to the bound). Weights are not
    checked against weight_bounds: a weight outside them is clipped by the row's next push (and a table with
    other bounds refuses the save: they are part of the signature). NaN passes here (the finiteness check has it).
    ``where`` as in :func:`check_values`; a ``.mf`` row is counted in the ``.mf`` file."""
    for column, prefix in (("base", "lr_state"), ("mf", "mf_state")):
        arr = rows[column]
        start, spans = ranges[column]
        if not arr.shape[0]:
            continue
        for first, end, lo, hi, name in spans:
            block = arr[:, first:end]
            if not (block.min() < lo or (hi != np.inf and block.max() > hi)):
                continue
            r, c = (int(x) for x in np.argwhere((block < lo) | (block > hi))[0])
            key_row = r if column == "base" else int(np.flatnonzero(rows["has_mf"])[r])
            col = first + c
            want = f">= {lo:g}" if hi == np.inf else f"in [{lo:g}, {hi:g}]"
            p = _path_of(where, column)
            raise CorruptCheckpointError(
                f"{p}: row {r}: {column} column {col} ({prefix}{col - start}) is {float(block[r, c]):.9g}, but "
                f"{name} is {want} by construction (key {int(rows['keys'][key_row])})", p)


# -- merging ---------------------------------------------------------------------------------------------------

def apply_delta(cur: Dict[str, np.ndarray], delta: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The serving view after a delta: drop its tombstones, then insert/overwrite its rows."""
    drop = np.isin(cur["keys"], delta["tombstones"]) | np.isin(cur["keys"], delta["keys"])
    kept = take_rows(cur, ~drop)
    merged = {
        "keys": np.concatenate([kept["keys"], delta["keys"]]),
        "base": np.concatenate([kept["base"], delta["base"]]),
        "has_mf": np.concatenate([kept["has_mf"], delta["has_mf"]]),
        "mf": np.concatenate([kept["mf"], delta["mf"]]),
        "tombstones": np.zeros(0, np.int64),
    }
    return sort_by_key(merged)


def concat_rows(sets: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {k: np.concatenate([s[k] for s in sets]) for k in ("keys", "base", "has_mf", "mf", "tombstones")}
