//! Off-host snapshots of stopped runs: the lifecycle's use of `ironlab-store`.
//!
//! - **Upload on stop.** A run is `stopped` as soon as its machines are down; then, in the
//!   background, each machine's drive is uploaded to the snapshot store (only the chunks the
//!   store lacks). A restart or destroy cancels the upload (a dropped upload leaves no
//!   manifest). A failed upload is tried again every [`RETRY_AFTER`] while the run is stopped;
//!   the worker's recovery resumes uploads that were not finished.
//! - **Records.** When every drive is uploaded, the manifests are written (temp + fsync +
//!   rename) to the worker's snapshot index `WORKER_DIR/snapshots/<run>.json` (outside the
//!   pool, with the run's plan and image environments, so it survives a wiped pool or run
//!   directory), then the same record to `pool/runs/<run>/snapshot.json`: "the drives as they
//!   are now are in the store". A restart removes the latter (the drives are about to change)
//!   but keeps the index entry, the last complete snapshot.
//! - **Restore.** When a stopped run is restarted and a drive is missing from the pool, it is
//!   restored (sparse, verified) from the index entry's manifest. A run in the index whose run
//!   directory is gone is recreated at worker start as a stopped run with no drives: restarting
//!   it restores them.
//! - **GC.** The manifests of the index are the live set; destroying a run removes its index
//!   entry and runs [`ironlab_store::gc`] in the background (not at worker start: a killed
//!   upload's lock marker, live for 10 min, would make it wait and hold uploads back).
//!   Uploads and GC of this worker are serialised by a lock (uploads shared, GC exclusive), so
//!   a fresh manifest is always in the index before a GC of this worker looks; the store's own
//!   lock markers protect against other processes. The store must be this worker's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ironlab_api::worker::{ObservedState, RunPlan, SnapshotState, SnapshotStatus};
use ironlab_store::{GcOptions, ObjectStore, RestoreOptions, UploadOptions};
use serde::{Deserialize, Serialize};

use super::lifecycle::{crash_point, fsync_dir, write_durable};

/// A failed upload is tried again after this long (while the run stays stopped).
pub const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Where the snapshot store is and how it is collected.
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// The store: an absolute path, `file:///path` or `s3://BUCKET[/PREFIX]` (endpoint and
    /// credentials from the environment, see `ironlab_store::StoreConfig`).
    pub location: String,
    /// GC keeps manifests younger than this even when no run names them (default 1 h).
    pub gc_grace: Duration,
}

impl SnapshotConfig {
    /// The default store of a worker: `WORKER_DIR/objects/snapshots`.
    pub fn default_location(worker_dir: &Path) -> String {
        worker_dir
            .join("objects/snapshots")
            .to_string_lossy()
            .into_owned()
    }
}

/// One machine's drive in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSnapshot {
    /// The drive's manifest id in the store.
    pub manifest: String,
    /// The image environment (`image-env.json`), so a restore needs no run directory.
    #[serde(default)]
    pub image_env: Vec<String>,
    /// The image (or saved) drive the machine's drive grew from, when known: a restore takes
    /// the chunks it shares from there (reflinked) instead of fetching them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
}

/// A run's last complete snapshot (`snapshots/<run>.json` and `runs/<run>/snapshot.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The run.
    pub run_id: String,
    /// Its plan (to recreate the run when its directory is gone).
    pub plan: RunPlan,
    /// Per machine.
    pub machines: BTreeMap<String, MachineSnapshot>,
    /// Bytes the upload sent.
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// When the upload finished (RFC 3339).
    pub uploaded_at: String,
}

impl SnapshotRecord {
    /// The status reported for a run whose drives match this record.
    pub fn status(&self) -> SnapshotStatus {
        SnapshotStatus {
            state: SnapshotState::Uploaded,
            manifests: self
                .machines
                .iter()
                .map(|(k, v)| (k.clone(), v.manifest.clone()))
                .collect(),
            bytes_uploaded: self.bytes_uploaded,
            error: None,
        }
    }
}

/// The worker's snapshot store and index.
pub struct Snapshots {
    store: Arc<dyn ObjectStore>,
    location: String,
    index: PathBuf,
    gc_grace: Duration,
    /// Uploads (until their manifests are in the index) hold it shared, GC exclusively.
    gc_lock: tokio::sync::RwLock<()>,
}

/// The run directory's record name.
pub const RUN_RECORD: &str = "snapshot.json";
/// `<machine>/base-drive`: the path of the image drive the machine's drive grew from.
pub const BASE_DRIVE: &str = "base-drive";

impl Snapshots {
    /// Opens the store at `config.location`; the index lives in `index_dir`.
    pub fn open(config: &SnapshotConfig, index_dir: PathBuf) -> anyhow::Result<Arc<Self>> {
        let store = ironlab_store::open_store(&config.location)
            .with_context(|| format!("cannot open the snapshot store {}", config.location))?;
        fs_err::create_dir_all(&index_dir)?;
        Ok(Arc::new(Self {
            store,
            location: config.location.clone(),
            index: index_dir,
            gc_grace: config.gc_grace,
            gc_lock: tokio::sync::RwLock::new(()),
        }))
    }

    /// The store's location (for messages).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn index_path(&self, run_id: &str) -> PathBuf {
        self.index.join(format!("{run_id}.json"))
    }

    /// The run's last complete snapshot, if any.
    pub fn record(&self, run_id: &str) -> Option<SnapshotRecord> {
        read_record(&self.index_path(run_id))
    }

    /// Every run in the index.
    pub fn records(&self) -> Vec<SnapshotRecord> {
        let Ok(rd) = std::fs::read_dir(&self.index) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| read_record(&e.path()))
            .collect()
    }

    /// The record when the run's drives, as they are now, are in the store: the run
    /// directory's record matches the index.
    pub fn current(&self, run_dir: &Path, run_id: &str) -> Option<SnapshotRecord> {
        let local = read_record(&run_dir.join(RUN_RECORD))?;
        let index = self.record(run_id)?;
        (local == index).then_some(index)
    }

    /// Uploads each machine's drive from `run_dir` and records the snapshot (index first,
    /// then the run directory). The caller makes sure the drives do not change meanwhile (the
    /// run is stopped; a restart cancels this first).
    pub async fn upload(&self, run_dir: &Path, plan: &RunPlan) -> anyhow::Result<SnapshotRecord> {
        let _shared = self.gc_lock.read().await;
        let t0 = std::time::Instant::now();
        let mut machines = BTreeMap::new();
        let mut bytes_uploaded = 0;
        let mut bytes_read = 0;
        for m in &plan.machines {
            let dir = run_dir.join(&m.name);
            let drive = dir.join("root.ext4");
            let report =
                ironlab_store::upload_drive(&self.store, &drive, &UploadOptions::default())
                    .await
                    .with_context(|| {
                        format!(
                            "cannot upload the drive of machine {} to {}",
                            m.name, self.location
                        )
                    })?;
            bytes_uploaded += report.bytes_uploaded;
            bytes_read += report.bytes_read;
            let image_env: Vec<String> = std::fs::read(dir.join("image-env.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let base = std::fs::read_to_string(dir.join(BASE_DRIVE))
                .ok()
                .map(|p| PathBuf::from(p.trim()))
                .filter(|p| p.is_absolute());
            machines.insert(
                m.name.clone(),
                MachineSnapshot {
                    manifest: report.manifest.id.clone(),
                    image_env,
                    base,
                },
            );
            crash_point("upload:machine");
        }
        let record = SnapshotRecord {
            run_id: plan.run_id.clone(),
            plan: plan.clone(),
            machines,
            bytes_uploaded,
            uploaded_at: chrono::Utc::now().to_rfc3339(),
        };
        let json = serde_json::to_vec_pretty(&record)?;
        write_durable(&self.index_path(&plan.run_id), &json)?;
        crash_point("upload:indexed");
        write_durable(&run_dir.join(RUN_RECORD), &json)?;
        let secs = t0.elapsed().as_secs_f64();
        tracing::info!(
            run = %plan.run_id,
            bytes_read,
            bytes_uploaded,
            elapsed_ms = (secs * 1000.0) as u64,
            mib_per_s = (bytes_read as f64 / (1 << 20) as f64 / secs.max(1e-6)) as u64,
            "snapshot uploaded"
        );
        Ok(record)
    }

    /// Records, for clone `plan` in `run_dir`, the snapshot of its origin (`origin`, current:
    /// the clone's drives are reflinks of exactly those drives), so the clone needs no upload.
    pub fn adopt(
        &self,
        origin: &SnapshotRecord,
        run_dir: &Path,
        plan: &RunPlan,
    ) -> anyhow::Result<SnapshotRecord> {
        let record = SnapshotRecord {
            run_id: plan.run_id.clone(),
            plan: plan.clone(),
            machines: origin.machines.clone(),
            bytes_uploaded: 0,
            uploaded_at: chrono::Utc::now().to_rfc3339(),
        };
        let json = serde_json::to_vec_pretty(&record)?;
        write_durable(&self.index_path(&plan.run_id), &json)?;
        write_durable(&run_dir.join(RUN_RECORD), &json)?;
        Ok(record)
    }

    /// Restores machine `machine`'s drive of `run_id` to `dest` (and its `image-env.json`
    /// beside it when missing) from the run's last complete snapshot.
    pub async fn restore(&self, run_id: &str, machine: &str, dest: &Path) -> anyhow::Result<()> {
        let record = self.record(run_id).with_context(|| {
            format!(
                "the drive of machine {machine} of run {run_id} is missing from the pool ({}) and \
                 the run has no snapshot in {}",
                dest.display(),
                self.location
            )
        })?;
        let m = record.machines.get(machine).with_context(|| {
            format!("the snapshot of run {run_id} has no drive for machine {machine}")
        })?;
        let dir = dest.parent().context("drive path has no parent")?;
        fs_err::create_dir_all(dir)?;
        let t0 = std::time::Instant::now();
        let opts = RestoreOptions {
            have: m.base.clone().filter(|b| b.is_file()),
            ..RestoreOptions::default()
        };
        let report = ironlab_store::restore_drive(&self.store, &m.manifest, dest, &opts)
            .await
            .with_context(|| {
                format!(
                    "cannot restore the drive of machine {machine} of run {run_id} from {} \
                         (manifest {})",
                    self.location, m.manifest
                )
            })?;
        let env = dir.join("image-env.json");
        if !env.exists() {
            write_durable(&env, &serde_json::to_vec(&m.image_env)?)?;
        }
        tracing::info!(
            run = %run_id,
            machine,
            manifest = %m.manifest,
            chunks_fetched = report.chunks_fetched,
            bytes_fetched = report.bytes_fetched,
            chunks_reused = report.chunks_reused,
            reflinked = report.reflinked,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "drive restored from the snapshot store"
        );
        Ok(())
    }

    /// Forgets the run's snapshot (its manifests become garbage for the next GC).
    pub fn forget(&self, run_id: &str) -> anyhow::Result<()> {
        match std::fs::remove_file(self.index_path(run_id)) {
            Ok(()) => fsync_dir(&self.index)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("cannot remove the snapshot index entry"),
        }
        Ok(())
    }

    /// Collects the store's garbage: manifests of no run in the index (older than the grace
    /// period) and the chunks only they referenced.
    pub async fn gc(&self) -> anyhow::Result<ironlab_store::GcReport> {
        let _exclusive = self.gc_lock.write().await;
        let mut live: Vec<String> = self
            .records()
            .into_iter()
            .flat_map(|r| r.machines.into_values().map(|m| m.manifest))
            .collect();
        live.sort();
        live.dedup();
        let opts = GcOptions {
            grace: self.gc_grace,
            ..GcOptions::default()
        };
        let report = ironlab_store::gc(&self.store, &live, &opts)
            .await
            .with_context(|| format!("garbage collection of {} failed", self.location))?;
        tracing::info!(
            manifests_deleted = report.manifests_deleted,
            chunks_deleted = report.chunks_deleted,
            bytes_deleted = report.bytes_deleted,
            live = live.len(),
            "snapshot store collected"
        );
        Ok(report)
    }
}

fn read_record(path: &Path) -> Option<SnapshotRecord> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), "unreadable snapshot record: {e}");
            None
        }
    }
}

/// The status of an upload in progress.
pub fn uploading() -> SnapshotStatus {
    SnapshotStatus {
        state: SnapshotState::Uploading,
        manifests: BTreeMap::new(),
        bytes_uploaded: 0,
        error: None,
    }
}

/// The status of a failed upload.
pub fn failed(error: String) -> SnapshotStatus {
    SnapshotStatus {
        state: SnapshotState::Failed,
        manifests: BTreeMap::new(),
        bytes_uploaded: 0,
        error: Some(error),
    }
}

impl super::RunManager {
    /// After a run became stopped: reports its snapshot when the drives are already in the
    /// store, else starts uploading them in the background. No-op without a store.
    pub(super) fn snapshot_after_stop(self: &Arc<Self>, run: &Arc<super::Run>) {
        let Some(snaps) = self.snapshots().cloned() else {
            return;
        };
        let run_id = run.plan.run_id.clone();
        let dir = self.runs_dir.join(&run_id);
        if let Some(record) = snaps.current(&dir, &run_id) {
            run.status
                .send_modify(|s| s.snapshot = Some(record.status()));
            return;
        }
        let missing = run
            .plan
            .machines
            .iter()
            .any(|m| !dir.join(&m.name).join("root.ext4").is_file());
        if missing {
            // Nothing to upload (e.g. a restore failed): the last complete snapshot stands.
            let status = match snaps.record(&run_id) {
                Some(r) => r.status(),
                None => failed(format!(
                    "a drive of run {run_id} is missing from the pool and it has no snapshot"
                )),
            };
            run.status.send_modify(|s| s.snapshot = Some(status));
            return;
        }
        let mut slot = run.upload.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|(_, t)| !t.is_finished()) {
            return;
        }
        run.status.send_modify(|s| s.snapshot = Some(uploading()));
        let cancel = run.cancel.child_token();
        let token = cancel.clone();
        let r = run.clone();
        let task = tokio::spawn(async move {
            loop {
                let result = tokio::select! {
                    res = snaps.upload(&dir, &r.plan) => res,
                    () = token.cancelled() => {
                        tracing::info!(run = %r.plan.run_id, "snapshot upload cancelled");
                        return;
                    }
                };
                match result {
                    Ok(record) => {
                        r.status.send_modify(|s| s.snapshot = Some(record.status()));
                        return;
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        tracing::warn!(run = %r.plan.run_id, "snapshot upload failed (retrying in {} s): {msg}", RETRY_AFTER.as_secs());
                        r.status.send_modify(|s| s.snapshot = Some(failed(msg)));
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER) => {}
                    () = token.cancelled() => return,
                }
                r.status.send_modify(|s| s.snapshot = Some(uploading()));
            }
        });
        *slot = Some((cancel, task));
    }

    /// A new clone of `src` shares its snapshot when `src`'s is current (no upload needed);
    /// otherwise it is uploaded like any stopped run.
    pub(super) fn snapshot_of_clone(self: &Arc<Self>, src: &str, clone: &Arc<super::Run>) {
        if let Some(snaps) = self.snapshots()
            && let Some(origin) = snaps.current(&self.runs_dir.join(src), src)
        {
            let dir = self.runs_dir.join(&clone.plan.run_id);
            match snaps.adopt(&origin, &dir, &clone.plan) {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(run = %clone.plan.run_id, "cannot record the origin's snapshot for the clone: {e:#}")
                }
            }
        }
        self.snapshot_after_stop(clone);
    }

    /// Cancels the run's upload in progress and waits until it stopped (before a restart or a
    /// destroy changes the drives).
    pub(super) async fn cancel_upload(&self, run: &super::Run) {
        let upload = run.upload.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((cancel, task)) = upload {
            cancel.cancel();
            if let Err(e) = task.await {
                tracing::warn!(run = %run.plan.run_id, "snapshot upload task ended abnormally: {e}");
            }
        }
    }

    /// Marks the run's drives as no longer matching its snapshot (a restart is about to change
    /// them); the index keeps the last complete snapshot.
    pub(super) fn invalidate_snapshot(&self, run: &super::Run) -> anyhow::Result<()> {
        let dir = self.runs_dir.join(&run.plan.run_id);
        match std::fs::remove_file(dir.join(RUN_RECORD)) {
            Ok(()) => fsync_dir(&dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("cannot remove the run's snapshot record"),
        }
        run.status.send_modify(|s| s.snapshot = None);
        Ok(())
    }

    /// Removes the run's snapshot from the index (before its files go, so a crash in between
    /// never brings a destroyed run back).
    pub(super) fn forget_snapshot(&self, run_id: &str) -> anyhow::Result<()> {
        match self.snapshots() {
            Some(s) => s.forget(run_id),
            None => Ok(()),
        }
    }

    /// Collects the snapshot store's garbage in the background.
    pub(super) fn collect_snapshots(&self) {
        let Some(snaps) = self.snapshots().cloned() else {
            return;
        };
        // `ironlab_store::gc`'s future is not provably `Send` (a higher-ranked lifetime in its
        // stream combinators), so it runs on a blocking thread of this runtime.
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = handle.block_on(snaps.gc()) {
                tracing::warn!("{e:#}");
            }
        });
    }

    /// Restores a missing drive of a stopped run being restarted from its snapshot.
    pub(super) async fn restore_drive(
        &self,
        run_id: &str,
        machine: &str,
        root: &Path,
    ) -> anyhow::Result<()> {
        match self.snapshots() {
            Some(s) => s.restore(run_id, machine, root).await,
            None => anyhow::bail!(
                "the drive of machine {machine} of run {run_id} is missing from the pool ({}) \
                 and the worker has no snapshot store",
                root.display()
            ),
        }
    }

    /// Recreates, as stopped runs without drives, the runs of the snapshot index whose run
    /// directory is gone (a wiped pool): restarting one restores its drives.
    pub(super) fn recreate_from_snapshots(&self, keep: &[String]) -> Vec<Arc<super::Run>> {
        let Some(snaps) = self.snapshots().cloned() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for record in snaps.records() {
            let run_id = record.run_id.clone();
            if keep.contains(&run_id)
                || self.runs_dir.join(&run_id).exists()
                || record.plan.run_id != run_id
                || !super::valid_run_id(&run_id)
            {
                continue;
            }
            match self.recreate_run_dir(&record) {
                Ok(()) => {
                    let run = super::Run::new(
                        record.plan.clone(),
                        ObservedState::Stopped,
                        self.runtime.name(),
                    );
                    run.status.send_modify(|s| {
                        s.snapshot = Some(record.status());
                        s.storage_bytes = Some(0);
                    });
                    tracing::info!(run = %run_id, "recreated a stopped run from its snapshot (its pool files were gone)");
                    self.lock().insert(run_id, run.clone());
                    out.push(run);
                }
                Err(e) => {
                    tracing::warn!(run = %run_id, "cannot recreate the run from its snapshot: {e:#}");
                    let _ = std::fs::remove_dir_all(self.runs_dir.join(&run_id));
                }
            }
        }
        out
    }

    fn recreate_run_dir(&self, record: &SnapshotRecord) -> anyhow::Result<()> {
        let tmp = self
            .runs_dir
            .join(format!("{}{}", super::lifecycle::TMP_PREFIX, record.run_id));
        if tmp.exists() {
            fs_err::remove_dir_all(&tmp)?;
        }
        fs_err::create_dir_all(&tmp)?;
        for (name, m) in &record.machines {
            fs_err::create_dir(tmp.join(name))?;
            write_durable(
                &tmp.join(name).join("image-env.json"),
                &serde_json::to_vec(&m.image_env)?,
            )?;
        }
        write_durable(
            &tmp.join("plan.json"),
            &serde_json::to_vec_pretty(&record.plan)?,
        )?;
        write_durable(&tmp.join("ready"), b"")?;
        write_durable(&tmp.join(RUN_RECORD), &serde_json::to_vec_pretty(record)?)?;
        super::lifecycle::write_lifecycle(&tmp, Some(super::lifecycle::Lifecycle::Stopped))?;
        fs_err::rename(&tmp, self.runs_dir.join(&record.run_id))?;
        fsync_dir(&self.runs_dir)?;
        Ok(())
    }
}
