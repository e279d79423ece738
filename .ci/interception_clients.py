"""Driver of .ci/interception-clients: starts the mock vendor and sidekey with interception,
then runs each real client with only environment variables and checks what the mock saw."""

import argparse
import base64
import os
import shutil
import subprocess
import sys
import textwrap

from harness import DEADLINE_S, Harness, free_port, ready

TENANT = "acme"
MIRADORE_SITE = "Acme1"
MIRADORE_KEY = "ci-miradore-key"
M3TER_ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"
MAILKIT_ID = "12345"
MAILKIT_MD5 = "0123456789abcdef0123456789abcdef"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bins", required=True)
    p.add_argument("--node-modules", required=True)
    a = p.parse_args()
    with Harness("interception-clients", "sidekey-interception.") as h:
        run(a, h)


def run(a, h):
    tmp = h.tmp
    sidekey = os.path.join(a.bins, "sidekey")
    log_path = os.path.join(tmp, "requests.log")
    mock_port, mock_dir = h.start_mock(
        a.bins, "--miradore-key", MIRADORE_KEY, "--mailkit-md5", MAILKIT_MD5,
        "--request-log", log_path)

    ca_dir = os.path.join(tmp, "intercept")
    subprocess.run([sidekey, "ca", "init", "--out", ca_dir], check=True, stdout=subprocess.DEVNULL)
    ca = os.path.join(ca_dir, "ca.pem")

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
                mailkit: {{ clientId: "{MAILKIT_ID}", clientMd5: {{ value: {MAILKIT_MD5} }} }}
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
        "--intercept-ca-cert", ca, "--intercept-ca-key", os.path.join(ca_dir, "ca.key"),
    ]
    for host in ("online.miradore.com", "api.m3ter.com", "ingest.m3ter.com", "api.mailkit.eu"):
        argv += ["--connect-to", f"{host}:443:127.0.0.1:{mock_port}"]
    sk = h.start(argv, env=env)
    h.wait_until("sidekey /readyz", lambda: ready(admin_port), sk)

    proxy = f"http://{TENANT}:x@127.0.0.1:{proxy_port}"
    # Only what each client documents; no proxy for anything else.
    base_env = {k: v for k, v in os.environ.items()
                if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    base_env.update(HTTPS_PROXY=proxy, https_proxy=proxy)

    def client(name, argv, extra_env, want):
        """Runs one client; `want` lists (host, method, path) the mock must see from it."""
        before = read_log(log_path)
        r = subprocess.run(argv, env=dict(base_env, **extra_env), capture_output=True,
                           text=True, timeout=DEADLINE_S)
        seen = read_log(log_path)[len(before):]
        missing = [w for w in want if w not in seen]
        if r.returncode != 0 or missing:
            sys.exit(f"interception-clients: {name} failed (exit {r.returncode}); "
                     f"missing {missing}; mock saw {seen}\n{r.stdout}\n{r.stderr}")
        print(f"interception-clients: {name}: ok ({len(seen)} requests)")

    device = ("online.miradore.com", "GET", "/api/v2/Device")
    client("curl", ["curl", "-fsS", "https://online.miradore.com/api/v2/Device"],
           {"CURL_CA_BUNDLE": ca}, [device])
    py = sys.executable
    client("python requests", [py, "-c",
           "import requests; r = requests.get('https://online.miradore.com/api/v2/Device');"
           "r.raise_for_status()"], {"REQUESTS_CA_BUNDLE": ca}, [device])
    client("python httpx", [py, "-c",
           "import httpx; r = httpx.post('https://api.mailkit.eu/json.fcgi', json={'function': 'ping',"
           " 'id': 'x', 'md5': 'x'}); r.raise_for_status()"],
           {"SSL_CERT_FILE": ca}, [("api.mailkit.eu", "POST", "/json.fcgi")])
    client("m3ter SDK (default base URL)", [py, "-c", textwrap.dedent(f"""\
           from m3ter import M3ter
           c = M3ter(api_key="placeholder", api_secret="placeholder", org_id="{M3TER_ORG}")
           list(c.meters.list())
           c.usage.submit(measurements=[{{"account": "a", "meter": "m", "ts": "2026-01-01T00:00:00Z"}}])
           """)], {"SSL_CERT_FILE": ca},
           [("api.m3ter.com", "GET", f"/organizations/{M3TER_ORG}/meters"),
            ("ingest.m3ter.com", "POST", f"/organizations/{M3TER_ORG}/measurements")])
    client("python xmlrpc.client (Mailkit)", [py, "-c", textwrap.dedent("""\
           import base64, http.client, os, ssl, urllib.parse, xml.parsers.expat, xmlrpc.client
           proxy = urllib.parse.urlsplit(os.environ["HTTPS_PROXY"])
           auth = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
           class Tunnel(xmlrpc.client.SafeTransport):
               def make_connection(self, host):
                   c = http.client.HTTPSConnection(proxy.hostname, proxy.port,
                       context=ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"]))
                   c.set_tunnel(host, 443, headers={"Proxy-Authorization": "Basic " + auth})
                   return c
           s = xmlrpc.client.ServerProxy("https://api.mailkit.eu/rpc.fcgi", transport=Tunnel())
           try:
               s.mailkit.mailinglist.list("placeholder", "placeholder")
           except (xmlrpc.client.ResponseError, xml.parsers.expat.ExpatError):
               pass  # the mock answers 200 with JSON, not XML-RPC: reaching it is the point
           except xmlrpc.client.ProtocolError as e:
               raise SystemExit(f"HTTP {e.errcode}")  # 401: the credentials were not spliced in
           """)], {"SSL_CERT_FILE": ca}, [("api.mailkit.eu", "POST", "/rpc.fcgi")])
    node_env = {"NODE_EXTRA_CA_CERTS": ca, "NODE_PATH": a.node_modules}
    client("node undici EnvHttpProxyAgent", ["node", "-e", textwrap.dedent("""\
           const { EnvHttpProxyAgent, fetch } = require("undici");
           (async () => {
             const r = await fetch("https://online.miradore.com/api/v2/Device",
                                   { dispatcher: new EnvHttpProxyAgent() });
             if (r.status !== 200) throw new Error("status " + r.status);
           })().catch((e) => { console.error(e); process.exit(1); });
           """)], node_env, [device])
    client("node global fetch via setGlobalDispatcher", ["node", "-e", textwrap.dedent("""\
           const { EnvHttpProxyAgent, setGlobalDispatcher } = require("undici");
           setGlobalDispatcher(new EnvHttpProxyAgent());
           (async () => {
             const r = await fetch("https://api.m3ter.com/organizations/%s/meters",
                                   { headers: { authorization: "Bearer placeholder" } });
             if (r.status !== 200) throw new Error("status " + r.status);
           })().catch((e) => { console.error(e); process.exit(1); });
           """ % M3TER_ORG)], node_env,
           [("api.m3ter.com", "GET", f"/organizations/{M3TER_ORG}/meters")])
    if shutil.which("go"):
        src = os.path.join(tmp, "goclient")
        os.makedirs(src)
        with open(os.path.join(src, "main.go"), "w") as f:
            f.write(textwrap.dedent("""\
                package main

                import (
                \t"fmt"
                \t"net/http"
                \t"os"
                )

                func main() {
                \tr, err := http.Get("https://online.miradore.com/api/v2/Device")
                \tif err != nil || r.StatusCode != 200 {
                \t\tfmt.Println(err, r)
                \t\tos.Exit(1)
                \t}
                }
                """))
        go_env = {"SSL_CERT_FILE": ca, "GOCACHE": os.path.join(tmp, "gocache"),
                  "GOPATH": os.path.join(tmp, "gopath"), "GO111MODULE": "off"}
        client("go net/http", ["go", "run", os.path.join(src, "main.go")], go_env, [device])
    else:
        print("interception-clients: go not installed; Go client skipped")


def read_log(path):
    try:
        with open(path) as f:
            return [tuple(line.split()) for line in f if line.strip()]
    except FileNotFoundError:
        return []


if __name__ == "__main__":
    main()
