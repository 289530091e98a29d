"""Job script for tests/test_distributed.py; run under torchrun (or with torchrun's env set by hand).

    python worker.py SCENARIO OUT_JSON [options]

Scenarios:
  routing  1 trainer + S dedicated servers, max_staleness=0: a sequence of pull/push/shrink/new_day/end_day
           on the sharded table is compared row for row with a local _C.Table fed the same sequence; also the
           error paths (table before init, init twice, same name with another config, malformed request).
  train    logistic regression over hashed features (sparse lr weights in a SparseTable) plus a dense
           nn.Linear under DistributedDataParallel over pse.distributed.trainer_group(); trainers split the
           data; the first trainer writes the test AUC. With WORLD_SIZE unset it is the single-process run.
  fault    colocated training in a loop; the rank given by --kill-rank SIGKILLs itself at step 5. The
           survivors must fail with PeerUnavailableError naming it.
  late_trainer, server_dies_in_collective, mismatch, init_args, other_config, after_shutdown: see each
           function's docstring.
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
from torch_psembed import _C  # noqa: E402
from torch_psembed.errors import NotInitializedError  # noqa: E402


# -- synthetic click log ----------------------------------------------------------------------------------
FIELDS = 8
VOCAB = 300
DENSE = 4


def make_data(n: int, seed: int):
    """Hashed categorical features (Zipf-like per field), dense features, labels from a known logistic model."""
    rng = np.random.default_rng(1234)  # the true model is fixed
    w_true = rng.normal(0.0, 1.0, size=(FIELDS, VOCAB))
    wd_true = rng.normal(0.0, 1.0, size=DENSE)
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.3, size=(n, FIELDS)) - 1, VOCAB - 1)
    dense = rng.normal(0.0, 1.0, size=(n, DENSE)).astype(np.float32)
    logit = w_true[np.arange(FIELDS)[None, :], ranks].sum(1) + dense @ wd_true - 0.5
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    keys = (np.arange(FIELDS)[None, :].astype(np.int64) << 40) + ranks.astype(np.int64) * 2654435761 + 17
    return keys.astype(np.int64), dense, y


def table_config(dim: int = 4) -> pse.TableConfig:
    return pse.TableConfig(
        dim=dim,
        accessor=pse.CtrAccessorConfig(embedx_threshold=1e9),
        lr_optimizer=pse.AdaGrad(learning_rate=0.1, initial_range=0.0),
        mf_optimizer=pse.AdaGrad(learning_rate=0.05, initial_range=1e-3),
        num_shards=4,
        num_threads=1,
    )


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties averaged."""
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p), np.float64)
    ranks[order] = np.arange(1, len(p) + 1)
    _, inv, counts = np.unique(p, return_inverse=True, return_counts=True)
    sums = np.bincount(inv.reshape(-1), weights=ranks)
    ranks = (sums / counts)[inv.reshape(-1)]
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(args) -> dict:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, ntr = 0, 1
    if distributed:  # the single-process baseline runs inside pytest, without pse.init()
        pse.init(max_staleness=args.staleness, num_servers=args.num_servers, rpc_timeout=args.rpc_timeout,
                 transport=args.transport)
        # dedicated servers never get here (init serves, then ends the process)
        rank = pse.distributed.trainer_rank()
        ntr = pse.distributed.num_trainers()
    table = pse.SparseTable(table_config(), name="feasign")
    torch.manual_seed(0)
    dense = torch.nn.Linear(DENSE, 1)
    model = dense
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(dense, process_group=pse.distributed.trainer_group())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    keys, x, y = make_data(args.samples, seed=1)
    batch = args.batch
    steps = 0
    for epoch in range(args.epochs):
        for start in range(0, len(y), batch):
            sl = slice(start, start + batch)
            # this trainer's part of the global batch
            kb, xb, yb = keys[sl][rank::ntr], x[sl][rank::ntr], y[sl][rank::ntr]
            flat = np.ascontiguousarray(kb.reshape(-1))
            rows = table.pull(flat)
            w = rows[:, 0].reshape(kb.shape)
            logit = w.sum(1) + model(torch.from_numpy(xb)).squeeze(1)
            yt = torch.from_numpy(yb)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                g = (torch.sigmoid(logit) - yt).numpy()
            grads = np.zeros((flat.shape[0], 1 + table.dim), np.float32)
            grads[:, 0] = np.repeat(g, FIELDS)
            table.push(flat, grads, np.ones(flat.shape[0], np.float32), np.repeat(yb, FIELDS).astype(np.float32))
            steps += 1
            if args.kill_rank >= 0 and steps == 5 and int(os.environ["RANK"]) == args.kill_rank:
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if args.step_sleep:
                time.sleep(args.step_sleep)
    table.flush()
    kt, xt, yt = make_data(4000, seed=2)
    w = table.pull(np.ascontiguousarray(kt.reshape(-1)))[:, 0].reshape(kt.shape)
    with torch.no_grad():
        p = (w.sum(1) + dense(torch.from_numpy(xt)).squeeze(1)).numpy()
    stats = table.stats()
    out = {
        "rank": int(os.environ.get("RANK", "0")),
        "trainer_rank": rank,
        "auc": auc(yt, p),
        "steps": steps,
        "keys": stats["keys"],
        "len": len(table),
        "dense": dense.weight.detach().numpy().ravel().tolist(),
        "pred_head": p[:8].tolist(),
    }
    if distributed:
        pse.shutdown()
    return out


def routing(args) -> dict:
    checks = {}
    # A table before init in a torchrun job is an error naming init.
    try:
        pse.SparseTable(table_config(), name="early")
        checks["before_init"] = "no error"
    except NotInitializedError as e:
        checks["before_init"] = str(e)
    pse.init(max_staleness=0, num_servers=args.num_servers, rpc_timeout=args.rpc_timeout, transport=args.transport)
    try:
        pse.init(max_staleness=0)
        checks["init_twice"] = "no error"
    except RuntimeError as e:
        checks["init_twice"] = str(e)
    cfg = table_config(dim=3)
    table = pse.SparseTable(cfg, name="feasign")
    local = _C.Table(cfg.to_dict())
    backend = table._backend
    try:
        pse.SparseTable(table_config(dim=5), name="feasign")
        checks["other_config"] = "no error"
    except ValueError as e:
        checks["other_config"] = str(e)
    pse.SparseTable(cfg, name="feasign")  # same config: fine

    rng = np.random.default_rng(7)
    universe = rng.integers(-(2**63), 2**63 - 1, size=400, dtype=np.int64)
    mismatches = []

    def compare(what, a, b):
        if a.shape != b.shape or not np.array_equal(a, b):
            mismatches.append(what)

    for step in range(12):
        keys = universe[rng.integers(0, 400, size=300)]  # with duplicates
        compare(f"pull {step}", table.pull(keys, with_stats=True).numpy(), local.pull(keys, True))
        grads = rng.normal(0, 1, size=(300, 4)).astype(np.float32)
        shows = rng.integers(1, 3, size=300).astype(np.float32)
        clicks = (rng.random(300) < 0.3).astype(np.float32)
        slots = rng.integers(0, 5, size=300).astype(np.int32)
        table.push(keys, grads, shows, clicks, slots)
        local.push(keys, grads, shows, clicks, slots)
        if step % 4 == 3:
            a, b = table.shrink(), local.shrink()
            if a != b:
                mismatches.append(f"shrink {step}: {a} != {b}")
        if step == 5:
            table.new_day()
            local.new_day()
        if step == 8:
            a, b = table.end_day(3), local.end_day(3)
            if a != b:
                mismatches.append(f"end_day: {a} != {b}")
    compare("final pull", table.pull(universe, with_stats=True).numpy(), local.pull(universe, True))
    checks["mismatches"] = mismatches
    checks["len"] = [len(table), len(local)]
    st, lst = table.stats(), local.stats()
    checks["stats"] = {k: [st[k], lst[k]] for k in ("keys", "inserts", "deleted", "pull_misses")}
    checks["day"] = [table.day, local.day]
    present = [int(k) for k in universe if int(k) in local]
    checks["contains"] = all(k in table for k in present[:20]) and not (12345 in table)
    # Each server holds exactly the keys routed to it.
    owners = _C.route(universe, args.num_servers)
    per_server = backend.collective(_held_keys, universe)
    checks["routing"] = all(
        sorted(per_server[s]) == sorted(int(k) for k, o in zip(universe, owners) if o == s and int(k) in local)
        for s in range(args.num_servers)
    )
    checks["hook"] = [backend.is_sharded, backend.num_servers, backend.trainer_rank, backend.num_trainers]
    try:
        backend.collective(_raise_on_server)
        checks["collective_error"] = "no error"
    except ValueError as e:
        checks["collective_error"] = str(e)
    # A malformed request gets an error back and the server keeps serving.
    from torch.distributed import rpc

    from torch_psembed.distributed import server
    from torch_psembed.distributed.rpc_transport import worker_name

    errs = []
    for bad in [
        (server.pull, ("feasign", torch.zeros(3, dtype=torch.float32), False)),
        (server.pull, ("nosuchtable", torch.zeros(3, dtype=torch.int64), False)),
        (server.push, ("feasign", torch.zeros(2, dtype=torch.int64), torch.zeros(2, 9), torch.ones(2), torch.ones(2))),
        (server.create_table, ("x", "not a dict")),
    ]:
        try:
            rpc.rpc_sync(worker_name(0), bad[0], args=bad[1], timeout=20)
            errs.append("no error")
        except Exception as e:  # noqa: BLE001
            errs.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    checks["malformed"] = errs
    transport = backend._transport
    if args.transport == "tcp":
        # The C++ data server: a request it refuses raises the server's error on the trainer, and a frame it
        # cannot read gets an error reply and that connection closed; it keeps serving everyone else.
        try:
            transport.pull(0, "nosuchtable", universe[:3], False).wait()
            checks["tcp_unknown_table"] = "no error"
        except ValueError as e:
            checks["tcp_unknown_table"] = str(e)
        import socket
        import struct

        host, port = transport.endpoints[0]
        with socket.create_connection((host, port), timeout=20) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 40)
            data = b""
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        magic, code = struct.unpack_from("<IB", data)
        checks["tcp_garbage"] = [hex(magic), code, data[40:].decode(errors="replace")]
    compare("pull after malformed", table.pull(universe).numpy(), local.pull(universe, False))
    checks["mismatches_after"] = mismatches
    pse.shutdown()
    try:
        table.pull(universe[:3])
        checks["after_shutdown"] = "no error"
    except NotInitializedError as e:
        checks["after_shutdown"] = str(e)
    return checks


def _held_keys(table, server_index, num_servers, candidates):
    return [int(k) for k in candidates if int(k) in table]


def _raise_on_server(table, server_index, num_servers):
    raise ValueError(f"boom on server {server_index}")


def mismatch(args) -> dict:
    """Two trainers calling different table-wide operations at once: both refuse, nothing runs (session 24)."""
    pse.init(max_staleness=0, rpc_timeout=args.rpc_timeout, transport=args.transport)
    rank = int(os.environ["RANK"])
    a = pse.SparseTable(table_config(dim=3), name="a")
    b = pse.SparseTable(table_config(dim=3), name="b")
    keys = np.arange(100 * rank, 100 * rank + 50, dtype=np.int64)
    shows = np.full(keys.size, 100.0, np.float32)  # a score well above the delete threshold: end_day keeps them
    for t in (a, b):
        t.push(keys, np.zeros((keys.size, 4), np.float32), shows, np.zeros(keys.size, np.float32))
    out = {}

    def attempt(name, fn):
        try:
            out[name] = ["ok", fn()]
        except RuntimeError as e:
            out[name] = ["error", str(e)]

    attempt("end_day_vs_shrink", (lambda: a.end_day(5)) if rank == 0 else (lambda: a.shrink()))
    attempt("other_table", (lambda: a.end_day(7)) if rank == 0 else (lambda: b.end_day(7)))
    attempt("other_day", lambda: a.end_day(8 + rank))
    attempt("same", lambda: a.end_day(5))  # the trainers agree again: it runs
    # a push with a slot no checkpoint can hold, for keys on both servers: refused before anything is sent
    try:
        a.push(np.arange(1000, 1020, dtype=np.int64), np.zeros((20, 4), np.float32), np.ones(20, np.float32),
               np.zeros(20, np.float32), np.full(20, 2**25, np.int32))
        out["bad_slot"] = "no error"
    except ValueError as e:
        out["bad_slot"] = str(e)
    a.flush()
    out["days"] = [a.day, b.day]
    out["len"] = len(a)
    out["contains_bad_slot_keys"] = any(int(k) in a for k in range(1000, 1020))
    pse.shutdown()
    return out


def _wait_for_files(paths, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _write(args, out: dict) -> None:
    with open(f"{args.out}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(out, f)


def late_trainer(args) -> dict:
    """Colocated ranks; rank ``--late`` never comes to the shrink the others call: it waits for their outputs
    (their shrinks must end without it), and only if they are still waiting after 6 rpc_timeouts (the bug)
    does it call the shrink, to let theirs end. The others report how their shrink ended, and when. With a late
    rank other than 0, rank 0 (the barriers' coordinator) comes 0.5 s after the others, so their wait ends before
    rank 0 learns who is missing: they must ask it. Every rank waits for every other's output before it ends
    (so that rank 0 still answers when asked)."""
    import torch.distributed as dist

    pse.init(max_staleness=0, rpc_timeout=args.rpc_timeout, transport=args.transport)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    table = pse.SparseTable(table_config(dim=3), name="feasign")
    dist.barrier()
    others = [f"{args.out}.{r}" for r in range(world) if r not in (rank, args.late)]
    if rank == args.late:
        if _wait_for_files(others, 6 * args.rpc_timeout):
            return {"late": True}
        table.shrink()  # the others waited for this rank all along (the bug): let their shrink end
        return {"late": True}
    if rank == 0:
        time.sleep(0.5)
    start = time.monotonic()
    try:
        table.shrink()
        out = {"error": None, "rank": None}
    except pse.PeerUnavailableError as e:
        out = {"error": str(e), "rank": e.rank}
    out["seconds"] = time.monotonic() - start
    _write(args, out)
    _wait_for_files([f"{args.out}.{r}" for r in range(world) if r != rank], 6 * args.rpc_timeout)
    return out


def _die_in_collective(table, server_index, num_servers):
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def server_dies_in_collective(args) -> dict:
    """One dedicated server, killed in the middle of a collective's fn; each trainer reports its error and
    when it came. Trainer 0 (which sees the failure first) then stays up until trainer 1 has reported."""
    pse.init(max_staleness=0, num_servers=1, rpc_timeout=args.rpc_timeout, transport=args.transport)
    table = pse.SparseTable(table_config(dim=3), name="feasign")
    start = time.monotonic()
    try:
        table._backend.collective(_die_in_collective)
        out = {"error": None, "rank": None}
    except pse.PeerUnavailableError as e:
        out = {"error": str(e), "rank": e.rank}
    out["seconds"] = time.monotonic() - start
    _write(args, out)
    if pse.distributed.trainer_rank() == 0:
        _wait_for_files([f"{args.out}.2"], 4 * args.rpc_timeout)
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["routing", "train", "fault", "mismatch", "init_args", "other_config",
                                         "after_shutdown", "late_trainer", "server_dies_in_collective"])
    ap.add_argument("out")
    ap.add_argument("--num-servers", type=int, default=0)
    ap.add_argument("--staleness", type=int, default=0)
    ap.add_argument("--rpc-timeout", type=float, default=30.0)
    ap.add_argument("--transport", choices=["tcp", "rpc"], default="tcp")
    ap.add_argument("--samples", type=int, default=12000)
    ap.add_argument("--batch", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--late", type=int, default=0, help="the rank that comes late to a collective (late_trainer)")
    return ap.parse_args(argv)


def init_args(args) -> dict:
    """pse.init with arguments that differ by rank (rank 1: a dedicated server layout over RPC)."""
    rank = int(os.environ["RANK"])
    try:
        pse.init(max_staleness=0, num_servers=rank, rpc_timeout=args.rpc_timeout,
                 transport="rpc" if rank else "tcp")
    except RuntimeError as e:
        return {"error": str(e), "initialized": pse.is_initialized()}
    return {"error": None}


def other_config(args) -> dict:
    """Rank 1 creates rank 0's table with another config and stops on the uncaught ValueError; rank 0 trains
    on until its next request to rank 1 fails, and reports the error it got (rank 1 writes nothing)."""
    import torch.distributed as dist

    pse.init(max_staleness=0, rpc_timeout=args.rpc_timeout, transport=args.transport)
    rank = int(os.environ["RANK"])
    if rank == 0:
        table = pse.SparseTable(table_config(dim=3), name="feasign")
    dist.barrier()  # rank 0 created it first
    if rank == 1:
        pse.SparseTable(table_config(dim=5), name="feasign")  # raises ValueError, uncaught: the process stops
    keys = np.arange(64, dtype=np.int64)
    deadline = time.monotonic() + 4 * args.rpc_timeout
    while time.monotonic() < deadline:
        try:
            table.pull(keys)
            table.push(keys, np.zeros((keys.size, 4), np.float32), np.ones(keys.size, np.float32),
                       np.zeros(keys.size, np.float32))
        except pse.PeerUnavailableError as e:
            return {"error": str(e), "rank": e.rank}
        time.sleep(0.05)
    return {"error": None}


def after_shutdown(args) -> dict:
    """Rank 1 shuts down while rank 0 waits in end_day's barrier; rank 0 then tries again, trains on and shuts
    down cleanly (rank 1 writes nothing)."""
    pse.init(max_staleness=0, rpc_timeout=args.rpc_timeout, transport=args.transport)
    rank = int(os.environ["RANK"])
    table = pse.SparseTable(table_config(dim=3), name="feasign")
    if rank == 1:
        time.sleep(1.0)  # rank 0 is in the barrier by now
        pse.shutdown()
        raise SystemExit(0)
    out = {}
    for name in ("waiting", "after"):
        start = time.monotonic()
        try:
            table.end_day(3)
            out[name] = ["no error", 0.0]
        except RuntimeError as e:
            out[name] = [str(e), time.monotonic() - start]
    keys = np.arange(64, dtype=np.int64)  # rank 1 still serves its part until every trainer shut down
    table.push(keys, np.zeros((keys.size, 4), np.float32), np.ones(keys.size, np.float32),
               np.zeros(keys.size, np.float32))
    out["shows"] = float(table.pull(keys, with_stats=True)[:, 0].sum())
    out["day"] = table.day
    pse.shutdown()
    return out


def main() -> None:
    # Here, not at import: tests/test_distributed.py imports this module, and a process-wide thread count
    # set at import would change torch's behaviour for every later test in the pytest process.
    torch.set_num_threads(1)
    if os.environ.get("PSEMBED_TEST_DUMP_AFTER"):  # debugging aid: stacks of a hung job
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["PSEMBED_TEST_DUMP_AFTER"]), exit=True)
    args = parse_args()
    if args.scenario == "routing":
        out = routing(args)
    elif args.scenario == "mismatch":
        out = mismatch(args)
    elif args.scenario == "init_args":
        out = init_args(args)
    elif args.scenario == "other_config":
        out = other_config(args)
    elif args.scenario == "after_shutdown":
        out = after_shutdown(args)
    elif args.scenario == "late_trainer":
        out = late_trainer(args)
    elif args.scenario == "server_dies_in_collective":
        out = server_dies_in_collective(args)
    else:
        out = train(args)
    _write(args, out)


if __name__ == "__main__":
    main()
