"""A save killed with SIGKILL leaves the previous save intact and loadable.

A child process fills a table, saves it once (the save that must survive), changes every row, and starts a
second save to the same directory. The child stops itself at a chosen point of that save (half of a data
file written; all data written and renamed but the manifest not yet replaced; the new manifest written but
not yet renamed into place) by printing a line and sleeping; the parent then SIGKILLs it. The parent checks
that the directory verifies and loads into exactly the first save's rows, and that a new save there works.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed.checkpoint import _format as F
from torch_psembed.errors import CorruptCheckpointError
from torch_psembed.tools import verify

from conftest import child_env, run_python

N = 150_000
DIM = 8

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    import torch_psembed as pse
    from torch_psembed.checkpoint import _format as F, _rows as R

    path, point, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def rows(shift):
        rng = np.random.default_rng(0)
        t = pse.SparseTable(pse.TableConfig(dim={dim}))
        b = t._backend
        keys = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
        base = rng.random((n, b.base_width), dtype=np.float32) + shift
        base[:, 0] = rng.integers(0, 100, n) + shift        # show
        base[:, 1] = np.floor(base[:, 0] * rng.random(n))   # click <= show
        base[:, 3] = rng.integers(0, 30, n)                 # unseen_days
        base[:, 4] = rng.integers(0, 1000, n)               # slot
        has = (rng.random(n) < 0.5).astype(np.uint8)
        mf = rng.random((int(has.sum()), b.mf_width), dtype=np.float32) + shift
        return t, keys, base, has, mf

    t, keys, base, has, mf = rows(0)
    t._backend.load_rows(keys, base, has, mf)
    if point != "first_save":
        t.save(path, num_buckets=64)  # 256 files: the kill below lands after the 19th
        print("SAVED", flush=True)
        _, keys, base, has, mf = rows(1)
        t._backend.load_rows(keys, base, has, mf)

    def stop():
        print("STOP", flush=True)
        time.sleep(60)

    if point in ("half_file", "first_save"):
        real = F.write_array
        count = [0]
        def write_array(p, arr, fsync=True):
            count[0] += 1
            if count[0] == 20:  # after 19 whole files, half of the 20th
                data = memoryview(np.ascontiguousarray(arr)).cast("B")
                with open(p, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                stop()
            return real(p, arr, fsync)
        real_stream = R.stream_part
        def stream_part(local, dirpath, *args, **kwargs):
            # A checkpoint's bucket files are written (and synced) by the table itself, in C++: let it write
            # them, then leave the state a kill during the write leaves: the 20th file half written.
            out = real_stream(local, dirpath, *args, **kwargs)
            p = os.path.join(dirpath, sorted(n for n in os.listdir(dirpath) if n.startswith("bucket-"))[19])
            with open(p, "r+b") as f:
                f.truncate(os.path.getsize(p) // 2)
                os.fsync(f.fileno())
            stop()
            return out
        F.write_array = write_array
        R.F.write_array = write_array
        R.stream_part = stream_part
    elif point in ("data_renamed", "manifest_written"):
        real_replace = os.replace
        def replace(src, dst):
            if dst.endswith("manifest.json"):
                if point == "data_renamed":
                    os.remove(src)  # as if killed before the new manifest was written
                stop()
            return real_replace(src, dst)
        os.replace = replace
    t.save(path, num_buckets=64)
    print("DONE", flush=True)
    """
)


def _expected_first_save():
    """The rows of the child's first save (the same generator, shift 0)."""
    ns = {}
    src = CHILD.format(dim=DIM)
    exec(src[src.index("def rows(shift):"):src.index("t, keys, base, has, mf = rows(0)")], {"np": np, "pse": pse, "n": N}, ns)
    t, keys, base, has, mf = ns["rows"](0)
    t._backend.load_rows(keys, base, has, mf)
    return t._backend.export("checkpoint")


def _run_and_kill(tmp_path, point):
    path = str(tmp_path / "ck")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(dim=DIM))
    proc = subprocess.Popen([sys.executable, str(script), path, point, str(N)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    watchdog = threading.Timer(240, proc.kill)  # a child that hangs fails the test instead of blocking it
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() in ("STOP", "DONE"):
                break
        assert lines and lines[-1] == "STOP", f"the child did not reach {point}: {lines}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return path


@pytest.mark.parametrize("point", ["half_file", "data_renamed", "manifest_written"])
def test_killed_save_leaves_the_previous_save_loadable(tmp_path, point):
    path = _run_and_kill(tmp_path, point)
    leftovers = [n for n in os.listdir(path) if n.startswith((".tmp-", "data-"))]
    assert len(leftovers) == 2, f"the killed save must have left its files behind: {leftovers}"
    info = verify(path)
    assert info["rows"] == N
    t = pse.SparseTable(pse.TableConfig(dim=DIM))
    t.load(path)
    want = _expected_first_save()
    got = t._backend.export("checkpoint")
    for k in ("keys", "base", "has_mf", "mf"):
        assert np.array_equal(got[k], want[k]), k
    # The next save into the same directory works and removes what the killed one left.
    t.save(path)
    m = F.read_manifest(path)
    assert sorted(os.listdir(path)) == sorted([F.MANIFEST, m["data_dir"]])


def test_killed_first_save_leaves_nothing_loadable(tmp_path):
    path = _run_and_kill(tmp_path, "first_save")
    t = pse.SparseTable(pse.TableConfig(dim=DIM))
    with pytest.raises(CorruptCheckpointError, match="manifest.json: missing"):
        t.load(path)
    assert len(t) == 0


SHORT_WRITE_CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import numpy as np
    import torch_psembed as pse

    save, srv = sys.argv[1], sys.argv[2]
    t = pse.SparseTable(pse.TableConfig(dim={dim}))
    rng = np.random.default_rng(1)
    keys = rng.integers(-2**63, 2**63 - 1, 4000, dtype=np.int64)
    t.push(keys, rng.standard_normal((keys.size, 1 + {dim})).astype(np.float32),
           np.full(keys.size, 20, np.float32), np.full(keys.size, 5, np.float32))
    # No file may grow past 16 KiB: a write that crosses the limit ends short without an error (as one on a
    # full disk, or of more than 2 GiB, does), the next one fails with EFBIG (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    for what, write in (("base", lambda: t.save(save, mode="base")),
                        ("export", lambda: pse.export(t, srv, dtype="float32", rows="all"))):
        try:
            write()
            print(what, "COMMITTED", flush=True)
        except OSError as e:
            print(what, "OSError", e.errno, flush=True)
    """
)


def test_a_short_write_fails_the_save_and_the_previous_save_stays(tmp_path):
    # Audit (session 26): write_array ignored how many bytes write() took. A column file written short (a full
    # disk, a quota, or any file over 2 GiB: one write(2) moves at most 2,147,479,552 bytes) was committed
    # under a manifest recording its full size and crc32, and the previous save was deleted.
    import errno

    rng = np.random.default_rng(0)
    t = pse.SparseTable(pse.TableConfig(dim=DIM))
    keys = rng.integers(-2**63, 2**63 - 1, 200, dtype=np.int64)
    t.push(keys, rng.standard_normal((keys.size, 1 + DIM)).astype(np.float32),
           np.full(keys.size, 20, np.float32), np.full(keys.size, 5, np.float32))
    save, srv = str(tmp_path / "base"), str(tmp_path / "srv")
    t.save(save, mode="base")
    pse.export(t, srv, dtype="float32", rows="all")
    before = {p: (open(os.path.join(p, F.MANIFEST)).read(), sorted(os.listdir(p))) for p in (save, srv)}
    script = tmp_path / "child.py"
    script.write_text(SHORT_WRITE_CHILD.format(dim=DIM))
    out = run_python(script=str(script), args=(save, srv), timeout=240, env=child_env())
    assert out.split("\n")[:2] == [f"base OSError {errno.EFBIG}", f"export OSError {errno.EFBIG}"], out
    # Nothing of the failed writes is left, and the previous save and export load as they were.
    assert {p: (open(os.path.join(p, F.MANIFEST)).read(), sorted(os.listdir(p))) for p in (save, srv)} == before
    back = pse.SparseTable(pse.TableConfig(dim=DIM))
    back.load(save)
    assert np.array_equal(np.sort(back._backend.export("checkpoint")["keys"]), np.sort(keys))
    pse.InferenceEmbedding.load(srv)
    assert verify(srv)["rows"] == keys.size
