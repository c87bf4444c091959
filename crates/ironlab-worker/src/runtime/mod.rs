//! Machine runtimes: one implementation per backend (`container` now, `microvm` later), the same
//! in-machine agent on both. The run manager (`runs.rs`) prepares drives and the network
//! namespace and hands them to a runtime; the runtime starts, observes and destroys machines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use ironlab_api::worker::MachinePlan;

pub mod container;
pub mod vm;

/// Everything a runtime needs to start one machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// Run id.
    pub run_id: String,
    /// The machine as planned by the control plane.
    pub plan: MachinePlan,
    /// The machine's directory: `pool/runs/<run>/<machine>/`.
    pub dir: PathBuf,
    /// The prepared root drive (ext4 file), normally `dir/root.ext4`.
    pub root_drive: PathBuf,
    /// The network namespace the machine joins: its own (`/var/run/netns/ilm-<run>-<machine>`)
    /// when the plan has networks, else the run's (`/var/run/netns/il-<run>`).
    pub netns: PathBuf,
    /// Environment from the image config (`KEY=VALUE`).
    pub image_env: Vec<String>,
    /// `/etc/hosts` to write (plans with networks); `None`: localhost and the hostname only.
    pub etc_hosts: Option<String>,
    /// `/etc/resolv.conf` to write (plans with networks); `None`: the image's is kept.
    pub resolv_conf: Option<String>,
    /// The machine's interfaces, addresses and default route (plans with networks): a microVM
    /// guest configures them itself (a container's namespace already has them).
    pub net: Option<crate::net::layout::MachineNet>,
    /// The image drive `root_drive` was just cloned from (a fresh start: nothing of the user's
    /// is on the drive yet). `None` for restarts. A microVM runtime may then replace the drive
    /// by a boot template's (the same image, booted) and restore the template's RAM.
    pub fresh_from: Option<PathBuf>,
}

/// Names a machine on the host. Derivable from names alone, so teardown works after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineHandle {
    /// Run id.
    pub run_id: String,
    /// Machine name.
    pub machine: String,
    /// The machine's directory.
    pub dir: PathBuf,
}

impl MachineHandle {
    /// The handle of `machine` of `run` under `runs_dir` (`pool/runs`).
    pub fn new(runs_dir: &Path, run_id: &str, machine: &str) -> Self {
        Self {
            run_id: run_id.to_string(),
            machine: machine.to_string(),
            dir: runs_dir.join(run_id).join(machine),
        }
    }

    /// The host side of the agent socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent").join("agent.sock")
    }

    /// The machine's console log (stdout/stderr of its init).
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// What a runtime observes about a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineState {
    /// Its init process runs.
    Running,
    /// It exists but its init has exited (or it was created and not started).
    Stopped,
    /// The runtime does not know it.
    Missing,
}

/// Where the worker reaches a machine's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEndpoint {
    /// A unix socket on the host.
    pub socket: PathBuf,
}

/// A runtime operation failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} machine {id}")]
pub struct RuntimeError {
    /// What was attempted (`start`, `destroy`, …).
    pub action: &'static str,
    /// The machine (container id).
    pub id: String,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl RuntimeError {
    /// Wraps an error.
    pub fn new(
        action: &'static str,
        id: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            action,
            id: id.into(),
            source: source.into(),
        }
    }
}

/// A machine backend.
#[async_trait]
pub trait MachineRuntime: Send + Sync {
    /// `container` or `microvm`.
    fn name(&self) -> &'static str;
    /// Starts a machine; returns once its init runs (the agent may still be starting).
    async fn start(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError>;
    /// Stops a machine, keeping its drives: SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<(), RuntimeError>;
    /// Releases what the runtime made for a stopped (or dead) machine — container, mounts,
    /// loop devices, cgroups — keeping its directory and its drives (idempotent). Returns once
    /// no drive of the machine is in use, so its files can be reflinked or restarted.
    async fn release(&self, m: &MachineHandle) -> Result<(), RuntimeError>;
    /// Removes a machine and everything the runtime made for it (idempotent).
    async fn destroy(&self, m: &MachineHandle) -> Result<(), RuntimeError>;
    /// Observes a machine.
    async fn observe(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError>;
    /// Where its agent listens.
    fn agent(&self, m: &MachineHandle) -> AgentEndpoint;
    /// Whether the runtime holds any machine of run `run_id` (on this host, any worker).
    async fn knows_run(&self, run_id: &str) -> anyhow::Result<bool>;
    /// Removes runtime objects that belong to no known machine: those of runs under `runs_dir`
    /// that are not in `keep` (run ids).
    async fn clean_leftovers(&self, runs_dir: &Path, keep: &[String]) -> anyhow::Result<()>;
    /// How long the agent of the started machine `m` has to answer.
    fn agent_timeout(&self, _m: &MachineHandle) -> Duration {
        Duration::from_secs(20)
    }
    /// How long a worker starting up waits for the agent of a machine it rediscovers.
    fn recover_timeout(&self, _m: &MachineHandle) -> Duration {
        Duration::from_secs(3)
    }
    /// Why a machine that is not running ended, when the runtime can tell (`None`: the caller
    /// shows the console log).
    fn exit_reason(&self, _m: &MachineHandle) -> Option<String> {
        None
    }
    /// Runtimes offered (`container`, `microvm`).
    fn runtimes(&self) -> Vec<String> {
        vec![self.name().to_string()]
    }
    /// `kvm`, `tcg` or `none` (no microVMs).
    fn accel(&self) -> String {
        "none".to_string()
    }
}

/// Dispatches per machine: `microvm` machines to the VM runtime, everything else to containers.
/// A machine's directory says which runtime made it (`vm::VmRuntime::owns`), so teardown after
/// a crash reaches the right one.
pub struct Runtimes {
    container: std::sync::Arc<dyn MachineRuntime>,
    vm: Option<std::sync::Arc<vm::VmRuntime>>,
    /// Why there is no VM runtime (for error messages).
    vm_missing: String,
}

impl Runtimes {
    /// Containers plus, when available, microVMs (`vm_missing` says why not otherwise).
    pub fn new(
        container: std::sync::Arc<dyn MachineRuntime>,
        vm: Result<std::sync::Arc<vm::VmRuntime>, String>,
    ) -> Self {
        match vm {
            Ok(vm) => Runtimes {
                container,
                vm: Some(vm),
                vm_missing: String::new(),
            },
            Err(why) => Runtimes {
                container,
                vm: None,
                vm_missing: why,
            },
        }
    }

    fn pick(&self, m: &MachineHandle) -> &dyn MachineRuntime {
        match &self.vm {
            Some(vm) if vm::VmRuntime::owns(&m.dir) => vm.as_ref(),
            _ => self.container.as_ref(),
        }
    }
}

#[async_trait]
impl MachineRuntime for Runtimes {
    fn name(&self) -> &'static str {
        self.container.name()
    }
    async fn start(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        if spec.plan.runtime == "microvm" {
            return match &self.vm {
                Some(vm) => vm.start(spec).await,
                None => Err(RuntimeError::new(
                    "start",
                    format!("il-{}-{}", spec.run_id, spec.plan.name),
                    format!(
                        "microVMs are not available on this worker: {}",
                        self.vm_missing
                    ),
                )),
            };
        }
        self.container.start(spec).await
    }
    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<(), RuntimeError> {
        self.pick(m).stop(m, grace).await
    }
    async fn release(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        self.pick(m).release(m).await
    }
    async fn destroy(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        self.pick(m).destroy(m).await
    }
    async fn observe(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        self.pick(m).observe(m).await
    }
    fn agent(&self, m: &MachineHandle) -> AgentEndpoint {
        self.pick(m).agent(m)
    }
    async fn knows_run(&self, run_id: &str) -> anyhow::Result<bool> {
        if let Some(vm) = &self.vm
            && vm.knows_run(run_id).await?
        {
            return Ok(true);
        }
        self.container.knows_run(run_id).await
    }
    async fn clean_leftovers(&self, runs_dir: &Path, keep: &[String]) -> anyhow::Result<()> {
        if let Some(vm) = &self.vm
            && let Err(e) = vm.clean_leftovers(runs_dir, keep).await
        {
            tracing::warn!("cleaning microVM leftovers: {e:#}");
        }
        self.container.clean_leftovers(runs_dir, keep).await
    }
    fn agent_timeout(&self, m: &MachineHandle) -> Duration {
        self.pick(m).agent_timeout(m)
    }
    fn exit_reason(&self, m: &MachineHandle) -> Option<String> {
        self.pick(m).exit_reason(m)
    }
    fn recover_timeout(&self, m: &MachineHandle) -> Duration {
        self.pick(m).recover_timeout(m)
    }
    fn runtimes(&self) -> Vec<String> {
        let mut r = self.container.runtimes();
        if self.vm.is_some() {
            r.push("microvm".into());
        }
        r
    }
    fn accel(&self) -> String {
        match &self.vm {
            Some(vm) => vm.accel().as_str().to_string(),
            None => "none".to_string(),
        }
    }
}

/// The last `n` lines of a log file, for error messages ("" when unreadable).
pub fn tail(path: &Path, n: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
