//! Persistent runs: stop (machines shut down, drives kept), restart (the same machines boot on
//! the same drives), clone (a new stopped run whose drives are reflinks) and save (a stopped
//! run's drives become a read-only template new runs start from).
//!
//! Runtime-neutral: machines are stopped and released through [`MachineRuntime`] and drives are
//! plain files in the pool, so a microVM runtime gets the same lifecycle.
//!
//! On disk, per run (`pool/runs/<run>/`): the file `lifecycle` holds `stopping`, `stopped` or
//! `restarting` (absent = the run is running, or starting for the first time). Every change is
//! written to a temporary name, fsynced and renamed; clones and saves are assembled in
//! `.tmp-<id>` directories and renamed into place last, so a worker killed at any point leaves
//! either the old or the new state, and [`RunManager::recover`] removes the temporaries:
//!
//! - `stopping`: the stop is finished (machines killed, drives released) → stopped.
//! - `stopped`: kept as stopped (anything a crash left mounted is released).
//! - `restarting`: the restart is undone (machines stopped again) → stopped.
//! - absent, `ready`, but a machine no longer runs: the machines died while the worker was away
//!   (host reboot): stopped, drives kept.
//!
//! Saved drives live in `pool/saved/<id>/<machine>.ext4` (mode 0444) with `<machine>.env.json`
//! (the image environment) and `saved.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ironlab_api::worker::{ObservedState, RunPlan, RunStatus, SavedDrives};
use serde::{Deserialize, Serialize};

use super::{Run, RunError, RunManager, netns_name, read_plan, valid_run_id};
use crate::drives::PreparedImage;
use crate::host;
use crate::runtime::{MachineHandle, MachineSpec};

/// How long machines get to shut down after SIGTERM before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// A stopped run's storage use is measured again after this long.
const STORAGE_TTL: Duration = Duration::from_secs(30);
/// Prefix of directories being assembled (removed by recovery).
pub const TMP_PREFIX: &str = ".tmp-";

/// Test hook for crash tests: when `IRONLAB_TEST_CRASH_AT` names `point`, the worker kills
/// itself there with SIGKILL (no destructor, no flush: the state a `kill -9` leaves).
/// Points: `stop:stopping`, `stop:halted`, `restart:booted`, `clone:assembled`,
/// `clone:renamed`, `save:assembled`, `save:renamed`.
pub fn crash_point(point: &str) {
    if std::env::var("IRONLAB_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::error!(point, "IRONLAB_TEST_CRASH_AT: killing the worker here");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The persistent part of a run's state, in `pool/runs/<run>/lifecycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// A stop began.
    Stopping,
    /// Stopped; drives kept.
    Stopped,
    /// A restart began (the run was stopped).
    Restarting,
}

impl Lifecycle {
    fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Stopping => "stopping",
            Lifecycle::Stopped => "stopped",
            Lifecycle::Restarting => "restarting",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "stopping" => Some(Lifecycle::Stopping),
            "stopped" => Some(Lifecycle::Stopped),
            "restarting" => Some(Lifecycle::Restarting),
            _ => None,
        }
    }
}

/// The run's recorded lifecycle (`None`: running or first start).
pub fn read_lifecycle(run_dir: &Path) -> Option<Lifecycle> {
    std::fs::read_to_string(run_dir.join("lifecycle"))
        .ok()
        .and_then(|s| Lifecycle::parse(&s))
}

/// Records the run's lifecycle durably (temp file, fsync, rename, fsync of the directory).
pub fn write_lifecycle(run_dir: &Path, state: Option<Lifecycle>) -> anyhow::Result<()> {
    let path = run_dir.join("lifecycle");
    match state {
        Some(s) => write_durable(&path, s.as_str().as_bytes())?,
        None => match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(run_dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        },
    }
    Ok(())
}

/// Writes `data` to `path` atomically and durably.
pub fn write_durable(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs_err::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    fs_err::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs a directory (makes renames and creations in it durable).
pub fn fsync_dir(dir: &Path) -> anyhow::Result<()> {
    fs_err::File::open(dir)?.sync_all()?;
    Ok(())
}

fn fsync_file(path: &Path) -> anyhow::Result<()> {
    fs_err::File::open(path)?.sync_all()?;
    Ok(())
}

/// Reflinks `src` to `dst` (`FICLONE`: no data copied); fails rather than copy.
fn reflink(src: &Path, dst: &Path) -> anyhow::Result<()> {
    crate::pool::reflink(src, dst).map_err(anyhow::Error::from)
}

/// Bytes of `files` that no other file shares (from `filefrag -v`'s `shared` flag): what
/// deleting them would free.
pub async fn unshared_bytes(files: &[PathBuf]) -> anyhow::Result<u64> {
    let mut total = 0u64;
    for f in files {
        if !f.exists() {
            continue;
        }
        let out = crate::cmd::stdout("filefrag", &["-v", "-b4096", &f.to_string_lossy()])
            .await
            .with_context(|| format!("cannot map the extents of {}", f.display()))?;
        total += parse_filefrag_unshared(&out);
    }
    Ok(total)
}

/// Sums the lengths of the extents `filefrag -v` lists without the `shared` flag, in bytes.
pub fn parse_filefrag_unshared(out: &str) -> u64 {
    let mut block = 4096u64;
    let mut total = 0u64;
    for line in out.lines() {
        if let Some(rest) = line.split(" blocks of ").nth(1) {
            if let Some(n) = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
            {
                block = n;
            }
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        // ext: logical: physical: length: [expected:] flags
        if fields.len() < 5 || fields[0].trim().parse::<u64>().is_err() {
            continue;
        }
        let Ok(len) = fields[3].trim().parse::<u64>() else {
            continue;
        };
        let flags = fields.last().copied().unwrap_or("");
        if !flags.split(',').any(|f| f.trim() == "shared") {
            total += len * block;
        }
    }
    total
}

/// `saved.json` of a save.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedMeta {
    id: String,
    run_id: String,
    machines: Vec<String>,
    allocated_bytes: u64,
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

impl RunManager {
    /// `pool/saved`: drives saved from stopped runs.
    pub fn saved_dir(&self) -> PathBuf {
        self.runs_dir
            .parent()
            .map(|p| p.join("saved"))
            .unwrap_or_else(|| self.runs_dir.join(".saved"))
    }

    fn drives_of(&self, run_id: &str, plan: &RunPlan) -> Vec<PathBuf> {
        plan.machines
            .iter()
            .map(|m| {
                MachineHandle::new(&self.runs_dir, run_id, &m.name)
                    .dir
                    .join("root.ext4")
            })
            .collect()
    }

    /// What a stopped run holds: its drives, and the RAM snapshots of microVMs stopped with
    /// their RAM kept.
    fn storage_files(&self, run_id: &str, plan: &RunPlan) -> Vec<PathBuf> {
        let mut files = self.drives_of(run_id, plan);
        for m in &plan.machines {
            let ram = MachineHandle::new(&self.runs_dir, run_id, &m.name)
                .dir
                .join(crate::runtime::vm::SUSPEND_FILE);
            if ram.exists() {
                files.push(ram);
            }
        }
        files
    }

    fn held(&self, run_id: &str) -> Result<Arc<Run>, RunError> {
        if !valid_run_id(run_id) {
            return Err(RunError::BadRequest(format!(
                "run id {run_id:?} is invalid: 1-12 characters [a-z0-9]"
            )));
        }
        let run = self
            .get_run(run_id)
            .ok_or_else(|| RunError::NotFound(format!("run {run_id} is not on this worker")))?;
        if run.is_destroying() {
            return Err(RunError::Conflict(format!(
                "run {run_id} is being destroyed"
            )));
        }
        Ok(run)
    }

    fn require_stopped(run: &Run) -> Result<(), RunError> {
        let state = run.status.borrow().state;
        if state != ObservedState::Stopped {
            return Err(RunError::Conflict(format!(
                "run {} is {}; stop it first",
                run.plan.run_id,
                state_word(state)
            )));
        }
        Ok(())
    }

    /// Stops a running run: every machine gets SIGTERM, then SIGKILL after [`STOP_GRACE`]; the
    /// runtime releases mounts, loop devices, cgroups and the network namespace; the drives are
    /// kept and fsynced. Idempotent (a stopped run is returned as it is).
    pub async fn stop(self: &Arc<Self>, run_id: &str) -> Result<RunStatus, RunError> {
        let run = self.held(run_id)?;
        let _op = run.op.clone().lock_owned().await;
        let state = run.status.borrow().state;
        match state {
            ObservedState::Stopped => return Ok(run.status.borrow().clone()),
            ObservedState::Running => {}
            other => {
                return Err(RunError::Conflict(format!(
                    "run {run_id} is {}; only a running run can be stopped",
                    state_word(other)
                )));
            }
        }
        let dir = self.runs_dir.join(run_id);
        write_lifecycle(&dir, Some(Lifecycle::Stopping))?;
        run.status.send_modify(|s| {
            s.state = ObservedState::Stopping;
            s.error = None;
            for m in &mut s.machines {
                m.state = ObservedState::Stopping;
            }
        });
        run.agents.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let t0 = std::time::Instant::now();
        crash_point("stop:stopping");
        self.halt(run_id, &run.plan).await?;
        crash_point("stop:halted");
        write_lifecycle(&dir, Some(Lifecycle::Stopped))?;
        self.set_stopped(&run, None).await;
        tracing::info!(run = %run_id, elapsed_ms = t0.elapsed().as_millis() as u64, "run stopped");
        self.snapshot_after_stop(&run);
        Ok(run.status.borrow().clone())
    }

    /// Marks a run stopped (with the reason of a failed restart, if any) and measures its
    /// storage.
    async fn set_stopped(&self, run: &Run, error: Option<String>) {
        let storage = unshared_bytes(&self.storage_files(&run.plan.run_id, &run.plan))
            .await
            .map_err(|e| tracing::warn!(run = %run.plan.run_id, "cannot measure storage: {e:#}"))
            .ok();
        *run.storage_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        run.status.send_modify(|s| {
            s.state = ObservedState::Stopped;
            s.error = error;
            s.storage_bytes = storage;
            for m in &mut s.machines {
                m.state = ObservedState::Stopped;
                m.error = None;
            }
        });
    }

    /// Refreshes the storage use of a stopped run when the last measurement is old.
    pub(super) async fn refresh_storage(&self, run: &Run) {
        if run.status.borrow().state != ObservedState::Stopped {
            return;
        }
        let fresh = run
            .storage_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < STORAGE_TTL);
        if fresh {
            return;
        }
        if let Ok(b) = unshared_bytes(&self.storage_files(&run.plan.run_id, &run.plan)).await {
            *run.storage_at.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(std::time::Instant::now());
            run.status.send_modify(|s| s.storage_bytes = Some(b));
        }
    }

    /// Shuts every machine of the run down and releases everything but the drives: the
    /// machines, their mounts and loop devices, cgroups, the network namespace. Idempotent.
    pub(super) async fn halt(&self, run_id: &str, plan: &RunPlan) -> anyhow::Result<()> {
        let results = futures::future::join_all(plan.machines.iter().map(|m| {
            let h = MachineHandle::new(&self.runs_dir, run_id, &m.name);
            async move {
                self.runtime
                    .stop(&h, STOP_GRACE)
                    .await
                    .map_err(anyhow::Error::from)?;
                self.runtime
                    .release(&h)
                    .await
                    .map_err(anyhow::Error::from)?;
                let drive = h.dir.join("root.ext4");
                if drive.exists() {
                    fsync_file(&drive)?;
                }
                anyhow::Ok(())
            }
        }))
        .await;
        let mut errors: Vec<String> = results
            .into_iter()
            .filter_map(|r| r.err().map(|e| format!("{e:#}")))
            .collect();
        if let Err(e) = self.net.teardown(run_id).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = host::delete_netns(&netns_name(run_id)).await {
            errors.push(format!("{e:#}"));
        }
        let _ = host::remove_cgroup_if_empty(&format!("ironlab/{run_id}"));
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("cannot stop run {run_id}: {}", errors.join("; "))
        }
    }

    /// Boots a stopped run's machines on their drives again. Users and startup files are not
    /// applied again (the drives already hold them, and whatever the user changed since).
    /// Returns at once with `starting`; a failure stops the machines again and leaves the run
    /// `stopped` with the reason in `error`. Idempotent while starting or running.
    pub async fn restart(self: &Arc<Self>, run_id: &str) -> Result<RunStatus, RunError> {
        let run = self.held(run_id)?;
        let op = run.op.clone().lock_owned().await;
        let state = run.status.borrow().state;
        match state {
            ObservedState::Stopped => {}
            ObservedState::Starting | ObservedState::Running => {
                return Ok(run.status.borrow().clone());
            }
            other => {
                return Err(RunError::Conflict(format!(
                    "run {run_id} is {}; only a stopped run can be restarted",
                    state_word(other)
                )));
            }
        }
        let dir = self.runs_dir.join(run_id);
        // The drives are about to change: an upload of them now is pointless.
        self.cancel_upload(&run).await;
        self.invalidate_snapshot(&run)?;
        write_lifecycle(&dir, Some(Lifecycle::Restarting))?;
        run.status.send_modify(|s| {
            s.state = ObservedState::Starting;
            s.error = None;
            s.storage_bytes = None;
            for m in &mut s.machines {
                m.state = ObservedState::Starting;
                m.error = None;
            }
        });
        let status = run.status.borrow().clone();
        let this = self.clone();
        let r = run.clone();
        let task = tokio::spawn(async move {
            let _op = op;
            this.restart_task(r).await;
        });
        *run.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(status)
    }

    async fn restart_task(self: Arc<Self>, run: Arc<Run>) {
        let run_id = run.plan.run_id.clone();
        let dir = self.runs_dir.join(&run_id);
        let t0 = std::time::Instant::now();
        let result = self.boot_all(&run).await;
        if run.cancel.is_cancelled() {
            tracing::info!(run = %run_id, "restart cancelled");
            return;
        }
        if result.is_ok() {
            crash_point("restart:booted");
        }
        match result.and_then(|()| write_lifecycle(&dir, None)) {
            Ok(()) => {
                run.status.send_modify(|s| {
                    s.state = ObservedState::Running;
                    s.error = None;
                });
                tracing::info!(run = %run_id, elapsed_ms = t0.elapsed().as_millis() as u64, "run restarted");
            }
            Err(e) => {
                let msg = format!("restart failed: {e:#}");
                tracing::warn!(run = %run_id, "{msg}");
                run.agents.lock().unwrap_or_else(|p| p.into_inner()).clear();
                if let Err(he) = self.halt(&run_id, &run.plan).await {
                    tracing::warn!(run = %run_id, "stopping after a failed restart: {he:#}");
                }
                if let Err(we) = write_lifecycle(&dir, Some(Lifecycle::Stopped)) {
                    tracing::warn!(run = %run_id, "{we:#}");
                }
                self.set_stopped(&run, Some(msg)).await;
                self.snapshot_after_stop(&run);
            }
        }
    }

    async fn boot_all(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<()> {
        let run_id = &run.plan.run_id;
        let namespaces = self.setup_network(&run.plan).await?;
        let namespaces = &namespaces;
        let results = futures::future::join_all(run.plan.machines.iter().map(|m| async move {
            async {
                let h = MachineHandle::new(&self.runs_dir, run_id, &m.name);
                let root = h.dir.join("root.ext4");
                if !root.is_file() {
                    self.restore_drive(run_id, &m.name, &root).await?;
                }
                let image_env: Vec<String> = std::fs::read(h.dir.join("image-env.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let (netns, etc_hosts, resolv_conf, net) = namespaces.for_machine(&m.name)?;
                let spec = MachineSpec {
                    run_id: run_id.clone(),
                    plan: m.clone(),
                    dir: h.dir.clone(),
                    root_drive: root,
                    netns,
                    image_env,
                    etc_hosts,
                    resolv_conf,
                    net,
                    fresh_from: None,
                };
                let h = self.runtime.start(&spec).await?;
                let client = tokio::select! {
                    r = self.wait_agent(&h) => r?,
                    () = run.cancel.cancelled() => anyhow::bail!("cancelled"),
                };
                run.agents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(m.name.clone(), client);
                run.set_machine(&m.name, ObservedState::Running, None);
                anyhow::Ok(())
            }
            .await
            .with_context(|| format!("machine {}", m.name))
        }))
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// Clones stopped run `src` into the new stopped run `new_id`: the drives are `FICLONE`
    /// reflinks (instant, no data copied until one side writes). Idempotent: cloning into an
    /// existing clone of the same run returns it.
    pub async fn clone_run(
        self: &Arc<Self>,
        src: &str,
        new_id: &str,
    ) -> Result<RunStatus, RunError> {
        if !valid_run_id(new_id) {
            return Err(RunError::BadRequest(format!(
                "new_run_id {new_id:?} is invalid: 1-12 characters [a-z0-9]"
            )));
        }
        let run = self.held(src)?;
        let _op = run.op.clone().lock_owned().await;
        let mut plan = run.plan.clone();
        plan.run_id = new_id.to_string();
        if let Some(existing) = self.get_run(new_id) {
            let cloned_from =
                std::fs::read_to_string(self.runs_dir.join(new_id).join("cloned-from"))
                    .unwrap_or_default();
            if existing.plan == plan && cloned_from.trim() == src {
                return Ok(existing.status.borrow().clone());
            }
            return Err(RunError::Conflict(format!("run {new_id} already exists")));
        }
        Self::require_stopped(&run)?;
        let dst = self.runs_dir.join(new_id);
        if dst.exists() {
            return Err(RunError::Conflict(format!(
                "run {new_id} already has files on this worker"
            )));
        }
        let t0 = std::time::Instant::now();
        let tmp = self.runs_dir.join(format!("{TMP_PREFIX}{new_id}"));
        let built = self.assemble_clone(src, &plan, &tmp);
        if let Err(e) = built.and_then(|()| {
            crash_point("clone:assembled");
            fs_err::rename(&tmp, &dst)?;
            fsync_dir(&self.runs_dir)?;
            crash_point("clone:renamed");
            Ok(())
        }) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(RunError::Internal(
                e.context(format!("cannot clone run {src}")),
            ));
        }
        let new = Run::new(plan, ObservedState::Stopped, self.runtime.name());
        // A fresh clone shares every extent with its source: it holds nothing of its own yet
        // (measured again once it diverges, see `refresh_storage`).
        *new.storage_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        new.status.send_modify(|s| s.storage_bytes = Some(0));
        {
            let mut runs = self.lock();
            runs.insert(new_id.to_string(), new.clone());
        }
        self.snapshot_of_clone(src, &new);
        tracing::info!(run = %src, clone = %new_id, elapsed_ms = t0.elapsed().as_millis() as u64, "run cloned");
        Ok(new.status.borrow().clone())
    }

    fn assemble_clone(&self, src: &str, plan: &RunPlan, tmp: &Path) -> anyhow::Result<()> {
        if tmp.exists() {
            fs_err::remove_dir_all(tmp)?;
        }
        fs_err::create_dir_all(tmp)?;
        for m in &plan.machines {
            let from = MachineHandle::new(&self.runs_dir, src, &m.name).dir;
            let to = tmp.join(&m.name);
            fs_err::create_dir(&to)?;
            reflink(&from.join("root.ext4"), &to.join("root.ext4"))?;
            fsync_file(&to.join("root.ext4"))?;
            for file in ["image-env.json", super::snapshots::BASE_DRIVE] {
                let f = from.join(file);
                if f.exists() {
                    write_durable(&to.join(file), &fs_err::read(&f)?)?;
                }
            }
            fsync_dir(&to)?;
        }
        write_durable(&tmp.join("plan.json"), &serde_json::to_vec_pretty(plan)?)?;
        write_durable(&tmp.join("ready"), b"")?;
        write_durable(&tmp.join("cloned-from"), src.as_bytes())?;
        write_lifecycle(tmp, Some(Lifecycle::Stopped))?;
        Ok(())
    }

    /// Saves stopped run `src`'s drives as `pool/saved/<saved_id>/<machine>.ext4` (reflinks,
    /// read-only), which new runs name with `ImageRef::Saved`. Idempotent by `saved_id`.
    pub async fn save(
        self: &Arc<Self>,
        src: &str,
        saved_id: &str,
    ) -> Result<SavedDrives, RunError> {
        if !valid_run_id(saved_id) {
            return Err(RunError::BadRequest(format!(
                "saved_id {saved_id:?} is invalid: 1-12 characters [a-z0-9]"
            )));
        }
        let run = self.held(src)?;
        let _op = run.op.clone().lock_owned().await;
        let saved = self.saved_dir();
        let dst = saved.join(saved_id);
        if dst.exists() {
            let meta: SavedMeta = fs_err::read(dst.join("saved.json"))
                .map_err(anyhow::Error::from)
                .and_then(|b| serde_json::from_slice(&b).context("cannot parse saved.json"))?;
            if meta.run_id == src {
                return Ok(meta.into());
            }
            return Err(RunError::Conflict(format!(
                "saved drives {saved_id} already exist (saved from run {})",
                meta.run_id
            )));
        }
        Self::require_stopped(&run)?;
        fs_err::create_dir_all(&saved).map_err(anyhow::Error::from)?;
        let tmp = saved.join(format!("{TMP_PREFIX}{saved_id}"));
        let t0 = std::time::Instant::now();
        let result = self
            .assemble_save(src, saved_id, &run.plan, &tmp)
            .and_then(|meta| {
                crash_point("save:assembled");
                fs_err::rename(&tmp, &dst)?;
                fsync_dir(&saved)?;
                crash_point("save:renamed");
                Ok(meta)
            });
        match result {
            Ok(meta) => {
                tracing::info!(run = %src, saved = %saved_id, elapsed_ms = t0.elapsed().as_millis() as u64, "run saved");
                Ok(meta.into())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(RunError::Internal(
                    e.context(format!("cannot save run {src}")),
                ))
            }
        }
    }

    fn assemble_save(
        &self,
        src: &str,
        saved_id: &str,
        plan: &RunPlan,
        tmp: &Path,
    ) -> anyhow::Result<SavedMeta> {
        use std::os::unix::fs::PermissionsExt;
        if tmp.exists() {
            fs_err::remove_dir_all(tmp)?;
        }
        fs_err::create_dir_all(tmp)?;
        let mut total = 0;
        for m in &plan.machines {
            let from = MachineHandle::new(&self.runs_dir, src, &m.name).dir;
            let drive = tmp.join(format!("{}.ext4", m.name));
            reflink(&from.join("root.ext4"), &drive)?;
            fs_err::set_permissions(&drive, std::fs::Permissions::from_mode(0o444))?;
            fsync_file(&drive)?;
            total += allocated(&drive);
            let env = fs_err::read(from.join("image-env.json")).unwrap_or_else(|_| b"[]".to_vec());
            write_durable(&tmp.join(format!("{}.env.json", m.name)), &env)?;
        }
        let meta = SavedMeta {
            id: saved_id.to_string(),
            run_id: src.to_string(),
            machines: plan.machines.iter().map(|m| m.name.clone()).collect(),
            allocated_bytes: total,
        };
        write_durable(&tmp.join("saved.json"), &serde_json::to_vec_pretty(&meta)?)?;
        Ok(meta)
    }

    /// Every complete save in the pool (half-made ones are not listed).
    pub fn list_saved(&self) -> Vec<SavedDrives> {
        let Ok(rd) = std::fs::read_dir(self.saved_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<SavedDrives> = rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| std::fs::read(e.path().join("saved.json")).ok())
            .filter_map(|b| serde_json::from_slice::<SavedMeta>(&b).ok())
            .map(Into::into)
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Removes saved drives (idempotent). Runs started from them keep their own reflinks.
    pub async fn delete_saved(&self, saved_id: &str) -> Result<(), RunError> {
        if !valid_run_id(saved_id) {
            return Err(RunError::BadRequest(format!(
                "saved id {saved_id:?} is invalid: 1-12 characters [a-z0-9]"
            )));
        }
        let saved = self.saved_dir();
        let dir = saved.join(saved_id);
        if !dir.exists() {
            return Ok(());
        }
        // Renamed first, so a crash never leaves a half-deleted save under its real name.
        let doomed = saved.join(format!("{TMP_PREFIX}del-{saved_id}"));
        fs_err::rename(&dir, &doomed).map_err(anyhow::Error::from)?;
        fsync_dir(&saved)?;
        fs_err::remove_dir_all(&doomed).map_err(anyhow::Error::from)?;
        tracing::info!(saved = %saved_id, "saved drives removed");
        Ok(())
    }

    /// The drive of machine `machine` of save `id`, ready to be cloned into a new run.
    pub(super) fn saved_image(&self, id: &str, machine: &str) -> anyhow::Result<PreparedImage> {
        if !valid_run_id(id) {
            anyhow::bail!("saved drive id {id:?} is invalid");
        }
        let dir = self.saved_dir().join(id);
        let path = dir.join(format!("{machine}.ext4"));
        let size = std::fs::metadata(&path)
            .with_context(|| {
                format!("saved drive {id} has no drive for machine {machine} on this worker")
            })?
            .len();
        let env: Vec<String> = std::fs::read(dir.join(format!("{machine}.env.json")))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(PreparedImage {
            digest: format!("saved:{id}/{machine}"),
            path,
            size,
            env,
        })
    }

    /// Removes what an interrupted clone, save or saved-drive removal left.
    pub(super) fn clean_temporaries(&self) {
        for dir in [self.runs_dir.clone(), self.saved_dir()] {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    tracing::info!(path = %e.path().display(), "removing an interrupted clone or save");
                    if let Err(err) = std::fs::remove_dir_all(e.path()) {
                        tracing::warn!(path = %e.path().display(), "{err}");
                    }
                }
            }
        }
    }

    /// Recovery of a run with a recorded lifecycle, or a ready run whose machines died while
    /// the worker was away: finishes or undoes what was in flight and keeps the run stopped.
    pub(super) async fn recover_stopped(
        &self,
        run_id: &str,
        why: Option<String>,
    ) -> anyhow::Result<Arc<Run>> {
        let dir = self.runs_dir.join(run_id);
        let plan = read_plan(&dir)?;
        if plan.run_id != run_id {
            anyhow::bail!("plan.json names run {}", plan.run_id);
        }
        self.halt(run_id, &plan).await?;
        write_lifecycle(&dir, Some(Lifecycle::Stopped))?;
        let run = Run::new(plan, ObservedState::Stopped, self.runtime.name());
        self.set_stopped(&run, why).await;
        Ok(run)
    }
}

impl From<SavedMeta> for SavedDrives {
    fn from(m: SavedMeta) -> Self {
        SavedDrives {
            id: m.id,
            run_id: m.run_id,
            machines: m.machines,
            allocated_bytes: m.allocated_bytes,
        }
    }
}

fn state_word(s: ObservedState) -> &'static str {
    match s {
        ObservedState::Starting => "starting",
        ObservedState::Running => "running",
        ObservedState::Failed => "failed",
        ObservedState::Stopping => "stopping",
        ObservedState::Stopped => "stopped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filefrag_counts_only_unshared_extents() {
        let out = "Filesystem type is: 58465342\n\
File size of m/b is 8388608 (2048 blocks of 4096 bytes)\n \
ext:     logical_offset:        physical_offset: length:   expected: flags:\n   \
0:        0..     511:         24..       535:    512:             shared\n   \
1:      512..     767:       2072..      2327:    256:        536:\n   \
2:      768..    2047:        792..      2071:   1280:       2328: last,shared,eof\n\
m/b: 3 extents found\n";
        assert_eq!(parse_filefrag_unshared(out), 256 * 4096);
        let out2 = "File size of x is 4096 (1 block of 4096 bytes)\n   0:   0..   0:   10..   10:   1:   last,eof\n";
        assert_eq!(parse_filefrag_unshared(out2), 4096);
    }

    #[test]
    fn lifecycle_file_round_trips_and_is_removed() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_lifecycle(d.path()), None);
        for s in [
            Lifecycle::Stopping,
            Lifecycle::Stopped,
            Lifecycle::Restarting,
        ] {
            write_lifecycle(d.path(), Some(s)).expect("write");
            assert_eq!(read_lifecycle(d.path()), Some(s));
        }
        write_lifecycle(d.path(), None).expect("remove");
        assert_eq!(read_lifecycle(d.path()), None);
        assert!(!d.path().join("lifecycle.tmp").exists());
    }
}
