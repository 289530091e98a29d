"""The fixed cost of one request on this machine: a trainer's round trips to an idle dedicated server.

Two processes on 127.0.0.1, ``pse.init(num_servers=1, transport=...)``: the trainer times, one request at a
time, ``server.ping`` (a control call, always over RPC: TensorPipe over ``uv``, the 0.5 ms GIL switch
interval) and the pull of n distinct keys from the server's table (the data path of ``SparseTable.pull``,
without the client's dedup and assembly), for n in --sizes, over the TCP data plane (``--transport tcp``, the
default) or RPC (``--transport rpc``). The server does nothing else, so the time over the table's own pull is
the transport's: for RPC serialization, TensorPipe's threads, the server's RPC worker and its GIL; for TCP
the socket calls and the threads' wake-ups. Compare it with the RPC wait of ``scripts/bench_distributed.py``.

    python scripts/bench_rpc_roundtrip.py [--sizes 0,1,1000,14500,29000] [--repeat 60] [--transport tcp|rpc]

Prints, per size, the median and minimum round trip (the first 10 of each size are warm-up).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from torch_psembed.distributed.ports import free_port_pair  # noqa: E402

_WARMUP = 10


def child(args) -> None:
    import numpy as np
    import torch

    import torch_psembed as pse
    from torch_psembed.distributed import server

    torch.set_num_threads(1)
    pse.init(max_staleness=0, num_servers=1, rpc_timeout=60.0, transport=args.transport)  # the server serves in init
    cfg = pse.TableConfig(dim=8, num_threads=1, accessor=pse.CtrAccessorConfig(embedx_threshold=0.0))
    table = pse.SparseTable(cfg, name="rtt")
    backend = table._backend
    transport = backend._transport
    sizes = [int(s) for s in args.sizes.split(",")]
    keys = np.arange(1, max(sizes) + 1, dtype=np.int64)
    n_all = keys.shape[0]
    table.push(keys, np.zeros((n_all, 9), np.float32), np.ones(n_all, np.float32), np.zeros(n_all, np.float32))
    table.flush()
    print(f"{'request':<22} {'median ms':>9} {'min ms':>7}")
    for n in sizes:
        part = keys[:n]
        if n == 0:
            call, what = (lambda: transport.call(0, "rtt", server.op_len).wait()), "ping (op_len)"
        else:
            call, what = (lambda p=part: transport.pull(0, "rtt", p, False).wait()), f"pull of {n} keys"
        times = []
        for _ in range(_WARMUP + args.repeat):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        times = sorted(times[_WARMUP:])
        print(f"{what:<22} {1e3 * times[len(times) // 2]:>9.2f} {1e3 * times[0]:>7.2f}", flush=True)
    pse.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0,1,1000,14500,29000")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "rpc"))
    ap.add_argument("--repeat", type=int, default=60)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    port = free_port_pair()
    procs = []
    for r in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--sizes", args.sizes, "--repeat", str(args.repeat),
               "--transport", args.transport]
        procs.append(subprocess.Popen(cmd, env=env))
    rcs = [p.wait(timeout=600) for p in procs]
    if any(rcs):
        raise SystemExit(f"a benchmark process failed: exit codes {rcs}")


if __name__ == "__main__":
    main()
