#!/usr/bin/env bash
# `tesserad --dev` starts on the embedded default (SoftHSM token under a fresh state dir),
# answers health over its socket (checked with curl), serves the Workload API socket beside it,
# runs a private bus on which the `tessera agent` admin commands work with nothing but
# TESSERA_SOCKET set, and stops cleanly on SIGTERM (bus included).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/debug/tesserad
cli=target/debug/tessera
for backend in pkcs11 tpm; do
  dir=$(mktemp -d)
  "$bin" --dev "$backend" --state-dir "$dir" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do [ -S "$dir/agent.sock" ] && break; sleep 0.1; done
  out=$(curl -sf --unix-socket "$dir/agent.sock" http://tessera/v1/health) || { cat "$dir/log"; exit 1; }
  [ "$out" = "{\"backend\":\"$backend\",\"status\":\"ok\"}" ] || { echo "unexpected health: $out"; exit 1; }
  grep -q "tesserad ready" "$dir/log" || { echo "no ready line in log"; cat "$dir/log"; exit 1; }
  [ -S "$dir/workload.sock" ] || { echo "no SPIFFE Workload API socket in dev mode"; exit 1; }
  # The admin half in the first minute: the CLI finds the private bus from the socket's dir.
  [ -s "$dir/bus" ] || { echo "no private bus address in $dir/bus"; cat "$dir/log"; exit 1; }
  export TESSERA_SOCKET="$dir/agent.sock"
  unset TESSERA_BUS
  "$cli" agent enroll bot --uid "$(id -u)" --audience https://api.example.com --scope read >/dev/null
  "$cli" agent list | grep -q "^bot .*active" || { echo "enrolled agent not listed"; exit 1; }
  "$cli" token --audience https://api.example.com >/dev/null
  "$cli" agent suspend bot >/dev/null
  rc=0; "$cli" token --audience https://api.example.com >/dev/null 2>&1 || rc=$?
  [ "$rc" = 3 ] || { echo "suspended agent got a token (exit $rc)"; exit 1; }
  "$cli" agent revoke bot >/dev/null
  "$cli" agent list | grep -q "^bot " && { echo "revoked agent still listed"; exit 1; }
  rc=0; "$cli" token --audience https://api.example.com >/dev/null 2>&1 || rc=$?
  [ "$rc" = 3 ] || { echo "revoked agent got a token (exit $rc)"; exit 1; }
  buspid=$(cat "$dir/dbus/pid")
  kill -TERM "$pid"
  wait "$pid" || { echo "tesserad --dev $backend did not exit 0 on SIGTERM"; cat "$dir/log"; exit 1; }
  [ ! -e "$dir/agent.sock" ] || { echo "socket left behind"; exit 1; }
  [ ! -e "$dir/workload.sock" ] || { echo "Workload API socket left behind"; exit 1; }
  [ ! -e "$dir/bus" ] && ! kill -0 "$buspid" 2>/dev/null || { echo "private bus left behind"; exit 1; }
  # Second start reuses the token it created.
  "$bin" --dev "$backend" --state-dir "$dir" >"$dir/log2" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do [ -S "$dir/agent.sock" ] && break; sleep 0.1; done
  curl -sf --unix-socket "$dir/agent.sock" http://tessera/v1/health >/dev/null || { cat "$dir/log2"; exit 1; }
  # Killed outright, it leaves its bus running; the next start stops that one and starts anew.
  stale=$(cat "$dir/dbus/pid")
  kill -KILL "$pid"; wait "$pid" 2>/dev/null || true
  kill -0 "$stale" || { echo "expected the killed daemon's bus to outlive it"; exit 1; }
  "$bin" --dev "$backend" --state-dir "$dir" >"$dir/log3" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do curl -sf --unix-socket "$dir/agent.sock" http://tessera/v1/health >/dev/null 2>&1 && break; sleep 0.1; done
  for _ in $(seq 1 50); do kill -0 "$stale" 2>/dev/null || break; sleep 0.1; done
  ! kill -0 "$stale" 2>/dev/null || { echo "stale private bus $stale not stopped"; exit 1; }
  "$cli" agent list >/dev/null || { echo "no admin bus after restart"; cat "$dir/log3"; exit 1; }
  kill -INT "$pid"; wait "$pid"
  rm -rf "$dir"
  echo "dev-mode $backend: ok"
done
