import asyncio

from m3ter import AsyncM3ter

ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"


async def main():
    # AsyncM3ter does not fetch a token itself: give a dummy token= (sidekey replaces it).
    common = dict(api_key="x", api_secret="x", token="x", org_id=ORG,
                  default_headers={"x-sidekey-tenant": "acme"})
    api = AsyncM3ter(base_url="http://127.0.0.1:8080/m3ter", **common)
    ingest = AsyncM3ter(base_url="http://127.0.0.1:8080/m3ter-ingest", **common)
    async for meter in api.meters.list():
        print(meter.code)
    await ingest.usage.submit(measurements=[{
        "account": "acme-account", "meter": "api-calls", "ts": "2026-01-01T00:00:00Z",
        "measure": {"calls": 1},
    }])


asyncio.run(main())
