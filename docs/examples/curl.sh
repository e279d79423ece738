# prefix form: name the tenant with a header
curl -H 'x-sidekey-tenant: acme' 'http://127.0.0.1:8080/miradore/api/v2/Device?limit=10'
curl -H 'x-sidekey-tenant: acme' \
     'http://127.0.0.1:8080/m3ter/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters'
curl -H 'x-sidekey-tenant: acme' -H 'content-type: application/json' \
     -d '{"function":"mailkit.mailinglist.list","id":"0","md5":"x"}' \
     http://127.0.0.1:8080/mailkit/json.fcgi

# proxy form (note http://, not https://): the tenant is the proxy user name
curl -x http://acme:x@127.0.0.1:8080 'http://online.miradore.com/acme/api/v2/Device'
# curl reads the proxy from lower-case http_proxy only (it ignores HTTP_PROXY on purpose)
http_proxy=http://acme:x@127.0.0.1:8080 curl \
     http://api.m3ter.com/organizations/0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa/meters
