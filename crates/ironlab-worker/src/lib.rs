//! ironlab-worker: the worker daemon. It pulls images into ext4 drives ([`images`]) kept in a
//! reflink pool ([`pool`]), runs machines as OCI containers ([`runtime`]), one network namespace
//! per run, manages runs ([`runs`]), serves the worker REST API ([`api`]), relays terminals
//! ([`relay`]) to the in-machine agent and bridges published ports to it ([`portfwd`]).
//!
//! Entry points: [`serve`] (what `ironlab worker` calls) and [`start`] (binds, returns the
//! address and a handle; for tests and embedding).

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

pub mod agent_client;
pub mod api;
pub mod api_tasks;
pub mod cmd;
pub mod drives;
pub mod host;
pub mod images;
pub mod net;
pub mod pool;
pub mod portfwd;
pub mod relay;
pub mod runs;
pub mod runtime;
pub mod sessions;
pub mod tasks;

use crate::drives::DriveProvider;
use crate::runs::RunManager;
use crate::runtime::container::ContainerRuntime;

/// Size hint for a loop-backed XFS pool (sparse; costs nothing until used).
const POOL_SIZE_HINT: u64 = 64 << 30;
/// How long open connections may finish after the shutdown signal.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Worker configuration (parsed by `ironlab worker`).
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Address to listen on (`127.0.0.1:7070`; port 0 = any).
    pub listen: SocketAddr,
    /// The worker directory (`DATA_DIR/worker`): `pool/` lives here.
    pub data_dir: PathBuf,
    /// The bearer token the control plane presents.
    pub token: String,
    /// Base URL clients use for terminal WebSockets; default `ws://<bound address>`.
    pub public_url: Option<String>,
    /// The static agent binary injected into every machine.
    pub agent_bin: PathBuf,
    /// Directory of stock images (`<name>/` OCI layouts).
    pub stock_dir: PathBuf,
    /// Registries reached over plain HTTP (`HOST:PORT`).
    pub insecure_registries: Vec<String>,
    /// Runs' networks: where uplinks lead, upstream resolvers.
    pub net: net::NetConfig,
    /// Where stopped runs' drives are uploaded (`--snapshot-store`): an absolute path,
    /// `file:///path` or `s3://BUCKET[/PREFIX]`; `None` = `DATA_DIR/objects/snapshots`;
    /// `"none"` = no off-host snapshots.
    pub snapshot_store: Option<String>,
}

/// The snapshot store configuration of `config`, or `None` when disabled. The GC grace period
/// comes from `IRONLAB_SNAPSHOT_GC_GRACE_SECS` (default 3600; tests use 0).
pub fn snapshot_config(
    config: &WorkerConfig,
) -> anyhow::Result<Option<runs::snapshots::SnapshotConfig>> {
    let location = match config.snapshot_store.as_deref().map(str::trim) {
        Some("none") => return Ok(None),
        Some("") | None => runs::snapshots::SnapshotConfig::default_location(&config.data_dir),
        Some(l) => l.to_string(),
    };
    let gc_grace = match std::env::var("IRONLAB_SNAPSHOT_GC_GRACE_SECS") {
        Ok(v) => std::time::Duration::from_secs(v.trim().parse().map_err(|_| {
            anyhow::anyhow!("IRONLAB_SNAPSHOT_GC_GRACE_SECS={v:?} is not a number of seconds")
        })?),
        Err(_) => std::time::Duration::from_secs(3600),
    };
    Ok(Some(runs::snapshots::SnapshotConfig { location, gc_grace }))
}

/// A worker serving in the background.
pub struct RunningWorker {
    /// The bound address.
    pub addr: SocketAddr,
    /// The run manager (tests call it directly).
    pub runs: Arc<RunManager>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Waits until the server stopped (after the shutdown future resolved).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("worker server task panicked")?
    }
}

/// Sets up the host and the pool, rediscovers runs, binds and serves until `shutdown` resolves.
/// Machines keep running after shutdown; the next start rediscovers them.
pub async fn serve(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Like [`serve`], but returns once listening, with the bound address.
pub async fn start(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningWorker> {
    // A bad --snapshot-store is refused before anything is set up.
    if let Some(snap) = snapshot_config(&config).context("--snapshot-store")? {
        ironlab_store::StoreConfig::parse(&snap.location, |k| std::env::var(k).ok())
            .map_err(|e| anyhow::anyhow!("--snapshot-store: {e}"))?;
    }
    let pool = pool::Pool::open(&config.data_dir, POOL_SIZE_HINT).with_context(|| {
        format!(
            "cannot open the storage pool in {}",
            config.data_dir.display()
        )
    })?;
    let runs_dir = pool.runs_dir();
    let drives = drives::PoolDrives::new(pool, &config)?;
    start_with(config, runs_dir, Arc::new(drives), shutdown).await
}

/// The microVM kit directory: `IRONLAB_VM_KERNEL_DIR`, default `/var/lib/ironlab/kernel`
/// (built by `images/kernel/build.sh`).
pub fn vm_kernel_dir() -> PathBuf {
    std::env::var_os("IRONLAB_VM_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/ironlab/kernel"))
}

/// The microVM runtime, or why there is none (no QEMU, no kernel kit, no agent). Its state
/// (the initramfs with the agent, the accelerator probe's cache) lives beside the runs, in
/// `pool/vm/`.
async fn vm_runtime(
    agent_bin: &std::path::Path,
    runs_dir: &std::path::Path,
) -> Result<Arc<runtime::vm::VmRuntime>, String> {
    let state = runs_dir.parent().unwrap_or(runs_dir).join("vm");
    runtime::vm::VmRuntime::new(&vm_kernel_dir(), agent_bin, &state, None)
        .await
        .map(Arc::new)
        .map_err(|e| format!("{e:#}"))
}

/// Like [`start`] with a given drive provider and runs directory (tests, benchmarks).
pub async fn start_with(
    config: WorkerConfig,
    runs_dir: PathBuf,
    drives: Arc<dyn DriveProvider>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningWorker> {
    let info = host::setup().await?;
    if !config.agent_bin.is_file() {
        tracing::warn!(
            agent = %config.agent_bin.display(),
            "agent binary not found; machines will fail to start until it exists"
        );
    }
    let container = Arc::new(ContainerRuntime::new(info.oci, config.agent_bin.clone()));
    let vm = vm_runtime(&config.agent_bin, &runs_dir).await;
    if let Err(why) = &vm {
        tracing::info!("microVMs unavailable: {why}");
    }
    let runtime = Arc::new(runtime::Runtimes::new(container, vm));
    let runs = RunManager::with_net(runs_dir, runtime, drives, config.net.clone());
    if let Some(snap) = snapshot_config(&config).context("--snapshot-store")? {
        let snaps = runs::snapshots::Snapshots::open(&snap, config.data_dir.join("snapshots"))
            .context("--snapshot-store")?;
        tracing::info!(store = %snaps.location(), "snapshot store");
        runs.set_snapshots(snaps);
    }
    runs.recover().await.context("cannot recover runs")?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let public_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| format!("ws://{addr}"));
    let state = api::ApiState::new(runs.clone(), config.token.clone(), public_url);
    let app = api::router(state);
    tracing::info!(%addr, "worker listening");
    let task = tokio::spawn(async move {
        // Open terminal sessions would hold a graceful shutdown forever: give them a moment
        // after the signal, then stop regardless (machines keep running either way).
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            shutdown.await;
            tracing::info!("worker shutting down");
            let _ = stop_tx.send(true);
        };
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .into_future();
        tokio::select! {
            r = server => r.context("worker server failed"),
            () = async {
                let _ = stop_rx.wait_for(|stop| *stop).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::info!("closing the remaining terminal sessions");
                Ok(())
            }
        }
    });
    Ok(RunningWorker { addr, runs, task })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(store: Option<&str>) -> WorkerConfig {
        WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: PathBuf::from("/var/lib/ironlab/worker"),
            token: String::new(),
            public_url: None,
            agent_bin: PathBuf::new(),
            stock_dir: PathBuf::new(),
            insecure_registries: vec![],
            net: Default::default(),
            snapshot_store: store.map(str::to_string),
        }
    }

    #[test]
    fn snapshot_store_defaults_to_the_worker_dir_and_can_be_turned_off() {
        let default = snapshot_config(&config(None)).expect("ok").expect("on");
        assert_eq!(
            default.location,
            "/var/lib/ironlab/worker/objects/snapshots"
        );
        let s3 = snapshot_config(&config(Some("s3://b/p")))
            .expect("ok")
            .expect("on");
        assert_eq!(s3.location, "s3://b/p");
        assert!(
            snapshot_config(&config(Some("none")))
                .expect("ok")
                .is_none()
        );
    }
}
