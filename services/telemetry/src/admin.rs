//! The admin port's HTTP server, on hyper: `GET` (and `HEAD`) only, one
//! request per connection, bounded in size and time (the request head must
//! arrive within `READ_TIMEOUT`, the whole exchange within `READ_TIMEOUT +
//! WRITE_TIMEOUT`), at most `MAX_CONNECTIONS` at once (more are closed as
//! soon as they are accepted). Enough for Prometheus scrapes, curl and a
//! browser; nothing client-facing goes through it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head read (hyper's smallest buffer).
const MAX_HEAD: usize = 8 * 1024;
/// Longest a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Self {
        Self {
            status: 200,
            content_type,
            body,
        }
    }

    pub fn not_found(path: &str) -> Self {
        Self {
            status: 404,
            content_type: "text/plain; charset=utf-8",
            body: format!("no page at {path}\n"),
        }
    }
}

/// Content type of the metrics page (OpenMetrics text, which Prometheus
/// asks for and parses, exemplars included).
pub const METRICS: &str = crate::metrics::CONTENT_TYPE;

/// Answers a request path (query string removed).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, path: &str) -> impl std::future::Future<Output = Reply> + Send;
}

fn response(r: Reply) -> Response<Full<Bytes>> {
    Response::builder()
        .status(r.status)
        .header(header::CONTENT_TYPE, r.content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(r.body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"bad reply\n"))))
}

async fn answer<H: Handler>(req: Request<Incoming>, handler: Arc<H>) -> Response<Full<Bytes>> {
    let reply = match *req.method() {
        // hyper sends no body for HEAD.
        Method::GET | Method::HEAD => handler.handle(req.uri().path()).await,
        ref m => Reply {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: format!("{m} is not served here; use GET\n"),
        },
    };
    response(reply)
}

async fn serve_one<H: Handler>(stream: TcpStream, handler: Arc<H>) -> Result<(), String> {
    let service = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(answer(req, handler).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(READ_TIMEOUT + WRITE_TIMEOUT, conn).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the client did not finish the exchange in time".into()),
    }
}

/// Binds the admin address if one is configured (`flag` names it in the
/// error).
pub async fn bind(
    addr: Option<std::net::SocketAddr>,
    flag: &str,
) -> Result<Option<TcpListener>, String> {
    match addr {
        None => Ok(None),
        Some(a) => TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|e| format!("cannot listen on {a} ({flag}): {e}")),
    }
}

/// Serves `handler` on `listener` until `stop`.
pub async fn serve<H: Handler>(listener: TcpListener, handler: Arc<H>, stop: CancellationToken) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(place) = places.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "admin port busy; connection closed");
                    continue;
                };
                let h = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, h).await {
                        tracing::debug!(error = %e, "admin request failed");
                    }
                    drop(place);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "admin listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Fetches `path` from an admin endpoint at `addr` (for tests and tools):
/// the status code and the body.
pub async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(READ_TIMEOUT, s.read_to_string(&mut out))
        .await
        .map_err(|_| std::io::Error::other("admin endpoint did not answer in time"))??;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP head"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    impl Handler for Echo {
        async fn handle(&self, path: &str) -> Reply {
            match path {
                "/metrics" => Reply::ok(METRICS, "up 1\n".into()),
                p => Reply::not_found(p),
            }
        }
    }

    #[tokio::test]
    async fn serves_pages_and_refuses_what_it_does_not_serve() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, Arc::new(Echo), stop.clone()));
        assert_eq!(
            get(&addr, "/metrics?x=1").await.unwrap(),
            (200, "up 1\n".into())
        );
        assert_eq!(get(&addr, "/nope").await.unwrap().0, 404);
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&vec![b'a'; MAX_HEAD + 2048]).await.unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(
            out.starts_with("HTTP/1.1 400") || out.starts_with("HTTP/1.1 431"),
            "an oversized head: {out}"
        );
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"HEAD /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("\r\n\r\n"), "HEAD has no body: {out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_until_places_free_up() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        tokio::spawn(serve(l, Arc::new(Echo), stop.clone()));
        // Idle connections that never send a request hold every place.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(&addr).await.unwrap());
        }
        // The server takes connections in the order they came: the idle
        // ones first, then this request, for which no place is left.
        let refused = get(&addr, "/metrics").await;
        assert!(refused.is_err(), "served past the cap: {refused:?}");
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, _)) = get(&addr, "/metrics").await {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "places were not freed when the idle connections closed"
            );
            tokio::task::yield_now().await;
        }
        stop.cancel();
    }
}
