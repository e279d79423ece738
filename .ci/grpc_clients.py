"""Driver of .ci/grpc-tooling: real Python grpcio clients against `sidekey serve` on a Unix
socket, with default channel settings (no authority override): health, reflection
(grpcio-reflection speaks v1alpha), and TenantService calls built from the reflected
descriptors alone, including an INVALID_ARGUMENT whose google.rpc.BadRequest details are
decoded with the types reflection serves."""

import argparse
import base64
import os
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from harness import Harness, free_port, ready

CALL_TIMEOUT_S = 10
TOKEN = "ci-operator-token-0123456789abcdef"


def fail(message):
    sys.exit(f"grpc-tooling: {message}")


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the operator token, as docs/control-plane.md says a client must."""

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {TOKEN}")]
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_token(details), requests)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sidekey", required=True)
    a = p.parse_args()
    with Harness("grpc-tooling", "sidekey-grpc.") as h:
        token_file = os.path.join(h.tmp, "token")
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        socket_path = os.path.join(h.tmp, "grpc.sock")
        admin_port = free_port()
        env = dict(os.environ, SIDEKEY_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
                   RUST_LOG="warn")
        sk = h.start([
            a.sidekey, "serve",
            "--proxy-listen", f"127.0.0.1:{free_port()}",
            "--admin-listen", f"127.0.0.1:{admin_port}",
            "--grpc-listen", f"unix:{socket_path}",
            "--grpc-token-file", token_file,
            "--data-dir", os.path.join(h.tmp, "data"),
        ], env=env)
        h.wait_until("sidekey /readyz", lambda: ready(admin_port), sk)
        run(f"unix:{socket_path}")


def run(target):
    # Default settings: grpcio sends the percent-encoded socket path as :authority.
    channel = grpc.insecure_channel(target)

    # Health: open without the token (kubelet probes cannot send headers).
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "sidekey.v1.TenantService"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            fail(f"health {service!r}: {r}")
    print("grpc-tooling: python health Check: ok")

    # Without the token, the tenant service refuses.
    list_path = "/sidekey.v1.TenantService/ListTenants"
    try:
        channel.unary_unary(list_path)(b"", timeout=CALL_TIMEOUT_S)
        fail("ListTenants without the token was served")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            fail(f"ListTenants without the token: {e.code()} {e.details()}")

    authed = grpc.intercept_channel(channel, Bearer())
    db = ProtoReflectionDescriptorDatabase(authed)
    services = set(db.get_services())
    want = {"sidekey.v1.TenantService", "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    if services != want:
        fail(f"reflection lists {sorted(services)}, want {sorted(want)}")
    print("grpc-tooling: python reflection (v1alpha) list: ok")

    pool = descriptor_pool.DescriptorPool(db)
    pool.FindServiceByName("sidekey.v1.TenantService")

    def message(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    def call(method, request, response_type):
        return authed.unary_unary(
            f"/sidekey.v1.TenantService/{method}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=message(response_type).FromString,
        )(request, timeout=CALL_TIMEOUT_S)

    Tenant = message("sidekey.v1.Tenant")
    md5 = "0123456789abcdef0123456789abcdef"
    tenant = Tenant(id="acme", display_name="Acme")
    tenant.mailkit.client_id = "12345"
    tenant.mailkit.client_md5.value = md5
    create = message("sidekey.v1.CreateTenantRequest")
    created = call("CreateTenant", create(tenant=tenant), "sidekey.v1.Tenant")
    listed = call("ListTenants", message("sidekey.v1.ListTenantsRequest")(),
                  "sidekey.v1.ListTenantsResponse")
    if [t.id for t in listed.tenants] != ["acme"] or not created.etag:
        fail(f"ListTenants: {listed}")
    secret = listed.tenants[0].mailkit.client_md5
    if secret.value or not secret.fingerprint.startswith("sha256:"):
        fail(f"ListTenants returned a secret value or no fingerprint: {secret}")
    print("grpc-tooling: python CreateTenant + ListTenants from reflected descriptors: ok")

    # A refused write: the BadRequest in the details decodes with the reflected types.
    try:
        call("CreateTenant", create(tenant=Tenant(id="Not_Valid")), "sidekey.v1.Tenant")
        fail("CreateTenant with an invalid id was accepted")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"CreateTenant with an invalid id: {e.code()} {e.details()}")
        raw = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
        if raw is None:
            fail("INVALID_ARGUMENT without status details")
        status = message("google.rpc.Status").FromString(raw)
        fields = []
        for detail in status.details:
            type_name = detail.type_url.rsplit("/", 1)[-1]
            decoded = message(type_name).FromString(detail.value)
            if type_name == "google.rpc.BadRequest":
                fields += [v.field for v in decoded.field_violations]
        if "tenant.id" not in fields:
            fail(f"BadRequest does not name tenant.id: {status}")
    print("grpc-tooling: python INVALID_ARGUMENT details decoded as google.rpc.BadRequest: ok")
    channel.close()


if __name__ == "__main__":
    main()
