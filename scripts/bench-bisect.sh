#!/usr/bin/env bash
# Benchmark: bisect's economy. A 22-layer TinyLlama-shaped synthetic model (Q4_K), a
# 1652-token prompt (fixed seed), the runtime with one injected fault; in the same run,
# `resbisect bisect` against an oracle, and the exhaustive alternative — both engines
# dump every tap of every layer at every position, then one diff. Prints and writes engine
# runs, bytes dumped and wall time of each (median of RUNS, default 3) to
# $OUT_DIR (default bench/results/)/bisect-<backend>-<dtype>-<oracle>-<date>.{json,md}.
# Targets: <= log2(22)+4 = 8.5 runs per engine; bisect <= 20% of the exhaustive wall time
# on the GPU (cuda, runtime oracle), <= 50% on 2 cores with the reference as oracle. The
# fault sits mid-prompt (position 826 of 1652): the coarse probe streams the prompt and
# stops soon after it, so bisect's cost follows the first divergent position.
#
# The oracle is the reference (ORACLE=reference, default), or the runtime on
# ORACLE_BACKEND/ORACLE_DTYPE without the fault (ORACLE=runtime: a known-good build).
# THREADS (default: every core) bounds the CPU threads of both approaches.
#
#   BACKEND=cuda ORACLE=runtime scripts/bench-bisect.sh                  # the GPU figure
#   BACKEND=cpu ORACLE=reference THREADS=2 scripts/bench-bisect.sh       # the 2-core figure
#   BACKEND=cpu|cuda DTYPE=f32 FAULT=blk.13.ffn_up:scale=1.05@826 ORACLE=reference RUNS=3 scripts/bench-bisect.sh
source "$(dirname "$0")/bench-setup.sh"
backend="${BACKEND:-cpu}"
dtype="${DTYPE:-f32}"
fault="${FAULT:-blk.13.ffn_up:scale=1.05@826}"
threads="${THREADS:-$(nproc)}"
export RAYON_NUM_THREADS="$threads"
oracle="${ORACLE:-reference}"
oracle_backend="${ORACLE_BACKEND:-$backend}"
oracle_dtype="${ORACLE_DTYPE:-f32}"
if [ "$oracle" = runtime ]; then
  oracle_args=(--oracle runtime --oracle-backend "$oracle_backend" --oracle-dtype "$oracle_dtype")
  oracle_dump=(--engine runtime --backend "$oracle_backend" --dtype "$oracle_dtype")
else
  oracle_args=(--oracle reference)
  oracle_dump=(--engine reference)
fi
synth="$work/tinyllama-q4_k.gguf"
[ -f "$synth" ] || "$bin" synth --preset tinyllama-1.1b --quant q4_k --seed 7 -o "$synth" 2>/dev/null
tokens="$(python3 -c "import random; r = random.Random(1652); print(','.join(str(r.randrange(3, 32000)) for _ in range(1652)))")"
suite="$work/prompt.jsonl"
echo "{\"id\": \"random_1652\", \"tokens\": [$tokens]}" > "$suite"
now() { date +%s.%N; }
# Kernels compile once per machine and storage dtype (NVRTC, cached on disk): not counted.
if [ "$backend" != cpu ]; then
  "$bin" dump --engine runtime --backend "$backend" --dtype "$dtype" --model "$synth" --tokens 1,2,3 --layers 0 -o "$work/warm-a" 2>/dev/null
  if [ "$oracle" = runtime ]; then
    "$bin" dump --engine runtime --backend "$oracle_backend" --dtype "$oracle_dtype" --model "$synth" --tokens 1,2,3 --layers 0 -o "$work/warm-b" 2>/dev/null
  fi
fi

# Each approach runs RUNS times, interleaved; the median counts. The exhaustive
# alternative runs both as a person would type it (dump A; dump B; diff) and with the two
# dumps at once, since bisect runs its engines at once.
runs="${RUNS:-3}"
: > "$work/times"
for i in $(seq "$runs"); do
  rm -rf "$work/bisect" "$work/all-a" "$work/all-b"
  t0=$(now)
  set +e
  "$bin" bisect --model "$synth" --prompts "$suite" --engine runtime --backend "$backend" --dtype "$dtype" \
    --inject "$fault" "${oracle_args[@]}" --work "$work/bisect" --json > "$work/bisect.json" 2> "$work/bisect.log"
  code=$?
  set -e
  t1=$(now)
  [ "$code" -eq 1 ] || { echo "bisect exited $code"; cat "$work/bisect.log"; exit 1; }
  dump_a() { "$bin" dump --engine runtime --backend "$backend" --dtype "$dtype" --model "$synth" --prompts "$suite" \
    --layers all --taps all --positions all --inject "$fault" -o "$work/all-a" 2>/dev/null; }
  dump_b() { "$bin" dump "${oracle_dump[@]}" --model "$synth" --prompts "$suite" --layers all --taps all --positions all -o "$work/all-b" 2>/dev/null; }
  diff_ab() { set +e; "$bin" diff "$work/all-a" "$work/all-b" --json > "$work/exhaustive.json"; set -e; }
  dump_a; dump_b; diff_ab
  t2=$(now)
  exhaustive_bytes=$(du -sb "$work/all-a" "$work/all-b" | awk '{s += $1} END {printf "%.0f", s}')
  rm -rf "$work/all-a" "$work/all-b"
  t3=$(now)
  dump_a & dump_b; wait
  diff_ab
  t4=$(now)
  echo "$t0 $t1 $t2 $t3 $t4" >> "$work/times"
done
python3 - "$work" "$exhaustive_bytes" "$fault" "$backend" "$dtype" "$oracle" <<'PY'
import datetime, json, math, os, statistics, sys
work, ex_bytes, fault, backend, dtype, oracle = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
times = [list(map(float, line.split())) for line in open(f"{work}/times")]
bisect_s = [t[1] - t[0] for t in times]
exhaustive_s = [t[2] - t[1] for t in times]
parallel_s = [t[4] - t[3] for t in times]
b = json.load(open(f"{work}/bisect.json"))
ex = json.load(open(f"{work}/exhaustive.json"))
ex_first = ex["prompts"][0]["first"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
try:
    import subprocess
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = ""
if gpu:
    cpu += f" + {gpu}"
res = {
    "date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} cores, {os.environ.get('RAYON_NUM_THREADS')} threads",
    "model": "synthetic tinyllama-1.1b shape (22 layers, n_embd 2048), Q4_K, seed 7", "tokens": 1652, "runs": len(times),
    "engine_a": b["engine_a"], "engine_b": b["engine_b"], "fault": fault,
    "bisect": {"runs_a": b["runs_a"], "runs_b": b["runs_b"], "bytes": b["bytes_dumped"], "seconds": statistics.median(bisect_s), "seconds_each": bisect_s,
               "first": [b["first"]["tap"], b["first"]["position"]], "prefix": b["prefix"],
               "probes": [[p["purpose"], p["tokens"], p.get("chunks", 1), round(p["seconds_a"], 2), round(p["seconds_b"], 2), round(p["seconds_diff"], 2), p["bytes_a"] + p["bytes_b"]] for p in b["probes"]],
               "seconds_replay": b["seconds_replay"], "seconds_in_search": b["seconds"]},
    "exhaustive": {"runs_a": 1, "runs_b": 1, "bytes": ex_bytes, "seconds": statistics.median(exhaustive_s), "seconds_each": exhaustive_s, "first": [ex_first["tap"], ex_first["position"]]},
    "exhaustive_at_once": {"seconds": statistics.median(parallel_s), "seconds_each": parallel_s},
}
res["time_ratio"] = res["bisect"]["seconds"] / res["exhaustive"]["seconds"]
res["time_ratio_at_once"] = res["bisect"]["seconds"] / res["exhaustive_at_once"]["seconds"]
res["bytes_ratio"] = res["bisect"]["bytes"] / res["exhaustive"]["bytes"]
budget = math.log2(22) + 4
os.makedirs(os.environ.get("OUT_DIR", "bench/results"), exist_ok=True)
stem = os.path.join(os.environ.get("OUT_DIR", "bench/results"), f"bisect-{backend}-{dtype}-{oracle}-{res['date']}")
json.dump(res, open(stem + ".json", "w"), indent=1)
bi, exh = res["bisect"], res["exhaustive"]
md = f"""# bisect economy, {res['date']}

Machine: {res['machine']}. {res['model']}, {res['tokens']}-token random prompt. Engine A: {res['engine_a']}; B: {res['engine_b']}.

| | runs per engine | bytes dumped | wall s | finds |
|---|---|---|---|---|
| bisect | {bi['runs_a']} (budget {budget:.1f}) | {bi['bytes']/2**20:.1f} MiB | {bi['seconds']:.2f} | {bi['first'][0]} @ {bi['first'][1]} |
| exhaustive dump-all + diff | 1 | {exh['bytes']/2**20:.1f} MiB | {exh['seconds']:.2f} | {exh['first'][0]} @ {exh['first'][1]} |
| exhaustive, both dumps at once | 1 | {exh['bytes']/2**20:.1f} MiB | {res['exhaustive_at_once']['seconds']:.2f} | |

Wall times are medians of {res['runs']} interleaved runs (each: bisect {[round(x, 2) for x in bi['seconds_each']]}, exhaustive {[round(x, 2) for x in exh['seconds_each']]}, at once {[round(x, 2) for x in res['exhaustive_at_once']['seconds_each']]}).
Bisect takes **{100*res['time_ratio']:.1f}%** of the exhaustive wall time (target <= {20 if backend != 'cpu' else 50}%; {100*res['time_ratio_at_once']:.1f}% of the exhaustive with both dumps at once) and dumps {100*res['bytes_ratio']:.2f}% of its bytes.

Probes (purpose, tokens, chunks streamed, seconds A, seconds B, seconds diff, bytes): {bi['probes']}
Of the bisect wall time, {bi['seconds_in_search']:.1f} s in the search itself (the rest is process start, model open and loading the reference) and {bi['seconds_replay']:.1f} s in local replay.
"""
open(stem + ".md", "w").write(md)
print(md)
PY
