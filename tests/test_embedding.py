"""PSEmbedding against nn.Embedding / nn.EmbeddingBag: outputs, input validation, one SGD step.

Property: a table loaded with rows W (feasign keys[i] -> W[i]) makes PSEmbedding compute exactly what
nn.Embedding / nn.EmbeddingBag compute over the weight W with the ids mapped to their row index, raise the
exception type they raise on bad input, and (with plain SGD on the table) take the same step as
nn.EmbeddingBag(sparse=True) + torch.optim.SGD once the gradient units are matched.
"""

import doctest
import math
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

import torch_psembed as pse
import torch_psembed.embedding as embedding_module

DIM = 4
BIG = (-1e30, 1e30)


def sgd_config(dim=DIM, lr=1.0, embedx_threshold=0.0):
    return pse.TableConfig(
        dim=dim,
        accessor=pse.CtrAccessorConfig(embedx_threshold=embedx_threshold),
        lr_optimizer=pse.SGD(learning_rate=lr, weight_bounds=BIG),
        mf_optimizer=pse.SGD(learning_rate=lr, weight_bounds=BIG),
    )


def load_rows(table, keys, rows, show=None, click=None, has_mf=None):
    """Put rows ``[lr, mf...]`` (float32 ``(n, 1 + dim)``) for ``keys`` into ``table`` (architecture.md layout)."""
    b = table._backend
    n = len(keys)
    base = np.zeros((n, b.base_width), np.float32)
    if show is not None:
        base[:, 0] = show
    if click is not None:
        base[:, 1] = click
    base[:, 5] = rows[:, 0]
    has = np.ones(n, np.uint8) if has_mf is None else np.asarray(has_mf, np.uint8)
    mf = np.zeros((int(has.sum()), b.mf_width), np.float32)
    mf[:, : table.dim] = rows[has.astype(bool), 1:]
    b.load_rows(np.ascontiguousarray(keys, np.int64), base, has, mf)


def random_keys(n, seed=0):
    """n distinct feasigns spread over the whole int64 range (negative and huge ones included)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, size=3 * n, dtype=np.int64))[:n]
    rng.shuffle(keys)
    return keys


@pytest.fixture
def loaded():
    """A table with 20 known rows, plus the same rows as a weight matrix; key index 20 is not in the table."""
    torch.manual_seed(0)
    keys = random_keys(21)
    rows = torch.randn(21, 1 + DIM).numpy()
    table = pse.SparseTable(sgd_config())
    load_rows(table, keys[:20], rows[:20])
    weight = torch.from_numpy(rows.copy())
    weight[20] = 0  # unknown id reads zeros
    return table, torch.from_numpy(keys), weight


def cols(weight, output):
    return weight[:, 1:] if output == "mf" else weight


@pytest.mark.parametrize("output", ["mf", "lr_mf"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_mode_none_matches_embedding(loaded, output, shape):
    table, keys, weight = loaded
    idx = torch.randint(0, 21, shape)
    emb = pse.PSEmbedding(table, output=output)
    ref = nn.Embedding.from_pretrained(cols(weight, output).clone())
    y = emb(keys[idx])
    assert y.shape == shape + (emb.embedding_dim,)
    torch.testing.assert_close(y, ref(idx), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("output", ["mf", "lr_mf"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_offsets_match_embedding_bag(loaded, mode, output, include_last_offset):
    table, keys, weight = loaded
    idx = torch.randint(0, 21, (17,))
    # an empty bag, a repeated id, the full range
    if include_last_offset:
        offsets = torch.tensor([0, 3, 3, 9, 15])  # 4 bags; ids 15, 16 are in none
    else:
        offsets = torch.tensor([0, 3, 3, 9, 16])  # 5 bags, the last one runs to the end
    emb = pse.PSEmbedding(table, mode=mode, output=output, include_last_offset=include_last_offset)
    ref = nn.EmbeddingBag.from_pretrained(
        cols(weight, output).clone(), mode=mode, include_last_offset=include_last_offset
    )
    y = emb(keys[idx], offsets)
    expected = ref(idx, offsets)
    if include_last_offset:
        # ids past offsets[-1] are in no bag. nn.EmbeddingBag agrees for "sum", but for "mean" torch 2.13 divides
        # the last bag by (len(input) - offsets[-2]) instead of its size; we follow the definition: the bag
        # is input[offsets[-2]:offsets[-1]], i.e. the same as the trimmed input.
        expected = ref(idx[: int(offsets[-1])], offsets)
        if mode == "sum":
            torch.testing.assert_close(expected, ref(idx, offsets))
    assert y.shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_2d_and_per_sample_weights_match_embedding_bag(loaded, mode):
    table, keys, weight = loaded
    idx = torch.randint(0, 21, (6, 5))
    emb = pse.PSEmbedding(table, mode=mode, output="lr_mf")
    ref = nn.EmbeddingBag.from_pretrained(weight.clone(), mode=mode)
    torch.testing.assert_close(emb(keys[idx]), ref(idx), rtol=1e-6, atol=1e-6)
    if mode == "sum":
        w = torch.rand(6, 5)
        torch.testing.assert_close(emb(keys[idx], per_sample_weights=w), ref(idx, per_sample_weights=w))
        flat_w = w.reshape(-1)
        offsets = torch.tensor([0, 4, 11, 11, 20])
        torch.testing.assert_close(
            emb(keys[idx].reshape(-1), offsets, per_sample_weights=flat_w),
            ref(idx.reshape(-1), offsets, per_sample_weights=flat_w),
        )


@pytest.mark.parametrize("mode", [None, "sum", "mean"])
def test_padding_matches_padding_idx(loaded, mode):
    table, keys, weight = loaded
    pad = 3  # a key that IS in the table with a nonzero row: must still read zeros
    assert bool(table.pull(keys[pad : pad + 1]).abs().sum() > 0)
    w = weight.clone()
    w[pad] = 0  # nn.Embedding reads the padding row (zeros); nn.EmbeddingBag skips it
    idx = torch.randint(0, 21, (5, 4))
    idx[0, :2] = pad
    idx[2, :] = pad  # a bag of padding only: zeros (and no count for mean)
    emb = pse.PSEmbedding(table, mode=mode, padding_id=int(keys[pad]), output="lr_mf")
    if mode is None:
        expected = nn.Embedding.from_pretrained(w, padding_idx=pad)(idx)
    else:
        expected = nn.EmbeddingBag.from_pretrained(w, mode=mode, padding_idx=pad)(idx)
    torch.testing.assert_close(emb(keys[idx]), expected, rtol=1e-6, atol=1e-6)
    if mode is not None:
        off = torch.tensor([0, 4, 8, 12])
        ref = nn.EmbeddingBag.from_pretrained(w, mode=mode, padding_idx=pad)
        torch.testing.assert_close(emb(keys[idx].reshape(-1), off), ref(idx.reshape(-1), off), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prior", [1.0, 0.2])
def test_cvm_output_columns(prior):
    keys = random_keys(6, seed=1)
    rows = np.random.default_rng(1).standard_normal((6, 1 + DIM)).astype(np.float32)
    show = np.array([0, 1, 5, 10, 100, 3], np.float32)
    click = np.array([0, 0, 2, 10, 7, 1], np.float32)
    table = pse.SparseTable(sgd_config())
    load_rows(table, keys, rows, show=show, click=click)
    # numpy reference of the cvm row: log(show+1), log(click+prior) - log(show+1), lr, mf (prior 1: Paddle's)
    ref_rows = np.concatenate(
        [np.log(show + 1)[:, None], (np.log(click + prior) - np.log(show + 1))[:, None], rows], axis=1
    ).astype(np.float32)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5], [5, 5, 0]])
    emb = pse.PSEmbedding(table, output="cvm_lr_mf", cvm_click_prior=prior)
    assert emb.embedding_dim == 3 + DIM
    torch.testing.assert_close(emb(torch.from_numpy(keys)[idx]), torch.from_numpy(ref_rows)[idx], rtol=1e-6, atol=1e-6)
    bag = pse.PSEmbedding(table, mode="mean", output="cvm_lr_mf", cvm_click_prior=prior)
    expected = nn.EmbeddingBag.from_pretrained(torch.from_numpy(ref_rows), mode="mean")(idx)
    torch.testing.assert_close(bag(torch.from_numpy(keys)[idx]), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prior", [0.0, -1.0, float("nan"), float("inf"), True, "0.2"])
def test_bad_cvm_click_prior_is_refused_by_name(prior):
    with pytest.raises(ValueError, match="cvm_click_prior must be a finite number > 0"):
        pse.PSEmbedding(pse.SparseTable(sgd_config()), output="cvm_lr_mf", cvm_click_prior=prior)


def test_int32_ids_and_offsets_accepted(loaded):
    table, keys, weight = loaded
    small = torch.tensor([5, 6, 7], dtype=torch.int64)
    load_rows(table, small.numpy(), weight[:3].numpy())
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf")
    y32 = emb(small.int(), torch.tensor([0, 2], dtype=torch.int32))
    y64 = emb(small, torch.tensor([0, 2]))
    torch.testing.assert_close(y32, y64, rtol=0, atol=0)
    torch.testing.assert_close(y64, torch.stack([weight[0] + weight[1], weight[2]]))


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare types
        return e
    return None


BAD_BAG_INPUTS = [
    # (name, ids(idx), offsets, per_sample_weights, mode, word the message must contain)
    ("float offsets", torch.tensor([1, 2, 3, 4]), torch.tensor([0.0, 2.0]), None, "sum", "offsets"),
    ("offsets past the end", torch.tensor([1, 2, 3, 4]), torch.tensor([0, 5]), None, "sum", "offsets"),
    ("offsets not from 0", torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2]), None, "sum", "offsets[0]"),
    ("decreasing offsets", torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3, 2]), None, "sum", "offsets"),
    ("2-D offsets", torch.tensor([1, 2, 3, 4]), torch.tensor([[0, 2]]), None, "sum", "offsets"),
    ("missing offsets", torch.tensor([1, 2, 3, 4]), None, None, "sum", "offsets"),
    ("offsets with 2-D ids", torch.tensor([[1, 2], [3, 4]]), torch.tensor([0, 1]), None, "sum", "offsets"),
    ("3-D ids", torch.tensor([[[1, 2], [3, 4]]]), None, None, "sum", "input"),
    ("psw wrong shape", torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]), torch.ones(3), "sum", "per_sample_weights"),
    ("psw 2-D wrong shape", torch.tensor([[1, 2], [3, 4]]), None, torch.ones(4), "sum", "per_sample_weights"),
    ("psw with mean", torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]), torch.ones(4), "mean", "per_sample_weights"),
    ("psw float64", torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]), torch.ones(4, dtype=torch.float64), "sum",
     "per_sample_weights"),
    ("float ids", torch.tensor([1.0, 2.0]), torch.tensor([0, 1]), None, "sum", "input"),
]


@pytest.mark.parametrize("case", BAD_BAG_INPUTS, ids=[c[0] for c in BAD_BAG_INPUTS])
def test_bad_bag_input_raises_like_embedding_bag(loaded, case):
    table, keys, weight = loaded
    _, idx, offsets, psw, mode, word = case
    ref = nn.EmbeddingBag.from_pretrained(weight.clone(), mode=mode)
    # torch's CPU kernel checks decreasing offsets only on its multi-threaded path, so the reference
    # runs with 2 threads whatever the process was set to; PSEmbedding checks them always.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = _raises(lambda: ref(idx, offsets, per_sample_weights=psw))
    finally:
        torch.set_num_threads(threads)
    assert expected is not None, "the case must be bad input for nn.EmbeddingBag too"
    emb = pse.PSEmbedding(table, mode=mode)
    got = _raises(lambda: emb(idx, offsets, per_sample_weights=psw))
    assert got is not None
    assert type(got) is type(expected), (got, expected)
    assert word in str(got)


def test_include_last_offset_validation(loaded):
    table, keys, weight = loaded
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf", include_last_offset=True)
    ref = nn.EmbeddingBag.from_pretrained(weight.clone(), include_last_offset=True)
    ids = torch.tensor([1, 2, 3])
    for off in (torch.tensor([], dtype=torch.long), torch.tensor([0, 4])):
        expected, got = _raises(lambda: ref(ids, off)), _raises(lambda: emb(keys[ids], off))
        assert type(got) is type(expected) and "offset" in str(got)
    # a single offset is zero bags, as in nn.EmbeddingBag
    assert emb(keys[ids], torch.tensor([0])).shape == ref(ids, torch.tensor([0])).shape == (0, DIM + 1)


def test_mode_none_bad_input(loaded):
    table, keys, _ = loaded
    emb = pse.PSEmbedding(table)
    ref = nn.Embedding(21, DIM)
    for bad in (torch.tensor([1.0]), torch.tensor([True]), torch.tensor([1], dtype=torch.int16)):
        assert type(_raises(lambda: emb(bad))) is type(_raises(lambda: ref(bad))) is RuntimeError
    with pytest.raises(ValueError, match="offsets"):
        emb(keys[:3], torch.tensor([0]))
    with pytest.raises(TypeError, match="input"):
        emb([1, 2, 3])


def test_constructor_validation(loaded):
    table = loaded[0]
    with pytest.raises(TypeError, match="table"):
        pse.PSEmbedding(object())
    with pytest.raises(ValueError, match="mode"):
        pse.PSEmbedding(table, mode="max")
    with pytest.raises(ValueError, match="output"):
        pse.PSEmbedding(table, output="cvm")
    with pytest.raises(ValueError, match="slot"):
        pse.PSEmbedding(table, slot=-1)
    with pytest.raises(ValueError, match="grad_scale"):
        pse.PSEmbedding(table, grad_scale=0.0)
    with pytest.raises(ValueError, match="grad_scale"):
        pse.PSEmbedding(table, grad_scale=math.nan)
    with pytest.raises(ValueError, match="include_last_offset"):
        pse.PSEmbedding(table, include_last_offset=True)
    with pytest.raises(ValueError, match="padding_id"):
        pse.PSEmbedding(table, padding_id=2**64)


def test_module_surface(loaded):
    table = loaded[0]
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf", slot=3, padding_id=-1)
    assert list(emb.parameters()) == [] and list(emb.buffers()) == []
    assert emb.state_dict() == {}
    r = repr(emb)
    assert "mode='sum'" in r and "slot=3" in r and "padding_id=-1" in r and f"dim={DIM + 1}" in r
    assert "include_last_offset" not in r  # default arguments are not shown


def _sgd_step_table(lr, keys, weight):
    table = pse.SparseTable(sgd_config(lr=lr))
    load_rows(table, keys.numpy(), weight.numpy())
    return table


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("form", ["offsets", "2d", "psw"])
def test_one_sgd_step_equals_embedding_bag_sparse_sgd(reduction, form):
    """Units: the table pushes grad_scale * dL/drow and SGD applies w -= lr_table * pushed.

    mean-reduced loss: grad_scale defaults to B, so the step is lr_table * B * dL/drow, which is
    torch.optim.SGD(lr = lr_table * B) on nn.EmbeddingBag. Sum-reduced loss with grad_scale=1.0: lr equal.
    """
    torch.manual_seed(1)
    n_keys, b = 12, 5
    keys = torch.from_numpy(random_keys(n_keys, seed=2))
    weight = torch.randn(n_keys, 1 + DIM)
    lr_table = 0.05
    table = _sgd_step_table(lr_table, keys, weight)
    grad_scale = None if reduction == "mean" else 1.0
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf", grad_scale=grad_scale)
    ref = nn.EmbeddingBag.from_pretrained(weight.clone(), freeze=False, mode="sum", sparse=True)
    opt = torch.optim.SGD(ref.parameters(), lr=lr_table * (b if reduction == "mean" else 1))

    idx = torch.tensor([[0, 1, 2, 1], [3, 3, 3, 4], [5, 6, 0, 0], [7, 8, 9, 10], [11, 0, 2, 4]])
    psw = torch.rand(b, 4) if form == "psw" else None
    target = torch.randn(b, 1 + DIM)
    if form == "offsets":
        args_ps = (keys[idx].reshape(-1), torch.arange(0, 20, 4))
        args_ref = (idx.reshape(-1), torch.arange(0, 20, 4))
    else:
        args_ps, args_ref = (keys[idx],), (idx,)

    def loss_of(y):
        per_instance = ((y - target) ** 2).sum(1)
        return per_instance.mean() if reduction == "mean" else per_instance.sum()

    loss_of(emb(*args_ps, per_sample_weights=psw)).backward()
    opt.zero_grad()
    loss_of(ref(*args_ref, per_sample_weights=psw)).backward()
    opt.step()
    torch.testing.assert_close(table.pull(keys), ref.weight.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref.weight.detach(), weight)  # the step moved something


def test_eval_stops_pushes(loaded):
    table, keys, weight = loaded
    before = table.pull(keys, with_stats=True)
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf").eval()
    y = emb(keys[:10].view(2, 5))
    assert not y.requires_grad
    psw = torch.ones(2, 5, requires_grad=True)
    emb(keys[:10].view(2, 5), per_sample_weights=psw).sum().backward()  # only psw gets a gradient
    torch.testing.assert_close(psw.grad, weight[:10].sum(1).view(2, 5))
    torch.testing.assert_close(table.pull(keys, with_stats=True), before, rtol=0, atol=0)
    emb.train()
    emb(keys[:10].view(2, 5)).sum().backward()
    after = table.pull(keys, with_stats=True)
    assert torch.equal(after[:10, 0], before[:10, 0] + 1)  # shows counted once back in training mode


def test_docstring_examples_run():
    result = doctest.testmod(embedding_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


def test_bench_script_runs_small(capsys):
    """scripts/bench_embedding.py at toy size (speed is not asserted: it only must run and report)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_embedding.py")
    spec = importlib.util.spec_from_file_location("bench_embedding", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--rows", "2000", "--batch", "16", "--slots", "3", "--steps", "1", "--warmup", "1", "--skip", "torchrec"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    for word in ("psembed", "breakdown", "eb_adagrad", "eb_sparseadam", "zipf", "uniform"):
        assert word in out
    ranks = bench.zipf_ranks(np.random.default_rng(0), 1.1, 1000, 20000)
    assert ranks.min() >= 0 and ranks.max() < 1000
    assert (ranks == 0).mean() > (ranks == 10).mean() > (ranks == 500).mean()  # heavy head


class RecordingTable:
    """Stands in for ``table`` in a PSEmbedding: appends every call to ``calls`` as ``(method, thread name,
    keys, with_stats or clicks)`` (copies), then pulls from ``table`` and pushes to it unless
    ``forward_push`` is off (the push then returns 0)."""

    def __init__(self, table, calls, forward_push=True):
        self.table, self.calls, self.forward_push = table, calls, forward_push
        self.dim = table.dim

    def _record(self, method, k, extra):
        self.calls.append((method, threading.current_thread().name, np.asarray(k).copy(), extra))

    def pull(self, k, with_stats=False):
        self._record("pull", k, bool(with_stats))
        return self.table.pull(k, with_stats)

    def push(self, k, grads, shows, clicks, slots=None):
        self._record("push", k, np.asarray(clicks).copy())
        return self.table.push(k, grads, shows, clicks, slots) if self.forward_push else 0

    def prefetch(self, k, with_stats=False):
        self._record("prefetch", k, bool(with_stats))


def test_prefetch_starts_exactly_the_pull_forward_makes(loaded):
    # PSEmbedding.prefetch dedups like forward: the table gets the same unique keys (first-occurrence order)
    # and the same with_stats, so a sharded table's next pull takes the prefetched rows.
    table, keys, weight = loaded
    calls = []
    ids = keys[[3, 1, 3, 7, 1, 20]]
    offsets = torch.tensor([0, 2, 4])
    for output in ("mf", "cvm_lr_mf"):
        emb = pse.PSEmbedding(RecordingTable(table, calls), mode="sum", output=output)
        calls.clear()
        emb.prefetch(ids, offsets)
        emb(ids, offsets)
        assert [c[0] for c in calls] == ["prefetch", "pull"]
        np.testing.assert_array_equal(calls[0][2], calls[1][2])
        np.testing.assert_array_equal(calls[0][2], keys[[3, 1, 7, 20]].numpy())
        assert calls[0][3] == calls[1][3] == (output == "cvm_lr_mf")
    with pytest.raises(RuntimeError, match="input must hold integer ids of dtype torch.int64"):
        emb.prefetch(ids.float(), offsets)  # bad input: the error forward gives


def test_prefetch_on_a_local_table_changes_nothing(loaded):
    table, keys, weight = loaded
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf")
    ids, offsets = keys[[0, 5, 5, 20]], torch.tensor([0, 1])
    rows_before = table.pull(keys, with_stats=True)
    n_before, stats_before = len(table), table.stats()
    # the independent expectation: nn.EmbeddingBag over the loaded weight (key index 20 reads zeros)
    expected = nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum")(torch.tensor([0, 5, 5, 20]), offsets)
    emb.prefetch(ids, offsets)
    # no pull (pull_misses would count key 20), no insert: stats first, since a pull itself counts misses
    assert len(table) == n_before == 20 and table.stats() == stats_before
    torch.testing.assert_close(table.pull(keys, with_stats=True), rows_before, rtol=0, atol=0)
    torch.testing.assert_close(emb(ids, offsets).detach(), expected, rtol=1e-6, atol=1e-6)
    stats_before = table.stats()
    table.prefetch(keys[:3])  # a local table has nothing to overlap: only the keys are checked
    assert len(table) == n_before and table.stats() == stats_before
    torch.testing.assert_close(table.pull(keys, with_stats=True), rows_before, rtol=0, atol=0)
    with pytest.raises(TypeError):
        table.prefetch(keys[:3].float())


def test_prefetch_dedup_is_reused_by_the_next_forward_only_for_equal_ids(loaded, monkeypatch):
    # forward after a prefetch of the same ids does not dedup again; other ids, or ids changed in place after
    # the prefetch, get a fresh dedup and the right output
    import torch_psembed.functional as PF

    table, keys, weight = loaded
    calls = []
    real = PF.dedup
    monkeypatch.setattr(PF, "dedup", lambda *a, **k: calls.append(1) or real(*a, **k))
    emb = pse.PSEmbedding(table, mode="sum", output="lr_mf")
    ids, offsets = keys[[0, 5, 5, 20]].clone(), torch.tensor([0, 1])
    expected = emb(ids, offsets).detach()
    calls.clear()
    emb.prefetch(ids, offsets)
    np.testing.assert_array_equal(emb(ids, offsets).detach(), expected)
    assert len(calls) == 1  # the prefetch's dedup served the forward
    emb.prefetch(ids, offsets)
    other = keys[[1, 2, 3, 3]]
    expected_other = pse.PSEmbedding(table, mode="sum", output="lr_mf")(other, offsets).detach()
    calls.clear()
    np.testing.assert_array_equal(emb(other, offsets).detach(), expected_other)
    assert len(calls) == 1  # other ids: a fresh dedup, not the prefetched one
    torch.testing.assert_close(
        expected_other, nn.EmbeddingBag.from_pretrained(weight.clone(), mode="sum")(torch.tensor([1, 2, 3, 3]), offsets)
    )
    calls.clear()
    emb.prefetch(ids, offsets)
    ids[0] = keys[7]  # changed in place after the prefetch
    fresh = pse.PSEmbedding(table, mode="sum", output="lr_mf")
    np.testing.assert_array_equal(emb(ids, offsets).detach(), fresh(ids, offsets).detach())
    assert len(calls) == 3  # prefetch, then a new dedup for the changed ids, then fresh's


def test_a_loss_that_does_not_depend_on_the_output_pushes_nothing(loaded):
    # docs/embedding.md, "Train and eval": a loss that does not depend on the output pushes nothing (no show
    # counted). Two modules on one table: only the rows of the one whose output the loss uses change.
    table, keys, weight = loaded
    before = table.pull(keys, with_stats=True)
    used = pse.PSEmbedding(table, mode="sum", slot=1, grad_scale=1.0)
    unused = pse.PSEmbedding(table, mode="sum", slot=2, grad_scale=1.0)
    dense = nn.Parameter(torch.tensor(2.0))
    offsets = torch.tensor([0, 2])
    y_unused = unused(keys[[0, 1, 20, 1]], offsets)  # key index 20 is not in the table: a push would create it
    assert y_unused.requires_grad
    (dense * 3.0).backward()  # depends on neither output
    assert dense.grad == 3.0
    assert len(table) == 20 and keys[20] not in table
    torch.testing.assert_close(table.pull(keys, with_stats=True), before, rtol=0, atol=0)
    loss = dense * used(keys[[5, 6, 6]], offsets).sum()  # depends on `used` only
    loss.backward()
    after = table.pull(keys, with_stats=True)
    assert len(table) == 20 and keys[20] not in table
    untouched = [i for i in range(21) if i not in (5, 6)]
    torch.testing.assert_close(after[untouched], before[untouched], rtol=0, atol=0)
    # the control: the used ids were pushed, show = their occurrences (1 and 2), and SGD (lr 1) moved their mf
    # by -dense per occurrence (output "mf": d loss / d row = dense for each occurrence; grad_scale=1); the lr
    # column is not in the output and gets a zero gradient
    torch.testing.assert_close(after[[5, 6], 0], before[[5, 6], 0] + torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    torch.testing.assert_close(after[[5, 6], 2], before[[5, 6], 2], rtol=0, atol=0)
    torch.testing.assert_close(after[[5, 6], 3:], before[[5, 6], 3:] - torch.tensor([[2.0], [4.0]]),
                               rtol=1e-6, atol=1e-6)


def test_feed_blocks_are_per_thread(loaded):
    # docs/embedding.md: feed blocks "are per thread". Thread A's block is open while thread B runs a step
    # (B pushes clicks 0), and B's own block is open while A runs its step (A pushes A's labels).
    table, keys, weight = loaded
    calls = []
    emb = pse.PSEmbedding(RecordingTable(table, calls, forward_push=False), output="lr_mf")
    ids = keys[[0, 1, 2]]  # mode=None, 1-D: one instance per id
    labels_a, labels_b = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 3.0, 2.0])
    steps = [threading.Barrier(2, timeout=30) for _ in range(3)]
    errors = []

    def step(tag):
        emb(ids).sum().backward()
        calls.append(("step", threading.current_thread().name, tag, None))

    def a():
        try:
            with pse.feed(clicks=labels_a):
                steps[0].wait()  # B runs a step while this block is open
                steps[1].wait()  # B has opened its own block
                step("a")
                steps[2].wait()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            for b in steps:
                b.abort()

    def b():
        try:
            steps[0].wait()
            step("b-outside")
            with pse.feed(clicks=labels_b):
                steps[1].wait()
                steps[2].wait()  # A ran its step while this block was open
                step("b-inside")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            for b_ in steps:
                b_.abort()

    threads = [threading.Thread(target=a, name="A", daemon=True), threading.Thread(target=b, name="B", daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread is still blocked"
    assert not errors, errors
    # each step is one push followed by its tag from the same thread
    by_tag = {}
    pushes = [c for c in calls if c[0] in ("push", "step")]
    for i, (method, name, tag, _) in enumerate(pushes):
        if method == "step":
            by_tag[tag] = [p for p in pushes[:i] if p[1] == name and p[0] == "push"][-1]
    assert set(by_tag) == {"a", "b-outside", "b-inside"} and len(pushes) == 6
    for tag, (_, name, k, clicks) in by_tag.items():
        np.testing.assert_array_equal(k, ids.numpy())
    np.testing.assert_array_equal(by_tag["b-outside"][3], np.zeros(3, np.float32))  # A's block is not B's
    np.testing.assert_array_equal(by_tag["a"][3], labels_a.numpy())  # B's block is not A's
    np.testing.assert_array_equal(by_tag["b-inside"][3], labels_b.numpy())
    emb(ids).sum().backward()  # and the main thread, outside every block, sees none of them
    assert calls[-1][0] == "push"
    np.testing.assert_array_equal(calls[-1][3], np.zeros(3, np.float32))
