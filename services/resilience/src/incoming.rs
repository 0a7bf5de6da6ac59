//! A paced accept loop: at most `per_second` new connections a second
//! (after a burst), so a reconnect storm queues in the kernel's accept
//! backlog, and past it in the clients' connect backoff, instead of
//! flattening the server with TLS-free but still costly HTTP/2 handshakes
//! all at once. Connections already open are not affected.
//!
//! Every accepted connection is closed when nothing has been read from it
//! for `SILENCE` ([`Silent`]). A live HTTP/2 client answers the server's
//! keepalive pings, so it is never silent that long; a peer that connects
//! and never completes the handshake, or that went away without a FIN,
//! is. This is the handshake and idle timeout in one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a connection may go without sending anything.
pub const SILENCE: Duration = Duration::from_secs(30);

/// Connections accepted and open now (for metrics).
#[derive(Debug, Default)]
pub struct ConnectionCount {
    pub accepted: std::sync::atomic::AtomicU64,
    pub open: std::sync::atomic::AtomicU64,
}

/// Counts a connection as open until dropped.
struct OpenGuard(std::sync::Arc<ConnectionCount>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A connection that fails its reads once nothing has arrived for `limit`.
pub struct Silent<S> {
    inner: S,
    limit: Duration,
    timer: Pin<Box<Sleep>>,
    _open: Option<OpenGuard>,
}

impl<S> Silent<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            _open: None,
        }
    }

    fn counted(mut self, count: &std::sync::Arc<ConnectionCount>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        count.accepted.fetch_add(1, Relaxed);
        count.open.fetch_add(1, Relaxed);
        self._open = Some(OpenGuard(count.clone()));
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Silent<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let at = Instant::now() + self.limit;
                    self.timer.as_mut().reset(at);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer sent nothing for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Silent<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Silent<TcpStream> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

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
    count: std::sync::Arc<ConnectionCount>,
}

/// Accepted connections from `listener`, paced by `rate`, with TCP_NODELAY,
/// closed after `SILENCE` without a byte from the peer, counted in `count`.
pub fn paced(
    listener: TcpListener,
    rate: AcceptRate,
    count: std::sync::Arc<ConnectionCount>,
) -> impl Stream<Item = io::Result<Silent<TcpStream>>> {
    let state = State {
        listener,
        rate,
        tokens: f64::from(rate.burst.max(1)),
        at: Instant::now(),
        count,
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
                    let conn = Silent::new(stream, SILENCE).counted(&s.count);
                    return Some((Ok(conn), s));
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_cut_off_and_a_talking_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut server = Silent::new(server, Duration::from_secs(10));
        let mut buf = [0u8; 8];
        // Talking every 6 s keeps the connection up past the limit.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            peer.write_all(b"ping").await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), 4);
        }
        // Then silence: the read fails once 10 s have passed.
        let started = Instant::now();
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(Instant::now().duration_since(started) >= Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_burst_are_accepted_at_the_rate() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for _ in 0..6 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let count = std::sync::Arc::new(ConnectionCount::default());
        let incoming = paced(
            listener,
            AcceptRate {
                per_second: 10,
                burst: 2,
            },
            count.clone(),
        );
        futures::pin_mut!(incoming);
        let t0 = Instant::now();
        let mut conns = Vec::new();
        for _ in 0..6 {
            conns.push(incoming.next().await.unwrap().unwrap());
        }
        // Two at once, then four at 10 a second.
        let took = Instant::now().duration_since(t0);
        assert!(took >= Duration::from_millis(390), "{took:?}");
        assert!(took < Duration::from_millis(600), "{took:?}");
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(
            (count.accepted.load(Relaxed), count.open.load(Relaxed)),
            (6, 6)
        );
        conns.truncate(2);
        assert_eq!(
            count.open.load(Relaxed),
            2,
            "closed connections are not open"
        );
    }
}
