"""scripts/bench_table.py and scripts/table_drift.py at toy size: they run and report (speed is never
asserted), and the pass timer warms up as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name):
    sys.path.insert(0, SCRIPTS)  # table_drift imports bench_table by name
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(SCRIPTS)


def test_timeit_warms_up_for_the_given_time_then_times_one_pass(monkeypatch):
    bt = load_script("bench_table")
    # A fake clock that only moves when fn runs (0.5 s a call: exact in binary), so the counts below do
    # not depend on how busy the machine is.
    now = [100.0]
    monkeypatch.setattr(bt.time, "perf_counter", lambda: now[0])
    calls = []

    def fn(b):
        calls.append(b)
        now[0] += 0.5

    bt.timeit(fn, [0, 1, 2], warmup_s=0.0)
    assert calls == [0, 0, 1, 2]  # one warm-up call, then the pass
    calls.clear()
    seconds = bt.timeit(fn, [0, 1, 2], warmup_s=7.5)
    assert seconds == 1.5  # the pass alone: 3 calls
    warm = calls[:-3]
    assert calls[-3:] == [0, 1, 2]
    assert len(warm) == 15  # 0.5 s a call until 7.5 s have passed
    assert warm == [i % 3 for i in range(len(warm))]  # cycling over the pass's own batches


def test_bench_table_small_run_writes_every_figure(tmp_path, capsys):
    bt = load_script("bench_table")
    out = tmp_path / "bench.json"
    assert bt.main(["--keys", "20000", "--batch", "1000", "--batches", "2", "--repeat", "1", "--no-memory",
                    "--warmup-ms", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["warmup_ms"] == 1
    for dist in ("uniform", "zipf"):
        fig = res[f"{dist}_t1"]
        for op in ("pull", "index_select", "push", "index_add_"):
            assert fig[op] > 0 and len(fig["seconds"][op]) == 1
        assert fig["pull_ratio"] == pytest.approx(fig["pull"] / fig["index_select"])
        assert f"{dist:7s} threads=1: pull" in printed


def test_bench_table_rejects_a_negative_warmup():
    bt = load_script("bench_table")
    with pytest.raises(SystemExit):
        bt.main(["--warmup-ms", "-1", "--no-memory"])


@pytest.mark.parametrize("op", ["pull", "push"])
def test_table_drift_small_run_reports_pairs(op, capsys):
    drift = load_script("table_drift")
    assert drift.main(["--keys", "20000", "--batch", "1000", "--batches", "2", "--seconds", "0.3",
                       "--warmup-ms", "0", "--op", op]) == 0
    printed = capsys.readouterr().out
    base = "index_select" if op == "pull" else "index_add_"
    assert f"# table_drift: {op} vs {base}" in printed
    assert "pairs: ratio median" in printed and f"under the target {drift.bt.TARGETS[op]}" in printed
