#!/usr/bin/env bash
# Side-by-side benchmark: sidekey vs nginx doing the same header injection vs no proxy, in one
# run on this machine. See docs/benchmarks.md for what it measures and how to read it.
#
#   bench/run.sh            # full run (sidekey as the image ships it: production profile +
#                           # PGO, deploy/build-pgo.sh; 3 reps x 10 s per case), rewrites the
#                           # generated part of docs/benchmarks.md
#   bench/run.sh --smoke    # seconds: dev build, 1 rep x 1 s, asserts every case answered 2xx
#
# Knobs (environment): BENCH_REPS (3), BENCH_DURATION (10 s), BENCH_WARMUP (3 s),
# BENCH_CONNECTIONS (32), BENCH_TENANTS (10000), BENCH_PGO (1; 0 = the production profile
# alone). Extra arguments go to bench/bench.py.
#
# Installs wrk and nginx from Debian when missing (as root, or with sudo). Everything else
# lives in a temporary directory; no system configuration is touched, nothing listens
# outside 127.0.0.1, and every process started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0 perf=0
for arg in "$@"; do
    [[ $arg == --smoke ]] && smoke=1
    [[ $arg == --perf ]] && perf=1
done

# ---- tools from Debian -------------------------------------------------------------------
have_nginx() { command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]]; }
missing=()
command -v wrk >/dev/null || missing+=(wrk)
if ! have_nginx; then
    # nginx-light (bookworm) is the smallest build with the proxy and SSL modules; later
    # releases dropped it for plain nginx.
    if apt-cache show nginx-light >/dev/null 2>&1; then missing+=(nginx-light); else missing+=(nginx); fi
fi
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]]; then sudo=(); elif command -v sudo >/dev/null; then sudo=(sudo); else
        echo "bench: need ${missing[*]}: run as root or install them (apt-get install -y ${missing[*]})" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    echo "bench: installing ${missing[*]}" >&2
    # Only refresh the package lists when the install cannot be done from the cached ones.
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        "${sudo[@]}" apt-get update -q >&2
        "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
fi
if ((perf)); then
    # --perf: perf from Debian (linux-perf) records; inferno (crates.io) draws the flame graph.
    command -v perf >/dev/null || { echo "bench: --perf needs perf (apt-get install linux-perf)" >&2; exit 1; }
    tools=${CARGO_TARGET_DIR:-target}/tools
    if [[ ! -x $tools/bin/inferno-flamegraph ]]; then
        cargo install --locked --quiet --root "$tools" inferno@0.12.8 >&2
    fi
    export PATH=$PWD/$tools/bin:$PATH
fi
command -v taskset >/dev/null || { echo "bench: taskset (util-linux) is required" >&2; exit 1; }
command -v python3 >/dev/null || { echo "bench: python3 is required" >&2; exit 1; }

# ---- binaries ----------------------------------------------------------------------------
target=${CARGO_TARGET_DIR:-target}
if ((smoke)); then
    # Dev profile: reuses what the test run has built; the smoke run checks wiring, not speed.
    cargo build --locked --bins --examples
    bins=$target/debug profile=dev
else
    # The load tools in release; sidekey as the container image ships it: the production
    # profile with PGO (deploy/build-pgo.sh, ~15 min on 2 cores), or with BENCH_PGO=0 the
    # production profile alone (one build).
    cargo build --locked --release --example mock_vendor --example https_load
    [[ $target == /* ]] || target=$PWD/$target
    bins=$target/bench-bins
    mkdir -p "$bins/examples"
    cp "$target/release/examples/mock_vendor" "$target/release/examples/https_load" "$bins/examples/"
    if [[ ${BENCH_PGO:-1} == 0 ]]; then
        cargo build --locked --profile production --bin sidekey
        cp "$target/production/sidekey" "$bins/sidekey"
        profile=production
    else
        deploy/build-pgo.sh "$bins/sidekey"
        profile="production + PGO"
    fi
fi

# ---- run ---------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/sidekey-bench.XXXXXX")
cleanup() {
    # bench.py stops its children itself; this catches anything left if it died abruptly.
    if [[ -f $tmp/pids ]]; then
        while read -r pid; do
            kill -TERM -- "-$pid" 2>/dev/null || true
        done <"$tmp/pids"
    fi
    if [[ -n ${BENCH_KEEP_TMP:-} ]]; then echo "bench: kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

python3 -B bench/bench.py --bins "$bins" --profile "$profile" --tmp "$tmp" "$@"
