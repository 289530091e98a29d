"""torch_psembed: parameter-server sparse embeddings for PyTorch CTR models.

A C++ hash-table store keyed by 64-bit feasigns, with the CTR feature lifecycle (show/click statistics,
score-gated admission of the mf vector, decay and eviction, base/delta saves), behind a drop-in
``PSEmbedding`` module, sharded over ``torchrun`` ranks: pulls and pushes go over a C++ TCP data plane by
default, control calls over ``torch.distributed.rpc``.

Differences from ``torch.nn.EmbeddingBag`` that users should know:

- ids are arbitrary 64-bit feasigns, not indices into a fixed range; unknown ids read zeros;
- rows are updated by the table's own sparse rule during ``backward`` (``PSEmbedding.parameters()`` is empty);
- a new id only gets its mf vector once its show/click score reaches ``embedx_threshold``.

Memory: a row costs its payload (8-byte key + state floats) plus about 20 bytes of index, see
``docs/benchmarks.md``.
"""

from ._C import __version__
from .checkpoint import InferenceEmbedding, export
from .config import FTRL, SGD, AdaGrad, Adam, CtrAccessorConfig, StdAdaGrad, TableConfig
from .distributed import init, is_initialized, shutdown
from .embedding import PSEmbedding, feed
from .errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    NotInitializedError,
    PeerUnavailableError,
    PSEmbedError,
)
from .table import SparseTable

__all__ = [
    "__version__",
    "TableConfig",
    "CtrAccessorConfig",
    "SGD",
    "AdaGrad",
    "StdAdaGrad",
    "Adam",
    "FTRL",
    "SparseTable",
    "PSEmbedding",
    "feed",
    "init",
    "shutdown",
    "is_initialized",
    "export",
    "InferenceEmbedding",
    "PSEmbedError",
    "NotInitializedError",
    "PeerUnavailableError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
]
