"""Shared pytest fixtures (kept small)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from torch_psembed import _C
from torch_psembed.config import CtrAccessorConfig, TableConfig


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
    exited 0 (the end of its stderr in the message) and returns its stdout."""
    argv = [sys.executable, script] if script else [sys.executable, "-c", textwrap.dedent(code)]
    proc = subprocess.run(argv + list(args), capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    return proc.stdout
