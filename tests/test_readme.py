"""The README's usage example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def test_readme_usage_example_runs_and_trains_the_table():
    blocks = _python_blocks(ROOT / "README.md")
    assert len(blocks) == 1, "the README has one usage example; update this test when that changes"
    ns: dict = {}
    exec(compile(blocks[0], "README.md usage example", "exec"), ns)  # noqa: S102 - our own README
    table, ids, emb, head = ns["table"], ns["ids"], ns["emb"], ns["head"]
    unique = torch.unique(ids)
    assert len(table) == unique.numel()  # the backward pushed every id of the batch
    rows = table.pull(unique, with_stats=True)
    assert float(rows[:, 0].sum()) == ids.numel()  # one show per occurrence
    assert float(rows[:, 1].sum()) == float((ns["labels"][:, None] * torch.ones_like(ids)).sum())  # clicks fed
    assert bool((rows[:, 2] != 0).any())  # the lr weights moved
    assert emb(ids).shape == (32, 3 + 8) and head.weight.grad is not None  # "[batch, 3 + dim]"
