#!/usr/bin/env python3
"""Load and soak test: asynchronous training on the synthetic click log with 2 processes, bounded in time.

    python scripts/soak.py [--minutes 10] [--staleness 2] [--batch 512] [--slots 13] [--prefetch] [--out soak.json]

Starts 2 ranks on 127.0.0.1 (torchrun's environment set by hand; colocated layout: each rank trains and
serves half of the table) that train a PSEmbedding + small MLP CTR model on ``torch_psembed.data``'s simulator
with ``max_staleness`` > 0 (pulls run ahead of pushes; with ``--prefetch`` each step also prefetches the next
batch's rows after its backward, on the table's prefetch thread). The table never forgets: show/click decay 1, delete
thresholds 0, no eviction by age, so

- **no push is lost**: at the end the sum of ``show`` (and of ``click``) over every row of every server equals
  the shows (clicks) the two trainers pushed (every id occurrence is one show; clicks are the labels);
- **memory**: the launcher samples the resident set (VmRSS) of both ranks while rank 0 reports the table's
  own size (``stats()["bytes"]``, global). After a warm-up (10% of the run, at least 20 s) the RSS growth
  beyond the table's growth must stay under 5% of the RSS at the end of the warm-up.

Prints a line of figures every ~20 s and a summary; exits 1 when a check fails. Every child is killed on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- worker (one rank) ---------------------------------------------------------------------------------------

def _server_totals(local, server_index, num_servers):
    """Run on each server: float64 sums of show and click over its rows, and its own table bytes."""
    import numpy as np

    base = local.export("checkpoint")["base"]
    return {"show": float(np.sum(base[:, 0], dtype=np.float64)), "click": float(np.sum(base[:, 1], dtype=np.float64)),
            "rows": int(base.shape[0]), "bytes": int(local.stats()["bytes"])}


def worker(a) -> None:
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist

    import torch_psembed as pse
    from torch_psembed.data.synthetic import ClickLogSimulator, SimulatorConfig

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    pse.init(max_staleness=a.staleness, num_servers=0, rpc_timeout=120.0)
    acc = pse.CtrAccessorConfig(show_click_decay_rate=1.0, delete_threshold=0.0, delete_after_unseen_days=10**6,
                                embedx_threshold=5.0)
    cfg = pse.TableConfig(dim=a.dim, accessor=acc, num_shards=16, num_threads=1)
    table = pse.SparseTable(cfg, name="soak")
    emb = pse.PSEmbedding(table, output="lr_mf")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(a.slots * a.dim, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    model = torch.nn.parallel.DistributedDataParallel(mlp, process_group=pse.distributed.trainer_group())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sim = ClickLogSimulator(SimulatorConfig(num_slots=a.slots, chunk_size=a.batch, samples_per_day=a.day_samples,
                                            test_samples=a.batch, vocab_max=a.vocab_max, seed=7))
    shows_pushed = 0.0
    clicks_pushed = 0.0
    steps = 0
    day, index = 0, rank
    n_chunks = sim.num_chunks("train")
    t0 = time.monotonic()
    deadline = t0 + a.minutes * 60.0
    last_report = 0.0
    status = os.path.join(a.workdir, "status.json")

    def next_batch():
        nonlocal day, index
        if index >= n_chunks:
            day, index = day + 1, rank
        b = sim.chunk(day, "train", index)
        index += world
        return b

    b_next = next_batch()
    while True:
        # Both ranks must run the same number of DDP steps: stop together, on a step count agreed by all-reduce.
        if steps % 20 == 0:
            flag = torch.tensor([1.0 if time.monotonic() >= deadline else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pse.distributed.trainer_group())
            if flag.item() > 0:
                break
        b, b_next = b_next, next_batch()
        keys = b["keys"].view(-1, a.slots)
        labels = b["labels"]
        with pse.feed(clicks=labels):
            rows = emb(keys)  # (B, S, 1 + dim)
        logit = rows[..., 0].sum(1) + model(rows[..., 1:].reshape(keys.shape[0], -1)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, labels)
        opt.zero_grad()
        loss.backward()
        if a.prefetch:  # the next step's rows, fetched while this step finishes (the last one is dropped)
            emb.prefetch(b_next["keys"].view(-1, a.slots))
        opt.step()
        shows_pushed += float(keys.numel())
        clicks_pushed += float(labels.sum().item()) * a.slots
        steps += 1
        now = time.monotonic()
        # No figures in the last 5 s: the launcher reads the RSS up to 0.5 s after a status file, and once the
        # deadline passes the ranks export the whole table for the final check (arrays that are not a leak).
        if rank == 0 and now - last_report >= a.report_every and now < deadline - 5.0:
            last_report = now
            st = table.stats()
            tmp = status + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"t": now - t0, "steps": steps, "day": day, "keys": st["keys"], "bytes": st["bytes"],
                           "loss": float(loss.item())}, f)
            os.replace(tmp, status)
    table.flush()
    totals = torch.tensor([shows_pushed, clicks_pushed, float(steps)], dtype=torch.float64)
    dist.all_reduce(totals, group=pse.distributed.trainer_group())
    per_server = table._backend.collective(_server_totals)
    st = table.stats()
    if rank == 0:
        res = {
            "seconds": time.monotonic() - t0,
            "steps_total": int(totals[2].item()),
            "samples_total": int(totals[2].item()) * a.batch,
            "shows_pushed": totals[0].item(),
            "clicks_pushed": totals[1].item(),
            "shows_in_table": sum(s["show"] for s in per_server),
            "clicks_in_table": sum(s["click"] for s in per_server),
            "rows": sum(s["rows"] for s in per_server),
            "keys": st["keys"],
            "bytes": st["bytes"],
            "days": day + 1,
        }
        with open(os.path.join(a.workdir, "final.json"), "w") as f:
            json.dump(res, f)
    pse.shutdown()


# -- launcher ------------------------------------------------------------------------------------------------



def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def launch(a) -> int:
    import tempfile

    sys.path.insert(0, ROOT)
    from torch_psembed.distributed.ports import free_port_pair

    workdir = tempfile.mkdtemp(prefix="psembed-soak-")
    port = free_port_pair()
    procs = []
    args = [sys.executable, os.path.abspath(__file__), "--worker", "--workdir", workdir, "--minutes", str(a.minutes),
            "--staleness", str(a.staleness), "--batch", str(a.batch), "--slots", str(a.slots), "--dim", str(a.dim),
            "--day-samples", str(a.day_samples), "--vocab-max", str(a.vocab_max),
            "--report-every", str(a.report_every)] + (["--prefetch"] if a.prefetch else [])
    print(f"[soak] {a.minutes} min, 2 ranks (colocated), max_staleness={a.staleness}, "
          f"prefetch {'on' if a.prefetch else 'off'}, batch {a.batch} x {a.slots} "
          f"slots, dim {a.dim}; workdir {workdir}", flush=True)
    samples = []  # (t, rss_total, table_bytes, keys, steps)
    last_status = None
    t0 = time.monotonic()
    hard_deadline = t0 + a.minutes * 60.0 + 300.0
    try:
        for r in range(2):
            env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_USE_AGENT_STORE", "PSEMBED_RPC_PORT")}
            env.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                        "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
            log = open(os.path.join(workdir, f"rank{r}.log"), "w")
            procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        status = os.path.join(workdir, "status.json")
        while any(p.poll() is None for p in procs):
            if time.monotonic() > hard_deadline:
                print("[soak] FAIL: the job did not finish 5 minutes after its deadline (hang); killing it")
                return 1
            try:
                mtime = os.path.getmtime(status)
            except OSError:
                mtime = None
            if mtime is not None and mtime != last_status:
                last_status = mtime
                try:
                    with open(status) as f:
                        s = json.load(f)
                except (OSError, ValueError):
                    s = None
                if s is not None:
                    rss = [_rss_bytes(p.pid) for p in procs]
                    samples.append((s["t"], sum(rss), s["bytes"], s["keys"], s["steps"]))
                    print(f"[soak] t={s['t']:7.1f}s steps(rank0)={s['steps']:6d} day={s['day']:3d} "
                          f"keys={s['keys']:9d} table={s['bytes'] / 2**20:8.1f} MiB "
                          f"rss={rss[0] / 2**20:7.1f}+{rss[1] / 2**20:7.1f} MiB loss={s['loss']:.4f}", flush=True)
            time.sleep(0.5)
        rcs = [p.returncode for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()

    if any(rcs):
        print(f"[soak] FAIL: ranks exited with {rcs}; logs in {workdir}")
        for r in range(2):
            with open(os.path.join(workdir, f"rank{r}.log")) as f:
                print(f"--- rank {r}\n" + f.read()[-3000:])
        return 1
    with open(os.path.join(workdir, "final.json")) as f:
        res = json.load(f)

    ok = True
    lost_shows = res["shows_pushed"] - res["shows_in_table"]
    lost_clicks = res["clicks_pushed"] - res["clicks_in_table"]
    print(f"[soak] {res['seconds']:.0f} s, {res['steps_total']} steps, {res['samples_total']} samples "
          f"({res['samples_total'] / res['seconds']:.0f} samples/s over 2 ranks), {res['days']} simulated days")
    print(f"[soak] shows pushed {res['shows_pushed']:.0f}, in the table {res['shows_in_table']:.0f} "
          f"(lost {lost_shows:.0f}); clicks pushed {res['clicks_pushed']:.0f}, in the table "
          f"{res['clicks_in_table']:.0f} (lost {lost_clicks:.0f})")
    if lost_shows != 0 or lost_clicks != 0:
        print("[soak] FAIL: pushes were lost (or counted twice)")
        ok = False

    warm_t = max(20.0, 0.1 * a.minutes * 60.0)
    warm = [s for s in samples if s[0] >= warm_t]
    if len(warm) >= 2:
        (ta, ra, ba, ka, _), (tb, rb, bb, kb, _) = warm[0], warm[-1]
        excess = (rb - ra) - (bb - ba)
        ratio = excess / ra
        print(f"[soak] memory from t={ta:.0f}s to t={tb:.0f}s: RSS {ra / 2**20:.1f} -> {rb / 2**20:.1f} MiB "
              f"(+{(rb - ra) / 2**20:.1f}), table bytes {ba / 2**20:.1f} -> {bb / 2**20:.1f} MiB "
              f"(+{(bb - ba) / 2**20:.1f}), keys {ka} -> {kb}; growth beyond the table: "
              f"{excess / 2**20:.1f} MiB = {100 * ratio:.2f}% of the RSS (limit 5%)")
        res.update(rss_start=ra, rss_end=rb, table_bytes_start=ba, table_bytes_end=bb, excess_ratio=ratio)
        if ratio >= 0.05:
            print("[soak] FAIL: RSS grew more than 5% beyond the table's own growth")
            ok = False
    else:
        print("[soak] (run too short for the memory check: fewer than 2 samples after the warm-up)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(res, samples=samples, ok=ok, minutes=a.minutes), f)
    print("[soak] PASS" if ok else f"[soak] FAILED; logs in {workdir}")
    if ok:  # the logs are kept only when they explain a failure
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training time (default 10)")
    ap.add_argument("--staleness", type=int, default=2, help="max_staleness of the asynchronous pulls")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--slots", type=int, default=13)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--day-samples", type=int, default=100_000, help="samples per simulated day (ids churn daily)")
    ap.add_argument("--vocab-max", type=int, default=200_000)
    ap.add_argument("--report-every", type=float, default=20.0, help="seconds between figure lines")
    ap.add_argument("--prefetch", action="store_true", help="prefetch each next batch's rows after the backward")
    ap.add_argument("--out", default="", help="write the figures as JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    sys.exit(launch(a))


if __name__ == "__main__":
    main()
