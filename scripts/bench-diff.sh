#!/usr/bin/env bash
# Benchmark: `resbisect diff` on a >= 2 GB dump pair (SmolLM2, 2048-token prompt, every
# tap of every layer, positions all; one side with an injected fault), reported as GB/s
# of dump data compared and peak RSS, next to a plain read of the same files in the same
# run (page cache warm for both). Writes $OUT_DIR (default bench/results/)/diff-<date>.{json,md}.
source "$(dirname "$0")/bench-setup.sh"
grep '"id": "long_2048"' fixtures/prompts/long.jsonl > "$work/suite.jsonl"
for side in clean injected; do
  inject=()
  [ "$side" = injected ] && inject=(--inject "blk.12.attn:scale=1.01@1500")
  "$bin" dump --model "$model" --prompts "$work/suite.jsonl" --layers all --taps all --positions all -o "$work/$side" "${inject[@]}" 2>/dev/null
done
bytes=$(find "$work/clean" "$work/injected" -name '*.safetensors' -printf '%s\n' | python3 -c 'import sys; print(sum(int(l) for l in sys.stdin))')
read_once() { find "$work/clean" "$work/injected" -name '*.safetensors' -print0 | xargs -0 cat > /dev/null; }
read_once  # warm the page cache for both measurements
t0=$(date +%s.%N); read_once; t1=$(date +%s.%N)
set +e
/usr/bin/time -f "%e %M" -o "$work/time" "$bin" diff "$work/injected" "$work/clean" > "$work/summary.txt"
code=$?
set -e
t2=$(date +%s.%N); read_once; t3=$(date +%s.%N)
python3 - "$bytes" "$t0" "$t1" "$t2" "$t3" "$work/time" "$code" "$work/summary.txt" <<'PY'
import datetime, json, os, sys
bytes_, t0, t1, t2, t3 = int(sys.argv[1]), *map(float, sys.argv[2:6])
secs, rss_kb = open(sys.argv[6]).read().split()[-2:]
code = int(sys.argv[7])
summary = open(sys.argv[8]).read()
read_s = min(t1 - t0, t3 - t2)
diff_s = float(secs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
res = {
  "date": datetime.date.today().isoformat(),
  "machine": f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
  "dump_pair_bytes": bytes_, "plain_read_s": read_s, "plain_read_gb_s": bytes_ / read_s / 1e9,
  "diff_s": diff_s, "diff_gb_s": bytes_ / diff_s / 1e9, "diff_peak_rss_mib": int(rss_kb) / 1024,
  "ratio_vs_plain_read": (bytes_ / diff_s) / (bytes_ / read_s), "diff_exit_code": code,
  "found": next((l.strip() for l in summary.splitlines() if "FIRST DIVERGENCE" in l), None),
}
out_dir = os.environ.get("OUT_DIR", "bench/results")
os.makedirs(out_dir, exist_ok=True)
stem = os.path.join(out_dir, f"diff-{res['date']}")
json.dump(res, open(stem + ".json", "w"), indent=1)
md = f"""# diff benchmark, {res['date']}

Machine: {res['machine']}. Dump pair: SmolLM2, 2048 tokens, all taps x 30 layers x all positions,
{bytes_/1e9:.2f} GB in total (page cache warm).

| | seconds | GB/s | peak RSS |
|---|---|---|---|
| plain read of both dumps (cat) | {read_s:.2f} | {res['plain_read_gb_s']:.2f} | |
| resbisect diff | {diff_s:.2f} | {res['diff_gb_s']:.2f} | {res['diff_peak_rss_mib']:.0f} MiB |

Diff throughput is **{100*res['ratio_vs_plain_read']:.0f}%** of the plain read (target >= 70%).
Found: {res['found']}
"""
open(stem + ".md", "w").write(md)
print(md)
PY
