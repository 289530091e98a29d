"""Fuzz target: input validation of pull/push (and the other array-taking calls) of SparseTable and _C.Table.

An input drives a small program: a table config (including malformed config dicts handed straight to
``_C.Table``), then up to 8 calls, each with arguments built from the input: numpy arrays or torch tensors of
any dtype (wrong ones, big-endian, bool, object), any rank, non-contiguous or zero-size views, lengths that do
not match, NaN/Inf/negative values, or plain Python objects.

Property: each call returns or raises ValueError/TypeError (nothing else); a refused call leaves the table
unchanged (rows, values, counts); an accepted push changes the table exactly as a numpy model says (show/click
sums per key, new keys inserted, the NaN rows skipped under ``nan_policy="skip"``); an accepted pull returns
the table's own rows (lr, mf or zeros) with the right shape and dtype. Never a crash, hang or MemoryError.
"""

from __future__ import annotations

import os
import sys

import warnings

import numpy as np

warnings.simplefilter("ignore")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

pse = None
_C = None
torch = None


def setup() -> None:
    global pse, _C, torch
    import torch as _torch

    import torch_psembed as _pse
    from torch_psembed import _C as _c

    pse, _C, torch = _pse, _c, _torch


class Provider:
    """Consumes an input byte string (like atheris.FuzzedDataProvider, but needing no atheris)."""

    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def left(self) -> int:
        return len(self.d) - self.p

    def byte(self) -> int:
        if self.p >= len(self.d):
            return 0
        self.p += 1
        return self.d[self.p - 1]

    def int_in(self, lo: int, hi: int) -> int:
        span = hi - lo + 1
        v = 0
        for _ in range((span.bit_length() + 7) // 8):
            v = (v << 8) | self.byte()
        return lo + v % span

    def pick(self, seq):
        return seq[self.int_in(0, len(seq) - 1)]

    def raw(self, n: int) -> bytes:
        b = self.d[self.p:self.p + n]
        self.p += len(b)
        return b.ljust(n, b"\0")


DTYPES = ["int64", "int64", "int64", "float32", "float32", "float32", "int32", "int32", "uint64", "float64",
          "float16", "bool", "uint8", ">i8", ">f4", "object", "complex64", "int16"]
SPECIAL_F = [0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e38, -0.0, 3.5, 1e-45, 0.5]


def values(p: Provider, dtype: np.dtype, n: int) -> np.ndarray:
    """``n`` values of ``dtype``: mostly small/special ones (so keys repeat and shows are sane), some raw bits."""
    mode = p.int_in(0, 3)
    if dtype == np.dtype(object):
        return np.array([p.pick([1, "a", None, 2.5, [1]]) for _ in range(n)], dtype=object)
    if mode == 0:  # raw bits
        return np.frombuffer(p.raw(n * dtype.itemsize), dtype=dtype).copy()
    if dtype.kind == "f" or dtype.kind == "c":
        return np.array([p.pick(SPECIAL_F) if p.int_in(0, 3) == 0 else p.int_in(0, 6) for _ in range(n)]).astype(dtype)
    if dtype.kind == "b":
        return np.array([p.int_in(0, 1) for _ in range(n)], dtype=bool)
    vals = [p.pick([0, 1, 2, 3, 7, -1, -2**63, 2**63 - 1, 2**31 - 1, -2**31]) if p.int_in(0, 4) == 0
            else p.int_in(0, 9) for _ in range(n)]
    with np.errstate(over="ignore"):
        return np.array(vals, dtype=np.int64).astype(dtype)


def array_arg(p: Provider, want_dtype: str, ndim: int, shape0: int, width: int):
    """An argument meant to be ``want_dtype[shape0, width]`` (or 1-D), usually right, sometimes wrong."""
    r = p.int_in(0, 15)
    dtype = np.dtype(want_dtype) if r >= 5 else np.dtype(p.pick(DTYPES))
    n = shape0 if p.int_in(0, 7) else p.int_in(0, 9)
    shape = (n,) if ndim == 1 else (n, width if p.int_in(0, 7) else p.int_in(0, 9))
    if p.int_in(0, 9) == 0:  # wrong rank
        shape = p.pick([(), (n, 1, 1), (n,) if ndim == 2 else (n, 1)])
    size = int(np.prod(shape)) if shape else 1
    arr = values(p, dtype, size).reshape(shape)
    form = p.int_in(0, 11)
    if form == 1 and arr.ndim >= 1:  # non-contiguous view
        arr = np.repeat(arr, 2, axis=0)[::2]
    elif form == 2 and arr.ndim == 2:
        arr = np.asfortranarray(arr)
    elif form == 3:  # unaligned but C-contiguous
        buf = np.zeros(arr.nbytes + 1, np.uint8)
        if dtype != np.dtype(object) and arr.size:
            view = buf[1:].view(dtype).reshape(arr.shape)
            view[...] = arr
            arr = view
    elif form == 4 and arr.dtype.kind in "iufb" and not arr.dtype.byteorder == ">":
        arr = arr.copy()
        arr.setflags(write=False)
    if form in (5, 6, 7) and arr.dtype.kind in "iufb" and arr.dtype.byteorder != ">" and arr.dtype != np.uint64:
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if form == 6 and t.dim() >= 1 and t.shape[0] > 1:
            t = t.flip(0)[::1].t() if t.dim() == 2 else t[::2]
        if form == 7:
            t = t.to("meta") if p.int_in(0, 1) else t.requires_grad_(t.is_floating_point())
        return t
    if form == 8:
        return p.pick([None, 3, "keys", [1, 2, 3], 2.5])
    return arr


def for_c(x):
    """What the distributed server hands ``_C``: numpy views of CPU tensors (others passed as they are)."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and not x.requires_grad:
        return x.numpy()
    return x


def checked_state(t):
    return C.table_state(t)


def model_after_push(before: dict, keys, shows, clicks, skip):
    """Per key: show/click after a push, from before's rows and the pushed sums (numpy float64 sums)."""
    sc = {}
    bk = before["keys"].tolist()
    for i, k in enumerate(bk):
        sc[k] = [float(before["base"][i, 0]), float(before["base"][i, 1])]
    for i, k in enumerate(keys.tolist()):
        if skip[i]:
            continue
        cur = sc.setdefault(k, [0.0, 0.0])
        cur[0] += float(shows[i])
        cur[1] += float(clicks[i])
    return sc


def one_input(data: bytes) -> None:
    p = Provider(data)
    dim = p.int_in(1, 4)
    nan_policy = p.pick(["raise", "skip"])
    acc = pse.CtrAccessorConfig(embedx_threshold=p.pick([0.0, 1.0, 5.0]), show_click_decay_rate=1.0,
                                delete_threshold=0.0)
    cfg = pse.TableConfig(dim=dim, accessor=acc, nan_policy=nan_policy, num_shards=p.int_in(1, 4), num_threads=1)
    d = cfg.to_dict()
    if p.int_in(0, 7) == 0:  # a malformed config dict straight to _C.Table
        key = p.pick(["dim", "num_shards", "num_threads", "seed", "nan_policy", "accessor", "lr_optimizer", "bogus",
                      "max_keys"])
        d[key] = p.pick([0, -1, 2**40, 1e300, float("nan"), None, "x", {}, [], True, 5000, 65537, 2**64])
        try:
            _C.Table(d)
        except BaseException as e:
            if not C.allowed_error(e):
                raise
        return
    st = pse.SparseTable(cfg)
    t = st._backend
    # a few known rows so refusals have something to leave unchanged
    k0 = np.array([1, 2, 3], np.int64)
    t.push(k0, np.full((3, 1 + dim), 0.5, np.float32), np.array([4, 1, 20], np.float32),
           np.array([1, 0, 2], np.float32), None)
    for _ in range(p.int_in(1, 8)):
        if p.left() <= 0:
            break
        op = p.int_in(0, 9)
        use_c = p.int_in(0, 1) == 1
        n = p.int_in(0, 6)
        before = checked_state(t)
        keys = array_arg(p, "int64", 1, n, 0)
        try:
            if op <= 4:  # push
                grads = array_arg(p, "float32", 2, n, 1 + dim)
                shows = array_arg(p, "float32", 1, n, 0)
                clicks = array_arg(p, "float32", 1, n, 0)
                slots = array_arg(p, "int32", 1, n, 0) if p.int_in(0, 2) == 0 else None
                if use_c:
                    skipped = t.push(*[for_c(x) for x in (keys, grads, shows, clicks, slots)])
                else:
                    skipped = st.push(keys, grads, shows, clicks, slots)
                check_push(t, before, keys, grads, shows, clicks, skipped, nan_policy)
            elif op <= 7:  # pull
                with_stats = p.int_in(0, 1) == 1
                if use_c:
                    out = t.pull(for_c(keys), with_stats)
                else:
                    out = st.pull(keys, with_stats).numpy()
                check_pull(t, before, keys, out, with_stats, dim)
            elif op == 8:  # erase
                k = for_c(keys)
                got = t.erase(k)
                karr = np.asarray(k)
                present = set(before["keys"].tolist()) & set(karr.tolist())
                C.check(got == len(present), f"erase returned {got}, {len(present)} of the keys existed")
                C.check(len(t) == before["len"] - len(present), "erase removed the wrong number of rows")
            else:  # load_rows with fuzzed arrays
                base = array_arg(p, "float32", 2, n, int(t.base_width))
                has_mf = array_arg(p, "uint8", 1, n, 0)
                mf = array_arg(p, "float32", 2, n, int(t.mf_width))
                t.load_rows(*[for_c(x) for x in (keys, base, has_mf, mf)])
                karr = np.asarray(keys)
                for k in karr.tolist():
                    C.check(k in t, f"load_rows accepted key {k} but the table does not hold it")
        except BaseException as e:
            if not C.allowed_error(e):
                raise
            after = checked_state(t)
            if not C.same_state(before, after):
                raise C.PropertyViolation(
                    f"op {op} refused ({type(e).__name__}: {e}) but changed the table: {C.state_diff(before, after)}")


def check_push(t, before, keys, grads, shows, clicks, skipped, nan_policy):
    k = np.asarray(keys.detach() if isinstance(keys, torch.Tensor) else keys)
    g = np.asarray(grads.detach() if isinstance(grads, torch.Tensor) else grads)
    s = np.asarray(shows.detach() if isinstance(shows, torch.Tensor) else shows)
    c = np.asarray(clicks.detach() if isinstance(clicks, torch.Tensor) else clicks)
    C.check(k.dtype == np.int64 and g.dtype == np.float32 and s.dtype == np.float32 and c.dtype == np.float32,
            f"push accepted dtypes {k.dtype}, {g.dtype}, {s.dtype}, {c.dtype}")
    C.check(np.all(np.isfinite(s)) and np.all(s >= 0) and np.all(np.isfinite(c)) and np.all(c >= 0),
            "push accepted NaN/Inf/negative shows or clicks")
    bad = ~np.all(np.isfinite(g), axis=1) if g.size else np.zeros(len(k), bool)
    C.check(nan_policy == "skip" or not bad.any(), "nan_policy='raise' accepted a NaN/Inf gradient")
    C.check(skipped == int(bad.sum()), f"push returned {skipped} skipped rows, {int(bad.sum())} had NaN/Inf")
    want = model_after_push(before, k, s, c, bad)
    after = C.table_state(t)
    got_keys = after["keys"].tolist()
    if set(got_keys) != set(want):
        raise C.PropertyViolation(f"keys after push {sorted(got_keys)} != model {sorted(want)}")
    for i, key in enumerate(got_keys):
        ws, wc = want[key]
        gs, gc = float(after["base"][i, 0]), float(after["base"][i, 1])
        if not (np.isclose(gs, ws, rtol=1e-5, atol=1e-6) and np.isclose(gc, wc, rtol=1e-5, atol=1e-6)):
            raise C.PropertyViolation(f"key {key}: show/click {gs}/{gc} after push, model says {ws}/{wc}")


def check_pull(t, before, keys, out, with_stats, dim):
    k = np.asarray(keys.detach() if isinstance(keys, torch.Tensor) else keys)
    C.check(k.dtype == np.int64 and k.ndim == 1, f"pull accepted keys of dtype {k.dtype}, ndim {k.ndim}")
    width = (3 if with_stats else 1) + dim
    C.check(out.dtype == np.float32 and out.shape == (len(k), width), f"pull gave {out.dtype}{out.shape}")
    after = C.table_state(t)
    C.check(C.same_state(before, after), "pull changed the table: " + C.state_diff(before, after))
    rows = {}
    j = 0
    for i, key in enumerate(before["keys"].tolist()):
        mf = before["mf"][j, :dim] if before["has_mf"][i] else np.zeros(dim, np.float32)
        j += int(before["has_mf"][i])
        lr = before["base"][i, 5]
        stats = before["base"][i, :2]
        rows[key] = np.concatenate([stats, [lr], mf]) if with_stats else np.concatenate([[lr], mf])
    zero = np.zeros(width, np.float32)
    for i, key in enumerate(k.tolist()):
        want = rows.get(key, zero)
        if not np.array_equal(out[i], want.astype(np.float32)):
            raise C.PropertyViolation(f"pull row {i} (key {key}) = {out[i]}, table holds {want}")


def make_seeds():
    import random

    rng = random.Random(0)
    seeds = []
    for i in range(24):
        seeds.append(bytes(rng.randrange(256) for _ in range(64 + 16 * i)))
    # structured ones: all-"right" choices (bytes of 0xff push the choices to the high, correct-type end)
    seeds.append(b"\x01\x00\x00\x01" + b"\xff" * 200)
    seeds.append(b"\x03\x01\x00\x02" + bytes(range(256)))
    return seeds


if __name__ == "__main__":
    C.main("push_pull", setup, one_input, make_seeds)
