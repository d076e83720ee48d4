#!/usr/bin/env bash
# Builds the in-tree llama.cpp engine (engines/llamacpp/) into target/llamacpp/:
# the llama.cpp source pinned by the llama-cpp-python sdist on PyPI (vendor/llama.cpp),
# built as static libraries with cmake, then the adapter linked against them.
# CPU-only by default; LLAMACPP_CUDA=1 adds -DGGML_CUDA=ON (sm_90, the GPU machine).
# Idempotent: a stamp of the pin, the flags and the adapter sources skips finished steps.
# Needs Python 3 with pip, a C/C++ compiler and cmake; without cmake on PATH it installs
# the PyPI cmake wheel into target/llamacpp/tools (the registry is the only network used).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
pin="llama-cpp-python==0.3.36"
out="$root/target/llamacpp"
jobs="${LLAMACPP_JOBS:-$(nproc)}"
cuda="${LLAMACPP_CUDA:-0}"
mkdir -p "$out"

cmake_bin="$(command -v cmake || true)"
if [ -z "$cmake_bin" ]; then
  tools="$out/tools"
  # A venv is not relocatable: one copied from another checkout's target/ is rebuilt.
  if ! "$tools/bin/cmake" --version >/dev/null 2>&1; then
    rm -rf "$tools"
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check --only-binary :all: cmake
  fi
  cmake_bin="$tools/bin/cmake"
fi

# 1. The pinned source.
src="$out/src/vendor/llama.cpp"
if [ ! -f "$out/src/.pin" ] || [ "$(cat "$out/src/.pin")" != "$pin" ]; then
  rm -rf "$out/src"
  mkdir -p "$out/sdist" "$out/src"
  rm -f "$out"/sdist/*.tar.gz
  # --no-binary on the package alone: with :all: pip would also build the sdist's build
  # backend dependencies (cmake, ninja) from source just to read its metadata.
  python3 -m pip download --quiet --no-cache-dir --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    -d "$out/sdist" "$pin"
  tar -xzf "$out"/sdist/*.tar.gz -C "$out/src" --strip-components=1
  echo "$pin" > "$out/src/.pin"
fi

# 2. libllama + ggml (static, so the adapter is one self-contained binary).
build="$out/build-$([ "$cuda" = 1 ] && echo cuda || echo cpu)"
flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
  -DGGML_NATIVE=ON -DGGML_OPENMP=OFF
  # Native, but never AMX: a Xeon's CPUID can list AMX that its VM does not enable, and a
  # native build then dies of SIGILL in the first matmul (measured: every llama.cpp test
  # crashed on such a 2-core CI machine). GCC keeps explicit -mno- flags over -march.
  "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
if [ "$cuda" = 1 ]; then
  # One GPU: without NCCL, which ggml-cuda would otherwise link where it finds it and the
  # static adapter then cannot resolve (measured on the H200 machine, which has NCCL).
  flags+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NCCL=OFF)
fi
lib_stamp="$build/.resbisect-stamp"
lib_want="$pin ${flags[*]}"
if [ ! -f "$lib_stamp" ] || [ "$(cat "$lib_stamp")" != "$lib_want" ]; then
  "$cmake_bin" -S "$src" -B "$build" "${flags[@]}" > "$build.configure.log" 2>&1 ||
    { tail -30 "$build.configure.log"; exit 1; }
  "$cmake_bin" --build "$build" --target llama -j "$jobs" > "$build.build.log" 2>&1 ||
    { tail -30 "$build.build.log"; exit 1; }
  echo "$lib_want" > "$lib_stamp"
fi

# 3. The adapter.
adapter="$out/resbisect-llamacpp$([ "$cuda" = 1 ] && echo -cuda || true)"
"$cmake_bin" -S "$root/engines/llamacpp" -B "$build/adapter" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_SRC="$src" -DLLAMA_BUILD="$build" -DRESBISECT_INCLUDE="$root/include" \
  -DLLAMACPP_PIN="$pin" -DLLAMACPP_CUDA="$cuda" > "$build/adapter.configure.log" 2>&1 ||
  { tail -30 "$build/adapter.configure.log"; exit 1; }
"$cmake_bin" --build "$build/adapter" -j "$jobs" > "$build/adapter.build.log" 2>&1 ||
  { tail -30 "$build/adapter.build.log"; exit 1; }
cp "$build/adapter/resbisect-llamacpp" "$adapter.tmp" && mv "$adapter.tmp" "$adapter"
echo "llama.cpp engine ready: $adapter"
