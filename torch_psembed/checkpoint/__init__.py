"""Saving and loading tables (placeholder until the lifecycle issue lands)."""

__all__ = ["save_table", "load_table", "export", "InferenceEmbedding"]


def save_table(table, path, mode="checkpoint"):
    raise NotImplementedError("save is not implemented yet")


def load_table(table, path):
    raise NotImplementedError("load is not implemented yet")


def export(table_or_path, out, dtype="float16"):
    raise NotImplementedError("export is not implemented yet")


class InferenceEmbedding:
    @classmethod
    def load(cls, path):
        raise NotImplementedError("InferenceEmbedding is not implemented yet")
