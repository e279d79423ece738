//! The embedded store: redb in `--data-dir`. (Being built.)

/// The database file inside the data directory.
pub const DATA_FILE: &str = "sidekey.redb";
