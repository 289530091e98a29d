"""Shared driver of the fuzz targets in this folder.

Each target is a script ``fuzz_<name>.py`` that defines ``setup()`` (imports torch_psembed; run under atheris'
import instrumentation so the Python code of the package is coverage-guided) and ``one_input(data: bytes)``,
which checks the property of that target and raises on a violation. Allowed outcomes of an input are a normal
return or one of the documented exceptions (``ValueError`` and its subclasses ``CorruptCheckpointError`` /
``CheckpointMismatchError``, ``TypeError``, ``OSError``); anything else (a ``KeyError``, ``MemoryError``,
``RecursionError``, an ``AssertionError`` from the property checks, a segfault or an abort) is a finding.

Modes (``python tests/fuzz/fuzz_<name>.py MODE ...``):

- ``atheris [libFuzzer flags] [corpus dirs]``: coverage-guided fuzzing with atheris/libFuzzer, e.g.
  ``-runs=2000 -seed=1 -max_len=8192 OUT_DIR tests/fuzz/corpus/<name>``.
- ``random --runs N --seed S --corpus DIR [--artifacts DIR]``: a seeded random-mutation loop over the corpus
  (bit flips, byte sets, inserts, deletes, splices, interesting values); used when atheris is not installed.
- ``replay FILE_OR_DIR...``: run the given inputs once each (the regression inputs and the seed corpus).
- ``seeds DIR``: (re)write the seed corpus of the target.

A crashing input is written to the artifact directory (``crash-<sha1>``); copy it into
``tests/fuzz/regressions/<name>/`` so ``tests/test_fuzz.py`` replays it forever.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import re
import signal
import sys
import traceback
from typing import Callable, Iterable, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The checkout's package, unless torch_psembed is importable already (installed, or put first on PYTHONPATH,
# as scripts/sanitize.sh pyasan does with its sanitized build).
if importlib.util.find_spec("torch_psembed") is None and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The exceptions an input may raise. CorruptCheckpointError and CheckpointMismatchError subclass ValueError.
ALLOWED = (ValueError, TypeError, OSError)

# Per-input wall limit in seconds (a hang is a finding).
PER_INPUT_TIMEOUT = 10


class PropertyViolation(AssertionError):
    """A target's property does not hold for an input (silent garbage, a changed table after a refusal...)."""


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise PropertyViolation(msg)


def allowed_error(e: BaseException) -> bool:
    """True when ``e`` is a documented refusal (not a MemoryError/RecursionError/KeyError/... in disguise)."""
    if isinstance(e, PropertyViolation):
        return False
    return isinstance(e, ALLOWED)


def table_state(t) -> dict:
    """Everything observable about a ``_C.Table`` (or SparseTable backend) that a refused call must not change."""
    snap = t.export("checkpoint")
    st = t.stats()
    return {
        "keys": snap["keys"].copy(),
        "base": snap["base"].copy(),
        "has_mf": snap["has_mf"].copy(),
        "mf": snap["mf"].copy(),
        "tombstones": snap["tombstones"].copy(),
        "len": len(t),
        "day": int(t.day),
        "keys_stat": st["keys"],
        "keys_with_mf": st["keys_with_mf"],
    }


def same_state(a: dict, b: dict) -> bool:
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            # bytes comparison: NaN-safe and exact
            if x.tobytes() != y.tobytes():
                return False
        elif x != y:
            return False
    return True


def state_diff(a: dict, b: dict) -> str:
    out = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or x.tobytes() != y.tobytes():
                out.append(f"{k}: shape {x.shape} -> {y.shape}")
        elif x != y:
            out.append(f"{k}: {x!r} -> {y!r}")
    return "; ".join(out)


# -- mutation fallback -----------------------------------------------------------------------------------------

_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
                b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"-1", b"0", b"99999999999999",
                b"1e308", b"NaN", b"null", b"[]", b"{}", b'""', b"\"delta\"", b"\"base\"", b"2"]


def mutate(data: bytes, rng: random.Random, others: List[bytes]) -> bytes:
    """A libFuzzer-like random mutation of ``data`` (1 to 8 steps)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(9)
        n = len(b)
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # set a byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            i = rng.randint(0, n)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:  # delete a range
            i = rng.randrange(n)
            del b[i:i + rng.randint(1, 16)]
        elif op == 4 and n:  # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 32))
            k = rng.randint(0, n)
            b[k:k] = b[i:j]
        elif op == 5 and n:  # interesting value over a position
            v = rng.choice(_INTERESTING)
            i = rng.randrange(n)
            b[i:i + len(v)] = v
        elif op == 6 and n:  # change an ASCII digit (manifest numbers)
            digits = [i for i in range(n) if 48 <= b[i] <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = str(rng.choice([0, 1, 2, 9, 10 ** rng.randint(1, 18)])).encode()
        elif op == 7 and others:  # splice with another input
            o = rng.choice(others)
            i = rng.randint(0, n)
            j = rng.randint(0, len(o))
            b = b[:i] + bytearray(o[j:])
        elif op == 8 and n:  # truncate
            del b[rng.randint(0, n):]
    return bytes(b)


# -- driver --------------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the per-input alarm; a BaseException so that no ``except OSError`` in the code swallows it."""


def _alarm(signum, frame):
    raise Hang(f"input ran longer than {PER_INPUT_TIMEOUT} s (a hang)")


def _run_guarded(one_input: Callable[[bytes], None], data: bytes) -> None:
    """Run one input under a SIGALRM deadline (replay and random modes; atheris uses libFuzzer's -timeout)."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(PER_INPUT_TIMEOUT)
    try:
        one_input(data)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _files(paths: Iterable[str]) -> List[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if not f.startswith("."))
        elif os.path.exists(p):
            out.append(p)
    return out


def _write_artifact(artifacts: str, data: bytes) -> str:
    os.makedirs(artifacts, exist_ok=True)
    p = os.path.join(artifacts, "crash-" + hashlib.sha1(data).hexdigest())
    with open(p, "wb") as f:
        f.write(data)
    return p


def _signature(e: BaseException) -> str:
    """Type and innermost torch_psembed (or target) frame of a finding: one saved input per signature."""
    tb = traceback.extract_tb(e.__traceback__)
    if isinstance(e, PropertyViolation):  # the target's check that failed, and what the message says (no numbers)
        where = [f for f in tb if os.path.basename(f.filename) != "_common.py"] or list(tb)
        top = where[-1] if where else None
        what = re.sub(r"\s+", " ", re.sub(r"[-+]?\d[\d.e+-]*", "#", str(e)))[:60].strip()
        return f"{type(e).__name__}@{os.path.basename(top.filename)}:{top.lineno}:{what}"
    where = [f for f in tb if "torch_psembed" in f.filename] or list(tb)
    top = where[-1] if where else None
    loc = f"{os.path.basename(top.filename)}:{top.lineno}" if top else "?"
    return f"{type(e).__name__}@{loc}"


def collecting(name: str, one_input: Callable[[bytes], None], outdir: str) -> Callable[[bytes], None]:
    """Wrap ``one_input`` so findings are saved (one input per signature) instead of stopping the run.

    Used by scripts/fuzz.sh and the bounded run of tests/test_fuzz.py (``PSE_FUZZ_COLLECT=DIR``) to get past
    a first known bug; with ``PSE_FUZZ_KNOWN=DIR[:DIR]`` the signatures of the saved regression inputs are not
    reported again (each of those fails its own replay test instead). Crashes of the process
    itself (segfault, abort) still stop libFuzzer, which writes the input as usual.
    """
    seen = set()
    os.makedirs(outdir, exist_ok=True)
    # Signatures of the saved regression inputs (PSE_FUZZ_KNOWN=DIR): bugs already reported are not new findings.
    known = set()
    for p in _files([d for d in os.environ.get("PSE_FUZZ_KNOWN", "").split(os.pathsep) if d]):
        with open(p, "rb") as f:
            data = f.read()
        try:
            one_input(data)
        except Exception as e:
            known.add(_signature(e))
    if known:
        print(f"[{name}] known findings (not reported again): {sorted(known)}", file=sys.stderr, flush=True)

    def wrapped(data: bytes) -> None:
        try:
            one_input(data)
        except Exception as e:
            sig = _signature(e)
            if sig not in seen and sig not in known:
                seen.add(sig)
                slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", sig)[:80]
                p = os.path.join(outdir, f"{name}-{slug}-" + hashlib.sha1(data).hexdigest()[:12])
                with open(p, "wb") as f:
                    f.write(data)
                print(f"[{name}] FINDING {sig}: {type(e).__name__}: {str(e)[:300]} -> {p}", file=sys.stderr,
                      flush=True)

    return wrapped


def main(name: str, setup: Callable[[], None], one_input: Callable[[bytes], None],
         make_seeds: Callable[[], List[bytes]]) -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ("atheris", "random", "replay", "seeds"):
        print(__doc__)
        sys.exit(2)
    mode = sys.argv[1]
    collect = os.environ.get("PSE_FUZZ_COLLECT") if mode in ("atheris", "random") else None
    if mode == "atheris":
        import atheris

        with atheris.instrument_imports(include=["torch_psembed"]):
            setup()
        if collect:
            one_input = collecting(name, one_input, collect)
        atheris.Setup([sys.argv[0]] + sys.argv[2:], one_input)
        atheris.Fuzz()
        return

    setup()
    if collect:
        one_input = collecting(name, one_input, collect)
    if mode == "seeds":
        out = sys.argv[2]
        os.makedirs(out, exist_ok=True)
        for i, s in enumerate(make_seeds()):
            with open(os.path.join(out, f"seed-{i:02d}"), "wb") as f:
                f.write(s)
        print(f"[{name}] wrote {i + 1} seeds to {out}")
        return
    if mode == "replay":
        files = _files(sys.argv[2:])
        failed = 0
        results = {}
        out_json = os.environ.get("PSE_FUZZ_REPLAY_JSON")
        for p in files:
            with open(p, "rb") as f:
                data = f.read()
            print(f"[{name}] replay {p}", flush=True)
            try:
                _run_guarded(one_input, data)
                results[p] = "ok"
            except BaseException as e:
                failed += 1
                results[p] = "".join(traceback.format_exception(e))[-4000:]
                print(f"[{name}] FAILED on {p}:", file=sys.stderr)
                traceback.print_exc()
            if out_json:  # rewritten after each input: a process that dies leaves the inputs done so far
                import json

                with open(out_json + ".tmp", "w") as f:
                    json.dump(results, f)
                os.replace(out_json + ".tmp", out_json)
        print(f"[{name}] replayed {len(files)} inputs, {failed} failed")
        sys.exit(1 if failed else 0)

    ap = argparse.ArgumentParser(prog=f"fuzz_{name}.py random")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--corpus", action="append", default=[])
    ap.add_argument("--artifacts", default=".")
    a = ap.parse_args(sys.argv[2:])
    corpus = [open(p, "rb").read() for p in _files(a.corpus)] or make_seeds()
    rng = random.Random(a.seed)
    for i in range(a.runs):
        data = mutate(rng.choice(corpus), rng, corpus)
        try:
            _run_guarded(one_input, data)
        except BaseException:
            p = _write_artifact(a.artifacts, data)
            traceback.print_exc()
            print(f"[{name}] run {i}: finding written to {p}", file=sys.stderr)
            sys.exit(1)
    print(f"[{name}] random: {a.runs} runs, seed {a.seed}, no finding")
