//! The store's health as the operator sees it: the `sidekey_store_healthy` gauge (1 healthy,
//! 0 failing), a line in `/readyz`'s body, and one log line per change of state (not per
//! failed write).

use std::sync::{Arc, Mutex};

/// The gauge: 1 while the store accepts writes, 0 while it is failing.
pub const HEALTH_GAUGE: &str = "sidekey_store_healthy";

/// Registers the help text of [`HEALTH_GAUGE`].
pub fn describe_metrics() {
    metrics::describe_gauge!(
        HEALTH_GAUGE,
        "1 while the store accepts writes, 0 while it is failing (disk full, I/O errors; in \
         fleet mode, etcd unreachable)"
    );
}

/// A shared, cheap-to-clone view of the store's health.
#[derive(Clone, Debug, Default)]
pub struct StoreHealth(Arc<Mutex<Option<String>>>);

impl StoreHealth {
    /// A healthy store; sets the gauge to 1.
    pub fn new() -> Self {
        metrics::gauge!(HEALTH_GAUGE).set(1.0);
        Self::default()
    }

    /// `None` when healthy, or why the store is failing.
    pub fn failure(&self) -> Option<String> {
        self.lock().clone()
    }

    pub fn is_healthy(&self) -> bool {
        self.lock().is_none()
    }

    /// Records a failure; logs only when the store was healthy until now.
    pub(crate) fn set_failing(&self, reason: &str) {
        let mut state = self.lock();
        if state.is_none() {
            tracing::error!(
                reason,
                "the store is failing: control-plane writes are refused \
                until it recovers; the proxy keeps serving the last saved credentials"
            );
            metrics::gauge!(HEALTH_GAUGE).set(0.0);
        }
        *state = Some(reason.to_owned());
    }

    /// Records a recovery; logs only when the store was failing until now.
    pub(crate) fn set_healthy(&self) {
        let mut state = self.lock();
        if state.take().is_some() {
            tracing::info!("the store recovered: control-plane writes are accepted again");
            metrics::gauge!(HEALTH_GAUGE).set(1.0);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // The guarded value is a plain Option, valid whatever a panicking holder did.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::LogCapture;

    #[test]
    fn logs_once_per_change_of_state_not_per_failure() {
        let capture = LogCapture::default();
        let health = capture.during(|| {
            let health = StoreHealth::new();
            for _ in 0..3 {
                health.set_failing("redb: No space left on device (os error 28)");
            }
            assert_eq!(
                health.failure().as_deref(),
                Some("redb: No space left on device (os error 28)")
            );
            health.set_healthy();
            health.set_healthy();
            health.set_failing("redb: Input/output error (os error 5)");
            health
        });
        let logs = capture.text();
        assert_eq!(logs.matches("the store is failing").count(), 2, "{logs}");
        assert_eq!(logs.matches("the store recovered").count(), 1, "{logs}");
        assert!(
            logs.contains("No space left") && logs.contains("Input/output"),
            "{logs}"
        );
        assert!(!health.is_healthy());
    }
}
