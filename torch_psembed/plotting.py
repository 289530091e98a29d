"""The end-of-run figure and summary table of the main job (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

__all__ = ["plot_metrics", "summary_table"]


def _f(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def _x(r: Dict[str, Any]) -> float:
    """Position on the day axis: pass p of P on day d sits at d + (p + 1) / P; an eval after day d at d + 1."""
    if r["event"] == "pass":
        return r["day"] + (r["pass"] + 1) / r["passes"]
    return r["day"] + 1.0


def plot_metrics(records: List[Dict[str, Any]], path: str, title: Optional[str] = None) -> str:
    """Write a PNG with four panels (AUC, log loss, table size, throughput by day) to ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    passes = [r for r in records if r.get("event") == "pass"]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))

    def series(rs, key):
        pts = [(_x(r), r.get(key)) for r in rs if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    a = ax[0, 0]
    a.plot(*series(passes, "auc"), "o-", label="train pass AUC (before update)")
    a.plot(*series(evals, "auc"), "s-", label="next-day AUC")
    a.plot(*series(evals, "oracle_auc"), "k--", label="oracle AUC (true p)")
    a.set_title("AUC")
    a.legend(fontsize=8)
    a = ax[0, 1]
    a.plot(*series(passes, "logloss"), "o-", label="train pass")
    a.plot(*series(evals, "logloss"), "s-", label="next day")
    a.plot(*series(evals, "oracle_logloss"), "k--", label="oracle")
    a.set_title("log loss")
    a.legend(fontsize=8)
    a = ax[1, 0]
    a.plot(*series(passes, "keys"), "o-", label="keys")
    a.plot(*series(passes, "keys_with_mf"), "s-", label="keys with mf")
    a.set_title("table size")
    a.legend(fontsize=8)
    a2 = a.twinx()
    xs, ys = series(passes, "bytes")
    a2.plot(xs, [y / 2**20 for y in ys], "r:", label="MiB")
    a2.set_ylabel("MiB", color="r")
    a = ax[1, 1]
    a.plot(*series(passes, "samples_per_s"), "o-", label="train")
    a.plot(*series(evals, "samples_per_s"), "s-", label="eval")
    a.set_title("samples/s")
    a.legend(fontsize=8)
    for a in ax.flat:
        a.set_xlabel("day")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary_table(records: List[Dict[str, Any]]) -> str:
    """One line per day: last pass's train AUC, next-day AUC / log loss / oracle AUC, table size, speed."""
    days = sorted({r["day"] for r in records if r.get("event") in ("pass", "eval")})
    head = (
        f"{'day':>3} {'train_auc':>9} {'next_auc':>8} {'oracle':>7} {'next_ll':>8} "
        f"{'keys':>10} {'keys_mf':>10} {'MiB':>8} {'samples/s':>10}"
    )
    lines = [head, "-" * len(head)]
    for d in days:
        ps = [r for r in records if r.get("event") == "pass" and r["day"] == d]
        ev = [r for r in records if r.get("event") == "eval" and r["day"] == d]
        p = ps[-1] if ps else {}
        e = ev[-1] if ev else {}
        sps = [r["samples_per_s"] for r in ps if r.get("samples_per_s")]
        speed = sum(sps) / len(sps) if sps else None
        mib = p.get("bytes") / 2**20 if p.get("bytes") is not None else None
        lines.append(
            f"{d:>3} {_f(p.get('auc'), '.4f'):>9} {_f(e.get('auc'), '.4f'):>8} {_f(e.get('oracle_auc'), '.4f'):>7} "
            f"{_f(e.get('logloss'), '.4f'):>8} {_f(p.get('keys'), 'd'):>10} {_f(p.get('keys_with_mf'), 'd'):>10} "
            f"{_f(mib, '.2f'):>8} {_f(speed, '.0f'):>10}"
        )
    return "\n".join(lines)
