"""The job's run directory (--out): a new run does not overwrite an old one, --resume keeps the run's own
config and refuses other settings, a damaged checkpoint index or dense state is named, a cut-short metrics
line does not block a resume (found by an audit of the job, session 25)."""

import json
import os

import pytest
import torch

from torch_psembed.errors import CheckpointMismatchError, CorruptCheckpointError
from torch_psembed.metrics import read_jsonl
from torch_psembed.train import load_config, run

SMALL = ["--samples-per-day", "2000", "--test-samples", "1000", "--batch-size", "500", "--passes", "1",
         "--num-workers", "0", "--no-progress", "--no-plot", "--set", "threads=1",
         "--set", "data.synthetic.vocab_max=800", "--set", "model.hidden=[16]"]


def _events(out):
    return [(r["event"], r.get("day")) for r in read_jsonl(os.path.join(out, "metrics.jsonl"))]


def _files(out):
    """Every file under out with its bytes (what a refused command must leave as it was)."""
    found = {}
    for d, _, names in os.walk(out):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                found[os.path.relpath(os.path.join(d, n), out)] = f.read()
    return found


@pytest.fixture(scope="module")
def one_day_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "run")
    run(["--out", out, "--days", "1", *SMALL])
    return out


def _copy(src, tmp_path):
    import shutil

    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def test_a_new_run_refuses_a_directory_holding_a_run_and_overwrite_replaces_it(one_day_run, tmp_path):
    out = _copy(one_day_run, tmp_path)
    before = _files(out)
    with pytest.raises(ValueError, match="already holds a run .*pass --resume to continue it, --overwrite"):
        run(["--out", out, "--days", "1", *SMALL, "--set", "model.hidden=[8]"])
    assert _files(out) == before  # the old run's history and checkpoints were deleted or left stale before
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    run(["--out", out, "--days", "1", *SMALL, "--set", "model.hidden=[8]", "--overwrite"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model"]["hidden"] == [8]
    assert _events(out) == [("pass", 0), ("eval", 0), ("end", None)]  # the new run's only
    assert os.path.exists(os.path.join(out, "notes.txt"))  # --overwrite deletes the run's files only
    with pytest.raises(ValueError, match="pass one of them"):
        load_config(["--out", out, "--resume", "--overwrite"])


def test_resume_continues_with_the_runs_config_and_refuses_other_settings(one_day_run, tmp_path):
    out = _copy(one_day_run, tmp_path)
    before = _files(out)
    # the run was started with model.hidden=[16] and vocab 800: a resume without those flags keeps them
    cfg = load_config(["--out", out, "--resume", "--days", "2"])
    assert cfg["model"]["hidden"] == [16] and cfg["data"]["synthetic"]["vocab_max"] == 800 and cfg["days"] == 2
    for flags, key in ((["--set", 'model.norm="layer"'], "model.norm: 'batch' -> 'layer'"),
                       (["--dim", "4"], "embedding.dim: 8 -> 4"),
                       (["--samples-per-day", "3000"], "data.synthetic.samples_per_day: 2000 -> 3000")):
        with pytest.raises(ValueError, match="was started with other settings") as e:
            run(["--out", out, "--resume", "--days", "2", *flags])
        assert key in str(e.value)
    assert _files(out) == before  # config.json was rewritten before the checkpoint was even read
    # the run's own config.json passed back with --config is accepted (it held "resume" before)
    run(["--out", out, "--resume", "--config", os.path.join(out, "config.json"), "--days", "2",
         "--no-progress", "--num-workers", "0", "--set", "threads=1"])
    assert _events(out) == [("pass", 0), ("eval", 0), ("pass", 1), ("eval", 1), ("end", None)]
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["days"] == 2 and "resume" not in saved and "overwrite" not in saved


def test_resume_names_a_damaged_checkpoint_and_changes_nothing(one_day_run, tmp_path):
    out = _copy(one_day_run, tmp_path)
    latest = os.path.join(out, "checkpoints", "latest.json")
    with open(latest) as f:
        good = f.read()
    for text in ('{"day": 0', '{"day": 0}', '{"day": "0", "dir": "checkpoints/day_000"}',
                 '{"day": 0, "dir": "checkpoints/day_009"}'):
        with open(latest, "w") as f:
            f.write(text)
        before = _files(out)
        with pytest.raises(CorruptCheckpointError, match="latest.json"):
            run(["--out", out, "--resume", "--days", "2"])
        assert _files(out) == before
    with open(latest, "w") as f:
        f.write(good)
    dense = os.path.join(out, "checkpoints", "day_000", "dense.pt")
    state = torch.load(dense, weights_only=False)
    with open(dense, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="dense.pt: not a dense state"):
        run(["--out", out, "--resume", "--days", "2"])
    state["model"].pop(next(iter(state["model"])))  # a model the config does not describe
    torch.save(state, dense)
    with pytest.raises(CheckpointMismatchError, match="dense.pt does not fit this model"):
        run(["--out", out, "--resume", "--days", "2"])


def test_resume_leaves_out_a_metrics_line_cut_short_by_a_crash(one_day_run, tmp_path, capsys):
    out = _copy(one_day_run, tmp_path)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"event": "pass", "day": 1, "au')  # the crash came while writing day 1's first record
    run(["--out", out, "--resume", "--days", "2"])
    assert "last line is cut short" in capsys.readouterr().err
    assert _events(out) == [("pass", 0), ("eval", 0), ("pass", 1), ("eval", 1), ("end", None)]


def test_resume_of_a_directory_without_a_run_writes_nothing(tmp_path):
    out = str(tmp_path / "typo")
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        run(["--out", out, "--resume"])
    assert not os.path.exists(out)


def test_a_day_with_fewer_batches_than_passes_is_refused_before_anything_runs(tmp_path):
    # it failed after start-up with "day 0 pass 0: no training samples on any rank" (audit, session 25)
    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="makes 4 batch.*of 500 a day, fewer than passes_per_day=5"):
        run(["--out", out, *SMALL, "--passes", "5"])
    assert not os.path.exists(out)


@pytest.mark.parametrize("flags", [["--data-path", "x.txt"], ["--test-path", "x.txt"], ["--file-days", "2"],
                                   ["--set", "data.slots=[1, 2]"]])
def test_file_settings_with_the_built_in_log_are_refused_not_ignored(flags):
    with pytest.raises(ValueError, match="data.kind='synthetic' .* reads no files"):
        load_config(flags)
