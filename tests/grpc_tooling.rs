//! The control plane as generic gRPC tools see it: server reflection v1 and v1alpha, the
//! descriptors of the error detail types, and the annotations buf and linters read.

use std::path::Path;

use prost::Message;
use prost_types::FileDescriptorProto;
use sidekey::config::ServeConfig;
use sidekey::server::{self, Running};

async fn start(dir: &Path) -> Running {
    let mut config = ServeConfig::ephemeral(dir.join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    server::start(config).await.expect("sidekey starts")
}

/// Every service a reflection client must list, whichever version it speaks.
const SERVICES: [&str; 4] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "sidekey.v1.TenantService",
];

/// The detail types the service returns (status.rs) and the ones tools look for first.
const DETAIL_TYPES: [&str; 3] = [
    "google.rpc.Status",
    "google.rpc.BadRequest",
    "google.rpc.ErrorInfo",
];

/// One reflection request per version: the same messages in two packages.
macro_rules! reflect {
    ($version:ident, $url:expr, $request:expr) => {{
        use tonic_reflection::pb::$version::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let channel = tonic::transport::Endpoint::from_shared($url)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(match $request {
                Reflect::List => MessageRequest::ListServices(String::new()),
                Reflect::Symbol(s) => MessageRequest::FileContainingSymbol(s.to_owned()),
            }),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        match responses.message().await {
            Err(status) => Reflected::Refused(status.code()),
            Ok(response) => match response.and_then(|r| r.message_response) {
                Some(MessageResponse::ListServicesResponse(l)) => {
                    Reflected::Services(l.service.into_iter().map(|s| s.name).collect())
                }
                Some(MessageResponse::FileDescriptorResponse(f)) => Reflected::Files(
                    f.file_descriptor_proto
                        .iter()
                        .map(|b| FileDescriptorProto::decode(b.as_slice()).unwrap())
                        .collect(),
                ),
                other => panic!("unexpected {other:?}"),
            },
        }
    }};
}

enum Reflect<'a> {
    List,
    Symbol(&'a str),
}

#[derive(Debug)]
enum Reflected {
    Services(Vec<String>),
    Files(Vec<FileDescriptorProto>),
    Refused(tonic::Code),
}

fn check_services(reflected: Reflected) {
    let Reflected::Services(mut names) = reflected else {
        panic!("{reflected:?}")
    };
    names.sort();
    assert_eq!(names, SERVICES);
}

/// The file that defines `symbol` comes first, followed by its imports.
fn check_defined(reflected: Reflected, file: &str) {
    let Reflected::Files(files) = reflected else {
        panic!("{reflected:?}")
    };
    assert_eq!(files.first().map(|f| f.name()), Some(file), "{files:?}");
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_list_every_service_and_resolve_the_error_details() {
    let dir = tempfile::tempdir().unwrap();
    let running = start(dir.path()).await;
    let url = running.grpc_url.clone();

    check_services(reflect!(v1, url.clone(), Reflect::List));
    check_services(reflect!(v1alpha, url.clone(), Reflect::List));
    for symbol in DETAIL_TYPES {
        let file = if symbol == "google.rpc.Status" {
            "google/rpc/status.proto"
        } else {
            "google/rpc/error_details.proto"
        };
        check_defined(reflect!(v1, url.clone(), Reflect::Symbol(symbol)), file);
        check_defined(
            reflect!(v1alpha, url.clone(), Reflect::Symbol(symbol)),
            file,
        );
    }
    check_defined(
        reflect!(
            v1alpha,
            url.clone(),
            Reflect::Symbol("sidekey.v1.TenantService")
        ),
        "sidekey/v1/tenant.proto",
    );
    // An unknown symbol is NOT_FOUND, in both versions.
    for reflected in [
        reflect!(v1, url.clone(), Reflect::Symbol("google.rpc.NoSuchType")),
        reflect!(
            v1alpha,
            url.clone(),
            Reflect::Symbol("google.rpc.NoSuchType")
        ),
    ] {
        assert!(
            matches!(reflected, Reflected::Refused(tonic::Code::NotFound)),
            "{reflected:?}"
        );
    }
}

/// The annotations the API documents are in the served descriptors, where linters and
/// generators read them. (They are options only: build.rs generates the same Rust types,
/// so the wire format is unchanged.)
#[test]
fn the_served_descriptor_carries_field_behavior_and_resource_annotations() {
    use prost_reflect::{DescriptorPool, Value};
    let pool = DescriptorPool::decode(sidekey::proto::FILE_DESCRIPTOR_SET).unwrap();
    let field_behavior = pool
        .get_extension_by_name("google.api.field_behavior")
        .unwrap();
    let resource = pool.get_extension_by_name("google.api.resource").unwrap();
    let reference = pool
        .get_extension_by_name("google.api.resource_reference")
        .unwrap();
    let field = |message: &str, field: &str| {
        pool.get_message_by_name(&format!("sidekey.v1.{message}"))
            .unwrap()
            .get_field_by_name(field)
            .unwrap()
    };
    let behaviors = |message: &str, name: &str| -> Vec<i32> {
        match field(message, name)
            .options()
            .get_extension(&field_behavior)
            .as_ref()
        {
            Value::List(values) => values.iter().filter_map(Value::as_enum_number).collect(),
            other => panic!("{other:?}"),
        }
    };
    // google.api.FieldBehavior: OPTIONAL 1, REQUIRED 2, OUTPUT_ONLY 3, INPUT_ONLY 4,
    // IMMUTABLE 5.
    assert_eq!(behaviors("Tenant", "id"), [2, 5]);
    assert_eq!(behaviors("Tenant", "create_time"), [3]);
    assert_eq!(behaviors("Tenant", "update_time"), [3]);
    assert_eq!(behaviors("Secret", "value"), [4]);
    assert_eq!(behaviors("Secret", "fingerprint"), [3]);
    assert_eq!(behaviors("PartnerDefaults", "update_time"), [3]);
    assert_eq!(behaviors("CreateTenantRequest", "tenant"), [2]);
    assert_eq!(behaviors("TestTenantRequest", "vendor"), [2]);
    assert_eq!(behaviors("Tenant", "display_name"), [1]);
    // The connections' fields inherit the partner defaults: no behaviour claimed.
    assert!(behaviors("MiradoreConnection", "site").is_empty());

    let resource_type = |message: &str| {
        let options = pool
            .get_message_by_name(&format!("sidekey.v1.{message}"))
            .unwrap()
            .options();
        let value = options.get_extension(&resource);
        let descriptor = value.as_message().expect("google.api.resource").clone();
        descriptor
            .get_field_by_name("type")
            .and_then(|t| t.as_str().map(str::to_owned))
    };
    assert_eq!(resource_type("Tenant").as_deref(), Some("sidekey/Tenant"));
    assert_eq!(
        resource_type("PartnerDefaults").as_deref(),
        Some("sidekey/PartnerDefaults")
    );
    for request in [
        "GetTenantRequest",
        "DeleteTenantRequest",
        "TestTenantRequest",
    ] {
        let options = field(request, "id").options();
        let value = options.get_extension(&reference);
        let referenced = value.as_message().unwrap().get_field_by_name("type");
        assert_eq!(
            referenced.as_deref().and_then(Value::as_str),
            Some("sidekey/Tenant"),
            "{request}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// `:authority` on the Unix socket: what grpcio, grpc-java and older grpcurl send

/// A header field as an HPACK literal with a new name: "with incremental indexing" (the
/// client's encoder adds it to its dynamic table) or "without indexing".
fn hpack_literal(out: &mut Vec<u8>, indexed: bool, name: &str, value: &str) {
    out.push(if indexed { 0x40 } else { 0x00 });
    for s in [name, value] {
        assert!(s.len() < 127);
        out.push(s.len() as u8);
        out.extend(s.as_bytes());
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

/// A health Check on `stream`: HEADERS with `header_block`, then an empty request message.
fn health_check(stream: u32, header_block: &[u8]) -> Vec<u8> {
    let mut out = h2_frame(0x1, 0x4, stream, header_block);
    out.extend(h2_frame(0x0, 0x1, stream, &[0, 0, 0, 0, 0]));
    out
}

/// Reads frames until `stream` gets its response message (Ok) or is reset (Err(code)).
async fn response_message(conn: &mut tokio::net::UnixStream, stream: u32) -> Result<Vec<u8>, u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let read = async {
        loop {
            let mut header = [0u8; 9];
            conn.read_exact(&mut header).await.unwrap();
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let mut payload = vec![0; len];
            conn.read_exact(&mut payload).await.unwrap();
            let (kind, flags) = (header[3], header[4]);
            let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
            match kind {
                // SETTINGS: acknowledged, as a client must.
                0x4 if flags & 0x1 == 0 => {
                    conn.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap()
                }
                0x0 if id == stream => return Ok(payload),
                0x3 if id == stream => {
                    return Err(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                }
                // GOAWAY: the server closed the connection.
                0x7 => panic!("GOAWAY {payload:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

/// The health response `status: SERVING`, as a gRPC message.
const SERVING: [u8; 7] = [0, 0, 0, 0, 2, 0x08, 0x01];

#[tokio::test]
async fn unix_socket_calls_with_the_socket_path_as_authority_are_served() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grpc.sock");
    let mut config = ServeConfig::ephemeral(dir.path().join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    config.grpc_listen = sidekey::control::GrpcListen::Unix(socket.clone());
    let _running = server::start(config).await.unwrap();

    let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();

    let path = socket.to_str().unwrap();
    // :method POST and :scheme http from the static table, then the fields gRPC sends.
    let request = |authority: &dyn Fn(&mut Vec<u8>)| {
        let mut block = vec![0x83, 0x86];
        hpack_literal(&mut block, false, ":path", "/grpc.health.v1.Health/Check");
        authority(&mut block);
        hpack_literal(&mut block, false, "content-type", "application/grpc");
        hpack_literal(&mut block, false, "te", "trailers");
        block
    };
    // grpc-java and older grpcurl: the path itself, which the client's encoder also enters
    // in its dynamic table (index 62)...
    let first = request(&|b| hpack_literal(b, true, ":authority", path));
    conn.write_all(&health_check(1, &first)).await.unwrap();
    assert_eq!(response_message(&mut conn, 1).await, Ok(SERVING.to_vec()));
    // ...and refers to from there on the same connection.
    let second = request(&|b| b.push(0x80 | 62));
    conn.write_all(&health_check(3, &second)).await.unwrap();
    assert_eq!(response_message(&mut conn, 3).await, Ok(SERVING.to_vec()));
    // grpcio >= 1.57: the percent-encoded path.
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    let third = request(&|b| hpack_literal(b, false, ":authority", &encoded));
    conn.write_all(&health_check(5, &third)).await.unwrap();
    assert_eq!(response_message(&mut conn, 5).await, Ok(SERVING.to_vec()));
    // A valid authority is served as before.
    let fourth = request(&|b| hpack_literal(b, false, ":authority", "localhost"));
    conn.write_all(&health_check(7, &fourth)).await.unwrap();
    assert_eq!(response_message(&mut conn, 7).await, Ok(SERVING.to_vec()));
}

/// A header block that cannot be decoded closes the connection, as h2 itself does
/// (COMPRESSION_ERROR): nothing of it reaches the service.
#[tokio::test]
async fn an_undecodable_header_block_on_the_unix_socket_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("grpc.sock");
    let mut config = ServeConfig::ephemeral(dir.path().join("data"));
    config.master_key = Some(sidekey::secret::Secret::new(
        "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    ));
    config.grpc_listen = sidekey::control::GrpcListen::Unix(socket.clone());
    let _running = server::start(config).await.unwrap();

    let mut conn = tokio::net::UnixStream::connect(&socket).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&h2_frame(0x4, 0, 0, &[])).await.unwrap();
    // Index 70: past the static table, with an empty dynamic table.
    conn.write_all(&health_check(1, &[0x83, 0x86, 0x80 | 70]))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        conn.read_to_end(&mut rest),
    )
    .await
    .expect("closed within 10 s");
    // Closed (possibly reset); whatever was written before, no response to the call.
    let _ = read;
    assert!(!rest.windows(SERVING.len()).any(|w| w == SERVING));
}
