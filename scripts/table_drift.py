"""How the table's ratio to its dense baseline drifts over time within one process.

bench_table.py reports each figure as the median of three passes, taken within a few seconds. On a shared VM the
machine itself slows down for seconds at a time, and a figure measured in such a window comes out lower.
This script shows those windows: it fills the table and the dense tensor as bench_table.py does, then for
--seconds alternates one pass of the table and one of the baseline over the same batches (20 batches of
100k keys by default, each pass after bench_table.py's warm-up; which one goes first alternates too), and
prints every pass pair and a summary:

  - the distribution of the per-pair ratio (table rate / baseline rate): median, 5th and 95th percentile,
    and the share of pairs under the target;
  - the same ratio in the pairs whose neighbours' baseline ran fastest (the top quarter of the mean
    baseline rate of the pairs just before and after) and slowest (the bottom quarter): if the machine's
    slow windows cost the table more than the baseline, the second is lower. (The neighbours', not the
    pair's own: a pair whose own baseline pass was lucky has a lower ratio for that reason alone.)

  python scripts/table_drift.py                          # 1-thread uniform pull vs index_select, 30 s
  python scripts/table_drift.py --op push --dist zipf    # 1-thread Zipf push vs index_add_
  python scripts/table_drift.py --threads 2 --seconds 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_table as bt  # noqa: E402  (same keys, config, fill, batches and targets as the benchmark)


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's build first
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=20, help="batches a pass (default 20, as bench_table.py)")
    p.add_argument("--dist", choices=["uniform", "zipf"], default="uniform")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--op", choices=["pull", "push"], default="pull")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seconds", type=float, default=30.0, help="how long to alternate passes (default 30)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up before each pass (bench_table.py's)")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.threads < 1 or args.batches < 1 or args.warmup_ms < 0:
        p.error("--seconds, --threads and --batches must be positive, --warmup-ms >= 0")

    import torch

    from torch_psembed import _C

    keys = bt.all_keys(args.keys)
    table = _C.Table(bt.make_config(args.dim, 0.0).to_dict())
    t_fill = time.perf_counter()
    bt.populate(table, keys, args.dim)
    dense = torch.randn(args.keys, 1 + args.dim)
    table.num_threads = args.threads
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(1)
    pos = [bt.draw(rng, args.keys, args.batch, args.dist, args.zipf) for _ in range(args.batches)]
    kb = [np.ascontiguousarray(keys[q]) for q in pos]
    ib = [torch.from_numpy(q.astype(np.int64)) for q in pos]
    if args.op == "pull":
        ours, base, base_name = (lambda k: table.pull(k)), (lambda i: dense.index_select(0, i)), "index_select"
    else:
        grads = rng.normal(size=(args.batch, 1 + args.dim)).astype(np.float32)
        grads_t = torch.from_numpy(grads)
        shows, clicks = np.ones(args.batch, np.float32), np.zeros(args.batch, np.float32)
        ours = lambda k: table.push(k, grads, shows, clicks)  # noqa: E731
        base, base_name = (lambda i: dense.index_add_(0, i, grads_t)), "index_add_"

    n = args.batch * args.batches
    print(f"# table_drift: {args.op} vs {base_name}, {args.dist}, {args.threads} thread(s), {args.keys} keys, "
          f"passes of {args.batches} x {args.batch}; t = seconds since the fill began")
    print(f"{'t':>6s} {'table M/s':>10s} {base_name + ' M/s':>17s} {'ratio':>6s}")
    rows = []
    warm = args.warmup_ms / 1e3
    t_end = time.perf_counter() + args.seconds
    while time.perf_counter() < t_end:
        first_table = len(rows) % 2 == 0  # neither side always runs right after the other
        if first_table:
            r_ours = n / bt.timeit(ours, kb, warm)
            r_base = n / bt.timeit(base, ib, warm)
        else:
            r_base = n / bt.timeit(base, ib, warm)
            r_ours = n / bt.timeit(ours, kb, warm)
        rows.append((time.perf_counter() - t_fill, r_ours, r_base))
        print(f"{rows[-1][0]:6.1f} {r_ours / 1e6:10.2f} {r_base / 1e6:17.2f} {r_ours / r_base:6.2f}", flush=True)

    torch.set_num_threads(torch_threads)
    ratio = np.array([o / b for _, o, b in rows])
    base_rates = np.array([b for _, _, b in rows])
    target = bt.TARGETS[args.op]
    print(f"# {len(rows)} pairs: ratio median {np.median(ratio):.2f}, 5th percentile {np.percentile(ratio, 5):.2f}, "
          f"95th {np.percentile(ratio, 95):.2f}; under the target {target}: {np.mean(ratio < target):.0%} of pairs")
    if len(rows) >= 10:
        around = (base_rates[:-2] + base_rates[2:]) / 2  # pairs 1 .. len-2: their neighbours' baseline
        inner = ratio[1:-1]
        fast = inner[around >= np.percentile(around, 75)]
        slow = inner[around <= np.percentile(around, 25)]
        print(f"# ratio where the neighbouring {base_name} passes ran in their fastest quarter: median "
              f"{np.median(fast):.2f}; in their slowest quarter: median {np.median(slow):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
