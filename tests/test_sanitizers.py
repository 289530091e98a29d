"""Runs scripts/sanitize.sh: the C++ core and its tests under ASan+UBSan and under TSan, and the Python
extension itself (the bindings included) under ASan+UBSan and under TSan, driven by part of the Python suite
("pyasan", "pytsan").

Part of the default test run (marked slow: ~1-2 minutes each on 2 cores from a cold build, seconds to
a minute when the build trees build/sanitize-asan and build/sanitize-tsan are warm; "asan" and "pyasan" share
the first, "tsan" and "pytsan" the second). Skipped only when no C++ compiler or cmake exists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _missing_tools() -> list[str]:
    missing = []
    if not (shutil.which("g++") or shutil.which("c++")):
        missing.append("a C++ compiler (g++)")
    if not shutil.which("cmake"):
        missing.append("cmake")
    return missing


@pytest.mark.slow
@pytest.mark.parametrize("which", ["asan", "tsan", "pyasan", "pytsan"])
def test_core_is_clean_under_sanitizers(which):
    missing = _missing_tools()
    if missing:
        pytest.skip("sanitizer build needs " + " and ".join(missing) + ", not found on PATH")
    env = dict(os.environ)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", "2")
    env["PYTHON"] = sys.executable  # pyasan/pytsan build and drive the extension for this interpreter
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "sanitize.sh"), which],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"sanitize.sh {which} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    assert "all clean" in proc.stdout
