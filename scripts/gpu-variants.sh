#!/usr/bin/env bash
# The runtime against the reference on every architecture variant's synthetic preset
# (random weights, real tensor layouts): each preset's runtime dump (BACKEND, f32) is
# diffed against the reference at N positions under the default tolerances, and the
# worst rel L2 is printed. Positions run past gemma3's sliding window (128 in
# gemma3-tiny, 512 in gemma3-270m). Needs no Rust toolchain: the release binary only.
#
#   RESBISECT=target/release/resbisect BACKEND=cuda N=1100 [PRESETS="..."] scripts/gpu-variants.sh
set -uo pipefail
bin="${RESBISECT:-target/release/resbisect}"
backend="${BACKEND:-cuda}"
n="${N:-1100}"
presets="${PRESETS:-llama3-tiny yarn-tiny linear-tiny qwen2-tiny qwen3-tiny gemma3-tiny llama3.2-1b qwen2.5-0.5b qwen3-0.6b gemma3-270m}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for p in $presets; do
  m="$work/$p.gguf"
  "$bin" synth --preset "$p" --quant q8_0 --seed 5 -o "$m" > /dev/null 2>&1 || { echo "$p: synth failed"; continue; }
  vocab="$("$bin" inspect "$m" | awk '$1 == "vocab" { print $2 }')"
  tokens="$(python3 -c "import random; r = random.Random(11); print(','.join(str(r.randrange(3, ${vocab:-256})) for _ in range($n)))")"
  # Real shapes: resid_post and logits only (gemma3-270m's logits are 262k wide).
  taps=all
  case "$p" in *-tiny) ;; *) taps=resid_post ;; esac
  for side in ref rt; do
    if [ "$side" = ref ]; then engine=(--engine reference); else engine=(--engine runtime --backend "$backend" --dtype f32); fi
    "$bin" dump "${engine[@]}" --model "$m" --tokens "$tokens" --layers all --taps "$taps" --positions all \
      -o "$work/$p-$side" > "$work/$p-$side.log" 2>&1 || { echo "$p: $side dump failed: $(tail -1 "$work/$p-$side.log")"; }
  done
  "$bin" diff "$work/$p-rt" "$work/$p-ref" > "$work/$p-diff.txt" 2>&1
  code=$?
  echo "$p ($n positions, taps $taps): diff exit $code | $(grep -E "no divergence|FIRST DIVERGENCE" "$work/$p-diff.txt" | head -1)"
  rm -rf "$work/$p-rt" "$work/$p-ref" "$m"
done
