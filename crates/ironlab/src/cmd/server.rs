//! `ironlab up`, `ironlab control`, `ironlab worker`.
//!
//! `up` runs the control plane in this process and the worker as a supervised child
//! (`<this exe> worker …`, its own process group, output teed to our stderr and
//! `DATA_DIR/worker.log`). Ctrl-C / SIGTERM: the control plane stops accepting, the child gets
//! SIGTERM (SIGKILL after 10 s), exit 0. Machines keep running; the worker rediscovers them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ironlab_control::auth::{read_secret_file, write_secret_file};
use ironlab_control::worker_client::WorkerSpec as WorkerEndpoint;
use ironlab_control::{Control, ControlConfig};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::cli::{ControlArgs, UpArgs, WorkerArgs, WorkerOptions};

/// How long the worker child gets to stop before SIGKILL.
const CHILD_STOP_GRACE: Duration = Duration::from_secs(10);

/// Resolves when SIGINT or SIGTERM arrives.
async fn shutdown_signal() {
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn default_agent() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("ironlab-agent-static")))
        .unwrap_or_else(|| PathBuf::from("ironlab-agent-static"))
}

/// Reads the worker token, creating the file (mode 600) with a random token when missing.
fn ensure_worker_token(path: &Path) -> anyhow::Result<String> {
    if let Some(t) = read_secret_file(path)?.filter(|t| !t.is_empty()) {
        return Ok(t);
    }
    let token = ironlab_control::db::random_secret(40);
    write_secret_file(path, &token)?;
    Ok(token)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    read_secret_file(path)?
        .filter(|t| !t.is_empty())
        .with_context(|| format!("token file {} is missing or empty", path.display()))
}

/// Base URL for links printed to the operator: a wildcard listen address becomes 127.0.0.1.
fn link_base(listen: SocketAddr) -> String {
    let ip = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// `ironlab worker`.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<i32> {
    if let Some(ppid) = args.parent_pid {
        // Die with the supervising `ironlab up`, even if it is SIGKILLed.
        nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
            .context("cannot set the parent-death signal")?;
        if nix::unistd::getppid() != Pid::from_raw(ppid as i32) {
            anyhow::bail!("the supervising ironlab process {ppid} is gone");
        }
    }
    let token = read_token(&args.token_file)?;
    let config = ironlab_worker::WorkerConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        token,
        public_url: args.public_url,
        agent_bin: args.options.agent.unwrap_or_else(default_agent),
        stock_dir: args.options.stock_images,
        insecure_registries: args.options.insecure_registries,
        net: ironlab_worker::net::NetConfig {
            uplink: ironlab_worker::net::Uplink::parse(&args.options.uplink)
                .map_err(|e| anyhow::anyhow!("--uplink: {e}"))?,
            upstream_dns: args.options.upstream_dns,
            ..Default::default()
        },
        snapshot_store: args.options.snapshot_store,
    };
    ironlab_worker::serve(config, shutdown_signal()).await?;
    Ok(0)
}

/// `--database`, checked before anything starts; the error names the flag, never a password.
fn parse_database(arg: Option<&str>) -> anyhow::Result<Option<ironlab_control::db::Database>> {
    arg.map(ironlab_control::db::Database::parse).transpose()
}

/// `ironlab control`.
pub async fn control(args: ControlArgs) -> anyhow::Result<i32> {
    let database = parse_database(args.database.as_deref())?;
    let workers = WorkerEndpoint::parse_all(&args.worker_url)?;
    let worker_token = read_token(&args.worker_token_file)?;
    let control = Control::open(ControlConfig {
        data_dir: args.data_dir.clone(),
        workers,
        worker_token,
        database,
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let url = format!("http://{}", args.listen);
    let link = control.admin_login_link(&link_base(args.listen)).await?;
    println!("ironlab control plane: {url}  (API {url}/api/v1)");
    println!("admin token: {}", control.admin_token());
    println!("admin sign-in link (one-time, 24 h): {link}");
    control.serve(listener, shutdown_signal()).await?;
    Ok(0)
}

/// Copies a child's output, line by line, to our stderr and the log file.
fn tee(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    log: Arc<tokio::sync::Mutex<tokio::fs::File>>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            let mut f = log.lock().await;
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
    });
}

struct WorkerSpec {
    exe: PathBuf,
    listen: SocketAddr,
    data_dir: PathBuf,
    token_file: PathBuf,
    log_file: PathBuf,
    options: WorkerOptions,
}

impl WorkerSpec {
    fn spawn(&self, log: &Arc<tokio::sync::Mutex<tokio::fs::File>>) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--token-file")
            .arg(&self.token_file)
            .arg("--stock-images")
            .arg(&self.options.stock_images)
            .arg("--parent-pid")
            .arg(std::process::id().to_string());
        if let Some(agent) = &self.options.agent {
            cmd.arg("--agent").arg(agent);
        }
        if !self.options.insecure_registries.is_empty() {
            cmd.arg("--insecure-registry")
                .arg(self.options.insecure_registries.join(","));
        }
        cmd.arg("--uplink").arg(&self.options.uplink);
        if !self.options.upstream_dns.is_empty() {
            let dns: Vec<String> = self
                .options
                .upstream_dns
                .iter()
                .map(|d| d.to_string())
                .collect();
            cmd.arg("--upstream-dns").arg(dns.join(","));
        }
        if let Some(store) = &self.options.snapshot_store {
            cmd.arg("--snapshot-store").arg(store);
        }
        // Flags win over the environment we pass down; avoid clap seeing both.
        cmd.env_remove("IRONLAB_AGENT")
            .env_remove("IRONLAB_SNAPSHOT_STORE")
            .env_remove("IRONLAB_UPLINK")
            .env_remove("IRONLAB_UPSTREAM_DNS")
            .env_remove("IRONLAB_STOCK_IMAGES")
            .env_remove("IRONLAB_INSECURE_REGISTRIES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: a terminal Ctrl-C reaches only `up`, which stops the child.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start the worker {}", self.exe.display()))?;
        if let Some(out) = child.stdout.take() {
            tee(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            tee(err, log.clone());
        }
        Ok(child)
    }
}

/// Stops a child: SIGTERM, then SIGKILL after the grace period.
async fn stop_child(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        match tokio::time::timeout(CHILD_STOP_GRACE, child.wait()).await {
            Ok(_) => return,
            Err(_) => tracing::warn!(pid, "the worker did not stop within 10 s; killing it"),
        }
    }
    let _ = child.kill().await;
}

/// Keeps the worker running until `stop` turns true; restarts it with backoff when it exits.
async fn supervise(spec: WorkerSpec, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log_file)
        .await
        .with_context(|| format!("cannot open {}", spec.log_file.display()))?;
    let log = Arc::new(tokio::sync::Mutex::new(log));
    let mut delay = Duration::from_millis(500);
    loop {
        let started = Instant::now();
        let mut child = match spec.spawn(&log) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "cannot start the worker");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        tokio::select! {
            status = child.wait() => {
                if *stop.borrow() {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(60) {
                    delay = Duration::from_millis(500);
                }
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                eprintln!("ironlab: the worker exited unexpectedly ({status}); restarting in {} ms", delay.as_millis());
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => return Ok(()),
                }
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            _ = stop.changed() => {
                stop_child(&mut child).await;
                return Ok(());
            }
        }
    }
}

/// Waits until the worker answers `/v1/status`.
async fn wait_worker_ready(url: &str, token: &str, within: Duration) -> bool {
    let Ok(http) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(r) = http
            .get(format!("{url}/v1/status"))
            .bearer_auth(token)
            .send()
            .await
            && r.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// `ironlab up`.
pub async fn up(args: UpArgs) -> anyhow::Result<i32> {
    let database = parse_database(args.database.as_deref())?;
    let data_dir = if args.data_dir.is_absolute() {
        args.data_dir.clone()
    } else {
        std::env::current_dir()
            .context("cannot read the current directory")?
            .join(&args.data_dir)
    };
    fs_err::create_dir_all(&data_dir)?;
    let worker_token_file = data_dir.join("worker-token");
    let worker_token = ensure_worker_token(&worker_token_file)?;
    let worker_port = args
        .listen
        .port()
        .checked_add(1)
        .context("--listen port must be below 65535 (the worker takes the next one)")?;
    let worker_listen = SocketAddr::new(args.listen.ip(), worker_port);
    let worker_url = format!("http://{worker_listen}");

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let control = Control::open(ControlConfig {
        data_dir: data_dir.clone(),
        workers: vec![WorkerEndpoint {
            name: WorkerEndpoint::LOCAL.into(),
            url: worker_url.clone(),
        }],
        worker_token: worker_token.clone(),
        database,
    })
    .await?;
    let admin_token = control.admin_token().to_string();
    let admin_link = control.admin_login_link(&link_base(args.listen)).await?;

    let exe = std::env::current_exe().context("cannot find the ironlab executable")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let spec = WorkerSpec {
        exe,
        listen: worker_listen,
        data_dir: data_dir.join("worker"),
        token_file: worker_token_file,
        log_file: data_dir.join("worker.log"),
        options: args.worker.clone(),
    };
    let supervisor = tokio::spawn(supervise(spec, stop_rx));

    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(control.serve(listener, async move {
        let _ = shutdown_rx.await;
    }));

    eprintln!("ironlab: waiting for the worker on {worker_url} …");
    let ready = tokio::select! {
        r = wait_worker_ready(&worker_url, &worker_token, Duration::from_secs(120)) => r,
        _ = shutdown_signal() => {
            let _ = shutdown_tx.send(());
            let _ = stop_tx.send(true);
            let _ = server.await;
            let _ = supervisor.await;
            return Ok(0);
        }
    };
    if ready {
        eprintln!("ironlab: worker ready");
    } else {
        eprintln!(
            "ironlab: warning: the worker has not answered yet; see {}",
            data_dir.join("worker.log").display()
        );
    }
    let url = format!("http://{}", args.listen);
    if let Some(dir) = &args.content {
        match crate::client::Api::new(&url, &admin_token) {
            Ok(api) => match super::content::publish_dir(&api, dir).await {
                Ok(0) => {}
                Ok(n) => eprintln!(
                    "ironlab: warning: {n} content item(s) in {} were not published (see above)",
                    dir.display()
                ),
                Err(e) => eprintln!(
                    "ironlab: warning: cannot publish the content in {}: {e:#}",
                    dir.display()
                ),
            },
            Err(e) => eprintln!("ironlab: warning: {e:#}"),
        }
    }
    println!("ironlab is up: {url}  (API {url}/api/v1)");
    println!("admin token: {admin_token}");
    println!("log in with: ironlab auth login --server {url} --token {admin_token}");
    println!("admin sign-in link (one-time, 24 h): {admin_link}");

    let mut server = server;
    let server_result = tokio::select! {
        _ = shutdown_signal() => {
            eprintln!("ironlab: stopping");
            let _ = shutdown_tx.send(());
            server.await
        }
        r = &mut server => {
            // The control plane stopped on its own: an error.
            r
        }
    };
    let _ = stop_tx.send(true);
    match supervisor.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = format!("{e:#}"), "worker supervisor failed"),
        Err(e) => tracing::error!(error = %e, "worker supervisor panicked"),
    }
    server_result.context("the control plane task panicked")??;
    eprintln!("ironlab: stopped");
    Ok(0)
}
