#!/usr/bin/env python3
"""Side-by-side benchmark: sidekey vs nginx (same header injection) vs no proxy.

Started by bench/run.sh, which installs wrk and nginx, builds the binaries and owns the
temporary directory. This file starts the mock vendor, sidekey and nginx pinned to cores,
runs the same wrk load against every case, and writes a markdown report. Python 3 stdlib only.

Every process started here runs in its own session; its pid is appended to TMP/pids so that
run.sh's exit trap can kill it even if this script dies, and it is killed here on exit too.
"""

import argparse
import base64
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

# Fixed bench credentials: fake values, only the mock checks them.
TENANT = "acme"
MIRADORE_SITE = "acme"
MIRADORE_KEY = "benchMiradoreKey0123456789abcdef"
M3TER_ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"
M3TER_ACCESS_KEY = "bench-access-key"
M3TER_SECRET = "bench-m3ter-secret"
MAILKIT_ID = "12345"
MAILKIT_MD5 = "0123456789abcdef0123456789abcdef"
MAILKIT_BODY = '{"function":"mailkit.mailinglist.list","id":"0","md5":"x"}'

# The markers between which docs/benchmarks.md is regenerated; the rest is kept.
BEGIN = "<!-- BEGIN bench/run.sh: generated, do not edit by hand -->"
END = "<!-- END bench/run.sh -->"

MIB = 1024 * 1024
# Connections of the `*_many` cases; nginx's upstream keepalive is at least this.
MANY_CONNECTIONS = 128
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------
# Processes


class Procs:
    """Children started in their own sessions, killed (whole process group) on exit."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, argv, cpu=None, env=None):
        if cpu is not None:
            argv = ["taskset", "-c", str(cpu)] + argv
        logf = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        logf.close()
        with open(os.path.join(self.tmp, "pids"), "a") as f:
            f.write(f"{p.pid}\n")
        self.procs.append((name, p))
        return p

    def stop(self, p, timeout=10):
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()

    def stop_all(self):
        for _, p in reversed(self.procs):
            self.stop(p)

    def log_tail(self, name, n=20):
        try:
            with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def free_port():
    # Tiny race between closing and the server binding; acceptable on a quiet loopback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, pred, proc, procs, name, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited while waiting for {what}:\n{procs.log_tail(name)}")
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise BenchError(f"timed out waiting for {what}:\n{procs.log_tail(name)}")


def http_get_status(port, path, headers=None, method="GET", body=None, tls_ca=None):
    if tls_ca:
        ctx = ssl.create_default_context(cafile=tls_ca)
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    else:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, data
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# /proc readings


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            # After "pid (comm)": state is field 3; utime, stime are fields 14, 15.
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


def status_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak(pids):
    """Resets VmHWM to the current RSS (Linux >= 4.0), so each case reports its own peak."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def tree(pid):
    """pid and its direct children (nginx: master and worker)."""
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return pids


def thread_names(pid):
    names = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                n = f.read().strip()
            names[n] = names.get(n, 0) + 1
    except OSError:
        pass
    return names


# ---------------------------------------------------------------------------------------
# The parties


def start_mock(procs, bins, tmp, cpu, threads=1):
    ca_dir = os.path.join(tmp, "mock")
    p = procs.start(
        "mock_vendor",
        [
            os.path.join(bins, "examples", "mock_vendor"),
            "--port", "0",
            "--ca-dir", ca_dir,
            "--miradore-key", MIRADORE_KEY,
            "--mailkit-md5", MAILKIT_MD5,
            "--threads", str(threads),
        ],
        cpu=cpu,
    )
    port_file = os.path.join(ca_dir, "port")
    wait_until("the mock's port file", lambda: os.path.exists(port_file), p, procs, "mock_vendor", 30)
    with open(port_file) as f:
        port = int(f.read().strip())
    return p, port, os.path.join(ca_dir, "ca.pem")


def tenant_doc(i=None):
    suffix = "" if i is None else f"-{i:05d}"
    tid = TENANT if i is None else f"t{i:05d}"
    site = MIRADORE_SITE if i is None else f"site{i:05d}"
    key = MIRADORE_KEY if i is None else f"{MIRADORE_KEY}{i:05d}"
    return (
        f"  - id: {tid}\n"
        f"    miradore: {{ site: {site}, apiKey: {{ value: {key} }} }}\n"
        f"    m3ter:\n"
        f"      accessKeyId: {M3TER_ACCESS_KEY}{suffix}\n"
        f"      apiSecret: {{ value: {M3TER_SECRET}{suffix} }}\n"
        f"      orgId: {M3TER_ORG}\n"
        f"    mailkit: {{ clientId: \"{MAILKIT_ID}\", clientMd5: {{ value: {MAILKIT_MD5} }} }}\n"
    )


def write_tenants(path, extra=0):
    with open(path, "w") as f:
        f.write("tenants:\n")
        f.write(tenant_doc())
        for i in range(extra):
            f.write(tenant_doc(i))


def start_sidekey(procs, bins, tmp, name, cpu, ca, mock_port, tenants_file, intercept=None,
                  log_level="warn", workers=1):
    proxy_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update(
        SIDEKEY_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        # warn by default: one info line per request would measure the logger, not the proxy
        # (the `*_logs` cases measure it on purpose, at sidekey's default level, info).
        RUST_LOG=log_level,
        # One worker per core (taskset alone would give the same count, the variable makes
        # it explicit); with one, main.rs picks tokio's current-thread runtime.
        TOKIO_WORKER_THREADS=str(workers),
    )
    argv = [
        os.path.join(bins, "sidekey"), "serve",
        "--proxy-listen", f"127.0.0.1:{proxy_port}",
        "--grpc-listen", f"127.0.0.1:{grpc_port}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
        "--data-dir", os.path.join(tmp, f"{name}-data"),
        "--tenants-file", tenants_file,
        "--upstream-ca", ca,
    ]
    if intercept:
        # HTTPS interception (the CONNECT cases): the CA from `sidekey ca init`.
        argv += ["--intercept-ca-cert", intercept["cert"], "--intercept-ca-key", intercept["key"]]
    for host in ("online.miradore.com", "api.m3ter.com", "api.mailkit.eu"):
        argv += ["--connect-to", f"{host}:443:127.0.0.1:{mock_port}"]
    t0 = time.monotonic()
    p = procs.start(name, argv, cpu=cpu, env=env)
    wait_until(
        "sidekey /readyz",
        lambda: http_get_status(admin_port, "/readyz")[0] == 200,
        p, procs, name, 300,
    )
    return p, proxy_port, time.monotonic() - t0


# The injection and upstream settings of both nginx servers (plain and TLS-terminating).
NGINX_INJECT = """\
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host online.miradore.com;
            proxy_set_header X-API-Key $miradore_key;
            proxy_set_header X-Sidekey-Tenant "";
            proxy_ssl_name online.miradore.com;
            proxy_ssl_server_name on;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_session_reuse on;
            # Never spill a response to disk (sidekey streams from memory too), and read the
            # upstream in TLS-record-sized buffers: with the default 4k ones, nginx served
            # 64 KiB responses ~40 % slower in this benchmark; the reference gets its better
            # configuration.
            proxy_max_temp_file_size 0;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;"""

NGINX_CONF = """\
# Generated by bench/run.sh: nginx doing sidekey's Miradore v2 job (tenant header -> X-API-Key).
# One worker per core, as sidekey has one tokio worker per core (both pinned to the same cores).
worker_processes {workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    # nginx closes a keep-alive connection after 1000 requests by default (both sides);
    # sidekey does not, so neither does nginx here.
    keepalive_requests 1000000;
    keepalive_timeout 75s;

    # Tenant -> credential, as a platform team would template it; unknown tenants get 403
    # before any upstream work, as in sidekey.
    map $http_x_sidekey_tenant $miradore_key {{
        {tenant} "{key}";
        default "";
    }}

    upstream miradore {{
        server 127.0.0.1:{mock_port};
        keepalive {keepalive};
        keepalive_requests 1000000;
    }}

    # HTTPS case: nginx terminates the app's TLS (a leaf from the same local CA, ECDSA
    # P-256 like sidekey's) and does the same header injection.
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {tls_cert};
        ssl_certificate_key {tls_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            if ($miradore_key = "") {{ return 403; }}
            proxy_pass https://miradore;
{inject}
        }}
    }}

    # Access log on (the `*_logs` cases): nginx's default combined format to a file, written
    # per request as nginx does by default (no `buffer=`), like sidekey's request log.
    server {{
        listen 127.0.0.1:{logs_port};
        access_log {prefix}/access.log;
        location /miradore/ {{
            if ($miradore_key = "") {{ return 403; }}
            proxy_pass https://miradore/;
{inject}
        }}
    }}

    server {{
        listen 127.0.0.1:{port};
        location /miradore/ {{
            if ($miradore_key = "") {{ return 403; }}
            proxy_pass https://miradore/;
{inject}
        }}
    }}
}}
"""


def find_nginx():
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def start_nginx(procs, tmp, cpu, ca, mock_port, keepalive, tls, workers=1):
    prefix = os.path.join(tmp, "nginx")
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    # Run as root, nginx's worker switches to `nobody`, which must traverse to its temp dirs.
    os.chmod(tmp, 0o711)
    os.chmod(prefix, 0o755)
    port, tls_port, logs_port = free_port(), free_port(), free_port()
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            NGINX_CONF.format(
                prefix=prefix, port=port, mock_port=mock_port, ca=ca, tenant=TENANT,
                key=MIRADORE_KEY, keepalive=keepalive, tls_port=tls_port, logs_port=logs_port,
                tls_cert=tls["cert"], tls_key=tls["key"], inject=NGINX_INJECT.format(ca=ca),
                workers=workers,
            )
        )
    nginx = find_nginx()
    if not nginx:
        raise BenchError("nginx not found (bench/run.sh installs it)")
    # -e: the startup error log, before the config is read, must not go to /var/log/nginx.
    p = procs.start(
        "nginx",
        [nginx, "-p", prefix + "/", "-c", conf, "-e", os.path.join(prefix, "error.log")],
        cpu=cpu,
    )

    def ready():
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until("nginx to listen", ready, p, procs, "nginx", 30)
    return p, port, tls_port, logs_port


def make_intercept_ca(bins, tmp):
    """The interception CA (`sidekey ca init`), and a leaf from it for nginx's TLS server."""
    d = os.path.join(tmp, "intercept")
    subprocess.run([os.path.join(bins, "sidekey"), "ca", "init", "--out", d], check=True,
                   stdout=subprocess.DEVNULL)
    ca = {"cert": os.path.join(d, "ca.pem"), "key": os.path.join(d, "ca.key")}
    leaf_key, csr, leaf = (os.path.join(d, n) for n in ("nginx.key", "nginx.csr", "nginx.pem"))
    ext = os.path.join(d, "nginx.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:online.miradore.com\nextendedKeyUsage=serverAuth\n")
    for argv in (
        ["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", leaf_key],
        ["openssl", "req", "-new", "-key", leaf_key, "-subj", "/CN=online.miradore.com",
         "-out", csr],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca["cert"], "-CAkey", ca["key"],
         "-CAcreateserial", "-days", "1", "-sha256", "-extfile", ext, "-out", leaf],
    ):
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.chmod(d, 0o755)
    os.chmod(leaf_key, 0o644)  # nginx's master reads it as root; the tmp dir is private
    return ca, {"cert": leaf, "key": leaf_key}


# ---------------------------------------------------------------------------------------
# Load


def run_wrk(cpu, url, headers, duration, connections, threads, body_file=None, timeout_s=None):
    argv = [
        "taskset", "-c", str(cpu), "wrk",
        "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
        "--timeout", "2s", "--latency", "-s", os.path.join(BENCH_DIR, "wrk.lua"),
    ]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(url)
    env = dict(os.environ)
    env["BENCH_BODY_FILE"] = body_file or ""
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = p.communicate(timeout=timeout_s or duration + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise BenchError(f"wrk did not finish: {url}")
    m = re.search(r"^BENCH (.*)$", out, re.M)
    if p.returncode != 0 or not m:
        raise BenchError(f"wrk failed ({p.returncode}) on {url}:\n{out}\n{err}")
    return parse_bench_line(m.group(1))


def parse_bench_line(fields):
    """The `BENCH k=v ...` line of bench/wrk.lua and examples/https_load.rs, as numbers."""
    r = {}
    for kv in fields.split():
        k, v = kv.split("=", 1)
        r[k] = float(v)
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6) if r["duration_us"] else 0.0
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


def run_https_load(a, cpu, case, duration):
    """The HTTPS cases: examples/https_load.rs (wrk cannot CONNECT), same output line."""
    h = case["https"]
    argv = ["taskset", "-c", str(cpu), os.path.join(a.bins, "examples", "https_load"),
            "--addr", h["addr"], "--ca", h["ca"], "--path", h["path"],
            "--connections", str(case["connections"]), "--duration", str(duration)]
    if h.get("connect"):
        argv += ["--connect", h["connect"], "--tenant", TENANT]
    else:
        argv += ["--sni", h["sni"]]
    for k, v in case["headers"].items():
        argv += ["--header", f"{k}:{v}"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^BENCH (.*)$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise BenchError(f"https_load failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return parse_bench_line(m.group(1))


def run_load(a, case, duration):
    if "https" in case:
        return run_https_load(a, a.load_cpu, case, duration)
    return run_wrk(a.load_cpu, case["url"], case["headers"], duration, case["connections"],
                   a.wrk_threads, case.get("body_file"))


def pin(pids, cpu):
    """Moves every thread of pids to cpu (taskset -a -p)."""
    for pid in pids:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                       stdout=subprocess.DEVNULL, check=True)


def measure(case, a, parties):
    """One measured run of a case: wrk plus the proxy's (and the load core's) CPU and RSS."""
    proxy_pids = tree(parties[case["proxy"]].pid) if case["proxy"] else []
    mock_pid = parties["mock"].pid
    reset_ok = reset_peak(proxy_pids)
    before = cpu_ticks(proxy_pids)
    mock_before = cpu_ticks([mock_pid])
    # wrk's own CPU comes from its rusage (children's times of this process).
    ch0 = os.times()
    r = run_load(a, case, a.duration)
    ch1 = os.times()
    wall = r["duration_us"] / 1e6
    r["proxy_cpu_s"] = (cpu_ticks(proxy_pids) - before) / CLK_TCK if proxy_pids else None
    r["cpu_per_10k"] = (
        r["proxy_cpu_s"] / r["requests"] * 10000 if proxy_pids and r["requests"] else None
    )
    r["proxy_core_busy"] = r["proxy_cpu_s"] / wall if proxy_pids and wall else None
    wrk_cpu = (ch1.children_user - ch0.children_user) + (ch1.children_system - ch0.children_system)
    mock_cpu = (cpu_ticks([mock_pid]) - mock_before) / CLK_TCK
    r["load_core_busy"] = (wrk_cpu + mock_cpu) / wall if wall else None
    r["hwm_mib"] = sum(status_kib(p, "VmHWM") for p in proxy_pids) / 1024 if proxy_pids else None
    r["hwm_is_per_case"] = reset_ok
    return r


# ---------------------------------------------------------------------------------------
# Report


def profile(a, cases, parties):
    """perf record (cpu-clock: this VM has no hardware counters) of the proxy during a case."""
    if not cases or not cases[0]["proxy"]:
        raise BenchError("--perf needs a proxied case: " + a.perf)
    c = cases[0]
    if a.warmup:
        run_load(a, c, a.warmup)
    out_dir = os.path.join(REPO, "target", "bench")
    os.makedirs(out_dir, exist_ok=True)
    data = os.path.join(out_dir, f"perf-{c['key']}.data")
    pids = ",".join(str(p) for p in tree(parties[c["proxy"]].pid))  # nginx: master + worker
    # perf itself runs on the load core so that the proxy's core sees only the proxy.
    rec = subprocess.Popen(
        ["taskset", "-c", str(a.load_cpu), "perf", "record", "-e", "cpu-clock", "-F", "999",
         "--call-graph", "dwarf,32768", "-o", data, "-p", pids, "--", "sleep",
         str(a.duration)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    r = measure(c, a, parties)
    rec.wait(timeout=a.duration + 120)
    log(f"{c['key']} under perf: {r['rps']:.0f} req/s, {r['cpu_per_10k']:.3f} CPU s / 10k")
    flame = flamegraph(data, os.path.join(out_dir, f"flame-{c['key']}.svg"))
    # Second run, counting instead of sampling: syscalls, context switches and heap
    # allocations (uprobes on libc's allocator, which both proxies use) per request.
    events = ["raw_syscalls:sys_enter", "syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom",
              "syscalls:sys_enter_write", "syscalls:sys_enter_writev",
              "syscalls:sys_enter_sendto", "syscalls:sys_enter_epoll_wait",
              "syscalls:sys_enter_futex", "context-switches"]
    events += alloc_probes(parties[c["proxy"]].pid)
    stat_out = os.path.join(out_dir, f"perf-{c['key']}.stat")
    st = subprocess.Popen(
        ["taskset", "-c", str(a.load_cpu), "perf", "stat", "-x", ",", "-o", stat_out,
         "-e", ",".join(events), "-p", pids, "--", "sleep", str(a.duration)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    r2 = measure(c, a, parties)
    st.wait(timeout=a.duration + 60)
    out = os.path.join(out_dir, f"perf-{c['key']}.txt")
    with open(out, "w") as f:
        f.write(f"==== per request ({int(r2['requests'])} requests in "
                f"{r2['duration_us'] / 1e6:.1f} s, {r2['rps']:.0f} req/s) ====\n")
        allocs = 0.0
        try:
            with open(stat_out) as sf:
                for line in sf:
                    parts = line.strip().split(",")
                    if len(parts) > 2 and parts[0].replace(".", "").isdigit():
                        f.write(f"{parts[2]:<32} {float(parts[0]) / r2['requests']:8.2f}\n")
                        if parts[2].startswith("probe_"):
                            allocs += float(parts[0])
            if allocs:
                f.write(f"{'heap allocations (all three)':<32} {allocs / r2['requests']:8.2f}\n")
        except OSError:
            f.write("perf stat failed\n")
    reports = [
        ("where the CPU goes, by binary", ["--no-children", "--sort", "dso"]),
        ("self time by function", ["--no-children", "--sort", "dso,symbol"]),
        ("inclusive time by function", ["--children", "--sort", "symbol"]),
    ]
    with open(out, "a") as f:
        for title, opts in reports:
            f.write(f"==== {title} ====\n")
            f.flush()
            subprocess.run(
                ["perf", "report", "-i", data, "--stdio", "-g", "none", "--percent-limit", "0.3"]
                + opts,
                stdout=f, stderr=subprocess.DEVNULL, timeout=900,
            )
    if any(e.startswith("probe_") for e in events):
        # Third run: where the allocations come from (call graphs of the first probe).
        adata = os.path.join(out_dir, f"perf-{c['key']}-alloc.data")
        ar = subprocess.Popen(
            # A short window: every call is recorded with its stack (a uprobe is not sampled),
            # half a second of them is already a few hundred megabytes.
            ["taskset", "-c", str(a.load_cpu), "perf", "record", "-e",
             next(e for e in events if e.startswith("probe_")),
             "--call-graph", "dwarf,16384", "-o", adata, "-p", pids, "--", "sleep", "0.5"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        run_load(a, c, 2)
        ar.wait(timeout=120)
        with open(out, "a") as f:
            f.write("==== heap allocations by caller (allocator calls, with call chains) ====\n")
            f.flush()
            subprocess.run(
                ["perf", "report", "-i", adata, "--stdio", "--no-children", "-G",
                 "--percent-limit", "1", "--sort", "symbol"],
                stdout=f, stderr=subprocess.DEVNULL, timeout=900,
            )
        os.remove(adata)
    log(f"wrote {os.path.relpath(out, REPO)}")
    if flame:
        log(f"wrote {os.path.relpath(flame, REPO)}")
    return 0


# The allocation entry points counted: libc's (nginx, and sidekey built without mimalloc),
# or mimalloc's, linked into the sidekey binary (src/main.rs's global allocator).
LIBC_ALLOCATORS = ("malloc", "calloc", "realloc")
MIMALLOC_ALLOCATORS = ("mi_malloc_aligned", "mi_zalloc_aligned", "mi_realloc_aligned")


def alloc_probes(pid):
    """perf events counting calls into the process's allocator (uprobes, added once per
    binary); none when the kernel or perf cannot place them."""
    exe = os.path.realpath(f"/proc/{pid}/exe")
    symbols = subprocess.run(["nm", "--defined-only", exe], capture_output=True,
                             text=True).stdout if shutil.which("nm") else ""
    if " mi_malloc_aligned\n" in symbols:
        target, fns, group = exe, MIMALLOC_ALLOCATORS, "probe_" + os.path.basename(exe)
    else:
        target = None
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.split()[-1]
                    if "/libc.so" in path:
                        target = path
                        break
        except OSError:
            return []
        fns, group = LIBC_ALLOCATORS, "probe_libc"
    if not target:
        return []
    events = []
    for fn in fns:
        # Re-added each time: a probe on a rebuilt binary would point at stale offsets.
        subprocess.run(["perf", "probe", "-q", "-d", f"{group}:{fn}"], capture_output=True)
        added = subprocess.run(["perf", "probe", "-q", "-x", target, "--add", fn],
                               capture_output=True, text=True)
        if added.returncode != 0:
            log(f"no allocation counts: perf probe {fn}: {added.stderr.strip()[:200]}")
            return []
        events.append(f"{group}:{fn}")
    return events


def flamegraph(data, svg):
    """A CPU flame graph of a perf recording, with inferno (bench/run.sh --perf installs it
    from crates.io); None when it is not installed."""
    collapse, draw = shutil.which("inferno-collapse-perf"), shutil.which("inferno-flamegraph")
    if not (collapse and draw):
        log("no flame graph: inferno is not installed (cargo install --locked inferno)")
        return None
    script = subprocess.Popen(["perf", "script", "-i", data], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    folded = subprocess.run([collapse], stdin=script.stdout, capture_output=True, timeout=900)
    script.wait()
    with open(svg, "wb") as f:
        # Frames under 2 pixels wide are left out: they are unreadable and make the file big.
        subprocess.run([draw, "--title", os.path.basename(svg)[:-4], "--width", "1600",
                        "--minwidth", "2"],
                       input=folded.stdout, stdout=f, check=True, timeout=300)
    return svg


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_num(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def fmt_spread(xs, digits=0, scale=1.0):
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1:
        return fmt_num(m, digits)
    return f"{fmt_num(m, digits)} ({fmt_num(min(xs), digits)}–{fmt_num(max(xs), digits)})"


def us(x):
    """Microseconds as a short string: 812 µs, 1.24 ms."""
    if x is None:
        return "–"
    return f"{x / 1000:.2f} ms" if x >= 1000 else f"{x:.0f} µs"


def us_spread(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m = statistics.median(xs)
    if len(xs) == 1:
        return us(m)
    return f"{us(m)} ({us(min(xs))}–{us(max(xs))})"


def ratio(a, b):
    return a / b if a is not None and b else None


def capture(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def machine_info(a):
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    rev = capture(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"])
    # The commit that last changed what the binary is built from (bench-only commits don't).
    src_rev = capture(["git", "-C", REPO, "log", "-1", "--format=%h", "--", "src", "proto",
                       "build.rs", "Cargo.lock"])
    dirty = subprocess.run(
        ["git", "-C", REPO, "diff", "--quiet", "HEAD", "--", "src", "Cargo.toml", "Cargo.lock"]
    ).returncode
    return {
        "nproc": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "loadavg": open("/proc/loadavg").read().split()[:3],
        "sidekey": f"{rev} (sources as of {src_rev})"
        + (" (+ uncommitted changes)" if dirty else ""),
        "profile": a.profile,
        "nginx": capture([find_nginx() or "nginx", "-v"]),
        "wrk": capture(["wrk", "-v"]),
        "rustc": capture(["rustc", "-V"]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def report(a, info, cases, results, extra):
    R = {c["key"]: results[c["key"]] for c in cases}

    def m(key, field):
        return med([r[field] for r in R[key]]) if key in R else None

    L = []
    w = L.append
    if a.smoke:
        w("**Smoke run** (dev build, 1 s per case, no warm-up): it checks that every case runs "
          "and answers 2xx; its numbers say nothing about speed.")
        w("")
    w(f"Run {info['date']}: `bench/run.sh` with {a.reps} repetitions of {a.duration} s per case "
      f"(after a {a.warmup} s warm-up run of each), {info['profile']} build.")
    w("")
    w(f"- machine: {info['nproc']} CPUs (`nproc`), {info['cpu']}, Linux {info['kernel']}; "
      f"load average at start {' '.join(info['loadavg'])} (the cores are shared with other work)")
    w(f"- sidekey {info['sidekey']}; {info['nginx']}; {info['wrk'].split(' Copyright')[0]}; "
      f"{info['rustc']}")
    w(f"- pinning: proxy (sidekey with `TOKIO_WORKER_THREADS=1`, or nginx with 1 worker) on core "
      f"{a.proxy_cpu}; mock vendor (1-thread runtime) and wrk (`-t{a.wrk_threads}`) on core "
      f"{a.load_cpu}. wrk does not verify the mock's certificate in the direct case; nginx and "
      f"sidekey do.")
    threads = ", ".join(f"{n} ×{k}" for n, k in sorted(extra.get("sidekey_threads", {}).items()))
    w(f"- sidekey's threads (name ×count): {threads}; the `sidekey` main thread runs the "
      f"current-thread runtime (`TOKIO_WORKER_THREADS=1`), the others are tokio's blocking "
      f"pool (file and store work, idle under load)")
    w("")
    w("Medians over the repetitions, (min–max) after them. Latency is wrk's, from request "
      "written to response read, for completed requests. CPU is the proxy's user+system time "
      "(all its processes) during the measured run; peak RSS is VmHWM reset before each run "
      "(`/proc/PID/clear_refs`), summed over nginx's master and worker. \"load core\" is wrk's + "
      "the mock's CPU over the run: near 100 % means the load side, not the proxy, was the limit.")
    w("")
    w("| case | conns | requests/s | p50 | p99 | p99.9 | proxy CPU s / 10k req | proxy core busy | "
      "load core busy | peak RSS MiB | errors / non-2xx |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        rs = R[c["key"]]
        errs = sum(r["errors"] for r in rs)
        non2xx = sum(r["status"] for r in rs)
        w(
            f"| {c['label']} | {c['connections']} "
            f"| {fmt_spread([r['rps'] for r in rs])} "
            f"| {us_spread([r['p50'] for r in rs])} "
            f"| {us_spread([r['p99'] for r in rs])} "
            f"| {us_spread([r['p999'] for r in rs])} "
            f"| {fmt_spread([r['cpu_per_10k'] for r in rs], 3)} "
            f"| {fmt_spread([r['proxy_core_busy'] for r in rs], 0, 100)}{' %' if c['proxy'] else ''} "
            f"| {fmt_spread([r['load_core_busy'] for r in rs], 0, 100)} % "
            f"| {fmt_spread([r['hwm_mib'] for r in rs], 1)} "
            f"| {int(errs)} / {int(non2xx)} |"
        )
    w("")

    if a.smoke:
        return "\n".join(L) + "\n"

    # Ratios: per-metric medians divided.
    w("Ratios of the medians (sidekey's Miradore v2 rule is the same job as the nginx config):")
    w("")
    w("| comparison | requests/s | p50 | p99 | p99.9 | CPU / request |")
    w("|---|---:|---:|---:|---:|---:|")

    def ratio_row(label, k1, k2):
        if k1 not in R or k2 not in R:
            return
        cells = [ratio(m(k1, f), m(k2, f)) for f in ("rps", "p50", "p99", "p999", "cpu_per_10k")]
        w(f"| {label} | " + " | ".join("–" if x is None else f"{x:.2f}×" for x in cells) + " |")

    ratio_row("sidekey / nginx (Miradore v2)", "sk_miradore", "nginx")
    ratio_row("sidekey / direct (Miradore v2)", "sk_miradore", "direct")
    ratio_row("nginx / direct", "nginx", "direct")
    ratio_row("sidekey m3ter / nginx", "sk_m3ter", "nginx")
    ratio_row("sidekey Mailkit / nginx", "sk_mailkit", "nginx")
    ratio_row("sidekey / nginx, logs on (request log vs access log)", "sk_logs", "nginx_logs")
    ratio_row("sidekey / nginx, 64 KiB responses", "sk_large", "nginx_large")
    ratio_row("sidekey / direct, 64 KiB responses", "sk_large", "direct_large")
    ratio_row(f"sidekey / nginx, {MANY_CONNECTIONS} connections", "sk_many", "nginx_many")
    ratio_row("sidekey / nginx, 1 connection", "sk_c1", "nginx_c1")
    ratio_row("sidekey / nginx, HTTPS from the app (CONNECT vs TLS)", "sk_https", "nginx_https")
    ratio_row("sidekey / nginx, 1 connection, one core", "sk_c1_1core", "nginx_c1_1core")
    w("")

    if "tenants_10k" in extra:
        t = extra["tenants_10k"]
        w(f"sidekey with {t['tenants']:,} tenants (each with Miradore, m3ter and Mailkit "
          f"connections) from `--tenants-file`: ready in {t['ready_s']:.1f} s, then VmRSS "
          f"{t['rss_mib']:.1f} MiB, VmHWM {t['hwm_mib']:.1f} MiB; after {t['requests']} requests "
          f"for the last tenant VmHWM {t['hwm_after_mib']:.1f} MiB. For comparison, with 1 tenant "
          f"sidekey was at VmRSS {extra['idle_rss_mib']:.1f} MiB when ready.")
        w("")

    # Targets.
    sk_rps, ng_rps = m("sk_miradore", "rps"), m("nginx", "rps")
    sk_p99, ng_p99 = m("sk_miradore", "p99"), m("nginx", "p99")
    def added(k1, k2):
        return m(k1, "p50") - m(k2, "p50") if m(k1, "p50") is not None and m(k2, "p50") is not None else None

    add_c1 = added("sk_c1_1core", "direct_c1")
    add_c1_cores = added("sk_c1", "direct_c1")
    add_ngx = added("nginx_c1_1core", "direct_c1")
    add_loaded = added("sk_miradore", "direct")
    sk_keys = [c["key"] for c in cases if c["proxy"] in ("sidekey", "sidekey_logs")]
    peak = max((r["hwm_mib"] for k in sk_keys for r in R[k] if r["hwm_mib"] is not None),
               default=None)
    many = extra.get("tenants_10k", {})
    t10k = many.get("hwm_after_mib") if many.get("tenants", 0) >= 10000 else None

    def verdict(ok):
        return "–" if ok is None else ("**met**" if ok else "**missed**")

    w("| target | measured | |")
    w("|---|---|---|")
    w(f"| throughput through sidekey ≥ nginx's (header injection, {a.connections} connections) "
      f"| {fmt_num(sk_rps)} vs {fmt_num(ng_rps)} req/s ({fmt_num(ratio(sk_rps, ng_rps), 2)}×) "
      f"| {verdict(None if sk_rps is None or ng_rps is None else sk_rps >= ng_rps)} |")
    w(f"| p99 through sidekey ≤ nginx's | {us(sk_p99)} vs {us(ng_p99)} "
      f"| {verdict(None if sk_p99 is None or ng_p99 is None else sk_p99 <= ng_p99)} |")
    w(f"| sidekey's added p50 over direct ≤ 100 µs (1 connection, all on one core) "
      f"| {us(add_c1)} (nginx: {us(add_ngx)}; proxy on its own core: {us(add_c1_cores)}; "
      f"under {a.connections}-connection load: {us(add_loaded)}) "
      f"| {verdict(None if add_c1 is None else add_c1 <= 100)} |")
    sk_h, ng_h = m("sk_https", "cpu_per_10k"), m("nginx_https", "cpu_per_10k")
    w(f"| CPU per request through sidekey ≤ nginx's, HTTPS from the app (CONNECT + "
      f"interception vs nginx terminating TLS) | {fmt_num(sk_h, 3)} vs {fmt_num(ng_h, 3)} "
      f"CPU s / 10k req | {verdict(None if sk_h is None or ng_h is None else sk_h <= ng_h)} |")
    w(f"| sidekey peak RSS under load ≤ 32 MiB | {fmt_num(peak, 1)} MiB (largest over all sidekey "
      f"cases) | {verdict(None if peak is None else peak <= 32)} |")
    w(f"| sidekey RSS with 10,000 tenants ≤ 64 MiB | {fmt_num(t10k, 1)} MiB (VmHWM) "
      f"| {verdict(None if t10k is None else t10k <= 64)} |")
    return "\n".join(L) + "\n"


def write_docs(path, body):
    try:
        with open(path) as f:
            doc = f.read()
    except FileNotFoundError:
        doc = "# Benchmarks\n"
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in doc and END in doc:
        pre, rest = doc.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        doc = pre + block + post
    else:
        doc = doc.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(doc)


# ---------------------------------------------------------------------------------------
# Main


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.join(REPO, "bench")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bins", required=True, help="target/release or target/debug")
    p.add_argument("--profile", default="release")
    p.add_argument("--tmp", required=True, help="scratch directory (owned by run.sh)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", "3")))
    p.add_argument("--duration", type=int, default=int(os.environ.get("BENCH_DURATION", "10")))
    p.add_argument("--warmup", type=int, default=int(os.environ.get("BENCH_WARMUP", "3")))
    p.add_argument("--connections", type=int,
                   default=int(os.environ.get("BENCH_CONNECTIONS", "32")))
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--tenants", type=int, default=int(os.environ.get("BENCH_TENANTS", "10000")))
    p.add_argument("--docs", default=os.path.join(REPO, "docs", "benchmarks.md"))
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--json-out", metavar="FILE",
                   help="also write the raw results of the measured cases here (bench/ab.py)")
    p.add_argument("--cases", metavar="KEY,KEY",
                   help="run only these cases (e.g. nginx,sk_miradore) and print their "
                        "medians instead of the report: for A/B runs of one change")
    p.add_argument("--perf", metavar="CASE",
                   help="profile the proxy during one case (e.g. sk_miradore) with perf record; "
                        "writes target/bench/perf-CASE.txt; no report, no docs")
    a = p.parse_args()
    if a.perf:
        a.reps, a.tenants, a.no_docs = 1, 0, True
    if a.smoke:
        a.reps, a.duration, a.warmup, a.tenants, a.no_docs = 1, 1, 0, 200, True
    cores = sorted(os.sched_getaffinity(0))
    # Proxy alone on one core; the load side (wrk + mock) on another. With one core, all share.
    a.proxy_cpu = cores[0]
    a.load_cpu = cores[1] if len(cores) > 1 else cores[0]
    return a


def main():
    a = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs(a.tmp)
    t_start = time.monotonic()
    try:
        return run(a, procs)
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        procs.stop_all()
        log(f"total {time.monotonic() - t_start:.1f} s")


def run(a, procs):
    info = machine_info(a)
    log(f"cores: proxy on {a.proxy_cpu}, wrk + mock on {a.load_cpu}; {a.reps} reps x "
        f"{a.duration} s")
    mock, mock_port, ca = start_mock(procs, a.bins, a.tmp, a.load_cpu)
    tenants_file = os.path.join(a.tmp, "tenants.yaml")
    write_tenants(tenants_file)
    intercept, nginx_tls = make_intercept_ca(a.bins, a.tmp)
    sk, sk_port, _ = start_sidekey(procs, a.bins, a.tmp, "sidekey", a.proxy_cpu, ca, mock_port,
                                   tenants_file, intercept)
    idle_rss = status_kib(sk.pid, "VmRSS") / 1024
    sk_threads = thread_names(sk.pid)
    parties = {"mock": mock, "sidekey": sk}
    # nginx only when a case asks for it: a run of sidekey's cases alone (deploy/build-pgo.sh's
    # training run) needs no nginx installed.
    if not a.cases or any(k.startswith("nginx") for k in a.cases.split(",")):
        ngx, ngx_port, ngx_tls_port, ngx_logs_port = start_nginx(
            procs, a.tmp, a.proxy_cpu, ca, mock_port, max(a.connections, MANY_CONNECTIONS),
            nginx_tls)
        parties["nginx"] = ngx
    else:
        ngx = ngx_port = ngx_tls_port = ngx_logs_port = None
    # A second sidekey at its default log level (info: one request line per request), its
    # log going to a file, for the logs-on case; started only when that case runs.
    if not a.cases or "sk_logs" in a.cases.split(",") or a.perf == "sk_logs":
        sk_logs, sk_logs_port, _ = start_sidekey(
            procs, a.bins, a.tmp, "sidekey_logs", a.proxy_cpu, ca, mock_port, tenants_file,
            log_level="info")
        parties["sidekey_logs"] = sk_logs
    else:
        sk_logs_port = None

    body_file = os.path.join(a.tmp, "mailkit.json")
    with open(body_file, "w") as f:
        f.write(MAILKIT_BODY)
    th = {"x-sidekey-tenant": TENANT}
    mir = "/miradore/acme/api/v2/Device"
    mir_https = "/api/v2/Device"
    m3 = f"/m3ter/organizations/{M3TER_ORG}/meters"
    direct = f"https://127.0.0.1:{mock_port}"
    ngx_url = f"http://127.0.0.1:{ngx_port}"
    sk_url = f"http://127.0.0.1:{sk_port}"
    C = a.connections
    cases = [
        dict(key="direct", label="direct to the mock (TLS, no proxy)", proxy=None,
             url=f"{direct}/acme/api/v2/Device", headers={}),
        dict(key="nginx", label="nginx, header injection", proxy="nginx",
             url=ngx_url + mir, headers=th),
        dict(key="sk_miradore", label="sidekey, Miradore v2 (header)", proxy="sidekey",
             url=sk_url + mir, headers=th),
        dict(key="sk_m3ter", label="sidekey, m3ter (cached token)", proxy="sidekey",
             url=sk_url + m3, headers=th),
        dict(key="sk_mailkit", label="sidekey, Mailkit JSON body rewrite", proxy="sidekey",
             url=sk_url + "/mailkit/json.fcgi", headers=th, body_file=body_file),
        # Logs on: nginx's access log vs sidekey's request log (info), each to a file.
        dict(key="nginx_logs", label="nginx, header injection, access log to a file",
             proxy="nginx", url=f"http://127.0.0.1:{ngx_logs_port}{mir}", headers=th),
        dict(key="sk_logs", label="sidekey, Miradore v2, request log (info) to a file",
             proxy="sidekey_logs", url=f"http://127.0.0.1:{sk_logs_port}{mir}", headers=th),
        # HTTPS from the app: TLS to sidekey through CONNECT (interception) vs TLS to nginx,
        # each terminating it and injecting the Miradore header; same load client.
        dict(key="nginx_https", label="nginx, app TLS terminated, header injection",
             proxy="nginx", url=f"https://online.miradore.com{mir_https}", headers=th,
             https=dict(addr=f"127.0.0.1:{ngx_tls_port}", sni="online.miradore.com",
                        ca=intercept["cert"], path=mir_https)),
        dict(key="sk_https", label="sidekey, CONNECT + interception, Miradore v2",
             proxy="sidekey", url=f"https://online.miradore.com{mir_https}", headers={},
             https=dict(addr=f"127.0.0.1:{sk_port}", connect="online.miradore.com",
                        ca=intercept["cert"], path=mir_https)),
        dict(key="direct_large", label="direct, 64 KiB responses", proxy=None,
             url=f"{direct}/acme/api/v2/Device?size=large", headers={}),
        dict(key="nginx_large", label="nginx, 64 KiB responses", proxy="nginx",
             url=ngx_url + mir + "?size=large", headers=th),
        dict(key="sk_large", label="sidekey, Miradore v2, 64 KiB responses", proxy="sidekey",
             url=sk_url + mir + "?size=large", headers=th),
        # More requests in flight than a small upstream idle pool holds (sidekey's kept 32
        # per host, which this case would have shown as a handshake per request over 32).
        dict(key="nginx_many", label=f"nginx, {MANY_CONNECTIONS} connections", proxy="nginx",
             url=ngx_url + mir, headers=th, connections=MANY_CONNECTIONS),
        dict(key="sk_many", label=f"sidekey, Miradore v2, {MANY_CONNECTIONS} connections",
             proxy="sidekey", url=sk_url + mir, headers=th, connections=MANY_CONNECTIONS),
        # One connection: latency without queueing. First with the proxy on its own core as
        # above; then with the proxy moved onto the load core, so that a request never waits
        # for an idle core to wake (tens of µs per hop on a VM), which isolates the proxy's
        # own added latency.
        dict(key="direct_c1", label="direct, 1 connection", proxy=None,
             url=f"{direct}/acme/api/v2/Device", headers={}, connections=1),
        dict(key="nginx_c1", label="nginx, 1 connection", proxy="nginx",
             url=ngx_url + mir, headers=th, connections=1),
        dict(key="sk_c1", label="sidekey, Miradore v2, 1 connection", proxy="sidekey",
             url=sk_url + mir, headers=th, connections=1),
        dict(key="nginx_c1_1core", label="nginx, 1 connection, all on one core", proxy="nginx",
             url=ngx_url + mir, headers=th, connections=1, one_core=True),
        dict(key="sk_c1_1core", label="sidekey, Miradore v2, 1 connection, all on one core",
             proxy="sidekey", url=sk_url + mir, headers=th, connections=1, one_core=True),
    ]
    for c in cases:
        c.setdefault("connections", C)
    if a.cases:
        wanted = a.cases.split(",")
        unknown = set(wanted) - {c["key"] for c in cases}
        if unknown:
            raise BenchError(f"--cases: unknown {sorted(unknown)}; known: "
                             f"{', '.join(c['key'] for c in cases)}")
        cases = [c for c in cases if c["key"] in wanted]

    # Pre-flight: one request per case with a verifying client, so a misconfiguration fails
    # here with the answer in the message rather than as a table of errors.
    for c in cases:
        if "https" in c:
            r = run_https_load(a, a.load_cpu, dict(c, connections=1), 1)
            if r["requests"] <= 0 or r["errors"] or r["status"]:
                raise BenchError(f"pre-flight {c['label']}: {r}")
            continue
        port = int(c["url"].split(":")[2].split("/")[0])
        path = "/" + c["url"].split("/", 3)[3]
        body = MAILKIT_BODY if c.get("body_file") else None
        headers = dict(c["headers"])
        if body:
            headers["content-type"] = "application/json"
        status, data = http_get_status(
            port, path, headers, "POST" if body else "GET", body,
            tls_ca=ca if c["url"].startswith("https") else None,
        )
        if status != 200:
            raise BenchError(f"pre-flight {c['label']}: {status} {data[:300]!r}")

    if a.perf:
        return profile(a, [c for c in cases if c["key"] == a.perf], parties)

    results = {c["key"]: [] for c in cases}
    for rep in range(a.reps):
        for c in cases:
            moved = tree(parties[c["proxy"]].pid) if c["proxy"] and c.get("one_core") else []
            pin(moved, a.load_cpu)
            if a.warmup:
                run_load(a, c, a.warmup)
            r = measure(c, a, parties)
            pin(moved, a.proxy_cpu)
            results[c["key"]].append(r)
            log(f"rep {rep + 1}/{a.reps} {c['key']:<13} {r['rps']:>9.0f} req/s  "
                f"p50 {us(r['p50']):>8}  p99 {us(r['p99']):>8}  p99.9 {us(r['p999']):>8}  "
                f"errors {int(r['errors'])} non-2xx {int(r['status'])}")
            for name, p in parties.items():
                if p.poll() is not None:
                    raise BenchError(f"{name} exited during the run:\n{procs.log_tail(name)}")

    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=1)
    if a.cases:
        for c in cases:
            rs = results[c["key"]]
            med = lambda k: statistics.median(r[k] for r in rs)
            print(f"{c['key']:<13} {med('rps'):>9.0f} req/s  p50 {us(med('p50')):>8}  "
                  f"p99 {us(med('p99')):>8}  CPU s/10k "
                  + (f"{med('cpu_per_10k'):.3f}" if c["proxy"] else "-"))
        return 0

    extra = {"idle_rss_mib": idle_rss, "sidekey_threads": sk_threads}

    # Many tenants: a fresh sidekey (own data dir) with N+1 tenants, RSS once ready.
    if a.tenants:
        procs.stop(sk)
        procs.stop(ngx)
        big = os.path.join(a.tmp, "tenants-big.yaml")
        write_tenants(big, a.tenants)
        sk2, sk2_port, ready_s = start_sidekey(procs, a.bins, a.tmp, "sidekey-tenants",
                                               a.proxy_cpu, ca, mock_port, big)
        t = {
            "tenants": a.tenants,
            "ready_s": ready_s,
            "rss_mib": status_kib(sk2.pid, "VmRSS") / 1024,
            "hwm_mib": status_kib(sk2.pid, "VmHWM") / 1024,
        }
        last = f"t{a.tenants - 1:05d}"
        n = 100
        for _ in range(n):
            status, data = http_get_status(
                sk2_port, f"/miradore/site{a.tenants - 1:05d}/api/v2/Device",
                {"x-sidekey-tenant": last},
            )
            # The mock expects the bench tenant's key, so 401 proves the last tenant's own
            # key was injected and the request made the round trip.
            if status != 401 or b"X-API-Key" not in data:
                raise BenchError(f"{a.tenants} tenants: request answered {status} {data[:200]!r}")
        t["requests"] = n
        t["hwm_after_mib"] = status_kib(sk2.pid, "VmHWM") / 1024
        extra["tenants_10k"] = t
        log(f"{a.tenants} tenants: ready {ready_s:.1f} s, VmRSS {t['rss_mib']:.1f} MiB, "
            f"VmHWM {t['hwm_after_mib']:.1f} MiB")
        procs.stop(sk2)

    raw = os.path.join(a.tmp, "results.json")
    with open(raw, "w") as f:
        json.dump({"info": info, "results": results, "extra": extra}, f, indent=1)
    text = report(a, info, cases, results, extra)
    print(text)

    # Smoke assertions (checked in every mode): each case ran, counted requests, no errors.
    bad = []
    for c in cases:
        for r in results[c["key"]]:
            if r["requests"] <= 0 or r["errors"] > 0 or r["status"] > 0:
                bad.append(f"{c['key']}: requests {int(r['requests'])}, errors "
                           f"{int(r['errors'])}, non-2xx {int(r['status'])}")
    if bad:
        raise BenchError("cases with no requests, errors or non-2xx answers:\n  " + "\n  ".join(bad))
    if not a.no_docs:
        write_docs(a.docs, text)
        log(f"wrote {os.path.relpath(a.docs, REPO)}")
    out_dir = os.path.join(REPO, "target", "bench")
    os.makedirs(out_dir, exist_ok=True)
    shutil.copy(raw, os.path.join(out_dir, "last-run.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
