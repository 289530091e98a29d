"""Day-by-day data sources: the synthetic click log, or Criteo / slot-format files.

A *source* hands out one ``torch.utils.data.IterableDataset`` per (day, pass) for training and one per day for
next-day evaluation. Every dataset reads only its share of the data: rank ``r`` of ``world_size`` and
DataLoader worker ``w`` of ``num_workers`` take every ``(world_size * num_workers)``-th chunk (simulator) or
line (files), so parsing runs in the workers and no two consumers see the same sample.

Items are batch dicts (``labels``, ``keys``, ``offsets``, ``slots``, and ``prob`` for the simulator) and, at
the end of a file share, one stats dict ``{"bad_rows", "rows", "examples"}``; :class:`BatchStream` separates
the two and warns once about the bad rows it saw.
"""

from __future__ import annotations

import os
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .readers import assemble, assemble_criteo, make_parser
from .synthetic import ClickLogSimulator, SimulatorConfig

__all__ = ["SyntheticSource", "FileSource", "BatchStream", "make_loader", "check_file", "BadDataWarning"]

_CHECK_ROWS = 1000
_MAX_EXAMPLES = 5


class BadDataWarning(UserWarning):
    """Rows that could not be parsed were skipped."""


def _consumer() -> Tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _slice(n: int, part: int, parts: int) -> Tuple[int, int]:
    return n * part // parts, n * (part + 1) // parts


# ------------------------------------------------------------------------------------------------ synthetic
class _SyntheticDataset(IterableDataset):
    def __init__(self, sim: ClickLogSimulator, day: int, split: str, part: int, parts: int, rank: int, world: int):
        super().__init__()
        self.sim, self.day, self.split = sim, day, split
        self.part, self.parts, self.rank, self.world = part, parts, rank, world

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        wid, nw = _consumer()
        consumer, consumers = self.rank * nw + wid, self.world * nw
        lo, hi = _slice(self.sim.num_chunks(self.split), self.part, self.parts)
        for c in range(lo + consumer, hi, consumers):
            yield self.sim.chunk(self.day, self.split, c)


class SyntheticSource:
    """The built-in click log: unlimited days; evaluation after day ``d`` uses day ``d + 1``'s test split."""

    kind = "synthetic"

    def __init__(self, config: SimulatorConfig = SimulatorConfig()) -> None:
        self.sim = ClickLogSimulator(config)
        self.num_slots = config.num_slots
        self.has_oracle = True

    def num_days(self) -> Optional[int]:
        return None

    def train_dataset(self, day: int, pass_index: int = 0, num_passes: int = 1, rank: int = 0, world_size: int = 1):
        _check_part(pass_index, num_passes, rank, world_size)
        return _SyntheticDataset(self.sim, day, "train", pass_index, num_passes, rank, world_size)

    def eval_dataset(self, day: int, rank: int = 0, world_size: int = 1):
        """The data to evaluate the model trained through ``day`` on (day ``day + 1``), or None."""
        _check_part(0, 1, rank, world_size)
        return _SyntheticDataset(self.sim, day + 1, "test", 0, 1, rank, world_size)


# ------------------------------------------------------------------------------------------------ files
class _FileDataset(IterableDataset):
    def __init__(self, parser, path: str, start: int, stop: Optional[int], batch_size: int, rank: int, world: int):
        super().__init__()
        self.parser, self.path, self.start, self.stop = parser, path, start, stop
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def _lines(self) -> Iterator[Tuple[int, str]]:
        """(line index, line) of this consumer's non-blank lines in [start, stop)."""
        wid, nw = _consumer()
        consumer, consumers = self.rank * nw + wid, self.world * nw
        with _open_lines(self.path) as f:
            for i, line in enumerate(f):
                if i < self.start:
                    continue
                if self.stop is not None and i >= self.stop:
                    break
                if (i - self.start) % consumers != consumer or _is_blank(line):
                    continue
                yield i, line

    def __iter__(self):
        if getattr(self.parser, "parse_lines", None) is not None:
            yield from self._iter_bulk()
            return
        rows: List = []
        bad = _BadRows(self.path)
        parse = self.parser.parse
        for i, line in self._lines():
            try:
                rows.append(parse(line))
            except ValueError as e:
                bad.add(i, e)
                continue
            bad.good += 1
            if len(rows) == self.batch_size:
                yield assemble(self.parser, rows)
                rows = []
        if rows:
            yield assemble(self.parser, rows)
        yield bad.summary()

    def _iter_bulk(self):
        """The Criteo path: lines parsed a batch at a time (``parse_lines``), the same batches of good rows in
        the same order as the line-by-line loop."""
        bad = _BadRows(self.path)
        labels: List[np.ndarray] = []  # good rows not yet in a batch, in order
        values: List[np.ndarray] = []
        held = 0

        def parse(chunk: List[Tuple[int, str]]):
            nonlocal held
            lab, val, ok, errors = self.parser.parse_lines([line for _, line in chunk])
            for j, reason in errors:
                bad.add(chunk[j][0], reason)
            n_ok = int(ok.sum())
            labels.append(lab[ok])
            values.append(val[ok])
            bad.good += n_ok
            held += n_ok

        def take(n: int):
            nonlocal held
            lab, val = np.concatenate(labels), np.concatenate(values)
            labels[:] = [lab[n:]]
            values[:] = [val[n:]]
            held -= n
            return assemble_criteo(lab[:n], val[:n])

        chunk: List[Tuple[int, str]] = []
        for item in self._lines():
            chunk.append(item)
            if len(chunk) == self.batch_size:
                parse(chunk)
                chunk = []
                while held >= self.batch_size:
                    yield take(self.batch_size)
        if chunk:
            parse(chunk)
        while held >= self.batch_size:
            yield take(self.batch_size)
        if held:
            yield take(held)
        yield bad.summary()


class _BadRows:
    """A pass's count of good and bad rows, with the first few bad ones as ``file:line: reason``."""

    def __init__(self, path: str) -> None:
        self.path, self.good, self.bad = path, 0, 0
        self.examples: List[str] = []

    def add(self, index: int, reason) -> None:
        self.bad += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{self.path}:{index + 1}: {reason}")

    def summary(self) -> Dict:
        return {"bad_rows": self.bad, "rows": self.good, "examples": self.examples}


def _open_lines(path: str):
    """``path`` as text lines split exactly as :func:`_count_lines` counts them: only ``\\n`` ends a line and
    line endings come back untranslated (``newline="\\n"``). In the default universal-newline mode a lone
    ``\\r`` also ended a line, so the line indices ran ahead of the count and the rows past it were never read
    (a CR-only file read as one sample); now such a ``\\r`` stays inside its line and the parser calls the row
    bad (``readers._strip_line_end``). Bytes that are not UTF-8 come back as surrogate escapes, so that
    they hash as themselves (``hashing.hash_string``); with ``errors="replace"`` every such value read as
    U+FFFD, and different categories shared one feasign."""
    return open(path, encoding="utf-8", errors="surrogateescape", newline="\n")


def _is_blank(line: str) -> bool:
    """An empty line (skipped, not a row). A line of tabs or other whitespace is a row, and a bad one:
    ``str.strip()`` took it for blank, and a Criteo row of 40 empty fields vanished uncounted."""
    return not line.rstrip("\r\n")


def _count_lines(path: str) -> int:
    """Lines of ``path`` as :func:`_open_lines` reads them: each ``\\n`` ends one, plus a last line without one."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 20)
            if not block:
                break
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def check_file(parser, path: str) -> None:
    """Raise ``ValueError`` naming ``path`` when it has no rows or none of its first 1000 rows parses."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    tried = 0
    errors: List[str] = []
    with _open_lines(path) as f:
        for i, line in enumerate(f):
            if _is_blank(line):
                continue
            tried += 1
            try:
                parser.parse(line)
                return
            except ValueError as e:
                if len(errors) < 3:
                    errors.append(f"line {i + 1}: {e}")
            if tried >= _CHECK_ROWS:
                break
    if tried == 0:
        raise ValueError(f"data file {path!r} has no rows")
    raise ValueError(
        f"data file {path!r} is not in {parser.name} format: none of its first {tried} rows parses; "
        + "; ".join(errors)
    )


class FileSource:
    """Criteo or slot-format files as days.

    Args:
        path (str): a directory (each file, by sorted name, is one day) or one file (cut into ``days`` days
            of consecutive lines).
        fmt (str): ``"criteo"`` or ``"slot"``. Default: ``"criteo"``.
        days (int, optional): days to cut a single file into. Default: 1.
        test_path (str, optional): evaluation data after the last day (otherwise the last day is not
            evaluated); evaluation after day ``d`` uses day ``d + 1``.
        batch_size (int): rows per batch. Default: 1024.
        slots (list of int, optional): slot ids of the slot format, in bag order.
    """

    kind = "files"

    def __init__(
        self,
        path: str,
        fmt: str = "criteo",
        days: Optional[int] = None,
        test_path: Optional[str] = None,
        batch_size: int = 1024,
        slots: Optional[Sequence[int]] = None,
    ) -> None:
        self.parser = make_parser(fmt, slots)
        self.num_slots = self.parser.num_slots
        self.has_oracle = False
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        if os.path.isdir(path):
            if days is not None:
                raise ValueError(f"days applies to a single file; {path!r} is a directory (one file per day)")
            files = sorted(
                os.path.join(path, n) for n in os.listdir(path)
                if not n.startswith(".") and os.path.isfile(os.path.join(path, n))
            )
            if not files:
                raise ValueError(f"data directory {path!r} has no files")
            self.days: List[Tuple[str, int, Optional[int]]] = [(p, 0, None) for p in files]
        elif os.path.isfile(path):
            days = 1 if days is None else days
            if not isinstance(days, int) or days < 1:
                raise ValueError(f"days must be an int >= 1, got {days!r}")
            n = _count_lines(path)
            if n < days:
                raise ValueError(f"data file {path!r} has {n} lines, fewer than days={days}")
            self.days = [(path,) + _slice(n, d, days) for d in range(days)]
        else:
            raise FileNotFoundError(f"data path {path!r} does not exist")
        if test_path is not None and os.path.exists(test_path):
            # A test file that is also a training day would test the model on what it just trained on.
            for p in {d[0] for d in self.days}:
                if os.path.samefile(p, test_path):
                    raise ValueError(f"test_path {test_path!r} is also a training day ({p!r}): the next-day test "
                                     "must be held out (move it out of the data directory)")
        self.test_path = test_path
        for p in sorted({d[0] for d in self.days} | ({test_path} if test_path else set())):
            check_file(self.parser, p)

    def num_days(self) -> Optional[int]:
        return len(self.days)

    def _day(self, day: int) -> Tuple[str, int, Optional[int]]:
        if not isinstance(day, int) or not 0 <= day < len(self.days):
            raise ValueError(f"day must be in [0, {len(self.days)}), got {day!r}")
        return self.days[day]

    def train_dataset(self, day: int, pass_index: int = 0, num_passes: int = 1, rank: int = 0, world_size: int = 1):
        _check_part(pass_index, num_passes, rank, world_size)
        path, start, stop = self._day(day)
        if num_passes > 1:
            if stop is None:
                stop = _count_lines(path)
            start, stop = (start + a for a in _slice(stop - start, pass_index, num_passes))
        return _FileDataset(self.parser, path, start, stop, self.batch_size, rank, world_size)

    def eval_dataset(self, day: int, rank: int = 0, world_size: int = 1):
        _check_part(0, 1, rank, world_size)
        if day + 1 < len(self.days):
            path, start, stop = self._day(day + 1)
        elif self.test_path:
            path, start, stop = self.test_path, 0, None
        else:
            return None
        return _FileDataset(self.parser, path, start, stop, self.batch_size, rank, world_size)


def _check_part(pass_index: int, num_passes: int, rank: int, world_size: int) -> None:
    if not isinstance(num_passes, int) or num_passes < 1:
        raise ValueError(f"num_passes must be an int >= 1, got {num_passes!r}")
    if not isinstance(pass_index, int) or not 0 <= pass_index < num_passes:
        raise ValueError(f"pass_index must be in [0, {num_passes}), got {pass_index!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")


# ------------------------------------------------------------------------------------------------ loading
def make_loader(dataset: IterableDataset, num_workers: int = 1) -> DataLoader:
    """A DataLoader over a source's dataset (the dataset batches; ``num_workers`` processes parse)."""
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    kw = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, **kw)


class BatchStream:
    """Iterates the batches of ``loader``, collecting the readers' bad-row counts.

    After the loop, ``bad_rows``, ``rows`` and ``examples`` hold the totals; :meth:`warn` issues one
    :class:`BadDataWarning` naming the first few bad rows (if any).
    """

    def __init__(self, loader) -> None:
        self.loader = loader
        self.bad_rows = 0
        self.rows = 0
        self.examples: List[str] = []

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for item in self.loader:
            if "labels" in item:
                yield item
            else:
                self.bad_rows += int(item["bad_rows"])
                self.rows += int(item["rows"])
                self.examples.extend(item["examples"][: _MAX_EXAMPLES - len(self.examples)])

    def warn(self, what: str = "data") -> None:
        if self.bad_rows:
            warnings.warn(
                f"{what}: skipped {self.bad_rows} bad row(s) of {self.bad_rows + self.rows}; first: "
                + " | ".join(self.examples),
                BadDataWarning,
                stacklevel=2,
            )
