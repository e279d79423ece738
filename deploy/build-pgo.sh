#!/usr/bin/env bash
# Builds the sidekey binary the container image ships: the `production` profile (whole-program
# LTO, one codegen unit) with profile-guided optimisation, trained on the benchmark's own load.
#
#   deploy/build-pgo.sh [OUT]      # writes OUT (default: target/pgo/sidekey)
#
# 1. An instrumented build of sidekey (its own target directory, so no other build is undone).
# 2. A training run: bench/bench.py drives each of sidekey's cases (Miradore's header, m3ter
#    with its cached token, Mailkit's body rewrite, the request log on, HTTPS through
#    interception, 64 KiB responses) through the in-repo mock vendor for PGO_TRAIN_SECONDS
#    (default 5) each. The instrumented sidekey writes its counts when it exits on SIGTERM.
# 3. llvm-profdata (the toolchain's own, rustup component llvm-tools) merges the counts.
# 4. The optimised build reads them.
#
# Needs python3, wrk and taskset for the training load, and llvm-tools (added with rustup when
# missing). About three sidekey builds' time: ~15 min on 2 cores. Code the training does not
# reach (the control plane, refusals) is optimised for size, not broken; docs/benchmarks.md
# has the numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
out=${1:-target/pgo/sidekey}
target=${CARGO_TARGET_DIR:-target}
[[ $target == /* ]] || target=$repo/$target
work=$target/pgo
seconds=${PGO_TRAIN_SECONDS:-5}

say() { echo "build-pgo: $*" >&2; }
fail() { say "$*"; exit 1; }

for tool in python3 wrk taskset; do
    command -v "$tool" >/dev/null || fail "$tool is needed for the training load (Debian: apt-get install ${tool/taskset/util-linux})"
done
host=$(rustc -vV | sed -n 's/^host: //p')
profdata=$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata
if [[ ! -x $profdata ]]; then
    say "adding the llvm-tools component for llvm-profdata"
    rustup component add llvm-tools >&2 || true
fi
[[ -x $profdata ]] || fail "$profdata is missing: install it with 'rustup component add llvm-tools'"

rm -rf "$work/raw" "$work/train"
mkdir -p "$work/raw" "$work/train/bins/examples"

say "1/4 instrumented build, and the training tools (mock vendor, HTTPS load client)"
cargo build --locked --release --example mock_vendor --example https_load
# --target: RUSTFLAGS then reach sidekey and its dependencies only, not build scripts and
# proc macros (which would write counts of their own while the build runs).
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$work/raw" \
    cargo build --locked --profile production --target "$host" \
    --target-dir "$work/instrumented" --bin sidekey
ln -s "$work/instrumented/$host/production/sidekey" "$work/train/bins/sidekey"
ln -s "$target/release/examples/mock_vendor" "$work/train/bins/examples/mock_vendor"
ln -s "$target/release/examples/https_load" "$work/train/bins/examples/https_load"

say "2/4 training run, ${seconds} s per case"
mkdir -p "$work/train/tmp"
python3 -B bench/bench.py --bins "$work/train/bins" --profile production-instrumented \
    --tmp "$work/train/tmp" --no-docs --reps 1 --warmup 0 --duration "$seconds" \
    --cases sk_miradore,sk_m3ter,sk_mailkit,sk_logs,sk_https,sk_large
compgen -G "$work/raw/*.profraw" >/dev/null || fail "the training run left no profile in $work/raw"

say "3/4 merging the profile"
rm -f "$work"/sidekey-*.profdata
"$profdata" merge -o "$work/merged.profdata" "$work/raw"
# Named by its content: cargo does not watch the file a flag names, but it rebuilds when the
# flags change, so a new profile is never mixed with crates built from an older one.
use=$work/sidekey-$(sha256sum "$work/merged.profdata" | cut -c1-16).profdata
mv "$work/merged.profdata" "$use"

say "4/4 optimised build"
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$use" \
    cargo build --locked --profile production --target "$host" \
    --target-dir "$work/optimized" --bin sidekey
mkdir -p "$(dirname "$out")"
install -m 0755 "$work/optimized/$host/production/sidekey" "$out"
say "wrote $out"
