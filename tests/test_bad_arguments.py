"""Arguments that an audit found misread or refused with an unclear message (session 24): each is now either
taken as meant or refused with an exception naming the argument, and a refusal changes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.config import FTRL, SGD, AdaGrad, Adam, CtrAccessorConfig, TableConfig

DIM = 2


def _table(**kw):
    cfg = TableConfig(dim=DIM, accessor=CtrAccessorConfig(embedx_threshold=0.0), **kw)
    return pse.SparseTable(cfg)


def _push(t, keys, slots=None):
    n = len(keys)
    return t.push(torch.tensor(keys), torch.ones(n, 1 + DIM), torch.ones(n), torch.zeros(n),
                  None if slots is None else torch.tensor(slots, dtype=torch.int32))


def _state(t):
    e = t._backend.export("checkpoint")
    return e["keys"].copy(), e["base"].copy(), t.stats()


# -- slots: a checkpoint stores them as float32 ------------------------------------------------------------

def test_slots_up_to_2_pow_24_round_trip_through_a_checkpoint(tmp_path):
    t = _table()
    top = _C.SLOT_LIMIT - 1
    assert _C.SLOT_LIMIT == 2**24
    _push(t, [1, 2, 3], [0, 7, top])
    t.save(tmp_path / "ck", "checkpoint")
    again = _table()
    again.load(tmp_path / "ck")
    np.testing.assert_array_equal(again._backend.export("checkpoint")["base"][:, 4],
                                  t._backend.export("checkpoint")["base"][:, 4])
    assert sorted(again._backend.export("checkpoint")["base"][:, 4].tolist()) == [0, 7, top]


@pytest.mark.parametrize("bad", [2**24, 2**24 + 1, 2**31 - 1, -1, -7])
def test_a_slot_outside_0_to_2_pow_24_is_refused_and_changes_nothing(bad):
    t = _table()
    _push(t, [1], [3])
    before = _state(t)
    with pytest.raises(ValueError, match=r"slots must be in \[0, 16777216\).*slots\[1\] = " + str(bad)):
        _push(t, [1, 2], [4, bad])
    after = _state(t)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]


def test_psembedding_slot_limit_is_the_tables():
    t = _table()
    pse.PSEmbedding(t, slot=_C.SLOT_LIMIT - 1)
    with pytest.raises(ValueError, match=r"slot must be an int in \[0, 2\*\*24\)"):
        pse.PSEmbedding(t, slot=_C.SLOT_LIMIT)


# -- flags and days are not read as truthy values ------------------------------------------------------------

def test_with_stats_must_be_a_bool():
    t = _table()
    _push(t, [1])
    assert t.pull(torch.tensor([1]), np.bool_(True)).shape == (1, 3 + DIM)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="with_stats must be a bool"):
            t.pull(torch.tensor([1]), bad)
        with pytest.raises(TypeError, match="with_stats must be a bool"):
            t.prefetch(torch.tensor([1]), bad)


def test_end_day_takes_an_int_not_a_bool_and_not_int64_max():
    t = _table()
    _push(t, [1])
    for bad in (True, 1.0, -1, 2**63 - 1, 2**63):
        with pytest.raises(ValueError, match=r"day must be an int in \[0, 2\*\*63 - 1\)"):
            t.end_day(bad)
    assert t.day == -1 and len(t) == 1
    t.end_day(np.int64(3))
    assert t.day == 3
    # The C++ check for other callers: day + 1 (the admission draws' day index) must not overflow.
    with pytest.raises(ValueError, match=r"day must be in \[0, 2\^63 - 1\)"):
        t._backend.end_day(2**63 - 1)
    assert t.day == 3


def test_membership_of_a_tensor_of_several_keys_is_refused():
    t = _table()
    _push(t, [5])
    assert torch.tensor(5) in t and torch.tensor([5]) in t
    with pytest.raises(TypeError, match=r"a key must be one integer, got a torch.int64 tensor of shape \(2,\)"):
        torch.tensor([5, 6]) in t  # noqa: B015 - the test is the exception
    with pytest.raises(TypeError, match="torch.float32"):
        torch.tensor(5.0) in t  # noqa: B015


def test_a_big_endian_array_is_named_as_such():
    t = _table()
    with pytest.raises(TypeError, match=r"keys must have dtype int64, got int64 \(big-endian\)"):
        t.pull(np.array([1], dtype=">i8"))


# -- config values ---------------------------------------------------------------------------------------------

def test_numpy_numbers_are_taken_and_stored_as_python_numbers():
    cfg = TableConfig(dim=np.int64(4), lr_optimizer=SGD(learning_rate=np.float32(0.5)),
                      mf_optimizer=Adam(beta1=np.float64(0.5)), accessor=CtrAccessorConfig(delta_keep_days=np.int32(3)),
                      spin_wait_us=np.int64(5), max_keys=np.uint32(128))
    d = cfg.to_dict()
    json.dumps(d)  # a manifest holds it: numpy scalars would not serialise
    assert type(d["dim"]) is int and d["dim"] == 4
    assert (type(d["spin_wait_us"]), type(d["max_keys"])) == (int, int)
    assert type(d["lr_optimizer"]["learning_rate"]) is float and d["lr_optimizer"]["learning_rate"] == 0.5
    assert type(d["accessor"]["delta_keep_days"]) is int
    pse.SparseTable(cfg)


@pytest.mark.parametrize("make, field", [
    (lambda: SGD(learning_rate=True), "SGD.learning_rate"),
    (lambda: AdaGrad(initial_g2sum=None), "AdaGrad.initial_g2sum"),
    (lambda: AdaGrad(initial_g2sum=float("inf")), "AdaGrad.initial_g2sum"),
    (lambda: Adam(epsilon=float("inf")), "Adam.epsilon"),
    (lambda: Adam(beta1="0.9"), "Adam.beta1"),
    (lambda: FTRL(alpha=float("inf")), "FTRL.alpha"),
    (lambda: SGD(weight_bounds="ab"), "SGD.weight_bounds"),
    (lambda: SGD(weight_bounds=(float("nan"), 1.0)), "SGD.weight_bounds"),
    (lambda: CtrAccessorConfig(show_click_decay_rate="a"), "CtrAccessorConfig.show_click_decay_rate"),
    (lambda: CtrAccessorConfig(show_scale="no"), "CtrAccessorConfig.show_scale"),
    (lambda: CtrAccessorConfig(delta_keep_days=True), "CtrAccessorConfig.delta_keep_days"),
    (lambda: CtrAccessorConfig(delta_keep_days=2**70), "CtrAccessorConfig.delta_keep_days"),
    (lambda: TableConfig(dim=True), "TableConfig.dim"),
    (lambda: TableConfig(seed=True), "TableConfig.seed"),
    (lambda: TableConfig(num_threads=5000), "TableConfig.num_threads"),
])
def test_bad_config_values_are_refused_naming_the_field(make, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


# -- bags: empty offsets are zero bags ---------------------------------------------------------------------

@pytest.mark.parametrize("mode, weights", [("sum", False), ("sum", True), ("mean", False)])
def test_empty_offsets_are_zero_bags_and_push_nothing(mode, weights):
    # nn.EmbeddingBag returns (0, D) for empty offsets and ignores the ids; so do we, backward included.
    t = _table()
    _push(t, [2])
    before = _state(t)
    emb = pse.PSEmbedding(t, mode=mode)
    ids = torch.tensor([1, 2, 3])
    psw = torch.ones(3) if weights else None
    out = emb(ids, torch.empty(0, dtype=torch.long), per_sample_weights=psw)
    ref = torch.nn.EmbeddingBag(4, emb.embedding_dim, mode=mode)(ids, torch.empty(0, dtype=torch.long),
                                                                  per_sample_weights=psw)
    assert out.shape == ref.shape == (0, emb.embedding_dim)
    out.sum().backward()
    after = _state(t)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


@pytest.mark.parametrize("field, value", [
    ("first_order_std", float("inf")),  # was accepted: every label came out 0
    ("pair_std", float("inf")),  # was accepted: NaN click probabilities
    ("zipf_max", float("inf")),
    ("vocab_min", 1.5),
    ("ctr", "0.1"),  # was a raw TypeError from a comparison
    ("num_slots", True),
])
def test_bad_simulator_values_are_refused_naming_the_field(field, value):
    from torch_psembed.data import SimulatorConfig

    with pytest.raises(ValueError, match=f"SimulatorConfig.{field} must be"):
        SimulatorConfig(**{field: value})


def test_membership_takes_a_keys_signed_and_unsigned_spellings_in_both_classes(tmp_path):
    t = _table()
    _push(t, [-1, 7])
    pse.export(t, tmp_path / "serve", "float32", rows="all")
    inf = pse.InferenceEmbedding.load(tmp_path / "serve")
    for holder in (t, inf):
        assert -1 in holder and 2**64 - 1 in holder and np.uint64(2**64 - 1) in holder and torch.tensor(7) in holder
        assert 2**64 not in holder and -(2**63) - 1 not in holder and 1.0 not in holder and True not in holder
        with pytest.raises(TypeError, match="a key must be one integer"):
            torch.tensor([7, -1]) in holder  # noqa: B015


def test_table_names_longer_than_the_data_plane_carries_are_refused():
    # a sharded table with a name over 1024 bytes was created, then every pull failed and a push raised after
    # its local part was applied (found by an audit, session 25); refused for local tables too
    limit = _C.MAX_TABLE_NAME_BYTES
    assert limit == 1024
    pse.SparseTable(TableConfig(dim=2), name="x" * limit)
    pse.SparseTable(TableConfig(dim=2), name="\u00e9" * (limit // 2))  # 2 bytes each in UTF-8
    for name in ("x" * (limit + 1), "\u00e9" * (limit // 2 + 1)):
        with pytest.raises(ValueError, match=f"name must have at most {limit} bytes in UTF-8"):
            pse.SparseTable(TableConfig(dim=2), name=name)
