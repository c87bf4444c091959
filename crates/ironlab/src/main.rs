//! The `ironlab` binary: parses the command line and hands off to `cmd/`. Server commands
//! (`up`, `control`, `worker`) call the control/worker libraries; client commands talk to the
//! control plane's REST API.

mod cli;
mod client;
mod cmd;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::client::Api;

fn init_tracing(server: bool) {
    let default = if server { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IRONLAB_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(color)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    let Cli {
        server,
        token,
        command,
    } = cli;
    match command {
        Command::Up(args) => cmd::server::up(args).await,
        Command::Control(args) => cmd::server::control(args).await,
        Command::Worker(args) => cmd::server::worker(args).await,
        Command::Auth(c) => cmd::auth::run(c, server, token).await,
        Command::Playground(c) => cmd::playground::run(c, &Api::from_flags(server, token)?).await,
        Command::Ssh(args) => cmd::ssh::run(args, &Api::from_flags(server, token)?).await,
        Command::PortForward(args) => {
            cmd::portfwd::port_forward(args, &Api::from_flags(server, token)?).await
        }
        Command::SshProxy(args) => {
            cmd::portfwd::ssh_proxy(args, &Api::from_flags(server, token)?).await
        }
        Command::HttpPort(args) => {
            cmd::portfwd::http_port(args, &Api::from_flags(server, token)?).await
        }
        Command::User(c) => cmd::user::run(c, &Api::from_flags(server, token)?).await,
        Command::Workers { output } => {
            cmd::workers::run(&Api::from_flags(server, token)?, output).await
        }
        Command::Content(c) => cmd::content::run(c, server, token).await,
    }
}

/// A client command whose output goes to a closed pipe (`ironlab playground catalog | head`)
/// ends quietly, as other command-line tools do, instead of panicking in `println!`. (Rust
/// ignores SIGPIPE at start; the servers keep that: their sockets report EPIPE instead.)
#[allow(unsafe_code)]
fn restore_sigpipe() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: at the very start of main, before any thread exists; SIG_DFL is no handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let server = matches!(
        cli.command,
        Command::Up(_) | Command::Control(_) | Command::Worker(_)
    );
    if !server {
        restore_sigpipe();
    }
    init_tracing(server);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // Don't wait for blocked stdin readers or lingering tasks.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn documented_invocations_parse() {
        for argv in [
            &[
                "ironlab",
                "up",
                "--listen",
                "127.0.0.1:8080",
                "--data-dir",
                "/tmp/x",
            ][..],
            &[
                "ironlab",
                "auth",
                "login",
                "--server",
                "http://h:1",
                "--token",
                "ilt_x",
            ],
            &["ironlab", "playground", "create", "-f", "m.yaml"],
            &[
                "ironlab",
                "playground",
                "start",
                "debian",
                "--title",
                "T",
                "-o",
                "json",
                "--no-wait",
            ],
            &["ironlab", "playground", "list", "-o", "json", "--all"],
            &["ironlab", "playground", "destroy", "abc", "--no-wait"],
            &["ironlab", "ssh", "abc", "--machine", "m", "--", "ls", "-la"],
            &[
                "ironlab",
                "worker",
                "--listen",
                "127.0.0.1:7070",
                "--token-file",
                "f",
                "--insecure-registry",
                "a:1,b:2",
            ],
        ] {
            Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        }
        let cli = Cli::try_parse_from(["ironlab", "ssh", "r", "--", "sh", "-c", "exit 3"])
            .expect("parses");
        match cli.command {
            Command::Ssh(a) => assert_eq!(a.command, ["sh", "-c", "exit 3"]),
            other => panic!("parsed as {other:?}"),
        }
    }
}
