#!/usr/bin/env bash
# `tesserad --dev` starts on the embedded default (SoftHSM token under a fresh state dir),
# answers health over its socket (checked with curl), serves the Workload API socket beside it,
# and stops cleanly on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=target/debug/tesserad
for backend in pkcs11 tpm; do
  dir=$(mktemp -d)
  "$bin" --dev "$backend" --state-dir "$dir" >"$dir/log" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do [ -S "$dir/agent.sock" ] && break; sleep 0.1; done
  out=$(curl -sf --unix-socket "$dir/agent.sock" http://tessera/v1/health) || { cat "$dir/log"; exit 1; }
  [ "$out" = "{\"backend\":\"$backend\",\"status\":\"ok\"}" ] || { echo "unexpected health: $out"; exit 1; }
  grep -q "tesserad ready" "$dir/log" || { echo "no ready line in log"; cat "$dir/log"; exit 1; }
  [ -S "$dir/workload.sock" ] || { echo "no SPIFFE Workload API socket in dev mode"; exit 1; }
  kill -TERM "$pid"
  wait "$pid" || { echo "tesserad --dev $backend did not exit 0 on SIGTERM"; cat "$dir/log"; exit 1; }
  [ ! -e "$dir/agent.sock" ] || { echo "socket left behind"; exit 1; }
  [ ! -e "$dir/workload.sock" ] || { echo "Workload API socket left behind"; exit 1; }
  # Second start reuses the token it created.
  "$bin" --dev "$backend" --state-dir "$dir" >"$dir/log2" 2>&1 &
  pid=$!
  for _ in $(seq 1 150); do [ -S "$dir/agent.sock" ] && break; sleep 0.1; done
  curl -sf --unix-socket "$dir/agent.sock" http://tessera/v1/health >/dev/null || { cat "$dir/log2"; exit 1; }
  kill -INT "$pid"; wait "$pid"
  rm -rf "$dir"
  echo "dev-mode $backend: ok"
done
