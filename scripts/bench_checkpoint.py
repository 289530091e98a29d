"""Checkpoint save/load throughput, beside torch.save/torch.load of the same rows as dense tensors.

Workloads (one process = one rank; the table is filled with load_rows, not trained):
  save       SparseTable.save(path, "checkpoint"): _C save_buckets (the table writes the bucket files, crc32)
             + fsync + manifest
  load       SparseTable.load(path) into an empty table: map every file, verify it (size, crc32, flags, buckets,
             values with _C check_segments), then insert with _C load_segments(check=False)
  export     the _C export_buckets alone: the same rows as an in-memory snapshot (base/delta saves use it)
  load_segments  the _C load_segments alone, values checked (check=True), from in-memory arrays
  torch.save torch.save of {keys, base, has_mf, mf} tensors (+ fsync, as the checkpoint does)
  torch.load torch.load of that file
MB/s counts the bytes of the row data (what the files hold). Both sides read files the page cache may hold
(they were just written), so load figures are best cases for both. "cpu s" is the process CPU time of the
run (all threads): on a shared machine it shows the work done when wall time is inflated by other load.
With --repeat N, save, export, load_segments and torch.save report their best run; load and torch.load
alternate N times, each into fresh memory (a new table, the last result freed), and report their medians,
which the load ratio compares (the best runs favoured whichever side reused the other's pages).

    python scripts/bench_checkpoint.py                 # 10M keys, dim 8, AdaGrad
    python scripts/bench_checkpoint.py --keys 1000000  # a small run
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_psembed as pse  # noqa: E402
from torch_psembed.checkpoint import _format as F  # noqa: E402


def synthetic_rows(n: int, base_width: int, mf_width: int, mf_fraction: float, mf_state: int, seed: int = 0):
    """Random rows a table may hold: the last ``mf_state`` mf columns (the rule's state, an AdaGrad g2sum) are
    >= 0, as a load checks (the base columns after lr_w are in [0, 1) already)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    base = rng.random((n, base_width), dtype=np.float32)
    base[:, 0] = rng.integers(0, 100, n)
    base[:, 1] = np.floor(base[:, 0] * rng.random(n, dtype=np.float32))
    base[:, 3] = rng.integers(0, 30, n)
    base[:, 4] = rng.integers(0, 1000, n)
    has = (rng.random(n) < mf_fraction).astype(np.uint8)
    mf = rng.standard_normal((int(has.sum()), mf_width), dtype=np.float32)
    if mf_state:
        mf[:, mf_width - mf_state:] = np.abs(mf[:, mf_width - mf_state:])
    return keys, base, has, mf


CPU = {}
RUNS = {}  # best wall -> every run's wall (the first run pays for fresh memory: see docs/benchmarks.md)


def timed(fn):
    """(wall seconds, CPU seconds of the process, all threads, result) of one call of fn."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def record(runs, wall: float, cpu: float) -> float:
    """Files wall (the figure reported) in CPU and RUNS with its CPU seconds and every run's wall."""
    CPU[wall] = cpu
    RUNS[wall] = [w for w, _ in runs]
    return wall


def best(fn, repeat: int):
    """(best wall seconds, result of the last run)."""
    runs, out = [], None
    for _ in range(repeat):
        wall, cpu, out = timed(fn)
        runs.append((wall, cpu))
    return record(runs, *min(runs)), out


def median_run(runs) -> float:
    """The median wall time of (wall, cpu) runs."""
    return record(runs, float(np.median([w for w, _ in runs])), float(np.median([c for _, c in runs])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--mf-fraction", type=float, default=1.0, help="fraction of rows with an mf vector")
    p.add_argument("--buckets", type=int, default=F.DEFAULT_NUM_BUCKETS)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()

    cfg = pse.TableConfig(dim=args.dim, lr_optimizer=pse.AdaGrad(), mf_optimizer=pse.AdaGrad())
    table = pse.SparseTable(cfg)
    b = table._backend
    t0 = time.perf_counter()
    keys, base, has, mf = synthetic_rows(args.keys, b.base_width, b.mf_width, args.mf_fraction, b.mf_state_dim)
    b.load_rows(keys, base, has, mf)
    fill = time.perf_counter() - t0
    data_bytes = keys.nbytes + base.nbytes + has.nbytes + mf.nbytes
    del keys, base, has, mf
    workdir = tempfile.mkdtemp(dir=args.dir)
    try:
        ck = os.path.join(workdir, "ck")
        print(f"# {args.keys:,} keys, dim {args.dim}, AdaGrad, {args.mf_fraction:.0%} with mf: "
              f"{data_bytes / 1e6:.0f} MB of row data (filled in {fill:.1f} s); torch {torch.__version__}, "
              f"{os.cpu_count()} cpus; dir {workdir}")

        t_export, snap = best(lambda: b.export_buckets("checkpoint", args.buckets, F.BUCKET_SALT), args.repeat)
        t_save, summary = best(lambda: table.save(ck, num_buckets=args.buckets), args.repeat)
        file_bytes = summary["bytes"]
        # The rows as one dense row set (mf compacted), and as the per-bucket segments load_segments takes.
        rb, mfr = snap["row_begin"], snap["mf_rows"]
        segments = [(snap["keys"][rb[i]:rb[i + 1]], snap["base"][rb[i]:rb[i + 1]], snap["has_mf"][rb[i]:rb[i + 1]],
                     snap["mf"][rb[i]:rb[i] + mfr[i]]) for i in range(args.buckets)]
        t_load_rows, _ = best(lambda: pse.SparseTable(cfg)._backend.load_segments(segments), args.repeat)  # empty table

        dense = {k: torch.from_numpy(np.concatenate([s[i] for s in segments]))
                 for i, k in enumerate(("keys", "base", "has_mf", "mf"))}
        del segments
        tpath = os.path.join(workdir, "dense.pt")

        def torch_save():
            torch.save(dense, tpath)
            with open(tpath, "rb+") as f:
                os.fsync(f.fileno())

        t_tsave, _ = best(torch_save, args.repeat)
        n_keys = dense["keys"].numel()
        tfile = os.path.getsize(tpath)
        del dense, snap
        # The loads alternate, each into fresh memory: a new table every run, and each result freed before the
        # next run, so that neither side is the one that always gets the pages the other just gave back (fresh
        # memory costs ~30x recycled: see docs/benchmarks.md, "Checkpoint"). Each side's median is compared.
        loads, tloads = [], []
        for _ in range(max(1, args.repeat)):
            fresh = pse.SparseTable(cfg)
            gc.collect()
            wall, cpu, _ = timed(lambda: fresh.load(ck))
            loads.append((wall, cpu))
            assert len(fresh) == args.keys
            del fresh
            gc.collect()
            wall, cpu, loaded = timed(lambda: torch.load(tpath))
            tloads.append((wall, cpu))
            assert loaded["keys"].numel() == n_keys
            del loaded
            gc.collect()
        t_load, t_tload = median_run(loads), median_run(tloads)

        mb = data_bytes / 1e6
        rows = [
            ("save (checkpoint)", t_save, mb / t_save),
            ("  _C export_buckets (in memory)", t_export, mb / t_export),
            ("load", t_load, mb / t_load),
            ("  of which _C load_segments", t_load_rows, mb / t_load_rows),
            ("torch.save (+fsync)", t_tsave, mb / t_tsave),
            ("torch.load", t_tload, mb / t_tload),
        ]
        print(f"{'workload':30s} {'seconds':>8s} {'MB/s':>8s} {'cpu s':>8s}  every run (s)")
        for name, s, r in rows:
            print(f"{name:30s} {s:8.2f} {r:8.0f} {CPU[s]:8.2f}  {' '.join(f'{w:.2f}' for w in RUNS[s])}")
        print(f"file size per key: checkpoint {file_bytes / args.keys:.1f} B ({len(F.read_manifest(ck)['files'])} files), "
              f"torch.save {tfile / args.keys:.1f} B")
        print(f"ratios: save/torch.save time {t_save / t_tsave:.2f}x (best runs), load/torch.load time "
              f"{t_load / t_tload:.2f}x (medians of {max(1, args.repeat)} alternating runs)")
    finally:  # also when a step fails: the folder holds the whole table's files
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
