//! Which gateway holds which online user: soft state, rebuilt from the
//! leases gateways renew. Nothing here is needed to avoid losing a message;
//! it only makes delivery fast.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Lease {
    users: HashSet<String>,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    gateways: HashMap<String, Lease>,
    /// user → gateways holding them (possibly expired; checked on lookup).
    users: HashMap<String, HashSet<String>>,
}

#[derive(Default)]
pub struct Directory {
    inner: Mutex<Inner>,
}

impl Directory {
    /// Replaces what `gateway` holds with `users`, for `lease`.
    pub fn register(&self, gateway: &str, users: Vec<String>, lease: Duration) {
        let mut g = self.inner.lock().expect("directory lock poisoned");
        let users: HashSet<String> = users.into_iter().collect();
        let old = g
            .gateways
            .remove(gateway)
            .map(|l| l.users)
            .unwrap_or_default();
        for gone in old.difference(&users) {
            if let Some(set) = g.users.get_mut(gone) {
                set.remove(gateway);
                if set.is_empty() {
                    g.users.remove(gone);
                }
            }
        }
        for u in users.difference(&old) {
            g.users
                .entry(u.clone())
                .or_default()
                .insert(gateway.to_owned());
        }
        g.gateways.insert(
            gateway.to_owned(),
            Lease {
                users,
                expires: Instant::now() + lease,
            },
        );
    }

    /// Online recipients among `users`, grouped by gateway.
    pub fn locate<'a>(
        &self,
        users: impl IntoIterator<Item = &'a String>,
    ) -> HashMap<String, Vec<String>> {
        let g = self.inner.lock().expect("directory lock poisoned");
        let now = Instant::now();
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for u in users {
            let Some(gws) = g.users.get(u) else { continue };
            for gw in gws {
                if g.gateways.get(gw).is_some_and(|l| l.expires > now) {
                    out.entry(gw.clone()).or_default().push(u.clone());
                }
            }
        }
        out
    }

    /// Drops gateways whose lease ran out.
    pub fn purge(&self) {
        let mut g = self.inner.lock().expect("directory lock poisoned");
        let now = Instant::now();
        let expired: Vec<String> = g
            .gateways
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for gw in expired {
            if let Some(l) = g.gateways.remove(&gw) {
                for u in l.users {
                    if let Some(set) = g.users.get_mut(&u) {
                        set.remove(&gw);
                        if set.is_empty() {
                            g.users.remove(&u);
                        }
                    }
                }
            }
        }
    }

    pub fn online_users(&self) -> usize {
        self.inner
            .lock()
            .expect("directory lock poisoned")
            .users
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_replace_and_leases_expire() {
        let d = Directory::default();
        d.register("gw1", vec!["a".into(), "b".into()], Duration::from_secs(60));
        d.register("gw2", vec!["b".into()], Duration::from_secs(60));
        let who = ["a".to_string(), "b".to_string(), "c".to_string()];
        let found = d.locate(who.iter());
        assert_eq!(found["gw1"].len(), 2);
        assert_eq!(found["gw2"], vec!["b".to_string()]);
        d.register("gw1", vec!["a".into()], Duration::from_secs(60));
        assert_eq!(d.locate(who.iter())["gw1"], vec!["a".to_string()]);
        d.register("gw2", vec!["b".into()], Duration::ZERO);
        assert!(!d.locate(who.iter()).contains_key("gw2"));
        d.purge();
        assert_eq!(d.online_users(), 1);
    }
}
