#!/usr/bin/env bash
# Quick start, command 2 (and all CI runs): bring the local stack up, then
# formatting, lints, docs, unit tests and integration tests against the stack.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/stack.sh up
# shellcheck disable=SC1091
source .stack/env

echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy" >&2
cargo clippy --quiet --all-targets -- -D warnings
echo "[test] cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps
echo "[test] cargo test" >&2
# Not --all-targets: that would also run the benches (live-stack harnesses).
cargo test --quiet --lib --bins --tests
