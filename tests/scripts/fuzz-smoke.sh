#!/usr/bin/env bash
# A 30-second run of every fuzz target (fuzz/, cargo-fuzz on nightly), two at a time, from the
# committed seeds and whatever corpus earlier runs left. Any crash or failed check fails the
# suite and leaves its input in fuzz/artifacts/. The long runs are `scripts/fuzz SECONDS`.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
unset FUZZ_RUNS
FUZZ_JOBS=2 scripts/fuzz "${FUZZ_SMOKE_SECONDS:-30}"
echo "fuzz smoke: ok"
