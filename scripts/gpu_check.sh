#!/usr/bin/env bash
# The checks that need a CUDA device, for a machine that has one and already has torch (it installs nothing,
# so it also runs where no package index can be reached). CI has no GPU; run this by hand where one is lent.
#
#   bash scripts/gpu_check.sh [LOG_DIR]
#
# 1. builds the extension in place with that machine's Python (the core needs no torch to build);
# 2. runs the tests that skip without a GPU (ids, offsets and the dense part on CUDA, torchrun included);
# 3. runs the rest of the Python suite with the GPU visible, since nothing else may behave differently when
#    torch sees one. The sanitizer builds (tests/test_sanitizers.py) are left to scripts/test.sh: they test the
#    C++ core, which no GPU touches.
# Logs go to LOG_DIR (default: the current folder). Exit status: 0 all passed, 1 a build or test failed,
# 2 no CUDA device.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${1:-.}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
# Subprocesses (torchrun workers, the main job) import the in-place build from here.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi -L || true
"$PY" - <<'EOF' || exit 2
import sys, torch, numpy
print("python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__,
      "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to check here")
print("device 0:", torch.cuda.get_device_name(0))
EOF

echo "[gpu_check] building in place"
if ! CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" setup.py -q build_ext --inplace >"$LOG/build.log" 2>&1; then
  tail -40 "$LOG/build.log"
  exit 1
fi

rc=0
echo "[gpu_check] the tests that need a GPU"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_embedding_device.py \
  "tests/test_train_e2e.py::test_device_is_checked_when_the_config_loads" \
  "tests/test_train_e2e.py::test_dense_part_on_a_gpu_learns_like_on_the_cpu_and_resumes" \
  "tests/test_train_e2e.py::test_torchrun_two_processes_with_the_dense_part_on_a_gpu" \
  2>&1 | tee "$LOG/gpu_tests.log" || rc=1

echo "[gpu_check] the rest of the Python suite, with the GPU visible"
"$PY" -m pytest -q -rs -p no:cacheprovider --ignore tests/test_sanitizers.py \
  --deselect tests/test_embedding_device.py \
  --deselect "tests/test_train_e2e.py::test_dense_part_on_a_gpu_learns_like_on_the_cpu_and_resumes" \
  --deselect "tests/test_train_e2e.py::test_torchrun_two_processes_with_the_dense_part_on_a_gpu" \
  2>&1 | tee "$LOG/suite.log" || rc=1
exit $rc
