"""The one interface between the sharded-table client and the servers that own the shards.

The client (``client.py``) only ever talks to servers through a :class:`Transport`: pull, push and control
calls addressed to a *server index* in ``[0, num_servers)``. ``rpc_transport.py`` implements it over
``torch.distributed.rpc``; a collective (all-to-all) transport can be added later without touching the client,
the table or the server.

Every asynchronous call returns a :class:`Handle`; ``Handle.wait()`` returns the result or raises. A transport
failure (the peer died, or did not answer within ``rpc_timeout``) is raised as
:class:`~torch_psembed.errors.PeerUnavailableError` naming the peer's rank; an error raised by the server-side
code (bad input, unknown table) keeps its own type.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, List, Optional, Sequence

import numpy as np

from ..errors import PeerUnavailableError

__all__ = ["Handle", "DoneHandle", "Transport", "first_error", "raised_by", "wait_all"]


def wait_all(handles: Sequence["Handle"]) -> List[Any]:
    """Every handle's result, in order, after all of them ended; else the first error, a peer's
    unavailability before any other (it explains the rest). Stopping at the first error left the other
    requests running unwaited, their errors lost."""
    results: List[Any] = []
    errors: List[BaseException] = []
    for h in handles:
        try:
            results.append(h.wait())
        except Exception as e:  # noqa: BLE001 - raised below, after every handle ended
            errors.append(e)
    if errors:
        raise first_error(errors)
    return results


def first_error(errors: Sequence[BaseException]) -> BaseException:
    """The error to raise of several requests that failed: a peer's unavailability before any other (it
    explains the rest), else the first."""
    return next((e for e in errors if isinstance(e, PeerUnavailableError)), errors[0])


def raised_by(e: BaseException, message: str, rank: int) -> BaseException:
    """A server's refusal as the caller sees it: ``e``'s type with "<message> (raised by rank r)"; ``e``
    itself for a type that does not take one message."""
    try:
        return type(e)(f"{message} (raised by rank {rank})")
    except Exception:  # noqa: BLE001
        return e


class Handle(abc.ABC):
    """A pending result of an asynchronous transport call.

    ``wait`` may be called more than once and from two threads at once (a table's prefetch thread and its
    training thread wait for the same push): every call returns the same result or raises the same error.
    """

    @abc.abstractmethod
    def wait(self) -> Any:
        """Block until the call completes; return its result or raise its error."""

    @abc.abstractmethod
    def done(self) -> bool:
        """True once ``wait()`` would not block."""


class DoneHandle(Handle):
    """A handle for a call that already ran in this process (the local shard)."""

    __slots__ = ("_value", "_error")

    def __init__(self, value: Any = None, error: Optional[BaseException] = None) -> None:
        self._value = value
        self._error = error

    def wait(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return True


class Transport(abc.ABC):
    """Routes table calls to server indices.

    Attributes:
        num_servers (int): how many servers hold shards of every table.
        local_server (int or None): the index of the server living in this process (colocated layout), or None.
        rpc_timeout (float): seconds a call may take before its peer counts as unavailable.
        copy_slices (bool): whether ``pull``/``push`` need arrays of their own. True where a call may still
            read its arrays after it returns (RPC, which also ships a view's whole storage): the client then
            copies each server's slice and the caller may reuse its arrays at once. False where the arrays are
            read before the call returns (the TCP data plane writes the whole frame first).
    """

    num_servers: int
    local_server: Optional[int]
    rpc_timeout: float
    copy_slices: bool = True

    @abc.abstractmethod
    def server_rank(self, server: int) -> int:
        """The global rank of server ``server`` (for error messages)."""

    # -- data path ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def pull(self, server: int, table: str, keys: np.ndarray, with_stats: bool) -> Handle:
        """Rows of ``keys`` (all owned by ``server``) as a float32 array; never inserts."""

    @abc.abstractmethod
    def push(
        self,
        server: int,
        table: str,
        keys: np.ndarray,
        grads: np.ndarray,
        shows: np.ndarray,
        clicks: np.ndarray,
        slots: Optional[np.ndarray],
        push_id: int,
    ) -> Handle:
        """Apply merged gradients on ``server``; the handle's value is the number of rows skipped.

        ``push_id`` names the trainer's push for admission draws (every part of one push carries the same).
        """

    # -- control ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def call(self, server: int, table: str, fn: Callable, args: Sequence[Any] = ()) -> Handle:
        """Run ``fn(local_table, server, num_servers, *args)`` on ``server``; ``fn`` is a module-level function."""

    @abc.abstractmethod
    def create_table(self, server: int, table: str, config: dict) -> Handle:
        """Create ``table`` on ``server`` from ``config`` (a ``TableConfig.to_dict()``), or check it matches."""

    @abc.abstractmethod
    def trainer_barrier(self) -> None:
        """Block until every trainer reached this barrier; times out after ``rpc_timeout``."""

    @abc.abstractmethod
    def broadcast_from_first_trainer(self, obj: Any) -> Any:
        """Every trainer returns the object the first trainer passed (others pass None)."""

    @abc.abstractmethod
    def gather_trainers(self, obj: Any) -> List[Any]:
        """Every trainer returns the objects every trainer passed, in trainer order."""

    def close(self) -> None:
        """Release this transport's own connections (idempotent; ``runtime.shutdown`` calls it). Default:
        nothing to release."""

    def call_all(self, table: str, fn: Callable, args: Sequence[Any] = ()) -> List[Any]:
        """``call`` on every server concurrently; the results in server order.

        Returns or raises only after every server's call ended, so a table-wide operation that failed on one
        server is not still running on the others when the trainers go on. Raises the first error in server
        order, a peer's unavailability before any other (it explains the rest)."""
        handles = [self.call(s, table, fn, args) for s in range(self.num_servers) if s != self.local_server]
        local = None
        if self.local_server is not None:
            local = self.call(self.local_server, table, fn, args)
        it = iter(handles)
        return wait_all([local if s == self.local_server else next(it) for s in range(self.num_servers)])
