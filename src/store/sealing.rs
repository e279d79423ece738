//! AEAD sealing of secrets at rest. (Being built.)
