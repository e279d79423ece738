"""Driver of .ci/metrics-check: checks that docs/operations.md shows the example alerts as
they are, starts the mock vendor and sidekey on ephemeral ports, sends traffic through
Miradore and m3ter and one refusal, checks `sidekey health`, then scrapes /metrics and runs
`promtool check metrics` on the scrape."""

import argparse
import base64
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

from harness import DEADLINE_S, Harness, free_port, ready

TENANT = "acme"
MIRADORE_SITE = "Acme1"
MIRADORE_KEY = "ci-miradore-key"
M3TER_ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"
MAILKIT_MD5 = "0123456789abcdef0123456789abcdef"
# Families the traffic below must have produced, with the process ones.
EXPECTED = [
    "sidekey_proxy_requests_total",
    "sidekey_proxy_request_duration_seconds",
    "sidekey_token_exchanges_total",
    "sidekey_token_cache_hits_total",
    "sidekey_tenants_configured",
    "sidekey_tenants_file_applies_total",
    "sidekey_store_healthy",
    "sidekey_build_info",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
]


def fail(msg):
    sys.exit(f"metrics-check: {msg}")


def get(url, headers=None):
    """(status, body) of a GET; sidekey's refusals are answers too."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def check_docs_alerts():
    """docs/operations.md shows deploy/prometheus/alerts.yaml (after its header comment)."""
    rules = open("deploy/prometheus/alerts.yaml").read()
    rules = "".join(l for l in rules.splitlines(keepends=True) if not l.startswith("#"))
    docs = open("docs/operations.md").read()
    section = docs.split("### Alerts\n", 1)[-1]
    block = section.split("```yaml\n", 1)[-1].split("```", 1)[0]
    if block != rules:
        fail("the alerts shown in docs/operations.md (### Alerts) differ from "
             "deploy/prometheus/alerts.yaml")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bins", required=True)
    a = p.parse_args()
    check_docs_alerts()
    with Harness("metrics-check", "sidekey-metrics.") as h:
        run(a, h)


def run(a, h):
    tmp = h.tmp
    sidekey = os.path.join(a.bins, "sidekey")
    mock_port, mock_dir = h.start_mock(
        a.bins, "--miradore-key", MIRADORE_KEY, "--mailkit-md5", MAILKIT_MD5)

    tenants = os.path.join(tmp, "tenants.yaml")
    with open(tenants, "w") as f:
        f.write(textwrap.dedent(f"""\
            tenants:
              - id: {TENANT}
                miradore: {{ site: {MIRADORE_SITE}, apiKey: {{ value: {MIRADORE_KEY} }} }}
                m3ter:
                  accessKeyId: ci-access-key
                  apiSecret: {{ value: ci-api-secret }}
                  orgId: {M3TER_ORG}
            """))
    proxy_port, admin_port = free_port(), free_port()
    env = dict(os.environ, SIDEKEY_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
               RUST_LOG="warn")
    argv = [
        sidekey, "serve",
        "--proxy-listen", f"127.0.0.1:{proxy_port}",
        "--grpc-listen", f"127.0.0.1:{free_port()}",
        "--admin-listen", f"127.0.0.1:{admin_port}",
        "--data-dir", os.path.join(tmp, "data"),
        "--tenants-file", tenants, "--tenants-file-interval", "100ms",
        "--upstream-ca", os.path.join(mock_dir, "ca.pem"),
    ]
    for host in ("online.miradore.com", "api.m3ter.com", "ingest.m3ter.com"):
        argv += ["--connect-to", f"{host}:443:127.0.0.1:{mock_port}"]
    sk = h.start(argv, env=env)
    h.wait_until("sidekey /readyz", lambda: ready(admin_port), sk)

    health = subprocess.run([sidekey, "health", "--admin", f"127.0.0.1:{admin_port}"],
                            capture_output=True, text=True, timeout=DEADLINE_S)
    if health.returncode != 0:
        fail(f"sidekey health exited {health.returncode} on a ready sidekey: {health.stderr}")

    proxy = f"http://127.0.0.1:{proxy_port}"
    traffic = [
        (TENANT, f"/miradore/{MIRADORE_SITE}/api/v2/Device", 200),
        # Twice: one exchange, then a token from the cache.
        (TENANT, f"/m3ter/organizations/{M3TER_ORG}/meters", 200),
        (TENANT, f"/m3ter/organizations/{M3TER_ORG}/meters", 200),
        ("nobody", f"/miradore/{MIRADORE_SITE}/api/v2/Device", 403),
    ]
    for tenant, path, want in traffic:
        status, body = get(proxy + path, {"x-sidekey-tenant": tenant})
        if status != want:
            fail(f"{tenant} {path}: HTTP {status}, expected {want}: {body}")

    status, scrape = get(f"http://127.0.0.1:{admin_port}/metrics")
    if status != 200:
        fail(f"/metrics answered HTTP {status}")
    missing = [f for f in EXPECTED if f"# TYPE {f} " not in scrape]
    if missing:
        fail(f"families missing from /metrics: {missing}\n{scrape}")
    check = subprocess.run(["promtool", "check", "metrics"], input=scrape,
                           capture_output=True, text=True, timeout=DEADLINE_S)
    if check.returncode != 0:
        fail(f"promtool check metrics (exit {check.returncode}):\n{check.stdout}{check.stderr}")
    print(f"metrics-check: promtool check metrics: ok ({scrape.count('# TYPE ')} families)")


if __name__ == "__main__":
    main()
