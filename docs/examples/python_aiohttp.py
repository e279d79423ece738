import asyncio

import aiohttp

ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"


async def main():
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, raise_for_status=True) as session:
        # prefix form
        async with session.get(f"http://127.0.0.1:8080/m3ter/organizations/{ORG}/meters",
                               headers={"x-sidekey-tenant": "acme"}) as r:
            await r.json()
        # proxy form: the tenant as proxy credentials
        async with session.get("http://online.miradore.com/acme/api/v2/Device",
                               proxy="http://127.0.0.1:8080",
                               proxy_auth=aiohttp.BasicAuth("acme", "x")) as r:
            print(await r.json())


asyncio.run(main())
