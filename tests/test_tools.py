"""``python -m torch_psembed.tools inspect|verify|merge|export``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed.checkpoint import _format as F
from torch_psembed.checkpoint import _rows as R
from torch_psembed.tools.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 4
CFG = pse.TableConfig(
    dim=DIM,
    accessor=pse.CtrAccessorConfig(nonclk_coeff=0.25, embedx_threshold=1.5, base_threshold=0.75,
                                   delta_threshold=0.5, show_click_decay_rate=0.8, delete_threshold=0.6),
)


@pytest.fixture
def chain(tmp_path):
    """A base and two deltas (with tombstones) of one producer, and the producer."""
    rng = np.random.default_rng(0)
    t = pse.SparseTable(CFG)
    keys = rng.integers(-(2**63), 2**63 - 1, 500, dtype=np.int64)

    def push(frac):
        k = keys[rng.random(keys.size) < frac]
        t.push(k, rng.standard_normal((k.size, 1 + DIM)).astype(np.float32),
               rng.integers(1, 4, k.size).astype(np.float32), np.zeros(k.size, np.float32))

    push(0.9)
    push(0.9)
    t.save(tmp_path / "base", "base")
    paths = [str(tmp_path / "base")]
    for i in range(2):
        push(0.4)
        t.end_day(i)
        t.save(tmp_path / f"delta{i}", "delta")
        paths.append(str(tmp_path / f"delta{i}"))
    assert sum(F.read_manifest(p)["tombstones"] for p in paths[1:]) > 0
    return paths, t


def test_inspect_prints_a_summary(chain, capsys):
    paths, t = chain
    assert main(["inspect", paths[1]]) == 0
    out = capsys.readouterr().out
    m = F.read_manifest(paths[1])
    assert "delta save" in out and m["save_id"] in out and f"sequence {m['sequence']}" in out
    assert f"{m['rows']:,} (" in out and f"tombstones {m['tombstones']:,}" in out and "bytes/key" in out
    assert main(["inspect", "--json", paths[0]]) == 0
    assert '"mode": "base"' in capsys.readouterr().out


def test_verify_reports_ok_and_names_a_damaged_file(chain, capsys):
    paths, _ = chain
    assert main(["verify"] + paths) == 0
    out = capsys.readouterr().out
    assert out.count("OK ") == 3
    m = F.read_manifest(paths[0])
    e = next(e for e in m["files"] if e["column"] == "mf" and e["rows"])
    victim = os.path.join(paths[0], m["data_dir"], e["name"])
    with open(victim, "r+b") as f:
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(["verify", paths[0]]) == 1
    err = capsys.readouterr().err
    assert "CorruptCheckpointError" in err and e["name"] in err and "checksum mismatch" in err


def test_merge_equals_loading_base_then_deltas(chain, tmp_path):
    paths, producer = chain
    assert main(["merge"] + paths + ["-o", str(tmp_path / "merged"), "--buckets", "8"]) == 0
    m = F.read_manifest(tmp_path / "merged")
    assert m["mode"] == "base" and m["num_buckets"] == 8 and m["sequence"] == 2 and m["tombstones"] == 0
    c = pse.SparseTable(CFG)
    for p in paths:
        c.load(p)
    want = c._backend.export("checkpoint")
    got = R.sort_by_key(R.read_rows(str(tmp_path / "merged"), m))
    for k in ("keys", "base", "has_mf", "mf"):
        assert np.array_equal(got[k], want[k]), k
    # The merged base keeps the chain position: the producer's next delta loads on top of it.
    producer.push(want["keys"][:20], np.ones((20, 1 + DIM), np.float32), np.full(20, 3, np.float32),
                  np.zeros(20, np.float32))
    producer.save(tmp_path / "delta2", "delta")
    m2 = pse.SparseTable(CFG)
    m2.load(tmp_path / "merged")
    m2.load(tmp_path / "delta2")
    c.load(tmp_path / "delta2")
    a, b = m2._backend.export("checkpoint"), c._backend.export("checkpoint")
    for k in ("keys", "base", "has_mf", "mf"):
        assert np.array_equal(a[k], b[k]), k
    # Deltas out of order are refused.
    assert main(["merge", paths[0], paths[2], "-o", str(tmp_path / "bad")]) == 1


def test_export_command_and_module_entry_point(chain, tmp_path, capsys):
    paths, _ = chain
    out = tmp_path / "srv"
    r = subprocess.run(
        [sys.executable, "-m", "torch_psembed.tools", "export"] + paths + ["-o", str(out), "--dtype", "float32"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout
    inf = pse.InferenceEmbedding.load(out, output="lr_mf")
    c = pse.SparseTable(CFG)
    for p in paths:
        c.load(p)
    snap = c._backend.export("serving")
    assert len(inf) == snap["keys"].size > 0
    import torch

    keys = torch.from_numpy(snap["keys"])
    assert torch.equal(inf(keys), c.pull(keys))
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "serving export" in printed and "float32" in printed
    assert main(["verify", str(out), str(tmp_path / "nothing")]) == 1
    captured = capsys.readouterr()
    assert "OK " in captured.out and "not a directory" in captured.err


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_deeply_nested_manifest_is_reported_not_a_recursion_error(tmp_path, command, capsys):
    # Regression (fuzzing): the tools' format sniffing parsed the manifest with bare json.loads.
    (tmp_path / F.MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    assert main([command, str(tmp_path)]) != 0
    out = capsys.readouterr()
    assert "CorruptCheckpointError" in out.out + out.err and "nested too deeply" in out.out + out.err


def test_merge_takes_the_save_rule_for_its_bucket_count(chain, tmp_path):
    paths, _ = chain
    assert main(["merge"] + paths + ["-o", str(tmp_path / "merged")]) == 0
    m = F.read_manifest(tmp_path / "merged")
    assert m["num_buckets"] == F.auto_num_buckets(m["rows"]) == 1  # a few hundred rows: one bucket


@pytest.mark.parametrize("buckets", ["0", "-1", "10000", "3000000000", "eight"])
def test_merge_refuses_a_bucket_count_no_save_may_have(chain, tmp_path, buckets, capsys):
    # Audit: --buckets 10000 wrote a save no reader accepts (num_buckets in [1, 9999]) and exited 0; -1 and
    # 3000000000 escaped as a ValueError traceback from _C.route.
    paths, _ = chain
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as info:
        main(["merge"] + paths + ["-o", str(out), "--buckets", buckets])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--buckets" in err and "1 to 9999" in err and buckets in err
    assert not os.path.exists(out / F.MANIFEST)
    from torch_psembed import tools

    with pytest.raises(ValueError, match=r"num_buckets must be an int in \[1, 9999\]"):
        tools.merge(paths, out, num_buckets=int(buckets) if buckets != "eight" else buckets)
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "1 to 9999" in " ".join(capsys.readouterr().out.split())


def test_merge_refuses_to_start_from_a_delta(chain, tmp_path, capsys):
    # Audit: merge D1 D2 wrote a "base" without the rows of the real base and exited 0.
    paths, _ = chain
    out = tmp_path / "merged"
    assert main(["merge", paths[1], paths[2], "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert paths[1] in err and "must start from a base or checkpoint" in err and "Traceback" not in err
    assert not os.path.exists(out)
    # export still takes one delta alone
    assert main(["export", paths[1], "-o", str(tmp_path / "srv")]) == 0


def test_output_that_is_an_input_or_a_save_of_the_other_kind_is_refused(chain, tmp_path, capsys):
    # Audit: export BASE -o OTHER_BASE replaced a table save by an export (deleting its data); merge B D1 -o B
    # replaced the base it read.
    paths, _ = chain
    table, srv = tmp_path / "table", tmp_path / "srv"
    assert main(["merge", paths[0], "-o", str(table)]) == 0
    assert main(["export", paths[0], "-o", str(srv)]) == 0
    capsys.readouterr()

    def manifests():
        return {p: open(os.path.join(p, F.MANIFEST)).read() for p in paths + [str(table), str(srv)]}

    before = manifests()
    for argv, named in (
        (["export", paths[0], "-o", str(table)], str(table)),       # a table save as an export's output
        (["merge"] + paths + ["-o", str(srv)], str(srv)),          # a serving export as a merge's output
        (["merge"] + paths + ["-o", paths[0]], paths[0]),          # the base it reads
        (["merge"] + paths + ["-o", paths[2] + "/"], paths[2]),    # a delta it reads (spelled differently)
        (["export"] + paths + ["-o", paths[1]], paths[1]),         # an input of the export
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (argv, err)
    assert manifests() == before
    assert main(["verify"] + paths + [str(table), str(srv)]) == 0
    # An earlier output of the same kind is replaced (daily re-exports, re-merges).
    assert main(["export"] + paths + ["-o", str(srv)]) == 0
    assert main(["merge"] + paths + ["-o", str(table)]) == 0
    assert F.read_manifest(table)["sequence"] == 2
    assert F.read_manifest(srv, F.SERVING_FORMAT_NAME)["source"]["sequence"] == 2
    assert main(["verify", str(table), str(srv)]) == 0


def test_merge_output_errors_are_one_line(chain, tmp_path, capsys):
    # Audit: -o naming a regular file (FileExistsError) or a path that cannot be created (FileNotFoundError
    # for /proc/nope/x) escaped as tracebacks.
    paths, _ = chain
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(afile, afile), (afile / "x", afile)]
    if not os.access(locked, os.W_OK):  # root writes anyway
        cases.append((locked / "out", locked))
    for out, named in cases:
        assert main(["merge"] + paths + ["-o", str(out)]) == 1, out
        err = capsys.readouterr().err
        assert err.startswith("ERROR ") and err.count("\n") == 1 and str(named) in err, err
    assert afile.read_bytes() == b"x"


def test_pse_export_refuses_a_table_save_or_an_input_as_its_output(chain, tmp_path):
    # The same output rules from Python as from the command line: pse.export onto a table save deleted it.
    import torch_psembed as pse
    from torch_psembed.checkpoint._output_dir import OutputError

    paths, _ = chain
    base = paths[0]
    before = open(os.path.join(base, "manifest.json")).read()
    with pytest.raises(OutputError, match="holds a table save, not a serving export"):
        pse.export(paths[1], base)
    with pytest.raises(OutputError, match="the output is also an input"):
        pse.export([base, paths[1]], paths[1])
    assert open(os.path.join(base, "manifest.json")).read() == before
    pse.export(base, tmp_path / "serve")
    pse.export(base, tmp_path / "serve")  # an earlier export is replaced


def test_writers_delete_only_the_folders_they_made(chain, tmp_path, capsys):
    # merge and export deleted every data-* folder of their output directory that the new manifest did not
    # name: a user's data-raw/, and even a save copied there that was the command's own input (found by an
    # audit, session 25). Only data-<uuid hex> and .tmp-<uuid hex> folders are a writer's.
    import shutil

    paths, _ = chain
    for cmd in (["export"], ["merge"]):
        w = tmp_path / f"w-{cmd[0]}"
        (w / "data-raw").mkdir(parents=True)
        (w / "data-raw" / "file.csv").write_text("precious")
        shutil.copytree(paths[0], w / "data-day1")
        stale = w / (".tmp-" + "0" * 32)  # a killed writer's leftover: removed
        stale.mkdir()
        assert main(cmd + [str(w / "data-day1"), "-o", str(w)]) == 0, capsys.readouterr().err
        assert (w / "data-raw" / "file.csv").read_text() == "precious"
        assert F.read_manifest(str(w / "data-day1"))["mode"] == "base"  # the input is still there, whole
        assert not stale.exists()
    t = pse.SparseTable(CFG)  # and a table's own save into such a folder
    s = tmp_path / "w-save"
    (s / "data-raw").mkdir(parents=True)
    t.save(s, "checkpoint")
    t.save(s, "checkpoint")  # the second save replaces the first one's data-<id> folder, not data-raw
    assert (s / "data-raw").exists()
    assert sorted(n for n in os.listdir(s) if n.startswith("data-")) == sorted(
        ["data-raw", F.read_manifest(str(s))["data_dir"]])


def test_export_refuses_an_overflow_in_either_reduced_dtype_in_one_line(tmp_path, capsys):
    # float16 raised a ValueError traceback from the tool; bfloat16 wrote a file its own verify refused
    # (found by an audit, session 25)
    t = pse.SparseTable(pse.TableConfig(dim=2, accessor=pse.CtrAccessorConfig(embedx_threshold=0.0),
                                        lr_optimizer=pse.SGD(learning_rate=1.0, weight_bounds=(-3.4e38, 3.4e38))))
    t.push(np.array([1, 2], np.int64), np.array([[-1e5, 0, 0], [-3.4e38, 0, 0]], np.float32),
           np.ones(2, np.float32), np.zeros(2, np.float32))
    t.save(tmp_path / "big", "checkpoint")
    for dtype, limit in (("float16", "65504"), ("bfloat16", "3.39e38")):
        out = tmp_path / f"e-{dtype}"
        assert main(["export", str(tmp_path / "big"), "-o", str(out), "--dtype", dtype, "--rows", "all"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ERROR ValueError: dtype='{dtype}' overflows") and limit in err and "\n" not in err
        assert not (out / F.MANIFEST).exists()
    assert main(["export", str(tmp_path / "big"), "-o", str(tmp_path / "e32"), "--dtype", "float32"]) == 0


def test_verify_reports_every_path_and_a_merge_of_a_bad_config_leaves_nothing(chain, tmp_path, capsys):
    import json
    import shutil

    paths, _ = chain
    bad = tmp_path / "bad"
    shutil.copytree(paths[0], bad)
    m = json.loads((bad / F.MANIFEST).read_text())
    m["config"] = {}
    (bad / F.MANIFEST).write_text(json.dumps(m))
    assert main(["verify", str(bad), paths[0]]) == 1  # it stopped at the first bad path
    io = capsys.readouterr()
    assert "config does not hold the signature" in io.err and f"OK  {paths[0]}" in io.out
    out = tmp_path / "merged"
    assert main(["merge", str(bad), "-o", str(out)]) == 1  # a KeyError after making out/.tmp-<id>/
    assert "config does not hold the signature" in capsys.readouterr().err
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("dtype", [[], {}, ["float16"]])
def test_a_serving_manifest_whose_dtype_is_not_a_string_is_corrupt(chain, tmp_path, dtype, capsys):
    # Audit (session 26): `dtype not in SERVING_DTYPE_BYTES` raised TypeError (unhashable) for a list or a
    # dict; inspect and verify printed tracebacks.
    import json

    from torch_psembed.errors import CorruptCheckpointError

    paths, _ = chain
    srv = str(tmp_path / "srv")
    pse.export(paths[0], srv)
    mpath = os.path.join(srv, F.MANIFEST)
    m = json.load(open(mpath))
    m["dtype"] = dtype
    json.dump(m, open(mpath, "w"))
    with pytest.raises(CorruptCheckpointError, match="unknown dtype") as ei:
        pse.InferenceEmbedding.load(srv)
    assert ei.value.path == mpath
    for command in ("inspect", "verify"):
        assert main([command, srv]) == 1
        err = capsys.readouterr().err
        assert err.startswith("ERROR CorruptCheckpointError") and err.count("\n") == 1 and "unknown dtype" in err
