"""Row sets as numpy arrays: bucketed writing, verified reading, selection and merging.

A *row set* is a dict ``{"keys": int64[n], "base": f32[n, base_width], "has_mf": u8[n], "mf": f32[m, mf_width],
"tombstones": int64[k]}`` where ``mf`` holds the rows with ``has_mf == 1`` in order: exactly what
``_C.Table.export`` returns and ``_C.Table.load_rows`` takes.
"""

from __future__ import annotations

import os
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

    Returns the part's manifest fragment: ``{"part", "rows", "rows_with_mf", "tombstones", "files": [...]}``.
    Buckets without rows get no files. Rows keep their input order inside a bucket.
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

    def bucket_job(b: int) -> List[Dict[str, Any]]:
        # Each thread gathers its own bucket (numpy fancy indexing releases the GIL), then checksums,
        # writes and fsyncs it: no whole-table reordered copy is ever made.
        idx = order[bounds[b]:bounds[b + 1]]
        has = np.take(has_all, idx)
        out = []
        for col, arr in (  # np.take(axis=0) copies rows about 3x faster than fancy indexing
            ("keys", np.take(keys, idx)),
            ("base", np.take(rows["base"], idx, axis=0)),
            ("has_mf", has),
            ("mf", np.take(rows["mf"], np.take(mf_pos, idx[has.astype(bool)]), axis=0)),
        ):
            name = F.bucket_file(b, part, col)
            entry = {"name": name, "column": col, "bucket": b, "part": part, "rows": int(arr.shape[0])}
            entry.update(F.write_array(os.path.join(dirpath, name), arr))
            out.append(entry)
        return out

    def tomb_job() -> List[Dict[str, Any]]:
        tomb = np.ascontiguousarray(rows["tombstones"], dtype=np.int64)
        name = F.tombstone_file(part)
        entry = {"name": name, "column": "tombstones", "bucket": None, "part": part, "rows": int(tomb.shape[0])}
        entry.update(F.write_array(os.path.join(dirpath, name), tomb))
        return [entry]

    with ThreadPoolExecutor(IO_THREADS) as pool:
        futures = [pool.submit(bucket_job, int(b)) for b in np.flatnonzero(counts)]
        futures.append(pool.submit(tomb_job))
        files = [e for f in futures for e in f.result()]
    return {
        "part": part,
        "rows": int(n),
        "rows_with_mf": int(rows["mf"].shape[0]),
        "tombstones": int(rows["tombstones"].shape[0]),
        "files": files,
    }


# -- reading ---------------------------------------------------------------------------------------------------

def read_rows(
    path: str,
    m: Dict[str, Any],
    owner: Optional[Tuple[int, int]] = None,
    check_buckets: bool = True,
) -> Dict[str, np.ndarray]:
    """Read and verify every file of save ``m`` at ``path``; returns the row set (bucket, part order).

    With ``owner=(index, n)`` only the keys with ``_C.route(key, n) == index`` are kept (rows and tombstones);
    the files are then read a few buckets at a time, so memory holds this owner's rows plus those buckets.
    Raises CorruptCheckpointError naming the file on any size, checksum or consistency problem.
    """
    from .. import _C

    groups = F.group_files(m)
    row_groups = sorted((k for k in groups if k[0] is not None), key=lambda k: (k[0], k[1]))
    tomb_groups = sorted((k for k in groups if k[0] is None), key=lambda k: k[1])
    mpath = os.path.join(path, F.MANIFEST)
    ddir = F.data_path(path, m)
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
    tomb = _read_block(path, m, groups, [], tomb_groups, False)["tombstones"]
    if owner is None or owner[1] <= 1:
        out = _read_block(path, m, groups, row_groups, [], check_buckets)
        out["tombstones"] = tomb
        return out
    index, parts = owner
    pieces = []
    buckets = sorted({k[0] for k in row_groups})
    for lo in range(0, len(buckets), READ_BATCH_BUCKETS):
        batch = set(buckets[lo:lo + READ_BATCH_BUCKETS])
        block = _read_block(path, m, groups, [k for k in row_groups if k[0] in batch], [], check_buckets)
        pieces.append(take_rows(block, _C.route(block["keys"], parts) == index))
    layout = m["layout"]
    out = concat_rows(pieces) if pieces else empty_rows(int(layout["base_width"]), int(layout["mf_width"]))
    out["tombstones"] = tomb[_C.route(tomb, parts) == index] if tomb.size else tomb
    return out


# Buckets read at once when a server keeps only its own keys.
READ_BATCH_BUCKETS = 8


def _read_block(path, m, groups, row_groups, tomb_groups, check_buckets) -> Dict[str, np.ndarray]:
    """Read the given (bucket, part) row groups and tombstone groups into fresh arrays, verified."""
    ddir = F.data_path(path, m)
    layout = m["layout"]
    bw, mw = int(layout["base_width"]), int(layout["mf_width"])
    n = m_rows = t = 0
    plan = []  # (column, entry, row offset)
    for key in row_groups:
        cols = groups[key]
        plan += [("keys", cols["keys"], n), ("base", cols["base"], n), ("has_mf", cols["has_mf"], n),
                 ("mf", cols["mf"], m_rows)]
        n += cols["keys"]["rows"]
        m_rows += cols["mf"]["rows"]
    for key in tomb_groups:
        e = groups[key]["tombstones"]
        plan.append(("tombstones", e, t))
        t += e["rows"]
    # Every file's size on disk before allocating what the manifest claims (a forged row count is refused
    # here, not by a MemoryError); read_into checks it again, with the checksum, while reading.
    for _col, entry, _off in plan:
        F.check_size(os.path.join(ddir, entry["name"]), entry)
    try:
        out = {
            "keys": np.empty(n, np.int64),
            "base": np.empty((n, bw), np.float32),
            "has_mf": np.empty(n, np.uint8),
            "mf": np.empty((m_rows, mw), np.float32),
            "tombstones": np.empty(t, np.int64),
        }
    except MemoryError:
        raise MemoryError(f"{path}: not enough memory to read {n} rows") from None

    def one(item):
        col, entry, off = item
        F.read_into(os.path.join(ddir, entry["name"]), out[col][off:off + entry["rows"]], entry)

    with ThreadPoolExecutor(IO_THREADS) as pool:
        list(pool.map(one, plan))

    # Consistency beyond checksums: mf rows match has_mf, flags are 0/1, keys sit in their bucket.
    has = out["has_mf"]
    if has.size and has.max() > 1:
        raise CorruptCheckpointError(f"{ddir}: a has_mf file holds a value other than 0 or 1", ddir)
    off = 0
    for key in row_groups:
        cols = groups[key]
        r = cols["keys"]["rows"]
        got = int(np.count_nonzero(has[off:off + r]))
        if got != cols["mf"]["rows"]:
            p = os.path.join(ddir, cols["mf"]["name"])
            raise CorruptCheckpointError(f"{p}: holds {cols['mf']['rows']} rows, but has_mf marks {got}", p)
        if check_buckets and r:
            b = F.bucket_of(out["keys"][off:off + r], m["num_buckets"])
            if not np.all(b == key[0]):
                p = os.path.join(ddir, cols["keys"]["name"])
                raise CorruptCheckpointError(f"{p}: holds keys of another bucket than {key[0]}", p)
        off += r
    return out


MAX_UNSEEN_DAYS = 65535  # _C's saturation point (kMaxUnseenDays)
INT32_MAX = 2147483647


def check_values(rows: Dict[str, np.ndarray], where: str) -> None:
    """Refuse, as CorruptCheckpointError naming ``where``, the values ``_C.Table.load_rows`` would refuse.

    The same rules as load_rows (finite floats, show/click >= 0, unseen_days an integer in [0, 65535], slot an
    int32, has_mf 0/1), checked vectorised before the table is touched, so a refused load changes nothing.
    Whole-array reductions first (about 25 ms per million rows); the offending row is located only on failure.
    """
    base, mf, has = rows["base"], rows["mf"], rows["has_mf"]

    def bad(msg, row_mask):
        i = int(np.flatnonzero(row_mask)[0])
        raise CorruptCheckpointError(f"{where}: {msg} (row {i}, key {int(rows['keys'][i])})", where)

    if has.size and has.max() > 1:
        bad("has_mf holds a value other than 0 or 1", has > 1)
    if base.size:
        if not np.isfinite(base).all():
            bad("base holds a NaN or infinite value", ~np.isfinite(base).all(axis=1))
        if min(base[:, 0].min(), base[:, 1].min()) < 0:
            bad("base holds a negative show or click", (base[:, 0] < 0) | (base[:, 1] < 0))
        u = base[:, 3]
        if u.min() < 0 or u.max() > MAX_UNSEEN_DAYS or not np.array_equal(u, np.floor(u)):
            bad("unseen_days (base column 3) is not an integer in [0, 65535]",
                (u < 0) | (u > MAX_UNSEEN_DAYS) | (u != np.floor(u)))
        sl = base[:, 4]
        # Compared in float64 as load_rows does: float32(2**31 - 1) rounds up to 2**31, which it refuses.
        if float(np.abs(sl).max()) > INT32_MAX or not np.array_equal(sl, np.floor(sl)):
            bad("slot (base column 4) is not an int32",
                (np.abs(sl.astype(np.float64)) > INT32_MAX) | (sl != np.floor(sl)))
    if mf.size and not np.isfinite(mf).all():
        j = int(np.flatnonzero(~np.isfinite(mf).all(axis=1))[0])
        i = int(np.flatnonzero(has)[j])
        raise CorruptCheckpointError(f"{where}: mf holds a NaN or infinite value (row {i}, key {int(rows['keys'][i])})",
                                     where)


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
