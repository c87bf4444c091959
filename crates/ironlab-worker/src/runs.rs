//! The run manager: the worker's core, without HTTP.
//!
//! Who talks to whom: API handlers call [`RunManager`]; it owns one record per run (plan, a
//! `watch` channel of the observed [`RunStatus`], a cancellation token, the start task) and drives
//! the [`DriveProvider`] (images → per-machine root drives), the host (one network namespace per
//! run) and a [`MachineRuntime`]; it talks to each machine's agent over gRPC (health, users,
//! startup files) and hands agent clients to the terminal relay.
//!
//! On disk, per run: `pool/runs/<run>/plan.json`, a `ready` marker once every agent answered, and
//! one directory per machine. At worker start [`RunManager::recover`] keeps ready runs whose
//! machines still run and answer, keeps stopped runs (see [`lifecycle`]) and ready runs whose
//! machines died meanwhile (as stopped: their drives hold the user's work), and tears down
//! everything else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use ironlab_api::agent::{EnsureUsersRequest, PutFileRequest};
use ironlab_api::worker::{
    ImageRef, MachinePlan, MachineStatus, ObservedState, RunPlan, RunStatus,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent_client::{self, Agent};
use crate::drives::{DriveProvider, Progress};
use crate::host;
use crate::net::{self, NetConfig, Networks};
use crate::runtime::{MachineHandle, MachineRuntime, MachineSpec, MachineState, tail};

pub mod lifecycle;
pub mod snapshots;

/// How long a container's agent has to answer after the machine started (microVMs: see
/// `MachineRuntime::agent_timeout`).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long creating users and writing startup files may take.
pub const PROVISION_TIMEOUT: Duration = Duration::from_secs(60);

/// Default length of the console log tail served by [`RunManager::console_log`].
pub const CONSOLE_TAIL: u64 = 256 << 10;
/// The most of a console log kept after its run is gone (and served).
pub const CONSOLE_KEEP: u64 = 1 << 20;
/// How long console logs are kept after their run is gone.
pub const CONSOLE_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Run manager errors (mapped to HTTP status codes in `api.rs`).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// No such run (or machine).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the run's state.
    #[error("{0}")]
    Conflict(String),
    /// Something failed on the worker.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

struct Run {
    plan: RunPlan,
    status: watch::Sender<RunStatus>,
    cancel: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set once a destroy began; a second destroy waits on `destroy_lock` and returns.
    destroying: std::sync::atomic::AtomicBool,
    destroy_lock: tokio::sync::Mutex<bool>,
    agents: Mutex<HashMap<String, Agent>>,
    /// Serialises stop, restart, clone, save and destroy of this run.
    op: Arc<tokio::sync::Mutex<()>>,
    /// When the storage use of the stopped run was last measured.
    storage_at: Mutex<Option<std::time::Instant>>,
    /// The background upload of the stopped run's drives (see [`snapshots`]).
    upload: Mutex<Option<(CancellationToken, tokio::task::JoinHandle<()>)>>,
}

impl Run {
    fn new(plan: RunPlan, state: ObservedState, runtime: &str) -> Arc<Self> {
        let status = RunStatus {
            run_id: plan.run_id.clone(),
            state,
            machines: plan
                .machines
                .iter()
                .map(|m| MachineStatus {
                    name: m.name.clone(),
                    state,
                    runtime: if m.runtime == "microvm" {
                        "microvm".to_string()
                    } else {
                        runtime.to_string()
                    },
                    error: None,
                })
                .collect(),
            error: None,
            storage_bytes: None,
            snapshot: None,
        };
        Arc::new(Self {
            plan,
            status: watch::Sender::new(status),
            cancel: CancellationToken::new(),
            task: Mutex::new(None),
            destroying: std::sync::atomic::AtomicBool::new(false),
            destroy_lock: tokio::sync::Mutex::new(false),
            agents: Mutex::new(HashMap::new()),
            op: Arc::new(tokio::sync::Mutex::new(())),
            storage_at: Mutex::new(None),
            upload: Mutex::new(None),
        })
    }

    fn is_destroying(&self) -> bool {
        self.destroying.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_machine(&self, name: &str, state: ObservedState, error: Option<String>) {
        self.status.send_modify(|s| {
            if let Some(m) = s.machines.iter_mut().find(|m| m.name == name) {
                m.state = state;
                m.error = error;
            }
        });
    }

    fn machine(&self, name: &str) -> Option<&MachinePlan> {
        self.plan.machines.iter().find(|m| m.name == name)
    }
}

/// A connection to a machine's agent, for the terminal relay.
pub struct MachineAgent {
    /// gRPC client.
    pub client: Agent,
    /// The user terminals open as.
    pub default_user: String,
    /// Environment from the image (`KEY`, `VALUE`), applied under the client's own variables.
    pub image_env: Vec<(String, String)>,
}

/// Variables of the image config that sessions do not inherit: the agent sets them per user.
const SESSION_OWNED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TERM", "HOSTNAME",
];

/// The image environment sessions get, from `KEY=VALUE` entries.
pub fn session_env(image_env: &[String]) -> Vec<(String, String)> {
    image_env
        .iter()
        .filter_map(|e| e.split_once('='))
        .filter(|(k, _)| !k.is_empty() && !SESSION_OWNED_ENV.contains(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The run manager.
pub struct RunManager {
    runs_dir: PathBuf,
    runtime: Arc<dyn MachineRuntime>,
    drives: Arc<dyn DriveProvider>,
    runs: Mutex<HashMap<String, Arc<Run>>>,
    tasks: Arc<crate::tasks::TaskRelay>,
    net: Networks,
    /// The off-host snapshot store, when configured.
    snapshots: std::sync::OnceLock<Arc<snapshots::Snapshots>>,
}

/// Checks a run id: 1–12 characters `[a-z0-9]` (the netns `il-<run>` must fit 15 characters).
pub fn valid_run_id(id: &str) -> bool {
    (1..=12).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn valid_machine_name(n: &str) -> bool {
    (1..=40).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-')
        && !n.ends_with('-')
}

/// Validates a plan against the path's run id.
pub fn validate_plan(run_id: &str, plan: &RunPlan) -> Result<(), RunError> {
    if !valid_run_id(run_id) {
        return Err(RunError::BadRequest(format!(
            "run id {run_id:?} is invalid: 1-12 characters [a-z0-9]"
        )));
    }
    if plan.run_id != run_id {
        return Err(RunError::BadRequest(format!(
            "plan.run_id {:?} does not match the URL's run id {run_id:?}",
            plan.run_id
        )));
    }
    if plan.machines.is_empty() || plan.machines.len() > 5 {
        return Err(RunError::BadRequest(format!(
            "a run has 1-5 machines, this plan has {}",
            plan.machines.len()
        )));
    }
    for (i, m) in plan.machines.iter().enumerate() {
        if !valid_machine_name(&m.name) {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].name {:?} is invalid: 1-40 characters [a-z0-9-]",
                m.name
            )));
        }
        if plan.machines[..i].iter().any(|o| o.name == m.name) {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].name {:?} is used twice",
                m.name
            )));
        }
        if !["container", "auto", "microvm"].contains(&m.runtime.as_str()) {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].runtime {:?} is unknown (container, microvm or auto)",
                m.runtime
            )));
        }
        if m.root_size_bytes > 0 && m.root_size_bytes < (16 << 20) {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].root_size_bytes {} is below 16 MiB",
                m.root_size_bytes
            )));
        }
        if m.memory_bytes > 0 && m.memory_bytes < (16 << 20) {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].memory_bytes {} is below 16 MiB",
                m.memory_bytes
            )));
        }
        for (j, f) in m.files.iter().enumerate() {
            if !f.path.starts_with('/') {
                return Err(RunError::BadRequest(format!(
                    "machines[{i}].files[{j}].path {:?} is not absolute",
                    f.path
                )));
            }
        }
        if plan.networks.is_empty() && !m.interfaces.is_empty() {
            return Err(RunError::BadRequest(format!(
                "machines[{i}].interfaces: the plan has no networks"
            )));
        }
    }
    if !plan.networks.is_empty() {
        net::layout::validate(plan).map_err(RunError::BadRequest)?;
    }
    Ok(())
}

/// The run's network namespace name.
pub fn netns_name(run_id: &str) -> String {
    format!("il-{run_id}")
}

/// Resolves `fut` unless `cancel` fires first.
async fn cancellable<T>(
    cancel: &CancellationToken,
    fut: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        () = cancel.cancelled() => Err(anyhow::anyhow!("cancelled")),
    }
}

fn check_cancel(cancel: &CancellationToken) -> anyhow::Result<()> {
    if cancel.is_cancelled() {
        anyhow::bail!("cancelled");
    }
    Ok(())
}

fn write_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    fs_err::write(&tmp, data)?;
    fs_err::rename(&tmp, path)?;
    Ok(())
}

impl RunManager {
    /// A manager for runs under `runs_dir` (`pool/runs`); runs get no uplink.
    pub fn new(
        runs_dir: PathBuf,
        runtime: Arc<dyn MachineRuntime>,
        drives: Arc<dyn DriveProvider>,
    ) -> Arc<Self> {
        Self::with_net(runs_dir, runtime, drives, NetConfig::default())
    }

    /// A manager for runs under `runs_dir` (`pool/runs`), with runs' uplinks per `net`.
    pub fn with_net(
        runs_dir: PathBuf,
        runtime: Arc<dyn MachineRuntime>,
        drives: Arc<dyn DriveProvider>,
        net: NetConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            net: Networks::new(net, runs_dir.clone()),
            runs_dir,
            runtime,
            drives,
            runs: Mutex::new(HashMap::new()),
            tasks: crate::tasks::TaskRelay::new(),
            snapshots: std::sync::OnceLock::new(),
        })
    }

    /// Uploads stopped runs' drives to `snapshots` and restores them from it (call before
    /// [`Self::recover`]; only the first call counts).
    pub fn set_snapshots(&self, snapshots: Arc<snapshots::Snapshots>) {
        let _ = self.snapshots.set(snapshots);
    }

    /// The off-host snapshot store, when configured.
    pub fn snapshots(&self) -> Option<&Arc<snapshots::Snapshots>> {
        self.snapshots.get()
    }

    /// The task relay (tasks of running runs).
    pub fn tasks(&self) -> &Arc<crate::tasks::TaskRelay> {
        &self.tasks
    }

    /// Starts relaying the tasks of a run whose machines are up.
    fn relay_tasks(&self, plan: &RunPlan) {
        let sockets = plan
            .machines
            .iter()
            .map(|m| {
                let h = MachineHandle::new(&self.runs_dir, &plan.run_id, &m.name);
                (m.name.clone(), self.runtime.agent(&h).socket)
            })
            .collect();
        self.tasks.start(plan, sockets);
    }

    /// Runtimes the worker offers (`container`, `microvm`).
    pub fn runtimes(&self) -> Vec<String> {
        self.runtime.runtimes()
    }

    /// The microVM accelerator: `kvm`, `tcg`, or `none` without microVMs.
    pub fn accel(&self) -> String {
        self.runtime.accel()
    }

    /// The directory holding the runs.
    pub fn runs_dir(&self) -> &Path {
        &self.runs_dir
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Run>>> {
        // A poisoned map is still consistent: every critical section is a single insert/remove.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get_run(&self, run_id: &str) -> Option<Arc<Run>> {
        self.lock().get(run_id).cloned()
    }

    /// Number of runs held.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// Creates and starts a run (idempotent: the same plan again returns the same run).
    pub fn create(self: &Arc<Self>, plan: RunPlan) -> Result<RunStatus, RunError> {
        validate_plan(&plan.run_id.clone(), &plan)?;
        let offered = self.runtime.runtimes();
        for (i, m) in plan.machines.iter().enumerate() {
            if m.runtime == "microvm" && !offered.iter().any(|r| r == "microvm") {
                return Err(RunError::BadRequest(format!(
                    "machines[{i}].runtime \"microvm\" is not available on this worker (it runs: {})",
                    offered.join(", ")
                )));
            }
        }
        let run = {
            let mut runs = self.lock();
            if let Some(existing) = runs.get(&plan.run_id) {
                if existing.is_destroying() {
                    return Err(RunError::Conflict(format!(
                        "run {} is being destroyed; retry when the DELETE returned",
                        plan.run_id
                    )));
                }
                if existing.plan != plan {
                    return Err(RunError::Conflict(format!(
                        "run {} already exists with a different plan",
                        plan.run_id
                    )));
                }
                return Ok(existing.status.borrow().clone());
            }
            let run = Run::new(plan, ObservedState::Starting, self.runtime.name());
            runs.insert(run.plan.run_id.clone(), run.clone());
            run
        };
        let status = run.status.borrow().clone();
        let this = self.clone();
        let r = run.clone();
        let task = tokio::spawn(async move { this.start_run(r).await });
        *run.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        tracing::info!(run = %run.plan.run_id, machines = run.plan.machines.len(), "run created");
        Ok(status)
    }

    async fn start_run(self: Arc<Self>, run: Arc<Run>) {
        let run_id = run.plan.run_id.clone();
        let t0 = std::time::Instant::now();
        match self.start_all(&run).await {
            Ok(()) => {
                self.relay_tasks(&run.plan);
                run.status.send_modify(|s| {
                    s.state = ObservedState::Running;
                    s.error = None;
                });
                tracing::info!(run = %run_id, elapsed_ms = t0.elapsed().as_millis() as u64, "run ready");
            }
            Err(_) if run.cancel.is_cancelled() => {
                tracing::info!(run = %run_id, "start cancelled");
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(run = %run_id, "start failed: {msg}");
                if let Err(te) = self.teardown(&run_id, Some(&run.plan)).await {
                    tracing::warn!(run = %run_id, "teardown after failure: {te:#}");
                }
                run.status.send_modify(|s| {
                    s.state = ObservedState::Failed;
                    s.error = Some(msg);
                    for m in &mut s.machines {
                        if m.state == ObservedState::Starting {
                            m.state = ObservedState::Failed;
                        }
                    }
                });
            }
        }
    }

    async fn start_all(self: &Arc<Self>, run: &Arc<Run>) -> anyhow::Result<()> {
        let run_id = &run.plan.run_id;
        let run_dir = self.runs_dir.join(run_id);
        fs_err::create_dir_all(&run_dir)?;
        write_atomic(
            &run_dir.join("plan.json"),
            &serde_json::to_vec_pretty(&run.plan)?,
        )?;
        // Created by the first machine that needs it (after its image is ready): the run's
        // namespace, and with networks in the plan, every machine's own namespace too.
        let netns = tokio::sync::OnceCell::<MachineNamespaces>::new();
        let netns = &netns;
        check_cancel(&run.cancel)?;

        // Machines start in parallel; the first failure cancels the others at their next
        // cancellation point (never in the middle of a runtime command).
        let failed = run.cancel.child_token();
        let results = futures::future::join_all(run.plan.machines.iter().map(|m| {
            let failed = failed.clone();
            async move {
                let r = self.start_machine(run, m, netns, &failed).await;
                match &r {
                    Ok(()) => run.set_machine(&m.name, ObservedState::Running, None),
                    Err(e) => {
                        failed.cancel();
                        if !run.cancel.is_cancelled() {
                            run.set_machine(&m.name, ObservedState::Failed, Some(format!("{e:#}")));
                        }
                    }
                }
                r.map_err(|e| (m.name.clone(), e))
            }
        }))
        .await;
        // Report the first real error (not a "cancelled" caused by a sibling's failure).
        let mut first: Option<anyhow::Error> = None;
        for r in results {
            if let Err((name, e)) = r {
                let cancelled = format!("{e}") == "cancelled";
                let e = e.context(format!("machine {name}"));
                if first.is_none()
                    || (!cancelled
                        && first
                            .as_ref()
                            .is_some_and(|f| format!("{f:#}").ends_with("cancelled")))
                {
                    first = Some(e);
                }
            }
        }
        if let Some(e) = first {
            return Err(e);
        }
        check_cancel(&run.cancel)?;
        write_atomic(&run_dir.join("ready"), b"")?;
        Ok(())
    }

    async fn start_machine(
        &self,
        run: &Arc<Run>,
        m: &MachinePlan,
        netns: &tokio::sync::OnceCell<MachineNamespaces>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let run_id = run.plan.run_id.clone();
        let name = m.name.clone();
        let progress: Progress = {
            let (run_id, name) = (run_id.clone(), name.clone());
            Arc::new(move |line: String| tracing::info!(run = %run_id, machine = %name, "{line}"))
        };
        let t0 = std::time::Instant::now();
        let image = match &m.image {
            ImageRef::Saved { id, machine } => self.saved_image(id, machine)?,
            other => cancellable(cancel, self.drives.image(other, progress)).await?,
        };
        check_cancel(cancel)?;
        let t_image = t0.elapsed();
        let handle = MachineHandle::new(&self.runs_dir, &run_id, &m.name);
        fs_err::create_dir_all(&handle.dir)?;
        let root = handle.dir.join("root.ext4");
        let size = m.root_size_bytes.max(image.size);
        self.drives
            .clone_root(&image, &root, size)
            .await
            .with_context(|| {
                format!("cannot prepare the root drive from image {}", image.digest)
            })?;
        // The drive it grew from: restores from the snapshot store take unchanged chunks from it.
        write_atomic(
            &handle.dir.join(snapshots::BASE_DRIVE),
            image.path.to_string_lossy().as_bytes(),
        )?;
        check_cancel(cancel)?;
        let t_drive = t0.elapsed();
        let namespaces = netns
            .get_or_try_init(|| self.setup_network(&run.plan))
            .await?;
        let (netns, etc_hosts, resolv_conf, net) = namespaces.for_machine(&m.name)?;
        let spec = MachineSpec {
            run_id: run_id.clone(),
            plan: m.clone(),
            dir: handle.dir.clone(),
            root_drive: root,
            netns,
            image_env: image.env.clone(),
            etc_hosts,
            resolv_conf,
            net,
            fresh_from: Some(image.path.clone()),
        };
        write_atomic(
            &handle.dir.join("image-env.json"),
            &serde_json::to_vec(&image.env)?,
        )?;
        let handle = self.runtime.start(&spec).await?;
        let t_start = t0.elapsed();
        let mut client = cancellable(cancel, self.wait_agent(&handle)).await?;
        let t_agent = t0.elapsed();
        let provision = async {
            if !m.users.is_empty() {
                client
                    .ensure_users(EnsureUsersRequest {
                        names: m.users.clone(),
                        sudo: true,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))
                    .with_context(|| format!("cannot create users {:?}", m.users))?;
            }
            for f in &m.files {
                client
                    .put_file(PutFileRequest {
                        path: f.path.clone(),
                        content: f.content.clone().into_bytes(),
                        mode: f.mode,
                        owner: f.owner.clone(),
                        append: f.append,
                    })
                    .await
                    .map_err(|s| anyhow::anyhow!("{}", s.message()))
                    .with_context(|| format!("cannot write startup file {}", f.path))?;
            }
            anyhow::Ok(())
        };
        cancellable(cancel, async {
            tokio::time::timeout(PROVISION_TIMEOUT, provision)
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "the agent did not finish creating users and startup files within {} s",
                        PROVISION_TIMEOUT.as_secs()
                    )
                })?
        })
        .await?;
        let ms = |d: Duration| d.as_millis() as u64;
        tracing::info!(
            run = %run_id,
            machine = %m.name,
            image_ms = ms(t_image),
            drive_ms = ms(t_drive - t_image),
            start_ms = ms(t_start - t_drive),
            agent_ms = ms(t_agent - t_start),
            provision_ms = ms(t0.elapsed() - t_agent),
            "machine ready"
        );
        run.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(m.name.clone(), client);
        Ok(())
    }

    /// The run's namespace; with networks in the plan, also bridges, machine namespaces,
    /// uplink, rules and resolver.
    async fn setup_network(&self, plan: &RunPlan) -> anyhow::Result<MachineNamespaces> {
        if plan.networks.is_empty() {
            let run = host::ensure_netns(&netns_name(&plan.run_id)).await?;
            return Ok(MachineNamespaces {
                run,
                machines: Default::default(),
                layout: None,
            });
        }
        let layout = net::layout::Layout::new(plan)
            .map_err(|e| anyhow::anyhow!("invalid network plan: {e}"))?;
        let machines = self.net.setup(plan).await?;
        Ok(MachineNamespaces {
            run: host::netns_path(&netns_name(&plan.run_id)),
            machines,
            layout: Some(layout),
        })
    }

    /// Waits until the machine's agent answers `Health`, failing early if the machine stops.
    async fn wait_agent(&self, m: &MachineHandle) -> anyhow::Result<Agent> {
        let socket = self.runtime.agent(m).socket;
        let timeout = self.runtime.agent_timeout(m);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last_observe = tokio::time::Instant::now();
        let mut last_err = String::from("socket did not appear");
        loop {
            if socket.exists() {
                match agent_client::health(&socket, Duration::from_secs(2)).await {
                    Ok((client, h)) => {
                        tracing::debug!(machine = %m.machine, version = %h.version, "agent answered");
                        return Ok(client);
                    }
                    Err(e) => last_err = format!("{e:#}"),
                }
            }
            if last_observe.elapsed() > Duration::from_millis(250) {
                last_observe = tokio::time::Instant::now();
                if self.runtime.observe(m).await? != MachineState::Running {
                    match self.runtime.exit_reason(m) {
                        Some(why) => anyhow::bail!(
                            "the machine stopped before its agent answered: {why} (console.log: {})",
                            tail(&m.console_log(), 10)
                        ),
                        None => anyhow::bail!(
                            "the machine stopped before its agent answered (console.log: {})",
                            tail(&m.console_log(), 10)
                        ),
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "agent did not answer within {} s ({last_err}; see console.log: {})",
                    timeout.as_secs(),
                    tail(&m.console_log(), 10)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Where console logs of runs that are gone are kept: `pool/logs/<run>/<machine>.log`.
    fn logs_dir(&self) -> PathBuf {
        self.runs_dir
            .parent()
            .unwrap_or(&self.runs_dir)
            .join("logs")
    }

    /// Copies the end of each machine's console log of `run_id` out of the run directory (so a
    /// failed run's log can still be read), and drops logs older than [`CONSOLE_RETENTION`].
    fn retain_console_logs(&self, run_id: &str, names: &[String]) {
        let logs = self.logs_dir();
        for n in names {
            let src = self.runs_dir.join(run_id).join(n).join("console.log");
            let Ok(data) = std::fs::read(&src) else {
                continue;
            };
            let keep = CONSOLE_KEEP as usize;
            let tail = &data[data.len().saturating_sub(keep)..];
            let dir = logs.join(run_id);
            if let Err(e) = fs_err::create_dir_all(&dir)
                .and_then(|()| fs_err::write(dir.join(format!("{n}.log")), tail))
            {
                tracing::warn!(run = %run_id, machine = %n, "cannot keep the console log: {e}");
            }
        }
        if let Ok(rd) = std::fs::read_dir(&logs) {
            for e in rd.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > CONSOLE_RETENTION);
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// The last `max` bytes of the console log of `machine` in `run_id`: live while the run is
    /// on this worker, else the copy kept at teardown.
    pub fn console_log(&self, run_id: &str, machine: &str, max: u64) -> Result<Vec<u8>, RunError> {
        if !valid_run_id(run_id) || !valid_machine_name(machine) {
            return Err(RunError::BadRequest(format!(
                "run {run_id:?} / machine {machine:?} is not a valid name"
            )));
        }
        let live = MachineHandle::new(&self.runs_dir, run_id, machine).console_log();
        let kept = self.logs_dir().join(run_id).join(format!("{machine}.log"));
        let data = std::fs::read(&live)
            .or_else(|_| std::fs::read(&kept))
            .map_err(|_| {
                RunError::NotFound(format!(
                    "no console log of machine {machine} in run {run_id} on this worker"
                ))
            })?;
        let max = max as usize;
        Ok(data[data.len().saturating_sub(max)..].to_vec())
    }

    /// Removes everything of a run on the host: machines, namespace, cgroup, files.
    async fn teardown(&self, run_id: &str, plan: Option<&RunPlan>) -> anyhow::Result<()> {
        let run_dir = self.runs_dir.join(run_id);
        let mut names: Vec<String> = plan
            .map(|p| p.machines.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default();
        if let Ok(rd) = std::fs::read_dir(&run_dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let n = e.file_name().to_string_lossy().into_owned();
                    // Not a machine: the network's files (`_net`), torn down below.
                    if !names.contains(&n) && valid_machine_name(&n) {
                        names.push(n);
                    }
                }
            }
        }
        self.retain_console_logs(run_id, &names);
        let mut errors = Vec::new();
        let results = futures::future::join_all(names.iter().map(|n| {
            let h = MachineHandle::new(&self.runs_dir, run_id, n);
            async move { self.runtime.destroy(&h).await }
        }))
        .await;
        for r in results {
            if let Err(e) = r {
                errors.push(format!("{:#}", anyhow::Error::from(e)));
            }
        }
        if let Err(e) = self.net.teardown(run_id).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = host::delete_netns(&netns_name(run_id)).await {
            errors.push(format!("{e:#}"));
        }
        let _ = host::remove_cgroup_if_empty(&format!("ironlab/{run_id}"));
        if errors.is_empty() {
            match host::mounts_under(&run_dir) {
                Ok(m) if m.is_empty() => match std::fs::remove_dir_all(&run_dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => errors.push(format!("cannot remove {}: {e}", run_dir.display())),
                },
                Ok(m) => errors.push(format!("{} still has mounts: {m:?}", run_dir.display())),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if errors.is_empty() {
            tracing::info!(run = %run_id, "torn down");
            Ok(())
        } else {
            anyhow::bail!("cannot fully remove run {run_id}: {}", errors.join("; "))
        }
    }

    /// Destroys a run and everything it holds (idempotent). A destroy during start cancels the
    /// start first.
    pub async fn destroy(&self, run_id: &str) -> Result<(), RunError> {
        if !valid_run_id(run_id) {
            return Err(RunError::BadRequest(format!(
                "run id {run_id:?} is invalid: 1-12 characters [a-z0-9]"
            )));
        }
        let Some(run) = self.get_run(run_id) else {
            // Not held, but files may remain (e.g. a failed recovery): clean them.
            let had_snapshot = self.snapshots().is_some_and(|s| s.record(run_id).is_some());
            self.forget_snapshot(run_id)?;
            if self.runs_dir.join(run_id).exists() {
                self.teardown(run_id, None).await?;
            }
            if had_snapshot {
                self.collect_snapshots();
            }
            return Ok(());
        };
        run.destroying
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut done = run.destroy_lock.lock().await;
        if *done {
            return Ok(());
        }
        run.cancel.cancel();
        self.tasks.stop(run_id);
        let task = run.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task
            && let Err(e) = task.await
        {
            tracing::warn!(run = %run_id, "start task ended abnormally: {e}");
        }
        // Wait for a stop, clone or save of this run in progress.
        let _op = run.op.clone().lock_owned().await;
        run.agents.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.cancel_upload(&run).await;
        let had_snapshot = self.snapshots().is_some_and(|s| s.record(run_id).is_some());
        self.forget_snapshot(run_id)?;
        self.teardown(run_id, Some(&run.plan)).await?;
        *done = true;
        self.lock().remove(run_id);
        tracing::info!(run = %run_id, "destroyed");
        if had_snapshot {
            self.collect_snapshots();
        }
        Ok(())
    }

    /// The observed status of a run (checks that running machines still run).
    pub async fn status(&self, run_id: &str) -> Result<RunStatus, RunError> {
        let run = self
            .get_run(run_id)
            .ok_or_else(|| RunError::NotFound(format!("run {run_id} is not on this worker")))?;
        self.refresh_storage(&run).await;
        if run.status.borrow().state == ObservedState::Running && !run.is_destroying() {
            for m in &run.plan.machines {
                let h = MachineHandle::new(&self.runs_dir, run_id, &m.name);
                let st = self
                    .runtime
                    .observe(&h)
                    .await
                    .map_err(anyhow::Error::from)?;
                if st != MachineState::Running {
                    let msg = match self.runtime.exit_reason(&h) {
                        Some(why) => format!(
                            "machine {} is no longer running: {why} (console.log: {})",
                            m.name,
                            tail(&h.console_log(), 5)
                        ),
                        None => format!(
                            "machine {} is no longer running (console.log: {})",
                            m.name,
                            tail(&h.console_log(), 5)
                        ),
                    };
                    run.set_machine(&m.name, ObservedState::Failed, Some(msg.clone()));
                    run.status.send_modify(|s| {
                        s.state = ObservedState::Failed;
                        s.error = Some(msg);
                    });
                }
            }
        }
        let status = run.status.borrow().clone();
        Ok(status)
    }

    /// Like [`Self::status`], but first waits up to `wait` while the run is `starting`.
    pub async fn wait_status(&self, run_id: &str, wait: Duration) -> Result<RunStatus, RunError> {
        let run = self
            .get_run(run_id)
            .ok_or_else(|| RunError::NotFound(format!("run {run_id} is not on this worker")))?;
        let mut rx = run.status.subscribe();
        let _ = tokio::time::timeout(
            wait,
            rx.wait_for(|s| !matches!(s.state, ObservedState::Starting | ObservedState::Stopping)),
        )
        .await;
        drop(rx);
        self.status(run_id).await
    }

    /// An agent client for `machine` of a running run, and the user terminals open as.
    pub async fn machine_agent(
        &self,
        run_id: &str,
        machine: &str,
    ) -> Result<MachineAgent, RunError> {
        let run = self
            .get_run(run_id)
            .ok_or_else(|| RunError::NotFound(format!("run {run_id} is not on this worker")))?;
        let Some(plan) = run.machine(machine) else {
            return Err(RunError::NotFound(format!(
                "run {run_id} has no machine {machine:?}"
            )));
        };
        let state = run.status.borrow().state;
        if state != ObservedState::Running || run.is_destroying() {
            return Err(RunError::Conflict(format!(
                "run {run_id} is {}, not running",
                if run.is_destroying() {
                    "being destroyed".to_string()
                } else {
                    format!("{state:?}").to_lowercase()
                }
            )));
        }
        let default_user = plan.default_user.clone();
        let cached = run
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(machine)
            .cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let h = MachineHandle::new(&self.runs_dir, run_id, machine);
                let c = agent_client::connect(&self.runtime.agent(&h).socket)
                    .await
                    .with_context(|| format!("cannot reach the agent of machine {machine}"))?;
                run.agents
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(machine.to_string(), c.clone());
                c
            }
        };
        let env_file = MachineHandle::new(&self.runs_dir, run_id, machine)
            .dir
            .join("image-env.json");
        let image_env: Vec<String> = match std::fs::read(&env_file) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        Ok(MachineAgent {
            client,
            default_user,
            image_env: session_env(&image_env),
        })
    }

    /// Whether `machine` is part of run `run_id` (for 404s before token checks).
    pub fn has_machine(&self, run_id: &str, machine: &str) -> Result<(), RunError> {
        let run = self
            .get_run(run_id)
            .ok_or_else(|| RunError::NotFound(format!("run {run_id} is not on this worker")))?;
        if run.machine(machine).is_none() {
            return Err(RunError::NotFound(format!(
                "run {run_id} has no machine {machine:?}"
            )));
        }
        Ok(())
    }

    /// Rediscovers runs at worker start: keeps ready runs whose machines run and whose agents
    /// answer; keeps stopped runs, finishing an interrupted stop or undoing an interrupted
    /// restart; keeps ready runs whose machines died as stopped; tears down everything else;
    /// removes interrupted clones and saves; then removes host objects of no run.
    pub async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        fs_err::create_dir_all(&self.runs_dir)?;
        self.clean_temporaries();
        let mut keep = Vec::new();
        for e in fs_err::read_dir(&self.runs_dir)?.flatten() {
            let run_id = e.file_name().to_string_lossy().into_owned();
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) || !valid_run_id(&run_id) {
                tracing::warn!(path = %e.path().display(), "ignoring unexpected entry in the runs directory");
                continue;
            }
            let dir = self.runs_dir.join(&run_id);
            let persisted = lifecycle::read_lifecycle(&dir);
            let probe = match persisted {
                Some(_) => Err(anyhow::anyhow!("stopped")),
                None => self.probe(&run_id).await,
            };
            let stopped_why = match (&persisted, &probe) {
                (Some(l), _) => Some((l != &lifecycle::Lifecycle::Stopped).then(|| {
                    format!(
                        "the worker restarted during {}",
                        format!("{l:?}").to_lowercase()
                    )
                })),
                (None, Err(reason)) if dir.join("ready").exists() => Some(Some(format!(
                    "its machines stopped while the worker was away ({reason:#})"
                ))),
                _ => None,
            };
            if let Some(why) = stopped_why {
                match self.recover_stopped(&run_id, why).await {
                    Ok(run) => {
                        tracing::info!(run = %run_id, "rediscovered stopped run");
                        self.lock().insert(run_id.clone(), run.clone());
                        self.snapshot_after_stop(&run);
                        keep.push(run_id);
                    }
                    Err(e) => {
                        tracing::warn!(run = %run_id, "cannot recover stopped run (its files are kept): {e:#}")
                    }
                }
                continue;
            }
            match probe {
                Ok(plan) => {
                    tracing::info!(run = %run_id, "rediscovered running run");
                    self.relay_tasks(&plan);
                    let run = Run::new(plan, ObservedState::Running, self.runtime.name());
                    self.lock().insert(run_id.clone(), run);
                    keep.push(run_id);
                }
                Err(reason) => {
                    tracing::info!(run = %run_id, "tearing down: {reason:#}");
                    let plan = read_plan(&self.runs_dir.join(&run_id)).ok();
                    if let Err(e) = self.teardown(&run_id, plan.as_ref()).await {
                        tracing::warn!(run = %run_id, "{e:#}");
                    }
                }
            }
        }
        for run in self.recreate_from_snapshots(&keep) {
            keep.push(run.plan.run_id.clone());
        }
        self.clean_leftovers(&keep).await
    }

    async fn probe(&self, run_id: &str) -> anyhow::Result<RunPlan> {
        let dir = self.runs_dir.join(run_id);
        let plan = read_plan(&dir)?;
        if plan.run_id != run_id {
            anyhow::bail!("plan.json names run {}", plan.run_id);
        }
        if !dir.join("ready").exists() {
            anyhow::bail!("it never became ready");
        }
        for m in &plan.machines {
            let h = MachineHandle::new(&self.runs_dir, run_id, &m.name);
            let st = self.runtime.observe(&h).await?;
            if st != MachineState::Running {
                anyhow::bail!("machine {} is {st:?}", m.name);
            }
            // A microVM's proxy answers UNAVAILABLE until the guest's agent has re-made its
            // serial session with this new worker (slow while a TCG guest is busy booting):
            // ask again until the runtime's recovery time is up.
            let timeout = self.runtime.recover_timeout(&h);
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match agent_client::health(&self.runtime.agent(&h).socket, timeout).await {
                    Ok(_) => break,
                    Err(e)
                        if tokio::time::Instant::now() < deadline
                            && e.downcast_ref::<tonic::Status>()
                                .is_some_and(|s| s.code() == tonic::Code::Unavailable) =>
                    {
                        tracing::debug!(run = %run_id, machine = %m.name, "agent not back yet: {e:#}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(e.context(format!("machine {}", m.name))),
                }
            }
        }
        if !plan.networks.is_empty() {
            self.net.ensure(&plan).await.context("its network")?;
        }
        Ok(plan)
    }

    async fn clean_leftovers(&self, keep: &[String]) -> anyhow::Result<()> {
        if let Err(e) = self.runtime.clean_leftovers(&self.runs_dir, keep).await {
            tracing::warn!("cleaning runtime leftovers: {e:#}");
        }
        let has_machines = async |run: &str| self.runtime_has_run(run).await;
        if let Err(e) = self.net.clean_leftovers(keep, has_machines).await {
            tracing::warn!("cleaning network leftovers: {e:#}");
        }
        // Namespaces and cgroups carry no owner; only remove those of no run here that are old
        // enough not to belong to a run another worker on this host is starting right now.
        let old = |p: &Path| {
            std::fs::symlink_metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(60))
        };
        for ns in host::list_netns() {
            let Some(run_id) = ns.strip_prefix("il-") else {
                continue;
            };
            if keep.iter().any(|k| k == run_id) || self.runs_dir.join(run_id).exists() {
                continue;
            }
            if old(&host::netns_path(&ns)) && !self.runtime_has_run(run_id).await {
                tracing::info!(netns = %ns, "removing leftover network namespace");
                if let Err(e) = host::delete_netns(&ns).await {
                    tracing::warn!("{e:#}");
                }
            }
        }
        for run_id in host::cgroup_children("ironlab") {
            if keep.contains(&run_id) || self.runs_dir.join(&run_id).exists() {
                continue;
            }
            let dir = host::cgroup_dir("memory", &format!("ironlab/{run_id}"));
            if (old(&dir) || !dir.exists()) && !self.runtime_has_run(&run_id).await {
                tracing::info!(run = %run_id, "removing leftover cgroups");
                if let Err(e) = host::remove_cgroup(&format!("ironlab/{run_id}")) {
                    tracing::warn!("{e:#}");
                }
            }
        }
        Ok(())
    }

    /// Whether any machine of `run_id` (of any worker on this host) is known to the runtime
    /// (when unsure: yes, so nothing is removed).
    async fn runtime_has_run(&self, run_id: &str) -> bool {
        self.runtime.knows_run(run_id).await.unwrap_or(true)
    }

    /// Destroys every run (used by tests and shutdown-with-cleanup callers).
    pub async fn destroy_all(&self) -> Result<(), RunError> {
        let ids: Vec<String> = self.lock().keys().cloned().collect();
        for id in ids {
            self.destroy(&id).await?;
        }
        Ok(())
    }
}

/// A machine's namespace, `/etc/hosts`, `/etc/resolv.conf` and interfaces.
type MachineNetSpec = (
    PathBuf,
    Option<String>,
    Option<String>,
    Option<net::layout::MachineNet>,
);

/// The namespaces machines of a run join.
struct MachineNamespaces {
    /// The run's namespace (`il-<run>`): every machine's when the plan has no networks.
    run: PathBuf,
    /// Each machine's own namespace (plans with networks).
    machines: std::collections::BTreeMap<String, PathBuf>,
    /// The network layout (plans with networks).
    layout: Option<net::layout::Layout>,
}

impl MachineNamespaces {
    /// The namespace machine `name` joins, and its `/etc/hosts`, `/etc/resolv.conf` and
    /// interfaces (plans with networks).
    fn for_machine(&self, name: &str) -> anyhow::Result<MachineNetSpec> {
        Ok(match &self.layout {
            Some(l) => (
                self.machines
                    .get(name)
                    .cloned()
                    .with_context(|| format!("no network namespace for {name}"))?,
                Some(l.hosts_file(name)),
                Some(l.resolv_conf(name)),
                l.machines.iter().find(|m| m.machine == name).cloned(),
            ),
            None => (self.run.clone(), None, None, None),
        })
    }
}

fn read_plan(dir: &Path) -> anyhow::Result<RunPlan> {
    let p = dir.join("plan.json");
    let text = fs_err::read(&p)?;
    serde_json::from_slice(&text).with_context(|| format!("cannot parse {}", p.display()))
}

#[cfg(test)]
mod tests {
    use ironlab_api::worker::ImageRef;

    use super::*;

    fn plan(id: &str) -> RunPlan {
        RunPlan {
            run_id: id.into(),
            machines: vec![MachinePlan {
                name: "m1".into(),
                runtime: "container".into(),
                image: ImageRef::Stock {
                    name: "debian".into(),
                },
                root_size_bytes: 1 << 30,
                cpus: 1,
                memory_bytes: 256 << 20,
                pids_limit: 100,
                users: vec![],
                default_user: "root".into(),
                files: vec![],
                tasks: vec![],
                interfaces: vec![],
            }],
            networks: vec![],
            egress: Default::default(),
        }
    }

    #[test]
    fn run_ids() {
        assert!(valid_run_id("abc123def456"));
        assert!(!valid_run_id("abc123def4567"));
        assert!(!valid_run_id(""));
        assert!(!valid_run_id("ABC"));
        assert!(!valid_run_id("../x"));
    }

    #[test]
    fn plan_validation_names_the_field() {
        assert!(validate_plan("abc", &plan("abc")).is_ok());
        let e = validate_plan("abd", &plan("abc")).expect_err("mismatch");
        assert!(e.to_string().contains("does not match"));
        let mut p = plan("abc");
        p.machines[0].runtime = "firecracker".into();
        let e = validate_plan("abc", &p).expect_err("runtime");
        assert!(e.to_string().contains("machines[0].runtime"));
        p.machines[0].runtime = "microvm".into();
        assert!(
            validate_plan("abc", &p).is_ok(),
            "availability is checked by create"
        );
        let mut p = plan("abc");
        p.machines.push(p.machines[0].clone());
        let e = validate_plan("abc", &p).expect_err("dup");
        assert!(e.to_string().contains("used twice"));
        let mut p = plan("abc");
        p.machines[0].name = "Bad_Name".into();
        assert!(validate_plan("abc", &p).is_err());
        let mut p = plan("abc");
        p.machines[0].files.push(ironlab_api::worker::FilePlan {
            path: "etc/motd".into(),
            content: String::new(),
            mode: 0o644,
            owner: String::new(),
            append: false,
        });
        assert!(
            validate_plan("abc", &p)
                .expect_err("relative")
                .to_string()
                .contains("files[0].path")
        );
    }
}
