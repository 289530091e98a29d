"""Fault injection on 127.0.0.1: SIGKILL a server rank, a trainer rank, and the server in the middle of a save.

Jobs run ``tests/fault_workers/job.py`` with torchrun's environment set by hand (one process per rank, each in
its own session, so a dead rank is not reaped by an agent and every process can be killed in ``finally``).
Layout: rank 0 a dedicated server, ranks 1 and 2 trainers; ``rpc_timeout=5`` s (10 s for the save job).

Checked:
- the survivors exit non-zero, within the job timeout, with an error naming the dead rank (for a killed
  server, also while the trainers' prefetch threads have pulls in flight);
- after a kill in the middle of save 2, ``tools verify`` accepts the directory, its manifest still names save 1,
  and a fresh job (2 colocated ranks, another layout) loads it with exactly the rows trainer 0 pulled right
  after save 1, then trains and saves again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from torch_psembed.distributed.ports import free_port_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(REPO, "tests", "fault_workers", "job.py")
JOB_TIMEOUT = 120  # seconds for a whole job, start-up included (2 loaded cores); then everything is killed
RPC_TIMEOUT = "5"

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _env(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                        "TORCHELASTIC_USE_AGENT_STORE", "PSEMBED_RPC_PORT")}
    env.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return env


class Job:
    """``world`` processes of job.py; ``kill_when(pred, rank)`` SIGKILLs a rank from outside once pred() holds."""

    def __init__(self, world: int, args: list, out: str) -> None:
        self.world, self.out = world, out
        port = free_port_pair()
        self.procs = []
        for r in range(world):
            log = open(os.path.join(out, f"log{r}.txt"), "w")
            p = subprocess.Popen([sys.executable, JOB, *args, out], env=_env(r, world, port), cwd=REPO,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            p.log = log
            self.procs.append(p)

    def kill(self, rank: int) -> None:
        p = self.procs[rank]
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout=JOB_TIMEOUT, kill_rank=None, kill_when=None):
        """Wait for every rank; returns ``{rank: (returncode or None if it hung, seconds, log text)}``."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        done = {}
        try:
            while len(done) < self.world and time.monotonic() < deadline:
                if kill_when is not None and kill_when():
                    self.kill(kill_rank)
                    kill_when = None
                for r, p in enumerate(self.procs):
                    if r not in done and p.poll() is not None:
                        done[r] = (p.returncode, time.monotonic() - t0)
                time.sleep(0.1)
        finally:
            for r in range(self.world):
                self.kill(r)
            for p in self.procs:
                p.wait()
                p.log.close()
        res = {}
        for r in range(self.world):
            with open(os.path.join(self.out, f"log{r}.txt")) as f:
                text = f.read()
            rc, secs = done.get(r, (None, None))
            res[r] = (rc, secs, text)
        return res


def _show(res) -> str:
    return "\n".join(f"--- rank {r} rc={rc} after {s if s is None else round(s, 1)} s\n{t[-2500:]}"
                     for r, (rc, s, t) in res.items())


def _assert_survivors_name(res, dead: int) -> None:
    for r, (rc, secs, text) in res.items():
        if r == dead:
            assert rc == -signal.SIGKILL, f"rank {dead} was not the one killed\n" + _show(res)
            continue
        assert rc is not None, f"rank {r} hung after rank {dead} died\n" + _show(res)
        assert rc != 0, f"rank {r} exited 0 although rank {dead} died\n" + _show(res)
        # The error the process died of (the last one reported, not one inside a chained traceback).
        final = [ln for ln in text.splitlines() if "PeerUnavailableError:" in ln]
        assert final and f"rank {dead} " in final[-1], (
            f"rank {r}'s final error does not name the dead rank {dead}: {final[-1:]}\n" + _show(res))


@pytest.mark.parametrize("prefetch", [False, True], ids=["plain", "prefetching"])
def test_killed_server_rank_is_named_by_the_trainers(tmp_path, prefetch):
    # With prefetch, the trainers' prefetch threads have a pull in flight when the server dies: its error
    # must reach the training thread (named, non-zero exit), and the thread must not hold the exit up.
    out = str(tmp_path)
    extra = ["--staleness", "1", "--prefetch"] if prefetch else []
    job = Job(3, ["train", "--steps", "400", "--step-sleep", "0.02", "--rpc-timeout", RPC_TIMEOUT, *extra], out)
    res = job.wait(kill_rank=0, kill_when=lambda: os.path.exists(os.path.join(out, "progress-5")))
    _assert_survivors_name(res, 0)


def test_killed_trainer_rank_is_named_by_the_survivors(tmp_path):
    out = str(tmp_path)
    job = Job(3, ["train", "--steps", "400", "--step-sleep", "0.02", "--rpc-timeout", RPC_TIMEOUT,
                  "--kill-self", "2", "--kill-step", "5"], out)
    res = job.wait()
    _assert_survivors_name(res, 2)


@pytest.fixture(scope="module")
def mid_save_job(tmp_path_factory):
    """One job whose server is SIGKILLed in the middle of save 2 (of saves every 4 steps)."""
    out = str(tmp_path_factory.mktemp("midsave"))
    # 10 s (not 5): save 1 must succeed on a loaded machine, where a trainer may lag a few seconds at a barrier.
    job = Job(3, ["train", "--steps", "12", "--save-every", "4", "--kill-in-save", "2", "--rpc-timeout", "10"], out)
    return out, job.wait()


def test_kill_in_the_middle_of_a_save_is_named_by_the_trainers(mid_save_job):
    out, res = mid_save_job
    assert "SIGKILL in the middle of save 2" in res[0][2], _show(res)
    _assert_survivors_name(res, 0)


def test_kill_in_the_middle_of_a_save_keeps_the_last_save_and_training_resumes(mid_save_job):
    out, res = mid_save_job
    assert "SIGKILL in the middle of save 2" in res[0][2], _show(res)
    assert all(rc not in (None, 0) for r, (rc, _, _) in res.items() if r != 0), _show(res)
    save = os.path.join(out, "save")

    # The directory verifies and still names save 1 (the save 2 files were never committed).
    v = subprocess.run([sys.executable, "-m", "torch_psembed.tools", "verify", save], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    import numpy as np

    snap1 = np.load(os.path.join(out, "snapshot-1.npz"))
    with open(os.path.join(save, "manifest.json")) as f:
        assert json.load(f)["save_id"] == str(snap1["save_id"])
    assert not os.path.exists(os.path.join(out, "snapshot-2.npz"))

    # A fresh job in another layout (2 colocated ranks) resumes from it with the same rows.
    out2 = os.path.join(out, "resume")
    os.makedirs(out2)
    os.symlink(save, os.path.join(out2, "save"))
    os.symlink(os.path.join(out, "snapshot-1.npz"), os.path.join(out2, "snapshot-1.npz"))
    res2 = Job(2, ["resume", "--num-servers", "0", "--steps", "5", "--rpc-timeout", "30"], out2).wait()
    assert all(rc == 0 for rc, _, _ in res2.values()), _show(res2)
    with open(os.path.join(out2, "rank0.json")) as f:
        r0 = json.load(f)
    assert r0["snapshot"] == "snapshot-1.npz", r0
    assert r0["equal_to_snapshot"], r0
    assert r0["loaded_rows"] > 0 and r0["resaved_rows"] >= r0["loaded_rows"], r0
