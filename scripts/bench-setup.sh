# Sourced by the benchmark scripts: fixture model fetched, release binary built (or the
# one named by RESBISECT, on machines without cargo), a scratch folder removed on exit.
# Sets root, bin, model and work; leaves the shell in root.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
model="$root/fixtures/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -n "${RESBISECT:-}" ]; then
  bin="$RESBISECT"
else
  "$root/scripts/fetch-models.sh" >/dev/null
  cargo build --release --quiet
  bin="$root/target/release/resbisect"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
