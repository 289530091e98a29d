"""PSEmbedding (placeholder until the PSEmbedding issue lands)."""

import contextlib

__all__ = ["PSEmbedding", "feed"]


class PSEmbedding:  # replaced by the real module
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PSEmbedding is not implemented yet")


@contextlib.contextmanager
def feed(clicks=None):
    raise NotImplementedError("feed is not implemented yet")
    yield
