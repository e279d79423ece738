//! The project's own adversarial suite: hostile clients, hostile bodies and documents, dead
//! peers and failing disks, each with the invariant it defends (see docs/security.md).
//! Bounded in count and time; everything runs on loopback against in-process servers.

#[path = "../support/mod.rs"]
mod support;

mod control_plane;
mod data_plane;
mod parsers;
mod store;
