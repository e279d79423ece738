from m3ter import M3ter

ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"

# The official SDK with dummy credentials: sidekey answers its /oauth/token call and puts
# the tenant's token on every request. With base_url overridden, the SDK sends
# measurements to that same base URL, not to ingest.m3ter.com: use a second client whose
# base URL is sidekey's ingest prefix for usage.submit.
api = M3ter(base_url="http://127.0.0.1:8080/m3ter", api_key="x", api_secret="x",
            org_id=ORG, default_headers={"x-sidekey-tenant": "acme"})
ingest = M3ter(base_url="http://127.0.0.1:8080/m3ter-ingest", api_key="x", api_secret="x",
               org_id=ORG, default_headers={"x-sidekey-tenant": "acme"})

for meter in api.meters.list():
    print(meter.code)
ingest.usage.submit(measurements=[{
    "account": "acme-account", "meter": "api-calls", "ts": "2026-01-01T00:00:00Z",
    "measure": {"calls": 1},
}])
