"""PSEmbedding with ids on an accelerator: the lookup runs on the host, the output lands on the ids' device.

Property: for ids on a CUDA device, the module's output is the CPU output moved to that device, and its
backward pushes exactly what the CPU backward pushes (two tables, same seed, same sequence, same rows after).
Mixing devices or passing meta tensors raises a RuntimeError naming the argument. The CUDA cases need a GPU;
the device checks run everywhere.
"""

import pytest
import torch

import torch_psembed as pse

DIM = 4
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def make_table():
    # mf from the first push, so every pushed id shows up in the pulled rows
    cfg = pse.TableConfig(dim=DIM, accessor=pse.CtrAccessorConfig(embedx_threshold=0.0), seed=3)
    return pse.SparseTable(cfg)


def test_meta_ids_are_refused_by_name():
    emb = pse.PSEmbedding(make_table())
    with pytest.raises(RuntimeError, match="meta device"):
        emb(torch.empty(3, dtype=torch.int64, device="meta"))


def test_offsets_on_another_device_are_refused_by_name():
    emb = pse.PSEmbedding(make_table(), mode="sum")
    with pytest.raises(RuntimeError, match=r"offsets must be on the device of input \(cpu\)"):
        emb(torch.tensor([1, 2, 3]), torch.empty(2, dtype=torch.int64, device="meta"))
    with pytest.raises(RuntimeError, match="per_sample_weights must be on the device of input"):
        emb(torch.tensor([[1, 2]]), None, torch.empty(1, 2, device="meta"))


def train_steps(device, mode, steps=3):
    """A few training steps of one PSEmbedding + a linear head with ids on ``device``; the table's rows after,
    and the outputs and per-sample-weight gradients of every step (on the CPU, for comparing)."""
    torch.manual_seed(0)
    table = make_table()
    emb = pse.PSEmbedding(table, mode=mode, output="cvm_lr_mf", slot=2)
    head = torch.nn.Linear(3 + DIM, 1).to(device)
    g = torch.Generator().manual_seed(1)
    outs, psw_grads = [], []
    for _ in range(steps):
        ids = torch.randint(0, 50, (16, 5), generator=g)
        labels = torch.randint(0, 2, (16,), generator=g).float()
        psw = torch.rand(16, 5, generator=g) if mode == "sum" else None
        ids_d, labels_d = ids.to(device), labels.to(device)
        psw_d = None if psw is None else psw.to(device).requires_grad_()
        with pse.feed(clicks=labels_d):
            y = emb(ids_d, None, psw_d) if mode == "sum" else emb(ids_d)
        assert y.device == ids_d.device
        logits = head(y).reshape(16, -1).sum(1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, labels_d).backward()
        outs.append(y.detach().cpu())
        if psw_d is not None:
            assert psw_d.grad.device == ids_d.device
            psw_grads.append(psw_d.grad.cpu())
    keys = torch.arange(50)
    return table.pull(keys, with_stats=True), outs, psw_grads


@cuda
@pytest.mark.parametrize("mode", [None, "sum", "mean"])
def test_cuda_ids_train_exactly_like_cpu_ids(mode):
    rows_cpu, outs_cpu, psw_cpu = train_steps("cpu", mode)
    rows_gpu, outs_gpu, psw_gpu = train_steps("cuda", mode)
    assert torch.equal(outs_gpu[0], outs_cpu[0])  # the same rows, pooled by the same CPU ops
    # from then on, the loss and its gradient run on the GPU, whose float ops round differently in the last
    # bits, so the pushed gradients (and the rows the next steps read) match to rounding only
    for a, b in zip(outs_cpu[1:], outs_gpu[1:]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows_gpu, rows_cpu, rtol=1e-5, atol=1e-6)
    assert torch.equal(rows_gpu[:, :2], rows_cpu[:, :2])  # shows and clicks are counts: exact
    for a, b in zip(psw_cpu, psw_gpu):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@cuda
def test_cuda_offsets_and_prefetch():
    table = make_table()
    table.push(torch.arange(10), torch.ones(10, 1 + DIM), torch.ones(10), torch.zeros(10))
    emb = pse.PSEmbedding(table, mode="sum")
    ids, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2])
    want = emb(ids, offsets)
    emb.prefetch(ids.cuda(), offsets.cuda())
    got = emb(ids.cuda(), offsets.cuda())
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)
    with pytest.raises(RuntimeError, match="offsets must be on the device of input"):
        emb(ids.cuda(), offsets)
