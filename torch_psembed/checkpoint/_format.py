"""The on-disk layout of a saved table: names, the manifest schema, bucketing, checksummed column files.

Everything here is frozen by ``docs/format.md``: changing a name, the bucket rule or the byte layout orphans
saved models. A reader accepts exactly ``FORMAT_VERSION``; a manifest of another version is refused.

Layout of a save directory ``PATH`` (a table save; the serving export is documented in ``export.py``)::

    PATH/manifest.json                        the commit point: written last, atomically (rename)
    PATH/data-<save_id>/bucket-BBBB.part-PPP.keys     int64[n]           sorted ascending as uint64
    PATH/data-<save_id>/bucket-BBBB.part-PPP.base     float32[n, base_width]
    PATH/data-<save_id>/bucket-BBBB.part-PPP.has_mf   uint8[n]           1 when the row has an mf vector
    PATH/data-<save_id>/bucket-BBBB.part-PPP.mf       float32[m, mf_width]  rows with has_mf == 1, in order
    PATH/data-<save_id>/part-PPP.tombstones           int64[k]

All little-endian, no headers; each file's byte count and ``zlib.crc32`` are in the manifest.
"""

from __future__ import annotations

import json
import os
import zlib
from typing import Any, Dict, List

import numpy as np

from .. import _C
from ..errors import CorruptCheckpointError

FORMAT_NAME = "torch_psembed.table"
SERVING_FORMAT_NAME = "torch_psembed.serving"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Bucket of a key: _C.route(key XOR BUCKET_SALT, num_buckets) == mix64(key ^ salt) % num_buckets.
# The salt keeps buckets independent of the server routing (mix64(key) % num_servers). Frozen.
BUCKET_SALT = 0x5EED_C0DE_B0C4_E75A
DEFAULT_NUM_BUCKETS = 64
BUCKET_RULE = "mix64(key ^ 0x5EEDC0DEB0C4E75A) % num_buckets"

MODES = ("checkpoint", "base", "delta")
BASE_COLUMNS_HEAD = ["show", "click", "delta_score", "unseen_days", "slot", "lr_w"]

# column -> (numpy dtype, whether it has a second dimension named in the manifest layout)
COLUMN_DTYPES = {
    "keys": np.dtype("<i8"),
    "base": np.dtype("<f4"),
    "has_mf": np.dtype("u1"),
    "mf": np.dtype("<f4"),
    "tombstones": np.dtype("<i8"),
}
ROW_COLUMNS = ("keys", "base", "has_mf", "mf")

_SALT_I64 = np.array([BUCKET_SALT], dtype=np.uint64).view(np.int64)[0]


def bucket_of(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket (int32) of each int64 key; frozen (see docs/format.md)."""
    return _C.route(np.bitwise_xor(keys, _SALT_I64), int(num_buckets))


def bucket_file(bucket: int, part: int, column: str) -> str:
    return f"bucket-{bucket:04d}.part-{part:03d}.{column}"


def tombstone_file(part: int) -> str:
    return f"part-{part:03d}.tombstones"


def data_dir_name(save_id: str) -> str:
    return f"data-{save_id}"


def row_width(column: str, layout: Dict[str, Any]) -> int:
    if column == "base":
        return int(layout["base_width"])
    if column == "mf":
        return int(layout["mf_width"])
    return 1


# -- durable writes ------------------------------------------------------------------------------------------

def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_array(path: str, arr: np.ndarray, fsync: bool = True) -> Dict[str, int]:
    """Write ``arr``'s raw bytes to a new file ``path``; returns ``{"bytes", "crc32"}``."""
    arr = np.ascontiguousarray(arr)
    mv = memoryview(arr).cast("B") if arr.size else b""
    crc = zlib.crc32(mv)
    with open(path, "wb", buffering=0) as f:
        if arr.size:
            f.write(mv)
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": int(arr.nbytes), "crc32": int(crc)}


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through ``path.tmp`` + fsync + rename + fsync of the directory."""
    tmp = path + ".tmp"
    data = json.dumps(obj, indent=1, sort_keys=False).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# -- reads ----------------------------------------------------------------------------------------------------

def read_into(path: str, dest: np.ndarray, entry: Dict[str, Any]) -> None:
    """Fill ``dest`` (C-contiguous) from file ``path``, checking its size and crc32 against ``entry``."""
    expected = int(entry["bytes"])
    if dest.nbytes != expected:
        raise CorruptCheckpointError(
            f"{path}: manifest says {expected} bytes but {entry.get('rows')} rows need {dest.nbytes}", path
        )
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: missing or unreadable ({e.strerror})", path) from None
    if size != expected:
        what = "truncated" if size < expected else "longer than expected"
        raise CorruptCheckpointError(f"{path}: {what}: {size} bytes on disk, manifest says {expected}", path)
    mv = memoryview(dest.reshape(-1)).cast("B") if dest.size else memoryview(b"")
    if expected:
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < expected:
                n = f.readinto(mv[got:])
                if not n:
                    raise CorruptCheckpointError(f"{path}: truncated while reading ({got} of {expected} bytes)", path)
                got += n
    crc = zlib.crc32(mv)
    if crc != int(entry["crc32"]):
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (crc32 {crc:#010x}, manifest says {int(entry['crc32']):#010x})", path
        )


def read_manifest(path: str, expect_format: str = FORMAT_NAME) -> Dict[str, Any]:
    """Parse and validate ``PATH/manifest.json``; raises CorruptCheckpointError naming the file."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CorruptCheckpointError(f"{path}: not a directory (no saved table here)", path)
    try:
        with open(mpath, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{mpath}: missing; {path} holds no committed save (an interrupted first save leaves none)", mpath
        ) from None
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({e})", mpath) from None
    if not isinstance(m, dict):
        raise CorruptCheckpointError(f"{mpath}: expected a JSON object", mpath)
    fmt = m.get("format")
    if fmt != expect_format:
        raise CorruptCheckpointError(f"{mpath}: format is {fmt!r}, expected {expect_format!r}", mpath)
    ver = m.get("format_version")
    if ver != FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{mpath}: unknown format_version {ver!r}; this torch_psembed reads version {FORMAT_VERSION}", mpath
        )
    try:
        _validate_manifest(m, expect_format)
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CorruptCheckpointError):
            raise
        raise CorruptCheckpointError(f"{mpath}: malformed manifest ({type(e).__name__}: {e})", mpath) from None
    return m


def _validate_manifest(m: Dict[str, Any], fmt: str) -> None:
    files = m["files"]
    if not isinstance(files, list):
        raise ValueError("files must be a list")
    data_dir = m["data_dir"]
    if not isinstance(data_dir, str) or "/" in data_dir or data_dir in ("", ".", ".."):
        raise ValueError(f"bad data_dir {data_dir!r}")
    for e in files:
        name = e["name"]
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ValueError(f"bad file name {name!r}")
        for k in ("bytes", "crc32", "rows"):
            if not isinstance(e[k], int) or e[k] < 0:
                raise ValueError(f"file {name}: {k} must be an int >= 0")
    if fmt == FORMAT_NAME:
        if m["mode"] not in MODES:
            raise ValueError(f"unknown mode {m['mode']!r}")
        nb = m["num_buckets"]
        if not isinstance(nb, int) or nb < 1:
            raise ValueError("num_buckets must be an int >= 1")
        if not isinstance(m["num_parts"], int) or m["num_parts"] < 1:
            raise ValueError("num_parts must be an int >= 1")
        layout = m["layout"]
        for k in ("dim", "base_width", "mf_width"):
            if not isinstance(layout[k], int) or layout[k] < 1:
                raise ValueError(f"layout.{k} must be an int >= 1")
        for e in files:
            if e["column"] not in COLUMN_DTYPES:
                raise ValueError(f"file {e['name']}: unknown column {e['column']!r}")
            w = row_width(e["column"], layout) * COLUMN_DTYPES[e["column"]].itemsize
            if e["bytes"] != e["rows"] * w:
                raise ValueError(f"file {e['name']}: {e['bytes']} bytes do not hold {e['rows']} rows of {w} bytes")
        if not isinstance(m["day"], int):
            raise ValueError("day must be an int")
        if not isinstance(m["sequence"], int) or m["sequence"] < 0:
            raise ValueError("sequence must be an int >= 0")


def data_path(path: str, m: Dict[str, Any]) -> str:
    return os.path.join(os.fspath(path), m["data_dir"])


def group_files(m: Dict[str, Any]) -> Dict[tuple, Dict[str, Dict[str, Any]]]:
    """``{(bucket, part): {column: entry}}`` for row files and ``{(None, part): {"tombstones": entry}}``."""
    out: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for e in m["files"]:
        out.setdefault((e.get("bucket"), e["part"]), {})[e["column"]] = e
    return out


def total_bytes(m: Dict[str, Any]) -> int:
    return sum(int(e["bytes"]) for e in m["files"])


def config_signature(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    return {k: config_dict[k] for k in ("dim", "lr_optimizer", "mf_optimizer")}


def describe_difference(saved: Dict[str, Any], have: Dict[str, Any]) -> List[str]:
    diffs = []
    for k in sorted(set(saved) | set(have)):
        if saved.get(k) != have.get(k):
            diffs.append(f"{k}: saved {saved.get(k)!r}, table has {have.get(k)!r}")
    return diffs


def layout_for(dim: int, base_width: int, mf_width: int) -> Dict[str, Any]:
    lr_state = base_width - len(BASE_COLUMNS_HEAD)
    mf_state = mf_width - dim
    return {
        "dim": dim,
        "base_width": base_width,
        "mf_width": mf_width,
        "base_columns": BASE_COLUMNS_HEAD + [f"lr_state{i}" for i in range(lr_state)],
        "mf_columns": [f"mf_w{i}" for i in range(dim)] + [f"mf_state{i}" for i in range(mf_state)],
        "byte_order": "little",
    }
