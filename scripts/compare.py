#!/usr/bin/env python
"""PS embeddings vs the hashed nn.EmbeddingBag baseline on the same data, side by side.

Workloads (each one run of the main job, ``python -m torch_psembed.train``, under torchrun when --nproc > 1):

  ps             PSEmbedding over the sharded table (mf admission by score, decay and eviction): the job's defaults
  hashed-<size>  nn.EmbeddingBag(size, dim + 1, sparse=True) over hashed feasigns + torch.optim.Adagrad,
                 one run per table size in --sizes (same model, dense optimizer, data and seed)

Printed per run: next-day AUC (mean over days, and the last day), next-day log loss, the oracle AUC
(synthetic log), embedding memory (PS: the table's capacity bytes, the largest of the values recorded after
each pass, i.e. before each day's eviction; hashed: weight + Adagrad state), peak RSS of rank 0, and training
samples/s (mean over passes) and per CPU-second of the trainer processes. Then the three targets of docs/benchmarks.md:

  1. AUC:    PS next-day AUC - the best hashed next-day AUC (over the sizes)      target >= 0
  2. memory: PS embedding bytes / bytes of the smallest hashed table reaching
             the PS AUC (within --auc-tol)                                        target <= 0.5
             and the upper end of the bracket: PS bytes / the next smaller size
  3. speed:  PS samples/s / samples/s of the best-AUC hashed run                  target >= 1

Every run keeps the job's delta and base saves (not its checkpoints).

Usage::

    python scripts/compare.py --preset synthetic            # the built-in click log
    python scripts/compare.py --preset criteo               # /work/shared/data/criteo_kaggle_sample
    python scripts/compare.py --preset synthetic --samples-per-day 200000 --days 3
    python scripts/compare.py --preset synthetic --samples-per-day 200000 --days 3 --seeds 0,1,2

One seed is one draw of the click log: on three seeds the same configuration's AUC difference moved by
0.002 (docs/benchmarks.md, "Main job"), so --seeds is the way to settle a difference that small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from torch_psembed.metrics import read_jsonl  # noqa: E402
from torch_psembed.distributed.ports import free_port  # noqa: E402

CRITEO = "/work/shared/data/criteo_kaggle_sample"

PRESETS = {
    # hashed sizes doubling through the range where the hashed AUC meets the PS AUC, so the memory ratio is
    # bracketed within a factor of 2 (a coarser grid flatters PS: the smallest size reaching its AUC may be
    # far above the size that just reaches it)
    "synthetic": {"args": [], "sizes": [1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 20]},
    "criteo": {
        # the sample's own config (data layout; lifecycle and rules scaled to 1,800-row days: docs/training.md)
        "args": ["--config", os.path.join(ROOT, "configs", "criteo_sample.json"),
                 "--data-path", os.path.join(CRITEO, "train.txt"), "--test-path", os.path.join(CRITEO, "dev.txt")],
        "sizes": [1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18],
    },
}


def run_job(out: str, args: List[str], nproc: int, log) -> Dict[str, Any]:
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), "-m", "torch_psembed.train"]
    else:
        cmd = [sys.executable, "-m", "torch_psembed.train"]
    # delta and base saves on, as in the job (each delta save drains the table's pending tombstones, so the
    # PS memory figure includes what the job's publishing costs); checkpoints off (they do not change the table)
    # --overwrite: a rerun of the comparison into the same --out replaces its own earlier runs
    cmd += ["--out", out, "--overwrite", "--no-progress", "--no-plot", "--set", "save.checkpoint=false", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return summarize(read_jsonl(os.path.join(out, "metrics.jsonl")), time.perf_counter() - t0)


def summarize(recs: List[Dict[str, Any]], wall: float) -> Dict[str, Any]:
    passes = [r for r in recs if r["event"] == "pass"]
    evals = [r for r in recs if r["event"] == "eval" and r.get("auc") is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    out = {
        "auc": mean([e["auc"] for e in evals]),
        "auc_last": evals[-1]["auc"] if evals else float("nan"),
        "logloss": mean([e["logloss"] for e in evals]),
        "oracle_auc": mean([e["oracle_auc"] for e in evals if e.get("oracle_auc") is not None]),
        # the peak over the pass records (each taken after a pass, before that day's eviction): capacity
        # grows in powers of two and need not peak on the last day
        "bytes": max(p["bytes"] for p in passes) if passes else 0,
        "bytes_last": passes[-1]["bytes"] if passes else 0,
        "keys": passes[-1]["keys"] if passes else 0,
        "rss_mb": max((p.get("rss_mb") or 0) for p in passes) if passes else 0,
        "samples_per_s": mean([p["samples_per_s"] for p in passes]),
        # samples per CPU-second of the trainer processes (summed over ranks): far less disturbed by other
        # jobs on a shared machine than samples/s, which two back-to-back runs can see differ by 2x
        "samples_per_cpu_s": mean([p["samples_per_cpu_s"] for p in passes if p.get("samples_per_cpu_s")]),
        "wall_s": wall,
    }
    return out


def compute_targets(results: Dict[str, Dict[str, Any]], auc_tol: float = 0.002) -> Dict[str, Any]:
    """The three targets from ``results`` (``"ps"`` and ``"hashed-<size>"`` summaries, see :func:`summarize`).

    Memory: the PS bytes over the bytes of the smallest hashed table whose AUC is within ``auc_tol`` of the
    PS AUC (None when none is); the next smaller table tried does not reach it, so the hashed table that just
    reaches it lies between the two: ``memory_ratio_upper`` is the PS bytes over that smaller table's.
    """
    ps = results["ps"]
    hashed = {k: v for k, v in results.items() if k != "ps"}
    if not hashed:
        raise ValueError("no hashed runs to compare with")
    best_name = max(hashed, key=lambda k: hashed[k]["auc"])
    best = hashed[best_name]
    by_size = sorted(hashed, key=lambda k: hashed[k]["bytes"])
    reach = [k for k in by_size if hashed[k]["auc"] >= ps["auc"] - auc_tol]
    below = [k for k in by_size if reach and hashed[k]["bytes"] < hashed[reach[0]]["bytes"]]
    return {
        "auc_delta_vs_best_hashed": ps["auc"] - best["auc"],
        "best_hashed": best_name,
        "memory_ratio_at_equal_auc": (ps["bytes"] / hashed[reach[0]]["bytes"]) if reach else None,
        "smallest_hashed_at_equal_auc": reach[0] if reach else None,
        "largest_hashed_below": below[-1] if below else None,
        "memory_ratio_upper": (ps["bytes"] / hashed[below[-1]]["bytes"]) if below else None,
        "speed_ratio_vs_best_hashed": ps["samples_per_s"] / best["samples_per_s"],
        "cpu_speed_ratio_vs_best_hashed": ps["samples_per_cpu_s"] / best["samples_per_cpu_s"]
        if ps.get("samples_per_cpu_s") and best.get("samples_per_cpu_s") else None,
    }


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="synthetic")
    ap.add_argument("--sizes", help="comma-separated hashed table sizes (rows)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun when > 1). Default: 2")
    ap.add_argument("--days", type=int)
    ap.add_argument("--samples-per-day", type=int)
    ap.add_argument("--auc-tol", type=float, default=0.002, help="'equal AUC' tolerance for the memory target")
    ap.add_argument("--out", help="directory for the runs (default: a temporary directory)")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--seeds", help="comma-separated seeds (--set seed=S: the click log and the model's init): "
                    "the whole comparison once per seed, then a summary across them")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more flags for every run")
    a = ap.parse_args(argv)
    preset = PRESETS[a.preset]
    if a.preset == "criteo" and not os.path.isdir(CRITEO):
        raise SystemExit(f"the Criteo sample is not at {CRITEO}")
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else preset["sizes"]
    common = list(preset["args"])
    if a.days:
        common += ["--days", str(a.days)]
    if a.samples_per_day:
        common += ["--samples-per-day", str(a.samples_per_day)]
    extra = [x for x in a.extra if x != "--"]
    base = a.out or tempfile.mkdtemp(prefix="psembed-compare-")
    os.makedirs(base, exist_ok=True)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [None]
    per_seed = []
    for seed in seeds:
        flags = common + extra + ([] if seed is None else ["--set", f"seed={seed}"])
        out = base if seed is None else os.path.join(base, f"seed{seed}")
        os.makedirs(out, exist_ok=True)
        results = run_all(a, sizes, flags, out)
        targets = compute_targets(results, a.auc_tol)
        print_comparison(a, seed, flags, results, targets)
        per_seed.append({"seed": seed, "common": flags, "results": results, "targets": targets})
    if len(seeds) > 1:
        print_seed_summary(per_seed)
    print(f"runs and logs: {base}")
    summary = {"preset": a.preset, "nproc": a.nproc, "common": common + extra, "results": per_seed[0]["results"],
               "targets": per_seed[0]["targets"], "seeds": per_seed}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def run_all(a, sizes: List[int], flags: List[str], out: str) -> Dict[str, Dict[str, Any]]:
    """The PS run and one hashed run per size, each with ``flags``; summaries by run name."""
    results: Dict[str, Dict[str, Any]] = {}
    with open(os.path.join(out, "compare.log"), "w") as log:
        runs = [("ps", ["--embedding", "ps"])] + [
            (f"hashed-{s}", ["--embedding", "hashed", "--hashed-size", str(s)]) for s in sizes
        ]
        for name, args in runs:
            print(f"[compare] {a.preset}: {name} ...", flush=True)
            results[name] = run_job(os.path.join(out, name), flags + args, a.nproc, log)
    return results


def print_comparison(a, seed: Optional[int], flags: List[str], results: Dict[str, Dict[str, Any]],
                     targets: Dict[str, Any]) -> None:
    head = (f"{'run':<16} {'next_auc':>8} {'last_auc':>8} {'oracle':>7} {'logloss':>8} {'emb_MiB':>9} {'rss_MiB':>8} "
            f"{'samples/s':>10} {'per_cpu_s':>10}")
    print(f"\n{a.preset}: {a.nproc} process(es), common flags: {' '.join(flags) or '(defaults)'}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<16} {r['auc']:>8.4f} {r['auc_last']:>8.4f} {r['oracle_auc']:>7.4f} {r['logloss']:>8.4f} "
              f"{r['bytes'] / 2**20:>9.2f} {r['rss_mb']:>8.0f} {r['samples_per_s']:>10.0f} {r['samples_per_cpu_s']:>10.0f}")
    ps = results["ps"]
    hashed = {k: v for k, v in results.items() if k != "ps"}
    best_name = targets["best_hashed"]
    reach = targets["smallest_hashed_at_equal_auc"]
    below = targets["largest_hashed_below"]
    print(f"\n1. AUC:    PS - best hashed ({best_name}) = {targets['auc_delta_vs_best_hashed']:+.4f}   (target >= 0)")
    if reach:
        print(f"2. memory: PS / {reach} (smallest hashed within {a.auc_tol} of the PS AUC) = "
              f"{targets['memory_ratio_at_equal_auc']:.3f}   (target <= 0.5)")
        if below:
            print(f"           {below} ({hashed[below]['auc']:.4f}) is below it: the hashed table that just "
                  f"reaches it is between the two sizes, the ratio between {targets['memory_ratio_at_equal_auc']:.3f} "
                  f"and {targets['memory_ratio_upper']:.3f}")
    else:
        # No hashed size reached the PS AUC: a hashed table as good would be larger than the largest tried, so
        # PS / largest is an upper bound of the ratio; it shows the target only when that bound is <= 0.5.
        largest = max(hashed[k]["bytes"] for k in hashed)
        bound = ps["bytes"] / largest
        verdict = ("met: PS is smaller than every hashed size tried by at least this" if bound <= 0.5 else
                   "not shown: try larger --sizes")
        print(f"2. memory: no hashed size reached the PS AUC - {a.auc_tol}; PS / largest hashed "
              f"({largest / 2**20:.1f} MiB vs PS {ps['bytes'] / 2**20:.1f} MiB) = {bound:.3f} is an upper bound of "
              f"the ratio   (target <= 0.5: {verdict})")
    print(f"3. speed:  PS / {best_name} samples/s = {targets['speed_ratio_vs_best_hashed']:.2f}   (target >= 1)")
    if targets["cpu_speed_ratio_vs_best_hashed"] is not None:
        print(f"           per CPU-second of the trainers: {targets['cpu_speed_ratio_vs_best_hashed']:.2f} "
              f"(less disturbed by other jobs on the machine)")


def print_seed_summary(per_seed: List[Dict[str, Any]]) -> None:
    """One line per seed and the mean AUC difference: both sides are tested on the same samples, so the
    difference varies far less than either AUC, but one data seed is still one draw of the click log."""
    print("\nacross seeds: PS - best hashed next-day AUC, memory ratio at equal AUC, samples/s ratio")
    deltas = []
    for entry in per_seed:
        t = entry["targets"]
        deltas.append(t["auc_delta_vs_best_hashed"])
        mem = "-" if t["memory_ratio_at_equal_auc"] is None else f"{t['memory_ratio_at_equal_auc']:.3f}"
        if t["memory_ratio_upper"] is not None:
            mem += f"-{t['memory_ratio_upper']:.3f}"
        print(f"  seed {entry['seed']}: {t['auc_delta_vs_best_hashed']:+.4f} ({t['best_hashed']}), memory {mem}, "
              f"speed {t['speed_ratio_vs_best_hashed']:.2f}")
    print(f"  mean AUC difference {sum(deltas) / len(deltas):+.4f}, worst {min(deltas):+.4f}; "
          f"PS ahead on {sum(d >= 0 for d in deltas)} of {len(deltas)} seeds")


if __name__ == "__main__":
    main()
