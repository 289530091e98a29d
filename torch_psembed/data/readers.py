"""Row parsers for the Criteo format and the slot format, and batch assembly.

Criteo (tab-separated, 40 columns): ``label I1..I13 C1..C26``. Each of the 39 feature columns is a slot:
an integer ``v`` is bucketed by log2 (``v.bit_length()`` for ``v > 0``, ``v`` itself for ``v <= 0``), a
categorical is read as a hex number (or hashed with blake2b when it is not one), an empty field is its slot's
"missing" value; each value is then hashed with its slot into a 64-bit feasign
(:func:`torch_psembed.data.hashing.feasigns`).

Slot format (whitespace-separated): ``click show slot:feasign slot:feasign ...``; the label is ``click > 0``,
a slot may hold any number of feasigns (the bag is sum-pooled), feasigns are unsigned 64-bit decimals used as
they are.

A parser turns one line into ``(label, slot_indices, values)`` or raises ``ValueError`` with the reason;
the dataset counts and skips such rows. ``CriteoParser.parse_lines`` parses many lines at once: the common
lines in C++ (``_C.parse_criteo``, ~30x faster), every other line with ``parse``, which stays the one
definition of the format.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .hashing import feasigns, hash_string

__all__ = ["CriteoParser", "SlotParser", "make_parser", "assemble", "assemble_criteo"]

_MISSING = 1 << 63
_INT_OFFSET = 1 << 33


class CriteoParser:
    """Parses Criteo lines: label, 13 integer and 26 categorical columns -> 39 slots, one feasign each."""

    name = "criteo"
    num_int = 13
    num_cat = 26
    num_slots = 39

    def parse(self, line: str) -> Tuple[float, Optional[List[int]], List[int]]:
        f = line.rstrip("\r\n").split("\t")
        if len(f) != 40:
            raise ValueError(f"expected 40 tab-separated columns, got {len(f)}")
        lab = f[0]
        if lab == "0":
            label = 0.0
        elif lab == "1":
            label = 1.0
        else:
            raise ValueError(f"label must be 0 or 1, got {lab[:20]!r}")
        values = [0] * 39
        for i in range(13):
            s = f[1 + i]
            if s == "":
                values[i] = _MISSING
                continue
            try:
                v = int(s)
            except ValueError:
                raise ValueError(f"integer column I{i + 1} is not an integer: {s[:20]!r}") from None
            if v < -_INT_OFFSET:  # v + offset would be negative: no slot value
                raise ValueError(f"integer column I{i + 1} is below -2**33: {s[:20]!r}")
            values[i] = (v.bit_length() if v > 0 else v) + _INT_OFFSET
        for j in range(26):
            s = f[14 + j]
            if s == "":
                values[13 + j] = _MISSING
                continue
            v = -1
            if len(s) <= 16:
                try:
                    v = int(s, 16)
                except ValueError:
                    v = -1
            values[13 + j] = v if v >= 0 else hash_string(s)
        return label, None, values

    def parse_lines(self, lines: List[str]) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[Tuple[int, str]]]:
        """Parse many lines: ``(labels float32[n], values uint64[n, 39], good bool[n], errors)``, where
        ``errors`` lists ``(i, reason)`` for each line ``parse`` refuses (its row in ``labels``/``values`` is
        then meaningless). The same values as ``parse``, line by line."""
        from .. import _C

        labels, values, ok = _C.parse_criteo(lines)
        good = ok.astype(bool)
        errors: List[Tuple[int, str]] = []
        for i in np.flatnonzero(~good).tolist():  # bad or unusual lines: the Python parser decides
            try:
                label, _, vals = self.parse(lines[i])
            except ValueError as e:
                errors.append((i, str(e)))
                continue
            labels[i] = label
            values[i] = vals
            good[i] = True
        return labels, values, good, errors


class SlotParser:
    """Parses ``click show slot:feasign ...`` lines; ``slots`` lists the slot ids in bag order."""

    name = "slot"

    def __init__(self, slots: Sequence[int]) -> None:
        slots = [int(s) for s in slots]
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be a non-empty list of distinct slot ids, got {slots!r}")
        self.slots = slots
        self.index = {s: i for i, s in enumerate(slots)}
        self.num_slots = len(slots)

    def parse(self, line: str) -> Tuple[float, Optional[List[int]], List[int]]:
        f = line.split()
        if len(f) < 2:
            raise ValueError(f"expected 'click show slot:feasign ...', got {len(f)} fields")
        try:
            click = float(f[0])
            show = float(f[1])
        except ValueError:
            raise ValueError(f"click and show must be numbers, got {f[0][:20]!r} {f[1][:20]!r}") from None
        if not (click >= 0 and show >= 0):
            raise ValueError(f"click and show must be >= 0, got {f[0]!r} {f[1]!r}")
        idx: List[int] = []
        vals: List[int] = []
        for tok in f[2:]:
            s, sep, fs = tok.partition(":")
            if not sep:
                raise ValueError(f"expected slot:feasign, got {tok[:30]!r}")
            try:
                slot = int(s)
                v = int(fs)
            except ValueError:
                raise ValueError(f"slot and feasign must be integers, got {tok[:30]!r}") from None
            if not 0 <= v < 2**64:
                raise ValueError(f"feasign must be in [0, 2**64), got {fs[:30]!r}")
            i = self.index.get(slot)
            if i is None:
                raise ValueError(f"slot {slot} is not one of the configured slots")
            idx.append(i)
            vals.append(v)
        return (1.0 if click > 0 else 0.0), idx, vals


def make_parser(fmt: str, slots: Optional[Sequence[int]] = None):
    """The parser of format ``fmt`` (``"criteo"`` or ``"slot"``; the slot format needs ``slots``)."""
    if fmt == "criteo":
        return CriteoParser()
    if fmt == "slot":
        if slots is None:
            raise ValueError("the slot format needs slots (a list of slot ids)")
        return SlotParser(slots)
    raise ValueError(f"format must be 'criteo' or 'slot', got {fmt!r}")


def assemble(parser, rows: List[Tuple[float, Optional[List[int]], List[int]]]) -> Dict[str, torch.Tensor]:
    """A batch dict from parsed rows: labels ``(B,)``, keys ``(N,)``, offsets ``(B*S,)``, slots ``(N,)``."""
    B = len(rows)
    S = parser.num_slots
    labels = np.fromiter((r[0] for r in rows), dtype=np.float32, count=B)
    if isinstance(parser, CriteoParser):
        return assemble_criteo(labels, np.array([r[2] for r in rows], dtype=np.uint64).reshape(B, S))
    n = [len(r[2]) for r in rows]
    sample = np.repeat(np.arange(B, dtype=np.int64), n)
    slot_idx = np.fromiter((i for r in rows for i in r[1]), dtype=np.int64, count=len(sample))
    vals = np.fromiter((v for r in rows for v in r[2]), dtype=np.uint64, count=len(sample))
    order = np.lexsort((slot_idx, sample))  # by sample, then slot; stable within a bag
    bag = sample[order] * S + slot_idx[order]
    counts = np.bincount(bag, minlength=B * S)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    keys = vals[order].view(np.int64)
    key_slots = slot_idx[order].astype(np.int32)
    return {
        "labels": torch.from_numpy(labels),
        "keys": torch.from_numpy(np.ascontiguousarray(keys)),
        "offsets": torch.from_numpy(offsets),
        "slots": torch.from_numpy(np.ascontiguousarray(key_slots)),
    }


def assemble_criteo(labels: np.ndarray, values: np.ndarray) -> Dict[str, torch.Tensor]:
    """A batch dict (as :func:`assemble`) from Criteo rows: ``labels`` float32 ``(B,)``, slot ``values`` uint64
    ``(B, 39)``; one feasign per slot, so ``offsets`` is ``arange(B * 39)``."""
    B, S = values.shape
    slots = np.broadcast_to(np.arange(S, dtype=np.uint64), (B, S))
    keys = feasigns(values, slots).reshape(-1)
    return {
        "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
        "keys": torch.from_numpy(np.ascontiguousarray(keys)),
        "offsets": torch.from_numpy(np.arange(B * S, dtype=np.int64)),
        "slots": torch.from_numpy(np.tile(np.arange(S, dtype=np.int32), B)),
    }
