//! `chatctl store rebuild-replica`: a replica whose data directory is
//! damaged (it refuses to start, naming what it found) is given an empty
//! one and rejoins through the normal path, a snapshot from the leader.
//! The damaged files are moved aside, inside the directory (which may be a
//! container volume's mount point), not deleted: they are evidence.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Where a rebuild puts what the directory held.
pub const SET_ASIDE_PREFIX: &str = "damaged-";

/// Moves everything in `dir` (but earlier set-aside copies) into
/// `dir/damaged-<unix seconds>`, after checking that the directory is
/// replica `id`'s. Returns where it went.
pub fn set_aside(dir: &Path, id: u64) -> anyhow::Result<PathBuf> {
    let marker = dir.join(chat_store::data_dir::MARKER);
    match std::fs::read_to_string(&marker) {
        Ok(owner) if owner.trim() != id.to_string() => anyhow::bail!(
            "refused: {} belongs to replica {}, not to replica {id}",
            dir.display(),
            owner.trim()
        ),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", marker.display())),
    }
    let entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with(SET_ASIDE_PREFIX))
        .collect();
    anyhow::ensure!(
        !entries.is_empty(),
        "nothing to rebuild: {} holds no replica data; start replica {id} and it joins by snapshot",
        dir.display()
    );
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = dir.join(format!("{SET_ASIDE_PREFIX}{secs}"));
    std::fs::create_dir(&aside).with_context(|| format!("creating {}", aside.display()))?;
    // The marker first: a directory half moved is no replica's.
    let mut entries = entries;
    entries.sort_by_key(|n| n.as_os_str() != std::ffi::OsStr::new(chat_store::data_dir::MARKER));
    for name in entries {
        std::fs::rename(dir.join(&name), aside.join(&name))
            .with_context(|| format!("moving {} aside", dir.join(&name).display()))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replicas_files_are_moved_aside_and_another_replicas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(chat_store::data_dir::MARKER), "2\n").unwrap();
        std::fs::create_dir(d.join("state")).unwrap();
        std::fs::write(d.join("state").join("db"), b"damaged").unwrap();
        let err = set_aside(d, 3).unwrap_err().to_string();
        assert!(err.contains("belongs to replica 2"), "{err}");
        let aside = set_aside(d, 2).unwrap();
        assert!(aside.join("state").join("db").exists());
        assert!(!d.join(chat_store::data_dir::MARKER).exists());
        let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
        assert_eq!(left.len(), 1, "only the set-aside copy");
        let err = set_aside(d, 2).unwrap_err().to_string();
        assert!(err.contains("nothing to rebuild"), "{err}");
    }
}
