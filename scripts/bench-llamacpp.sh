#!/usr/bin/env bash
# Benchmark on one NVIDIA GPU (H200: CUDA arch 90) in one device call: llama.cpp CUDA
# against the runtime's `cuda` backend on the same two GGUF files, in the same run.
#  1. Builds llama-bench and llama-quantize from the llama.cpp source the lead provides
#     (gpu-bin/llama.cpp.tar.gz: the llama-cpp-python==0.3.36 sdist's vendor/llama.cpp),
#     `-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90`, unless LLAMA_BIN names a built bin/.
#  2. Writes a random TinyLlama-shaped HF checkpoint (22 layers, 2048, 32/4 heads, ff 5632,
#     vocab 32000; a 512-piece SentencePiece tokenizer trained here, padded to 32000 by the
#     converter), converts it with llama.cpp's convert_hf_to_gguf.py to F16, and quantizes
#     that with llama-quantize to Q4_K_M.
#  3. Runs `llama-bench -fa 1` (pp512, pp2048, tg128, and tg128 at depth 512) and
#     `resbisect run --backend cuda --dtype f16` (--weights native) on the same work (the
#     decode from an empty cache: a 1-token prompt; at depth 512: the 512-token prompt)
#     on both files, and prints the ratios.
#     HF transformers (torch f16, sdpa attention) prefills the F16 file's weights beside them.
#  4. cuda vs reference at 2048 positions on the Q4_K_M file (resid_post of every layer
#     and logits, `resbisect diff`).
# Needs python3 with torch, transformers, sentencepiece, numpy and gguf (or the source's
# gguf-py); cmake, nvcc. Writes $OUT_DIR/llamacpp-cuda.{txt,md} (default bench/results/).
#
# The sdist's vendor/llama.cpp without models/, docs/, benches/, media/ and tests/ is 11 MB
# as a tar.gz, small enough to carry to the GPU machine.
#
#   RESBISECT=gpu-bin/resbisect LLAMA_TGZ=gpu-bin/llama.cpp.tar.gz OUT_DIR=$OUT scripts/bench-llamacpp.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${RESBISECT:-$root/target/release/resbisect}"
tgz="${LLAMA_TGZ:-$root/gpu-bin/llama.cpp.tar.gz}"
out="${OUT_DIR:-$root/bench/results}"
py="${PYTHON:-python3}"
work="${WORK:-$(mktemp -d)}"
mkdir -p "$out" "$work"
log="$out/llamacpp-cuda.txt"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
trap 'echo "failed at line $LINENO"; tail -n 15 "$work"/*.log 2>/dev/null' ERR
"$py" -c "import torch, transformers, sentencepiece, numpy" || { echo "python3 lacks torch/transformers/sentencepiece/numpy"; exit 2; }

# 1. llama.cpp, built here (about 4 minutes on 16 cores), in the background while step 2 runs.
src="$work/llama.cpp"
# A WORK dir kept from an earlier call (same machine) keeps its build and its files.
[ -z "${LLAMA_BIN:-}" ] && [ -x "$src/build/bin/llama-bench" ] && LLAMA_BIN="$src/build/bin"
if [ -z "${LLAMA_BIN:-}" ]; then
  tar xzf "$tgz" -C "$work"
  ( cmake -S "$src" -B "$src/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DCMAKE_BUILD_TYPE=Release > "$work/cmake.log" 2>&1 &&
    cmake --build "$src/build" -j "$(nproc)" --target llama-bench llama-quantize >> "$work/cmake.log" 2>&1 ) &
  build_pid=$!
  LLAMA_BIN="$src/build/bin"
else
  [ -f "$src/convert_hf_to_gguf.py" ] || tar xzf "$tgz" -C "$work"
  build_pid=
fi

# 2. A random TinyLlama-shaped checkpoint and its tokenizer, then llama.cpp's converter.
hf="$work/hf"
if [ ! -f "$work/tl-q4_k_m.gguf" ]; then
"$py" - "$hf" <<'PY'
import shutil, sys, random, torch, sentencepiece as spm
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
rng = random.Random(7)
words = ["layer", "token", "model", "tensor", "kernel", "block", "scale", "value", "query", "key", "norm", "the", "of", "and"]
text = "\n".join(" ".join(rng.choice(words) + rng.choice(["", "s", "ed", "ing"]) for _ in range(12)) for _ in range(4000))
open(f"{out}.txt", "w").write(text)
spm.SentencePieceTrainer.train(input=f"{out}.txt", model_prefix=f"{out}-spm", vocab_size=512, model_type="bpe",
                               byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
with torch.no_grad():  # weights of a trained model's magnitude, so Q4_K_M stays meaningful
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.02)
model.to(torch.float16).save_pretrained(out, safe_serialization=True)
# The converter reads a SentencePiece vocabulary from tokenizer.model (transformers 5
# saves only tokenizer.json, from which it would build a 3-token vocabulary).
shutil.copy(f"{out}-spm.model", f"{out}/tokenizer.model")
PY
export PYTHONPATH="$src/gguf-py${PYTHONPATH:+:$PYTHONPATH}"
"$py" "$src/convert_hf_to_gguf.py" "$hf" --outtype f16 --outfile "$work/tl-f16.gguf" > "$work/convert.log" 2>&1 ||
  { tail -20 "$work/convert.log"; exit 1; }
rm -rf "$hf"
if [ -n "$build_pid" ]; then wait "$build_pid" || { tail -30 "$work/cmake.log"; exit 1; }; fi
"$LLAMA_BIN/llama-quantize" "$work/tl-f16.gguf" "$work/tl-q4_k_m.gguf" Q4_K_M > "$work/quantize.log" 2>&1 ||
  { tail -20 "$work/quantize.log"; exit 1; }
fi
if [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; then wait "$build_pid" || { tail -30 "$work/cmake.log"; exit 1; }; fi
"$bin" inspect "$work/tl-q4_k_m.gguf" | grep -E "^types" | sed 's/^/q4_k_m /' | tee -a "$log"
# A device call's time limit may not hold the build and the benchmarks: PREPARE_ONLY=1 stops
# here, and a second call with the same WORK (same machine) runs the rest.
if [ "${PREPARE_ONLY:-0}" = 1 ]; then say "prepared: llama.cpp and both files in $work"; exit 0; fi

# 3. Same files, same run.
"$py" -c "import random; r = random.Random(2048); print(','.join(str(r.randrange(3, 32000)) for _ in range(2048)))" > "$work/t2048"
cut -d, -f1-512 "$work/t2048" > "$work/t512"
# llama-bench's tg128 decodes 128 tokens into an empty KV cache (positions 0..127); at
# depth 512 (-d 512) after 512 cached positions. Ours: 128 tokens after a 1-token prompt,
# and after the 512-token prompt.
for q in f16 q4_k_m; do
  m="$work/tl-$q.gguf"
  for args in "-p 512,2048 -n 128" "-p 0 -n 128 -d 512"; do
    # shellcheck disable=SC2086 # the options split into words on purpose
    "$LLAMA_BIN/llama-bench" -m "$m" -ngl 99 -fa 1 $args -r 3 -o csv 2>>"$work/llama-bench.log" |
      awk -F, -v q="$q" '{ gsub(/"/, "") } NR == 1 { for (i = 1; i <= NF; i++) c[$i] = i; next }
        { print "LLAMA", q, $c["n_prompt"], $c["n_gen"], $c["n_depth"], $c["avg_ts"] }' | tee -a "$log"
  done
  cut -d, -f1 "$work/t2048" > "$work/t1"
  for n in 1 512 2048; do
    mt=128; [ "$n" -eq 2048 ] && mt=0
    for i in 1 2 3; do
      r="$("$bin" run --backend cuda --dtype f16 --model "$m" --tokens "$(cat "$work/t$n")" --max-tokens "$mt" --ignore-eos --warmup 1 2>&1 >/dev/null | tail -1)"
      say "RESBISECT $q $n $r"
    done
  done
done

# HF transformers (torch f16, sdpa) on the F16 file, same GPU, same run: issue 19's other
# prefill peer.
"$py" "$root/scripts/bench_hf_runtime.py" "$work/tl-f16.gguf" "$work/t2048" 8 2>"$work/hf.log" | tee -a "$log" ||
  say "HF FAILED: $(tail -n 1 "$work/hf.log")"

# 4. cuda (native quantized path) against the reference at 2048 positions, Q4_K_M
#    (AGREEMENT=0 skips it: a minute of the reference on the CPU).
if [ "${AGREEMENT:-1}" != 0 ]; then
rm -rf "$work/rt" "$work/ref"
"$bin" dump --engine runtime --backend cuda --dtype f16 --model "$work/tl-q4_k_m.gguf" --tokens "$(cat "$work/t2048")" \
  --layers all --taps resid_post,logits --positions all -o "$work/rt" 2>>"$work/dump.log"
"$bin" dump --engine reference --model "$work/tl-q4_k_m.gguf" --tokens "$(cat "$work/t2048")" \
  --layers all --taps resid_post,logits --positions all -o "$work/ref" 2>>"$work/dump.log"
set +e
"$bin" diff "$work/rt" "$work/ref" > "$work/diff.txt" 2>&1; code=$?
set -e
say "AGREEMENT q4_k_m 2048 positions: diff exit $code"
grep -E "FIRST|no divergence|result|note" "$work/diff.txt" | head -5 | tee -a "$log"
fi

"$py" - "$log" <<'PY' | tee "${log%.txt}.md"
import json, re, statistics, sys
llama, rb, hf = {}, {}, {}
for line in open(sys.argv[1]):
    if line.startswith("HF {"):
        hf = json.loads(line[3:])
    f = line.split()
    if f[:1] == ["LLAMA"]:
        q, npp, ng, depth, ts = f[1], int(f[2]), int(f[3]), int(f[4]), float(f[5])
        test = f"pp{npp}" if ng == 0 else f"tg{ng}"
        llama[(q, test + (f"@d{depth}" if depth else ""))] = ts
    m = re.match(r"RESBISECT (\S+) (\d+) prefill (\d+) tokens in ([\d.]+) s .*decode (\d+) tokens in ([\d.]+) s", line)
    if m:
        q, n = m[1], int(m[2])
        if n > 1:
            rb.setdefault((q, f"pp{n}"), []).append(int(m[3]) / float(m[4]))
        if int(m[5]) > 0:
            # After a 1-token prompt the cache is as empty as llama-bench's tg128's.
            test = "tg128" if n == 1 else f"tg128@d{n}"
            rb.setdefault((q, test), []).append(int(m[5]) / float(m[6]))
# Our three runs count by their median; llama-bench reports the mean of its three.
rb = {k: statistics.median(v) for k, v in rb.items()}
print("| file | test | llama.cpp tok/s | resbisect tok/s | ratio | target |\n|---|---|---|---|---|---|")
target = {("q4_k_m", "tg128"): 1.3, ("f16", "tg128"): 1.1, ("q4_k_m", "pp2048"): 1.5, ("f16", "pp2048"): 1.5}
for q in ["q4_k_m", "f16"]:
    for t in ["pp512", "pp2048", "tg128", "tg128@d512"]:
        a, b = llama.get((q, t), float("nan")), rb.get((q, t), float("nan"))
        print(f"| {q} | {t} | {a:.0f} | {b:.0f} | {b / a:.3f}x | {target.get((q, t), '')} |")
if hf:
    a, b = hf["prefill_2048_tok_s"], rb.get(("f16", "pp2048"), float("nan"))
    print(f"\n| file | test | HF transformers f16 sdpa tok/s | resbisect tok/s | ratio | target |\n|---|---|---|---|---|---|")
    print(f"| f16 | pp2048 | {a:.0f} | {b:.0f} | {b / a:.3f}x | 1.0 |")
    print(f"\nHF: {hf['weights']}, torch {hf['torch']}")
PY
rm -rf "$work/rt" "$work/ref"
