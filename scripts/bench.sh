#!/usr/bin/env bash
# End-to-end benchmark against the local stack (see benches/e2e.rs):
#   scripts/bench.sh              1,000,000 rows
#   BENCH_ROWS=200000 scripts/bench.sh
# Prints raw insert rate, importd's rate, their ratio, peak RSS, claim latency
# and head-of-line latency; writes JSON to bench/results/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/stack.sh up
# shellcheck disable=SC1091
source .stack/env
cargo build --quiet --release --bin importd
cargo bench --quiet --bench e2e
