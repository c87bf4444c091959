//! The host half of the agent channel of a microVM.
//!
//! Who talks to whom: every agent client on the host (run manager, terminal relay, tests) dials
//! the machine's usual socket `<machine>/agent/agent.sock`, served here by an HTTP/2 server. Each
//! request is forwarded over ONE HTTP/2 client connection that runs over QEMU's virtio-serial
//! chardev socket (`<machine>/agent.serial`) to the agent in the guest (`ironlab-agent serve
//! --serial`). HTTP/2 multiplexes the calls and keeps per-stream flow control, so a terminal
//! flooding output does not stall another call. Before HTTP/2 starts, a SYNC/ACK handshake
//! (see `ironlab_agent::serial`) discards stale bytes a previous session left in the port.
//!
//! The upstream connection is re-made whenever it breaks (agent restart, worker restart);
//! requests wait for it up to [`UPSTREAM_WAIT`], then fail with gRPC `UNAVAILABLE`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a request waits for the guest's agent to be connected.
pub const UPSTREAM_WAIT: Duration = Duration::from_secs(10);
/// How long the guest has to answer a SYNC before the connection is re-made. Generous: a TCG
/// guest on a busy host can take seconds to answer, and a shorter wait than one round trip
/// would re-dial forever. (Before the guest opens its port the SYNC just waits in QEMU.)
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

type Upstream = Option<SendRequest<Incoming>>;

/// A running proxy; dropping it stops it (the listener socket file is removed).
pub struct AgentProxy {
    cancel: CancellationToken,
    listen: PathBuf,
    /// Inode of our socket file: a newer proxy may have re-bound the path.
    ino: u64,
    connected: watch::Receiver<Upstream>,
}

impl Drop for AgentProxy {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.cancel.cancel();
        if std::fs::symlink_metadata(&self.listen).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.listen);
        }
    }
}

impl AgentProxy {
    /// Whether the guest's agent is connected right now.
    pub fn connected(&self) -> bool {
        self.connected.borrow().is_some()
    }
}

/// Starts a proxy listening on `listen` (mode 600) and forwarding to the chardev socket `serial`.
pub fn spawn(listen: &Path, serial: &Path) -> anyhow::Result<AgentProxy> {
    use anyhow::Context;
    if let Some(dir) = listen.parent() {
        fs_err::create_dir_all(dir)?;
    }
    match std::fs::remove_file(listen) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", listen.display())),
    }
    let listener = UnixListener::bind(listen)
        .with_context(|| format!("cannot listen on {}", listen.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(listen, std::fs::Permissions::from_mode(0o600))?;
    }
    let cancel = CancellationToken::new();
    let (tx, rx) = watch::channel::<Upstream>(None);
    tokio::spawn(connector(serial.to_path_buf(), tx, cancel.clone()));
    tokio::spawn(acceptor(listener, rx.clone(), cancel.clone()));
    let ino = {
        use std::os::unix::fs::MetadataExt;
        fs_err::symlink_metadata(listen)?.ino()
    };
    Ok(AgentProxy {
        cancel,
        listen: listen.to_path_buf(),
        ino,
        connected: rx,
    })
}

/// Keeps one upstream HTTP/2 connection to the guest.
async fn connector(serial: PathBuf, tx: watch::Sender<Upstream>, cancel: CancellationToken) {
    let mut logged = String::new();
    while !cancel.is_cancelled() {
        let attempt = tokio::select! {
            r = connect_upstream(&serial) => r,
            () = cancel.cancelled() => return,
        };
        match attempt {
            Ok((sender, conn)) => {
                logged.clear();
                tracing::debug!(serial = %serial.display(), "agent channel up");
                tx.send_replace(Some(sender));
                tokio::select! {
                    r = conn => {
                        if let Err(e) = r {
                            tracing::debug!(serial = %serial.display(), "agent channel ended: {e}");
                        }
                    }
                    () = cancel.cancelled() => return,
                }
                tx.send_replace(None);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != logged {
                    tracing::debug!(serial = %serial.display(), "agent channel: {msg}");
                    logged = msg;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }
}

type ConnFuture = std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

async fn connect_upstream(serial: &Path) -> anyhow::Result<(SendRequest<Incoming>, ConnFuture)> {
    let mut stream = UnixStream::connect(serial).await?;
    let nonce = format!("{:016x}", rand::random::<u64>());
    stream
        .write_all(format!("IRONLAB-SYNC:{nonce}\n").as_bytes())
        .await?;
    let want = format!("IRONLAB-ACK:{nonce}\n").into_bytes();
    let mut window: Vec<u8> = Vec::with_capacity(want.len());
    let wait_ack = async {
        let mut byte = [0u8; 1];
        loop {
            // Byte by byte: what follows the ACK line is HTTP/2 and belongs to hyper.
            if stream.read(&mut byte).await? == 0 {
                anyhow::bail!("QEMU closed the agent port");
            }
            window.push(byte[0]);
            if window.len() > want.len() {
                window.remove(0);
            }
            if window == want {
                return anyhow::Ok(());
            }
        }
    };
    tokio::time::timeout(ACK_TIMEOUT, wait_ack)
        .await
        .map_err(|_| anyhow::anyhow!("the guest agent did not answer the SYNC"))??;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await?;
    Ok((sender, Box::pin(conn)))
}

async fn acceptor(
    listener: UnixListener,
    upstream: watch::Receiver<Upstream>,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("agent proxy accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let upstream = upstream.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(forward(upstream, req).await) }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                r = conn => {
                    if let Err(e) = r {
                        tracing::debug!("agent proxy client connection: {e}");
                    }
                }
                () = cancel.cancelled() => {}
            }
        });
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

async fn forward(
    mut upstream: watch::Receiver<Upstream>,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let sender = match tokio::time::timeout(UPSTREAM_WAIT, upstream.wait_for(Option::is_some)).await
    {
        Ok(Ok(s)) => s.clone(),
        _ => return unavailable("the machine's agent is not connected"),
    };
    let Some(mut sender) = sender else {
        return unavailable("the machine's agent is not connected");
    };
    if sender.ready().await.is_err() {
        return unavailable("the connection to the machine's agent broke");
    }
    match sender.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => unavailable(&format!("agent channel: {e}")),
    }
}

/// A gRPC `UNAVAILABLE` (14) answer without a body.
fn unavailable(msg: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", hyper::header::HeaderValue::from_static("14"));
    if let Ok(v) = hyper::header::HeaderValue::from_str(msg) {
        h.insert("grpc-message", v);
    }
    resp
}
