//! Adversarial cases: control plane.
