#!/usr/bin/env bash
# Quick start, command 1: bring the local stack up, build importd, start the
# daemon, import samples/deals.csv (then samples/contacts.csv) end to end
# and say where to look.
# The daemon keeps running (log: .stack/logs/importd.log); stop everything
# with `scripts/stack.sh down`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/stack.sh up
echo "[demo] building importd" >&2
cargo build --quiet --bin importd
# shellcheck disable=SC1091
source .stack/env

PIDFILE=.stack/pids/importd.pid
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "[demo] restarting the daemon with the fresh build" >&2
  kill -TERM "$(cat "$PIDFILE")"; sleep 1
fi
nohup target/debug/importd run >.stack/logs/importd.log 2>&1 &
echo $! >"$PIDFILE"
echo "[demo] daemon started (pid $(cat "$PIDFILE"), log .stack/logs/importd.log)" >&2

target/debug/importd demo samples/deals.csv --timeout 120
echo
echo "[demo] and a contacts import (samples/contacts.csv: new, existing and repeated emails, bad lines)" >&2
target/debug/importd demo samples/contacts.csv --source contacts --timeout 120
echo
sleep 2
echo "Also: the daemon's log in .stack/logs/importd.log;"
echo "      the summary email to demo@example.com: the newest file in .stack/mail/new/"
echo "      (its link downloads the error report from the local S3 server)."
echo "      the daemon's HTTP listener: curl -s http://127.0.0.1:8080/healthz ; curl -s http://127.0.0.1:8080/metrics"
echo "Stop everything: scripts/stack.sh down"
