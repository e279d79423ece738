//! Adversarial cases: store.
