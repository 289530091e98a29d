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

import errno
import json
import mmap
import os
import stat
import zlib
from typing import Any, Dict, List, Tuple

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
DEFAULT_NUM_BUCKETS = 64  # the most buckets a save takes when it chooses the count itself
MAX_NUM_BUCKETS = 9999  # the most a save may be given (bucket numbers are 4 digits in the file names)
# A save that chooses its bucket count takes one bucket per this many rows of the table (1 to
# DEFAULT_NUM_BUCKETS): every bucket costs 4 files per part, and creating and fsyncing a file costs ~0.3 ms
# on the development VM whatever its size, so a 35k-row table saved in 64 buckets from 2 servers spent ~150
# ms on 512 nearly empty files (docs/benchmarks.md, "Checkpoint").
ROWS_PER_BUCKET = 65536
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

# zlib.crc32, computed by _C (carry-less multiplies where the CPU has them: ~4x zlib's speed here; the same
# value, tested against zlib in tests/test_checkpoint_load.py). zlib where _C predates it.
crc32 = getattr(_C, "crc32", zlib.crc32)


def check_num_buckets(num_buckets) -> None:
    """A ``num_buckets`` argument of a writer (save, merge): None (the automatic count) or an int in
    [1, MAX_NUM_BUCKETS], the range every reader accepts; a ValueError naming it otherwise."""
    if num_buckets is not None and (isinstance(num_buckets, bool) or not isinstance(num_buckets, (int, np.integer))
                                    or not 1 <= num_buckets <= MAX_NUM_BUCKETS):
        raise ValueError(f"num_buckets must be an int in [1, {MAX_NUM_BUCKETS}], got {num_buckets!r}")


def auto_num_buckets(rows: int) -> int:
    """The bucket count of a save of a table holding ``rows`` keys: ceil(rows / ROWS_PER_BUCKET), in
    [1, DEFAULT_NUM_BUCKETS]."""
    return max(1, min(DEFAULT_NUM_BUCKETS, -(-int(rows) // ROWS_PER_BUCKET)))


def bucket_of(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """The bucket (int32) of each int64 key; frozen (see docs/format.md)."""
    return _C.route(np.bitwise_xor(keys, _SALT_I64), int(num_buckets))


def all_in_bucket(keys: np.ndarray, num_buckets: int, bucket: int) -> bool:
    """Whether every key's bucket (:func:`bucket_of`) is ``bucket``; in one pass without temporaries where _C
    has ``first_outside_bucket``."""
    first = getattr(_C, "first_outside_bucket", None)
    if first is not None:
        return first(keys, int(num_buckets), int(bucket), BUCKET_SALT) < 0
    return bool(np.all(bucket_of(keys, num_buckets) == bucket))


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

def fsync_file(path: str) -> None:
    """fsync the file or directory at ``path`` (for a directory: makes its entries, e.g. renames, durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A directory syncs the same way; a separate name keeps call sites readable.
fsync_dir = fsync_file


def write_array(path: str, arr: np.ndarray, fsync: bool = True) -> Dict[str, int]:
    """Write ``arr``'s raw bytes to a new file ``path``; returns ``{"bytes", "crc32"}``.

    Raises OSError naming ``path`` unless every byte is in the file: the manifest records the whole array's
    size and crc32, and a short file under a committed manifest is a lost save. One write(2) moves at most
    2,147,479,552 bytes on Linux, and one that hits a full disk, a quota or RLIMIT_FSIZE may end short
    without an error, so the writes loop, and the file's size is checked before it counts as written.
    """
    arr = np.ascontiguousarray(arr)
    nbytes = int(arr.nbytes)
    mv = memoryview(arr).cast("B") if arr.size else b""
    crc = crc32(mv)
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < nbytes:
            try:
                n = f.write(mv[done:])
            except OSError as e:  # EFBIG, ENOSPC, EDQUOT: name the file (a FileIO write error names none)
                raise OSError(e.errno, f"{e.strerror} ({done} of {nbytes} bytes written)", path) from None
            if not n:  # 0 (or None: would block) never finishes: no room left
                raise OSError(errno.ENOSPC, f"short write: {done} of {nbytes} bytes written", path)
            done += n
        size = os.fstat(f.fileno()).st_size
        if size != nbytes:
            raise OSError(errno.EIO, f"{size} bytes in the file after writing {nbytes}", path)
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": nbytes, "crc32": int(crc)}


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` atomically (:func:`write_bytes_atomic`)."""
    write_bytes_atomic(path, json.dumps(obj, indent=1, sort_keys=False).encode())


def write_manifest(path: str, manifest: Dict[str, Any]) -> None:
    """Commit ``manifest`` as ``path``/manifest.json (:func:`write_bytes_atomic`). One the readers would refuse
    as too big (over MAX_MANIFEST_BYTES) is refused here first, ValueError and nothing written: a save whose
    manifest no reader could open would not be a save."""
    data = json.dumps(manifest, indent=1, sort_keys=False).encode()
    if len(data) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path}: its manifest would take {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} "
                         f"a reader accepts (too many files: save with fewer buckets or parts)")
    write_bytes_atomic(os.path.join(path, MANIFEST), data)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``path.tmp`` + fsync + rename + fsync of the directory."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


# -- reads ----------------------------------------------------------------------------------------------------

def check_size(path: str, entry: Dict[str, Any]) -> None:
    """The file ``path`` exists and has the byte count ``entry`` says (no allocation, no read)."""
    expected = int(entry["bytes"])
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: missing or unreadable ({e.strerror})", path) from None
    if size != expected:
        what = "truncated" if size < expected else "longer than expected"
        raise CorruptCheckpointError(f"{path}: {what}: {size} bytes on disk, manifest says {expected}", path)


def read_into(path: str, dest: np.ndarray, entry: Dict[str, Any]) -> None:
    """Fill ``dest`` (C-contiguous) from file ``path``, checking its size and crc32 against ``entry``."""
    expected = int(entry["bytes"])
    if dest.nbytes != expected:
        raise CorruptCheckpointError(
            f"{path}: manifest says {expected} bytes but {entry.get('rows')} rows need {dest.nbytes}", path
        )
    check_size(path, entry)
    mv = memoryview(dest.reshape(-1)).cast("B") if dest.size else memoryview(b"")
    if expected:
        with open(path, "rb", buffering=0) as f:
            got = 0
            while got < expected:
                n = f.readinto(mv[got:])
                if not n:
                    raise CorruptCheckpointError(f"{path}: truncated while reading ({got} of {expected} bytes)", path)
                got += n
    crc = crc32(mv)
    if crc != int(entry["crc32"]):
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (crc32 {crc:#010x}, manifest says {int(entry['crc32']):#010x})", path
        )


def map_array(path: str, entry: Dict[str, Any], column: str, layout: Dict[str, Any]) -> np.ndarray:
    """The rows of file ``path`` as a read-only array mapped from it (mmap, no copy), after checking its
    size and crc32 against ``entry``. The mapping lives as long as the array (or a view of it) does."""
    expected = int(entry["bytes"])
    width = row_width(column, layout)
    rows = int(entry["rows"])
    if rows * width * COLUMN_DTYPES[column].itemsize != expected:
        raise CorruptCheckpointError(f"{path}: manifest says {expected} bytes for {rows} rows of {column}", path)
    check_size(path, entry)
    shape = (rows, width) if column in ("base", "mf") else (rows,)
    if expected == 0:
        arr = np.zeros(shape, COLUMN_DTYPES[column])
    else:
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), expected, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CorruptCheckpointError(f"{path}: cannot be read ({e.strerror or e})", path) from None
        except ValueError as e:  # the file shrank since check_size: mmap refuses a length past its end
            raise CorruptCheckpointError(f"{path}: truncated while reading ({e})", path) from None
        arr = np.frombuffer(mm, dtype=COLUMN_DTYPES[column]).reshape(shape)
    crc = crc32(arr)
    if crc != int(entry["crc32"]):
        raise CorruptCheckpointError(
            f"{path}: checksum mismatch (crc32 {crc:#010x}, manifest says {int(entry['crc32']):#010x})", path
        )
    return arr


def parse_json(raw: bytes) -> Any:
    """``json.loads`` whose failures, absurd nesting included, are all ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(str(e)) from None


# The largest manifest.json a reader takes. A file entry is ~160 bytes of JSON, so this holds 1.6 million of
# them (9999 buckets x 4 columns x 40 parts); without a bound, a manifest.json that is a link to /dev/zero or
# a huge file would be read whole into memory (a MemoryError after seconds of paging).
MAX_MANIFEST_BYTES = 256 << 20


def read_manifest_bytes(mpath: str) -> bytes:
    """The bytes of the manifest file ``mpath``, which must be a regular file of at most MAX_MANIFEST_BYTES.

    Opened with O_NONBLOCK, so that a FIFO does not block the open, and checked with fstat before any read
    (a FIFO, a device or a directory is refused). FileNotFoundError is raised as it is (its callers tell
    "no save here" from a bad one); any other problem is a CorruptCheckpointError naming ``mpath``.
    """
    try:
        fd = os.open(mpath, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise CorruptCheckpointError(f"{mpath}: cannot be opened ({e.strerror or e})", mpath) from None
    chunks: List[bytes] = []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            mode = st.st_mode
            what = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file")
            raise CorruptCheckpointError(f"{mpath}: is {what}, not a regular file", mpath)
        if st.st_size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(
                f"{mpath}: {st.st_size} bytes, more than a manifest may have ({MAX_MANIFEST_BYTES})", mpath)
        left = MAX_MANIFEST_BYTES + 1  # the file may have grown since fstat
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise CorruptCheckpointError(f"{mpath}: cannot be read ({e.strerror or e})", mpath) from None
    finally:
        os.close(fd)
    if left <= 0:
        raise CorruptCheckpointError(f"{mpath}: more than a manifest may have ({MAX_MANIFEST_BYTES} bytes)", mpath)
    return b"".join(chunks)


def peek_manifest(mpath: str, key: str) -> Any:
    """The field ``key`` of the manifest file ``mpath``, or None when it is missing, unreadable (a FIFO, a
    device, too big) or not a JSON object: for writers deciding what a folder holds, not for loading it."""
    try:
        return parse_json(read_manifest_bytes(mpath)).get(key)
    except (OSError, ValueError, AttributeError):  # CorruptCheckpointError is a ValueError
        return None


def read_manifest(path: str, expect_format: str = FORMAT_NAME) -> Dict[str, Any]:
    """Parse and validate ``PATH/manifest.json`` against the schema of its format.

    Every reader goes through here, so a manifest that comes back has every field the readers use, of the
    right type and range (see :func:`validate_manifest`). Raises CorruptCheckpointError naming the file.
    """
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CorruptCheckpointError(f"{path}: not a directory (no saved table here)", path)
    try:
        raw = read_manifest_bytes(mpath)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{mpath}: missing; {path} holds no committed save (an interrupted first save leaves none)", mpath
        ) from None
    try:
        m = parse_json(raw)
    except ValueError as e:
        raise CorruptCheckpointError(f"{mpath}: not valid JSON ({e})", mpath) from None
    if not isinstance(m, dict):
        raise CorruptCheckpointError(f"{mpath}: expected a JSON object", mpath)
    fmt = m.get("format")
    if fmt != expect_format:
        raise CorruptCheckpointError(f"{mpath}: format is {fmt!r}, expected {expect_format!r}", mpath)
    ver = m.get("format_version")
    if ver != FORMAT_VERSION or isinstance(ver, bool):
        raise CorruptCheckpointError(
            f"{mpath}: unknown format_version {ver!r}; this torch_psembed reads version {FORMAT_VERSION}", mpath
        )
    try:
        validate_manifest(m, expect_format)
    except _SchemaError as e:
        raise CorruptCheckpointError(f"{mpath}: malformed manifest: {e}", mpath) from None
    return m


class _SchemaError(Exception):
    pass


INT64_MAX = 2**63 - 1
# The table's day: -1 (no end_day yet) up to int64 (what _C.Table.day accepts).
DAY_RANGE = (-1, INT64_MAX)
SERVING_COLUMNS = ("keys", "values", "stats")
SERVING_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _get(d: Dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _SchemaError(f"{where}no field {key!r}")
    return d[key]


def _int(d: Dict[str, Any], key: str, where: str = "", lo: int = 0, hi: int = INT64_MAX) -> int:
    v = _get(d, key, where)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _SchemaError(f"{where}{key} must be an int in [{lo}, {hi}], got {_short(v)}")
    return v


def _str(d: Dict[str, Any], key: str, where: str = "", name_like: bool = False) -> str:
    v = _get(d, key, where)
    bad_name = name_like and isinstance(v, str) and (not v or v.startswith(".") or any(c in v for c in "/\\\0"))
    if not isinstance(v, str) or bad_name:
        raise _SchemaError(f"{where}{key} must be a {'file name' if name_like else 'str'}, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def validate_manifest(m: Dict[str, Any], fmt: str) -> None:
    """Check every field a reader uses (presence, type, range, consistency); raises _SchemaError.

    Per manifest, not per row: cost is linear in the number of files.
    """
    _str(m, "save_id", name_like=True)
    _str(m, "data_dir", name_like=True)
    _int(m, "day", lo=DAY_RANGE[0], hi=DAY_RANGE[1])
    num_parts = _int(m, "num_parts", lo=1, hi=1 << 20)
    _int(m, "rows")
    files = _get(m, "files", "")
    if not isinstance(files, list):
        raise _SchemaError(f"files must be a list, got {type(files).__name__}")
    if fmt == FORMAT_NAME:
        _validate_table_fields(m)
        widths = {c: row_width(c, m["layout"]) * COLUMN_DTYPES[c].itemsize for c in COLUMN_DTYPES}
        columns = tuple(COLUMN_DTYPES)
        num_buckets = m["num_buckets"]
    else:
        dim = _int(m, "dim", lo=1, hi=1 << 20)
        dtype = _get(m, "dtype", "")
        if not isinstance(dtype, str) or dtype not in SERVING_DTYPE_BYTES:  # a list or dict is unhashable
            raise _SchemaError(f"unknown dtype {_short(dtype)}; expected one of {sorted(SERVING_DTYPE_BYTES)}")
        if not isinstance(_get(m, "with_stats", ""), bool):
            raise _SchemaError(f"with_stats must be true or false, got {_short(m['with_stats'])}")
        widths = {"keys": 8, "values": (1 + dim) * SERVING_DTYPE_BYTES[dtype], "stats": 8}
        columns = SERVING_COLUMNS
        num_buckets = 0
    names = set()
    slots = set()
    sums = {c: 0 for c in columns}
    for i, e in enumerate(files):
        where = f"files[{i}]: "
        if not isinstance(e, dict):
            raise _SchemaError(f"{where}expected an object, got {_short(e)}")
        name = _str(e, "name", where, name_like=True)
        where = f"file {name}: "
        col = _get(e, "column", where)
        if col not in columns:
            raise _SchemaError(f"{where}unknown column {_short(col)}; expected one of {list(columns)}")
        part = _int(e, "part", where, 0, num_parts - 1)
        rows = _int(e, "rows", where)
        nbytes = _int(e, "bytes", where)
        _int(e, "crc32", where, 0, 0xFFFFFFFF)
        if nbytes != rows * widths[col]:
            raise _SchemaError(f"{where}{nbytes} bytes do not hold {rows} rows of {widths[col]} bytes")
        bucket = None
        if fmt == FORMAT_NAME:
            if col == "tombstones":
                if e.get("bucket") is not None:
                    raise _SchemaError(f"{where}a tombstone file has no bucket, got {_short(e['bucket'])}")
            else:
                bucket = _int(e, "bucket", where, 0, num_buckets - 1)
        if name in names:
            raise _SchemaError(f"{where}listed twice")
        if (bucket, part, col) in slots:
            raise _SchemaError(f"{where}a second {col} file for bucket {bucket} part {part}")
        names.add(name)
        slots.add((bucket, part, col))
        sums[col] += rows
    if sums["keys"] != m["rows"]:
        raise _SchemaError(f"rows is {m['rows']}, but the keys files hold {sums['keys']}")
    if fmt == FORMAT_NAME:
        if sums["tombstones"] != m["tombstones"]:
            raise _SchemaError(f"tombstones is {m['tombstones']}, but the tombstone files hold {sums['tombstones']}")
        if sums["mf"] != m["rows_with_mf"]:
            raise _SchemaError(f"rows_with_mf is {m['rows_with_mf']}, but the mf files hold {sums['mf']}")


# -- optimizer state columns ----------------------------------------------------------------------------------

# The sparse rules a signature may name (config._RULE_NAMES, csrc/table/sparse_rule.cc); do not rename.
RULE_NAMES = ("sgd", "adagrad", "std_adagrad", "adam", "ftrl")
_RULE_TITLES = {"sgd": "SGD", "adagrad": "AdaGrad", "std_adagrad": "StdAdaGrad", "adam": "Adam", "ftrl": "FTRL"}


def state_dim(rule: str, width: int) -> int:
    """Floats of optimizer state after the ``width`` weights of a block (``SparseRule::StateDim``)."""
    return {"sgd": 0, "adagrad": 1, "std_adagrad": width, "adam": 2 * width + 2, "ftrl": 2 * width}[rule]


def state_ranges(rule: str, width: int) -> List[Tuple[int, int, float, float, str]]:
    """The state columns of a block that hold a bounded range by construction, as ``(first, end, low, high,
    name)`` with columns counted from the block's first state column; a value outside ``[low, high]`` can only
    come from corruption. Sums of squares are never negative (AdaGrad's and StdAdaGrad's g2sum, Adam's second
    moment v, FTRL's n); Adam's beta powers start at beta (in [0, 1)) and are multiplied by it on every push,
    so they lie in [0, 1] (0 for beta = 0 or after underflow). Adam's m and FTRL's z take either sign."""
    t = _RULE_TITLES[rule]
    if rule in ("adagrad", "std_adagrad"):
        return [(0, state_dim(rule, width), 0.0, np.inf, f"{t} g2sum")]
    if rule == "adam":
        return [(width, 2 * width, 0.0, np.inf, "Adam second moment v"),
                (2 * width, 2 * width + 1, 0.0, 1.0, "Adam beta1 power"),
                (2 * width + 1, 2 * width + 2, 0.0, 1.0, "Adam beta2 power")]
    if rule == "ftrl":
        return [(width, 2 * width, 0.0, np.inf, "FTRL n")]
    return []


def column_ranges(m: Dict[str, Any]) -> Dict[str, Tuple[int, List[Tuple[int, int, float, float, str]]]]:
    """``{"base": (state_start, ranges), "mf": (state_start, ranges)}``: where the lr and mf blocks' state starts
    in the columns of the ``.base`` and ``.mf`` files, and their :func:`state_ranges` in those columns. ``m`` is
    a validated manifest (its layout agrees with its signature)."""
    sig = m["signature"]
    dim = int(sig["dim"])
    out = {}
    for column, block, start, width in (("base", "lr_optimizer", len(BASE_COLUMNS_HEAD), 1),
                                        ("mf", "mf_optimizer", dim, dim)):
        ranges = state_ranges(sig[block]["name"], width)
        out[column] = (start, [(start + a, start + b, lo, hi, name) for a, b, lo, hi, name in ranges])
    return out


def _validate_layout(m: Dict[str, Any]) -> None:
    """The layout is the one the signature implies: its dim, and the widths of the optimizers' state."""
    sig, layout = m["signature"], m["layout"]
    dim = _int(sig, "dim", "signature.", 1, 1 << 20)
    names = []
    for block in ("lr_optimizer", "mf_optimizer"):
        opt = _get(sig, block, "signature.")
        name = opt.get("name") if isinstance(opt, dict) else None
        if name not in RULE_NAMES:
            raise _SchemaError(f"signature.{block} must be an object whose name is one of {list(RULE_NAMES)}, "
                               f"got {_short(opt)}")
        names.append(name)
    if layout["dim"] != dim:
        raise _SchemaError(f"layout.dim is {layout['dim']}, but the signature's dim is {dim}")
    # base: show, click, delta_score, unseen_days, slot, lr_w (BASE_COLUMNS_HEAD), then the lr state
    want = {"base_width": len(BASE_COLUMNS_HEAD) + state_dim(names[0], 1), "mf_width": dim + state_dim(names[1], dim)}
    for k, block, name in (("base_width", "lr", names[0]), ("mf_width", "mf", names[1])):
        if layout[k] != want[k]:
            raise _SchemaError(f"layout.{k} is {layout[k]}, but the signature's {block} block ({_RULE_TITLES[name]}, "
                               f"dim {dim}) takes {want[k]} columns")


def _validate_table_fields(m: Dict[str, Any]) -> None:
    if _get(m, "mode", "") not in MODES:
        raise _SchemaError(f"unknown mode {_short(m['mode'])}; expected one of {list(MODES)}")
    base_id = _get(m, "base_id", "")
    if base_id is not None and not isinstance(base_id, str):
        raise _SchemaError(f"base_id must be a str or null, got {_short(base_id)}")
    chain_id = m.get("chain_id")  # absent in saves older than it: null
    if chain_id is not None and not isinstance(chain_id, str):
        raise _SchemaError(f"chain_id must be a str or null, got {_short(chain_id)}")
    _int(m, "sequence")
    _int(m, "num_buckets", lo=1, hi=MAX_NUM_BUCKETS)
    _int(m, "rows_with_mf")
    _int(m, "tombstones")
    for k in ("config", "signature", "layout"):
        if not isinstance(_get(m, k, ""), dict):
            raise _SchemaError(f"{k} must be an object, got {_short(m[k])}")
    layout = m["layout"]
    _int(layout, "dim", "layout.", 1, 1 << 20)
    _int(layout, "base_width", "layout.", len(BASE_COLUMNS_HEAD), 1 << 20)
    _int(layout, "mf_width", "layout.", 1, 1 << 20)
    _validate_layout(m)
    # The config a merge copies into its output: it must say what the signature says (tools merge read it
    # with a KeyError, after making its output folder).
    cfg = m["config"]
    if any(k not in cfg for k in ("dim", "lr_optimizer", "mf_optimizer")) or config_signature(cfg) != m["signature"]:
        raise _SchemaError("config does not hold the signature's dim, lr_optimizer and mf_optimizer")


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
