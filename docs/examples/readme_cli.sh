# Miradore: site and API key
printf %s "$KEY" | sidekey tenants create acme --miradore-site acme --miradore-api-key-file -

# m3ter: access key ID, API secret, organisation, environment (empty = production)
sidekey tenants update acme --m3ter-access-key-id "$AK" --m3ter-api-secret-env M3TER_SECRET \
    --m3ter-org-id 0c2a1d53-5a44-4c1a-9f7e-3f7cc1d7e0aa

# Mailkit: client ID and MD5
sidekey tenants update acme --mailkit-client-id 12345 --mailkit-client-md5-file ./md5.txt

# Partner defaults: fields a tenant leaves blank inherit these
sidekey partner update --m3ter-access-key-id "$AK" --m3ter-api-secret-file ./m3ter-secret

sidekey tenants list
sidekey tenants get acme -o json          # secrets appear only as fingerprints
sidekey tenants apply -f acme.yaml        # declarative: create or replace from YAML/JSON
sidekey tenants test acme --vendor miradore
sidekey tenants delete acme
