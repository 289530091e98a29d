"""Slot embeddings for the CTR models: one ``(B, S, W)`` block per batch, from a PS table or a hashed table.

Both take a batch's ``keys`` and ``offsets`` (``B * S`` bags, see :mod:`torch_psembed.data`) and return the
sum-pooled rows of every (sample, slot) bag. ``lr_col`` is the column of the 1-dim lr weight, ``mf_cols``
the slice of the mf vector and ``cvm_cols`` the show/click columns (empty for the hashed table).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..data.hashing import mix64

__all__ = ["PSSlotEmbedding", "HashedSlotEmbedding"]


def _bag_lengths(offsets: Tensor, n: int) -> Tensor:
    return torch.diff(offsets, append=offsets.new_tensor([n]))


def _check_num_slots(num_slots) -> int:
    if not isinstance(num_slots, int) or isinstance(num_slots, bool) or num_slots < 1:
        raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
    return num_slots


def _check_batch(keys: Tensor, offsets: Tensor, num_slots: int) -> Tensor:
    """The keys as int64, after the checks of ``nn.EmbeddingBag`` on bags given by offsets (the per-slot split
    reads the bags from them: offsets[0] = 3 gave bags of the wrong keys, silently). Raises naming the problem."""
    for name, t in (("keys", keys), ("offsets", offsets)):
        if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            what = f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a 1-D int64 or int32 tensor, got {what}")
    n_bags = offsets.numel()
    if n_bags % num_slots:
        raise ValueError(f"offsets must have B * num_slots = B * {num_slots} entries, got {n_bags}")
    if n_bags:
        if int(offsets[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
        if n_bags > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError("offsets must not decrease")
        if int(offsets[-1]) > keys.numel():
            raise ValueError(f"offsets[-1] = {int(offsets[-1])} is past the {keys.numel()} keys")
    elif keys.numel():
        raise ValueError(f"{keys.numel()} keys but no bags (offsets is empty)")
    return keys.to(torch.int64)


def _one_key_per_bag(keys: Tensor, offsets: Tensor) -> bool:
    """Whether every bag holds exactly one key: ``offsets == arange(num_bags)`` and as many keys as bags. The
    key count alone does not tell (an empty bag and a bag of two keys also add up to one key per bag)."""
    n = offsets.numel()
    if keys.numel() != n:
        return False
    return torch.equal(offsets, torch.arange(n, dtype=offsets.dtype, device=offsets.device))


class PSSlotEmbedding(nn.Module):
    r"""Sum-pooled slot embeddings from one sharded :class:`~torch_psembed.SparseTable`.

    When every bag holds exactly one key (Criteo, the simulator) one ``PSEmbedding`` looks up the ``(B, S)``
    key matrix in a single pull/push (``mode=None``; each sample is one instance, so ``pse.feed(clicks=...)``
    takes the ``(B,)`` labels), pushing column ``i``'s keys with slot ``i`` (``slots=arange(S)``). Otherwise one
    ``PSEmbedding(slot=i, mode="sum")`` per slot, all over the same table, pools slot ``i``'s bags. Either way
    the keys of slot ``i`` (bag ``b`` is slot ``b % S``) record slot ``i`` in the table.

    Args:
        table (SparseTable): the table.
        num_slots (int): slots ``S`` per sample.
        output (str): ``PSEmbedding`` output kind. Default: ``"cvm_lr_mf"``.
        cvm_click_prior (float): ``PSEmbedding``'s prior click count of the ctr column. Default: ``1.0``.

    Shape:
        - Input: ``keys (N,)``, ``offsets (B * S,)``
        - Output: ``(B, S, W)``, ``W = 3 + dim`` for ``cvm_lr_mf``
    """

    def __init__(self, table, num_slots: int, output: str = "cvm_lr_mf", cvm_click_prior: float = 1.0) -> None:
        super().__init__()
        import torch_psembed as pse

        from .. import functional as PF

        self.width = PF.output_dim(output, table.dim)  # (ValueError naming a bad output)
        self.num_slots = _check_num_slots(num_slots)
        self.output = output
        lead = PF.OUTPUTS[output]
        self.cvm_cols = slice(0, 2) if output == "cvm_lr_mf" else slice(0, 0)
        self.lr_col: Optional[int] = lead - 1 if lead else None
        self.mf_cols = slice(lead, lead + table.dim)
        kw = dict(output=output, cvm_click_prior=cvm_click_prior)
        self.single = pse.PSEmbedding(table, mode=None, slot=0, **kw)  # pushes with slots=self._slots
        self._slots = torch.arange(self.num_slots, dtype=torch.int32)  # column i of the (B, S) keys: slot i
        self.per_slot = nn.ModuleList([pse.PSEmbedding(table, mode="sum", slot=i, **kw) for i in range(num_slots)])

    def enable_timing(self, enabled: bool = True) -> None:
        """Sum the seconds per ``PSEmbedding`` phase (``Timings``) over this module's lookups."""
        for m in (self.single, *self.per_slot):
            m.enable_timing(enabled)

    def timing(self) -> Optional[Dict[str, float]]:
        """Seconds per phase summed over the lookups since :meth:`enable_timing` (None when it is off)."""
        timed = [m.timings for m in (self.single, *self.per_slot) if m.timings is not None]
        if not timed:
            return None
        out: Dict[str, float] = {}
        for t in timed:
            for k, v in t.as_dict().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def reset_timing(self) -> None:
        for m in (self.single, *self.per_slot):
            if m.timings is not None:
                m.timings.reset()

    def prefetch(self, keys: Tensor, offsets: Tensor) -> None:
        """Start the pull of the batch :meth:`forward` gets next (``PSEmbedding.prefetch``). Only the single
        lookup of one key per bag is prefetched: the per-slot lookups are several pulls of one table, and a
        table holds one prefetched pull."""
        S = self.num_slots
        # (no batch check here: one key per bag with offsets == arange is a valid batch; the forward checks)
        if offsets.numel() % S == 0 and _one_key_per_bag(keys, offsets):
            self.single.prefetch(keys.view(-1, S))

    def forward(self, keys: Tensor, offsets: Tensor) -> Tensor:
        S = self.num_slots
        keys = _check_batch(keys, offsets, S)
        n_bags = offsets.numel()
        B = n_bags // S
        if _one_key_per_bag(keys, offsets):  # offsets == arange(n_bags): the (B, S) key matrix
            return self.single(keys.view(B, S), slots=self._slots)
        lengths = _bag_lengths(offsets, keys.numel())
        slot_of_key = torch.arange(n_bags, device=offsets.device).remainder(S).repeat_interleave(lengths)
        order = torch.argsort(slot_of_key, stable=True)
        sorted_keys = keys[order]
        per_slot_len = lengths.view(B, S)
        counts = per_slot_len.sum(0).tolist()
        outs = []
        start = 0
        for i, emb in enumerate(self.per_slot):
            k = sorted_keys[start : start + counts[i]]
            start += counts[i]
            ln = per_slot_len[:, i]
            off = torch.cumsum(ln, 0) - ln
            outs.append(emb(k, off))
        return torch.stack(outs, 1)


class HashedSlotEmbedding(nn.Module):
    r"""The baseline: ``nn.EmbeddingBag(num_buckets, dim, mode="sum", sparse=True)`` over hashed feasigns.

    A feasign ``f`` uses row ``mix64(f) % num_buckets`` (collisions share a row). Column 0 plays the lr
    weight (initialised to 0), the other ``dim - 1`` columns the mf vector (``U(-init_range, init_range)``).
    Train it with a sparse optimizer (``torch.optim.Adagrad`` or ``SparseAdam``).

    Args:
        num_buckets (int): rows of the table.
        dim (int): row width (lr + mf). Default: 9.
        num_slots (int): slots ``S`` per sample.
        init_range (float): initial mf values are uniform in ``(-init_range, init_range)``. Default: 0.01.
    """

    def __init__(self, num_buckets: int, dim: int, num_slots: int, init_range: float = 0.01) -> None:
        super().__init__()
        if not isinstance(num_buckets, int) or num_buckets < 1:
            raise ValueError(f"num_buckets must be an int >= 1, got {num_buckets!r}")
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an int >= 2 (lr + mf), got {dim!r}")
        self.num_buckets = num_buckets
        self.num_slots = _check_num_slots(num_slots)
        self.width = dim
        self.cvm_cols = slice(0, 0)
        self.lr_col: Optional[int] = 0
        self.mf_cols = slice(1, dim)
        self.bag = nn.EmbeddingBag(num_buckets, dim, mode="sum", sparse=True)
        with torch.no_grad():
            self.bag.weight.uniform_(-init_range, init_range)
            self.bag.weight[:, 0] = 0.0

    def bucket(self, keys: Tensor) -> Tensor:
        """Each key's row, on the keys' device (the hash itself runs on the host, in numpy's uint64)."""
        # as int64 first: the uint64 view of an int32 array would read two keys as one
        h = mix64(keys.to(torch.int64).cpu().numpy().view(np.uint64)) % np.uint64(self.num_buckets)
        return torch.from_numpy(h.astype(np.int64)).to(keys.device)

    def forward(self, keys: Tensor, offsets: Tensor) -> Tensor:
        S = self.num_slots
        keys = _check_batch(keys, offsets, S)
        out = self.bag(self.bucket(keys), offsets)
        return out.view(-1, S, self.width)

    def memory_bytes(self, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Bytes of the weight plus the optimizer's per-row state tensors for it (e.g. Adagrad's sum)."""
        w = self.bag.weight
        total = w.numel() * w.element_size()
        if optimizer is not None:
            for t in optimizer.state.get(w, {}).values():
                if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == w.shape[0]:
                    total += t.numel() * t.element_size()
        return total
