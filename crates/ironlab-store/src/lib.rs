//! ironlab's snapshot store: drives of stopped runs, off the host.
//!
//! A drive file is cut into fixed-size chunks (1 MiB by default); holes and all-zero chunks
//! are skipped, every other chunk is stored once under its BLAKE3 hash (zstd-compressed when
//! that helps), and a manifest lists the chunks. Uploads send only the chunks the store lacks;
//! restores fetch only the chunks not already at hand and check every chunk's hash.
//!
//! # Using it (the worker's stop / restore path)
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use ironlab_store::{gc, open_store, restore_drive, upload_drive, GcOptions, RestoreOptions, UploadOptions};
//!
//! // A directory of its own, or "s3://bucket/prefix" (endpoint and keys from
//! // IRONLAB_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
//! let store = open_store("/var/lib/ironlab/objects/snapshots")?;
//!
//! // Stop: snapshot a drive (the machine is stopped, the file does not change meanwhile).
//! let up = upload_drive(&store, Path::new("runs/r1/m1/root.ext4"), &UploadOptions::default()).await?;
//! let id: String = up.manifest.id; // record it (e.g. in SQL) as live for this run/machine
//!
//! // Restore on any host; `have` (an older copy of the drive) saves fetching what matches.
//! let opts = RestoreOptions { have: Some("runs/r1/m1/root.ext4".into()), ..Default::default() };
//! restore_drive(&store, &id, Path::new("runs/r1/m1/root.ext4"), &opts).await?;
//!
//! // Now and then: everything not reachable from the live manifests goes.
//! let report = gc(&store, &[id], &GcOptions::default()).await?;
//! # let _ = report; Ok(()) }
//! ```
//!
//! Contracts worth knowing:
//! - Manifest ids are content hashes: uploading an unchanged drive again gives the same id.
//! - A manifest is written only after all its chunks are stored and flushed; a crashed or
//!   dropped upload leaves no manifest, and its chunks are collected by `gc` once its lock
//!   marker is stale (10 min).
//! - `restore_drive` writes `dest` by renaming a complete, fsynced temporary file over it:
//!   `dest` is either untouched or whole. A corrupt or missing chunk fails it with an error
//!   naming the chunk, its offset and the manifest ([`SnapshotError::CorruptChunk`],
//!   [`SnapshotError::MissingChunk`]).
//! - `have` can be any older version of the drive at the same offsets: the run's own old copy,
//!   or, when that is gone, the image drive it was grown from (`tests/snapshots.rs`:
//!   `restore_from_the_image_drive_fetches_only_what_the_run_changed`). With a reflink-capable
//!   file system the result shares `have`'s blocks for every unchanged chunk.
//! - `gc` keeps the live manifests and any manifest younger than its grace period (1 h):
//!   record a new manifest as live within that hour. It never deletes a chunk while an upload
//!   runs (lock markers in the store, see [`locks`]); the format is in [`manifest`].
//!
//! - Give the snapshot store a directory or S3 prefix of its own: `gc` deletes every chunk that
//!   no kept manifest of *this* store references.
//!
//! Store layout: `chunks/HH/HASH`, `manifests/ID.json`, `locks/{upload,gc}-RANDOM.json`.

pub mod gc;
pub mod locks;
pub mod manifest;
pub mod restore;
pub mod sparse;
pub mod store;
pub mod upload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use gc::{GcOptions, GcReport, gc};
pub use manifest::{ChunkHash, ChunkRef, DriveManifest, ManifestError};
pub use restore::{RestoreOptions, RestoreReport, read_manifest, restore_drive};
pub use store::{
    LocalStore, ObjectMeta, ObjectStore, S3Config, S3Store, StoreConfig, StoreError, open_store,
};
pub use upload::{UploadOptions, UploadReport, upload_drive};

/// Progress of an upload or restore, in bytes of drive data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in all.
    pub total: u64,
}

/// A progress callback. It runs on the operation's task: keep it quick.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The object store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local file operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A manifest is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// No manifest with this id.
    #[error("{store}: no manifest {id}")]
    ManifestNotFound {
        /// The id asked for.
        id: String,
        /// The store.
        store: String,
    },
    /// A stored chunk failed its check; it was not used.
    #[error(
        "chunk {hash} (at offset {offset} of manifest {manifest}) is corrupt: {reason}; it was not used"
    )]
    CorruptChunk {
        /// The chunk's hash (its key is `chunks/HH/HASH`).
        hash: ChunkHash,
        /// Its (first) offset in the drive.
        offset: u64,
        /// The manifest being restored.
        manifest: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A chunk a manifest references is not in the store.
    #[error("{store}: chunk {hash} (at offset {offset} of manifest {manifest}) is missing")]
    MissingChunk {
        /// The chunk's hash.
        hash: ChunkHash,
        /// Its (first) offset in the drive.
        offset: u64,
        /// The manifest being restored.
        manifest: String,
        /// The store.
        store: String,
    },
    /// An option is out of range.
    #[error("invalid {field}: {reason}")]
    InvalidOption {
        /// The option.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A GC sweep held the store for too long.
    #[error("a garbage collection ({marker}) has been running for {waited:?}; try again later")]
    GcBusy {
        /// How long the upload waited.
        waited: Duration,
        /// The GC's lock marker.
        marker: String,
    },
    /// This process could not refresh its lock marker in time, so another process may have
    /// considered it dead; the operation was stopped before acting on the lock.
    #[error("lost the store lock {key} (its marker could not be refreshed in time); try again")]
    LockLost {
        /// The marker's key.
        key: String,
    },
}
