#!/usr/bin/env bash
# Installs what torch_psembed needs into the current Python environment, then builds and installs the package
# from source (editable, so tests and the main job run against this checkout).
#
# torch is installed only when missing, pinned to 2.13.0: the CPU build on this project's machines, from their
# wheel cache; on stock PyPI for Linux x86_64 it may pull a multi-GB CUDA build. Set PYTHON to choose the
# interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] torch missing: installing torch==2.13.0"
  "$PY" -m pip install --quiet "torch==2.13.0"
fi

# Build tools (the same as pyproject's build-system.requires) and runtime/test dependencies.
"$PY" -m pip install --quiet "setuptools>=64" wheel pybind11 cmake ninja numpy tqdm matplotlib pytest
# Coverage-guided fuzzing (tests/test_fuzz.py); without it those tests fall back to seeded random mutation.
"$PY" -m pip install --quiet atheris || echo "[setup] atheris unavailable: fuzz tests use random mutation"

# --no-build-isolation: reuse the tools above instead of downloading them again into a throwaway environment.
"$PY" -m pip install --quiet --no-build-isolation --no-deps -e .
"$PY" -c "import torch_psembed as pse; print('[setup] torch_psembed', pse.__version__, 'ready')"
