"""Sharding tables across torchrun ranks: pulls and pushes over a C++ TCP data plane (``init(transport="tcp")``,
the default) or ``torch.distributed.rpc``; control calls over RPC.

``pse.init()`` reads torchrun's environment; ``SparseTable(config, name)`` then splits its rows over the server
ranks by a mixing hash of the key. See ``docs/distributed.md``.
"""

from .runtime import (
    get_rank,
    get_world_size,
    init,
    is_initialized,
    is_server,
    is_trainer,
    num_servers,
    num_trainers,
    shutdown,
    trainer_group,
    trainer_rank,
)

__all__ = [
    "init",
    "shutdown",
    "is_initialized",
    "trainer_group",
    "is_trainer",
    "is_server",
    "get_rank",
    "get_world_size",
    "num_servers",
    "num_trainers",
    "trainer_rank",
]
