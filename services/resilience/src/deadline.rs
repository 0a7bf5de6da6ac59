//! Deadlines carried across hops. A caller's `grpc-timeout` becomes an
//! absolute [`Deadline`] when its request arrives (set by
//! [`crate::layer::AdmitLayer`]); every call made on its behalf is bounded
//! by what is left of it, so no hop keeps working for a caller that has
//! already given up.

use std::time::{Duration, Instant};

/// When the caller stops waiting; a request extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn expired(&self) -> bool {
        self.remaining().is_zero()
    }
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit
/// (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline stated by `headers`, counted from `arrived`.
pub fn from_headers(headers: &http::HeaderMap, arrived: Instant) -> Option<Deadline> {
    let d = parse_grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Deadline(arrived + d))
}

/// The deadline of an incoming request, if it has one.
pub fn of<T>(req: &tonic::Request<T>) -> Option<Deadline> {
    req.extensions().get::<Deadline>().copied()
}

/// The time a call made on behalf of `caller` may take: `own`, or less
/// when the caller's deadline is nearer.
pub fn budget(own: Duration, caller: Option<Deadline>) -> Duration {
    caller.map_or(own, |d| d.remaining().min(own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values_parse_and_bad_ones_do_not() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("10u"), Some(Duration::from_micros(10)));
        assert_eq!(parse_grpc_timeout("10n"), Some(Duration::from_nanos(10)));
        for bad in ["", "m", "10", "10x", "-1m", "123456789m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_call_never_outlives_its_caller() {
        let now = Instant::now();
        let near = Deadline(now + Duration::from_millis(50));
        assert!(budget(Duration::from_secs(5), Some(near)) <= Duration::from_millis(50));
        assert_eq!(budget(Duration::from_secs(5), None), Duration::from_secs(5));
        let past = Deadline(now - Duration::from_millis(1));
        assert!(past.expired());
        assert_eq!(budget(Duration::from_secs(5), Some(past)), Duration::ZERO);
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(
            from_headers(&h, now),
            Some(Deadline(now + Duration::from_millis(100)))
        );
    }
}
