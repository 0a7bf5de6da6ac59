//! Group commit at the gateway: every `Send` joins a queue, and a batch of
//! whatever is queued goes to a router as one `AppendBatch`. At most
//! `IN_FLIGHT` batches are outstanding; while they are, the queue fills and
//! the next batch is bigger.

use std::sync::Arc;

use chat_proto::store::v1 as spb;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::Status;

use crate::routers::{RouterPool, via_router};

/// Sends queued before new ones are refused with RESOURCE_EXHAUSTED.
pub const SEND_QUEUE: usize = 16_384;
/// Most messages in one batch.
const MAX_BATCH: usize = 1_024;
/// Most body bytes in one batch (well under the routers' and the store's
/// request limits, so one big batch is never refused whole).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Batches outstanding at once.
const IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<spb::AppendResponse, Status>>;

#[derive(Clone)]
pub struct SendBatcher {
    tx: mpsc::Sender<(spb::AppendRequest, Reply)>,
}

impl SendBatcher {
    pub fn start(pool: Arc<RouterPool>) -> Self {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        tokio::spawn(run(pool, rx));
        Self { tx }
    }

    /// Appends one message; answered when the store has committed it.
    pub async fn send(&self, req: spb::AppendRequest) -> Result<spb::AppendResponse, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.try_send((req, reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                Status::resource_exhausted("gateway send queue is full; retry shortly")
            }
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("gateway is shutting down"),
        })?;
        rx.await
            .map_err(|_| Status::unavailable("gateway is shutting down"))?
    }
}

async fn run(pool: Arc<RouterPool>, mut rx: mpsc::Receiver<(spb::AppendRequest, Reply)>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else { return };
        let mut bytes = first.0.body.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(x) => {
                    bytes += x.0.body.len();
                    batch.push(x);
                }
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let req = spb::AppendBatchRequest { items };
            let result = via_router!(pool, append_batch, req);
            match result {
                Ok(resp) => {
                    let mut outcomes = resp.items.into_iter();
                    for reply in replies {
                        let r = match outcomes.next().and_then(|o| o.outcome) {
                            Some(spb::append_outcome::Outcome::Ok(ok)) => Ok(ok),
                            Some(spb::append_outcome::Outcome::Error(e)) => {
                                Err(Status::new(tonic::Code::from(e.code), e.message))
                            }
                            None => {
                                Err(Status::internal("router returned no outcome for a message"))
                            }
                        };
                        let _ = reply.send(r);
                    }
                }
                Err(s) => {
                    for reply in replies {
                        let _ = reply.send(Err(s.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}
