//! The worker REST API (control plane → worker, `Authorization: Bearer <worker token>`).
//!
//! ```text
//! GET    /v1/status                                      WorkerStatus
//! PUT    /v1/runs/{run}        RunPlan                   202 RunStatus (idempotent: same plan, same run)
//! GET    /v1/runs/{run}                                  RunStatus | 404
//! DELETE /v1/runs/{run}                                  204 (idempotent; removes everything)
//! POST   /v1/runs/{run}/stop                             202 RunStatus (stopping → stopped; idempotent)
//! POST   /v1/runs/{run}/restart                          202 RunStatus (starting → running; idempotent)
//! POST   /v1/runs/{run}/clone  CloneRun                  201 RunStatus of the new, stopped run
//! POST   /v1/runs/{run}/save   SaveRun                   201 SavedDrives (the run must be stopped)
//! GET    /v1/saved                                       [SavedDrives]
//! DELETE /v1/saved/{id}                                  204 (idempotent)
//! POST   /v1/tokens            TokenGrant                204
//! GET    /v1/runs/{run}/tasks                            RunTasks (what the agents reported so far)
//! GET    /v1/runs/{run}/tasks/watch                      NDJSON: one TaskStatus per line (snapshot, then changes)
//! POST   /v1/runs/{run}/tasks/{name}/input  TaskInput    TaskInputResult
//! GET    /v1/runs/{run}/machines/{m}/terminal?token=T    WebSocket (see `relay`), no bearer
//! GET    /v1/runs/{run}/machines/{m}/port/{port}?token=T WebSocket (see `portfwd`), no bearer
//! ```

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use crate::v1::TaskState;

/// What a worker reports about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// ironlab version.
    pub version: String,
    /// `kvm` or `tcg` (or `none` when no VM runtime is available).
    pub accel: String,
    /// Runtimes this worker can run (`container`, `microvm`).
    pub runtimes: Vec<String>,
    /// Logical CPUs of the host.
    pub cpus: u32,
    /// Memory of the host in bytes.
    pub memory_bytes: u64,
    /// Runs the worker holds.
    pub runs: u32,
    /// Base URL clients use for terminal WebSockets (`ws://…` or `wss://…`).
    pub public_url: String,
}

/// Where the root drive of a machine comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImageRef {
    /// A stock image the worker knows by name (e.g. `debian`).
    Stock {
        /// Stock image name.
        name: String,
    },
    /// An OCI reference `REGISTRY/REPO:TAG` or `REGISTRY/REPO@sha256:…`.
    Oci {
        /// The reference without the `oci://` scheme.
        reference: String,
    },
    /// A drive saved from a stopped run (`POST /v1/runs/{run}/save`): read-only, in the
    /// worker's pool as `saved/<id>/<machine>.ext4`.
    Saved {
        /// The save's id.
        id: String,
        /// The machine of the saved run whose drive this is.
        machine: String,
    },
}

/// A file to write into the machine before the run is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePlan {
    /// Absolute path.
    pub path: String,
    /// Content.
    pub content: String,
    /// Mode bits.
    pub mode: u32,
    /// `user` or `user:group`; empty = root.
    #[serde(default)]
    pub owner: String,
    /// Append instead of overwrite.
    #[serde(default)]
    pub append: bool,
}

/// One machine, fully resolved by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachinePlan {
    /// Machine name (also the hostname).
    pub name: String,
    /// `container` or `microvm` (resolved from `auto` by the control plane).
    pub runtime: String,
    /// Root image.
    pub image: ImageRef,
    /// Root drive size in bytes (the image's drive is grown to this).
    pub root_size_bytes: u64,
    /// CPUs.
    pub cpus: u32,
    /// Memory limit in bytes.
    pub memory_bytes: u64,
    /// Process limit.
    pub pids_limit: u32,
    /// Users to ensure exist (besides root).
    #[serde(default)]
    pub users: Vec<String>,
    /// The user terminals open as.
    pub default_user: String,
    /// Startup files.
    #[serde(default)]
    pub files: Vec<FilePlan>,
    /// The tasks that run on this machine (display order), resolved from the manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskPlan>,
    /// Network interfaces, `eth0`, `eth1`, … in order (addresses resolved by the control
    /// plane). Empty in plans without networks: the machine then shares the run's namespace,
    /// which has only `lo`.
    #[serde(default)]
    pub interfaces: Vec<InterfacePlan>,
}

/// One task of a machine, resolved by the control plane (the agent's `TaskDef`): defaults
/// applied, durations in milliseconds, absent scripts empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPlan {
    /// `[a-z0-9_]+`, unique in the run.
    pub name: String,
    /// Setup task.
    #[serde(default)]
    pub init: bool,
    /// User it runs as; empty = root.
    #[serde(default)]
    pub user: String,
    /// Script; exit 0 = passed.
    pub run: String,
    /// Tasks (of any machine of the run) that must complete first.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Hint script; empty = none.
    #[serde(default)]
    pub hintcheck: String,
    /// Fail script; empty = none.
    #[serde(default)]
    pub failcheck: String,
    /// Per attempt; 0 = the agent's default.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Between attempts; 0 = the agent's default.
    #[serde(default)]
    pub interval_ms: u64,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Input task.
    #[serde(default)]
    pub input: bool,
    /// Background helper.
    #[serde(default)]
    pub helper: bool,
}

/// The state of one task as its machine's agent reported it (worker → control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Machine it runs on.
    pub machine: String,
    /// Task name.
    pub name: String,
    /// State.
    pub state: TaskState,
    /// The current hint (empty = none).
    #[serde(default)]
    pub hint: String,
    /// stdout of the last attempt (at most 16 KiB).
    #[serde(default)]
    pub stdout: String,
    /// Exit code of the last attempt; -1 before the first.
    #[serde(default)]
    pub exit_code: i32,
    /// Attempts made.
    #[serde(default)]
    pub attempt: u32,
    /// When the agent saw this change, ms since the epoch.
    pub at_unix_ms: u64,
    /// The agent's per-machine event number (monotonic across agent restarts): with `machine`,
    /// it identifies the change, so a re-sent snapshot is recognised.
    pub seq: u64,
    /// Helper task (not shown, not counted).
    #[serde(default)]
    pub helper: bool,
    /// Init task.
    #[serde(default)]
    pub init: bool,
    /// Input task.
    #[serde(default)]
    pub input: bool,
}

/// `GET /v1/runs/{run}/tasks`: the latest reported state of every task, by machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunTasks {
    /// Run id.
    pub run_id: String,
    /// One entry per task an agent reported (tasks not yet reported are absent).
    pub tasks: Vec<TaskStatus>,
}

/// `POST /v1/runs/{run}/tasks/{name}/input` (same body on the public API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskInput {
    /// The student's answer; the task's script sees it as `$INPUT`.
    pub value: String,
}

/// The outcome of an answer for an input task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskInputResult {
    /// The script passed with this answer: the task is completed.
    pub accepted: bool,
    /// The hint after a refused answer (may be empty).
    #[serde(default)]
    pub hint: String,
}

/// One interface of a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfacePlan {
    /// Name of a network of the run ([`NetworkPlan::name`]).
    pub network: String,
    /// IPv4 address inside the network's subnet (no prefix length).
    pub address: String,
}

/// A virtual LAN of a run: one bridge in the run's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPlan {
    /// `[a-z0-9-]`, 1–20 characters; machines are also reachable as `MACHINE.NAME`.
    pub name: String,
    /// IPv4 subnet in CIDR form, e.g. `172.16.0.0/24`.
    pub subnet: String,
    /// Non-private networks: the address the worker gives the bridge (gateway, NAT, DNS).
    /// Private networks: the default route of machines that are on no other network (the
    /// address of a router machine; the worker puts nothing there). `None`: no default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// No gateway, no NAT, no resolver on this network.
    #[serde(default)]
    pub private: bool,
}

/// What leaves a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressPolicy {
    /// Nothing leaves the run (names of the run's machines still resolve).
    #[default]
    None,
    /// DNS for the allowed domains, and HTTP/HTTPS (TCP 80, 443) to the addresses they resolve to.
    Allowlist,
    /// Anything except the worker's and the host's addresses, private and link-local ranges.
    Open,
}

/// Egress of a run.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EgressPlan {
    /// The policy.
    #[serde(default)]
    pub policy: EgressPolicy,
    /// Domains (and their subdomains) reachable under [`EgressPolicy::Allowlist`].
    #[serde(default)]
    pub allow: Vec<String>,
    /// Bandwidth limit of the run's uplink in bits per second, each direction; 0 = none.
    #[serde(default)]
    pub bandwidth_bps: u64,
}

/// Everything a worker needs to start a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPlan {
    /// Run id (also the idempotency key).
    pub run_id: String,
    /// 1–5 machines.
    pub machines: Vec<MachinePlan>,
    /// Networks (empty in old plans: every machine shares one namespace with only `lo`).
    #[serde(default)]
    pub networks: Vec<NetworkPlan>,
    /// Egress policy and bandwidth.
    #[serde(default)]
    pub egress: EgressPlan,
}

/// Observed state of a run on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObservedState {
    /// Pulling images, building drives, starting machines, waiting for agents.
    Starting,
    /// Every machine's agent answers.
    Running,
    /// Something failed; see `error`. The worker has cleaned up what it could.
    Failed,
    /// Machines are shutting down; their drives are kept.
    Stopping,
    /// No machine runs; the drives are kept (restart, clone or save it).
    Stopped,
}

/// Observed state of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineStatus {
    /// Machine name.
    pub name: String,
    /// Its state.
    pub state: ObservedState,
    /// Runtime used.
    pub runtime: String,
    /// Failure reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Observed state of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    /// Run id.
    pub run_id: String,
    /// Overall state.
    pub state: ObservedState,
    /// Per machine.
    pub machines: Vec<MachineStatus>,
    /// Failure reason, if any (for a stopped run: why the last restart failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of the pool only this run's drives hold (extents shared with images, clones or
    /// saves are not counted); measured while the run is stopped, `None` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    /// The off-host snapshot of a stopped run's drives (`None` while the run is not stopped,
    /// or when the worker has no snapshot store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotStatus>,
}

/// Where a stopped run's off-host snapshot stands. A run is `stopped` as soon as its machines
/// are down; the upload of its drives to the snapshot store follows in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotState {
    /// The drives are being uploaded (only the chunks the store lacks).
    Uploading,
    /// Every drive is in the store: the run can be restored if the pool loses its files.
    Uploaded,
    /// The last upload failed (see `error`); it is tried again.
    Failed,
}

/// The off-host snapshot of a stopped run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStatus {
    /// Upload state.
    pub state: SnapshotState,
    /// Manifest id per machine (when `uploaded`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub manifests: BTreeMap<String, String>,
    /// Bytes the last upload sent to the store (chunks it already had are not sent).
    #[serde(default)]
    pub bytes_uploaded: u64,
    /// Why the last upload failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Body of `POST /v1/runs/{run}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRun {
    /// Id of the new run (idempotency key: the same clone again returns the same run).
    pub new_run_id: String,
}

/// Body of `POST /v1/runs/{run}/save`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveRun {
    /// Id of the save (`[a-z0-9]`, 1–12 characters; idempotency key). New runs name its drives
    /// with [`ImageRef::Saved`].
    pub saved_id: String,
}

/// Drives saved from a stopped run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDrives {
    /// The save's id.
    pub id: String,
    /// The run they were saved from.
    pub run_id: String,
    /// Machine names (one drive each).
    pub machines: Vec<String>,
    /// Allocated bytes of the saved drives (shared extents included).
    pub allocated_bytes: u64,
}

/// A single-use connection token the control plane registers with the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// The secret (random, URL-safe).
    pub token: String,
    /// User id it was issued to.
    pub user: String,
    /// Run it opens.
    pub run: String,
    /// Machine it opens.
    pub machine: String,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
    /// What it opens; absent = the terminal (grants from before published ports).
    #[serde(default)]
    pub scope: TokenScope,
}

/// What a connection token opens: a terminal token cannot open a port, and a port token opens
/// only its one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenScope {
    /// The terminal relay of the machine.
    #[default]
    Terminal,
    /// One TCP port of the machine (`/port/{port}`).
    Port {
        /// The port.
        port: u16,
    },
}

impl std::fmt::Display for TokenScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenScope::Terminal => f.write_str("the terminal"),
            TokenScope::Port { port } => write!(f, "port {port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_without_a_scope_are_terminal_grants() {
        let g: TokenGrant = serde_json::from_str(
            r#"{"token":"t","user":"u","run":"r","machine":"m","expires_at":"2030-01-01T00:00:00Z"}"#,
        )
        .expect("an old grant parses");
        assert_eq!(g.scope, TokenScope::Terminal);
        let port = TokenGrant {
            scope: TokenScope::Port { port: 8080 },
            ..g
        };
        let json = serde_json::to_value(&port).expect("serialize");
        assert_eq!(
            json["scope"],
            serde_json::json!({"kind": "port", "port": 8080})
        );
        assert_eq!(port.scope.to_string(), "port 8080");
    }
}
