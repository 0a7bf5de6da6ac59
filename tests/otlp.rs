//! The binaries export traces over OTLP/gRPC when OTEL_EXPORTER_OTLP_ENDPOINT
//! is set: a collector stand-in receives spans from the gateway, a router
//! and the store, and a Send's spans from all three share one trace id,
//! which the gateway's latency histogram shows as the exemplar of the
//! Send's bucket.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_client::ChatClient;
use chatctl::local::{LocalCluster, LocalOptions};
use chatctl::restart::Tier;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// A received span: service.name, span name, trace id.
type Received = (String, String, Vec<u8>);

/// Every span received.
#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("collector lock");
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push((service.clone(), s.name, s.trace_id));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_export_one_trace_per_send_over_otlp() -> anyhow::Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir()?;
    let opts = LocalOptions {
        dir: dir.path().to_owned(),
        base_port: 0,
        bin_dir: Some(chat_tests::bin_dir()?),
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
            // Export every 200 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "200".into()),
        ],
        ..LocalOptions::default()
    };
    let mut cluster = LocalCluster::start(&opts)?;
    cluster.wait_healthy(Duration::from_secs(60)).await?;
    let key = chat_auth::TokenKey::new(cluster.key.clone().into_bytes())?;
    let alice = ChatClient::new(
        cluster.gateways.clone(),
        &key.sign_for("alice", 3600),
        Duration::from_secs(10),
    )?;
    alice.create_conversation("otlp", &[]).await?;
    alice.send("otlp", "one", b"traced".to_vec()).await?;

    let hops = [
        ("chat-gateway", "chat.v1.Chat/Send"),
        ("chat-router", "chat.router.v1.Router/AppendBatch"),
        ("chat-store", "chat.store.v1.Store/AppendBatch"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let send_trace = loop {
        let got = collector.0.lock().expect("collector lock").clone();
        let mut traces: HashMap<&str, HashSet<Vec<u8>>> = HashMap::new();
        for (service, name, trace) in &got {
            if let Some((_, n)) = hops.iter().find(|(s, n)| s == service && n == name) {
                traces.entry(n).or_default().insert(trace.clone());
            }
        }
        let send = traces.get("chat.v1.Chat/Send").cloned().unwrap_or_default();
        let shared = send.iter().find(|t| {
            hops.iter()
                .all(|(_, n)| traces.get(n).is_some_and(|ts| ts.contains(*t)))
        });
        if let Some(t) = shared {
            break t.clone();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no trace with spans from all three services within 30 s; received {:?}",
            got.iter()
                .map(|(s, n, _)| format!("{s}:{n}"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The Send's latency bucket on the gateway that served it names that
    // trace (an OpenMetrics exemplar), so a slow bucket leads to its trace.
    let hex: String = send_trace.iter().map(|b| format!("{b:02x}")).collect();
    let mut pages = String::new();
    for name in cluster.names(Tier::Gateway) {
        let addr = cluster.admin_addr(&name).expect("an admin port");
        let (code, body) = chat_telemetry::admin::get(&addr, "/metrics").await?;
        anyhow::ensure!(code == 200, "{name}: /metrics answered {code}");
        pages.push_str(&body);
    }
    let exemplar = format!("# {{trace_id=\"{hex}\"}}");
    anyhow::ensure!(
        pages.lines().any(
            |l| l.starts_with("chat_gateway_rpc_duration_seconds_bucket{")
                && l.contains("method=\"Send\"")
                && l.contains(&exemplar)
        ),
        "no Send latency bucket with the exemplar {exemplar} in:\n{pages}"
    );
    cluster.shutdown(Duration::from_secs(5)).await;
    server.abort();
    Ok(())
}
