//! Pushes deliveries to gateways: one bounded queue and one task per
//! gateway, sending whatever is queued as one `Deliver` call. A full queue
//! or a failed call drops deliveries: gateways resume from the store, so a
//! lost push delays a message but never loses it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chat_proto::router::v1::gateway_delivery_client::GatewayDeliveryClient;
use chat_proto::router::v1::{DeliverRequest, Delivery};
use chat_security::Role;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Deliveries queued per gateway before new ones are dropped.
pub const GATEWAY_QUEUE: usize = 16_384;
/// Most deliveries in one call.
const MAX_BATCH: usize = 1_024;
/// A gateway queue unused this long is closed.
const IDLE: Duration = Duration::from_secs(60);

pub struct Fanout {
    queues: Mutex<HashMap<String, mpsc::Sender<Delivery>>>,
    shutdown: CancellationToken,
    tls: Option<Arc<chat_security::Tls>>,
}

impl Fanout {
    /// `tls`: the router's identity for gateways' delivery ports (None:
    /// plaintext).
    pub fn new(shutdown: CancellationToken, tls: Option<Arc<chat_security::Tls>>) -> Self {
        Self {
            queues: Mutex::new(HashMap::new()),
            shutdown,
            tls,
        }
    }

    /// Queues a delivery for a gateway; never waits.
    pub fn push(&self, gateway: &str, d: Delivery) {
        let mut q = self.queues.lock().expect("fanout lock poisoned");
        let tx = match q.get(gateway) {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => {
                let (tx, rx) = mpsc::channel(GATEWAY_QUEUE);
                tokio::spawn(run(
                    gateway.to_owned(),
                    rx,
                    self.shutdown.clone(),
                    self.tls.clone(),
                ));
                q.insert(gateway.to_owned(), tx.clone());
                tx
            }
        };
        if tx.try_send(d).is_err() {
            debug!(
                gateway,
                "delivery queue full; dropping (the gateway resumes from the store)"
            );
        }
    }
}

async fn run(
    gateway: String,
    mut rx: mpsc::Receiver<Delivery>,
    shutdown: CancellationToken,
    tls: Option<Arc<chat_security::Tls>>,
) {
    let endpoint = match chat_security::endpoint(tls.as_deref(), &gateway, Role::Gateway) {
        Ok(e) => e
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true),
        Err(e) => {
            debug!(gateway, error = %e, "cannot deliver to this gateway address");
            return;
        }
    };
    let mut client = GatewayDeliveryClient::new(endpoint.connect_lazy());
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            d = tokio::time::timeout(IDLE, rx.recv()) => match d {
                Ok(Some(d)) => d,
                _ => return,
            },
        };
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(d) => items.push(d),
                Err(_) => break,
            }
        }
        let n = items.len();
        match tokio::time::timeout(
            Duration::from_secs(2),
            client.deliver(DeliverRequest { items }),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => debug!(gateway, error = %e, dropped = n, "delivery failed"),
            Err(_) => debug!(gateway, dropped = n, "delivery timed out"),
        }
    }
}
