"""The training job's run directory (``--out``): what a run writes there, and what ``--resume`` reads back.

A run directory holds one run. A new run refuses a directory that already holds one (``--overwrite`` deletes
that run's files first), and ``--resume`` continues the run with the config it was started with
(``config.json``): only the settings in :data:`RESUME_MAY_CHANGE` may differ, since a different model, table or
data would load the checkpoint into something else, or train on other data, without saying so. Every file the
job rewrites is replaced atomically (written beside, then renamed), so a crash leaves the old or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from .checkpoint._format import write_bytes_atomic
from .config import _is_int
from .errors import CorruptCheckpointError
from .metrics import read_jsonl

CONFIG = "config.json"
PROGRESS = "progress.json"  # in a checkpoint folder: where the run was, and the day's end_day deletions
METRICS = "metrics.jsonl"
# What the job writes under --out: what --overwrite deletes (and nothing else there).
RUN_FILES = (CONFIG, METRICS, "summary.txt", "metrics.png")
RUN_DIRS = ("checkpoints", "saves")

# Settings a resumed run may change: how long it runs and how, not what it trains or on what.
RESUME_MAY_CHANGE = ("days", "out", "plot", "progress", "threads", "device", "data.num_workers",
                     "ps.rpc_timeout", "save.delta", "save.base", "save.checkpoint")


def holds_run(out: str) -> List[str]:
    """The files and folders of a run in ``out`` (empty when it holds none)."""
    return [n for n in RUN_FILES + RUN_DIRS if os.path.exists(os.path.join(out, n))]


def clear_run(out: str) -> None:
    """Delete the files and folders a run wrote in ``out`` (``--overwrite``); nothing else there."""
    for n in RUN_FILES:
        p = os.path.join(out, n)
        if os.path.exists(p):
            os.remove(p)
    for n in RUN_DIRS:
        p = os.path.join(out, n)
        if os.path.isdir(p):
            shutil.rmtree(p)


def read_run_config(out: str) -> Dict[str, Any]:
    """The config a run in ``out`` was started with (``config.json``), for ``--resume``."""
    path = os.path.join(out, CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: {path} not found: {out!r} holds no run to resume "
                                "(start the run without --resume)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--resume: {path} is not a JSON config: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"--resume: {path} must hold a JSON object, got a {type(cfg).__name__}")
    cfg.pop("resume", None)  # (written there before this release)
    return cfg


def _flat(d: Dict[str, Any], where: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        path = f"{where}.{k}" if where else k
        if isinstance(v, dict) and v:
            out.update(_flat(v, path))
        else:
            out[path] = v
    return out


def resume_differences(saved: Dict[str, Any], cfg: Dict[str, Any]) -> List[str]:
    """``key: saved -> now`` for each setting outside :data:`RESUME_MAY_CHANGE` that differs."""
    a, b = _flat(saved), _flat(cfg)
    keys = sorted(k for k in set(a) | set(b) if k not in RESUME_MAY_CHANGE and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def latest_checkpoint(out: str) -> Dict[str, Any]:
    """``checkpoints/latest.json``: ``{"day", "dir"}`` of the last checkpoint, checked."""
    path = os.path.join(out, "checkpoints", "latest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint under {os.path.join(out, 'checkpoints')!r}")
    try:
        with open(path, encoding="utf-8") as f:
            latest = json.load(f)
        day, rel = latest["day"], latest["dir"]
        ok = isinstance(day, int) and not isinstance(day, bool) and day >= 0 and isinstance(rel, str)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{path}: not a checkpoint index ({type(e).__name__}: {e})", path) from None
    if not ok:
        raise CorruptCheckpointError(f"{path}: not a checkpoint index (day {day!r}, dir {rel!r})", path)
    ck = os.path.join(out, rel)
    if not os.path.isdir(ck):
        raise CorruptCheckpointError(f"{path}: names {ck!r}, which does not exist", path)
    return {"day": day, "dir": ck}


def load_dense(ck: str) -> Dict[str, Any]:
    """The dense state (``dense.pt``) of checkpoint folder ``ck``."""
    path = os.path.join(ck, "dense.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing", path) from None
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CorruptCheckpointError(f"{path}: not a dense state saved by the job ({type(e).__name__}: {e})",
                                     path) from None
    if not isinstance(state, dict) or "model" not in state or "dense_opt" not in state:
        raise CorruptCheckpointError(f"{path}: not a dense state saved by the job", path)
    return state


def checkpoint_progress(ck: str) -> Dict[str, Any]:
    """``progress.json`` of checkpoint folder ``ck`` (``{}`` when absent: checkpoints older than it)."""
    path = os.path.join(ck, PROGRESS)
    try:
        with open(path, encoding="utf-8") as f:
            progress = json.load(f)
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not JSON ({e})", path) from None
    if not isinstance(progress, dict) or not _is_int(progress.get("end_day_deleted", 0)):
        raise CorruptCheckpointError(f"{path}: not a checkpoint's progress", path)
    return progress


def metrics_before(out: str, day: int) -> List[Dict[str, Any]]:
    """The pass and eval records of days before ``day`` in ``metrics.jsonl`` (what a resumed run keeps: a
    crashed run may have logged past its last checkpoint). A last line cut short by a crash is left out, with
    a warning; a bad line before it is an error."""
    path = os.path.join(out, METRICS)
    if not os.path.exists(path):
        return []
    records = read_jsonl(path, skip_cut_last=True)
    return [r for r in records if r.get("event") in ("pass", "eval") and r.get("day", day) < day]


def rewrite_metrics(out: str, records: List[Dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` with ``records``, atomically."""
    write_bytes_atomic(os.path.join(out, METRICS), "".join(json.dumps(r) + "\n" for r in records).encode())


def check_new_run(out: Optional[str], overwrite: bool) -> Optional[str]:
    """Why a new run may not start in ``out`` (None: it may)."""
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is a file, not a directory"
    if out is None or overwrite:
        return None
    found = holds_run(out) if os.path.isdir(out) else []
    if not found:
        return None
    return (f"--out {out!r} already holds a run ({', '.join(found)}): pass --resume to continue it, --overwrite "
            "to delete it and start anew, or another --out")
