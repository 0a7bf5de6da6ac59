//! How much a request matters when not everything can be served.
//!
//! Sends and deliveries are what users notice first, so they are shed last;
//! history and conversation management can wait a moment; typing indicators
//! are worth nothing a second later and go first. A gateway states the
//! criticality of each call it makes to a router in the `x-criticality`
//! header, so a router sheds in the same order (a read that catches a
//! subscriber up is critical, a history page is not).

use std::fmt;

/// Header carrying a request's criticality between services.
pub const HEADER: &str = "x-criticality";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Criticality {
    /// Typing indicators, presence: dropped first.
    Sheddable,
    /// History, conversation management.
    Normal,
    /// Sends and deliveries.
    Critical,
}

impl Criticality {
    pub const ALL: [Criticality; 3] = [Self::Sheddable, Self::Normal, Self::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sheddable => "sheddable",
            Self::Normal => "normal",
            Self::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The criticality stated in `headers`, if any.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        headers
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Self::parse)
    }

    /// Adds this criticality to an outgoing request.
    pub fn stamp<T>(self, req: &mut tonic::Request<T>) {
        req.metadata_mut().insert(
            HEADER,
            tonic::metadata::MetadataValue::from_static(self.as_str()),
        );
    }
}

impl fmt::Display for Criticality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_is_shedding_order() {
        for c in Criticality::ALL {
            assert_eq!(Criticality::parse(c.as_str()), Some(c));
        }
        assert!(Criticality::Sheddable < Criticality::Normal);
        assert!(Criticality::Normal < Criticality::Critical);
        assert_eq!(Criticality::parse("urgent"), None);
    }
}
