//! The fields of the text log format, written straight to the line when the output has no
//! colours (a file, a pipe, a log collector: sidekey in production).
//!
//! tracing-subscriber's `DefaultFields` writes each field as `name=value` through nested
//! formatters that paint the name and the `=`, a paint that is empty with colours off yet
//! still costs its formatting: with the request log on (ten fields a request) that was ~6 %
//! of sidekey's CPU per request. [`PlainFields`] writes the same bytes without it, and hands
//! over to `DefaultFields` for colours (a terminal) and for the fields it treats specially
//! (the message, `r#` names, `log.` metadata, errors). The tests hold the two to the same
//! output.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{RecordFields, VisitOutput};
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, DefaultVisitor, Writer};

/// `DefaultFields`' output, written without styling when the writer has no colours.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return DefaultFields::new().format_fields(writer, fields);
        }
        let mut visitor = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct PlainVisitor<'writer> {
    writer: Writer<'writer>,
    /// No field written yet: the next one needs no separating space.
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// Writes ` name=` (no space before the first field) and returns true, or returns false
    /// for a field `DefaultFields` formats in a way of its own (`log.` metadata, skipped,
    /// is the caller's).
    fn plain_name(&mut self, field: &Field) -> bool {
        let name = field.name();
        if name == "message" || name.starts_with("r#") {
            return false;
        }
        if !std::mem::replace(&mut self.is_empty, false) {
            self.result = self.writer.write_char(' ');
        }
        if self.result.is_ok() {
            self.result = self
                .writer
                .write_str(name)
                .and_then(|()| self.writer.write_char('='));
        }
        self.result.is_ok()
    }

    /// A field formatted by `DefaultFields`' own visitor, on the same line.
    fn default_format(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut default = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut default);
        self.result = default.finish();
        // Everything but `log.` metadata (skipped, not written) writes something.
        self.is_empty = false;
    }
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        if !self.plain_name(field) {
            return self.default_format(|d| d.record_str(field, value));
        }
        // `{:?}` of a string with nothing to escape is the string in quotes.
        self.result = if value
            .bytes()
            .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
        {
            self.writer
                .write_char('"')
                .and_then(|()| self.writer.write_str(value))
                .and_then(|()| self.writer.write_char('"'))
        } else {
            write!(self.writer, "{value:?}")
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record_debug(field, &value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record_debug(field, &value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.record_debug(field, &value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record_debug(field, &value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.default_format(|d| d.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        if self.plain_name(field) {
            self.result = write!(self.writer, "{value:?}");
        } else {
            self.default_format(|d| d.record_debug(field, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Lines {
        type Writer = Lines;
        fn make_writer(&'a self) -> Lines {
            self.clone()
        }
    }

    #[derive(Debug)]
    struct Failed(Option<Box<Failed>>);

    impl fmt::Display for Failed {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("vendor said \"no\"\x1b[31m")
        }
    }

    impl std::error::Error for Failed {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.0.as_deref().map(|e| e as _)
        }
    }

    /// The events a log line can hold: every kind of value, strings that need escaping
    /// and strings that do not, the fields `DefaultFields` treats specially, in all orders.
    fn log_events() {
        let error = Failed(Some(Box::new(Failed(None))));
        let path = "/api/v2/devices";
        tracing::info!(
            request_id = %"0af7651916cd43dd",
            tenant = "acme",
            vendor = "miradore",
            method = %http::Method::GET,
            path = %path,
            status = 200u16,
            latency_ms = 1.25,
            error = "",
            app_request_id = "",
            trace_id = "4bf92f3577b34da6a3ce929d0e0e4736",
            "proxied request"
        );
        tracing::info!(
            latency_ms = 1.0,
            small = 0.000_01,
            nan = f64::NAN,
            neg = -3i64
        );
        tracing::warn!(
            quoted = "say \"hi\"",
            backslash = "C:\\x",
            control = "a\nb\tc\x1b[0m\x7f",
            unicode = "zoë ✓ \u{301}",
            single = "it's",
            empty = "",
            yes = true,
            big = u64::MAX,
            "message with {} and \x1b[31m escape",
            "args"
        );
        tracing::error!(
            r#type = "x",
            r#fn = 1,
            cause = &error as &dyn std::error::Error
        );
        tracing::info!(
            log.target = "legacy",
            log.line = 3u64,
            after = "kept",
            "from log"
        );
        tracing::info!(log.target = "first", only = 1);
        tracing::info!(debugged = ?vec!["a", "b\""], bytes = &b"\x00\xff"[..]);
        tracing::info!("just a message");
        tracing::info!(only = "field");
    }

    fn format_with<F>(fields: F, ansi: bool) -> String
    where
        F: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(ansi)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, log_events);
        let bytes = lines.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn the_same_lines_as_default_fields() {
        let plain = format_with(PlainFields, false);
        let default = format_with(DefaultFields::new(), false);
        assert_eq!(plain, default);
        // The events above are all there, in the expected shape.
        assert_eq!(plain.lines().count(), 9, "{plain}");
        assert!(plain.contains(
            "proxied request request_id=0af7651916cd43dd tenant=\"acme\" vendor=\"miradore\" \
             method=GET path=/api/v2/devices status=200 latency_ms=1.25 error=\"\""
        ));
        assert!(plain.contains(r#"quoted="say \"hi\"" backslash="C:\\x""#));
        assert!(plain.contains(r#"control="a\nb\tc\u{1b}[0m\u{7f}""#));
    }

    #[test]
    fn with_colours_the_default_fields_format() {
        let plain = format_with(PlainFields, true);
        let default = format_with(DefaultFields::new(), true);
        assert_eq!(plain, default);
        assert!(plain.contains('\x1b'), "colours on: {plain}");
    }
}
