"""The _C.Table contract (docs/architecture.md): API shape, validation, unsigned keys, counters, lifecycle.

Numerics of the update rules are checked against numpy references in tests/test_table_numerics.py;
this file checks the surface: shapes, every validation error (and that a refused call changed nothing),
key semantics, stats counters, end_day idempotency and the export/commit/load/erase round trip.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from torch_psembed import _C
from torch_psembed.config import FTRL, SGD, AdaGrad, Adam, CtrAccessorConfig, StdAdaGrad, TableConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import child_env, run_python  # noqa: E402
from reference.ctr_reference import uniform as ref_uniform  # noqa: E402  (independent of _C.uniform)

U64 = (1 << 64) - 1


def mix64_py(z: int) -> int:
    """Independent transcription of the splitmix64 finalizer."""
    z &= U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def uniform_py(seed: int, key: int, stream: int, i: int) -> float:
    x = (seed ^ mix64_py(key) ^ (((stream << 56) + i) & U64)) & U64
    x = mix64_py((x + 0x9E3779B97F4A7C15) & U64)
    return (x >> 40) * 2.0**-24


def push(t, keys, dim, g=1.0, show=1.0, click=0.0, slots=None):
    keys = np.asarray(keys, dtype=np.int64)
    n = len(keys)
    grads = np.full((n, 1 + dim), g, dtype=np.float32)
    return t.push(keys, grads, np.full(n, show, np.float32), np.full(n, click, np.float32), slots)


def snapshot(t):
    e = t.export("checkpoint")
    s = t.stats()
    return e, {k: v for k, v in s.items() if k != "pull_misses"}


def assert_same_snapshot(a, b):
    ea, sa = a
    eb, sb = b
    assert sa == sb
    for k in ("keys", "base", "has_mf", "mf", "tombstones"):
        np.testing.assert_array_equal(ea[k], eb[k])


# ----------------------------------------------------------------------------------------- basics


def test_version_and_module_functions():
    assert isinstance(_C.__version__, str) and _C.__version__.count(".") >= 1
    assert callable(_C.mix64) and callable(_C.route) and callable(_C.Table)


@pytest.mark.parametrize(
    "opt, state",
    [(SGD(), lambda d: 0), (AdaGrad(), lambda d: 1), (StdAdaGrad(), lambda d: d),
     (Adam(), lambda d: 2 * d + 2), (FTRL(), lambda d: 2 * d)],
)
def test_widths_follow_the_rules(opt, state):
    dim = 6
    t = _C.Table(TableConfig(dim=dim, lr_optimizer=opt, mf_optimizer=opt).to_dict())
    assert t.dim == dim
    assert t.lr_state_dim == state(1)
    assert t.mf_state_dim == state(dim)
    assert t.base_width == 5 + 1 + state(1)
    assert t.mf_width == dim + state(dim)


def test_pull_shape_zeros_and_never_inserts(make_c_table):
    t = make_c_table(dim=4)
    keys = np.array([5, 6, 5], np.int64)
    out = t.pull(keys)
    assert out.shape == (3, 5) and out.dtype == np.float32 and not out.any()
    assert t.pull(keys, with_stats=True).shape == (3, 7)
    assert len(t) == 0 and 5 not in t
    assert t.stats()["pull_misses"] == 6
    assert t.pull(np.zeros(0, np.int64)).shape == (0, 5)


def test_push_inserts_and_merges_duplicates_in_one_call(make_c_table):
    a = make_c_table(dim=3, lr_optimizer=AdaGrad(initial_range=0.0), mf_optimizer=AdaGrad(initial_range=0.0))
    b = make_c_table(dim=3, lr_optimizer=AdaGrad(initial_range=0.0), mf_optimizer=AdaGrad(initial_range=0.0))
    g1 = np.array([[1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5]], np.float32)
    a.push(np.array([9, 9], np.int64), g1, np.array([1, 2], np.float32), np.array([0, 1], np.float32),
           np.array([3, 4], np.int32))
    b.push(np.array([9], np.int64), g1.sum(0, keepdims=True), np.array([3], np.float32),
           np.array([1], np.float32), np.array([4], np.int32))
    np.testing.assert_array_equal(a.pull(np.array([9], np.int64), True), b.pull(np.array([9], np.int64), True))
    ea, eb = a.export("checkpoint"), b.export("checkpoint")
    np.testing.assert_array_equal(ea["base"], eb["base"])
    assert ea["base"][0, 4] == 4  # last slot wins
    assert a.stats()["inserts"] == 1 and len(a) == 1


def test_push_without_slots_keeps_slot(make_c_table):
    t = make_c_table(dim=2)
    push(t, [1], 2, slots=np.array([7], np.int32))
    push(t, [1], 2)
    assert t.export("checkpoint")["base"][0, 4] == 7
    t2 = make_c_table(dim=2)
    push(t2, [1], 2)
    assert t2.export("checkpoint")["base"][0, 4] == -1  # a row without a slot yet


# ------------------------------------------------------------------------------------- validation


def _filled(make_c_table, **kw):
    t = make_c_table(dim=4, accessor=CtrAccessorConfig(embedx_threshold=0.0), **kw)
    push(t, [1, 2, 3], 4, show=2.0, click=1.0)
    return t


def _good(n=3, dim=4):
    return (np.arange(n, dtype=np.int64), np.ones((n, dim + 1), np.float32), np.ones(n, np.float32),
            np.zeros(n, np.float32))


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda a: (a[0].astype(np.int32),) + a[1:], TypeError, ["keys", "int64"]),
        (lambda a: (a[0].astype(np.float64),) + a[1:], TypeError, ["keys", "int64"]),
        (lambda a: (a[0].tolist(),) + a[1:], TypeError, ["keys"]),
        (lambda a: (a[0].reshape(3, 1),) + a[1:], ValueError, ["keys", "1-D"]),
        (lambda a: (np.arange(6, dtype=np.int64)[::2],) + a[1:], ValueError, ["keys", "contiguous"]),
        (lambda a: (a[0], a[1].astype(np.float64)) + a[2:], TypeError, ["grads", "float32"]),
        (lambda a: (a[0], a[1][:, :4].copy()) + a[2:], ValueError,
         ["grads must have shape [n, 5] (n = len(keys) = 3), got [3, 4]"]),
        (lambda a: (a[0], np.asfortranarray(np.ones((3, 5), np.float32))) + a[2:], ValueError,
         ["grads", "contiguous"]),
        (lambda a: (a[0], a[1][:2].copy()) + a[2:], ValueError, ["grads", "[2, 5]"]),
        (lambda a: a[:2] + (a[2][:2].copy(), a[3]), ValueError, ["shows", "length 3"]),
        (lambda a: a[:3] + (a[3].astype(np.int32),), TypeError, ["clicks", "float32"]),
        (lambda a: a[:2] + (np.array([1, -1, 1], np.float32), a[3]), ValueError, ["shows", "shows[1]"]),
        (lambda a: a[:2] + (np.array([1, np.nan, 1], np.float32), a[3]), ValueError, ["shows[1]"]),
        (lambda a: a[:2] + (np.array([1, np.inf, 1], np.float32), a[3]), ValueError, ["shows[1]"]),
        (lambda a: a[:3] + (np.array([0, 0, np.nan], np.float32),), ValueError, ["clicks[2]"]),
        (lambda a: a[:3] + (np.array([0, 0, -2], np.float32),), ValueError, ["clicks[2]"]),
    ],
)
def test_push_validation_refuses_and_changes_nothing(make_c_table, mutate, exc, words):
    t = _filled(make_c_table)
    before = snapshot(t)
    with pytest.raises(exc) as info:
        t.push(*mutate(_good()))
    for w in words:
        assert w in str(info.value)
    assert_same_snapshot(before, snapshot(t))


# Shows and clicks pass a vectorized check on their bits first, and only a failing chunk is searched for
# the first bad value: both must agree on what is bad (not finite, or < 0) at any position.
_BAD_COUNTS = [np.nan, -np.nan, np.inf, -np.inf, -1.0, -np.float32(1e-45), -np.finfo(np.float32).max]
_GOOD_COUNTS = [0.0, -0.0, np.float32(1e-45), np.finfo(np.float32).max]


@pytest.mark.parametrize("column", [2, 3], ids=["shows", "clicks"])
def test_push_count_checks_reject_exactly_the_bad_values(make_c_table, column):
    name = "shows" if column == 2 else "clicks"
    n = 10_000  # several chunks when the table has threads
    t = make_c_table(dim=4, accessor=CtrAccessorConfig(embedx_threshold=1e30))
    for pos in (5, n - 3):
        for v in _GOOD_COUNTS:
            args = list(_good(n))
            args[column][pos] = v
            t.push(*args)
        for v in _BAD_COUNTS:
            args = list(_good(n))
            args[column][pos] = v
            before = snapshot(t)
            with pytest.raises(ValueError, match=rf"{name}\[{pos}\]"):
                t.push(*args)
            assert_same_snapshot(before, snapshot(t))
    assert len(t) == n


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_grads_raise_naming_grads_and_row(make_c_table, bad):
    t = _filled(make_c_table)
    before = snapshot(t)
    k, g, s, c = _good()
    g[2, 3] = bad
    with pytest.raises(ValueError, match=r"grads.*row 2"):
        t.push(k, g, s, c)
    assert_same_snapshot(before, snapshot(t))


def test_a_big_push_names_the_first_bad_value_whichever_chunk_holds_it(make_c_table):
    # Past 8,192 values the checks run in chunks on the pool: the error must still name the first bad
    # index of the whole push (the later one sits in an earlier-finishing chunk just as likely), and the
    # table must not change.
    t = make_c_table(dim=4, num_threads=4)
    n = 40_000
    keys = np.arange(1, n + 1, dtype=np.int64)
    grads, shows, clicks = np.zeros((n, 5), np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    t.push(keys[:100], grads[:100], shows[:100], clicks[:100])
    before = snapshot(t)
    cases = [("shows", (shows, [35_000, 12_345]), r"shows\[12345\] = -1"),
             ("clicks", (clicks, [39_999, 20_001]), r"clicks\[20001\] = -1"),
             ("grads", (grads, [30_000, 10_002]), r"grads has NaN/Inf in row 10002 \(key 10003\)")]
    for name, (arr, rows), msg in cases:
        bad = arr.copy()
        for r in rows:
            if bad.ndim == 2:
                bad[r, 1] = np.nan
            else:
                bad[r] = -1.0
        args = {"shows": shows, "clicks": clicks, "grads": grads, name: bad}
        with pytest.raises(ValueError, match=msg):
            t.push(keys, args["grads"], args["shows"], args["clicks"])
        assert_same_snapshot(before, snapshot(t))


def test_slots_validation(make_c_table):
    t = _filled(make_c_table)
    before = snapshot(t)
    with pytest.raises(TypeError, match="slots"):
        t.push(*_good(), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="slots"):
        t.push(*_good(), np.zeros(2, np.int32))
    assert_same_snapshot(before, snapshot(t))


def test_nan_policy_skip_drops_rows_and_counts(make_c_table):
    t = make_c_table(dim=4, nan_policy="skip")
    k, g, s, c = _good(4)
    g[1, 0] = np.nan
    g[3, 2] = np.inf
    assert t.push(k, g, s, c) == 2
    assert sorted(t.export("checkpoint")["keys"].tolist()) == [0, 2]
    assert t.stats()["rejected"] == 2
    # A skipped row does not contribute to a duplicate key either.
    k2 = np.array([7, 7], np.int64)
    g2 = np.ones((2, 5), np.float32)
    g2[0, 0] = np.nan
    assert t.push(k2, g2, np.ones(2, np.float32), np.zeros(2, np.float32)) == 1
    assert t.pull(k2[:1], with_stats=True)[0, 0] == 1.0
    assert t.stats()["rejected"] == 3


def test_pull_validation(make_c_table):
    t = make_c_table()
    with pytest.raises(TypeError, match="keys must have dtype int64"):
        t.pull(np.zeros(3, np.uint32))
    with pytest.raises(ValueError, match="contiguous"):
        t.pull(np.zeros(6, np.int64)[::2])
    with pytest.raises(TypeError, match="keys"):
        t.pull([1, 2])
    assert t.stats()["pull_misses"] == 0


@pytest.mark.parametrize(
    "patch, exc, words",
    [
        (lambda d: d["mf_optimizer"].update(name="rmsprop"), ValueError, ["mf_optimizer", "rmsprop"]),
        (lambda d: d.update(dim=0), ValueError, ["dim"]),
        (lambda d: d.update(num_shards=0), ValueError, ["num_shards"]),
        (lambda d: d.update(nan_policy="ignore"), ValueError, ["nan_policy"]),
        (lambda d: d.update(spin_wait_us=-1), ValueError, ["spin_wait_us"]),
        (lambda d: d.update(spin_wait_us=True), TypeError, ["spin_wait_us"]),
        (lambda d: d.update(max_keys=d["num_shards"] - 1), ValueError, ["max_keys"]),
        (lambda d: d.update(max_keys=2.0e6), TypeError, ["max_keys"]),
        (lambda d: d.update(extra=1), ValueError, ["extra"]),
        (lambda d: d["accessor"].update(nonclk_coef=0.1), ValueError, ["nonclk_coef"]),
        (lambda d: d["accessor"].update(show_click_decay_rate=1.5), ValueError, ["show_click_decay_rate"]),
        (lambda d: d["lr_optimizer"].update(weight_bounds=[1.0, -1.0]), ValueError, ["weight_bounds"]),
        (lambda d: d["lr_optimizer"].update(initial_g2sum=0.0), ValueError, ["initial_g2sum"]),
        (lambda d: d.update(dim="8"), TypeError, ["dim"]),
        (lambda d: d.update(seed=-1), ValueError, ["seed"]),
        (lambda d: d.pop("dim"), ValueError, ["dim"]),
    ],
)
def test_config_validation(patch, exc, words):
    d = TableConfig(dim=4).to_dict()
    patch(d)
    with pytest.raises(exc) as info:
        _C.Table(d)
    for w in words:
        assert w in str(info.value)
    with pytest.raises(TypeError):
        _C.Table([("dim", 4)])


@pytest.mark.parametrize("bad", [-1, 1_000_001, 2.5, True, "50"])
def test_table_config_refuses_a_bad_spin_wait(bad):
    with pytest.raises(ValueError, match="spin_wait_us"):
        TableConfig(spin_wait_us=bad)


def test_table_config_spin_wait_round_trips():
    cfg = TableConfig(spin_wait_us=50)
    assert cfg.to_dict()["spin_wait_us"] == 50
    assert TableConfig.from_dict(cfg.to_dict()) == cfg
    old = TableConfig().to_dict()
    del old["spin_wait_us"]  # a manifest written before the option existed
    assert TableConfig.from_dict(old).spin_wait_us == 0


@pytest.mark.parametrize("bad", [63, 0, -1, 2**63, 1e6, True, "1000"])
def test_table_config_refuses_a_bad_max_keys(bad):
    with pytest.raises(ValueError, match="max_keys"):
        TableConfig(num_shards=64, max_keys=bad)


def test_table_config_max_keys_round_trips():
    cfg = TableConfig(num_shards=8, max_keys=8)
    assert cfg.to_dict()["max_keys"] == 8
    assert TableConfig.from_dict(cfg.to_dict()) == cfg
    old = TableConfig().to_dict()
    del old["max_keys"]  # a manifest written before the option existed
    assert TableConfig.from_dict(old).max_keys is None
    _C.Table(old)  # and the table takes a dict without it: no bound


def test_all_rules_accept_their_to_dict():
    for opt in (SGD(), AdaGrad(), StdAdaGrad(), Adam(), FTRL(l1=0.1, alpha=0.2)):
        t = _C.Table(TableConfig(dim=3, lr_optimizer=opt, mf_optimizer=opt,
                                 accessor=CtrAccessorConfig(embedx_threshold=0)).to_dict())
        push(t, [1, 2], 3)
        push(t, [1, 2], 3)
        assert t.stats()["keys_with_mf"] == 2
        assert np.isfinite(t.pull(np.array([1, 2], np.int64))).all()


# ------------------------------------------------------------------------------------ key semantics


def test_mix64_golden_values():
    keys = np.array([0, 1, -1, 2**63 - 1, -(2**63), 123456789], np.int64)
    golden = [0, 6238072747940578789, 13029008266876403067, 6514504133438201533, 2720858781877447050,
              17445968401720671584]
    got = _C.mix64(keys)
    assert got.dtype == np.int64
    assert got.view(np.uint64).tolist() == golden
    assert [mix64_py(int(k)) for k in keys] == golden


def test_route_is_unsigned_mix64_mod():
    rng = np.random.default_rng(0)
    keys = rng.integers(-(2**63), 2**63 - 1, size=2000, dtype=np.int64)
    keys[:3] = [0, -1, -(2**63)]
    for parts in (1, 2, 3, 7, 64):
        r = _C.route(keys, parts)
        assert r.dtype == np.int32
        assert r.tolist() == [mix64_py(int(k)) % parts for k in keys]
    with pytest.raises(ValueError, match="num_parts"):
        _C.route(keys, 0)


def test_counter_rng_transcription():
    keys = np.array([0, 5, -1], np.int64)
    for seed, stream, i in [(0, 1, 0), (42, 2, 3), (2**64 - 1, 3, 7)]:
        got = _C.uniform(seed, keys, stream, i)
        assert got.tolist() == [uniform_py(seed, int(k), stream, i) for k in keys]
        assert ((got >= 0) & (got < 1)).all()


def test_negative_ids_are_unsigned_feasigns(make_c_table):
    t = make_c_table(dim=2)
    push(t, [-1, 1, -(2**63), 0], 2)
    assert -1 in t and (2**64 - 1) in t and 2**63 in t and 0 in t
    assert 2 not in t and 2**64 not in t and -(2**63) - 1 not in t and "x" not in t
    keys = t.export("checkpoint")["keys"]
    assert keys.view(np.uint64).tolist() == sorted([2**64 - 1, 1, 2**63, 0])  # sorted as uint64
    assert t.erase(np.array([-1], np.int64)) == 1 and (2**64 - 1) not in t


# --------------------------------------------------------------------------------- stats, lifecycle


def test_stats_counters(make_c_table):
    acc = CtrAccessorConfig(embedx_threshold=1.0, delete_threshold=0.5, show_click_decay_rate=1.0,
                            nonclk_coeff=0.1, click_coeff=1.0)
    t = make_c_table(dim=4, accessor=acc)
    s = t.stats()
    assert set(s) == {"keys", "keys_with_mf", "bytes", "pull_misses", "inserts", "mf_created", "deleted",
                      "rejected", "admission_rejected", "capacity_rejected"}
    assert s["keys"] == 0 and s["inserts"] == 0
    push(t, [1, 2, 3], 4, show=1.0, click=0.0)   # score 0.1: no mf
    push(t, [1], 4, show=1.0, click=1.0)         # key 1 score 0.1 + 1.0 >= 1: mf created
    s = t.stats()
    assert (s["keys"], s["inserts"], s["keys_with_mf"], s["mf_created"]) == (3, 3, 1, 1)
    assert s["bytes"] > 0
    assert t.shrink() == 2  # keys 2, 3 have score 0.1 < 0.5
    s = t.stats()
    assert (s["keys"], s["deleted"], s["keys_with_mf"]) == (1, 2, 1)
    assert sorted(t.export("checkpoint")["tombstones"].tolist()) == [2, 3]


def test_admission_counts_and_is_deterministic(make_c_table):
    acc = CtrAccessorConfig(create_probability_from_score=True, embedx_threshold=100.0)
    tables = [make_c_table(dim=2, accessor=acc, seed=5, num_threads=n) for n in (1, 2)]
    keys = np.arange(5000, dtype=np.int64)
    for t in tables:
        push(t, keys, 2, show=0.0, click=0.0)  # s = 0: always rejected
        assert len(t) == 0 and t.stats()["admission_rejected"] == 5000
        push(t, keys[:10], 2, show=1.0, click=1.0)  # s = 1: always admitted
        assert len(t) == 10
        push(t, keys[10:], 2, show=1.0, click=0.0)  # s = 0.1, the third push: admitted iff u(seed, key, 3, 2) < 0.1
    expected = {int(k) for k in keys[10:] if uniform_py(5, int(k), 3, 2) < 0.1}
    for t in tables:
        got = set(t.export("checkpoint")["keys"].tolist()) - set(range(10))
        assert got == expected
        assert t.stats()["admission_rejected"] == 5000 + (4990 - len(expected))
    assert 300 < len(expected) < 700


def test_many_shards_partition_with_fewer_chunks_and_the_same_bits(make_c_table):
    # Past 65,536 (chunk, shard) counters a call cuts one chunk per thread, not four (SparseTable::Chunks):
    # 4,096 shards on 8 threads take that path, 1 thread the one-chunk path; both give the same rows.
    rng = np.random.default_rng(12)
    keys = rng.integers(0, 30000, 40000).astype(np.int64)
    grads = rng.normal(size=(40000, 3)).astype(np.float32)
    ones, zeros = np.ones(40000, np.float32), np.zeros(40000, np.float32)
    tables = [make_c_table(dim=2, num_shards=4096, num_threads=n, accessor=CtrAccessorConfig(embedx_threshold=0.5))
              for n in (1, 8)]
    for t in tables:
        t.push(keys, grads, ones, zeros, None)
        t.push(keys[::-1].copy(), grads, ones, zeros, None)
    universe = np.arange(30000, dtype=np.int64)
    np.testing.assert_array_equal(tables[0].pull(universe, True), tables[1].pull(universe, True))


def test_max_keys_bounds_the_rows_and_counts_the_keys_left_out(make_c_table):
    # 8 shards of max_keys // 8 = 100 rows. Every shard gets ~1,000 of the 8,000 new keys, so every shard
    # fills: exactly 800 rows, the same ones on 1 and 2 threads (each shard takes its keys in input order).
    tables = [make_c_table(dim=2, num_shards=8, max_keys=807, num_threads=n) for n in (1, 2)]
    keys = np.random.default_rng(4).permutation(np.arange(1, 8001, dtype=np.int64))
    for t in tables:
        push(t, keys, 2, g=-1.0)
        s = t.stats()
        assert (len(t), s["inserts"], s["capacity_rejected"], s["admission_rejected"]) == (800, 800, 7200, 0)
    kept = tables[0].export("checkpoint")["keys"]
    np.testing.assert_array_equal(tables[1].export("checkpoint")["keys"], kept)
    t = tables[0]
    out = keys[~np.isin(keys, kept)]
    # Rows in the table keep training; keys left out stay out, read zeros, and are counted again.
    before = t.pull(kept)
    push(t, keys, 2, g=-1.0)
    assert np.all(t.pull(kept)[:, 0] > before[:, 0])
    assert not t.pull(out).any()
    assert all(int(k) not in t for k in out[:50])
    assert (len(t), t.stats()["capacity_rejected"]) == (800, 14400)


def test_max_keys_room_comes_back_when_rows_are_deleted(make_c_table):
    acc = CtrAccessorConfig(delete_threshold=0.5, show_click_decay_rate=1.0)  # S = 0.1 * show
    t = make_c_table(dim=2, accessor=acc, num_shards=4, max_keys=400)
    push(t, np.arange(1, 2001), 2, show=1.0)  # S = 0.1: deleted by the next shrink
    assert len(t) == 400
    keep = t.export("checkpoint")["keys"][:100]
    push(t, keep, 2, show=10.0)  # S >= 1: survives the shrink
    assert t.shrink() == 300 and len(t) == 100
    push(t, np.arange(5001, 9001), 2, show=1.0)
    assert len(t) == 400 and set(keep.tolist()) <= set(t.export("checkpoint")["keys"].tolist())
    assert t.stats()["inserts"] == 400 + 300


def test_max_keys_does_not_bound_a_load(tmp_path):
    import torch_psembed as pse

    src = pse.SparseTable(TableConfig(dim=2, num_shards=4))
    push(src, np.arange(1, 1001), 2)
    src.save(str(tmp_path / "ck"))
    dst = pse.SparseTable(TableConfig(dim=2, num_shards=4, max_keys=40))
    dst.load(str(tmp_path / "ck"))
    assert len(dst) == 1000  # a checkpoint loads whole
    push(dst, [5000], 2)
    assert 5000 not in dst and dst.stats()["capacity_rejected"] == 1


def test_big_calls_are_bitwise_the_same_on_any_number_of_threads(make_c_table):
    # Past 4,096 keys a call runs on the pool and partitions its keys by shard in chunks (up to four a thread),
    # each shard merging its run; on one thread a push merges the whole call in input order first
    # (csrc/table/push_merge.h). Every thread count, so both ways, must sum a key's duplicates in input order,
    # keep the last slot, skip the same NaN rows and pull the same rows, bit for bit; whether the pool's
    # threads poll or sleep between steps (spin_wait_us) changes nothing either.
    rng = np.random.default_rng(11)
    acc = CtrAccessorConfig(embedx_threshold=0.5)
    tables = [make_c_table(dim=4, accessor=acc, seed=3, num_threads=n, num_shards=8, nan_policy="skip",
                           spin_wait_us=spin)
              for n, spin in ((1, 50), (2, 50), (4, 50), (2, 0), (4, 100_000))]
    universe = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    for _ in range(3):
        n = 30_000
        keys = universe[rng.integers(0, universe.size, n)]
        grads = rng.standard_normal((n, 5)).astype(np.float32)
        grads[rng.random(n) < 0.01, 2] = np.nan
        shows = rng.integers(0, 3, n).astype(np.float32)
        clicks = (shows * (rng.random(n) < 0.3)).astype(np.float32)
        slots = rng.integers(0, 50, n).astype(np.int32)
        skipped = {t.push(keys, grads, shows, clicks, slots) for t in tables}
        assert len(skipped) == 1 and skipped.pop() > 0
    want = tables[0].export("checkpoint")
    probe = np.concatenate([universe, rng.integers(0, 2**62, 10_000, dtype=np.int64)])
    for t in tables[1:]:
        got = t.export("checkpoint")
        for col in ("keys", "base", "has_mf", "mf"):
            np.testing.assert_array_equal(got[col], want[col], err_msg=col)
        np.testing.assert_array_equal(t.pull(probe, True), tables[0].pull(probe, True))


def test_a_push_too_big_to_merge_whole_gives_the_same_bits(make_c_table):
    # On one thread a push of up to 2**19 keys is merged whole; a bigger one goes shard by shard, as on
    # several threads (csrc/table/sparse_table.cc, kMaxWholeCallMerge). All three ways, the same bits.
    rng = np.random.default_rng(5)
    tables = [make_c_table(dim=2, accessor=CtrAccessorConfig(embedx_threshold=0.5), seed=1, num_threads=n,
                           num_shards=8) for n in (1, 2)]
    universe = rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64)
    for n in (600_000, 20_000):  # past the bound, then under it
        keys = universe[rng.integers(0, universe.size, n)]
        grads = rng.standard_normal((n, 3)).astype(np.float32)
        shows = rng.integers(0, 3, n).astype(np.float32)
        clicks = (shows * (rng.random(n) < 0.3)).astype(np.float32)
        slots = rng.integers(0, 50, n).astype(np.int32)
        for t in tables:
            t.push(keys, grads, shows, clicks, slots)
    want, got = (t.export("checkpoint") for t in tables)
    assert want["keys"].size == universe.size
    for col in ("keys", "base", "has_mf", "mf"):
        np.testing.assert_array_equal(got[col], want[col], err_msg=col)


def test_admission_draw_index_is_the_push(make_c_table):
    """A key's draw in a push is u(seed, key, 3, push_id) (day 0): the table's own count of pushes, or the
    push_id the caller passes, so a key refused by one push draws again in the next, also after deletion."""
    acc = CtrAccessorConfig(create_probability_from_score=True, embedx_threshold=100.0)
    t = make_c_table(dim=2, accessor=acc, seed=11)
    cand = np.arange(20000, dtype=np.int64)
    u0 = ref_uniform(11, cand, 3, 0)
    u1 = ref_uniform(11, cand, 3, 1)
    in_then_out = cand[(u0 < 0.1) & (u1 >= 0.1)][:20]   # admitted by push 0, refused by push 1
    out_then_in = cand[(u0 >= 0.1) & (u1 < 0.1)][:20]   # refused by push 0, admitted by push 1
    keys = np.concatenate([in_then_out, out_then_in])
    push(t, keys, 2, show=1.0)  # score 0.1: push 0
    assert {int(k) for k in keys if k in t} == set(in_then_out.tolist())
    assert t.erase(in_then_out) == 20
    push(t, keys, 2, show=1.0)  # push 1 for every key
    assert {int(k) for k in keys if k in t} == set(out_then_in.tolist())
    assert t.stats()["admission_rejected"] == 40
    # an explicit push_id (a trainer's (trainer << 32) | count) is the draw index; the own count does not move
    pid = (3 << 32) | 7
    fresh = cand[20000 - 3000:]
    t.push(fresh, np.zeros((3000, 3), np.float32), np.ones(3000, np.float32), np.zeros(3000, np.float32),
           push_id=pid)
    expected = {int(k) for k in fresh[ref_uniform(11, fresh, 3, pid) < 0.1]}
    assert {int(k) for k in fresh if k in t} == expected
    more = cand[20000 - 6000 : 20000 - 3000]
    push(t, more, 2, show=1.0)  # own push 2
    assert {int(k) for k in more if k in t} == {int(k) for k in more[ref_uniform(11, more, 3, 2) < 0.1]}
    with pytest.raises(ValueError, match="push_id must be >= 0"):
        t.push(fresh[:1], np.zeros((1, 3), np.float32), np.ones(1, np.float32), np.zeros(1, np.float32), push_id=-1)


def test_admission_draw_index_moves_with_the_day(make_c_table):
    """Draw index i = (day_index << 48) | push_id: end_day moves day_index to day + 1 (0 before the first
    end_day); shrink and new_day do not."""
    acc = CtrAccessorConfig(create_probability_from_score=True, embedx_threshold=100.0, delete_threshold=0.0)
    t = make_c_table(dim=2, accessor=acc, seed=13)
    keys = np.arange(3000, dtype=np.int64)

    def draws(i):
        return np.array([uniform_py(13, int(k), 3, i) for k in keys])

    seen = set()
    for push_id, day_index in enumerate([0, 0, 1, 1, 5]):
        if day_index > 0:
            t.end_day(day_index - 1)  # a second end_day of the same day changes nothing
        before = set(t.export("checkpoint")["keys"].tolist())
        t.shrink()
        t.new_day()
        push(t, keys, 2, show=1.0)  # score 0.1
        got = set(t.export("checkpoint")["keys"].tolist()) - before
        u = draws((day_index << 48) | push_id)
        expected = {int(k) for k in keys[u < 0.1]} - before
        assert got == expected, (day_index, push_id)
        seen |= got
    assert len(seen) > 1000
    # setting the day (as a checkpoint restore does) moves the day index to day + 1
    t2 = make_c_table(dim=2, accessor=acc, seed=13)
    t2.day = 6
    push(t2, keys, 2, show=1.0)  # own push 0
    got = set(t2.export("checkpoint")["keys"].tolist())
    assert got == {int(k) for k in keys[ref_uniform(13, keys, 3, (7 << 48) | 0) < 0.1]}
    assert got != {int(k) for k in keys[ref_uniform(13, keys, 3, 0) < 0.1]}  # not the day-0 draws


def test_admission_keeps_no_state_for_rejected_keys(make_c_table):
    """Rejected keys cost no memory: a day of 200k fresh ids at score 0.1 leaves the table as big as one that
    was given only the admitted ids, and the same across days; admission is reproducible per seed and
    admits about s per push."""
    acc = CtrAccessorConfig(create_probability_from_score=True, embedx_threshold=100.0, delete_threshold=0.5)
    a, b = (make_c_table(dim=2, accessor=acc, seed=17, num_threads=n) for n in (1, 2))
    n, s = 200_000, 0.1  # one show, no click: score 0.1 (admitted rows are deleted at end_day: 0.1 < 0.5)
    day_bytes = []
    for day in range(4):
        keys = np.arange(n, dtype=np.int64) + (day + 1) * 10_000_000  # new ids every day
        for t in (a, b):
            push(t, keys, 2, show=1.0)
        frac = len(a) / n
        assert abs(frac - s) < 5 * np.sqrt(s * (1 - s) / n), (day, frac)
        admitted_keys = a.export("checkpoint")["keys"]
        np.testing.assert_array_equal(np.sort(admitted_keys), np.sort(b.export("checkpoint")["keys"]))
        day_bytes.append(a.stats()["bytes"])
        if day == 0:  # the same rows pushed without admission: the same bytes, nothing for the rejected
            only = make_c_table(dim=2, accessor=CtrAccessorConfig(embedx_threshold=100.0), seed=17, num_threads=1)
            push(only, admitted_keys, 2, show=1.0)
            assert only.stats()["bytes"] == day_bytes[0]
        admitted = len(a)
        assert a.end_day(day) == admitted
        assert len(a) == 0
        b.end_day(day)
        for t in (a, b):  # drain the deleted keys' tombstones, as a delta save would
            t.set_tombstones(np.zeros(0, np.int64))
    assert max(day_bytes[1:]) <= 1.2 * day_bytes[0], day_bytes
    assert a.stats()["admission_rejected"] == b.stats()["admission_rejected"]


def test_end_day_is_idempotent_and_decays_by_elapsed_days(make_c_table):
    acc = CtrAccessorConfig(show_click_decay_rate=0.5, delete_threshold=0.0, delete_after_unseen_days=30)
    t = make_c_table(dim=2, accessor=acc)
    assert t.day == -1
    push(t, [1], 2, show=8.0)
    assert t.end_day(3) == 0 and t.day == 3
    assert t.pull(np.array([1], np.int64), True)[0, 0] == 4.0  # first day: one day elapsed
    assert t.end_day(3) == 0
    assert t.pull(np.array([1], np.int64), True)[0, 0] == 4.0  # same day again: no-op
    t.end_day(5)
    e = t.export("checkpoint")
    assert e["base"][0, 0] == 1.0 and e["base"][0, 3] == 3  # 0.5**2, unseen 1 + 2
    with pytest.raises(ValueError, match="before"):
        t.end_day(4)
    assert t.day == 5
    # the setter (used when a checkpoint restores the day) moves the day end_day measures elapsed days from
    t.day = 10
    assert t.end_day(10) == 0  # now the same day: a no-op, no decay
    e = t.export("checkpoint")
    assert e["base"][0, 0] == 1.0 and e["base"][0, 3] == 3
    with pytest.raises(ValueError, match="before"):
        t.end_day(9)  # 9 is after the old day 5, but before the set day 10
    assert t.end_day(12) == 0 and t.day == 12
    e = t.export("checkpoint")
    assert e["base"][0, 0] == 0.25 and e["base"][0, 3] == 5  # two days elapsed from 10, not seven from 5


def test_new_day_and_unseen_deletion(make_c_table):
    acc = CtrAccessorConfig(show_click_decay_rate=1.0, delete_threshold=0.0, delete_after_unseen_days=1)
    t = make_c_table(dim=2, accessor=acc)
    push(t, [1, 2], 2)
    t.new_day()
    t.new_day()
    push(t, [2], 2)  # seen again: unseen_days back to 0
    assert t.export("checkpoint")["base"][:, 3].tolist() == [2, 0]
    assert t.shrink() == 1 and 1 not in t and 2 in t


# ------------------------------------------------------------------------------- export round trip


def test_export_commit_load_erase_round_trip(make_c_table):
    acc = CtrAccessorConfig(embedx_threshold=2.0, base_threshold=0.0, delta_threshold=0.05)
    t = make_c_table(dim=3, accessor=acc, seed=3)
    rng = np.random.default_rng(1)
    keys = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    for _ in range(3):
        g = rng.normal(size=(300, 4)).astype(np.float32)
        t.push(keys, g, np.ones(300, np.float32), (rng.random(300) < 0.3).astype(np.float32),
               rng.integers(0, 10, 300).astype(np.int32))
    e = t.export("checkpoint")
    assert e["keys"].view(np.uint64).tolist() == sorted(e["keys"].view(np.uint64).tolist())
    assert e["base"].shape == (300, t.base_width) and e["mf"].shape == (int(e["has_mf"].sum()), t.mf_width)
    assert 0 < e["has_mf"].sum() < 300

    t2 = make_c_table(dim=3, accessor=acc, seed=3)
    t2.load_rows(e["keys"], e["base"], e["has_mf"], e["mf"])
    e2 = t2.export("checkpoint")
    for k in ("keys", "base", "has_mf", "mf"):
        np.testing.assert_array_equal(e[k], e2[k])
    np.testing.assert_array_equal(t.pull(keys, True), t2.pull(keys, True))
    # Overwrite: loading a row without mf drops its mf block.
    i = int(np.flatnonzero(e["has_mf"])[0])
    t2.load_rows(e["keys"][i:i + 1], e["base"][i:i + 1], np.zeros(1, np.uint8), np.zeros((0, t.mf_width), np.float32))
    assert t2.stats()["keys_with_mf"] == e["has_mf"].sum() - 1

    # delta: commit subtracts the saved delta_score, so an immediate second delta is empty.
    d = t.export("delta")
    assert len(d["keys"]) == 300
    t.commit_save("delta", d["keys"], d["base"][:, 2].copy(), len(d["tombstones"]))
    assert len(t.export("delta")["keys"]) == 0
    assert (t.export("checkpoint")["base"][:, 2] == 0).all()
    push(t, keys[:5], 3)
    assert len(t.export("delta")["keys"]) == 5

    # erase: returns how many existed, appends no tombstone.
    assert t.erase(np.concatenate([keys[:10], np.array([12345], np.int64)])) == 10
    assert len(t) == 290 and len(t.export("checkpoint")["tombstones"]) == 0
    # serving: rows with mf only; buckets split the rows by mix64 % buckets.
    s = t.export("serving")
    assert s["has_mf"].all() and len(s["keys"]) == t.stats()["keys_with_mf"]
    parts = [t.export("checkpoint", buckets=3, bucket=b)["keys"] for b in range(3)]
    assert sum(len(p) for p in parts) == 290
    for b, p in enumerate(parts):
        assert all(mix64_py(int(k)) % 3 == b for k in p)
    t.clear()
    assert len(t) == 0 and t.stats()["keys_with_mf"] == 0


def test_base_commit_drops_all_tombstones(make_c_table):
    acc = CtrAccessorConfig(show_click_decay_rate=1.0, delete_threshold=1.0, base_threshold=0.0,
                            delta_threshold=0.0)
    t = make_c_table(dim=2, accessor=acc)
    push(t, [1, 2, 3], 2, show=1.0, click=0.0)
    push(t, [4], 2, show=1.0, click=1.0)
    assert t.shrink() == 3
    d = t.export("delta")
    assert sorted(d["tombstones"].tolist()) == [1, 2, 3] and d["pending_tombstones"] == 3
    t.commit_save("delta", d["keys"], d["base"][:, 2].copy(), 2)  # drops the first two
    assert len(t.export("delta")["tombstones"]) == 1
    b = t.export("base")
    assert len(b["tombstones"]) == 0 and b["pending_tombstones"] == 1  # a base carries none, drops those pending
    t.commit_save("base", b["keys"], b["base"][:, 2].copy(), b["pending_tombstones"])
    assert len(t.export("checkpoint")["tombstones"]) == 0
    t.commit_save("checkpoint", b["keys"], b["base"][:, 2].copy(), 0)  # no effect, no error


def test_export_commit_load_validation(make_c_table):
    t = make_c_table(dim=2)
    push(t, [1, 2], 2)
    before = snapshot(t)
    with pytest.raises(ValueError, match="mode"):
        t.export("full")
    with pytest.raises(ValueError, match="bucket"):
        t.export("checkpoint", buckets=2, bucket=2)
    with pytest.raises(ValueError, match="buckets"):
        t.export("checkpoint", buckets=0)
    with pytest.raises(ValueError, match="delta_scores"):
        t.commit_save("delta", np.array([1], np.int64), np.zeros(2, np.float32), 0)
    with pytest.raises(ValueError, match="tombstones"):
        t.commit_save("delta", np.array([1], np.int64), np.zeros(1, np.float32), -1)
    e = t.export("checkpoint")
    k, b, h, m = e["keys"], e["base"], e["has_mf"], e["mf"]
    with pytest.raises(ValueError, match=r"base must have shape \[n, 7\]"):
        t.load_rows(k, b[:, :6].copy(), h, m)
    with pytest.raises(ValueError, match="mf must have shape"):
        t.load_rows(k, b, np.ones(2, np.uint8), m)
    with pytest.raises(ValueError, match="has_mf"):
        t.load_rows(k, b, np.full(2, 2, np.uint8), m)
    with pytest.raises(TypeError, match="has_mf"):
        t.load_rows(k, b, h.astype(np.int8), m)
    bad = b.copy()
    bad[1, 3] = 1.5
    with pytest.raises(ValueError, match="unseen_days"):
        t.load_rows(k, bad, h, m)
    bad = b.copy()
    bad[0, 5] = np.nan
    with pytest.raises(ValueError, match=r"base\[0, 5\]"):
        t.load_rows(k, bad, h, m)
    bad = b.copy()
    bad[0, 0] = -1
    with pytest.raises(ValueError, match="show"):
        t.load_rows(k, bad, h, m)
    with pytest.raises(ValueError, match="day"):
        t.end_day(-3)
    assert_same_snapshot(before, snapshot(t))


def test_thread_count_does_not_change_results(make_c_table):
    acc = CtrAccessorConfig(embedx_threshold=1.5)
    rng = np.random.default_rng(7)
    keys = rng.integers(0, 3000, size=20000).astype(np.int64)  # many duplicates, > parallel threshold
    grads = rng.normal(size=(20000, 5)).astype(np.float32)
    shows = np.ones(20000, np.float32)
    clicks = (rng.random(20000) < 0.2).astype(np.float32)
    exports = []
    for threads, shards in ((1, 1), (2, 64), (4, 7)):
        t = make_c_table(dim=4, accessor=acc, num_threads=threads, num_shards=shards)
        for _ in range(2):
            t.push(keys, grads, shows, clicks)
        exports.append(t.export("checkpoint"))
    for e in exports[1:]:
        for k in ("keys", "base", "has_mf", "mf"):
            np.testing.assert_array_equal(exports[0][k], e[k])


# ------------------------------------------------------------------------------------ set_tombstones


def test_more_keys_than_one_call_takes_are_refused_before_reading_them(tmp_path):
    # A push's merge numbers a call's keys with int32: 2**31 keys or more are refused by their count (a
    # sparse file mapped as the keys: nothing is read). Before, the limit was 2**32 - 2, past the merge's.
    path = tmp_path / "keys"
    with open(path, "wb") as f:
        f.truncate(8 * 2**31)
    keys = np.memmap(path, dtype=np.int64, mode="r", shape=(2**31,))
    t = _C.Table({"dim": 4})
    with pytest.raises(ValueError, match=r"keys has too many entries \(at most 2\*\*31 - 1 per call\)"):
        t.pull(keys, False)
    del keys


def test_set_tombstones_replaces_the_pending_list_in_order(make_c_table):
    t = make_c_table(dim=2)
    push(t, [1, 2, 3], 2)
    before_rows = t.export("checkpoint")
    restored = np.array([9, -5, 7, 9, 2**62], np.int64)  # order and duplicates kept as given
    t.set_tombstones(restored)
    e = t.export("checkpoint")
    assert e["tombstones"].tolist() == restored.tolist() and e["pending_tombstones"] == 5
    assert t.export("delta")["tombstones"].tolist() == restored.tolist()
    assert len(t.export("base")["tombstones"]) == 0  # base lists none but still sees the pending count
    for k in ("keys", "base", "has_mf", "mf"):  # rows untouched
        np.testing.assert_array_equal(before_rows[k], e[k])
    # bucketed exports filter the restored list like the table's own
    b0 = t.export("checkpoint", buckets=2, bucket=0)["tombstones"].tolist()
    b1 = t.export("checkpoint", buckets=2, bucket=1)["tombstones"].tolist()
    assert sorted(b0 + b1) == sorted(restored.tolist())
    assert all(int(_C.mix64(np.array([k], np.int64)).view(np.uint64)[0]) % 2 == 0 for k in b0)
    # a delta commit drops the first ones, as with the table's own list
    t.commit_save("delta", np.zeros(0, np.int64), np.zeros(0, np.float32), 2)
    assert t.export("checkpoint")["tombstones"].tolist() == restored[2:].tolist()
    # shrink appends after the restored ones
    t.set_tombstones(np.array([100], np.int64))
    acc_t = make_c_table(dim=2, accessor=CtrAccessorConfig(delete_threshold=0.5))
    push(acc_t, [4], 2, show=0.1)
    acc_t.set_tombstones(np.array([100, 101], np.int64))
    assert acc_t.shrink() == 1
    assert acc_t.export("checkpoint")["tombstones"].tolist() == [100, 101, 4]
    t.set_tombstones(np.zeros(0, np.int64))
    assert len(t.export("checkpoint")["tombstones"]) == 0 and t.export("checkpoint")["pending_tombstones"] == 0


def test_set_tombstones_validates_input(make_c_table):
    t = make_c_table(dim=2)
    t.set_tombstones(np.array([5, 6], np.int64))
    with pytest.raises((ValueError, TypeError), match="keys.*int64"):
        t.set_tombstones(np.array([1, 2], np.int32))
    with pytest.raises((ValueError, TypeError), match="keys.*1-D"):
        t.set_tombstones(np.zeros((2, 2), np.int64))
    with pytest.raises((ValueError, TypeError), match="keys.*contiguous"):
        t.set_tombstones(np.arange(10, dtype=np.int64)[::2])
    with pytest.raises((ValueError, TypeError), match="keys"):
        t.set_tombstones([1, 2])
    assert t.export("checkpoint")["tombstones"].tolist() == [5, 6]  # refused calls change nothing


# ------------------------------------------------------------------------------------------- dedup


def test_dedup_first_occurrence_order_and_inverse():
    rng = np.random.default_rng(5)
    for keys in (np.array([5, 3, 5, 0, -1, 3, 7, 0, -(2**63), 2**63 - 1], np.int64),
                 rng.integers(-50, 50, 5000).astype(np.int64),
                 rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64),
                 np.zeros(0, np.int64)):
        u, inv = _C.dedup(keys)
        assert u.dtype == np.int64 and inv.dtype == np.int64 and inv.shape == keys.shape
        # independent reference: first occurrence order from a Python dict
        first = {}
        for k in keys.tolist():
            first.setdefault(k, len(first))
        assert u.tolist() == list(first)
        assert inv.tolist() == [first[k] for k in keys.tolist()]
    with pytest.raises((ValueError, TypeError), match="keys"):
        _C.dedup(np.array([1, 2], np.int32))
    with pytest.raises((ValueError, TypeError), match="keys"):
        _C.dedup(np.arange(6, dtype=np.int64)[::2])


def test_group_by_owner_is_a_stable_counting_sort_by_route():
    rng = np.random.default_rng(6)
    for parts in (1, 2, 3, 7):
        for keys in (rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64), np.zeros(0, np.int64)):
            order, starts = _C.group_by_owner(keys, parts)
            owners = np.asarray(_C.route(keys, parts))
            # reference: positions of part p, ascending, one part after the other
            expect = [i for p in range(parts) for i in np.flatnonzero(owners == p).tolist()]
            counts = np.bincount(owners, minlength=parts)
            assert order.tolist() == expect
            assert starts.tolist() == (np.cumsum(counts) - counts).tolist()
    with pytest.raises(ValueError, match="num_parts"):
        _C.group_by_owner(np.arange(3, dtype=np.int64), 0)
    with pytest.raises((ValueError, TypeError), match="keys"):
        _C.group_by_owner(np.array([1.0]), 2)


def test_dedup_by_owner_groups_the_distinct_keys_by_route():
    rng = np.random.default_rng(8)
    for parts in (1, 2, 3, 7):
        for keys in (rng.integers(-40, 40, 3000).astype(np.int64),
                     rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64), np.zeros(0, np.int64)):
            u, inv, starts = _C.dedup_by_owner(keys, parts)
            # reference: distinct keys in first-occurrence order (a dict), then stably grouped by owner
            first = list(dict.fromkeys(keys.tolist()))
            owners = np.asarray(_C.route(np.array(first, np.int64), parts)) if first else np.zeros(0, np.int32)
            expect = [k for p in range(parts) for k, o in zip(first, owners.tolist()) if o == p]
            counts = np.bincount(owners, minlength=parts)
            assert u.tolist() == expect
            assert starts.tolist() == [0] + np.cumsum(counts).tolist()
            np.testing.assert_array_equal(u[inv], keys)
    with pytest.raises(ValueError, match="num_parts"):
        _C.dedup_by_owner(np.arange(3, dtype=np.int64), 0)
    with pytest.raises((ValueError, TypeError), match="keys"):
        _C.dedup_by_owner(np.array([1, 2], np.int32), 2)


def test_nonfinite_rows_lists_the_rows_with_nan_or_inf():
    v = np.ones((1000, 9), np.float32)
    assert _C.nonfinite_rows(v).tolist() == []
    v[3, 8], v[17, 0], v[17, 5], v[999, 4] = np.nan, np.inf, np.nan, -np.inf
    v[500, 2] = np.finfo(np.float32).max  # large but finite
    assert _C.nonfinite_rows(v).tolist() == [3, 17, 999]
    assert _C.nonfinite_rows(np.zeros((0, 9), np.float32)).tolist() == []
    with pytest.raises((ValueError, TypeError), match="values"):
        _C.nonfinite_rows(np.ones((2, 3), np.float64))
    with pytest.raises((ValueError, TypeError), match="values"):
        _C.nonfinite_rows(np.ones((4, 3), np.float32)[::2])


def test_merge_push_sums_grads_shows_and_clicks_by_inverse():
    rng = np.random.default_rng(9)
    n, u = 2000, 150
    inverse = rng.integers(0, u, n).astype(np.int64)
    grads = rng.standard_normal((n, 5)).astype(np.float32)
    shows, clicks = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    g, s, c = _C.merge_push(inverse, u, grads, shows, clicks)
    eg, es, ec = np.zeros((u, 5), np.float32), np.zeros(u, np.float32), np.zeros(u, np.float32)
    for i in range(n):  # float32 accumulation in input order
        eg[inverse[i]] += grads[i]
        es[inverse[i]] += shows[i]
        ec[inverse[i]] += clicks[i]
    np.testing.assert_array_equal(g, eg)
    np.testing.assert_array_equal(s, es)
    np.testing.assert_array_equal(c, ec)
    with pytest.raises(ValueError, match="shows"):
        _C.merge_push(inverse, u, grads, shows[:-1], clicks)
    with pytest.raises(ValueError, match="inverse"):
        _C.merge_push(inverse, 10, grads, shows, clicks)
    with pytest.raises((ValueError, TypeError), match="clicks"):
        _C.merge_push(inverse, u, grads, shows, clicks.astype(np.float64))


def test_sum_by_inverse_sums_rows_in_input_order():
    rng = np.random.default_rng(7)
    n, u, w = 3000, 200, 9
    inverse = rng.integers(0, u, n).astype(np.int64)
    values = rng.standard_normal((n, w)).astype(np.float32)
    expect = np.zeros((u, w), np.float32)
    for i in range(n):  # float32 accumulation in input order, as the table merges a push
        expect[inverse[i]] += values[i]
    got = _C.sum_by_inverse(inverse, u, values)
    assert got.dtype == np.float32 and got.shape == (u, w)
    np.testing.assert_array_equal(got, expect)
    with pytest.raises(ValueError, match="inverse"):
        _C.sum_by_inverse(np.array([0, 5], np.int64), 3, np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="values"):
        _C.sum_by_inverse(np.array([0, 1], np.int64), 3, np.zeros((3, 1), np.float32))
    with pytest.raises((ValueError, TypeError), match="values"):
        _C.sum_by_inverse(np.array([0, 1], np.int64), 3, np.zeros((2, 1), np.float64))


def test_saved_tombstones_give_their_memory_back():
    t = _C.Table(TableConfig(dim=4).to_dict())
    keys = np.arange(1, 20001, dtype=np.int64)
    push(t, keys, 4)  # score 0.1 < delete_threshold 0.8: shrink deletes every row
    assert t.shrink() == len(keys)
    before = t.stats()["bytes"]
    assert len(t.export("delta")["tombstones"]) == len(keys)
    t.commit_save("base", np.zeros(0, np.int64), np.zeros(0, np.float32), len(keys))  # the base saw them all
    assert len(t.export("delta")["tombstones"]) == 0
    # the list's 8 bytes per key went back (stats()["bytes"] counts capacity)
    assert before - t.stats()["bytes"] >= 8 * len(keys)


def test_table_is_usable_and_collectable_in_a_forked_child(make_c_table):
    """A DataLoader worker is a fork of the trainer: a table whose thread pool it copied (but not the pool's
    threads) must pull correctly there and be destroyed by the child's garbage collection without aborting
    or hanging it (CI once saw a worker abort when a test's leftover table was collected in it)."""
    import gc
    import os
    import time

    t = make_c_table(dim=2, num_threads=2, num_shards=8)
    keys = np.arange(1, 20001, dtype=np.int64)  # big enough for the pool's parallel path
    push(t, keys, 2, show=1.0)
    t.pull(keys)  # the pool's workers have run in the parent
    expected = t.pull(keys)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 3
        try:
            code = 0 if np.array_equal(t.pull(keys), expected) else 2
            del t
            gc.collect()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung (destroying or using the table)")
        time.sleep(0.05)
    assert os.WIFEXITED(status), f"the forked child died: status {status}"
    assert os.WEXITSTATUS(status) == 0
    np.testing.assert_array_equal(t.pull(keys), expected)  # the parent's table is untouched


def unaligned(a: np.ndarray) -> np.ndarray:
    """The same values in a C-contiguous view that starts one byte into its buffer (flags.aligned False)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    view = buf[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert view.flags.c_contiguous and not view.flags.aligned
    return view


def test_unaligned_arrays_are_read_like_aligned_ones(make_c_table):
    # numpy.frombuffer at an odd offset gives such views; the table reads them through an aligned copy
    # (reading 8-byte keys unaligned is undefined behaviour: UBSan's finding, fuzzing the sanitized build)
    rng = np.random.default_rng(3)
    keys = rng.integers(-(2**63), 2**63 - 1, size=300, dtype=np.int64)
    keys[100:] = keys[:200]  # repeated keys, merged
    grads = rng.normal(size=(300, 5)).astype(np.float32)
    shows, clicks = np.ones(300, np.float32), (rng.random(300) < 0.3).astype(np.float32)
    a, b = make_c_table(), make_c_table()
    a.push(keys, grads, shows, clicks)
    b.push(unaligned(keys), unaligned(grads), unaligned(shows), unaligned(clicks))
    assert np.array_equal(a.pull(keys, True), b.pull(unaligned(keys), True))
    assert a.erase(unaligned(keys[:50])) == len(np.unique(keys[:50])) and len(a) == len(b) - len(np.unique(keys[:50]))


def test_num_threads_0_means_the_cpus_this_process_may_run_on():
    # TableConfig(num_threads=0): the pool takes the process's CPU affinity (taskset, a container's cpuset),
    # not the host's core count. Pinned to one CPU in a child process, the table gets a pool of 1.
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from torch_psembed import _C\n"
            "from torch_psembed.config import TableConfig\n"
            "print(_C.Table(TableConfig(dim=2, num_threads=0).to_dict()).num_threads)\n")
    out = run_python(code, timeout=120, env=child_env())
    assert out.strip() == "1"
    unpinned = _C.Table(TableConfig(dim=2, num_threads=0).to_dict()).num_threads
    assert unpinned == len(os.sched_getaffinity(0))


def test_keys_deleted_while_a_base_is_written_reach_the_next_delta(make_c_table):
    # A base's commit cleared every pending tombstone, those of keys deleted after its snapshot too, and a
    # table's first base did not even list them (tracking came on at the commit): serving kept those keys
    # for ever (found by an audit, session 25)
    acc = CtrAccessorConfig(show_click_decay_rate=1.0, delete_threshold=1.0, base_threshold=0.0, delta_threshold=0.0)
    t = make_c_table(dim=2, accessor=acc)
    t.track_tombstones = False  # as a new SparseTable's: no base or delta yet
    push(t, [1, 2, 3], 2, show=1.0, click=0.0)  # score 0.1: deleted by the next shrink
    push(t, [4], 2, show=1.0, click=1.0)  # score 1.0: kept
    b = t.export("base")  # the snapshot
    assert b["keys"].tolist() == [1, 2, 3, 4] and b["pending_tombstones"] == 0
    assert t.shrink() == 3  # while the base is written
    t.commit_save("base", b["keys"], b["base"][:, 2].copy(), b["pending_tombstones"])
    assert sorted(t.export("delta")["tombstones"].tolist()) == [1, 2, 3]


def test_a_key_deleted_and_made_anew_while_a_delta_is_written_keeps_its_own_delta_score(make_c_table):
    # The commit subtracted the saved delta_score from the new row of a key deleted after the snapshot and
    # pushed again: its delta_score went negative and its pushes were held back from the next delta, whose
    # tombstone then removed it from serving (found by an audit, session 25)
    acc = CtrAccessorConfig(show_click_decay_rate=0.01, delete_threshold=0.8)
    t = make_c_table(dim=2, accessor=acc)
    push(t, [5, 6], 2, show=100.0, click=0.0)  # score 10 each
    d = t.export("delta")
    saved = dict(zip(d["keys"].tolist(), d["base"][:, 2].tolist()))
    assert saved == {5: pytest.approx(10.0), 6: pytest.approx(10.0)}
    assert t.shrink() == 2  # while the delta is written: show 100 -> 1, score 0.1 < 0.8, both deleted
    push(t, [5], 2, show=50.0, click=0.0)  # key 5 made anew: score 5
    t.commit_save("delta", d["keys"], d["base"][:, 2].copy(), d["pending_tombstones"])
    c = t.export("checkpoint")
    assert c["keys"].tolist() == [5] and c["base"][0, 2] == pytest.approx(5.0)  # its own, not 5 - 10
    nxt = t.export("delta")
    assert nxt["keys"].tolist() == [5] and sorted(nxt["tombstones"].tolist()) == [5, 6]  # erased, then re-added


@pytest.mark.parametrize("rule", ["adam", "ftrl", "std_adagrad"])
def test_the_widest_records_train_and_round_trip(rule):
    # dim 4096 with Adam, FTRL or StdAdaGrad makes records of over 32 KiB: a slab chunk of 1024 of them was
    # larger than the arena's segment and ran past its end, and pushing two keys segfaulted (audit, session
    # 25). In a child process, so that a crash is a failure here rather than the end of the test run.
    code = f"""
import numpy as np
from torch_psembed import _C
from torch_psembed.config import TableConfig, CtrAccessorConfig, {dict(adam="Adam", ftrl="FTRL", std_adagrad="StdAdaGrad")[rule]} as Rule
cfg = TableConfig(dim=4096, accessor=CtrAccessorConfig(embedx_threshold=0.0), mf_optimizer=Rule())
t = _C.Table(cfg.to_dict())
k = np.arange(1, 65, dtype=np.int64)
for _ in range(2):
    t.push(k, np.full((64, 4097), 0.5, np.float32), np.ones(64, np.float32), np.zeros(64, np.float32))
e = t.export("checkpoint")
u = _C.Table(cfg.to_dict())
u.load_rows(e["keys"], e["base"], e["has_mf"], e["mf"])
assert np.array_equal(u.pull(k, True), t.pull(k, True)) and len(t) == 64 and e["has_mf"].all()
print("ok")
"""
    assert run_python(code, timeout=120).strip() == "ok"


def test_load_without_checks_reads_any_nonzero_has_mf_as_one_mf_row(make_c_table):
    # load_segments(check=False) advanced its mf offset by the raw flag: a has_mf of 2 shifted every later
    # row's mf by one row, reading past the array (audit, session 25)
    t = make_c_table(dim=2)
    src = make_c_table(dim=2, accessor=CtrAccessorConfig(embedx_threshold=0.0))
    push(src, [1, 2], 2, show=5.0)
    push(src, [1, 2], 2, show=5.0)
    e = src.export("checkpoint")
    has = e["has_mf"].copy()
    assert has.tolist() == [1, 1]
    has[0] = 2
    parent = np.vstack([e["mf"], np.full((4, e["mf"].shape[1]), 777.0, np.float32)])
    t.load_segments([(e["keys"], e["base"], has, parent[:2])], False)
    np.testing.assert_array_equal(t.pull(e["keys"], True), src.pull(e["keys"], True))


def test_day_setter_refuses_the_day_end_day_refuses():
    t = _C.Table(TableConfig(dim=2).to_dict())
    with pytest.raises(ValueError, match=r"day must be in \[-1, 2\^63 - 1\)"):
        t.day = 2**63 - 1
    t.day = 2**63 - 2
    assert t.day == 2**63 - 2
