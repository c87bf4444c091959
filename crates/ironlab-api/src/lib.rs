//! Wire types shared by ironlab's processes.
//!
//! - [`agent`]: the in-machine agent's gRPC service (worker → agent).
//! - [`worker`]: the worker REST API (control plane → worker).
//! - [`relay`]: the terminal/exec WebSocket protocol (CLI or browser → worker relay).
//! - [`portfwd`]: the published-port WebSocket protocol (TCP bytes to a port of a machine).
//! - [`v1`]: the public REST API of the control plane (`/api/v1`).

/// Generated from `proto/agent.proto`.
#[allow(missing_docs, clippy::all)]
pub mod agent {
    tonic::include_proto!("ironlab.agent.v1");
}

pub mod portfwd;
pub mod relay;
pub mod v1;
pub mod worker;

/// The JSON body of every error response, on both the control plane and the worker.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A short machine-readable kind: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `internal`, `unavailable`.
    pub error: String,
    /// What went wrong and what to do next, for a human.
    pub detail: String,
}
