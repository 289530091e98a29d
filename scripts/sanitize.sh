#!/usr/bin/env bash
# Builds psembed_core and the C++ tests under ASan+UBSan and under TSan (gcc -fsanitize), runs them,
# and fails on any sanitizer report or test failure. "pyasan" builds the Python extension itself (the
# pybind11 bindings included) under ASan+UBSan and drives it with part of the Python suite.
#
#   scripts/sanitize.sh                   # all three
#   scripts/sanitize.sh asan|tsan|pyasan  # one
#
# Build trees: build/sanitize-{asan,tsan,pyasan} (incremental). ~3-4 min on 2 cores from cold.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
TESTS=(crc32_test file_syncer_test hash_test thread_pool_test hash_index_test chunk_arena_test sparse_table_test push_merge_test load_test criteo_line_test data_server_test)
WHICH="${1:-all}"

REPORT_RE="ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi

run_one() {
  local name="$1" flags="$2"
  local dir="$ROOT/build/sanitize-$name"
  echo "== $name: -fsanitize=$flags ($dir)"
  if [[ -f "$dir/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${GEN[1]:-Unix Makefiles}" "$dir/CMakeCache.txt"; then
    rm -rf "$dir"
  fi
  cmake -S "$ROOT" -B "$dir" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="-O1" \
    -DPSEMBED_BUILD_PYTHON=OFF -DPSEMBED_BUILD_TESTS=ON -DPSEMBED_SANITIZE="$flags" >/dev/null
  cmake --build "$dir" -j "$JOBS" -- >/dev/null
  for t in "${TESTS[@]}"; do
    local log="$dir/$t.log"
    echo "-- $name $t"
    if ! "$dir/$t" >"$log" 2>&1; then
      cat "$log"
      echo "FAILED: $name $t (exit status above)" >&2
      exit 1
    fi
    if grep -qE "$REPORT_RE" "$log"; then
      cat "$log"
      echo "FAILED: $name $t printed a sanitizer report" >&2
      exit 1
    fi
  done
}

# The Python tests that drive the sanitized extension: the ones that call into C++ most, in one process (the
# multi-process tests would only repeat these paths, slower), and the fuzz targets' saved inputs and bounded
# runs (test_fuzz.py: its in-process replays use the sanitized build).
PY_TESTS=(tests/test_table_api.py tests/test_table_numerics.py tests/test_autograd.py tests/test_embedding.py
          tests/test_checkpoint_bulk.py tests/test_checkpoint_load.py tests/test_data.py tests/test_data_plane.py
          tests/test_fuzz.py)
# Left out: the tests whose DataLoader forks worker processes. Under ASan one of them hung once in six runs,
# parent and worker each waiting for the other in torch's multiprocessing queues (not seen without ASan).
PY_DESELECT=(test_data.py::test_synthetic_split_over_ranks_workers_and_passes_is_a_partition
             test_data.py::test_criteo_file_batches_are_the_same_by_lines_or_in_bulk
             test_data.py::test_file_days_passes_and_ranks)

run_python() {
  local dir="$ROOT/build/sanitize-pyasan" py="${PYTHON:-python3}" cxx="${CXX:-c++}"
  local site="$dir/site"
  echo "== pyasan: the extension under -fsanitize=address,undefined, driven by pytest ($dir)"
  cmake -S "$ROOT" -B "$dir" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS="-O1" \
    -DPSEMBED_BUILD_PYTHON=ON -DPSEMBED_BUILD_TESTS=OFF -DPSEMBED_SANITIZE="address,undefined" \
    -DPython_EXECUTABLE="$(command -v "$py")" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$site/torch_psembed" >/dev/null
  cmake --build "$dir" -j "$JOBS" --target _C -- >/dev/null
  # The package's Python files beside the sanitized _C, first on PYTHONPATH (ahead of any installed build).
  (cd "$ROOT" && find torch_psembed -name '*.py' -print0 | xargs -0 -I{} install -D -m 644 {} "$site/{}")
  rm -f "$dir"/report.*
  # python itself is not instrumented: libasan goes first by LD_PRELOAD, with libstdc++ (ASan intercepts
  # __cxa_throw only if libstdc++ is there when it starts), and leak checking is off (the interpreter keeps
  # its allocations to the end). pytest runs with -s so that a report on stderr reaches the log.
  local -a env=(LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)"
                PYTHONPATH="$site"
                ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$dir/report"
                UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$dir/report")
  # Run from $dir: `python -m` puts the working folder first on sys.path, and the checkout's own
  # torch_psembed/ would win there.
  cd "$dir"
  env "${env[@]}" "$py" -c "import sys, torch_psembed as p; sys.exit(0 if p.__file__.startswith('$site') else \
    'pyasan: imported ' + p.__file__ + ', not the sanitized build')"
  local rc=0
  local -a deselect=()
  for t in "${PY_DESELECT[@]}"; do deselect+=(--deselect "tests/$t"); done  # node ids: relative to --rootdir
  env "${env[@]}" "$py" -m pytest -q -s -p no:cacheprovider --rootdir "$ROOT" --basetemp "$dir/tmp" \
    "${deselect[@]}" "${PY_TESTS[@]/#/$ROOT/}" \
    >"$dir/pytest.log" 2>&1 || rc=$?
  cd "$ROOT"
  if compgen -G "$dir/report.*" >/dev/null || grep -qE "$REPORT_RE" "$dir/pytest.log"; then
    cat "$dir"/report.* 2>/dev/null || true
    grep -E -A30 "$REPORT_RE" "$dir/pytest.log" | head -80
    echo "FAILED: pyasan printed a sanitizer report" >&2
    exit 1
  fi
  if [[ $rc -ne 0 ]]; then
    tail -40 "$dir/pytest.log"
    echo "FAILED: pyasan pytest exit status $rc" >&2
    exit 1
  fi
  tail -1 "$dir/pytest.log"
}

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:${TSAN_OPTIONS:-}"

case "$WHICH" in
  all) run_one asan "address,undefined"; run_one tsan "thread"; run_python ;;
  asan) run_one asan "address,undefined" ;;
  tsan) run_one tsan "thread" ;;
  pyasan) run_python ;;
  *) echo "usage: $0 [all|asan|tsan|pyasan]" >&2; exit 2 ;;
esac
echo "sanitize: all clean"
