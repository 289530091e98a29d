"""Feature hashing for the readers and the simulator: values -> 64-bit feasigns.

These hashes only name features (a value of a slot becomes a feasign); they are not the table's routing hash
(that one is ``_C.mix64`` and lives in C++). They are frozen all the same: saved tables are keyed by them.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["mix64", "slot_salt", "feasigns", "hash_string", "uniform01", "normal"]

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on a uint64 array (wrapping arithmetic). Returns a new uint64 array."""
    z = np.array(x, dtype=np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z ^= z >> _S30
        z *= _M1
        z ^= z >> _S27
        z *= _M2
        z ^= z >> _S31
    return z


def slot_salt(slots: np.ndarray) -> np.ndarray:
    """A per-slot 64-bit salt: ``mix64(slot * golden + 1)``."""
    s = np.asarray(slots, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix64(s * _GOLDEN + np.uint64(1))


def feasigns(values: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """Feasigns (as int64, the table's id dtype) of uint64 ``values`` in ``slots`` (broadcast together)."""
    v = np.asarray(values, dtype=np.uint64)
    return mix64(v ^ slot_salt(slots)).view(np.int64)


def hash_string(s: str) -> int:
    """A stable 64-bit hash of a string (blake2b), for values that are not hex numbers."""
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def uniform01(h: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 from the top 53 bits of uint64 hashes."""
    return (np.asarray(h, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


def normal(h: np.ndarray) -> np.ndarray:
    """Standard normal float64 from uint64 hashes (Box-Muller over two 32-bit halves)."""
    h = np.asarray(h, dtype=np.uint64)
    u1 = ((h >> np.uint64(32)).astype(np.float64) + 0.5) * (1.0 / 4294967296.0)
    u2 = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * (1.0 / 4294967296.0)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
