//! Per-method authorisation by the caller's certificate.
//!
//! [`authorize`] sits in front of an internal server's services. For
//! each request it finds the [`Rule`] for the method's path, works out the
//! [`Caller`] from the TLS peer certificate and either answers at once
//! (UNAUTHENTICATED without a certificate, PERMISSION_DENIED for a role the
//! rule does not name, or for a method no rule names) or passes the request
//! on with the [`Caller`] in its extensions, where a handler can make finer
//! checks (which settings a router may write, for example).

use std::sync::Arc;

use chat_resilience::layer::{Admit, AdmitLayer};
use chat_resilience::limit::Permit;

use rustls_pki_types::CertificateDer;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::Role;

/// Who may call the methods a rule covers.
#[derive(Clone, Copy, Debug)]
pub enum Allow {
    /// Any caller, even one without a certificate (health checks).
    Anyone,
    /// Callers with a certificate of one of these roles.
    Roles(&'static [Role]),
}

/// `path` is a whole method (`/pkg.Service/Method`) or a service
/// (`/pkg.Service/`, every method of it). The most specific rule wins.
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    pub path: &'static str,
    pub allow: Allow,
}

impl Rule {
    /// `path` open to any caller.
    pub const fn anyone(path: &'static str) -> Rule {
        Rule {
            path,
            allow: Allow::Anyone,
        }
    }

    /// `path` open to callers of these roles.
    pub const fn roles(path: &'static str, roles: &'static [Role]) -> Rule {
        Rule {
            path,
            allow: Allow::Roles(roles),
        }
    }
}

/// gRPC health, open to probes that have no certificate.
pub const HEALTH: Rule = Rule::anyone("/grpc.health.v1.Health/");

/// A server's rules; a method no rule covers is refused to everyone.
#[derive(Clone, Copy, Debug)]
pub struct Policy(pub &'static [Rule]);

impl Policy {
    pub fn rule(&self, path: &str) -> Option<&'static Rule> {
        let exact = self.0.iter().find(|r| r.path == path);
        exact.or_else(|| {
            self.0
                .iter()
                .filter(|r| r.path.ends_with('/') && path.starts_with(r.path))
                .max_by_key(|r| r.path.len())
        })
    }
}

/// Who made a request, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A certificate of this role, checked against the cluster's CA.
    Service(Role),
    /// No certificate (only methods open to anyone get this far).
    Anonymous,
    /// The server runs without TLS: nothing about the caller is known and
    /// everything is allowed, as on a closed test network.
    Unchecked,
}

impl Caller {
    /// The caller from a request's extensions (as the layer left it).
    pub fn of(ext: &http::Extensions) -> Caller {
        ext.get::<Caller>().copied().unwrap_or(Caller::Anonymous)
    }

    /// Whether the caller is `role`, or unchecked (plaintext mode).
    pub fn is(self, role: Role) -> bool {
        matches!(self, Caller::Unchecked) || self == Caller::Service(role)
    }
}

/// The TLS peer's certificate chain, if the connection is TLS and the
/// peer sent one.
pub fn peer_certificates(ext: &http::Extensions) -> Option<Arc<Vec<CertificateDer<'static>>>> {
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
}

/// A [`Policy`] as a server's admission policy: the check runs in the
/// project's admission layer (`chat_resilience::layer::AdmitLayer`),
/// before the body is read. `enforce` is false for a plaintext server:
/// every request then passes as [`Caller::Unchecked`].
pub struct Authorize {
    policy: Policy,
    enforce: bool,
}

/// The layer that puts `policy` in front of a server's services.
pub fn authorize(policy: Policy, enforce: bool) -> AdmitLayer<Authorize> {
    AdmitLayer::new(Arc::new(Authorize { policy, enforce }))
}

impl Admit for Authorize {
    fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Permit>, tonic::Status> {
        let caller = if self.enforce {
            decide(&self.policy, parts.uri.path(), &parts.extensions).inspect_err(|status| {
                tracing::warn!(path = parts.uri.path(), refused = %status.message(), "internal call refused");
            })?
        } else {
            Caller::Unchecked
        };
        parts.extensions.insert(caller);
        Ok(None)
    }
}

/// The caller of a request, or the status that refuses it.
pub fn decide(
    policy: &Policy,
    path: &str,
    ext: &http::Extensions,
) -> Result<Caller, tonic::Status> {
    let role =
        peer_certificates(ext).and_then(|chain| chain.first().and_then(Role::of_certificate));
    let caller = role.map_or(Caller::Anonymous, Caller::Service);
    let Some(rule) = policy.rule(path) else {
        return Err(tonic::Status::permission_denied(format!(
            "{path} is not open to any caller on this port"
        )));
    };
    match (rule.allow, role) {
        (Allow::Anyone, _) => Ok(caller),
        (Allow::Roles(roles), Some(r)) if roles.contains(&r) => Ok(caller),
        (Allow::Roles(_), Some(r)) => Err(tonic::Status::permission_denied(format!(
            "a {r} may not call {path}"
        ))),
        (Allow::Roles(_), None) => Err(tonic::Status::unauthenticated(format!(
            "{path} needs a client certificate of the cluster"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy(&[
        HEALTH,
        Rule::roles("/chat.store.v1.Store/", &[Role::Router, Role::Operator]),
        Rule::roles("/chat.store.v1.Store/PutSetting", &[Role::Operator]),
    ]);

    #[test]
    fn the_most_specific_rule_wins_and_unknown_methods_have_none() {
        let r = POLICY.rule("/chat.store.v1.Store/PutSetting").unwrap();
        assert!(matches!(r.allow, Allow::Roles(&[Role::Operator])));
        let r = POLICY.rule("/chat.store.v1.Store/Append").unwrap();
        assert!(matches!(
            r.allow,
            Allow::Roles(&[Role::Router, Role::Operator])
        ));
        assert!(
            POLICY
                .rule("/chat.store.v1.StoreAdmin/AddLearner")
                .is_none()
        );
        assert!(POLICY.rule("/chat.store.v1.Storeish/Append").is_none());
    }

    #[test]
    fn without_a_certificate_only_open_methods_pass() {
        let ext = http::Extensions::new();
        assert_eq!(
            decide(&POLICY, "/grpc.health.v1.Health/Check", &ext).unwrap(),
            Caller::Anonymous
        );
        let e = decide(&POLICY, "/chat.store.v1.Store/Append", &ext).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = decide(&POLICY, "/chat.store.v1.StoreAdmin/AddLearner", &ext).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
