#!/usr/bin/env bash
# Longer coverage-guided fuzzing campaign of the targets in tests/fuzz/ (the test suite runs a short bounded one).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=300] [TARGET...]   targets: checkpoint push_pull server data_plane (default: all)
#
# Uses atheris (pip install atheris) with libFuzzer flags; without atheris, the seeded random-mutation loop.
# Findings do not stop the run (PSE_FUZZ_COLLECT): one input per distinct (exception type, innermost frame)
# not already among tests/fuzz/regressions/<target>/ (PSE_FUZZ_KNOWN) is written to build/fuzz/findings/<target>/; new coverage-increasing inputs go to build/fuzz/corpus/<target>/.
# Turn each finding into a regression: copy it to tests/fuzz/regressions/<target>/<descriptive-name> and it is
# replayed by tests/test_fuzz.py::test_saved_input from then on.
#
# Environment: SEED (default: the time), JOBS (parallel libFuzzer jobs per target, default 1).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SECS=${1:-300}
shift || true
TARGETS=("$@")
[[ ${#TARGETS[@]} -eq 0 ]] && TARGETS=(checkpoint push_pull server data_plane)
SEED=${SEED:-$(date +%s)}
JOBS=${JOBS:-1}
JOBFLAGS=()
[[ $JOBS -gt 1 ]] && JOBFLAGS=(-jobs="$JOBS" -workers="$JOBS")  # libFuzzer then logs to fuzz-N.log
declare -A MAXLEN=([checkpoint]=16384 [push_pull]=4096 [server]=4096 [data_plane]=4096)
status=0

have_atheris=0
"$PY" -c "import atheris" >/dev/null 2>&1 && have_atheris=1

for t in "${TARGETS[@]}"; do
  script=tests/fuzz/fuzz_$t.py
  [[ -f $script ]] || { echo "no target $t ($script)" >&2; exit 2; }
  out=build/fuzz/corpus/$t
  found=build/fuzz/findings/$t
  art=build/fuzz/artifacts/$t
  mkdir -p "$out" "$found" "$art"
  echo "== fuzz $t for ${SECS}s (seed $SEED, $([[ $have_atheris == 1 ]] && echo atheris || echo random-mutation))"
  if [[ $have_atheris == 1 ]]; then
    PSE_FUZZ_COLLECT="$found" PSE_FUZZ_KNOWN="tests/fuzz/regressions/$t" OMP_NUM_THREADS=1 \
      timeout $((SECS + 120)) "$PY" "$script" atheris \
      -max_total_time="$SECS" -seed="$SEED" -max_len="${MAXLEN[$t]}" -timeout=30 -rss_limit_mb=4096 \
      ${JOBFLAGS[@]+"${JOBFLAGS[@]}"} -print_final_stats=1 -artifact_prefix="$art/" \
      "$out" "tests/fuzz/corpus/$t" 2>&1 | grep -v "^#\|^INFO: Instrumenting" | tail -40
    rc=${PIPESTATUS[0]}
  else
    # ~100 inputs/s: a run count that fits the time budget
    PSE_FUZZ_COLLECT="$found" PSE_FUZZ_KNOWN="tests/fuzz/regressions/$t" OMP_NUM_THREADS=1 \
      timeout $((SECS + 120)) "$PY" "$script" random \
      --runs=$((SECS * 100)) --seed="$SEED" --corpus="tests/fuzz/corpus/$t" --corpus="$out" --artifacts="$art"
    rc=$?
  fi
  n=$(find "$found" "$art" -type f | wc -l)
  echo "== $t: exit $rc, $n finding(s) in $found $art"
  [[ $rc -ne 0 || $n -ne 0 ]] && status=1
done
exit $status
