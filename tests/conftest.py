"""Shared pytest fixtures (kept small)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import torch_psembed
from torch_psembed import _C
from torch_psembed.config import CtrAccessorConfig, TableConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The folder of the torch_psembed this process imported: the checkout, or under scripts/sanitize.sh the build's
# site/ with the sanitized extension, which the tests' child processes must import too (they put the checkout
# first before, and so ran the plain build under a sanitizer run).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(torch_psembed.__file__)))
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                  "TORCHELASTIC_USE_AGENT_STORE", "PSEMBED_RPC_PORT")


def child_env(extra: dict | None = None) -> dict:
    """The environment of a Python process a test starts: this one's without torchrun's variables (a test sets
    its own), OMP_NUM_THREADS=1, and PYTHONPATH leading to the torch_psembed this process imported, then the
    checkout (the tests' own modules), then what it held; ``extra`` on top."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    paths = [PACKAGE_ROOT, REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra or {})
    return env


@pytest.fixture
def make_c_table():
    """make_c_table(dim=4, accessor=None, **table_kwargs) -> _C.Table built from a TableConfig."""

    def make(dim: int = 4, accessor: CtrAccessorConfig | None = None, **kwargs) -> _C.Table:
        cfg = TableConfig(dim=dim, accessor=accessor or CtrAccessorConfig(), **kwargs)
        return _C.Table(cfg.to_dict())

    return make


def run_python(code: str = "", *, script: str = "", args=(), timeout: float = 300, env=None) -> str:
    """Runs ``code`` (dedented) or the file ``script`` with ``args`` in a fresh interpreter: for limits on memory,
    descriptors or file sizes that must not touch the test process, or a crash it must survive. Asserts it
    exited 0 (the end of its stderr in the message) and returns its stdout. ``env``: the child's whole environment
    (e.g. child_env()); None: this process's."""
    argv = [sys.executable, script] if script else [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    return proc.stdout
