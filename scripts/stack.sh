#!/usr/bin/env bash
# The local stack importd runs and is tested against, on 127.0.0.1:
#   MongoDB  secantusd-rs (crates.io secantus-mdb)  :27017  data .stack/mongo
#   S3       Garage 2.5.0 (crates.io garage)        :9000   bucket `imports`
#   SMTP     aiosmtpd (PyPI), Maildir delivery      :1025   mail .stack/mail/new/
#
#   scripts/stack.sh up       install what is missing, start, wait until each
#                             answers, write .stack/env
#   scripts/stack.sh down     stop what this checkout started (by PID)
#   scripts/stack.sh status   show what answers
#
# Installs go to machine-wide places (~/.cargo/bin, the Python site-packages)
# so later clones reuse them; a warm `up` takes seconds. A service already
# answering on its port (another checkout's stack) is reused, not restarted,
# and `down` leaves it alone.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$ROOT/.stack"
PIDS="$STACK/pids"
LOGS="$STACK/logs"
PROBE="python3 $ROOT/scripts/probe.py"

SECANTUS_VERSION="0.5.3-beta.196"
GARAGE_VERSION="2.5.0"
AIOSMTPD_VERSION="1.4.6"

# Fixed local-only credentials (the same in config/local.toml).
S3_ACCESS_KEY="GK0123456789abcdef01234567"
S3_SECRET_KEY="0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
RPC_SECRET="a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"

export PATH="$HOME/.cargo/bin:$PATH"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_secantus() {
  if secantusd-rs --version 2>/dev/null | grep -q "$SECANTUS_VERSION"; then return; fi
  log "installing secantusd-rs $SECANTUS_VERSION (about 5 minutes, once per machine)"
  command -v cmake >/dev/null || as_root apt-get install -y -q cmake >&2 \
    || { as_root apt-get update -q >&2 && as_root apt-get install -y -q cmake >&2; }
  cargo install secantus-mdb --version "$SECANTUS_VERSION" --ignore-rust-version --quiet >&2 \
    || die "installing secantusd-rs failed"
}

install_garage() {
  if garage --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then return; fi
  log "installing Garage $GARAGE_VERSION (about 9 minutes, once per machine)"
  cargo install "garage@$GARAGE_VERSION" --locked --quiet >&2 || die "installing Garage failed"
}

install_aiosmtpd() {
  if python3 -c "import aiosmtpd" 2>/dev/null; then return; fi
  log "installing aiosmtpd $AIOSMTPD_VERSION"
  python3 -m pip install -q "aiosmtpd==$AIOSMTPD_VERSION" >&2 || die "installing aiosmtpd failed"
}

pid_alive() { [ -f "$PIDS/$1.pid" ] && kill -0 "$(cat "$PIDS/$1.pid")" 2>/dev/null; }

# start NAME PROBE_KIND PORT CMD... : start unless it already answers.
start() {
  local name=$1 kind=$2 port=$3; shift 3
  if $PROBE "$kind" 127.0.0.1 "$port"; then
    if pid_alive "$name"; then log "$name already running (pid $(cat "$PIDS/$name.pid"))"
    else log "$name already answers on :$port (not started by this checkout; reusing it)"; fi
    return
  fi
  log "starting $name on :$port"
  # `exec` so that $! is the server itself (not a subshell or wrapper):
  # `down` stops exactly what was started here.
  (cd "$STACK" && exec nohup "$@" >"$LOGS/$name.log" 2>&1) &
  echo $! >"$PIDS/$name.pid"
}

wait_ready() {
  local name=$1 kind=$2 port=$3 tries=${4:-120}
  for _ in $(seq "$tries"); do
    if $PROBE "$kind" 127.0.0.1 "$port"; then return 0; fi
    if [ -f "$PIDS/$name.pid" ] && ! pid_alive "$name"; then
      tail -n 20 "$LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: .stack/logs/$name.log)"
    fi
    sleep 0.5
  done
  tail -n 20 "$LOGS/$name.log" >&2 || true
  die "$name did not answer on 127.0.0.1:$port (log: .stack/logs/$name.log)"
}

garage_config() {
  cat >"$STACK/garage.toml" <<TOML
metadata_dir = "$STACK/garage/meta"
data_dir = "$STACK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:3901"
rpc_public_addr = "127.0.0.1:3901"
rpc_secret = "$RPC_SECRET"

[s3_api]
api_bind_addr = "127.0.0.1:9000"
s3_region = "us-east-1"
root_domain = ".s3.localhost"
TOML
}

# The Maildir of the SMTP server answering on :1025: ours, or, when another
# checkout's server is being reused, the one on its command line.
smtp_maildir() {
  local p args
  for p in /proc/[0-9]*; do
    mapfile -d '' args <"$p/cmdline" 2>/dev/null || continue
    if [ "${#args[@]}" -gt 0 ] && [[ " ${args[*]} " == *" aiosmtpd "* ]] \
      && [[ " ${args[*]} " == *" 127.0.0.1:1025 "* ]]; then
      echo "${args[-1]}"
      return
    fi
  done
  echo "$STACK/mail"
}

write_env() {
  local maildir; maildir=$(smtp_maildir)
  cat >"$STACK/env" <<ENV
# Written by scripts/stack.sh up: points importd at the local stack.
export IMPORTD_ENV=local
export IMPORTD__MONGODB__URI='mongodb://127.0.0.1:27017/?directConnection=true'
export IMPORTD__S3__ENDPOINT='http://127.0.0.1:9000'
export IMPORTD__S3__REGION='us-east-1'
export IMPORTD__S3__BUCKET='imports'
export IMPORTD__S3__ACCESS_KEY='$S3_ACCESS_KEY'
export IMPORTD__S3__SECRET_KEY='$S3_SECRET_KEY'
export IMPORTD__S3__PATH_STYLE=true
export IMPORTD__SMTP__HOST='127.0.0.1'
export IMPORTD__SMTP__PORT=1025
export IMPORTD__SMTP__TLS=none
export IMPORTD_STACK_MAILDIR='$maildir'
ENV
}

up() {
  # A full Maildir (cur/new/tmp): aiosmtpd's Mailbox handler only creates one
  # when the directory does not exist at all, and fails every delivery into
  # an empty one.
  mkdir -p "$PIDS" "$LOGS" "$STACK/mongo" "$STACK/garage/meta" "$STACK/garage/data" \
    "$STACK/mail/cur" "$STACK/mail/new" "$STACK/mail/tmp"
  # The two cargo installs (cold: ~5 and ~9 min) run side by side: their
  # serial phases (linking, the largest crates) overlap.
  install_secantus & local p1=$!
  install_garage & local p2=$!
  install_aiosmtpd
  wait "$p1" || die "installing secantusd-rs failed"
  wait "$p2" || die "installing Garage failed"
  garage_config
  start mongodb mongo 27017 secantusd-rs --port 27017 --storage-path "$STACK/mongo" \
    --cache-size 1G --sync-on-commit
  start s3 s3 9000 env GARAGE_DEFAULT_ACCESS_KEY="$S3_ACCESS_KEY" \
    GARAGE_DEFAULT_SECRET_KEY="$S3_SECRET_KEY" GARAGE_DEFAULT_BUCKET=imports \
    garage -c "$STACK/garage.toml" server --single-node --default-bucket
  # The interpreter itself, not a wrapper such as a pyenv shim: the PID
  # recorded must be the server's, or `down` would leave it running.
  local python; python=$(python3 -c 'import sys; print(sys.executable)')
  start smtp smtp 1025 "$python" -m aiosmtpd -n -l 127.0.0.1:1025 -c aiosmtpd.handlers.Mailbox "$STACK/mail"
  wait_ready mongodb mongo 27017
  wait_ready s3 s3 9000
  wait_ready smtp smtp 1025
  write_env
  log "up: MongoDB :27017, S3 :9000 (bucket imports), SMTP :1025 (mail in .stack/mail/new/); env in .stack/env"
}

down() {
  for name in importd smtp s3 mongodb; do
    if pid_alive "$name"; then
      local pid; pid=$(cat "$PIDS/$name.pid")
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$name.pid"
  done
}

status() {
  local rc=0
  for spec in mongodb:mongo:27017 s3:s3:9000 smtp:smtp:1025; do
    IFS=: read -r name kind port <<<"$spec"
    if $PROBE "$kind" 127.0.0.1 "$port"; then
      if pid_alive "$name"; then echo "$name: up on :$port (pid $(cat "$PIDS/$name.pid"))"
      else echo "$name: up on :$port (not started by this checkout)"; fi
    else echo "$name: DOWN (:$port)"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
