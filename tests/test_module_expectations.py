"""What a PyTorch user expects of an nn.Module and an embedding layer, where an audit (session 24) found
PSEmbedding or InferenceEmbedding silently doing otherwise: loss scaling (GradScaler), freezing with
requires_grad_(False), dtype conversions (half/double), cuda() without a GPU, pickling and deep copies."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import torch_psembed as pse
from torch_psembed.config import SGD, CtrAccessorConfig, TableConfig

DIM = 2


def _table():
    sgd = SGD(learning_rate=0.01, initial_range=0.0)
    return pse.SparseTable(TableConfig(dim=DIM, accessor=CtrAccessorConfig(embedx_threshold=0.0),
                                       lr_optimizer=sgd, mf_optimizer=sgd))


def _rows(t, keys=(1, 2, 3)):
    return t.pull(torch.tensor(keys), with_stats=True)


class FixedScaler:
    """A GradScaler stand-in with a fixed scale (torch.amp.GradScaler's interface for PSEmbedding)."""

    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


IDS = torch.tensor([[1, 2], [1, 3]])
WEIGHT = torch.tensor([[0.5, -1.0, 2.0]])


def _step(emb, factor=1.0):
    out = emb(IDS) @ WEIGHT.T
    (out.sum() * factor).backward()


def test_a_grad_scaler_scale_is_divided_out_of_the_pushed_gradient():
    plain, scaled = _table(), _table()
    for _ in range(3):  # the first push creates mf (threshold 0), the next ones train it
        _step(pse.PSEmbedding(plain, mode="sum", output="lr_mf"))
        _step(pse.PSEmbedding(scaled, mode="sum", output="lr_mf", grad_scaler=FixedScaler(1024.0)), factor=1024.0)
    torch.testing.assert_close(_rows(scaled), _rows(plain), rtol=1e-6, atol=0)
    assert float(_rows(plain)[0, 2]) != 0.0  # the pushes did train


def test_with_a_grad_scaler_an_overflowed_gradient_skips_the_push_as_the_scaler_skips_the_step():
    t = _table()
    emb = pse.PSEmbedding(t, mode="sum", output="lr_mf", grad_scaler=FixedScaler(2.0**16))
    _step(emb)
    before = _rows(t).clone()
    with pytest.warns(RuntimeWarning, match="cannot make the grad_scaler .a FixedScaler. skip the step"):
        _step(emb, factor=float("inf"))  # an fp16 overflow under loss scaling: inf gradients
    torch.testing.assert_close(_rows(t), before, rtol=0, atol=0)  # nothing pushed, no show counted
    with pytest.raises(ValueError, match="NaN/Inf"):  # without a scaler, the table refuses it
        _step(pse.PSEmbedding(t, mode="sum", output="lr_mf"), factor=float("inf"))


def test_a_real_grad_scaler_on_cpu_matches_an_unscaled_step():
    plain, scaled = _table(), _table()
    _step(pse.PSEmbedding(plain, mode="sum", output="lr_mf"))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    emb = pse.PSEmbedding(scaled, mode="sum", output="lr_mf", grad_scaler=scaler)
    scaler.scale((emb(IDS) @ WEIGHT.T).sum()).backward()
    torch.testing.assert_close(_rows(scaled), _rows(plain), rtol=1e-6, atol=0)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        pse.PSEmbedding(plain, grad_scaler=2.0)


def test_an_overflow_in_the_embedding_gradient_alone_makes_the_grad_scaler_skip_the_step_and_back_off():
    # fp16 autocast: with a big first-layer weight the gradient into the embedding's output overflows, while
    # the Linear's own gradients stay finite. The push was skipped but the scaler never heard of it: the dense
    # step ran, the scale never dropped, and the table never trained, silently (audit, session 26).
    t = _table()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    emb = pse.PSEmbedding(t, mode="sum", output="lr_mf", grad_scaler=scaler)
    lin = torch.nn.Linear(DIM + 1, 1)
    opts = [torch.optim.SGD([lin.weight], lr=0.1), torch.optim.SGD([lin.bias], lr=0.1)]  # two: both skip

    def step():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lin(emb(IDS)).float().mean()
        for opt in opts:
            opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opts[0])  # as before clipping: the report holds for unscale_ and for step alike
        finite = all(bool(torch.isfinite(p.grad).all()) for p in lin.parameters())
        before = [p.detach().clone() for p in lin.parameters()]
        for opt in opts:
            scaler.step(opt)
        scale = scaler.get_scale()
        scaler.update()
        stepped = [not torch.equal(b, p) for b, p in zip(before, lin.parameters())]
        return finite, stepped, scale, scaler.get_scale()

    with torch.no_grad():
        lin.weight.fill_(3e4)
        lin.bias.fill_(1.0)
    finite, stepped, scale, new_scale = step()
    assert finite and stepped == [False, False] and new_scale == scale / 2  # skipped, and backed off
    assert len(t) == 0  # nothing pushed
    assert "_unscale_grads_" not in vars(scaler) and "update" not in vars(scaler)  # the scaler is as it was
    pickle.dumps(scaler)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    finite, stepped, scale, new_scale = step()  # no overflow: the next iteration steps and pushes as usual
    assert finite and stepped[1] and new_scale == scale  # (the weight's gradient is 0: the rows read zeros)
    assert len(t) == 3


@pytest.mark.parametrize("world,trainers,told", [(2, None, False), (3, 2, False), (3, 1, True)],
                         ids=["two_ranks", "two_trainers_one_server", "one_trainer_two_servers"])
def test_in_a_multi_process_job_an_embedding_overflow_leaves_the_scaler_alone(monkeypatch, world, trainers, told):
    # Only the rank whose embedding gradient overflowed would skip its step (the table's gradient is not
    # all-reduced as DDP's dense ones are), and the replicas would differ for good (audit, session 26): in a
    # job of more than one trainer the push is skipped with a warning and the scaler is not told. Dedicated
    # servers hold no replica: with one trainer the scaler is told, as in one process (session 27).
    from torch_psembed.distributed import runtime

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world)
    if trainers is not None:
        monkeypatch.setattr(runtime, "is_initialized", lambda: True)
        monkeypatch.setattr(runtime, "num_trainers", lambda: trainers)
    t = _table()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    emb = pse.PSEmbedding(t, mode="sum", output="lr_mf", grad_scaler=scaler)
    lin = torch.nn.Linear(DIM + 1, 1)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with torch.no_grad():
        lin.weight.fill_(3e4)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = lin(emb(IDS)).float().mean()
    if told:
        scaler.scale(loss).backward()
    else:
        with pytest.warns(RuntimeWarning, match="in a multi-process job the grad_scaler is not told"):
            scaler.scale(loss).backward()
    before = lin.bias.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert len(t) == 0 and "_unscale_grads_" not in vars(scaler)
    if told:  # skipped and lowered, as for a dense overflow
        assert torch.equal(before, lin.bias) and scaler.get_scale() < 2.0**12
    else:  # stepped, as every rank does (the bias: the weight's gradient is 0, the rows read zeros); scale kept
        assert not torch.equal(before, lin.bias) and scaler.get_scale() == 2.0**12


def test_requires_grad_false_freezes_the_rows_in_train_mode_too():
    t = _table()
    emb = pse.PSEmbedding(t, mode="sum", output="lr_mf")
    _step(emb)
    before = _rows(t).clone()
    assert emb.requires_grad_(False) is emb and emb.training
    out = emb(IDS)
    assert not out.requires_grad  # as a frozen nn.Embedding's output: nothing can push
    torch.testing.assert_close(_rows(t), before, rtol=0, atol=0)
    emb.requires_grad_(True)
    _step(emb)
    assert not torch.equal(_rows(t), before)
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        emb.requires_grad_("no")


@pytest.mark.parametrize("convert, dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.double(), torch.float64),
    (lambda m: m.to(torch.float16), torch.float16),
    (lambda m: m.double().float(), torch.float32),
    (lambda m: m.half().to("cpu"), torch.float16),  # a device move keeps the dtype
])
def test_dtype_conversions_convert_the_output(convert, dtype):
    t = _table()
    _step(pse.PSEmbedding(t, mode="sum", output="lr_mf"))
    emb = convert(pse.PSEmbedding(t, mode="sum", output="lr_mf"))
    out = emb(IDS)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), pse.PSEmbedding(t, mode="sum", output="lr_mf")(IDS).detach(),
                               rtol=1e-2, atol=1e-3)


def test_a_half_model_trains_its_table_like_a_float_one():
    # Sequential(PSEmbedding, Linear).double(): the dense layer and the output agree, and the pushed gradient
    # (cast back to float32) is the float model's.
    plain, converted = _table(), _table()
    for t, to in ((plain, lambda m: m), (converted, lambda m: m.double())):
        model = to(torch.nn.Sequential(pse.PSEmbedding(t, mode="sum", output="lr_mf"), torch.nn.Linear(3, 1)))
        with torch.no_grad():
            model[1].weight.copy_(WEIGHT)
            model[1].bias.zero_()
        for _ in range(2):
            model(IDS).sum().backward()
    torch.testing.assert_close(_rows(converted), _rows(plain), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_raises_as_for_nn_embedding():
    t = _table()
    with pytest.raises((AssertionError, RuntimeError)) as ours:
        pse.PSEmbedding(t).cuda()
    with pytest.raises(type(ours.value)):
        torch.nn.Embedding(3, 2).cuda()


@pytest.mark.parametrize("copy_it", [
    lambda m: copy.deepcopy(m),
    lambda m: pickle.dumps(m),
    lambda m: torch.save(m, io.BytesIO()),
    lambda m: pickle.dumps(m.table),
])
def test_pickling_or_deep_copying_says_how_to_save_the_rows(copy_it):
    emb = pse.PSEmbedding(_table())
    with pytest.raises(TypeError, match=r"cannot be pickled or copied.*table\.save\(path\)"):
        copy_it(emb)
    shallow = copy.copy(emb)  # a shallow copy shares the table, as it shares an nn.Embedding's weight
    assert shallow.table is emb.table


def test_inference_embedding_converts_its_output_dtype_and_shows_its_settings(tmp_path):
    t = _table()
    _step(pse.PSEmbedding(t, mode="sum", output="lr_mf"))
    pse.export(t, tmp_path / "serve", "float32", with_stats=True, rows="all")
    inf = pse.InferenceEmbedding.load(tmp_path / "serve", mode="sum", output="cvm_lr_mf", cvm_click_prior=0.5,
                                      include_last_offset=False)
    ref = inf(IDS)
    half = inf.half()
    assert half(IDS).dtype == torch.float16
    np.testing.assert_allclose(half(IDS).float().numpy(), ref.numpy(), rtol=1e-2, atol=1e-3)
    assert "cvm_click_prior=0.5" in repr(half) and "output_dtype=torch.float16" in repr(half)


@pytest.mark.parametrize("mode", [None, "sum"])
@pytest.mark.parametrize("timed", [False, True])
def test_output_may_be_changed_in_place_as_nn_embeddings_may(mode, timed):
    # mode=None returned a view made inside the pooling Function (and timing an identity view for every mode):
    # h += 1, relu_() or Dropout(inplace=True) raised "Output 0 of Pool is a view and is being modified
    # inplace" in training, where nn.Embedding's output allows it (found by an audit, session 25).
    table = pse.SparseTable(TableConfig(dim=3, accessor=CtrAccessorConfig(embedx_threshold=0.0),
                                        lr_optimizer=SGD(learning_rate=1.0), mf_optimizer=SGD(learning_rate=1.0)))
    emb = pse.PSEmbedding(table, mode=mode, output="lr_mf")
    if timed:
        emb.enable_timing()
    ids = torch.tensor([[1, 2], [2, 3]])
    h = emb(ids)
    h += 1.0
    h.mul_(2.0).sum().backward()
    # d(sum(2 (x + 1)))/dx = 2 per occurrence, scaled by the batch (grad_scale = 2 instances): key 2 twice
    expected_grad = {1: 2.0 * 2, 2: 2.0 * 2 * 2, 3: 2.0 * 2}
    lr = table.pull(torch.tensor([1, 2, 3]))[:, 0]  # SGD at rate 1 from 0: lr = -grad (the push that creates
    assert lr.tolist() == [-expected_grad[k] for k in (1, 2, 3)]  # mf drops its mf part: lr is checked)


def test_feed_captures_the_labels_at_forward_time():
    # feed kept the caller's float32 tensor without a copy: label smoothing in place after the forward changed
    # the clicks the backward pushed (found by an audit, session 25)
    table = pse.SparseTable(TableConfig(dim=2))
    emb = pse.PSEmbedding(table, mode="sum")
    labels = torch.tensor([1.0, 0.0])
    with pse.feed(labels):
        y = emb(torch.tensor([[1, 2], [3, 4]]))
    labels.mul_(0.8).add_(0.1)
    y.sum().backward()
    assert table.pull(torch.tensor([1, 2, 3, 4]), with_stats=True)[:, 1].tolist() == [1.0, 1.0, 0.0, 0.0]
