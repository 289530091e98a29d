"""Saving and loading tables: exact round trips, N -> M parts, base/delta predicates, chains, bad input.

The expected contents of base and delta saves are computed here, in numpy, from the table's exported state
(``_backend.export("checkpoint")``) and the predicates of the issue, never by asking the checkpoint code.
Shows and clicks are small integers, the score coefficients dyadic (0.25, 1.0) and the decay 0.5, so
scores are exact in float32 and the predicates cannot flip by rounding.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.checkpoint import LocalParts, load_group, save_group
from torch_psembed.checkpoint import _format as F
from torch_psembed.checkpoint import _rows as R
from torch_psembed.distributed.ports import free_port_pair
from torch_psembed.errors import CheckpointMismatchError, CorruptCheckpointError

from conftest import REPO, child_env

DIM = 4
ACC = pse.CtrAccessorConfig(
    nonclk_coeff=0.25,
    click_coeff=1.0,
    embedx_threshold=3.0,
    base_threshold=1.5,
    delta_threshold=0.5,
    delta_keep_days=1,
    show_click_decay_rate=0.5,
    delete_threshold=0.8,
    delete_after_unseen_days=2,
)
OPTIMIZERS = {
    "adagrad": (pse.AdaGrad(learning_rate=0.1), pse.AdaGrad(learning_rate=0.1, initial_range=0.01)),
    "std_adagrad": (pse.StdAdaGrad(learning_rate=0.1), pse.StdAdaGrad(learning_rate=0.1, initial_range=0.01)),
    "adam": (pse.Adam(learning_rate=0.01), pse.Adam(learning_rate=0.01, initial_range=0.01)),
    "ftrl": (pse.FTRL(learning_rate=0.1, l1=0.01), pse.FTRL(learning_rate=0.1, initial_range=0.01)),
    "sgd": (pse.SGD(learning_rate=0.1), pse.SGD(learning_rate=0.1, initial_range=0.01)),
}
ROW_KEYS = ("keys", "base", "has_mf", "mf")


def config(opt: str = "adagrad", dim: int = DIM, **kw) -> pse.TableConfig:
    lr, mf = OPTIMIZERS[opt]
    return pse.TableConfig(dim=dim, accessor=ACC, lr_optimizer=lr, mf_optimizer=mf, num_shards=8, **kw)


def score(base: np.ndarray) -> np.ndarray:
    show, click = base[:, 0].astype(np.float64), base[:, 1].astype(np.float64)
    return (show - click) * ACC.nonclk_coeff + click * ACC.click_coeff


def push_random(table, rng, keys: np.ndarray, frac: float = 0.6) -> np.ndarray:
    """Push a random subset of ``keys`` with integer shows/clicks, random gradients and slots."""
    k = keys[rng.random(keys.shape[0]) < frac]
    shows = rng.integers(1, 4, k.shape[0]).astype(np.float32)
    clicks = np.minimum(shows, rng.integers(0, 3, k.shape[0])).astype(np.float32)
    grads = (rng.standard_normal((k.shape[0], 1 + table.dim)) * 0.3).astype(np.float32)
    slots = rng.integers(0, 50, k.shape[0]).astype(np.int32)
    table.push(k, grads, shows, clicks, slots)
    return k


def populated(opt: str = "adagrad", n: int = 600, days: int = 3, seed: int = 0):
    """A table after a few simulated days: rows with and without mf, aged rows, pending tombstones."""
    rng = np.random.default_rng(seed)
    t = pse.SparseTable(config(opt))
    t._backend.track_tombstones = True  # as on a chain with a committed base: its deletions are tombstones
    pool = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    for day in range(days):
        for _ in range(3):
            push_random(t, rng, pool[: n * (day + 1) // days])
        t.end_day(day)
    push_random(t, rng, pool, 0.3)
    return t


def state(local) -> dict:
    return local.export("checkpoint")


def assert_rows_equal(a: dict, b: dict, keys=ROW_KEYS) -> None:
    """Bit for bit (float arrays compared through their uint32 bits)."""
    for k in keys:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.shape == y.shape, (k, x.shape, y.shape)
        if x.dtype == np.float32:
            x, y = x.view(np.uint32), y.view(np.uint32)
        assert np.array_equal(x, y), f"{k} differs"


def saved_rows(path) -> dict:
    m = F.read_manifest(path)
    rows = R.sort_by_key(R.read_rows(path, m))
    rows["tombstones"] = R.read_rows(path, m)["tombstones"]
    return rows


# -- checkpoint round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_checkpoint_round_trip_is_bit_exact(tmp_path, opt):
    t = populated(opt)
    before = state(t._backend)
    assert before["keys"].size > 100 and 0 < before["has_mf"].sum() < before["keys"].size
    assert before["tombstones"].size > 0, "the scenario must leave pending tombstones"
    assert np.unique(before["base"][:, 3]).size > 1, "the scenario must leave rows of several unseen_days"
    summary = t.save(tmp_path / "ck")
    assert summary["rows"] == before["keys"].size and summary["tombstones"] == before["tombstones"].size

    t2 = pse.SparseTable(config(opt))
    t2.push(np.array([12345], np.int64), np.ones((1, 1 + DIM), np.float32), np.ones(1, np.float32),
            np.zeros(1, np.float32))  # a row the checkpoint does not hold: load replaces everything
    t2.load(tmp_path / "ck")
    assert_rows_equal(state(t2._backend), before)
    assert t2.day == t.day == 2
    keys = torch.from_numpy(before["keys"])
    assert torch.equal(t2.pull(keys, with_stats=True), t.pull(keys, with_stats=True))

    # The pending tombstones come back too: a checkpoint of the restored table holds the same ones, and
    # the next delta carries them.
    t2.save(tmp_path / "ck2")
    assert_rows_equal(saved_rows(tmp_path / "ck2"), saved_rows(tmp_path / "ck"), ROW_KEYS + ("tombstones",))
    assert np.array_equal(saved_rows(tmp_path / "ck")["tombstones"], before["tombstones"])
    t.save(tmp_path / "d_orig", "delta")
    t2.save(tmp_path / "d_rest", "delta")
    assert_rows_equal(saved_rows(tmp_path / "d_rest"), saved_rows(tmp_path / "d_orig"), ROW_KEYS + ("tombstones",))
    after_t, after_t2 = state(t._backend), state(t2._backend)
    assert after_t["tombstones"].size == 0 and after_t2["tombstones"].size == 0
    assert t2.save(tmp_path / "d2", "delta")["tombstones"] == 0

    # Training goes on identically from the restored state.
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(2):
        push_random(t, rng1, before["keys"])
        push_random(t2, rng2, before["keys"])
    t.end_day(3)
    t2.end_day(3)
    s1, s2 = state(t._backend), state(t2._backend)
    assert_rows_equal(s2, s1)
    # (the order of deletions within one end_day follows the hash layout, which a load does not keep)
    assert sorted(s2["tombstones"].tolist()) == sorted(s1["tombstones"].tolist())


def test_mf_survives_score_decay_below_embedx_threshold(tmp_path):
    t = pse.SparseTable(config())
    k = np.array([5, 6], np.int64)
    t.push(k, np.ones((2, 1 + DIM), np.float32), np.array([4, 4], np.float32), np.array([4, 0], np.float32))
    t.end_day(0)  # score of key 5: 4 -> 2 (< embedx 3, >= delete 0.8); key 6: 1 -> 0.5: deleted
    s = state(t._backend)
    assert s["keys"].tolist() == [5] and s["has_mf"].tolist() == [1] and score(s["base"])[0] < ACC.embedx_threshold
    t.save(tmp_path / "ck")
    t2 = pse.SparseTable(config())
    t2.load(tmp_path / "ck")
    assert_rows_equal(state(t2._backend), s)
    # no base or delta committed yet: key 6's deletion needs (and got) no tombstone
    assert saved_rows(tmp_path / "ck")["tombstones"].tolist() == []


# -- N -> M parts ------------------------------------------------------------------------------------------

def _parts(n: int, cfg) -> list:
    return [_C.Table(cfg.to_dict()) for _ in range(n)]


def test_save_from_2_parts_loads_into_1_and_3(tmp_path):
    cfg = config()
    whole = populated("adagrad", n=900, seed=3)
    snap = state(whole._backend)
    # Split the table between 2 parts by the server routing, as 2 ranks would hold it.
    two = _parts(2, cfg)
    owner = _C.route(snap["keys"], 2)
    towner = _C.route(snap["tombstones"], 2)
    for i, part in enumerate(two):
        rows = R.take_rows(snap, owner == i)
        part.load_rows(rows["keys"], rows["base"], rows["has_mf"], rows["mf"])
        part.day = whole.day
    chain = {"base_id": None, "sequence": 0}
    s = save_group(LocalParts(two), cfg.to_dict(), chain, tmp_path / "two", "checkpoint", num_buckets=16)
    assert s["parts"] == 2 and s["rows"] == snap["keys"].size
    m = F.read_manifest(tmp_path / "two")
    assert m["num_parts"] == 2 and m["num_buckets"] == 16
    assert {e["part"] for e in m["files"]} == {0, 1}

    for m_parts in (1, 3):
        dest = _parts(m_parts, cfg)
        load_group(LocalParts(dest), cfg.to_dict(), chain, tmp_path / "two")
        got = [state(p) for p in dest]
        for j, g in enumerate(got):
            assert np.all(_C.route(g["keys"], m_parts) == j), "a part holds a key it does not own"
            assert g["keys"].size > 0
            assert int(dest[j].day) == whole.day
        union = R.sort_by_key(R.concat_rows(got))
        assert_rows_equal(union, snap)
    # The pending tombstones of a checkpoint follow their keys to the new owners.
    whole.save(tmp_path / "whole")
    dest = _parts(3, cfg)
    load_group(LocalParts(dest), cfg.to_dict(), chain, tmp_path / "whole")
    save_group(LocalParts(dest), cfg.to_dict(), chain, tmp_path / "three", "checkpoint")
    got = saved_rows(tmp_path / "three")
    assert sorted(got["tombstones"].tolist()) == sorted(snap["tombstones"].tolist())
    assert towner.size == snap["tombstones"].size > 0
    for j in range(3):
        part_tombs = R.read_rows(tmp_path / "three", F.read_manifest(tmp_path / "three"), owner=(j, 3))["tombstones"]
        assert np.all(_C.route(part_tombs, 3) == j)


def test_buckets_are_frozen_and_independent_of_server_routing():
    keys = np.array([0, 1, -1, 2**62, 123456789, -(2**63)], np.int64)
    # Golden values: changing the bucket rule orphans saved models (docs/format.md).
    assert F.bucket_of(keys, 64).tolist() == [34, 59, 39, 52, 19, 38]

    def mix64(z):  # the splitmix64 finalizer, in Python integers
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    salt = 0x5EEDC0DEB0C4E75A
    assert [mix64((int(k) & ((1 << 64) - 1)) ^ salt) % 64 for k in keys] == F.bucket_of(keys, 64).tolist()
    many = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, 20000, dtype=np.int64)
    b, s = F.bucket_of(many, 8), _C.route(many, 2)
    counts = np.zeros((8, 2))
    np.add.at(counts, (b, s), 1)
    assert counts.min() > 0.8 * counts.mean(), "buckets must mix keys of every server"


# -- base and delta saves ----------------------------------------------------------------------------------

def _expected(snap: dict, mode: str) -> np.ndarray:
    """Rows a base/delta save must hold, from the issue's predicates."""
    b = snap["base"]
    mask = (score(b) >= ACC.base_threshold) & (b[:, 3] <= ACC.delta_keep_days)
    if mode == "delta":
        mask &= b[:, 2] >= ACC.delta_threshold
    return mask


def test_base_and_delta_follow_the_predicates_and_rebuild_the_serving_view(tmp_path):
    rng = np.random.default_rng(11)
    producer = pse.SparseTable(config())
    consumer = pse.SparseTable(config())
    pool = rng.integers(-(2**63), 2**63 - 1, 800, dtype=np.int64)
    view = R.empty_rows(producer._backend.base_width, producer._backend.mf_width)  # reference serving view
    pending: list = []  # keys deleted since the last base/delta
    plan = [("push", 0), ("base", 0), ("push", 1), ("delta", 1), ("end", 1), ("push", 2), ("delta", 2),
            ("delta", 2), ("end", 2), ("end", 3), ("push", 4), ("base", 4), ("push", 4), ("end", 4),
            ("delta", 4), ("push", 5), ("end", 6), ("delta", 6)]
    checked = {"base": 0, "delta": 0, "tombstones": 0, "excluded": 0}
    for step, (op, day) in enumerate(plan):
        if op == "push":
            for _ in range(2):
                push_random(producer, rng, pool[: 300 + 100 * day], 0.5)
            continue
        if op == "end":
            before = set(state(producer._backend)["keys"].tolist())
            producer.end_day(day)
            after = set(state(producer._backend)["keys"].tolist())
            pending += sorted(before - after)
            continue
        snap = state(producer._backend)
        path = tmp_path / f"{step:02d}-{op}"
        producer.save(path, op)
        mask = _expected(snap, op)
        got = saved_rows(path)
        assert_rows_equal(got, R.take_rows(snap, mask))
        checked[op] += int(mask.sum())
        checked["excluded"] += int((~mask).sum())
        if op == "delta":
            assert sorted(got["tombstones"].tolist()) == sorted(pending)
            checked["tombstones"] += len(pending)
        else:
            assert got["tombstones"].size == 0
        pending = []
        # Side effect, applied after the write: delta_score of the saved rows is reset, nothing else changes.
        after = state(producer._backend)
        assert np.array_equal(after["keys"], snap["keys"])
        want = snap["base"].copy()
        want[mask, 2] = 0.0
        assert np.array_equal(after["base"], want)
        assert after["tombstones"].size == 0
        # Reference serving view, then the consumer loading the same files in order.
        if op == "base":
            view = R.take_rows(snap, mask)
            view["tombstones"] = np.zeros(0, np.int64)
        else:
            delta = R.take_rows(snap, mask)
            delta["tombstones"] = got["tombstones"]
            keep = ~np.isin(view["keys"], delta["tombstones"]) & ~np.isin(view["keys"], delta["keys"])
            view = R.sort_by_key(R.concat_rows([R.take_rows(view, keep), {**delta, "tombstones": view["tombstones"][:0]}]))
        consumer.load(path)
        assert_rows_equal(state(consumer._backend), view)
        assert consumer.day == producer.day
    assert checked["base"] > 50 and checked["delta"] > 50 and checked["tombstones"] > 20 and checked["excluded"] > 50


def test_delta_chain_is_checked_and_a_failed_load_changes_nothing(tmp_path):
    rng = np.random.default_rng(5)
    p = pse.SparseTable(config())
    pool = rng.integers(0, 2**40, 300, dtype=np.int64)
    push_random(p, rng, pool, 0.9)
    push_random(p, rng, pool, 0.9)
    p.save(tmp_path / "base1", "base")
    for i in (1, 2):
        push_random(p, rng, pool)
        p.save(tmp_path / f"d{i}", "delta")
    p.save(tmp_path / "base2", "base")
    push_random(p, rng, pool)
    p.save(tmp_path / "b2d1", "delta")
    for name, seq in (("base1", 0), ("d1", 1), ("d2", 2), ("base2", 0), ("b2d1", 1)):
        assert F.read_manifest(tmp_path / name)["sequence"] == seq

    c = pse.SparseTable(config())
    with pytest.raises(CheckpointMismatchError, match="follows base"):
        c.load(tmp_path / "d1")  # no base loaded
    c.load(tmp_path / "base1")
    before = state(c._backend)
    with pytest.raises(CheckpointMismatchError, match="out of order"):
        c.load(tmp_path / "d2")  # skips d1
    with pytest.raises(CheckpointMismatchError, match="follows base"):
        c.load(tmp_path / "b2d1")  # another base's delta
    assert_rows_equal(state(c._backend), before, ROW_KEYS + ("tombstones",))
    c.load(tmp_path / "d1")
    c.load(tmp_path / "d2")
    with pytest.raises(CheckpointMismatchError, match="out of order"):
        c.load(tmp_path / "d2")  # twice
    c.load(tmp_path / "base2")
    c.load(tmp_path / "b2d1")

    # A checkpoint keeps the chain position: its restore can go on with the next delta.
    checkpoint_keeps_the_chain(p, c, tmp_path, "b2d2", rng, pool)


def checkpoint_keeps_the_chain(producer, consumer, tmp_path, delta: str, rng, pool) -> None:
    """``producer`` saves a checkpoint, then delta ``delta``: a table restored from the checkpoint takes that
    delta, and so does ``consumer`` (which holds the chain up to the checkpoint)."""
    producer.save(tmp_path / "ck")
    push_random(producer, rng, pool)
    producer.save(tmp_path / delta, "delta")
    restored = pse.SparseTable(config())
    restored.load(tmp_path / "ck")
    restored.load(tmp_path / delta)
    consumer.load(tmp_path / delta)


def test_deltas_saved_before_any_base_load_only_onto_their_own_table(tmp_path):
    # Audit (session 26): deltas saved before a table's first base all had base_id null, so a table that had
    # loaded delta 1 of one table took delta 2 of another (and export([a1, b2]) merged them). The first such
    # delta names the chain (chain_id: its save id), and the later ones carry it, as base_id does for a base.
    rng = np.random.default_rng(7)
    pool = rng.integers(0, 2**40, 300, dtype=np.int64)
    producers = {"a": pse.SparseTable(config()), "b": pse.SparseTable(config())}
    for name, p in producers.items():
        for i in (1, 2):
            push_random(p, rng, pool, 0.9)
            p.save(tmp_path / f"{name}{i}", "delta")
    m = {n: F.read_manifest(tmp_path / n) for n in ("a1", "a2", "b1", "b2")}
    assert [m[n]["base_id"] for n in m] == [None] * 4
    assert m["a1"]["chain_id"] == m["a2"]["chain_id"] == m["a1"]["save_id"] != m["b2"]["chain_id"]

    c = pse.SparseTable(config())
    c.load(tmp_path / "a1")
    before = state(c._backend)
    with pytest.raises(CheckpointMismatchError, match="no base yet follows the deltas started by save"):
        c.load(tmp_path / "b2")
    assert_rows_equal(state(c._backend), before)
    with pytest.raises(CheckpointMismatchError, match="no base yet"):
        pse.export([str(tmp_path / "a1"), str(tmp_path / "b2")], tmp_path / "srv")
    c.load(tmp_path / "a2")
    with pytest.raises(CheckpointMismatchError, match="no base yet starts its deltas"):
        c.load(tmp_path / "b1")  # another table's first delta: only onto a table without such deltas
    pse.export([str(tmp_path / "b1"), str(tmp_path / "b2")], tmp_path / "srv")

    # A checkpoint keeps the chain: its restore takes the next delta; a base starts a chain of its own.
    a = producers["a"]
    checkpoint_keeps_the_chain(a, c, tmp_path, "a3", rng, pool)
    a.save(tmp_path / "base", "base")
    push_random(a, rng, pool)
    a.save(tmp_path / "bd1", "delta")
    assert F.read_manifest(tmp_path / "bd1")["chain_id"] is None
    c.load(tmp_path / "base")
    c.load(tmp_path / "bd1")

    # Saves older than chain_id (none in their manifest) load in order as before.
    for n in ("b1", "b2"):
        mpath = os.path.join(tmp_path, n, F.MANIFEST)
        old = json.load(open(mpath))
        del old["chain_id"]
        json.dump(old, open(mpath, "w"))
    o = pse.SparseTable(config())
    o.load(tmp_path / "b1")
    o.load(tmp_path / "b2")


def test_resaving_to_the_same_path_replaces_it_and_cleans_up(tmp_path):
    t = populated(n=200)
    t.save(tmp_path / "ck")
    first = F.read_manifest(tmp_path / "ck")["save_id"]
    push_random(t, np.random.default_rng(1), state(t._backend)["keys"])
    t.save(tmp_path / "ck")
    m = F.read_manifest(tmp_path / "ck")
    assert m["save_id"] != first
    assert sorted(os.listdir(tmp_path / "ck")) == sorted([F.MANIFEST, m["data_dir"]])
    t2 = pse.SparseTable(config())
    t2.load(tmp_path / "ck")
    assert_rows_equal(state(t2._backend), state(t._backend))


def test_a_save_refuses_to_replace_a_serving_export(tmp_path):
    # Audit (session 26): SparseTable.save into an export directory replaced the export and deleted its data;
    # pse.export and tools merge already refused the mirror case. The save checks its output as they do.
    from torch_psembed.checkpoint._output_dir import OutputError

    t = populated(n=200)
    srv = str(tmp_path / "srv")
    pse.export(t, srv)
    before = (open(os.path.join(srv, F.MANIFEST)).read(), sorted(os.listdir(srv)))
    for mode in F.MODES:
        with pytest.raises(OutputError, match="holds a serving export, not a table save"):
            t.save(srv, mode)
    assert (open(os.path.join(srv, F.MANIFEST)).read(), sorted(os.listdir(srv))) == before
    pse.InferenceEmbedding.load(srv)


# -- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    t = populated(n=300)
    pse.checkpoint.save_table(t, tmp_path / "ck", num_buckets=4)
    return tmp_path / "ck", t


def _victim(path, column="base"):
    m = F.read_manifest(path)
    e = next(e for e in m["files"] if e["column"] == column and e["rows"] > 0)
    return os.path.join(path, m["data_dir"], e["name"])


def _loaded_target():
    t = populated(n=100, seed=9)
    return t, state(t._backend)


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete"])
@pytest.mark.parametrize("column", ["keys", "base", "mf"])
def test_damaged_file_is_named_and_the_table_is_unchanged(saved, damage, column):
    path, _ = saved
    victim = _victim(path, column)
    data = bytearray(open(victim, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        open(victim, "wb").write(bytes(data))
        match = "checksum mismatch"
    elif damage == "truncate":
        open(victim, "wb").write(bytes(data[: len(data) - 3]))
        match = "truncated"
    elif damage == "extend":
        open(victim, "wb").write(bytes(data) + b"\0")
        match = "longer than expected"
    else:
        os.remove(victim)
        match = "missing"
    t, before = _loaded_target()
    with pytest.raises(CorruptCheckpointError, match=match) as ei:
        t.load(path)
    assert ei.value.path == victim and os.path.basename(victim) in str(ei.value)
    assert_rows_equal(state(t._backend), before, ROW_KEYS + ("tombstones",))


def test_damaged_file_fails_a_load_into_several_parts_and_no_part_changes(saved):
    from torch_psembed.checkpoint import _table_io

    path, _ = saved
    cfg = config()
    dest = _parts(3, cfg)
    load_group(LocalParts(dest), cfg.to_dict(), {"base_id": None, "sequence": 0}, path)
    before = [state(p) for p in dest]
    m = F.read_manifest(path)
    last = max(e["bucket"] for e in m["files"] if e["bucket"] is not None)
    e = next(e for e in m["files"] if e["bucket"] == last and e["column"] == "keys")
    victim = os.path.join(path, m["data_dir"], e["name"])
    with open(victim, "r+b") as f:
        f.truncate(e["bytes"] - 8)  # the last bucket: found after the other buckets were verified
    with pytest.raises(CorruptCheckpointError, match="truncated") as ei:
        load_group(LocalParts(dest), cfg.to_dict(), {"base_id": None, "sequence": 0}, path)
    assert ei.value.path == victim
    for p, b in zip(dest, before):
        assert_rows_equal(state(p), b)
    assert not _table_io._STASH, "staged rows must be dropped on every part"


@pytest.mark.parametrize("problem", ["version", "json", "missing", "format", "bytes"])
def test_bad_manifest_is_refused(saved, problem):
    path, _ = saved
    mpath = os.path.join(path, F.MANIFEST)
    m = json.load(open(mpath))
    match = {"version": "unknown format_version 99", "json": "not valid JSON", "missing": "manifest.json: missing",
             "format": "format is", "bytes": "malformed manifest"}[problem]
    if problem == "version":
        m["format_version"] = 99
    elif problem == "format":
        m["format"] = "something.else"
    elif problem == "bytes":
        m["files"][0]["bytes"] += 4
    if problem == "json":
        open(mpath, "w").write(json.dumps(m)[:-20])
    elif problem == "missing":
        os.remove(mpath)
    else:
        json.dump(m, open(mpath, "w"))
    t, before = _loaded_target()
    with pytest.raises(CorruptCheckpointError, match=match) as ei:
        t.load(path)
    assert ei.value.path == mpath
    assert_rows_equal(state(t._backend), before)


def test_a_save_whose_manifest_readers_would_refuse_is_refused_and_the_previous_save_stays(tmp_path, monkeypatch):
    # Review (session 27): a manifest over MAX_MANIFEST_BYTES was written, then the writer's own commit check
    # could not read it, took the save as failed and deleted every data-<id> folder, the new one included.
    t = populated(n=300)
    path = tmp_path / "ck"
    t.save(path, num_buckets=1)
    first = open(path / F.MANIFEST, "rb").read()
    monkeypatch.setattr(F, "MAX_MANIFEST_BYTES", len(first) + 64)  # the next save's 8 buckets take more
    with pytest.raises(ValueError, match="manifest would take .* bytes, more than"):
        t.save(path, num_buckets=8)
    assert open(path / F.MANIFEST, "rb").read() == first
    u = pse.SparseTable(t.config)
    u.load(path)
    assert len(u) == len(t)
    assert sorted(os.listdir(path)) == sorted([F.MANIFEST, F.read_manifest(path)["data_dir"]])


@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "too_big"])
def test_a_manifest_that_is_not_a_small_regular_file_is_corrupt(saved, kind, monkeypatch, capsys):
    # Audit (session 26): manifest.json was read with a bare open().read(): a FIFO hung every reader, a link to
    # /dev/zero read until MemoryError, a directory raised IsADirectoryError. Readers open it without blocking,
    # take only a regular file, and at most MAX_MANIFEST_BYTES (made small here to test the bound).
    from torch_psembed.tools.__main__ import main

    path, _ = saved
    mpath = os.path.join(path, F.MANIFEST)
    raw = open(mpath, "rb").read()
    os.remove(mpath)
    match = {"directory": "is a directory, not a regular file", "fifo": "is a FIFO, not a regular file",
             "device": "is a device, not a regular file", "too_big": "more than a manifest may have"}[kind]
    if kind == "directory":
        os.mkdir(mpath)
    elif kind == "fifo":
        os.mkfifo(mpath)
    elif kind == "device":
        os.symlink(os.devnull, mpath)  # /dev/zero was endless; /dev/null keeps a regression from eating memory
    else:
        monkeypatch.setattr(F, "MAX_MANIFEST_BYTES", len(raw) + 100)
        open(mpath, "wb").write(raw + b" " * 200)  # valid JSON, longer than the bound
    stop = threading.Event()

    def unblock():  # a reader blocked opening the FIFO gets EOF instead of hanging the test
        stop.wait(5)
        while not stop.wait(0.2):
            try:
                os.close(os.open(mpath, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

    if kind == "fifo":
        threading.Thread(target=unblock, daemon=True).start()
    try:
        t, before = _loaded_target()
        readers = (t.load, lambda p: pse.export(p, os.path.join(os.path.dirname(path), "srv")),
                   pse.InferenceEmbedding.load)
        for read in readers:
            with pytest.raises(CorruptCheckpointError, match=match) as ei:
                read(path)
            assert ei.value.path == mpath
        assert_rows_equal(state(t._backend), before)
        for command in ("verify", "inspect"):
            assert main([command, str(path)]) == 1
            err = capsys.readouterr().err
            assert err.startswith("ERROR CorruptCheckpointError") and err.count("\n") == 1 and match in err, err
    finally:
        stop.set()


@pytest.mark.parametrize("other", ["dim", "optimizer", "hyper"])
def test_config_mismatch_is_refused(saved, other):
    path, _ = saved
    if other == "dim":
        cfg = config(dim=DIM + 1)
    elif other == "optimizer":
        cfg = config("adam")
    else:
        cfg = pse.TableConfig(dim=DIM, accessor=ACC, lr_optimizer=pse.AdaGrad(learning_rate=0.2),
                              mf_optimizer=OPTIMIZERS["adagrad"][1])
    t = pse.SparseTable(cfg)
    with pytest.raises(CheckpointMismatchError, match="different model config"):
        t.load(path)
    assert len(t) == 0
    # Thresholds, shards and threads are not part of the model: a table differing only there loads it.
    ok = pse.TableConfig(dim=DIM, accessor=pse.CtrAccessorConfig(), lr_optimizer=OPTIMIZERS["adagrad"][0],
                         mf_optimizer=OPTIMIZERS["adagrad"][1], num_shards=3, num_threads=1)
    t = pse.SparseTable(ok)
    t.load(path)
    assert len(t) == F.read_manifest(path)["rows"]


def test_bad_arguments(tmp_path):
    t = populated(n=50)
    with pytest.raises(ValueError, match="mode must be one of"):
        t.save(tmp_path / "x", "serving")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory"):
        t.save(tmp_path / "file")
    with pytest.raises(ValueError, match="num_buckets"):
        pse.checkpoint.save_table(t, tmp_path / "y", num_buckets=0)
    with pytest.raises(CorruptCheckpointError, match="not a directory"):
        t.load(tmp_path / "nothing")
    with pytest.raises(TypeError, match="path must be a str"):
        t.save(None)


# -- consistency under concurrent pushes -------------------------------------------------------------------

def test_save_is_one_moment_under_concurrent_pushes(tmp_path):
    # Property: every push call below touches all GROUP keys with show 1, so in any one moment of the table
    # the GROUP keys have equal shows; a save must show them equal. And nothing pushed during a base/delta
    # save is lost: a key's final delta_score is everything pushed minus what the saves wrote.
    cfg = config()
    t = pse.SparseTable(cfg)
    group = np.arange(1000, 1064, dtype=np.int64)
    other = np.arange(5000, 7000, dtype=np.int64)
    stop = threading.Event()
    counts = [0, 0]
    errors = []  # a pusher's exception (a thread's own would not fail the test)

    def pusher(i):
        g = np.zeros((group.size, 1 + DIM), np.float32)
        ones = np.ones(group.size, np.float32)
        zeros = np.zeros(group.size, np.float32)
        og = np.zeros((other.size, 1 + DIM), np.float32)
        try:
            while not stop.is_set():
                t.push(group, g, ones, zeros)
                t.push(other, og, np.ones(other.size, np.float32), np.zeros(other.size, np.float32))
                counts[i] += 1
        except BaseException as e:  # noqa: BLE001 - re-raised by the test below
            errors.append(e)

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 120
    while min(counts) == 0:  # both pushers running before the first save
        if time.monotonic() > deadline or not all(th.is_alive() for th in threads):
            stop.set()
            raise AssertionError("the pusher threads did not start pushing")
        time.sleep(0.001)
    saved_delta = np.zeros(group.size)
    shows = []
    try:
        for i in range(8):
            mode = ("checkpoint", "delta", "base")[i % 3]
            path = tmp_path / f"s{i}"
            t.save(path, mode)
            rows = saved_rows(path)
            sel = np.isin(rows["keys"], group)
            if mode == "checkpoint" or sel.any():
                assert sel.sum() == group.size, (
                    f"save {i} ({mode}) holds {sel.sum()} of the {group.size} keys pushed together: "
                    f"shows {np.unique(rows['base'][sel, 0])}, delta_scores {np.unique(rows['base'][sel, 2])}")
                s = rows["base"][sel, 0]
                assert np.all(s == s[0]), f"save {i} ({mode}) mixes moments: shows {np.unique(s)}"
                shows.append(float(s[0]))
            if mode != "checkpoint" and sel.any():
                saved_delta += rows["base"][sel, 2]
    finally:
        stop.set()
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    assert len(shows) >= 4 and shows[-1] > shows[0], "the pushers must have run during the saves"
    final = state(t._backend)
    sel = np.isin(final["keys"], group)
    total = sum(counts) * ACC.nonclk_coeff  # each push: show 1, click 0 -> score 0.25 per key
    assert np.all(final["base"][sel, 0] == sum(counts))
    np.testing.assert_array_equal(final["base"][sel, 2] + saved_delta, np.full(group.size, total))


# -- a real sharded table: save from 2 ranks, load into 1, 2 and 3 -----------------------------------------
# This file is also the job script: `python tests/test_checkpoint.py dist-worker DIR` with torchrun's
# environment, one process per rank (each rank trains and serves a part of the table).

def _dump_state(local, index, num):
    """Collective step: a server's whole state (module level so that it pickles by reference)."""
    return local.export("checkpoint")


def _dist_worker(workdir: str) -> None:
    import torch_psembed.distributed as D

    pse.init(max_staleness=0)
    rank = D.trainer_rank()
    rng = np.random.default_rng(100 + rank)
    t = pse.SparseTable(config(), name="ck")
    assert getattr(t._backend, "is_sharded", False)
    # A base first (of the empty table), as a job that publishes does: from here on every server turns
    # its deletions into tombstones, which the checkpoint below must carry.
    t.save(os.path.join(workdir, "base0"), "base")
    pool = np.concatenate([np.arange(1, 200, dtype=np.int64), rng.integers(0, 2**62, 300, dtype=np.int64)])
    for day in range(3):
        for _ in range(3):
            t.pull(pool[:8])  # a training step: pull, then push
            push_random(t, rng, pool)
        t.end_day(day)
    t.save(os.path.join(workdir, "ck2"))
    states = t._backend.collective(_dump_state)
    t.save(os.path.join(workdir, "base"), "base")
    t.pull(pool[:8])
    push_random(t, rng, pool)
    t.save(os.path.join(workdir, "delta"), "delta")
    pse.export(t, os.path.join(workdir, "srv"), dtype="float32", with_stats=True)
    serving = t._backend.collective(_dump_state)

    # Load back into another 2-rank table: every server holds exactly what it held.
    t2 = pse.SparseTable(config(), name="ck_b")
    t2.load(os.path.join(workdir, "ck2"))
    assert t2.day == 2
    for a, b in zip(t2._backend.collective(_dump_state), states):
        assert_rows_equal(a, b)
    t2.save(os.path.join(workdir, "ck2_again"))  # the restored pending tombstones are saved again
    # base then delta on a third table: the same as the files say (checked again by the parent).
    t3 = pse.SparseTable(config(), name="ck_c")
    t3.load(os.path.join(workdir, "base"))
    t3.load(os.path.join(workdir, "delta"))
    # A save of 1 process (written by the parent before the job) loads into the 2 ranks.
    t4 = pse.SparseTable(config(), name="ck_d")
    t4.load(os.path.join(workdir, "single"))
    if rank == 0:
        np.savez(os.path.join(workdir, "states.npz"),
                 **{f"{k}{i}": s[k] for i, s in enumerate(states) for k in ROW_KEYS + ("tombstones",)},
                 **{f"c_{k}{i}": s[k] for i, s in enumerate(t3._backend.collective(_dump_state)) for k in ROW_KEYS},
                 **{f"d_{k}{i}": s[k] for i, s in enumerate(t4._backend.collective(_dump_state)) for k in ROW_KEYS},
                 **{f"s_{k}{i}": s[k] for i, s in enumerate(serving) for k in ROW_KEYS})
    else:
        t3._backend.collective(_dump_state)
        t4._backend.collective(_dump_state)
    pse.shutdown()


def _union(npz, prefix: str, parts: int) -> dict:
    return R.sort_by_key({**{k: np.concatenate([npz[f"{prefix}{k}{i}"] for i in range(parts)]) for k in ROW_KEYS},
                          "tombstones": np.zeros(0, np.int64)})


@pytest.mark.distributed
@pytest.mark.slow
def test_two_rank_save_loads_into_1_2_and_3_parts(tmp_path):
    import subprocess
    import sys

    single = populated(n=300, seed=21)
    single.save(tmp_path / "single")
    port = free_port_pair()  # the process group on port, RPC on port + 1
    procs = []
    for r in range(2):
        env = child_env(dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(port), PSEMBED_RPC_PORT=str(port + 1)))
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "dist-worker", str(tmp_path)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            outs.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    assert all(rc == 0 for rc, _ in outs), "\n".join(f"rc={rc}\n{o[-3000:]}" for rc, o in outs)

    npz = np.load(tmp_path / "states.npz")
    whole = _union(npz, "", 2)
    m = F.read_manifest(tmp_path / "ck2")
    assert m["num_parts"] == 2 and m["rows"] == whole["keys"].size > 300 and m["day"] == 2
    assert m["tombstones"] == sum(npz[f"tombstones{i}"].size for i in range(2)) > 0
    for i in range(2):
        assert np.all(_C.route(npz[f"keys{i}"], 2) == i)
    again = saved_rows(tmp_path / "ck2_again")
    assert_rows_equal(again, saved_rows(tmp_path / "ck2"))
    assert sorted(again["tombstones"].tolist()) == sorted(saved_rows(tmp_path / "ck2")["tombstones"].tolist())
    chain = {"base_id": None, "sequence": 0}
    for parts in (1, 3):
        dest = _parts(parts, config())
        load_group(LocalParts(dest), config().to_dict(), chain, tmp_path / "ck2")
        assert_rows_equal(R.sort_by_key(R.concat_rows([state(p) for p in dest])), whole)
    # base then delta written by 2 ranks = the union the 2-rank table held after loading them.
    c = pse.SparseTable(config())
    c.load(tmp_path / "base")
    c.load(tmp_path / "delta")
    assert_rows_equal(state(c._backend), _union(npz, "c_", 2))
    # the 1-process save, loaded into 2 ranks, is the single table's state.
    assert_rows_equal(_union(npz, "d_", 2), state(single._backend))
    # the export of the sharded table serves its rows with mf.
    srv = _union(npz, "s_", 2)
    inf = pse.InferenceEmbedding.load(tmp_path / "srv", output="cvm_lr_mf")
    mf_keys = srv["keys"][srv["has_mf"] == 1]
    assert len(inf) == mf_keys.size > 0
    got = inf.pull(torch.from_numpy(mf_keys), with_stats=True).numpy()
    rows = R.take_rows(srv, srv["has_mf"] == 1)
    assert np.array_equal(got[:, :2], rows["base"][:, :2]) and np.array_equal(got[:, 2], rows["base"][:, 5])
    assert np.array_equal(got[:, 3:], rows["mf"][:, :DIM])


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "dist-worker":
        _dist_worker(sys.argv[2])
    else:
        raise SystemExit("usage: python tests/test_checkpoint.py dist-worker DIR")


def test_a_save_takes_one_bucket_per_65536_keys_unless_told(tmp_path):
    # Every bucket is 4 files per part: a small table (a delta saved after every pass) must not write 64 of
    # them. The count is taken from the keys of all parts together, and an explicit count still wins.
    assert [F.auto_num_buckets(n) for n in (0, 1, 65536, 65537, 64 * 65536, 10**9)] == [1, 1, 1, 2, 64, 64]
    cfg = config()
    small = populated("adagrad", n=900, seed=5)
    small.save(tmp_path / "small", "base")
    m = F.read_manifest(tmp_path / "small")
    assert m["num_buckets"] == 1 and {e["bucket"] for e in m["files"] if e["bucket"] is not None} == {0}
    small.save(tmp_path / "fixed", num_buckets=7)
    assert F.read_manifest(tmp_path / "fixed")["num_buckets"] == 7

    keys = np.arange(1, 70_001, dtype=np.int64)  # 35,000 keys per part: 70,000 in all -> 2 buckets
    two = _parts(2, cfg)
    owner = _C.route(keys, 2)
    for i, part in enumerate(two):
        k = keys[owner == i]
        part.load_rows(k, np.zeros((k.size, part.base_width), np.float32), np.zeros(k.size, np.uint8),
                       np.zeros((0, part.mf_width), np.float32))
    chain = {"base_id": None, "sequence": 0}
    s = save_group(LocalParts(two), cfg.to_dict(), chain, tmp_path / "two", "checkpoint")
    assert s["rows"] == keys.size
    m = F.read_manifest(tmp_path / "two")
    assert m["num_buckets"] == 2
    dest = _parts(1, cfg)
    load_group(LocalParts(dest), cfg.to_dict(), chain, tmp_path / "two")
    assert len(dest[0]) == keys.size
    with pytest.raises(ValueError, match="num_buckets"):
        small.save(tmp_path / "bad", num_buckets=0)


class _WithoutBucketExport:
    """A _C.Table without export_buckets/save_buckets: its saves take the write_part path (rows re-bucketed)."""

    def __init__(self, local):
        self._local = local

    def __getattr__(self, name):
        if name in ("export_buckets", "save_buckets"):
            raise AttributeError(name)
        return getattr(self._local, name)

    def __len__(self):
        return len(self._local)


def _keys_files_ascending(path) -> int:
    """Asserts every keys file of the save at ``path`` is strictly ascending as uint64; returns how many keys
    of the save are negative (they sort last as uint64)."""
    m = F.read_manifest(path)
    negative = 0
    for e in m["files"]:
        if e["column"] == "keys":
            k = np.fromfile(os.path.join(F.data_path(path, m), e["name"]), "<i8")
            assert R.first_unordered(k.view(np.uint64)) == -1, f"{path}: {e['name']}"
            negative += int((k < 0).sum())
    return negative


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_every_writer_writes_keys_strictly_ascending_as_uint64_and_every_save_loads(tmp_path, opt):
    """The loaders refuse a keys file that is not strictly ascending as uint64 (docs/format.md): every way the
    code writes a save (streamed checkpoint, bucketed base/delta, write_part, several parts, merge) writes that
    order, with keys of both signs, and the save loads back whole (with the optimizer state checks)."""
    from torch_psembed import tools

    cfg = config(opt)
    t = populated(opt, n=1500, seed=11)
    negative = 0
    for nb in (1, 5):
        for mode in ("base", "delta", "checkpoint"):
            p = tmp_path / f"{mode}{nb}"
            t.save(p, mode, num_buckets=nb)
            negative += _keys_files_ascending(p)
        fresh = pse.SparseTable(cfg)
        fresh.load(tmp_path / f"base{nb}")
        fresh.load(tmp_path / f"delta{nb}")
        fresh.load(tmp_path / f"checkpoint{nb}")
        assert len(fresh) == len(t)
    assert negative > 0
    merged = tools.merge([tmp_path / "base5", tmp_path / "delta5"], tmp_path / "merged", num_buckets=3)
    assert _keys_files_ascending(tmp_path / "merged") > 0
    pse.SparseTable(cfg).load(tmp_path / "merged")
    snap = state(t._backend)
    owner = _C.route(snap["keys"], 2)
    two = _parts(2, cfg)
    for i, part in enumerate(two):
        rows = R.take_rows(snap, owner == i)
        part.load_rows(rows["keys"], rows["base"], rows["has_mf"], rows["mf"])
    chain = {"base_id": None, "sequence": 0}
    for name, parts in (("two", two), ("write_part", [_WithoutBucketExport(p) for p in two])):
        for mode in ("checkpoint", "base"):
            save_group(LocalParts(parts), cfg.to_dict(), chain, tmp_path / name / mode, mode, num_buckets=4)
            assert _keys_files_ascending(tmp_path / name / mode) > 0
            dest = _parts(3, cfg)
            load_group(LocalParts(dest), cfg.to_dict(), chain, tmp_path / name / mode)
            assert sum(len(d) for d in dest) == F.read_manifest(tmp_path / name / mode)["rows"]
    assert merged["rows"] > 0


def test_a_table_restored_from_a_checkpoint_then_given_later_deltas_lists_what_its_source_lists(tmp_path):
    # B loads A's checkpoint (pending tombstones P), then A's delta d1 (which published P): B kept P pending and
    # its own next delta listed them again (found by an audit, session 25). A delta's load forgets the pending
    # tombstones it published.
    cfg = pse.TableConfig(dim=2, accessor=pse.CtrAccessorConfig(show_click_decay_rate=1.0, delete_threshold=1.0,
                                                                 base_threshold=0.0, delta_threshold=0.0))
    a = pse.SparseTable(cfg)
    k = np.arange(1, 11, dtype=np.int64)
    a.push(k, np.ones((10, 3), np.float32), np.where(k % 2 == 0, 1.0, 50.0).astype(np.float32),
           np.zeros(10, np.float32))
    a.save(tmp_path / "base", "base")
    assert a.shrink() == 5  # the even keys: pending tombstones
    a.save(tmp_path / "ck", "checkpoint")
    a.save(tmp_path / "d1", "delta")  # publishes them
    b = pse.SparseTable(cfg)
    b.load(tmp_path / "ck")
    assert sorted(b._backend.export("delta")["tombstones"].tolist()) == [2, 4, 6, 8, 10]
    b.load(tmp_path / "d1")
    for t in (a, b):
        t.push(np.array([3, 12], np.int64), np.ones((2, 3), np.float32), np.full(2, 50.0, np.float32),
               np.zeros(2, np.float32))
    assert a.shrink() == b.shrink() == 0
    a.save(tmp_path / "a2", "delta")
    b.save(tmp_path / "b2", "delta")
    ma, mb = (F.read_manifest(str(tmp_path / n)) for n in ("a2", "b2"))
    assert ma["tombstones"] == mb["tombstones"] == 0 and ma["rows"] == mb["rows"]


def test_saves_and_loads_of_one_table_run_one_at_a_time(tmp_path, monkeypatch):
    # A save's commit drops the pending tombstones its snapshot saw by their count, and a load replaces or
    # trims that list: another save or load of the same table between the snapshot and the commit (from
    # another thread) made the count name other tombstones, and a deletion never reached a delta. A second
    # save of the table now waits for the first.
    from torch_psembed.checkpoint import _table_io as T

    t = populated(n=300, seed=4)
    t.save(str(tmp_path / "base"), mode="base")
    real_finish = T._srv_finish
    committing, release = threading.Event(), threading.Event()

    def finish_slowly(*args):
        if threading.current_thread().name == "first":
            committing.set()
            release.wait(30)
        return real_finish(*args)

    monkeypatch.setattr(T, "_srv_finish", finish_slowly)
    first = threading.Thread(target=t.save, args=(str(tmp_path / "d1"), "delta"), name="first")
    first.start()
    assert committing.wait(30)
    second = threading.Thread(target=t.save, args=(str(tmp_path / "ck"), "checkpoint"), name="second")
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first save's commit
    release.set()
    first.join(30)
    second.join(30)
    assert not first.is_alive() and not second.is_alive()
    assert F.read_manifest(str(tmp_path / "ck"))["sequence"] == 1  # the checkpoint saw the delta's chain step
