//! Faults given as `--fault KIND@SECONDS`.

use std::fmt;
use std::str::FromStr;

/// What to break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL (docker kill) the store leader; it is started again after
    /// `--restart-after`.
    StoreLeader,
    /// The same for one store follower.
    StoreFollower,
    /// SIGKILL (docker kill) every store replica at once: the whole tier
    /// is gone; each is started again after `--restart-after`.
    StoreAll,
    /// The same for gateway-1.
    Gateway,
    /// The same for router-1.
    Router,
    /// Cut the store leader off from its peers (clients still reach it).
    PartitionLeader,
    /// Cut one store follower off from its peers.
    PartitionFollower,
    /// Reconnect every partitioned replica.
    Heal,
    /// SIGSTOP (docker pause) the store leader.
    PauseLeader,
    /// SIGSTOP one store follower.
    PauseFollower,
    /// SIGCONT (docker unpause) everything paused.
    Unpause,
}

pub const KINDS: &[(&str, FaultKind)] = &[
    ("store-leader", FaultKind::StoreLeader),
    ("store-follower", FaultKind::StoreFollower),
    ("store-all", FaultKind::StoreAll),
    ("gateway", FaultKind::Gateway),
    ("router", FaultKind::Router),
    ("partition-leader", FaultKind::PartitionLeader),
    ("partition-follower", FaultKind::PartitionFollower),
    ("heal", FaultKind::Heal),
    ("pause-leader", FaultKind::PauseLeader),
    ("pause-follower", FaultKind::PauseFollower),
    ("unpause", FaultKind::Unpause),
];

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = KINDS
            .iter()
            .find(|(_, k)| k == self)
            .map_or("?", |(n, _)| n);
        f.write_str(name)
    }
}

impl FaultKind {
    /// Whether the cluster loses (and must regain) its store leader.
    pub fn hits_store_leader(self) -> bool {
        matches!(
            self,
            FaultKind::StoreLeader
                | FaultKind::StoreAll
                | FaultKind::PartitionLeader
                | FaultKind::PauseLeader
        )
    }

    /// Whether the fault leaves no instance of a tier serving (the store
    /// without quorum), so the service can only come back once the tier is
    /// started again.
    pub fn takes_tier_away(self) -> bool {
        self == FaultKind::StoreAll
    }

    /// Kills whose process is started again after `--restart-after`.
    pub fn is_kill(self) -> bool {
        matches!(
            self,
            FaultKind::StoreLeader
                | FaultKind::StoreFollower
                | FaultKind::StoreAll
                | FaultKind::Gateway
                | FaultKind::Router
        )
    }
}

/// `KIND@SECONDS`: inject `kind` `at_s` seconds into the load phase.
#[derive(Clone, Debug)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub at_s: f64,
}

impl FromStr for FaultSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let names = || KINDS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let (kind, at) = s
            .split_once('@')
            .ok_or_else(|| format!("fault {s:?} is not KIND@SECONDS (kinds: {})", names()))?;
        let kind = KINDS
            .iter()
            .find(|(n, _)| *n == kind)
            .map(|(_, k)| *k)
            .ok_or_else(|| format!("unknown fault kind {kind:?} (kinds: {})", names()))?;
        let at_s: f64 = at
            .parse()
            .map_err(|_| format!("fault time {at:?} is not a number of seconds"))?;
        if !(at_s.is_finite() && at_s >= 0.0) {
            return Err(format!("fault time {at:?} must be 0 or more seconds"));
        }
        Ok(Self { kind, at_s })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_and_rejects_bad_specs() {
        for (name, kind) in KINDS {
            let f: FaultSpec = format!("{name}@2.5").parse().unwrap();
            assert_eq!((f.kind, f.at_s), (*kind, 2.5));
            assert_eq!(kind.to_string(), *name);
        }
        for bad in [
            "store-leader",
            "meteor@3",
            "store-leader@-1",
            "store-leader@soon",
        ] {
            let e = bad.parse::<FaultSpec>().unwrap_err();
            assert!(!e.is_empty() && !e.contains('\n'), "{bad}: {e}");
        }
    }
}
