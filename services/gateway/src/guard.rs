//! What every public call meets before any handler runs, in this order:
//!
//! 1. the per-IP token bucket: the cheapest check, and the one that holds
//!    when the caller has no valid credentials at all (a flood of bad
//!    tokens is refused before any signature is checked);
//! 2. authentication: the bearer token's signature and expiry; the user it
//!    names is attached to the request;
//! 3. the per-user token bucket: one user (or one stolen token) cannot take
//!    the gateway from everyone else;
//! 4. the adaptive concurrency limit, by criticality: when the gateway is
//!    saturated, typing goes first, then history and conversation
//!    management, and sends only when the whole limit is in use.
//!
//! Health checks and reflection meet the per-IP limit only (a flood of
//! them costs as much as any other call). Subscriptions are
//! rate-limited and authenticated but hold no concurrency permit: they are
//! long-lived and bounded per user by the session table instead.
//! Refusals are RESOURCE_EXHAUSTED with a `retry-after-ms` hint, or
//! UNAUTHENTICATED.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_auth::Keyring;
use chat_resilience::bucket::{KeyedBuckets, Rate};
use chat_resilience::incoming::{AcceptRate, ConnectionCaps};
use chat_resilience::layer::{Admit, method, peer_ip};
use chat_resilience::limit::{LimitConfig, Limiter, Permit};
use chat_resilience::{Criticality, over_limit, overloaded};
use tonic::Status;

use crate::service::User;

/// Keys each rate-limit table remembers at most.
const MAX_KEYS: usize = 100_000;

/// Abuse and overload limits of the public API.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Calls per second per authenticated user (0: no limit).
    pub per_user: Rate,
    /// Calls per second per client IP (0: no limit).
    pub per_ip: Rate,
    /// Message body bytes per second per user (0: no limit).
    pub per_user_bytes: Rate,
    /// New connections per second (0: no limit).
    pub accept: AcceptRate,
    /// Concurrent HTTP/2 streams one connection may open.
    pub max_streams_per_connection: u32,
    /// Connections open at once, in all and from one IP.
    pub connections: ConnectionCaps,
    /// The adaptive concurrency limit.
    pub concurrency: LimitConfig,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_user: Rate {
                per_second: 1_000,
                burst: 2_000,
            },
            per_ip: Rate {
                per_second: 100_000,
                burst: 200_000,
            },
            per_user_bytes: Rate {
                per_second: 1 << 20,
                burst: 4 << 20,
            },
            accept: AcceptRate {
                per_second: 2_000,
                burst: 4_000,
            },
            max_streams_per_connection: 256,
            // Many users may share an address (carrier NAT), so the
            // per-IP cap is far above one user's needs.
            connections: ConnectionCaps {
                total: 100_000,
                per_ip: 10_000,
            },
            concurrency: LimitConfig::default(),
        }
    }
}

/// The criticality of a public method; `None`: not limited by concurrency.
pub fn criticality(method: &str) -> Option<Criticality> {
    match method {
        "Send" => Some(Criticality::Critical),
        // Long-lived: each send on a stream takes its own place.
        "Subscribe" | "SendStream" => None,
        "SendTyping" => Some(Criticality::Sheddable),
        _ => Some(Criticality::Normal),
    }
}

pub struct Guard {
    keys: Keyring,
    per_user: Option<KeyedBuckets<String>>,
    per_ip: Option<KeyedBuckets<IpAddr>>,
    /// `None` with overload protection off.
    limiter: Option<Arc<Limiter>>,
    limited_ip: std::sync::atomic::AtomicU64,
    limited_user: std::sync::atomic::AtomicU64,
}

fn bucket<K: std::hash::Hash + Eq + Clone>(rate: Rate) -> Option<KeyedBuckets<K>> {
    (rate.per_second > 0).then(|| KeyedBuckets::new(rate, MAX_KEYS))
}

/// Longest retry-after a rate limit hands out.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

impl Guard {
    pub fn new(keys: Keyring, limits: &Limits, protect: bool) -> Self {
        Self {
            keys,
            per_user: bucket(limits.per_user),
            per_ip: bucket(limits.per_ip),
            limiter: protect.then(|| Limiter::new(limits.concurrency)),
            limited_ip: Default::default(),
            limited_user: Default::default(),
        }
    }

    pub fn limiter(&self) -> Option<&Arc<Limiter>> {
        self.limiter.as_ref()
    }

    /// Calls refused by the per-IP and the per-user rate limits.
    pub fn rate_limited(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.limited_ip.load(Relaxed),
            self.limited_user.load(Relaxed),
        )
    }

    fn authenticate(&self, headers: &http::HeaderMap) -> Result<User, Status> {
        let header = headers.get("authorization").and_then(|v| v.to_str().ok());
        let token =
            chat_auth::bearer(header).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let (user, expires) = self
            .keys
            .verify(token)
            .map_err(|e| Status::unauthenticated(e.to_string()))?;
        Ok(User(user, expires))
    }
}

impl Admit for Guard {
    fn busy(&self) -> bool {
        self.limiter
            .as_ref()
            .is_some_and(|l| l.inflight() * 2 >= l.limit())
    }

    fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Permit>, Status> {
        if let (Some(b), Some(ip)) = (&self.per_ip, peer_ip(parts)) {
            b.check(&ip).map_err(|wait| {
                self.limited_ip
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                over_limit(
                    format!(
                        "too many calls from {ip} (limit {}/s); retry later",
                        b.rate().per_second
                    ),
                    wait.min(MAX_RETRY_AFTER),
                )
            })?;
        }
        if !parts.uri.path().starts_with("/chat.v1.Chat/") {
            return Ok(None);
        }
        let user = self.authenticate(&parts.headers)?;
        self.check_user(&user.0)?;
        parts.extensions.insert(user);
        match criticality(method(parts)) {
            Some(c) => self.acquire(c),
            None => Ok(None),
        }
    }
}

impl Guard {
    /// Spends one call of `user`'s allowance (every call, and every send
    /// on a send stream).
    pub fn check_user(&self, user: &str) -> Result<(), Status> {
        let Some(b) = &self.per_user else {
            return Ok(());
        };
        b.check(user).map_err(|wait| {
            self.limited_user
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            over_limit(
                format!(
                    "too many calls by {user} (limit {}/s); retry later",
                    b.rate().per_second
                ),
                wait.min(MAX_RETRY_AFTER),
            )
        })
    }

    /// A place under the concurrency limit for work of criticality `c`
    /// (`None` with overload protection off).
    pub fn acquire(&self, c: Criticality) -> Result<Option<Permit>, Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(None);
        };
        limiter.try_acquire(c).map(Some).map_err(|r| {
            overloaded(
                format!(
                    "gateway overloaded: {} calls in flight, limit {} ({} calls get {} % of it); retry later",
                    r.inflight,
                    r.limit,
                    c,
                    chat_resilience::limit::share(c)
                ),
                retry_hint(c),
            )
        })
    }
}

/// How long a refused call of criticality `c` should wait: the less it
/// matters, the longer it stays away.
fn retry_hint(c: Criticality) -> Duration {
    match c {
        Criticality::Critical => Duration::from_millis(250),
        Criticality::Normal => Duration::from_millis(500),
        Criticality::Sheddable => Duration::from_secs(2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tonic::transport::server::TcpConnectInfo;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn guard(limits: Limits) -> Guard {
        Guard::new(
            Keyring::single(chat_auth::TokenKey::new(KEY.to_vec()).unwrap()),
            &limits,
            true,
        )
    }

    fn call(
        g: &Guard,
        method: &str,
        user: Option<&str>,
        ip: &str,
    ) -> Result<Option<Permit>, Status> {
        let mut b = http::Request::builder().uri(format!("/chat.v1.Chat/{method}"));
        if let Some(u) = user {
            let token = chat_auth::TokenKey::new(KEY.to_vec())
                .unwrap()
                .sign_for(u, 600);
            b = b.header("authorization", format!("Bearer {token}"));
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        let addr: SocketAddr = format!("{ip}:5000").parse().unwrap();
        let info: TcpConnectInfo = TcpConnectInfo {
            local_addr: None,
            remote_addr: Some(addr),
        };
        parts.extensions.insert(info);
        g.admit(&mut parts)
    }

    fn rate(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    #[test]
    fn each_user_has_their_own_allowance() {
        let g = guard(Limits {
            per_user: rate(1, 3),
            ..Limits::default()
        });
        for _ in 0..3 {
            call(&g, "Send", Some("alice"), "10.0.0.1").expect("within the burst");
        }
        let refused = call(&g, "Send", Some("alice"), "10.0.0.1").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("by alice"),
            "{}",
            refused.message()
        );
        assert!(chat_resilience::retry_after(&refused).is_some());
        call(&g, "Send", Some("bob"), "10.0.0.1").expect("bob is not limited by alice");
    }

    #[test]
    fn each_ip_has_its_own_allowance_checked_before_credentials() {
        let g = guard(Limits {
            per_ip: rate(1, 2),
            ..Limits::default()
        });
        for _ in 0..2 {
            let e = call(&g, "Send", None, "10.0.0.9").unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
        }
        let e = call(&g, "Send", Some("alice"), "10.0.0.9").unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::ResourceExhausted,
            "bad tokens spent the IP's allowance"
        );
        assert!(e.message().contains("10.0.0.9"), "{}", e.message());
        call(&g, "Send", Some("alice"), "10.0.0.10").expect("another IP");
    }

    #[test]
    fn health_checks_and_reflection_spend_the_ip_allowance_too() {
        let g = guard(Limits {
            per_ip: rate(1, 2),
            ..Limits::default()
        });
        let at = |path: &str, ip: &str| {
            let (mut parts, ()) = http::Request::builder()
                .uri(path)
                .body(())
                .unwrap()
                .into_parts();
            let addr: SocketAddr = format!("{ip}:5000").parse().unwrap();
            parts.extensions.insert(TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(addr),
            });
            g.admit(&mut parts)
        };
        at("/grpc.health.v1.Health/Watch", "10.0.0.7").expect("within the burst");
        at(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "10.0.0.7",
        )
        .expect("within the burst");
        let e = at("/grpc.health.v1.Health/Check", "10.0.0.7").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        at("/grpc.health.v1.Health/Check", "10.0.0.8").expect("another IP");
    }

    #[test]
    fn typing_is_shed_before_history_before_sends() {
        let g = guard(Limits {
            concurrency: LimitConfig {
                initial: 4,
                min: 4,
                ..LimitConfig::default()
            },
            ..Limits::default()
        });
        let mut held = Vec::new();
        held.push(call(&g, "Send", Some("a"), "10.0.0.1").unwrap());
        held.push(call(&g, "Send", Some("a"), "10.0.0.1").unwrap());
        // Half the limit in use: typing is refused, history still served.
        let typing = call(&g, "SendTyping", Some("a"), "10.0.0.1").unwrap_err();
        assert_eq!(typing.code(), tonic::Code::ResourceExhausted);
        held.push(call(&g, "History", Some("a"), "10.0.0.1").unwrap());
        // Three quarters in use: history is refused, sends still served.
        call(&g, "History", Some("a"), "10.0.0.1").unwrap_err();
        held.push(call(&g, "Send", Some("a"), "10.0.0.1").unwrap());
        call(&g, "Send", Some("a"), "10.0.0.1").unwrap_err();
        // Subscriptions hold no permit; health checks are not guarded.
        assert!(
            call(&g, "Subscribe", Some("a"), "10.0.0.1")
                .unwrap()
                .is_none()
        );
        let (mut parts, ()) = http::Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .body(())
            .unwrap()
            .into_parts();
        assert!(g.admit(&mut parts).unwrap().is_none());
    }
}
