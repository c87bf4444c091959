//! `PutFile`: writing files inside the machine, atomically (temp file + rename in the same
//! directory) or appending, with a mode and an owner resolved from the machine's user database.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, fchown};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::users::{UserDb, UserError};

/// Errors of [`put_file`].
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path is not absolute.
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The owner could not be resolved.
    #[error("cannot resolve owner {owner:?} of {path}")]
    Owner {
        /// The file.
        path: String,
        /// The owner spec.
        owner: String,
        /// The cause.
        #[source]
        source: UserError,
    },
    /// Writing failed.
    #[error("cannot write {path}")]
    Write {
        /// The file (on the agent's side).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Mode of a new file when the request gives none (0).
pub const DEFAULT_MODE: u32 = 0o644;

/// Writes `content` to the in-machine absolute `path` (under `db`'s root): atomically replacing
/// the file, or appending with `append`. Parent directories are created (root-owned, 0755).
/// `mode` 0 means 0644 for a new file and "unchanged" when appending to an existing one;
/// `owner` is `""` (root), `user` or `user:group`.
pub fn put_file(
    db: &UserDb,
    path: &str,
    content: &[u8],
    mode: u32,
    owner: &str,
    append: bool,
) -> Result<(), FileError> {
    if !path.starts_with('/') {
        return Err(FileError::NotAbsolute(path.to_string()));
    }
    let ids = db.resolve_owner(owner).map_err(|source| FileError::Owner {
        path: path.to_string(),
        owner: owner.to_string(),
        source,
    })?;
    let target = db.path(path);
    let wrap = |source| FileError::Write {
        path: target.clone(),
        source,
    };
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(wrap)?;
    }
    if append {
        append_to(&target, content, mode, ids).map_err(wrap)
    } else {
        let mode = if mode == 0 { DEFAULT_MODE } else { mode };
        write_atomic(&target, content, mode, Some(ids)).map_err(wrap)
    }
}

fn append_to(path: &Path, content: &[u8], mode: u32, ids: (u32, u32)) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(if mode == 0 {
            DEFAULT_MODE
        } else {
            mode & 0o7777
        })
        .open(path)?;
    file.write_all(content)?;
    if mode != 0 {
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
    }
    fchown(&file, Some(ids.0), Some(ids.1))?;
    file.sync_all()
}

/// Replaces `path` atomically: a temporary file in the same directory gets the content, the mode
/// (exactly, whatever the umask) and the owner, then is renamed over `path`.
pub fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.ironlab-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(content)?;
        if let Some((uid, gid)) = owner {
            fchown(&file, Some(uid), Some(gid))?;
        }
        // After chown: chown clears setuid/setgid bits.
        file.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    fn db() -> (tempfile::TempDir, UserDb) {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("etc")).expect("etc");
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/home/alice:/bin/sh\n",
        )
        .expect("passwd");
        fs::write(
            dir.path().join("etc/group"),
            "root:x:0:\nalice:x:1001:\nstaff:x:50:\n",
        )
        .expect("group");
        let db = UserDb::new(dir.path());
        (dir, db)
    }

    #[test]
    fn writes_with_mode_owner_and_parents() {
        let (dir, db) = db();
        put_file(
            &db,
            "/srv/a/b/motd",
            b"hello\n",
            0o600,
            "alice:staff",
            false,
        )
        .expect("put");
        let path = dir.path().join("srv/a/b/motd");
        assert_eq!(fs::read(&path).expect("read"), b"hello\n");
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!((meta.uid(), meta.gid()), (1001, 50));
        // Replacing leaves no temporary files behind.
        put_file(&db, "/srv/a/b/motd", b"bye\n", 0, "", false).expect("replace");
        assert_eq!(fs::read(&path).expect("read"), b"bye\n");
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!(meta.mode() & 0o7777, DEFAULT_MODE);
        assert_eq!(meta.uid(), 0);
        let entries = fs::read_dir(dir.path().join("srv/a/b"))
            .expect("dir")
            .count();
        assert_eq!(entries, 1);
    }

    #[test]
    fn appends() {
        let (dir, db) = db();
        put_file(&db, "/log", b"one\n", 0, "", true).expect("create");
        put_file(&db, "/log", b"two\n", 0o640, "alice", true).expect("append");
        let path = dir.path().join("log");
        assert_eq!(fs::read_to_string(&path).expect("read"), "one\ntwo\n");
        let meta = fs::metadata(&path).expect("meta");
        assert_eq!((meta.mode() & 0o7777, meta.uid()), (0o640, 1001));
    }

    #[test]
    fn rejects_relative_paths_and_unknown_owners() {
        let (_dir, db) = db();
        assert!(matches!(
            put_file(&db, "etc/x", b"", 0, "", false),
            Err(FileError::NotAbsolute(_))
        ));
        let err = put_file(&db, "/x", b"", 0, "ghost", false).expect_err("owner");
        assert!(err.to_string().contains("ghost"), "{err}");
    }
}
