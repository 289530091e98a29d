"""Benchmark of the Criteo reader: the Python parser line by line against ``CriteoParser.parse_lines`` (the C++
fast path, with the Python parser for the lines it refuses), on the same lines in the same run.

    python scripts/bench_reader.py                       # 100,000 generated Criteo-like lines
    python scripts/bench_reader.py --path /work/shared/data/criteo_kaggle_sample/train.txt

Prints microseconds per line for both (best of --repeat passes), their ratio, and the share of lines the fast
path took. The generated lines are plain (decimal integers, 8-hex-digit categoricals, some fields empty), like
Criteo's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch_psembed import _C  # noqa: E402
from torch_psembed.data.readers import CriteoParser  # noqa: E402


def generated_lines(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ints = rng.integers(-3, 5000, (n, 13))
    cats = rng.integers(0, 2**32, (n, 26))
    empty_int = rng.random((n, 13)) < 0.2
    empty_cat = rng.random((n, 26)) < 0.05
    labels = rng.random(n) < 0.25
    out = []
    for i in range(n):
        f = ["1" if labels[i] else "0"]
        f += ["" if empty_int[i, j] else str(ints[i, j]) for j in range(13)]
        f += ["" if empty_cat[i, j] else "%08x" % cats[i, j] for j in range(26)]
        out.append("\t".join(f) + "\n")
    return out


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=None, help="a Criteo file (default: generated lines)")
    ap.add_argument("--lines", type=int, default=100_000, help="generated lines (without --path)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if args.path:
        with open(args.path, encoding="utf-8", errors="replace", newline="\n") as f:  # as the job reads
            lines = [line for line in f if line.strip()]
        what = args.path
    else:
        lines = generated_lines(args.lines)
        what = "generated"
    p = CriteoParser()

    def each():
        for line in lines:
            try:
                p.parse(line)
            except ValueError:
                pass

    t_py = best(each, args.repeat)
    t_bulk = best(lambda: p.parse_lines(lines), args.repeat)
    fast = float(_C.parse_criteo(lines)[2].mean())
    n = len(lines)
    print(f"# {n:,} lines ({what}); best of {args.repeat}; load avg {os.getloadavg()[0]:.1f}")
    print(f"CriteoParser.parse, line by line : {1e6 * t_py / n:8.2f} us/line")
    print(f"CriteoParser.parse_lines         : {1e6 * t_bulk / n:8.2f} us/line  = {t_py / t_bulk:.1f}x faster; "
          f"{100 * fast:.1f}% of the lines on the C++ fast path")


if __name__ == "__main__":
    main()
