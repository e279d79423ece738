import requests

# proxy form: requests sends Proxy-Authorization from the userinfo for http:// URLs
proxies = {"http": "http://acme:x@127.0.0.1:8080"}
r = requests.get("http://online.miradore.com/acme/api/v2/Device", proxies=proxies, timeout=30)
r.raise_for_status()

# prefix form
r = requests.post("http://127.0.0.1:8080/mailkit/json.fcgi",
                  headers={"x-sidekey-tenant": "acme"},
                  json={"function": "mailkit.mailinglist.list", "id": "0", "md5": "x"},
                  timeout=30)
r.raise_for_status()
print(r.json())
