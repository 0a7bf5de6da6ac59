//! gRPC by hand over `h2`, for load tests that must do what a well-behaved
//! client library would not (reset streams at once, never read, hold many
//! bare connections): a connection from a chosen source address, a gRPC
//! request head, and a message frame, over TLS when the gateway's public
//! port has it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

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

/// A connection to a gateway, plaintext or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A gateway's public port, as raw clients reach it: its address and, when
/// the port is TLS, a connector that trusts the gateways' CA (built once,
/// shared by every connection).
#[derive(Clone)]
pub struct Gateway {
    /// host:port as published.
    pub authority: String,
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl Gateway {
    pub fn new(authority: &str, ca: Option<&[u8]>) -> anyhow::Result<Self> {
        use std::net::ToSocketAddrs as _;
        let addr = authority
            .to_socket_addrs()?
            .find(SocketAddr::is_ipv4)
            .ok_or_else(|| anyhow::anyhow!("{authority} has no IPv4 address"))?;
        let tls = match ca {
            None => None,
            Some(ca) => {
                use rustls::pki_types::pem::PemObject as _;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    roots.add(cert?)?;
                }
                let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
                config.alpn_protocols = vec![b"h2".to_vec()];
                let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
                let name = ServerName::try_from(host.to_owned())?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Self {
            authority: authority.to_owned(),
            addr,
            tls,
        })
    }

    /// Verifies the gateway's certificate for `host` rather than for the
    /// address connected to.
    pub fn named(mut self, host: &str) -> anyhow::Result<Self> {
        if let Some((_, name)) = &mut self.tls {
            *name = ServerName::try_from(host.to_owned())?;
        }
        Ok(self)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A connection from `src`, through TLS when the port has it.
    pub async fn connect(&self, src: IpAddr) -> anyhow::Result<Box<dyn Io>> {
        let tcp = tcp_from(src, self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(connector.connect(name.clone(), tcp).await?),
        })
    }

    /// The head of a gRPC call of `path` on this gateway.
    pub fn request(&self, path: &str, auth: &str) -> http::Request<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        request(scheme, &self.authority, path, auth)
    }
}
