"""Job script of tests/test_faults.py (torchrun's environment set by hand, one process per rank, 127.0.0.1).

    python job.py SCENARIO OUTDIR [--rpc-timeout S] [--steps N] [--save-every K]

Layout: ``--num-servers 1`` (default): rank 0 is a dedicated server, ranks 1.. train; 0: colocated.

Scenarios:
  train       trainers pull/push deterministic batches (decay off, no deletes); every ``--save-every`` steps a
              checkpoint save to OUTDIR/save, after which trainer 0 pulls every key it may have pushed (with
              stats) and writes OUTDIR/snapshot-<n>.npz (n = the save's number), then the trainers barrier.
              Trainer 0 writes OUTDIR/progress-<step> files so the test can time an outside SIGKILL.
              With ``--kill-self R --kill-step S`` rank R SIGKILLs itself after step S. With ``--staleness 1
              --prefetch`` each trainer prefetches its next batch right after each pull (the prefetch thread
              is then busy with a pull when a peer dies). ``--transport rpc`` moves pulls and pushes from the
              TCP data plane to torch.distributed.rpc.
              With ``--kill-in-save N`` the server SIGKILLs itself in the middle of writing its part of save N
              (after 2 of its files, the third half written): the manifest still names save N-1.
  resume      load OUTDIR/save into a fresh job, check that every key's row equals OUTDIR/snapshot-<n>.npz of
              the save the manifest names, train ``--steps`` more steps and save again; writes resume.json.
Every rank writes OUTDIR/rank<r>.json when it finishes normally.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout's package, unless torch_psembed is importable already: the tests start this script with the
# package their own process imported first on PYTHONPATH (conftest.child_env), under scripts/sanitize.sh the
# sanitized build, which an insert at 0 here used to hide.
if importlib.util.find_spec("torch_psembed") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repo root

import torch_psembed as pse  # noqa: E402

torch.set_num_threads(1)
DIM = 2
UNIVERSE = 400  # keys 0..399 (times a large odd constant, so they spread over the servers)
BATCH = 64


def config() -> pse.TableConfig:
    acc = pse.CtrAccessorConfig(embedx_threshold=3.0, show_click_decay_rate=1.0, delete_threshold=0.0,
                                delete_after_unseen_days=10**6)
    return pse.TableConfig(dim=DIM, accessor=acc, lr_optimizer=pse.AdaGrad(learning_rate=0.1),
                           mf_optimizer=pse.AdaGrad(learning_rate=0.1, initial_range=0.01), num_shards=4,
                           num_threads=1)


def all_keys() -> np.ndarray:
    return (np.arange(UNIVERSE, dtype=np.int64) * 2654435761 + 11).astype(np.int64)


def batch(trainer: int, step: int):
    rng = np.random.default_rng(1000 * trainer + step)
    keys = all_keys()[rng.integers(0, UNIVERSE, BATCH)]
    grads = (rng.standard_normal((BATCH, 1 + DIM)) * 0.1).astype(np.float32)
    shows = np.ones(BATCH, np.float32)
    clicks = (rng.random(BATCH) < 0.2).astype(np.float32)
    return keys, grads, shows, clicks


def _touch(path: str) -> None:
    with open(path, "w") as f:
        f.write(str(time.time()))


def _install_kill_in_save(save_number: int) -> None:
    """On the server: SIGKILL this process in the middle of writing its files of the ``save_number``-th save."""
    from torch_psembed.checkpoint import _format as F
    from torch_psembed.checkpoint import _rows as R
    from torch_psembed.checkpoint import _table_io as T

    state = {"saves": 0, "writes": 0}
    orig_part = T._srv_write_part
    orig_write = F.write_array

    def write_part(local, index, num, path, save_id, mode, num_buckets):
        state["saves"] += 1
        return orig_part(local, index, num, path, save_id, mode, num_buckets)

    def write_array(path, arr, fsync=True):
        if state["saves"] == save_number:
            state["writes"] += 1
            if state["writes"] == 3:
                data = np.ascontiguousarray(arr).tobytes()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                print(f"[job] rank {os.environ['RANK']}: SIGKILL in the middle of save {save_number}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return orig_write(path, arr, fsync)

    orig_stream = R.stream_part

    def stream_part(local, dirpath, *args, **kwargs):
        # A checkpoint's bucket files are written and synced by the table itself (C++): let it write them,
        # then leave what a kill during the write leaves (the 3rd file half written) and die.
        out = orig_stream(local, dirpath, *args, **kwargs)
        if state["saves"] == save_number:
            path = os.path.join(dirpath, sorted(n for n in os.listdir(dirpath) if n.startswith("bucket-"))[2])
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
                os.fsync(f.fileno())
            print(f"[job] rank {os.environ['RANK']}: SIGKILL in the middle of save {save_number}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    T._srv_write_part = write_part
    F.write_array = write_array
    R.stream_part = stream_part


def train(a) -> dict:
    rank = int(os.environ["RANK"])
    if a.kill_in_save and rank == 0:
        _install_kill_in_save(a.kill_in_save)
    pse.init(max_staleness=a.staleness, num_servers=a.num_servers, rpc_timeout=a.rpc_timeout, transport=a.transport)
    # dedicated servers never get here
    tr = pse.distributed.trainer_rank()
    table = pse.SparseTable(config(), name="emb")
    save_dir = os.path.join(a.out, "save")
    saves = 0
    for step in range(1, a.steps + 1):
        keys, grads, shows, clicks = batch(tr, step)
        table.pull(keys)
        if a.prefetch:
            table.prefetch(batch(tr, step + 1)[0])
        table.push(keys, grads, shows, clicks)
        if tr == 0:
            _touch(os.path.join(a.out, f"progress-{step}"))
        if a.kill_self == rank and step == a.kill_step:
            print(f"[job] rank {rank}: SIGKILL myself after step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if a.save_every and step % a.save_every == 0:
            table.save(save_dir, "checkpoint")
            saves += 1
            if tr == 0:
                snap = table.pull(all_keys(), with_stats=True).numpy()
                np.savez(os.path.join(a.out, f"snapshot-{saves}.npz"), keys=all_keys(), rows=snap,
                         save_id=json.load(open(os.path.join(save_dir, "manifest.json")))["save_id"])
            torch.distributed.barrier(group=pse.distributed.trainer_group())
        if a.step_sleep:
            time.sleep(a.step_sleep)
    table.flush()
    out = {"rank": rank, "trainer": tr, "steps": a.steps, "saves": saves, "len": len(table)}
    pse.shutdown()
    return out


def resume(a) -> dict:
    rank = int(os.environ["RANK"])
    pse.init(max_staleness=0, num_servers=a.num_servers, rpc_timeout=a.rpc_timeout)
    tr = pse.distributed.trainer_rank()
    table = pse.SparseTable(config(), name="emb")
    save_dir = os.path.join(a.out, "save")
    summary = table.load(save_dir)
    out = {"rank": rank, "trainer": tr, "loaded_rows": summary["rows"], "save_id": summary["save_id"]}
    if tr == 0:
        rows = table.pull(all_keys(), with_stats=True).numpy()
        snaps = [f for f in os.listdir(a.out) if f.startswith("snapshot-")]
        match = None
        for f in snaps:
            z = np.load(os.path.join(a.out, f))
            if str(z["save_id"]) == summary["save_id"]:
                match = f
                out["equal_to_snapshot"] = bool(np.array_equal(z["rows"], rows))
                out["max_abs_diff"] = float(np.abs(z["rows"] - rows).max())
        out["snapshot"] = match
    torch.distributed.barrier(group=pse.distributed.trainer_group())  # no push before the comparison pull
    for step in range(1, a.steps + 1):
        keys, grads, shows, clicks = batch(tr, 10_000 + step)
        table.pull(keys)
        table.push(keys, grads, shows, clicks)
    saved = table.save(save_dir, "checkpoint")
    out["resaved_rows"] = saved["rows"]
    out["len"] = len(table)
    pse.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["train", "resume"])
    ap.add_argument("out")
    ap.add_argument("--num-servers", type=int, default=1)
    ap.add_argument("--rpc-timeout", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--kill-self", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--kill-in-save", type=int, default=0)
    ap.add_argument("--staleness", type=int, default=0, help="pse.init's max_staleness (train)")
    ap.add_argument("--prefetch", action="store_true", help="prefetch the next batch after each pull (train)")
    ap.add_argument("--transport", default="tcp", choices=["tcp", "rpc"], help="pse.init's transport (train)")
    a = ap.parse_args()
    out = train(a) if a.scenario == "train" else resume(a)
    with open(os.path.join(a.out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
