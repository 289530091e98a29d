"""The bulk load path: ``_C.Table.load_segments`` (find-or-insert per shard, then the new rows written in input
order, then the overwrites), ``check_segments``, and ``SparseTable.load`` checking the values once, while it
verifies the files, before the table changes.

The expected table contents are computed here in numpy (insert-or-overwrite, the last row of a key wins).
"""

from __future__ import annotations

import json
import os
import zlib

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.checkpoint import _format as F
from torch_psembed.errors import CorruptCheckpointError

from test_checkpoint import DIM, OPTIMIZERS, ROW_KEYS, assert_rows_equal, config, populated, state
from test_table_api import push, uniform_py


def random_rows(rng, keys, bw, mw, mf_fraction=0.6):
    n = keys.shape[0]
    base = rng.integers(0, 1000, (n, bw)).astype(np.float32)
    has = (rng.random(n) < mf_fraction).astype(np.uint8)
    mf = rng.standard_normal((int(has.sum()), mw), dtype=np.float32)
    return {"keys": keys, "base": base, "has_mf": has, "mf": mf}


def expected_after(rows_in_order):
    """Insert-or-overwrite of row sets in order: the last row of a key wins. Sorted by key as uint64."""
    keys = np.concatenate([r["keys"] for r in rows_in_order])
    base = np.concatenate([r["base"] for r in rows_in_order])
    has = np.concatenate([r["has_mf"] for r in rows_in_order])
    mf_all = np.concatenate([r["mf"] for r in rows_in_order])
    mf_pos = np.cumsum(has, dtype=np.int64) - 1
    # The last occurrence of each key: unique over the reversed keys.
    rev = keys[::-1]
    _, first_in_rev = np.unique(rev.view(np.uint64), return_index=True)
    last = keys.shape[0] - 1 - first_in_rev  # ascending by key as uint64 (np.unique sorts)
    h = has[last]
    return {"keys": keys[last], "base": base[last], "has_mf": h, "mf": mf_all[mf_pos[last[h == 1]]]}


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_load_segments_overwrites_and_repeats_match_numpy(check, num_threads):
    """New keys, keys already in the table, keys repeated within a segment and across segments, rows gaining
    and losing mf, a segment longer than one load piece (2^16 rows): the result is the numpy reference."""
    rng = np.random.default_rng(3)
    t = pse.SparseTable(config(num_threads=num_threads))._backend
    bw, mw = t.base_width, t.mf_width
    pool = rng.integers(-(2**63), 2**63 - 1, 50_000, dtype=np.int64)
    pool[7] = 0
    first = random_rows(rng, pool[::3].copy(), bw, mw)
    t.load_rows(first["keys"], first["base"], first["has_mf"], first["mf"])
    assert_rows_equal(state(t), expected_after([first]))
    segs = [random_rows(rng, pool[rng.integers(0, pool.size, n)], bw, mw) for n in (70_000, 1, 0, 25_000)]
    t.load_segments([(s["keys"], s["base"], s["has_mf"], s["mf"]) for s in segs], check=check)
    want = expected_after([first] + segs)
    assert len(t) == want["keys"].shape[0]
    assert_rows_equal(state(t), want)
    assert t.stats()["keys_with_mf"] == int(want["has_mf"].sum())


def test_check_segments_checks_like_load_segments_and_changes_nothing():
    src = state(populated(n=300, seed=2)._backend)
    t = pse.SparseTable(config())._backend
    segs = [(src["keys"], src["base"], src["has_mf"], src["mf"])]
    t.check_segments(segs)
    assert len(t) == 0
    base = np.array(src["base"])
    base[5, 3] = 2.5
    with pytest.raises(ValueError, match=r"segment 0: row 5: unseen_days"):
        t.check_segments([(src["keys"], base, src["has_mf"], src["mf"])])
    base[5, 3] = 1.0
    base[6, 4] = 2.0**31
    with pytest.raises(ValueError, match=r"segment 0: row 6: slot"):
        t.check_segments([(src["keys"], base, src["has_mf"], src["mf"])])
    base[6, 4] = -(2.0**31)  # below int32's minimum -2^31 + 1 as load_rows counts it: refused as before
    with pytest.raises(ValueError, match=r"segment 0: row 6: slot"):
        t.check_segments([(src["keys"], base, src["has_mf"], src["mf"])])
    assert len(t) == 0


def test_load_leaves_admission_draws_to_the_push(make_c_table):
    """Admission keeps no per-key state, so a load changes no draw: loaded, erased and pushed again by the
    table's second push, every key draws u(seed, key, 3, 1), whether an earlier push drew for it or not."""
    acc = pse.CtrAccessorConfig(create_probability_from_score=True, embedx_threshold=100.0)
    t = make_c_table(dim=2, accessor=acc, seed=11)
    cand = np.arange(1, 30_000, dtype=np.int64)
    u0 = _C.uniform(11, cand, 3, 0)
    u1 = _C.uniform(11, cand, 3, 1)
    drawn = cand[(u0 >= 0.1) & (u1 < 0.1)][:40]      # refused by draw 0, admitted by draw 1
    fresh = cand[(u0 < 0.1) & (u1 >= 0.1)][:40]      # admitted by draw 0, refused by draw 1
    push(t, drawn, 2, show=1.0)                      # score 0.1: draw 0 refuses all of them
    assert not any(int(k) in t for k in drawn)
    keys = np.concatenate([drawn, fresh])
    rows = random_rows(np.random.default_rng(0), keys, t.base_width, t.mf_width)
    rows["base"][:, 3] = 0
    t.load_segments([(rows["keys"], rows["base"], rows["has_mf"], rows["mf"])])
    assert all(int(k) in t for k in keys)
    assert t.erase(keys) == keys.size
    push(t, keys, 2, show=1.0)                       # push 1: admitted iff u(seed, key, 3, 1) < 0.1
    assert {int(k) for k in keys if k in t} == set(drawn.tolist())
    for k in drawn[:3]:
        assert uniform_py(11, int(k), 3, 1) < 0.1


def _rewrite(path, name, arr):
    """Replace data file ``name`` of the save at ``path`` by ``arr``'s bytes and fix its crc32 in the manifest,
    so that only the value checks can catch the change."""
    m = F.read_manifest(path)
    p = os.path.join(F.data_path(path, m), name)
    data = np.ascontiguousarray(arr).tobytes()
    with open(p, "wb") as f:
        f.write(data)
    for e in m["files"]:
        if e["name"] == name:
            e["crc32"] = zlib.crc32(data)
    with open(os.path.join(path, F.MANIFEST), "w") as f:
        json.dump(m, f)
    return p


@pytest.mark.parametrize("column, where, value, match", [
    ("base", (3, 0), np.nan, "base column 0 is not finite"),
    ("base", (4, 1), -2.0, "show and click must be >= 0"),
    ("base", (5, 3), 0.5, "unseen_days"),
    ("base", (6, 4), 1.5, "slot"),
    ("mf", (2, 1), np.inf, "mf row 2 column 1 is not finite"),
])
@pytest.mark.parametrize("num_parts", [1, 2])
def test_load_of_bad_values_names_the_file_and_changes_nothing(tmp_path, column, where, value, match, num_parts):
    src = populated(n=500, seed=4)
    path = str(tmp_path / "ck")
    src.save(path)
    m = F.read_manifest(path)
    e = max((e for e in m["files"] if e["column"] == column), key=lambda e: e["rows"])
    a = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<f4").reshape(e["rows"], -1)
    a[where] = value
    bad = _rewrite(path, e["name"], a)
    keys = np.fromfile(bad[: -len(column)] + "keys", "<i8")
    has = np.fromfile(bad[: -len(column)] + "has_mf", "u1")
    row = where[0] if column == "base" else int(np.flatnonzero(has)[where[0]])
    parts = [pse.SparseTable(config())._backend for _ in range(num_parts)]
    other = state(populated(n=200, seed=9)._backend)
    for p in parts:
        p.load_rows(other["keys"], other["base"], other["has_mf"], other["mf"])
    before = [state(p) for p in parts]
    from torch_psembed.checkpoint import LocalParts, load_group

    with pytest.raises(CorruptCheckpointError, match=match) as info:
        load_group(LocalParts(parts), config().to_dict(), {"base_id": None, "sequence": 0}, path)
    assert info.value.path == bad
    if num_parts == 1:  # the row number is among the rows this part keeps; with one part, the file's
        assert f"key {int(keys[row])}" in str(info.value)
    for p, b in zip(parts, before):
        assert_rows_equal(state(p), b, ROW_KEYS + ("tombstones",))


def test_crc32_is_zlibs():
    """_C.crc32 (the checksum of every save file) equals zlib.crc32 for any length, start and seed."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 5000, dtype=np.uint8)
    for n in list(range(0, 130)) + [1000, 4096, 4999]:
        for start in (0, 1, 7):
            chunk = data[start:start + n]
            assert _C.crc32(chunk) == zlib.crc32(chunk.tobytes())
            assert _C.crc32(chunk, 12345) == zlib.crc32(chunk.tobytes(), 12345)
    f = rng.standard_normal((300, 9), dtype=np.float32)
    assert _C.crc32(f) == zlib.crc32(f.tobytes())
    assert _C.crc32(b"") == 0 and _C.crc32(memoryview(b"123456789")) == 0xCBF43926
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.crc32(f[:, :3])
    assert F.crc32 is _C.crc32


@pytest.mark.parametrize("num_buckets", [1, 7, 64])
def test_all_in_bucket_is_the_bucket_rule(num_buckets):
    keys = np.random.default_rng(num_buckets).integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)
    b = F.bucket_of(keys, num_buckets)
    for bucket in range(min(num_buckets, 3)):
        mine = keys[b == bucket]
        assert F.all_in_bucket(mine, num_buckets, bucket)
        assert _C.first_outside_bucket(mine, num_buckets, bucket, F.BUCKET_SALT) == -1
        if num_buckets > 1:
            mixed = np.concatenate([mine[:10], keys[b != bucket][:1], mine[10:]])
            assert not F.all_in_bucket(mixed, num_buckets, bucket)
            assert _C.first_outside_bucket(mixed, num_buckets, bucket, F.BUCKET_SALT) == min(10, mine.size)
    assert F.all_in_bucket(keys[:0], num_buckets, 0)
    with pytest.raises(ValueError, match="bucket"):
        _C.first_outside_bucket(keys, num_buckets, num_buckets, F.BUCKET_SALT)


def test_load_refuses_a_key_in_the_wrong_bucket_file(tmp_path):
    src = populated(n=500, seed=6)
    path = str(tmp_path / "ck")
    src.save(path, num_buckets=8)  # a small table's save takes 1 bucket, and then no key can be misplaced
    m = F.read_manifest(path)
    e = max((e for e in m["files"] if e["column"] == "keys"), key=lambda e: e["rows"])
    keys = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<i8")
    b = int(e["bucket"])
    other = next(k for k in range(1, 10**6) if int(F.bucket_of(np.array([k], np.int64), m["num_buckets"])[0]) != b)
    keys[len(keys) // 2] = other
    bad = _rewrite(path, e["name"], keys)
    t = pse.SparseTable(config())
    before = state(t._backend)
    with pytest.raises(CorruptCheckpointError, match=f"keys of another bucket than {b}") as info:
        t.load(path)
    assert info.value.path == bad
    assert_rows_equal(state(t._backend), before, ROW_KEYS + ("tombstones",))


# -- keys order, optimizer state and the other read paths (export, merge, verify) -----------------------------

def _keys_file(path, part=None):
    """The largest keys file of the save at ``path`` (of writer part ``part`` when given): (entry, keys)."""
    m = F.read_manifest(path)
    e = max((e for e in m["files"] if e["column"] == "keys" and part in (None, e["part"])), key=lambda e: e["rows"])
    return e, np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<i8")


def _refused_load(path, match):
    """Load ``path`` into a table holding other rows: CorruptCheckpointError matching ``match``, table unchanged."""
    t = pse.SparseTable(config())
    other = state(populated(n=200, seed=9)._backend)
    t._backend.load_rows(other["keys"], other["base"], other["has_mf"], other["mf"])
    before = state(t._backend)
    with pytest.raises(CorruptCheckpointError, match=match) as info:
        t.load(path)
    assert_rows_equal(state(t._backend), before, ROW_KEYS + ("tombstones",))
    assert len(t) == before["keys"].size
    return info.value


@pytest.mark.parametrize("problem", ["duplicate", "swapped", "signed_order"])
def test_load_refuses_keys_not_strictly_ascending_as_uint64(tmp_path, problem):
    """The keys of a file are strictly ascending as uint64 (docs/format.md). A duplicate (the second row was
    silently dropped: rows=N but len(table) = N - 1), two rows swapped, or keys in int64 order are corrupt."""
    path = str(tmp_path / "ck")
    populated(n=500, seed=4).save(path, num_buckets=1)  # one bucket: any key may go anywhere in its file
    e, keys = _keys_file(path)
    u = keys.view(np.uint64)
    assert np.all(u[1:] > u[:-1]) and (keys < 0).any() and (keys > 0).any()  # what the writer produces
    if problem == "duplicate":
        keys[10] = keys[9]
        row, what = 10, "duplicates row 9"
    elif problem == "swapped":
        keys[[20, 21]] = keys[[21, 20]]
        row, what = 21, "not strictly ascending"
    else:
        keys = np.sort(keys)  # int64 order: the negative keys (uint64 >= 2^63) first
        row = int(np.flatnonzero(keys >= 0)[0])
        what = "not strictly ascending"
    bad = _rewrite(path, e["name"], keys)
    err = _refused_load(path, f"row {row}: .*{what}")
    assert err.path == bad and e["name"] in str(err)


def test_load_refuses_a_key_in_two_parts(tmp_path):
    """Two writer parts own disjoint keys: a key in the files of both parts is corrupt, not a dropped row."""
    cfg = config()
    snap = state(populated(n=900, seed=3)._backend)
    two = [_C.Table(cfg.to_dict()) for _ in range(2)]
    owner = _C.route(snap["keys"], 2)
    from torch_psembed.checkpoint import LocalParts, save_group
    from torch_psembed.checkpoint import _rows as R

    for i, part in enumerate(two):
        rows = R.take_rows(snap, owner == i)
        part.load_rows(rows["keys"], rows["base"], rows["has_mf"], rows["mf"])
    path = str(tmp_path / "two")
    save_group(LocalParts(two), cfg.to_dict(), {"base_id": None, "sequence": 0}, path, "checkpoint", num_buckets=1)
    _, k0 = _keys_file(path, part=0)
    e1, k1 = _keys_file(path, part=1)
    u0, u1 = k0.view(np.uint64), k1.view(np.uint64)
    j = int(np.flatnonzero(u0 < u1[1])[0])  # a key of part 0 that can be part 1's first, in order
    k1[0] = k0[j]
    _rewrite(path, e1["name"], k1)
    err = _refused_load(path, f"key {int(k0[j])} .*part")
    assert e1["name"] in str(err) or e1["name"].replace("part-001", "part-000") in str(err)


def test_state_columns_match_the_tables():
    """_format's count of each optimizer's state columns is _C's."""
    for opt in OPTIMIZERS:
        for dim in (1, 3):
            t = _C.Table(config(opt, dim=dim).to_dict())
            assert F.state_dim(opt, 1) == t.lr_state_dim and F.state_dim(opt, dim) == t.mf_state_dim, opt


# (optimizer, column of the row set, column index (None: the first state column + offset), value)
# The lr block's state starts at base column 6; the mf block's at mf column DIM.
IMPOSSIBLE_STATE = [
    ("adagrad", "base", 6, -100.0, "g2sum"),
    ("adagrad", "mf", DIM, -3.5, "g2sum"),
    ("std_adagrad", "base", 6, -1.0, "g2sum"),
    ("std_adagrad", "mf", DIM + 2, -1e-3, "g2sum"),
    ("adam", "base", 7, -1.0, "second moment"),          # lr: m, v, beta1^t, beta2^t
    ("adam", "mf", DIM + DIM + 1, -2.0, "second moment"),
    ("adam", "mf", DIM + 2 * DIM, 1.5, "beta1 power"),
    ("adam", "mf", DIM + 2 * DIM + 1, -0.5, "beta2 power"),
    ("adam", "base", 9, 2.0, "beta2 power"),
    ("ftrl", "base", 7, -1.0, "n"),                      # lr: z, n
    ("ftrl", "mf", DIM + DIM + 3, -0.25, "n"),
]


@pytest.mark.parametrize("opt, column, col, value, name", IMPOSSIBLE_STATE)
def test_load_refuses_impossible_optimizer_state(tmp_path, opt, column, col, value, name):
    """Sums of squares are never negative and Adam's beta powers lie in [0, 1]: a finite value outside that
    range (checksum recomputed) is corrupt. The next push would otherwise drive the weights to the bound."""
    path = str(tmp_path / "ck")
    src = populated(opt, n=400, seed=5)
    src.save(path, num_buckets=1)
    m = F.read_manifest(path)
    e = next(e for e in m["files"] if e["column"] == column)
    a = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<f4").reshape(e["rows"], -1)
    a[3, col] = value
    bad = _rewrite(path, e["name"], a)
    t = pse.SparseTable(config(opt))
    before = state(t._backend)
    with pytest.raises(CorruptCheckpointError, match=f"row 3: {column} column {col} .*{name}") as info:
        t.load(path)
    assert info.value.path == bad
    assert_rows_equal(state(t._backend), before, ROW_KEYS + ("tombstones",))


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_load_accepts_signed_state_and_weights_outside_the_bounds(tmp_path, opt):
    """Adam's first moment and FTRL's z take either sign, and weights are not checked against weight_bounds (a
    table may load a model into changed bounds): such a save loads as it is."""
    path = str(tmp_path / "ck")
    populated(opt, n=400, seed=5).save(path, num_buckets=1)
    m = F.read_manifest(path)
    e = next(e for e in m["files"] if e["column"] == "mf")
    a = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<f4").reshape(e["rows"], -1)
    a[0, 0] = 1e30                 # a weight far outside the bounds
    if opt in ("adam", "ftrl"):
        a[1, DIM] = -5.0           # Adam's m / FTRL's z
    a[2, DIM:] = 0.0               # every state at its lower end (Adam's powers at 0: beta = 0 or underflow)
    _rewrite(path, e["name"], a)
    t = pse.SparseTable(config(opt))
    t.load(path)
    assert len(t) == m["rows"]


def _corrupt(path, problem):
    """Damage the save at ``path`` (one bucket) so that only a value check finds it; returns the file's name."""
    m = F.read_manifest(path)
    if problem == "duplicate key":
        e, keys = _keys_file(path)
        keys[5] = keys[4]
        _rewrite(path, e["name"], keys)
        return e["name"]
    column = "mf" if problem in ("nan mf", "negative g2sum") else "base"
    e = next(e for e in m["files"] if e["column"] == column)
    a = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<f4").reshape(e["rows"], -1)
    if problem == "nan mf":
        a[2, 1] = np.nan
    elif problem == "negative g2sum":
        a[2, DIM] = -1.0
    else:  # negative show
        a[2, 0] = -1.0
    _rewrite(path, e["name"], a)
    return e["name"]


PROBLEMS = {"duplicate key": "ascending", "nan mf": "not finite|NaN", "negative g2sum": "g2sum",
            "negative show": ">= 0|negative"}


@pytest.mark.parametrize("reader", ["load", "export", "export_chain", "merge", "verify"])
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_every_reader_of_a_save_checks_its_values(tmp_path, reader, problem):
    """pse.export and tools merge/verify read a save with the checks of table.load: a NaN, a duplicate key or
    an impossible optimizer state is refused naming the file, never exported or merged."""
    from torch_psembed import tools

    src = populated(n=400, seed=7)
    path = str(tmp_path / "base")
    src.save(path, mode="base", num_buckets=1)
    if reader == "export_chain":  # the damage in a delta applied on the base
        snap = state(src._backend)
        k = snap["keys"][snap["has_mf"] == 1][:8]
        src.push(k, np.ones((k.size, 1 + DIM), np.float32), np.full(k.size, 3.0, np.float32),
                 np.ones(k.size, np.float32))
        src.save(tmp_path / "delta", mode="delta")
        assert F.read_manifest(tmp_path / "delta")["rows_with_mf"] >= 3
        victim, paths = str(tmp_path / "delta"), [path, str(tmp_path / "delta")]
    else:
        victim, paths = path, [path]
    name = _corrupt(victim, problem)
    out = str(tmp_path / "out")
    with pytest.raises(CorruptCheckpointError, match=PROBLEMS[problem]) as info:
        if reader == "load":
            pse.SparseTable(config()).load(path)
        elif reader in ("export", "export_chain"):
            pse.export(paths if reader == "export_chain" else path, out, dtype="float32", rows="all")
        elif reader == "merge":
            tools.merge(paths, out)
        else:
            tools.verify(path)
    assert name in str(info.value) and os.path.basename(info.value.path) == name
    assert not os.path.exists(os.path.join(out, F.MANIFEST))


@pytest.mark.parametrize("dim", [2, 5, 7])
@pytest.mark.parametrize("reader", ["load", "export", "merge", "verify"])
def test_a_layout_that_disagrees_with_the_signature_is_corrupt(tmp_path, dim, reader):
    """layout.dim edited (the signature still says DIM): export wrote rows of the wrong width or failed with a
    numpy broadcast error. Every reader refuses the manifest, naming it."""
    from torch_psembed import tools

    path = str(tmp_path / "ck")
    populated(n=300, seed=1).save(path)
    mpath = os.path.join(path, F.MANIFEST)
    m = json.load(open(mpath))
    m["layout"]["dim"] = dim
    json.dump(m, open(mpath, "w"))
    out = str(tmp_path / "out")
    with pytest.raises(CorruptCheckpointError, match=f"layout.*dim.*{dim}.*signature|signature.*layout") as info:
        if reader == "load":
            pse.SparseTable(config()).load(path)
        elif reader == "export":
            pse.export(path, out, dtype="float32")
        elif reader == "merge":
            tools.merge([path], out)
        else:
            tools.verify(path)
    assert info.value.path == mpath
    assert not os.path.exists(os.path.join(out, F.MANIFEST))
