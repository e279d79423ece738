//! The global byte budget for request bodies held in memory: Mailkit bodies read to be
//! rewritten, m3ter bodies kept to be replayed once after a refused token.
//!
//! Per-request limits bound one body; this bounds them all together, so a burst of large
//! uploads costs at most the budget in memory, not the connection cap times the body limit.
//! A body reserves its bytes before they are read (its declared length up front, or frame by
//! frame when the length is unknown) and frees them when its request to the vendor is done.
//! A body that does not fit is refused at once rather than queued: a queue would hold the
//! connection and the app's bytes anyway.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a body was not taken into memory; the proxy maps each to its documented refusal.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// The body is longer than the caller's per-request limit (413 `body_too_large`).
    #[error("the request body exceeds the {limit}-byte limit")]
    TooLarge { limit: usize },
    /// The budget has no room for it now (503 `body_budget_exhausted`).
    #[error("the body memory budget is exhausted")]
    Exhausted,
    /// The app's connection failed while the body was read (400 `bad_request`).
    #[error("reading the request body failed")]
    Read,
}

/// Gauge of the bytes of request bodies held in memory now.
pub const METRIC_HELD_BYTES: &str = "sidekey_proxy_body_budget_held_bytes";

/// Registers the budget gauge's help text.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        METRIC_HELD_BYTES,
        metrics::Unit::Bytes,
        "Bytes of request bodies held in memory now, within --body-memory-budget"
    );
}

/// The budget shared by every request of one proxy. Cheap to clone.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    free: Arc<Semaphore>,
    total: usize,
    /// [`METRIC_HELD_BYTES`], registered once: a lookup by name on every reservation costs
    /// measurable CPU at tens of thousands of requests per second.
    held_gauge: metrics::Gauge,
}

/// Bytes reserved from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reserved {
    permit: Option<OwnedSemaphorePermit>,
    budget: BodyBudget,
}

impl BodyBudget {
    pub fn new(total: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            free: Arc::new(Semaphore::new(total)),
            total,
            held_gauge: metrics::gauge!(METRIC_HELD_BYTES),
        }
    }

    /// Bytes reserved by bodies now.
    pub fn held(&self) -> usize {
        self.total.saturating_sub(self.free.available_permits())
    }

    /// An empty reservation, to grow as a body of unknown length arrives.
    pub fn empty(&self) -> Reserved {
        Reserved {
            permit: None,
            budget: self.clone(),
        }
    }

    /// Reserves `bytes` for a body about to be read, or refuses with `body_budget_exhausted`.
    pub fn reserve(&self, bytes: u64) -> Result<Reserved, BudgetError> {
        let mut reserved = self.empty();
        let bytes = usize::try_from(bytes).map_err(|_| BudgetError::Exhausted)?;
        self.grow(&mut reserved, bytes)?;
        Ok(reserved)
    }

    /// Reserves `bytes` more for `reserved`, or refuses with `body_budget_exhausted`.
    pub fn grow(&self, reserved: &mut Reserved, bytes: usize) -> Result<(), BudgetError> {
        if bytes == 0 {
            return Ok(());
        }
        let n = u32::try_from(bytes).map_err(|_| BudgetError::Exhausted)?;
        let permit = self
            .free
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| BudgetError::Exhausted)?;
        match &mut reserved.permit {
            Some(held) => held.merge(permit),
            None => reserved.permit = Some(permit),
        }
        self.held_gauge.set(self.held() as f64);
        Ok(())
    }

    /// Reads `body` into memory, reserving its bytes; refuses it past `limit` bytes (413
    /// `body_too_large`) or past the budget (503 `body_budget_exhausted`) without reading
    /// further. A declared length is reserved whole before the first byte is read.
    pub async fn read(
        &self,
        mut body: Incoming,
        limit: usize,
    ) -> Result<(Bytes, Reserved), BudgetError> {
        let too_large = BudgetError::TooLarge { limit };
        let declared = body.size_hint().exact();
        let mut reserved = self.empty();
        let mut buf = match declared {
            Some(n) if n > limit as u64 => return Err(too_large),
            Some(n) => {
                reserved = self.reserve(n)?;
                BytesMut::with_capacity(usize::try_from(n).unwrap_or(0))
            }
            None => BytesMut::new(),
        };
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| BudgetError::Read)?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() + data.len() > limit {
                return Err(too_large);
            }
            if declared.is_none() {
                self.grow(&mut reserved, data.len())?;
            }
            buf.extend_from_slice(&data);
        }
        Ok((buf.freeze(), reserved))
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            drop(permit);
            self.budget.held_gauge.set(self.budget.held() as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gauge's value in Prometheus text.
    fn held_gauge(text: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(METRIC_HELD_BYTES)?.trim().parse().ok())
    }

    #[test]
    fn reservations_share_one_budget_and_show_in_the_gauge() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let budget = BodyBudget::new(100);
            let a = budget.reserve(60).unwrap();
            assert_eq!(held_gauge(&handle.render()), Some(60.0));
            assert!(matches!(budget.reserve(41), Err(BudgetError::Exhausted)));
            let mut b = budget.reserve(40).unwrap();
            assert!(budget.grow(&mut b, 1).is_err(), "full");
            assert_eq!(budget.held(), 100);
            drop(a);
            assert_eq!(budget.held(), 40);
            assert_eq!(held_gauge(&handle.render()), Some(40.0));
            // A body of unknown length grows frame by frame.
            budget.grow(&mut b, 59).unwrap();
            budget.grow(&mut b, 1).unwrap();
            assert!(budget.grow(&mut b, 1).is_err());
            drop(b);
            assert_eq!(budget.held(), 0);
            assert_eq!(held_gauge(&handle.render()), Some(0.0));
            // Larger than the whole budget, or than a semaphore can count: refused, not a panic.
            assert!(budget.reserve(101).is_err());
            assert!(budget.reserve(u64::MAX).is_err());
            assert!(budget.empty().permit.is_none());
        });
    }
}
