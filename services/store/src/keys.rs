//! Key layout. Every key the store writes is built here.
//!
//! The raft log's metadata lives in the WAL's meta group (`wal::META_GROUP`),
//! beside the entries (`wal::LOG_GROUP`, keyed by raft index):
//!
//! ```text
//! id                replica id that owns this WAL (u64 BE)
//! hs                raft hard state
//! tr                index and term of the last compacted entry (u64 BE x2)
//! fresh             present while the data directory is new: empty until a
//!                   leader's log reaches the replica, then the commit index
//!                   (u64 BE) that leader showed; removed once applied
//! ```
//!
//! The state machine lives in the ordered key-value engine (sled):
//!
//! ```text
//! m/id              replica id that owns this state (u64 BE)
//! m/cs              raft conf state (as of the applied index)
//! m/in              snapshot install in progress (descriptor, metadata)
//! s/a               applied index and its term (u64 BE x2)
//! s/t               the dedup clock: newest entry timestamp applied (i64 BE)
//! s/c/<conv>        conversation record
//! s/m/<len><conv><seq BE>             message record
//! s/d/<len><conv><len><sender><cmid>  dedup: seq and server ts (u64/i64 BE)
//! s/x/<ts BE><first dedup key>      dedup records one batch wrote, listed
//!                                   (ts: the batch's newest entry time)
//! s/r/<id BE>       raft address of a replica (initial voters included)
//! s/u/<len><user><conv>               the user is a member of the conversation
//! s/k/<key>         a setting (SettingRecord)
//! ```
//!
//! Everything under `s/` is the state machine and travels in snapshots.

/// Keys of the WAL's meta group.
pub mod wal {
    pub const REPLICA_ID: &[u8] = b"id";
    pub const HARD_STATE: &[u8] = b"hs";
    pub const TRUNCATED: &[u8] = b"tr";
    /// Present until the replica of a new data directory has applied the
    /// commit index the first leader to reach it showed.
    pub const FRESH: &[u8] = b"fresh";
}

pub const REPLICA_ID: &[u8] = b"m/id";
pub const CONF_STATE: &[u8] = b"m/cs";
/// Present while a snapshot is being installed: its descriptor and
/// metadata, to finish the install after a crash.
pub const INSTALLING: &[u8] = b"m/in";
pub const STATE_PREFIX: &[u8] = b"s/";
pub const APPLIED: &[u8] = b"s/a";
pub const DEDUP_CLOCK: &[u8] = b"s/t";
pub const CONVERSATION_PREFIX: &[u8] = b"s/c/";
pub const MESSAGE_PREFIX: &[u8] = b"s/m/";
pub const DEDUP_PREFIX: &[u8] = b"s/d/";
pub const DEDUP_EXPIRY_PREFIX: &[u8] = b"s/x/";
pub const REPLICA_ADDR_PREFIX: &[u8] = b"s/r/";
pub const USER_CONV_PREFIX: &[u8] = b"s/u/";
pub const SETTING_PREFIX: &[u8] = b"s/k/";

pub fn conversation(conv: &str) -> Vec<u8> {
    [CONVERSATION_PREFIX, conv.as_bytes()].concat()
}

/// Prefix of all messages of one conversation. Ids are at most 128 bytes
/// (checked at the edge), so one length byte suffices.
pub fn messages_of(conv: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(MESSAGE_PREFIX.len() + 1 + conv.len() + 8);
    k.extend_from_slice(MESSAGE_PREFIX);
    push_len_prefixed(&mut k, conv);
    k
}

pub fn message(conv: &str, seq: u64) -> Vec<u8> {
    let mut k = messages_of(conv);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn message_seq(key: &[u8]) -> Option<u64> {
    let tail = key.get(key.len().checked_sub(8)?..)?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub fn dedup(conv: &str, sender: &str, client_msg_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(
        DEDUP_PREFIX.len() + 2 + conv.len() + sender.len() + client_msg_id.len(),
    );
    k.extend_from_slice(DEDUP_PREFIX);
    push_len_prefixed(&mut k, conv);
    push_len_prefixed(&mut k, sender);
    k.extend_from_slice(client_msg_id.as_bytes());
    k
}

/// The key of an expiry list: the dedup records one batch wrote, all at or
/// before `ts_ms`. Sorted by time, so the oldest lists expire first; the
/// first record's key makes it unique.
pub fn dedup_expiry(ts_ms: i64, first_dedup_key: &[u8]) -> Vec<u8> {
    let suffix = first_dedup_key
        .strip_prefix(DEDUP_PREFIX)
        .unwrap_or(first_dedup_key);
    let mut k = Vec::with_capacity(DEDUP_EXPIRY_PREFIX.len() + 8 + suffix.len());
    k.extend_from_slice(DEDUP_EXPIRY_PREFIX);
    k.extend_from_slice(&(ts_ms.max(0) as u64).to_be_bytes());
    k.extend_from_slice(suffix);
    k
}

/// An expiry list's value: the listed dedup keys, each behind its length.
pub fn encode_expiry_list<'a>(dedup_keys: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut v = Vec::new();
    for k in dedup_keys {
        let suffix = k.strip_prefix(DEDUP_PREFIX).unwrap_or(k);
        v.extend_from_slice(&(suffix.len() as u16).to_be_bytes());
        v.extend_from_slice(suffix);
    }
    v
}

/// The dedup keys an expiry list names (`None`: the value is damaged).
pub fn decode_expiry_list(v: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let len = u16::from_be_bytes(rest.get(..2)?.try_into().ok()?) as usize;
        let suffix = rest.get(2..2 + len)?;
        out.push([DEDUP_PREFIX, suffix].concat());
        rest = &rest[2 + len..];
    }
    Some(out)
}

/// Prefix of every conversation a user belongs to.
pub fn conversations_of(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(USER_CONV_PREFIX.len() + 1 + user.len());
    k.extend_from_slice(USER_CONV_PREFIX);
    push_len_prefixed(&mut k, user);
    k
}

pub fn user_conversation(user: &str, conv: &str) -> Vec<u8> {
    let mut k = conversations_of(user);
    k.extend_from_slice(conv.as_bytes());
    k
}

pub fn setting(key: &str) -> Vec<u8> {
    [SETTING_PREFIX, key.as_bytes()].concat()
}

pub fn replica_addr(id: u64) -> Vec<u8> {
    [REPLICA_ADDR_PREFIX, &id.to_be_bytes()].concat()
}

fn push_len_prefixed(k: &mut Vec<u8>, s: &str) {
    debug_assert!(s.len() <= u8::MAX as usize);
    k.push(s.len() as u8);
    k.extend_from_slice(s.as_bytes());
}

pub fn encode_pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&a.to_be_bytes());
    v.extend_from_slice(&b.to_be_bytes());
    v
}

pub fn decode_pair(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    Some((
        u64::from_be_bytes(v[..8].try_into().ok()?),
        u64::from_be_bytes(v[8..].try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_of_one_conversation_sort_by_seq_and_exclude_prefix_siblings() {
        // "a" and "ab" must not interleave: the length byte separates them.
        let a9 = message("a", 9);
        let a10 = message("a", 10);
        let ab1 = message("ab", 1);
        assert!(a9 < a10);
        assert!(!ab1.starts_with(&messages_of("a")));
        assert_eq!(message_seq(&a10), Some(10));
    }
}
