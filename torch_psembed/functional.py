"""The stateless computation behind :class:`~torch_psembed.PSEmbedding`.

``ps_embedding`` checks the input the way ``torch.nn.functional.embedding_bag`` does, dedups the ids
(a hash dedup with the inverse index, :func:`dedup`), pulls the unique rows once through
:class:`~torch_psembed._autograd.PullPush` and builds the output over the pulled ``(U, D)`` rows with the
inverse index as input: ``index_select`` for ``mode=None`` (the gather ``nn.Embedding`` computes) and the very
``F.embedding_bag`` that ``nn.EmbeddingBag`` uses for bags. So the output is
that of ``nn.Embedding``/``nn.EmbeddingBag`` over a weight holding the same rows, and autograd reduces the
incoming gradient to one row per unique id, which ``PullPush.backward`` pushes with show/click counts.

:func:`pool` is the pooling math alone (any float dtype, ordinary autograd): tests run ``gradcheck`` on it in
float64.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _autograd

__all__ = [
    "ps_embedding",
    "pool",
    "pool_forward",
    "pool_backward",
    "output_dim",
    "Batch",
    "check_input",
    "to_host",
    "dedup",
    "Dedup",
    "Groups",
    "slot_of_keys",
    "MODES",
    "OUTPUTS",
]

MODES = (None, "sum", "mean")

# Extra leading columns of each output kind, before the ``dim`` mf columns.
OUTPUTS = {"mf": 0, "lr_mf": 1, "cvm_lr_mf": 3}


def output_dim(output: str, dim: int) -> int:
    """The width ``D`` of the output rows: ``dim``, ``1 + dim`` or ``3 + dim`` (ValueError for another output)."""
    return OUTPUTS[_check_output(output)] + dim


class Batch(NamedTuple):
    """A checked input: what to look up and how the lookups form the output.

    ``ids`` is flat int64 (ids in no bag are dropped, as ``nn.EmbeddingBag`` ignores them: those past
    ``offsets[-1]`` with ``include_last_offset``, and all of them when ``offsets`` is empty without it);
    ``shape`` is the shape ``ids`` is viewed as for the pooling op (the input shape for ``mode=None`` and 2-D
    bags, ``(n,)`` with offsets); ``offsets`` is the int64 offsets (``None``
    unless 1-D ids with offsets); ``per_sample_weights`` is viewed like ``ids``; ``num_instances`` is the batch
    size: the first dim for ``mode=None`` (1 for a 0-d input), the rows of 2-D ids, or the number of bags.
    """

    ids: Tensor
    shape: Tuple[int, ...]
    offsets: Optional[Tensor]
    per_sample_weights: Optional[Tensor]
    num_instances: int
    include_last_offset: bool

    def instance_of_each_id(self) -> Tensor:
        """``int64[n]``: the instance (batch row or bag) each id belongs to."""
        n = self.ids.numel()
        if self.offsets is None:
            per = n // self.num_instances if self.num_instances else 0
            return torch.arange(self.num_instances).repeat_interleave(per)
        if self.include_last_offset:
            ends = self.offsets[1:]
        else:
            ends = torch.cat([self.offsets[1:], self.offsets.new_tensor([n])])
        lengths = ends - self.offsets[: self.num_instances]
        return torch.arange(self.num_instances).repeat_interleave(lengths)


def to_host(
    input: Tensor, offsets: Optional[Tensor] = None, per_sample_weights: Optional[Tensor] = None
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[torch.device]]:
    """``(input, offsets, per_sample_weights)`` copied to the CPU when the ids live on an accelerator, with that
    device (``None`` when they are on the CPU already, and then nothing is copied).

    The table lives in host memory, so the lookup runs there: the ids come over once, the output goes back once,
    and autograd carries its gradient over in the backward (``Tensor.to`` is differentiable). As with
    ``nn.EmbeddingBag``, offsets and weights must be on the ids' device.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of int64 ids, got {type(input).__name__}")
    device = input.device
    for name, t in (("offsets", offsets), ("per_sample_weights", per_sample_weights)):
        if isinstance(t, Tensor) and t.device != device:
            raise RuntimeError(f"{name} must be on the device of input ({device}), got a tensor on {t.device}")
    if device.type == "cpu":
        return input, offsets, per_sample_weights, None
    if device.type == "meta":
        raise RuntimeError("input is on the meta device: it holds no ids to look up")
    host = lambda t: None if t is None else t.cpu()  # noqa: E731
    return input.cpu(), host(offsets), host(per_sample_weights), device


def _check_ids(input: Tensor) -> Tensor:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of int64 ids, got {type(input).__name__}")
    if input.device.type != "cpu":  # ps_embedding and prefetch bring accelerator ids over first (to_host)
        raise RuntimeError(f"input must be a CPU tensor here (see to_host), got a tensor on {input.device}")
    if input.layout != torch.strided:
        raise RuntimeError(f"input must be a dense (strided) tensor, got layout {input.layout}")
    if input.dtype == torch.int32:
        return input.long()
    if input.dtype != torch.int64:
        # nn.Embedding / nn.EmbeddingBag raise RuntimeError for non-integer ids; so do we.
        raise RuntimeError(f"input must hold integer ids of dtype torch.int64 (or torch.int32), got {input.dtype}")
    return input


def _check_offsets(offsets: Tensor, n: int, include_last_offset: bool) -> Tensor:
    """Offsets as int64, checked as ``embedding_bag`` checks them (RuntimeError like its kernel)."""
    if offsets.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(
            f"offsets must be an integer tensor of dtype torch.int64 or torch.int32, got {offsets.dtype}"
        )
    if offsets.device.type != "cpu":
        raise RuntimeError(f"offsets must be a CPU tensor, got a tensor on {offsets.device}")
    offsets = offsets.long()
    m = offsets.numel()
    if include_last_offset and m < 1:
        raise RuntimeError("include_last_offset: number of offset should be at least 1 (offsets is empty)")
    if m == 0:
        return offsets
    first = int(offsets[0])
    if first != 0:
        raise RuntimeError(
            "offsets[0] has to be 0, i.e., the first sequence in the mini-batch has to start from position 0. "
            f"However, got {first}"
        )
    last = int(offsets[-1])
    if last > n:
        raise RuntimeError(f"offsets[-1] can not be greater than input's length {n} but got offsets[-1] of {last}")
    if m > 1:
        steps = offsets[1:] - offsets[:-1]
        bad = torch.nonzero(steps < 0)
        if bad.numel():
            i = int(bad[0, 0]) + 1
            raise RuntimeError(
                f"offsets must be non-decreasing, but offsets[{i}] = {int(offsets[i])} < offsets[{i - 1}] = "
                f"{int(offsets[i - 1])}"
            )
    return offsets


def check_input(
    input: Tensor,
    offsets: Optional[Tensor] = None,
    per_sample_weights: Optional[Tensor] = None,
    mode: Optional[str] = None,
    include_last_offset: bool = False,
    weight_dtype: torch.dtype = torch.float32,
) -> Batch:
    """Validate ``(input, offsets, per_sample_weights)`` like ``nn.Embedding``/``nn.EmbeddingBag`` do.

    The exception types are theirs: ``ValueError`` for shapes and argument combinations, ``RuntimeError`` for
    dtypes and offset values, ``NotImplementedError`` for ``per_sample_weights`` with ``mode="mean"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of None, 'sum', 'mean', got {mode!r}")
    input = _check_ids(input)
    if mode is None:
        if offsets is not None:
            raise ValueError("offsets is only supported with mode='sum' or 'mean' (mode=None works like nn.Embedding)")
        if per_sample_weights is not None:
            raise ValueError("per_sample_weights is only supported with mode='sum' (mode=None works like nn.Embedding)")
        b = input.shape[0] if input.dim() > 0 else 1
        return Batch(input.reshape(-1), tuple(input.shape), None, None, b, False)

    # The checks of torch.nn.functional.embedding_bag, in its order.
    if per_sample_weights is not None:
        if not isinstance(per_sample_weights, Tensor):
            raise TypeError(f"per_sample_weights must be a torch.Tensor, got {type(per_sample_weights).__name__}")
        if input.size() != per_sample_weights.size():
            raise ValueError(
                f"embedding_bag: If per_sample_weights ({per_sample_weights.shape}) is not None, "
                f"then it must have the same shape as the input ({input.shape})"
            )
    if offsets is not None and not isinstance(offsets, Tensor):
        raise TypeError(f"offsets must be a 1D torch.Tensor, got {type(offsets).__name__}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError(
                "if input is 2D, then offsets has to be None, as input is treated is a mini-batch of fixed length "
                f"sequences. However, found offsets of type {type(offsets)}"
            )
        if input.shape[1] == 0:
            # nn.EmbeddingBag fails here too (RuntimeError "step must be nonzero").
            raise RuntimeError(f"input of shape {tuple(input.shape)} has no ids per bag; 2-D input needs >= 1 column")
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError(f"offsets has to be a 1D Tensor, got a {offsets.dim()}-D tensor")
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(
                "embedding_bag: per_sample_weights was not None. per_sample_weights is only supported for "
                f"mode='sum' (got mode='{mode}')."
            )
        if per_sample_weights.dtype != weight_dtype:
            raise RuntimeError(
                f"per_sample_weights must have the dtype of the embedding rows ({weight_dtype}), "
                f"got {per_sample_weights.dtype}"
            )
        if per_sample_weights.device.type != "cpu":
            raise RuntimeError(f"per_sample_weights must be a CPU tensor, got a tensor on {per_sample_weights.device}")

    if input.dim() == 2:
        return Batch(input.reshape(-1), tuple(input.shape), None, per_sample_weights, input.shape[0], False)
    offsets = _check_offsets(offsets, input.numel(), include_last_offset)
    b = offsets.numel() - 1 if include_last_offset else offsets.numel()
    # Ids past the last bag belong to no bag: never looked up or pushed (nn.EmbeddingBag ignores them too).
    # Empty offsets without include_last_offset are zero bags (an output of shape (0, D)), so that is every id.
    end = int(offsets[-1]) if include_last_offset else (input.numel() if b > 0 else 0)
    if end < input.numel():
        input = input[:end]
        if per_sample_weights is not None:
            per_sample_weights = per_sample_weights[:end]
    return Batch(input, (input.numel(),), offsets, per_sample_weights, b, include_last_offset)


class Groups(NamedTuple):
    """The ids grouped by value, from :func:`dedup`: lets the backward reduce the gradient with one
    ``embedding_bag`` (parallel) instead of a serial ``index_add_``.

    ``order`` lists the positions of the ids grouped by id (ascending within a group), so each id's occurrences
    are contiguous; ``starts[j]`` is where the j-th distinct id (in order of first occurrence, the padding id
    included) starts in ``order``; ``padding_pos`` is the padding id's j (None without padding).
    """

    order: Tensor
    starts: Tensor
    padding_pos: Optional[int]


class Dedup(NamedTuple):
    """``keys[inverse] == ids`` except at the padding id, which is left out of ``keys`` and mapped to
    ``padding_row = len(keys)`` (a zero row appended after the pulled rows; None when the padding id does not
    occur). ``keys`` are in order of first occurrence in ``ids``."""

    keys: Tensor
    inverse: Tensor
    padding_row: Optional[int]
    groups: Groups


def dedup(ids: Tensor, padding_id: Optional[int] = None) -> Dedup:
    """The unique ids to pull and where each id's row is (like ``torch.unique(return_inverse=True)``, in order of
    first occurrence), with the groups the backward reduces over.

    One pass of the C++ hash dedup plus a counting sort (``_C.dedup(groups=True)``): O(n), where a sort-based
    ``torch.unique`` is O(n log n) and, on a busy machine, pays for its parallel sort's threads.
    """
    from . import _C

    ids = ids.contiguous()
    keys, inverse, order, starts = (torch.from_numpy(a) for a in _C.dedup(ids.numpy(), groups=True))
    u = keys.numel()
    if padding_id is None or u == 0:
        return Dedup(keys, inverse, None, Groups(order, starts, None))
    hit = (keys == padding_id).nonzero()
    if hit.numel() == 0:
        return Dedup(keys, inverse, None, Groups(order, starts, None))
    p = int(hit[0, 0])
    keys = torch.cat([keys[:p], keys[p + 1 :]])
    inverse = torch.where(inverse == p, u - 1, inverse - (inverse > p).long())
    return Dedup(keys, inverse, u - 1, Groups(order, starts, p))


def slot_of_keys(slots: Tensor, groups: Groups) -> Tensor:
    """``int32[U]``: per-id ``slots`` (int32, like the deduped ids) reduced to one per key of :func:`dedup`'s
    ``keys`` (padding left out): the slot of the key's last occurrence, as the table's merge keeps the last
    slot of a key repeated in one push. O(U): the last position of each id group."""
    starts, n = groups.starts, slots.numel()
    if starts.numel() == 0:
        return slots.new_empty(0)
    ends = torch.cat([starts[1:], starts.new_tensor([n])]) - 1
    last = groups.order.index_select(0, ends)
    p = groups.padding_pos
    if p is not None:
        last = torch.cat([last[:p], last[p + 1 :]])
    return slots.index_select(0, last)


def pool(
    rows: Tensor,
    inverse: Tensor,
    batch: Batch,
    mode: Optional[str],
    padding_row: Optional[int] = None,
    groups: Optional[Groups] = None,
) -> Tensor:
    """The output from the unique rows: ``nn.Embedding``/``nn.EmbeddingBag`` over ``rows`` at ``inverse``.

    The forward is ``index_select`` (``mode=None``) or ``F.embedding_bag`` itself (bags); the backward (:class:`~torch_psembed.
    _autograd.Pool`) reduces the gradient with one ``embedding_bag`` over the id groups of ``groups`` (or an
    ``index_add_`` without them), several times faster on CPU than their own dense backward.

    Args:
        rows (Tensor): ``(U, D)`` rows, any float dtype (``batch.per_sample_weights`` must match it).
        inverse (Tensor): int64 row index of each id, like ``batch.ids``.
        batch (Batch): from :func:`check_input`.
        mode (str or None): ``None``, ``"sum"`` or ``"mean"``.
        padding_row (int, optional): a row left out of bags (and of mean's count), as ``padding_idx`` does in
            ``nn.EmbeddingBag``. For ``mode=None`` it is read like any row: the caller keeps it at zero.
        groups (Groups, optional): from :func:`dedup`, for the fast backward.
    """
    return _autograd.Pool.apply(rows, batch.per_sample_weights, inverse, batch, mode, padding_row, groups)


def pool_forward(rows: Tensor, psw: Optional[Tensor], inverse: Tensor, batch: Batch, mode, padding_row) -> Tensor:
    """The forward of :func:`pool` (no autograd)."""
    if mode is None:
        # Gathered into the output's own storage, not returned as a view of the gather: autograd forbids
        # in-place changes to a view made inside a custom Function, and nn.Embedding's output allows them
        # (h += 1, relu_, Dropout(inplace=True)).
        out = rows.new_empty(batch.shape + (rows.shape[1],))
        torch.index_select(rows, 0, inverse, out=out.view(-1, rows.shape[1]))
        return out
    idx = inverse.view(batch.shape)
    if psw is not None:
        psw = psw.reshape(batch.shape)
    return F.embedding_bag(
        idx,
        rows,
        batch.offsets,
        mode=mode,
        per_sample_weights=psw,
        include_last_offset=batch.include_last_offset,
        padding_idx=padding_row,
    )


def pool_backward(
    grad: Tensor,
    rows: Tensor,
    psw: Optional[Tensor],
    inverse: Tensor,
    batch: Batch,
    mode,
    padding_row,
    need_rows: bool,
    need_psw: bool,
    groups: Optional[Groups] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`pool` for ``rows`` (one row per unique id) and ``per_sample_weights``.

    Each id ``i`` contributes ``w_i * grad[out_i]`` to its row, where ``out_i`` is its output row (its own for
    ``mode=None``, its bag otherwise) and ``w_i`` is 1, its per-sample weight, or ``1 / (ids in the bag)``
    for ``"mean"``; the padding row is in no bag (``w_i = 0``).
    """
    d = grad.shape[-1]
    if mode is None:
        src_rows = grad.reshape(-1, d).contiguous()  # id i's gradient is row i
        out_of_id = None  # identity
        w = None
    else:
        src_rows = grad.contiguous()
        out_of_id = batch.instance_of_each_id()
        valid = None if padding_row is None else (inverse != padding_row)
        if mode == "mean":
            counted = out_of_id if valid is None else out_of_id[valid]
            counts = torch.bincount(counted, minlength=batch.num_instances).clamp_(min=1).to(grad.dtype)
            w = counts.reciprocal().index_select(0, out_of_id)
            if valid is not None:
                w = w * valid
        elif psw is not None:
            w = psw.reshape(-1).to(grad.dtype)
            if valid is not None:
                w = w * valid
        else:
            w = None if valid is None else valid.to(grad.dtype)
    grad_rows = grad_psw = None
    if need_rows:
        if groups is not None and inverse.numel() > 0:
            # sum over each id's occurrences = an embedding_bag over the gradient rows, one bag per unique id
            src = groups.order if out_of_id is None else out_of_id.index_select(0, groups.order)
            wo = None if w is None else w.index_select(0, groups.order)
            by_key = F.embedding_bag(src, src_rows, groups.starts, mode="sum", per_sample_weights=wo)
            p = groups.padding_pos
            grad_rows = by_key if p is None else torch.cat([by_key[:p], by_key[p + 1 :], by_key[p : p + 1]])
        else:
            src = src_rows if out_of_id is None else src_rows.index_select(0, out_of_id)
            if w is not None:
                src = src * w.unsqueeze(1)
            grad_rows = torch.zeros(rows.shape, dtype=grad.dtype).index_add_(0, inverse, src)
    if need_psw and psw is not None:
        g_occ = src_rows if out_of_id is None else src_rows.index_select(0, out_of_id)
        gp = (g_occ * rows.index_select(0, inverse)).sum(1)
        if padding_row is not None:
            gp = gp * (inverse != padding_row)
        grad_psw = gp.view(psw.shape)
    return grad_rows, grad_psw


def ps_embedding(
    input: Tensor,
    table,
    offsets: Optional[Tensor] = None,
    per_sample_weights: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    output: str = "mf",
    slot: int = 0,
    padding_id: Optional[int] = None,
    include_last_offset: bool = False,
    grad_scale: Optional[float] = None,
    clicks: Optional[Tensor] = None,
    push: bool = True,
    timings: Optional[_autograd.Timings] = None,
    dedup_cache: Optional[Tuple[Tensor, Dedup]] = None,
    cvm_click_prior: float = 1.0,
    grad_scaler=None,
) -> Tensor:
    """Look up ``input`` in ``table`` and pool like ``nn.Embedding``/``nn.EmbeddingBag``.

    See :class:`~torch_psembed.PSEmbedding` for the arguments. ``push=False`` (eval) pulls without building the
    push: the rows are constants, and only ``per_sample_weights`` can get a gradient. ``clicks`` are the labels
    of the instances (shape ``(num_instances,)``); ``grad_scale`` defaults to ``num_instances``.
    ``cvm_click_prior`` is the ctr column's prior click count (``cvm_lr_mf``; see ``PSEmbedding``).
    ``slot`` is an int, or an integer tensor broadcastable to the shape of ``input`` giving each id its slot
    (see ``PSEmbedding.forward``'s ``slots``).
    ``dedup_cache`` (ids, ``dedup(ids, padding_id)``), as ``PSEmbedding.prefetch`` keeps it, is used instead of a
    new dedup when the ids are equal. ``grad_scaler`` (a ``torch.amp.GradScaler``): see ``PSEmbedding``.
    """
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "PSEmbedding does not support torch.func transforms (vmap, grad, jacrev, functional_call under "
            "them, ...): its backward pushes rows to the table as a side effect"
        )
    _refuse_tracing()
    output = _check_output(output)
    cvm_click_prior = _check_click_prior(cvm_click_prior)
    input, offsets, per_sample_weights, device = to_host(input, offsets, per_sample_weights)
    slot = _check_slots(slot, input.shape) if isinstance(slot, Tensor) else _check_slot(slot)
    t0 = time.perf_counter() if timings is not None else 0.0
    batch = check_input(input, offsets, per_sample_weights, mode, include_last_offset)
    if dedup_cache is not None and dedup_cache[0].shape == batch.ids.shape and torch.equal(dedup_cache[0], batch.ids):
        keys, inverse, padding_row, groups = dedup_cache[1]
    else:
        keys, inverse, padding_row, groups = dedup(batch.ids, padding_id)
    if timings is not None:
        t1 = time.perf_counter()
        timings.add("unique", t1 - t0)

    grad_needed = push and torch.is_grad_enabled()
    if grad_needed:
        grad_scale = _check_grad_scale(grad_scale)
        scale = float(batch.num_instances) if grad_scale is None else grad_scale
        labels = None
        if clicks is not None:
            if clicks.shape != (batch.num_instances,):
                raise ValueError(
                    f"clicks fed with pse.feed(clicks=...) must have shape ({batch.num_instances},) (one label per "
                    f"instance of this batch), got {tuple(clicks.shape)}"
                )
            labels = clicks.cpu()  # a no-op for the labels pse.feed captured (they are on the CPU)
        if isinstance(slot, Tensor):  # one slot per id of batch.ids (ids past the last bag were dropped)
            slot = slot_of_keys(slot.expand(input.shape).reshape(-1)[: batch.ids.numel()], groups)
        plan = _autograd.PushPlan(
            table=table,
            keys=keys,
            inverse=inverse,
            batch=batch,
            output=output,
            padding_row=padding_row,
            grad_scale=scale,
            slot=slot,
            clicks=labels,
            timings=timings,
            click_prior=cvm_click_prior,
            grad_scaler=grad_scaler,
        )
        rows = _autograd.PullPush.apply(_autograd.ANCHOR, plan)
    else:
        with torch.no_grad():
            rows = _autograd.pull_rows(table, keys, output, padding_row, timings, cvm_click_prior)
    t2 = time.perf_counter() if timings is not None else 0.0
    out = pool(rows, inverse, batch, mode, padding_row, groups)
    if timings is not None:
        timings.add("pool", time.perf_counter() - t2)
        if grad_needed:
            out = _autograd.BackwardMark.apply(out, timings)
    return out if device is None else out.to(device)


def _refuse_tracing() -> None:
    """A RuntimeError naming TorchScript / torch.export while one of them traces the call.

    The lookup runs the table and the dedup in Python and C++ outside torch's ops: a trace would bake this
    batch's rows and dedup into constants (or fail deep inside), and the push is a side effect of backward.
    ``torch.compile`` is not refused: dynamo runs the module eagerly at its graph breaks.
    """
    if torch.jit.is_tracing():
        raise RuntimeError(
            "PSEmbedding and InferenceEmbedding do not support TorchScript (torch.jit.trace / torch.jit.script): "
            "they look their rows up in the table from Python, so a trace would freeze this batch's rows; run "
            "them eagerly or under torch.compile"
        )
    if getattr(torch.compiler, "is_exporting", lambda: False)():  # (torch >= 2.7; before it, no export check)
        raise RuntimeError(
            "PSEmbedding and InferenceEmbedding do not support torch.export: they look their rows up in the table "
            "from Python, so an exported program would freeze this batch's rows; run them eagerly or under "
            "torch.compile"
        )


def _check_output(output) -> str:
    """``output``, or a ValueError naming it (one of :data:`OUTPUTS`)."""
    if not isinstance(output, str) or output not in OUTPUTS:
        raise ValueError(f"output must be one of {tuple(OUTPUTS)}, got {output!r}")
    return output


def _check_slot(slot) -> int:
    """``slot`` as an int, or a ValueError naming it (an int in ``[0, 2**24)``: a checkpoint stores slots as
    float32, exact up to ``2**24``)."""
    from . import _C

    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= int(slot) < _C.SLOT_LIMIT:
        raise ValueError(f"slot must be an int in [0, 2**24), got {slot!r}")
    return int(slot)


def _check_slots(slots: Tensor, shape: torch.Size) -> Tensor:
    """Per-id slots as an int32 CPU tensor (not yet broadcast), or an exception naming them: an integer tensor
    broadcastable to the ids' ``shape``, with values in ``[0, 2**24)`` (ValueError; TypeError for the dtype)."""
    from . import _C

    if slots.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"slots must be an integer tensor, got dtype {slots.dtype}")
    try:
        fits = torch.broadcast_shapes(slots.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"slots of shape {tuple(slots.shape)} do not broadcast to the ids' shape {tuple(shape)}")
    slots = slots.cpu()
    if slots.numel():
        lo, hi = int(slots.min()), int(slots.max())
        if lo < 0 or hi >= _C.SLOT_LIMIT:
            raise ValueError(f"slots must be in [0, 2**24), got values in [{lo}, {hi}]")
    return slots.to(torch.int32)


def _check_padding_id(padding_id) -> Optional[int]:
    """``padding_id`` as an int (None stays None), or an exception naming it (an int id that fits in int64)."""
    if padding_id is None:
        return None
    if isinstance(padding_id, bool) or not isinstance(padding_id, (int, np.integer)):
        raise TypeError(f"padding_id must be None or an int id, got {type(padding_id).__name__}")
    if not -(2**63) <= int(padding_id) < 2**63:
        raise ValueError(f"padding_id must fit in int64, got {padding_id!r}")
    return int(padding_id)


def _check_include_last_offset(include_last_offset, mode: Optional[str]) -> bool:
    """``include_last_offset``, or an exception naming it (a bool, True only with a bag mode)."""
    if not isinstance(include_last_offset, bool):
        raise TypeError(f"include_last_offset must be a bool, got {type(include_last_offset).__name__}")
    if include_last_offset and mode is None:
        raise ValueError("include_last_offset=True needs mode='sum' or 'mean' (mode=None takes no offsets)")
    return include_last_offset


def _check_click_prior(prior) -> float:
    """``cvm_click_prior`` as a float, or a ValueError naming it (it must be a finite number > 0)."""
    if isinstance(prior, bool) or not isinstance(prior, (int, float)) or not math.isfinite(prior) or prior <= 0:
        raise ValueError(f"cvm_click_prior must be a finite number > 0, got {prior!r}")
    return float(prior)


def _check_grad_scale(grad_scale) -> Optional[float]:
    if grad_scale is None:
        return None
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be None or a finite number > 0, got {grad_scale!r}")
    if grad_scale <= 0:
        raise ValueError(f"grad_scale must be None or a finite number > 0, got {grad_scale!r}")
    return float(grad_scale)
