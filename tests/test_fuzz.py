"""Fuzzing in the test suite: replay of every saved input, a short bounded fuzz run, and readable regressions.

The targets live in ``tests/fuzz/`` (``fuzz_checkpoint.py``: the checkpoint loader on mutated saves;
``fuzz_push_pull.py``: argument validation of pull/push/erase/load_rows and of the config dict;
``fuzz_server.py``: the RPC server endpoints called with malformed requests; ``fuzz_data_plane.py``: the TCP
data plane server fed raw frames, checked against a reference reader of the stream). Their property:
any input either succeeds (and the result matches an independent numpy model) or raises a documented
exception (ValueError and its subclasses CorruptCheckpointError/CheckpointMismatchError, TypeError, OSError)
and leaves the table unchanged; never a crash, hang, MemoryError, KeyError, RecursionError or silent garbage.

- ``test_saved_input``: every seed in ``tests/fuzz/corpus/<target>/`` and every finding in
  ``tests/fuzz/regressions/<target>/`` is replayed (one subprocess per target, so a segfault fails the test of
  the input that caused it instead of killing pytest).
- ``test_bounded_fuzz_run``: atheris (coverage-guided, libFuzzer) with a fixed seed and run count; when atheris
  is not installed, the same targets under a seeded random-mutation loop (never skipped).
- The ``test_load_*`` tests spell out the loader findings as readable cases. The longer campaign is
  ``scripts/fuzz.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed.errors import CheckpointMismatchError, CorruptCheckpointError

from conftest import child_env

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "fuzz")
TARGETS = ("checkpoint", "push_pull", "server", "data_plane")
# Bounded runs: iterations per target (deterministic with the fixed seed; ~5-10 s each on a quiet core).
RUNS = {"checkpoint": 1200, "push_pull": 600, "server": 600, "data_plane": 1200}
MAX_LEN = {"checkpoint": 8192, "push_pull": 2048, "server": 2048, "data_plane": 2048}
HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None

sys.path.insert(0, FUZZ)
import fuzz_checkpoint  # noqa: E402

fuzz_checkpoint.setup()


def _inputs(target):
    out = []
    for kind in ("corpus", "regressions"):
        d = os.path.join(FUZZ, kind, target)
        if os.path.isdir(d):
            out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if not f.startswith(".")]
    return out


_REPLAYS = {}


def _replay(target, tmp_path_factory):
    """Replay all saved inputs of ``target`` in one subprocess; ``{file: "ok" | traceback}``."""
    if target not in _REPLAYS:
        out = str(tmp_path_factory.mktemp("replay") / f"{target}.json")
        env = child_env()
        env["PSE_FUZZ_REPLAY_JSON"] = out
        files = _inputs(target)
        p = subprocess.run([sys.executable, os.path.join(FUZZ, f"fuzz_{target}.py"), "replay", *files],
                           env=env, capture_output=True, text=True, timeout=600)
        results = json.load(open(out)) if os.path.exists(out) else {}
        for f in files:  # inputs not reached: the process died on the first of them
            if f not in results:
                results[f] = f"replay process exited with status {p.returncode} on or before this input:\n" + \
                    (p.stdout + p.stderr)[-3000:]
                break
        _REPLAYS[target] = results
    return _REPLAYS[target]


@pytest.mark.parametrize(
    "target,path",
    [(t, p) for t in TARGETS for p in _inputs(t)],
    ids=[f"{os.path.basename(os.path.dirname(os.path.dirname(p)))}/{t}/{os.path.basename(p)}"
         for t in TARGETS for p in _inputs(t)],
)
def test_saved_input(target, path, tmp_path_factory):
    res = _replay(target, tmp_path_factory).get(path, "not replayed (an earlier input killed the process)")
    assert res == "ok", f"{target} input {path} violates the property:\n{res}"


@pytest.mark.parametrize("target", TARGETS)
def test_bounded_fuzz_run(target, tmp_path):
    script = os.path.join(FUZZ, f"fuzz_{target}.py")
    corpus = os.path.join(FUZZ, "corpus", target)
    findings = tmp_path / "findings"
    env = child_env()
    env["PSE_FUZZ_COLLECT"] = str(findings)
    # Known bugs fail their own test_saved_input; this run looks for new ones.
    env["PSE_FUZZ_KNOWN"] = os.path.join(FUZZ, "regressions", target)
    if HAVE_ATHERIS:
        out = tmp_path / "new"
        out.mkdir()
        cmd = [sys.executable, script, "atheris", f"-runs={RUNS[target]}", "-seed=1", f"-max_len={MAX_LEN[target]}",
               "-timeout=30", "-rss_limit_mb=4096", f"-artifact_prefix={tmp_path}/", str(out), corpus]
    else:  # atheris not installable here: a seeded random-mutation loop over the same corpus
        cmd = [sys.executable, script, "random", f"--runs={RUNS[target]}", "--seed=1", f"--corpus={corpus}",
               f"--artifacts={tmp_path}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = (p.stdout + p.stderr)[-6000:]
    found = sorted(os.listdir(findings)) if findings.exists() else []
    crashes = [f for f in os.listdir(tmp_path) if f.startswith(("crash-", "timeout-", "oom-"))]
    assert p.returncode == 0 and not found and not crashes, (
        f"fuzzing {target} ({'atheris' if HAVE_ATHERIS else 'random'}) found problems: {found + crashes}; "
        f"copy the inputs into tests/fuzz/regressions/{target}/\n{log}")


# -- readable regressions of the loader findings ------------------------------------------------------------------

def _seed_files():
    with open(os.path.join(FUZZ, "corpus", "checkpoint", "seed-00"), "rb") as f:
        return fuzz_checkpoint.unpack(f.read())[1]


def _write(root, files, fix_crc=True):
    files = dict(files)
    if fix_crc:
        fuzz_checkpoint.fix_manifest(files, 1)
    save = root / "save"
    fuzz_checkpoint.materialize(files, str(save))
    return str(save)


def _manifest(files):
    return json.loads(files["manifest.json"])


def _with_manifest(files, m):
    files = dict(files)
    files["manifest.json"] = json.dumps(m).encode()
    return files


def _refuses_and_keeps(save, exc=CorruptCheckpointError):
    """Load ``save`` into a table holding other rows: it must raise ``exc`` and leave the table unchanged."""
    from _common import same_state, state_diff, table_state

    t = fuzz_checkpoint.prestate_table()
    before = table_state(t._backend)
    with pytest.raises(exc) as info:
        t.load(save)
    after = table_state(t._backend)
    assert same_state(before, after), f"refused load changed the table: {state_diff(before, after)}"
    return info


def _data_file(files, column):
    m = _manifest(files)
    e = next(e for e in m["files"] if e["column"] == column and e["rows"] > 0)
    return f"{m['data_dir']}/{e['name']}", e


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 1.5])
def test_load_of_checksummed_bad_values_leaves_the_table_unchanged(tmp_path, value):
    """A file whose checksum matches but whose values _C.load_rows refuses (NaN show, fractional unseen_days).

    Finding of fuzz_checkpoint: the loader cleared the table before load_rows refused the rows, so a failed
    load emptied it (tests/fuzz/regressions/checkpoint/refused-load-empties-table-unseen-days).
    """
    files = _seed_files()
    name, e = _data_file(files, "base")
    base = np.frombuffer(files[name], "<f4").copy().reshape(e["rows"], -1)
    base[0, 0 if value != 1.5 else 3] = value  # show NaN/Inf/negative, or unseen_days 1.5
    files[name] = base.tobytes()
    _refuses_and_keeps(_write(tmp_path, files), (CorruptCheckpointError, ValueError))


@pytest.mark.parametrize("field", ["signature", "save_id", "tombstones", "base_id", "layout", "mode", "files",
                                   "num_buckets", "format", "day", "data_dir", "sequence"])
def test_load_manifest_without_a_field_is_corrupt(tmp_path, field):
    """Findings of fuzz_checkpoint: a manifest missing 'signature', 'save_id' or 'tombstones' raised KeyError."""
    files = _seed_files()
    m = _manifest(files)
    del m[field]
    info = _refuses_and_keeps(_write(tmp_path, _with_manifest(files, m), fix_crc=False))
    assert "manifest.json" in str(info.value)


@pytest.mark.parametrize("field", ["part", "column", "name", "rows", "crc32", "bytes"])
def test_load_file_entry_without_a_field_is_corrupt(tmp_path, field):
    """Finding of fuzz_checkpoint: a file entry without 'part' raised KeyError from group_files."""
    files = _seed_files()
    m = _manifest(files)
    del m["files"][0][field]
    _refuses_and_keeps(_write(tmp_path, _with_manifest(files, m), fix_crc=False))


@pytest.mark.parametrize("field", ["column", "part"])
def test_read_serving_file_entry_without_a_field_is_corrupt(tmp_path, field):
    """Finding of fuzz_checkpoint: read_serving raised KeyError for a file entry without 'column'."""
    from torch_psembed.checkpoint import read_serving

    with open(os.path.join(FUZZ, "corpus", "checkpoint", "seed-09"), "rb") as f:
        files = fuzz_checkpoint.unpack(f.read())[1]
    m = _manifest(files)
    assert m["format"] == "torch_psembed.serving"
    assert read_serving(_write(tmp_path / "ok", files, fix_crc=False))["keys"].size > 0
    del m["files"][0][field]
    with pytest.raises(CorruptCheckpointError, match="manifest.json"):
        read_serving(_write(tmp_path / "bad", _with_manifest(files, m), fix_crc=False))


def test_load_deeply_nested_manifest_is_corrupt_not_recursionerror(tmp_path):
    files = _seed_files()
    files["manifest.json"] = b'{"format": "torch_psembed.table", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    _refuses_and_keeps(_write(tmp_path, files, fix_crc=False))


@pytest.mark.parametrize("rows", [10**9, 10**12])
def test_load_absurd_row_count_is_corrupt_not_memoryerror(tmp_path, rows):
    """Finding: the loader allocated the manifest's row count before checking the files' sizes on disk."""
    files = _seed_files()
    m = _manifest(files)
    widths = {"keys": 8, "has_mf": 1, "base": 4 * m["layout"]["base_width"], "mf": 4 * m["layout"]["mf_width"]}
    for e in m["files"]:
        if e.get("bucket") == 0:
            e["rows"] = rows
            e["bytes"] = rows * widths[e["column"]]
    _refuses_and_keeps(_write(tmp_path, _with_manifest(files, m)))


@pytest.mark.parametrize("day", [-5, 10**30, 2.5, "3"])
def test_load_bad_day_is_refused_before_the_table_changes(tmp_path, day):
    """Finding: manifest 'day' out of range was applied after the rows were loaded (TypeError/ValueError late)."""
    files = _seed_files()
    m = _manifest(files)
    m["day"] = day
    _refuses_and_keeps(_write(tmp_path, _with_manifest(files, m)))


def test_load_checks_checksum_truncation_and_version(tmp_path):
    """The basic refusals the fuzzer starts from (each names the file; the table is unchanged)."""
    files = _seed_files()
    name, e = _data_file(files, "keys")
    bad = dict(files)
    bad[name] = bytes([files[name][0] ^ 1]) + files[name][1:]
    info = _refuses_and_keeps(_write(tmp_path / "crc", bad, fix_crc=False))
    assert "checksum" in str(info.value) and e["name"] in str(info.value)
    bad = dict(files)
    bad[name] = files[name][:-3]
    info = _refuses_and_keeps(_write(tmp_path / "trunc", bad, fix_crc=False))
    assert "truncated" in str(info.value) and e["name"] in str(info.value)
    m = _manifest(files)
    m["format_version"] = 2
    info = _refuses_and_keeps(_write(tmp_path / "ver", _with_manifest(files, m), fix_crc=False))
    assert "format_version" in str(info.value)


def test_load_of_another_config_is_a_mismatch(tmp_path):
    files = _seed_files()
    save = _write(tmp_path, files, fix_crc=False)
    t = pse.SparseTable(pse.TableConfig(dim=3))
    with pytest.raises(CheckpointMismatchError, match="dim"):
        t.load(save)
    assert len(t) == 0


def test_fixup_keeps_valid_saves_loadable(tmp_path):
    """The harness itself: a checksum fix-up of an unmutated save still loads and matches the files."""
    files = _seed_files()
    save = _write(tmp_path, files)
    t = fuzz_checkpoint.prestate_table()
    t.load(save)
    m = _manifest(files)
    assert len(t) == m["rows"] > 0
    # the fix-up recomputes nothing for an unmutated save: the writer's checksums are zlib's (docs/format.md)
    fixed = dict(files)
    fuzz_checkpoint.fix_manifest(fixed, 1)
    assert _manifest(fixed)["files"] == m["files"]
    for e in m["files"]:
        assert e["crc32"] == zlib.crc32(files[f"{m['data_dir']}/{e['name']}"]), e["name"]
    # and what loaded is the rows of the files
    keys = [np.frombuffer(files[f"{m['data_dir']}/{e['name']}"], "<i8") for e in m["files"] if e["column"] == "keys"]
    keys = np.concatenate(keys)
    assert keys.size == m["rows"] and all(int(k) in t for k in keys)


def test_server_endpoint_refuses_a_tensor_that_requires_grad():
    """Finding of fuzz_server: ``server._as_array`` calls ``tensor.numpy()`` unguarded, so a request carrying a
    tensor that requires grad (RPC pickles it as such) raised RuntimeError instead of TypeError/ValueError."""
    import torch

    from torch_psembed.distributed import server

    server.configure(0, 1)
    try:
        server.create_table("t", pse.TableConfig(dim=2).to_dict())
        g = torch.zeros(2, 3, requires_grad=True)
        with pytest.raises((TypeError, ValueError), match="grads"):
            server.push("t", torch.tensor([1, 2]), g, torch.ones(2), torch.zeros(2))
        assert len(server.local_table("t")) == 0
    finally:
        server.configure(-1, 0)
