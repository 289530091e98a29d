"""Process-wide distributed state (placeholder: single process only)."""


def init(*args, **kwargs):
    raise NotImplementedError("pse.init is not implemented yet")


def shutdown():
    pass


def is_initialized() -> bool:
    return False


def is_distributed() -> bool:
    return False


def make_table_backend(config, name):
    raise NotImplementedError
