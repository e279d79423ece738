//! The master key. (Being built.)
