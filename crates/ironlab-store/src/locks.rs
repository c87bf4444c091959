//! Lock markers in the store that keep garbage collection and uploads apart.
//!
//! An upload holds `locks/upload-RANDOM.json`, a GC sweep holds `locks/gc-RANDOM.json`. Each
//! holder re-writes its marker every [`HEARTBEAT`]; a marker not written for `stale_after`
//! (default [`STALE_AFTER`]) belongs to a dead process and is ignored (and removed by GC).
//!
//! Exclusion (needs a store with read-after-write listing, as S3 and local directories have):
//! each side first writes its own marker, then lists the other side's. An upload that sees a
//! live GC marker removes its own and waits; a GC that sees a live upload marker deletes no
//! chunk in that round. Whichever wrote second sees the other, so a chunk is never deleted
//! while an upload that may reuse it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::store::{ObjectMeta, ObjectStore, StoreError};

/// How often a holder re-writes its marker.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A marker older than this is a dead holder's.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

/// Checks a `lock_stale_after` option: markers are re-written every [`HEARTBEAT`], so a live
/// holder's marker must not look stale between two writes.
pub fn check_stale_after(stale_after: Duration) -> Result<(), crate::SnapshotError> {
    if stale_after < HEARTBEAT * 4 {
        return Err(crate::SnapshotError::InvalidOption {
            field: "lock_stale_after",
            reason: format!(
                "{stale_after:?} is shorter than 4 heartbeats ({:?})",
                HEARTBEAT * 4
            ),
        });
    }
    Ok(())
}

/// The two kinds of marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// An upload in progress.
    Upload,
    /// A GC sweep in progress.
    Gc,
}

impl LockKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Upload => "locks/upload-",
            Self::Gc => "locks/gc-",
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A held marker. Dropping it stops the heartbeat and deletes the marker in the background;
/// [`Lock::release`] deletes it and waits.
#[derive(Debug)]
pub struct Lock {
    store: Arc<dyn ObjectStore>,
    key: String,
    heartbeat: tokio::task::JoinHandle<()>,
    last_written_ms: Arc<AtomicU64>,
    released: bool,
}

impl Lock {
    /// Writes a new marker of `kind` and starts its heartbeat.
    pub async fn acquire(store: &Arc<dyn ObjectStore>, kind: LockKind) -> Result<Self, StoreError> {
        let key = format!("{}{:016x}.json", kind.prefix(), rand::random::<u64>());
        let body = Bytes::from(
            serde_json::json!({
                "started_at_ms": unix_ms(SystemTime::now()),
                "pid": std::process::id(),
            })
            .to_string(),
        );
        store.put(&key, body.clone()).await?;
        let last_written_ms = Arc::new(AtomicU64::new(unix_ms(SystemTime::now())));
        let heartbeat = {
            let store = Arc::clone(store);
            let key = key.clone();
            let last = Arc::clone(&last_written_ms);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    match store.put(&key, body.clone()).await {
                        Ok(()) => last.store(unix_ms(SystemTime::now()), Ordering::Relaxed),
                        Err(e) => tracing::warn!("cannot refresh lock marker {key}: {e}"),
                    }
                }
            })
        };
        Ok(Self {
            store: Arc::clone(store),
            key,
            heartbeat,
            last_written_ms,
            released: false,
        })
    }

    /// The marker's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the marker was written less than `within` ago (a holder whose marker may have
    /// gone stale must not act on what the lock protected).
    pub fn is_fresh(&self, within: Duration) -> bool {
        let last = self.last_written_ms.load(Ordering::Relaxed);
        unix_ms(SystemTime::now()).saturating_sub(last) < within.as_millis() as u64
    }

    /// Stops the heartbeat and deletes the marker.
    pub async fn release(mut self) -> Result<(), StoreError> {
        self.heartbeat.abort();
        self.released = true;
        self.store.delete(&self.key).await
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.heartbeat.abort();
        if !self.released
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let store = Arc::clone(&self.store);
            let key = std::mem::take(&mut self.key);
            rt.spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}

/// The markers of `kind`, split into (live, stale) as of `now`.
pub async fn list_locks(
    store: &dyn ObjectStore,
    kind: LockKind,
    now: SystemTime,
    stale_after: Duration,
) -> Result<(Vec<ObjectMeta>, Vec<ObjectMeta>), StoreError> {
    let all = store.list(kind.prefix()).await?;
    Ok(all.into_iter().partition(|m| {
        now.duration_since(m.last_modified)
            .map(|age| age < stale_after)
            // A marker newer than `now` (clock skew, or a test's `now`) is live.
            .unwrap_or(true)
    }))
}
