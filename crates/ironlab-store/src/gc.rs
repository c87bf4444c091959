//! `gc`: removes manifests nobody keeps and chunks no kept manifest references.
//!
//! The rule (safe while uploads run, on one or many hosts):
//! 1. A manifest is kept when it is live (the caller's list) or younger than `grace` (an
//!    upload that just finished may not be recorded as live yet). Others are deleted.
//! 2. GC then takes its lock marker and lists upload markers (see [`crate::locks`]). Uploads
//!    that start from then on wait; GC waits up to `wait_for_uploads` (60 s) for the running
//!    ones to finish. If live uploads remain, no chunk is deleted this round
//!    (`deferred_by_uploads` in the report): an upload may be about to reference any chunk it
//!    found in the store.
//! 3. Otherwise manifests are listed again (under the lock, so every finished upload's
//!    manifest is seen), and every chunk no kept manifest references is deleted. This is how
//!    the chunks of a killed upload go: its marker goes stale after `lock_stale_after` and is
//!    removed, and its chunks are referenced by nothing.
//! 4. Temporary files of interrupted local writes older than `grace` are removed.
//!
//! A kept manifest that cannot be read or parsed stops the GC before it deletes any chunk.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt as _, TryStreamExt as _};

use crate::SnapshotError;
use crate::locks::{self, Lock, LockKind};
use crate::manifest::{ChunkHash, DriveManifest};
use crate::restore::read_manifest;
use crate::store::{ObjectMeta, ObjectStore};

/// How [`gc`] works.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Manifests younger than this are kept even when not live (default 1 h).
    pub grace: Duration,
    /// Lock markers older than this are a dead process's (default 10 min).
    pub lock_stale_after: Duration,
    /// The time to judge ages against (default: now). Tests move it forward.
    pub now: Option<SystemTime>,
    /// Deletions in flight at once (default 16).
    pub parallelism: usize,
    /// How long to wait for running uploads to finish before deferring chunk deletion to a
    /// later round (default 60 s). Uploads that start meanwhile wait for the GC.
    pub wait_for_uploads: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            lock_stale_after: locks::STALE_AFTER,
            now: None,
            parallelism: 16,
            wait_for_uploads: Duration::from_secs(60),
        }
    }
}

/// What a GC did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests kept (live or young).
    pub manifests_kept: usize,
    /// Manifests deleted.
    pub manifests_deleted: usize,
    /// Live ids that have no manifest in the store (a snapshot was lost: worth an alarm).
    pub live_missing: Vec<String>,
    /// Chunks kept (referenced).
    pub chunks_kept: usize,
    /// Chunks deleted.
    pub chunks_deleted: usize,
    /// Stored bytes freed by deleted chunks.
    pub bytes_deleted: u64,
    /// Markers of dead uploads removed.
    pub stale_locks_removed: usize,
    /// True when live uploads ran, so no chunk was deleted this round.
    pub deferred_by_uploads: bool,
    /// Temporary files of interrupted writes removed (local store only).
    pub temp_files_removed: u64,
}

/// Collects garbage in `store`, keeping the manifests in `live` (and their chunks). See the
/// module docs for the rule.
pub async fn gc(
    store: &Arc<dyn ObjectStore>,
    live: &[String],
    opts: &GcOptions,
) -> Result<GcReport, SnapshotError> {
    locks::check_stale_after(opts.lock_stale_after)?;
    let now = opts.now.unwrap_or_else(SystemTime::now);
    let live: HashSet<&str> = live.iter().map(String::as_str).collect();
    let mut report = GcReport::default();
    let young = |m: &ObjectMeta| {
        now.duration_since(m.last_modified)
            .map(|age| age < opts.grace)
            .unwrap_or(true)
    };

    // 1. Manifests.
    let listed = store.list("manifests/").await?;
    let mut present = HashSet::new();
    for m in &listed {
        let Some(id) = DriveManifest::id_from_key(&m.key) else {
            continue;
        };
        present.insert(id.to_owned());
        if !live.contains(id) && !young(m) {
            store.delete(&m.key).await?;
            report.manifests_deleted += 1;
        }
    }
    report.live_missing = live
        .iter()
        .filter(|id| !present.contains(**id))
        .map(|id| (*id).to_owned())
        .collect();
    report.live_missing.sort();

    // 2. Exclusion with uploads.
    let lock = Lock::acquire(store, LockKind::Gc).await?;
    // Uploads that start now see the marker and wait, so running ones drain.
    let waiting = std::time::Instant::now();
    let uploads = loop {
        let (uploads, stale) = locks::list_locks(
            store.as_ref(),
            LockKind::Upload,
            now + waiting.elapsed(),
            opts.lock_stale_after,
        )
        .await?;
        for m in &stale {
            store.delete(&m.key).await?;
        }
        report.stale_locks_removed += stale.len();
        if uploads.is_empty() || waiting.elapsed() >= opts.wait_for_uploads {
            break uploads;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // 3. Referenced chunks (manifests listed again, under the lock).
    let mut referenced: HashSet<ChunkHash> = HashSet::new();
    for m in store.list("manifests/").await? {
        let Some(id) = DriveManifest::id_from_key(&m.key) else {
            continue;
        };
        if live.contains(id) || young(&m) {
            let manifest = read_manifest(store.as_ref(), id).await?;
            referenced.extend(manifest.chunks.iter().map(|c| c.hash));
            report.manifests_kept += 1;
        }
    }
    let chunks = store.list("chunks/").await?;
    let listed_chunks = chunks.len();
    let garbage: Vec<ObjectMeta> = chunks
        .into_iter()
        .filter(|m| {
            // Keys that are not chunk keys are left alone.
            ChunkHash::from_key(&m.key).is_some_and(|h| !referenced.contains(&h))
        })
        .collect();
    report.chunks_kept = listed_chunks - garbage.len();
    if !uploads.is_empty() {
        report.deferred_by_uploads = true;
        lock.release().await?;
        return Ok(report);
    }

    let parallelism = opts.parallelism.max(1);
    for batch in garbage.chunks(256) {
        if !lock.is_fresh(opts.lock_stale_after / 2) {
            return Err(SnapshotError::LockLost {
                key: lock.key().to_owned(),
            });
        }
        let results: Vec<u64> = futures::stream::iter(batch)
            .map(|m| async move {
                store.delete(&m.key).await?;
                Ok::<u64, SnapshotError>(m.size)
            })
            .buffer_unordered(parallelism)
            .try_collect()
            .await?;
        for n in results {
            report.bytes_deleted += n;
            report.chunks_deleted += 1;
        }
    }
    store.flush().await?;

    // 4. Temporary files.
    report.temp_files_removed = store
        .remove_stale_temp(
            now.checked_sub(opts.grace)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        )
        .await?;
    lock.release().await?;
    Ok(report)
}
