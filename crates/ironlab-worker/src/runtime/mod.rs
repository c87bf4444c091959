//! Machine runtimes: one implementation per backend (`container` now, `microvm` later), the same
//! in-machine agent on both. The run manager (`runs.rs`) prepares drives and the network
//! namespace and hands them to a runtime; the runtime starts, observes and destroys machines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use ironlab_api::worker::MachinePlan;

pub mod container;

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
