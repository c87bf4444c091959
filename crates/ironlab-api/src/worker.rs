//! The worker REST API (control plane → worker, `Authorization: Bearer <worker token>`).
//!
//! ```text
//! GET    /v1/status                                      WorkerStatus
//! PUT    /v1/runs/{run}        RunPlan                   202 RunStatus (idempotent: same plan, same run)
//! GET    /v1/runs/{run}                                  RunStatus | 404
//! DELETE /v1/runs/{run}                                  204 (idempotent; removes everything)
//! POST   /v1/tokens            TokenGrant                204
//! GET    /v1/runs/{run}/machines/{m}/terminal?token=T    WebSocket (see `relay`), no bearer
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
    /// Network interfaces, `eth0`, `eth1`, … in order (addresses resolved by the control
    /// plane). Empty in plans without networks: the machine then shares the run's namespace,
    /// which has only `lo`.
    #[serde(default)]
    pub interfaces: Vec<InterfacePlan>,
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
    /// Failure reason, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
}
