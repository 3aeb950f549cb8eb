#!/usr/bin/env bash
# Exactly what CI runs: formatting, lints (warnings are errors), every test target.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --all-targets
# --all-targets skips doc tests; run them too.
cargo test --doc
