"""Exception types raised by torch_psembed.

Every error names what was wrong: the argument, the file, or the rank. They subclass the built-in type a user
would catch anyway (``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

__all__ = [
    "PSEmbedError",
    "NotInitializedError",
    "PeerUnavailableError",
    "CorruptCheckpointError",
    "CheckpointMismatchError",
]


class PSEmbedError(RuntimeError):
    """Base class of the runtime errors of torch_psembed."""


class NotInitializedError(PSEmbedError):
    """A distributed operation was used before ``pse.init()`` (or after ``pse.shutdown()``)."""


class PeerUnavailableError(PSEmbedError):
    """A remote rank died or did not answer within ``rpc_timeout``. ``rank`` names it."""

    def __init__(self, message: str, rank: int = -1):
        super().__init__(message)
        self.rank = rank


class CorruptCheckpointError(PSEmbedError, ValueError):
    """A saved model is truncated, fails its checksum, or has an unknown format. ``path`` names the file."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


class CheckpointMismatchError(PSEmbedError, ValueError):
    """A saved model does not fit the table (config, base/delta order)."""
