//! The control plane: `sidekey.v1.TenantService` over gRPC, with `grpc.health.v1.Health`
//! and server reflection (v1 and v1alpha), on TCP or a Unix socket.
//!
//! With a [`ControlToken`], every call to the tenant service and to reflection must carry
//! it. Health stays open: kubelet gRPC probes cannot send headers, and health reveals
//! nothing.

pub mod auth;
mod authority;
pub mod convert;
mod hpack;
pub mod listener;
pub mod service;
pub mod status;

use std::future::Future;
use std::time::Duration;

use tonic::transport::Server;
use tonic_health::ServingStatus;

pub use auth::ControlToken;
pub use listener::{GrpcListen, GrpcListener, Limits};
pub use service::TenantApi;

/// Largest request message accepted, in bytes. A tenant with three 4 KiB secrets is under
/// 16 KiB; a larger message is refused with RESOURCE_EXHAUSTED before it is decoded.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;
/// HTTP/2 streams a connection may have open at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 16;
/// Calls of one connection served at once; the others wait, their bytes held back by flow
/// control.
pub const MAX_CALLS_PER_CONNECTION: usize = 8;
/// HTTP/2 flow-control windows: bytes a client may send ahead, per stream and per
/// connection. Request bytes in flight are thus bounded by MAX_CONNECTIONS x 256 KiB.
const STREAM_WINDOW: u32 = 64 << 10;
const CONNECTION_WINDOW: u32 = 256 << 10;
/// Longest header block accepted.
pub(crate) const MAX_HEADER_LIST: u32 = 16 << 10;
/// Longest a call may take (TestTenant included) before it ends with CANCELLED.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// An idle connection is pinged this often, and closed when a ping goes unanswered for
/// KEEPALIVE_TIMEOUT: a peer that vanished does not hold a connection slot.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Rewrites the two statuses tonic itself produces with codes gRPC does not specify for
/// them: a request body that is not the method's protobuf message (tonic: INTERNAL;
/// INVALID_ARGUMENT is the client's fault) and one over [`MAX_REQUEST_BYTES`] (tonic:
/// OUT_OF_RANGE; gRPC specifies RESOURCE_EXHAUSTED). Both are answered before the service
/// runs, as trailers-only responses, so the status is in the response headers. The
/// service itself never answers INTERNAL or OUT_OF_RANGE.
fn canonical_codes<B>(mut response: http::Response<B>) -> http::Response<B> {
    const DECODE_ERROR: &[u8] = b"failed%20to%20decode%20Protobuf%20message";
    let headers = response.headers_mut();
    let code = match headers.get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"13")
            if headers
                .get("grpc-message")
                .is_some_and(|m| m.as_bytes().starts_with(DECODE_ERROR)) =>
        {
            tonic::Code::InvalidArgument
        }
        Some(b"11") => tonic::Code::ResourceExhausted,
        _ => return response,
    };
    headers.insert("grpc-status", http::HeaderValue::from(code as i32));
    response
}

use crate::proto::tenant_service_server::TenantServiceServer;

/// Reflection over every descriptor served: the API with the `google.rpc` types of its
/// error details (see build.rs), health, and both reflection versions (each version lists
/// both services).
fn reflection_builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
}

/// Serves the control plane until `shutdown` resolves, then finishes in-flight calls.
pub async fn serve(
    listener: GrpcListener,
    api: TenantApi,
    token: Option<ControlToken>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(listener, api, token, Limits::default(), shutdown).await
}

/// [`serve`] with the listener's bounds given.
pub async fn serve_with(
    listener: GrpcListener,
    api: TenantApi,
    token: Option<ControlToken>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TenantServiceServer<TenantApi>>().await;
    // Both versions of reflection: v1, and v1alpha for the tools that speak only it (older
    // grpcurl, Python's grpcio-reflection client).
    let reflection = reflection_builder()
        .build_v1()
        .and_then(|v1| Ok((v1, reflection_builder().build_v1alpha()?)))
        .map_err(|e| {
            // The descriptors are compiled in; failing here is a build defect.
            tracing::error!(error = %e, "reflection descriptors are invalid");
            e
        });

    let check = move |req: tonic::Request<()>| match &token {
        Some(t) => {
            // Refused calls never reach the service: they are counted here.
            let method = req
                .extensions()
                .get::<tonic::GrpcMethod>()
                .map(|m| m.method().to_owned())
                .unwrap_or_else(|| "reflection".to_owned());
            t.check(req)
                .inspect_err(|status| service::record_call(method, status.code()))
        }
        None => Ok(req),
    };
    let tenants = TenantServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES);
    let mut router = Server::builder()
        .timeout(CALL_TIMEOUT)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .concurrency_limit_per_connection(MAX_CALLS_PER_CONNECTION)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_max_header_list_size(MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(tower::util::MapResponseLayer::new(canonical_codes))
        .add_service(health_service)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            tenants,
            check.clone(),
        ));
    if let Ok((v1, v1alpha)) = reflection {
        router = router
            .add_service(tonic::service::interceptor::InterceptedService::new(
                v1,
                check.clone(),
            ))
            .add_service(tonic::service::interceptor::InterceptedService::new(
                v1alpha, check,
            ));
    }

    let shutdown = async move {
        shutdown.await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
    };
    match listener {
        GrpcListener::Tcp(l) => {
            router
                .serve_with_incoming_shutdown(listener::incoming(l, limits), shutdown)
                .await
        }
        GrpcListener::Unix(l, path) => {
            let result = router
                .serve_with_incoming_shutdown(listener::incoming(l, limits), shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            result
        }
    }
}
