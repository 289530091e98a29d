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


def test_a_run_stopped_in_its_next_day_test_resumes_and_tests_that_day(tmp_path, monkeypatch):
    # The checkpoint of day d was written before day d's next-day test: a run stopped in that test resumed at
    # day d + 1, and day d was never tested (audit, session 26). The test now comes first. The first pass
    # record after a resume also owed the checkpointed day's end_day deletions (it reported 0).
    import torch_psembed.train as T

    out = str(tmp_path / "run")
    evict = ["--set", "table.accessor.delete_after_unseen_days=0"]  # end_day deletes every row unseen that day
    real_eval = T._run_eval

    def stop_in_day_1(job, rt, cfg, source, day):
        if day == 1:
            raise KeyboardInterrupt("stopped during the next-day test")
        return real_eval(job, rt, cfg, source, day)

    monkeypatch.setattr(T, "_run_eval", stop_in_day_1)
    with pytest.raises(KeyboardInterrupt):
        run(["--out", out, "--days", "3", *SMALL, *evict])
    monkeypatch.setattr(T, "_run_eval", real_eval)
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        assert json.load(f)["day"] == 0  # day 1's checkpoint waits for its test
    run(["--out", out, "--resume", "--days", "3"])
    assert _events(out) == [("pass", 0), ("eval", 0), ("pass", 1), ("eval", 1), ("pass", 2), ("eval", 2),
                            ("end", None)]
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    day0_deleted = next(r["end_day_deleted"] for r in records if r["event"] == "eval" and r["day"] == 0)
    day1_first_pass = next(r for r in records if r["event"] == "pass" and r["day"] == 1)
    assert day0_deleted > 0 and day1_first_pass["deleted"] == day0_deleted


def test_resume_writes_only_days_into_the_runs_config(one_day_run, tmp_path):
    # `--resume --no-save` wrote the whole command's config back, so a later plain --resume saved nothing.
    out = _copy(one_day_run, tmp_path)
    run(["--out", out, "--resume", "--days", "2", "--no-save"])
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)
    assert saved["days"] == 2 and saved["save"] == {"delta": True, "base": True, "checkpoint": True}
    run(["--out", out, "--resume", "--days", "3"])
    assert os.path.isdir(os.path.join(out, "checkpoints", "day_002"))


def _criteo_lines(n, seed=0):
    import random

    from test_data import _criteo_row

    rnd = random.Random(seed)
    return "".join(_criteo_row(str(rnd.randint(0, 1)), [str(rnd.randint(0, 50)) for _ in range(13)],
                               [f"{rnd.randint(0, 40):08x}" for _ in range(26)]) for _ in range(n))


def test_unusable_data_is_refused_before_the_run_directory_is_made(tmp_path):
    # A bad data file, or a day with fewer lines than passes, was refused after config.json was written, and
    # the corrected command was then refused as a second run in the same --out (audit, session 26).
    bad = tmp_path / "bad.txt"
    bad.write_text("garbage\n")
    short = tmp_path / "short.txt"
    short.write_text(_criteo_lines(12))
    common = ["--data", "criteo", "--batch-size", "4", "--num-workers", "0", "--no-progress", "--no-plot",
              "--set", "threads=1"]
    for path, extra, match in ((bad, [], "criteo"), (short, ["--file-days", "2", "--passes", "8"],
                                                     "day 0 .* has 6 line.*fewer than passes_per_day=8")):
        out = str(tmp_path / f"run-{path.stem}")
        with pytest.raises(ValueError, match=match):
            run(["--out", out, "--data-path", str(path), *extra, *common])
        assert not os.path.exists(out)
    out = tmp_path / "a-file"
    out.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        run(["--out", str(out), "--data-path", str(short), "--file-days", "2", *common])


def test_a_test_file_among_the_training_days_is_refused(tmp_path):
    from torch_psembed.data.dataset import FileSource

    days = tmp_path / "days"
    days.mkdir()
    (days / "a_train.txt").write_text(_criteo_lines(20))
    (days / "b_test.txt").write_text(_criteo_lines(10, seed=1))
    with pytest.raises(ValueError, match="is also a training day"):
        FileSource(str(days), test_path=str(days / "b_test.txt"))
    with pytest.raises(ValueError, match="is also a training day"):
        FileSource(str(days / "a_train.txt"), days=2, test_path=str(days / "a_train.txt"))
    with pytest.raises(ValueError, match="slots apply to the slot format, not to criteo"):
        FileSource(str(days / "a_train.txt"), slots=[1, 2])
    FileSource(str(days / "a_train.txt"), test_path=str(days / "b_test.txt"))
