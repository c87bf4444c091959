//! gRPC client to an in-machine agent over the unix socket the worker bind-mounts into the
//! machine (worker → agent; one lazily reconnecting channel per machine).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use ironlab_api::agent::agent_client::AgentClient;
use ironlab_api::agent::{HealthRequest, HealthResponse};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint};

/// A connected agent client.
pub type Agent = AgentClient<Channel>;

/// Connects to the agent listening on `socket` (a unix socket on the host).
pub async fn connect(socket: &Path) -> Result<Agent, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector always dials the socket.
    let channel = Endpoint::from_static("http://agent.local")
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Connects and calls `Health` once, within `timeout`.
pub async fn health(socket: &Path, timeout: Duration) -> anyhow::Result<(Agent, HealthResponse)> {
    let fut = async {
        let mut client = connect(socket).await?;
        let resp = client.health(HealthRequest {}).await?.into_inner();
        anyhow::Ok((client, resp))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!(
            "agent at {} did not answer within {timeout:?}",
            socket.display()
        ),
    }
}

/// Runs `argv` as root in the machine (no PTY, no input) and returns its exit code, within
/// `timeout` (connecting included).
pub async fn run(socket: &Path, argv: &[&str], timeout: Duration) -> anyhow::Result<i32> {
    use ironlab_api::agent::exec_input::Kind as InKind;
    use ironlab_api::agent::exec_output::Kind as OutKind;
    use ironlab_api::agent::{ExecInput, ExecStart};
    let fut = async {
        let mut client = connect(socket).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(ExecInput {
            kind: Some(InKind::Start(ExecStart {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            })),
        })
        .await?;
        let mut out = client
            .exec(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(m) = out.message().await? {
            if let Some(OutKind::Exit(e)) = m.kind {
                return Ok(e.code);
            }
        }
        drop(tx);
        anyhow::bail!("the agent ended `{}` without an exit code", argv.join(" "))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => anyhow::bail!("`{}` did not finish within {timeout:?}", argv.join(" ")),
    }
}
