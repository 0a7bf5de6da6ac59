//! `chatctl store backup` and `restore`: the online backup streamed from
//! the leader into a file, and the restore of a new group from it (the file
//! format and the restore itself are the store's, `chat_store::backup`).

use std::path::Path;

use anyhow::Context as _;
use chat_proto::store::v1::{BackupHeader, backup_chunk::Part};
use chat_store::StoreClient;
use chat_store::backup::BackupWriter;
use chat_store::types::NodeId;

/// Takes a backup through the leader into `path` (which must not exist).
pub async fn take(client: &StoreClient, path: &Path) -> anyhow::Result<BackupHeader> {
    let mut stream = client.backup().await.context("starting the backup")?;
    let header = match stream.message().await.context("receiving the backup")? {
        Some(chat_proto::store::v1::BackupChunk {
            part: Some(Part::Header(h)),
        }) => h,
        _ => anyhow::bail!("the store did not begin the backup with its header"),
    };
    let mut out = BackupWriter::create(path, header)?;
    loop {
        match stream.message().await {
            Ok(Some(chat_proto::store::v1::BackupChunk {
                part: Some(Part::Data(data)),
            })) => out.write(&data)?,
            Ok(None) => break,
            Ok(Some(_)) => anyhow::bail!("the store sent a second header"),
            Err(s) => anyhow::bail!("the backup stream failed: {}", s.message()),
        }
    }
    Ok(out.finish()?)
}

/// What a backup holds, in one line.
pub fn describe(h: &BackupHeader) -> String {
    let voters: Vec<String> = h
        .replicas
        .iter()
        .map(|r| format!("{}={}", r.id, r.address))
        .collect();
    format!(
        "raft index {} (term {}), {} bytes of state, taken by replica {} at {} ms since the epoch from a group of {}",
        h.index,
        h.term,
        h.size,
        h.taken_by,
        h.taken_at_ms,
        voters.join(",")
    )
}

/// Restores the data directory of replica `id` of a new group.
pub fn restore(
    backup: &Path,
    dir: &Path,
    id: NodeId,
    voters: &[(NodeId, String)],
) -> anyhow::Result<BackupHeader> {
    chat_store::backup::restore(backup, dir, id, voters)
        .with_context(|| format!("restoring replica {id} into {}", dir.display()))
}
