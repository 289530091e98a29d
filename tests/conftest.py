"""Shared pytest fixtures (kept small)."""

from __future__ import annotations

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
