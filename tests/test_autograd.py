"""PullPush and the pooling math: gradients, pushed show/click/slot, and what backward refuses.

Properties:
- the pooling math (functional.pool) has the gradient autograd's gradcheck expects, in float64;
- what backward pushes is grad_scale times the gradient of the rows, reduced to one row per unique id, with
  show = occurrences and click = sum of the fed labels of the instances the occurrences are in; checked
  against numpy references written from those definitions, through a table under plain SGD (lr = 1, so a
  row moves by exactly minus the pushed gradient);
- double backward and torch.func transforms raise a RuntimeError that says why.
"""

import numpy as np
import pytest
import torch

import torch_psembed as pse
from torch_psembed import _autograd
from torch_psembed import functional as PF

DIM = 3
BIG = (-1e30, 1e30)


def sgd_table(dim=DIM, lr=1.0):
    return pse.SparseTable(
        pse.TableConfig(
            dim=dim,
            accessor=pse.CtrAccessorConfig(embedx_threshold=0.0),
            lr_optimizer=pse.SGD(learning_rate=lr, weight_bounds=BIG),
            mf_optimizer=pse.SGD(learning_rate=lr, weight_bounds=BIG),
        )
    )


def load_rows(table, keys, rows, show=None, click=None):
    """Rows ``[lr, mf...]`` for ``keys``, all with mf (docs/architecture.md column layout)."""
    b = table._backend
    n = len(keys)
    base = np.zeros((n, b.base_width), np.float32)
    base[:, 0] = 0 if show is None else show
    base[:, 1] = 0 if click is None else click
    base[:, 5] = rows[:, 0]
    mf = np.zeros((n, b.mf_width), np.float32)
    mf[:, : table.dim] = rows[:, 1:]
    b.load_rows(np.ascontiguousarray(keys, np.int64), base, np.ones(n, np.uint8), mf)


def slots_of(table, keys):
    snap = table._backend.export("checkpoint")
    where = {int(k): i for i, k in enumerate(snap["keys"])}
    return [int(snap["base"][where[int(k)], 4]) for k in keys]


# ---------------------------------------------------------------------------------------------------------
# gradcheck of the pooling math in float64 (no table)


def _batch(mode, form):
    g = torch.Generator().manual_seed(0)
    if mode is None:
        ids = torch.randint(0, 6, (3, 2, 2), generator=g)
        return PF.check_input(ids, mode=None, weight_dtype=torch.float64)
    if form == "2d":
        ids = torch.randint(0, 6, (4, 3), generator=g)
        return PF.check_input(ids, mode=mode, weight_dtype=torch.float64)
    ids = torch.randint(0, 6, (10,), generator=g)
    last = form == "include_last"
    offsets = torch.tensor([0, 2, 2, 7, 9] if last else [0, 2, 2, 7])
    return PF.check_input(ids, offsets, mode=mode, include_last_offset=last, weight_dtype=torch.float64)


@pytest.mark.parametrize(
    "mode,form", [(None, None), ("sum", "2d"), ("sum", "offsets"), ("mean", "2d"), ("mean", "include_last")]
)
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("reducer", ["groups", "index_add"])
def test_pool_gradcheck_float64(mode, form, padding, reducer):
    batch = _batch(mode, form)
    keys, inverse, pad_row, groups = PF.dedup(batch.ids, padding_id=3 if padding else None)
    if reducer == "index_add":
        groups = None  # the backward without the sort's groups
    u = keys.numel() + (pad_row is not None)
    rows = torch.randn(u, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: PF.pool(r, inverse, batch, mode, pad_row, groups), (rows,))


def test_pool_gradcheck_per_sample_weights_float64():
    ids = torch.tensor([4, 1, 4, 2, 2, 0, 4])
    psw = torch.rand(7, dtype=torch.float64, requires_grad=True)
    keys, inverse, _, groups = PF.dedup(ids)
    rows = torch.randn(keys.numel(), 4, dtype=torch.float64, requires_grad=True)

    def f(r, w):
        b = PF.check_input(ids, torch.tensor([0, 3, 3, 5]), w, mode="sum", weight_dtype=torch.float64)
        return PF.pool(r, inverse, b, "sum", None, groups)

    assert torch.autograd.gradcheck(f, (rows, psw))


def test_dedup_leaves_padding_out():
    ids = torch.tensor([9, -5, 7, -5, 9, 2**62])
    keys, inverse, pad, groups = PF.dedup(ids, padding_id=-5)
    assert keys.tolist() == [9, 7, 2**62] and pad == 3  # order of first occurrence, padding id left out
    full = torch.cat([keys, torch.tensor([-5])])
    assert torch.equal(full[inverse], ids)
    assert groups.padding_pos == 1 and groups.starts.tolist() == [0, 2, 4, 5]  # 9, 9 | -5, -5 | 7 | 2**62
    assert groups.order.tolist() == [0, 4, 1, 3, 2, 5]
    keys2, inverse2, pad2, _ = PF.dedup(ids, padding_id=123)
    assert pad2 is None and torch.equal(keys2[inverse2], ids)


def test_dedup_matches_a_python_reference():
    rng = np.random.default_rng(3)
    for n, space in [(1, 5), (50, 7), (5000, 300), (20000, None)]:  # None: any 64-bit id, negatives included
        raw = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
        ids = torch.from_numpy(raw if space is None else raw % space - space // 2)
        keys, inverse, pad, groups = PF.dedup(ids)
        first = list(dict.fromkeys(ids.tolist()))  # distinct ids in order of first occurrence
        assert keys.tolist() == first and pad is None
        assert torch.equal(keys[inverse], ids)
        where = {}
        for i, k in enumerate(ids.tolist()):
            where.setdefault(k, []).append(i)
        expect_order = [i for k in first for i in where[k]]
        expect_starts = np.cumsum([0] + [len(where[k]) for k in first])[:-1].tolist()
        assert groups.order.tolist() == expect_order and groups.starts.tolist() == expect_starts
    empty = PF.dedup(torch.empty(0, dtype=torch.int64), padding_id=0)
    assert empty.keys.numel() == 0 and empty.inverse.numel() == 0


# ---------------------------------------------------------------------------------------------------------
# what backward pushes, through a table under SGD(lr=1)


def numpy_pushed(ids, bag_of, n_bags, gout, mode, psw, pad, uniq):
    """Reference from the definitions: per unique id, the summed gradient of its rows, show and bag list."""
    grads = {k: np.zeros(gout.shape[1]) for k in uniq}
    shows = {k: 0 for k in uniq}
    bags = {k: [] for k in uniq}
    counts = np.zeros(n_bags)
    for i, k in enumerate(ids):
        if k != pad and bag_of[i] >= 0:
            counts[bag_of[i]] += 1
    for i, k in enumerate(ids):
        b = bag_of[i]
        if k == pad or b < 0:
            continue
        w = psw[i] if psw is not None else 1.0
        if mode == "mean":
            w = w / counts[b]
        grads[k] += w * gout[b]
        shows[k] += 1
        bags[k].append(b)
    return grads, shows, bags


@pytest.mark.parametrize(
    "case", ["none-3d", "sum-2d", "mean-offsets", "sum-psw-include-last", "mean-padding", "sum-grad-scale"]
)
def test_pushed_gradient_show_click_match_reference(case):
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    key_space = np.array([11, -7, 2**40, 5, 99, -(2**63)], np.int64)
    rows0 = rng.standard_normal((6, 1 + DIM)).astype(np.float32)
    table = sgd_table()
    load_rows(table, key_space, rows0)
    pad = int(key_space[3]) if "padding" in case else None
    grad_scale = 2.5 if "grad-scale" in case else None

    psw = None
    offsets = None
    last = "include-last" in case
    if case.startswith("none"):
        mode = None
        idx = rng.integers(0, 6, (4, 3, 2))
        ids_t = torch.from_numpy(key_space[idx])
        n_inst = 4
        flat = key_space[idx].reshape(-1)
        bag_of = np.arange(24)  # each id has its own output row ...
        inst_of = np.repeat(np.arange(4), 6)  # ... and its instance is the first dim
    elif "2d" in case or "grad-scale" in case:
        mode = "mean" if case.startswith("mean") else "sum"
        idx = rng.integers(0, 6, (5, 4))
        ids_t = torch.from_numpy(key_space[idx])
        n_inst = 5
        flat = key_space[idx].reshape(-1)
        bag_of = inst_of = np.repeat(np.arange(5), 4)
    else:
        mode = "mean" if case.startswith("mean") else "sum"
        idx = rng.integers(0, 6, 13)
        flat = key_space[idx]
        ids_t = torch.from_numpy(flat)
        off = [0, 3, 3, 8, 12] if last else [0, 3, 3, 8]
        offsets = torch.tensor(off)
        n_inst = len(off) - 1 if last else len(off)
        ends = off[1:] if last else off[1:] + [13]
        bag_of = np.full(13, -1)
        for b in range(n_inst):
            bag_of[off[b] : ends[b]] = b
        inst_of = bag_of
        if "psw" in case:
            psw = torch.rand(13)

    labels = torch.from_numpy(rng.integers(0, 3, n_inst).astype(np.float32))  # counts, not only 0/1
    emb = pse.PSEmbedding(table, mode=mode, output="lr_mf", slot=7, padding_id=pad, grad_scale=grad_scale,
                          include_last_offset=last)
    with pse.feed(clicks=labels):
        y = emb(ids_t, offsets, psw)
    gout = torch.randn(y.shape)
    (y * gout).sum().backward()  # labels were captured at forward time: backward runs outside the block

    uniq = sorted(set(flat.tolist()) - {pad})
    g2 = gout.reshape(-1, 1 + DIM).numpy().astype(np.float64)
    psw_np = None if psw is None else psw.numpy()
    grads, shows, bags = numpy_pushed(flat.tolist(), bag_of, g2.shape[0], g2, mode, psw_np, pad, uniq)
    scale = grad_scale if grad_scale is not None else n_inst
    after = table.pull(torch.from_numpy(key_space), with_stats=True).numpy()
    for j, k in enumerate(key_space.tolist()):
        if k in grads and shows[k] > 0:
            np.testing.assert_allclose(after[j, 2:], rows0[j] - scale * grads[k], rtol=1e-5, atol=1e-5)
            assert after[j, 0] == shows[k]
            assert after[j, 1] == pytest.approx(sum(float(labels[inst_of[i]]) for i, kk in enumerate(flat.tolist())
                                                    if kk == k and bag_of[i] >= 0))
        else:  # not in the batch, in no bag, or the padding id: never pushed
            np.testing.assert_array_equal(after[j, 2:], rows0[j])
            assert after[j, 0] == 0 and after[j, 1] == 0
    pushed = [k for k in uniq if shows[k] > 0]
    assert slots_of(table, pushed) == [7] * len(pushed)


def test_without_feed_click_is_zero_and_padding_never_created():
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum", padding_id=0)
    emb(torch.tensor([[1, 2, 0], [2, 2, 0]])).sum().backward()
    stats = table.pull(torch.tensor([1, 2]), with_stats=True)
    assert stats[:, 0].tolist() == [1, 3] and stats[:, 1].tolist() == [0, 0]
    assert 0 not in table and len(table) == 2


def test_modules_sharing_a_table_record_their_slot():
    table = sgd_table()
    a = pse.PSEmbedding(table, mode="sum", slot=1)
    b = pse.PSEmbedding(table, mode="sum", slot=2)
    (a(torch.tensor([[10, 11]])).sum() + b(torch.tensor([[11, 12]])).sum()).backward()
    assert slots_of(table, [10, 12]) == [1, 2]
    assert slots_of(table, [11]) in ([1], [2])  # pushed by both: the last push wins
    assert table.pull(torch.tensor([11]), with_stats=True)[0, 0] == 2


def test_output_columns_get_their_gradient_only():
    keys = np.array([4, 8], np.int64)
    rows0 = np.array([[0.5, 1, 2, 3], [-0.5, 4, 5, 6]], np.float32)
    for output in ("mf", "cvm_lr_mf"):
        table = sgd_table()
        load_rows(table, keys, rows0, show=np.array([3.0, 0.0]), click=np.array([1.0, 0.0]))
        emb = pse.PSEmbedding(table, output=output, grad_scale=1.0)
        y = emb(torch.from_numpy(keys))
        (y * torch.arange(1.0, 1.0 + y.shape[1])).sum().backward()  # d/dy = 1, 2, 3, ...
        after = table.pull(torch.from_numpy(keys)).numpy()
        if output == "mf":
            np.testing.assert_allclose(after[:, 0], rows0[:, 0])  # lr untouched: no gradient
            np.testing.assert_allclose(after[:, 1:], rows0[:, 1:] - np.array([1.0, 2, 3]))
        else:  # columns 0, 1 are the statistics: only lr, mf move (by 3, 4, 5, 6)
            np.testing.assert_allclose(after, rows0 - np.array([3.0, 4, 5, 6]))


def test_anchor_never_accumulates_and_parameters_stay_empty():
    table = sgd_table()
    emb = pse.PSEmbedding(table)
    emb(torch.tensor([1, 2])).sum().backward()
    assert _autograd.ANCHOR.grad is None and _autograd.ANCHOR.numel() == 0
    assert list(emb.parameters()) == []


def test_no_grad_in_training_mode_does_not_push():
    table = sgd_table()
    emb = pse.PSEmbedding(table)
    with torch.no_grad():
        y = emb(torch.tensor([1, 2]))
    assert not y.requires_grad and len(table) == 0


def test_retain_graph_pushes_each_backward():
    table = sgd_table()
    emb = pse.PSEmbedding(table)
    loss = emb(torch.tensor([5, 5, 6])).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert table.pull(torch.tensor([5, 6]), with_stats=True)[:, 0].tolist() == [4, 2]


def test_double_backward_raises():
    table = sgd_table()
    emb = pse.PSEmbedding(table)
    y = emb(torch.tensor([3]))
    with pytest.raises(RuntimeError, match="double backward"):
        # what loss.backward(create_graph=True) runs (that one also warns about a reference cycle)
        torch.autograd.grad(y.pow(2).sum(), _autograd.ANCHOR, create_graph=True)
    assert 3 not in table  # refused before pushing


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_raises(transform):
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum")
    ids = torch.tensor([[1, 2], [3, 4]])
    with pytest.raises(RuntimeError, match="torch.func"):
        if transform == "vmap":
            torch.func.vmap(lambda i: emb(i.view(1, -1)))(ids)
        else:
            torch.func.grad(lambda w: emb(ids, per_sample_weights=w).sum())(torch.ones(2, 2))


def test_feed_validation_and_nesting():
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum")
    ids = torch.tensor([[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="clicks"):
        with pse.feed(clicks=torch.ones(3)):
            emb(ids).sum().backward()
    with pytest.raises(ValueError, match="clicks"):
        pse.feed(clicks=torch.ones(2, 1)).__enter__()
    with pytest.raises(ValueError, match="clicks"):
        pse.feed(clicks=[1.0, -1.0]).__enter__()
    with pytest.raises(ValueError, match="clicks"):
        pse.feed(clicks=[1.0, float("nan")]).__enter__()
    with pytest.raises(TypeError, match="clicks"):
        pse.feed(clicks="11").__enter__()
    with pse.feed(clicks=[0, 0]):
        with pse.feed(clicks=np.array([1, 0])):  # innermost wins
            y = emb(ids)
        y2 = emb(ids)
    (y.sum() + y2.sum()).backward()
    assert table.pull(torch.tensor([1, 2, 3]), with_stats=True)[:, 1].tolist() == [1, 1, 0]


def test_timings_cover_every_phase():
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum")
    t = emb.enable_timing()
    for _ in range(2):
        emb(torch.randint(0, 1000, (64, 8))).sum().backward()
    d = t.as_dict()
    assert d["calls"] == 2
    assert all(d[p] > 0 for p in _autograd.Timings.PHASES), d
    assert emb.enable_timing(False) is None and emb.timings is None


@pytest.mark.parametrize("how", ["trace_eval", "trace_train", "script", "export"])
def test_torchscript_and_torch_export_raise_naming_them(how):
    # They failed deep inside ("unordered_map::at", ".numpy() is not supported for tensor subclasses", an
    # annotation error) or, worse, could freeze one batch's rows into a graph (audit, session 26).
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum")
    ids = torch.tensor([[1, 2], [2, 3]])
    model = torch.nn.Sequential(emb, torch.nn.Linear(DIM, 1))
    name = "torch.export" if how == "export" else "TorchScript"
    with pytest.raises(RuntimeError, match=f"PSEmbedding (and InferenceEmbedding do|does) not support {name}"):
        if how == "trace_eval":
            torch.jit.trace(model.eval(), (ids,), check_trace=False)
        elif how == "trace_train":
            torch.jit.trace(model, (ids,), check_trace=False)
        elif how == "script":
            torch.jit.script(model)
        else:
            torch.export.export(model, (ids,))
    assert len(table) == 0


def test_torch_compile_still_runs_the_module_eagerly_at_its_graph_breaks():
    torch._dynamo.reset()
    compiled_table, eager_table = sgd_table(), sgd_table()
    ids, other = torch.tensor([[1, 2], [2, 3]]), torch.tensor([[7, 8], [8, 8]])
    losses = []
    for table, wrap in ((compiled_table, lambda f: torch.compile(f, backend="eager")), (eager_table, lambda f: f)):
        emb = pse.PSEmbedding(table, mode="sum", grad_scale=1.0)
        f = wrap(lambda i: emb(i).pow(2).sum())
        with pse.feed(clicks=[1.0, 0.0]):
            for batch in (ids, other, ids):  # other ids: pulled and pushed, not a frozen batch
                loss = f(batch)
                loss.backward()
                losses.append(float(loss.detach()))
    assert losses[:3] == losses[3:]
    keys = torch.tensor([1, 2, 3, 7, 8])
    torch.testing.assert_close(compiled_table.pull(keys, with_stats=True), eager_table.pull(keys, with_stats=True))


def test_functional_ps_embedding_checks_output_and_slot_as_the_module_does():
    # output="MF" returned lr_mf rows, then failed in backward on a grads shape; slot=-5 failed only in the
    # push (audit, session 26). Both are refused up front, naming the argument.
    table = sgd_table()
    ids = torch.tensor([[1, 2], [3, 4]])
    for push in (False, True):
        with pytest.raises(ValueError, match=r"output must be one of \('mf', 'lr_mf', 'cvm_lr_mf'\), got 'MF'"):
            PF.ps_embedding(ids, table, mode="sum", output="MF", push=push)
        for bad in (-5, 2**24, True, 1.0):
            with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\*\*24\)"):
                PF.ps_embedding(ids, table, mode="sum", slot=bad, push=push)
    with pytest.raises(ValueError, match="output must be one of"):
        PF.ps_embedding(ids, table, mode="sum", output=["mf"])
    assert len(table) == 0
    y = PF.ps_embedding(ids, table, mode="sum", output="lr_mf", slot=np.int64(5))
    assert y.shape == (2, DIM + 1)
    y.sum().backward()
    assert slots_of(table, [1, 2, 3, 4]) == [5] * 4


def test_per_id_slots_record_each_keys_slot_and_a_repeated_key_its_last():
    table = sgd_table()
    emb = pse.PSEmbedding(table, mode="sum", slot=9)
    ids = torch.tensor([[1, 2, 3], [4, 2, 5]])
    emb(ids, slots=torch.tensor([0, 1, 2])).sum().backward()  # broadcast: column j is slot j
    assert slots_of(table, [1, 2, 3, 4, 5]) == [0, 1, 2, 0, 2]  # key 2: slot 1 twice
    flat = torch.tensor([6, 7, 6, 8])  # 1-D ids with offsets: one slot per id; key 6 last in slot 4
    emb(flat, torch.tensor([0, 2]), slots=torch.tensor([3, 3, 4, 4], dtype=torch.int32)).sum().backward()
    assert slots_of(table, [6, 7, 8]) == [4, 3, 4]
    emb(torch.tensor([[1, 2]])).sum().backward()  # without slots: the module's slot
    assert slots_of(table, [1, 2]) == [9, 9]
    padded = pse.PSEmbedding(table, mode="sum", padding_id=0)  # the padding id is left out, keys keep theirs
    padded(torch.tensor([[0, 10, 11], [11, 0, 12]]), slots=torch.tensor([[1, 2, 3], [4, 5, 6]])).sum().backward()
    assert slots_of(table, [10, 11, 12]) == [2, 4, 6] and 0 not in table
    for bad, err, match in ((torch.tensor([0.0, 1.0, 2.0]), TypeError, "slots must be an integer tensor"),
                            (torch.tensor([0, 1]), ValueError, r"slots of shape \(2,\) do not broadcast"),
                            (torch.tensor([[[0, 1, 2]]]), ValueError, "do not broadcast"),
                            (torch.tensor([0, -1, 2]), ValueError, r"slots must be in \[0, 2\*\*24\)"),
                            (torch.tensor([0, 1, 2**24]), ValueError, r"slots must be in \[0, 2\*\*24\)")):
        with pytest.raises(err, match=match):
            emb(ids, slots=bad)
