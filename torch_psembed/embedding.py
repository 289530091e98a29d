"""PSEmbedding: a drop-in ``nn.Embedding``/``nn.EmbeddingBag`` over a :class:`~torch_psembed.SparseTable`.

The module holds its configuration and a reference to the table; ``forward`` is one call into
:func:`torch_psembed.functional.ps_embedding`. :func:`feed` passes the click labels of a batch to every
PSEmbedding that runs inside it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch import Tensor

from . import functional as PF
from ._autograd import Timings
from ._output_dtype import ConvertsOutput

__all__ = ["PSEmbedding", "feed"]

_local = threading.local()


def _feed_stack() -> List[Tensor]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _as_labels(clicks) -> Tensor:
    if isinstance(clicks, Tensor):
        t = clicks.detach()
        if t.device.type != "cpu":
            t = t.cpu()
    elif isinstance(clicks, (np.ndarray, list, tuple)):
        try:
            t = torch.as_tensor(np.asarray(clicks, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise TypeError(f"clicks must be numeric labels, got {type(clicks).__name__}: {e}") from None
    else:
        raise TypeError(f"clicks must be a torch.Tensor, numpy array or list of labels, got {type(clicks).__name__}")
    if t.is_complex():
        raise TypeError(f"clicks must be real-valued labels, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"clicks must be 1-D with one label per instance (shape [batch]), got shape {tuple(t.shape)}")
    # A copy: the labels are captured at forward time, and a caller may change its tensor in place before the
    # backward (label smoothing, a reused buffer); without the copy the push counted the changed values.
    t = t.to(torch.float32, copy=True).contiguous()
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError("clicks must be finite; got NaN or Inf labels")
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"clicks must be >= 0 (click counts), got a minimum of {float(t.min())}")
    return t


@contextlib.contextmanager
def feed(clicks=None) -> Iterator[None]:
    r"""Give the PSEmbedding modules run inside the block the click labels of the batch.

    Each module counts, for every id it pushes, ``show`` = the number of occurrences of the id in the batch and
    ``click`` = the sum of ``clicks[i]`` over the instances ``i`` the occurrences are in (once per occurrence).
    An *instance* is a row of the batch: the first dim of the ids for ``mode=None``, a row of 2-D ids, or a bag
    for 1-D ids with offsets. The labels are captured at forward time, so ``backward`` may run after the block.
    Blocks nest (the innermost wins) and are per thread. Outside any block, clicks are 0.

    Args:
        clicks (Tensor, ndarray or list): ``(batch,)`` labels (0/1 or counts, finite and >= 0).

    Examples::

        >>> import torch, torch_psembed as pse
        >>> table = pse.SparseTable(pse.TableConfig(dim=4))
        >>> emb = pse.PSEmbedding(table)
        >>> with pse.feed(clicks=torch.tensor([1.0, 0.0])):
        ...     loss = emb(torch.tensor([[1, 2], [2, 3]])).sum()
        >>> loss.backward()  # pushes id 2 with show 2, click 1
    """
    labels = None if clicks is None else _as_labels(clicks)
    stack = _feed_stack()
    stack.append(labels)
    try:
        yield
    finally:
        stack.pop()


def current_clicks() -> Optional[Tensor]:
    """The labels of the innermost :func:`feed` block of this thread, or None."""
    stack = _feed_stack()
    return stack[-1] if stack else None


class PSEmbedding(ConvertsOutput):
    r"""Looks up 64-bit feature ids in a :class:`~torch_psembed.SparseTable`, like ``nn.Embedding`` (``mode=None``)
    or ``nn.EmbeddingBag`` (``mode="sum"``/``"mean"``), and updates the rows with the table's own sparse rule
    during ``backward``.

    With ``mode=None`` the ids can have any shape and each id gets its row. With ``mode="sum"``/``"mean"``,
    the ids form bags, exactly as in ``nn.EmbeddingBag``: a 2-D input is one bag per row, a 1-D input is cut
    into bags by ``offsets`` (``include_last_offset`` as there), and ``per_sample_weights`` scale the rows of
    a ``"sum"``. Given a table holding the same rows, the output equals that of ``nn.Embedding`` /
    ``nn.EmbeddingBag``, and bad input raises the exception type they raise.

    Differences from ``nn.EmbeddingBag``: ids are arbitrary int64 feasigns, not indices into a fixed range,
    and an id the table does not hold reads zeros (a row is created by its first push, and gets its mf
    vector once its show/click score reaches the table's ``embedx_threshold``). ``parameters()`` is empty:
    the rows are updated by the table's sparse rule inside ``backward``, so any ``torch.optim`` optimizer
    for the dense part of the model works unchanged. ``eval()`` stops the pushes (and show/click counting).

    Args:
        table (SparseTable): the table holding the rows. Several modules may share one table.
        mode (str, optional): ``None`` (like ``nn.Embedding``), ``"sum"`` or ``"mean"`` (like
            ``nn.EmbeddingBag``). Default: ``None``
        output (str, optional): the columns of each row: ``"mf"`` (``D = dim``), ``"lr_mf"``
            (``D = 1 + dim``: the lr weight, then mf) or ``"cvm_lr_mf"`` (``D = 3 + dim``:
            ``log(show + 1)``, ``log(click + cvm_click_prior) - log(show + 1)``, lr, mf; no gradient is pushed
            for the two statistics columns). Pooling applies to the row as a whole, statistics columns included.
            Default: ``"mf"``
        slot (int, optional): the slot recorded in the rows this module pushes, in ``[0, 2**24)`` (a
            checkpoint stores slots as float32, exact up to ``2**24``); a call's ``slots=`` overrides it per id
            (see :meth:`forward`). Default: ``0``
        padding_id (int, optional): an id that reads zeros, is left out of bags (and of a ``"mean"``'s count)
            and is never pushed, like ``padding_idx``. Default: ``None``
        include_last_offset (bool, optional): as in ``nn.EmbeddingBag``: ``offsets`` has one more entry, the
            end of the last bag. Default: ``False``
        grad_scale (float, optional): the pushed gradient is ``grad_scale * d(loss)/d(row)``. The table's rules
            expect the gradient of the *sum* of the per-instance losses (the AdaGrad family divides it by the
            show count), so the default, ``None``, uses the batch size (the number of instances), which
            **assumes a mean-reduced loss**. Pass ``grad_scale=1.0`` for a sum-reduced loss.
            Default: ``None``
        cvm_click_prior (float, optional): ``output="cvm_lr_mf"`` only: the ctr column is
            ``log(click + cvm_click_prior) - log(show + 1)``. ``1.0`` is Paddle's CVM; it puts an id never shown
            at ctr 1, the end of the column. About the data's CTR (say 0.2) puts it at the typical value.
            Default: ``1.0``
        grad_scaler (torch.amp.GradScaler, optional): the loss scaler of a mixed-precision loop. The push
            happens inside ``backward``, before ``scaler.unscale_``/``step`` can see the gradient, so the
            module divides the scaler's current scale out itself. When this module's gradient overflowed
            (NaN/Inf), it skips its push and tells the scaler, so that the scaler's next ``step(optimizer)``
            skips the optimizer step and ``update()`` lowers the scale, as for an overflow in a dense gradient
            (even if the dense gradients are finite; see ``docs/embedding.md``, "Mixed precision", for how; a
            scaler without ``GradScaler._unscale_grads_``, and any scaler in a job of several trainers, where one
            trainer's skipped step would desync the DDP replicas, gets a ``RuntimeWarning`` instead). The reverse does
            not hold: when only a dense gradient overflowed, the push of a finite gradient has already
            happened. Without ``grad_scaler``, a scaled loss pushes scaled gradients into the table.
            Default: ``None``

    Attributes:
        table (SparseTable): the table.
        embedding_dim (int): ``D``, the width of the output rows.
        timings (Timings or None): per-phase seconds once :meth:`enable_timing` was called.

    Shape:
        - ``mode=None``: input :math:`(*)` int64 ids -> output :math:`(*, D)`.
        - 2-D input :math:`(B, N)`: ``B`` bags of ``N`` ids -> output :math:`(B, D)`.
        - 1-D input :math:`(N)` with offsets :math:`(B)` (:math:`(B + 1)` with ``include_last_offset``):
          output :math:`(B, D)`.
        - per_sample_weights: the shape of the input; float32; only with ``mode="sum"``.

    .. note::
        An *instance* is a row of the batch: the first dim of the ids for ``mode=None``, a row of 2-D ids, a bag
        for 1-D ids with offsets. :func:`feed` gives one click label per instance; the default ``grad_scale`` is
        the number of instances.

    .. note::
        The backward pushes as a side effect: double backward (``create_graph=True``) and ``torch.func``
        transforms raise a ``RuntimeError``. So do TorchScript (``torch.jit.trace``/``script``) and
        ``torch.export``, which would freeze one batch's rows; ``torch.compile`` works. Ids must be int64 (int32
        is converted).

    .. note::
        The table lives in host memory. Ids on an accelerator (say ``cuda:0``, with ``offsets`` and
        ``per_sample_weights`` on the same device) are copied to the CPU, looked up and pooled there, and the
        output is returned on their device; its gradient comes back to the CPU in the backward. So a model on
        a GPU uses the module unchanged, at the cost of one copy each way per call.

    Examples::

        >>> import torch, torch_psembed as pse
        >>> table = pse.SparseTable(pse.TableConfig(dim=4))
        >>> emb = pse.PSEmbedding(table, mode="sum", output="lr_mf", slot=3)
        >>> list(emb.parameters())
        []
        >>> # a batch of 2 bags of 4 ids
        >>> ids = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
        >>> offsets = torch.tensor([0, 4])
        >>> with torch.no_grad():
        ...     emb(ids, offsets)  # unknown ids read zeros
        tensor([[0., 0., 0., 0., 0.],
                [0., 0., 0., 0., 0.]])
        >>> with pse.feed(clicks=torch.tensor([1.0, 0.0])):
        ...     y = emb(ids, offsets)
        >>> y.pow(2).sum().backward()  # pushes the 6 unique ids (with show, click and slot 3)
        >>> len(table)
        6
        >>> emb(ids.view(2, 4)).shape  # 2-D ids: one bag per row
        torch.Size([2, 5])
        >>> pse.PSEmbedding(table)(torch.tensor([[1, 2, 3], [4, 5, 6]])).shape  # like nn.Embedding
        torch.Size([2, 3, 4])
    """

    __constants__ = ["mode", "output", "slot", "padding_id", "include_last_offset", "grad_scale", "cvm_click_prior"]

    table: object
    mode: Optional[str]
    output: str
    slot: int
    padding_id: Optional[int]
    include_last_offset: bool
    grad_scale: Optional[float]
    cvm_click_prior: float
    embedding_dim: int
    timings: Optional[Timings]

    def __init__(
        self,
        table,
        mode: Optional[str] = None,
        output: str = "mf",
        slot: int = 0,
        padding_id: Optional[int] = None,
        include_last_offset: bool = False,
        grad_scale: Optional[float] = None,
        cvm_click_prior: float = 1.0,
        grad_scaler=None,
    ) -> None:
        super().__init__()
        for attr in ("pull", "push", "dim"):
            if not hasattr(table, attr):
                raise TypeError(f"table must be a SparseTable, got {type(table).__name__}")
        if mode not in PF.MODES:
            raise ValueError(f"mode must be one of None, 'sum', 'mean', got {mode!r}")
        output = PF._check_output(output)
        slot = PF._check_slot(slot)
        padding_id = PF._check_padding_id(padding_id)
        include_last_offset = PF._check_include_last_offset(include_last_offset, mode)
        self.table = table
        self.mode = mode
        self.output = output
        self.slot = slot
        self.padding_id = padding_id
        self.include_last_offset = include_last_offset
        self.grad_scale = PF._check_grad_scale(grad_scale)
        self.cvm_click_prior = PF._check_click_prior(cvm_click_prior)
        if grad_scaler is not None and not all(hasattr(grad_scaler, a) for a in ("get_scale", "is_enabled")):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        self.embedding_dim = PF.output_dim(output, int(table.dim))
        self.frozen = False  # requires_grad_(False): pull, never push
        self.timings = None
        self._prefetched_dedup = None  # (ids, their dedup) of the last prefetch, for the next forward

    def forward(
        self,
        input: Tensor,
        offsets: Optional[Tensor] = None,
        per_sample_weights: Optional[Tensor] = None,
        *,
        slots: Optional[Tensor] = None,
    ) -> Tensor:
        """Look up (and pool) ``input``; see the class docstring for shapes.

        ``slots`` (integer tensor broadcastable to the shape of ``input``, values in ``[0, 2**24)``) gives each id
        the slot its push records, instead of the module's ``slot``: with ``slots=torch.arange(S)`` a
        ``(B, S)`` input records slot ``j`` for the ids of column ``j``. A key occurring with several slots in
        one call records the slot of its last occurrence, as the table keeps the last slot of a key repeated in
        one push.
        """
        cache, self._prefetched_dedup = self._prefetched_dedup, None
        out = PF.ps_embedding(
            input,
            self.table,
            offsets,
            per_sample_weights,
            mode=self.mode,
            output=self.output,
            slot=self.slot if slots is None else slots,
            padding_id=self.padding_id,
            include_last_offset=self.include_last_offset,
            grad_scale=self.grad_scale,
            clicks=current_clicks(),
            push=self.training and not self.frozen,
            timings=self.timings,
            dedup_cache=cache,
            cvm_click_prior=self.cvm_click_prior,
            grad_scaler=self.grad_scaler,
        )
        return self._convert_output(out)

    def requires_grad_(self, requires_grad: bool = True) -> "PSEmbedding":
        """``requires_grad_(False)`` freezes the rows as it freezes ``nn.Embedding``'s weight: the module pulls
        but never pushes, and its output needs no gradient (in train mode too); ``True`` unfreezes. Only a
        call on this module reaches it: a parent's ``requires_grad_`` sets its parameters' flags, and this
        module has none (``eval()`` on the parent reaches it)."""
        if not isinstance(requires_grad, bool):
            raise TypeError(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
        self.frozen = not requires_grad
        return super().requires_grad_(requires_grad)

    def prefetch(
        self,
        input: Tensor,
        offsets: Optional[Tensor] = None,
        per_sample_weights: Optional[Tensor] = None,
    ) -> None:
        """Start fetching the rows of the batch this module is called with next (same arguments as
        :meth:`forward`), so that on a sharded table the RPCs overlap this step's compute. Call it once this
        step's backward (its push) is issued; the next forward with the same ids then takes the rows. See
        ``SparseTable.prefetch`` for the staleness bound; a forward with other ids just pulls afresh.
        """
        input, offsets, per_sample_weights, _ = PF.to_host(input, offsets, per_sample_weights)
        batch = PF.check_input(input, offsets, per_sample_weights, self.mode, self.include_last_offset)
        d = PF.dedup(batch.ids, self.padding_id)
        # kept for the next forward (a copy of the ids: the caller may change its tensor in place meanwhile)
        self._prefetched_dedup = (batch.ids.clone(), d)
        start = getattr(self.table, "prefetch", None)
        if start is not None:
            start(d.keys, with_stats=self.output == "cvm_lr_mf")

    def enable_timing(self, enabled: bool = True) -> Optional[Timings]:
        """Start (or stop, with ``False``) summing the seconds per phase into :attr:`timings`."""
        self.timings = Timings() if enabled else None
        return self.timings

    def extra_repr(self) -> str:
        s = f"{getattr(self.table, 'name', 'table')!r}, dim={self.embedding_dim}"
        if self.mode is not None:
            s += f", mode={self.mode!r}"
        if self.output != "mf":
            s += f", output={self.output!r}"
        if self.slot != 0:
            s += f", slot={self.slot}"
        if self.padding_id is not None:
            s += f", padding_id={self.padding_id}"
        if self.include_last_offset:
            s += ", include_last_offset=True"
        if self.grad_scale is not None:
            s += f", grad_scale={self.grad_scale}"
        if self.cvm_click_prior != 1.0:
            s += f", cvm_click_prior={self.cvm_click_prior}"
        if self.frozen:
            s += ", frozen=True"
        if self.output_dtype != torch.float32:
            s += f", output_dtype={self.output_dtype}"
        return s
