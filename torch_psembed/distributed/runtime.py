"""Process-wide distributed state: roles, ``init``/``shutdown``, and the backend of each ``SparseTable``.

Layouts (``W`` = torchrun's ``WORLD_SIZE``):

- ``num_servers=0`` (colocated): every rank trains and serves one part of every table; ``W`` servers.
- ``num_servers=S`` (dedicated): ranks ``0..S-1`` only serve (their ``init`` blocks until every trainer has
  called ``shutdown`` and then ends the process with status 0); ranks ``S..W-1`` train.

Start-up order: the default gloo process group first (``init_process_group("gloo", init_method="env://")``,
made by ``init`` unless the user already made one), then three gloo subgroups (the trainers, for DDP and for
the broadcast that ends a table-wide operation; all ranks, for shutdown; the trainers again, with
``timeout=rpc_timeout``, for the barriers of table-wide operations), then RPC. RPC's rendezvous needs a
TCPStore: under torchrun it shares the agent's store on ``MASTER_PORT`` (as clients, with its own key
prefix); with the env set by hand rank 0 hosts it on ``MASTER_PORT + 1``, since the process group's store
holds ``MASTER_PORT`` (``PSEMBED_RPC_PORT`` overrides both).

Failures: an unreachable peer raises :class:`~torch_psembed.errors.PeerUnavailableError` naming its rank
within ``rpc_timeout``. After such an error (or any uncaught exception) the process shuts RPC down without
waiting for its peers and exits with status 1 (an ``atexit`` hook), so a dead rank never hangs the job.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import math
import os
import sys
import threading
import warnings
import weakref
from typing import Any, List, Optional

from ..errors import NotInitializedError, PeerUnavailableError
from . import server

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "is_distributed",
    "make_table_backend",
    "trainer_group",
    "is_trainer",
    "is_server",
    "get_rank",
    "get_world_size",
    "num_servers",
    "num_trainers",
    "trainer_rank",
]


# Seconds the servers' part of a table-wide operation (fn of collective(), e.g. writing a save) may take; a
# dead server is still noticed at once (its connection closes), only a hung one waits this long.
COLLECTIVE_TIMEOUT = 1800.0


class _Runtime:
    """Everything ``init`` decided. Written by init/shutdown on the main thread; ``failed`` by any thread."""

    def __init__(self) -> None:
        self.local = True
        self.rank = 0
        self.world_size = 1
        self.max_staleness = 0
        self.rpc_timeout = 60.0
        self.transport_kind = "tcp"
        self.collective_timeout = COLLECTIVE_TIMEOUT
        self.dedicated = False
        self.server_ranks: List[int] = [0]
        self.trainer_ranks: List[int] = [0]
        self.transport = None
        self.owns_pg = False
        self.trainer_group = None
        self.ctl_group = None
        self.all_group = None
        self.barrier_group = None
        self.rpc_up = False
        self.failed = False
        self.first_error: Optional[PeerUnavailableError] = None  # later calls re-raise it
        self.closed = False
        self.tables: "weakref.WeakSet" = weakref.WeakSet()

    @property
    def is_trainer(self) -> bool:
        return self.rank in self.trainer_ranks

    @property
    def is_server(self) -> bool:
        return self.rank in self.server_ranks


_state: Optional[_Runtime] = None
_lock = threading.Lock()


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _failure(rank: int, what: str, exc: BaseException) -> PeerUnavailableError:
    """The error for peer ``rank`` not answering; marks the runtime failed (the process will exit non-zero).

    The first time, the other live ranks are told which rank is gone (``server.report_failure``), so a rank
    that only notices later, because the reporter itself stopped, still names the rank that died first.
    """
    st = _state
    timeout = st.rpc_timeout if st is not None else float("nan")
    if st is not None:
        st.failed = True
    if isinstance(exc, PeerUnavailableError):
        if st is not None and st.first_error is None:
            st.first_error = exc
        return exc
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    report = server.first_failure_report()
    own_rank = st.rank if st is not None else -1
    if report is not None and report[0] not in (rank, own_rank):
        dead, reporter, msg = report
        err = PeerUnavailableError(
            f"rank {dead} is unavailable (reported by rank {reporter}: {msg}); then {what} with rank {rank} "
            f"failed (rpc_timeout={timeout:g}s): {detail}",
            rank=dead,
        )
    elif report is not None and report[0] == report[1] == rank:  # it said why it stopped (_install_excepthook)
        err = PeerUnavailableError(
            f"rank {rank} is unavailable: {report[2]}; then {what} failed (rpc_timeout={timeout:g}s): {detail}",
            rank=rank,
        )
    else:
        who = f"rank {rank}" if rank >= 0 else "a peer rank"
        err = PeerUnavailableError(f"{who} is unavailable: {what} failed (rpc_timeout={timeout:g}s): {detail}",
                                   rank=rank)
    if st is not None and st.first_error is None:
        st.first_error = err
    _tell_others(st, err)
    return err


_told = threading.Event()


def _tell_others(st: Optional[_Runtime], err: PeerUnavailableError) -> None:
    """Once per process: tell every other rank which rank is gone (best effort, a few seconds at most)."""
    if st is None or not st.rpc_up or err.rank < 0 or _told.is_set():
        return
    _told.set()
    from torch.distributed import rpc

    from .rpc_transport import worker_name

    msg = str(err).splitlines()[0][:300]
    futs = []
    for r in range(st.world_size):
        if r in (st.rank, err.rank):
            continue
        try:
            futs.append(rpc.rpc_async(worker_name(r), server.report_failure, args=(err.rank, st.rank, msg),
                                      timeout=min(5.0, st.rpc_timeout)))
        except Exception:  # noqa: BLE001 - that rank may be gone too
            pass
    for f in futs:
        try:
            f.wait()
        except Exception:  # noqa: BLE001
            pass


def _check_alive() -> None:
    st = _state
    if st is None:
        raise NotInitializedError("the distributed runtime is not initialised; call pse.init() first")
    if st.first_error is not None:
        # A peer is gone: fail fast with the same error instead of talking to the survivors again.
        raise PeerUnavailableError(str(st.first_error), rank=st.first_error.rank)
    if st.closed:
        raise NotInitializedError("pse.shutdown() was called; sharded tables can no longer be used")


# -- public API ---------------------------------------------------------------------------------------------
TRANSPORTS = ("tcp", "rpc")


def init(max_staleness: int = 1, num_servers: int = 0, rpc_timeout: float = 60.0, transport: str = "tcp") -> None:
    r"""Start the distributed runtime from torchrun's environment; one process when there is none.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. With ``WORLD_SIZE`` unset or 1 tables
    stay local to the process. Initialises the default gloo process group unless one exists, a trainer-only
    gloo group (:func:`trainer_group`, use it for DDP), RPC (its store shares torchrun's on ``MASTER_PORT``, or
    goes on ``MASTER_PORT + 1`` with the environment set by hand; ``PSEMBED_RPC_PORT`` overrides both) and, with
    ``transport="tcp"``, a data server on every serving rank (any free port).

    Args:
        max_staleness (int): how many steps of pushes a pull may run ahead of; 0 applies every push before the
            next pull (deterministic). Default: 1.
        num_servers (int): 0 makes every rank train and serve a part of every table; ``S > 0`` makes ranks
            ``0..S-1`` dedicated servers. Default: 0.
        rpc_timeout (float): seconds after which an unanswered call (or a barrier of a table-wide operation)
            raises :class:`~torch_psembed.errors.PeerUnavailableError`. Default: 60.
        transport (str): how pulls and pushes travel. ``"tcp"``: the C++ data plane (a ``_C.DataServer`` on
            every serving rank, no Python on the serving side); ``"rpc"``: ``torch.distributed.rpc`` like every
            control call. Default: ``"tcp"``.

    .. note::
        On a dedicated server rank this call serves until every trainer called :func:`shutdown`, then ends the
        process (``SystemExit(0)``): the rest of the script runs only on trainers.

    Examples::

        >>> # xdoctest: +SKIP("needs torchrun")
        >>> pse.init(max_staleness=1)
        >>> table = pse.SparseTable(pse.TableConfig(dim=8), name="feasign")
        >>> ...
        >>> pse.shutdown()
    """
    global _state
    if not isinstance(max_staleness, int) or isinstance(max_staleness, bool) or max_staleness < 0:
        raise ValueError(f"max_staleness must be an int >= 0, got {max_staleness!r}")
    if not isinstance(num_servers, int) or isinstance(num_servers, bool) or num_servers < 0:
        raise ValueError(f"num_servers must be an int >= 0, got {num_servers!r}")
    if (not isinstance(rpc_timeout, (int, float)) or isinstance(rpc_timeout, bool) or not math.isfinite(rpc_timeout)
            or rpc_timeout <= 0):  # True would be a 1 s timeout
        raise ValueError(f"rpc_timeout must be a finite number of seconds > 0, got {rpc_timeout!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got {transport!r}")
    with _lock:
        if _state is not None:
            raise RuntimeError(
                "pse.init() was already called in this process; it can be called only once per process"
            )
        st = _Runtime()
        st.max_staleness = max_staleness
        st.transport_kind = transport
        st.rpc_timeout = float(rpc_timeout)
        st.collective_timeout = max(st.rpc_timeout, COLLECTIVE_TIMEOUT)
        world = _env_world_size()
        if world <= 1:
            if num_servers:
                raise ValueError(
                    f"num_servers={num_servers} needs at least {num_servers + 1} processes (started by torchrun), "
                    f"but WORLD_SIZE is {world}"
                )
            _state = st
            return
        if num_servers >= world:
            raise ValueError(f"num_servers={num_servers} leaves no trainer among WORLD_SIZE={world} ranks")
        try:
            rank = int(os.environ["RANK"])
        except (KeyError, ValueError) as e:
            raise RuntimeError(f"WORLD_SIZE={world} but RANK is not set to an int; start the job with torchrun") from e
        st.local = False
        st.rank = rank
        st.world_size = world
        st.dedicated = num_servers > 0
        if st.dedicated:
            st.server_ranks = list(range(num_servers))
            st.trainer_ranks = list(range(num_servers, world))
        else:
            st.server_ranks = list(range(world))
            st.trainer_ranks = list(range(world))
        _state = st
    try:
        _start(st)
    except BaseException:
        if not st.rpc_up and not st.owns_pg:  # nothing left running: init may be called again
            with _lock:
                _state = None
        raise
    atexit.register(_atexit)
    _install_excepthook()
    if not st.is_trainer:
        _serve_until_done(st)
        shutdown()
        raise SystemExit(0)


def _start(st: _Runtime) -> None:
    import torch.distributed as dist
    from torch.distributed import rpc

    from .rpc_transport import RpcTransport, worker_name

    timeout = datetime.timedelta(seconds=st.rpc_timeout)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://", rank=st.rank, world_size=st.world_size,
                                timeout=datetime.timedelta(seconds=max(st.rpc_timeout, 60.0)))
        st.owns_pg = True
    elif dist.get_world_size() != st.world_size or dist.get_rank() != st.rank:
        raise RuntimeError(
            f"the default process group has rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but torchrun's env says RANK={st.rank} WORLD_SIZE={st.world_size}"
        )
    _check_same_init(st)
    # Every rank must take part in creating every group, in the same order.
    # The trainers' group carries the broadcast that ends a collective, which waits for the servers' part of
    # it (a save can take minutes): its timeout is collective_timeout. The barriers (and the gather) of a
    # collective use a second group of the trainers whose timeout is rpc_timeout: monitored_barrier applies
    # its timeout on the first trainer only, the others wait for that one's answer as long as the group's
    # timeout, so on the long group a late or hung first trainer held them for collective_timeout.
    st.ctl_group = dist.new_group(
        st.trainer_ranks, timeout=datetime.timedelta(seconds=st.collective_timeout), backend="gloo"
    )
    st.all_group = dist.new_group(list(range(st.world_size)), timeout=timeout, backend="gloo")
    st.barrier_group = dist.new_group(st.trainer_ranks, timeout=timeout, backend="gloo")
    st.trainer_group = st.ctl_group if st.dedicated else dist.group.WORLD
    _shorten_gil_switch_interval()
    server_index = st.server_ranks.index(st.rank) if st.is_server else -1
    server.configure(server_index, len(st.server_ranks))
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    rpc_port = os.environ.get("PSEMBED_RPC_PORT") or _rpc_port()
    opts = rpc.TensorPipeRpcBackendOptions(
        num_worker_threads=16, rpc_timeout=st.rpc_timeout, init_method=f"tcp://{addr}:{rpc_port}",
        _transports=_transports(),
    )
    with warnings.catch_warnings():
        # TensorPipe's own device-map exchange uses a deprecated call inside torch; not ours to fix.
        warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
        rpc.init_rpc(worker_name(st.rank), rank=st.rank, world_size=st.world_size, rpc_backend_options=opts)
    st.rpc_up = True
    args = (st.server_ranks, st.trainer_ranks, st.rank, st.rpc_timeout, st.ctl_group, _failure)
    if st.transport_kind == "rpc":
        st.transport = RpcTransport(*args, collective_timeout=st.collective_timeout,
                                    barrier_group=st.barrier_group)
        return
    from .tcp_transport import TcpTransport, data_plane_host

    mine = None
    if st.is_server:
        host = data_plane_host()
        try:
            mine = (host, server.start_data_plane(host))
        except ConnectionError as e:
            raise RuntimeError(
                f"rank {st.rank} could not start its data server on {host} ({e}); set PSEMBED_DATA_HOST to an "
                "IPv4 address of this host that the other ranks can reach, or use pse.init(transport='rpc')"
            ) from e
    endpoints: List[Any] = [None] * st.world_size
    dist.all_gather_object(endpoints, mine, group=st.all_group)
    st.transport = TcpTransport([endpoints[r] for r in st.server_ranks], *args,
                                collective_timeout=st.collective_timeout, barrier_group=st.barrier_group)
    if st.is_trainer:
        st.transport.connect()


def _check_same_init(st: _Runtime) -> None:
    """Raise on every rank when the ranks called ``init`` with different arguments.

    Each rank builds its groups from its own ``num_servers``: ranks that disagree would wait in
    ``dist.new_group`` for a group the others never make (a hang), and a different transport or staleness
    would fail later with an unrelated error. One gather on the default group settles it before anything else.
    """
    import torch.distributed as dist

    mine = {"num_servers": len(st.server_ranks) if st.dedicated else 0, "transport": st.transport_kind,
            "max_staleness": st.max_staleness, "rpc_timeout": st.rpc_timeout}
    every: List[Any] = [None] * st.world_size
    dist.all_gather_object(every, mine)
    if all(a == mine for a in every):
        return
    keys = [k for k in mine if any(a[k] != every[0][k] for a in every)]
    calls = "; ".join(f"rank {r}: " + ", ".join(f"{k}={a[k]!r}" for k in keys) for r, a in enumerate(every))
    if st.owns_pg:
        dist.destroy_process_group()
        st.owns_pg = False
    raise RuntimeError(f"the ranks called pse.init() with different arguments ({calls}); every rank must pass "
                       "the same num_servers, transport, max_staleness and rpc_timeout")


def _shorten_gil_switch_interval() -> None:
    """Let RPC threads get the GIL sooner while the main thread runs Python code (``PSEMBED_SWITCH_INTERVAL``).

    A request is unpickled, served and answered on an RPC thread, which needs the GIL several times; with
    CPython's default 5 ms switch interval each hand-off from a busy training thread can cost up to 5 ms.
    Measured: a 5000-key pull served by a process whose main thread runs Python took 16-18 ms (median) at
    5 ms and 5-10 ms at 0.5 ms. The interval is process-wide; the default here is 0.5 ms.
    """
    try:
        interval = float(os.environ.get("PSEMBED_SWITCH_INTERVAL", "0.0005"))
    except ValueError:
        return
    if interval > 0:
        sys.setswitchinterval(min(sys.getswitchinterval(), interval))


def _transports():
    """TensorPipe transports: ``uv`` (TCP, event driven) unless ``PSEMBED_TP_TRANSPORTS`` says otherwise.

    TensorPipe's default adds ``shm`` for ranks on one host, whose reactor polls without sleeping: about 16%
    of a core per idle process, measured, which the colocated layout cannot afford on small machines.
    """
    names = os.environ.get("PSEMBED_TP_TRANSPORTS", "uv")
    return None if names == "default" else [n.strip() for n in names.split(",") if n.strip()]


def _rpc_port() -> str:
    """Where RPC's rendezvous store lives.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) the agent already hosts a TCPStore on
    ``MASTER_PORT`` and every rank connects to it as a client: RPC shares it (its keys carry an ``rpc_prefix``).
    Otherwise rank 0's process group already hosts ``MASTER_PORT``, so RPC's store goes on ``MASTER_PORT + 1``.
    """
    port = int(os.environ.get("MASTER_PORT", "29500"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return str(port)
    return str(port + 1)


def _wait_for_trainers(st: _Runtime) -> None:
    """Block until every trainer has called shutdown; probe the other ranks meanwhile so a dead one is named."""
    from .rpc_transport import unreachable

    interval = min(1.0, st.rpc_timeout / 4)
    trainers = set(st.trainer_ranks)
    while True:
        done = server.wait_done(interval)
        if trainers <= done:
            return
        others = [r for r in range(st.world_size) if r != st.rank and r not in done]
        # (a rank that finished meanwhile is not dead)
        dead = [(r, e) for r, e in unreachable(others, st.rpc_timeout) if r not in server.done_ranks()]
        if dead:
            # Name every rank that is gone: when one dies, others often fail right after it (DDP, requests).
            names = ", ".join(str(r) for r, _ in dead)
            what = "liveness probe while waiting for the trainers to finish"
            if len(dead) > 1:
                what += f" (ranks {names} are all unavailable)"
            raise _failure(dead[0][0], what, dead[0][1]) from dead[0][1]


def _serve_until_done(st: _Runtime) -> None:
    _wait_for_trainers(st)


def shutdown() -> None:
    """Flush every push, wait for every rank to finish, and stop RPC (and the process group ``init`` made).

    Call it on every trainer. A no-op when ``init`` was never called or ``shutdown`` already ran. After an
    earlier :class:`~torch_psembed.errors.PeerUnavailableError` it stops RPC locally without waiting.
    """
    st = _state
    if st is None or st.closed:
        return
    if st.local:
        st.closed = True
        return
    if st.failed:
        _abort(st)
        return
    from torch.distributed import rpc

    from .rpc_transport import barrier, worker_name

    try:
        if st.is_trainer:
            for t in list(st.tables):
                t.flush()
            _close_channels(st)  # (this rank's own data server, if any, serves the others until the barrier)
            futs = []
            for r in range(st.world_size):
                if r == st.rank:
                    server.mark_done(st.rank)
                    continue
                try:
                    futs.append((r, rpc.rpc_async(worker_name(r), server.mark_done, args=(st.rank,),
                                                  timeout=st.rpc_timeout)))
                except Exception as e:  # noqa: BLE001
                    raise _failure(r, "shutdown notice", e) from e
            for r, f in futs:
                try:
                    f.wait()
                except Exception as e:  # noqa: BLE001
                    raise _failure(r, "shutdown notice", e) from e
        _wait_for_trainers(st)
        barrier(st.all_group, st.rpc_timeout, _failure, "shutdown barrier", name="all")
        _close_data_plane(st)
        rpc.shutdown(graceful=True, timeout=st.rpc_timeout)
        st.rpc_up = False
    except BaseException:
        st.failed = True
        _abort(st)
        raise
    _close_groups(st)
    server.reset()
    st.closed = True


def _close_channels(st: _Runtime) -> None:
    """Close this trainer's data channels (idempotent; ``Transport.close``)."""
    if st.transport is not None:
        st.transport.close()


def _close_data_plane(st: _Runtime) -> None:
    """Close this trainer's data channels and stop this server's data server (both idempotent)."""
    _close_channels(st)
    server.stop_data_plane()


def _close_groups(st: _Runtime) -> None:
    import torch.distributed as dist

    try:
        for g in (st.ctl_group, st.all_group, st.barrier_group):
            if g is not None:
                dist.destroy_process_group(g)
        if st.owns_pg and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at teardown
        pass
    st.ctl_group = st.all_group = st.barrier_group = st.trainer_group = None
    free_process_groups()
    from .rpc_transport import reset_barriers

    reset_barriers()  # a later init() counts its barriers from the start, as its coordinator does


def free_process_groups() -> None:
    """Frees destroyed process groups now, rather than at interpreter exit. Call it after
    ``dist.destroy_process_group`` once the caller has dropped its own handles to the groups.

    A Gloo group's worker threads drop their reference to a finished collective only after the caller's
    wait has returned, and a collective holds its tensors. A tensor that Python no longer references
    needs the GIL to be freed. If the group is only freed at exit (DDP modules sit in reference cycles,
    so they and the group they hold wait for the garbage collector), a worker can still be freeing such a
    collective while the interpreter shuts down: taking the GIL then ends the thread, and the process
    aborts with "terminate called without an active exception" (pytorch/pytorch#190489; it took 1 in 6 to
    1 in 25 runs of a two-rank test here). Collecting now frees the unreferenced groups, whose destructors
    join those threads while the interpreter is still whole.
    """
    gc.collect()


def _abort(st: _Runtime) -> None:
    """Stop RPC without waiting for peers (they may be dead)."""
    st.failed = True
    st.closed = True
    try:
        _close_data_plane(st)
    except Exception:  # noqa: BLE001 - best effort: peers may be dead
        pass
    if st.rpc_up:
        st.rpc_up = False
        try:
            from torch.distributed import rpc

            rpc.shutdown(graceful=False)
        except Exception:  # noqa: BLE001
            pass
    server.reset()


def _atexit() -> None:
    st = _state
    if st is None or st.local:
        return
    if not st.closed and not st.failed:
        try:
            shutdown()
        except BaseException as e:  # noqa: BLE001
            print(f"torch_psembed: shutdown at exit failed: {e}", file=sys.stderr)
    if st.failed:
        _abort(st)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(1)


_hook_installed = False


def _install_excepthook() -> None:
    global _hook_installed
    if _hook_installed:
        return
    _hook_installed = True
    previous = sys.excepthook

    def hook(tp, value, tb):
        st = _state
        failing = st is not None and not st.local and not issubclass(tp, SystemExit)
        if failing:
            st.failed = True
        previous(tp, value, tb)  # the traceback first: telling the others may wait for them (5 s at most)
        if failing and not issubclass(tp, PeerUnavailableError):  # (that one was told by _failure)
            # Tell the others why this rank stops, so that their PeerUnavailableError names the cause (e.g. a
            # trainer that created a table with another config), not only a closed connection.
            first = str(value).strip().splitlines()[0] if str(value).strip() else ""
            _tell_others(st, PeerUnavailableError(
                f"it stopped on an uncaught {tp.__name__}{': ' + first if first else ''}", rank=st.rank))

    sys.excepthook = hook


def is_initialized() -> bool:
    """True between :func:`init` and :func:`shutdown`."""
    st = _state
    return st is not None and not st.closed


def is_distributed() -> bool:
    """True when tables must be sharded: a multi-rank runtime, or torchrun's env says WORLD_SIZE > 1."""
    st = _state
    if st is None:
        return _env_world_size() > 1
    return not st.local


def make_table_backend(config, name: str):
    """The sharded backend of ``SparseTable(config, name)`` on a trainer."""
    from .client import ShardedTable

    st = _state
    if st is None:
        raise NotInitializedError(
            f"SparseTable {name!r} was created before pse.init() in a job with WORLD_SIZE={_env_world_size()}; "
            "call pse.init() first"
        )
    if st.closed:
        raise NotInitializedError(f"SparseTable {name!r} was created after pse.shutdown()")
    if not st.is_trainer:
        raise NotInitializedError(f"SparseTable {name!r}: rank {st.rank} is a dedicated server, not a trainer")
    t = ShardedTable(
        name,
        config,
        st.transport,
        st.max_staleness,
        st.trainer_ranks.index(st.rank),
        len(st.trainer_ranks),
        _check_alive,
    )
    st.tables.add(t)
    return t


def _need() -> _Runtime:
    st = _state
    if st is None:
        raise NotInitializedError("call pse.init() first")
    return st


def trainer_group():
    """The gloo process group of the trainers: pass it to DistributedDataParallel(process_group=...).

    The default group (``None``) in the colocated layout and in one process; a subgroup without the servers
    when dedicated servers exist.
    """
    st = _need()
    if st.local or not st.dedicated:
        return None
    return st.trainer_group


def is_trainer() -> bool:
    return _need().is_trainer


def is_server() -> bool:
    return _need().is_server


def get_rank() -> int:
    return _need().rank


def get_world_size() -> int:
    return _need().world_size


def num_servers() -> int:
    st = _need()
    return 0 if st.local else len(st.server_ranks)


def num_trainers() -> int:
    return len(_need().trainer_ranks)


def trainer_rank() -> int:
    """This process's index among the trainers (0 in one process)."""
    st = _need()
    return st.trainer_ranks.index(st.rank)


def _reset_for_tests() -> None:  # pragma: no cover - not used by the library
    global _state
    _state = None

