//! Who is calling, on every internal hop.
//!
//! Each kind of service has one identity: a certificate issued by the
//! cluster's own CA and valid for one name, `<kind>.chat.internal` (see
//! [`Role`]). Internal servers ask for a client certificate and check it
//! against the CA (rustls); [`authorize`] then turns the certificate into a
//! [`Role`] and lets a call through only if the method's rule names that
//! role. Clients verify the server the same way: a router dialling a store
//! replica at any address accepts only a certificate for
//! `store.chat.internal`, so addresses (IPs, compose names, pod names) need
//! not be in any certificate.
//!
//! An identity is a directory in the layout of a Kubernetes TLS secret:
//! `ca.crt`, `tls.crt`, `tls.key` ([`Tls::load`]). [`certs`] makes a CA and
//! one identity per role (`chatctl certs`).

pub mod authorize;
pub mod certs;

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

pub use authorize::{Allow, Caller, HEALTH, Policy, Rule, authorize};

/// A kind of caller, named by its certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A store replica (raft traffic between replicas).
    Store,
    /// A router (the store's API, deliveries to gateways).
    Router,
    /// A gateway (the router's API).
    Gateway,
    /// An operator's tool (`chatctl`, the load generator): store
    /// administration, settings, rollouts and incidents.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Store, Role::Router, Role::Gateway, Role::Operator];

    pub fn name(self) -> &'static str {
        match self {
            Role::Store => "store",
            Role::Router => "router",
            Role::Gateway => "gateway",
            Role::Operator => "operator",
        }
    }

    /// The one DNS name a certificate of this role is valid for.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Store => "store.chat.internal",
            Role::Router => "router.chat.internal",
            Role::Gateway => "gateway.chat.internal",
            Role::Operator => "operator.chat.internal",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// The role a certificate (DER) names, if it names exactly one.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Option<Role> {
        let cert = webpki::EndEntityCert::try_from(der).ok()?;
        let mut found = Role::ALL.into_iter().filter(|r| {
            let Ok(name) = DnsName::try_from(r.dns_name()) else {
                return false;
            };
            cert.verify_is_valid_for_subject_name(&ServerName::DnsName(name))
                .is_ok()
        });
        match (found.next(), found.next()) {
            (Some(r), None) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A problem with an identity's files.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// File names of an identity directory.
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";

/// Reads `dir/name`, saying what it was for when it cannot.
fn read_file(dir: &Path, name: &str, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(dir.join(name)).map_err(|e| {
        Error(format!(
            "cannot read {} ({what}): {e}",
            dir.join(name).display()
        ))
    })
}

/// The certificate in `cert` (PEM), if `cert` holds one and `key` a
/// private key.
fn check_cert_and_key(cert: &[u8], key: &[u8]) -> Result<CertificateDer<'static>, Error> {
    let der = CertificateDer::from_pem_slice(cert)
        .map_err(|e| Error(format!("{CERT_FILE} holds no certificate: {e}")))?;
    if !key.windows(11).any(|w| w == b"PRIVATE KEY") {
        return Err(Error(format!("{KEY_FILE} holds no private key")));
    }
    Ok(der)
}

/// One service's identity and the CA it trusts.
pub struct Tls {
    role: Role,
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir` and checks that
    /// the certificate is `role`'s.
    pub fn load(dir: &Path, role: Role) -> Result<Arc<Self>, Error> {
        let what = format!("the {role} identity: `chatctl certs` makes one");
        let read = |name| read_file(dir, name, &what);
        Self::from_pem(role, read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?)
    }

    /// Reads an identity of whatever role its certificate names (tools
    /// that run as an operator, or inside a service's container).
    pub fn load_any(dir: &Path) -> Result<Arc<Self>, Error> {
        let read = |name| read_file(dir, name, "an identity of the cluster");
        let (ca, cert, key) = (read(CA_FILE)?, read(CERT_FILE)?, read(KEY_FILE)?);
        let role = CertificateDer::from_pem_slice(&cert)
            .ok()
            .and_then(|der| Role::of_certificate(&der))
            .ok_or_else(|| {
                Error(format!(
                    "{} is not a certificate of any role of the cluster",
                    dir.join(CERT_FILE).display()
                ))
            })?;
        Self::from_pem(role, ca, cert, key)
    }

    /// An identity from PEM text; the certificate must name `role`.
    pub fn from_pem(
        role: Role,
        ca: Vec<u8>,
        cert: Vec<u8>,
        key: Vec<u8>,
    ) -> Result<Arc<Self>, Error> {
        let der = check_cert_and_key(&cert, &key)?;
        match Role::of_certificate(&der) {
            Some(r) if r == role => {}
            Some(r) => {
                return Err(Error(format!(
                    "{CERT_FILE} is a {r} certificate; this service needs a {role} one"
                )));
            }
            None => {
                return Err(Error(format!(
                    "{CERT_FILE} is not valid for {} (nor for exactly one other role)",
                    role.dns_name()
                )));
            }
        }
        CertificateDer::from_pem_slice(&ca)
            .map_err(|e| Error(format!("{CA_FILE} holds no certificate: {e}")))?;
        Ok(Arc::new(Self {
            role,
            ca,
            cert,
            key,
        }))
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// A server that asks every client for a certificate from this CA.
    /// A client without one still gets through the handshake and may call
    /// what the policy opens to anyone (health checks, for probes);
    /// [`authorize`] refuses it everything else.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
            .client_auth_optional(true)
    }

    /// A client that presents this identity and accepts only a server of
    /// kind `peer`.
    pub fn client_config(&self, peer: Role) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(peer.dns_name())
    }
}

/// The gateways' certificate for the public port (no client
/// certificates there: clients prove who they are with tokens).
pub struct PublicTls {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl fmt::Debug for PublicTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PublicTls(..)")
    }
}

impl PublicTls {
    /// Reads `tls.crt` and `tls.key` from `dir` (`chatctl certs` writes
    /// them to DIR/public; any certificate clients trust will do).
    pub fn load(dir: &Path) -> Result<Arc<Self>, Error> {
        let read = |name| read_file(dir, name, "the public port's certificate");
        Self::from_pem(read(CERT_FILE)?, read(KEY_FILE)?)
    }

    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>) -> Result<Arc<Self>, Error> {
        check_cert_and_key(&cert, &key)?;
        Ok(Arc::new(Self { cert, key }))
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// An endpoint for the service of kind `peer` at `addr` (host:port):
/// mutual TLS with this identity when `tls` is set, plaintext otherwise.
pub fn endpoint(tls: Option<&Tls>, addr: &str, peer: Role) -> Result<Endpoint, Error> {
    let bad = |e: tonic::transport::Error| Error(format!("bad {peer} address {addr:?}: {e}"));
    match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad),
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))
            .map_err(bad)?
            .tls_config(t.client_config(peer))
            .map_err(bad),
    }
}

/// The flags every service and tool takes for its identity.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Directory with this process's identity for internal traffic:
    /// `ca.crt`, `tls.crt`, `tls.key` (`chatctl certs --out DIR` makes one
    /// per role under DIR/<role>).
    #[arg(
        long = "tls-dir",
        env = "CHAT_TLS_DIR",
        value_name = "DIR",
        global = true
    )]
    pub tls_dir: Option<std::path::PathBuf>,
    /// Run internal traffic in plaintext and trust every internal caller:
    /// only on a closed network (tests, benchmarks).
    #[arg(
        long = "insecure-plaintext",
        env = "CHAT_INSECURE_PLAINTEXT",
        global = true
    )]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// The identity of `role`, `None` for plaintext, or why neither.
    pub fn load(&self, role: Role) -> Result<Option<Arc<Tls>>, Error> {
        load_for(self.tls_dir.as_deref(), self.insecure_plaintext, role)
    }
}

/// Where an identity directory comes from when a service starts: the flag
/// or `CHAT_TLS_DIR`; without one, only an explicit choice of plaintext.
pub fn load_for(dir: Option<&Path>, insecure: bool, role: Role) -> Result<Option<Arc<Tls>>, Error> {
    match (dir, insecure) {
        (Some(d), _) => Tls::load(d, role).map(Some),
        (None, true) => {
            tracing::warn!(
                role = %role,
                "internal traffic is plaintext and every internal caller is trusted \
                 (--insecure-plaintext): for a closed test network only"
            );
            Ok(None)
        }
        (None, false) => Err(Error(format!(
            "internal traffic needs an identity: --tls-dir DIR (or CHAT_TLS_DIR) with the {role} \
             certificate (`chatctl certs --out DIR` makes them), or --insecure-plaintext \
             to run without TLS on a closed network"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_its_role_and_no_other() {
        let set = certs::generate().unwrap();
        for role in Role::ALL {
            let id = set.identity(role);
            let der = CertificateDer::from_pem_slice(id.cert.as_bytes()).unwrap();
            assert_eq!(Role::of_certificate(&der), Some(role));
            assert!(
                Tls::from_pem(
                    role,
                    id.ca.clone().into(),
                    id.cert.clone().into(),
                    id.key.clone().into()
                )
                .is_ok()
            );
        }
        let router = set.identity(Role::Router);
        let err = Tls::from_pem(
            Role::Store,
            router.ca.clone().into(),
            router.cert.clone().into(),
            router.key.clone().into(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("router certificate"), "{err}");
    }

    #[test]
    fn starting_without_an_identity_needs_an_explicit_choice() {
        let err = load_for(None, false, Role::Store).unwrap_err();
        assert!(err.to_string().contains("--tls-dir"), "{err}");
        assert!(load_for(None, true, Role::Store).unwrap().is_none());
        let missing = load_for(Some(Path::new("/nonexistent/tls")), true, Role::Store).unwrap_err();
        assert!(missing.to_string().contains("ca.crt"), "{missing}");
    }
}
