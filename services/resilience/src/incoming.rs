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
//!
//! Connections past a cap ([`ConnectionCaps`]: in all, and from one IP) are
//! closed as soon as they are accepted, before any byte is read.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a connection may go without sending anything.
pub const SILENCE: Duration = Duration::from_secs(30);

/// Connections accepted, open now, and closed at once for a cap (for
/// metrics); and the open ones by client IP.
#[derive(Debug, Default)]
pub struct ConnectionCount {
    pub accepted: std::sync::atomic::AtomicU64,
    pub open: std::sync::atomic::AtomicU64,
    pub refused: std::sync::atomic::AtomicU64,
    by_ip: std::sync::Mutex<std::collections::HashMap<IpAddr, u32>>,
}

/// Most connections open at once, in all and from one client IP (0: no
/// cap).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionCaps {
    pub total: u64,
    pub per_ip: u32,
}

impl ConnectionCount {
    /// A place for a connection from `ip`, or `None` when a cap is reached.
    fn admit(self: &Arc<Self>, ip: Option<IpAddr>, caps: ConnectionCaps) -> Option<OpenGuard> {
        use std::sync::atomic::Ordering::Relaxed;
        self.accepted.fetch_add(1, Relaxed);
        if caps.total > 0 && self.open.load(Relaxed) >= caps.total {
            self.refused.fetch_add(1, Relaxed);
            return None;
        }
        if let Some(ip) = ip
            && caps.per_ip > 0
        {
            let mut by_ip = self.by_ip.lock().expect("connection table poisoned");
            let n = by_ip.entry(ip).or_insert(0);
            if *n >= caps.per_ip {
                self.refused.fetch_add(1, Relaxed);
                return None;
            }
            *n += 1;
        }
        self.open.fetch_add(1, Relaxed);
        Some(OpenGuard {
            count: self.clone(),
            ip: ip.filter(|_| caps.per_ip > 0),
        })
    }

    /// Connections open now from `ip` (counted only under a per-IP cap).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        self.by_ip
            .lock()
            .expect("connection table poisoned")
            .get(&ip)
            .copied()
            .unwrap_or(0)
    }
}

/// Counts a connection as open until dropped.
struct OpenGuard {
    count: Arc<ConnectionCount>,
    ip: Option<IpAddr>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.count
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut by_ip = self.count.by_ip.lock().expect("connection table poisoned");
            if let Some(n) = by_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    by_ip.remove(&ip);
                }
            }
        }
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

    fn counted(mut self, guard: OpenGuard) -> Self {
        self._open = Some(guard);
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
    caps: ConnectionCaps,
    tokens: f64,
    at: Instant,
    count: Arc<ConnectionCount>,
}

/// Accepted connections from `listener`, paced by `rate`, with TCP_NODELAY,
/// closed after `SILENCE` without a byte from the peer, counted in `count`;
/// those past `caps` are closed at once.
pub fn paced(
    listener: TcpListener,
    rate: AcceptRate,
    caps: ConnectionCaps,
    count: Arc<ConnectionCount>,
) -> impl Stream<Item = io::Result<Silent<TcpStream>>> {
    let state = State {
        listener,
        rate,
        caps,
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
                Ok((stream, peer)) => {
                    let Some(guard) = s.count.admit(Some(peer.ip()), s.caps) else {
                        tracing::debug!(peer = %peer, "connection over a cap; closed");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let conn = Silent::new(stream, SILENCE).counted(guard);
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

    const NO_CAPS: ConnectionCaps = ConnectionCaps {
        total: 0,
        per_ip: 0,
    };

    #[test]
    fn connections_past_a_cap_get_no_place_until_one_closes() {
        let count = Arc::new(ConnectionCount::default());
        let caps = ConnectionCaps {
            total: 3,
            per_ip: 2,
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = count.admit(Some(a), caps).expect("first from a");
        let a2 = count.admit(Some(a), caps).expect("second from a");
        assert!(count.admit(Some(a), caps).is_none(), "a third from a");
        let b1 = count.admit(Some(b), caps).expect("b has its own cap");
        assert!(
            count
                .admit(Some("10.0.0.3".parse().unwrap()), caps)
                .is_none(),
            "three open in all"
        );
        drop(a1);
        assert_eq!(count.open_from(a), 1);
        let a3 = count.admit(Some(a), caps).expect("a place freed");
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(count.refused.load(Relaxed), 2);
        drop((a2, a3, b1));
        assert_eq!(count.open.load(Relaxed), 0);
        assert_eq!(count.open_from(a), 0);
    }

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
            NO_CAPS,
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
