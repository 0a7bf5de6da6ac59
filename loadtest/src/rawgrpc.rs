//! gRPC by hand over `h2`, for load tests that must do what a well-behaved
//! client library would not (reset streams at once, never read, hold many
//! bare connections): a connection from a chosen source address, a gRPC
//! request head, and a message frame.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

/// A TCP connection to `to` from the address `src` (any port).
pub async fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

/// The head of a gRPC call of `path` on `scheme://authority`, with
/// `authorization` set to `auth`.
pub fn request(scheme: &str, authority: &str, path: &str, auth: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("{scheme}://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", auth)
        .body(())
        .expect("a valid request")
}

/// A gRPC message frame: uncompressed, length-prefixed.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}
