#!/usr/bin/env bash
# The comparison page in a real browser (compare_page.mjs): converts the bundled model to the
# four formats with a quick `ggpt compare` (for the report panel too), installs playwright-core
# from the lockfile and runs the test against ggpt-serve. Screenshots: target/browser/.
# Expects target/release/ggpt and ggpt-serve built (tests/run.sh builds them).
set -euo pipefail
cd "$(dirname "$0")/../.."

CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [ -z "$CHROMIUM" ]; then
  echo "browser test: SKIPPED — no chromium on PATH (apt-get install chromium)"
  exit 0
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "browser test: SKIPPED — node/npm not installed (apt-get install nodejs npm)"
  exit 0
fi

dir="$PWD/target/browser"
mkdir -p "$dir"
# One small window, short benchmarks and no RSS process: the report is for the panel, not a measurement.
./target/release/ggpt compare -o "$dir/models" --ctx 128 --chunks 2 --bench-prompt 16 --bench-gen 8 --no-rss >/dev/null
(cd tests/browser && npm ci --no-audit --no-fund --silent)
GGPT_BIN="$PWD/target/release/ggpt" GGPT_SERVE="$PWD/target/release/ggpt-serve" \
  GGPT_MODELS="$dir/models" GGPT_ARTIFACTS="$dir" CHROMIUM="$CHROMIUM" \
  node tests/browser/compare_page.mjs
