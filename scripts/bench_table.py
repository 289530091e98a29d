"""Benchmark of the C++ sparse table against a dense torch baseline in the same run.

Workloads (one line each, what it measures):
  pull/uniform   keys/s of _C.Table.pull on batches of --batch keys drawn uniformly from --keys resident keys
  pull/zipf      same, keys drawn Zipf(--zipf) by rank (hot keys repeat within a batch)
  push/uniform   keys/s of _C.Table.push (AdaGrad on lr and mf, show/click stats, duplicate merging)
  push/zipf      same with Zipf keys
  baseline       torch index_select / index_add_ on a dense [--keys, 1+dim] float32 tensor with the
                 same batch positions, as torch allocates it (4 KiB pages on a machine whose transparent huge
                 pages are "madvise": torch asks for none unless THP_MEM_ALLOC_ENABLE=1); ratios = ours /
                 baseline, the issue's targets judged on these
  baseline (hp)  the same on a copy of the tensor in a mapping madvised for huge pages, as the table's own
                 records and index are: the cheapest dense table this machine offers, ratios printed beside
  memory         bytes per key from RSS growth of a fresh process holding only the table (AdaGrad both
                 parts): with mf (embedx_threshold=0: every row gets mf) and without (a huge threshold);
                 compared with the payload 8 + 4*(5 + 1 + lr_state + dim + mf_state) bytes.
Each throughput is measured with 1 thread and with all threads (table.num_threads / torch.set_num_threads),
as the median of --repeat passes over the batches, table and baseline interleaved, each pass after a
warm-up of --warmup-ms (25 ms) of calls on its own batches.

Targets (issue 2): pull >= 0.7x index_select; push >= 1.5x index_add_; bytes/key with mf <= 1.3x payload;
without mf <= 64 bytes.

  python scripts/bench_table.py                      # full size: 10M keys, dim 8, batches of 100k
  python scripts/bench_table.py --keys 200000 --batches 5   # quick
  python scripts/bench_table.py --no-memory --spin-wait-us 50   # the table as a PS server would run it
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

# Issue 2's speed targets: the table's rate / the dense baseline's (table_drift.py reads them too).
TARGETS = {"pull": 0.7, "push": 1.5}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_config(dim: int, embedx_threshold: float, num_threads: int = 0, spin_wait_us: int = 0):
    from torch_psembed.config import AdaGrad, CtrAccessorConfig, TableConfig

    return TableConfig(
        dim=dim,
        accessor=CtrAccessorConfig(embedx_threshold=embedx_threshold),
        lr_optimizer=AdaGrad(initial_range=0.0),
        mf_optimizer=AdaGrad(initial_range=1e-4),
        num_threads=num_threads,
        spin_wait_us=spin_wait_us,
    )


def all_keys(n: int, seed: int = 0) -> np.ndarray:
    """n distinct random 64-bit feasigns (realistic ids, not 0..n-1)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=int(n * 1.01) + 16, dtype=np.int64))
    rng.shuffle(keys)
    return np.ascontiguousarray(keys[:n])


def populate(table, keys: np.ndarray, dim: int, chunk: int = 100_000) -> None:
    for s in range(0, len(keys), chunk):
        k = keys[s:s + chunk]
        n = len(k)
        table.push(k, np.zeros((n, 1 + dim), np.float32), np.ones(n, np.float32), np.zeros(n, np.float32))


def malloc_trim() -> None:
    """Returns glibc's cached free heap to the OS (its dynamic trim threshold can keep up to 64 MiB)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def memory_child(n: int, dim: int, with_mf: bool) -> dict:
    """Runs in a fresh process: RSS growth of populating one table.

    Both ends are measured after malloc_trim, so neither counts free heap that glibc merely caches
    (the batch arrays of populate() are freed into it); rss_untrimmed_per_key is the growth without the
    final trim, for reference."""
    from torch_psembed import _C

    keys = all_keys(n)
    gc.collect()
    malloc_trim()
    base = rss_bytes()
    cfg = make_config(dim, 0.0 if with_mf else 1e30)
    table = _C.Table(cfg.to_dict())
    populate(table, keys, dim)
    untrimmed = rss_bytes() - base
    gc.collect()
    malloc_trim()
    grown = rss_bytes() - base
    st = table.stats()
    assert st["keys"] == n and st["keys_with_mf"] == (n if with_mf else 0), st
    lr_state, mf_state = table.lr_state_dim, table.mf_state_dim
    payload = 8 + 4 * (5 + 1 + lr_state + (dim + mf_state if with_mf else 0))
    return {"rss_per_key": grown / n, "rss_untrimmed_per_key": untrimmed / n,
            "stats_bytes_per_key": st["bytes"] / n, "payload": payload}


def draw(rng, n_keys: int, batch: int, dist: str, zipf_a: float) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, n_keys, size=batch)
    return (rng.zipf(zipf_a, size=batch) - 1) % n_keys


def timeit(fn, batches, warmup_s: float = 0.0) -> float:
    """Seconds for one pass of fn over batches, after a warm-up: one call, then more (cycling over the
    batches) until warmup_s have passed since the warm-up began."""
    t_warm = time.perf_counter()
    i = 0
    while True:
        fn(batches[i % len(batches)])
        i += 1
        if time.perf_counter() - t_warm >= warmup_s:
            break
    t0 = time.perf_counter()
    for b in batches:
        fn(b)
    return time.perf_counter() - t0


def huge_page_copy(src):
    """A copy of the float32 tensor ``src`` in an anonymous mapping madvised for transparent huge pages (as the
    table maps its records and index), and the mapping (keep it alive while the tensor is used)."""
    import mmap

    import torch

    nbytes = src.numel() * 4
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared memory gets no THP
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    dst = torch.from_numpy(np.frombuffer(mm, dtype=np.float32, count=src.numel()).reshape(src.shape))
    dst.copy_(src)
    return dst, mm


def anon_huge_kib() -> int:
    """AnonHugePages of this process (kB), from /proc/self/smaps_rollup; -1 where unreadable."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def main(argv=None) -> int:
    # This tree's torch_psembed first, as the other benchmark scripts do (an in-place build, or a checkout that
    # is not the installed one, times its own code). ab_table_builds.py imports this module without calling main.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=10_000_000, help="resident keys (default 10M)")
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--repeat", type=int, default=3,
                   help="interleaved repetitions of each measurement; the median of each is reported (default 3)")
    p.add_argument("--warmup-ms", type=float, default=25.0,
                   help="warm-up before each timed pass, in ms of calls on the pass's own batches (default 25; "
                        "0: one call). Each pass follows one of the other side's: torch's OpenMP workers keep "
                        "spinning ~10 ms after their last parallel region, on the core a table's pool worker "
                        "wakes on, and the other side's traffic has evicted this side's hot rows")
    p.add_argument("--no-memory", action="store_true", help="skip the RSS measurement")
    p.add_argument("--spin-wait-us", type=int, default=0,
                   help="TableConfig.spin_wait_us of the timed table (default 0, the default config; 50 is the "
                        "setting for a process that does little but table calls, such as a PS server)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--_memory-child", dest="memory_child", choices=["mf", "nomf"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup_ms < 0:
        p.error("--warmup-ms must be >= 0")

    if args.memory_child:
        print(json.dumps(memory_child(args.keys, args.dim, args.memory_child == "mf")))
        return 0

    import torch

    from torch_psembed import _C

    all_threads = torch.get_num_threads()
    results = {"keys": args.keys, "dim": args.dim, "batch": args.batch, "cpus": os.cpu_count(),
               "spin_wait_us": args.spin_wait_us, "warmup_ms": args.warmup_ms,
               "torch_threads": all_threads, "load_avg_start": os.getloadavg()[0]}
    print(f"# bench_table: {args.keys} keys, dim {args.dim}, batches of {args.batch}, "
          f"{os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}"
          + (f", spin_wait_us {args.spin_wait_us}" if args.spin_wait_us else ""))

    if not args.no_memory:
        for kind in ("mf", "nomf"):
            out = subprocess.run([sys.executable, __file__, "--keys", str(args.keys), "--dim", str(args.dim),
                                  "--_memory-child", kind], check=True, capture_output=True, text=True)
            m = json.loads(out.stdout.strip().splitlines()[-1])
            results[f"memory_{kind}"] = m
            target = f"<= 1.3x payload ({1.3 * m['payload']:.1f})" if kind == "mf" else "<= 64"
            print(f"memory/{kind:5s} rss {m['rss_per_key']:6.1f} B/key (untrimmed {m['rss_untrimmed_per_key']:.1f})  "
                  f"stats {m['stats_bytes_per_key']:6.1f} B/key  "
                  f"payload {m['payload']} B  ratio {m['rss_per_key'] / m['payload']:.2f}x  target {target}")

    keys = all_keys(args.keys)
    table = _C.Table(make_config(args.dim, 0.0, spin_wait_us=args.spin_wait_us).to_dict())
    t0 = time.perf_counter()
    populate(table, keys, args.dim)
    print(f"populate: {args.keys / (time.perf_counter() - t0) / 1e6:.2f} M keys/s (first push inserts)")
    # Filled, like the table: a never-written torch.zeros would read the shared zero page (no misses).
    dense = torch.randn(args.keys, 1 + args.dim)
    huge_before = anon_huge_kib()
    dense_hp, _dense_hp_map = huge_page_copy(dense)
    huge_mib = (anon_huge_kib() - huge_before) / 1024
    results["dense_hp_huge_mib"] = huge_mib
    print(f"dense baseline: {dense.numel() * 4 / 2**20:.0f} MiB as torch allocates it; its huge-page copy is "
          f"backed by {huge_mib:.0f} MiB of huge pages")
    rng = np.random.default_rng(1)
    width = 1 + args.dim
    grads_np = rng.normal(size=(args.batch, width)).astype(np.float32)
    grads_t = torch.from_numpy(grads_np)
    shows = np.ones(args.batch, np.float32)
    clicks = np.zeros(args.batch, np.float32)

    for dist in ("uniform", "zipf"):
        pos = [draw(rng, args.keys, args.batch, dist, args.zipf) for _ in range(args.batches)]
        kb = [np.ascontiguousarray(keys[p]) for p in pos]
        ib = [torch.from_numpy(p.astype(np.int64)) for p in pos]
        for threads in (1, all_threads):
            table.num_threads = threads
            torch.set_num_threads(threads)
            n = args.batch * args.batches
            # Table and baseline alternate, --repeat times, and each reports its median: on a shared VM one
            # pass of either can be off by 2x, and interleaving exposes both to the same disturbances.
            work = {
                "pull": (lambda k: table.pull(k), kb),
                "index_select": (lambda i: dense.index_select(0, i), ib),
                "push": (lambda k: table.push(k, grads_np, shows, clicks), kb),
                "index_add_": (lambda i: dense.index_add_(0, i, grads_t), ib),
                "index_select_hp": (lambda i: dense_hp.index_select(0, i), ib),
                "index_add_hp": (lambda i: dense_hp.index_add_(0, i, grads_t), ib),
            }
            times = {k: [] for k in work}
            for _ in range(max(1, args.repeat)):
                for k, (fn, b) in work.items():
                    times[k].append(timeit(fn, b, args.warmup_ms / 1e3))
            rate = {k: n / float(np.median(v)) for k, v in times.items()}
            r_pull = rate["pull"] / rate["index_select"]
            r_push = rate["push"] / rate["index_add_"]
            r_pull_hp = rate["pull"] / rate["index_select_hp"]
            r_push_hp = rate["push"] / rate["index_add_hp"]
            results[f"{dist}_t{threads}"] = {**{k: v for k, v in rate.items()}, "pull_ratio": r_pull,
                                             "push_ratio": r_push, "pull_ratio_hp": r_pull_hp,
                                             "push_ratio_hp": r_push_hp,
                                             "seconds": {k: v for k, v in times.items()}}
            print(f"{dist:7s} threads={threads}: pull {rate['pull'] / 1e6:6.2f} M/s vs index_select "
                  f"{rate['index_select'] / 1e6:6.2f} M/s = {r_pull:.2f}x (target >= {TARGETS['pull']}) | "
                  f"push {rate['push'] / 1e6:6.2f} M/s vs index_add_ {rate['index_add_'] / 1e6:6.2f} M/s = "
                  f"{r_push:.2f}x (target >= {TARGETS['push']})")
            print(f"{'':7s}   huge-page baseline: index_select {rate['index_select_hp'] / 1e6:6.2f} M/s: pull "
                  f"{r_pull_hp:.2f}x | index_add_ {rate['index_add_hp'] / 1e6:6.2f} M/s: push {r_push_hp:.2f}x")
    torch.set_num_threads(all_threads)
    results["load_avg_end"] = os.getloadavg()[0]
    print(f"# load avg at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
