#!/usr/bin/env bash
# Runs the README's two commands as a fresh machine would: a fresh clone of this
# repository's HEAD, an empty CARGO_HOME and HOME (no crate cache, no pip cache), no
# .venv/, and a PATH with only the Rust toolchain, Python 3 and the system tools.
# Prints each command's wall time and exit status (the demo exits 1: it finds the fault).
# Usage: scripts/check-fresh.sh [WORK_DIR]   (default /tmp/resbisect-fresh; replaced)
set -u
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/resbisect-fresh}"
rm -rf "$work"
mkdir -p "$work/cargo" "$work/home"
git clone -q "$src" "$work/repo"
toolchain="$(dirname "$(rustup which cargo)")"
python_dir="$(dirname "$(command -v python3)")"
cd "$work/repo"
run() {
  env -i HOME="$work/home" CARGO_HOME="$work/cargo" RUSTUP_HOME="${RUSTUP_HOME:-$HOME/.rustup}" \
    ${PYENV_ROOT:+PYENV_ROOT="$PYENV_ROOT"} PATH="$toolchain:$python_dir:/usr/local/bin:/usr/bin:/bin" \
    LANG=C.UTF-8 bash -c "$1"
}
echo "commit $(git rev-parse HEAD)"
for cmd in "$(grep -m1 -E '^\./scripts/fetch-models\.sh && cargo run' README.md)" \
           "$(grep -m1 -E '^\./scripts/setup\.sh && cargo test' README.md)"; do
  start=$(date +%s)
  run "$cmd"
  echo "== '$cmd': exit $? after $(( $(date +%s) - start )) s"
done
du -sh .venv "$work/cargo" target
