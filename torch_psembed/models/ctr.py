"""CTR models over slot embeddings: the classic CTR DNN (wide lr + MLP) and DeepFM.

Both read a ``(B, S, W)`` block from a slot embedding (:mod:`torch_psembed.models.embeddings`) and return
one logit per sample. The dense part (the MLP) is ordinary ``nn.Parameter``\\ s trained by a dense optimizer
under DDP; the sparse part is updated by the table (PS) or by a sparse optimizer (hashed baseline).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from torch import Tensor, nn

__all__ = ["CTRDNN", "DeepFM", "build_model", "MODELS"]


NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": lambda n: nn.Identity()}


def _mlp(n_in: int, hidden: Sequence[int]) -> nn.Sequential:
    layers = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), nn.ReLU()]
        n_in = h
    layers.append(nn.Linear(n_in, 1))
    return nn.Sequential(*layers)


class CTRDNN(nn.Module):
    r"""The classic CTR DNN: all slots' pooled rows (CVM, lr, mf), concatenated, into an MLP.

    ``logit = mlp(concat_s e_s) + sum_s lr_s`` (the second term, ``wide``, is the LR part).

    Args:
        embedding (nn.Module): a slot embedding with ``num_slots``, ``width`` and ``lr_col``.
        hidden (sequence of int): MLP hidden widths. Default: ``(256, 128, 64)``.
        wide (bool): add the summed lr column to the logit. Default: True.
        norm (str): normalisation of the MLP input: ``"batch"`` (``BatchNorm1d``, per column, like Paddle's
            data_norm), ``"layer"`` (``LayerNorm``) or ``"none"``. Default: ``"batch"``.

    Shape:
        - Input: ``keys (N,)``, ``offsets (B * S,)``
        - Output: ``(B,)`` logits
    """

    def __init__(
        self, embedding: nn.Module, hidden: Sequence[int] = (256, 128, 64), wide: bool = True, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.embedding = embedding
        self.num_slots = embedding.num_slots
        self.wide = wide and embedding.lr_col is not None
        n_in = embedding.num_slots * embedding.width
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
        self.norm = NORMS[norm](n_in)
        self.mlp = _mlp(embedding.num_slots * embedding.width, hidden)

    def features(self, keys: Tensor, offsets: Tensor) -> Tensor:
        return self.embedding(keys, offsets)

    def _normed(self, x: Tensor) -> Tensor:
        n = self.norm
        if isinstance(n, nn.BatchNorm1d) and self.training and x.shape[0] < 2:
            # a one-sample batch has no batch statistics: use the running ones (and leave them as they are)
            return nn.functional.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        return n(x)

    def forward(self, keys: Tensor, offsets: Tensor) -> Tensor:
        e = self.features(keys, offsets)
        logit = self.mlp(self._normed(e.flatten(1))).squeeze(1)
        if self.wide:
            logit = logit + e[:, :, self.embedding.lr_col].sum(1)
        return logit


class DeepFM(CTRDNN):
    r"""DeepFM: the CTR DNN plus a factorization machine over the slots' mf vectors.

    ``logit = mlp(...) + sum_s lr_s + 1/2 sum_k ((sum_s v_sk)^2 - sum_s v_sk^2)``.
    """

    def forward(self, keys: Tensor, offsets: Tensor) -> Tensor:
        e = self.features(keys, offsets)
        logit = self.mlp(self._normed(e.flatten(1))).squeeze(1)
        if self.wide:
            logit = logit + e[:, :, self.embedding.lr_col].sum(1)
        v = e[:, :, self.embedding.mf_cols]
        fm = 0.5 * (v.sum(1).pow(2) - v.pow(2).sum(1)).sum(1)
        return logit + fm


MODELS = {"dnn": CTRDNN, "deepfm": DeepFM}


def build_model(
    kind: str, embedding: nn.Module, hidden: Sequence[int] = (256, 128, 64), wide: bool = True, norm: str = "batch"
) -> nn.Module:
    """``CTRDNN`` (``kind="dnn"``) or ``DeepFM`` (``kind="deepfm"``) over ``embedding``."""
    if kind not in MODELS:
        raise ValueError(f"model kind must be one of {tuple(MODELS)}, got {kind!r}")
    # a list of ints: int() made the string "128" three layers of 1, 2 and 8, and 2.7 a layer of 2
    if isinstance(hidden, (str, bytes)) or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool)
                                                   for h in hidden):
        raise ValueError(f"hidden must be a list of int widths, got {hidden!r}")
    hidden = [int(h) for h in hidden]
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be >= 1, got {hidden!r}")
    return MODELS[kind](embedding, hidden, wide, norm)
