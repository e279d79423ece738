//! The control plane: `sidekey.v1.TenantService` over gRPC, with `grpc.health.v1.Health`
//! and server reflection v1, on TCP or a Unix socket.
//!
//! With a [`ControlToken`], every call to the tenant service and to reflection must carry
//! it. Health stays open: kubelet gRPC probes cannot send headers, and health reveals
//! nothing.

pub mod auth;
pub mod convert;
pub mod service;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tonic_health::ServingStatus;

pub use auth::ControlToken;
pub use service::TenantApi;

use crate::proto::tenant_service_server::TenantServiceServer;

/// Where the control plane listens: `HOST:PORT`, or `unix:/path` for a socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrpcListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for GrpcListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/sidekey/grpc.sock".into());
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else {
            s.parse()
                .map(Self::Tcp)
                .map_err(|_| format!("{s:?} is neither HOST:PORT (an IP address) nor unix:/path"))
        }
    }
}

/// A bound control-plane listener.
pub enum GrpcListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl GrpcListener {
    /// Binds `listen`. A Unix socket file left by a sidekey that died is replaced; one that
    /// a live process answers on is not. The socket is made owner-only (0600).
    pub async fn bind(listen: &GrpcListen) -> std::io::Result<Self> {
        match listen {
            GrpcListen::Tcp(addr) => Ok(Self::Tcp(TcpListener::bind(addr).await?)),
            GrpcListen::Unix(path) => {
                if path.exists() {
                    if tokio::net::UnixStream::connect(path).await.is_ok() {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running process", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                let listener = UnixListener::bind(path)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                Ok(Self::Unix(listener, path.clone()))
            }
        }
    }

    /// The address a client dials: `http://IP:PORT` or `unix:/path`.
    pub fn client_url(&self) -> String {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("http://{a}"),
                Err(_) => String::from("http://<unbound>"),
            },
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

/// Serves the control plane until `shutdown` resolves, then finishes in-flight calls.
pub async fn serve(
    listener: GrpcListener,
    api: TenantApi,
    token: Option<ControlToken>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TenantServiceServer<TenantApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
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
    let mut router = Server::builder()
        .add_service(health_service)
        .add_service(TenantServiceServer::with_interceptor(api, check.clone()));
    if let Ok(reflection) = reflection {
        router = router.add_service(tonic::service::interceptor::InterceptedService::new(
            reflection, check,
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
                .serve_with_incoming_shutdown(TcpListenerStream::new(l), shutdown)
                .await
        }
        GrpcListener::Unix(l, path) => {
            let result = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(l), shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            result
        }
    }
}
