//! Bearer tokens: `v2.<key id>.<user>.<expiry unix seconds>.<signature>`.
//! The signature is HMAC-SHA256 over `<audience>.v2.<key id>.<user>.<expiry>`
//! with the key the id names, base64url without padding. Gateways verify
//! with a [`Keyring`]; `chatctl token` signs.
//!
//! - The key id is the key's fingerprint (the first 8 bytes of its SHA-256,
//!   hex), so a gateway finds the one key to check without trying each,
//!   and keys rotate with no downtime: gateways accept the old and the new
//!   key, signers move to the new one, then the old one is dropped.
//! - The audience (the deployment's name, `chat` unless set) is signed but
//!   not carried: a token made for another deployment that shares a key by
//!   mistake does not verify.
//! - A token may live at most `max_lifetime` (its expiry is checked against
//!   it), and clocks may disagree by `skew` either way.
//!
//! User ids may contain `.`, so the user is everything between the key id
//! and the last two fields.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted signing key.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest token looked at; longer ones are refused without parsing.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// The audience tokens are signed for unless a deployment names its own.
pub const DEFAULT_AUDIENCE: &str = "chat";
/// The longest a token may be valid for, unless configured otherwise.
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 30 * 86_400;
/// How far clocks may disagree.
pub const DEFAULT_SKEW_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token signed with a key this deployment does not accept (key id {0})")]
    UnknownKey(String),
    #[error("token expired")]
    Expired,
    #[error("token valid for longer than this deployment allows ({0} s)")]
    TooLongLived(u64),
    #[error("signing key must be at least {MIN_KEY_BYTES} bytes")]
    WeakKey,
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
}

/// One signing key and its id.
#[derive(Clone)]
pub struct TokenKey {
    id: String,
    key: Vec<u8>,
    audience: String,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({})", self.id)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The id of a key: its fingerprint.
fn key_id(key: &[u8]) -> String {
    Sha256::digest(key)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl TokenKey {
    /// A key that signs for the default audience.
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, TokenError> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(TokenError::WeakKey);
        }
        Ok(Self {
            id: key_id(&key),
            key,
            audience: DEFAULT_AUDIENCE.to_owned(),
        })
    }

    /// The same key, signing for `audience` (a deployment's name).
    pub fn for_audience(mut self, audience: &str) -> Self {
        audience.clone_into(&mut self.audience);
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self, audience: &str, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(audience.as_bytes());
        mac.update(b".");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `user` valid until `expires_at` (unix seconds).
    pub fn sign(&self, user: &str, expires_at: u64) -> String {
        let payload = format!("v2.{}.{user}.{expires_at}", self.id);
        let sig =
            URL_SAFE_NO_PAD.encode(self.mac(&self.audience, &payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// A token for `user` valid for `ttl_secs` from now.
    pub fn sign_for(&self, user: &str, ttl_secs: u64) -> String {
        self.sign(user, now_secs().saturating_add(ttl_secs))
    }

    /// The user a token names, checked with this key alone and the
    /// default policy.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        Keyring::new(vec![self.clone()], &self.audience)
            .verify(token)
            .map(|(user, _)| user)
    }
}

/// The keys a gateway accepts, and its token policy.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: HashMap<String, TokenKey>,
    audience: String,
    max_lifetime: u64,
    skew: u64,
}

/// A token's parts.
struct Parsed<'t> {
    kid: &'t str,
    user: &'t str,
    expiry: u64,
    payload: &'t str,
    sig: Vec<u8>,
}

fn parse(token: &str) -> Result<Parsed<'_>, TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong);
    }
    let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let (head, expiry) = payload.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let rest = head.strip_prefix("v2.").ok_or(TokenError::Malformed)?;
    let (kid, user) = rest.split_once('.').ok_or(TokenError::Malformed)?;
    if kid.is_empty() || user.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(Parsed {
        kid,
        user,
        expiry: expiry.parse().map_err(|_| TokenError::Malformed)?,
        payload,
        sig: URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?,
    })
}

impl Keyring {
    /// Accepts tokens signed with any of `keys` for `audience`, valid for
    /// at most the default lifetime.
    pub fn new(keys: Vec<TokenKey>, audience: &str) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (k.id.clone(), k)).collect(),
            audience: audience.to_owned(),
            max_lifetime: DEFAULT_MAX_LIFETIME_SECS,
            skew: DEFAULT_SKEW_SECS,
        }
    }

    /// One key, the default audience.
    pub fn single(key: TokenKey) -> Self {
        Self::new(vec![key], DEFAULT_AUDIENCE)
    }

    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime = secs;
        self
    }

    /// Ids of the keys accepted.
    pub fn ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// The user a token names and when it expires (unix seconds).
    pub fn verify(&self, token: &str) -> Result<(String, u64), TokenError> {
        self.verify_at(token, now_secs())
    }

    pub fn verify_at(&self, token: &str, now: u64) -> Result<(String, u64), TokenError> {
        let t = parse(token)?;
        let key = self
            .keys
            .get(t.kid)
            .ok_or_else(|| TokenError::UnknownKey(t.kid.to_owned()))?;
        key.mac(&self.audience, t.payload)
            .verify_slice(&t.sig)
            .map_err(|_| TokenError::BadSignature)?;
        if t.expiry.saturating_add(self.skew) <= now {
            return Err(TokenError::Expired);
        }
        if t.expiry > now.saturating_add(self.max_lifetime + self.skew) {
            return Err(TokenError::TooLongLived(self.max_lifetime));
        }
        Ok((t.user.to_owned(), t.expiry))
    }
}

/// The token in an `authorization` header value (`Bearer <token>`).
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let h = header.ok_or(TokenError::Missing)?;
    let t = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .ok_or(TokenError::Malformed)?;
    let t = t.trim();
    if t.is_empty() {
        return Err(TokenError::Missing);
    }
    if t.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLong);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123".to_vec()).unwrap()
    }

    fn ring(keys: &[&TokenKey]) -> Keyring {
        Keyring::new(
            keys.iter().map(|k| (*k).clone()).collect(),
            DEFAULT_AUDIENCE,
        )
    }

    #[test]
    fn a_signed_token_names_its_user_until_it_expires_give_or_take_the_skew() {
        let t = key().sign("alice.b@x", 1_000);
        assert_eq!(
            ring(&[&key()]).verify_at(&t, 999).unwrap(),
            ("alice.b@x".to_string(), 1_000)
        );
        assert!(
            ring(&[&key()])
                .verify_at(&t, 1_000 + DEFAULT_SKEW_SECS - 1)
                .is_ok()
        );
        assert_eq!(
            ring(&[&key()]).verify_at(&t, 1_000 + DEFAULT_SKEW_SECS),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn a_token_valid_for_too_long_is_refused() {
        let now = 1_000_000;
        let t = key().sign("alice", now + 3_600);
        let r = ring(&[&key()]).with_max_lifetime(600);
        assert_eq!(r.verify_at(&t, now), Err(TokenError::TooLongLived(600)));
        assert!(ring(&[&key()]).verify_at(&t, now).is_ok());
    }

    #[test]
    fn keys_rotate_old_and_new_accepted_together_then_the_old_one_dropped() {
        let old = key();
        let new = TokenKey::new(b"the next signing key, 16+ bytes".to_vec()).unwrap();
        assert_ne!(old.id(), new.id());
        let (t_old, t_new) = (old.sign_for("alice", 600), new.sign_for("alice", 600));
        let during = ring(&[&old, &new]);
        assert!(during.verify(&t_old).is_ok() && during.verify(&t_new).is_ok());
        let after = ring(&[&new]);
        assert_eq!(
            after.verify(&t_old),
            Err(TokenError::UnknownKey(old.id().to_owned()))
        );
        assert!(after.verify(&t_new).is_ok());
    }

    #[test]
    fn a_token_for_another_audience_does_not_verify() {
        let staging = key().for_audience("staging");
        let t = staging.sign_for("alice", 600);
        assert_eq!(ring(&[&key()]).verify(&t), Err(TokenError::BadSignature));
        let staging_ring = Keyring::new(vec![key()], "staging");
        assert!(staging_ring.verify(&t).is_ok());
    }

    #[test]
    fn tampering_wrong_keys_and_garbage_are_refused() {
        let t = key().sign("alice", u64::MAX / 2);
        let forged = t.replacen("alice", "mallo", 1);
        assert_eq!(key().verify(&forged), Err(TokenError::BadSignature));
        // The same key id with another key's signature.
        let other = TokenKey::new(b"another key of 16+ bytes".to_vec()).unwrap();
        let theirs = other.sign_for("alice", 600);
        let swapped = format!("v2.{}{}", key().id(), &theirs[3 + other.id().len()..]);
        assert_eq!(key().verify(&swapped), Err(TokenError::BadSignature));
        for bad in [
            "",
            "v2",
            "v2.alice",
            "v2.kid.alice.x.sig",
            "v1.alice.5.AAAA",
            "v2..alice.5.AAAA",
        ] {
            assert!(
                matches!(
                    key().verify(bad),
                    Err(TokenError::Malformed | TokenError::UnknownKey(_))
                ),
                "{bad}"
            );
        }
        assert_eq!(key().verify(&"a".repeat(2_000)), Err(TokenError::TooLong));
        assert_eq!(
            TokenKey::new(b"short".to_vec()).unwrap_err(),
            TokenError::WeakKey
        );
    }

    #[test]
    fn the_bearer_header_is_parsed_strictly() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(None), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Bearer ")), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(TokenError::Malformed));
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        assert_eq!(bearer(Some(&long)), Err(TokenError::TooLong));
    }
}
