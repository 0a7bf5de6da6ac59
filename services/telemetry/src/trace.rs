//! Logs and traces. `init` installs the process's subscriber: text or JSON
//! log lines filtered by a directive, and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set, OpenTelemetry spans exported over OTLP/gRPC. W3C trace context
//! crosses every hop in gRPC metadata: clients [`inject`] it into their
//! requests, servers pick it up in [`TraceLayer`], which opens one span per
//! call as a child of the caller's. So one Send is one trace through the
//! gateway, a router and the store.
//!
//! With no exporter configured, no per-call spans are made at all (the hot
//! path pays nothing for tracing it does not export).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Whether spans go anywhere (an OpenTelemetry layer is installed).
static ENABLED: AtomicBool = AtomicBool::new(false);

pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format {other:?}: use text or json")),
        }
    }
}

/// Runs exports on a runtime of its own: the batch processor exports from
/// a plain thread, and the gRPC exporter needs a Tokio reactor.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: E,
    handle: tokio::runtime::Handle,
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for OnRuntime<E>
{
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let result = self.handle.block_on(self.inner.export(batch));
        std::future::ready(result)
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Keeps the exporter running; flushes what is buffered when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn otlp(service: &str) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the exporter's runtime: {e}"))?;
    let exporter = {
        let _in = rt.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| format!("cannot build the OTLP exporter: {e}"))?
    };
    let provider = SdkTracerProvider::builder()
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .with_batch_exporter(OnRuntime {
            inner: exporter,
            handle: rt.handle().clone(),
        })
        .build();
    Ok((provider, rt))
}

/// Makes W3C trace context the propagation format and marks tracing on.
pub fn enable_propagation() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ENABLED.store(true, Relaxed);
}

/// Installs the process's subscriber; `filter` is an env-filter directive
/// such as `info` or `chat_store=debug`. Keep the returned value alive.
pub fn init(service: &str, filter: &str, format: LogFormat) -> Telemetry {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (text, json) = match format {
        LogFormat::Text => (
            Some(tracing_subscriber::fmt::layer().with_target(false)),
            None,
        ),
        LogFormat::Json => (None, Some(tracing_subscriber::fmt::layer().json())),
    };
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default();
    let (otel, provider, runtime, problem) = if endpoint.is_empty() {
        (None, None, None, None)
    } else {
        match otlp(service) {
            Ok((p, rt)) => {
                let layer =
                    tracing_opentelemetry::layer().with_tracer(p.tracer(service.to_owned()));
                (Some(layer), Some(p), Some(rt), None)
            }
            Err(e) => (None, None, None, Some(e)),
        }
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .try_init();
    if provider.is_some() {
        enable_propagation();
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    if let Some(e) = problem {
        tracing::warn!(%endpoint, "traces are not exported: {e}");
    }
    Telemetry { provider, runtime }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Puts the current span's trace context into an outgoing request.
pub fn inject<T>(req: &mut tonic::Request<T>) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(req.metadata_mut()));
}

/// Sets a field of the current call's span (when traces are exported).
pub fn record(field: &str, value: &dyn tracing::Value) {
    if enabled() {
        tracing::Span::current().record(field, value);
    }
}

/// A request carrying the current trace context.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    inject(&mut r);
    r
}

/// One span per call, the child of the caller's (from `traceparent`), named
/// after the gRPC path, around everything the server does for it. Handlers
/// fill its `user`, `conversation`, `seq` and `messages` fields with
/// [`record`].
#[derive(Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower_layer::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Traced { inner }
    }
}

#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Traced<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        if !enabled() {
            return Box::pin(self.inner.call(req));
        }
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path,
            rpc.system = "grpc",
            user = tracing::field::Empty,
            conversation = tracing::field::Empty,
            seq = tracing::field::Empty,
            messages = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        let trace = trace_id(&span).map(TraceId);
        let fut = {
            let _entered = span.enter();
            self.inner.call(req)
        }
        .instrument(span);
        Box::pin(async move {
            let mut resp = fut.await?;
            if let Some(t) = trace {
                resp.extensions_mut().insert(t);
            }
            Ok(resp)
        })
    }
}

/// The trace id of `span` in hex, when traces are exported.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    if !enabled() || span.is_none() {
        return None;
    }
    let id = span.context().span().span_context().trace_id();
    (id != opentelemetry::trace::TraceId::INVALID).then(|| id.to_string())
}

/// The trace id of a call [`TraceLayer`] traced, in hex, left in the
/// response's extensions for the layers around it (the metrics layer makes
/// it an exemplar).
#[derive(Clone, Debug)]
pub struct TraceId(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_and_bad_ones_say_what_is_allowed() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>(), Ok(LogFormat::Text));
        assert!(
            "xml"
                .parse::<LogFormat>()
                .unwrap_err()
                .contains("text or json")
        );
    }
}
