//! Traces of a worker (docs/observability.md, "Traces"). Every step message carries a W3C
//! `traceparent` naming its attempt's span in the orchestrator; the SDK makes it the OpenTelemetry
//! parent of the `step` span the attempt's handler runs in (spans the handler opens nest below).
//! Exporting is up to the process: [`init_otlp`] installs a global subscriber that logs and,
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, exports spans over OTLP/HTTP (protobuf); or add
//! [`Traces::layer`] to a subscriber of your own. Without an OpenTelemetry layer the parent is
//! not set and nothing is built or sent.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let traces = tasker_worker::telemetry::init_otlp()?;
//! // ... run the worker ...
//! if let Some(t) = traces {
//!     t.shutdown(); // sends what is buffered
//! }
//! # Ok(())
//! # }
//! ```

use lapin::types::AMQPValue;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use std::time::Duration;
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};
use tracing_subscriber::registry::LookupSpan;

/// The standard variable naming the OTLP endpoint (the base URL; `/v1/traces` is appended).
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The trace exporter could not be built (an invalid endpoint).
#[derive(Debug, thiserror::Error)]
#[error("OTLP trace exporter: {0}")]
pub struct TelemetryError(String);

/// A worker's OTLP trace exporter. Keep it for the life of the process and call
/// [`Traces::shutdown`] at exit, or the last spans are lost.
#[derive(Debug, Clone)]
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// From `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when it is unset or empty (no exporter).
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        match std::env::var(OTLP_ENDPOINT_VAR) {
            Ok(e) if !e.trim().is_empty() => Self::otlp(e.trim(), None).map(Some),
            _ => Ok(None),
        }
    }

    /// An exporter to `endpoint` (the base URL: `/v1/traces` is appended), batching spans
    /// every `delay` (default: `OTEL_BSP_SCHEDULE_DELAY`, 5 s). The service name is
    /// `OTEL_SERVICE_NAME`, else `tasker-worker`.
    pub fn otlp(endpoint: &str, delay: Option<Duration>) -> Result<Self, TelemetryError> {
        // reqwest is built without a default rustls provider: ring, as in the rest of the SDK.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .map_err(|e| TelemetryError(e.to_string()))?;
        let mut batch = BatchConfigBuilder::default();
        if let Some(d) = delay {
            batch = batch.with_scheduled_delay(d);
        }
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("tasker-worker");
        }
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::new(exporter, batch.build()))
            .with_resource(resource.build())
            .build();
        Ok(Self { provider })
    }

    /// The tracing layer that turns spans into OpenTelemetry spans and exports them.
    pub fn layer<S>(&self) -> OpenTelemetryLayer<S, SdkTracer>
    where
        S: Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tasker-worker"))
    }

    /// Sends the buffered spans now. Blocks: from async code, call it in `spawn_blocking`.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Sends the buffered spans and stops the exporter. Blocks: from async code, call it in
    /// `spawn_blocking`.
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// Installs a global subscriber: logs to stderr (filtered by `RUST_LOG`, default `info`) and,
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, exports spans at level `info` and above over OTLP.
/// Returns the exporter to shut down at exit (`None`: traces are off). A subscriber already
/// installed is left alone.
pub fn init_otlp() -> Result<Option<Traces>, TelemetryError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let traces = Traces::from_env()?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(traces.as_ref().map(|t| {
            t.layer()
                .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
        }))
        .with(tracing_subscriber::fmt::layer().with_filter(filter))
        .try_init();
    Ok(traces)
}

/// The remote span context of a W3C `traceparent` (`00-{32 hex}-{16 hex}-{2 hex}`), if valid.
pub fn parse_traceparent(header: &str) -> Option<SpanContext> {
    let mut parts = header.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let lower_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if parts.next().is_some()
        || version != "00"
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
        || ![trace, span, flags].iter().all(|p| lower_hex(p))
    {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let cx = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Makes the step message's `traceparent` the OpenTelemetry parent of `span` (the attempt's
/// span in the orchestrator). Does nothing when the span is disabled, the header is missing or
/// invalid, or no OpenTelemetry layer is installed.
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: Option<&AMQPValue>) {
    if span.is_disabled() {
        return;
    }
    let header = match traceparent {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    };
    if let Some(parent) = header.and_then(parse_traceparent) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_into_remote_parents() {
        let cx = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            cx.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(cx.span_id(), SpanId::from_hex("00f067aa0ba902b7").unwrap());
        assert!(cx.is_remote() && cx.is_sampled());
        for bad in [
            "00-abc",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn off_without_the_variable() {
        // With the variable unset (the default in this process), no exporter is built.
        if std::env::var_os(OTLP_ENDPOINT_VAR).is_none() {
            assert!(Traces::from_env().unwrap().is_none());
        }
        // Without an OpenTelemetry layer, continuing a trace is a no-op.
        let header =
            AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        continue_trace(&tracing::info_span!("step"), Some(&header));
    }
}
