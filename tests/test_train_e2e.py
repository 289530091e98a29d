"""The main job end to end: a tiny default job under torchrun (2 processes) and in one process (+ resume),
checking the metrics file, the plot, the base/delta/checkpoint saves (they load) and that the model learns."""

import json
import os
import subprocess
import sys

import pytest
import torch

import torch_psembed as pse
from torch_psembed.metrics import read_jsonl
from torch_psembed.distributed.ports import free_port
from torch_psembed.train import load_config, run

from conftest import REPO, child_env

CRITEO = "/work/shared/data/criteo_kaggle_sample"

# A small click log (small vocabularies so two tiny days are learnable) with every lifecycle step.
TINY = [
    "--days", "2", "--passes", "2", "--samples-per-day", "6000", "--test-samples", "3000", "--batch-size", "500",
    "--num-workers", "1", "--no-progress",
    "--set", "data.synthetic.vocab_max=1500", "--set", "data.synthetic.churn=0.1",
    "--set", "table.accessor.embedx_threshold=2.0",
    # a few dozen steps: the job's Adam rate (0.01, chosen on runs of 0.6M samples) learns too little here
    # (next-day AUC ~0.58 against ~0.63 at 0.05, docs/training.md)
    "--set", "table.lr_optimizer.learning_rate=0.05", "--set", "table.mf_optimizer.learning_rate=0.05",
]


def _table_config(out):
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    from torch_psembed.train import _table_config

    return _table_config(cfg)


def _check_run(out, days=2, passes=2, min_auc=0.6):
    recs = read_jsonl(os.path.join(out, "metrics.jsonl"))
    kinds = [r["event"] for r in recs]
    assert kinds.count("pass") == days * passes and kinds.count("eval") == days and kinds[-1] == "end"
    for r in recs:
        if r["event"] == "pass":
            assert r["samples"] > 0 and r["keys"] > 0 and r["bytes"] > 0 and r["samples_per_s"] > 0
            assert r["cpu_seconds"] > 0 and r["samples_per_cpu_s"] > 0
            # PSEmbedding's phases, ms per step on rank 0 (the job enables PSEmbedding timing)
            ms = r["emb_ms_per_step"]
            assert set(ms) == {"unique", "pull", "pool", "backward", "push"} and min(ms.values()) >= 0
            assert ms["pull"] > 0 and ms["push"] > 0
            assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and "created" in r and "deleted" in r
    last = [r for r in recs if r["event"] == "eval"][-1]
    assert last["auc"] > min_auc, last  # clearly above chance
    assert last["oracle_auc"] > last["auc"] - 0.02
    with open(os.path.join(out, "metrics.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the saves load: day 0's base, then day 1's deltas, into a fresh table; the checkpoint restores exactly
    cfg = _table_config(out)
    t = pse.SparseTable(cfg)
    info = t.load(os.path.join(out, "saves", "day_000", "base"))
    assert info["rows"] > 0 and len(t) == info["rows"]
    for p in range(passes):
        info = t.load(os.path.join(out, "saves", "day_001", f"pass_{p}", "delta"))
        assert info["mode"] == "delta"
    assert len(t) > 0
    base_rows = pse.SparseTable(cfg).load(os.path.join(out, "saves", "day_001", "base"))["rows"]
    ck_rows = pse.SparseTable(cfg).load(os.path.join(out, "checkpoints", "day_001", "table"))["rows"]
    assert 0 < base_rows <= ck_rows  # a base holds the rows above base_threshold; a checkpoint all of them
    assert os.path.exists(os.path.join(out, "checkpoints", "day_001", "dense.pt"))
    with open(os.path.join(out, "checkpoints", "latest.json")) as f:
        assert json.load(f)["day"] == days - 1
    return recs


def _torchrun_tiny_job(tmp_path, *flags):
    """The tiny job under torchrun with 2 processes on 127.0.0.1; returns (its out dir, its stdout)."""
    out = str(tmp_path / "run")
    env = child_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "torch_psembed.train", "--out", out, *TINY, *flags]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path):
    out, stdout = _torchrun_tiny_job(tmp_path)
    assert "ranks=2" in stdout and "next_auc" in stdout  # the summary table
    recs = _check_run(out)
    assert recs[0]["samples"] == 3000  # both ranks' samples are counted


@pytest.mark.slow
def test_one_process_then_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    run(["--out", out, *TINY, "--days", "1", "--num-workers", "0", "--set", "threads=1"])
    assert len(read_jsonl(os.path.join(out, "metrics.jsonl"))) == 2 + 1 + 1
    res = run(["--out", out, *TINY, "--resume", "--num-workers", "0", "--set", "threads=1"])
    text = capsys.readouterr().out
    assert "resumed from" in text and "continuing at day 1" in text
    recs = _check_run(out)
    assert [r["event"] for r in recs] == ["pass", "pass", "eval", "pass", "pass", "eval", "end"]
    assert [r["day"] for r in recs if r["event"] == "pass"] == [0, 0, 1, 1]
    assert res["records"] == recs[:-1]


def test_table_max_keys_bounds_the_job_table_and_reports_the_refused_ids(tmp_path, capsys):
    res = run(["--out", str(tmp_path / "run"), *TINY, "--days", "1", "--num-workers", "0", "--no-plot", "--no-save",
               "--set", "threads=1", "--set", "table.max_keys=640"])
    passes = [r for r in res["records"] if r["event"] == "pass"]
    assert all(0 < r["keys"] <= 640 for r in passes) and passes[0]["keys"] == 640  # one shard of 640 rows, full
    assert passes[0]["refused"] > 0 and passes[0]["created"] == 640
    assert f"refused {passes[0]['refused']}" in capsys.readouterr().out


def test_a_diverged_model_is_named_with_its_day_and_pass(tmp_path):
    # metrics.auc raised "scores must be finite", with no day, pass or cause (found by an audit, session 25)
    with pytest.raises(FloatingPointError, match=r"day 0 pass 0 batch \d+: the model's predictions are not finite"):
        run(["--out", str(tmp_path / "run"), *TINY, "--days", "1", "--num-workers", "0", "--no-plot", "--no-save",
             "--set", "threads=1", "--embedding", "hashed", "--hashed-size", "1000", "--set", "model.lr=1e30",
             "--set", "embedding.hashed_lr=1e30"])


@pytest.mark.skipif(not os.path.isdir(CRITEO), reason="Criteo sample not present")
def test_criteo_sample_deepfm_over_ps(tmp_path):
    res = run(["--out", str(tmp_path / "ps"), "--config", os.path.join(REPO, "configs", "criteo_sample.json"),
               "--data-path", os.path.join(CRITEO, "train.txt"), "--file-days", "2",
               "--test-path", os.path.join(CRITEO, "dev.txt"), "--days", "2", "--model", "deepfm", "--no-progress",
               "--no-plot", "--no-save", "--num-workers", "0", "--set", "threads=1"])
    evals = [r for r in res["records"] if r["event"] == "eval"]
    assert [e["samples"] for e in evals] == [3600, 409]  # day 1, then dev.txt after the last day
    assert evals[-1]["auc"] > 0.6 and "oracle_auc" not in evals[-1]


@pytest.mark.skipif(not os.path.isdir(CRITEO), reason="Criteo sample not present")
def test_criteo_sample_hashed_baseline(tmp_path):
    res = run(["--out", str(tmp_path / "hashed"), "--data", "criteo", "--data-path",
               os.path.join(CRITEO, "train.txt"), "--file-days", "4", "--days", "1", "--passes", "1",
               "--embedding", "hashed", "--hashed-size", "20000", "--no-progress", "--no-plot", "--batch-size", "256",
               "--num-workers", "0", "--set", "threads=1"])
    (ev,) = [r for r in res["records"] if r["event"] == "eval"]
    (ps,) = [r for r in res["records"] if r["event"] == "pass"]
    assert ev["samples"] == 1800 and ev["auc"] > 0.6
    assert ps["keys"] == 20000 and ps["bytes"] == 2 * 20000 * 9 * 4  # weight + Adagrad sum
    assert "emb_ms_per_step" not in ps  # no PSEmbedding


def test_criteo_sample_config_scales_the_lifecycle_to_small_days():
    cfg = load_config(["--config", os.path.join(REPO, "configs", "criteo_sample.json"), "--data-path", "x.txt"])
    assert cfg["data"]["kind"] == "criteo" and cfg["data"]["file_days"] == 4 and cfg["data"]["batch_size"] == 256
    assert cfg["passes_per_day"] == 1
    acc = cfg["table"]["accessor"]
    assert acc["create_probability_from_score"] is False and acc["delete_threshold"] == 0.0
    assert acc["embedx_threshold"] == 2.5  # the rest of the lifecycle as in the default job
    assert cfg["table"]["lr_optimizer"] == {"name": "adam", "learning_rate": 0.03, "initial_range": 0.0}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


def test_device_is_checked_when_the_config_loads():
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        load_config(["--device", "tpu"])
    with pytest.raises(ValueError, match="device must be"):
        load_config(["--set", 'device="gpu"'])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load_config(["--device", "cuda"])
    assert load_config([])["device"] == "cpu"


@cuda
@pytest.mark.slow
def test_dense_part_on_a_gpu_learns_like_on_the_cpu_and_resumes(tmp_path):
    """One process, the dense part on the GPU and the PS table on the host; then the hashed baseline, wholly on
    the GPU. Same seed and data as a CPU run: the AUC agrees to GPU rounding; a resume on the GPU continues."""
    common = [*TINY, "--days", "1", "--num-workers", "0", "--set", "threads=1", "--no-plot"]
    cpu = run(["--out", str(tmp_path / "cpu"), *common])
    out = str(tmp_path / "gpu")
    gpu = run(["--out", out, *common, "--device", "cuda"])
    auc = lambda res: [r for r in res["records"] if r["event"] == "eval"][-1]["auc"]  # noqa: E731
    # one tiny day: ~0.57 next-day AUC on either device (3,000 test rows: a standard error of ~0.01)
    assert auc(gpu) > 0.55 and abs(auc(gpu) - auc(cpu)) < 0.01, (auc(gpu), auc(cpu))
    res = run(["--out", out, *TINY, "--num-workers", "0", "--set", "threads=1", "--no-plot", "--device", "cuda",
               "--resume"])
    assert [r["day"] for r in res["records"] if r["event"] == "pass"] == [0, 0, 1, 1]  # day 1 after the resume
    hashed = run(["--out", str(tmp_path / "hashed"), *common, "--device", "cuda", "--embedding", "hashed",
                  "--hashed-size", "20000"])
    assert auc(hashed) > 0.55


@cuda
@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_with_the_dense_part_on_a_gpu(tmp_path):
    out, _ = _torchrun_tiny_job(tmp_path, "--device", "cuda")
    _check_run(out)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="--resume needs --out"):
        load_config(["--resume"])
    with pytest.raises(ValueError, match="needs data.path"):
        load_config(["--data", "criteo"])
    with pytest.raises(ValueError, match="cvm_click_prior must be a finite number > 0, got 0"):
        load_config(["--set", "embedding.cvm_click_prior=0"])
    with pytest.raises(ValueError, match="unknown config key 'model.hiden'"):
        load_config(["--set", "model.hiden=[3]"])
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ValueError, match="c.json.*not valid JSON"):
        load_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="table.accessor.*bogus"):
        run(["--out", str(tmp_path / "x"), "--set", "table.accessor.bogus=1", "--no-progress"])
    with pytest.raises(ValueError, match="data.synthetic.*nslots"):
        run(["--out", str(tmp_path / "x"), "--set", "data.synthetic.nslots=1", "--no-progress"])
    with pytest.raises(ValueError, match=r"table.mf_optimizer.name must be one of"):
        run(["--out", str(tmp_path / "x"), "--set", "table.mf_optimizer.name=\"rmsprop\"", "--no-progress"])
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        run(["--out", str(tmp_path / "empty"), "--resume", "--no-progress"])
    cfg = load_config(["--config", os.path.join(REPO, "configs", "default.json")])
    from torch_psembed.train import DEFAULTS, _run_config

    assert _run_config(cfg) == DEFAULTS


def test_set_switches_a_sparse_rule_with_its_own_arguments():
    from torch_psembed.train import DEFAULTS, _table_config

    assert DEFAULTS["table"]["lr_optimizer"]["name"] == "adam"
    # another rule by name: the default rule's fields are not carried over, the rest take the new defaults
    cfg = load_config(["--set", 'table.lr_optimizer={"name": "adagrad", "initial_g2sum": 2.0}',
                       "--set", 'table.mf_optimizer.name="ftrl"'])
    assert cfg["table"]["lr_optimizer"] == {"name": "adagrad", "initial_g2sum": 2.0}
    assert cfg["table"]["mf_optimizer"] == {"name": "ftrl"}
    tc = _table_config(cfg)
    assert isinstance(tc.lr_optimizer, pse.AdaGrad) and tc.lr_optimizer.initial_g2sum == 2.0
    assert tc.lr_optimizer.learning_rate == pse.AdaGrad().learning_rate
    assert isinstance(tc.mf_optimizer, pse.FTRL)
    # the same rule: merged field by field
    cfg = load_config(["--set", "table.lr_optimizer.learning_rate=0.1"])
    assert cfg["table"]["lr_optimizer"] == {"name": "adam", "learning_rate": 0.1, "initial_range": 0.0}
    # a field the rule does not take is still an error naming it
    with pytest.raises(ValueError, match="table.lr_optimizer.*initial_g2sum"):
        _table_config(load_config(["--set", "table.lr_optimizer.initial_g2sum=0.5"]))


def test_slot_format_directory_with_bad_rows(tmp_path):
    """Daily slot-format files, variable bags (one PSEmbedding per slot), a bad row warned about and skipped."""
    import random

    from torch_psembed.data import BadDataWarning

    rng = random.Random(0)
    d = tmp_path / "days"
    d.mkdir()
    for day in range(3):
        lines = []
        for _ in range(1500):
            a = rng.randrange(20)
            click = 1 if rng.random() < (0.6 if a < 5 else 0.1) else 0
            toks = [f"101:{a}"] + [f"102:{1000 + rng.randrange(50)}" for _ in range(rng.randrange(3))]
            toks += [f"103:{2000 + rng.randrange(10)}"]
            lines.append(f"{click} 1 " + " ".join(toks))
        if day == 1:
            lines[7] = "1 1 101:x"
        (d / f"day{day}.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(BadDataWarning) as caught:
        res = run(["--out", str(tmp_path / "run"), "--data", "slot", "--data-path", str(d), "--set",
                   "data.slots=[101,102,103]", "--days", "3", "--passes", "1", "--batch-size", "250",
                   "--num-workers", "0", "--set", "threads=1", "--no-progress", "--no-plot", "--set", "table.accessor.embedx_threshold=1.0",
                   "--set", "table.accessor.create_probability_from_score=false"])
    msgs = sorted(str(w.message) for w in caught if w.category is BadDataWarning)
    assert len(msgs) == 2  # day 1 is read by the test after day 0 and by day 1's training
    assert msgs[0].startswith("day 1 pass 0 (rank 0): skipped 1 bad row(s) of 1500; first: ")
    assert msgs[1].startswith("evaluation after day 0 (rank 0): skipped 1 bad row(s) of 1500")
    assert all("day1.txt:8: slot and feasign must be integers" in m for m in msgs)
    evals = [r for r in res["records"] if r["event"] == "eval"]
    assert len(evals) == 2  # no day after the last one and no --test-path
    assert evals[-1]["auc"] > 0.7


def test_num_workers_default_follows_spare_cores(monkeypatch):
    import torch_psembed.train as T

    cfg = load_config([])
    assert cfg["data"]["num_workers"] is None
    monkeypatch.setattr(T, "_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert T._num_workers(cfg) == 0  # no spare core: the trainers generate their own batches
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert T._num_workers(cfg) == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(T, "_cores", lambda: 1)
    assert T._num_workers(cfg) == 0
    assert T._num_workers(load_config(["--num-workers", "3"])) == 3  # an explicit value is kept
    for bad in ("-1", "1.5", "true"):
        with pytest.raises(ValueError, match="num_workers"):
            load_config(["--set", f"data.num_workers={bad}"])


def test_default_accessor_is_the_reference_score_scaled_by_an_eighth():
    # docs/training.md: the job scales the score and every threshold by 1/8, so in the reference's units
    # only embedx (20) and delete (2.5) change; every new feasign gets a row (no probabilistic admission)
    import numpy as np

    from torch_psembed.config import CtrAccessorConfig
    from torch_psembed.train import _table_config

    acc = _table_config(load_config([])).accessor
    ref = CtrAccessorConfig()
    show = np.array([1.0, 10.0, 37.0, 200.0])
    click = np.array([0.0, 1.0, 5.0, 30.0])
    assert np.allclose(acc.score(show, click), ref.score(show, click) / 8)
    assert not acc.create_probability_from_score
    assert 8 * acc.base_threshold == ref.base_threshold and 8 * acc.delta_threshold == ref.delta_threshold
    assert 8 * acc.embedx_threshold == 20.0 and 8 * acc.delete_threshold == 2.5
    # the rest is the reference's
    for f in ("delta_keep_days", "show_click_decay_rate", "delete_after_unseen_days", "show_scale"):
        assert getattr(acc, f) == getattr(ref, f)


def _buffers_worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch_psembed.train import _Runtime

    cfg = load_config(["--embedding", "hashed", "--hashed-size", "64", "--set", "threads=1"])
    rt = _Runtime(cfg)
    try:
        # In a function of its own, as train.run does: the job (its DDP module holds the process group)
        # is gone before shutdown, which can then free the group (free_process_groups).
        _sync_and_save_buffers(cfg, rt, rank, out)
    finally:
        rt.shutdown()


def _sync_and_save_buffers(cfg, rt, rank, out):
    import torch.distributed as dist
    from torch_psembed.train import _Job

    job = _Job(cfg, rt, num_slots=3)
    # no collective per forward (torch >= 2.13: forward_sync_buffers; before: broadcast_buffers)
    assert getattr(job.ddp, "forward_sync_buffers", getattr(job.ddp, "broadcast_buffers", None)) is False
    norm = job.model.norm
    norm.running_mean.fill_(float(rank + 1))  # the ranks' statistics differ, as after a pass
    norm.num_batches_tracked.fill_(10 * (rank + 1))
    job.sync_buffers()
    got = [torch.zeros_like(norm.running_mean) for _ in range(2)]
    dist.all_gather(got, norm.running_mean)
    torch.save({"means": got, "tracked": int(norm.num_batches_tracked)}, f"{out}.{rank}")


@pytest.mark.distributed
def test_sync_buffers_gives_every_rank_rank_0s_running_statistics(tmp_path):
    # DDP runs with broadcast_buffers=False (no broadcast before each forward); the job sends rank 0's
    # buffers once a pass instead, so evaluation on any rank uses the statistics a checkpoint saves.
    out = str(tmp_path / "buf")
    torch.multiprocessing.spawn(_buffers_worker, args=(free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        r = torch.load(f"{out}.{rank}")
        assert r["tracked"] == 10
        for m in r["means"]:
            assert torch.equal(m, torch.ones_like(m))
