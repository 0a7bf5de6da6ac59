//! A small HTTP/1.1 server for the admin port: `GET` only, one request per
//! connection, bounded in size and time (reading the request and writing
//! the answer), at most `MAX_CONNECTIONS` at once (more are closed as soon
//! as they are accepted). Enough for Prometheus scrapes, curl and a
//! browser; nothing client-facing goes through it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Largest request head read.
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

/// Content type of the Prometheus text format.
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers a request path (query string removed).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, path: &str) -> impl std::future::Future<Output = Reply> + Send;
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    }
}

async fn respond(stream: &mut TcpStream, r: &Reply) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, write_reply(stream, r))
        .await
        .map_err(|_| std::io::Error::other("the client did not read the answer in time"))?
}

async fn write_reply(stream: &mut TcpStream, r: &Reply) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(r.body.as_bytes()).await?;
    stream.shutdown().await
}

/// The request line's method and path, once the head is complete.
fn parse_head(head: &[u8]) -> Result<(String, String), &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8")?;
    let line = text.lines().next().ok_or("empty request")?;
    let mut parts = line.split_whitespace();
    let method = parts.next().ok_or("no method")?.to_owned();
    let target = parts.next().ok_or("no path")?;
    let path = target.split('?').next().unwrap_or("/").to_owned();
    Ok((method, path))
}

async fn serve_one<H: Handler>(mut stream: TcpStream, handler: Arc<H>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") {
                return Ok(true);
            }
            if head.len() > MAX_HEAD {
                return Ok(false);
            }
        }
    };
    let complete = matches!(tokio::time::timeout(READ_TIMEOUT, read).await, Ok(Ok(true)));
    if !complete {
        let r = Reply {
            status: 400,
            content_type: "text/plain; charset=utf-8",
            body: "incomplete or oversized request\n".into(),
        };
        return respond(&mut stream, &r).await;
    }
    let reply = match parse_head(&head) {
        Ok((m, path)) if m == "GET" || m == "HEAD" => handler.handle(&path).await,
        Ok((m, _)) => Reply {
            status: 405,
            content_type: "text/plain; charset=utf-8",
            body: format!("{m} is not served here; use GET\n"),
        },
        Err(e) => Reply {
            status: 400,
            content_type: "text/plain; charset=utf-8",
            body: format!("{e}\n"),
        },
    };
    respond(&mut stream, &reply).await
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
                "/metrics" => Reply::ok(PROMETHEUS, "up 1\n".into()),
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
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
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
