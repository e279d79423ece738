#!/usr/bin/env python3
"""A/B of sidekey builds on the benchmark's cases, interleaved so that drift on the machine
falls on every build alike.

    # two builds, each a directory holding sidekey and examples/{mock_vendor,https_load}
    # (copy target/release/sidekey and target/release/examples/* after each build):
    python3 bench/ab.py --cases nginx,sk_miradore,sk_m3ter base=/tmp/base new=target/release

Each round runs every build once (the order alternates between rounds), one repetition of
each case per run (BENCH_DURATION, BENCH_WARMUP as for bench/run.sh). The table gives, per
case and build, the median CPU seconds per 10,000 requests over the rounds with its
(min–max), and the median's ratio to the first build; then each build's peak RSS. A difference is real only when the
ranges do not overlap. Needs what bench/run.sh needs (wrk, nginx, taskset, python3).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", required=True, help="bench.py case keys, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("builds", nargs="+", metavar="NAME=DIR")
    a = p.parse_args()
    builds = []
    for b in a.builds:
        name, sep, path = b.partition("=")
        if not sep or not os.path.isfile(os.path.join(path, "sidekey")):
            sys.exit(f"ab: {b!r}: want NAME=DIR with DIR/sidekey")
        builds.append((name, os.path.abspath(path)))
    cpu = {}  # (case, build) -> [cpu s / 10k]
    rss = {}  # (case, build) -> [peak RSS MiB]
    for r in range(a.rounds):
        order = builds if r % 2 == 0 else list(reversed(builds))
        for name, path in order:
            with tempfile.TemporaryDirectory(prefix="sidekey-ab.") as tmp:
                out = os.path.join(tmp, "results.json")
                run_tmp = os.path.join(tmp, "run")
                os.mkdir(run_tmp)
                subprocess.run(
                    [sys.executable, "-B", BENCH, "--bins", path, "--tmp", run_tmp, "--no-docs",
                     "--reps", "1", "--tenants", "0", "--cases", a.cases, "--json-out", out],
                    check=True, stdout=subprocess.DEVNULL,
                )
                with open(out) as f:
                    results = json.load(f)["results"]
            for case, runs in results.items():
                for run in runs:
                    cpu.setdefault((case, name), []).append(run["cpu_per_10k"])
                    rss.setdefault((case, name), []).append(run["hwm_mib"])
            print(f"ab: round {r + 1}/{a.rounds}: {name} done", file=sys.stderr)

    names = [n for n, _ in builds]
    cases = a.cases.split(",")
    print("| case | " + " | ".join(f"{n}: CPU s / 10k req" for n in names)
          + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(names) - 1))
    for case in cases:
        cells, meds = [], []
        for n in names:
            xs = [x for x in cpu.get((case, n), []) if x is not None]
            if not xs:
                cells.append("–")
                meds.append(None)
                continue
            m = statistics.median(xs)
            meds.append(m)
            cells.append(f"{m:.3f} ({min(xs):.3f}–{max(xs):.3f})")
        ratios = [f"{m / meds[0]:.3f}×" if m and meds[0] else "–" for m in meds[1:]]
        print(f"| {case} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    print()
    print("Peak RSS (MiB, largest over the rounds): " + "; ".join(
        f"{case} " + ", ".join(
            f"{n} {max(x for x in rss.get((case, n), [0]) if x is not None):.1f}" for n in names)
        for case in cases))


if __name__ == "__main__":
    main()
