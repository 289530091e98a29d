"""Fuzz target: the RPC server endpoints (``torch_psembed.distributed.server``) called with malformed requests.

Over RPC any picklable object can arrive as an argument, so the endpoints are called here directly (in
process, as the transport would after unpickling) with fuzzed table names, configs, tensors/arrays of any
dtype/rank/layout and plain Python objects.

Property: every call returns or raises ValueError/TypeError (sent back to the caller; the server keeps
serving); a refused request leaves the served table unchanged; the registry keeps the table and its config;
an accepted pull returns ``float32[n, 1 + dim]`` (or ``3 + dim`` with stats).
"""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

warnings.simplefilter("ignore")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import fuzz_push_pull as PP  # noqa: E402

server = None
torch = None
pse = None
CFG = None


def setup() -> None:
    global server, torch, pse, CFG
    PP.setup()
    import torch as _torch

    import torch_psembed as _pse
    from torch_psembed.distributed import server as _server

    server, torch, pse = _server, _torch, _pse
    server.configure(0, 1)
    acc = pse.CtrAccessorConfig(embedx_threshold=1.0, show_click_decay_rate=1.0, delete_threshold=0.0)
    CFG = pse.TableConfig(dim=2, accessor=acc, num_shards=2, num_threads=1).to_dict()


def _fresh() -> None:
    server.configure(0, 1)
    server.create_table("emb", CFG)
    t = server.local_table("emb")
    t.push(np.array([1, 2, 3], np.int64), np.full((3, 3), 0.5, np.float32), np.array([4, 1, 20], np.float32),
           np.array([1, 0, 2], np.float32), None)


def _obj(p):
    return p.pick([None, 0, -1, 2.5, "emb", "", "nosuch", b"emb", [1, 2], {"dim": 2}, (), float("nan"), True,
                   object(), 2**70])


def one_input(data: bytes) -> None:
    p = PP.Provider(data)
    _fresh()
    for _ in range(p.int_in(1, 6)):
        if p.left() <= 0:
            break
        t = server.local_table("emb")
        before = C.table_state(t)
        op = p.int_in(0, 5)
        name = "emb" if p.int_in(0, 5) else _obj(p)
        n = p.int_in(0, 5)
        try:
            if op == 0:  # create_table with a fuzzed config
                cfg = dict(CFG)
                if p.int_in(0, 1):
                    cfg[p.pick(["dim", "seed", "num_shards", "accessor", "nan_policy", "extra"])] = _obj(p)
                server.create_table(name if p.int_in(0, 1) else p.pick(["emb", "other", ""]),
                                    cfg if p.int_in(0, 3) else _obj(p))
            elif op <= 2:
                keys = PP.array_arg(p, "int64", 1, n, 0) if p.int_in(0, 7) else _obj(p)
                ws = p.int_in(0, 1) == 1
                out = server.pull(name, keys, ws)
                C.check(isinstance(out, torch.Tensor) and out.dtype == torch.float32
                        and tuple(out.shape) == (np.asarray(keys).shape[0], (3 if ws else 1) + 2),
                        f"pull returned {type(out).__name__} {getattr(out, 'dtype', None)} "
                        f"{tuple(getattr(out, 'shape', ()))}")
            else:
                args = [PP.array_arg(p, "int64", 1, n, 0), PP.array_arg(p, "float32", 2, n, 3),
                        PP.array_arg(p, "float32", 1, n, 0), PP.array_arg(p, "float32", 1, n, 0)]
                if p.int_in(0, 7) == 0:
                    args[p.int_in(0, 3)] = _obj(p)
                slots = None if p.int_in(0, 2) else PP.array_arg(p, "int32", 1, n, 0)
                server.push(name, *args, slots)
        except BaseException as e:
            if not C.allowed_error(e):
                raise
            after = C.table_state(server.local_table("emb"))
            if not C.same_state(before, after):
                raise C.PropertyViolation(f"refused request {op} changed the table: {C.state_diff(before, after)}")
        C.check(server.local_table("emb") is t, "the served table was replaced")


def make_seeds():
    import random

    rng = random.Random(5)
    return [bytes(rng.randrange(256) for _ in range(48 + 24 * i)) for i in range(16)] + [b"\x03" + b"\xff" * 300]


if __name__ == "__main__":
    C.main("server", setup, one_input, make_seeds)
