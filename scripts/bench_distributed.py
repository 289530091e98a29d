"""Benchmark of the sharded table: an embedding training step over RPC against the same step in one process.

Workloads (each step: pull 4096 x 26 ids with dim 8, a dense layer forward/backward, push the gradients):
  local       1 process, a local _C table: the baseline.
  colocated   2 processes under torchrun's env (num_servers=0): each trains its own batches and serves half
              of the table. samples/s counts both processes.
  dedicated   1 trainer + 1 server (num_servers=1): every pull and push crosses RPC.
Per-step time is split into dedup (np.unique + routing), RPC wait (waiting for remote pulls), pull assembly
(scatter of the parts, gather in input order), local pull (colocated: this process's shard) and push
(merge + send; the wait for acknowledgements happens in the next pull's staleness window).

One compute thread per process: torch.set_num_threads(1) and TableConfig(num_threads=1), OMP_NUM_THREADS=1.

    python scripts/bench_distributed.py [--steps 30] [--batch 4096] [--slots 26] [--dim 8] [--staleness 1]

Prints one row per workload and the samples/s ratio against the local run from the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _make_batches(args, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(args.distinct_batches):
        ids = np.minimum(rng.zipf(1.2, size=(args.batch, args.slots)), 1_000_000).astype(np.int64)
        keys = (np.arange(args.slots, dtype=np.int64)[None, :] << 48) + ids
        y = (rng.random(args.batch) < 0.25).astype(np.float32)
        batches.append((np.ascontiguousarray(keys.reshape(-1)), y))
    return batches


def _run_steps(args, table, seed, timers=None):
    """Train ``args.steps`` steps (after warm-up); returns (seconds, split of the local table's time)."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    width = 1 + args.dim
    dense = torch.nn.Linear(args.slots * width, 1)
    opt = torch.optim.SGD(dense.parameters(), lr=0.01)
    batches = _make_batches(args, seed)
    shows = np.ones(args.batch * args.slots, np.float32)
    split = {"pull": 0.0, "push": 0.0}

    def step(i, measure):
        keys, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        rows = table.pull(keys)
        t1 = time.perf_counter()
        emb = rows.view(args.batch, args.slots * width).requires_grad_(True)
        logit = dense(emb).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        grads = emb.grad.view(-1, width).contiguous()
        clicks = np.repeat(y, args.slots)
        t2 = time.perf_counter()
        table.push(keys, grads, shows, clicks)
        t3 = time.perf_counter()
        if measure:
            split["pull"] += t1 - t0
            split["push"] += t3 - t2

    for i in range(args.warmup):
        step(i, False)
    table.flush()
    backend = table._backend
    if hasattr(backend, "reset_timers"):
        backend.reset_timers()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i, True)
    table.flush()
    seconds = time.perf_counter() - start
    return seconds, split


def _config(args):
    import torch_psembed as pse

    return pse.TableConfig(
        dim=args.dim,
        accessor=pse.CtrAccessorConfig(embedx_threshold=0.0),
        num_threads=1,
    )


def child(args) -> None:
    """One rank (or the local run when WORLD_SIZE is unset); writes its figures to args.out.RANK."""
    import torch

    import torch_psembed as pse

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        pse.init(max_staleness=args.staleness, num_servers=args.num_servers, rpc_timeout=120.0)
    table = pse.SparseTable(_config(args), name="bench")
    if world > 1:
        import torch.distributed as dist

        dist.barrier(group=pse.distributed.trainer_group())  # start together
    seconds, split = _run_steps(args, table, seed=100 + rank)
    backend = table._backend
    timers = dict(getattr(backend, "timers", {}))
    if world > 1:
        pse.shutdown()
    out = {"rank": rank, "seconds": seconds, "steps": args.steps, "batch": args.batch, "split": split,
           "timers": timers}
    with open(f"{args.out}.{rank}", "w") as f:
        json.dump(out, f)


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue


def _launch(args, world, num_servers, out):
    port = _free_port()
    procs = []
    base = [sys.executable, os.path.abspath(__file__), "--child", "--out", out, "--num-servers", str(num_servers)]
    for flag in ("steps", "batch", "slots", "dim", "staleness", "warmup", "distinct_batches"):
        base += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
        for k in ("RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
            env.pop(k, None)
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen(base, env=env))
    rcs = [p.wait(timeout=900) for p in procs]
    if any(rcs):
        raise SystemExit(f"a benchmark process failed: exit codes {rcs}")
    results = []
    for r in range(world):
        path = f"{out}.{r}"
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=26)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--distinct-batches", type=int, default=8)
    ap.add_argument("--num-servers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="local,colocated,dedicated")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = tempfile.mkdtemp(prefix="bench_dist_")
    workloads = {"local": (1, 0), "colocated": (2, 0), "dedicated": (2, 1)}
    rows = []
    for name in args.only.split(","):
        world, ns = workloads[name]
        res = _launch(args, world, ns, os.path.join(tmp, name))
        samples = sum(r["steps"] * r["batch"] for r in res)
        sps = samples / max(r["seconds"] for r in res)
        step_ms = 1000 * sum(r["seconds"] / r["steps"] for r in res) / len(res)
        t = {}
        for r in res:
            for k, v in r["timers"].items():
                t[k] = t.get(k, 0.0) + 1000 * v / r["steps"] / len(res)
        pull_ms = sum(1000 * r["split"]["pull"] / r["steps"] for r in res) / len(res)
        push_ms = sum(1000 * r["split"]["push"] / r["steps"] for r in res) / len(res)
        rows.append((name, world, ns, sps, step_ms, pull_ms, push_ms, t))
    base = rows[0][3] if rows and rows[0][0] == "local" else None
    local_step = rows[0][4] if base else None
    print(f"batch {args.batch} x {args.slots} ids, dim {args.dim}, max_staleness {args.staleness}, "
          f"{args.steps} steps after {args.warmup} warm-up, 1 compute thread per process")
    print(f"{'workload':<10} {'procs':>5} {'samples/s':>10} {'vs local':>8} {'step ms':>8} {'pull ms':>8} "
          f"{'push ms':>8} | {'dedup':>6} {'rpcwait':>7} {'assembly':>8} {'localpull':>9} {'stale':>6}")
    for name, world, ns, sps, step_ms, pull_ms, push_ms, t in rows:
        ratio = f"{sps / base:.2f}x" if base else "-"
        print(f"{name:<10} {world:>5} {sps:>10.0f} {ratio:>8} {step_ms:>8.1f} {pull_ms:>8.1f} {push_ms:>8.1f} | "
              f"{t.get('dedup', 0):>6.1f} {t.get('rpc_wait', 0):>7.1f} {t.get('assembly', 0):>8.1f} "
              f"{t.get('local_pull', 0):>9.1f} {t.get('staleness_wait', 0):>6.1f}")
    for name, world, ns, sps, step_ms, pull_ms, push_ms, t in rows:
        if name == "dedicated" and local_step:
            rpc = t.get("dedup", 0) + t.get("rpc_wait", 0) + t.get("assembly", 0) + t.get("staleness_wait", 0)
            print(f"dedicated: RPC-side time (dedup + rpc wait + assembly + staleness wait) = {rpc:.1f} ms "
                  f"= {100 * rpc / step_ms:.0f}% of the {step_ms:.1f} ms step; "
                  f"step vs local: +{100 * (step_ms - local_step) / step_ms:.0f}% of the step")
        if name == "colocated" and base:
            print(f"colocated: 2 processes reach {sps / base:.2f}x the samples/s of 1 process (target >= 1.6x)")


if __name__ == "__main__":
    main()
