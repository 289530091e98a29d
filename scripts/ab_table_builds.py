"""Paired A/B of two or more builds of the table's extension, in one process.

On a shared VM the same build's pull or push moves by 10-30% (up to 2x) between runs, so a 5% change
cannot be seen by running bench_table.py before and after. This script loads each build's `_C` module
side by side, fills one table per build with the same keys (as bench_table.py does: 10M random 64-bit
keys, dim 8, AdaGrad on both parts, every row with mf), and then times the same batches on each table,
one call at a time, alternating which table goes first. Each line prints the median call rate of every
build and the median of the per-call time ratios against the first build (> 1: faster than the first).

Three things to know when reading it:
  - an A/A run (two copies of one build directory; pybind11 refuses the same directory twice) agrees
    within ~2% (0.983x-1.007x over the four workloads, session 13);
  - where a table's memory lands can move a build by a few % either way (the tables are filled in turns to
    even that out): run both orders (A B, then B A) and count a change only if it holds in both;
  - between two different builds, code placement alone can move one by a few % as well.

A build is a directory holding torch_psembed/_C*.so, for example a copy of the tree built in place:

  mkdir /tmp/wtB && git ls-files | tar cf - -T - | (cd /tmp/wtB && tar xf -)
  (cd /tmp/wtB && python setup.py build_ext --inplace)      # same for /tmp/wtA at the other commit
  python scripts/ab_table_builds.py /tmp/wtA /tmp/wtB
  python scripts/ab_table_builds.py /tmp/wtB /tmp/wtA

The same pairing compares table configurations of one build: --num-shards 64,4 makes one table per
shard count for each build given (with no build given, the installed torch_psembed._C):

  python scripts/ab_table_builds.py --num-shards 64,8,4

Options: --keys, --threads, --passes, --dist uniform,zipf, --ops pull,push, --num-shards, --rule (see --help).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_table as bt  # noqa: E402  (same keys, config and fill as the benchmark)


def load_build(path: str, tag: str):
    """The `_C` module of the build in `path` (torch_psembed/_C*.so), loaded as `<tag>._C`.

    Each build needs its own module name: CPython keeps a single-phase extension module by name, so a
    second file loaded as plain "_C" comes back as the first build's module (the first version of this
    script compared the first build with itself that way). The name's last part stays "_C" for the
    PyInit__C symbol; the check below stops the run if a module is still not the build's own.
    """
    found = glob.glob(os.path.join(path, "torch_psembed", "_C*.so"))
    if not found:
        raise SystemExit(f"{path}: no torch_psembed/_C*.so (build it with `python setup.py build_ext --inplace`)")
    spec = importlib.util.spec_from_file_location(f"{tag}._C", found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if os.path.realpath(module.__file__) != os.path.realpath(found[0]):
        raise SystemExit(f"{path}: loading {found[0]} gave the module of {module.__file__}")
    return module


def _rule_pair(cls):
    """The lr and mf rules of one class, initialised as the benchmark's AdaGrad pair is."""
    return lambda: (cls(initial_range=0.0), cls(initial_range=1e-4))


def _rules():
    from torch_psembed.config import FTRL, SGD, AdaGrad, Adam, StdAdaGrad

    return {"adagrad": _rule_pair(AdaGrad), "stdadagrad": _rule_pair(StdAdaGrad), "adam": _rule_pair(Adam),
            "ftrl": _rule_pair(FTRL), "sgd": _rule_pair(SGD)}


RULES = _rules()


def make_table(module, config: dict):
    """module.Table(config); a build older than the config drops the keys it does not know (with a note).

    Such keys only tune performance (spin_wait_us, say): the older build runs as it always did."""
    config = dict(config)
    while True:
        try:
            return module.Table(config)
        except ValueError as e:
            m = re.search(r"unknown key '([^']+)'", str(e))
            if m is None or m.group(1) not in config:
                raise
            print(f"# {module.__name__}: this build has no config key {m.group(1)!r}; left out for it")
            del config[m.group(1)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("builds", nargs="*",
                   help="build directories; ratios are against the first (default: the installed build)")
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=100_000)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--passes", type=int, default=5, help="passes over the batches (default 5)")
    p.add_argument("--dist", default="uniform,zipf")
    p.add_argument("--ops", default="pull,push")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--rule", default="adagrad", choices=sorted(RULES),
                   help="sparse rule of both parts (default adagrad, as the benchmark)")
    p.add_argument("--num-shards", default=str(bt.make_config(8, 0.0).num_shards),
                   help="comma-separated shard counts: one table per count and build (default: the default config's)")
    args = p.parse_args(argv)

    if args.builds:
        if len({os.path.realpath(b) for b in args.builds}) != len(args.builds):
            raise SystemExit("a build directory is given twice: pybind11 cannot load one .so twice; "
                             "for an A/A run, copy the directory")
        builds = [(os.path.basename(os.path.normpath(b)), load_build(b, f"_ab_build{i}"))
                  for i, b in enumerate(args.builds)]
    else:
        from torch_psembed import _C
        builds = [("installed", _C)]
    shard_counts = [int(x) for x in args.num_shards.split(",")]
    names, tables = [], []
    for name, module in builds:
        for shards in shard_counts:
            names.append(name if len(shard_counts) == 1 else f"{name}/s{shards}")
            lr_rule, mf_rule = RULES[args.rule]()
            config = dataclasses.replace(bt.make_config(args.dim, 0.0), num_shards=shards, lr_optimizer=lr_rule,
                                         mf_optimizer=mf_rule)
            tables.append(make_table(module, config.to_dict()))
    keys = bt.all_keys(args.keys)
    # Filled in turns, 100k keys at a time, so that no table's memory is all older (or all younger)
    # than another's.
    for s in range(0, len(keys), 100_000):
        for t in tables:
            bt.populate(t, keys[s:s + 100_000], args.dim)
    for t in tables:
        t.num_threads = args.threads
    rng = np.random.default_rng(1)
    grads = rng.normal(size=(args.batch, 1 + args.dim)).astype(np.float32)
    shows = np.ones(args.batch, np.float32)
    clicks = np.zeros(args.batch, np.float32)
    print(f"# {args.keys} keys, dim {args.dim}, batches of {args.batch}, {args.threads} thread(s), "
          f"load avg {os.getloadavg()[0]:.1f}")
    for dist in args.dist.split(","):
        batches = [np.ascontiguousarray(keys[bt.draw(rng, args.keys, args.batch, dist, args.zipf)])
                   for _ in range(args.batches)]
        for op in args.ops.split(","):
            def call(t, k):
                return t.pull(k) if op == "pull" else t.push(k, grads, shows, clicks)

            for t in tables:  # warm-up
                call(t, batches[0])
            seconds = np.zeros((len(tables), args.passes * len(batches)))
            c = 0
            for rep in range(args.passes):
                for bi, k in enumerate(batches):
                    order = list(range(len(tables)))
                    if (rep + bi) % 2:
                        order.reverse()
                    for i in order:
                        t0 = time.perf_counter()
                        call(tables[i], k)
                        seconds[i, c] = time.perf_counter() - t0
                    c += 1
            cells = []
            for i, name in enumerate(names):
                rate = args.batch / np.median(seconds[i]) / 1e6
                ratio = np.median(seconds[0] / seconds[i])
                cells.append(f"{name} {rate:6.2f} M/s ({ratio:.3f}x)")
            print(f"{op:4s} {dist:7s}: " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
