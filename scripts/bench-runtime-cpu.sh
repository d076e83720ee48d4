#!/usr/bin/env bash
# Benchmark: the runtime's `cpu` backend on SmolLM2 — 1024-token prefill and 64-token
# greedy decode, tokens/s with no taps (`resbisect run`) and with every resid_post tap at
# every position (`resbisect dump --engine runtime`), next to the reference dumping the
# same taps, in the same run. Writes $OUT_DIR (default bench/results/)/runtime-cpu-<date>.{json,md}.
source "$(dirname "$0")/bench-setup.sh"
runs="${RUNS:-3}"
tokens="$(python3 -c "
import json
line = next(json.loads(l) for l in open('fixtures/prompts/long.jsonl') if json.loads(l)['id'] == 'long_2048')
print(','.join(map(str, line['tokens'][:1024])))")"
for i in $(seq "$runs"); do
  "$bin" run --model "$model" --tokens "$tokens" --max-tokens 64 2>> "$work/run.log" > /dev/null
  "$bin" dump --engine runtime --model "$model" --tokens "$tokens" --max-tokens 64 --layers all --taps resid_post --positions all -o "$work/rt" --overwrite 2>> "$work/dump.log"
  "$bin" dump --model "$model" --tokens "$tokens" --layers all --taps resid_post --positions all -o "$work/ref" --overwrite 2>> "$work/ref.log"
done
python3 - "$work" <<'PY'
import datetime, json, os, re, sys
work = sys.argv[1]
def nums(pattern, path):
    return [tuple(map(float, m)) for m in re.findall(pattern, open(path).read())]
runs = nums(r"prefill (\d+) tokens in ([\d.]+) s .*?; decode (\d+) tokens in ([\d.]+) s", f"{work}/run.log")
dumps = nums(r"\((\d+) prompt\(s\), (\d+) tokens; load ([\d.]+) s, compute ([\d.]+) s", f"{work}/dump.log")
refs = nums(r"\((\d+) prompt\(s\), (\d+) tokens; load ([\d.]+) s, compute ([\d.]+) s", f"{work}/ref.log")
best_run = min(runs, key=lambda r: r[1] + r[3])
no_taps_s = best_run[1] + best_run[3]
taps_s = min(d[3] for d in dumps)
ref_s = min(r[3] for r in refs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
res = {
  "date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} cores",
  "prefill_tokens": int(best_run[0]), "decode_tokens": int(best_run[2]),
  "runtime_no_taps": {"prefill_tok_s": best_run[0] / best_run[1], "decode_tok_s": best_run[2] / best_run[3], "total_s": no_taps_s},
  "runtime_all_resid_post": {"total_s": taps_s},
  "tap_overhead": taps_s / no_taps_s - 1,
  "reference_prefill_all_resid_post": {"tok_s": 1024 / ref_s, "s": ref_s},
}
out_dir = os.environ.get("OUT_DIR", "bench/results")
os.makedirs(out_dir, exist_ok=True)
stem = os.path.join(out_dir, f"runtime-cpu-{res['date']}")
json.dump(res, open(stem + ".json", "w"), indent=1)
md = f"""# runtime cpu benchmark, {res['date']}

Machine: {res['machine']}. SmolLM2-135M Q4_1, f32 storage, 1024-token prefill then 64 greedy tokens. Best of {len(runs)}.

| | prefill tok/s | decode tok/s | total s |
|---|---|---|---|
| runtime cpu, no taps | {res['runtime_no_taps']['prefill_tok_s']:.1f} | {res['runtime_no_taps']['decode_tok_s']:.1f} | {no_taps_s:.2f} |
| runtime cpu, all resid_post at all positions | | | {taps_s:.2f} |
| reference (prefill only), all resid_post | {1024/ref_s:.1f} | | {ref_s:.2f} |

Dumping every resid_post costs **{100*res['tap_overhead']:.1f}%** extra time (target <= 15%).
"""
open(stem + ".md", "w").write(md)
print(md)
PY
