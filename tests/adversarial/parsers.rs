//! Adversarial cases: parsers.
