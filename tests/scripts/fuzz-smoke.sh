#!/usr/bin/env bash
# A 30-second run of every fuzz target (fuzz/, cargo-fuzz on nightly), two at a time, from the
# committed seeds. Any crash or failed check fails the
# suite and leaves its input in fuzz/artifacts/. The long runs are `scripts/fuzz SECONDS`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
unset FUZZ_RUNS
# A fixed seed from the committed seeds alone: the run here is the run CI makes (up to how far
# 30 s get), so a green smoke here is not a coin toss there. Finding new bugs is the long runs'
# job (scripts/fuzz SECONDS).
FUZZ_SEED=1 FUZZ_FRESH=1 FUZZ_JOBS=2 scripts/fuzz "${FUZZ_SMOKE_SECONDS:-30}"
echo "fuzz smoke: ok"
