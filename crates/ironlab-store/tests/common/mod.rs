//! Fixtures for the store tests: a real S3 server (`s3s-fs`) on 127.0.0.1, a byte-counting
//! store wrapper, and ext4 drive images made with `mkfs.ext4` and `debugfs` (no root needed).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Read as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use ironlab_store::{LocalStore, ObjectMeta, ObjectStore, S3Config, S3Store, StoreError};

pub const BUCKET: &str = "snapshots";
pub const PREFIX: &str = "test/prefix";
pub const ACCESS_KEY: &str = "ironlab-test";
pub const SECRET_KEY: &str = "ironlab-test-secret";

/// The `s3s-fs` binary: `IRONLAB_S3S_FS`, else on PATH, else `~/.cargo/bin/s3s-fs`.
pub fn s3s_fs_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("IRONLAB_S3S_FS") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let c = dir.join("s3s-fs");
        if c.is_file() {
            return Some(c);
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let c = home.join(".cargo/bin/s3s-fs");
    c.is_file().then_some(c)
}

/// A running `s3s-fs` on a free 127.0.0.1 port, with bucket [`BUCKET`]; killed on drop.
pub struct S3Server {
    child: Child,
    pub root: tempfile::TempDir,
    pub endpoint: String,
}

impl S3Server {
    /// Starts the server, or `None` (with a message) when `s3s-fs` is not installed and
    /// `IRONLAB_E2E_REQUIRED` is not set.
    pub fn start() -> Result<Option<Self>> {
        let Some(bin) = s3s_fs_binary() else {
            if std::env::var_os("IRONLAB_E2E_REQUIRED").is_some() {
                bail!("s3s-fs is not installed (scripts/setup.sh installs it)");
            }
            eprintln!("SKIP: s3s-fs not installed (cargo install s3s-fs --features binary)");
            return Ok(None);
        };
        let root = tempfile::tempdir()?;
        std::fs::create_dir(root.path().join(BUCKET))?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = Self {
            child,
            root,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Some(server));
            }
            if let Some(status) = server.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("s3s-fs exited with {status}: {err}");
            }
            if Instant::now() > deadline {
                bail!("s3s-fs did not listen on port {port} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn config(&self) -> S3Config {
        S3Config {
            bucket: BUCKET.into(),
            prefix: PREFIX.into(),
            endpoint: Some(self.endpoint.clone()),
            region: "us-east-1".into(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            session_token: None,
        }
    }

    pub fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        Ok(Arc::new(S3Store::new(self.config())?))
    }

    /// Where the server keeps the object `key` of the store.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(PREFIX).join(key)
    }

    /// Environment that makes `open_store(&self.location())` reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("IRONLAB_S3_ENDPOINT", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    pub fn location(&self) -> String {
        format!("s3://{BUCKET}/{PREFIX}")
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One backend under test, with what the tests need to reach behind the store's back.
pub enum Backend {
    Local(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    pub fn local() -> Result<Self> {
        Ok(Self::Local(tempfile::tempdir()?))
    }

    pub fn s3() -> Result<Option<Self>> {
        Ok(S3Server::start()?.map(Self::S3))
    }

    pub fn store(&self) -> Result<Arc<dyn ObjectStore>> {
        match self {
            Self::Local(dir) => Ok(Arc::new(LocalStore::new(dir.path())?)),
            Self::S3(s) => s.store(),
        }
    }

    /// The file that holds `key` (the local store's file, or s3s-fs's file for it).
    pub fn object_file(&self, key: &str) -> PathBuf {
        match self {
            Self::Local(dir) => dir.path().join(key),
            Self::S3(s) => s.object_file(key),
        }
    }

    /// `open_store` location + environment for a child process.
    pub fn location(&self) -> (String, Vec<(&'static str, String)>) {
        match self {
            Self::Local(dir) => (dir.path().display().to_string(), vec![]),
            Self::S3(s) => (s.location(), s.env()),
        }
    }
}

/// A store wrapper that counts what is written through it.
#[derive(Debug)]
pub struct Counting {
    pub inner: Arc<dyn ObjectStore>,
    pub put_bytes: AtomicU64,
    pub chunk_puts: AtomicU64,
    pub chunk_put_bytes: AtomicU64,
}

impl Counting {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            put_bytes: 0.into(),
            chunk_puts: 0.into(),
            chunk_put_bytes: 0.into(),
        })
    }
}

#[async_trait]
impl ObjectStore for Counting {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.put_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if key.starts_with("chunks/") {
            self.chunk_puts.fetch_add(1, Ordering::Relaxed);
            self.chunk_put_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        self.inner.get(key).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StoreError> {
        self.inner.head(key).await
    }
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.inner.delete(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(prefix).await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
    async fn remove_stale_temp(&self, older_than: SystemTime) -> Result<u64, StoreError> {
        self.inner.remove_stale_temp(older_than).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from(name)
}

/// A sparse file of `size_mib` MiB with an empty ext4 file system.
pub fn make_ext4(path: &Path, size_mib: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size_mib << 20)?;
    drop(f);
    run(Command::new(tool("mkfs.ext4"))
        .args(["-q", "-F", "-b", "4096", "-L", "test"])
        .arg(path))
}

/// Writes `data` as the file `/name` into the ext4 image (debugfs, no mount).
pub fn ext4_write(image: &Path, name: &str, data: &[u8]) -> Result<()> {
    let src = tempfile::NamedTempFile::new()?;
    std::fs::write(src.path(), data)?;
    run(Command::new(tool("debugfs"))
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} {name}", src.path().display()))
        .arg(image))
}

/// `len` random bytes.
pub fn random_bytes(len: usize) -> Vec<u8> {
    // BLAKE3's extendable output: random-looking and fast even in debug test builds.
    let mut v = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&rand::random::<[u8; 16]>());
    h.finalize_xof().fill(&mut v);
    v
}

/// `len` bytes of compressible text.
pub fn text_bytes(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut i = 0u64;
    while v.len() < len {
        v.extend_from_slice(
            format!("line {i}: the quick brown fox jumps over the lazy dog\n").as_bytes(),
        );
        i += 1;
    }
    v.truncate(len);
    v
}

/// BLAKE3 of a whole file (to compare drives).
pub fn file_hash(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Bytes actually allocated to a file.
pub fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Every key under `prefix` in the store.
pub async fn keys(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<String>> {
    Ok(store
        .list(prefix)
        .await?
        .into_iter()
        .map(|m| m.key)
        .collect())
}
