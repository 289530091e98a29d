"""Metrics of the main job: exact AUC, log loss, per-pass accumulation across ranks, JSON-lines output.

AUC is exact: the (score, label) pairs of a pass are kept (8 bytes a sample) and ranked once at the end of
the pass, with tied scores given their average rank (the Mann-Whitney U statistic), so it equals
``sklearn.metrics.roc_auc_score``. The running AUC shown in the progress bar is the same computation over
the most recent samples only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch

__all__ = ["auc", "log_loss", "PassMetrics", "JsonlWriter", "read_jsonl"]


def _arrays(scores, labels):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.shape[0]} and {y.shape[0]}")
    return s, y


def auc(scores, labels) -> float:
    """Exact ROC AUC of ``scores`` against 0/1 ``labels`` (ties count one half). NaN when a class is absent."""
    s, y = _arrays(scores, labels)
    if not np.all(np.isfinite(s)):  # (before the class count: NaN scores of a one-class day are an error too)
        raise ValueError("scores must be finite")
    pos = y > 0.5
    n_pos = int(pos.sum())
    n_neg = s.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # average 1-based rank of each distinct score: (first + last) / 2
    last = np.cumsum(counts).astype(np.float64)
    avg_rank = last - (counts - 1) / 2.0
    rank_sum = float(avg_rank[inverse][pos].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(probs, labels, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities ``probs`` (clipped to ``[eps, 1 - eps]``)."""
    p, y = _arrays(probs, labels)
    if p.size == 0:
        return float("nan")
    if not np.all((p >= 0.0) & (p <= 1.0)):  # (NaN and inf fail it too) logits passed by mistake read ~0 loss
        raise ValueError("probs must be finite probabilities in [0, 1] (pass sigmoid(logits), not logits)")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


class PassMetrics:
    """Collects predictions of one pass on this rank; :meth:`result` combines all ranks.

    Args:
        window (int): samples kept for :meth:`running_auc`. Default: 50_000.
    """

    def __init__(self, window: int = 50_000) -> None:
        self.window = window
        self._probs: List[np.ndarray] = []
        self._labels: List[np.ndarray] = []
        self._oracle: List[np.ndarray] = []
        self.samples = 0
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def add(self, probs: torch.Tensor, labels: torch.Tensor, oracle: Optional[torch.Tensor] = None) -> None:
        self._probs.append(probs.detach().reshape(-1).float().numpy().copy())
        self._labels.append(labels.detach().reshape(-1).float().numpy().copy())
        if oracle is not None:
            self._oracle.append(oracle.detach().reshape(-1).float().numpy().copy())
        self.samples += int(labels.numel())

    def running_auc(self) -> float:
        """AUC over (about) the last ``window`` samples on this rank."""
        n = 0
        k = len(self._probs)
        while k > 0 and n < self.window:
            k -= 1
            n += len(self._probs[k])
        return auc(np.concatenate(self._probs[k:]), np.concatenate(self._labels[k:])) if n else float("nan")

    def _local(self):
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)  # noqa: E731
        return cat(self._probs), cat(self._labels), cat(self._oracle)

    def result(self, group=None) -> Dict[str, Any]:
        """``auc``, ``logloss``, ``samples``, ``ctr``, ``pred_ctr``, ``seconds``, ``samples_per_s``,
        ``cpu_seconds``, ``samples_per_cpu_s`` and ``oracle_auc`` (when oracle probabilities were given), over
        all ranks of ``group`` (collective).

        ``seconds`` is the slowest rank's wall time; ``cpu_seconds`` the sum over ranks of the CPU time of
        each process (all its threads, user + system; not DataLoader worker processes), which other jobs on a
        shared machine disturb much less than wall time.
        """
        seconds = time.perf_counter() - self.start
        cpu = time.process_time() - self.cpu_start
        p, y, o = self._local()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            p, y, o, seconds, cpu = _gather(p, y, o, seconds, cpu, group)
        out: Dict[str, Any] = {
            "samples": int(p.size),
            "auc": auc(p, y),
            "logloss": log_loss(p, y),
            "ctr": float(y.mean()) if y.size else float("nan"),
            "pred_ctr": float(p.mean()) if p.size else float("nan"),
            "seconds": seconds,
            "samples_per_s": p.size / seconds if seconds > 0 else float("nan"),
            "cpu_seconds": cpu,
            "samples_per_cpu_s": p.size / cpu if cpu > 0 else float("nan"),
        }
        if o.size == p.size and o.size:
            out["oracle_auc"] = auc(o, y)
            out["oracle_logloss"] = log_loss(o, y)
        return out


def _gather(p: np.ndarray, y: np.ndarray, o: np.ndarray, seconds: float, cpu: float, group):
    """Concatenate every rank's (probs, labels, oracle) in rank order; the slowest rank's seconds; the sum
    of the ranks' CPU seconds."""
    dist = torch.distributed
    ws = dist.get_world_size(group)
    local = torch.from_numpy(np.stack([p, y, o]) if o.size == p.size else np.stack([p, y, np.full_like(p, np.nan)]))
    meta = torch.tensor([[float(p.size), seconds, cpu]], dtype=torch.float64)
    metas = [torch.zeros_like(meta) for _ in range(ws)]
    dist.all_gather(metas, meta, group=group)
    sizes = [int(m[0, 0]) for m in metas]
    n = max(sizes)
    padded = torch.zeros(3, n, dtype=torch.float32)
    padded[:, : p.size] = local
    bufs = [torch.zeros_like(padded) for _ in range(ws)]
    dist.all_gather(bufs, padded, group=group)
    allv = torch.cat([b[:, :k] for b, k in zip(bufs, sizes)], 1).numpy()
    oracle = allv[2] if allv.shape[1] and not np.isnan(allv[2]).any() else np.zeros(0, np.float32)
    return allv[0], allv[1], oracle, max(float(m[0, 1]) for m in metas), sum(float(m[0, 2]) for m in metas)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


class JsonlWriter:
    """Appends one JSON object per line to ``path`` (NaN/Inf become null), flushed after each record."""

    def __init__(self, path: str) -> None:
        self.path = path
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(record), sort_keys=False) + "\n")


def read_jsonl(path: str, skip_cut_last: bool = False) -> List[Dict[str, Any]]:
    """The records of a JSON-lines file.

    ``skip_cut_last``: a last line with no newline that is not JSON (a crash while :class:`JsonlWriter` wrote
    it) is left out, with a warning on stderr, instead of raising."""
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for i, line in enumerate(lines):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                if skip_cut_last and i == len(lines) - 1 and not line.endswith("\n"):
                    print(f"warning: {path}:{i + 1}: the last line is cut short (a crash while writing it); "
                          "left out", file=sys.stderr, flush=True)
                    break
                raise ValueError(f"{path}:{i + 1}: not JSON: {e}") from None
    return out
