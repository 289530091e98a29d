"""The default :class:`~.transport.Transport`: pulls and pushes on a TCP data plane, control calls over RPC.

Every serving rank runs a ``_C.DataServer`` (``server.start_data_plane``) that serves pulls and pushes of its
tables in C++: no Python, no GIL and no pickling on the serving side, which is where an RPC's fixed cost of
about a millisecond went (``docs/distributed.md``, "The TCP data plane"). Each trainer holds one
``_C.DataChannel`` per remote server. Everything else (creating tables, table-wide operations, barriers,
liveness probes) still goes through :class:`~.rpc_transport.RpcTransport`, whose methods this class inherits.

Errors keep the RPC transport's contract: a lost connection or a reply that does not come within
``rpc_timeout`` becomes :class:`~torch_psembed.errors.PeerUnavailableError` naming the server's rank; a request
the server refused (bad values, unknown table) raises ``ValueError``/``RuntimeError`` (``MemoryError`` when it ran
out of memory for it) with the server's message and the rank that raised it.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from .. import _C
from .rpc_transport import RpcTransport
from .transport import Handle, raised_by

__all__ = ["TcpTransport", "data_plane_host"]


def data_plane_host() -> str:
    """The IPv4 address this rank's data server listens on and advertises.

    ``PSEMBED_DATA_HOST`` if set; otherwise the local address of the route to ``MASTER_ADDR`` (the interface
    the other ranks already reach this host through; ``127.0.0.1`` when everything runs on one host).
    """
    host = os.environ.get("PSEMBED_DATA_HOST")
    if host:
        return host
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        master_ip = socket.gethostbyname(master)
    except OSError:
        return "127.0.0.1"
    if master_ip.startswith("127."):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_ip, int(os.environ.get("MASTER_PORT", "29500"))))  # UDP: sends nothing
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class _TcpHandle(Handle):
    """A request's reply. ``wait`` may be called from two threads at once (a prefetch thread and the training
    thread wait for the same push): the lock makes the second caller wait for the first one's reply, which
    the channel hands out only once."""

    __slots__ = ("_channel", "_id", "_rank", "_what", "_on_failure", "_timeout", "_done", "_value", "_error",
                 "_lock")

    def __init__(self, channel, request_id: int, rank: int, what: str, on_failure: Callable, timeout: float):
        self._channel = channel
        self._id = request_id
        self._rank = rank
        self._what = what
        self._on_failure = on_failure
        self._timeout = timeout
        self._done = False
        self._value = None
        self._error: Optional[BaseException] = None
        self._lock = threading.Lock()

    def wait(self) -> Any:
        if not self._done:
            with self._lock:
                if not self._done:
                    try:
                        self._value = self._channel.wait(self._id, self._timeout)
                    except ConnectionError as e:
                        self._error = self._on_failure(self._rank, self._what, e)
                        self._error.__cause__ = e
                    except (ValueError, RuntimeError, MemoryError) as e:
                        self._error = raised_by(e, str(e), self._rank)
                    self._done = True  # last: a caller that sees it set finds _value or _error set
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return self._done or self._channel.ready(self._id)


class TcpTransport(RpcTransport):
    """:class:`RpcTransport` whose remote pulls and pushes use ``_C.DataChannel``.

    Args:
        endpoints (list of (host, port)): each server's data server, in server order.
        *args, **kwargs: as :class:`RpcTransport`.
    """

    copy_slices = False  # DataChannel.pull/push write the whole frame before they return

    def __init__(self, endpoints: Sequence[Tuple[str, int]], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if len(endpoints) != self.num_servers:
            raise ValueError(f"{len(endpoints)} data-plane endpoints for {self.num_servers} servers")
        self.endpoints = [tuple(e) for e in endpoints]
        self._channels: Dict[int, Any] = {}

    def connect(self) -> None:
        """Open a channel to every remote server (a trainer calls it once, in ``init``)."""
        for s, (host, port) in enumerate(self.endpoints):
            if s == self.local_server or s in self._channels:
                continue
            try:
                self._channels[s] = _C.DataChannel(host, int(port), self.rpc_timeout, self.rpc_timeout)
            except ConnectionError as e:
                raise self._on_failure(self.server_ranks[s], f"data-plane connect to {host}:{port}", e) from e

    def close(self) -> None:
        """Close every channel (replies not yet waited for are dropped)."""
        channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()

    def _channel(self, server: int):
        ch = self._channels.get(server)
        if ch is None:
            raise RuntimeError(f"no data-plane channel to server {server}: the transport is closed or not connected")
        return ch

    def _send(self, server: int, what: str, send: Callable[[Any], int]) -> Handle:
        rank = self.server_ranks[server]
        ch = self._channel(server)
        try:
            request_id = send(ch)
        except ConnectionError as e:
            raise self._on_failure(rank, what, e) from e
        return _TcpHandle(ch, request_id, rank, what, self._on_failure, self.rpc_timeout)

    # -- data path ----------------------------------------------------------------------------------------
    def pull(self, server: int, table: str, keys: np.ndarray, with_stats: bool) -> Handle:
        if server == self.local_server:
            return super().pull(server, table, keys, with_stats)
        return self._send(server, f"pull of table {table!r}", lambda ch: ch.pull(table, keys, bool(with_stats)))

    def push(self, server, table, keys, grads, shows, clicks, slots, push_id) -> Handle:
        if server == self.local_server:
            return super().push(server, table, keys, grads, shows, clicks, slots, push_id)
        return self._send(
            server, f"push to table {table!r}", lambda ch: ch.push(table, keys, grads, shows, clicks, slots, push_id)
        )
