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
    assert!(behaviors("Tenant", "display_name").is_empty());

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
