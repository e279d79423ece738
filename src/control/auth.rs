//! Bearer-token authentication of control-plane calls (`--grpc-token-file`).

use std::path::Path;
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::secret::Secret;

/// The token control calls must present as `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct ControlToken(Arc<Secret>);

impl ControlToken {
    /// Reads the token from `path`; surrounding whitespace (a trailing newline) is ignored.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let raw = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read --grpc-token-file {}: {e}", path.display()))?;
        let token = raw.trim();
        if token.is_empty() {
            return Err(format!("--grpc-token-file {} is empty", path.display()));
        }
        if token.chars().any(|c| c.is_control() || c == ' ') {
            return Err(format!(
                "--grpc-token-file {} must hold one token without spaces",
                path.display()
            ));
        }
        Ok(Self(Arc::new(Secret::new(token))))
    }

    /// Checks a request's metadata; the comparison takes the same time wherever the
    /// presented token first differs.
    pub fn check<T>(&self, req: Request<T>) -> Result<Request<T>, Status> {
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match presented {
            Some(p) if bool::from(p.as_bytes().ct_eq(self.0.expose().as_bytes())) => Ok(req),
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid")),
            None => Err(Status::unauthenticated(
                "this sidekey requires \"authorization: Bearer <token>\" (see --grpc-token-file)",
            )),
        }
    }
}
