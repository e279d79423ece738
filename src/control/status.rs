//! The one place control-plane failures become gRPC statuses (AIP-193).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::tenants::{CatalogError, FieldViolation};

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming every offending field; the
/// message repeats them for clients that do not decode details.
pub fn invalid(violations: Vec<FieldViolation>) -> Status {
    let summary: Vec<String> = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect();
    let details = ErrorDetails::with_bad_request(
        violations
            .into_iter()
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {}", summary.join("; ")),
        details,
    )
}

pub fn invalid_field(field: &str, description: &str) -> Status {
    invalid(vec![FieldViolation::new(field, description)])
}

pub fn stale_etag() -> Status {
    Status::aborted("the etag does not match: the record changed since it was read; read it again")
}

impl From<CatalogError> for Status {
    fn from(e: CatalogError) -> Self {
        match e {
            CatalogError::NotFound(_) => Status::not_found(e.to_string()),
            CatalogError::AlreadyExists(_) => Status::already_exists(e.to_string()),
            CatalogError::Aborted => stale_etag(),
            CatalogError::Invalid(v) => invalid(v),
            CatalogError::Store(e) => {
                // Store errors carry no secret; the details help an operator. A failing disk
                // is logged by the store once per change of state, not here per write.
                if !matches!(e, crate::store::StoreError::Io(_)) {
                    tracing::error!(error = %e, "store write failed");
                }
                Status::unavailable(format!("the write was not saved: {e}"))
            }
        }
    }
}
