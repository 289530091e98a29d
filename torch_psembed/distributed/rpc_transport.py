"""The :class:`~.transport.Transport` over ``torch.distributed.rpc`` (TensorPipe), plus gloo for barriers.

Arrays cross as CPU tensors (TensorPipe ships tensor storage without pickling it). The server in this process
(colocated layout) is called directly, without RPC. Each RPC carries ``rpc_timeout``; a failure to reach the
peer becomes :class:`~torch_psembed.errors.PeerUnavailableError` naming its rank, while an exception raised by
the server code is re-raised with its own type.
"""

from __future__ import annotations

import ast
import datetime
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import rpc

from ..errors import PeerUnavailableError
from . import server
from .transport import DoneHandle, Handle, Transport, raised_by

__all__ = ["RpcTransport", "worker_name"]


def worker_name(rank: int) -> str:
    return f"psembed{rank}"


# TensorPipe/RPC phrases of a transport failure (as opposed to an exception raised by the remote function,
# which RPC re-raises with its own type and an "On WorkerInfo(...)" prefix).
_TRANSPORT_FAILURE = re.compile(
    r"timeout|timed out|ran for more than|connection|pipe|EOF|eof|reset by peer|refused|closed|unreachable|"
    r"shut ?down|Broken|ECONN|unknown destination|unavailable",
    re.IGNORECASE,
)


def is_transport_failure(exc: BaseException) -> bool:
    """True when ``exc`` means the peer could not be reached (not an error raised by the server code)."""
    if isinstance(exc, PeerUnavailableError):
        return True
    if type(exc) is not RuntimeError:
        return False
    msg = str(exc)
    if "On WorkerInfo(" in msg:  # the remote function raised
        return False
    return bool(_TRANSPORT_FAILURE.search(msg))


_REMOTE_HEAD = re.compile(r"On WorkerInfo\(id=(\d+)[^)]*\):\n\w+(?:\.\w+)*\((.*?)\)\nTraceback", re.S)


def _concise_remote_error(e: BaseException, rank: int) -> BaseException:
    """The server's exception, same type, without RPC's remote-traceback wrapping: "<message> (rank r)"."""
    m = _REMOTE_HEAD.search(str(e))
    if m is None:
        return e
    try:
        inner = ast.literal_eval(m.group(2))
    except (ValueError, SyntaxError):
        return e
    if not isinstance(inner, str):
        return e
    return raised_by(e, inner, rank)


class _RpcHandle(Handle):
    __slots__ = ("_fut", "_rank", "_what", "_on_failure", "_convert")

    def __init__(self, fut, rank: int, what: str, on_failure: Callable, convert: Optional[Callable] = None):
        self._fut = fut
        self._rank = rank
        self._what = what
        self._on_failure = on_failure
        self._convert = convert

    def wait(self) -> Any:
        try:
            value = self._fut.wait()
        except Exception as e:  # noqa: BLE001 - re-raised with the peer named
            if is_transport_failure(e):
                raise self._on_failure(self._rank, self._what, e) from e
            raise _concise_remote_error(e, self._rank) from None
        return self._convert(value) if self._convert is not None else value

    def done(self) -> bool:
        return self._fut.done()


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.numpy()


def _run_local(fn: Callable, *args) -> DoneHandle:
    try:
        return DoneHandle(fn(*args))
    except Exception as e:  # noqa: BLE001 - delivered through wait(), like a remote error
        return DoneHandle(error=e)


class RpcTransport(Transport):
    """Transport over an initialised RPC agent.

    Args:
        server_ranks (list of int): global rank of each server, in server order.
        trainer_ranks (list of int): global rank of each trainer, in trainer order.
        rank (int): this process's global rank.
        rpc_timeout (float): seconds per data-path call.
        collective_timeout (float): seconds per ``call`` (the servers' part of table-wide operations).
        trainer_group: the gloo process group of the trainers for the broadcast that ends a table-wide
            operation (it waits for the servers' part: its timeout is ``collective_timeout``).
        on_failure: ``on_failure(rank, what, exc) -> Exception`` builds the error for an unreachable peer.
        barrier_group: a gloo group of the same trainers whose timeout is ``rpc_timeout``, for the barriers and
            the gather of table-wide operations (default: ``trainer_group``). Only the first trainer of a
            ``monitored_barrier`` applies its timeout; the others wait for it as long as the group's timeout.
    """

    def __init__(
        self,
        server_ranks: List[int],
        trainer_ranks: List[int],
        rank: int,
        rpc_timeout: float,
        trainer_group,
        on_failure: Callable,
        collective_timeout: Optional[float] = None,
        barrier_group=None,
    ) -> None:
        self.server_ranks = list(server_ranks)
        self.trainer_ranks = list(trainer_ranks)
        self.rank = rank
        self.num_servers = len(self.server_ranks)
        self.local_server = self.server_ranks.index(rank) if rank in self.server_ranks else None
        self.rpc_timeout = float(rpc_timeout)
        self.collective_timeout = float(collective_timeout or rpc_timeout)
        self.trainer_group = trainer_group
        self.barrier_group = trainer_group if barrier_group is None else barrier_group
        self._on_failure = on_failure
        self._names = [worker_name(r) for r in self.server_ranks]

    def server_rank(self, server: int) -> int:
        return self.server_ranks[server]

    def _async(self, server: int, what: str, fn: Callable, args: tuple, convert=None, timeout=None) -> Handle:
        rank = self.server_ranks[server]
        try:
            fut = rpc.rpc_async(self._names[server], fn, args=args, timeout=timeout or self.rpc_timeout)
        except Exception as e:  # noqa: BLE001
            if is_transport_failure(e):
                raise self._on_failure(rank, what, e) from e
            raise
        return _RpcHandle(fut, rank, what, self._on_failure, convert)

    # -- data path ----------------------------------------------------------------------------------------
    def pull(self, server: int, table: str, keys: np.ndarray, with_stats: bool) -> Handle:
        if server == self.local_server:
            return _run_local(lambda: server_pull_numpy(table, keys, with_stats))
        return self._async(
            server, f"pull of table {table!r}", server_mod.pull, (table, torch.from_numpy(keys), with_stats),
            _tensor_to_numpy,
        )

    def push(self, server, table, keys, grads, shows, clicks, slots, push_id) -> Handle:
        if server == self.local_server:
            return _run_local(server_mod.push, table, keys, grads, shows, clicks, slots, push_id)
        args = (
            table,
            torch.from_numpy(keys),
            torch.from_numpy(grads),
            torch.from_numpy(shows),
            torch.from_numpy(clicks),
            None if slots is None else torch.from_numpy(slots),
            push_id,
        )
        return self._async(server, f"push to table {table!r}", server_mod.push, args)

    # -- control ------------------------------------------------------------------------------------------
    def call(self, server: int, table: str, fn: Callable, args: Sequence[Any] = ()) -> Handle:
        if server == self.local_server:
            return _run_local(server_mod.call, table, fn, tuple(args))
        return self._async(server, f"call {getattr(fn, '__name__', fn)!s} on table {table!r}", server_mod.call,
                           (table, fn, tuple(args)), timeout=self.collective_timeout)

    def create_table(self, server: int, table: str, config: dict) -> Handle:
        if server == self.local_server:
            return _run_local(server_mod.create_table, table, config)
        return self._async(server, f"create table {table!r}", server_mod.create_table, (table, config))

    def trainer_barrier(self) -> None:
        def on_failure(rank: int, what: str, e: BaseException) -> BaseException:
            # A trainer that already shut down (its notice may come while this one waits) never arrives: say
            # so, rather than calling it unavailable. Not a peer failure: the job can still shut down cleanly.
            return self._finished_trainers_error() or self._on_failure(rank, what, e)

        err = self._finished_trainers_error()
        if err is not None:
            raise err
        barrier(self.barrier_group, self.rpc_timeout, on_failure, "trainer barrier", name="trainers")

    def _finished_trainers_error(self) -> Optional[RuntimeError]:
        done = sorted(set(server.done_ranks()) & set(self.trainer_ranks) - {self.rank})
        if not done:
            return None
        which = ", ".join(map(str, done))
        return RuntimeError(f"trainer rank{'s' if len(done) > 1 else ''} {which} already called pse.shutdown(): a "
                            "table-wide operation (shrink, new_day, end_day, save, load) needs every trainer; call "
                            "it on every trainer before shutdown")

    def broadcast_from_first_trainer(self, obj: Any) -> Any:
        box = [obj]
        try:
            dist.broadcast_object_list(box, src=self.trainer_ranks[0], group=self.trainer_group)
        except Exception as e:  # noqa: BLE001
            raise self._on_failure(self.trainer_ranks[0], "broadcast from the first trainer", e) from e
        return box[0]

    def gather_trainers(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * len(self.trainer_ranks)
        try:
            dist.all_gather_object(out, obj, group=self.barrier_group)  # right after a barrier: rpc_timeout
        except Exception as e:  # noqa: BLE001
            raise self._on_failure(self.trainer_ranks[0], "gather over the trainers", e) from e
        return out


server_mod = server


def server_pull_numpy(table: str, keys: np.ndarray, with_stats: bool) -> np.ndarray:
    return server.local_table(table).pull(keys, bool(with_stats))


# monitored_barrier's errors (ProcessGroupGloo::monitoredBarrier, torch 2.13). Only group rank 0, the
# coordinator, applies the timeout and learns who is missing: "[Rank 0]: Rank 2 failed to pass monitoredBarrier
# in 3000 ms" (or "... Rank 2 timed out in monitoredBarrier after ...", when no time was left to wait for it).
# Every other member sends to it and waits for its answer, bounded by the group's timeout: "Rank 1 successfully
# reached monitoredBarrier, but received errors while waiting for send/recv from rank 0. ...".
_FAILED_RANK = re.compile(r"[Rr]anks? ([0-9][0-9, ]*) (?:failed|timed out)")
_NO_ANSWER_FROM_COORDINATOR = re.compile(r"successfully reached monitoredBarrier.*from rank 0", re.S)

# Per barrier name ("trainers", "all"): how many barriers this process entered, and (for the coordinator) the
# latest one's outcome: (generation, None while it waits, [] once passed, or the global ranks that failed).
_barrier_counts: Dict[str, int] = {}
_barrier_outcomes: Dict[str, Tuple[int, Optional[List[int]]]] = {}


def reset_barriers() -> None:
    """Forget the barriers counted so far (``shutdown``: the next ``init``'s members count from 0 again)."""
    _barrier_counts.clear()
    _barrier_outcomes.clear()


def barrier_outcome(name: str) -> Tuple[int, Optional[List[int]]]:
    """(Run over RPC on a barrier's coordinator.) Its latest barrier ``name``: see ``_barrier_outcomes``."""
    return _barrier_outcomes.get(name, (0, []))


def _global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    try:
        return dist.get_global_rank(group, group_rank)
    except Exception:  # noqa: BLE001
        return group_rank


def barrier(group, timeout_s: float, on_failure: Callable, what: str, name: Optional[str] = None) -> None:
    """A gloo barrier over ``group`` that times out after ``timeout_s`` and names the rank that failed.

    ``group``'s own timeout must be ``timeout_s``: only its coordinator (group rank 0) applies ``timeout_s``;
    the other members wait for the coordinator's answer as long as the group's timeout. Every member must call
    the barriers of one ``name`` in the same order (they are counted, so that a member can ask the coordinator
    about the one it failed in).
    """
    name = name or what
    generation = _barrier_counts.get(name, 0) + 1
    _barrier_counts[name] = generation
    coordinator = _global_rank(group, 0)
    is_coordinator = dist.get_rank(group) == 0
    if is_coordinator:
        _barrier_outcomes[name] = (generation, None)
    try:
        dist.monitored_barrier(group=group, timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=False)
    except Exception as e:  # noqa: BLE001
        if not is_coordinator:
            if _NO_ANSWER_FROM_COORDINATOR.search(str(e)):
                rank, why = _ask_coordinator(name, generation, coordinator, timeout_s)
                raise on_failure(rank, what, RuntimeError(why)) from e
            raise on_failure(_first_unreachable(group, timeout_s), what, e) from e
        m = _FAILED_RANK.search(str(e))
        if m:
            failed = [_global_rank(group, int(r)) for r in m.group(1).split(",") if r.strip()]
        else:  # e.g. a member's connection closed before the wait began (gloo's own error, no rank in it)
            failed = [_first_unreachable(group, timeout_s)]
        _barrier_outcomes[name] = (generation, failed)  # the others may ask (_ask_coordinator)
        raise on_failure(failed[0], what, e) from e
    if is_coordinator:
        _barrier_outcomes[name] = (generation, [])


def unreachable(ranks: Sequence[int], timeout_s: float) -> List[Tuple[int, BaseException]]:
    """``(rank, error)`` of each of ``ranks`` that does not answer an RPC ping within ``timeout_s``, in order."""
    from torch.distributed import rpc

    futs, gone = [], {}
    for r in ranks:
        try:
            futs.append((r, rpc.rpc_async(worker_name(r), server.ping, timeout=timeout_s)))
        except Exception as e:  # noqa: BLE001
            gone[r] = e
    for r, fut in futs:
        try:
            fut.wait()
        except Exception as e:  # noqa: BLE001
            gone[r] = e
    return [(r, gone[r]) for r in ranks if r in gone]


def _first_unreachable(group, timeout_s: float) -> int:
    """The first other member of ``group`` that does not answer an RPC ping within ``timeout_s``, or -1."""
    try:
        members = list(range(dist.get_world_size())) if group is None or group is dist.group.WORLD \
            else dist.get_process_group_ranks(group)
        me = dist.get_rank()
    except Exception:  # noqa: BLE001
        return -1
    gone = unreachable([r for r in members if r != me], timeout_s)
    return gone[0][0] if gone else -1


def _ask_coordinator(name: str, generation: int, coordinator: int, timeout_s: float) -> Tuple[int, str]:
    """``(rank, why)`` of a barrier that failed on a member other than its coordinator, which gave no answer.

    The member only knows that the coordinator did not answer within the group's timeout: the coordinator may
    be late, hung or gone, or still waiting for another member. Ask it (RPC, ``timeout_s`` at most in all):
    unreachable, or not yet in this barrier, it is the rank to name; else the rank it found missing (waiting
    for its verdict, which comes within ``timeout_s`` of its own arrival).
    """
    from torch.distributed import rpc

    me = dist.get_rank()
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return -1, (f"the barrier's coordinator (rank {coordinator}) did not answer within {timeout_s:g}s, and "
                        f"after {timeout_s:g}s more it was still waiting for another rank")
        try:
            seen, outcome = rpc.rpc_sync(worker_name(coordinator), barrier_outcome, args=(name,),
                                         timeout=max(left, 0.1))
        except Exception as e:  # noqa: BLE001 - unreachable: it is hung or gone
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return coordinator, (f"the barrier's coordinator (rank {coordinator}) did not answer within "
                                 f"{timeout_s:g}s, nor a probe after it: {first}")
        if seen < generation:
            return coordinator, (f"the barrier's coordinator (rank {coordinator}) had not reached it after "
                                 f"{timeout_s:g}s")
        if seen == generation and outcome is None:  # it is there, waiting for someone else: its verdict
            time.sleep(min(0.05, max(left, 0.0)))
            continue
        if seen > generation:  # the members did not call the same barriers (an earlier one failed on some)
            return -1, f"the barrier's coordinator (rank {coordinator}) counted other barriers than this rank"
        if not outcome:  # it passed: its answer came after this rank stopped waiting
            return coordinator, (f"the barrier's coordinator (rank {coordinator}) did not answer within "
                                 f"{timeout_s:g}s")
        missing = [r for r in outcome if r not in (me, -1)]
        if not missing:
            return -1, f"the barrier failed on its coordinator (rank {coordinator}) too, naming no other rank"
        which = ", ".join(map(str, missing))
        return missing[0], (f"rank{'s' if len(missing) > 1 else ''} {which} did not arrive (seen by the "
                            f"barrier's coordinator, rank {coordinator})")
