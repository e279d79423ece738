//! Helpers shared by the unit tests of several modules.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

use tracing_subscriber::Layer;
use tracing_subscriber::filter::dynamic_filter_fn;
use tracing_subscriber::layer::SubscriberExt;

/// Two master keys (hex) for store tests.
pub(crate) const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub(crate) const KEY_B: &str = "1f1e1d1c1b1a191817161514131211100f0e0d0c0b0a09080706050403020100";

/// The master-key ring in `text` (one key per line, the first active).
pub(crate) fn key_ring(text: &str) -> crate::store::master_key::MasterKeys {
    crate::store::master_key::MasterKeys::parse(text, "test").unwrap()
}

thread_local! {
    /// Where this thread's events go while a [`LogCapture::capture`] guard lives.
    static CURRENT: RefCell<Option<LogCapture>> = const { RefCell::new(None) };
}

/// Collects everything logged at any level on one thread, so a test can search the log for
/// secrets.
///
/// Why one process-wide subscriber rather than a scoped one per test: tracing caches each
/// callsite's interest. A callsite first reached on another test's thread, while no scoped
/// subscriber existed, can be cached as "never" and then stays silent for a scoped subscriber
/// registered a moment later, which made the positive log assertions flaky under `cargo test`
/// (all unit tests in one process). The global subscriber below is installed once and asks
/// per event ("sometimes") whether the emitting thread is capturing.
#[derive(Clone, Default)]
pub(crate) struct LogCapture(Arc<Mutex<Vec<u8>>>);

/// Captures this thread's events until dropped.
pub(crate) struct CaptureGuard(());

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.borrow_mut().take());
    }
}

impl LogCapture {
    /// Routes every event emitted on this thread, at every level, here until the guard drops.
    pub(crate) fn capture(&self) -> CaptureGuard {
        install_global_subscriber();
        CURRENT.with(|c| *c.borrow_mut() = Some(self.clone()));
        CaptureGuard(())
    }

    /// Runs `f` with this thread's events captured here.
    pub(crate) fn during<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.capture();
        f()
    }

    /// Everything written so far.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn install_global_subscriber() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let capturing = dynamic_filter_fn(|_, _| CURRENT.with(|c| c.borrow().is_some()));
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(|| ThreadWriter)
            .with_filter(capturing);
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in the unit tests");
    });
}

/// Writes into the emitting thread's capture, if any.
struct ThreadWriter;

impl Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        CURRENT.with(|c| {
            if let Some(capture) = c.borrow().as_ref() {
                capture.0.lock().unwrap().extend_from_slice(buf);
            }
        });
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The error code the app would see for a vendor rule's refusal, through the proxy's one
/// mapping (`proxy::error`), so rule tests assert the contract rather than a variant.
pub(crate) trait RefusalCode {
    fn code(self) -> &'static str;
}

impl RefusalCode for crate::vendors::RuleError {
    fn code(self) -> &'static str {
        crate::proxy::ProxyError::from(self).code()
    }
}
