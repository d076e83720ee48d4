#!/usr/bin/env bash
# Everything the test suite needs beyond Rust, on a fresh machine: the fixture model
# (scripts/fetch-models.sh), the llama.cpp engine (scripts/build-llamacpp.sh) and a
# project virtualenv .venv/ holding the pinned Python packages of
# scripts/requirements.txt (torch, transformers, gguf, safetensors, numpy) that
# scripts/dump_hf.py and the third-party-writer test run on.
# It also puts OpenBLAS (PyPI's scipy-openblas32 wheel, built for every x86 CPU) into
# .venv/, where the reference loads it at run time for its f32 GEMMs (crates/reference/
# src/blas.rs); without it the reference runs on candle's slower GEMM.
# Idempotent: a .venv/ made from the same requirements file is kept as it is.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
"$root/scripts/fetch-models.sh"
# The in-tree llama.cpp engine (CPU; its tests fail in CI without it). Idempotent.
"$root/scripts/build-llamacpp.sh"

venv="$root/.venv"
req="$root/scripts/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$( (cat "$req" "$root/scripts/torch_cpu_stubs.py") | sha256sum | cut -d' ' -f1)"
# Pinned apart from requirements.txt, so that adding it keeps an existing .venv/.
openblas="scipy-openblas32==0.3.34.481.3"
install_openblas() {
  "$venv/bin/python" -m pip show scipy-openblas32 2>/dev/null | grep -qx "Version: ${openblas#*==}" \
    || "$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps --only-binary :all: "$openblas"
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  install_openblas
  echo "python venv present: $venv"
  exit 0
fi

rm -rf "$venv"
python3 -m venv "$venv"
# --no-deps: the file is the whole closure; torch's own dependency list would pull
# the ~5.6 GB of nvidia-* CUDA libraries the tests never use (they run torch on the CPU).
# --no-cache-dir: the wheels (torch's alone is ~0.9 GB) are not kept a second time in
# pip's cache; a CI machine once ran out of disk here.
"$venv/bin/python" -m pip install --quiet --no-cache-dir --disable-pip-version-check --no-deps --only-binary :all: -r "$req"
"$venv/bin/python" "$root/scripts/torch_cpu_stubs.py" "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$venv/bin/python" -c "import torch, transformers, gguf, safetensors, numpy; torch.nn.Linear(4, 2)(torch.ones(1, 4))"
install_openblas
echo "$want" > "$stamp"
echo "python venv ready: $venv ($(du -sh "$venv" | cut -f1))"
