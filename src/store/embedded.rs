//! The embedded store: redb in `--data-dir`. (Being built.)
