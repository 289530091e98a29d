"""The C++ table against the independent numpy reference (tests/reference/ctr_reference.py).

Every test builds the same config for ``torch_psembed.SparseTable`` and ``CtrTableRef`` and compares the whole
state (``_backend.export("checkpoint")`` plus ``pull(with_stats=True)``) after every operation.

Exactness: shows and clicks are small integers, the score coefficients are dyadic (0.25, 1.0) and the decay
rate is 0.5, so show/click/delta_score/unseen_days/slot are exact in float32 on both sides and compared
bit for bit; the discrete decisions that hang on them (mf creation, deletion, save predicates) can then not
flip by rounding. Weights and optimizer state are compared with a relative tolerance of a few float32 ulps
per step, which is far tighter than what a wrong formula (old-G vs new-G, mean vs sum, missing bias
correction, scaled vs raw gradient) produces.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.config import FTRL, SGD, AdaGrad, Adam, CtrAccessorConfig, StdAdaGrad, TableConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.ctr_reference import CtrTableRef, mix64, splitmix64, uniform  # noqa: E402

RTOL = 2e-5
ATOL = 2e-6
DIM = 4


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _rule(name: str, part: str):
    """Rule configs with steps big enough to hit the bounds; the lr part gets different numbers than the mf
    part so a C++ mix-up of the two configs shows."""
    k = 0.5 if part == "lr" else 1.0
    bounds = (-0.4, 0.5) if part == "lr" else (-0.6, 0.6)
    if name == "sgd":
        # initial_range beyond the bounds: initial values are clipped too.
        return SGD(learning_rate=0.1 * k, initial_range=1.0, weight_bounds=bounds)
    if name == "adagrad":
        return AdaGrad(learning_rate=0.3 * k, initial_range=0.05, initial_g2sum=2.0 + k, weight_bounds=bounds)
    if name == "std_adagrad":
        return StdAdaGrad(learning_rate=0.3 * k, initial_range=0.05, initial_g2sum=2.0 + k, weight_bounds=bounds)
    if name == "adam":
        # dyadic betas: the stored beta powers are then the same float32 numbers whichever precision the
        # C++ multiplies in, and 1 - beta^t carries no extra rounding.
        return Adam(learning_rate=0.2 * k, initial_range=0.05, beta1=0.875, beta2=0.96875, epsilon=1e-6,
                    weight_bounds=bounds)
    if name == "ftrl":
        return FTRL(learning_rate=0.5 * k, initial_range=0.05, beta=1.0, l1=0.5 * k, l2=0.25, weight_bounds=bounds)
    raise KeyError(name)


RULE_NAMES = ["sgd", "adagrad", "std_adagrad", "adam", "ftrl"]


def _accessor(**over) -> CtrAccessorConfig:
    kw = dict(
        nonclk_coeff=0.25,
        click_coeff=1.0,
        embedx_threshold=2.0,
        base_threshold=1.0,
        delta_threshold=0.5,
        delta_keep_days=1,
        show_click_decay_rate=0.5,
        delete_threshold=0.25,
        delete_after_unseen_days=3,
        show_scale=True,
        create_probability_from_score=False,
    )
    kw.update(over)
    return CtrAccessorConfig(**kw)


def _pair(cfg: TableConfig):
    """A SparseTable and its reference. Both list every deletion as a tombstone from the start, as a table
    on a save chain with a committed base does (a new SparseTable starts without: see
    test_tombstones_start_with_the_first_committed_base_or_delta)."""
    t = pse.SparseTable(cfg)
    t._backend.track_tombstones = True
    return t, CtrTableRef(cfg.to_dict())


def _first_bad_rows(gk, got, exp, rtol, atol, limit=4) -> str:
    bad = ~np.isclose(got, exp, rtol=rtol, atol=atol)
    rows = np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0][:limit]
    return "\n".join(f"  key {int(gk[i])}: got {got[i].tolist()} expected {exp[i].tolist()}" for i in rows)


def assert_match(table, ref, probe_keys, ctx: str = "") -> None:
    """The whole table state equals the reference: checkpoint export and pull(with_stats=True)."""
    got = table._backend.export("checkpoint")
    exp = ref.export("checkpoint")
    assert len(table) == len(ref), f"{ctx}: {len(table)} rows, reference has {len(ref)}"
    np.testing.assert_array_equal(got["keys"], exp["keys"], err_msg=f"{ctx}: key sets differ")
    gb, eb = got["base"], exp["base"]
    assert gb.shape == eb.shape, f"{ctx}: base shape {gb.shape} vs {eb.shape}"
    if not np.array_equal(gb[:, :5], eb[:, :5]):
        raise AssertionError(
            f"{ctx}: show/click/delta_score/unseen_days/slot differ (exact)\n"
            + _first_bad_rows(got["keys"], gb[:, :5], eb[:, :5], 0, 0)
        )
    if not np.allclose(gb[:, 5:], eb[:, 5:], rtol=RTOL, atol=ATOL):
        raise AssertionError(
            f"{ctx}: lr_w/lr_state differ\n" + _first_bad_rows(got["keys"], gb[:, 5:], eb[:, 5:], RTOL, ATOL)
        )
    np.testing.assert_array_equal(got["has_mf"], exp["has_mf"], err_msg=f"{ctx}: has_mf differs")
    assert got["mf"].shape == exp["mf"].shape, f"{ctx}: mf shape {got['mf'].shape} vs {exp['mf'].shape}"
    if not np.allclose(got["mf"], exp["mf"], rtol=RTOL, atol=ATOL):
        mk = got["keys"][got["has_mf"].astype(bool)]
        raise AssertionError(
            f"{ctx}: mf_w/mf_state differ\n" + _first_bad_rows(mk, got["mf"], exp["mf"], RTOL, ATOL)
        )
    assert set(got["tombstones"].tolist()) == set(exp["tombstones"].tolist()), f"{ctx}: pending tombstones differ"
    probe = np.ascontiguousarray(probe_keys, dtype=np.int64)
    gp = table.pull(probe, with_stats=True).numpy()
    ep = ref.pull(probe, with_stats=True)
    assert gp.shape == (probe.shape[0], 3 + table.dim)
    if not np.allclose(gp, ep, rtol=RTOL, atol=ATOL):
        raise AssertionError(f"{ctx}: pull(with_stats=True) differs\n" + _first_bad_rows(probe, gp, ep, RTOL, ATOL))


def _push_both(table, ref, keys, grads, shows, clicks, slots):
    keys = np.ascontiguousarray(keys, np.int64)
    grads = np.ascontiguousarray(grads, np.float32)
    shows = np.ascontiguousarray(shows, np.float32)
    clicks = np.ascontiguousarray(clicks, np.float32)
    slots = np.ascontiguousarray(slots, np.int32)
    skipped = table.push(keys, grads, shows, clicks, slots)
    assert skipped == 0
    ref.push(keys, grads, shows, clicks, slots)


def _save_both(table, ref, mode: str, ctx: str) -> None:
    """export(mode) on both sides agrees, then commit_save it on both."""
    got = table._backend.export(mode)
    exp = ref.export(mode)
    np.testing.assert_array_equal(got["keys"], exp["keys"], err_msg=f"{ctx}: export({mode!r}) rows differ")
    np.testing.assert_array_equal(got["base"][:, :5], exp["base"][:, :5], err_msg=f"{ctx}: export({mode!r}) stats")
    np.testing.assert_allclose(got["base"][:, 5:], exp["base"][:, 5:], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(got["has_mf"], exp["has_mf"])
    np.testing.assert_allclose(got["mf"], exp["mf"], rtol=RTOL, atol=ATOL)
    assert set(got["tombstones"].tolist()) == set(exp["tombstones"].tolist()), f"{ctx}: export({mode!r}) tombstones"
    n_tomb = int(got["pending_tombstones"])  # what the snapshot saw (a base carries none, drops them all)
    assert n_tomb == len(ref.tombstones)
    table._backend.commit_save(mode, got["keys"], np.ascontiguousarray(got["base"][:, 2]), n_tomb)
    ref.commit_save(mode, exp["keys"], exp["base"][:, 2], n_tomb)


def _universe(rng, n=40) -> np.ndarray:
    special = np.array([0, 1, -1, 2**63 - 1, -(2**63)], dtype=np.int64)
    rest = rng.integers(-(2**63), 2**63 - 1, size=n - len(special), dtype=np.int64, endpoint=True)
    return np.unique(np.concatenate([special, rest]))


def run_random_sequence(cfg: TableConfig, seed: int, steps: int = 30) -> dict:
    """Random pushes (repeated keys, zero shows, big gradients) interleaved with shrink/new_day/end_day and
    base/delta saves; the state is compared after every step. Returns counts of what happened."""
    rng = np.random.default_rng(seed)
    table, ref = _pair(cfg)
    universe = _universe(rng)
    probe = np.concatenate([universe, np.array([12345678987654321], np.int64)])  # one never-pushed key
    day = 0
    seen = {"push": 0, "shrink": 0, "new_day": 0, "end_day": 0, "save": 0, "deleted": 0, "mf_created_mid": 0,
            "clipped": 0}
    ops = ["push", "shrink", "new_day", "end_day", "save"]
    for step in range(steps):
        forced = {0: "push", 1: "push", 2: "push", 9: "save", 13: "end_day", 17: "shrink", 19: "save"}
        op = forced.get(step) or str(rng.choice(ops, p=[0.62, 0.1, 0.08, 0.12, 0.08]))
        had_mf = sum(r.mf is not None for r in ref.rows.values())
        if op == "push":
            n = int(rng.choice([1, 7, 48]))
            hot = universe[: int(rng.integers(8, len(universe) + 1))]
            keys = hot[rng.integers(0, len(hot), size=n)]
            shows = rng.integers(0, 4, size=n)
            clicks = rng.binomial(shows, 0.3)
            grads = rng.standard_normal((n, 1 + cfg.dim)) * 3.0
            slots = rng.integers(0, 50, size=n)
            _push_both(table, ref, keys, grads, shows, clicks, slots)
            mf_now = sum(r.mf is not None for r in ref.rows.values())
            if had_mf and mf_now > had_mf:
                seen["mf_created_mid"] += 1
        elif op == "shrink":
            n_del = table.shrink()
            assert n_del == ref.shrink(), f"step {step}: shrink deleted count"
            seen["deleted"] += n_del
        elif op == "new_day":
            table.new_day()
            ref.new_day()
        elif op == "end_day":
            day += int(rng.choice([0, 1, 2]))
            n_del = table.end_day(day)
            assert n_del == ref.end_day(day), f"step {step}: end_day({day}) deleted count"
            assert table.day == ref.day == day
            seen["deleted"] += n_del
        else:
            _save_both(table, ref, str(rng.choice(["base", "delta"])), f"step {step}")
        seen[op] += 1
        seen["clipped"] += sum(
            int(np.isin(r.lr_w, np.float32(ref.lr_rule.bounds())).any())
            + int(r.mf is not None and np.isin(r.mf, np.float32(ref.mf_rule.bounds())).any())
            for r in ref.rows.values()
        )
        assert_match(table, ref, probe, f"seed {seed} step {step} after {op}")
    return seen


# ----------------------------------------------------------------------------------------------------------
# the reference's own building blocks (cheap sanity on the transcription)
# ----------------------------------------------------------------------------------------------------------


def test_reference_splitmix64_matches_published_vector():
    # The first two outputs of SplitMix64 seeded with 0 (Steele, Lea, Flood 2014; used by xoshiro's seeding).
    out = splitmix64(np.array([0, 0x9E3779B97F4A7C15], dtype=np.uint64))
    assert [int(x) for x in out] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_mix64_and_route_match_reference():
    keys = np.concatenate(
        [np.array([0, 1, -1, 2**63 - 1, -(2**63)], np.int64), np.random.default_rng(0).integers(-(2**62), 2**62, 200)]
    ).astype(np.int64)
    got = _C.mix64(keys)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint64), mix64(keys))
    for parts in (1, 3, 8):
        expected = (mix64(keys) % np.uint64(parts)).astype(np.int32)
        np.testing.assert_array_equal(np.asarray(_C.route(keys, parts)), expected)


# ----------------------------------------------------------------------------------------------------------
# random sequences: every rule on both parts
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("show_scale", [True, False], ids=["show_scale", "no_show_scale"])
@pytest.mark.parametrize("rule", RULE_NAMES)
def test_random_sequence_same_rule_both_parts(rule, show_scale):
    cfg = TableConfig(
        dim=DIM,
        accessor=_accessor(show_scale=show_scale),
        lr_optimizer=_rule(rule, "lr"),
        mf_optimizer=_rule(rule, "mf"),
        seed=7,
        num_shards=4,
    )
    seen = run_random_sequence(cfg, seed=100 + RULE_NAMES.index(rule))
    # the sequence exercised what it is meant to exercise
    assert seen["push"] >= 10 and seen["deleted"] > 0 and seen["mf_created_mid"] > 0, seen
    assert seen["clipped"] > 0 and seen["end_day"] > 0 and seen["save"] > 0, seen


@pytest.mark.parametrize("lr_rule,mf_rule", [("adam", "ftrl"), ("ftrl", "std_adagrad"), ("adagrad", "adam"),
                                             ("std_adagrad", "sgd"), ("sgd", "adagrad")])
def test_random_sequence_mixed_rules(lr_rule, mf_rule):
    cfg = TableConfig(
        dim=3,
        accessor=_accessor(),
        lr_optimizer=_rule(lr_rule, "lr"),
        mf_optimizer=_rule(mf_rule, "mf"),
        seed=2**64 - 5,
        num_shards=3,
    )
    run_random_sequence(cfg, seed=7 + RULE_NAMES.index(lr_rule), steps=20)


def test_random_sequence_default_config_numbers():
    """Paddle-like defaults (AdaGrad, decay 0.98, coefficients 0.1/1) on a short sequence without saves."""
    cfg = TableConfig(dim=8, accessor=CtrAccessorConfig(embedx_threshold=1.0, delete_threshold=0.0), seed=3)
    rng = np.random.default_rng(5)
    table, ref = _pair(cfg)
    universe = _universe(rng, 30)
    for step in range(12):
        n = 40
        keys = universe[rng.integers(0, len(universe), n)]
        shows = rng.integers(0, 3, n)
        _push_both(table, ref, keys, rng.standard_normal((n, 9)) * 0.5, shows, rng.binomial(shows, 0.2),
                   rng.integers(0, 5, n))
        # S is not exact with 0.1 and 0.98; stats are compared at float tolerance through pull only.
        gp = table.pull(universe, with_stats=True).numpy()
        np.testing.assert_allclose(gp, ref.pull(universe, with_stats=True), rtol=RTOL, atol=ATOL,
                                   err_msg=f"step {step}")
    got, exp = table._backend.export("checkpoint"), ref.export("checkpoint")
    np.testing.assert_array_equal(got["keys"], exp["keys"])
    np.testing.assert_allclose(got["base"], exp["base"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["mf"], exp["mf"], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# targeted rule checks (hand-derived numbers, independent of the reference)
# ----------------------------------------------------------------------------------------------------------


def _one_key_table(lr_opt, mf_opt, **acc):
    cfg = TableConfig(dim=2, accessor=_accessor(embedx_threshold=0.0, **acc), lr_optimizer=lr_opt,
                      mf_optimizer=mf_opt, seed=11, num_shards=1)
    return _pair(cfg)


def _push1(table, ref, key, g, show, click=0.0):
    _push_both(table, ref, np.array([key]), np.array([g], np.float32), np.array([show]), np.array([click]),
               np.array([1]))


@pytest.mark.parametrize("show_scale", [True, False])
def test_adagrad_show_scale_hand_numbers(show_scale):
    ada = AdaGrad(learning_rate=0.5, initial_range=0.0, initial_g2sum=1.0, weight_bounds=(-10.0, 10.0))
    table, ref = _one_key_table(ada, ada, show_scale=show_scale)
    k = 42
    _push1(table, ref, k, [4.0, 0.0, 0.0], show=4.0)  # creates mf (threshold 0), mf gradient dropped
    s = 4.0 if show_scale else 1.0
    gh = 4.0 / s
    w1 = -0.5 * gh * np.sqrt(1.0 / (1.0 + 0.0))  # old G = 0
    G1 = gh * gh
    _push1(table, ref, k, [4.0, 2.0, -6.0], show=4.0)
    w2 = w1 - 0.5 * gh * np.sqrt(1.0 / (1.0 + G1))
    G2 = G1 + gh * gh
    mf = [-0.5 * (2.0 / s), -0.5 * (-6.0 / s)]
    mfG = ((2.0 / s) ** 2 + (6.0 / s) ** 2) / 2  # the mean over the block, not the sum
    row = table._backend.export("checkpoint")
    np.testing.assert_allclose(row["base"][0, 5:7], [w2, G2], rtol=1e-6)
    np.testing.assert_allclose(row["mf"][0], mf + [mfG], rtol=1e-6)
    assert_match(table, ref, np.array([k]))


def test_adagrad_squares_past_float32_range_keep_a_finite_mean():
    # The block's squared gradients overflow float32 while their mean does not: the accumulator must
    # hold that mean, as the float64 reference has it, not inf (the rule sums squares in float32).
    ada = AdaGrad(learning_rate=0.5, initial_range=0.0, initial_g2sum=1.0, weight_bounds=(-10.0, 10.0))
    table, ref = _one_key_table(ada, ada, show_scale=False)
    _push1(table, ref, 7, [0.0, 0.0, 0.0], show=1.0)  # creates mf (threshold 0)
    _push1(table, ref, 7, [0.0, 1.5e19, 1.5e19], show=1.0)
    mf_row = table._backend.export("checkpoint")["mf"][0]
    np.testing.assert_allclose(mf_row, [-10.0, -10.0, 2.25e38], rtol=1e-6)  # weights clipped, mean of squares
    assert_match(table, ref, np.array([7]))


def test_adagrad_at_learning_rate_0_keeps_its_weights_whatever_the_scaled_gradient():
    # g / show past float32's range (1e30 / 1e-30): the scaled gradient saturates, so 0 * it is 0 and the
    # weights stay (an inf there made 0 * inf = NaN, which the clip turned into the lower bound).
    for rule in (AdaGrad, StdAdaGrad):
        opt = rule(learning_rate=0.0, initial_range=0.5, initial_g2sum=1.0)
        table, ref = _one_key_table(opt, opt, show_scale=True)
        _push1(table, ref, 4, [0.0, 0.0, 0.0], show=1.0)  # creates the row and its mf
        before = table.pull(np.array([4])).numpy().copy()
        _push1(table, ref, 4, [1e30, -1e30, 1e30], show=1e-30)
        np.testing.assert_array_equal(table.pull(np.array([4])).numpy(), before)
        assert_match(table, ref, np.array([4]), ctx=rule.__name__)


@pytest.mark.parametrize("lr, show, g", [(0.05, 1e-40, 0.0), (0.05, 1e-40, 1e-40), (1e39, 1.0, 0.0), (1e300, 1.0, 0.0)],
                         ids=["denormal_show_zero_g", "denormal_show_unit_ratio", "lr_1e39", "lr_1e300"])
def test_adagrad_factors_past_float32_take_the_double_loop(lr, show, g):
    # 1 / show (a denormal show) or the step factor (a learning rate over FLT_MAX) past float32: the float32
    # loop computed 0 * inf = NaN for a zero gradient, which the clip turned into the lower bound (-10).
    ada = AdaGrad(learning_rate=lr, initial_range=0.5, initial_g2sum=3.0, weight_bounds=(-10.0, 10.0))
    table, ref = _one_key_table(ada, ada, show_scale=True)
    _push1(table, ref, 4, [0.0, 0.0, 0.0], show=1.0)  # creates the row and its mf
    before = table.pull(np.array([4])).numpy().copy()
    _push1(table, ref, 4, [g, 0.0, 0.0], show=show)
    after = table.pull(np.array([4])).numpy()
    np.testing.assert_array_equal(after[0, 1:], before[0, 1:])  # zero gradients: the mf weights stay
    if g:  # g / show = 1: one AdaGrad step from G = 0, w -= lr * 1 * sqrt(3 / 3)
        np.testing.assert_allclose(after[0, 0], before[0, 0] - lr, rtol=1e-6)
    assert_match(table, ref, np.array([4]))


def test_bounds_below_float32_range_clip_to_minus_flt_max():
    # (-inf, -inf) and (-1e39, -1e39) are valid (low <= high) bounds: weights must be -FLT_MAX, not -inf
    # (a checkpoint of -inf weights was refused by its own loader).
    fmax = float(np.finfo(np.float32).max)
    for bounds in ((-np.inf, -np.inf), (-1e39, -1e39), (np.inf, np.inf)):
        opt = SGD(learning_rate=0.1, initial_range=0.0, weight_bounds=bounds)
        table, ref = _one_key_table(opt, opt)
        _push1(table, ref, 2, [1.0, 1.0, 1.0], show=1.0)
        want = -fmax if bounds[0] < 0 else fmax
        np.testing.assert_array_equal(table.pull(np.array([2])).numpy(), [[want] * 3], err_msg=str(bounds))
        assert_match(table, ref, np.array([2]), ctx=str(bounds))


def test_float32_degenerate_rule_settings_are_refused():
    # Adam keeps beta powers in float32: 1 - 1e-9 rounds to 1 there (lr_t = inf for beta1, 0 for beta2).
    for name in ("beta1", "beta2"):
        with pytest.raises(ValueError, match=f"Adam.{name} must be below 1 in float32"):
            Adam(**{name: 1.0 - 1e-9})
        with pytest.raises(ValueError, match=f"'{name}'\\] must be in \\[0, 1\\), and below 1 in float32"):
            _C.Table({"dim": 2, "lr_optimizer": {"name": "adam", name: 1.0 - 1e-9}})
    Adam(beta1=1.0 - 2.0**-24, beta2=0.9999999)  # the largest float32 below 1 is fine
    # FTRL with beta = l2 = 0: w = -z / (sqrt(n) / alpha), and float32 n rounds to 0 for a gradient of 1e-25.
    with pytest.raises(ValueError, match="FTRL needs beta > 0 or l2 > 0"):
        FTRL(beta=0.0, l2=0.0)
    with pytest.raises(ValueError, match="FTRL needs beta > 0 or l2 > 0"):
        _C.Table({"dim": 2, "lr_optimizer": {"name": "ftrl", "beta": 0.0, "l2": 0.0}})
    FTRL(beta=0.0, l2=1e-3)
    FTRL(beta=0.5, l2=0.0)
    # ... and so with beta / alpha and l2 too small for float32, which the table's loop stores them in: the
    # loop's w = -z / (beta / alpha) for a gradient of 1e-25 was a jump to the bound
    for beta, l2, alpha in ((1e-50, 0.0, 1.0), (0.0, 1e-50, 1.0), (1e-30, 0.0, 1e20), (1e-50, 1e-50, 0.5)):
        with pytest.raises(ValueError, match="FTRL needs beta > 0 or l2 > 0 in float32"):
            FTRL(beta=beta, l2=l2, alpha=alpha)
        with pytest.raises(ValueError, match="FTRL needs beta > 0 or l2 > 0 in float32"):
            _C.Table({"dim": 2, "lr_optimizer": {"name": "ftrl", "beta": beta, "l2": l2, "alpha": alpha}})
    with pytest.raises(ValueError, match="FTRL's step size alpha must be > 0"):
        FTRL(learning_rate=0.0)  # alpha falls back to it (this divided by zero before the check)
    FTRL(learning_rate=0.0, alpha=0.1)
    FTRL(beta=1e-40, l2=0.0)  # a float32 subnormal is stored, and so not refused
    FTRL(beta=1e300, l2=1e300, alpha=1e-300)  # past float32's range the table saturates, also not refused
    cfg = TableConfig(dim=2, lr_optimizer=FTRL(beta=1e300, l1=1e300), mf_optimizer=FTRL(beta=1e-40))
    table = _C.Table(cfg.to_dict())
    table.push(np.array([1], np.int64), np.full((1, 3), 1e-25, np.float32), np.array([1e6], np.float32),
               np.zeros(1, np.float32))
    assert np.isfinite(table.pull(np.array([1], np.int64))).all()


def test_zero_show_uses_scale_one():
    ada = AdaGrad(learning_rate=0.5, initial_range=0.0, initial_g2sum=1.0)
    table, ref = _one_key_table(ada, ada, show_scale=True)
    _push1(table, ref, 9, [2.0, 1.0, 1.0], show=0.0)
    got = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(got[5:7], [-1.0, 4.0], rtol=1e-6)
    assert_match(table, ref, np.array([9]))


def test_adam_first_steps_hand_numbers():
    adam = Adam(learning_rate=0.1, initial_range=0.0, beta1=0.5, beta2=0.75, epsilon=1e-8, weight_bounds=(-5, 5))
    table, ref = _one_key_table(adam, SGD(learning_rate=0.0), show_scale=True)
    _push1(table, ref, 3, [2.0, 0, 0], show=4.0)  # raw g: the show does not scale Adam
    # t=1: lr_t = 0.1*sqrt(1-0.75)/(1-0.5) = 0.1; m = 1.0, v = 1.0; w = -0.1*1/(1+eps)
    b = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(b[5:], [-0.1, 1.0, 1.0, 0.25, 0.5625], rtol=1e-6)
    _push1(table, ref, 3, [-2.0, 0, 0], show=1.0)
    # t=2: lr_t = 0.1*sqrt(1-0.5625)/(1-0.25); m = 0.5-1 = -0.5; v = 0.75+0.25*4 = 1.75
    lr_t = 0.1 * np.sqrt(1 - 0.5625) / 0.75
    w = -0.1 - lr_t * (-0.5) / np.sqrt(1.75)
    b = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(b[5:], [w, -0.5, 1.75, 0.125, 0.421875], rtol=1e-6)
    assert_match(table, ref, np.array([3]))


def test_ftrl_hand_numbers_l1_zero_and_clip():
    ftrl = FTRL(learning_rate=1.0, initial_range=0.0, beta=1.0, l1=1.0, l2=0.0, weight_bounds=(-0.3, 10))
    table, ref = _one_key_table(ftrl, SGD(learning_rate=0.0), show_scale=True)
    _push1(table, ref, 5, [0.5, 0, 0], show=2.0)  # |z| = 0.5 <= l1 -> w = 0; n = 0.25; raw g
    b = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(b[5:], [0.0, 0.5, 0.25], rtol=1e-6, atol=1e-7)
    _push1(table, ref, 5, [3.0, 0, 0], show=2.0)
    # sigma = sqrt(9.25)-0.5 (w=0, no effect); z = 3.5; n = 9.25; w = -(3.5-1)/(1+sqrt(9.25)) = -0.6135 -> clip -0.3
    b = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(b[5:], [-0.3, 3.5, 9.25], rtol=1e-6)
    _push1(table, ref, 5, [-1.0, 0, 0], show=2.0)
    sigma = np.sqrt(10.25) - np.sqrt(9.25)
    z = 3.5 - 1.0 - sigma * (-0.3)
    w = -(z - 1.0) / (1.0 + np.sqrt(10.25))
    b = table._backend.export("checkpoint")["base"][0]
    np.testing.assert_allclose(b[5:], [max(w, -0.3), z, 10.25], rtol=1e-6)
    assert_match(table, ref, np.array([5]))


def test_ftrl_gradient_past_float32_squares_saturates_n():
    # |g| = 3e19: g² overflows float32. Such a row takes the rule's double loop (its float32 loop would
    # compute sigma = inf / inf and store z = NaN): z = g, n saturates at FLT_MAX (never inf, which a
    # checkpoint refuses), and w comes from the stored z and n: -(z - l1) / ((beta + sqrt(n)) / alpha).
    ftrl = FTRL(learning_rate=1.0, initial_range=0.0, alpha=0.5, beta=1.0, l1=1.0, l2=0.0, weight_bounds=(-10, 10))
    table, ref = _one_key_table(ftrl, SGD(learning_rate=0.0), show_scale=False)
    _push1(table, ref, 6, [3e19, 0, 0], show=1.0)
    fmax = float(np.finfo(np.float32).max)
    b = table._backend.export("checkpoint")["base"][0]
    z = float(np.float32(3e19))
    np.testing.assert_allclose(b[5:8], [-(z - 1.0) / ((1.0 + np.sqrt(fmax)) / 0.5), z, fmax], rtol=1e-6)
    assert_match(table, ref, np.array([6]))
    # n at FLT_MAX: the float32 loop (g = 1), then the double one (g = 2e19), keep every value finite.
    for g in (1.0, 2e19):
        _push1(table, ref, 6, [g, 0, 0], show=1.0)
        assert_match(table, ref, np.array([6]), ctx=f"g={g}")
    assert np.isfinite(table._backend.export("checkpoint")["base"]).all()


@pytest.mark.parametrize("rule", ["sgd", "adagrad", "std_adagrad", "adam", "ftrl"])
def test_updates_past_float32_range_saturate_and_the_checkpoint_loads(tmp_path, rule):
    # Finite pushes whose sums pass float32's range: two gradients of 3e38 for one key (the merged sum),
    # a gradient of 1e30 with a show of 1e-30 (g / show), shows of 3e38 three times, bounds of +-inf.
    # Every stored value saturates at +-FLT_MAX instead of becoming inf (or NaN at the next update), as
    # the reference has it, and the table's checkpoint loads back into an equal table.
    bounds = (-float("inf"), float("inf"))
    opt = {
        "sgd": SGD(learning_rate=1.0, initial_range=0.0, weight_bounds=bounds),
        "adagrad": AdaGrad(learning_rate=1.0, initial_range=0.0, weight_bounds=bounds),
        "std_adagrad": StdAdaGrad(learning_rate=1.0, initial_range=0.0, weight_bounds=bounds),
        "adam": Adam(learning_rate=1.0, initial_range=0.0, weight_bounds=bounds),
        "ftrl": FTRL(learning_rate=1.0, initial_range=0.0, alpha=1e-3, weight_bounds=bounds),
    }[rule]
    table, ref = _one_key_table(opt, opt, show_scale=True)
    big = 3e38
    _push_both(table, ref, np.array([1, 1]), np.full((2, 3), big, np.float32), np.array([1.0, 1.0]),
               np.array([0.0, 0.0]), np.array([1, 1]))
    for _ in range(3):
        _push_both(table, ref, np.array([1, 2]), np.array([[1e30, -1e30, 1e30], [-big, big, 1.0]], np.float32),
                   np.array([1e-30, big]), np.array([0.0, big]), np.array([1, 1]))
    assert_match(table, ref, np.array([1, 2]), ctx=rule)
    e = table._backend.export("checkpoint")
    assert np.isfinite(e["base"]).all() and np.isfinite(e["mf"]).all()
    fmax = np.finfo(np.float32).max
    assert (np.abs(e["base"][:, :2]) == fmax).any()  # a show or click did saturate
    path = tmp_path / "ck"
    table.save(path, "checkpoint")
    again = pse.SparseTable(table.config)
    again.load(path)
    got = again._backend.export("checkpoint")
    np.testing.assert_array_equal(got["base"], e["base"])
    np.testing.assert_array_equal(got["mf"], e["mf"])


def test_std_adagrad_per_dim_and_sgd_raw():
    std = StdAdaGrad(learning_rate=1.0, initial_range=0.0, initial_g2sum=1.0, weight_bounds=(-100, 100))
    table, ref = _one_key_table(SGD(learning_rate=0.25, initial_range=0.0), std, show_scale=True)
    _push1(table, ref, 8, [4.0, 2.0, 4.0], show=2.0)  # creates mf; sgd: w = -0.25*4 (raw g, show ignored)
    _push1(table, ref, 8, [4.0, 2.0, 4.0], show=2.0)
    _push1(table, ref, 8, [0.0, 2.0, 4.0], show=2.0)
    e = table._backend.export("checkpoint")
    np.testing.assert_allclose(e["base"][0, 5], -2.0, rtol=1e-6)
    # mf dims: ĝ = (1, 2); step 1 uses G=0, step 2 uses G = ĝ²
    w = [-1.0 - 1.0 * np.sqrt(1 / 2.0), -2.0 - 2.0 * np.sqrt(1 / 5.0)]
    np.testing.assert_allclose(e["mf"][0], w + [2.0, 8.0], rtol=1e-6)
    assert_match(table, ref, np.array([8]))


# ----------------------------------------------------------------------------------------------------------
# mf creation, init values, clipping
# ----------------------------------------------------------------------------------------------------------


def test_mf_created_at_threshold_with_documented_init():
    mf = SGD(learning_rate=0.1, initial_range=0.5, weight_bounds=(-0.3, 0.3))
    lr = SGD(learning_rate=0.1, initial_range=0.25, weight_bounds=(-10, 10))
    cfg = TableConfig(dim=6, accessor=_accessor(embedx_threshold=2.0), lr_optimizer=lr, mf_optimizer=mf, seed=99,
                      num_shards=2)
    table, ref = _pair(cfg)
    keys = np.arange(-50, 50, dtype=np.int64) * 7919
    n = len(keys)
    g = np.full((n, 7), 1.0, np.float32)
    _push_both(table, ref, keys, g, np.full(n, 4.0), np.zeros(n), np.zeros(n))  # S = 1 < 2: no mf yet
    assert table.stats()["keys_with_mf"] == 0
    np.testing.assert_array_equal(table.pull(keys).numpy()[:, 1:], 0.0)
    # lr_w = U(-r, r) from stream 1, then one SGD step
    u = uniform(99, keys, 1, 0)
    np.testing.assert_allclose(table.pull(keys).numpy()[:, 0], (2 * u - 1) * 0.25 - 0.1, rtol=1e-5, atol=1e-6)
    _push_both(table, ref, keys, g * 5, np.full(n, 4.0), np.zeros(n), np.zeros(n))  # S = 2 >= 2: mf created
    assert table.stats()["keys_with_mf"] == n
    got = table.pull(keys).numpy()[:, 1:]
    u = uniform(99, np.repeat(keys, 6), 2, np.tile(np.arange(6, dtype=np.uint64), n)).reshape(n, 6)
    init = np.clip((2 * u - 1) * 0.5, -0.3, 0.3)
    np.testing.assert_allclose(got, init, rtol=1e-6, atol=1e-7)  # the crossing push's mf gradient is dropped
    assert (np.abs(got) == np.float32(0.3)).any(), "some initial values should be clipped to the bounds"
    assert_match(table, ref, keys)
    # mf stays even when the score decays below the threshold; the next push updates it
    _shrink_both(table, ref)
    _push_both(table, ref, keys, g, np.zeros(n), np.zeros(n), np.zeros(n))
    assert_match(table, ref, keys)
    np.testing.assert_allclose(table.pull(keys).numpy()[:, 1:], np.clip(init - 0.1, -0.3, 0.3), rtol=1e-6, atol=1e-7)


def test_init_independent_of_batching_and_shards():
    """Counter-based init: the same keys pushed in another order/batching and shard count get the same values."""
    base = dict(dim=4, accessor=_accessor(embedx_threshold=0.0),
                lr_optimizer=SGD(learning_rate=0.0, initial_range=0.1),
                mf_optimizer=SGD(learning_rate=0.0, initial_range=0.1), seed=5)
    keys = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)
    a = pse.SparseTable(TableConfig(num_shards=1, num_threads=1, **base))
    b = pse.SparseTable(TableConfig(num_shards=16, num_threads=2, **base))
    z = lambda n: np.zeros(n, np.float32)  # noqa: E731
    a.push(keys, np.zeros((300, 5), np.float32), z(300), z(300))
    perm = keys[::-1].copy()
    for part in np.array_split(perm, 7):
        part = np.ascontiguousarray(part)
        b.push(part, np.zeros((len(part), 5), np.float32), z(len(part)), z(len(part)))
    np.testing.assert_array_equal(a.pull(keys).numpy(), b.pull(keys).numpy())
    assert np.abs(a.pull(keys).numpy()).max() > 0.05


# ----------------------------------------------------------------------------------------------------------
# shrink / new_day / end_day at the boundaries
# ----------------------------------------------------------------------------------------------------------


def _lifecycle_pair(**acc):
    cfg = TableConfig(dim=2, accessor=_accessor(**acc), lr_optimizer=SGD(), mf_optimizer=SGD(), num_shards=2)
    return _pair(cfg)


def _shrink_both(table, ref) -> int:
    n = table.shrink()
    assert n == ref.shrink(), "shrink() deleted count differs from the reference"
    return n


def _push_stats(table, ref, keys, shows, clicks):
    n = len(keys)
    _push_both(table, ref, np.array(keys), np.zeros((n, 3)), np.array(shows), np.array(clicks), np.zeros(n))


def test_shrink_delete_threshold_is_strict():
    table, ref = _lifecycle_pair(delete_threshold=1.0, show_click_decay_rate=1.0, delete_after_unseen_days=100)
    # S = 0.25*(show-click) + click: A = 1.0 (kept), B = 0.75 (deleted), C = 1.0 (kept), D = 0.0 (deleted)
    _push_stats(table, ref, [1, 2, 3, 4], [4, 3, 1, 0], [0, 0, 1, 0])
    assert _shrink_both(table, ref) == 2
    assert sorted(k for k in [1, 2, 3, 4] if k in table) == [1, 3]
    assert_match(table, ref, np.array([1, 2, 3, 4]))


def test_shrink_decays_before_deleting():
    table, ref = _lifecycle_pair(delete_threshold=1.0, show_click_decay_rate=0.5, delete_after_unseen_days=100)
    _push_stats(table, ref, [1, 2], [8, 6], [0, 0])  # S = 2.0, 1.5
    assert _shrink_both(table, ref) == 1  # 1.0 kept (==), 0.75 deleted
    assert 1 in table and 2 not in table
    np.testing.assert_array_equal(table.pull(np.array([1]), with_stats=True).numpy()[0, :2], [4.0, 0.0])
    assert _shrink_both(table, ref) == 1
    assert len(table) == 0
    assert_match(table, ref, np.array([1, 2]))


def test_unseen_days_limit_is_strict():
    table, ref = _lifecycle_pair(delete_threshold=0.0, show_click_decay_rate=1.0, delete_after_unseen_days=2)
    _push_stats(table, ref, [10, 11], [1, 1], [1, 1])
    for _ in range(2):
        table.new_day()
        ref.new_day()
    assert _shrink_both(table, ref) == 0  # unseen 2 == limit: kept
    _push_stats(table, ref, [11], [0], [0])  # seen again: unseen_days back to 0
    table.new_day()
    ref.new_day()
    assert _shrink_both(table, ref) == 1  # key 10: unseen 3 > 2
    assert 10 not in table and 11 in table
    assert_match(table, ref, np.array([10, 11]))


def test_end_day_elapsed_decay_idempotent_and_backwards():
    table, ref = _lifecycle_pair(delete_threshold=0.5, show_click_decay_rate=0.5, delete_after_unseen_days=3)
    _push_stats(table, ref, [1, 2, 3], [16, 4, 64], [0, 0, 0])  # S = 4, 1, 16
    assert table.day == -1
    assert table.end_day(5) == ref.end_day(5) == 0  # first call: elapsed 1 -> S = 2, 0.5 (kept, ==), 8
    assert table.day == 5
    assert_match(table, ref, np.array([1, 2, 3]))
    assert table.end_day(5) == ref.end_day(5) == 0  # same day: no decay, no ageing
    assert_match(table, ref, np.array([1, 2, 3]))
    assert table.end_day(7) == ref.end_day(7) == 1  # elapsed 2: factor 0.25 -> S = 0.5, 0.125 (deleted), 2
    assert_match(table, ref, np.array([1, 2, 3]))
    np.testing.assert_array_equal(table._backend.export("checkpoint")["base"][:, 3], [3.0, 3.0])  # 1 + 2
    with pytest.raises(ValueError):
        table.end_day(6)
    assert table.day == 7
    # key 1: S = 0.125 < 0.5; key 3: S = 0.5 (kept by score) but unseen 5 > 3
    assert table.end_day(9) == ref.end_day(9) == 2
    assert_match(table, ref, np.array([1, 2, 3]))


# ----------------------------------------------------------------------------------------------------------
# saves: predicates at the boundary, delta_score commit, tombstones
# ----------------------------------------------------------------------------------------------------------


def test_export_predicates_at_boundary_and_commit():
    table, ref = _lifecycle_pair(base_threshold=1.0, delta_threshold=0.5, delta_keep_days=1,
                                 show_click_decay_rate=1.0, delete_threshold=0.0, delete_after_unseen_days=100)
    # S: key 1 -> 1.0 (== base_threshold), key 2 -> 0.75, key 3 -> 10.0
    _push_stats(table, ref, [1, 2, 3], [4, 3, 40], [0, 0, 0])
    table.new_day()
    ref.new_day()
    _push_stats(table, ref, [1, 2], [0, 0], [0, 0])  # seen again: unseen_days = 0, delta_score unchanged
    table.new_day()
    ref.new_day()
    _push_stats(table, ref, [4], [4], [0])  # S = 1.0, unseen 0
    # unseen_days: 1 -> 1 (== delta_keep_days), 2 -> 1, 3 -> 2 (> 1), 4 -> 0
    np.testing.assert_array_equal(table._backend.export("checkpoint")["base"][:, 3], [1, 1, 2, 0])
    base = table._backend.export("base")
    assert base["keys"].tolist() == [1, 4]
    assert len(base["tombstones"]) == 0
    _save_both(table, ref, "base", "base")
    # commit: saved rows' delta_score -> 0, the others keep theirs
    np.testing.assert_array_equal(table._backend.export("checkpoint")["base"][:, 2], [0.0, 0.75, 10.0, 0.0])
    # delta_score: 2 shows (0.5, == delta_threshold: in) to key 1, 1 show (0.25: out) to key 4
    _push_stats(table, ref, [1, 4], [2, 1], [0, 0])
    delta = table._backend.export("delta")
    assert delta["keys"].tolist() == [1]
    np.testing.assert_array_equal(delta["base"][:, 2], [0.5])
    assert table._backend.export("base")["keys"].tolist() == [1, 4]
    # a push between export and commit is not lost: delta_score -= saved value
    _push_stats(table, ref, [1], [1], [0])
    table._backend.commit_save("delta", delta["keys"], np.ascontiguousarray(delta["base"][:, 2]), 0)
    ref.commit_save("delta", delta["keys"], delta["base"][:, 2], 0)
    assert_match(table, ref, np.arange(1, 6))
    np.testing.assert_array_equal(table.pull(np.array([1]), with_stats=True).numpy()[0, :2], [7.0, 0.0])
    assert table._backend.export("checkpoint")["base"][0, 2] == 0.25


def test_delta_threshold_compared_in_float32_and_base_needs_a_nonnegative_delta_score():
    # 7 shows at nonclk_coeff 0.1: S = 0.7000000000000001 in double, delta_score = float32(0.7) = 0.69999999.
    # With every threshold 0.7 the row gets its mf and goes into the base; the delta compared that float32
    # delta_score with the double 0.7 and left it out. The reference compares floats: 0.7f >= 0.7f.
    table, ref = _lifecycle_pair(base_threshold=0.7, delta_threshold=0.7, show_click_decay_rate=1.0,
                                 delete_threshold=0.0)
    _push_stats(table, ref, [1], [7], [0])
    assert table._backend.export("base")["keys"].tolist() == [1]
    assert table._backend.export("delta")["keys"].tolist() == [1]
    assert_match(table, ref, np.array([1]))
    # delta_score < 0 (more clicks than shows with nonclk_coeff > click_coeff): S >= base_threshold, but the
    # reference's base predicate is its delta one with delta_threshold := 0, so the row stays out.
    table, ref = _lifecycle_pair(nonclk_coeff=2.0, click_coeff=1.0, base_threshold=0.0, delta_threshold=0.0,
                                 show_click_decay_rate=1.0, delete_threshold=0.0)
    _push_stats(table, ref, [5, 6], [100, 100], [0, 0])
    _save_both(table, ref, "base", "base")  # both saved; their delta_score back to 0
    _push_stats(table, ref, [5, 6], [0, 3], [5, 0])  # key 5: delta_score = -5 * 2 + 5 * 1 = -5 (S = 195); key 6: 6
    assert table._backend.export("base")["keys"].tolist() == [6]
    assert table._backend.export("delta")["keys"].tolist() == [6]
    for mode in ("base", "delta"):
        assert sorted(k for k, r in ref.rows.items() if ref.save_predicate(mode, r)) == \
            table._backend.export(mode)["keys"].tolist()


def test_tombstones_in_delta_and_dropped_by_commit():
    table, ref = _lifecycle_pair(delete_threshold=1.0, show_click_decay_rate=1.0, base_threshold=0.0,
                                 delta_threshold=0.0)
    _push_stats(table, ref, [1, 2, 3, 4], [8, 1, 1, 8], [0, 0, 0, 0])
    assert _shrink_both(table, ref) == 2
    assert set(table._backend.export("delta")["tombstones"].tolist()) == {2, 3}
    assert set(table._backend.export("checkpoint")["tombstones"].tolist()) == {2, 3}
    assert len(table._backend.export("base")["tombstones"]) == 0
    _save_both(table, ref, "delta", "delta")
    assert len(table._backend.export("delta")["tombstones"]) == 0
    assert_match(table, ref, np.arange(1, 5))
    # base drops all pending tombstones
    _push_stats(table, ref, [5], [1], [0])
    assert _shrink_both(table, ref) == 1
    assert table._backend.export("delta")["tombstones"].tolist() == [5]
    _save_both(table, ref, "base", "base")
    assert len(table._backend.export("delta")["tombstones"]) == 0
    assert_match(table, ref, np.arange(1, 6))


def test_tombstones_start_with_the_first_committed_base_or_delta(tmp_path):
    """A new SparseTable lists no tombstones: until a base or delta is committed no serving view can hold
    its keys, and a job that only checkpoints would otherwise grow the list by 8 bytes per deleted key
    forever. The first committed base (or delta) save starts them; a checkpoint load restores whether
    they are kept, from the save chain it names. The reference follows the same rule."""
    acc = dict(delete_threshold=1.0, show_click_decay_rate=1.0, base_threshold=0.0, delta_threshold=0.0)
    cfg = TableConfig(dim=2, accessor=_accessor(**acc), lr_optimizer=SGD(), mf_optimizer=SGD(), num_shards=2)

    def push(t, keys, show):
        n = len(keys)
        t.push(np.array(keys, np.int64), np.zeros((n, 3), np.float32), np.full(n, show, np.float32),
               np.zeros(n, np.float32))

    def pending(t):
        return t._backend.export("checkpoint")["tombstones"].tolist()

    t = pse.SparseTable(cfg)
    ref = CtrTableRef(cfg.to_dict())
    ref.track_tombstones = False
    push(t, [1, 2, 3, 4], 8)
    push(t, [5, 6], 1)
    for k, show in ((1, 8), (2, 8), (3, 8), (4, 8), (5, 1), (6, 1)):
        ref.push(np.array([k], np.int64), np.zeros((1, 3), np.float32), np.array([show], np.float32),
                 np.zeros(1, np.float32), np.zeros(1, np.int32))
    assert t.shrink() == ref.shrink() == 2  # keys 5 and 6
    assert pending(t) == [] and ref.export("checkpoint")["tombstones"].tolist() == []
    t.save(tmp_path / "ck_before")  # a checkpoint does not start them
    push(t, [7], 1)
    assert t.shrink() == 1 and pending(t) == []

    t.save(tmp_path / "base", mode="base")  # committed: from now on deletions are tombstones
    push(t, [8], 1)
    assert t.shrink() == 1 and pending(t) == [8]
    ref.commit_save("base", np.zeros(0, np.int64), np.zeros(0, np.float32), 0)
    ref.push(np.array([8], np.int64), np.zeros((1, 3), np.float32), np.ones(1, np.float32),
             np.zeros(1, np.float32), np.zeros(1, np.int32))
    assert ref.shrink() == 1 and ref.export("checkpoint")["tombstones"].tolist() == [8]

    t.save(tmp_path / "ck_after")
    after = pse.SparseTable(cfg)
    after.load(tmp_path / "ck_after")
    push(after, [9], 1)
    assert after.shrink() == 1 and pending(after) == [8, 9]
    before = pse.SparseTable(cfg)
    before.load(tmp_path / "ck_before")
    push(before, [9], 1)
    assert before.shrink() == 1 and pending(before) == []

    d = pse.SparseTable(cfg)  # a delta without a base starts them too
    push(d, [1], 8)
    d.save(tmp_path / "delta", mode="delta")
    push(d, [9], 1)
    assert d.shrink() == 1 and pending(d) == [9]


# ----------------------------------------------------------------------------------------------------------
# probabilistic admission
# ----------------------------------------------------------------------------------------------------------


def _admission_table(seed, num_shards=8):
    cfg = TableConfig(dim=2, accessor=_accessor(create_probability_from_score=True, embedx_threshold=100.0),
                      lr_optimizer=SGD(), mf_optimizer=SGD(), seed=seed, num_shards=num_shards)
    return pse.SparseTable(cfg)


def _push_keys(table, keys, show, click):
    n = len(keys)
    keys = np.ascontiguousarray(keys, np.int64)
    table.push(keys, np.zeros((n, 3), np.float32), np.full(n, show, np.float32), np.full(n, click, np.float32))


def _admitted(table, keys):
    return np.array([int(k) in table for k in keys])


def test_admission_fraction_close_to_score():
    n = 4000
    keys = np.arange(n, dtype=np.int64) * 1000003
    for show, s in ((2.0, 0.5), (1.0, 0.25)):  # S = 0.25 * show
        t = _admission_table(seed=1)
        _push_keys(t, keys, show, 0.0)
        frac = _admitted(t, keys).mean()
        # 5 sigma of a binomial(n, s) fraction
        assert abs(frac - s) < 5 * np.sqrt(s * (1 - s) / n), (show, frac)
        assert t.stats()["admission_rejected"] == n - len(t)
        # a second push draws again (a new push id), so about 1 - (1-s)^2 are in after two
        _push_keys(t, keys, show, 0.0)
        frac2 = _admitted(t, keys).mean()
        p2 = 1 - (1 - s) ** 2
        assert abs(frac2 - p2) < 5 * np.sqrt(p2 * (1 - p2) / n), (show, frac2)


def test_admission_deterministic_ends():
    keys = np.arange(500, dtype=np.int64)
    t = _admission_table(seed=3)
    _push_keys(t, keys, 0.0, 0.0)  # S = 0: never admitted
    assert len(t) == 0
    _push_keys(t, keys, 4.0, 0.0)  # S = 1: always admitted
    assert len(t) == 500
    _push_keys(t, keys + 1000, 1.0, 1.0)  # S = 1 via the click
    assert len(t) == 1000


def test_admission_reproducible_per_seed_and_independent_of_sharding():
    keys = np.random.default_rng(2).integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64)
    # the same pushes, in parts: the draw of a key depends on its push, not on the shard that applies it
    a, b, c = _admission_table(seed=10), _admission_table(seed=10, num_shards=1), _admission_table(seed=11)
    for t in (a, b, c):
        for part in np.array_split(keys, 5):
            _push_keys(t, part, 2.0, 0.0)
    ma, mb, mc = _admitted(a, keys), _admitted(b, keys), _admitted(c, keys)
    np.testing.assert_array_equal(ma, mb)
    assert (ma != mc).mean() > 0.3  # independent draws disagree on about half the keys


def test_admission_matches_documented_generator():
    """The admitted set is the one the documented counter-based draw gives: u < s with draw index
    i = (day_index << 48) | push_id (push_id = the table's count of pushes, day_index = day + 1)."""
    keys = np.random.default_rng(4).integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64)
    t = _admission_table(seed=21)
    ref = CtrTableRef(t.config.to_dict())
    n = len(keys)
    for day in (None, 0, 3):
        if day is not None:
            assert t.end_day(day) == ref.end_day(day)
        for _ in range(2):
            _push_keys(t, keys, 2.0, 0.0)
            ref.push(keys, np.zeros((n, 3), np.float32), np.full(n, 2.0, np.float32), np.zeros(n, np.float32))
            np.testing.assert_array_equal(_admitted(t, keys), np.array([int(k) in ref for k in keys]))
    assert len(t) < n  # some keys were still being drawn for on the last day


# ----------------------------------------------------------------------------------------------------------
# bigger batches through the parallel path; NaN rows under nan_policy="skip"
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_threads", [1, 2, 4])
def test_large_batches_parallel_path(num_threads):
    # 20,000 keys: past the 4,096 at which a call goes to the thread pool, and cut into 2 or 4 chunks when
    # partitioned by shard (a duplicate's copies fall into different chunks; the sums keep input order).
    cfg = TableConfig(dim=8, accessor=_accessor(embedx_threshold=1.0), lr_optimizer=_rule("adagrad", "lr"),
                      mf_optimizer=_rule("adam", "mf"), seed=123, num_shards=16, num_threads=num_threads)
    table, ref = _pair(cfg)
    rng = np.random.default_rng(77)
    universe = _universe(rng, 8000)  # ~2.5 pushes per key and step: some stay below the delete threshold
    for step in range(3):
        n = 20_000
        keys = universe[rng.integers(0, len(universe), n)]
        shows = rng.integers(0, 3, n)
        _push_both(table, ref, keys, rng.standard_normal((n, 9)) * 2.0, shows, rng.binomial(shows, 0.3),
                   rng.integers(0, 9, n))
        assert_match(table, ref, universe[:200], f"step {step}")
    assert _shrink_both(table, ref) > 0
    assert_match(table, ref, universe[:200], "after shrink")


def test_nan_rows_skipped_match_reference_without_them():
    cfg = TableConfig(dim=3, accessor=_accessor(embedx_threshold=0.0), lr_optimizer=_rule("std_adagrad", "lr"),
                      mf_optimizer=_rule("ftrl", "mf"), seed=4, num_shards=4, nan_policy="skip")
    table, ref = _pair(cfg)
    rng = np.random.default_rng(8)
    n = 200
    keys = rng.integers(0, 50, n).astype(np.int64)
    grads = (rng.standard_normal((n, 4)) * 2).astype(np.float32)
    bad = rng.random(n) < 0.1
    grads[bad, rng.integers(0, 4, n)[bad]] = np.array([np.nan, np.inf, -np.inf])[rng.integers(0, 3, int(bad.sum()))]
    shows = rng.integers(0, 4, n).astype(np.float32)
    clicks = np.zeros(n, np.float32)
    slots = np.zeros(n, np.int32)
    skipped = table.push(keys, grads, shows, clicks, slots)
    assert skipped == int(bad.sum()) > 0
    assert table.stats()["rejected"] == skipped
    good = ~bad
    ref.push(keys[good], grads[good], shows[good], clicks[good], slots[good])
    assert_match(table, ref, np.arange(50))
