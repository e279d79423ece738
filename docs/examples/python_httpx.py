import httpx

ORG = "0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa"

# prefix form: a client whose base URL is sidekey's m3ter prefix
with httpx.Client(base_url="http://127.0.0.1:8080/m3ter",
                  headers={"x-sidekey-tenant": "acme"}, timeout=30) as client:
    r = client.get(f"/organizations/{ORG}/meters")
    r.raise_for_status()

# proxy form: httpx sends Proxy-Authorization from the proxy URL's userinfo
with httpx.Client(proxy="http://acme:x@127.0.0.1:8080", timeout=30) as client:
    r = client.get("http://online.miradore.com/acme/api/v2/Device")
    r.raise_for_status()
    print(r.json())
