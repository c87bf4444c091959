//! `restore_drive`: a manifest → a sparse drive file, fetching only the chunks not already at
//! hand.
//!
//! The drive is built in a temporary file beside `dest` and renamed over it last, so `dest`
//! is either untouched or complete. With `have` (an older copy of the same drive, e.g. the
//! pool's file from before the snapshot), the temporary file starts as a reflink clone of it
//! when the file system can (else chunks are copied from it as needed); every chunk whose hash
//! matches is kept, the others are fetched. Every chunk, fetched or reused, is checked against
//! its BLAKE3 hash before use.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::manifest::{ChunkHash, DriveManifest};
use crate::sparse;
use crate::store::{ObjectStore, StoreError};
use crate::{Progress, ProgressFn, SnapshotError};

/// How [`restore_drive`] works.
#[derive(Clone, Default)]
pub struct RestoreOptions {
    /// An older local copy of the drive to take matching chunks from.
    pub have: Option<PathBuf>,
    /// Chunks fetched at once (0 = the default, 4).
    pub parallelism: usize,
    /// Called as chunks complete; `total` is the manifest's data bytes.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for RestoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreOptions")
            .field("have", &self.have)
            .field("parallelism", &self.parallelism)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// The manifest restored.
    pub manifest: DriveManifest,
    /// Chunks fetched from the store.
    pub chunks_fetched: usize,
    /// Bytes fetched (stored, i.e. compressed, size).
    pub bytes_fetched: u64,
    /// Chunks taken from `have` (or repeated within the drive) instead of fetched.
    pub chunks_reused: usize,
    /// Whether the result started as a reflink clone of `have`.
    pub reflinked: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// Reads and checks manifest `id` from the store.
pub async fn read_manifest(
    store: &dyn ObjectStore,
    id: &str,
) -> Result<DriveManifest, SnapshotError> {
    if !crate::manifest::valid_id(id) {
        return Err(SnapshotError::InvalidOption {
            field: "manifest_id",
            reason: format!("{id:?} is not a manifest id (64 lowercase hex digits)"),
        });
    }
    let bytes = match store.get(&DriveManifest::key_of(id)).await {
        Ok(b) => b,
        Err(StoreError::NotFound { store, .. }) => {
            return Err(SnapshotError::ManifestNotFound {
                id: id.to_owned(),
                store,
            });
        }
        Err(e) => return Err(e.into()),
    };
    Ok(DriveManifest::from_json(id, &bytes)?)
}

/// Removes the temporary file unless disarmed.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Plan {
    /// Already right in the temporary file.
    Keep,
    /// Copy from `have` at this offset (hash checked there).
    FromHave(u64),
    /// Fetch from the store.
    Fetch,
}

/// Restores manifest `manifest_id` to `dest` (see the module docs). On any error `dest` is
/// left as it was and no temporary file remains. A corrupt chunk fails with
/// [`SnapshotError::CorruptChunk`] naming it.
pub async fn restore_drive(
    store: &Arc<dyn ObjectStore>,
    manifest_id: &str,
    dest: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreReport, SnapshotError> {
    let started = Instant::now();
    let manifest = Arc::new(read_manifest(store.as_ref(), manifest_id).await?);
    let io = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: std::io::Error| SnapshotError::Io { op, path, source }
    };
    let name = dest
        .file_name()
        .ok_or_else(|| SnapshotError::InvalidOption {
            field: "dest",
            reason: format!("{} has no file name", dest.display()),
        })?
        .to_string_lossy()
        .into_owned();
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp_path = dir.join(format!(".{name}.restore-{:016x}", rand::random::<u64>()));
    let mut guard = TempGuard(Some(tmp_path.clone()));
    let tmp = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(io("create", &tmp_path))?;

    let have = match &opts.have {
        Some(p) => match File::open(p) {
            Ok(f) => Some((f, p.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("open", p)(e)),
        },
        None => None,
    };
    let reflinked = have
        .as_ref()
        .is_some_and(|(h, _)| sparse::reflink(h, &tmp).is_ok());
    tmp.set_len(manifest.size)
        .map_err(io("resize", &tmp_path))?;

    let tmp = Arc::new(tmp);
    let have_file = have.map(|(f, p)| (Arc::new(f), p));

    // Plan every chunk: keep, copy from `have`, or fetch. Reading what is at hand is local
    // and cheap next to fetching, so it is done first, on the blocking pool.
    let plan = {
        let manifest = Arc::clone(&manifest);
        let tmp = Arc::clone(&tmp);
        let have_file = have_file.clone();
        tokio::task::spawn_blocking(move || {
            plan_chunks(&manifest, &tmp, reflinked, have_file.as_ref())
        })
        .await
        .map_err(|e| SnapshotError::Io {
            op: "plan the restore of",
            path: dest.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|(op, path, source)| SnapshotError::Io { op, path, source })?
    };

    // Group by hash: each missing chunk is fetched once and written wherever it appears.
    let mut fetch: HashMap<ChunkHash, Vec<u64>> = HashMap::new();
    let mut copies: Vec<(u64, u64, ChunkHash)> = Vec::new();
    let mut reused = 0usize;
    for (c, p) in manifest.chunks.iter().zip(plan) {
        match p {
            Plan::Keep => reused += 1,
            Plan::FromHave(from) => copies.push((c.offset, from, c.hash)),
            Plan::Fetch => fetch.entry(c.hash).or_default().push(c.offset),
        }
    }
    reused += copies.len() + fetch.values().map(|v| v.len() - 1).sum::<usize>();
    let total = manifest.data_bytes();
    let done = Arc::new(AtomicU64::new(
        total
            - fetch
                .values()
                .flatten()
                .chain(copies.iter().map(|c| &c.0))
                .map(|o| manifest.chunk_len(*o))
                .sum::<u64>(),
    ));
    let report = |progress: &Option<ProgressFn>, n: u64| {
        let d = done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(p) = progress {
            p(Progress { done: d, total });
        }
    };
    report(&opts.progress, 0);

    if let Some((have, have_path)) = &have_file {
        for (offset, from, hash) in copies {
            let (have, tmp, m) = (Arc::clone(have), Arc::clone(&tmp), Arc::clone(&manifest));
            let have_path = have_path.clone();
            let tmp_path = tmp_path.clone();
            let len = m.chunk_len(offset) as usize;
            tokio::task::spawn_blocking(move || -> Result<(), SnapshotError> {
                let buf =
                    sparse::read_at(&have, from, len).map_err(|source| SnapshotError::Io {
                        op: "read",
                        path: have_path.clone(),
                        source,
                    })?;
                if ChunkHash::of(&buf) != hash {
                    return Err(SnapshotError::Io {
                        op: "reuse a chunk of",
                        path: have_path,
                        source: std::io::Error::other("the file changed during the restore"),
                    });
                }
                if reflinked {
                    sparse::punch_hole(&tmp, offset, len as u64).map_err(|source| {
                        SnapshotError::Io {
                            op: "write",
                            path: tmp_path.clone(),
                            source,
                        }
                    })?;
                }
                sparse::write_sparse(&tmp, offset, &buf).map_err(|source| SnapshotError::Io {
                    op: "write",
                    path: tmp_path,
                    source,
                })
            })
            .await
            .map_err(|e| SnapshotError::Io {
                op: "write",
                path: dest.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })??;
            report(&opts.progress, len as u64);
        }
    }

    let parallelism = if opts.parallelism == 0 {
        4
    } else {
        opts.parallelism
    };
    // The first error ends the restore (the fetches in flight are dropped).
    let results: Vec<u64> = futures::stream::iter(fetch)
        .map(|(hash, offsets)| {
            let store = Arc::clone(store);
            let tmp = Arc::clone(&tmp);
            let manifest = Arc::clone(&manifest);
            let tmp_path = tmp_path.clone();
            let progress = opts.progress.clone();
            let report = &report;
            async move {
                let key = hash.key();
                let first = offsets[0];
                let len = manifest.chunk_len(first) as usize;
                let obj = match store.get(&key).await {
                    Ok(o) => o,
                    Err(StoreError::NotFound { .. }) => {
                        return Err(SnapshotError::MissingChunk {
                            hash,
                            offset: first,
                            manifest: manifest.id.clone(),
                            store: store.describe(),
                        });
                    }
                    Err(e) => return Err(e.into()),
                };
                let fetched = obj.len() as u64;
                let m = Arc::clone(&manifest);
                let n_offsets = offsets.len() as u64;
                let tmp_path2 = tmp_path.clone();
                tokio::task::spawn_blocking(move || -> Result<(), SnapshotError> {
                    let tmp_path = tmp_path2;
                    let data =
                        crate::manifest::decode_chunk(&obj, &hash, len).map_err(|reason| {
                            SnapshotError::CorruptChunk {
                                hash,
                                offset: first,
                                manifest: m.id.clone(),
                                reason,
                            }
                        })?;
                    for &offset in &offsets {
                        let l = m.chunk_len(offset) as usize;
                        if reflinked {
                            sparse::punch_hole(&tmp, offset, l as u64).map_err(|source| {
                                SnapshotError::Io {
                                    op: "write",
                                    path: tmp_path.clone(),
                                    source,
                                }
                            })?;
                        }
                        sparse::write_sparse(&tmp, offset, &data[..l]).map_err(|source| {
                            SnapshotError::Io {
                                op: "write",
                                path: tmp_path.clone(),
                                source,
                            }
                        })?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| SnapshotError::Io {
                    op: "write",
                    path: tmp_path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??;
                report(&progress, len as u64 * n_offsets);
                Ok(fetched)
            }
        })
        .buffer_unordered(parallelism)
        .try_collect()
        .await?;
    let mut chunks_fetched = 0;
    let mut bytes_fetched = 0;
    for n in results {
        bytes_fetched += n;
        chunks_fetched += 1;
    }

    let tmp_for_sync = Arc::clone(&tmp);
    tokio::task::spawn_blocking(move || tmp_for_sync.sync_all())
        .await
        .map_err(|e| SnapshotError::Io {
            op: "fsync",
            path: tmp_path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(io("fsync", &tmp_path))?;
    std::fs::rename(&tmp_path, dest).map_err(io("rename into place", dest))?;
    guard.0 = None;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(RestoreReport {
        manifest: Arc::unwrap_or_clone(manifest),
        chunks_fetched,
        bytes_fetched,
        chunks_reused: reused,
        reflinked,
        elapsed: started.elapsed(),
    })
}

type PlanError = (&'static str, PathBuf, std::io::Error);

/// Decides, per manifest chunk, where its bytes come from. Scans what is at hand once: in a
/// reflinked temporary file it punches out chunks that differ from the manifest; without a
/// reflink it copies the chunks of `have` that match at the same offset.
fn plan_chunks(
    manifest: &DriveManifest,
    tmp: &File,
    reflinked: bool,
    have: Option<&(Arc<File>, PathBuf)>,
) -> Result<Vec<Plan>, PlanError> {
    let cs = manifest.chunk_size;
    let wanted: HashMap<u64, ChunkHash> =
        manifest.chunks.iter().map(|c| (c.offset, c.hash)).collect();
    // Offsets whose chunk is already right in the temporary file (kept from the reflink, or
    // copied from `have` while scanning it).
    let mut in_place: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut by_hash: HashMap<ChunkHash, u64> = HashMap::new();
    if let Some((have, have_path)) = have {
        let src: &File = if reflinked { tmp } else { have };
        let have_size = have
            .metadata()
            .map_err(|e| ("stat", have_path.clone(), e))?
            .len();
        let size = if reflinked { manifest.size } else { have_size };
        let ranges = sparse::data_ranges(src, size).map_err(|e| ("read", have_path.clone(), e))?;
        for index in sparse::data_chunks(&ranges, cs) {
            let offset = index * cs;
            let len = cs.min(size - offset) as usize;
            let buf =
                sparse::read_at(src, offset, len).map_err(|e| ("read", have_path.clone(), e))?;
            if sparse::is_zero(&buf) {
                continue;
            }
            let h = ChunkHash::of(&buf);
            // Equal hashes mean equal bytes, hence equal lengths.
            let matches = wanted.get(&offset) == Some(&h);
            if reflinked && !matches {
                // Stale data where the manifest has zeros or other data.
                sparse::punch_hole(tmp, offset, len as u64)
                    .map_err(|e| ("write", have_path.clone(), e))?;
            }
            if !reflinked && matches {
                // Read and checked already: write it now rather than read it again later.
                sparse::write_sparse(tmp, offset, &buf)
                    .map_err(|e| ("write", have_path.clone(), e))?;
            }
            if matches {
                in_place.insert(offset);
            }
            if offset < have_size && len as u64 == cs.min(have_size - offset) {
                by_hash.entry(h).or_insert(offset);
            }
        }
    }
    Ok(manifest
        .chunks
        .iter()
        .map(|c| {
            if in_place.contains(&c.offset) {
                Plan::Keep
            } else if let Some(&from) = by_hash.get(&c.hash)
                && manifest.chunk_len(from) == manifest.chunk_len(c.offset)
            {
                Plan::FromHave(from)
            } else {
                Plan::Fetch
            }
        })
        .collect())
}
