"""Training data: the built-in click-log simulator and the Criteo / slot-format readers.

A batch is a dict of tensors:

- ``labels``: ``(B,)`` float32 clicks (0/1);
- ``keys``: ``(N,)`` int64 feasigns, grouped by sample, then slot;
- ``offsets``: ``(B * S,)`` int64 start of each (sample, slot) bag in ``keys`` (``S`` = slots), the
  ``offsets`` argument of ``nn.EmbeddingBag``;
- ``slots``: ``(N,)`` int32 slot index of each key;
- ``prob``: ``(B,)`` float32 true click probability (simulator only).
"""

from .dataset import BadDataWarning, BatchStream, FileSource, SyntheticSource, check_file, make_loader
from .readers import CriteoParser, SlotParser, assemble, make_parser
from .synthetic import ClickLogSimulator, SimulatorConfig

__all__ = [
    "SimulatorConfig",
    "ClickLogSimulator",
    "SyntheticSource",
    "FileSource",
    "BatchStream",
    "BadDataWarning",
    "make_loader",
    "check_file",
    "CriteoParser",
    "SlotParser",
    "make_parser",
    "assemble",
]
