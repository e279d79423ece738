//! Adversarial cases: data plane.
