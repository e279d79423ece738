//! The log writer of `serve`: log lines are appended to a buffer in memory and written to
//! stderr in batches by a thread of their own, so that a proxied request's log line costs a
//! copy, not a `write` system call.
//!
//! - **Delay:** a line reaches stderr at most [`BATCH_INTERVAL`] after it was logged. The
//!   thread sleeps while nothing is buffered (an idle sidecar is never woken by it) and is
//!   woken by the first line of a batch.
//! - **Bounded, never dropping:** past [`MAX_BUFFERED`] bytes the logging thread writes the
//!   batch itself (the old behaviour, a blocking write), so memory stays bounded and no line
//!   is dropped to keep up.
//! - **Order:** batches are written under one lock, in the order their lines were buffered.
//! - **Exit:** dropping the [`FlushGuard`] (at the end of `main`) writes what is buffered.
//! - **A failed write** (stderr closed: the log collector went away) loses that batch, as a
//!   failed unbuffered write would have lost its line; it is counted in
//!   `sidekey_log_lines_lost_total` and never fails or stops the proxy.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// The longest a log line waits in memory before it is written.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(20);

/// Bytes buffered before the logging thread writes the batch itself.
pub const MAX_BUFFERED: usize = 1 << 20;

/// Lines lost to failed writes.
pub const METRIC_LINES_LOST: &str = "sidekey_log_lines_lost_total";

/// HELP for this module's series, and the counter exported at 0 from the start.
pub fn describe_metrics() {
    metrics::describe_counter!(
        METRIC_LINES_LOST,
        "Log lines lost because writing them to stderr failed"
    );
    metrics::counter!(METRIC_LINES_LOST).increment(0);
}

/// Where batches go: stderr in `serve`, anything in tests.
type Sink = Box<dyn Write + Send>;

struct Shared {
    /// Lines not yet written.
    buffer: Mutex<Vec<u8>>,
    /// The destination, locked for the whole of a batch's write so that batches stay in order.
    sink: Mutex<Sink>,
    /// Set by [`FlushGuard`]: the thread writes what is left and ends.
    stopping: AtomicBool,
}

impl Shared {
    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while a lock is held leaves a buffer of whole or partial lines: still fine
        // to write.
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes everything buffered so far.
    fn write_batch(&self) {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        // Taken under the sink's lock: a batch taken later is written later.
        let batch = std::mem::take(&mut *self.buffer());
        if batch.is_empty() {
            return;
        }
        if sink.write_all(&batch).and_then(|()| sink.flush()).is_err() {
            let lines = batch.iter().filter(|b| **b == b'\n').count();
            metrics::counter!(METRIC_LINES_LOST).increment(lines as u64);
        }
        // The buffer's allocation is not reused: a burst does not keep its memory for ever.
    }
}

/// The [`MakeWriter`] to hand to tracing-subscriber; cheap to clone.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
    flusher: Thread,
}

/// Writes what is buffered and stops the writing thread when dropped.
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BatchWriter {
    /// A writer batching into stderr, and the guard that flushes it at exit.
    pub fn stderr() -> io::Result<(Self, FlushGuard)> {
        Self::new(Box::new(io::stderr()), BATCH_INTERVAL)
    }

    /// A writer batching into `sink` every `interval`.
    pub fn new(sink: Sink, interval: Duration) -> io::Result<(Self, FlushGuard)> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Vec::new()),
            sink: Mutex::new(sink),
            stopping: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("sidekey-log".into())
                .spawn(move || run(&shared, interval))?
        };
        let writer = Self {
            shared: shared.clone(),
            flusher: thread.thread().clone(),
        };
        Ok((
            writer,
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        ))
    }
}

/// The writing thread: asleep until a batch starts, then writes it `interval` later.
fn run(shared: &Shared, interval: Duration) {
    loop {
        // Woken by the first line of a batch, or by the guard. `park` may also return
        // spuriously: then this is an early, harmless write of an empty batch.
        thread::park();
        if !shared.stopping.load(Ordering::Acquire) {
            thread::park_timeout(interval);
        }
        shared.write_batch();
        if shared.stopping.load(Ordering::Acquire) {
            shared.write_batch();
            return;
        }
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
        // Lines logged after the thread ended (none in `serve`) are written here.
        self.shared.write_batch();
    }
}

/// One event's writer: tracing-subscriber formats a whole line, then writes it here once.
pub struct LineWriter<'a> {
    writer: &'a BatchWriter,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let shared = &self.writer.shared;
        let (first, full) = {
            let mut buffer = shared.buffer();
            let first = buffer.is_empty();
            buffer.extend_from_slice(line);
            (first, buffer.len() >= MAX_BUFFERED)
        };
        if full {
            shared.write_batch();
        } else if first {
            self.writer.flusher.unpark();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter { writer: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink whose contents the test reads; fails its writes while `broken` is set.
    #[derive(Clone, Default)]
    struct Captured {
        bytes: Arc<Mutex<Vec<u8>>>,
        broken: Arc<AtomicBool>,
    }

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if self.broken.load(Ordering::SeqCst) {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            self.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    fn line(writer: &BatchWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn lines_arrive_in_order_after_the_interval_and_at_exit() {
        let sink = Captured::default();
        // An interval no test run reaches: only the guard can write these lines.
        let (writer, guard) =
            BatchWriter::new(Box::new(sink.clone()), Duration::from_secs(3600)).unwrap();
        for i in 0..100 {
            line(&writer, &format!("line {i}\n"));
        }
        assert_eq!(
            sink.text(),
            "",
            "nothing is written before the batch is due"
        );
        drop(guard);
        let expected: String = (0..100).map(|i| format!("line {i}\n")).collect();
        assert_eq!(sink.text(), expected);
    }

    #[test]
    fn a_batch_is_written_by_the_thread_within_the_interval() {
        let sink = Captured::default();
        let (writer, _guard) =
            BatchWriter::new(Box::new(sink.clone()), Duration::from_millis(1)).unwrap();
        line(&writer, "one\n");
        // Polled with a deadline: the thread writes on its own, no guard involved.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sink.text().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the batch was never written"
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sink.text(), "one\n");
    }

    #[test]
    fn a_full_buffer_is_written_by_the_logging_thread_itself() {
        let sink = Captured::default();
        let (writer, guard) =
            BatchWriter::new(Box::new(sink.clone()), Duration::from_secs(3600)).unwrap();
        let long = "x".repeat(MAX_BUFFERED / 4 - 1) + "\n";
        for _ in 0..4 {
            line(&writer, &long);
        }
        // The fourth line reached the bound: written before `write` returned.
        assert_eq!(sink.text().len(), MAX_BUFFERED);
        drop(guard);
    }

    #[test]
    fn a_failed_write_loses_its_batch_and_the_logger_goes_on() {
        let sink = Captured::default();
        let (writer, guard) =
            BatchWriter::new(Box::new(sink.clone()), Duration::from_secs(3600)).unwrap();
        sink.broken.store(true, Ordering::SeqCst);
        line(&writer, "lost 1\n");
        line(&writer, "lost 2\n");
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = recorder.handle();
        metrics::with_local_recorder(&recorder, || writer.shared.write_batch());
        assert!(
            scrape.render().contains(&format!("{METRIC_LINES_LOST} 2")),
            "{}",
            scrape.render()
        );
        sink.broken.store(false, Ordering::SeqCst);
        line(&writer, "kept\n");
        drop(guard);
        assert_eq!(sink.text(), "kept\n");
    }
}
