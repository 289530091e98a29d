"""Models: slot embeddings (PS and hashed) against numpy references, CTR DNN and DeepFM math."""

import numpy as np
import pytest
import torch
from torch import nn

import torch_psembed as pse
from torch_psembed.data.hashing import mix64
from torch_psembed.models import CTRDNN, DeepFM, HashedSlotEmbedding, PSSlotEmbedding, build_model

from test_autograd import slots_of


class FixedEmbedding(nn.Module):
    """A stand-in slot embedding returning a given (B, S, W) block."""

    def __init__(self, block, lr_col=0, mf_cols=slice(1, None)):
        super().__init__()
        self.block = block
        self.num_slots = block.shape[1]
        self.width = block.shape[2]
        self.lr_col = lr_col
        self.mf_cols = mf_cols

    def forward(self, keys, offsets):
        return self.block


def test_hashed_embedding_matches_numpy_lookup():
    torch.manual_seed(0)
    emb = HashedSlotEmbedding(97, 5, num_slots=3)
    assert torch.all(emb.bag.weight[:, 0] == 0)
    with torch.no_grad():
        emb.bag.weight.copy_(torch.randn(97, 5))
    keys = torch.tensor([5, -3, 2**62, 7, 7, 11, 12], dtype=torch.int64)
    offsets = torch.tensor([0, 1, 3, 3, 5, 6])  # 2 samples x 3 slots, one empty bag
    out = emb(keys, offsets)
    assert out.shape == (2, 3, 5)
    W = emb.bag.weight.detach().numpy()
    rows = [int(mix64(np.array([k], dtype=np.int64).view(np.uint64))[0] % 97) for k in keys.tolist()]
    ends = offsets.tolist()[1:] + [7]
    ref = np.stack([W[rows[a:b]].sum(0) if b > a else np.zeros(5) for a, b in zip(offsets.tolist(), ends)])
    np.testing.assert_allclose(out.detach().numpy().reshape(6, 5), ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert emb.bag.weight.grad.is_sparse
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.1)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):  # as the job's step (train.py)
        opt.step()
    assert emb.memory_bytes(opt) == 2 * 97 * 5 * 4
    with pytest.raises(ValueError, match="num_slots"):
        emb(keys, offsets[:4])
    with pytest.raises(ValueError, match="num_buckets"):
        HashedSlotEmbedding(0, 5, 3)


def test_ctr_dnn_wide_part_and_shapes():
    torch.manual_seed(0)
    block = torch.randn(4, 3, 5)
    model = CTRDNN(FixedEmbedding(block), hidden=(8,))
    with torch.no_grad():
        for p in model.mlp.parameters():
            p.zero_()
    out = model(None, None)
    assert out.shape == (4,)
    torch.testing.assert_close(out, block[:, :, 0].sum(1))
    nowide = CTRDNN(FixedEmbedding(block), hidden=(8,), wide=False)
    with torch.no_grad():
        for p in nowide.mlp.parameters():
            p.zero_()
    torch.testing.assert_close(nowide(None, None), torch.zeros(4))


def test_deepfm_fm_term_is_pairwise_dot_products():
    torch.manual_seed(1)
    block = torch.randn(2, 4, 6)
    model = DeepFM(FixedEmbedding(block), hidden=(4,), wide=False)
    with torch.no_grad():
        for p in model.mlp.parameters():
            p.zero_()
    v = block[:, :, 1:].double().numpy()
    ref = np.array([sum(v[b, i] @ v[b, j] for i in range(4) for j in range(i + 1, 4)) for b in range(2)])
    np.testing.assert_allclose(model(None, None).detach().double().numpy(), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="model kind"):
        build_model("lr", FixedEmbedding(block))


def _filled_table(keys, dim=4):
    table = pse.SparseTable(pse.TableConfig(dim=dim, accessor=pse.CtrAccessorConfig(embedx_threshold=0.0)))
    k = torch.tensor(sorted(set(keys)), dtype=torch.int64)
    g = torch.randn(len(k), 1 + dim)
    table.push(k, g, torch.full((len(k),), 3.0), torch.ones(len(k)))
    table.push(k, g, torch.full((len(k),), 3.0), torch.ones(len(k)))
    return table


def _reference_bags(table, keys, offsets, S):
    """Sum of the cvm_lr_mf rows of each bag, from table.pull(with_stats=True) and the cvm formula."""
    n = len(keys)
    full = table.pull(torch.tensor(keys, dtype=torch.int64), with_stats=True).double().numpy()
    show, click = full[:, 0], full[:, 1]
    rows = np.concatenate([np.log(show + 1)[:, None], (np.log(click + 1) - np.log(show + 1))[:, None], full[:, 2:]], 1)
    ends = list(offsets[1:]) + [n]
    out = np.stack([rows[a:b].sum(0) if b > a else np.zeros(rows.shape[1]) for a, b in zip(offsets, ends)])
    return out.reshape(-1, S, rows.shape[1])


def test_ps_slot_embedding_single_and_per_slot_layouts_match_reference():
    torch.manual_seed(0)
    S = 3
    one_per_bag = [11, 12, 13, 21, 12, 23]  # 2 samples x 3 slots
    table = _filled_table(one_per_bag + [31, 32])
    emb = PSSlotEmbedding(table, S).eval()
    out = emb(torch.tensor(one_per_bag), torch.arange(6))
    assert out.shape == (2, 3, 7) and emb.lr_col == 2 and emb.mf_cols == slice(3, 7)
    ref = _reference_bags(table, one_per_bag, list(range(6)), S)
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=1e-5, atol=1e-6)
    # variable bags: per-slot modules
    keys = [11, 31, 12, 13, 32, 12, 23]
    offsets = [0, 2, 3, 5, 5, 6]  # sample 1 slot 1 is empty
    out2 = emb(torch.tensor(keys), torch.tensor(offsets))
    ref2 = _reference_bags(table, keys, offsets, S)
    np.testing.assert_allclose(out2.double().numpy(), ref2, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="num_slots"):
        emb(torch.tensor(keys), torch.tensor(offsets[:4]))


def test_ps_slot_embedding_trains_and_pushes_slots():
    torch.manual_seed(0)
    table = pse.SparseTable(pse.TableConfig(dim=4))
    emb = PSSlotEmbedding(table, 2)
    model = CTRDNN(emb, hidden=(8,))
    assert [n for n, _ in model.named_parameters() if n.startswith("embedding")] == []
    keys = torch.tensor([1, 2, 3, 4, 5])
    offsets = torch.tensor([0, 2, 3, 3])  # variable bags -> per-slot modules with slot ids 0, 1
    labels = torch.tensor([1.0, 0.0])
    with pse.feed(clicks=labels):
        loss = nn.functional.binary_cross_entropy_with_logits(model(keys, offsets), labels)
        loss.backward()
    assert len(table) == 5
    stats = table.pull(keys, with_stats=True)
    # shows: one per occurrence; clicks: the label of the sample holding the key
    assert stats[:, 0].tolist() == [1, 1, 1, 1, 1]
    assert stats[:, 1].tolist() == [1, 1, 1, 0, 0]


def test_ps_slot_embedding_timing_sums_its_modules():
    table = pse.SparseTable(pse.TableConfig(dim=4))
    emb = PSSlotEmbedding(table, 2)
    assert emb.timing() is None  # off until enabled
    emb.enable_timing()
    labels = torch.tensor([1.0, 0.0])
    for keys, offsets, calls in ((torch.tensor([1, 2, 3, 4]), torch.arange(4), 1),           # one PSEmbedding
                                 (torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2, 3, 3]), 2)):  # one per slot
        emb.reset_timing()
        assert all(v == 0 for v in emb.timing().values())
        with pse.feed(clicks=labels):
            emb(keys, offsets).sum().backward()
        t = emb.timing()
        assert t["calls"] == calls and set(t) == {"calls", "unique", "pull", "pool", "backward", "push"}
        assert t["pull"] > 0 and t["push"] > 0
    emb.enable_timing(False)
    assert emb.timing() is None


class _RecordingTable:
    """A table stand-in that forwards to a SparseTable and records every prefetch and push."""

    def __init__(self, table):
        self.table, self.dim, self.calls = table, table.dim, []

    def pull(self, k, with_stats=False):
        return self.table.pull(k, with_stats)

    def prefetch(self, k, with_stats=False):
        self.calls.append(("prefetch", np.asarray(k).copy()))

    def push(self, k, grads, shows, clicks, slots=None):
        self.calls.append(("push", np.asarray(k).copy(), np.asarray(grads).copy(), np.asarray(shows).copy(),
                           np.asarray(clicks).copy(), None if slots is None else np.asarray(slots).copy()))
        return self.table.push(k, grads, shows, clicks, slots)


@pytest.mark.parametrize("keys, offsets", [
    ([5, 6], [0, 2]),                # 1 sample x 2 slots: slot 0 holds 5 and 6, slot 1 is empty
    ([5, 6, 7, 8], [0, 0, 3, 3]),    # 2 samples x 2 slots: {}, {5, 6, 7} | {}, {8}
])
def test_slot_embeddings_key_count_equal_to_bag_count_is_not_one_key_per_bag(keys, offsets):
    # As many keys as bags, but uneven bags: the one-key-per-bag fast path must not be taken.
    torch.manual_seed(0)
    S, n = 2, len(keys)
    B = len(offsets) // S
    table = _filled_table(keys)
    rec = _RecordingTable(table)
    k, off = torch.tensor(keys), torch.tensor(offsets)
    ends = offsets[1:] + [n]
    bag_of_key = np.repeat(np.arange(len(offsets)), np.subtract(ends, offsets))  # bag b*S+s of each key
    # cvm_lr_mf (the default) against the table's rows
    emb = PSSlotEmbedding(rec, S).eval()
    emb.prefetch(k, off)
    assert rec.calls == []  # only the one-key-per-bag lookup is prefetched
    np.testing.assert_allclose(emb(k, off).double().numpy(), _reference_bags(table, keys, offsets, S),
                               rtol=1e-5, atol=1e-6)
    # lr_mf, and the hashed embedding over rows holding the same lr_mf values: both give the same bags
    emb = PSSlotEmbedding(rec, S, output="lr_mf")
    rows = table.pull(k).double().numpy()  # (n, 1 + dim): lr, mf
    ref = np.zeros((len(offsets), rows.shape[1]))
    np.add.at(ref, bag_of_key, rows)
    out = emb.eval()(k, off)
    np.testing.assert_allclose(out.double().numpy().reshape(-1, rows.shape[1]), ref, rtol=1e-5, atol=1e-6)
    hashed = HashedSlotEmbedding(1031, rows.shape[1], num_slots=S)
    buckets = hashed.bucket(k)
    assert len(set(buckets.tolist())) == n  # no collision among these keys
    with torch.no_grad():
        hashed.bag.weight[buckets] = torch.from_numpy(rows).float()
    torch.testing.assert_close(hashed(k, off), out, rtol=1e-5, atol=1e-6)
    # backward: each key pushed once, with its own bag's gradient, show, click (its sample's label) and slot
    emb.train()
    rec.calls.clear()
    labels = torch.tensor([1.0, 0.0][:B])
    w = torch.randn(B, S, rows.shape[1])
    with pse.feed(clicks=labels):
        (emb(k, off) * w).sum().backward()
    pushes = [c for c in rec.calls if c[0] == "push"]
    pushed = {}
    for _, pk, g, shows, clicks, slots in pushes:
        for j, key in enumerate(pk.tolist()):
            assert key not in pushed
            pushed[key] = (g[j], shows[j], clicks[j], slots[j])
    assert sorted(pushed) == sorted(keys)
    for key, bag in zip(keys, bag_of_key):
        g, show, click, slot = pushed[key]
        b, s = divmod(int(bag), S)
        np.testing.assert_allclose(g, B * w[b, s].numpy(), rtol=1e-5)  # default grad_scale: the batch size
        assert (show, click, slot) == (1, labels[b].item(), s)


def test_ps_slot_embedding_records_slot_i_for_the_keys_of_slot_i_in_both_layouts():
    # The one-key-per-bag lookup pushed every key with slot 0, the per-slot lookups slot i: a row's slot (kept
    # in checkpoints) depended on the layout of the batch (audit, session 26).
    S = 3
    keys = [100, 200, 300, 101, 201, 301]  # 2 samples x 3 slots: bag b is slot b % 3
    for extra in ([], [302]):  # one key per bag (the single lookup); a last bag of 2 keys (per-slot lookups)
        table = pse.SparseTable(pse.TableConfig(dim=4))
        rec = _RecordingTable(table)
        PSSlotEmbedding(rec, S)(torch.tensor(keys + extra), torch.arange(6)).sum().backward()
        pushes = [c for c in rec.calls if c[0] == "push"]
        assert len(pushes) == (1 if not extra else S)
        assert slots_of(table, keys + extra) == [0, 1, 2, 0, 1, 2] + [2] * len(extra)
    # a key in several slots of one single lookup: the slot of its last occurrence, as the table keeps the
    # last slot of a key repeated in one push
    table = pse.SparseTable(pse.TableConfig(dim=4))
    rec = _RecordingTable(table)
    PSSlotEmbedding(rec, S)(torch.tensor([7, 8, 9, 8, 7, 5]), torch.arange(6)).sum().backward()
    (_, pk, _, shows, _, slots), = [c for c in rec.calls if c[0] == "push"]
    assert pk.tolist() == [7, 8, 9, 5] and slots.tolist() == [1, 0, 2, 2] and shows.tolist() == [2, 2, 1, 1]
    assert slots_of(table, [7, 8, 9, 5]) == [1, 0, 2, 2]


def test_slot_embeddings_check_their_batch_and_arguments_as_embedding_bag_does():
    # offsets[0] = 1 read the bags from the wrong keys, silently; int32 keys were hashed two at a time by the
    # hashed baseline; output="cvm" was a KeyError; num_slots=0 a ZeroDivisionError later (audit, session 25)
    table = pse.SparseTable(pse.TableConfig(dim=2))
    ps = PSSlotEmbedding(table, 2, output="lr_mf")
    hashed = HashedSlotEmbedding(1031, 3, num_slots=2)
    keys = torch.arange(1, 6)
    for emb in (ps, hashed):
        for offsets, match in (([1, 2, 3, 3], r"offsets\[0\] must be 0"), ([0, 2, 1, 3], "must not decrease"),
                               ([0, 1, 2, 9], r"offsets\[-1\] = 9 is past the 5 keys"),
                               ([0, 1, 2], "B \\* num_slots")):
            with pytest.raises(ValueError, match=match):
                emb(keys, torch.tensor(offsets))
        with pytest.raises(TypeError, match="keys must be a 1-D int64 or int32 tensor"):
            emb(keys.float(), torch.tensor([0, 1, 2, 3]))
        off = torch.tensor([0, 1, 3, 3])
        assert torch.equal(emb(keys.int(), off.int()), emb(keys, off))  # int32 reads as int64
    assert torch.equal(hashed.bucket(torch.tensor([1, 2, 3, 4], dtype=torch.int32)),
                       hashed.bucket(torch.tensor([1, 2, 3, 4])))
    with pytest.raises(ValueError, match="output must be one of"):
        PSSlotEmbedding(table, 2, output="cvm")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_slots must be an int >= 1"):
            HashedSlotEmbedding(10, 4, num_slots=bad)
        with pytest.raises(ValueError, match="num_slots must be an int >= 1"):
            PSSlotEmbedding(table, bad)


def test_building_the_hashed_baseline_leaves_torchs_sparse_checks_alone():
    # the constructor switched torch's sparse invariant checks off for the whole process (audit, session 25)
    was = torch.sparse.check_sparse_tensor_invariants.is_enabled()
    torch.sparse.check_sparse_tensor_invariants.enable()
    try:
        HashedSlotEmbedding(100, 5, num_slots=3)
        assert torch.sparse.check_sparse_tensor_invariants.is_enabled()
    finally:
        if not was:
            torch.sparse.check_sparse_tensor_invariants.disable()


def test_build_model_refuses_hidden_widths_that_are_not_ints():
    emb = HashedSlotEmbedding(100, 5, num_slots=3)
    for bad in ("128", [2.7], [True]):
        with pytest.raises(ValueError, match="hidden must be a list of int widths"):
            build_model("dnn", emb, hidden=bad)
