//! The CLI's connection to a running sidekey, and how its failures read to a user.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::proto::tenant_service_client::TenantServiceClient;

pub type Client = TenantServiceClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to every call when a token is configured.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Where the CLI finds sidekey, and with which token.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// The control plane: http://HOST:PORT or unix:/path.
    #[arg(
        long,
        global = true,
        env = "SIDEKEY_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// File holding the control-plane bearer token (also: SIDEKEY_GRPC_TOKEN holding the
    /// token itself).
    #[arg(long, global = true, env = "SIDEKEY_GRPC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl ClientArgs {
    pub async fn connect(&self, token_env: Option<String>) -> Result<Client, String> {
        let token = match (&self.token_file, token_env) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, Some(t)) if !t.trim().is_empty() => Some(t.trim().to_owned()),
            _ => None,
        };
        let token = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| "the token holds characters not allowed in a header".to_owned())
            })
            .transpose()?;

        let unreachable = |e: tonic::transport::Error| {
            let mut cause = String::new();
            let mut src: Option<&dyn std::error::Error> = Some(&e);
            while let Some(s) = src {
                cause = s.to_string();
                src = s.source();
            }
            format!(
                "cannot reach sidekey at {}: {cause}\nIs `sidekey serve` running there? (set --server or SIDEKEY_SERVER)",
                self.server
            )
        };
        let channel = if let Some(path) = self.server.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // The URI is required by the API but unused: the connector dials the socket.
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(unreachable)?
        } else {
            Endpoint::from_shared(self.server.clone())
                .map_err(|_| format!("--server {:?} is not a valid URL", self.server))?
                .connect()
                .await
                .map_err(unreachable)?
        };
        Ok(TenantServiceClient::with_interceptor(
            channel,
            BearerToken(token),
        ))
    }
}

/// A failed call as a user should read it.
pub fn explain(status: &Status) -> String {
    match status.code() {
        Code::Unauthenticated => format!(
            "sidekey refused the call: {}\nGive the control-plane token with --token-file, SIDEKEY_GRPC_TOKEN_FILE or SIDEKEY_GRPC_TOKEN.",
            status.message()
        ),
        Code::InvalidArgument => {
            let mut out = String::from("sidekey refused the request:");
            match status.get_details_bad_request() {
                Some(bad) if !bad.field_violations.is_empty() => {
                    for v in bad.field_violations {
                        out.push_str(&format!("\n  {}: {}", v.field, v.description));
                    }
                }
                _ => out.push_str(&format!(" {}", status.message())),
            }
            out
        }
        Code::Unavailable => format!("sidekey is unavailable: {}", status.message()),
        _ => status.message().to_owned(),
    }
}
