#!/usr/bin/env bash
# ggpt's whole test suite, as CI runs it: the Rust tests of every crate, the quant tests again
# for aarch64 under emulation (tests/neon.sh), then the Python cross-check that llama.cpp's own
# gguf reader agrees with every file ggpt writes, and the Python package's tests (python/tests).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -p ggpt-cli --bin ggpt
cargo build --release -p ggpt-serve --bin ggpt-serve
cargo test --release --workspace
# The aarch64 NEON kernels, under qemu-user (skips with one line if the tools are missing).
bash tests/neon.sh

# The independent reader: llama.cpp's gguf-py (and numpy, pytest) from PyPI.
python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
GGPT_BIN="$PWD/target/release/ggpt" python3 -m pytest -q tests/python

# The Python package (python/), installed the way a user installs it (pip fetches maturin from
# PyPI as the build backend), then its tests against the bundled model and the CLI. Sharing
# the workspace's target directory reuses the crates built above.
CARGO_TARGET_DIR="$PWD/target" python3 -m pip install --quiet --disable-pip-version-check ./python
CARGO_TARGET_DIR="$PWD/target" cargo test --release --manifest-path python/Cargo.toml
GGPT_BIN="$PWD/target/release/ggpt" python3 -m pytest -q python/tests

# The comparison page of ggpt-serve in headless Chromium (playwright-core from npm): skips with
# the reason if Chromium or Node is missing (.ci/run installs both with apt).
bash tests/browser/run.sh
