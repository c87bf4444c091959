//! Object stores: a flat key → bytes namespace with two real backends, a local directory
//! ([`LocalStore`], the default) and any S3-compatible service ([`S3Store`], through the
//! `object_store` crate). The snapshot code ([`crate::upload_drive`], [`crate::restore_drive`],
//! [`crate::gc`]) only talks to the [`ObjectStore`] trait.
//!
//! Keys are relative, `/`-separated, made of `[A-Za-z0-9._-]` segments (no empty, `.` or `..`
//! segment, no leading dot: names starting with `.` are the local store's temporary files).

use std::collections::HashSet;
use std::fmt;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt as _;

/// Errors of an object store operation. Every variant names the store and the key.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key does not exist.
    #[error("{store}: object {key} not found")]
    NotFound {
        /// The store's description ([`ObjectStore::describe`]).
        store: String,
        /// The key asked for.
        key: String,
    },
    /// A key that is not a valid store key (see the module docs).
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key given.
        key: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A local file system operation failed.
    #[error("{store}: cannot {op} {path}")]
    Io {
        /// The store's description.
        store: String,
        /// What was being done ("write", "read", …).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The remote (S3) store failed.
    #[error("{store}: cannot {op} {key}")]
    Remote {
        /// The store's description.
        store: String,
        /// What was being done.
        op: &'static str,
        /// The key concerned (or the prefix, for a listing).
        key: String,
        /// The client's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The store configuration is unusable.
    #[error("object store configuration: {0}")]
    Config(String),
}

/// What a listing returns about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key (relative to the store, without the store's prefix).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written (the store's clock; S3 rounds to the second).
    pub last_modified: SystemTime,
}

/// A flat key → bytes store. Writes are atomic: a reader sees the old object, the new one, or
/// nothing, never a part. Implementations are cheap to share (`Arc<dyn ObjectStore>`).
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Writes `data` under `key`, replacing any object there (and refreshing its
    /// `last_modified`). Not necessarily durable until [`ObjectStore::flush`].
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;
    /// Reads the whole object; [`StoreError::NotFound`] when it does not exist.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;
    /// Metadata of one object, `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError>;
    /// Deletes the object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Every object whose key starts with `prefix` (a directory-like prefix ending in `/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;
    /// Makes every completed `put` durable (the local store fsyncs the directories it wrote
    /// into; remote stores are durable on return from `put`).
    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Removes temporary files of interrupted writes older than `older_than`; returns how many.
    /// Only the local store has any.
    async fn remove_stale_temp(&self, older_than: SystemTime) -> Result<u64, StoreError> {
        let _ = older_than;
        Ok(0)
    }
    /// A short human description for messages: `local store /path` or `s3://bucket/prefix`.
    fn describe(&self) -> String;
}

/// Checks a key against the rules in the module docs.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("it is empty");
    }
    for seg in key.split('/') {
        if seg.is_empty() {
            return bad("it has an empty segment (leading, trailing or double '/')");
        }
        if seg.starts_with('.') {
            return bad("a segment starts with '.'");
        }
        if !seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only A-Z a-z 0-9 . _ - and '/' are allowed");
        }
    }
    Ok(())
}

fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.trim_end_matches('/'))
}

// ------------------------------------------------------------------------------------------------
// Local directory
// ------------------------------------------------------------------------------------------------

/// A store in a local directory: key `a/b/c` is the file `ROOT/a/b/c`. A put writes
/// `ROOT/a/b/.c.tmp-RANDOM`, fdatasyncs it and renames it over `c`; [`ObjectStore::flush`]
/// fsyncs the directories written into since the last flush.
#[derive(Debug, Clone)]
pub struct LocalStore(Arc<LocalInner>);

#[derive(Debug)]
struct LocalInner {
    root: PathBuf,
    dirty_dirs: Mutex<HashSet<PathBuf>>,
}

impl LocalStore {
    /// A store rooted at `root` (created if missing, with its parents).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|source| StoreError::Io {
            store: format!("local store {}", root.display()),
            op: "create the directory",
            path: root.clone(),
            source,
        })?;
        Ok(Self(Arc::new(LocalInner {
            root,
            dirty_dirs: Mutex::new(HashSet::new()),
        })))
    }

    /// The directory this store lives in.
    pub fn root(&self) -> &Path {
        &self.0.root
    }

    /// The file that holds `key` (whether or not it exists).
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        self.0.path_of(key)
    }
}

impl LocalInner {
    fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn describe(&self) -> String {
        format!("local store {}", self.root.display())
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
        let store = self.describe();
        let path = path.to_owned();
        move |source| StoreError::Io {
            store,
            op,
            path,
            source,
        }
    }

    fn put_blocking(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", rand::random::<u64>()));
        let write = |tmp: &Path| -> io::Result<()> {
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(data)?;
            rustix::fs::fdatasync(&f)?;
            Ok(())
        };
        let first = write(&tmp);
        let first = match first {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(self.io("create the directory", &dir))?;
                // The new directory's own entry must be durable too.
                self.mark_dirty(dir.parent().unwrap_or(&self.root));
                write(&tmp)
            }
            other => other,
        };
        if let Err(e) = first {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("write", &tmp)(e));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.io("rename into place", &path)(e));
        }
        self.mark_dirty(&dir);
        Ok(())
    }

    fn mark_dirty(&self, dir: &Path) {
        if let Ok(mut set) = self.dirty_dirs.lock() {
            set.insert(dir.to_owned());
        }
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        validate_prefix(prefix)?;
        // Walk from the deepest directory the prefix names.
        let (dir_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_part)
        };
        let mut out = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", &dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(self.io("list", &dir))?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                let ft = entry.file_type().map_err(self.io("stat", &path))?;
                if ft.is_dir() {
                    stack.push(path);
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().into_owned();
                if !key.starts_with(prefix) {
                    continue;
                }
                let md = match entry.metadata() {
                    Ok(md) => md,
                    // Deleted between readdir and stat.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(self.io("stat", &path)(e)),
                };
                out.push(ObjectMeta {
                    key,
                    size: md.len(),
                    last_modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn remove_stale_temp_blocking(&self, older_than: SystemTime) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", &dir)(e)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    stack.push(path);
                } else if entry.file_name().to_string_lossy().contains(".tmp-")
                    && entry.file_name().to_string_lossy().starts_with('.')
                    && entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .is_ok_and(|m| m < older_than)
                    && std::fs::remove_file(&path).is_ok()
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

/// Runs blocking file work off the async threads. A panic in it becomes an I/O error.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Config(format!("a store task failed: {e}"))))
}

#[async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let this = Arc::clone(&self.0);
        let key = key.to_owned();
        blocking(move || this.put_blocking(&key, &data)).await
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.0.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(v) => Ok(Bytes::from(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NotFound {
                store: self.describe(),
                key: key.to_owned(),
            }),
            Err(e) => Err(self.0.io("read", &path)(e)),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        let path = self.0.path_of(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(md) if md.is_file() => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: md.len(),
                last_modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.0.io("stat", &path)(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.0.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {
                self.0.mark_dirty(path.parent().unwrap_or(&self.0.root));
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.0.io("delete", &path)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let this = Arc::clone(&self.0);
        let prefix = prefix.to_owned();
        blocking(move || this.list_blocking(&prefix)).await
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let dirs: Vec<PathBuf> = match self.0.dirty_dirs.lock() {
            Ok(mut set) => set.drain().collect(),
            Err(_) => Vec::new(),
        };
        if dirs.is_empty() {
            return Ok(());
        }
        let this = Arc::clone(&self.0);
        blocking(move || {
            for dir in dirs {
                let f = std::fs::File::open(&dir).map_err(this.io("open", &dir))?;
                rustix::fs::fsync(&f)
                    .map_err(io::Error::from)
                    .map_err(this.io("fsync", &dir))?;
            }
            Ok(())
        })
        .await
    }

    async fn remove_stale_temp(&self, older_than: SystemTime) -> Result<u64, StoreError> {
        let this = Arc::clone(&self.0);
        blocking(move || this.remove_stale_temp_blocking(older_than)).await
    }

    fn describe(&self) -> String {
        self.0.describe()
    }
}

// ------------------------------------------------------------------------------------------------
// S3
// ------------------------------------------------------------------------------------------------

/// Where and how to reach an S3-compatible store.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The bucket (must exist).
    pub bucket: String,
    /// A key prefix inside the bucket (no leading or trailing `/`; empty for none).
    pub prefix: String,
    /// The service URL, e.g. `http://127.0.0.1:9000`; `None` for AWS itself.
    pub endpoint: Option<String>,
    /// The region (`us-east-1` when unset).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token for temporary credentials.
    pub session_token: Option<String>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A store in an S3 bucket (any S3-compatible service; path-style requests, so endpoints
/// like `http://127.0.0.1:9000` work). Plain HTTP is allowed only when the endpoint says
/// `http://`.
#[derive(Debug)]
pub struct S3Store {
    inner: object_store::aws::AmazonS3,
    config: S3Config,
}

impl S3Store {
    /// Builds the client (no request is made).
    pub fn new(config: S3Config) -> Result<Self, StoreError> {
        if config.bucket.is_empty() {
            return Err(StoreError::Config("the S3 bucket name is empty".into()));
        }
        if !config.prefix.is_empty() {
            validate_key(&config.prefix).map_err(|e| {
                StoreError::Config(format!("the S3 prefix {:?} is invalid: {e}", config.prefix))
            })?;
        }
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_virtual_hosted_style_request(false);
        if let Some(token) = &config.session_token {
            b = b.with_token(token);
        }
        if let Some(endpoint) = &config.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let inner = b
            .build()
            .map_err(|e| StoreError::Config(format!("S3 client: {e}")))?;
        Ok(Self { inner, config })
    }

    fn path(&self, key: &str) -> Result<object_store::path::Path, StoreError> {
        validate_key(key)?;
        let full = if self.config.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.config.prefix)
        };
        object_store::path::Path::parse(&full).map_err(|_| StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "not a valid S3 path",
        })
    }

    fn strip(&self, location: &object_store::path::Path) -> String {
        let s = location.as_ref();
        if self.config.prefix.is_empty() {
            s.to_owned()
        } else {
            s.strip_prefix(&self.config.prefix)
                .map(|r| r.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| s.to_owned())
        }
    }

    fn remote(
        &self,
        op: &'static str,
        key: &str,
    ) -> impl FnOnce(object_store::Error) -> StoreError + use<> {
        let store = ObjectStore::describe(self);
        let key = key.to_owned();
        move |source| StoreError::Remote {
            store,
            op,
            key,
            source: Box::new(source),
        }
    }
}

fn meta_time(t: chrono::DateTime<chrono::Utc>) -> SystemTime {
    let ms = t.timestamp_millis();
    if ms <= 0 {
        SystemTime::UNIX_EPOCH
    } else {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.unsigned_abs())
    }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        use object_store::ObjectStore as _;
        let path = self.path(key)?;
        self.inner
            .put(&path, data.into())
            .await
            .map_err(self.remote("upload", key))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        use object_store::ObjectStore as _;
        let path = self.path(key)?;
        let res = match self.inner.get(&path).await {
            Ok(r) => r,
            Err(e) if is_not_found(&e) => {
                return Err(StoreError::NotFound {
                    store: ObjectStore::describe(self),
                    key: key.to_owned(),
                });
            }
            Err(e) => return Err(self.remote("download", key)(e)),
        };
        res.bytes().await.map_err(self.remote("download", key))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        use object_store::ObjectStore as _;
        let path = self.path(key)?;
        match self.inner.head(&path).await {
            Ok(m) => Ok(Some(ObjectMeta {
                key: key.to_owned(),
                size: m.size,
                last_modified: meta_time(m.last_modified),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.remote("check", key)(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        use object_store::ObjectStore as _;
        let path = self.path(key)?;
        match self.inner.delete(&path).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.remote("delete", key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        use object_store::ObjectStore as _;
        validate_prefix(prefix)?;
        // object_store lists whole path segments: list the prefix's directory, then filter.
        let dir = prefix.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let full = match (self.config.prefix.is_empty(), dir.is_empty()) {
            (true, _) => dir.to_owned(),
            (false, true) => self.config.prefix.clone(),
            (false, false) => format!("{}/{dir}", self.config.prefix),
        };
        let list_prefix = if full.is_empty() {
            None
        } else {
            Some(object_store::path::Path::from(full))
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(list_prefix.as_ref())
            .try_collect()
            .await
            .map_err(self.remote("list", prefix))?;
        let mut out: Vec<ObjectMeta> = metas
            .into_iter()
            .map(|m| ObjectMeta {
                key: self.strip(&m.location),
                size: m.size,
                last_modified: meta_time(m.last_modified),
            })
            .filter(|m| m.key.starts_with(prefix))
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn describe(&self) -> String {
        if self.config.prefix.is_empty() {
            format!("s3://{}", self.config.bucket)
        } else {
            format!("s3://{}/{}", self.config.bucket, self.config.prefix)
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------------

/// Which store to open: parsed from a location string by [`StoreConfig::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// A local directory.
    Local(PathBuf),
    /// An S3 bucket.
    S3(S3Config),
}

impl StoreConfig {
    /// Parses a store location: an absolute path or `file:///abs/path` (local directory), or
    /// `s3://BUCKET[/PREFIX]`, whose endpoint and credentials come from `env` (a lookup such as
    /// `|k| std::env::var(k).ok()`):
    ///
    /// - `IRONLAB_S3_ENDPOINT` (else `AWS_ENDPOINT_URL`): the service URL; unset = AWS;
    /// - `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (required), `AWS_SESSION_TOKEN`;
    /// - `AWS_REGION` (else `AWS_DEFAULT_REGION`, else `us-east-1`).
    pub fn parse(location: &str, env: impl Fn(&str) -> Option<String>) -> Result<Self, StoreError> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/').to_owned();
            if bucket.is_empty() {
                return Err(StoreError::Config(format!(
                    "{location:?}: the bucket name is missing (expected s3://BUCKET[/PREFIX])"
                )));
            }
            let need = |k: &str| {
                env(k).filter(|v| !v.is_empty()).ok_or_else(|| {
                    StoreError::Config(format!(
                        "{location:?}: the environment variable {k} is not set"
                    ))
                })
            };
            return Ok(Self::S3(S3Config {
                bucket: bucket.to_owned(),
                prefix,
                endpoint: env("IRONLAB_S3_ENDPOINT")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .filter(|v| !v.is_empty()),
                region: env("AWS_REGION")
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "us-east-1".to_owned()),
                access_key_id: need("AWS_ACCESS_KEY_ID")?,
                secret_access_key: need("AWS_SECRET_ACCESS_KEY")?,
                session_token: env("AWS_SESSION_TOKEN").filter(|v| !v.is_empty()),
            }));
        }
        let path = location.strip_prefix("file://").unwrap_or(location);
        if !path.starts_with('/') {
            return Err(StoreError::Config(format!(
                "{location:?}: expected an absolute path, file:///PATH or s3://BUCKET[/PREFIX]"
            )));
        }
        Ok(Self::Local(PathBuf::from(path)))
    }

    /// Opens the store (the local directory is created if missing; S3 makes no request yet).
    pub fn open(&self) -> Result<Arc<dyn ObjectStore>, StoreError> {
        Ok(match self {
            Self::Local(path) => Arc::new(LocalStore::new(path)?),
            Self::S3(config) => Arc::new(S3Store::new(config.clone())?),
        })
    }
}

/// `StoreConfig::parse(location, process environment)?.open()`.
pub fn open_store(location: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
    StoreConfig::parse(location, |k| std::env::var(k).ok())?.open()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("chunks/ab/abcdef").is_ok());
        assert!(validate_key("manifests/x.json").is_ok());
        for bad in [
            "", "/a", "a/", "a//b", "../a", "a/../b", ".hidden", "a b", "a/.tmp",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn locations_parse() {
        let env = |k: &str| match k {
            "AWS_ACCESS_KEY_ID" => Some("id".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".to_owned()),
            "IRONLAB_S3_ENDPOINT" => Some("http://127.0.0.1:9000".to_owned()),
            _ => None,
        };
        assert_eq!(
            StoreConfig::parse("/var/lib/x", env).ok(),
            Some(StoreConfig::Local("/var/lib/x".into()))
        );
        assert_eq!(
            StoreConfig::parse("file:///var/lib/x", env).ok(),
            Some(StoreConfig::Local("/var/lib/x".into()))
        );
        let Ok(StoreConfig::S3(c)) = StoreConfig::parse("s3://bkt/snap/shots/", env) else {
            panic!("s3 location refused");
        };
        assert_eq!(c.bucket, "bkt");
        assert_eq!(c.prefix, "snap/shots");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(c.region, "us-east-1");
        assert!(!format!("{c:?}").contains("secret\""));

        let err = StoreConfig::parse("relative/dir", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute path"), "{err}");
        let err = StoreConfig::parse("s3://", env).unwrap_err().to_string();
        assert!(err.contains("bucket name is missing"), "{err}");
        let err = StoreConfig::parse("s3://b", |_| None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    }
}
