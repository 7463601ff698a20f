#!/usr/bin/env bash
# Model-checks the batch ring protocol with loom: every interleaving of the real ring code.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
  cargo test -p embar-dataplane --test loom_ring --release "$@"
