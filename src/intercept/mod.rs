//! HTTPS interception: the local CA an operator creates with `sidekey ca init` and gives to
//! `sidekey serve --intercept-ca-cert/--intercept-ca-key`, and the leaf certificates minted
//! from it for the vendor host each `CONNECT` names.
//!
//! - [`ca`]: creating the CA (name-constrained to the vendors' DNS suffixes) and loading it,
//!   with the start-up checks (readable, key matches certificate, constrained unless allowed)
//!   and a warning for each vendor domain its name constraints do not cover.
//! - [`leaf`]: one short-lived ECDSA P-256 leaf per host, cached and renewed before expiry,
//!   served only to a TLS client whose SNI names that host; none is minted for a host the
//!   CA's name constraints do not permit (clients would reject it).
//!
//! The tunnel itself (the `CONNECT` answer, the TLS handshake and the requests inside) is
//! `proxy::tunnel`: requests inside take exactly the proxy's path.

pub mod ca;
pub mod leaf;

pub use ca::{CaError, InterceptCa};
pub use leaf::{LEAF_LIFETIME, LEAF_RENEW_AFTER, Leaves};
