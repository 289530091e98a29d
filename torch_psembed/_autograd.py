"""PullPush: the autograd Function whose forward pulls rows from a table and whose backward pushes to it.

``PullPush.apply(ANCHOR, plan)`` returns the pulled unique rows ``(U, D)`` (plus a zero row when the batch
holds the padding id). Its only tensor input is :data:`ANCHOR`, a zero-size tensor that requires grad: it
makes autograd call :meth:`PullPush.backward` although no real input needs a gradient. Everything else
(the table, the unique keys, the inverse index, the labels) rides on the :class:`PushPlan` on ``ctx``.

``backward`` receives the gradient already reduced to one row per unique id (the pooling ops' own backward
does the reduction), scales it by ``grad_scale``, attaches show (occurrences) and click (sum of the labels of
the instances each occurrence is in) and calls ``table.push``. The push is a side effect, so the Function is
``@once_differentiable`` and refuses ``create_graph=True`` outright.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ANCHOR", "PullPush", "Pool", "PushPlan", "Timings", "BackwardMark", "pull_rows", "push_rows", "report_overflow",
]

# The zero-size leaf that requires grad; PullPush returns None for it, so it never accumulates a .grad.
ANCHOR = torch.empty(0, requires_grad=True)


class Timings:
    """Seconds spent per phase, summed over calls; for ``scripts/bench_embedding.py``.

    Phases: ``unique`` (input checks + the dedup), ``pull`` (``table.pull`` + output columns),
    ``pool`` (the gather/bag op), ``backward`` (the pooling op's backward: from the output's gradient to the
    unique rows' gradient), ``push`` (show/click counts + ``table.push``). ``calls`` counts forwards.
    """

    PHASES = ("unique", "pull", "pool", "backward", "push")

    def __init__(self) -> None:
        self.totals: Dict[str, float] = dict.fromkeys(self.PHASES, 0.0)
        self.calls = 0
        self.mark: Optional[float] = None

    def add(self, phase: str, seconds: float) -> None:
        self.totals[phase] += seconds
        if phase == "unique":
            self.calls += 1

    def reset(self) -> None:
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self.calls = 0
        self.mark = None

    def as_dict(self) -> Dict[str, float]:
        return dict(self.totals, calls=self.calls)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v * 1e3:.2f}ms" for k, v in self.totals.items())
        return f"Timings(calls={self.calls}, {parts})"


class PushPlan:
    """What ``PullPush`` needs besides tensors requiring grad (kept on ``ctx``)."""

    __slots__ = (
        "table", "keys", "inverse", "batch", "output", "padding_row", "grad_scale", "slot", "clicks", "timings",
        "click_prior", "grad_scaler",
    )

    def __init__(self, table, keys, inverse, batch, output, padding_row, grad_scale, slot, clicks, timings,
                 click_prior=1.0, grad_scaler=None):
        self.table = table
        self.keys = keys  # int64[U]: unique ids, padding id left out
        self.inverse = inverse  # int64[n]: row of each id (padding_row for the padding id)
        self.batch = batch  # functional.Batch: maps ids to instances for the clicks
        self.output = output  # "mf" | "lr_mf" | "cvm_lr_mf"
        self.padding_row = padding_row  # None, or U (the appended zero row)
        self.grad_scale = grad_scale  # float: pushed gradient = grad_scale * d(loss)/d(row)
        self.slot = slot  # int: recorded in every pushed row; or int32[U]: each key's (functional.slot_of_keys)
        self.clicks = clicks  # float32[num_instances] or None
        self.timings = timings  # Timings or None
        self.click_prior = click_prior  # float > 0: the ctr column's prior click count (cvm_lr_mf)
        self.grad_scaler = grad_scaler  # torch.amp.GradScaler or None: the loss scale to divide out


def pull_rows(
    table, keys: Tensor, output: str, padding_row: Optional[int], timings: Optional[Timings], click_prior: float = 1.0
) -> Tensor:
    """The rows the pooling op reads: ``(U, D)`` float32, plus a zero row at ``padding_row`` when given.

    Columns by ``output``: ``mf`` -> ``mf[dim]``; ``lr_mf`` -> ``lr, mf``; ``cvm_lr_mf`` ->
    ``log(show + 1), log(click + click_prior) - log(show + 1), lr, mf`` (from the table's stored show/click;
    ``click_prior=1`` is Paddle's CVM).
    """
    t0 = time.perf_counter() if timings is not None else 0.0
    if output == "cvm_lr_mf":
        rows = table.pull(keys, with_stats=True)
        show = torch.log1p(rows[:, 0])
        ctr = torch.log1p(rows[:, 1]) if click_prior == 1.0 else torch.log(rows[:, 1] + click_prior)
        rows[:, 1] = ctr - show
        rows[:, 0] = show
    else:
        rows = table.pull(keys)
        if output == "mf":
            rows = rows[:, 1:].contiguous()  # the gather from a contiguous matrix is ~3x faster
    if padding_row is not None:
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
    if timings is not None:
        timings.add("pull", time.perf_counter() - t0)
    return rows


def _dense_replicas() -> int:
    """Processes holding a replica of the dense model: the trainers of a ``pse.init`` job (its dedicated
    servers hold none), else torch.distributed's ranks (1 without it)."""
    from .distributed import runtime  # here: the distributed package imports this module's users

    if runtime.is_initialized():
        return runtime.num_trainers()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def report_overflow(scaler) -> bool:
    """Make ``scaler`` (a ``torch.amp.GradScaler``) treat this iteration as overflowed, as if an optimizer's
    gradient held an inf: each ``step(optimizer)`` until the next ``update()`` skips ``optimizer.step()``, and
    that ``update()`` lowers the scale. Returns False (after a warning) for a scaler it cannot tell.

    The scaler only inspects the ``.grad`` of the optimizers' parameters, and the table's rows are none: so
    until its ``update()`` the scaler's ``_unscale_grads_`` (where ``unscale_``, ``step`` and the fused
    optimizers' path gather each optimizer's ``found_inf``; FSDP's ``ShardedGradScaler`` overrides the same
    method) is wrapped on the instance to report an inf, and ``update`` to remove both wrappers again, so the
    scaler's class and state dict are untouched. ``tests/test_module_expectations.py`` checks it on torch's
    own scaler.
    """
    if _dense_replicas() > 1:
        # Only this rank saw the overflow (the table's gradient is not all-reduced as DDP's dense ones are):
        # a step skipped here alone would leave this replica's dense weights behind the others' for good.
        warnings.warn(
            "PSEmbedding skipped a push whose gradient overflowed; in a multi-process job the grad_scaler is not "
            "told (a step skipped on one rank alone would make the DDP replicas differ), so its scale stays",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    cls = type(scaler)
    if not (callable(getattr(cls, "_unscale_grads_", None)) and callable(getattr(cls, "update", None))):
        warnings.warn(
            f"PSEmbedding skipped a push whose gradient overflowed, but cannot make the grad_scaler (a "
            f"{cls.__name__}) skip the step and lower its scale: it has no GradScaler._unscale_grads_",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    if "_unscale_grads_" in vars(scaler):  # reported already in this iteration
        return True
    unscale_grads = cls._unscale_grads_.__get__(scaler)
    update = cls.update.__get__(scaler)

    def _unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16):
        found = unscale_grads(optimizer, inv_scale, found_inf, allow_fp16)  # {device: found_inf}
        if not found:  # no dense gradient: the scaler's own tensor carries the inf
            found = {found_inf.device: found_inf}
        for t in found.values():
            t.fill_(1.0)
        return found

    def update_(new_scale=None):
        try:
            return update(new_scale)
        finally:  # the report is this iteration's: the next one starts clean
            vars(scaler).pop("_unscale_grads_", None)
            vars(scaler).pop("update", None)

    scaler._unscale_grads_ = _unscale_grads_
    scaler.update = update_
    return True


def push_rows(plan: PushPlan, grad: Tensor) -> None:
    """Push ``grad_scale * grad`` (the unique rows' gradient) with show/click counts and the slot."""
    t0 = time.perf_counter() if plan.timings is not None else 0.0
    u = plan.keys.numel()
    s = plan.grad_scale
    scaler = plan.grad_scaler
    if u and scaler is not None and scaler.is_enabled():
        # The loss was multiplied by the scaler's scale (the one in use until scaler.update(), after this
        # backward): divide it out. A gradient that overflowed is not pushed (nothing pushed, no show
        # counted), and the scaler is told, so that it skips this iteration's optimizer steps and lowers the
        # scale as it does for a dense overflow (the dense gradients may well be finite).
        s = s / float(scaler.get_scale())
        if not bool(torch.isfinite(grad[:u]).all()):
            report_overflow(scaler)
            u = 0
    if u:
        table = plan.table
        g = grad[:u]
        if plan.output == "mf":
            grads = torch.zeros(u, 1 + table.dim, dtype=torch.float32)
            torch.mul(g, s, out=grads[:, 1:])
        elif plan.output == "lr_mf":
            grads = torch.mul(g, s).to(torch.float32).contiguous()
        else:  # cvm_lr_mf: no gradient for the two statistics columns
            grads = torch.mul(g[:, 2:], s).to(torch.float32).contiguous()
        inverse = plan.inverse
        n_rows = u + (plan.padding_row is not None)
        shows = torch.bincount(inverse, minlength=n_rows)[:u].to(torch.float32)
        if plan.clicks is not None:
            per_id = plan.clicks.to(torch.float32)[plan.batch.instance_of_each_id()]
            clicks = torch.zeros(n_rows, dtype=torch.float32).index_add_(0, inverse, per_id)[:u]
        else:
            clicks = torch.zeros(u, dtype=torch.float32)
        if isinstance(plan.slot, Tensor):
            slots = plan.slot
        else:
            slots = torch.full((u,), plan.slot, dtype=torch.int32)
        table.push(plan.keys, grads, shows, clicks, slots)
    if plan.timings is not None:
        plan.timings.add("push", time.perf_counter() - t0)


class PullPush(torch.autograd.Function):
    """forward: pull the unique rows; backward: push their gradient. Never instantiate; use ``apply``.

    ``apply(anchor, plan)``: ``anchor`` is :data:`ANCHOR` (zero-size, requires grad), ``plan`` a
    :class:`PushPlan`. Returns ``(U, D)`` float32 rows (``U + 1`` with padding).
    """

    @staticmethod
    def forward(ctx, anchor: Tensor, plan: PushPlan) -> Tensor:  # type: ignore[override]
        ctx.plan = plan
        return pull_rows(plan.table, plan.keys, plan.output, plan.padding_row, plan.timings, plan.click_prior)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "PSEmbedding does not support double backward (backward with create_graph=True): its backward "
                "pushes the rows' gradient to the table as a side effect"
            )
        return PullPush._push(ctx, grad)

    @staticmethod
    @once_differentiable
    def _push(ctx, grad: Tensor):
        plan: PushPlan = ctx.plan
        timings = plan.timings
        if timings is not None and timings.mark is not None:
            timings.add("backward", time.perf_counter() - timings.mark)
            timings.mark = None
        if ctx.needs_input_grad[0]:
            push_rows(plan, grad)
        return None, None


class BackwardMark(torch.autograd.Function):
    """Identity whose backward stamps the time the output's gradient arrived (used only while timing)."""

    @staticmethod
    def forward(ctx, x: Tensor, timings: Timings) -> Tensor:  # type: ignore[override]
        ctx.timings = timings
        return x.clone()  # not a view: the caller may change the output in place (only while timing: one copy)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ctx.timings.mark = time.perf_counter()
        return grad, None


class Pool(torch.autograd.Function):
    """The pooling math with a fast backward: see :func:`torch_psembed.functional.pool`.

    ``apply(rows, per_sample_weights, inverse, batch, mode, padding_row, groups)``; gradients for ``rows`` and
    ``per_sample_weights``.
    """

    @staticmethod
    def forward(ctx, rows, psw, inverse, batch, mode, padding_row, groups=None):  # type: ignore[override]
        from .functional import pool_forward

        ctx.save_for_backward(rows, psw, inverse)
        ctx.batch, ctx.mode, ctx.padding_row, ctx.groups = batch, mode, padding_row, groups
        return pool_forward(rows, psw, inverse, batch, mode, padding_row)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        from .functional import pool_backward

        rows, psw, inverse = ctx.saved_tensors
        need_rows, need_psw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows, grad_psw = pool_backward(
            grad, rows, psw, inverse, ctx.batch, ctx.mode, ctx.padding_row, need_rows, need_psw, ctx.groups
        )
        return grad_rows, grad_psw, None, None, None, None, None
