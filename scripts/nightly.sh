#!/usr/bin/env bash
# Nightly job: dump a prompt suite with the engine under test and with the reference,
# write the day's report (JSON, Markdown, HTML), append the verdicts to a history and
# rebuild the trend page. Exit code: 0 clean, 1 divergence, 2/3 as resbisect's.
#
#   scripts/nightly.sh [SUITE.jsonl] [OUT_DIR]
#
# ENGINE_ARGS selects the engine under test (default: the runtime on the `cpu` backend with
# an injected long-context fault past position 826, so the job has something to find
# without a GPU; `--engine runtime --backend cuda` on a GPU machine);
# SELECT_ARGS the layers/taps/positions; RUN names the run (default: today's date).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
suite="${1:-$root/fixtures/prompts/long.jsonl}"
out="${2:-$root/out/nightly}"
run="${RUN:-$(date -u +%Y-%m-%d)}"
model="${MODEL:-$root/fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
read -r -a engine <<< "${ENGINE_ARGS:---engine runtime --backend cpu --inject blk.4.attn:scale=1.05@826}"
read -r -a select <<< "${SELECT_ARGS:---layers 0,1,2,4,8,16,29 --taps resid_post,attn,logits --positions all}"
"$root/scripts/fetch-models.sh" >/dev/null
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
bin="$root/target/release/resbisect"
day="$out/$run"
mkdir -p "$day"
"$bin" dump "${engine[@]}" --model "$model" --prompts "$suite" "${select[@]}" -o "$day/engine" --overwrite || [ $? -eq 3 ]
"$bin" dump --engine reference --model "$model" --prompts "$suite" "${select[@]}" -o "$day/reference" --overwrite
set +e
"$bin" report diff "$day/engine" "$day/reference" -o "$day/report" --history "$out/history.jsonl" --run "$run"
verdict=$?
set -e
"$bin" report trend "$out/history.jsonl" -o "$out/trend" > /dev/null
echo "report: $day/report/report.html  trend: $out/trend/trend.html"
exit "$verdict"
