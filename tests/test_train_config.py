"""The training job's config handling (torch_psembed.train.load_config): every value is checked against the
type of its default (and the few value checks: choices, ranges, paths) before anything trains, and a bad one
is a ValueError naming the key and the value."""

from __future__ import annotations

import json
import os

import pytest

from torch_psembed.train import DEFAULTS, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BAD_SETS = [
    # (the --set item, a pattern the message must match: the key and, where it is short, the value)
    ("embedding.output=foo", r"embedding\.output.*'foo'"),
    ("model.lr=abc", r"model\.lr.*'abc'"),
    ("model.lr=NaN", r"model\.lr.*nan"),
    ("model.hidden=5", r"model\.hidden.*5"),
    ("model.hidden=null", r"model\.hidden.*None"),
    ("model.hidden=[64,0]", r"model\.hidden"),
    ("model.hidden=[64.5]", r"model\.hidden"),
    ("model.norm=\"group\"", r"model\.norm.*'group'"),
    ("model.kind=\"lr\"", r"model\.kind.*'lr'"),
    ("table.lr_optimizer=5", r"table\.lr_optimizer.*5"),
    ("table.mf_optimizer.weight_bounds=5", r"table\.mf_optimizer.*weight_bounds.*5"),
    ("table.lr_optimizer.learning_rate=\"x\"", r"table\.lr_optimizer\.learning_rate.*'x'"),
    ("data.slots=abc", r"data\.slots.*'abc'"),
    ("data.slots=5", r"data\.slots.*5"),
    ("data.slots=[1.9,2.9,3.9]", r"data\.slots.*1\.9"),
    ("data.slots=[1,1]", r"data\.slots.*\[1, 1\]"),
    ("seed=abc", r"seed.*'abc'"),
    ("seed=99999999999999999999999", r"seed.*99999999999999999999999"),
    ("seed=-1", r"seed.*-1"),
    ("out=5", r"'?out'?.*5"),
    ("data=5", r"'?data'?.*5"),
    ('data.path=["c200.txt"]', r"data\.path.*c200\.txt"),
    ("data.test_path=5", r"data\.test_path.*5"),
    ("save=5", r"'?save'?.*5"),
    ("days=true", r"days.*True"),
    ("passes_per_day=2.0", r"passes_per_day.*2\.0"),
    ("data.batch_size=true", r"data\.batch_size.*True"),
    ("data.batch_size=0", r"data\.batch_size.*0"),
    ("data.file_days=0", r"data\.file_days.*0"),
    ("model.wide=5", r"model\.wide.*5"),
    ("save.delta=5", r"save\.delta.*5"),
    ("plot=1", r"plot.*1"),
    ("embedding.hashed_size=1e3", r"embedding\.hashed_size.*1000\.0"),
    ("embedding.hashed_size=0", r"embedding\.hashed_size.*0"),
    ("embedding.dim=true", r"embedding\.dim.*True"),
    ("table.accessor.embedx_threshold=true", r"table\.accessor\.embedx_threshold.*True"),
    ("table.accessor.create_probability_from_score=1", r"create_probability_from_score.*1"),
    ("data.synthetic.num_slots=2.5", r"data\.synthetic\.num_slots.*2\.5"),
    ("ps.transport=\"udp\"", r"ps\.transport.*'udp'"),
    ("ps.rpc_timeout=\"60\"", r"ps\.rpc_timeout.*'60'"),
    ("threads=0", r"threads.*0"),
    ("device=5", r"device.*5"),
]


@pytest.mark.parametrize("item,match", BAD_SETS, ids=[s for s, _ in BAD_SETS])
def test_a_bad_set_value_is_a_value_error_naming_the_key(item, match):
    # (the slot format, so that data.slots is read; x.txt need not exist: load_config reads no data)
    argv = ["--data", "slot", "--data-path", "x.txt"] if item.startswith("data.slots") else []
    with pytest.raises(ValueError, match=match):
        load_config([*argv, "--set", item])


@pytest.mark.parametrize("over,match", [
    ({"model": {"hidden": None}}, r"model\.hidden.*None"),
    ({"days": True}, r"days.*True"),
    ({"data": {"slots": [1, True]}}, r"data\.slots"),
    ({"table": {"lr_optimizer": [1, 2]}}, r"table\.lr_optimizer"),
    ({"save": {"checkpoint": "yes"}}, r"save\.checkpoint.*'yes'"),
])
def test_a_bad_config_file_value_is_a_value_error_naming_the_key(tmp_path, over, match):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(over))
    with pytest.raises(ValueError, match=match):
        load_config(["--config", str(f)])


def test_a_config_file_that_is_not_an_object(tmp_path):
    f = tmp_path / "list.json"
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json.*JSON object.*list"):
        load_config(["--config", str(f)])


def test_a_config_file_that_is_not_utf8(tmp_path):
    f = tmp_path / "latin1.json"
    f.write_bytes('{"out": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json.*UTF-8"):
        load_config(["--config", str(f)])


def test_a_section_replaced_by_a_scalar_is_named_not_its_subkey(tmp_path):
    f = tmp_path / "data3.json"
    f.write_text('{"data": 3}')
    with pytest.raises(ValueError, match=r"'?data'? must be a JSON object.*3") as e:
        load_config(["--config", str(f), "--data-path", "x.txt"])
    assert "unknown config key" not in str(e.value)


def test_data_path_that_is_not_a_file_or_directory():
    if not os.path.exists("/dev/null"):
        pytest.skip("no /dev/null")
    with pytest.raises(ValueError, match=r"data\.path.*/dev/null.*not a regular file or a directory"):
        load_config(["--data", "criteo", "--data-path", "/dev/null"])


def test_test_path_that_is_a_directory(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("0\t1\n")
    with pytest.raises(ValueError, match=r"data\.test_path.*is a directory"):
        load_config(["--data", "criteo", "--data-path", str(data), "--test-path", str(tmp_path)])


@pytest.mark.parametrize("argv", [
    [],
    ["--config", os.path.join(ROOT, "configs", "default.json")],
    ["--config", os.path.join(ROOT, "configs", "criteo_sample.json"), "--data-path", "x.txt"],
    ["--set", "model.lr=1", "--set", "table.accessor.embedx_threshold=5", "--set", "ps.rpc_timeout=30"],
    ["--set", "model.hidden=[128,64]", "--set", "model.norm=\"layer\"", "--set", "model.kind=\"deepfm\""],
    ["--set", 'embedding.output="lr_mf"', "--set", "embedding.output=mf", "--set", "ps.transport=\"rpc\""],
    ["--set", "seed=9223372036854775807", "--set", "data.synthetic.vocab_max=1500",
     "--set", "data.synthetic.churn=0.1", "--set", "table.max_keys=640", "--set", "threads=1"],
    ["--set", 'table.lr_optimizer={"name": "adagrad", "initial_g2sum": 2.0}', "--set", 'table.mf_optimizer.name="ftrl"'],
    ["--set", "table.lr_optimizer.weight_bounds=[-10, 10]", "--set", "table.accessor.delta_keep_days=8"],
    ["--set", "data.slots=[101,102,103]", "--data", "slot", "--data-path", "x", "--file-days", "2"],
    ["--set", "data.slots=null", "--set", "data.num_workers=null", "--set", "out=null", "--set", "threads=null"],
    ["--embedding", "hashed", "--hashed-size", "64", "--set", "embedding.hashed_lr=1"],
    ["--set", "save.checkpoint=false", "--no-save", "--no-plot", "--no-progress", "--days", "1", "--passes", "1"],
])
def test_valid_configs_still_load(argv):
    cfg = load_config(argv)
    assert set(cfg) == set(DEFAULTS) | {"resume", "overwrite"}


def test_int_given_for_a_float_is_kept_and_floats_stay_floats():
    cfg = load_config(["--set", "model.lr=1", "--set", "table.accessor.embedx_threshold=5"])
    assert cfg["model"]["lr"] == 1 and cfg["table"]["accessor"]["embedx_threshold"] == 5


@pytest.mark.parametrize("item", ["save=5", "save.base=1", "out=5", "model.lr=abc", "embedding.output=foo"])
def test_run_refuses_a_bad_value_before_it_writes_or_trains(tmp_path, item):
    from torch_psembed.train import run

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=item.split("=")[0].replace(".", r"\.")):
        run(["--out", str(out), "--set", item, "--no-progress", "--no-plot", "--days", "1", "--passes", "1",
             "--num-workers", "0", "--samples-per-day", "256", "--test-samples", "128", "--batch-size", "64"])
    assert not out.exists()
