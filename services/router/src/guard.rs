//! The router's admission policy: the adaptive concurrency limit, shedding
//! by the criticality the gateway stated (`x-criticality`), or by the
//! method's own when a caller did not say. Health checks pass untouched.

use std::sync::Arc;

use chat_resilience::layer::{Admit, method};
use chat_resilience::limit::{LimitConfig, Limiter, Permit, share};
use chat_resilience::{Criticality, overloaded};
use std::time::Duration;
use tonic::Status;

/// A method's criticality when the caller did not state one.
pub fn default_criticality(method: &str) -> Criticality {
    match method {
        "AppendBatch" | "RegisterSessions" | "LastSeqs" => Criticality::Critical,
        "Typing" => Criticality::Sheddable,
        _ => Criticality::Normal,
    }
}

pub struct RouterGuard {
    /// `None`: overload protection off.
    limiter: Option<Arc<Limiter>>,
}

impl RouterGuard {
    pub fn new(cfg: Option<LimitConfig>) -> Self {
        Self {
            limiter: cfg.map(Limiter::new),
        }
    }

    pub fn limiter(&self) -> Option<&Arc<Limiter>> {
        self.limiter.as_ref()
    }
}

impl Admit for RouterGuard {
    fn admit(&self, parts: &mut http::request::Parts) -> Result<Option<Permit>, Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(None);
        };
        if !parts.uri.path().starts_with("/chat.router.v1.Router/") {
            return Ok(None);
        }
        let c = Criticality::from_headers(&parts.headers)
            .unwrap_or_else(|| default_criticality(method(parts)));
        limiter.try_acquire(c).map(Some).map_err(|r| {
            overloaded(
                format!(
                    "router overloaded: {} calls in flight, limit {} ({c} calls get {} % of it)",
                    r.inflight,
                    r.limit,
                    share(c)
                ),
                Duration::from_millis(250),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(g: &RouterGuard, method: &str, stated: Option<&str>) -> Result<Option<Permit>, Status> {
        let mut b = http::Request::builder().uri(format!("/chat.router.v1.Router/{method}"));
        if let Some(c) = stated {
            b = b.header(chat_resilience::criticality::HEADER, c);
        }
        let (mut parts, ()) = b.body(()).unwrap().into_parts();
        g.admit(&mut parts)
    }

    #[test]
    fn the_gateways_criticality_decides_the_shedding_order() {
        let g = RouterGuard::new(Some(LimitConfig {
            initial: 4,
            min: 4,
            ..LimitConfig::default()
        }));
        let _a = call(&g, "AppendBatch", None).unwrap();
        let _b = call(&g, "AppendBatch", None).unwrap();
        // Half in use: a read the gateway marked sheddable is refused, a
        // catch-up read it marked critical is served.
        assert!(call(&g, "Read", Some("sheddable")).is_err());
        let _c = call(&g, "Read", Some("critical")).unwrap();
        assert!(
            call(&g, "Read", None).is_err(),
            "an unmarked read is normal"
        );
        let _d = call(&g, "Read", Some("critical")).unwrap();
        let e = call(&g, "AppendBatch", None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(chat_resilience::retry_after(&e).is_some());
    }
}
