#!/usr/bin/env bash
# Model-check the agent lifecycle (daemon/src/agents/lifecycle.pml) with spin: every
# interleaving of two admin calls and a token request, with kill -9 and start-up repair between
# any two steps, keeps the invariants. Two mutations of the model (revocation without the
# issuance gate; repair that forgets revoked keys) must be caught, or the check proves nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
model=$PWD/daemon/src/agents/lifecycle.pml
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
check() { # $1: extra spin flags; prints pan's error count
  spin $1 -a "$model" >/dev/null
  gcc -O2 -DSAFETY -o pan pan.c
  ./pan -m100000 > pan.out 2>&1 || true
  sed -n 's/.*errors: \([0-9]*\).*/\1/p' pan.out | head -1
}
errors=$(check "")
states=$(sed -n 's/^ *\([0-9]*\) states, stored.*/\1/p' pan.out | head -1)
if [ "$errors" != 0 ] || grep -q "max search depth too small" pan.out; then
  cat pan.out >&2
  echo "model: the lifecycle model violates an invariant (trail above)" >&2
  exit 1
fi
for mutation in BROKEN_GATE BROKEN_REPAIR; do
  if [ "$(check "-D$mutation")" = 0 ]; then
    echo "model: the mutation $mutation was not caught" >&2
    exit 1
  fi
done
echo "model: lifecycle invariants hold in all $states states; both mutations caught" >&2
