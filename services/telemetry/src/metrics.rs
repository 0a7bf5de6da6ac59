//! Metrics in the OpenMetrics text format, encoded by `prometheus-client`
//! (the Prometheus project's Rust library): [`RpcMetrics`], per-method call
//! counts by gRPC code and latency histograms whose buckets carry the trace
//! id of a call that landed in them (an exemplar) when traces are exported,
//! and [`Page`], the gauges and counters a service reads from its own state
//! when scraped, handed to the library's encoder as a collector.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Content type of what [`Page::finish`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// gRPC code names, by number.
pub const CODES: [&str; 17] = [
    "OK",
    "Cancelled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// What a family counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up; its name ends in `_total`.
    Counter,
    /// Goes up and down.
    Gauge,
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Scraped {
    name: String,
    help: String,
    kind: Kind,
    samples: Vec<(Labels, f64)>,
}

/// The families a service read from its own state for one scrape, encoded
/// by the library as a collector.
#[derive(Debug, Default)]
struct ScrapedFamilies(Vec<Scraped>);

impl Collector for ScrapedFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in self.0.iter().filter(|f| !f.samples.is_empty()) {
            // The library adds a counter's `_total` to its samples.
            let (name, kind) = match f.kind {
                Kind::Counter => (
                    f.name.strip_suffix("_total").unwrap_or(&f.name),
                    MetricType::Counter,
                ),
                Kind::Gauge => (f.name.as_str(), MetricType::Gauge),
            };
            let mut family = encoder.encode_descriptor(name, &f.help, None, kind)?;
            for (labels, value) in &f.samples {
                if labels.is_empty() {
                    encode_value(&mut family, f.kind, *value)?;
                } else {
                    encode_value(&mut family.encode_family(labels)?, f.kind, *value)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_value(e: &mut MetricEncoder, kind: Kind, value: f64) -> Result<(), std::fmt::Error> {
    match kind {
        // Counts are whole numbers, written as such.
        Kind::Counter if value.fract() == 0.0 && value >= 0.0 => {
            e.encode_counter::<NoLabelSet, u64, u64>(&(value as u64), None)
        }
        Kind::Counter => e.encode_counter::<NoLabelSet, f64, f64>(&value, None),
        Kind::Gauge => e.encode_gauge(&value),
    }
}

/// A metrics page being assembled for one scrape: families read from the
/// service's state ([`Page::family`], [`Page::sample`], [`Page::single`])
/// and live metrics ([`RpcMetrics::render`]), encoded by [`Page::finish`].
#[derive(Default)]
pub struct Page {
    registry: Registry,
    scraped: Vec<Scraped>,
}

impl Page {
    /// Starts a family; a counter's name ends in `_total`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"), "{name}");
        self.scraped.push(Scraped {
            name: name.to_owned(),
            help: help.to_owned(),
            kind,
            samples: Vec::new(),
        });
        self
    }

    /// One sample of the family `name` (started with [`Page::family`]).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        let i = match self.scraped.iter().rposition(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.family(name, Kind::Gauge, "");
                self.scraped.len() - 1
            }
        };
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.scraped[i].samples.push((labels, value));
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// `chat_build_info{service,version,release} 1`.
    pub fn build_info(&mut self, service: &str, version: &str, release: Option<&str>) -> &mut Self {
        self.family(
            "chat_build_info",
            Kind::Gauge,
            "Build version and release label.",
        );
        let mut labels = vec![("service", service), ("version", version)];
        if let Some(r) = release {
            labels.push(("release", r));
        }
        self.sample("chat_build_info", &labels, 1.0)
    }

    /// The page in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn finish(mut self) -> String {
        self.registry
            .register_collector(Box::new(ScrapedFamilies(self.scraped)));
        let mut out = String::new();
        // Writing to a String fails only if an encoder does, and none of
        // ours do; a half page is still better than none.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// An exemplar's labels: the trace id of a call in that bucket.
type TraceLabels = [(&'static str, String); 1];
type Latency = HistogramWithExemplars<TraceLabels>;
type MethodLabels = [(&'static str, &'static str); 1];
type CallLabels = [(&'static str, &'static str); 2];

fn latency_histogram() -> Latency {
    HistogramWithExemplars::new(LATENCY_BUCKETS.iter().copied())
}

/// One method's handles into the families, made on its first call (so
/// only methods and codes that happened are shown) and used without
/// looking them up again.
struct Method {
    name: &'static str,
    codes: [OnceLock<Counter>; 17],
    latency: OnceLock<Latency>,
}

/// Calls served, by method and gRPC code, and their latency, for a fixed
/// set of methods (others are counted under "other"). Counting a call is
/// an atomic add; the latency histogram takes its method's short lock (the
/// library's histograms keep buckets and exemplars under one).
pub struct RpcMetrics {
    calls: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Latency, fn() -> Latency>,
    methods: Vec<Method>,
}

impl RpcMetrics {
    pub fn new(methods: &[&'static str]) -> Self {
        let mut names = methods.to_vec();
        names.push("other");
        Self {
            calls: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            methods: names
                .into_iter()
                .map(|name| Method {
                    name,
                    codes: std::array::from_fn(|_| OnceLock::new()),
                    latency: OnceLock::new(),
                })
                .collect(),
        }
    }

    /// One call of `method` that ended with gRPC `code` after `elapsed`;
    /// `trace_id`, when the call was traced, becomes its bucket's exemplar.
    pub fn record(&self, method: &str, code: usize, elapsed: Duration, trace_id: Option<&str>) {
        let m = self
            .methods
            .iter()
            .find(|m| m.name == method)
            .or(self.methods.last())
            .expect("`other` is always there");
        let code = code.min(16);
        m.codes[code]
            .get_or_init(|| {
                Counter::clone(
                    &self
                        .calls
                        .get_or_create(&[("method", m.name), ("code", CODES[code])]),
                )
            })
            .inc();
        m.latency
            .get_or_init(|| Latency::clone(&self.latency.get_or_create(&[("method", m.name)])))
            .observe(
                elapsed.as_secs_f64(),
                trace_id.map(|t| [("trace_id", t.to_owned())]),
                None,
            );
    }

    /// How many calls of `method` ended with `code`.
    pub fn count(&self, method: &str, code: usize) -> u64 {
        self.methods
            .iter()
            .find(|m| m.name == method)
            .and_then(|m| m.codes[code.min(16)].get())
            .map_or(0, Counter::get)
    }

    /// `<prefix>_rpc_total{method,code}` and
    /// `<prefix>_rpc_duration_seconds{method}`.
    pub fn render(&self, page: &mut Page, prefix: &str) {
        // The registry adds the help text's full stop and a counter's
        // `_total`.
        page.registry.register(
            format!("{prefix}_rpc"),
            "Calls served, by method and gRPC status code",
            self.calls.clone(),
        );
        page.registry.register(
            format!("{prefix}_rpc_duration_seconds"),
            "Time to the response head (unary calls: the whole call), by method; \
             exemplars carry the trace id of a call in the bucket when traces are exported",
            self.latency.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_render_in_the_openmetrics_text_format() {
        let m = RpcMetrics::new(&["Send"]);
        m.record("Send", 0, Duration::from_millis(3), None);
        m.record(
            "Send",
            8,
            Duration::from_millis(40),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        );
        m.record("Surprise", 13, Duration::from_secs(20), None);
        let mut page = Page::default();
        m.render(&mut page, "chat_gateway");
        page.single("chat_up", Kind::Gauge, "Whether it runs.", 1.0);
        page.single("chat_done_total", Kind::Counter, "Work done.", 7.0);
        let text = page.finish();
        assert!(
            text.contains("chat_gateway_rpc_total{method=\"Send\",code=\"OK\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE chat_gateway_rpc counter\n"), "{text}");
        assert!(text.contains("code=\"ResourceExhausted\"} 1\n"), "{text}");
        assert!(
            text.contains("method=\"other\",code=\"Internal\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "chat_gateway_rpc_duration_seconds_bucket{le=\"0.005\",method=\"Send\"} 1\n"
            ) || text.contains(
                "chat_gateway_rpc_duration_seconds_bucket{method=\"Send\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        // The traced call's bucket names its trace.
        assert!(
            text.contains("} 2 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.04\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE chat_up gauge\nchat_up 1"), "{text}");
        assert!(
            text.contains("# TYPE chat_done counter\nchat_done_total 7\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(m.count("Send", 8), 1);
        assert_eq!(m.count("Send", 5), 0);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut p = Page::default();
        p.family("x", Kind::Gauge, "X.")
            .sample("x", &[("v", "a\"b\\c\nd")], 1.0);
        let text = p.finish();
        assert!(text.contains("x{v=\"a\\\"b\\\\c\\nd\"} 1"), "{text}");
    }
}

/// A tower layer that records every call's method, gRPC code and time to
/// the response head into [`RpcMetrics`], with the call's trace id when
/// [`crate::trace::TraceLayer`] (inside it) traced the call; put it
/// outermost, so refusals by the layers inside are counted too.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: std::sync::Arc<RpcMetrics>,
}

impl MetricsLayer {
    pub fn new(metrics: std::sync::Arc<RpcMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = Measured<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Measured {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: std::sync::Arc<RpcMetrics>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for Measured<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
        let metrics = self.metrics.clone();
        let started = std::time::Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // A unary error comes back trailers-only, its status in the
            // head; a stream's status comes later and counts as OK here.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let trace = resp.extensions().get::<crate::trace::TraceId>();
            metrics.record(
                &method,
                code,
                started.elapsed(),
                trace.map(|t| t.0.as_str()),
            );
            Ok(resp)
        })
    }
}
