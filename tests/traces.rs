//! One Send is one trace through all three services: the gateway's call,
//! the router's and the store's spans share a trace id, each the child of
//! the hop before (W3C trace context in gRPC metadata). Spans go to an
//! in-memory exporter here; the binaries export them over OTLP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chat_tests::stack::Stack;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

fn spans_named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_one_trace_across_gateway_router_and_store() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .try_init()?;
    chat_telemetry::trace::enable_propagation();

    let stack = Stack::start().await?;
    let alice = stack.client("alice");
    alice.create_conversation("traced", &["bob".into()]).await?;
    let _ = provider.force_flush();
    exporter.reset();

    alice.send("traced", "one", b"hello".to_vec()).await?;
    // The store's span ends when its handler returns, after the ack: wait
    // for every hop's span to be exported.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans()?;
        let have = |n: &str| !spans_named(&spans, n).is_empty();
        if have("chat.v1.Chat/Send")
            && have("chat.router.v1.Router/AppendBatch")
            && have("chat.store.v1.Store/AppendBatch")
        {
            break spans;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "spans missing: {:?}",
            spans.iter().map(|s| s.name.to_string()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let send = spans_named(&spans, "chat.v1.Chat/Send");
    assert_eq!(send.len(), 1, "one Send call");
    let trace = send[0].span_context.trace_id();
    let attr = |span: &SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    assert_eq!(attr(send[0], "user").as_deref(), Some("alice"));
    assert_eq!(attr(send[0], "conversation").as_deref(), Some("traced"));
    assert_eq!(attr(send[0], "seq").as_deref(), Some("1"));
    let by_id: HashMap<_, _> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    // Each hop's span is in the Send's trace and descends from the Send.
    for hop in [
        "gateway/AppendBatch",
        "chat.router.v1.Router/AppendBatch",
        "chat.store.v1.Store/AppendBatch",
    ] {
        let found = spans_named(&spans, hop);
        let s = found
            .iter()
            .find(|s| s.span_context.trace_id() == trace)
            .unwrap_or_else(|| panic!("no {hop} span in the Send's trace"));
        let mut at = *s;
        let mut steps = 0;
        while at.span_context.span_id() != send[0].span_context.span_id() {
            at = by_id
                .get(&at.parent_span_id)
                .unwrap_or_else(|| panic!("{hop}: the chain to the Send breaks at {}", at.name));
            steps += 1;
            assert!(steps < 10, "{hop}: no path to the Send");
        }
    }
    let _ = provider.shutdown();
    stack.stop().await;
    Ok(())
}
