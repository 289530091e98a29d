"""InferenceEmbedding: lookups over exported serving files, with no training state and no RPC."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import functional as PF
from .._output_dtype import ConvertsOutput
from ..table import _as_key, _as_numpy
from .export import read_serving, serving_rows_problem, values_tensor

__all__ = ["InferenceEmbedding"]


def _keys_tensor(keys) -> Tensor:
    """``keys`` as a CPU int64 1-D tensor, checked (and named) as ``SparseTable.pull`` checks its keys."""
    if isinstance(keys, Tensor) and keys.layout == torch.strided:
        keys = keys.contiguous()
    return torch.from_numpy(_as_numpy("keys", keys, np.int64, 1))


class _ServingRows:
    """Sorted keys + a value matrix: the read-only ``pull`` that :func:`functional.ps_embedding` needs."""

    def __init__(self, keys: Tensor, values: Tensor, stats: Optional[Tensor]) -> None:
        self.keys = keys          # int64[n], strictly ascending
        self.values = values      # [n, 1 + dim] float32 / float16 / bfloat16: lr, mf
        self.stats = stats        # float32[n, 2] (show, click) or None
        self.dim = values.shape[1] - 1

    def find(self, ids: Tensor):
        """``(index, hit)``: the row of each id and whether the export holds it."""
        n = self.keys.numel()
        if n == 0:
            return torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
        idx = torch.searchsorted(self.keys, ids).clamp_(max=n - 1)
        return idx, self.keys[idx] == ids

    def pull(self, keys: Tensor, with_stats: bool = False) -> Tensor:
        if with_stats and self.stats is None:
            raise ValueError("output='cvm_lr_mf' needs show/click: export with pse.export(..., with_stats=True)")
        if self.keys.numel() == 0:
            return torch.zeros(keys.shape[0], (3 if with_stats else 1) + self.dim)
        idx, hit = self.find(keys)
        rows = self.values[idx].to(torch.float32)
        if with_stats:
            rows = torch.cat([self.stats[idx], rows], dim=1)
        rows.masked_fill_(~hit.unsqueeze(1), 0.0)
        return rows


class InferenceEmbedding(ConvertsOutput):
    r"""A read-only :class:`~torch_psembed.PSEmbedding` over the files written by :func:`torch_psembed.export`.

    It holds the exported keys (sorted) and their ``lr, mf`` rows in the exported dtype, and looks ids up
    with a binary search: no hash table, no optimizer state, no RPC. ``forward`` takes the same input as
    PSEmbedding and gives the same output for the rows the export holds (in the exported precision: rows are
    converted to float32 before pooling). Ids the export does not hold read zeros, as unknown ids do in
    PSEmbedding; note that by default only rows with an mf vector are exported, so their lr reads zero too.
    Backward computes no gradient for the rows (``per_sample_weights`` still get theirs).

    Args:
        keys (Tensor): ``(n,)`` int64 ids, strictly ascending.
        values (Tensor): ``(n, 1 + dim)`` rows ``lr, mf`` (float32, float16 or bfloat16).
        stats (Tensor, optional): ``(n, 2)`` float32 show, click; needed by ``output="cvm_lr_mf"``.
        mode, output, padding_id, include_last_offset, cvm_click_prior: as in :class:`~torch_psembed.PSEmbedding`
            (serve with the ``cvm_click_prior`` the model trained with).

    Shape:
        As :class:`~torch_psembed.PSEmbedding`: ``mode=None`` maps :math:`(*)` to :math:`(*, D)`; bags map
        2-D :math:`(B, N)` or 1-D ids with offsets to :math:`(B, D)`.

    Examples::

        >>> import torch, torch_psembed as pse
        >>> table = pse.SparseTable(pse.TableConfig(dim=4, accessor=pse.CtrAccessorConfig(embedx_threshold=0.0)))
        >>> _ = table.push(torch.tensor([3, 5]), torch.ones(2, 5), torch.ones(2), torch.zeros(2))
        >>> import tempfile; out = tempfile.mkdtemp()
        >>> _ = pse.export(table, out, dtype="float32")
        >>> inf = pse.InferenceEmbedding.load(out, mode="sum")
        >>> inf(torch.tensor([[3, 5, 7]])).shape
        torch.Size([1, 4])
    """

    def __init__(
        self,
        keys: Tensor,
        values: Tensor,
        stats: Optional[Tensor] = None,
        mode: Optional[str] = None,
        output: str = "mf",
        padding_id: Optional[int] = None,
        include_last_offset: bool = False,
        cvm_click_prior: float = 1.0,
    ) -> None:
        super().__init__()
        if mode not in PF.MODES:
            raise ValueError(f"mode must be one of None, 'sum', 'mean', got {mode!r}")
        keys = _keys_tensor(keys)
        n = keys.shape[0]
        if not isinstance(values, Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if values.dim() != 2 or values.shape[0] != n or values.shape[1] < 2:
            raise ValueError(f"values must have shape ({n}, 1 + dim), got {tuple(values.shape)}")
        if values.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"values must be float32, float16 or bfloat16, got {values.dtype}")
        if values.device.type != "cpu" or values.layout != torch.strided:
            raise ValueError(f"values must be a dense CPU tensor, got a {values.layout} tensor on {values.device}")
        if stats is not None:
            if not isinstance(stats, Tensor):
                raise TypeError(f"stats must be None or a torch.Tensor, got {type(stats).__name__}")
            if stats.dtype != torch.float32 or tuple(stats.shape) != (n, 2):
                raise ValueError(f"stats must be float32 of shape ({n}, 2), got {stats.dtype} {tuple(stats.shape)}")
            if stats.device.type != "cpu" or stats.layout != torch.strided:
                raise ValueError(f"stats must be a dense CPU tensor, got a {stats.layout} tensor on {stats.device}")
            stats = stats.contiguous()
        values = values.contiguous()
        problem = serving_rows_problem(keys, values, stats)
        if problem is not None:
            arg, i, what = problem
            raise ValueError(f"{arg} row {i} (key {int(keys[i])}): {what}")
        dim = values.shape[1] - 1
        self.embedding_dim = PF.output_dim(output, dim)
        if output == "cvm_lr_mf" and stats is None:
            raise ValueError("output='cvm_lr_mf' needs show/click: export with pse.export(..., with_stats=True)")
        padding_id = PF._check_padding_id(padding_id)
        include_last_offset = PF._check_include_last_offset(include_last_offset, mode)
        self.mode = mode
        self.output = output
        self.padding_id = padding_id
        self.include_last_offset = include_last_offset
        self.cvm_click_prior = PF._check_click_prior(cvm_click_prior)
        self.dim = dim
        self._rows = _ServingRows(keys, values, stats)

    @classmethod
    def load(
        cls,
        path,
        mode: Optional[str] = None,
        output: str = "mf",
        padding_id: Optional[int] = None,
        include_last_offset: bool = False,
        cvm_click_prior: float = 1.0,
    ) -> "InferenceEmbedding":
        """Load an export directory written by :func:`torch_psembed.export` (checksums verified)."""
        d = read_serving(os.fspath(path))
        m = d["manifest"]
        values = values_tensor(d["values"], m["dtype"])
        stats = torch.from_numpy(d["stats"]) if d["stats"] is not None else None
        if output == "cvm_lr_mf" and stats is None:
            raise ValueError(f"{path}: output='cvm_lr_mf' needs show/click, but this export has none "
                             "(export with with_stats=True)")
        return cls(torch.from_numpy(d["keys"]), values, stats, mode, output, padding_id, include_last_offset,
                   cvm_click_prior)

    def forward(self, input: Tensor, offsets: Optional[Tensor] = None,
                per_sample_weights: Optional[Tensor] = None) -> Tensor:
        out = PF.ps_embedding(
            input,
            self._rows,
            offsets,
            per_sample_weights,
            mode=self.mode,
            output=self.output,
            padding_id=self.padding_id,
            include_last_offset=self.include_last_offset,
            push=False,
            cvm_click_prior=self.cvm_click_prior,
        )
        return self._convert_output(out)

    def pull(self, keys: Tensor, with_stats: bool = False) -> Tensor:
        """Rows ``lr, mf`` (with ``show, click`` first when ``with_stats``) as float32; unknown keys read zeros.

        ``keys`` as :meth:`SparseTable.pull` takes them: a 1-D int64 tensor or numpy array."""
        return self._rows.pull(_keys_tensor(keys), with_stats)

    def __len__(self) -> int:
        return int(self._rows.keys.numel())

    def __contains__(self, key) -> bool:
        k = _as_key(key)
        if k is None:
            return False
        _, hit = self._rows.find(torch.tensor([k], dtype=torch.int64))
        return bool(hit[0])

    @property
    def nbytes(self) -> int:
        r = self._rows
        return r.keys.nbytes + r.values.nbytes + (r.stats.nbytes if r.stats is not None else 0)

    def extra_repr(self) -> str:
        s = f"keys={len(self)}, dim={self.dim}, dtype={self._rows.values.dtype}, output={self.output!r}"
        if self.mode is not None:
            s += f", mode={self.mode!r}"
        if self.padding_id is not None:
            s += f", padding_id={self.padding_id}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        if self.cvm_click_prior != 1.0:
            s += f", cvm_click_prior={self.cvm_click_prior}"
        if self.output_dtype != torch.float32:
            s += f", output_dtype={self.output_dtype}"
        return s
