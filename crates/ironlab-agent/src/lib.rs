//! ironlab-agent: the agent inside every playground machine.
//!
//! Who talks to whom: the worker (on the host) is a gRPC client of [`server::AgentService`] over a
//! unix socket (bind-mounted into a container at [`DEFAULT_SOCKET`]'s directory). The service runs
//! processes ([`exec`], with [`pty`] for terminals), writes files ([`files`]) and creates
//! accounts ([`users`]), runs the machine's task checks ([`tasks`]) and opens TCP connections inside the
//! machine for published ports ([`dial`]). In a machine, [`init`] is PID 1 and supervises the `serve` process;
//! in a microVM, [`boot`] is the initramfs's `/init` before that.
//!
//! The worker and tests use [`connect`] to reach an agent.
#![warn(missing_docs)]

use std::path::Path;

use hyper_util::rt::TokioIo;
use ironlab_api::agent::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint, Uri};

pub mod boot;
pub mod dial;
pub mod exec;
pub mod files;
pub mod init;
pub mod pty;
pub mod serial;
pub mod server;
pub mod tasks;
pub mod users;

/// The agent's version (the crate version).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Where `init` and `serve` listen unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/ironlab/agent.sock";
/// `PATH` of root sessions.
pub const ROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `PATH` of other users' sessions.
pub const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Seconds since the kernel booted (`CLOCK_BOOTTIME`), for the console's boot lines.
pub fn uptime() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0)
}

/// Connects to the agent listening on the unix socket `socket` (fails if nothing listens).
/// Responses up to [`server::MAX_MESSAGE`] are accepted and requests that large are sent.
pub async fn connect(socket: &Path) -> Result<AgentClient<Channel>, tonic::transport::Error> {
    let socket = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector below ignores it.
    let channel = Endpoint::from_static("http://ironlab-agent")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(server::MAX_MESSAGE)
        .max_encoding_message_size(server::MAX_MESSAGE))
}
