//! A paced accept loop: at most `per_second` new connections a second
//! (after a burst), so a reconnect storm queues in the kernel's accept
//! backlog, and past it in the clients' connect backoff, instead of
//! flattening the server with TLS-free but still costly HTTP/2 handshakes
//! all at once. Connections already open are not affected.

use std::io;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// New connections allowed per second and in a burst (0: no limit).
#[derive(Clone, Copy, Debug)]
pub struct AcceptRate {
    pub per_second: u32,
    pub burst: u32,
}

struct State {
    listener: TcpListener,
    rate: AcceptRate,
    tokens: f64,
    at: Instant,
}

/// Accepted connections from `listener`, paced by `rate`, with TCP_NODELAY.
pub fn paced(listener: TcpListener, rate: AcceptRate) -> impl Stream<Item = io::Result<TcpStream>> {
    let state = State {
        listener,
        rate,
        tokens: f64::from(rate.burst.max(1)),
        at: Instant::now(),
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.rate.per_second > 0 {
            let per_second = f64::from(s.rate.per_second);
            let now = Instant::now();
            s.tokens = (s.tokens + now.duration_since(s.at).as_secs_f64() * per_second)
                .min(f64::from(s.rate.burst.max(1)));
            s.at = now;
            if s.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - s.tokens) / per_second);
                tokio::time::sleep(wait).await;
                s.tokens = 1.0;
                s.at = Instant::now();
            }
            s.tokens -= 1.0;
        }
        loop {
            match s.listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), s));
                }
                // Out of file descriptors and the like: the listener itself
                // is fine, so wait a moment and accept again.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_burst_are_accepted_at_the_rate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let incoming = paced(
            listener,
            AcceptRate {
                per_second: 10,
                burst: 2,
            },
        );
        futures::pin_mut!(incoming);
        let t0 = Instant::now();
        for _ in 0..6 {
            incoming.next().await.unwrap().unwrap();
        }
        // Two at once, then four at 10 a second.
        let took = Instant::now().duration_since(t0);
        assert!(took >= Duration::from_millis(390), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
}
