"""Metrics: exact AUC and log loss against brute-force references, per-pass accumulation, JSON lines, plot."""

import itertools
import math

import time

import numpy as np
import pytest
import torch

from torch_psembed.metrics import JsonlWriter, PassMetrics, auc, log_loss, read_jsonl


def brute_auc(s, y):
    """P(score of a positive > score of a negative) + 1/2 P(tie), over all pairs."""
    pos = [a for a, l in zip(s, y) if l == 1]
    neg = [a for a, l in zip(s, y) if l == 0]
    total = 0.0
    for a, b in itertools.product(pos, neg):
        total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auc_is_exact_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    s = np.round(rng.random(n), 1)  # heavy ties
    y = (rng.random(n) < 0.3 + 0.4 * s).astype(np.float32)
    assert auc(s, y) == pytest.approx(brute_auc(s, y), abs=1e-12)
    s2 = rng.random(n)
    assert auc(s2, y) == pytest.approx(brute_auc(s2, y), abs=1e-12)


def test_auc_edge_cases():
    assert auc([0.1, 0.9], [0, 1]) == 1.0
    assert auc([0.9, 0.1], [0, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert math.isnan(auc([0.1, 0.2], [1, 1]))
    assert math.isnan(auc([], []))
    with pytest.raises(ValueError, match="same length"):
        auc([0.1], [0, 1])
    with pytest.raises(ValueError, match="finite"):  # also on a one-class day, whose AUC is otherwise NaN
        auc([0.1, float("nan")], [0, 0])
    with pytest.raises(ValueError, match="finite"):
        auc([float("nan"), 0.2], [0, 1])


def test_log_loss_refuses_what_is_not_a_probability():
    # logits passed by mistake gave a loss of ~1e-7, NaN probabilities a NaN loss (audit, session 25)
    for bad in ([5.0, -3.0], [0.5, float("nan")], [1.2, 0.1]):
        with pytest.raises(ValueError, match="probs must be finite probabilities in \\[0, 1\\]"):
            log_loss(bad, [1, 0])


def test_log_loss_matches_formula():
    p = np.array([0.1, 0.8, 0.5, 0.0, 1.0])
    y = np.array([0, 1, 1, 0, 1])
    eps = 1e-7
    pc = np.clip(p, eps, 1 - eps)
    ref = -sum(yi * math.log(pi) + (1 - yi) * math.log(1 - pi) for pi, yi in zip(pc, y)) / len(p)
    assert log_loss(p, y) == pytest.approx(ref, rel=1e-12)
    assert log_loss([0.0], [1]) == pytest.approx(-math.log(eps))


def test_pass_metrics_single_process():
    rng = np.random.default_rng(0)
    m = PassMetrics(window=100)
    ps, ys, os_ = [], [], []
    for _ in range(5):
        p = torch.from_numpy(rng.random(64).astype(np.float32))
        y = (torch.rand(64) < p).float()
        o = p.clone()
        m.add(p, y, o)
        ps.append(p.numpy())
        ys.append(y.numpy())
        os_.append(o.numpy())
    r = m.result()
    P, Y = np.concatenate(ps), np.concatenate(ys)
    assert r["samples"] == 320
    assert r["auc"] == pytest.approx(brute_auc(P, Y), abs=1e-12)
    assert r["logloss"] == pytest.approx(log_loss(P, Y))
    assert r["oracle_auc"] == pytest.approx(r["auc"])
    assert r["ctr"] == pytest.approx(Y.mean()) and r["pred_ctr"] == pytest.approx(P.mean())
    assert r["samples_per_s"] > 0
    assert r["cpu_seconds"] >= 0 and r["samples_per_cpu_s"] == pytest.approx(320 / r["cpu_seconds"])
    # running AUC: the last whole batches covering >= window samples (here 2 batches of 64)
    assert m.running_auc() == pytest.approx(auc(np.concatenate(ps[-2:]), np.concatenate(ys[-2:])))
    assert "oracle_auc" not in PassMetrics().result() and PassMetrics().result()["samples"] == 0


def test_jsonl_roundtrip(tmp_path):
    w = JsonlWriter(str(tmp_path / "sub" / "m.jsonl"))
    w.write({"a": 1, "b": float("nan"), "c": np.float32(0.5), "d": [np.int64(3)]})
    w.write({"a": 2})
    recs = read_jsonl(str(tmp_path / "sub" / "m.jsonl"))
    assert recs == [{"a": 1, "b": None, "c": 0.5, "d": [3]}, {"a": 2}]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(str(tmp_path / "bad.jsonl"))


def test_plot_and_summary(tmp_path):
    from torch_psembed.plotting import plot_metrics, summary_table

    recs = []
    for d in range(2):
        for p in range(2):
            recs.append({"event": "pass", "day": d, "pass": p, "passes": 2, "auc": 0.7 + 0.01 * d, "logloss": 0.4,
                         "samples_per_s": 1000.0, "keys": 100 * (d + 1), "keys_with_mf": 10, "bytes": 2**20})
        recs.append({"event": "eval", "day": d, "auc": 0.69, "logloss": 0.41, "oracle_auc": 0.8,
                     "oracle_logloss": 0.35, "samples_per_s": 5000.0})
    png = plot_metrics(recs, str(tmp_path / "m.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = summary_table(recs)
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].split()[:4] == ["0", "0.7000", "0.6900", "0.8000"]
    assert lines[3].split()[5] == "200"


def test_pass_metrics_cpu_seconds_count_this_process():
    m = PassMetrics()
    t0 = time.process_time()
    x = 0
    while time.process_time() - t0 < 0.05:  # burn 50 ms of CPU, however long that takes on a busy machine
        x += 1
    m.add(torch.full((10,), 0.5), torch.ones(10))
    r = m.result()
    assert r["cpu_seconds"] >= 0.05 and r["seconds"] > 0
    assert r["samples_per_cpu_s"] == pytest.approx(10 / r["cpu_seconds"])
