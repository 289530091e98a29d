"""The bulk paths under save and load: ``_C.Table.export_buckets``, ``_C.Table.load_segments`` and the
memory-mapped reading of save files.

export_buckets is checked against ``export`` (one moment, sorted by key) regrouped here with an independent
numpy implementation of the frozen bucket rule; load_segments against ``load_rows`` of the same rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed.checkpoint import _format as F
from torch_psembed.checkpoint import _rows as R

from conftest import run_python
from test_checkpoint import ROW_KEYS, assert_rows_equal, config, populated, state

MODES = ("checkpoint", "base", "delta", "serving")


def mix64_np(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer in numpy uint64 arithmetic (wrapping), as docs/format.md writes it."""
    z = z.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bucket_np(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    salted = keys.view(np.uint64) ^ np.uint64(F.BUCKET_SALT)
    return (mix64_np(salted) % np.uint64(num_buckets)).astype(np.int64)


def regroup(e: dict, num_buckets: int) -> list:
    """``export``'s rows (sorted by key) split into buckets, each still sorted by key: the expected result."""
    b = bucket_np(e["keys"], num_buckets)
    mf_pos = R.mf_index(e["has_mf"])
    out = []
    for i in range(num_buckets):
        sel = np.flatnonzero(b == i)
        has = e["has_mf"][sel]
        out.append({"keys": e["keys"][sel], "base": e["base"][sel], "has_mf": has,
                    "mf": e["mf"][mf_pos[sel[has == 1]]]})
    return out


def bucket_slices(x: dict, i: int) -> dict:
    lo, hi = int(x["row_begin"][i]), int(x["row_begin"][i + 1])
    return {"keys": x["keys"][lo:hi], "base": x["base"][lo:hi], "has_mf": x["has_mf"][lo:hi],
            "mf": x["mf"][lo:lo + int(x["mf_rows"][i])]}


@pytest.mark.parametrize("num_buckets", [1, 7, 64])
@pytest.mark.parametrize("mode", MODES)
def test_export_buckets_is_export_grouped_by_bucket(mode, num_buckets):
    t = populated("adagrad", n=900, seed=11)._backend
    e = t.export(mode)
    x = t.export_buckets(mode, num_buckets, F.BUCKET_SALT)
    assert x["row_begin"].shape == (num_buckets + 1,) and x["mf_rows"].shape == (num_buckets,)
    assert x["row_begin"][0] == 0 and x["row_begin"][-1] == e["keys"].shape[0] > 0
    assert x["keys"].shape == (e["keys"].shape[0],) and x["mf"].shape == (e["keys"].shape[0], t.mf_width)
    assert int(x["mf_rows"].sum()) == e["mf"].shape[0]
    for i, want in enumerate(regroup(e, num_buckets)):
        got = bucket_slices(x, i)
        assert_rows_equal(got, want)
        k = got["keys"].view(np.uint64)
        assert np.all(k[1:] > k[:-1]), "ascending as uint64 inside a bucket"
    assert x["tombstones"].tolist() == e["tombstones"].tolist()
    assert x["pending_tombstones"] == e["pending_tombstones"]
    if mode in ("checkpoint", "delta"):
        assert x["tombstones"].size > 0, "the populated table has pending tombstones"


def test_export_buckets_of_an_empty_table_and_bad_arguments():
    t = pse.SparseTable(config())._backend
    x = t.export_buckets("checkpoint", 5, 123)
    assert x["keys"].shape == (0,) and x["base"].shape == (0, t.base_width) and x["mf"].shape == (0, t.mf_width)
    assert x["row_begin"].tolist() == [0] * 6 and x["mf_rows"].tolist() == [0] * 5
    with pytest.raises(ValueError, match="buckets"):
        t.export_buckets("checkpoint", 0, 1)
    with pytest.raises(ValueError, match="mode"):
        t.export_buckets("everything", 4, 1)


def test_export_buckets_arrays_outlive_the_table_and_each_other():
    t = populated("adam", n=300, seed=2)._backend
    x = t.export_buckets("checkpoint", 3, F.BUCKET_SALT)
    want = state(t)
    keys, mf = x["keys"], x["mf"]
    del x, t
    assert sorted(keys.tolist()) == sorted(want["keys"].tolist())
    assert mf.shape[0] == keys.shape[0]


def split(rows: dict, cuts) -> list:
    mf_at = np.concatenate([[0], np.cumsum(rows["has_mf"], dtype=np.int64)])
    return [(rows["keys"][a:b], rows["base"][a:b], rows["has_mf"][a:b], rows["mf"][mf_at[a]:mf_at[b]])
            for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("opt", ["adagrad", "ftrl", "sgd"])
def test_load_segments_equals_load_rows(opt):
    src = state(populated(opt, n=1200, seed=5)._backend)
    n = src["keys"].shape[0]
    a = pse.SparseTable(config(opt))._backend
    a.load_rows(src["keys"], src["base"], src["has_mf"], src["mf"])
    b = pse.SparseTable(config(opt))._backend
    b.load_segments(split(src, [0, 1, 1, n // 3, n - 2, n]))  # an empty segment and a 1-row one included
    assert_rows_equal(state(b), state(a))
    assert_rows_equal(state(b), src)


def test_load_segments_last_segment_wins_for_a_repeated_key():
    cfg = config()
    t = pse.SparseTable(cfg)._backend
    bw, mw = t.base_width, t.mf_width
    keys = np.array([5, 6], np.int64)
    first = np.zeros((2, bw), np.float32)
    second = np.ones((1, bw), np.float32)
    t.load_segments([(keys, first, np.array([1, 1], np.uint8), np.full((2, mw), 2, np.float32)),
                     (keys[:1], second, np.array([0], np.uint8), np.zeros((0, mw), np.float32))])
    e = state(t)
    assert e["keys"].tolist() == [5, 6]
    assert e["base"][0].tolist() == [1.0] * bw and e["has_mf"].tolist() == [0, 1]
    assert e["mf"].tolist() == [[2.0] * mw]


@pytest.mark.parametrize("damage, match", [
    (lambda b, h, m: b.__setitem__((7, 2), np.nan), r"segment 1: row 7: base column 2 is not finite"),
    (lambda b, h, m: b.__setitem__((3, 1), -1.0), r"segment 1: row 3: show and click must be >= 0"),
    (lambda b, h, m: b.__setitem__((4, 3), 0.5), r"segment 1: row 4: unseen_days"),
    (lambda b, h, m: b.__setitem__((4, 4), 2.0**31), r"segment 1: row 4: slot"),
    (lambda b, h, m: h.__setitem__(9, 3), r"segment 1: row 9: has_mf must be 0 or 1"),
    (lambda b, h, m: m.__setitem__((2, 0), np.inf), r"segment 1: mf row 2 column 0 is not finite"),
])
def test_load_segments_refuses_bad_values_and_changes_nothing(damage, match):
    src = state(populated(n=400, seed=8)._backend)
    t = pse.SparseTable(config())._backend
    t.load_rows(src["keys"][:50], src["base"][:50], src["has_mf"][:50], src["mf"][:int(src["has_mf"][:50].sum())])
    before = state(t)
    segs = split(src, [0, 100, src["keys"].shape[0]])
    k, b, h, m = (np.array(a) for a in segs[1])
    damage(b, h, m)
    with pytest.raises(ValueError, match=match):
        t.load_segments([segs[0], (k, b, h, m)])
    assert_rows_equal(state(t), before, ROW_KEYS + ("tombstones",))


def test_load_segments_refuses_bad_shapes():
    t = pse.SparseTable(config())._backend
    bw, mw = t.base_width, t.mf_width
    k = np.arange(3, dtype=np.int64)
    good = (k, np.zeros((3, bw), np.float32), np.array([1, 0, 1], np.uint8), np.zeros((2, mw), np.float32))
    with pytest.raises(ValueError, match="has_mf marks 2 rows, but mf holds 1"):
        t.load_segments([good[:3] + (np.zeros((1, mw), np.float32),)])
    with pytest.raises(TypeError, match="keys"):
        t.load_segments([(k.astype(np.int32),) + good[1:]])
    with pytest.raises(ValueError, match="base"):
        t.load_segments([(k, np.zeros((3, bw + 1), np.float32)) + good[2:]])
    with pytest.raises(TypeError, match="tuple"):
        t.load_segments([list(good)])
    with pytest.raises(TypeError, match="sequence"):
        t.load_segments(5)
    for check in (True, False):  # a segment with no rows has no has_mf ones: its mf rows are not its own
        with pytest.raises(ValueError, match="has_mf marks 0 rows, but mf holds 5"):
            t.load_segments([(k[:0], good[1][:0], good[2][:0], np.zeros((5, mw), np.float32))], check=check)
    assert len(t) == 0
    t.load_segments([])
    t.load_segments([good])
    assert len(t) == 3


def test_unchecked_load_clamps_what_a_row_cannot_hold():
    # check=False takes the caller's word (the loader checked the files); values a record cannot hold used
    # to go through undefined float-to-int conversions (NaN unseen_days -> 0, 70000 -> 4464, slot 3e9 ->
    # INT_MIN on this machine). Now they are clamped into the fields' ranges, NaN reading 0.
    t = pse.SparseTable(config())._backend
    b = np.zeros((4, t.base_width), np.float32)
    b[:, 3] = [np.nan, 70000.0, -3.0, 5.0]
    b[:, 4] = [3e9, np.nan, -3e9, 7.0]
    t.load_segments([(np.arange(1, 5, dtype=np.int64), b, np.zeros(4, np.uint8), np.zeros((0, t.mf_width),
                                                                                         np.float32))], check=False)
    np.testing.assert_array_equal(t.export("checkpoint")["base"][:, 3:5],
                                  [[0, 2147483520], [65535, 0], [0, -2147483648], [5, 7]])


def test_a_load_survives_another_thread_writing_its_keys():
    # The load reads keys and has_mf in more than one pass without the GIL; another thread writing the keys
    # meanwhile made the passes' shard counts disagree, and the load wrote past its buffers (SIGSEGV). It
    # copies them first now: the rows load with whichever keys it copied.
    out = run_python("""
        import threading, time
        import numpy as np
        from torch_psembed import _C
        t = _C.Table({"dim": 4, "num_shards": 64, "num_threads": 2})
        n = 1_000_000
        keys = np.arange(1, n + 1, dtype=np.int64)
        base = np.zeros((n, t.base_width), np.float32)
        has_mf, mf = np.zeros(n, np.uint8), np.zeros((0, t.mf_width), np.float32)
        stop = False
        def scramble():
            while not stop:
                np.multiply(keys, 3, out=keys)  # numpy's loop runs without the GIL
        writer = threading.Thread(target=scramble)
        writer.start()
        t0 = time.time()
        try:
            while time.time() - t0 < 4:
                t.load_segments([(keys, base, has_mf, mf)], check=False)
        finally:
            stop = True
            writer.join()
        print("loaded", len(t) > 0)
    """, timeout=120)
    assert "loaded True" in out


def test_read_segments_maps_the_files_and_splits_by_owner(tmp_path):
    from torch_psembed import _C

    table = populated(n=700, seed=4)
    table.save(tmp_path / "ck", num_buckets=5)
    m = F.read_manifest(tmp_path / "ck")
    segs, tomb = R.read_segments(str(tmp_path / "ck"), m)
    assert len(segs) == 5 and all(not s["keys"].flags.writeable for s in segs if s["keys"].size)
    whole = state(table._backend)
    assert tomb.tolist() == whole["tombstones"].tolist()
    for i, s in enumerate(segs):
        assert np.all(bucket_np(s["keys"], 5) == i)
    keys = np.concatenate([s["keys"] for s in segs])
    assert sorted(keys.tolist()) == sorted(whole["keys"].tolist())
    got = []
    for j in range(3):
        part, ptomb = R.read_segments(str(tmp_path / "ck"), m, owner=(j, 3))
        pk = np.concatenate([s["keys"] for s in part])
        assert np.all(_C.route(pk, 3) == j) and np.all(_C.route(ptomb, 3) == j)
        got += pk.tolist()
    assert sorted(got) == sorted(whole["keys"].tolist())


@pytest.mark.parametrize("num_buckets", [1, 6])
def test_save_buckets_writes_what_export_buckets_holds(tmp_path, num_buckets):
    import zlib

    t = populated("ftrl", n=800, seed=9)._backend
    x = t.export_buckets("checkpoint", num_buckets, F.BUCKET_SALT)
    paths = [str(tmp_path / f"b{b}.{c}") for b in range(num_buckets) for c in F.ROW_COLUMNS]
    r = t.save_buckets("checkpoint", num_buckets, F.BUCKET_SALT, paths)
    assert r["rows"] == x["keys"].shape[0] and r["mf_rows"] == int(x["mf_rows"].sum())
    assert r["tombstones"].tolist() == x["tombstones"].tolist()
    assert r["pending_tombstones"] == x["pending_tombstones"]
    written = {(b, c) for b, c, *_ in r["files"]}
    for b in range(num_buckets):
        want = bucket_slices(x, b)
        if not want["keys"].size:
            assert not any((b, c) in written for c in range(4))
            continue
        for c, col in enumerate(F.ROW_COLUMNS):
            data = open(paths[4 * b + c], "rb").read()
            assert data == np.ascontiguousarray(want[col]).tobytes(), (b, col)
            entry = next(f for f in r["files"] if f[:2] == (b, c))
            assert entry[2] == want[col].shape[0] and entry[3] == len(data)
            assert entry[4] == zlib.crc32(data), "zlib's crc32"


def test_save_buckets_reports_a_failed_write_naming_the_file(tmp_path):
    t = populated(n=200, seed=1)._backend
    paths = [str(tmp_path / "missing-dir" / f"{b}.{c}") for b in range(2) for c in F.ROW_COLUMNS]
    with pytest.raises(OSError, match="missing-dir"):
        t.save_buckets("checkpoint", 2, F.BUCKET_SALT, paths)
    with pytest.raises(ValueError, match="4 paths per bucket"):
        t.save_buckets("checkpoint", 2, F.BUCKET_SALT, paths[:7])
    # the failed saves released the gate that holds mutating calls: a push goes through. It runs on a thread
    # so that a gate left held fails this test after the join timeout instead of hanging the suite.
    import threading

    key = np.array([12345], np.int64)
    assert key[0] not in t
    result = []
    pusher = threading.Thread(
        target=lambda: result.append(
            t.push(key, np.ones((1, 1 + t.dim), np.float32), np.ones(1, np.float32), np.zeros(1, np.float32))),
        daemon=True)
    pusher.start()
    pusher.join(timeout=60)
    assert not pusher.is_alive(), "a push after the failed save_buckets is still blocked: the gate was not released"
    assert result == [0] and key[0] in t
    assert t.pull(key, True)[0, 0] == 1.0  # its show
