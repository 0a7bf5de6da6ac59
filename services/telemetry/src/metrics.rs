//! Prometheus text exposition, written by hand: counters and gauges the
//! services read from their own state when scraped, and [`RpcMetrics`],
//! per-method call counts by gRPC code and latency histograms, kept in
//! atomics so recording takes no lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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

/// Escapes a label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metrics page being written.
#[derive(Default)]
pub struct Page {
    out: String,
}

impl Page {
    /// Starts a family: its HELP and TYPE lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample with labels.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) -> &mut Self {
        self.family(name, kind, help).sample(name, &[], value)
    }

    /// `chat_build_info{service,version,release} 1`.
    pub fn build_info(&mut self, service: &str, version: &str, release: Option<&str>) -> &mut Self {
        self.family(
            "chat_build_info",
            "gauge",
            "Build version and release label.",
        );
        let mut labels = vec![("service", service), ("version", version)];
        if let Some(r) = release {
            labels.push(("release", r));
        }
        self.sample("chat_build_info", &labels, 1.0)
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// A latency histogram in atomics.
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The histogram's samples (`_bucket`, `_sum`, `_count`) under `name`.
    pub fn render(&self, page: &mut Page, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let le = b.to_string();
            let mut l = labels.to_vec();
            l.push(("le", &le));
            page.sample(&bucket, &l, cumulative as f64);
        }
        let count = self.count.load(Relaxed) as f64;
        let mut l = labels.to_vec();
        l.push(("le", "+Inf"));
        page.sample(&bucket, &l, count);
        page.sample(
            &format!("{name}_sum"),
            labels,
            self.sum_us.load(Relaxed) as f64 / 1e6,
        );
        page.sample(&format!("{name}_count"), labels, count);
    }
}

struct Method {
    name: &'static str,
    codes: [AtomicU64; 17],
    latency: Histogram,
}

/// Calls served, by method and gRPC code, and their latency, for a fixed
/// set of methods (others are counted under "other").
pub struct RpcMetrics {
    methods: Vec<Method>,
}

impl RpcMetrics {
    pub fn new(methods: &[&'static str]) -> Self {
        let mut names = methods.to_vec();
        names.push("other");
        Self {
            methods: names
                .into_iter()
                .map(|name| Method {
                    name,
                    codes: std::array::from_fn(|_| AtomicU64::new(0)),
                    latency: Histogram::default(),
                })
                .collect(),
        }
    }

    /// One call of `method` that ended with gRPC `code` after `elapsed`.
    pub fn record(&self, method: &str, code: usize, elapsed: Duration) {
        let m = self
            .methods
            .iter()
            .find(|m| m.name == method)
            .or(self.methods.last())
            .expect("`other` is always there");
        m.codes[code.min(16)].fetch_add(1, Relaxed);
        m.latency.observe(elapsed);
    }

    /// How many calls of `method` ended with `code`.
    pub fn count(&self, method: &str, code: usize) -> u64 {
        self.methods
            .iter()
            .find(|m| m.name == method)
            .map_or(0, |m| m.codes[code.min(16)].load(Relaxed))
    }

    /// `<prefix>_rpc_total{method,code}` and
    /// `<prefix>_rpc_duration_seconds{method}`.
    pub fn render(&self, page: &mut Page, prefix: &str) {
        let total = format!("{prefix}_rpc_total");
        page.family(
            &total,
            "counter",
            "Calls served, by method and gRPC status code.",
        );
        for m in &self.methods {
            for (code, n) in m.codes.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    page.sample(
                        &total,
                        &[("method", m.name), ("code", CODES[code])],
                        n as f64,
                    );
                }
            }
        }
        let dur = format!("{prefix}_rpc_duration_seconds");
        page.family(
            &dur,
            "histogram",
            "Time to the response head (unary calls: the whole call), by method.",
        );
        for m in &self.methods {
            if m.latency.count.load(Relaxed) > 0 {
                m.latency.render(page, &dur, &[("method", m.name)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_metrics_render_in_the_prometheus_text_format() {
        let m = RpcMetrics::new(&["Send"]);
        m.record("Send", 0, Duration::from_millis(3));
        m.record("Send", 8, Duration::from_millis(40));
        m.record("Surprise", 13, Duration::from_secs(20));
        let mut page = Page::default();
        m.render(&mut page, "chat_gateway");
        page.single("chat_up", "gauge", "Whether it runs.", 1.0);
        let text = page.finish();
        assert!(
            text.contains("chat_gateway_rpc_total{method=\"Send\",code=\"OK\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("code=\"ResourceExhausted\"} 1\n"), "{text}");
        assert!(
            text.contains("method=\"other\",code=\"Internal\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "chat_gateway_rpc_duration_seconds_bucket{method=\"Send\",le=\"0.005\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "chat_gateway_rpc_duration_seconds_bucket{method=\"Send\",le=\"+Inf\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE chat_up gauge\nchat_up 1\n"), "{text}");
        assert_eq!(m.count("Send", 8), 1);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut p = Page::default();
        p.sample("x", &[("v", "a\"b\\c\nd")], 1.0);
        assert_eq!(p.finish(), "x{v=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}

/// A tower layer that records every call's method, gRPC code and time to
/// the response head into [`RpcMetrics`]; put it outermost, so refusals
/// by the layers inside are counted too.
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
            metrics.record(&method, code, started.elapsed());
            Ok(resp)
        })
    }
}
