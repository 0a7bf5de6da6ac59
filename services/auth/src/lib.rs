//! Bearer tokens: `v1.<user>.<expiry unix seconds>.<signature>`, where the
//! signature is HMAC-SHA256 over `v1.<user>.<expiry>` with the deployment's
//! key, base64url without padding. Gateways verify; `chatctl token` signs.
//!
//! User ids may contain `.`, so the user is everything between the version
//! and the last two fields.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Shortest accepted signing key.
pub const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("signing key must be at least {MIN_KEY_BYTES} bytes")]
    WeakKey,
}

/// The deployment's signing key.
#[derive(Clone)]
pub struct TokenKey(Vec<u8>);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenKey {
    pub fn new(key: impl Into<Vec<u8>>) -> Result<Self, TokenError> {
        let key = key.into();
        if key.len() < MIN_KEY_BYTES {
            return Err(TokenError::WeakKey);
        }
        Ok(Self(key))
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `user` valid until `expires_at` (unix seconds).
    pub fn sign(&self, user: &str, expires_at: u64) -> String {
        let payload = format!("v1.{user}.{expires_at}");
        let sig = URL_SAFE_NO_PAD.encode(self.mac(&payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// A token for `user` valid for `ttl_secs` from now.
    pub fn sign_for(&self, user: &str, ttl_secs: u64) -> String {
        self.sign(user, now_secs().saturating_add(ttl_secs))
    }

    /// The user a token names, if it is well formed, signed with this key
    /// and not expired.
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        self.verify_at(token, now_secs())
    }

    /// The user a token names and when it expires (unix seconds).
    pub fn verify_claims(&self, token: &str) -> Result<(String, u64), TokenError> {
        let user = self.verify_at(token, now_secs())?;
        let expiry = token
            .rsplit('.')
            .nth(1)
            .and_then(|e| e.parse().ok())
            .ok_or(TokenError::Malformed)?;
        Ok((user, expiry))
    }

    pub fn verify_at(&self, token: &str, now: u64) -> Result<String, TokenError> {
        let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let (head, expiry) = payload.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let user = head.strip_prefix("v1.").ok_or(TokenError::Malformed)?;
        if user.is_empty() {
            return Err(TokenError::Malformed);
        }
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(payload)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if expiry <= now {
            return Err(TokenError::Expired);
        }
        Ok(user.to_owned())
    }
}

/// The token in an `authorization` header value (`Bearer <token>`).
pub fn bearer(header: Option<&str>) -> Result<&str, TokenError> {
    let h = header.ok_or(TokenError::Missing)?;
    let t = h
        .strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .ok_or(TokenError::Malformed)?;
    if t.is_empty() {
        return Err(TokenError::Missing);
    }
    Ok(t.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::new(b"0123456789abcdef0123".to_vec()).unwrap()
    }

    #[test]
    fn a_signed_token_names_its_user_until_it_expires() {
        let t = key().sign("alice.b@x", 1_000);
        assert_eq!(key().verify_at(&t, 999).unwrap(), "alice.b@x");
        assert_eq!(key().verify_at(&t, 1_000), Err(TokenError::Expired));
    }

    #[test]
    fn tampering_wrong_keys_and_garbage_are_refused() {
        let t = key().sign("alice", u64::MAX);
        let forged = t.replacen("alice", "mallo", 1);
        assert_eq!(key().verify(&forged), Err(TokenError::BadSignature));
        let other = TokenKey::new(b"another key of 16+ bytes".to_vec()).unwrap();
        assert_eq!(other.verify(&t), Err(TokenError::BadSignature));
        for bad in [
            "",
            "v1",
            "v1.alice",
            "v1.alice.x.sig",
            "v2.alice.5.AAAA",
            "v1..5.AAAA",
        ] {
            assert!(
                matches!(
                    key().verify(bad),
                    Err(TokenError::Malformed | TokenError::BadSignature)
                ),
                "{bad}"
            );
        }
        assert_eq!(
            TokenKey::new(b"short".to_vec()).unwrap_err(),
            TokenError::WeakKey
        );
    }

    #[test]
    fn bearer_headers_are_parsed() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(None), Err(TokenError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(TokenError::Malformed));
    }
}
