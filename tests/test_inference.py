"""Serving export and InferenceEmbedding: the same outputs as PSEmbedding over the exported rows."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import torch_psembed as pse
from torch_psembed.checkpoint import _format as F
from torch_psembed.errors import CheckpointMismatchError, CorruptCheckpointError

DIM = 6
ACC = pse.CtrAccessorConfig(embedx_threshold=1.5, base_threshold=0.5, delta_threshold=0.1)


def trained_table(seed: int = 0, n: int = 400):
    """Rows with and without mf (the mf threshold splits them), keys both signs."""
    rng = np.random.default_rng(seed)
    cfg = pse.TableConfig(dim=DIM, accessor=ACC, mf_optimizer=pse.AdaGrad(learning_rate=0.5, initial_range=0.5))
    t = pse.SparseTable(cfg)
    keys = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)
    for _ in range(4):
        k = keys[rng.random(n) < 0.7]
        shows = rng.integers(1, 4, k.size).astype(np.float32)
        clicks = np.minimum(shows, rng.integers(0, 2, k.size)).astype(np.float32)
        t.push(k, rng.standard_normal((k.size, 1 + DIM)).astype(np.float32), shows, clicks)
    st = t.stats()
    assert 0 < st["keys_with_mf"] < st["keys"]
    return t, keys


def batch_ids(keys: np.ndarray, rng, shape) -> torch.Tensor:
    """Ids drawn from the table's keys plus some unknown ones."""
    pool = np.concatenate([keys, rng.integers(0, 2**62, 50, dtype=np.int64)])
    return torch.from_numpy(pool[rng.integers(0, pool.size, int(np.prod(shape)))].reshape(shape))


CASES = [
    # mode, input kind, extra kwargs
    (None, "2d", {}),
    ("sum", "2d", {}),
    ("mean", "2d", {}),
    ("sum", "offsets", {}),
    ("mean", "offsets", {"include_last_offset": True}),
    ("sum", "weights", {}),
    ("sum", "2d", {"padding_id": "first"}),
]


@pytest.mark.parametrize("output", ["mf", "lr_mf", "cvm_lr_mf"])
@pytest.mark.parametrize("mode,kind,kw", CASES)
def test_float32_export_matches_psembedding(tmp_path, mode, kind, kw, output):
    t, keys = trained_table()
    pse.export(t, tmp_path / "srv", dtype="float32", rows="all", with_stats=True)
    rng = np.random.default_rng(1)
    kw = dict(kw)
    if kw.get("padding_id") == "first":
        kw["padding_id"] = int(keys[0])
    if output == "cvm_lr_mf":
        kw["cvm_click_prior"] = 0.2  # serving must compute the ctr column as training did
    emb = pse.PSEmbedding(t, mode=mode, output=output, **kw).eval()
    inf = pse.InferenceEmbedding.load(tmp_path / "srv", mode=mode, output=output, **kw)
    args = ()
    if kind == "2d":
        ids = batch_ids(keys, rng, (8, 5))
    else:
        ids = batch_ids(keys, rng, (30,))
        offsets = torch.tensor([0, 3, 3, 10, 22] + ([30] if kw.get("include_last_offset") else []))
        args = (offsets,)
        if kind == "weights":
            args = (offsets, torch.from_numpy(rng.random(30, dtype=np.float32)))
    with torch.no_grad():
        want = emb(ids, *args)
        got = inf(ids, *args)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert list(inf.parameters()) == []


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_low_precision_export_holds_the_rounded_rows(tmp_path, dtype, torch_dtype):
    t, keys = trained_table(seed=2)
    m = pse.export(t, tmp_path / "srv", dtype=dtype)
    inf = pse.InferenceEmbedding.load(tmp_path / "srv", mode="sum", output="lr_mf")
    snap = t._backend.export("serving")  # rows with mf: what the default export holds
    assert len(inf) == m["rows"] == snap["keys"].size == t.stats()["keys_with_mf"]
    assert inf.nbytes == snap["keys"].size * (8 + 2 * (1 + DIM))
    ids = torch.from_numpy(snap["keys"][:40].reshape(8, 5))
    rows = t.pull(torch.from_numpy(snap["keys"][:40]))  # float32 lr, mf
    ref = rows.to(torch_dtype).to(torch.float64).view(8, 5, 1 + DIM).sum(1)
    got = inf(ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    assert not torch.equal(rows.to(torch_dtype).float(), rows), "the check must see the rounding"
    # Keys without mf are not exported: they read zeros, lr included.
    no_mf = np.setdiff1d(keys, snap["keys"])[:5]
    assert no_mf.size and torch.count_nonzero(inf.pull(torch.from_numpy(no_mf))) == 0
    assert int(snap["keys"][0]) in inf and int(no_mf[0]) not in inf


def test_export_of_base_and_deltas_equals_export_of_the_table_that_loaded_them(tmp_path):
    t, keys = trained_table(seed=3)
    rng = np.random.default_rng(4)
    t.save(tmp_path / "base", "base")
    paths = [tmp_path / "base"]
    for i in range(2):
        k = keys[rng.random(keys.size) < 0.3]
        t.push(k, rng.standard_normal((k.size, 1 + DIM)).astype(np.float32), np.full(k.size, 3, np.float32),
               np.ones(k.size, np.float32))
        t.end_day(i)
        t.save(tmp_path / f"d{i}", "delta")
        paths.append(tmp_path / f"d{i}")
    c = pse.SparseTable(t.config)
    for p in paths:
        c.load(p)
    pse.export(paths, tmp_path / "from_files", dtype="float32", with_stats=True)
    pse.export(c, tmp_path / "from_table", dtype="float32", with_stats=True)
    a = pse.checkpoint.read_serving(tmp_path / "from_files")
    b = pse.checkpoint.read_serving(tmp_path / "from_table")
    assert a["keys"].size > 50
    for k in ("keys", "values", "stats"):
        assert np.array_equal(a[k], b[k]), k
    with pytest.raises(CheckpointMismatchError, match="out of order"):
        pse.export([paths[0], paths[2]], tmp_path / "bad")


def test_cvm_output_needs_stats(tmp_path):
    t, _ = trained_table()
    pse.export(t, tmp_path / "srv")
    with pytest.raises(ValueError, match="with_stats=True"):
        pse.InferenceEmbedding.load(tmp_path / "srv", output="cvm_lr_mf")


def test_export_is_verified_and_replaced_atomically(tmp_path):
    t, keys = trained_table()
    pse.export(t, tmp_path / "srv")
    first = F.read_manifest(tmp_path / "srv", F.SERVING_FORMAT_NAME)
    pse.export(t, tmp_path / "srv", dtype="float32")
    m = F.read_manifest(tmp_path / "srv", F.SERVING_FORMAT_NAME)
    assert m["dtype"] == "float32" and m["save_id"] != first["save_id"]
    assert sorted(os.listdir(tmp_path / "srv")) == sorted([F.MANIFEST, m["data_dir"]])
    victim = os.path.join(tmp_path / "srv", m["data_dir"], "part-000.values")
    data = bytearray(open(victim, "rb").read())
    data[7] ^= 1
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch") as ei:
        pse.InferenceEmbedding.load(tmp_path / "srv")
    assert ei.value.path == victim
    mpath = os.path.join(tmp_path / "srv", F.MANIFEST)
    mm = json.load(open(mpath))
    mm["format_version"] = 2
    json.dump(mm, open(mpath, "w"))
    with pytest.raises(CorruptCheckpointError, match="unknown format_version"):
        pse.InferenceEmbedding.load(tmp_path / "srv")
    t.save(tmp_path / "ck")
    with pytest.raises(CorruptCheckpointError, match="format is"):
        pse.InferenceEmbedding.load(tmp_path / "ck")  # a table save is not an export


def test_bad_arguments(tmp_path):
    t, _ = trained_table()
    with pytest.raises(ValueError, match="dtype must be one of"):
        pse.export(t, tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="rows must be one of"):
        pse.export(t, tmp_path / "x", rows="some")
    with pytest.raises(TypeError, match="table_or_path"):
        pse.export(42, tmp_path / "x")
    with pytest.raises(ValueError, match="mode must be one of"):
        pse.InferenceEmbedding(torch.tensor([1, 2]), torch.zeros(2, 3), mode="max")
    with pytest.raises(ValueError, match="strictly ascending"):
        pse.InferenceEmbedding(torch.tensor([2, 1]), torch.zeros(2, 3))
    empty = pse.InferenceEmbedding(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3), mode="sum")
    assert torch.equal(empty(torch.tensor([[1, 2]])), torch.zeros(1, 2))


def test_inference_embedding_checks_its_arguments_like_psembedding():
    """Each bad argument raises naming it (as PSEmbedding and SparseTable.pull do), instead of a wrong row (float
    keys: 1.0 read key 1's row), an AttributeError/OverflowError from inside, or being silently ignored."""
    keys = torch.tensor([1, 2, 3])
    vals = torch.arange(9, dtype=torch.float32).view(3, 3)
    inf = pse.InferenceEmbedding(keys, vals)
    for bad in (torch.tensor([1.0]), torch.tensor([1], dtype=torch.uint8), torch.tensor([1], dtype=torch.int32)):
        with pytest.raises(TypeError, match="keys must have dtype torch.int64"):
            inf.pull(bad)
    with pytest.raises(ValueError, match=r"keys must be 1-D, got shape \(1, 1\)"):
        inf.pull(torch.tensor([[1]]))
    with pytest.raises(TypeError, match="keys must be a torch.Tensor or numpy.ndarray, got list"):
        inf.pull([1])
    assert torch.equal(inf.pull(np.array([2, 7], np.int64)), torch.tensor([[3.0, 4.0, 5.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(TypeError, match="padding_id must be None or an int id, got str"):
        pse.InferenceEmbedding(keys, vals, padding_id="a")
    with pytest.raises(TypeError, match="padding_id"):
        pse.InferenceEmbedding(keys, vals, padding_id=True)
    for big in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="padding_id must fit in int64"):
            pse.InferenceEmbedding(keys, vals, padding_id=big)
    assert pse.InferenceEmbedding(keys, vals, mode="sum", padding_id=np.int64(2)).padding_id == 2
    with pytest.raises(ValueError, match="include_last_offset=True needs mode"):
        pse.InferenceEmbedding(keys, vals, include_last_offset=True)
    with pytest.raises(TypeError, match="include_last_offset must be a bool"):
        pse.InferenceEmbedding(keys, vals, mode="sum", include_last_offset="yes")
    with pytest.raises(ValueError, match=r"keys must be 1-D, got shape \(3, 1\)"):
        pse.InferenceEmbedding(keys.view(3, 1), vals)
    with pytest.raises(TypeError, match="keys must have dtype torch.int64, got torch.float32"):
        pse.InferenceEmbedding(keys.float(), vals)
    with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
        pse.InferenceEmbedding([1, 2, 3], vals)
    assert 2**64 not in inf and -(2**63) - 1 not in inf and 2 in inf and torch.tensor(3) in inf


@pytest.mark.parametrize("which, where, value, match", [
    ("values", (1, 0), float("nan"), r"values row 1 \(key 2\).*not finite"),
    ("values", (2, 2), float("inf"), r"values row 2 \(key 3\).*not finite"),
    ("stats", (0, 1), float("nan"), r"stats row 0 \(key 1\).*not finite"),
    ("stats", (1, 0), -3.0, r"stats row 1 \(key 2\).*show and click must be >= 0"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_inference_embedding_refuses_values_that_give_nan_outputs(which, where, value, match, dtype):
    keys = torch.tensor([1, 2, 3])
    vals = torch.ones(3, 3, dtype=dtype)
    stats = torch.ones(3, 2)
    (vals if which == "values" else stats)[where] = value
    with pytest.raises(ValueError, match=match):
        pse.InferenceEmbedding(keys, vals, stats, mode="sum", output="cvm_lr_mf")


def _rewrite_serving(path, column, fn):
    """Apply ``fn`` to the numpy array of part 0's ``column`` file and fix its crc32 in the manifest."""
    import zlib

    m = json.load(open(os.path.join(path, F.MANIFEST)))
    e = next(e for e in m["files"] if e["column"] == column)
    p = os.path.join(path, m["data_dir"], e["name"])
    dt = {"keys": "<i8", "stats": "<f4"}.get(column) or {"float32": "<f4", "float16": "<f2",
                                                         "bfloat16": "<u2"}[m["dtype"]]
    a = np.fromfile(p, dt).reshape(e["rows"], -1)
    fn(a)
    data = a.tobytes()
    open(p, "wb").write(data)
    e["crc32"] = zlib.crc32(data)
    json.dump(m, open(os.path.join(path, F.MANIFEST), "w"))
    return p


NAN_BITS = {"float32": np.float32("nan"), "float16": np.float16("nan"), "bfloat16": np.uint16(0x7FC0)}


@pytest.mark.parametrize("problem, column, match", [
    ("nan value", "values", "row 3 .*not finite"),
    ("negative show", "stats", "row 4 .*>= 0"),
    ("inf click", "stats", "row 5 .*not finite"),
    ("swapped keys", "keys", "row 8 .*not strictly ascending"),
    ("duplicate key", "keys", "row 8 .*not strictly ascending"),
])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_loading_an_export_refuses_bad_values_naming_the_file(tmp_path, problem, column, match, dtype):
    """A serving file whose checksum matches but that holds a NaN, a negative show or keys out of order was
    served (NaN outputs, or rows under the wrong key after the reader re-sorted them): it is corrupt."""
    from torch_psembed import tools

    t, _ = trained_table()
    path = str(tmp_path / "srv")
    pse.export(t, path, dtype=dtype, with_stats=True)
    pse.InferenceEmbedding.load(path)

    def damage(a):
        if problem == "nan value":
            a[3, 2] = NAN_BITS[dtype]
        elif problem == "negative show":
            a[4, 0] = -1.0
        elif problem == "inf click":
            a[5, 1] = np.inf
        elif problem == "swapped keys":
            a[[7, 8]] = a[[8, 7]]
        else:
            a[8] = a[7]

    bad = _rewrite_serving(path, column, damage)
    for read in (pse.InferenceEmbedding.load, tools.verify):
        with pytest.raises(CorruptCheckpointError, match=match) as info:
            read(path)
        assert info.value.path == bad


def test_an_export_claiming_more_rows_than_its_files_hold_is_corrupt_before_any_allocation(tmp_path):
    """Audit (session 26): read_serving allocated the rows the manifest claimed before it checked a file's size:
    2^50 rows (byte counts consistent) gave a MemoryError (a traceback from ``tools verify``). Each file's size
    is checked first, as the readers of table saves do."""
    from torch_psembed import tools

    t, _ = trained_table()
    path = str(tmp_path / "srv")
    pse.export(t, path, with_stats=True)
    mpath = os.path.join(path, F.MANIFEST)
    m = json.load(open(mpath))
    for e in m["files"]:
        e["bytes"] = e["bytes"] // e["rows"] * 2**50
        e["rows"] = 2**50
    m["rows"] = 2**50
    json.dump(m, open(mpath, "w"))
    keys = os.path.join(path, m["data_dir"], "part-000.keys")
    for read in (pse.InferenceEmbedding.load, tools.verify):
        with pytest.raises(CorruptCheckpointError, match="truncated") as info:
            read(path)
        assert info.value.path == keys


def test_torchscript_is_refused_by_name(tmp_path):
    # torch.jit.script failed deep inside ("has no attribute '_rows' ... _ServingRows"); the refusal now lives
    # in the base both modules share, as PSEmbedding's did (review, session 26).
    t, _ = trained_table()
    pse.export(t, tmp_path / "srv")
    with pytest.raises(RuntimeError, match="InferenceEmbedding does not support TorchScript"):
        torch.jit.script(pse.InferenceEmbedding.load(tmp_path / "srv"))
