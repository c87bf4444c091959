//! `ironlab port-forward RUN [--machine M] [LOCAL:]REMOTE…` and `ironlab ssh-proxy RUN
//! [--machine M] [--port 22]`: TCP to a port inside a machine. `ironlab http-port RUN
//! [--machine M] PORT` prints the browser link an http-port tab opens.
//!
//! CLI → control plane `POST /api/v1/runs/{id}/connect {machine, port}` (a single-use port
//! token) → WebSocket to the worker (`ironlab_api::portfwd`) → the agent dials
//! `127.0.0.1:PORT` inside the machine. `port-forward` listens locally and opens one token +
//! WebSocket per accepted connection; `ssh-proxy` carries its stdin/stdout once (for
//! `ssh -o ProxyCommand='ironlab ssh-proxy RUN --machine M'`).

use std::net::SocketAddr;

use anyhow::Context;
use ironlab_api::v1::{ConnectResponse, HttpPortLink, RunState, RunView};
use ironlab_control::portfwd::{self, PortError, PortSocket};
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::cli::{HttpPortArgs, PortForwardArgs, SshProxyArgs};
use crate::client::Api;
use crate::cmd::ssh::{is_conflict, wait_until_running};

/// One `LOCAL:REMOTE` pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Forward {
    local: u16,
    remote: u16,
}

fn parse_port(what: &str, spec: &str, s: &str) -> anyhow::Result<u16> {
    s.parse::<u16>()
        .map_err(|_| anyhow::anyhow!("port pair {spec:?}: {what} port {s:?} is not in 0-65535"))
}

/// Parses `REMOTE` or `LOCAL:REMOTE` (LOCAL 0 = any free port; REMOTE must not be 0).
fn parse_forward(spec: &str) -> anyhow::Result<Forward> {
    let (local, remote) = match spec.split_once(':') {
        Some((l, r)) => (
            parse_port("local", spec, l)?,
            parse_port("remote", spec, r)?,
        ),
        None => {
            let p = parse_port("remote", spec, spec)?;
            (p, p)
        }
    };
    if remote == 0 {
        anyhow::bail!("port pair {spec:?}: the remote port must be 1-65535");
    }
    Ok(Forward { local, remote })
}

/// The run's machine named `machine` (default: its first), waiting while it starts.
async fn resolve_machine(api: &Api, run: &str, machine: Option<&str>) -> anyhow::Result<String> {
    let mut view: RunView = api.call(Method::GET, &format!("/runs/{run}"), None).await?;
    if matches!(view.state, RunState::Pending | RunState::Starting) {
        wait_until_running(api, run).await?;
        view = api.call(Method::GET, &format!("/runs/{run}"), None).await?;
    }
    if view.state != RunState::Running {
        anyhow::bail!("run {run} is {}, not running", view.state.as_str());
    }
    match machine {
        Some(m) if view.machines.iter().any(|x| x == m) => Ok(m.to_string()),
        Some(m) => anyhow::bail!(
            "run {run} has no machine {m} (machines: {})",
            view.machines.join(", ")
        ),
        None => view
            .machines
            .first()
            .cloned()
            .with_context(|| format!("run {run} has no machines")),
    }
}

/// A fresh port token, then the WebSocket.
async fn open(api: &Api, run: &str, machine: &str, port: u16) -> anyhow::Result<PortSocket> {
    let path = format!("/runs/{run}/connect");
    let body = json!({ "machine": machine, "port": port });
    let conn: ConnectResponse = match api.call(Method::POST, &path, Some(&body)).await {
        Ok(c) => c,
        Err(e) if is_conflict(&e) && wait_until_running(api, run).await? => {
            api.call(Method::POST, &path, Some(&body)).await?
        }
        Err(e) => return Err(e),
    };
    portfwd::open(&conn.url).await.map_err(|e| match e {
        PortError::Refused {
            status: 502,
            detail,
        } => anyhow::anyhow!("{detail}"),
        other => anyhow::Error::new(other).context(format!(
            "cannot open port {port} of machine {machine} in run {run}"
        )),
    })
}

/// Runs `port-forward` until Ctrl-C.
pub async fn port_forward(args: PortForwardArgs, api: &Api) -> anyhow::Result<i32> {
    let forwards = args
        .ports
        .iter()
        .map(|s| parse_forward(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let machine = resolve_machine(api, &args.run, args.machine.as_deref()).await?;
    let mut listeners = Vec::new();
    for f in &forwards {
        let addr = SocketAddr::new(args.address, f.local);
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let local = l
            .local_addr()
            .context("cannot read the listening address")?;
        listeners.push((l, local, f.remote));
    }
    let mut stdout = tokio::io::stdout();
    for (_, local, remote) in &listeners {
        let line = format!(
            "Forwarding {local} -> {}/{machine} port {remote}\n",
            args.run
        );
        stdout
            .write_all(line.as_bytes())
            .await
            .context("cannot write to stdout")?;
    }
    stdout.flush().await.context("cannot write to stdout")?;

    let mut tasks = tokio::task::JoinSet::new();
    for (listener, local, remote) in listeners {
        let api = api.clone();
        let run = args.run.clone();
        let machine = machine.clone();
        tasks.spawn(async move {
            loop {
                let (socket, from) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        say(format!("error: accepting on {local}: {e}"));
                        continue;
                    }
                };
                let _ = socket.set_nodelay(true);
                let (api, run, machine) = (api.clone(), run.clone(), machine.clone());
                tokio::spawn(async move {
                    let result = async {
                        let ws = open(&api, &run, &machine, remote).await?;
                        let (r, w) = socket.into_split();
                        portfwd::pump(ws, r, w).await?;
                        anyhow::Ok(())
                    }
                    .await;
                    if let Err(e) = result {
                        say(format!(
                            "error: connection from {from} to port {remote}: {e:#}"
                        ));
                    }
                });
            }
        });
    }
    tokio::signal::ctrl_c()
        .await
        .context("cannot wait for Ctrl-C")?;
    tasks.abort_all();
    Ok(0)
}

/// Prints one whole line to stderr in a single write, so that a reader of a
/// busy forwarder's stderr never sees half a message (`eprintln!` writes each
/// formatted piece separately on unbuffered stderr).
fn say(mut line: String) {
    use std::io::Write as _;
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Runs `ssh-proxy`: stdin/stdout ↔ the port, once.
pub async fn ssh_proxy(args: SshProxyArgs, api: &Api) -> anyhow::Result<i32> {
    if args.port == 0 {
        anyhow::bail!("--port: 0 is not a TCP port");
    }
    let machine = resolve_machine(api, &args.run, args.machine.as_deref()).await?;
    let ws = open(api, &args.run, &machine, args.port).await?;
    portfwd::pump(ws, tokio::io::stdin(), tokio::io::stdout())
        .await
        .with_context(|| format!("port {} of machine {machine}", args.port))?;
    Ok(0)
}

/// Prints a one-time link (60 s) that signs a browser in to the machine's HTTP port.
pub async fn http_port(args: HttpPortArgs, api: &Api) -> anyhow::Result<i32> {
    if args.port == 0 {
        anyhow::bail!("PORT: 0 is not a TCP port");
    }
    let mut body = json!({ "port": args.port });
    if let Some(m) = &args.machine {
        body["machine"] = json!(m);
    }
    let link: HttpPortLink = api
        .call(
            Method::POST,
            &format!("/runs/{}/http-ports", args.run),
            Some(&body),
        )
        .await?;
    println!("{}", link.url);
    eprintln!(
        "Open this link in a browser within 60 s (it works once): port {} of machine {} is then served at the root of its host.",
        link.port, link.machine
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_pairs() {
        assert_eq!(
            parse_forward("8080").expect("ok"),
            Forward {
                local: 8080,
                remote: 8080
            }
        );
        assert_eq!(
            parse_forward("0:80").expect("ok"),
            Forward {
                local: 0,
                remote: 80
            }
        );
        let err = |s: &str| parse_forward(s).expect_err(s).to_string();
        assert_eq!(
            err("80:0"),
            "port pair \"80:0\": the remote port must be 1-65535"
        );
        assert_eq!(err("0"), "port pair \"0\": the remote port must be 1-65535");
        assert_eq!(
            err("http:80"),
            "port pair \"http:80\": local port \"http\" is not in 0-65535"
        );
        assert_eq!(
            err("1:70000"),
            "port pair \"1:70000\": remote port \"70000\" is not in 0-65535"
        );
    }
}
