"""ConvertsOutput: the base of PSEmbedding and InferenceEmbedding for dtype conversions (and their refusal of
TorchScript).

Their rows live in a table (or in served arrays), not in float parameters, so ``half()``, ``double()`` or
``to(dtype)`` would convert nothing; this base converts their output instead, as ``nn.Embedding.half()``
converts its weight and so its output. The rows keep their own dtype, and the gradient comes back as float32.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvertsOutput"]


class ConvertsOutput(nn.Module):
    """``output_dtype`` follows the module's dtype conversions (float32 until one)."""

    def __init__(self) -> None:
        super().__init__()
        self.output_dtype = torch.float32

    def _apply(self, fn, recurse=True):
        # What fn makes of a tensor of the current dtype: a cast changes it, a device move or share_memory_()
        # keeps it, and an fn that cannot run here (cuda() without a GPU) raises as it does for nn.Embedding.
        dtype = fn(torch.zeros(0, dtype=self.output_dtype)).dtype
        if dtype.is_floating_point:
            self.output_dtype = dtype
        return super()._apply(fn, recurse)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling: refuse by name, not with an error
        # about a type annotation (tracing is refused in functional.ps_embedding).
        raise RuntimeError(
            f"{type(self).__name__} does not support TorchScript (torch.jit.script / torch.jit.trace): it looks "
            "its rows up in a table from Python; run it eagerly or under torch.compile"
        )

    def _convert_output(self, out: Tensor) -> Tensor:
        return out if out.dtype == self.output_dtype else out.to(self.output_dtype)
