"""Saving, loading and exporting tables (the model lifecycle).

- :func:`save_table` / :func:`load_table` back :meth:`SparseTable.save` and :meth:`SparseTable.load`: a
  directory with a JSON manifest and checksummed binary column files, bucketed by a hash of the key into a
  fixed number of buckets, so that a save from N ranks loads into M ranks (layout: ``docs/format.md``).
- :func:`export` writes the serving files (``key -> lr, mf``) that :class:`InferenceEmbedding` loads.
- ``python -m torch_psembed.tools inspect|verify|merge|export`` works on these directories.
"""

from ._format import DEFAULT_NUM_BUCKETS, FORMAT_VERSION
from ._table_io import LocalParts, load_group, load_table, save_group, save_table
from .export import export, read_serving
from .inference import InferenceEmbedding

__all__ = [
    "save_table",
    "load_table",
    "export",
    "InferenceEmbedding",
    "read_serving",
    "LocalParts",
    "save_group",
    "load_group",
    "FORMAT_VERSION",
    "DEFAULT_NUM_BUCKETS",
]
