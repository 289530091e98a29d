"""The main job: online CTR training, day by day, on the built-in click log or on Criteo / slot-format files.

Run::

    torchrun --nproc-per-node 2 -m torch_psembed.train [--config FILE] [flags]
    python -m torch_psembed.train            # one process
    psembed-train --help

Each day ``d``: the day's data is trained in ``passes_per_day`` passes (a delta save after each), then the day
is closed (``table.end_day(d)``: decay, aging, eviction) and saved as a base; a checkpoint (table checkpoint +
dense ``state_dict`` + progress) makes the day resumable with ``--resume``. The model trained through day
``d`` is then evaluated on day ``d + 1``; on the synthetic log the oracle AUC (the true click probabilities)
is printed beside it. Metrics go to ``<out>/metrics.jsonl``; at the end ``<out>/metrics.png`` and a summary.

``--embedding hashed`` swaps the PS table for ``nn.EmbeddingBag(sparse=True)`` over a fixed hashed table with
``torch.optim.Adagrad``: the baseline (see ``scripts/compare.py``). See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import _is_int, _is_number
from .data import BatchStream, FileSource, SimulatorConfig, SyntheticSource, make_loader
from . import _run_dir as RD
from .checkpoint._format import write_json_atomic
from .errors import CheckpointMismatchError
from .metrics import JsonlWriter, PassMetrics, read_jsonl
from .models import HashedSlotEmbedding, PSSlotEmbedding, build_model

__all__ = ["main", "run", "DEFAULTS", "load_config"]

DEFAULTS: Dict[str, Any] = {
    "out": None,
    "seed": 0,
    "days": 4,
    "passes_per_day": 2,
    "data": {
        "kind": "synthetic",  # synthetic | criteo | slot
        "path": None,
        "test_path": None,
        "file_days": None,
        "slots": None,
        "batch_size": 1024,
        # DataLoader workers per process; None: 1 when this machine has more cores than local ranks, else 0
        # (without a spare core a worker only adds inter-process copies: ~40% fewer samples/s on 2 cores)
        "num_workers": None,
        "synthetic": {
            "num_slots": 26,
            "samples_per_day": 400_000,
            "test_samples": 100_000,
            "churn": 0.2,
            "vocab_max": 200_000,
        },
    },
    "model": {"kind": "dnn", "hidden": [256, 128, 64], "wide": True, "norm": "batch", "lr": 0.001},
    "embedding": {"kind": "ps", "dim": 8, "output": "cvm_lr_mf", "hashed_size": 1 << 20, "hashed_lr": 0.05,
                  "prefetch": True,
                  # the CVM ctr column's prior click count, log(click + prior) - log(show + 1): near the log's
                  # CTR, an id never shown reads a typical ctr, not 1 (Paddle's prior). At the job's size, 0.2
                  # gained 0.0004-0.0047 next-day AUC over 1 on five seeds (docs/benchmarks.md, "Main job")
                  "cvm_click_prior": 0.2},
    "table": {
        # Every feasign gets a row (show, click and lr weight) when first pushed; its mf vector waits for the
        # score. Probabilistic admission (a row with probability = the push's score) kept a third of the
        # peak memory, but turning it off moved next-day AUC on the synthetic log by -0.0014 to +0.0025 by
        # seed (+0.0010 on average over five; docs/benchmarks.md, "Main job", session 9): the show/click
        # columns of the rare ids are worth more than their ~48 bytes a row. The job scales the score
        # by 1/8 (nonclk 0.0125, click 0.125) and every threshold with it; in the reference's units (x8)
        # embedx is 20 (reference 10) and delete 2.5 (reference 0.8), base and delta stay 1.5 and 0.25.
        "accessor": {
            "create_probability_from_score": False,
            "nonclk_coeff": 0.0125,
            "click_coeff": 0.125,
            "embedx_threshold": 2.5,
            "base_threshold": 0.1875,
            "delta_threshold": 0.03125,
            "delete_threshold": 0.3125,
        },
        # Adam at rate 0.01 on both parts (the reference's job uses AdaGrad 0.05): on three seeds of the
        # synthetic log it gained 0.0014-0.006 next-day AUC over AdaGrad, and it leads the hashed baseline
        # on 4 of 5 seeds, for ~1.6x AdaGrad's bytes (per-dimension moments), still a fifth to two fifths
        # of the hashed table of equal AUC (docs/benchmarks.md, "Main job")
        "lr_optimizer": {"name": "adam", "learning_rate": 0.01, "initial_range": 0.0},
        "mf_optimizer": {"name": "adam", "learning_rate": 0.01, "initial_range": 1e-4},
        "num_shards": 1,
        "num_threads": 1,
        "max_keys": None,  # TableConfig.max_keys: a bound on the table's rows (its memory); None: none
    },
    "ps": {"max_staleness": 1, "num_servers": 0, "rpc_timeout": 60.0, "transport": "tcp"},
    "save": {"delta": True, "base": True, "checkpoint": True},
    "plot": True,
    "progress": True,
    "threads": None,  # torch intra-op threads per process (None: torch's default; torchrun sets 1)
    # where the dense part runs: "cpu", "cuda" (each rank its GPU: LOCAL_RANK mod the GPU count) or "cuda:N";
    # the PS table stays in host memory either way (PSEmbedding copies ids over and rows back)
    "device": "cpu",
}


# ----------------------------------------------------------------------------------------------- config
_OPTIMIZER_KEYS = ("table.lr_optimizer", "table.mf_optimizer")


def _merge(base: Dict[str, Any], over: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = f"{where}.{k}" if where else k
        if k not in out and where not in ("table.accessor", "data.synthetic") + _OPTIMIZER_KEYS:
            raise ValueError(f"unknown config key {path!r}")
        if isinstance(out.get(k), dict) and not isinstance(v, dict):
            # a section replaced by a scalar: named here (a later key under it would read as an unknown key)
            raise ValueError(f"{path} must be a JSON object (a section of the config), got {v!r}")
        if (path in _OPTIMIZER_KEYS and isinstance(v, dict) and isinstance(out.get(k), dict)
                and v.get("name", out[k].get("name")) != out[k].get("name")):
            # another rule: its own arguments only (the old rule's, e.g. AdaGrad's initial_g2sum, would be
            # refused by the new one), the rest at the new rule's defaults
            out[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, path)
        else:
            out[k] = v
    return out


def _set_dotted(cfg: Dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    over: Dict[str, Any] = {}
    d = over
    parts = key.split(".")
    for p in parts[:-1]:
        d[p] = {}
        d = d[p]
    d[parts[-1]] = value
    cfg.update(_merge(cfg, over))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psembed-train",
        description="Online CTR training (day loop, PS embeddings) on the built-in click log or Criteo files.",
    )
    p.add_argument("--config", help="JSON config file (see configs/default.json); flags override it")
    p.add_argument("--out", help="output directory (default runs/<timestamp>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with the config it was started with "
                        "(config.json; flags may change only days, threads, device, workers, saves, plot, progress "
                        "and ps.rpc_timeout)")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one: its files (config, metrics, saves, "
                        "checkpoints) are deleted first")
    p.add_argument("--days", type=int, help="days to train")
    p.add_argument("--passes", type=int, dest="passes_per_day", help="passes per day")
    p.add_argument("--data", choices=["synthetic", "criteo", "slot"], help="data kind")
    p.add_argument("--data-path", help="file or directory of daily files (criteo / slot)")
    p.add_argument("--test-path", help="evaluation file after the last day (files)")
    p.add_argument("--file-days", type=int, help="cut a single data file into this many days")
    p.add_argument("--samples-per-day", type=int, help="synthetic: training samples per day")
    p.add_argument("--test-samples", type=int, help="synthetic: evaluation samples per day")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int,
                   help="DataLoader workers per process (default: 1 if there are more cores than local ranks, else 0)")
    p.add_argument("--model", choices=["dnn", "deepfm"])
    p.add_argument("--embedding", choices=["ps", "hashed"], help="PS table or the hashed EmbeddingBag baseline")
    p.add_argument("--dim", type=int, help="mf width (the hashed baseline uses dim + 1 columns)")
    p.add_argument("--hashed-size", type=int, help="rows of the hashed baseline table")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="where the dense part runs: cpu (default), cuda (LOCAL_RANK's GPU) or cuda:N")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-save", action="store_true", help="skip delta/base saves and checkpoints")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted, JSON value (e.g. --set table.accessor.embedx_threshold=5)")
    return p


def load_config(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The run's config: DEFAULTS (with ``--resume``: the run's own ``config.json``), then ``--config FILE``,
    then flags and ``--set``."""
    args = _parser().parse_args(argv)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
    saved = None
    if args.resume and args.out:
        raw = RD.read_run_config(args.out)
        try:
            saved = _merge(DEFAULTS, raw)
        except ValueError as e:
            raise ValueError(f"--resume: {os.path.join(args.out, RD.CONFIG)}: {e}") from None
    cfg = copy.deepcopy(DEFAULTS if saved is None else saved)
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            try:
                over = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--config {args.config!r} is not valid JSON: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"--config {args.config!r} is not UTF-8 text: {e}") from None
        if not isinstance(over, dict):
            raise ValueError(f"--config {args.config!r} must hold a JSON object (config keys and values), "
                             f"got a {type(over).__name__}")
        over.pop("resume", None)  # a run's config.json from before this release had it
        cfg = _merge(cfg, over)
    flat = {
        "out": args.out,
        "days": args.days,
        "passes_per_day": args.passes_per_day,
        "seed": args.seed,
        "data.kind": args.data,
        "data.path": args.data_path,
        "data.test_path": args.test_path,
        "data.file_days": args.file_days,
        "data.synthetic.samples_per_day": args.samples_per_day,
        "data.synthetic.test_samples": args.test_samples,
        "data.batch_size": args.batch_size,
        "data.num_workers": args.num_workers,
        "model.kind": args.model,
        "embedding.kind": args.embedding,
        "embedding.dim": args.dim,
        "embedding.hashed_size": args.hashed_size,
        "device": args.device,
    }
    for k, v in flat.items():
        if v is not None:
            _set_dotted(cfg, f"{k}={json.dumps(v)}")
    for item in args.set:
        _set_dotted(cfg, item)
    if args.no_plot:
        cfg["plot"] = False
    if args.no_progress:
        cfg["progress"] = False
    if args.no_save:
        cfg["save"] = {"delta": False, "base": False, "checkpoint": False}
    cfg["resume"] = bool(args.resume)
    cfg["overwrite"] = bool(args.overwrite)
    _validate(cfg)
    if saved is not None:
        changed = RD.resume_differences(saved, _run_config(cfg))
        if changed:
            raise ValueError(f"--resume: the run in {args.out!r} was started with other settings ("
                             + "; ".join(changed) + "): a resumed run keeps them (only "
                             + ", ".join(RD.RESUME_MAY_CHANGE) + " may change); start a new run to change them")
    return cfg


def _run_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """What ``config.json`` holds: the config without the command's own switches."""
    return {k: v for k, v in cfg.items() if k not in ("resume", "overwrite")}


# The schema is DEFAULTS itself: every value must have its default's type (bool is not int; an int is
# accepted for a float; a list's items take the type of the default's first item; a dict is checked key by
# key). A default of None takes null or a value like the prototype below; the rest are the value checks.
_NULLABLE: Dict[str, Any] = {
    "out": "dir", "threads": 1, "data.path": "file", "data.test_path": "file", "data.file_days": 1,
    "data.slots": [1], "data.num_workers": 0, "table.max_keys": 1,
}
_INT_RANGE: Dict[str, tuple] = {  # (low, high), inclusive; None: unbounded
    "seed": (0, 2**63 - 1),  # torch.manual_seed, TableConfig.seed and SimulatorConfig.seed all take it
    "days": (1, None), "passes_per_day": (1, None), "threads": (1, None),
    "data.batch_size": (1, None), "data.file_days": (1, None), "data.num_workers": (0, None),
    "model.hidden": (1, None), "embedding.dim": (1, 4096),
    "embedding.hashed_size": (1, None), "table.num_shards": (1, None), "table.num_threads": (0, None),
    "table.max_keys": (1, None), "ps.max_staleness": (0, None), "ps.num_servers": (0, None),
}
_FLOAT_LOW: Dict[str, tuple] = {  # (low, open)
    "model.lr": (0.0, False), "embedding.hashed_lr": (0.0, False), "ps.rpc_timeout": (0.0, True),
}


def _choices() -> Dict[str, tuple]:
    from .distributed.runtime import TRANSPORTS
    from .functional import OUTPUTS
    from .models.ctr import MODELS, NORMS

    return {"data.kind": ("synthetic", "criteo", "slot"), "model.kind": tuple(MODELS), "model.norm": tuple(NORMS),
            "embedding.kind": ("ps", "hashed"), "embedding.output": tuple(OUTPUTS), "ps.transport": tuple(TRANSPORTS)}


def _describe(path: str, proto: Any, choices: Dict[str, tuple], plural: bool = False) -> str:
    if isinstance(proto, bool):
        return "booleans (true or false)" if plural else "true or false"
    if isinstance(proto, int):
        lo, hi = _INT_RANGE.get(path, (None, None))
        rng = (f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}") if lo is not None else ""
        return ("ints" if plural else "an int") + rng
    if isinstance(proto, float):
        lo, open_ = _FLOAT_LOW.get(path, (None, False))
        rng = f" {'>' if open_ else '>='} {lo}" if lo is not None else ""
        return ("finite numbers" if plural else "a finite number") + rng
    if isinstance(proto, str):
        if path in choices:
            return "one of " + ", ".join(map(repr, choices[path]))
        return "strings" if plural else "a string"
    if isinstance(proto, list):
        return "a list of " + _describe(path, proto[0], choices, plural=True)
    return "a JSON object"


def _fits(path: str, v: Any, proto: Any, choices: Dict[str, tuple]) -> bool:
    if isinstance(proto, bool):
        return isinstance(v, bool)
    if isinstance(proto, int):
        lo, hi = _INT_RANGE.get(path, (None, None))
        return _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
    if isinstance(proto, float):
        if not (_is_number(v) and math.isfinite(v)):
            return False
        lo, open_ = _FLOAT_LOW.get(path, (None, False))
        return lo is None or (v > lo if open_ else v >= lo)
    if isinstance(proto, str):
        return isinstance(v, str) and (path not in choices or v in choices[path])
    if isinstance(proto, list):
        return isinstance(v, list) and all(_fits(path, x, proto[0], choices) for x in v)
    return isinstance(v, dict)


def _check_schema(cfg: Dict[str, Any], default: Dict[str, Any], choices: Dict[str, tuple], where: str = "") -> None:
    """A ValueError naming the key, its value and what it must be, unless ``cfg`` has DEFAULTS' types."""
    for k, d in default.items():
        if k not in cfg:  # (a sparse rule given another name keeps only its own fields)
            continue
        path = f"{where}.{k}" if where else k
        v = cfg[k]
        proto, nullable = d, False
        if d is None:
            proto, nullable = _NULLABLE[path], True
            if v is None:
                continue
        if not _fits(path, v, proto, choices):
            what = _describe(path, proto, choices)
            raise ValueError(f"{path} must be {'null or ' if nullable else ''}{what}, got {v!r}")
        if isinstance(proto, dict):
            _check_schema(v, proto, choices, path)


def _check_paths(d: Dict[str, Any]) -> None:
    """data.path and data.test_path, where they exist, must be what FileSource reads (a missing one is its error)."""
    for key in ("path", "test_path"):
        p = d[key]
        if not p or not os.path.exists(p):
            continue
        if key == "test_path" and os.path.isdir(p):
            raise ValueError(f"data.test_path {p!r} is a directory; it must be one file (--test-path)")
        if not (os.path.isfile(p) or os.path.isdir(p)):
            raise ValueError(f"data.{key} {p!r} is not a regular file or a directory")


def _simulator_config(cfg: Dict[str, Any]) -> SimulatorConfig:
    sim = dict(cfg["data"]["synthetic"])
    sim.setdefault("seed", cfg["seed"])
    sim.setdefault("chunk_size", cfg["data"]["batch_size"])
    try:
        return SimulatorConfig(**sim)
    except (TypeError, ValueError) as e:
        raise ValueError(f"data.synthetic: {e}") from None


def _validate(cfg: Dict[str, Any]) -> None:
    """Every check of the config, before anything runs: a ValueError naming the key and the value."""
    _check_schema(cfg, DEFAULTS, _choices())
    if cfg["data"]["kind"] != "synthetic" and not cfg["data"]["path"]:
        raise ValueError(f"data.kind={cfg['data']['kind']!r} needs data.path (--data-path)")
    if cfg["data"]["kind"] == "synthetic":  # the built-in log reads no file: a path given would be ignored
        given = [k for k in ("path", "test_path", "file_days", "slots") if cfg["data"][k] is not None]
        if given:
            raise ValueError(f"data.kind='synthetic' (the built-in log) reads no files, but data.{given[0]} is set "
                             f"to {cfg['data'][given[0]]!r}: pass --data criteo or --data slot to read files")
    slots = cfg["data"]["slots"]
    if cfg["data"]["kind"] == "slot" and (not slots or len(set(slots)) != len(slots)):
        raise ValueError(f"data.kind='slot' needs data.slots, a non-empty list of distinct slot ids, got {slots!r}")
    from .functional import _check_click_prior

    _check_click_prior(cfg["embedding"]["cvm_click_prior"])  # a ValueError naming it
    if cfg["resume"] and not cfg["out"]:
        raise ValueError("--resume needs --out (the directory of the run to continue)")
    _check_device(cfg["device"])
    if cfg["data"]["kind"] == "synthetic":
        sim = _simulator_config(cfg)  # SimulatorConfig's own checks (its fields' ranges, keys it does not take)
        batches = -(-sim.samples_per_day // sim.chunk_size)  # a pass takes whole batches (SyntheticSource)
        if batches < cfg["passes_per_day"]:
            raise ValueError(f"data.synthetic.samples_per_day={sim.samples_per_day} makes {batches} batch(es) of "
                             f"{sim.chunk_size} a day, fewer than passes_per_day={cfg['passes_per_day']}: every "
                             "pass needs one at least")
    else:
        _check_paths(cfg["data"])
    if cfg["embedding"]["kind"] == "ps":
        _table_config(cfg)  # the accessor's and the sparse rules' own checks, each named by its key


def _check_device(name: Any) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r}, but torch finds no CUDA device (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _job_device(name: str) -> torch.device:
    """The dense part's device for this rank: ``cuda`` alone means the local rank's GPU (round robin)."""
    dev = _check_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dev


# ----------------------------------------------------------------------------------------------- runtime
class _Runtime:
    def __init__(self, cfg: Dict[str, Any]) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.group = None
        self.pse_started = False
        self.use_ps = cfg["embedding"]["kind"] == "ps"
        if self.use_ps and self.world > 1:
            import torch_psembed as pse

            pse.init(**cfg["ps"])
            self.pse_started = True
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            if self.pse_started:
                from .distributed import trainer_group  # type: ignore[attr-defined]

                self.group = trainer_group()
            self.rank = dist.get_rank(self.group)
            self.world = dist.get_world_size(self.group)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def first_rank(self) -> int:
        """The global rank of this job's rank 0 (the trainers' group may not start at global rank 0)."""
        return dist.get_global_rank(self.group, 0) if self.group is not None else 0

    def broadcast(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.first_rank(), group=self.group)
        return box[0]

    def shutdown(self) -> None:
        self.group = None  # (a handle kept here would keep the group's threads alive: free_process_groups)
        if self.pse_started:
            import torch_psembed as pse

            pse.shutdown()
        elif dist.is_initialized():
            from .distributed.runtime import free_process_groups

            dist.destroy_process_group()
            free_process_groups()


def _log(rt: _Runtime, msg: str) -> None:
    if rt.rank == 0:
        print(msg, flush=True)


def _make_source(cfg: Dict[str, Any]):
    d = cfg["data"]
    if d["kind"] == "synthetic":
        return SyntheticSource(_simulator_config(cfg))
    return FileSource(
        d["path"],
        fmt="criteo" if d["kind"] == "criteo" else "slot",
        days=d["file_days"],
        test_path=d["test_path"],
        batch_size=d["batch_size"],
        slots=d["slots"],
    )


def _check_passes_fit(source, passes: int) -> None:
    """A ValueError when a day cut from one file has fewer lines than passes (a pass would get none; a day
    file of its own is counted only as it is read, and a pass without samples stops the job then)."""
    for day, (path, start, stop) in enumerate(getattr(source, "days", [])):
        if stop is not None and stop - start < passes:
            raise ValueError(f"day {day} of {path!r} has {stop - start} line(s), fewer than passes_per_day={passes}: "
                             "every pass needs one at least")


def _optimizer(where: str, d: Dict[str, Any]):
    from . import config as C

    classes = {"sgd": C.SGD, "adagrad": C.AdaGrad, "std_adagrad": C.StdAdaGrad, "adam": C.Adam, "ftrl": C.FTRL}
    d = dict(d)
    name = d.pop("name", None)
    if name not in classes:
        raise ValueError(f"{where}.name must be one of {tuple(classes)}, got {name!r}")
    if isinstance(d.get("weight_bounds"), list):  # (anything else is refused by the rule, named below)
        d["weight_bounds"] = tuple(d["weight_bounds"])
    try:
        return classes[name](**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _table_config(cfg: Dict[str, Any]):
    from .config import CtrAccessorConfig, TableConfig

    t = cfg["table"]
    try:
        accessor = CtrAccessorConfig(**t["accessor"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"table.accessor: {e}") from None
    return TableConfig(
        dim=cfg["embedding"]["dim"],
        accessor=accessor,
        lr_optimizer=_optimizer("table.lr_optimizer", t["lr_optimizer"]),
        mf_optimizer=_optimizer("table.mf_optimizer", t["mf_optimizer"]),
        seed=cfg["seed"],
        num_shards=t["num_shards"],
        num_threads=t["num_threads"],
        max_keys=t["max_keys"],
    )


class _Job:
    """The model, its optimizers and (PS) table, with the stats and save hooks the day loop needs."""

    def __init__(self, cfg: Dict[str, Any], rt: _Runtime, num_slots: int) -> None:
        self.cfg, self.rt = cfg, rt
        torch.manual_seed(cfg["seed"])
        e = cfg["embedding"]
        self.table = None
        self.sparse_opt = None
        if e["kind"] == "ps":
            import torch_psembed as pse

            self.table = pse.SparseTable(_table_config(cfg), name="ctr")
            emb = PSSlotEmbedding(self.table, num_slots, output=e["output"], cvm_click_prior=e["cvm_click_prior"])
            emb.enable_timing()  # a few clock reads a lookup: where the PS part of a step goes, per pass
        else:
            emb = HashedSlotEmbedding(int(e["hashed_size"]), e["dim"] + 1, num_slots)
        m = cfg["model"]
        self.model = build_model(m["kind"], emb, m["hidden"], m["wide"], m["norm"])
        # initialised on the CPU, then moved: the same seed gives the same weights on any device
        self.device = _job_device(cfg["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model.to(self.device)
        dense = [p for n, p in self.model.named_parameters() if not n.startswith("embedding.")]
        self.dense_opt = torch.optim.Adam(dense, lr=m["lr"])
        if e["kind"] == "hashed":
            self.sparse_opt = torch.optim.Adagrad(list(emb.parameters()), lr=e["hashed_lr"])
        if rt.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # No buffer sync per forward: DDP would broadcast rank 0's buffers (BatchNorm's running statistics)
            # before every forward, a collective per step that took ~20% of a batch-256 pass on 2 CPU
            # processes (docs/benchmarks.md, "Main job", session 7). Training mode never reads them, and
            # rank 0's never depend on the other ranks either way, so sync_buffers() sends rank 0's once
            # a pass, before anything reads them (evaluation, saves).
            # (torch >= 2.13 names the switch forward_sync_buffers and deprecates broadcast_buffers)
            no_sync = ({"forward_sync_buffers": False}
                       if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                       else {"broadcast_buffers": False})
            self.ddp = DDP(self.model, device_ids=ids, process_group=rt.group, find_unused_parameters=False, **no_sync)
        else:
            self.ddp = self.model
        self._last_counters: Dict[str, int] = {}
        self.carry_deleted = 0  # rows deleted before a resume that the next pass record still owes (end_day)

    # -- training ----------------------------------------------------------------------------------------
    def feed(self, labels: torch.Tensor):
        if self.table is None:
            return contextlib.nullcontext()
        import torch_psembed as pse

        return pse.feed(clicks=labels)

    def _on_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def step(self, batch: Dict[str, torch.Tensor], next_batch: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """One training step; returns the logits on the CPU (for the metrics)."""
        batch = self._on_device(batch)
        labels = batch["labels"]
        self.dense_opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.zero_grad(set_to_none=True)
        with self.feed(labels):
            logits = self.ddp(batch["keys"], batch["offsets"])
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            loss.backward()
        if next_batch is not None and self.table is not None and self.cfg["embedding"]["prefetch"]:
            # the push went out in backward: start the next batch's pull, so its RPCs overlap the optimizer
            # step, the metrics and the making of the batch after (rows within the same staleness bound)
            self.model.embedding.prefetch(next_batch["keys"], next_batch["offsets"])
        self.dense_opt.step()
        if self.sparse_opt is not None:
            # The hashed baseline's sparse optimizer builds its updates from coalesced gradients, valid by
            # construction: torch's (costly) invariant checks are off for this step only, said explicitly.
            with torch.sparse.check_sparse_tensor_invariants(enable=False):
                self.sparse_opt.step()
        return logits.detach().cpu()

    @torch.no_grad()
    def predict(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self._on_device(batch)
        return self.model(batch["keys"], batch["offsets"]).cpu()

    def join(self):
        if self.rt.distributed:
            return self.ddp.join()
        return contextlib.nullcontext()

    def sync_buffers(self) -> None:
        """Every rank takes rank 0's model buffers (the running statistics evaluation and saves use)."""
        if not self.rt.distributed:
            return
        src = self.rt.first_rank()
        for buf in self.model.buffers():
            dist.broadcast(buf, src=src, group=self.rt.group)

    # -- stats and saves ---------------------------------------------------------------------------------
    def table_stats(self) -> Dict[str, Any]:
        if self.table is None:
            emb = self.model.embedding
            return {"keys": emb.num_buckets, "keys_with_mf": emb.num_buckets, "created": 0, "deleted": 0,
                    "refused": 0, "bytes": emb.memory_bytes(self.sparse_opt)}
        self.table.flush()
        s = self.table.stats()
        out = {"keys": int(s.get("keys", len(self.table))), "keys_with_mf": int(s.get("keys_with_mf", 0)),
               "bytes": int(s.get("bytes", 0))}
        for name, key in (("created", "inserts"), ("mf_created", "mf_created"), ("deleted", "deleted"),
                          ("refused", "capacity_rejected")):
            total = int(s.get(key, 0))
            out[name] = total - self._last_counters.get(key, 0)
            self._last_counters[key] = total
        out["deleted"] += self.carry_deleted
        self.carry_deleted = 0
        return out

    def save_table(self, path: str, mode: str) -> Optional[Dict[str, Any]]:
        if self.table is None:
            return None
        self.table.flush()
        return self.table.save(path, mode=mode)  # collective when sharded

    def end_day(self, day: int) -> int:
        """Close ``day`` on the table (collective when sharded: every trainer calls it). Returns rows deleted."""
        if self.table is None:
            return 0
        self.table.flush()
        return int(self.table.end_day(day))

    def dense_state(self) -> Dict[str, Any]:
        state = {"model": self.model.state_dict(), "dense_opt": self.dense_opt.state_dict()}
        if self.table is not None:  # the embedding module has no state; keep only the dense part
            state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("embedding.")}
        if self.sparse_opt is not None:
            state["sparse_opt"] = self.sparse_opt.state_dict()
        return state

    def load_dense_state(self, state: Dict[str, Any], where: str) -> None:
        """Load ``dense_state()``'s dict from checkpoint ``where``: every key of this model (the PS embedding's
        aside: its rows are in the table) and nothing else, or a CheckpointMismatchError naming them."""
        try:
            res = self.model.load_state_dict(state["model"], strict=False)
            missing = [k for k in res.missing_keys if self.table is None or not k.startswith("embedding.")]
            if missing or res.unexpected_keys:
                raise CheckpointMismatchError(f"{where}/dense.pt does not fit this model (missing {missing[:5]}, "
                                              f"unexpected {res.unexpected_keys[:5]})")
            self.dense_opt.load_state_dict(state["dense_opt"])
            if self.sparse_opt is not None:
                self.sparse_opt.load_state_dict(state["sparse_opt"])
        except (RuntimeError, ValueError, KeyError) as e:  # shapes, parameter groups, a missing part
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatchError(f"{where}/dense.pt does not fit this model: {first}") from None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _progress(rt: _Runtime, cfg: Dict[str, Any], total: Optional[int], desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # no progress bar without tqdm
        return _NoBar()
    enabled = bool(cfg["progress"]) and rt.rank == 0 and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, disable=not enabled, leave=False,
                dynamic_ncols=True)


def _expected(source, cfg: Dict[str, Any], rt: _Runtime, split: str) -> Optional[int]:
    if isinstance(source, SyntheticSource):
        n = source.sim.num_samples(split)
        return n // (cfg["passes_per_day"] if split == "train" else 1) // rt.world
    return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _num_workers(cfg: Dict[str, Any]) -> int:
    """``data.num_workers``, or when it is None: 1 if the machine has more cores than local ranks, else 0."""
    n = cfg["data"]["num_workers"]
    if n is None:
        return 1 if _cores() > int(os.environ.get("LOCAL_WORLD_SIZE", "1")) else 0
    return n


def _with_next(items):
    """(item, the next item or None) for each item of an iterable, reading one item ahead."""
    it = iter(items)
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt


def _run_pass(job: _Job, rt: _Runtime, cfg: Dict[str, Any], source, day: int, p: int) -> Dict[str, Any]:
    ds = source.train_dataset(day, p, cfg["passes_per_day"], rt.rank, rt.world)
    stream = BatchStream(make_loader(ds, _num_workers(cfg)))
    metrics = PassMetrics()
    job.model.train()
    bar = _progress(rt, cfg, _expected(source, cfg, rt, "train"), f"day {day} pass {p}")
    timed = job.table is not None and job.model.embedding.timing() is not None
    if timed:
        job.model.embedding.reset_timing()
    steps = 0
    with job.join():
        for i, (batch, next_batch) in enumerate(_with_next(stream)):  # one batch ahead, for the prefetch
            steps += 1
            logits = job.step(batch, next_batch)
            _check_finite(logits, f"day {day} pass {p} batch {i}")
            metrics.add(torch.sigmoid(logits), batch["labels"], batch.get("prob"))
            bar.update(int(batch["labels"].numel()))
            if i % 20 == 19:
                bar.set_postfix(auc=f"{metrics.running_auc():.4f}")
    bar.close()
    job.sync_buffers()
    stream.warn(f"day {day} pass {p} (rank {rt.rank})")
    res = metrics.result(rt.group)
    if res["samples"] == 0:
        raise RuntimeError(f"day {day} pass {p}: no training samples on any rank")
    if timed and steps:
        t = job.model.embedding.timing()
        # this rank's PSEmbedding phases, milliseconds per training step (pull and push include the RPCs)
        res["emb_ms_per_step"] = {k: 1e3 * t[k] / steps for k in t if k != "calls"}
    return res


def _check_finite(logits: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"{where}: the model's predictions are not finite (NaN or inf): training diverged; "
                                 "lower model.lr (or embedding.hashed_lr, or the table's learning rates)")


def _run_eval(job: _Job, rt: _Runtime, cfg: Dict[str, Any], source, day: int) -> Optional[Dict[str, Any]]:
    ds = source.eval_dataset(day, rt.rank, rt.world)
    if ds is None:
        return None
    stream = BatchStream(make_loader(ds, _num_workers(cfg)))
    metrics = PassMetrics()
    job.model.eval()
    bar = _progress(rt, cfg, _expected(source, cfg, rt, "test"), f"eval after day {day}")
    for i, batch in enumerate(stream):
        logits = job.predict(batch)
        _check_finite(logits, f"evaluation after day {day}, batch {i}")
        metrics.add(torch.sigmoid(logits), batch["labels"], batch.get("prob"))
        bar.update(int(batch["labels"].numel()))
    bar.close()
    stream.warn(f"evaluation after day {day} (rank {rt.rank})")
    return metrics.result(rt.group)


def _fmt_pass(tag: str, r: Dict[str, Any]) -> str:
    s = f"{tag}: auc {r['auc']:.4f}  logloss {r['logloss']:.4f}  {r['samples']} samples  {r['samples_per_s']:.0f}/s"
    if "oracle_auc" in r:
        s += f"  (oracle auc {r['oracle_auc']:.4f})"
    if "keys" in r:
        s += f"  keys {r['keys']} mf {r['keys_with_mf']} +{r['created']} -{r['deleted']} {r['bytes'] / 2**20:.1f}MiB"
        if r.get("refused"):  # new ids left out by table.max_keys
            s += f" refused {r['refused']}"
    return s


def _ckpt_dir(out: str, day: int) -> str:
    return os.path.join(out, "checkpoints", f"day_{day:03d}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``psembed-train`` / ``python -m torch_psembed.train`` entry point (see :func:`run`)."""
    run(argv)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the job with command-line ``argv``; returns ``{"out", "records", "seconds"}`` (records on rank 0)."""
    cfg = load_config(argv)
    threads = torch.get_num_threads()
    if cfg["threads"] is not None:  # (an int >= 1: _validate)
        torch.set_num_threads(cfg["threads"])
    rt = _Runtime(cfg)
    try:
        return _main(cfg, rt)
    finally:
        rt.shutdown()
        torch.set_num_threads(threads)


def _main(cfg: Dict[str, Any], rt: _Runtime) -> Dict[str, Any]:
    out = cfg["out"] or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    out = rt.broadcast(out)
    cfg["out"] = out
    # Rank 0 decides (the others must not see the config.json it is about to write) and tells every rank.
    refusal = RD.check_new_run(out, cfg["overwrite"]) if rt.rank == 0 and not cfg["resume"] else None
    refusal = rt.broadcast(refusal)
    if refusal is not None:
        raise ValueError(refusal)
    # The data first: a file the job cannot read is refused before --out is made (a new run there would then
    # be refused as a second run, and --resume would find no checkpoint).
    source = _make_source(cfg)
    _check_passes_fit(source, cfg["passes_per_day"])
    if rt.rank == 0 and not cfg["resume"]:
        os.makedirs(out, exist_ok=True)
        if cfg["overwrite"]:
            RD.clear_run(out)
        write_json_atomic(os.path.join(out, RD.CONFIG), _run_config(cfg))
    rt.barrier()
    days = cfg["days"]
    if source.num_days() is not None and days > source.num_days():
        _log(rt, f"[psembed-train] data has {source.num_days()} day(s); training {source.num_days()} instead of {days}")
        days = source.num_days()
    job = _Job(cfg, rt, source.num_slots)
    writer = JsonlWriter(os.path.join(out, "metrics.jsonl")) if rt.rank == 0 else None
    start_day = 0
    if cfg["resume"]:
        latest = RD.latest_checkpoint(out)
        ck = latest["dir"]
        dense = RD.load_dense(ck)  # before the table: a bad file is refused before anything is loaded
        if job.table is not None:
            job.table.load(os.path.join(ck, "table"))
            rt.barrier()
        job.load_dense_state(dense, ck)
        start_day = latest["day"] + 1
        # The next pass record counts from here (not the load's inserts), plus the checkpointed day's eviction.
        job.table_stats()
        job.carry_deleted = RD.checkpoint_progress(ck).get("end_day_deleted", 0)
        rt.barrier()  # every rank has read config.json and the checkpoint
        if rt.rank == 0:
            # drop what a crashed run logged after the checkpoint. config.json keeps the run's settings but
            # `days`: this command's one-off switches (--no-save, --no-plot, threads) are not the run's.
            RD.rewrite_metrics(out, RD.metrics_before(out, start_day))
            write_json_atomic(os.path.join(out, RD.CONFIG), {**RD.read_run_config(out), "days": cfg["days"]})
        _log(rt, f"[psembed-train] resumed from {ck}: continuing at day {start_day}")
    e = cfg["embedding"]
    _log(rt, f"[psembed-train] out={out} ranks={rt.world} data={cfg['data']['kind']} embedding={e['kind']} "
             f"model={cfg['model']['kind']} days={days} passes/day={cfg['passes_per_day']} "
             f"workers={_num_workers(cfg)}")
    t_job = time.perf_counter()
    for day in range(start_day, days):
        for p in range(cfg["passes_per_day"]):
            res = _run_pass(job, rt, cfg, source, day, p)
            if cfg["save"]["delta"] and job.table is not None:
                job.save_table(os.path.join(out, "saves", f"day_{day:03d}", f"pass_{p}", "delta"), "delta")
            rec = {"event": "pass", "day": day, "pass": p, "passes": cfg["passes_per_day"], **res,
                   **job.table_stats(), "rss_mb": _rss_mb()}
            _log(rt, _fmt_pass(f"day {day} pass {p}", rec))
            if writer:
                writer.write(rec)
        deleted = job.end_day(day)
        if cfg["save"]["base"] and job.table is not None:
            job.save_table(os.path.join(out, "saves", f"day_{day:03d}", "base"), "base")
        # The next-day test before the checkpoint: a run stopped during it resumes from the day before and
        # tests again, where a checkpoint first would have resumed past a day never tested.
        ev = _run_eval(job, rt, cfg, source, day)
        if ev is not None:
            rec = {"event": "eval", "day": day, "end_day_deleted": deleted, **ev}
            _log(rt, _fmt_pass(f"day {day} -> next day", rec))
            if writer:
                writer.write(rec)
        if cfg["save"]["checkpoint"]:
            ck = _ckpt_dir(out, day)
            if rt.rank == 0:
                os.makedirs(ck, exist_ok=True)
            rt.barrier()
            job.save_table(os.path.join(ck, "table"), "checkpoint")
            if rt.rank == 0:
                torch.save(job.dense_state(), os.path.join(ck, "dense.pt"))
                write_json_atomic(os.path.join(ck, RD.PROGRESS), {"day": day, "next_day": day + 1,
                                                                 "passes_per_day": cfg["passes_per_day"],
                                                                 "end_day_deleted": deleted})
                write_json_atomic(os.path.join(out, "checkpoints", "latest.json"),
                              {"day": day, "dir": os.path.relpath(ck, out)})
            rt.barrier()
    seconds = time.perf_counter() - t_job
    records: List[Dict[str, Any]] = []
    if rt.rank == 0:
        from .plotting import plot_metrics, summary_table  # matplotlib is imported only inside plot_metrics

        records = read_jsonl(os.path.join(out, "metrics.jsonl"))
        writer.write({"event": "end", "seconds": seconds, "days": days, "embedding": e["kind"]})
        table = summary_table(records)
        print(table, flush=True)
        with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        if cfg["plot"]:
            try:
                png = plot_metrics(records, os.path.join(out, "metrics.png"),
                                   title=f"{cfg['data']['kind']} / {e['kind']} / {cfg['model']['kind']}")
                print(f"[psembed-train] plot: {png}", flush=True)
            except ImportError as err:
                print(f"[psembed-train] no plot: matplotlib is not installed ({err})", flush=True)
        print(f"[psembed-train] done in {seconds:.1f}s; metrics: {os.path.join(out, 'metrics.jsonl')}", flush=True)
    rt.barrier()
    return {"out": out, "records": records, "seconds": seconds}


if __name__ == "__main__":
    main()
