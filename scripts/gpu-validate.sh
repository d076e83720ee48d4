#!/usr/bin/env bash
# Validation of the GPU backends on a machine with a GPU and a Rust toolchain: the runtime
# suite stamped per backend (tests/integration/backends.rs: reference match in f32, f16
# and bf16, decode = prefill, chunked prefill, the crash path with and without
# --sync-check, checkpoint-served prefixes, recorded decode = issued ops, selftest), then
# the long op self-test in every storage dtype. Numbers go to docs/validation.md.
#
#   BACKEND=cuda|hip OUT_DIR=... [FEATURES=hip] scripts/gpu-validate.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
backend="${BACKEND:-cuda}"
out="${OUT_DIR:-$root/target/gpu-validate}"
mkdir -p "$out"
cd "$root"
features=()
[ -n "${FEATURES:-}" ] && features=(--features "$FEATURES")
cargo test --release "${features[@]}" --test integration -- backends:: --nocapture > "$out/backends.txt" 2>&1
echo "backends suite: exit $? ($(grep -E '^test result' "$out/backends.txt" | tail -1))"
grep -E "^skipped" "$out/backends.txt" | sort | uniq -c
for d in f32 f16 bf16; do
  target/release/resbisect selftest --backend "$backend" --dtype "$d" --long > "$out/selftest-$d.txt" 2>&1
  echo "selftest --long $backend $d: exit $? ($(tail -1 "$out/selftest-$d.txt"))"
done
