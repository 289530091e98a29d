"""scripts/compare.py: the three targets computed from run summaries (the runs themselves are the main job,
covered by test_train_e2e.py)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compare():
    spec = importlib.util.spec_from_file_location("compare", os.path.join(ROOT, "scripts", "compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _r(auc, mib, sps, cpu_sps=None):
    return {"auc": auc, "bytes": int(mib * 2**20), "samples_per_s": sps, "samples_per_cpu_s": cpu_sps}


def test_targets_bracket_the_memory_ratio():
    c = _compare()
    results = {
        "ps": _r(0.7050, 6.0, 30000, 18000),
        "hashed-32768": _r(0.6950, 2.25, 31000),
        "hashed-65536": _r(0.6996, 4.5, 29000),
        "hashed-131072": _r(0.7042, 9.0, 28000),   # within 0.002 of 0.7050: the smallest reaching it
        "hashed-262144": _r(0.7049, 18.0, 27000),
        "hashed-1048576": _r(0.7052, 72.0, 25000, 12000),  # the best AUC
    }
    t = c.compute_targets(results, auc_tol=0.002)
    assert t["best_hashed"] == "hashed-1048576"
    assert t["auc_delta_vs_best_hashed"] == pytest.approx(0.7050 - 0.7052)
    assert t["smallest_hashed_at_equal_auc"] == "hashed-131072"
    assert t["memory_ratio_at_equal_auc"] == pytest.approx(6.0 / 9.0, rel=1e-6)
    assert t["largest_hashed_below"] == "hashed-65536"
    assert t["memory_ratio_upper"] == pytest.approx(6.0 / 4.5, rel=1e-6)
    assert t["speed_ratio_vs_best_hashed"] == pytest.approx(30000 / 25000)
    assert t["cpu_speed_ratio_vs_best_hashed"] == pytest.approx(18000 / 12000)
    # a coarser grid (x4) reports a lower ratio for the same runs: why the bracket is printed
    coarse = {k: v for k, v in results.items() if k not in ("hashed-32768", "hashed-131072")}
    tc = c.compute_targets(coarse, auc_tol=0.002)
    assert tc["smallest_hashed_at_equal_auc"] == "hashed-262144"
    assert tc["memory_ratio_at_equal_auc"] == pytest.approx(6.0 / 18.0, rel=1e-6)
    assert tc["memory_ratio_upper"] == pytest.approx(6.0 / 4.5, rel=1e-6)


def test_targets_when_no_hashed_size_reaches_or_the_smallest_does():
    c = _compare()
    ps_wins = {"ps": _r(0.72, 6.0, 1.0), "hashed-1024": _r(0.70, 1.0, 1.0), "hashed-4096": _r(0.71, 4.0, 2.0)}
    t = c.compute_targets(ps_wins)
    assert t["memory_ratio_at_equal_auc"] is None and t["smallest_hashed_at_equal_auc"] is None
    assert t["largest_hashed_below"] is None and t["memory_ratio_upper"] is None
    assert t["best_hashed"] == "hashed-4096" and t["speed_ratio_vs_best_hashed"] == pytest.approx(0.5)
    assert t["cpu_speed_ratio_vs_best_hashed"] is None  # not recorded
    smallest = {"ps": _r(0.70, 2.0, 1.0), "hashed-1024": _r(0.6985, 1.0, 1.0), "hashed-4096": _r(0.71, 4.0, 1.0)}
    t = c.compute_targets(smallest)
    assert t["smallest_hashed_at_equal_auc"] == "hashed-1024" and t["memory_ratio_at_equal_auc"] == pytest.approx(2.0)
    assert t["largest_hashed_below"] is None and t["memory_ratio_upper"] is None
    with pytest.raises(ValueError, match="no hashed runs"):
        c.compute_targets({"ps": _r(0.7, 1.0, 1.0)})


def test_summarize_takes_the_peak_bytes_and_the_mean_next_day_auc():
    c = _compare()
    recs = [
        {"event": "pass", "day": 0, "bytes": 100, "keys": 10, "samples_per_s": 10.0, "rss_mb": 5, "samples_per_cpu_s": 4.0},
        {"event": "pass", "day": 1, "bytes": 300, "keys": 30, "samples_per_s": 20.0, "rss_mb": 7, "samples_per_cpu_s": 6.0},
        {"event": "eval", "day": 0, "auc": 0.6, "logloss": 0.5, "oracle_auc": 0.8},
        {"event": "pass", "day": 2, "bytes": 200, "keys": 20, "samples_per_s": 30.0, "rss_mb": 6, "samples_per_cpu_s": 8.0},
        {"event": "eval", "day": 1, "auc": 0.7, "logloss": 0.3, "oracle_auc": 0.9},
        {"event": "end", "seconds": 1.0},
    ]
    s = c.summarize(recs, wall=2.0)
    assert s["bytes"] == 300 and s["bytes_last"] == 200 and s["keys"] == 20 and s["rss_mb"] == 7
    assert s["auc"] == pytest.approx(0.65) and s["auc_last"] == 0.7 and s["logloss"] == pytest.approx(0.4)
    assert s["oracle_auc"] == pytest.approx(0.85) and s["samples_per_s"] == pytest.approx(20.0)
    assert s["samples_per_cpu_s"] == pytest.approx(6.0)


def test_seed_summary_reports_mean_worst_and_wins(capsys):
    c = _compare()
    per_seed = []
    for seed, ps_auc in ((0, 0.7044), (1, 0.7110), (2, 0.6910)):
        results = {"ps": _r(ps_auc, 2.0, 30000), "hashed-65536": _r(0.7000, 4.5, 29000),
                   "hashed-1048576": _r(0.7100 if seed == 1 else 0.7052, 72.0, 28000)}
        per_seed.append({"seed": seed, "targets": c.compute_targets(results)})
    c.print_seed_summary(per_seed)
    out = capsys.readouterr().out
    # deltas: 0.7044 - 0.7052, 0.7110 - 0.7100, 0.6910 - 0.7052
    assert "seed 0: -0.0008" in out and "seed 1: +0.0010" in out and "seed 2: -0.0142" in out
    assert "mean AUC difference -0.0047, worst -0.0142; PS ahead on 1 of 3 seeds" in out
