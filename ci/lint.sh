#!/usr/bin/env bash
# Formatting and lints, as CI runs them. Fails on any rustfmt difference or clippy warning.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
