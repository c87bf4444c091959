//! `upload_drive`: a drive file → chunks in the store + a manifest.
//!
//! One task drives the upload; per chunk, reading, hashing and compressing run on tokio's
//! blocking pool, and at most `parallelism` chunks are in flight (read → exists? → put).

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::locks::{self, Lock, LockKind};
use crate::manifest::{self, ChunkHash, ChunkRef, DriveManifest};
use crate::sparse;
use crate::store::ObjectStore;
use crate::{Progress, ProgressFn, SnapshotError};

/// How [`upload_drive`] works. `Default` is what production uses.
#[derive(Clone)]
pub struct UploadOptions {
    /// Chunk size in bytes: a power of two from 64 KiB to 64 MiB (default 1 MiB).
    pub chunk_size: u64,
    /// Chunks in flight at once (default 4).
    pub parallelism: usize,
    /// zstd level for chunks (default `Some(1)`); `None` stores chunks plain.
    pub zstd_level: Option<i32>,
    /// Called after each chunk with the bytes done so far; `total` is the data (non-hole)
    /// bytes of the drive.
    pub progress: Option<ProgressFn>,
    /// How long to wait for a running GC sweep to finish before giving up (default 11 min:
    /// longer than a dead GC's marker takes to go stale).
    pub gc_wait: Duration,
    /// Lock markers older than this are a dead process's (default 10 min; keep it equal to
    /// [`crate::GcOptions::lock_stale_after`]).
    pub lock_stale_after: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            chunk_size: manifest::DEFAULT_CHUNK_SIZE,
            parallelism: 4,
            zstd_level: Some(1),
            progress: None,
            gc_wait: locks::STALE_AFTER + Duration::from_secs(60),
            lock_stale_after: locks::STALE_AFTER,
        }
    }
}

impl std::fmt::Debug for UploadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadOptions")
            .field("chunk_size", &self.chunk_size)
            .field("parallelism", &self.parallelism)
            .field("zstd_level", &self.zstd_level)
            .field("progress", &self.progress.is_some())
            .finish_non_exhaustive()
    }
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct UploadReport {
    /// The manifest written (its `id` is what to keep).
    pub manifest: DriveManifest,
    /// Data chunks in the drive (holes and zero chunks excluded).
    pub chunks: usize,
    /// Chunks written to the store (the others were there already).
    pub chunks_uploaded: usize,
    /// Bytes read from the drive (its data ranges).
    pub bytes_read: u64,
    /// Bytes written to the store for chunks (after compression), manifest excluded.
    pub bytes_uploaded: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// A chunk's outcome: `None` when it is all zeros, else the chunk and the bytes uploaded for
/// it (`None` when the store had it).
type ChunkOutcome = Option<(ChunkRef, Option<u64>)>;

struct Shared {
    /// Hashes already handled by this upload (a repeated chunk is uploaded once).
    seen: Mutex<HashSet<ChunkHash>>,
    done: std::sync::atomic::AtomicU64,
}

/// Snapshots the drive file at `path` into `store`: reads it chunk by chunk, skipping holes
/// (SEEK_DATA/SEEK_HOLE) and all-zero chunks, uploads the chunks the store lacks, then writes
/// the manifest (after every chunk is stored and flushed). The file must not change during
/// the upload (the drive's machine is stopped). Dropping the future abandons the upload:
/// no manifest is written, the chunks already stored are collected by [`crate::gc`].
pub async fn upload_drive(
    store: &Arc<dyn ObjectStore>,
    path: &Path,
    opts: &UploadOptions,
) -> Result<UploadReport, SnapshotError> {
    let started = Instant::now();
    manifest::check_chunk_size(opts.chunk_size).map_err(|reason| SnapshotError::InvalidOption {
        field: "chunk_size",
        reason,
    })?;
    locks::check_stale_after(opts.lock_stale_after)?;
    if opts.parallelism == 0 {
        return Err(SnapshotError::InvalidOption {
            field: "parallelism",
            reason: "must be at least 1".into(),
        });
    }
    let io_err = |op: &'static str| {
        let path = path.to_owned();
        move |source: std::io::Error| SnapshotError::Io { op, path, source }
    };
    let file = File::open(path).map_err(io_err("open"))?;
    let md = file.metadata().map_err(io_err("stat"))?;
    if !md.is_file() {
        return Err(SnapshotError::Io {
            op: "snapshot",
            path: path.to_owned(),
            source: std::io::Error::other("not a regular file"),
        });
    }
    let size = md.len();
    let cs = opts.chunk_size;
    let ranges = sparse::data_ranges(&file, size).map_err(io_err("find the data ranges of"))?;
    let indexes = sparse::data_chunks(&ranges, cs);
    let total: u64 = indexes.iter().map(|i| cs.min(size - i * cs)).sum();

    let lock = acquire_upload_lock(store, opts).await?;

    let file = Arc::new(file);
    let shared = Arc::new(Shared {
        seen: Mutex::new(HashSet::new()),
        done: 0.into(),
    });
    if let Some(p) = &opts.progress {
        p(Progress { done: 0, total });
    }
    // The first error ends the upload (the chunks in flight are dropped).
    let results: Vec<ChunkOutcome> = futures::stream::iter(indexes.iter().copied())
        .map(|index| {
            let file = Arc::clone(&file);
            let shared = Arc::clone(&shared);
            let store = Arc::clone(store);
            let path = path.to_owned();
            let level = opts.zstd_level;
            let progress = opts.progress.clone();
            async move {
                let offset = index * cs;
                let len = cs.min(size - offset) as usize;
                let r = upload_chunk(&store, file, &path, offset, len, level, &shared).await;
                let done = shared
                    .done
                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed)
                    + len as u64;
                if let Some(p) = &progress {
                    p(Progress { done, total });
                }
                r
            }
        })
        .buffer_unordered(opts.parallelism)
        .try_collect()
        .await?;

    let mut chunks = Vec::with_capacity(results.len());
    let mut uploaded = 0usize;
    let mut bytes_uploaded = 0u64;
    for (c, up) in results.into_iter().flatten() {
        chunks.push(c);
        if let Some(n) = up {
            uploaded += 1;
            bytes_uploaded += n;
        }
    }
    chunks.sort_by_key(|c| c.offset);
    store.flush().await?;
    if !lock.is_fresh(opts.lock_stale_after / 2) {
        return Err(SnapshotError::LockLost {
            key: lock.key().to_owned(),
        });
    }
    let manifest = DriveManifest::new(size, cs, chunks);
    store.put(&manifest.key(), manifest.to_json()).await?;
    store.flush().await?;
    if let Err(e) = lock.release().await {
        tracing::warn!(
            "upload of {}: cannot remove its lock marker: {e}",
            path.display()
        );
    }
    Ok(UploadReport {
        chunks: manifest.chunks.len(),
        manifest,
        chunks_uploaded: uploaded,
        bytes_read: total,
        bytes_uploaded,
        elapsed: started.elapsed(),
    })
}

/// Takes an upload marker, waiting while a GC sweep runs.
async fn acquire_upload_lock(
    store: &Arc<dyn ObjectStore>,
    opts: &UploadOptions,
) -> Result<Lock, SnapshotError> {
    let started = Instant::now();
    loop {
        let lock = Lock::acquire(store, LockKind::Upload).await?;
        let (live, _) = locks::list_locks(
            store.as_ref(),
            LockKind::Gc,
            std::time::SystemTime::now(),
            opts.lock_stale_after,
        )
        .await?;
        if live.is_empty() {
            return Ok(lock);
        }
        lock.release().await?;
        if started.elapsed() >= opts.gc_wait {
            return Err(SnapshotError::GcBusy {
                waited: started.elapsed(),
                marker: live[0].key.clone(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads, hashes and (if the store lacks it) uploads one chunk. `None` for an all-zero chunk;
/// otherwise the chunk and the bytes uploaded (`None` when it was already stored).
async fn upload_chunk(
    store: &Arc<dyn ObjectStore>,
    file: Arc<File>,
    path: &Path,
    offset: u64,
    len: usize,
    level: Option<i32>,
    shared: &Shared,
) -> Result<ChunkOutcome, SnapshotError> {
    let read = tokio::task::spawn_blocking(move || {
        // One spare byte in front for the codec byte (see `manifest::encode_framed`).
        let mut framed = vec![0u8; len + 1];
        sparse::read_into(&file, offset, &mut framed[1..])?;
        if sparse::is_zero(&framed[1..]) {
            return Ok(None);
        }
        let hash = ChunkHash::of(&framed[1..]);
        Ok(Some((hash, framed)))
    })
    .await
    .map_err(|e| SnapshotError::Io {
        op: "read",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?
    .map_err(|source| SnapshotError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })?;
    let Some((hash, buf)) = read else {
        return Ok(None);
    };
    let chunk = ChunkRef { offset, hash };
    let first = shared
        .seen
        .lock()
        .map(|mut s| s.insert(hash))
        .unwrap_or(true);
    if !first {
        return Ok(Some((chunk, None)));
    }
    let key = hash.key();
    if store.head(&key).await?.is_some() {
        return Ok(Some((chunk, None)));
    }
    let obj = tokio::task::spawn_blocking(move || manifest::encode_framed(buf, level))
        .await
        .map_err(|e| SnapshotError::Io {
            op: "compress a chunk of",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    let n = obj.len() as u64;
    store.put(&key, obj).await?;
    Ok(Some((chunk, Some(n))))
}
