#!/usr/bin/env bash
# Builds psembed_core and the C++ tests under ASan+UBSan and under TSan (gcc -fsanitize), runs them,
# and fails on any sanitizer report or test failure.
#
#   scripts/sanitize.sh            # both
#   scripts/sanitize.sh asan|tsan  # one
#
# Build trees: build/sanitize-asan, build/sanitize-tsan (incremental). ~2-3 min on 2 cores from cold.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
TESTS=(crc32_test file_syncer_test hash_test thread_pool_test hash_index_test chunk_arena_test sparse_table_test push_merge_test load_test criteo_line_test data_server_test)
WHICH="${1:-all}"

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
    if grep -qE "ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:|WARNING: ThreadSanitizer" "$log"; then
      cat "$log"
      echo "FAILED: $name $t printed a sanitizer report" >&2
      exit 1
    fi
  done
}

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:halt_on_error=1:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:${UBSAN_OPTIONS:-}"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:${TSAN_OPTIONS:-}"

case "$WHICH" in
  all) run_one asan "address,undefined"; run_one tsan "thread" ;;
  asan) run_one asan "address,undefined" ;;
  tsan) run_one tsan "thread" ;;
  *) echo "usage: $0 [all|asan|tsan]" >&2; exit 2 ;;
esac
echo "sanitize: all clean"
