#!/usr/bin/env bash
# Upgrades keep state. The daemon of a fixed earlier commit (BASE, before schema versioning)
# enrols an agent and issues credentials on a state dir; this tree's daemon then starts on the
# same state: the agent's key, its tokens, the host CA and the audit chain carry on, and the
# registry is migrated to the current schema version. Then the packages: BASE's .deb installed,
# this tree's .deb over it (an admin's edit of the conffile kept, the new files there).
# BASE is built once (release, sharing target/'s compiled dependencies) and cached under
# target/upgrade-base/. Runs after package.sh (dist/ holds this tree's .deb).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
fail() { echo "upgrade test: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg -i)"
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

# The last commit before the registry carried a schema version (2026-12-01).
BASE=07acf8dec19ee2ab534b12d5f125022df55ef680
base_commit=$(git rev-parse --verify -q "$BASE^{commit}") || fail "commit $BASE not in this clone's history"
cache=$root/target/upgrade-base/$base_commit
if [ ! -x "$cache/bin/tesserad" ] || [ ! -f "$cache/deb.ok" ]; then
  echo "-- building $BASE (once; cached in $cache)"
  rm -rf "$cache" && mkdir -p "$cache/bin" "$cache/deb"
  git worktree prune
  git worktree add --detach -f "$cache/src" "$base_commit" >/dev/null
  # Same target dir: the dependencies this tree already compiled are reused. This tree's
  # release binaries are set aside and put back afterwards.
  saved=$(mktemp -d)
  for b in tesserad tessera; do [ -f "target/release/$b" ] && cp -p "target/release/$b" "$saved/"; done
  (cd "$cache/src" && CARGO_TARGET_DIR=$root/target cargo build -q --release --bins -p tesserad)
  cp target/release/tesserad target/release/tessera "$cache/bin/"
  command -v cargo-deb >/dev/null || cargo install --locked cargo-deb@^3
  (cd "$cache/src" && CARGO_TARGET_DIR=$root/target cargo deb -q -p tesserad --no-build --output "$cache/deb/")
  for b in tesserad tessera; do [ -f "$saved/$b" ] && cp -p "$saved/$b" "target/release/$b"; done
  rm -rf "$saved"
  git worktree remove --force "$cache/src"
  touch "$cache/deb.ok"
fi

old_d=$cache/bin/tesserad old_c=$cache/bin/tessera
new_d=$root/target/debug/tesserad new_c=$root/target/debug/tessera
work=$(mktemp -d)
state=$work/state
export TESSERA_SOCKET=$state/agent.sock
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
start() { # binary log
  "$1" --dev --state-dir "$state" --bus none >"$work/$2" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    curl -sf --unix-socket "$TESSERA_SOCKET" http://tessera/v1/health >/dev/null 2>&1 && return
    kill -0 "$pid" 2>/dev/null || { cat "$work/$2"; fail "$1 exited at start"; }
    sleep 0.1
  done
  cat "$work/$2"; fail "$1 not ready"
}
stop() { kill -TERM "$pid"; wait "$pid" || fail "daemon did not stop cleanly"; pid=; }

echo "-- $BASE on a fresh state"
mkdir -p "$state/agents.d"
printf '[selectors]\nuid = 0\n[policy]\naudiences = ["https://api.example.com"]\nscopes = ["read"]\n' \
  > "$state/agents.d/bot.toml"
start "$old_d" old.log
kid_before=$("$old_c" --json whoami | python3 -c 'import json,sys; print(json.load(sys.stdin)["key_id"])')
old_token=$("$old_c" token --audience https://api.example.com --scope read)
"$old_c" cert > "$work/old-cert.pem"
"$old_c" bundle > "$work/ca-before.pem"
stop
seq_before=$("$new_c" --json audit verify "$state/audit" | python3 -c 'import json,sys; print(json.load(sys.stdin)["summary"]["last_seq"])')

echo "-- this tree's daemon on the same state"
start "$new_d" new.log
version=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("PRAGMA user_version").fetchone()[0])' "$state/registry.db")
[ "$version" -ge 1 ] || fail "registry not migrated (user_version $version)"
kid_after=$("$new_c" --json whoami | python3 -c 'import json,sys; print(json.load(sys.stdin)["key_id"])')
[ "$kid_before" = "$kid_after" ] || fail "the agent's key changed ($kid_before -> $kid_after)"
# The token the old daemon issued still verifies against the new daemon's key set.
curl -sf --unix-socket "$TESSERA_SOCKET" http://tessera/v1/jwks > "$work/jwks.json"
echo "$old_token" | "$new_c" verify - --audience https://api.example.com --jwks "$work/jwks.json" >/dev/null \
  || fail "a token from before the upgrade does not verify after it"
new_token=$("$new_c" token --audience https://api.example.com --scope read)
echo "$new_token" | "$new_c" verify - --audience https://api.example.com --jwks "$work/jwks.json" >/dev/null \
  || fail "a new token does not verify"
"$new_c" bundle > "$work/ca-after.pem"
cmp -s "$work/ca-before.pem" "$work/ca-after.pem" || fail "the host CA changed"
openssl verify -CAfile "$work/ca-after.pem" "$work/old-cert.pem" >/dev/null || fail "the old certificate no longer verifies"
stop
"$new_c" --json audit verify "$state/audit" > "$work/audit.json" || { cat "$work/audit.json"; fail "audit chain broken across the upgrade"; }
seq_after=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["intact"], d; print(d["summary"]["last_seq"])' "$work/audit.json")
[ "$seq_after" -gt "$seq_before" ] || fail "the audit chain did not carry on ($seq_before -> $seq_after)"
echo "state carries over: ok"

echo "-- packages: $BASE's .deb, then this tree's over it"
old_deb=$(ls "$cache"/deb/tessera_*.deb | grep -v dbgsym | head -1)
new_deb=$(ls dist/tessera_*.deb | grep -v dbgsym | head -1) || fail "no .deb in dist/ (package.sh runs first)"
dpkg -P tessera >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive dpkg -i "$old_deb" >/dev/null || fail "dpkg -i $old_deb"
[ ! -e /usr/share/man/man8/tesserad.8.gz ] || fail "the old package already had the new man page?"
echo '# edited by the admin' >> /etc/tessera/tesserad.toml
old_v=$(dpkg-query -W -f='${Version}' tessera)
DEBIAN_FRONTEND=noninteractive dpkg --force-confold -i "$new_deb" >/dev/null || fail "dpkg -i $new_deb over $old_deb"
new_v=$(dpkg-query -W -f='${Version}' tessera)
dpkg --compare-versions "$new_v" gt "$old_v" || fail "not an upgrade: $old_v -> $new_v"
grep -q '^# edited by the admin' /etc/tessera/tesserad.toml || fail "the admin's conffile edit was lost"
/usr/bin/tesserad --check-config /etc/tessera/tesserad.toml >/dev/null || fail "kept config does not validate"
[ -f /usr/share/man/man8/tesserad.8.gz ] && [ -f /usr/share/bash-completion/completions/tessera ] \
  || fail "new files missing after the upgrade"
/usr/bin/tessera agent check --help >/dev/null || fail "the upgraded CLI lacks agent check"
getent passwd tessera >/dev/null && getent group tessera-admin >/dev/null || fail "user or group lost"
dpkg -P tessera >/dev/null
echo "upgrade: ok"
