#!/usr/bin/env bash
# Remeasures the approximate-unit tables of the llamacpp-cuda profile on this machine's GPU
# (scripts/mufu-tables.cu) and writes them zlib-compressed where the reference reads them.
# Needs nvcc and python3. ARCH (default sm_90) names the GPU the tables are for.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
arch="${ARCH:-sm_90}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
nvcc -O2 -arch="$arch" -o "$tmp/mufu" "$root/scripts/mufu-tables.cu"
"$tmp/mufu" "$tmp/rcp.bin" "$tmp/rsqrt.bin"
for t in rcp rsqrt; do
  python3 -c 'import sys, zlib; open(sys.argv[2], "wb").write(zlib.compress(open(sys.argv[1], "rb").read(), 9))' \
    "$tmp/$t.bin" "$root/crates/reference/data/${arch/_/}-$t-approx.zz"
done
echo "tables written to crates/reference/data/ for $arch"
