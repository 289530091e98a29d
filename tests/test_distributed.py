"""Tests of torch_psembed.distributed: sharding tables over torchrun ranks with RPC.

In-process tests drive the client (dedup, routing, staleness window, bounded pushes, collectives) through an
in-memory transport. Multi-process tests launch real jobs (tests/dist_workers/worker.py) on 127.0.0.1, with
torchrun or with torchrun's environment set by hand, and kill their whole process group on failure or timeout.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.distributed import runtime, server
from torch_psembed.distributed.client import ShardedTable
from torch_psembed.distributed.ports import free_port_pair
from torch_psembed.distributed.rpc_transport import _concise_remote_error, is_transport_failure
from torch_psembed.distributed.transport import DoneHandle, Handle, Transport
from torch_psembed.errors import NotInitializedError, PeerUnavailableError

from conftest import REPO, child_env  # noqa: E402

WORKER = os.path.join(REPO, "tests", "dist_workers", "worker.py")
sys.path.insert(0, os.path.join(REPO, "tests", "dist_workers"))
import worker  # noqa: E402

JOB_TIMEOUT = 150  # seconds; a hung job is killed and the test fails


# ---------------------------------------------------------------------------------------------------------
# In-process: the client over an in-memory transport
# ---------------------------------------------------------------------------------------------------------
class _Lazy(Handle):
    """A push that is applied only when waited on: models a request still in flight. Like every Handle, it
    may be waited from two threads at once (a prefetch thread and the training thread) and runs once."""

    def __init__(self, fn, log, tag):
        self._fn, self._log, self._tag, self._done, self._value = fn, log, tag, False, None
        self._lock = threading.Lock()

    def wait(self):
        with self._lock:
            if not self._done:
                self._value = self._fn()
                self._done = True
                self._log.append(self._tag)
        return self._value

    def done(self):
        return self._done


class MemoryTransport(Transport):
    """Servers are _C.Tables in this process; pushes stay pending until waited on."""

    def __init__(self, num_servers):
        self.num_servers = num_servers
        self.local_server = None
        self.rpc_timeout = 1.0
        self.tables = {}
        self.applied = []  # tags of pushes, in the order they were applied
        self.pending = 0
        self.max_pending = 0
        self.barriers = 0

    def server_rank(self, server):
        return server

    def pull(self, s, table, keys, with_stats):
        return DoneHandle(self.tables[(s, table)].pull(keys, with_stats))

    def push(self, s, table, keys, grads, shows, clicks, slots, push_id):
        self.pending += 1
        self.max_pending = max(self.max_pending, self.pending)
        tag = getattr(self, "step_tag", None)

        def apply():
            self.pending -= 1
            return self.tables[(s, table)].push(keys, grads, shows, clicks, slots, push_id)

        return _Lazy(apply, self.applied, tag)

    def call(self, s, table, fn, args=()):
        try:
            return DoneHandle(fn(self.tables[(s, table)], s, self.num_servers, *args))
        except Exception as e:  # noqa: BLE001
            return DoneHandle(error=e)

    def create_table(self, s, table, config):
        self.tables.setdefault((s, table), _C.Table(config))
        return DoneHandle(True)

    def trainer_barrier(self):
        self.barriers += 1

    def broadcast_from_first_trainer(self, obj):
        return obj

    def gather_trainers(self, obj):
        return [obj]  # one trainer


def _cfg(dim=3):
    return worker.table_config(dim=dim)


def _sharded(num_servers=3, max_staleness=0, dim=3, **kw):
    tr = MemoryTransport(num_servers)
    t = ShardedTable("t", _cfg(dim), tr, max_staleness, 0, 1, lambda: None, **kw)
    return t, tr


def _batch(rng, universe, n, dim):
    keys = universe[rng.integers(0, len(universe), size=n)]
    grads = rng.normal(0, 1, size=(n, 1 + dim)).astype(np.float32)
    shows = rng.integers(1, 3, size=n).astype(np.float32)
    clicks = (rng.random(n) < 0.3).astype(np.float32)
    slots = rng.integers(0, 9, size=n).astype(np.int32)
    return keys, grads, shows, clicks, slots


def test_staleness_zero_matches_one_local_table_exactly():
    # Property: with max_staleness=0 the sharded table is indistinguishable from one local table fed the
    # same calls (duplicates merged in input order, pushes applied before the next pull).
    t, tr = _sharded(num_servers=3, max_staleness=0)
    local = _C.Table(_cfg().to_dict())
    rng = np.random.default_rng(0)
    universe = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    for step in range(10):
        keys, grads, shows, clicks, slots = _batch(rng, universe, 257, 3)
        np.testing.assert_array_equal(t.pull(keys, True), local.pull(keys, True))
        assert t.push(keys, grads, shows, clicks, slots) == local.push(keys, grads, shows, clicks, slots) == 0
        if step % 3 == 2:
            assert t.shrink() == local.shrink()
    assert t.end_day(2) == local.end_day(2)
    assert t.day == local.day == 2
    np.testing.assert_array_equal(t.pull(universe, True), local.pull(universe, True))
    assert len(t) == len(local)
    st, lst = t.stats(), local.stats()
    for k in ("keys", "inserts", "deleted", "keys_with_mf", "bytes"):
        if k == "bytes":
            assert st[k] > 0
        else:
            assert st[k] == lst[k], k
    # each server holds exactly the keys the routing hash gives it
    owners = _C.route(universe, 3)
    for k, o in zip(universe[:50], owners[:50]):
        assert (int(k) in tr.tables[(int(o), "t")]) == (int(k) in local)
        for other in range(3):
            if other != o:
                assert int(k) not in tr.tables[(other, "t")]
    # table-wide ops went through the collective (two barriers each)
    assert tr.barriers == 2 * 4  # 3 shrinks + 1 end_day


@pytest.mark.parametrize("trainer", [0, 1])
def test_probabilistic_admission_is_the_same_on_every_layout(trainer):
    # Property: admission draws depend on (day, push id) only. Trainer 0 of a 3-server table with
    # asynchronous pushes admits exactly what one local table given the same calls admits; trainer 1 sends
    # push ids (1 << 32) | count, so it matches a local table given those ids.
    cfg = pse.TableConfig(dim=3, accessor=pse.CtrAccessorConfig(create_probability_from_score=True),
                          lr_optimizer=pse.AdaGrad(initial_range=0.0), num_shards=4, seed=9)
    tr = MemoryTransport(3)
    t = ShardedTable("t", cfg, tr, 2, trainer, 2, lambda: None)
    local = _C.Table(cfg.to_dict())
    rng = np.random.default_rng(3)
    pushes = 0
    for day in range(3):
        for step in range(4):
            keys = rng.integers(0, 5000, size=700).astype(np.int64) + day * 3000  # new ids every day
            n = keys.shape[0]
            grads = rng.normal(0, 1, size=(n, 4)).astype(np.float32)
            shows = np.ones(n, np.float32)
            clicks = (rng.random(n) < 0.05).astype(np.float32)
            t.push(keys, grads, shows, clicks)
            local.push(keys, grads, shows, clicks, None, None if trainer == 0 else (1 << 32) | pushes)
            pushes += 1
        if trainer == 0:
            assert t.end_day(day) == local.end_day(day)
        else:  # a collective needs the first trainer: close the day on each server's table directly
            t.flush()
            assert sum(tr.tables[(s, "t")].end_day(day) for s in range(3)) == local.end_day(day)
    universe = np.arange(0, 12000, dtype=np.int64)
    np.testing.assert_array_equal(t.pull(universe, True), local.pull(universe, True))
    assert 0 < len(t) == len(local) < 12000
    assert t.stats()["admission_rejected"] == local.stats()["admission_rejected"] > 0


def test_nan_skip_policy_matches_local_table():
    # Property: under nan_policy="skip" each bad input row is skipped and counted, as in one local table;
    # a bad row never poisons the merged gradient of the good rows with the same key.
    cfg = dataclasses.replace(_cfg(), nan_policy="skip")
    tr = MemoryTransport(2)
    t = ShardedTable("t", cfg, tr, 1, 0, 1, lambda: None)
    local = _C.Table(cfg.to_dict())
    rng = np.random.default_rng(5)
    universe = np.arange(1, 40, dtype=np.int64)
    for _ in range(4):
        keys, grads, shows, clicks, slots = _batch(rng, universe, 64, 3)
        grads[rng.random(64) < 0.1, 1] = np.nan
        grads[3, 0] = np.inf
        assert t.push(keys, grads, shows, clicks, slots) == local.push(keys, grads, shows, clicks, slots) > 0
        t.flush()
        np.testing.assert_array_equal(t.pull(universe, True), local.pull(universe, True))
    assert t.stats()["rejected"] == local.stats()["rejected"] > 0


def test_max_keys_bounds_the_whole_sharded_table():
    # max_keys bounds the table, not each server: 3 servers of 4 shards, max_keys = 125 -> each server 41
    # rows -> 10 a shard. 3,000 distinct keys fill every shard of every server.
    cfg = dataclasses.replace(_cfg(), num_shards=4, max_keys=125)
    tr = MemoryTransport(3)
    t = ShardedTable("t", cfg, tr, 0, 0, 1, lambda: None)
    keys = np.arange(1, 3001, dtype=np.int64)
    n = keys.shape[0]
    t.push(keys, np.ones((n, 4), np.float32), np.ones(n, np.float32), np.zeros(n, np.float32))
    t.flush()
    assert [len(tr.tables[(s, "t")]) for s in range(3)] == [40, 40, 40]
    assert len(t) == 120 and t.stats()["capacity_rejected"] == 3000 - 120
    # A bound that leaves a server fewer rows than its shards is refused when the table is made.
    with pytest.raises(ValueError, match="max_keys"):
        ShardedTable("u", dataclasses.replace(cfg, max_keys=11), MemoryTransport(3), 0, 0, 1, lambda: None)


def test_empty_calls_and_uint64_keys():
    t, tr = _sharded(num_servers=2)
    local = _C.Table(_cfg().to_dict())
    empty = np.zeros(0, np.int64)
    assert t.pull(empty).shape == (0, 4) and t.pull(empty, True).shape == (0, 6)
    assert t.push(empty, np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)) == 0
    keys = np.array([-1, 2**63 - 1, -(2**63)], np.int64)  # feasigns 2**64-1, 2**63-1, 2**63
    args = (np.ones((3, 4), np.float32), np.ones(3, np.float32), np.zeros(3, np.float32))
    t.push(keys, *args)
    local.push(keys, *args)
    np.testing.assert_array_equal(t.pull(keys, True), local.pull(keys, True))
    assert (2**64 - 1) in t and (2**63) in t and -1 in t and 5 not in t
    assert len(t) == 3 and tr.pending == 0


def test_route_spreads_keys_and_is_stable():
    keys = np.arange(20000, dtype=np.int64)
    owners = _C.route(keys, 3)
    counts = np.bincount(owners, minlength=3)
    assert counts.min() > 20000 / 3 * 0.9  # sequential ids are mixed, not taken modulo
    np.testing.assert_array_equal(_C.route(keys, 3), owners)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_staleness_window(k):
    # Property: before the pull of step t, the pushes of steps t-k-1 and earlier are applied, and no more
    # than k steps of pushes are left unapplied.
    t, tr = _sharded(num_servers=2, max_staleness=k)
    rng = np.random.default_rng(1)
    universe = np.arange(1, 100, dtype=np.int64)
    for step in range(8):
        t.pull(universe[:10])
        applied_steps = set(tr.applied)
        for old in range(step - k):
            assert old in applied_steps, (step, old)
        tr.step_tag = step
        t.push(*_batch(rng, universe, 64, 3))
        unapplied = set(range(step + 1)) - set(tr.applied)
        assert len(unapplied) <= (k + 1 if k else 0), (step, unapplied)
        if k and step >= 1:
            assert step - 1 in unapplied  # the window lets the previous step's push stay in flight
    t.flush()
    assert tr.pending == 0


class _CountingTransport(MemoryTransport):
    def __init__(self, num_servers):
        super().__init__(num_servers)
        self.pulls = 0

    def pull(self, s, table, keys, with_stats):
        self.pulls += 1
        return super().pull(s, table, keys, with_stats)


def _prefetching(k):
    tr = _CountingTransport(2)
    return ShardedTable("t", _cfg(3), tr, k, 0, 1, lambda: None), tr


def _settle(t):
    """Wait until the table's prefetch thread has finished its job (test-only: the job's effects are checked)."""
    if t._prefetched is not None:
        t._prefetched[2].result()


@pytest.mark.parametrize("where", ["after_push", "before_push", "step_start"])
@pytest.mark.parametrize("k", [1, 2])
def test_prefetch_pipelined_training_equals_plain_training(k, where):
    # Property: prefetching the next batch right after each push, right before it (once the step's gradients
    # are known, scripts/bench_distributed.py --prefetch=before-push) or right after the step's pull
    # (--prefetch), gives the pulls exactly the rows a plain pull would see (same staleness window), so the
    # whole run ends in the same table; each pull then only takes the prefetched rows (no new requests), and
    # the window still holds before every pull. The push after its prefetch reuses the dedup of its own pull
    # (two plans are kept), so the run costs no extra dedup. The prefetch runs on its own thread: the test
    # waits for it (_settle) before it counts requests or looks at which pushes were applied.
    rng = np.random.default_rng(7)
    universe = rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)
    batches = [_batch(rng, universe, 97, 3) for _ in range(10)]
    results = []
    for use_prefetch in (False, True):
        t, tr = _prefetching(k)
        pulled = []
        for step, (keys, grads, shows, clicks, slots) in enumerate(batches):
            _settle(t)
            before = tr.pulls
            pulled.append(t.pull(keys, True))
            if use_prefetch and step > 0:
                assert tr.pulls == before  # taken from the prefetch
            assert all(old in tr.applied for old in range(step - k))
            prefetch = use_prefetch and step + 1 < len(batches)
            if prefetch and where == "step_start":
                t.prefetch(batches[step + 1][0], True)
                _settle(t)
                assert set(range(step - k + 1)) <= set(tr.applied)  # waited for steps <= t-k
                if k == 2:
                    assert step - 1 not in tr.applied  # the previous step's push may stay in flight
            tr.step_tag = step
            if prefetch and where == "before_push":
                t.prefetch(batches[step + 1][0], True)
                _settle(t)
                assert set(range(step - k + 1)) <= set(tr.applied)  # waited for steps <= t-k
            plans = t._plan_cache[-1][1]
            t.push(keys, grads, shows, clicks, slots)
            assert t._plan_cache[-1][1] is plans  # no new plan for the push
            if prefetch and where == "after_push":
                t.prefetch(batches[step + 1][0], True)
                _settle(t)
                assert set(range(step - k + 1)) <= set(tr.applied)  # waited for steps <= t-k
                assert step in set(range(step + 1)) - set(tr.applied)  # this step's push stays in flight
        t.flush()
        results.append((pulled, t.pull(universe, True)))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_prefetch_is_dropped_by_other_keys_flush_and_collectives():
    t, tr = _prefetching(1)
    rng = np.random.default_rng(8)
    universe = np.arange(1, 300, dtype=np.int64)
    t.push(*_batch(rng, universe, 64, 3))
    t.pull(universe[:5])
    t.push(*_batch(rng, universe, 64, 3))
    # other keys: a fresh pull of those keys, which reads what the servers hold now
    t.prefetch(universe[:50])
    _settle(t)
    before = tr.pulls
    fresh = t.pull(universe[50:90])
    assert tr.pulls > before
    owners = _C.route(universe[50:90], 2)
    expect = np.stack([tr.tables[(int(o), "t")].pull(np.array([key]), False)[0]
                       for key, o in zip(universe[50:90], owners)])
    assert np.abs(expect).sum() > 0  # the pushes reached some of these rows: zeros would not pass
    np.testing.assert_array_equal(fresh, expect)
    # other with_stats: also fresh
    t.prefetch(universe[:50])
    assert t.pull(universe[:50], True).shape == (50, 6)
    # a collective in between (shrink deletes rows): the pull sees its result, not the prefetched rows
    t.prefetch(universe[:50], True)
    stale = t._prefetched[2]
    assert stale is not None
    t.shrink()
    assert t._prefetched is None
    local = {s: tr.tables[(s, "t")] for s in range(2)}
    expect = np.zeros((50, 6), np.float32)
    owners = _C.route(universe[:50], 2)
    for i, (key, o) in enumerate(zip(universe[:50], owners)):
        expect[i] = local[int(o)].pull(np.array([key]), True)[0]
    np.testing.assert_array_equal(t.pull(universe[:50], True), expect)
    # flush drops it too
    t.prefetch(universe[:50])
    t.flush()
    assert t._prefetched is None


def test_prefetch_without_staleness_is_a_no_op():
    t, tr = _prefetching(0)
    t.prefetch(np.arange(1, 50, dtype=np.int64))
    assert tr.pulls == 0 and t._prefetched is None


class _FailingPulls(MemoryTransport):
    """Pulls fail as a dead peer's would while ``dead`` is set."""

    dead = False

    def pull(self, s, table, keys, with_stats):
        if self.dead:
            return DoneHandle(error=PeerUnavailableError(f"rank {s} is unavailable: pull failed", rank=s))
        return super().pull(s, table, keys, with_stats)


def test_a_prefetch_error_is_raised_by_the_pull_that_takes_it():
    # Property: the prefetch thread's failure (a dead peer) is not lost and does not surface in prefetch():
    # the pull that takes the prefetch raises it, naming the rank; the table stays usable afterwards.
    tr = _FailingPulls(2)
    t = ShardedTable("t", _cfg(3), tr, 1, 0, 1, lambda: None)
    keys = np.arange(1, 200, dtype=np.int64)
    t.push(*_batch(np.random.default_rng(3), keys, 64, 3))
    tr.dead = True
    t.prefetch(keys)
    with pytest.raises(PeerUnavailableError, match="rank [01] is unavailable"):
        t.pull(keys)
    assert t._prefetched is None
    tr.dead = False
    t.flush()
    np.testing.assert_array_equal(t.pull(keys), tr.tables[(0, "t")].pull(keys) + tr.tables[(1, "t")].pull(keys))


def test_the_prefetch_thread_ends_with_its_table():
    # Property: each table's prefetch thread holds no reference to its table between jobs, so a dropped table
    # is collected and its thread ends (a long job creating tables does not pile up threads).
    t, _ = _prefetching(1)
    keys = np.arange(1, 20, dtype=np.int64)
    t.prefetch(keys)
    t.pull(keys)
    t.prefetch(keys)  # one job left untaken
    thread = t._prefetcher.thread
    assert thread.is_alive() and thread.name == "psembed-prefetch-t"
    del t
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_inflight_pushes_are_bounded():
    t, tr = _sharded(num_servers=2, max_staleness=3, max_inflight=4)
    rng = np.random.default_rng(2)
    universe = np.arange(1, 1000, dtype=np.int64)
    for _ in range(30):  # pushes without pulls: one ever-growing step unless bounded
        t.push(*_batch(rng, universe, 64, 3))
    assert tr.max_pending <= 4
    t.flush()
    assert tr.pending == 0


def test_push_checks_its_arguments_before_sending():
    t, tr = _sharded()
    k = np.array([1, 2], np.int64)
    ok = dict(grads=np.zeros((2, 4), np.float32), shows=np.ones(2, np.float32), clicks=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="grads"):
        t.push(k, np.zeros((2, 3), np.float32), ok["shows"], ok["clicks"])
    with pytest.raises(ValueError, match="shows"):
        t.push(k, ok["grads"], -ok["shows"], ok["clicks"])
    bad = ok["grads"].copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        t.push(k, bad, ok["shows"], ok["clicks"])
    assert tr.pending == 0 and len(t) == 0


def test_collective_runs_once_per_server_and_propagates_errors():
    t, tr = _sharded(num_servers=3)
    assert t.collective(_server_info) == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(ValueError, match="boom 1"):
        t.collective(_boom_on_one)
    assert (t.is_sharded, t.num_servers, t.trainer_rank, t.num_trainers) == (True, 3, 0, 1)


def _server_info(table, server_index, num_servers):
    return (server_index, num_servers)


def _boom_on_one(table, server_index, num_servers):
    if server_index == 1:
        raise ValueError("boom 1")
    return 0


def test_server_endpoints_reject_malformed_requests_and_keep_serving():
    server.configure(0, 1)
    try:
        assert server.create_table("srv", _cfg().to_dict()) is True
        assert server.create_table("srv", _cfg().to_dict()) is False
        with pytest.raises(ValueError, match="already exists with a different config.*dim"):
            server.create_table("srv", _cfg(dim=5).to_dict())
        with pytest.raises(TypeError, match="keys"):
            server.pull("srv", np.zeros(3, np.float32))
        with pytest.raises(ValueError, match="no table named 'nope'"):
            server.pull("nope", np.zeros(3, np.int64))
        with pytest.raises(TypeError, match="config"):
            server.create_table("x", "not a dict")
        with pytest.raises((ValueError, TypeError)):
            server.push("srv", np.zeros(2, np.int64), np.zeros((2, 9), np.float32), np.ones(2, np.float32),
                        np.ones(2, np.float32))
        k = np.array([5, 6], np.int64)
        server.push("srv", k, np.ones((2, 4), np.float32), np.ones(2, np.float32), np.zeros(2, np.float32))
        assert server.pull("srv", k).shape == (2, 4)
    finally:
        server.configure(-1, 0)


def test_transport_failure_classification():
    assert is_transport_failure(RuntimeError("eof (this error originated at tensorpipe/transport/shm/...)"))
    assert is_transport_failure(RuntimeError("RPC ran for more than set timeout (10000 ms) and will now be marked"))
    assert not is_transport_failure(ValueError("keys must be int64"))
    remote = "On WorkerInfo(id=1, name=psembed1):\nValueError('bad (thing)')\nTraceback (most recent call last):\n"
    assert not is_transport_failure(RuntimeError(remote))
    e = _concise_remote_error(ValueError(remote), 1)
    assert type(e) is ValueError and str(e) == "bad (thing) (raised by rank 1)"


def test_init_argument_errors(monkeypatch):
    monkeypatch.setattr(runtime, "_state", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="max_staleness"):
        pse.init(max_staleness=-1)
    with pytest.raises(ValueError, match="num_servers"):
        pse.init(num_servers=-2)
    with pytest.raises(ValueError, match="rpc_timeout"):
        pse.init(rpc_timeout=0)
    with pytest.raises(ValueError, match="rpc_timeout must be a finite number of seconds > 0, got True"):
        pse.init(rpc_timeout=True)
    with pytest.raises(ValueError, match="transport must be one of 'tcp', 'rpc', got 'udp'"):
        pse.init(transport="udp")
    with pytest.raises(ValueError, match="num_servers=1 needs at least 2 processes"):
        pse.init(num_servers=1)
    assert runtime._state is None


def test_table_before_init_under_torchrun_env_is_an_error(monkeypatch):
    monkeypatch.setattr(runtime, "_state", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotInitializedError, match=r"before pse.init\(\).*WORLD_SIZE=2"):
        pse.SparseTable(_cfg(), name="early")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert len(pse.SparseTable(_cfg(), name="fine")) == 0  # one process: a local table


# ---------------------------------------------------------------------------------------------------------
# Multi-process jobs
# ---------------------------------------------------------------------------------------------------------
class _Job:
    """Processes started in their own sessions; kill() ends every process they started."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, env, name):
        p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True, text=True)
        p.name = name
        self.procs.append(p)
        return p

    def wait(self, timeout=JOB_TIMEOUT):
        deadline = time.monotonic() + timeout
        outs = {}
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                out, _ = p.communicate()
                outs[p.name] = (None, out)
                continue
            outs[p.name] = (p.returncode, out)
        return outs

    def kill(self):
        # torchrun starts its workers in sessions of their own, so killing our children's process groups is
        # not enough: collect every descendant first (while the parent links exist), then SIGKILL them all.
        pids = set()
        for p in self.procs:
            if p.poll() is None:
                pids.add(p.pid)
            pids |= _descendants(p.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _descendants(root: int) -> set:
    """Pids of every live descendant of ``root`` (from /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _run(job_specs, timeout=JOB_TIMEOUT):
    job = _Job()
    try:
        for cmd, env, name in job_specs:
            job.start(cmd, env, name)
        return job.wait(timeout)
    finally:
        job.kill()


@pytest.mark.parametrize("script", [WORKER, os.path.join(REPO, "tests", "fault_workers", "job.py")],
                         ids=["dist_worker", "fault_job"])
def test_job_scripts_import_the_package_put_first_on_pythonpath(tmp_path, script):
    # scripts/sanitize.sh runs tests against a sanitized build put first on PYTHONPATH (conftest.child_env); the
    # job scripts inserted the checkout at sys.path[0], so every rank of a job ran the plain build (session 27).
    fake = tmp_path / "torch_psembed"
    fake.mkdir()
    (fake / "__init__.py").write_text("import sys\nprint('the package first on PYTHONPATH')\nsys.exit(0)\n")
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    r = subprocess.run([sys.executable, script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "the package first on PYTHONPATH" in r.stdout, (r.stdout, r.stderr[-2000:])
    # and a child started with child_env imports the package this process imported
    (tmp_path / "probe").mkdir()  # not beside the fake package: a script's own folder comes first on sys.path
    probe = tmp_path / "probe" / "probe.py"
    probe.write_text("import torch_psembed\nprint(torch_psembed.__file__)\n")
    r = subprocess.run([sys.executable, str(probe)], env=child_env(), cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.strip() == os.path.abspath(pse.__file__), (r.stdout, r.stderr[-2000:])


def _by_hand(world, scenario, out, args, extra_env=None):
    """torchrun's environment set by hand: one process per rank (so a dead rank is not reaped by torchrun)."""
    port = free_port_pair()
    specs = []
    for r in range(world):
        env = child_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **(extra_env or {})})
        specs.append(([sys.executable, WORKER, scenario, out] + args, env, f"rank{r}"))
    return specs


def _torchrun(nproc, scenario, out, args):
    port = free_port_pair()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(port), WORKER, scenario, out] + args
    return [(cmd, child_env(), "torchrun")]


def _load(out, rank):
    with open(f"{out}.{rank}") as f:
        return json.load(f)


def _show(outs):
    return "\n".join(f"--- {n} rc={rc}\n{(o or '')[-3000:]}" for n, (rc, o) in outs.items())


@pytest.fixture(scope="module")
def baseline():
    """The single-process run of the training job (local table, no DDP), in this process."""
    return worker.train(worker.parse_args(["train", "unused"]))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "rpc"])
def test_routing_one_trainer_two_servers_matches_local_table(tmp_path, transport):
    out = str(tmp_path / "routing")
    outs = _run(_by_hand(3, "routing", out, ["--num-servers", "2", "--rpc-timeout", "30", "--transport", transport]))
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    c = _load(out, 2)  # the trainer
    assert c["mismatches"] == [] and c["mismatches_after"] == []
    assert c["len"][0] == c["len"][1] > 0
    for k, (a, b) in c["stats"].items():
        if k != "pull_misses":  # the client dedups before pulling, so it counts unique misses
            assert a == b, k
    assert c["day"] == [3, 3]
    assert c["contains"] and c["routing"]
    assert c["hook"] == [True, 2, 0, 1]
    assert "before pse.init()" in c["before_init"]
    assert "already called" in c["init_twice"]
    assert "table 'feasign' already exists with a different config (dim: existing 3, requested 5)" in c[
        "other_config"]
    assert "boom on server 0" in c["collective_error"]
    assert [m.split(":")[0] for m in c["malformed"]] == ["TypeError", "ValueError", "ValueError", "TypeError"]
    if transport == "tcp":
        assert "no table named 'nosuchtable' on this server (raised by rank 0)" in c["tcp_unknown_table"]
        magic, code, message = c["tcp_garbage"]
        assert (magic, code) == ("0x52455350", 3) and "bad magic" in message  # Corruption, then closed
    assert "shutdown" in c["after_shutdown"]


@pytest.mark.distributed
@pytest.mark.slow
def test_trainers_calling_different_collectives_all_refuse_and_nothing_runs(tmp_path):
    # The barriers only count calls: trainer 0's end_day(5) and trainer 1's shrink() went through together,
    # only trainer 0's ran, and both returned as if theirs had (found by an audit, session 24).
    out = str(tmp_path / "mismatch")
    outs = _run(_torchrun(2, "mismatch", out, ["--rpc-timeout", "30"]))
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    r0, r1 = _load(out, 0), _load(out, 1)
    for name, ops in (("end_day_vs_shrink", ("op_end_day(5,) on table 'a'", "op_shrink() on table 'a'")),
                      ("other_table", ("op_end_day(7,) on table 'a'", "op_end_day(7,) on table 'b'")),
                      ("other_day", ("op_end_day(8,)", "op_end_day(9,)"))):
        assert r0[name] == r1[name], name  # the same error on every trainer
        kind, message = r0[name]
        assert kind == "error" and "the trainers called different table-wide operations" in message, message
        assert f"trainer 0: {ops[0]}" in message and f"trainer 1: {ops[1]}" in message, message
    assert r0["same"] == r1["same"] == ["ok", 0]
    assert r0["days"] == r1["days"] == [5, -1]  # only the agreed end_day ran; table b never closed a day
    assert r0["len"] == r1["len"] == 100
    for r in (r0, r1):
        assert "slots must be in [0, 16777216)" in r["bad_slot"] and not r["contains_bad_slot_keys"]


@pytest.mark.distributed
def test_ranks_calling_init_with_different_arguments_all_raise(tmp_path):
    # Rank 0 colocated over TCP, rank 1 with one dedicated server over RPC: each built its groups from its own
    # num_servers and waited in dist.new_group for a group the other never made (found by an audit, session 24).
    out = str(tmp_path / "init_args")
    outs = _run(_by_hand(2, "init_args", out, ["--rpc-timeout", "20"]), timeout=60)
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    r0, r1 = _load(out, 0), _load(out, 1)
    assert r0["error"] == r1["error"] and r0["error"] is not None, (r0, r1)
    assert "the ranks called pse.init() with different arguments" in r0["error"], r0["error"]
    assert "rank 0: num_servers=0, transport='tcp'; rank 1: num_servers=1, transport='rpc'" in r0["error"], r0
    assert r0["initialized"] is r1["initialized"] is False


@pytest.mark.distributed
def test_a_rank_stopped_by_an_error_tells_the_others_why(tmp_path):
    # Rank 1 creates rank 0's table with another config: its ValueError stops it, and rank 0's next request
    # failed with only "rank 1 is unavailable: ... connection closed" (found by an audit, session 24).
    out = str(tmp_path / "other_config")
    outs = _run(_by_hand(2, "other_config", out, ["--rpc-timeout", "10"]), timeout=90)
    assert outs["rank1"][0] == 1 and "already exists with a different config" in outs["rank1"][1], _show(outs)
    assert outs["rank0"][0] == 1, _show(outs)  # a PeerUnavailableError ends the survivor's process with 1 too
    r0 = _load(out, 0)
    assert r0["rank"] == 1 and r0["error"].startswith("rank 1 is unavailable: it stopped on an uncaught ValueError: "
                                                      "table 'feasign' already exists with a different config"), r0


@pytest.mark.distributed
def test_collective_after_a_trainer_shut_down_says_so_and_the_job_still_ends_cleanly(tmp_path):
    # A trainer calling end_day after the other called shutdown() waited rpc_timeout, then got "rank 1 is
    # unavailable" and exited 1, though rank 1 had only finished (found by an audit, session 24).
    out = str(tmp_path / "after_shutdown")
    outs = _run(_by_hand(2, "after_shutdown", out, ["--rpc-timeout", "5"]), timeout=90)
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    r0 = _load(out, 0)
    for name in ("waiting", "after"):  # the notice came while rank 0 waited in the barrier; then before it
        message, seconds = r0[name]
        assert message.startswith("trainer rank 1 already called pse.shutdown(): a table-wide operation"), r0
    assert r0["after"][1] < 1.0, r0  # refused at once, not after rpc_timeout
    assert r0["shows"] == 64.0 and r0["day"] == -1, r0  # no day closed; rank 1's part still took the push


@pytest.mark.distributed
@pytest.mark.parametrize("late", [0, 2], ids=["coordinator-late", "other-late"])
def test_a_late_trainer_is_named_within_rpc_timeout_by_every_other_trainer(tmp_path, late):
    # The barriers ran on the trainers' group whose timeout is 1800 s (it carries the broadcast that waits for
    # the servers' part), and monitored_barrier applies its own timeout only on the group's rank 0: with
    # trainer 0 late or hung, every other trainer waited for it up to 30 min, then named "rank -1" (found by
    # an audit, session 26). Rank 1 comes first; with late=2, rank 0 comes 0.5 s after it, so rank 1's wait ends
    # before rank 0 knows who is missing, and rank 1 must ask it rather than blame it.
    out = str(tmp_path / "late")
    outs = _run(_by_hand(3, "late_trainer", out, ["--rpc-timeout", "2", "--late", str(late)]), timeout=90)
    for r in sorted({0, 1, 2} - {late}):
        assert outs[f"rank{r}"][0] is not None, _show(outs)
        res = _load(out, r)
        assert res["rank"] == late, (r, res, _show(outs))
        assert res["error"].startswith(f"rank {late} is unavailable"), (r, res)
        # rpc_timeout (2 s), then rank 1 waits for the coordinator's answer; the late rank comes after 12 s
        assert res["seconds"] < 8.0, (r, res)
    if late == 0:
        assert "the barrier's coordinator (rank 0) had not reached it after 2s" in _load(out, 1)["error"]
    else:
        assert "rank 2 did not arrive" in _load(out, 1)["error"] or "reported by rank 0" in _load(out, 1)["error"]
    assert _load(out, late) == {"late": True}


@pytest.mark.distributed
def test_a_server_dying_in_a_collective_is_raised_at_once_by_every_trainer(tmp_path):
    # Trainer 0 broadcast the failure and raised, but the other trainers entered the second barrier before
    # looking at what it sent, and trainer 0 never came: they waited for its process to end, or 1800 s
    # (found by an audit, session 26).
    out = str(tmp_path / "dies")
    # rpc_timeout well above what "at once" takes on a slow machine (this job also runs under ASan: scripts/sanitize.sh)
    outs = _run(_by_hand(3, "server_dies_in_collective", out, ["--rpc-timeout", "15"]), timeout=120)
    assert outs["rank0"][0] == -signal.SIGKILL, _show(outs)
    for r in (1, 2):
        res = _load(out, r)
        assert res["rank"] == 0 and res["error"].startswith("rank 0 is unavailable"), (r, res, _show(outs))
        assert res["seconds"] < 7.5, (r, res)  # not rpc_timeout (15 s), nor until trainer 0's process ends
        assert outs[f"rank{r}"][0] == 1, _show(outs)


@pytest.mark.distributed
@pytest.mark.slow
def test_colocated_two_trainers_ddp_staleness2_converges(tmp_path, baseline):
    out = str(tmp_path / "colo")
    outs = _run(_torchrun(2, "train", out, ["--staleness", "2"]))
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    r0, r1 = _load(out, 0), _load(out, 1)
    assert abs(r0["auc"] - baseline["auc"]) <= 0.01, (r0["auc"], baseline["auc"])
    assert r0["dense"] == r1["dense"]  # DDP kept the dense replicas in sync
    assert r0["keys"] == r0["len"] == baseline["keys"]
    assert r0["steps"] == r1["steps"] == baseline["steps"]


@pytest.mark.distributed
@pytest.mark.slow
def test_dedicated_server_two_trainers_ddp_staleness0_converges(tmp_path, baseline):
    out = str(tmp_path / "dedicated")
    outs = _run(_torchrun(3, "train", out, ["--staleness", "0", "--num-servers", "1"]))
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    assert not os.path.exists(f"{out}.0")  # the server's init never returned into the script
    r1, r2 = _load(out, 1), _load(out, 2)
    assert (r1["trainer_rank"], r2["trainer_rank"]) == (0, 1)
    assert abs(r1["auc"] - baseline["auc"]) <= 0.01, (r1["auc"], baseline["auc"])
    assert r1["dense"] == r2["dense"]
    assert r1["keys"] == baseline["keys"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", "rpc"])
def test_killed_rank_is_named_and_the_others_exit_nonzero(tmp_path, transport):
    out = str(tmp_path / "fault")
    args = ["--kill-rank", "2", "--rpc-timeout", "10", "--step-sleep", "0.05", "--epochs", "50", "--transport",
            transport]
    outs = _run(_by_hand(3, "train", out, args))
    assert outs["rank2"][0] == -signal.SIGKILL, _show(outs)
    for name in ("rank0", "rank1"):
        rc, text = outs[name]
        assert rc is not None, f"{name} hung\n" + _show(outs)
        assert rc != 0, _show(outs)
        assert "PeerUnavailableError: rank 2 is unavailable" in text, _show(outs)


def _netns_unavailable() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2)"
    name = f"psechk{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


@pytest.mark.distributed
@pytest.mark.slow
def test_two_hosts_in_network_namespaces(tmp_path, baseline):
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:5]
    ns = [f"pse{tag}a", f"pse{tag}b"]
    dev = [f"pv{tag}a", f"pv{tag}b"]
    addr = ["10.200.0.1", "10.200.0.2"]

    def ip(*a):
        subprocess.run(["ip", *a], check=True, capture_output=True)

    out = str(tmp_path / "twohost")
    try:
        for n in ns:
            ip("netns", "add", n)
        ip("link", "add", dev[0], "type", "veth", "peer", "name", dev[1])
        for i in range(2):
            ip("link", "set", dev[i], "netns", ns[i])
            ip("-n", ns[i], "addr", "add", f"{addr[i]}/24", "dev", dev[i])
            ip("-n", ns[i], "link", "set", dev[i], "up")
            ip("-n", ns[i], "link", "set", "lo", "up")
        port = 29400 + int(tag, 16) % 2000  # namespaces are fresh: every port is free there
        specs = []
        for i in range(2):
            cmd = ["ip", "netns", "exec", ns[i], sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                   "--node_rank", str(i), "--nproc_per_node", "1", "--master_addr", addr[0],
                   "--master_port", str(port), WORKER, "train", out, "--num-servers", "1", "--staleness", "0"]
            env = child_env({"GLOO_SOCKET_IFNAME": dev[i], "TP_SOCKET_IFNAME": dev[i]})
            specs.append((cmd, env, f"node{i}"))
        outs = _run(specs)
    finally:
        for n in ns:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
    assert all(rc == 0 for rc, _ in outs.values()), _show(outs)
    r = _load(out, 1)  # the trainer, on the second host
    # one trainer + one server at staleness 0 is the single-process run, bit for bit
    assert r["auc"] == baseline["auc"]
    assert r["pred_head"] == baseline["pred_head"]
    assert r["keys"] == baseline["keys"]


@pytest.mark.parametrize("k", [0, 1])
def test_pushes_back_to_back_and_after_a_collective(k):
    # Regression: a push right after another push (staleness 0) or after a collective (which drains every
    # step) found the step bookkeeping empty but still marked open, and raised IndexError.
    t, tr = _sharded(num_servers=2, max_staleness=k)
    local = _C.Table(_cfg().to_dict())
    rng = np.random.default_rng(1)
    universe = rng.integers(0, 2**40, size=50, dtype=np.int64)
    for _ in range(2):
        batch = _batch(rng, universe, 40, 3)
        t.push(*batch)
        local.push(*batch)
    t.shrink()
    local.shrink()
    batch = _batch(rng, universe, 40, 3)
    t.push(*batch)
    local.push(*batch)
    t.flush()
    np.testing.assert_array_equal(t.pull(universe, True), local.pull(universe, True))


def test_push_checks_slots_before_sending_any_part():
    # A server refuses a slot no checkpoint can hold; checked by the trainer first, or the other servers'
    # parts would be applied while one refused (found by an audit, session 24).
    t, tr = _sharded(num_servers=2)
    k = np.arange(1000, 1020, dtype=np.int64)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 16777216\).*slots\[3\] = -2"):
        t.push(k, np.zeros((20, 4), np.float32), np.ones(20, np.float32), np.zeros(20, np.float32),
               np.where(np.arange(20) == 3, -2, 1).astype(np.int32))
    assert tr.pending == 0 and len(t) == 0


def _keys_on(owner, count, num_servers=2):
    u = np.arange(1, 400, dtype=np.int64)
    return u[_C.route(u, num_servers) == owner][:count]


@pytest.mark.parametrize("k", [0, 1])
def test_finite_rows_summing_past_float32_are_merged_as_a_local_table_merges_them(k):
    # Two gradients (or shows) of 3e38 for one key sum to inf in float32: the trainer's merge sent the inf, the
    # owning server refused it after the other server applied its part (found by an audit, session 25). The
    # merge now saturates at FLT_MAX as the table's own merge does.
    (a,), (b,) = _keys_on(0, 1), _keys_on(1, 1)
    keys = np.array([a, b, b], np.int64)
    for big in ("grads", "shows"):
        t, tr = _sharded(num_servers=2, max_staleness=k)
        local = _C.Table(_cfg(3).to_dict())
        g = np.ones((3, 4), np.float32)
        s = np.ones(3, np.float32)
        if big == "grads":
            g[1:, 0] = 3e38
        else:
            s[1:] = 3e38
        c = np.zeros(3, np.float32)
        assert t.push(keys, g, s, c) == local.push(keys, g, s, c) == 0
        t.flush()
        np.testing.assert_array_equal(t.pull(keys, True), local.pull(keys, True))
        assert len(t) == 2 and t.stats()["rejected"] == 0
    merged = _C.merge_push(np.array([0, 0, 1]), 2, np.full((3, 2), 3e38, np.float32),
                           np.array([3e38, 3e38, 1], np.float32), np.zeros(3, np.float32))
    assert merged[0][0].tolist() == [np.finfo(np.float32).max] * 2 and merged[1][0] == np.finfo(np.float32).max


def test_an_older_push_failing_never_leaves_a_later_push_half_sent():
    # With the in-flight bound reached, the next push waited for the oldest between two of its own parts: an
    # error of that older push was raised with server 0's part of the new push applied and server 1's never
    # sent (found by an audit, session 25). Now a push makes room for all its parts before sending any.
    class FailingFirstPushTo1(MemoryTransport):
        def push(self, s, table, keys, *rest):
            h = super().push(s, table, keys, *rest)
            if s == 1 and not getattr(self, "failed", False):
                self.failed = True
                return DoneHandle(error=ValueError("server 1 refused push 1"))
            return h

    tr = FailingFirstPushTo1(2)
    t = ShardedTable("t", _cfg(3), tr, 2, 0, 1, lambda: None, max_inflight=2)
    a, b = _keys_on(0, 2), _keys_on(1, 2)
    ones, zeros = np.ones(2, np.float32), np.zeros(2, np.float32)
    t.push(np.array([a[0], b[0]]), np.ones((2, 4), np.float32), ones, zeros)  # push 1: server 1 refuses it
    with pytest.raises(ValueError, match="server 1 refused push 1"):
        t.push(np.array([a[1], b[1]]), np.ones((2, 4), np.float32), ones, zeros)  # push 2: raises push 1's error
    t.flush()
    present = [int(x) in t for x in (a[1], b[1])]
    assert present in ([False, False], [True, True]), present  # push 2 whole or not at all


def test_collective_returns_only_after_every_server_ended_its_part():
    # call_all stopped at the first server's error while the others still ran the operation, so the trainers
    # went on with a failed load or save still running (found by an audit, session 25).
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(3)
    finished = []

    class FutureHandle(Handle):
        def __init__(self, f):
            self.f = f

        def wait(self):
            return self.f.result()

        def done(self):
            return self.f.done()

    class Concurrent(MemoryTransport):
        def call(self, s, table, fn, args=()):
            return FutureHandle(pool.submit(fn, self.tables[(s, table)], s, self.num_servers, *args))

    tr = Concurrent(3)
    t = ShardedTable("t", _cfg(3), tr, 1, 0, 1, lambda: None)
    with pytest.raises(ValueError, match="server 0: corrupt part"):
        t.collective(_fail_on_server_0_others_slow, finished)
    assert sorted(finished) == [1, 2]  # both slow servers had ended when the collective raised
    pool.shutdown()


def _fail_on_server_0_others_slow(table, server, num_servers, finished):
    if server == 0:
        raise ValueError("server 0: corrupt part")
    time.sleep(0.5)
    finished.append(server)
    return 1


def test_a_failed_request_does_not_leave_the_rest_of_its_step_unwaited():
    # _wait_steps stopped at a step's first failed request: the step's other requests were never waited for,
    # so their errors were lost and a later flush returned while they were still in flight (audit, session 25)
    class FailingPushTo0(MemoryTransport):
        def push(self, s, table, keys, *rest):
            return DoneHandle(error=ValueError("server 0 refused")) if s == 0 else super().push(s, table, keys, *rest)

    tr = FailingPushTo0(2)
    t = ShardedTable("t", _cfg(3), tr, 1, 0, 1, lambda: None)
    (a,), (b,) = _keys_on(0, 1), _keys_on(1, 1)
    t.push(np.array([a, b]), np.ones((2, 4), np.float32), np.ones(2, np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="server 0 refused"):
        t.flush()
    assert tr.pending == 0 and int(b) in t  # server 1's request was waited for (applied), not dropped


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_staleness_window_counts_steps_without_pushes(k, prefetch):
    # Steps were counted by their pushes: after a pull-only step (an evaluation batch) the next pull could
    # still miss the push of step t-k-1 (found by an audit, session 25). Every pull now ends a step.
    rng = np.random.default_rng(11)
    universe = np.arange(1, 100, dtype=np.int64)
    pushes = rng.random(40) < 0.5
    t, tr = _prefetching(k)
    for step in range(40):
        _settle(t)
        t.pull(universe[:10])
        for old in range(step - k):  # steps t-k-1 and earlier, pushing or not
            if pushes[old]:
                assert old in tr.applied, (step, old)
        if prefetch:  # right after the pull, as --prefetch does: the same window
            t.prefetch(universe[:10])
        if pushes[step]:
            tr.step_tag = step
            t.push(*_batch(rng, universe, 16, 3))
    t.flush()
    assert tr.pending == 0 and set(tr.applied) == {s for s in range(40) if pushes[s]}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_pushes_go_on_after_a_push_error_raised_by_flush(k):
    # With max_staleness >= 1, a push error raised by flush() (a server's MemoryError, which the job may
    # survive: the connection goes on) left no step but the step marked open: every later push raised
    # IndexError and sent nothing until the next pull (found by an audit, session 26).
    class OomOnce(MemoryTransport):
        def push(self, s, table, *rest):
            if not getattr(self, "failed", False):
                self.failed = True
                return DoneHandle(error=MemoryError("the data server ran out of memory (raised by rank 0)"))
            return super().push(s, table, *rest)

    tr = OomOnce(1)  # one server: the failed push applied nothing
    t = ShardedTable("t", _cfg(3), tr, k, 0, 1, lambda: None)
    keys = np.array([1, 2, 3], np.int64)
    args = (np.ones((3, 4), np.float32), np.ones(3, np.float32), np.zeros(3, np.float32))
    if k == 0:  # the error comes from the push itself there (it waits for its own requests)
        with pytest.raises(MemoryError, match="ran out of memory"):
            t.push(keys, *args)
    else:
        t.push(keys, *args)
        with pytest.raises(MemoryError, match="ran out of memory"):
            t.flush()
    for _ in range(3):
        t.push(keys, *args)  # no pull in between
    t.flush()
    assert tr.pending == 0 and t._inflight == 0
    assert t.pull(keys, with_stats=True)[:, 0].tolist() == [3.0, 3.0, 3.0]  # shows: the 3 later pushes


class _Waited(Handle):
    """A reply that records being waited for; ``error`` makes it fail."""

    def __init__(self, value, error, log, server):
        self.value, self.error, self.log, self.server = value, error, log, server

    def wait(self):
        self.log.append(self.server)
        if self.error is not None:
            raise self.error
        return self.value

    def done(self):
        return True


class _PullErrors(MemoryTransport):
    """Pulls answered by ``_Waited`` handles; ``errors[s]`` makes server s's pull fail."""

    def __init__(self, num_servers, errors, local_server=None):
        super().__init__(num_servers)
        self.errors, self.local_server, self.waited = errors, local_server, []

    def pull(self, s, table, keys, with_stats):
        rows = self.tables[(s, table)].pull(keys, with_stats)
        return _Waited(rows, self.errors.get(s), self.waited, s)


@pytest.mark.parametrize("local", [None, 1], ids=["remote", "local-part-fails"])
def test_a_failed_pull_part_waits_for_every_other_part(local):
    # A pull stopped at its first failed part (a server's MemoryError: the connection goes on): the other
    # servers' replies were never waited for, left in their channels (found by an audit, session 26). Same when
    # this rank's own part (colocated layout) failed after the remote requests were sent.
    failing = 0 if local is None else local
    tr = _PullErrors(3, {failing: MemoryError(f"out of memory (raised by rank {failing})")}, local)
    t = ShardedTable("t", _cfg(3), tr, 1, 0, 1, lambda: None)
    keys = np.arange(1, 300, dtype=np.int64)
    with pytest.raises(MemoryError, match=f"raised by rank {failing}"):
        t.pull(keys)
    assert sorted(tr.waited) == [0, 1, 2], tr.waited  # every part was waited for before the error came
    # a peer's unavailability is raised before another error (it explains the rest)
    tr.errors[2] = PeerUnavailableError("rank 2 is unavailable: pull failed", rank=2)
    with pytest.raises(PeerUnavailableError, match="rank 2 is unavailable"):
        t.pull(keys)
    tr.errors.clear()
    assert t.pull(keys).shape == (keys.size, 4)
