//! The `ironlab-agent` binary: `init`, `serve`, `tasks`, `version` (arguments parsed by hand to keep the
//! static binary small); as PID 1 without arguments, a microVM initramfs's `/init` (`boot`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use ironlab_agent::{DEFAULT_SOCKET, VERSION, init, server, tasks};

const USAGE: &str = "\
usage: ironlab-agent init  [--socket PATH] [--serial DEV] PID 1: reap zombies, supervise `serve`
       ironlab-agent serve [--socket PATH] [--serial DEV] [--root DIR] [--tasks-state FILE]
                                                         serve the agent gRPC API
       ironlab-agent tasks [--socket PATH] list|watch|input NAME VALUE|wait NAME [--timeout S]
       ironlab-agent version

--socket defaults to /run/ironlab/agent.sock; --serial also serves on a virtio-serial port (microVMs,
e.g. /dev/vport0p1); --root (default /) is where /etc/passwd etc. are read;
--tasks-state (default /var/lib/ironlab-agent/tasks.json) is where task states survive restarts.";

/// How long `serve` waits for open calls (sessions) after SIGTERM before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

struct Opts {
    socket: PathBuf,
    serial: Option<PathBuf>,
    root: PathBuf,
    tasks_state: PathBuf,
}

fn parse(args: &[String], allow_root: bool) -> anyhow::Result<Opts> {
    let mut opts = Opts {
        socket: PathBuf::from(DEFAULT_SOCKET),
        serial: None,
        root: PathBuf::from("/"),
        tasks_state: PathBuf::from(tasks::DEFAULT_STATE_PATH),
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value")),
            }
        };
        match name {
            "--socket" => opts.socket = PathBuf::from(value()?),
            "--serial" => opts.serial = Some(PathBuf::from(value()?)),
            "--root" if allow_root => opts.root = PathBuf::from(value()?),
            "--tasks-state" if allow_root => opts.tasks_state = PathBuf::from(value()?),
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    Ok(opts)
}

fn serve(opts: Opts) -> anyhow::Result<i32> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        // Handled (so it does not kill us) and ignored; children get the default disposition.
        let _hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

        let listener = server::bind(&opts.socket)?;
        eprintln!(
            "ironlab-agent {VERSION}: serving on {}{} (pid {}, up {:.2} s)",
            opts.socket.display(),
            opts.serial
                .as_ref()
                .map(|p| format!(" and {}", p.display()))
                .unwrap_or_default(),
            std::process::id(),
            ironlab_agent::uptime()
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let service = server::AgentService::new(&opts.root).with_task_state(&opts.tasks_state);
        let tasks = service.tasks().clone();
        let server = server::serve_with_serial(listener, opts.serial.clone(), service, async {
            let _ = stop_rx.await;
        });
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => result?,
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = stop_tx.send(());
        // Kills the process groups of attempts in flight; saved states stay as they are.
        tasks.shutdown();
        // Open sessions (an interactive shell) may never end by themselves.
        if let Ok(result) = tokio::time::timeout(SHUTDOWN_GRACE, server).await {
            result?;
        }
        let _ = std::fs::remove_file(&opts.socket);
        eprintln!("ironlab-agent: stopped");
        Ok(0)
    })
}

fn run(args: &[String]) -> anyhow::Result<i32> {
    let Some((command, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    match command.as_str() {
        "init" => {
            let opts = parse(rest, false)?;
            init::run(&opts.socket, opts.serial.as_deref())
        }
        "serve" => serve(parse(rest, true)?),
        "tasks" => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            runtime.block_on(tasks::cli::run(rest))
        }
        "version" | "--version" | "-V" => {
            println!("ironlab-agent {VERSION}");
            Ok(0)
        }
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            Ok(0)
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The kernel runs a microVM initramfs's `/init` (this binary) as PID 1 without arguments.
    if args.is_empty() && std::process::id() == 1 {
        ironlab_agent::boot::run();
    }
    let code = match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ironlab-agent: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
