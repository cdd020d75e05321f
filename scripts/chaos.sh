#!/usr/bin/env bash
# Crash-safety run against the local stack (see benches/chaos.rs): 3 daemons,
# 5 imports of 200,000 rows, at least 10 kill -9 of a random daemon, then the
# checks. CHAOS_INFRA=1 adds a MongoDB kill -9 + restart and a 20 s S3 stop
# (needs the stack started by this checkout).
#   scripts/chaos.sh
#   CHAOS_ROWS=100000 CHAOS_KILLS=12 CHAOS_INFRA=1 scripts/chaos.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/stack.sh up
# shellcheck disable=SC1091
source .stack/env
cargo build --quiet --release --bin importd
cargo bench --quiet --bench chaos
