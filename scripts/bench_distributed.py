"""Benchmark of the sharded table: an embedding training step sharded over ranks against the same step in one process.

Workloads (each step: pull 4096 x 26 ids with dim 8, a dense layer forward/backward, push the gradients):
  local       1 process, a local _C table: the baseline, measured inside each job by trainer 0 alone (the other
              processes wait at a barrier), alternating with the sharded rounds so both see the same load.
  colocated   2 processes under torchrun's env (num_servers=0): each trains its own batches and serves half
              of the table. samples/s counts both processes.
  dedicated   1 trainer + 1 server (num_servers=1): every pull and push crosses to the server (over the TCP
              data plane, or RPC with --transport rpc).
Per-step time is split into dedup (the C++ hash dedup + grouping by owner), RPC wait (waiting for remote
pulls), pull assembly (scatter of the parts, gather in input order), local pull (colocated: this process's
shard), staleness wait and push (merge + send; the wait for acknowledgements happens in the next pull's
staleness window).
--prefetch pipelines the pulls (SparseTable.prefetch: the next step's pull runs on the table's prefetch
thread). --prefetch or --prefetch=step-start calls it right after each step's pull, so the next rows are
fetched while this step's forward, backward and push run (with max_staleness >= 1 the next pull need not see
this step's push; this is the pipeline of TorchRec's TrainPipelineSparseDist); --prefetch=before-push calls
it once the step's gradients are known, just before its push. The training thread's columns then show only
what it still waits for ("pfwait": a pull waiting for its prefetch thread, counted in the RPC side); the
prefetch thread's own dedup, waits and assembly are printed on a line of their own, since they overlap the
training thread.

One compute thread per process: torch.set_num_threads(1) and TableConfig(num_threads=1), OMP_NUM_THREADS=1;
with --prefetch a trainer also runs the prefetch thread (its CPU time is in the "CPU time per sample" line).

    python scripts/bench_distributed.py [--rounds 3] [--steps 20] [--batch 4096] [--slots 26] [--dim 8]
                                        [--staleness 1] [--only colocated,dedicated]
                                        [--prefetch [step-start|before-push]] [--transport tcp|rpc]

Prints, per job, the local baseline and the sharded run (medians over rounds) and their samples/s ratio.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from torch_psembed.distributed.ports import free_port_pair  # noqa: E402


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
        if args.prefetch == "step-start" and hasattr(table, "prefetch"):  # overlaps this step's compute
            table.prefetch(batches[(i + 1) % len(batches)][0])
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
        if args.prefetch == "before-push" and hasattr(table, "prefetch"):  # pipelining: the next step's pull is on its way
            table.prefetch(batches[(i + 1) % len(batches)][0])
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
    start, cpu0 = time.perf_counter(), time.process_time()
    for i in range(args.steps):
        step(args.warmup + i, True)
    table.flush()
    seconds = time.perf_counter() - start
    split["cpu"] = time.process_time() - cpu0  # every thread of this process, RPC threads included
    return seconds, split


def _config(args):
    import torch_psembed as pse

    return pse.TableConfig(
        dim=args.dim,
        accessor=pse.CtrAccessorConfig(embedx_threshold=0.0),
        num_threads=1,
    )


class _LocalTable:
    """A local _C table with SparseTable's pull/push surface (a SparseTable would be sharded in this job)."""

    def __init__(self, config):
        import torch_psembed._C as C

        self._backend = C.Table(config.to_dict())

    def pull(self, keys):
        import torch

        return torch.from_numpy(self._backend.pull(keys, False))

    def push(self, keys, grads, shows, clicks):
        return self._backend.push(keys, grads.numpy(), shows, clicks, None)

    def flush(self):
        pass


def _process_cpu(table, server_index, num_servers):
    return time.process_time()


def child(args) -> None:
    """One rank; alternates rounds of the local baseline (trainer 0 alone, the others idle at a barrier) and of
    the sharded table (every trainer), so both see the same machine load. Writes figures to args.out.RANK."""
    import torch
    import torch.distributed as dist

    import torch_psembed as pse
    from torch_psembed.distributed import server

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    pse.init(max_staleness=args.staleness, num_servers=args.num_servers, rpc_timeout=300.0, transport=args.transport)
    # dedicated servers serve inside init and never get here
    group = pse.distributed.trainer_group()
    tr = pse.distributed.trainer_rank()
    table = pse.SparseTable(_config(args), name="bench")
    local = _LocalTable(_config(args)) if tr == 0 else None
    rounds = []
    for r in range(args.rounds):
        dist.barrier(group=group)
        loc = _run_steps(args, local, seed=100 + tr) if tr == 0 else None
        dist.barrier(group=group)
        table._backend.reset_timers()
        srv0 = table._backend.collective(_process_cpu) if args.num_servers else None
        dp0 = table._backend.collective(server.op_data_plane_seconds) if args.num_servers else None
        seconds, split = _run_steps(args, table, seed=100 + tr)
        if srv0 is not None:  # a dedicated server's CPU time: ask it (collective over the trainers)
            srv1 = table._backend.collective(_process_cpu)
            split["server_cpu"] = sum(b - a for a, b in zip(srv0, srv1)) / pse.distributed.num_trainers()
            # and the time its data server spent inside the table's pulls (TCP transport; 0 over RPC)
            dp1 = table._backend.collective(server.op_data_plane_seconds)
            split["server_pull"] = sum(b[0] - a[0] for a, b in zip(dp0, dp1)) / pse.distributed.num_trainers()
        rounds.append({"local": loc, "sharded": (seconds, split, dict(table._backend.timers))})
    pse.shutdown()
    with open(f"{args.out}.{rank}", "w") as f:
        json.dump({"rank": rank, "trainer": tr, "steps": args.steps, "batch": args.batch, "rounds": rounds}, f)


def _launch(args, world, num_servers, out):
    port = free_port_pair()
    procs = []
    base = [sys.executable, os.path.abspath(__file__), "--child", "--out", out, "--num-servers", str(num_servers)]
    for flag in ("steps", "batch", "slots", "dim", "staleness", "warmup", "distinct_batches", "rounds", "transport"):
        base += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.prefetch:
        base.append(f"--prefetch={args.prefetch}")
    for r in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, RANK=str(r), LOCAL_RANK=str(r),
                   WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen(base, env=env))
    rcs = [p.wait(timeout=1800) for p in procs]
    if any(rcs):
        raise SystemExit(f"a benchmark process failed: exit codes {rcs}")
    results = []
    for r in range(world):
        path = f"{out}.{r}"
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    return results


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--slots", type=int, default=26)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--staleness", type=int, default=1)
    ap.add_argument("--distinct-batches", type=int, default=8)
    ap.add_argument("--num-servers", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    ap.add_argument("--only", default="colocated,dedicated")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "rpc"),
                    help="how pulls and pushes travel (pse.init's transport=): the TCP data plane or RPC")
    ap.add_argument("--prefetch", nargs="?", const="step-start", default=None, choices=("step-start", "before-push"),
                    help="prefetch the next step's rows (SparseTable.prefetch: pipelined pulls) right after each "
                         "step's pull (step-start, the default) or just before each push (before-push)")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    tmp = tempfile.mkdtemp(prefix="bench_dist_")
    atexit.register(shutil.rmtree, tmp, True)  # the children's result files only: gone however the run ends
    jobs = {"colocated": (2, 0), "dedicated": (2, 1)}
    print(f"transport {args.transport}; batch {args.batch} x {args.slots} ids, dim {args.dim}, max_staleness {args.staleness}, "
          f"{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up), 1 compute thread per process"
          f"{' (+ a prefetch thread per trainer)' if args.prefetch else ''}, "
          f"prefetch {args.prefetch or 'off'}; "
          f"medians over rounds; each round runs the local baseline (1 process) then the sharded table")
    print(f"{'workload':<10} {'procs':>5} {'samples/s':>10} {'vs local':>8} {'step ms':>8} {'pull ms':>8} "
          f"{'push ms':>8} | {'dedup':>6} {'rpcwait':>7} {'assembly':>8} {'localpull':>9} {'stale':>6} {'pfwait':>6}")
    for name in args.only.split(","):
        world, ns = jobs[name]
        res = _launch(args, world, ns, os.path.join(tmp, name))
        per_round = []
        for i in range(args.rounds):
            loc = next(r["rounds"][i]["local"] for r in res if r["trainer"] == 0)
            sh = [r["rounds"][i]["sharded"] for r in res]
            local_sps = args.steps * args.batch / loc[0]
            sps = len(sh) * args.steps * args.batch / max(x[0] for x in sh)
            step = 1000 * sum(x[0] for x in sh) / len(sh) / args.steps
            t = {}
            for x in sh:
                for k, v in x[2].items():
                    t[k] = t.get(k, 0.0) + 1000 * v / args.steps / len(sh)
            t["pull"] = 1000 * sum(x[1]["pull"] for x in sh) / len(sh) / args.steps
            t["server_pull"] = 1000 * sum(x[1].get("server_pull", 0.0) for x in sh) / len(sh) / args.steps
            t["push"] = 1000 * sum(x[1]["push"] for x in sh) / len(sh) / args.steps
            lt = {"step": 1000 * loc[0] / args.steps, "pull": 1000 * loc[1]["pull"] / args.steps,
                  "push": 1000 * loc[1]["push"] / args.steps}
            # CPU seconds per sample, all processes of the job (load-independent, unlike wall time)
            cpu = sum(x[1]["cpu"] + x[1].get("server_cpu", 0.0) for x in sh) / (len(sh) * args.steps * args.batch)
            t["cpu_ratio"] = cpu / (loc[1]["cpu"] / (args.steps * args.batch))
            per_round.append((local_sps, sps, step, t, lt))
        med = lambda f: _median([f(x) for x in per_round])  # noqa: E731
        lsps, sps = med(lambda x: x[0]), med(lambda x: x[1])
        print(f"{'local':<10} {1:>5} {lsps:>10.0f} {'1.00x':>8} {med(lambda x: x[4]['step']):>8.1f} "
              f"{med(lambda x: x[4]['pull']):>8.1f} {med(lambda x: x[4]['push']):>8.1f} |")
        keys = ("dedup", "rpc_wait", "assembly", "local_pull", "staleness_wait", "prefetch_wait")
        pf_keys = ("prefetch_dedup", "prefetch_staleness_wait", "prefetch_rpc_wait", "prefetch_assembly",
                   "prefetch_local_pull")
        tm = {k: med(lambda x, k=k: x[3].get(k, 0.0)) for k in keys + pf_keys + ("pull", "push")}
        ratio = med(lambda x: x[1] / x[0])
        step = med(lambda x: x[2])
        print(f"{name:<10} {world:>5} {sps:>10.0f} {ratio:>7.2f}x {step:>8.1f} {tm['pull']:>8.1f} "
              f"{tm['push']:>8.1f} | {tm['dedup']:>6.1f} {tm['rpc_wait']:>7.1f} {tm['assembly']:>8.1f} "
              f"{tm['local_pull']:>9.1f} {tm['staleness_wait']:>6.1f} {tm['prefetch_wait']:>6.1f}")
        if args.prefetch:
            print("  the prefetch thread's work per step, overlapping the training thread: dedup "
                  f"{tm['prefetch_dedup']:.1f}, wait for pushes {tm['prefetch_staleness_wait']:.1f}, RPC wait "
                  f"{tm['prefetch_rpc_wait']:.1f}, assembly {tm['prefetch_assembly']:.1f}, own shard "
                  f"{tm['prefetch_local_pull']:.1f} ms")
        cr = med(lambda x: x[3]["cpu_ratio"])
        print(f"  CPU time per sample, all processes: {cr:.2f}x the local run's"
              + (f" -> on {world} idle cores at most {world / cr:.2f}x the local samples/s" if ns == 0 else ""))
        if name == "dedicated":
            rpc = tm["dedup"] + tm["rpc_wait"] + tm["assembly"] + tm["staleness_wait"] + tm["prefetch_wait"]
            over = med(lambda x: (x[2] - x[4]["step"]) / x[2])
            print(f"  dedicated: dedup + RPC wait + assembly + staleness wait + prefetch wait = {rpc:.1f} ms = "
                  f"{100 * rpc / step:.0f}% "
                  f"of the {step:.1f} ms step; step time over the local step: {100 * over:+.0f}% of the step")
            srv_pull = med(lambda x: x[3].get("server_pull", 0.0))
            if srv_pull and srv_pull <= tm["rpc_wait"]:
                print(f"  of the {tm['rpc_wait']:.1f} ms RPC wait, {srv_pull:.1f} ms is the server's table pull; the rest "
                      f"({tm['rpc_wait'] - srv_pull:.1f} ms, {100 * (rpc - srv_pull) / step:.0f}% of the step with dedup and "
                      "assembly) is transport and queueing")
            elif srv_pull:  # prefetched: the server read the rows while the trainer worked
                print(f"  the server's table pull ({srv_pull:.1f} ms a step) overlapped the trainer's work but for the "
                      f"{tm['rpc_wait']:.1f} ms RPC wait")
        else:
            print(f"  colocated: 2 processes reach {ratio:.2f}x the samples/s of 1 process (target >= 1.6x)")
        print("  per round (samples/s local -> sharded): "
              + ", ".join(f"{x[0]:.0f} -> {x[1]:.0f}" for x in per_round))


if __name__ == "__main__":
    main()
