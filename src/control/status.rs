//! The one place control-plane failures become gRPC statuses (AIP-193).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::tenants::{CatalogError, FieldViolation};

/// At most this many field violations are reported; the message says how many there were.
pub const MAX_REPORTED_VIOLATIONS: usize = 4;
/// Longest field path reported, in bytes; longer ones are cut.
const MAX_FIELD_LEN: usize = 96;
/// Longest violation description reported, in bytes; longer ones are cut.
const MAX_DESCRIPTION_LEN: usize = 240;

/// `INVALID_ARGUMENT` with a `google.rpc.BadRequest` naming the offending fields; the
/// message repeats them for clients that do not decode details.
///
/// Both travel in response metadata (`grpc-message`, `grpc-status-details-bin`), which
/// clients cap (grpcio: 8 KiB for all of it; a larger status surfaces as
/// RESOURCE_EXHAUSTED instead of the field errors). So only the first
/// [`MAX_REPORTED_VIOLATIONS`] are reported, each cut to a bounded length, and the message
/// states the total: the whole status stays under 4 KiB however many fields are wrong.
pub fn invalid(violations: Vec<FieldViolation>) -> Status {
    let total = violations.len();
    let reported: Vec<FieldViolation> = violations
        .into_iter()
        .take(MAX_REPORTED_VIOLATIONS)
        .map(|v| {
            FieldViolation::new(
                cut(v.field, MAX_FIELD_LEN),
                cut(v.description, MAX_DESCRIPTION_LEN),
            )
        })
        .collect();
    let mut message = format!(
        "invalid request: {}",
        reported
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if total > reported.len() {
        message.push_str(&format!(
            " (and {} more; {total} field violations in all)",
            total - reported.len()
        ));
    }
    let details = ErrorDetails::with_bad_request(
        reported
            .into_iter()
            .map(|v| tonic_types::FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// `text` cut to at most `max` bytes at a character boundary, marked with "...".
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
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
            // An unreachable shared store (etcd) is logged by the store once per change of
            // state, not here per call; its message says what was and was not done.
            CatalogError::Store(crate::store::StoreError::Unavailable(message)) => {
                Status::unavailable(message)
            }
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
