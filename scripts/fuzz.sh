#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz on nightly) for a fixed time each, one after
# another: `scripts/fuzz.sh [SECONDS] [JOBS]` (default 60 s and one process; .ci/run uses
# 60; a long run gives more, JOBS > 1 runs that many libFuzzer jobs per target at once, and
# FUZZ_SANITIZER=none builds without ASan, 5-6x faster, for execution counts). Slowness (-timeout) and memory (-rss_limit_mb) are findings, as
# crashes are; a finding fails the script and lands in fuzz/artifacts/<target>/.
# Corpora grow in fuzz/corpus/<target>/ (ignored) from the committed fuzz/seeds/<target>/
# (regenerate with scripts/fuzz_seeds.py; --big adds full-size inputs in fuzz/corpus-big/).
# Skips with one line, exit 0, when nightly Rust or cargo-fuzz is absent.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
jobs="${2:-1}"
sanitizer="${FUZZ_SANITIZER:-address}"
parallel=()
# libFuzzer's job mode also leaves each job's log in fuzz-<n>.log.
[ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: no nightly toolchain; fuzzing skipped"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz); fuzzing skipped"
  exit 0
fi
export ASAN_OPTIONS="${ASAN_OPTIONS:-malloc_context_size=0}"
targets=(gguf_model dump_read tolerances prompt_suite selection)
cargo +nightly fuzz build -s "$sanitizer" -a
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
  [ -d "fuzz/corpus-big/$t" ] && dirs+=("fuzz/corpus-big/$t")
  echo "+ fuzz $t for ${seconds}s"
  # Ten seconds for one input of a few hundred KB and 2 GB of memory are generous even
  # on a loaded machine: more is a finding. Leaks are not (tokenizers and rayon keep
  # process-wide caches), and checking them per input costs most of the time.
  log="$(mktemp)"
  set +e
  cargo +nightly fuzz run -s "$sanitizer" -a "$t" "${dirs[@]}" -- "${parallel[@]}" \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -detect_leaks=0 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  if [ "$jobs" -gt 1 ]; then
    # The parent process echoes each job's log; the per-job copies are not needed.
    rm -f fuzz-*.log fuzz/fuzz-*.log
    awk '/^stat::number_of_executed_units/ {n += $2} END {print "executions over all jobs: " n}' "$log"
  fi
  grep -E '^#[0-9]+ +DONE|^stat::number_of_executed_units|^stat::peak_rss_mb' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "scripts/fuzz.sh: $t found a failure (exit $rc; the input is in fuzz/artifacts/$t/)" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
done
