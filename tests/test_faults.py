"""Fault injection on 127.0.0.1: SIGKILL a server rank, a trainer rank, and the server in the middle of a save;
SIGSTOP a server or a trainer rank (a hung, not a dead, peer).

Jobs run ``tests/fault_workers/job.py`` with torchrun's environment set by hand (one process per rank, each in
its own session, so a dead rank is not reaped by an agent and every process can be killed in ``finally``).
Layout: rank 0 a dedicated server, ranks 1 and 2 trainers; ``rpc_timeout=5`` s (10 s for the save job).

Checked:
- the survivors exit with status 1 (docs/distributed.md, "Failures"), within the job timeout, with an error
  naming the dead rank (for a killed server, also while the trainers' prefetch threads have pulls in flight);
- a rank stopped with SIGSTOP mid-training (its sockets stay open, nothing closes): the server (TCP data plane,
  also with prefetching, and with ``--transport rpc``) or a trainer; the others exit with status 1 within
  ``HANG_BOUND`` s of the stop, their final error a ``PeerUnavailableError`` naming the stopped rank and
  ``rpc_timeout`` (2 s there), while that rank is still stopped (SIGCONT + SIGKILL in ``finally``);
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

from conftest import REPO, child_env

JOB = os.path.join(REPO, "tests", "fault_workers", "job.py")
JOB_TIMEOUT = 120  # seconds for a whole job, start-up included (2 loaded cores); then everything is killed
RPC_TIMEOUT = "5"
HANG_RPC_TIMEOUT = "2"  # the hung-peer job: the error must come from this timeout, not from a closed connection
HANG_BOUND = 40  # seconds the trainers get after the SIGSTOP (rpc_timeout + exit, on 2 loaded cores)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _env(rank: int, world: int, port: int) -> dict:
    return child_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


class Job:
    """``world`` processes of job.py; ``wait(kill_rank=, kill_when=pred)`` signals a rank from outside (SIGKILL,
    or ``sig``, e.g. SIGSTOP) once pred() holds."""

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

    def kill(self, rank: int, sig: int = signal.SIGKILL) -> None:
        p = self.procs[rank]
        if p.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    os.killpg(p.pid, signal.SIGCONT)  # a stopped rank (SIGSTOP) is resumed, then killed
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass

    def state(self, rank: int):
        """The rank's process state letter from /proc (``T``: stopped), or None once it has exited."""
        try:
            with open(f"/proc/{self.procs[rank].pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return None

    def wait(self, timeout=JOB_TIMEOUT, kill_rank=None, kill_when=None, sig=signal.SIGKILL, after=None):
        """Wait for every rank; returns ``{rank: (returncode or None if it hung, seconds, log text)}``.

        ``sig`` is sent to ``kill_rank`` once ``kill_when()`` holds. SIGSTOP: that rank is not waited for, and
        with ``after`` the others get ``after`` seconds from the signal (``self.signalled_at``, seconds since
        the start) before they count as hung. Every rank left is SIGKILLed at the end (a stopped one first
        gets SIGCONT), whatever happens.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        done = {}
        waiting = set(range(self.world))
        self.signalled_at = None
        try:
            while not waiting <= set(done) and time.monotonic() < deadline:
                if kill_when is not None and kill_when():
                    self.kill(kill_rank, sig)
                    self.signalled_at = time.monotonic() - t0
                    kill_when = None
                    if sig == signal.SIGSTOP:
                        waiting.discard(kill_rank)
                    if after is not None:
                        deadline = min(deadline, time.monotonic() + after)
                for r, p in enumerate(self.procs):
                    if r not in done and p.poll() is not None:
                        done[r] = (p.returncode, time.monotonic() - t0)
                time.sleep(0.1)
            if kill_rank is not None:
                self.final_state = self.state(kill_rank)  # "T" if a stopped rank is still stopped
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
        assert rc == 1, f"rank {r} exited {rc}, not 1 (docs/distributed.md), after rank {dead} died\n" + _show(res)
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


@pytest.mark.parametrize("hung, extra", [
    (0, []),
    (0, ["--staleness", "1", "--prefetch"]),
    (0, ["--transport", "rpc"]),
    (2, []),
], ids=["server", "server-prefetching", "server-rpc-transport", "trainer"])
def test_hung_rank_is_named_by_the_survivors(tmp_path, hung, extra):
    # A hung peer (SIGSTOP: its process and sockets stay, it just never answers) must not hang the others:
    # docs/distributed.md, "Failures": "a hung process hits the timeout" and the caller gets
    # PeerUnavailableError("rank N is unavailable: ... (rpc_timeout=...s): ...", rank=N), then exits with 1.
    # A stopped server is noticed by the trainers' pulls/pushes (TCP data plane, or RPC with --transport rpc);
    # a stopped trainer by the server's liveness probe, and by the other trainer (told by the server, or by
    # its own probe in shutdown).
    out = str(tmp_path)
    job = Job(3, ["train", "--steps", "400", "--step-sleep", "0.02", "--rpc-timeout", HANG_RPC_TIMEOUT, *extra],
              out)
    res = job.wait(kill_rank=hung, kill_when=lambda: os.path.exists(os.path.join(out, "progress-5")),
                   sig=signal.SIGSTOP, after=HANG_BOUND)
    assert job.signalled_at is not None, "training never reached step 5\n" + _show(res)
    # the rank was still stopped (not dead) when the others gave up on it: their errors come from the timeout
    assert res[hung][0] is None and job.final_state == "T", f"rank {hung} state {job.final_state}\n" + _show(res)
    assert not os.path.exists(os.path.join(out, "progress-400")), "training finished despite the stop"
    for r in set(range(3)) - {hung}:
        rc, secs, text = res[r]
        assert rc is not None, (
            f"rank {r} still running {HANG_BOUND} s after rank {hung} was stopped (rpc_timeout="
            f"{HANG_RPC_TIMEOUT} s): a hung peer hangs it\n" + _show(res))
        assert rc == 1, f"rank {r} exited {rc}, not 1, after rank {hung} hung\n" + _show(res)
        # the error the process died of names the hung rank (a rank told by another names it the same way)
        final = [ln for ln in text.splitlines() if "PeerUnavailableError:" in ln]
        assert final and final[-1].split("PeerUnavailableError: ", 1)[1].startswith(f"rank {hung} is unavailable"), (
            f"rank {r}'s final error does not name the hung rank {hung}: {final[-1:]}\n" + _show(res))
        assert f"rpc_timeout={HANG_RPC_TIMEOUT}s" in final[-1], final[-1]


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
