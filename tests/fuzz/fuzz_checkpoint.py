"""Fuzz target: the checkpoint loader (``SparseTable.load``) on mutated saves.

An input is a whole save directory in a small container::

    flags: 1 byte     bit 0: recompute every file's crc32 in the manifest after mutation (reach past checksums)
                      bit 1: set every file's "bytes" to rows * row width first (consistent absurd sizes)
                      bit 2: also read the directory with read_serving (the serving-export reader)
    records:          name (utf-8, NUL-terminated), u32 little-endian length, that many bytes (a short last
                      record takes what is left)

The seeds (``seeds`` mode) are small valid checkpoint, base and delta saves of a 2-dim table, and serving
exports of it (for read_serving, which must also return or raise a documented exception). Each input is
written to a fresh directory and loaded into a table that already holds other rows.

Property: the load either succeeds and the table then holds exactly the rows the files describe (checked by an
independent numpy reader written from docs/format.md), or it raises ValueError (CorruptCheckpointError,
CheckpointMismatchError), TypeError or OSError and the table is unchanged (rows, values, day, chain).
Never a crash, hang, MemoryError or other exception type.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

pse = None
T = None  # torch_psembed.checkpoint._table_io
DIM = 2
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def setup() -> None:
    global pse, T
    import torch_psembed as _pse
    from torch_psembed.checkpoint import _table_io as _T

    pse, T = _pse, _T


def config():
    # decay 1 and no deletes: the pre-state is exactly what was pushed.
    acc = pse.CtrAccessorConfig(embedx_threshold=1.0, show_click_decay_rate=1.0, delete_threshold=0.0)
    return pse.TableConfig(dim=DIM, accessor=acc, num_shards=2, num_threads=1)


def prestate_table():
    t = pse.SparseTable(config())
    keys = np.array([1000, 1001, 1002, -5], np.int64)
    g = np.full((4, 1 + DIM), 0.25, np.float32)
    t.push(keys, g, np.full(4, 20.0, np.float32), np.ones(4, np.float32))
    return t


# -- container ---------------------------------------------------------------------------------------------

def pack(flags: int, files: dict) -> bytes:
    out = bytearray([flags])
    for name in sorted(files):
        data = files[name]
        out += name.encode() + b"\0" + struct.pack("<I", len(data)) + data
    return bytes(out)


def unpack(data: bytes):
    if not data:
        return 0, {}
    flags, pos, files = data[0], 1, {}
    while pos < len(data) and len(files) < 256:
        end = data.find(b"\0", pos)
        if end < 0:
            break
        name = data[pos:end].decode("utf-8", "replace")
        pos = end + 1
        n = struct.unpack("<I", data[pos:pos + 4].ljust(4, b"\0"))[0] if pos < len(data) else 0
        pos += 4
        files[name] = data[pos:pos + n]
        pos += n
    return flags, files


def safe_relpath(name: str):
    """At most two path components, none empty, '.', '..' or absurdly long (inputs never escape the scratch dir)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [p[:120] for p in parts][-2:]
    return os.path.join(*parts) if parts else None


def fix_manifest(files: dict, flags: int) -> None:
    raw = files.get("manifest.json")
    if raw is None or not flags & 3:
        return
    try:
        m = json.loads(raw)
        ddir = m["data_dir"]
        widths = None
        if flags & 2:
            layout = m["layout"]
            widths = {"keys": 8, "tombstones": 8, "has_mf": 1, "base": 4 * int(layout["base_width"]),
                      "mf": 4 * int(layout["mf_width"])}
        for e in m["files"]:
            if widths is not None:
                e["bytes"] = int(e["rows"]) * widths[e["column"]]
            if flags & 1:
                content = files.get(f"{ddir}/{e['name']}", b"")
                e["crc32"] = zlib.crc32(content)
        files["manifest.json"] = json.dumps(m).encode()
    except Exception:  # a manifest too broken to fix up is fuzzed as it is
        pass


def materialize(files: dict, root: str) -> None:
    for name, data in files.items():
        rel = safe_relpath(name)
        if rel is None:
            continue
        p = os.path.join(root, rel)
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if os.path.isdir(p):
                continue
            with open(p, "wb") as f:
                f.write(data)
        except OSError:
            pass


# -- independent reader (from docs/format.md) ------------------------------------------------------------------

def expected_rows(root: str, m: dict):
    """``{key: (base row, mf row or None)}`` of a save, read with plain numpy; later rows win (load_rows order)."""
    ddir = os.path.join(root, m["data_dir"])
    bw, mw = int(m["layout"]["base_width"]), int(m["layout"]["mf_width"])
    groups = {}
    for e in m["files"]:
        groups.setdefault((e.get("bucket"), e["part"]), {})[e["column"]] = e
    rows, tombs = {}, []
    for key in sorted((k for k in groups if k[0] is not None), key=lambda k: (k[0], k[1])):
        cols = groups[key]
        keys = np.fromfile(os.path.join(ddir, cols["keys"]["name"]), "<i8")
        base = np.fromfile(os.path.join(ddir, cols["base"]["name"]), "<f4").reshape(-1, bw)
        has = np.fromfile(os.path.join(ddir, cols["has_mf"]["name"]), "u1")
        mf = np.fromfile(os.path.join(ddir, cols["mf"]["name"]), "<f4").reshape(-1, mw)
        j = 0
        for i, k in enumerate(keys.tolist()):
            if has[i]:
                rows[k] = (base[i], mf[j])
                j += 1
            else:
                rows[k] = (base[i], None)
    for key in (k for k in groups if k[0] is None):
        tombs += np.fromfile(os.path.join(ddir, groups[key]["tombstones"]["name"]), "<i8").tolist()
    return rows, tombs


def table_rows(state: dict):
    out = {}
    j = 0
    for i, k in enumerate(state["keys"].tolist()):
        if state["has_mf"][i]:
            out[k] = (state["base"][i], state["mf"][j])
            j += 1
        else:
            out[k] = (state["base"][i], None)
    return out


def check_loaded(root: str, before: dict, after: dict) -> None:
    with open(os.path.join(root, "manifest.json"), "rb") as f:
        m = json.loads(f.read())
    want, tombs = expected_rows(root, m)
    if m["mode"] == "delta":
        cur = table_rows(before)
        for k in tombs:
            cur.pop(k, None)
        cur.update(want)
        want = cur
    got = table_rows(after)
    if set(got) != set(want):
        raise C.PropertyViolation(f"loaded keys {sorted(got)[:8]}... differ from the files' {sorted(want)[:8]}...")
    for k, (b, mfrow) in want.items():
        gb, gmf = got[k]
        if not np.array_equal(gb, b):
            raise C.PropertyViolation(f"key {k}: base {gb} loaded, files say {b}")
        if mfrow is None:
            C.check(gmf is None, "key %d: has an mf vector the files do not give it" % k)
        elif gmf is None or not np.array_equal(gmf, mfrow):
            raise C.PropertyViolation(f"key {k}: mf {gmf} loaded, files say {mfrow}")
    C.check(after["day"] == int(m["day"]), f"day {after['day']} after load, manifest says {m['day']}")


# -- the target --------------------------------------------------------------------------------------------

def one_input(data: bytes) -> None:
    flags, files = unpack(data)
    fix_manifest(files, flags)
    root = tempfile.mkdtemp(prefix="fuzzckpt-", dir=SCRATCH)
    try:
        save = os.path.join(root, "save")
        os.makedirs(save)
        materialize(files, save)
        table = prestate_table()
        backend = table._backend
        before = C.table_state(backend)
        chain_before = T.chain_of(table)
        try:
            table.load(save)
        except BaseException as e:
            if not C.allowed_error(e):
                raise
            after = C.table_state(backend)
            C.check(C.same_state(before, after),
                    f"a refused load ({type(e).__name__}: {e}) changed the table: {C.state_diff(before, after)}")
            C.check(T.chain_of(table) == chain_before, "a refused load changed the table's save chain")
        else:
            check_loaded(save, before, C.table_state(backend))
        if flags & 4:
            from torch_psembed.checkpoint import read_serving

            try:
                read_serving(save)
            except BaseException as e:
                if not C.allowed_error(e):
                    raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _dir_files(path: str) -> dict:
    out = {}
    for dp, _, fs in os.walk(path):
        for f in fs:
            full = os.path.join(dp, f)
            rel = os.path.relpath(full, path).replace(os.sep, "/")
            with open(full, "rb") as fh:
                out[rel] = fh.read()
    return out


def make_seeds():
    from torch_psembed.checkpoint import save_table

    seeds = []
    root = tempfile.mkdtemp(prefix="fuzzseed-")
    try:
        t = pse.SparseTable(config())
        keys = np.array([1, 2, 3, -7, 2**62, 12345678901], np.int64)
        g = np.linspace(-1, 1, 6 * (1 + DIM), dtype=np.float32).reshape(6, 1 + DIM)
        shows = np.array([1, 5, 0.5, 3, 9, 2], np.float32)
        t.push(keys, g, shows, np.array([0, 1, 0, 1, 2, 0], np.float32))
        t.end_day(3)
        for mode in ("checkpoint", "delta", "base"):
            p = os.path.join(root, mode)
            save_table(t, p, mode, num_buckets=2)
            fs = _dir_files(p)
            seeds += [pack(0, fs), pack(1, fs)]
            if mode == "checkpoint":
                seeds += [pack(3, fs), pack(5, fs)]
        # serving exports (read by read_serving when flag bit 2 is set)
        from torch_psembed.checkpoint import export

        for dtype, stats in (("float16", False), ("float32", True)):
            p = os.path.join(root, f"serving-{dtype}")
            export(t, p, dtype=dtype, with_stats=stats, rows="all")
            fs = _dir_files(p)
            seeds += [pack(4, fs), pack(5, fs)]
        # an empty table's checkpoint
        e = pse.SparseTable(config())
        p = os.path.join(root, "empty")
        save_table(e, p, "checkpoint", num_buckets=2)
        seeds.append(pack(1, _dir_files(p)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return seeds


if __name__ == "__main__":
    C.main("checkpoint", setup, one_input, make_seeds)
