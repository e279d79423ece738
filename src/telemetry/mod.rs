//! Traces: OpenTelemetry spans exported over OTLP/gRPC, off unless `--otlp-endpoint` (or
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) names a collector.
//!
//! With tracing off nothing here runs on a request: the proxy holds `Option<Tracing>` and
//! every span site is behind that one `None` check. With it on, each proxied request gets a
//! server span (`proxy <vendor>`), joined to the app's valid `traceparent`, with client
//! children for the vendor call (`upstream <vendor>`, whose id is the parent in the
//! `traceparent` sent to the vendor) and for a wait on an m3ter token exchange (`m3ter token
//! exchange`). Attributes are names and codes only: never a credential, a query string or a
//! body (docs/operations.md lists them).
//!
//! Spans are batched and exported by the SDK's export thread, from a bounded queue: ending a
//! span never waits (a full queue drops it), and an export that does not finish within its
//! timeout is abandoned, so a slow or absent collector never holds a request.
//!
//! - [`traceparent`]: the strict W3C `traceparent` reader, also used for the log line.

pub mod traceparent;

use std::borrow::Cow;
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use futures_util::future::Either;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{RetryPolicy, WithExportConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider, Span,
};

use crate::upstream::{self, UpstreamError, VendorBody};
use traceparent::{TRACEPARENT, TRACESTATE, TraceIdText, TraceParent};

/// The standard OpenTelemetry variable naming the collector, read when `--otlp-endpoint`
/// (`SIDEKEY_OTLP_ENDPOINT`) is not set.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Finished spans waiting for export; past it new spans are dropped.
pub const MAX_QUEUE_SIZE: usize = 2048;
/// Spans per export call.
pub const MAX_EXPORT_BATCH_SIZE: usize = 512;
/// How often queued spans are exported.
pub const EXPORT_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on one export call; past it the batch is dropped. No retries: the next batch is the
/// next attempt.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to the collector.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the final flush when sidekey stops.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks an OTLP/gRPC endpoint as `--otlp-endpoint` and `OTEL_EXPORTER_OTLP_ENDPOINT` take
/// it: `http://HOST:PORT` or `https://HOST:PORT` (port optional), no path, query or
/// userinfo. `https` is verified against the public web roots.
pub fn parse_endpoint(value: &str) -> Result<String, String> {
    // The value is not echoed: a URL with userinfo may hold a password.
    let invalid =
        |why: &str| format!("not an OTLP/gRPC endpoint: {why} (e.g. http://127.0.0.1:4317)");
    let uri: http::Uri = value.parse().map_err(|_| invalid("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid("the scheme must be http or https")),
    }
    let authority = uri.authority().ok_or_else(|| invalid("it names no host"))?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err(invalid("it must name a host and no user"));
    }
    if !matches!(
        uri.path_and_query().map(|p| p.as_str()),
        None | Some("" | "/")
    ) {
        return Err(invalid("gRPC endpoints have no path or query"));
    }
    Ok(value.to_owned())
}

/// The trace pipeline: built once at start-up, cheap to clone.
#[derive(Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl fmt::Debug for Tracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Starts exporting to `endpoint` (already checked with [`parse_endpoint`]). Must run
    /// inside the tokio runtime, where the gRPC channel's I/O runs. Nothing is dialled until
    /// the first export.
    pub fn start(endpoint: &str) -> Result<Self, String> {
        let config_error = |e: &dyn fmt::Display| format!("OTLP exporter: {e}");
        let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| config_error(&e))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(EXPORT_TIMEOUT);
        if endpoint.starts_with("https:") {
            channel = channel
                .tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
                .map_err(|e| config_error(&e))?;
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(channel.connect_lazy())
            .with_timeout(EXPORT_TIMEOUT)
            .with_retry_policy(RetryPolicy::disabled())
            .build()
            .map_err(|e| config_error(&e))?;
        // The settings this processor uses are all given here: OTEL_BSP_* change nothing.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUE_SIZE)
            .with_max_export_batch_size(MAX_EXPORT_BATCH_SIZE)
            .with_scheduled_delay(EXPORT_INTERVAL)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        let resource = Resource::builder()
            .with_service_name("sidekey")
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("sidekey");
        Ok(Self { provider, tracer })
    }

    /// Exports what is queued and stops the export thread, within [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // The SDK blocks the calling thread until its export thread answers, and that
        // thread's gRPC I/O runs on this runtime: ask from a blocking thread.
        let flush = tokio::task::spawn_blocking(move || provider.shutdown());
        match tokio::time::timeout(SHUTDOWN_TIMEOUT, flush).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "flushing traces failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing traces failed"),
            Err(_) => tracing::warn!("flushing traces did not finish in time"),
        }
    }

    /// The server span of one request, child of the app's `traceparent` when it is valid.
    pub(crate) fn start_request(&self, method: &Method, headers: &HeaderMap) -> RequestTrace {
        let app = TraceParent::from_headers(headers);
        let parent = match app {
            Some(tp) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(tp.trace_id),
                SpanId::from_bytes(tp.parent_id),
                TraceFlags::new(tp.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder("proxy")
            .with_kind(SpanKind::Server)
            .with_attributes([KeyValue::new("http.request.method", method_name(method))])
            .start_with_context(&self.tracer, &parent);
        let children = Context::new().with_remote_span_context(span.span_context().clone());
        RequestTrace {
            tracer: self.tracer.clone(),
            span,
            children,
            joined: app.is_some(),
        }
    }
}

fn method_name(method: &Method) -> Cow<'static, str> {
    // A method is a short token; the common ones need no allocation.
    match *method {
        Method::GET => Cow::Borrowed("GET"),
        Method::POST => Cow::Borrowed("POST"),
        Method::PUT => Cow::Borrowed("PUT"),
        Method::PATCH => Cow::Borrowed("PATCH"),
        Method::DELETE => Cow::Borrowed("DELETE"),
        _ => Cow::Owned(method.as_str().to_owned()),
    }
}

/// One request's span, and the context its children start from (opaque outside sidekey).
pub struct RequestTrace {
    tracer: SdkTracer,
    span: Span,
    children: Context,
    /// The app sent a valid `traceparent`, so its `tracestate` belongs to this trace.
    joined: bool,
}

/// What the request span records when it ends.
pub(crate) struct RequestOutcome<'a> {
    pub vendor: &'static str,
    pub tenant: Option<&'a str>,
    pub status: u16,
    pub error: Option<&'static str>,
    pub request_id: &'a str,
}

impl RequestTrace {
    /// The trace id, as logged.
    pub(crate) fn trace_id_text(&self) -> TraceIdText {
        TraceIdText::new(self.span.span_context().trace_id().to_bytes())
    }

    /// Names the span after the vendor, records the outcome and ends it.
    pub(crate) fn finish(mut self, outcome: RequestOutcome<'_>) {
        self.span.update_name(format!("proxy {}", outcome.vendor));
        let mut attributes = vec![
            KeyValue::new("sidekey.vendor", outcome.vendor),
            KeyValue::new("sidekey.request_id", outcome.request_id.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(outcome.status)),
        ];
        if let Some(tenant) = outcome.tenant {
            attributes.push(KeyValue::new("sidekey.tenant", tenant.to_owned()));
        }
        if let Some(code) = outcome.error {
            attributes.push(KeyValue::new("sidekey.error", code));
        }
        self.span.set_attributes(attributes);
        if let Some(code) = outcome.error {
            self.span.set_status(Status::error(code));
        } else if outcome.status >= 500 {
            self.span.set_status(Status::error(""));
        }
        self.span.end();
    }

    /// Starts the span of a vendor call and makes it the parent in the request's
    /// `traceparent`. A `tracestate` the app sent without a valid `traceparent` is dropped
    /// with it: it describes no trace the vendor now sees.
    fn start_upstream<B>(&self, vendor: &'static str, req: &mut Request<B>) -> Span {
        let mut attributes = vec![KeyValue::new(
            "http.request.method",
            method_name(req.method()),
        )];
        if let Some(host) = req.uri().host() {
            attributes.push(KeyValue::new("server.address", host.to_owned()));
        }
        let span = self
            .tracer
            .span_builder(format!("upstream {vendor}"))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.children);
        let sc = span.span_context();
        let value = format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        );
        let headers = req.headers_mut();
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(TRACEPARENT, value);
        }
        if !self.joined {
            headers.remove(TRACESTATE);
        }
        span
    }

    /// Awaits `token` (a bearer token for m3ter); when it is not ready at once (an exchange
    /// is in flight, this request's or a shared one), the wait is a `m3ter token exchange`
    /// span.
    pub(crate) async fn token_exchange<T, E>(
        &self,
        token: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let started = SystemTime::now();
        let mut token = pin!(token);
        if let Poll::Ready(ready) = poll_fn(|cx| Poll::Ready(token.as_mut().poll(cx))).await {
            return ready;
        }
        let mut span = self
            .tracer
            .span_builder("m3ter token exchange")
            .with_kind(SpanKind::Internal)
            .with_start_time(started)
            .start_with_context(&self.tracer, &self.children);
        let outcome = token.await;
        if outcome.is_err() {
            span.set_attribute(KeyValue::new("sidekey.error", "token_exchange_failed"));
            span.set_status(Status::error("token_exchange_failed"));
        }
        span.end();
        outcome
    }
}

/// Sends `req` to the vendor through `client`; with `trace`, inside an `upstream <vendor>`
/// span whose id the vendor receives in `traceparent`. Without, this is
/// `client.send_by(req, deadline)`. Either way the vendor's answer is due by `deadline`.
pub(crate) fn send<'a>(
    client: &'a upstream::Client,
    trace: Option<&'a RequestTrace>,
    vendor: &'static str,
    mut req: Request<upstream::Body>,
    deadline: tokio::time::Instant,
) -> impl Future<Output = Result<Response<VendorBody>, UpstreamError>> + Send + 'a {
    match trace {
        None => Either::Left(client.send_by(req, Some(deadline))),
        Some(trace) => {
            let mut span = trace.start_upstream(vendor, &mut req);
            // Boxed: only traced requests carry this state.
            Either::Right(Box::pin(async move {
                let outcome = client.send_by(req, Some(deadline)).await;
                match &outcome {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        span.set_attribute(KeyValue::new(
                            "http.response.status_code",
                            i64::from(status),
                        ));
                        if status >= 500 {
                            span.set_status(Status::error(""));
                        }
                    }
                    Err(e) => {
                        span.set_attribute(KeyValue::new("error.type", e.kind()));
                        span.set_status(Status::error(e.kind()));
                    }
                }
                span.end();
                outcome
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_have_one_grammar() {
        for good in [
            "http://127.0.0.1:4317",
            "http://otel-collector:4317",
            "https://collector.example.com",
            "http://[::1]:4317/",
        ] {
            assert_eq!(parse_endpoint(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "",
            "127.0.0.1:4317",
            "grpc://collector:4317",
            "http://",
            "http://u:p@collector:4317",
            "http://collector:4317/v1/traces",
            "http://collector:4317?x=1",
            "unix:/run/otel.sock",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
