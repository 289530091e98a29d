#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: Python tests, the C++ tests under ASan/UBSan and
# TSan (tests/test_sanitizers.py), and the multi-process tests on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
exec "$PY" -m pytest -q "$@"
