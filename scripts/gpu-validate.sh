#!/usr/bin/env bash
# Validation of the `cuda` backend on a GPU machine (numbers go to docs/validation.md):
# selftest in every storage dtype, runtime vs reference at 2048 positions on a
# TinyLlama-shaped Q4_K model, a SmolLM2-shaped Q4_1 model and (with REAL_CUT) real SmolLM2
# weights in f32 and f16 storage, and the injected out-of-bounds fault on the device
# (partial dump, failed manifest, exit 3), with and without --sync-check.
#
#   RESBISECT=path/to/resbisect OUT_DIR=... [REAL_CUT=cut.gguf] [SELFTEST_DTYPES="f32 f16"]
#   [SELFTEST_ARGS=""  (default --long)] scripts/gpu-validate.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${RESBISECT:-$root/target/release/resbisect}"
out="${OUT_DIR:-$root/out/gpu-validate}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
for d in ${SELFTEST_DTYPES:-f32 f16 bf16}; do
  "$bin" selftest --backend cuda --dtype "$d" ${SELFTEST_ARGS---long} > "$out/selftest-$d.txt" 2>&1
  echo "selftest $d: exit $? ($(tail -1 "$out/selftest-$d.txt"))"
done
python3 -c "import random; r = random.Random(2048); print(','.join(str(r.randrange(3, 32000)) for _ in range(2048)))" > "$work/tokens"
t="$(cat "$work/tokens")"
sel=(--layers all --taps embed,resid_post,final_norm,logits --positions all)
models=()
for spec in "tinyllama-1.1b q4_k" "smollm2-135m q4_1"; do
  read -r preset quant <<< "$spec"
  "$bin" synth --preset "$preset" --quant "$quant" --seed 5 -o "$work/$preset.gguf" 2>/dev/null
  models+=("$preset:$quant synthetic:$work/$preset.gguf")
done
# REAL_CUT: real weights — `resbisect cut` of the SmolLM2 fixture (the whole file does not
# travel to a GPU machine).
[ -n "${REAL_CUT:-}" ] && models+=("smollm2-real-cut:$(basename "$REAL_CUT"):$REAL_CUT")
for entry in "${models[@]}"; do
  IFS=: read -r name what m <<< "$entry"
  "$bin" dump --engine reference --model "$m" --tokens "$t" "${sel[@]}" -o "$work/ref-$name" 2>> "$out/log.txt"
  for d in f32 f16; do
    "$bin" dump --engine runtime --backend cuda --dtype "$d" --model "$m" --tokens "$t" "${sel[@]}" -o "$work/rt-$name-$d" 2>> "$out/log.txt"
    "$bin" diff "$work/rt-$name-$d" "$work/ref-$name" > "$out/diff-$name-$d.txt" 2>&1
    echo "$name ($what) cuda $d vs reference f32, 2048 positions: exit $? — $(grep -E 'no divergence|FIRST' "$out/diff-$name-$d.txt" | head -1)"
  done
done
m="$work/smollm2-135m.gguf"
"$bin" dump --engine runtime --backend cuda --sync-check --model "$m" --tokens "$t" "${sel[@]}" --inject blk.3.attn:oob@5 -o "$work/crash" > "$out/oob.txt" 2>&1
echo "oob: exit $?" | tee -a "$out/oob.txt"
"$bin" inspect "$work/crash" >> "$out/oob.txt" 2>&1
python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('manifest status', m['status'], 'error', m['error'])" "$work/crash/manifest.json" >> "$out/oob.txt"
"$bin" diff "$work/crash" "$work/ref-smollm2-135m" >> "$out/oob.txt" 2>&1
echo "diff of the partial dump: exit $?" >> "$out/oob.txt"
cat "$out/oob.txt" | grep -E "exit|status|error|note" | head
# The same fault without sync checks: taps leave the device asynchronously, the error
# shows at a later call, and every tap that came off the device before the fault lands.
"$bin" dump --engine runtime --backend cuda --model "$m" --tokens "$t" "${sel[@]}" --inject blk.3.attn:oob@5 -o "$work/crash-async" > "$out/oob-async.txt" 2>&1
echo "oob without --sync-check: exit $?" | tee -a "$out/oob-async.txt"
python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print('manifest status', m['status'], 'error', m['error'])" "$work/crash-async/manifest.json" | tee -a "$out/oob-async.txt"
