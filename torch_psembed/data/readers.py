"""Row parsers for the Criteo format and the slot format, and batch assembly.

Criteo (tab-separated, 40 columns): ``label I1..I13 C1..C26``. Each of the 39 feature columns is a slot:
an integer ``v`` is bucketed by log2 (``v.bit_length()`` for ``v > 0``, ``v`` itself for ``v <= 0``), a
categorical is read as a hex number (or hashed with blake2b when it is not one), an empty field is its slot's
"missing" value; each value is then hashed with its slot into a 64-bit feasign
(:func:`torch_psembed.data.hashing.feasigns`).

Slot format (fields separated by spaces or tabs): ``click show slot:feasign slot:feasign ...``; the label is
``click > 0``, a slot may hold any number of feasigns (the bag is sum-pooled), feasigns are unsigned 64-bit
decimals used as they are.

Fields are strict, the same in both formats and in the C++ fast path: an integer (a Criteo integer column, a
slot id, a feasign) is ASCII digits, with an optional leading ``-`` where negatives are allowed (no ``+``,
spaces, underscores or non-ASCII digits, which Python's ``int`` would take); a categorical is hex only when it
is 1 to 16 ASCII hex digits (``"0x1f"``, ``"+1f"``, ``" 1f"``, ``"1_f"``, ``"-0"`` are not hex, so they are
hashed). Only ``\\n`` ends a line (a ``\\r\\n`` ending is accepted); a ``\\r`` inside a line makes it a bad row,
so a file with CR line endings reads as one bad line instead of rows cut in odd places.

A parser turns one line into ``(label, slot_indices, values)`` or raises ``ValueError`` with the reason;
the dataset counts and skips such rows. ``CriteoParser.parse_lines`` parses many lines at once: the common
lines in C++ (``_C.parse_criteo``, ~30x faster), every other line with ``parse``, which stays the one
definition of the format.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import _is_int
from .hashing import feasigns, hash_string

__all__ = ["CriteoParser", "SlotParser", "make_parser", "assemble", "assemble_criteo"]

# The "missing" value of a slot (an empty field). A categorical's hex value spans all of uint64, so the id
# "8000000000000000" reads as this same value and shares its slot's missing feasign; the C++ fast path
# (csrc/data/criteo_line.cc, kCriteoMissing) does the same, so both paths agree. It is inherent to reading
# 16 hex digits as a 64-bit value and kept: changing it would change every stored feasign of such an id.
_MISSING = 1 << 63
_INT_OFFSET = 1 << 33
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_SLOT_SEP = re.compile(r"[ \t]+")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")  # click, show: ASCII, >= 0
_CR_REASON = "carriage return (\\r) inside the line: only \\n ends a line (CR line endings?)"


def _strip_line_end(line: str) -> str:
    """``line`` without its ending (``\\n``, ``\\r\\n``; like the C++ fast path, any run of ``\\r``/``\\n`` at the
    end); raises ``ValueError`` for a ``\\r`` left inside, which a text-mode reader would have taken for a line end."""
    s = line.rstrip("\r\n")
    if "\r" in s:
        raise ValueError(_CR_REASON)
    return s


def _is_decimal(s: str) -> bool:
    """ASCII digits only (``str.isdigit`` alone also takes other scripts' digits)."""
    return s.isascii() and s.isdigit()


def _is_signed_decimal(s: str) -> bool:
    """An optional ``-``, then ASCII digits (``int()`` alone would also take "+5", " 5", "1_000", "\u0663")."""
    return _is_decimal(s[1:] if s[:1] == "-" else s)


class CriteoParser:
    """Parses Criteo lines: label, 13 integer and 26 categorical columns -> 39 slots, one feasign each."""

    name = "criteo"
    num_int = 13
    num_cat = 26
    num_slots = 39

    def parse(self, line: str) -> Tuple[float, Optional[List[int]], List[int]]:
        f = _strip_line_end(line).split("\t")
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
            if not _is_signed_decimal(s):  # as the C++ path
                raise ValueError(f"integer column I{i + 1} is not an integer: {s[:20]!r}")
            try:
                v = int(s)
            except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
                raise ValueError(f"integer column I{i + 1} has too many digits: {s[:20]!r}...") from None
            if v < -_INT_OFFSET:  # v + offset would be negative: no slot value
                raise ValueError(f"integer column I{i + 1} is below -2**33: {s[:20]!r}")
            values[i] = (v.bit_length() if v > 0 else v) + _INT_OFFSET
        for j in range(26):
            s = f[14 + j]
            if s == "":
                values[13 + j] = _MISSING
                continue
            # 1 to 16 ASCII hex digits, as the C++ path; int(s, 16) alone would also take "0x1f", "+1f", " 1f",
            # "1_f", "-0": those are not hex ids, so they are hashed like any other string
            values[13 + j] = int(s, 16) if _HEX.fullmatch(s) else hash_string(s)
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
        if isinstance(slots, (str, bytes)) or not all(_is_int(s) for s in slots):  # int(1.7) would be slot 1
            raise ValueError(f"slots must be a list of integer slot ids, got {slots!r}")
        slots = [int(s) for s in slots]
        if not slots or len(set(slots)) != len(slots):
            raise ValueError(f"slots must be a non-empty list of distinct slot ids, got {slots!r}")
        self.slots = slots
        self.index = {s: i for i, s in enumerate(slots)}
        self.num_slots = len(slots)

    def parse(self, line: str) -> Tuple[float, Optional[List[int]], List[int]]:
        s = _strip_line_end(line).strip(" \t")
        f = _SLOT_SEP.split(s) if s else []  # spaces and tabs only: str.split() also splits at "\x1c", "\u2028"...
        if len(f) < 2:
            raise ValueError(f"expected 'click show slot:feasign ...', got {len(f)} fields")
        if not (_NUMBER.fullmatch(f[0]) and _NUMBER.fullmatch(f[1])):
            raise ValueError(f"click and show must be numbers >= 0, got {f[0][:20]!r} {f[1][:20]!r}")
        click = float(f[0])
        show = float(f[1])
        if not (math.isfinite(click) and math.isfinite(show)):  # "1e999"
            raise ValueError(f"click and show must be finite, got {f[0][:20]!r} {f[1][:20]!r}")
        idx: List[int] = []
        vals: List[int] = []
        for tok in f[2:]:
            s, sep, fs = tok.partition(":")
            if not sep:
                raise ValueError(f"expected slot:feasign, got {tok[:30]!r}")
            if not (_is_signed_decimal(s) and _is_decimal(fs)):
                raise ValueError(f"slot and feasign must be integers, got {tok[:30]!r}")
            if len(fs.lstrip("0")) > 20:  # more digits than 2**64 - 1 (and than int() may convert)
                raise ValueError(f"feasign must be in [0, 2**64), got {fs[:30]!r}")
            try:
                slot = int(s)
            except ValueError:  # more digits than int() converts
                raise ValueError(f"slot {s[:30]!r} is not one of the configured slots") from None
            v = int(fs)
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
        if slots is not None:  # Criteo's 39 columns are its slots; a list given would be ignored
            raise ValueError(f"slots apply to the slot format, not to criteo (its 39 columns), got {slots!r}")
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
