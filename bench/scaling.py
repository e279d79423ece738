#!/usr/bin/env python3
"""Multi-core scaling: requests/s through nginx and sidekey on one core, then on two.

Issue 17's target: from one core to two, sidekey's throughput on the Miradore header job
scales by at least 1.8x, with nginx (1, then 2 worker processes) as the reference. Each proxy
runs alone on its cores with one worker per core (sidekey: `TOKIO_WORKER_THREADS`, which
gives tokio's current-thread runtime for 1 and its multi-thread runtime for 2); the mock
vendor (one thread per load core) and wrk share the remaining cores, which must keep up
with two proxy cores: the table's "load cores busy" column says whether they did (near 100 %
means the load side, not the proxy, was the limit, and the ratio is a floor).

    python3 -B bench/scaling.py --bins DIR        # DIR: sidekey and examples/mock_vendor
                                                  # (bench/run.sh builds them in
                                                  # target/bench-bins)

Needs at least 6 CPUs (2 for the proxy, 4 for the load): with fewer, the load would share
the proxy's cores and the ratio would measure that contention. `--shared-cores` runs anyway,
to check the script itself (CI does, for a second); its numbers mean nothing. Needs what
bench/run.sh needs (wrk, nginx, taskset); nothing listens outside 127.0.0.1, and every
process started is stopped on exit.
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the side-by-side benchmark's parties and load)

MIN_CPUS = 6


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bins", required=True,
                   help="directory with sidekey and examples/mock_vendor")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of load before each arm")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--shared-cores", action="store_true",
                   help="run on fewer than 6 CPUs, the load sharing the proxy's cores "
                        "(checks the script; the numbers mean nothing)")
    return p.parse_args()


def core_sets(a):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= MIN_CPUS:
        return cpus[:1], cpus[:2], cpus[2:]
    if not a.shared_cores:
        raise bench.BenchError(
            f"{len(cpus)} CPUs available, {MIN_CPUS} needed (2 for the proxy, the rest for "
            f"the mock and wrk); --shared-cores runs anyway, with meaningless numbers")
    bench.log(f"--shared-cores: {len(cpus)} CPUs; the load shares the proxy's cores")
    return cpus[:1], cpus[:2], cpus


def taskset_list(cores):
    return ",".join(str(c) for c in cores)


def measure_arm(a, proc, url, load_cores):
    """Warm-up, then `reps` runs of wrk: requests/s and the proxy's CPU per request."""
    headers = {"x-sidekey-tenant": bench.TENANT}
    wrk_threads = max(1, len(load_cores) // 2)
    load = taskset_list(load_cores)
    if a.warmup:
        bench.run_wrk(load, url, headers, a.warmup, a.connections, wrk_threads)
    runs = []
    for _ in range(a.reps):
        pids = bench.tree(proc.pid)
        before = bench.cpu_ticks(pids)
        ch0 = os.times()
        r = bench.run_wrk(load, url, headers, a.duration, a.connections, wrk_threads)
        ch1 = os.times()
        if r["errors"] or r["status"]:
            raise bench.BenchError(f"{url}: {r['errors']:.0f} errors, {r['status']:.0f} non-2xx")
        wall = r["duration_us"] / 1e6
        cpu_s = (bench.cpu_ticks(pids) - before) / bench.CLK_TCK
        r["cpu_per_10k"] = cpu_s / r["requests"] * 10000 if r["requests"] else None
        r["proxy_cpu_s"] = cpu_s
        r["wall"] = wall
        r["wrk_cpu_s"] = ((ch1.children_user - ch0.children_user)
                          + (ch1.children_system - ch0.children_system))
        runs.append(r)
    return runs


def summary(runs, key):
    xs = [r[key] for r in runs]
    return statistics.median(xs), min(xs), max(xs)


def run(a, procs, tmp):
    one, two, load_cores = core_sets(a)
    bench.log(f"proxy on {taskset_list(one)} then {taskset_list(two)}; mock and wrk on "
              f"{taskset_list(load_cores)}; {a.reps} x {a.duration} s per arm")
    mock, mock_port, ca = bench.start_mock(procs, a.bins, tmp, taskset_list(load_cores),
                                           threads=max(1, len(load_cores) // 2))
    tenants_file = os.path.join(tmp, "tenants.yaml")
    bench.write_tenants(tenants_file)
    _, nginx_tls = bench.make_intercept_ca(a.bins, tmp)
    mir = "/miradore/acme/api/v2/Device"
    results = {}
    for proxy in ("nginx", "sidekey"):
        for cores in (one, two):
            workers = len(cores)
            arm_tmp = os.path.join(tmp, f"{proxy}-{workers}")
            os.makedirs(arm_tmp)
            if proxy == "nginx":
                p, port, _, _ = bench.start_nginx(procs, arm_tmp, taskset_list(cores), ca,
                                                  mock_port, a.connections, nginx_tls,
                                                  workers=workers)
            else:
                p, port, _ = bench.start_sidekey(procs, a.bins, arm_tmp, f"sidekey-{workers}",
                                                 taskset_list(cores), ca, mock_port,
                                                 tenants_file, workers=workers)
            mock_before = bench.cpu_ticks([mock.pid])
            runs = measure_arm(a, p, f"http://127.0.0.1:{port}{mir}", load_cores)
            mock_cpu = (bench.cpu_ticks([mock.pid]) - mock_before) / bench.CLK_TCK
            load_busy = ((mock_cpu + sum(r["wrk_cpu_s"] for r in runs))
                         / sum(r["wall"] for r in runs) / len(load_cores))
            results[(proxy, workers)] = (runs, load_busy)
            rps = summary(runs, "rps")[0]
            bench.log(f"{proxy} on {workers} core(s): {rps:,.0f} req/s")
            procs.stop(p)
    report(a, results, one, two, load_cores)


def report(a, results, one, two, load_cores):
    print(f"Multi-core scaling, {a.reps} x {a.duration} s per arm, {a.connections} connections; "
          f"proxy on core(s) {taskset_list(one)} then {taskset_list(two)}, mock and wrk on "
          f"{taskset_list(load_cores)}" + (" (shared: numbers meaningless)"
                                           if a.shared_cores else "") + ".\n")
    print("| proxy | cores (workers) | requests/s | CPU s / 10k req | proxy cores busy "
          "| load cores busy |")
    print("|---|---:|---:|---:|---:|---:|")
    for (proxy, workers), (runs, load_busy) in results.items():
        rps, lo, hi = summary(runs, "rps")
        cpu = summary(runs, "cpu_per_10k")[0]
        busy = statistics.median(r["proxy_cpu_s"] / r["wall"] / workers for r in runs)
        print(f"| {proxy} | {workers} | {rps:,.0f} ({lo:,.0f}–{hi:,.0f}) | {cpu:.3f} "
              f"| {busy * 100:.0f} % | {load_busy * 100:.0f} % |")
    print()
    for proxy in ("nginx", "sidekey"):
        r1 = summary(results[(proxy, 1)][0], "rps")
        r2 = summary(results[(proxy, 2)][0], "rps")
        # The ratio's range: worst and best pairing of the two arms' runs.
        print(f"- {proxy}: 2 cores / 1 core = {r2[0] / r1[0]:.2f}x "
              f"({r2[1] / r1[2]:.2f}–{r2[2] / r1[1]:.2f})")
    print("- target: sidekey >= 1.8x")


def main():
    a = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="sidekey-scaling.") as tmp:
        os.chmod(tmp, 0o711)
        procs = bench.Procs(tmp)
        t0 = time.monotonic()
        try:
            run(a, procs, tmp)
            return 0
        except bench.BenchError as e:
            bench.log(f"FAILED: {e}")
            return 1
        finally:
            procs.stop_all()
            bench.log(f"total {time.monotonic() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
