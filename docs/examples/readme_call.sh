curl -H 'x-sidekey-tenant: acme' http://127.0.0.1:8080/miradore/acme/api/v2/Device
curl -x http://acme:x@127.0.0.1:8080 http://online.miradore.com/acme/api/v2/Device
