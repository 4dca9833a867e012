#!/usr/bin/env bash
# The test command: system deps, real fixtures, then the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-system-deps.sh
bash scripts/fetch-test-assets.sh
cargo test --workspace --all-targets
