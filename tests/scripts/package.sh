#!/usr/bin/env bash
# The packages: built by scripts/package, checked with lintian, dpkg and rpm.
# Installs into this machine (as CI does, as root) and purges again at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "package test: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "package test needs root (dpkg -i)"; exit 1; }

rm -rf dist
scripts/package >/tmp/tessera-package.log 2>&1 || { cat /tmp/tessera-package.log; fail "scripts/package failed"; }
deb=$(ls dist/tessera_*.deb | grep -v dbgsym | head -1)
rpmf=$(ls dist/tessera-*.rpm | head -1)
[ -f "$deb" ] && [ -f "$rpmf" ] || fail "packages missing in dist/"

echo "-- lintian"
lintian --fail-on error,warning --no-tag-display-limit "$deb" | tee /tmp/tessera-lintian.txt \
  || fail "lintian reports errors or warnings (overrides, each with its reason: packaging/debian/lintian-overrides)"

echo "-- install"
dpkg -P tessera >/dev/null 2>&1 || true
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" || fail "dpkg -i"
for f in /usr/bin/tesserad /usr/bin/tessera /usr/share/dbus-1/system.d/org.tessera.Tessera1.conf \
         /etc/tessera/tesserad.toml /lib/systemd/system/tesserad.service /lib/systemd/system/tesserad.socket \
         /lib/systemd/system/tesserad-workload.socket /lib/systemd/system/tesserad-metrics.socket; do
  [ -e "$f" ] || [ -e "/usr$f" ] || fail "$f not installed"
done
getent passwd tessera >/dev/null || fail "user tessera not created"
# Metrics are opt-in: the socket unit is shipped but not enabled.
[ ! -e /etc/systemd/system/sockets.target.wants/tesserad-metrics.socket ] || fail "metrics socket enabled by the package"
getent group tessera-admin >/dev/null || fail "group tessera-admin not created"
/usr/bin/tesserad --check-config /etc/tessera/tesserad.toml || fail "shipped config does not validate"
file /usr/bin/tesserad | grep -q ", stripped" || fail "binary not stripped"
/usr/bin/tessera --version >/dev/null
# Man pages and completions: installed where man and the shells look, and well-formed.
for p in man1/tessera.1.gz man1/tessera-agent-check.1.gz man8/tesserad.8.gz man5/tesserad.toml.5.gz \
         man5/tessera-agent.toml.5.gz; do
  [ -f "/usr/share/man/$p" ] || fail "man page $p not installed"
done
for p in tesserad tessera tesserad.toml tessera-agent.toml; do
  w=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -Tutf8 -Z "$p" 2>&1 >/dev/null) || fail "man $p fails"
  [ -z "$w" ] || fail "man $p warns: $w"
done
man -P cat tessera-agent-check 2>/dev/null | grep -q -- "--as" || fail "generated man page lacks the CLI's options"
[ -f /usr/share/bash-completion/completions/tessera ] || fail "bash completion not installed"
[ -f /usr/share/zsh/vendor-completions/_tessera ] || fail "zsh completion not installed"
[ -f /usr/share/fish/vendor_completions.d/tessera.fish ] || fail "fish completion not installed"
# bash completes subcommands from the installed file.
words=$(bash -c 'source /usr/share/bash-completion/completions/tessera
  COMP_WORDS=(tessera agent ch); COMP_CWORD=2; COMP_LINE="tessera agent ch"; COMP_POINT=${#COMP_LINE}
  _tessera tessera ch agent; echo "${COMPREPLY[*]}"')
echo "$words" | grep -qw check || fail "bash completion does not offer 'agent check' (got: $words)"

echo "-- purge"
dpkg -P tessera || fail "dpkg -P"
[ ! -e /usr/bin/tesserad ] || fail "binary left after purge"
[ ! -e /etc/tessera/tesserad.toml ] || fail "config left after purge"
getent passwd tessera >/dev/null || fail "purge removed the user (it should stay)"

echo "-- reinstall"
DEBIAN_FRONTEND=noninteractive dpkg -i "$deb" || fail "reinstall"
dpkg -P tessera >/dev/null

echo "-- rpm"
# Same files, but where each family looks: Debian's zsh reads vendor-completions, Fedora's
# site-functions.
deb_files=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's#^\./#/#' | grep -v '/$' \
  | grep -v -e '^/usr/share/doc/' -e '^/usr/lib/debug/' -e '^/usr/share/lintian/' | sed 's#^/lib/#/usr/lib/#' \
  | sed 's#^/usr/share/zsh/vendor-completions/#/usr/share/zsh/site-functions/#' | sort)
rpm_files=$(rpm -qlp "$rpmf" | grep -v -e '^/usr/share/doc/' | sort)
if [ "$deb_files" != "$rpm_files" ]; then
  diff <(echo "$deb_files") <(echo "$rpm_files") || true
  fail "rpm and deb ship different files"
fi
root=$(mktemp -d)
rpm --root "$root" --initdb
rpm --root "$root" -ivh --nodeps --noscripts "$rpmf" || fail "rpm install into a throwaway root"
[ -x "$root/usr/bin/tesserad" ] && [ -f "$root/etc/tessera/tesserad.toml" ] || fail "rpm files missing in root"
rpm --root "$root" -qc tessera | grep -q /etc/tessera/tesserad.toml || fail "config not marked as config"
rm -rf "$root"
echo "packages: ok"
