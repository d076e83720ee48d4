#!/usr/bin/env bash
# Benchmark: the reference on SmolLM2, a prompt of each of TOKENS (default 1024 and 4096)
# tokens, all resid_post taps at all positions — tokens/s and peak RSS — next to HF
# transformers (torch f32, output_hidden_states=True, same thread count) in the same run,
# with the machine's f32 GEMM rate as the ceiling: torch's, and candle's (the reference's
# former GEMM) and the reference's own (OpenBLAS when it loads: crates/reference/src/
# blas.rs; crates/reference/examples/gemm_rate.rs) when cargo is here. Runs on the
# project's .venv/ python (scripts/setup.sh) when there is one. Writes
# $OUT_DIR (default bench/results/)/reference-<tokens>-<date>.{json,md}.
#
#   THREADS=2 TOKENS="1024 4096" RUNS=3 scripts/bench-reference.sh
source "$(dirname "$0")/bench-setup.sh"
threads="${THREADS:-$(nproc)}"
runs="${RUNS:-3}"
python3() { if [ -x "$root/.venv/bin/python" ]; then "$root/.venv/bin/python" "$@"; else command python3 "$@"; fi; }
python3 -c "import torch, transformers, gguf, accelerate" 2>/dev/null || python3 -m pip install --quiet torch transformers gguf accelerate numpy
export RAYON_NUM_THREADS="$threads"
for n_tokens in ${TOKENS:-1024 4096}; do
python3 - "$work/suite.jsonl" "$n_tokens" <<'PY'
import json, sys
n = int(sys.argv[2])
line = next(json.loads(l) for l in open("fixtures/prompts/long.jsonl") if json.loads(l)["id"] == "long_4096")
json.dump({"id": f"bench_{n}", "tokens": line["tokens"][:n]}, open(sys.argv[1], "w"))
PY
: > "$work/candle_gemm"
if [ -z "${RESBISECT:-}" ]; then
  cargo run --release --quiet -p resbisect-reference --example gemm_rate -- "$n_tokens" 576 1536 > "$work/candle_gemm"
fi
ours=()
rm -rf "$work/dump"
for i in $(seq "$runs"); do
  /usr/bin/time -f "%M" -o "$work/rss" "$bin" dump --model "$model" \
    --prompts "$work/suite.jsonl" --layers all --taps resid_post --positions all -o "$work/dump" --overwrite 2> "$work/log"
  line="$(grep wrote "$work/log")"
  ours+=("$(echo "$line" | sed -E 's/.*load ([0-9.]+) s, compute ([0-9.]+) s.*/\1 \2/') $(cat "$work/rss")")
done
printf '%s\n' "${ours[@]}" > "$work/ours.txt"
du -sb "$work/dump" | cut -f1 > "$work/bytes"
python3 - "$work" "$threads" "$runs" <<'PY'
import json, os, platform, resource, subprocess, sys, time, datetime
import torch
work, threads, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
from transformers import AutoModelForCausalLM
tokens = json.load(open(f"{work}/suite.jsonl"))["tokens"]
n = len(tokens)
model = AutoModelForCausalLM.from_pretrained("fixtures/models", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()
ids = torch.tensor([tokens])
hf = []
with torch.no_grad():
    for _ in range(runs):
        t = time.perf_counter(); model(ids, output_hidden_states=True); hf.append(time.perf_counter() - t)
hf_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# f32 GEMM ceiling at this thread count, on the model's MLP shape: torch's, and candle's.
a, b = torch.randn(n, 576), torch.randn(576, 1536)
best = 1e9
for _ in range(10):
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
gflops = 2 * n * 576 * 1536 / best / 1e9
candle = open(f"{work}/candle_gemm").read().split()
candle_gflops = float(candle[3]) if candle else None
blas_gflops = float(candle[4]) if candle else None
cfg = dict(n_layer=30, n_embd=576, n_head=9, n_kv=3, n_ff=1536, vocab=49152)
hd = 64
per_layer = 2 * n * cfg["n_embd"] * (cfg["n_embd"] + 2 * cfg["n_kv"] * hd + cfg["n_embd"] + 3 * cfg["n_ff"]) + 2 * 2 * cfg["n_head"] * hd * n * (n + 1) / 2
body_flop = cfg["n_layer"] * per_layer
ceiling_tps = gflops * 1e9 / (body_flop / n)
ours = [tuple(map(float, l.split())) for l in open(f"{work}/ours.txt")]
best_ours = min(ours, key=lambda r: r[1])
ours_tps = n / best_ours[1]
ours_e2e_tps = n / (best_ours[0] + best_ours[1])
hf_tps = n / min(hf)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
res = {
  "date": datetime.date.today().isoformat(), "machine": f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
  "threads": threads, "prompt_tokens": n, "taps": "resid_post x 30 layers x all positions",
  "dump_bytes": int(open(f"{work}/bytes").read()),
  "resbisect": {"compute_s": best_ours[1], "load_s": best_ours[0], "tokens_per_s": ours_tps, "tokens_per_s_incl_load": ours_e2e_tps, "peak_rss_mib": best_ours[2] / 1024},
  "hf_transformers": {"forward_s": min(hf), "tokens_per_s": hf_tps, "peak_rss_mib": hf_rss_kb / 1024, "torch": torch.__version__},
  "gemm_ceiling": {"gflops": gflops, "tokens_per_s": ceiling_tps, "candle_gflops": candle_gflops,
                   "candle_tokens_per_s": candle_gflops * 1e9 / (body_flop / n) if candle_gflops else None,
                   "reference_gflops": blas_gflops,
                   "reference_tokens_per_s": blas_gflops * 1e9 / (body_flop / n) if blas_gflops else None},
  "ratio_vs_hf": ours_tps / hf_tps,
}
gemm_note = "OpenBLAS" if "note: the reference's f32 GEMMs" not in open(f"{work}/log").read() else "candle's: no OpenBLAS loaded"
res["gemm_ceiling"]["reference_gemm"] = gemm_note
host = platform.node() or "host"
out_dir = os.environ.get("OUT_DIR", "bench/results")
os.makedirs(out_dir, exist_ok=True)
stem = os.path.join(out_dir, f"reference-{n}-{res['date']}")
json.dump(res, open(stem + ".json", "w"), indent=1)
md = f"""# reference benchmark, {res['date']}

Machine: {res['machine']}; {threads} threads. SmolLM2-135M Q4_1, {n}-token prompt, {res['taps']} ({res['dump_bytes']/1e6:.1f} MB dumped).

| engine | tokens/s | peak RSS |
|---|---|---|
| resbisect reference (forward + dump) | {ours_tps:.1f} | {best_ours[2]/1024:.0f} MiB |
| resbisect reference incl. weight load | {ours_e2e_tps:.1f} | |
| HF transformers f32, output_hidden_states | {hf_tps:.1f} | {hf_rss_kb/1024:.0f} MiB |
| f32 GEMM ceiling, torch ({gflops:.1f} GFLOP/s) | {ceiling_tps:.1f} | |
| f32 GEMM ceiling, candle ({candle_gflops or float('nan'):.1f} GFLOP/s) | {(candle_gflops or float('nan')) * 1e9 / (body_flop / n):.1f} | |
| f32 GEMM ceiling, the reference's GEMM ({blas_gflops or float('nan'):.1f} GFLOP/s; {gemm_note}) | {(blas_gflops or float('nan')) * 1e9 / (body_flop / n):.1f} | |

Ratio resbisect / HF: **{ours_tps/hf_tps:.2f}x** (target >= {1.3 if n <= 1024 else 1.0}). Best of {runs} runs each.
"""
open(stem + ".md", "w").write(md)
print(md)
PY
done
