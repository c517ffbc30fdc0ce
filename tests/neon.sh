#!/usr/bin/env bash
# The NEON kernels (quant/src/dot/neon.rs) on an x86-64 machine: type-check the workspace for
# aarch64, build ggpt-quant's tests for aarch64 and run them under qemu user-mode emulation
# (.cargo/config.toml sets the linker and the runner). The quant tests compare every level
# `dot::available_isas()` reports (scalar, neon, neondot) with the scalar reference and
# ggml's fixtures.
#
# Needs the cross linker + libc (Debian: gcc-aarch64-linux-gnu libc6-dev-arm64-cross), qemu-aarch64
# (qemu-user) and the rust target aarch64-unknown-linux-gnu. Without them it prints one line
# saying what is missing and exits 0, so the suite still runs on machines that lack them.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu # the cross libc, used by qemu to find the dynamic loader

missing=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || missing+=("aarch64-linux-gnu-gcc (cross linker)")
[[ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ]] || missing+=("$SYSROOT (aarch64 cross libc)")
command -v qemu-aarch64 >/dev/null 2>&1 || missing+=("qemu-aarch64 (qemu-user)")
# Ask rustc rather than rustup: the target's std is what has to be there.
[[ -d "$(rustc --print sysroot)/lib/rustlib/$TARGET/lib" ]] || missing+=("rust target $TARGET")
if ((${#missing[@]})); then
  echo "tests/neon.sh: NEON tests skipped, missing: $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g')"
  exit 0
fi

# `max` has dotprod, so both NEON levels are available (qemu's default aarch64 CPU is `max` too,
# but older releases differed). The kernels test re-runs itself in child processes (one per
# GGPT_ISA value); the host cannot exec an aarch64 binary, so it starts them through qemu.
export QEMU_CPU=max
export GGPT_TEST_RUNNER="qemu-aarch64 -L $SYSROOT"
cargo_test() { cargo test -p ggpt-quant --release --target "$TARGET" "$@"; }

start=$SECONDS
# The rest of the workspace must build for aarch64 too (it runs there; only the kernels are
# tested under qemu): a type-check of every crate and its tests.
cargo check --workspace --tests --target "$TARGET"
cargo_test --no-run
# Which levels the emulated CPU offers: an unknown GGPT_ISA makes the dispatcher list them.
levels=$( (GGPT_ISA=list cargo_test --test kernels -- --exact dispatch_is_one_of_the_available_levels \
  --nocapture 2>&1 || true) | sed -n 's/.*(available: \(.*\)); using.*/\1/p' | tail -n 1)
echo "tests/neon.sh: levels under qemu-aarch64 (QEMU_CPU=$QEMU_CPU): ${levels:-?}"
if [[ "$levels" != *neondot* ]]; then
  echo "tests/neon.sh: expected levels scalar, neon, neondot under qemu; got: ${levels:-none}" >&2
  exit 1
fi

# Every level against the scalar reference (the dispatched default is neondot) ...
cargo_test
# ... and again with the dispatched default forced to the non-dotprod build.
GGPT_ISA=neon cargo_test
echo "tests/neon.sh: NEON tests passed under qemu in $((SECONDS - start)) s"
