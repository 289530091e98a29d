"""Free TCP ports on the loopback interface, for jobs launched on one host (tests, benchmarks, scripts).

``pse.init`` uses ``MASTER_PORT`` for the process group and, outside torchrun, ``MASTER_PORT + 1`` for the RPC
rendezvous (``docs/distributed.md``), so a launcher needs a *pair* of consecutive free ports. A port found free
here can still be taken by another process before the job binds it; launchers retry on a bind failure.
"""

from __future__ import annotations

import socket

__all__ = ["free_port", "free_port_pair"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A port ``p`` with ``p`` and ``p + 1`` both free on ``host``."""
    for _ in range(attempts):
        p = free_port(host)
        if p >= 65535:
            continue
        try:
            with socket.socket() as s:
                s.bind((host, p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError(f"no pair of consecutive free ports on {host} after {attempts} attempts")
