//! The CLI's connection to a running sidekey, and how its failures read to a user.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tonic::body::Body;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::proto::tenant_service_client::TenantServiceClient;

pub type Client = TenantServiceClient<InterceptedService<GrpcOnly, BearerToken>>;

/// How long dialling the control plane (TCP, TLS and the HTTP/2 handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one control call may take, `tenants test` (a vendor round trip) included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// The control plane's default address, as `serve --grpc-listen` has it.
const DEFAULT_CONTROL_PLANE: &str = "127.0.0.1:50051";

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

/// Where the control plane is, as `--server` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// `HOST:PORT` or `http://HOST:PORT`: gRPC over plain HTTP/2 (h2c).
    Plain { authority: String },
    /// `https://HOST[:PORT]`: gRPC over TLS, the certificate checked against the built-in
    /// web roots and `--ca-file`.
    Tls { authority: String },
    /// `unix:/path`: a Unix socket.
    Unix(PathBuf),
}

impl FromStr for Server {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let grammar = || {
            format!(
                "{s:?} is not a control-plane address: give HOST:PORT, http://HOST:PORT, https://HOST[:PORT] or unix:/path"
            )
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: unix: needs an absolute socket path, e.g. unix:/run/sidekey/grpc.sock"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let (tls, rest) = if let Some(rest) = s.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("http://") {
            (false, rest)
        } else if s.contains("://") {
            return Err(grammar());
        } else {
            (false, s)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let authority: http::uri::Authority = rest.parse().map_err(|_| grammar())?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(grammar());
        }
        match (tls, authority.port_u16()) {
            (true, Some(_)) => Ok(Self::Tls {
                authority: authority.to_string(),
            }),
            (true, None) => Ok(Self::Tls {
                authority: format!("{authority}:443"),
            }),
            (false, Some(_)) => Ok(Self::Plain {
                authority: authority.to_string(),
            }),
            (false, None) => Err(format!(
                "{s:?} has no port: give HOST:PORT (the control plane listens on {DEFAULT_CONTROL_PLANE} by default)"
            )),
        }
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain { authority } => f.write_str(authority),
            Self::Tls { authority } => write!(f, "https://{authority}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where the CLI finds sidekey, and with which token.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// The control plane: HOST:PORT or http://HOST:PORT (plain gRPC), https://HOST[:PORT]
    /// (gRPC over TLS), or unix:/path.
    #[arg(
        long,
        global = true,
        env = "SIDEKEY_SERVER",
        default_value = DEFAULT_CONTROL_PLANE,
    )]
    pub server: Server,
    /// PEM file of CA certificates trusted for an https:// --server, in addition to the
    /// built-in web roots.
    #[arg(long, global = true, env = "SIDEKEY_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// File holding the control-plane bearer token (also: SIDEKEY_GRPC_TOKEN holding the
    /// token itself).
    #[arg(long, global = true, env = "SIDEKEY_GRPC_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// Why the CLI could not connect.
#[derive(Debug)]
pub enum ConnectError {
    /// The flags contradict each other (exit status 2).
    Usage(String),
    /// The server, a file or the network failed (exit status 1).
    Failed(String),
}

impl ClientArgs {
    pub async fn connect(&self, token_env: Option<String>) -> Result<Client, ConnectError> {
        if self.ca_file.is_some() && !matches!(self.server, Server::Tls { .. }) {
            return Err(ConnectError::Usage(format!(
                "--ca-file applies to an https:// --server only, and the server is {}",
                self.server
            )));
        }
        let token = match (&self.token_file, token_env) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ConnectError::Failed(format!(
                            "cannot read --token-file {}: {e}",
                            path.display()
                        ))
                    })?
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
                    .map_err(|_| {
                        ConnectError::Failed(
                            "the token holds characters not allowed in a header".to_owned(),
                        )
                    })
            })
            .transpose()?;

        let server = &self.server;
        let unreachable =
            |e: tonic::transport::Error| ConnectError::Failed(reach_failure(server, &e));
        let endpoint = |uri: String| {
            Endpoint::from_shared(uri)
                .map(|e| e.connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT))
                .map_err(|_| {
                    ConnectError::Usage(format!("--server {server} is not a valid address"))
                })
        };
        let channel = match server {
            Server::Unix(path) => {
                let path = path.clone();
                // The URI is required by the API but unused: the connector dials the socket.
                endpoint("http://localhost".into())?
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
            }
            Server::Plain { authority } => endpoint(format!("http://{authority}"))?
                .connect_with_connector(tcp_connector())
                .await
                .map_err(unreachable)?,
            Server::Tls { authority } => {
                let tls = tls_config(self.ca_file.as_deref()).map_err(ConnectError::Failed)?;
                let https = HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_only()
                    .enable_http2()
                    .wrap_connector(tcp_connector());
                // tonic built with its own TLS (the etcd client enables it) refuses an https://
                // URI it does not encrypt itself, after this connector already has. So tonic
                // gets http:// and this connector, which only speaks TLS, sees https://.
                let connector = tower::service_fn(move |uri: http::Uri| {
                    let mut https = https.clone();
                    async move {
                        let mut parts = uri.into_parts();
                        parts.scheme = Some(http::uri::Scheme::HTTPS);
                        let uri = http::Uri::from_parts(parts)?;
                        tower::Service::call(&mut https, uri).await
                    }
                });
                endpoint(format!("http://{authority}"))?
                    .connect_with_connector(connector)
                    .await
                    .map_err(unreachable)?
            }
        };
        let channel = GrpcOnly {
            inner: channel,
            server: Arc::from(server.to_string()),
        };
        Ok(TenantServiceClient::with_interceptor(
            channel,
            BearerToken(token),
        ))
    }
}

fn tcp_connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    // The scheme is checked by the TLS layer (or is plain on purpose).
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    http
}

/// The TLS client configuration of an https:// server: the built-in web roots (Mozilla's,
/// as the vendor connections use) plus the certificates of `--ca-file`. HTTP/2 is
/// negotiated by ALPN.
fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("cannot read --ca-file {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "--ca-file {} holds no PEM certificate",
                path.display()
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
        }
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// The server answered, but not as a gRPC server does: the address is some other HTTP
/// service (the admin or proxy port, a web server).
#[derive(Debug)]
pub struct NotGrpc(String);

impl fmt::Display for NotGrpc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotGrpc {}

/// The channel to the control plane, refusing any answer that is not gRPC (a gRPC answer,
/// error or not, has an `application/grpc` content type) so that a wrong port reads as
/// such rather than as a garbled message.
#[derive(Clone)]
pub struct GrpcOnly {
    inner: Channel,
    server: Arc<str>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<Body>> for GrpcOnly {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(req);
        let server = Arc::clone(&self.server);
        Box::pin(async move {
            let response = call.await?;
            let grpc = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if grpc {
                Ok(response)
            } else {
                Err(Box::new(NotGrpc(format!(
                    "{server} answered HTTP {}, not gRPC: is that the admin or proxy port? the control plane listens on {DEFAULT_CONTROL_PLANE} by default (serve --grpc-listen)",
                    response.status().as_u16()
                ))) as tower::BoxError)
            }
        })
    }
}

/// Walks `error`'s source chain.
fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// Every error in `error`'s chain, looking inside `io::Error`s too (their `source()` skips
/// the error they wrap, and hyper-rustls wraps tokio-rustls's io::Error in another).
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    let mut out = Vec::new();
    for e in chain(error) {
        let mut e = Some(e);
        while let Some(current) = e {
            out.push(current);
            e = current
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn std::error::Error + 'static));
        }
    }
    out
}

/// One sentence on why `server` could not be reached, from the cause at the bottom of
/// `error`'s chain, or `None` when nothing in it is about reaching the server.
fn reach_sentence(server: &Server, error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let causes = causes(error);
    let not_http2 = || match server {
        Server::Plain { .. } => format!(
            "{server} answered, but not in HTTP/2: is it a web server, or a TLS port (then use https://HOST:PORT)? sidekey's control plane listens on {DEFAULT_CONTROL_PLANE} by default"
        ),
        _ => {
            format!("{server} answered, but not in HTTP/2: is it sidekey's --grpc-listen address?")
        }
    };
    for e in &causes {
        if let Some(not_grpc) = e.downcast_ref::<NotGrpc>() {
            return Some(not_grpc.to_string());
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::InvalidCertificate(why) => format!(
                    "{server} presented a certificate that is not trusted ({why:?}): give the CA that signed it with --ca-file"
                ),
                other => format!(
                    "{server} did not complete a TLS handshake ({other}): if it serves plain gRPC, use HOST:PORT or http://HOST:PORT"
                ),
            });
        }
    }
    for e in &causes {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind;
            let hint = match server {
                Server::Unix(_) => "is `sidekey serve --grpc-listen` this socket?",
                _ => "is `sidekey serve` running, with --grpc-listen at this address?",
            };
            return Some(match io.kind() {
                ErrorKind::ConnectionRefused => {
                    format!("nothing listens on {server} (connection refused): {hint}")
                }
                ErrorKind::NotFound if matches!(server, Server::Unix(_)) => {
                    format!("there is no socket at {server}: {hint}")
                }
                ErrorKind::PermissionDenied => format!(
                    "permission denied connecting to {server}: the socket is mode 0600, for the user sidekey runs as"
                ),
                // Closed on the HTTP/2 preface: an HTTP/1 server answering 400 and hanging up.
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof => {
                    not_http2()
                }
                ErrorKind::TimedOut => format!(
                    "{server} did not answer within {CONNECT_TIMEOUT:?}: check the address and any firewall"
                ),
                _ => format!("cannot reach {server}: {io}: {hint}"),
            });
        }
    }
    // HTTP/2 broken by the peer's bytes, as our side detected it (a GOAWAY we sent, e.g.
    // FRAME_SIZE_ERROR on an HTTP/1 status line): something answered, but not HTTP/2.
    if causes
        .iter()
        .filter_map(|e| e.downcast_ref::<h2::Error>())
        .any(|h2| h2.is_library() || h2.is_io())
    {
        return Some(not_http2());
    }
    None
}

fn reach_failure(server: &Server, error: &tonic::transport::Error) -> String {
    reach_sentence(server, error).unwrap_or_else(|| {
        let cause = chain(error).last().map(ToString::to_string).unwrap_or_default();
        format!("cannot reach sidekey at {server}: {cause}: is `sidekey serve` running there? (set --server or SIDEKEY_SERVER)")
    })
}

/// A failed call as a user should read it.
pub fn explain(server: &Server, status: &Status) -> String {
    if let Some(sentence) = reach_sentence(server, status) {
        return sentence;
    }
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
        // Every sidekey serves the whole TenantService: another gRPC server answered.
        Code::Unimplemented => format!(
            "{server} is a gRPC server, but not sidekey's control plane (it does not serve sidekey.v1.TenantService): the control plane listens on {DEFAULT_CONTROL_PLANE} by default (serve --grpc-listen)"
        ),
        Code::DeadlineExceeded => format!(
            "{server} did not answer within {CALL_TIMEOUT:?}: {}",
            status.message()
        ),
        _ => status.message().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::Server;

    #[test]
    fn server_addresses_have_one_grammar() {
        let plain = |a: &str| Server::Plain {
            authority: a.into(),
        };
        assert_eq!("127.0.0.1:50051".parse(), Ok(plain("127.0.0.1:50051")));
        assert_eq!("localhost:50051".parse(), Ok(plain("localhost:50051")));
        assert_eq!("[::1]:50051".parse(), Ok(plain("[::1]:50051")));
        assert_eq!(
            "http://127.0.0.1:50051".parse(),
            Ok(plain("127.0.0.1:50051"))
        );
        assert_eq!(
            "http://127.0.0.1:50051/".parse(),
            Ok(plain("127.0.0.1:50051"))
        );
        assert_eq!(
            "https://sidekey.example:8443".parse(),
            Ok(Server::Tls {
                authority: "sidekey.example:8443".into()
            })
        );
        assert_eq!(
            "https://sidekey.example".parse(),
            Ok(Server::Tls {
                authority: "sidekey.example:443".into()
            })
        );
        assert_eq!(
            "unix:/run/sidekey/grpc.sock".parse(),
            Ok(Server::Unix("/run/sidekey/grpc.sock".into()))
        );
        for bad in [
            "",
            "127.0.0.1",
            "localhost",
            "http://localhost",
            "ftp://host:21",
            "grpc://host:1",
            "http://host:1/path",
            "http://user@host:1",
            "http://host:1?x=1",
            "host:port",
            "host:99999",
            ":50051",
            "unix:",
            "unix:relative.sock",
            "http://",
        ] {
            assert!(bad.parse::<Server>().is_err(), "{bad:?} should be refused");
        }
    }
}
