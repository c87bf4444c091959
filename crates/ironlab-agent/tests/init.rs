//! `ironlab-agent init` as a real process: it supervises `serve`, reaps orphans (as a child
//! subreaper here; as PID 1 in a machine), restarts a crashed server, and stops on SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ironlab_api::agent::{ExecInput, ExecStart, HealthRequest, exec_input, exec_output};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_stream::wrappers::ReceiverStream;

/// The agent binary under test: `IRONLAB_AGENT_TEST_BIN` (e.g. the static build) or this
/// package's own build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("IRONLAB_AGENT_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ironlab-agent")))
}

/// Kills the init process (and so its server) if a test fails half-way.
struct InitGuard(Child);

impl Drop for InitGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn wait_for_agent(
    socket: &Path,
) -> ironlab_api::agent::agent_client::AgentClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = ironlab_agent::connect(socket).await
            && c.health(HealthRequest {}).await.is_ok()
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not come up on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `(ppid, state)` from /proc/PID/stat.
fn stat(pid: i32) -> Option<(i32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let mut f = rest.split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

fn children_of(pid: i32) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok())
            && let Some((ppid, state)) = stat(p)
            && ppid == pid
        {
            out.push((p, state));
        }
    }
    out
}

async fn exec_stdout(
    client: &mut ironlab_api::agent::agent_client::AgentClient<tonic::transport::Channel>,
    argv: &[&str],
) -> String {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let start = ExecStart {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    tx.send(ExecInput {
        kind: Some(exec_input::Kind::Start(start)),
    })
    .await
    .expect("send");
    drop(tx);
    let mut out = client
        .exec(ReceiverStream::new(rx))
        .await
        .expect("exec")
        .into_inner();
    let mut stdout = Vec::new();
    while let Some(m) = out.message().await.expect("stream") {
        if let Some(exec_output::Kind::Stdout(d)) = m.kind {
            stdout.extend(d);
        }
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

#[tokio::test]
async fn init_supervises_reaps_restarts_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let child = Command::new(agent_bin())
        .args(["init", "--socket"])
        .arg(&socket)
        .spawn()
        .expect("start init");
    let mut init = InitGuard(child);
    let init_pid = init.0.id() as i32;
    let mut client = wait_for_agent(&socket).await;

    // An orphan (the shell exits, its background sleep lives on) is adopted and reaped by init.
    let out = exec_stdout(&mut client, &["sh", "-c", "sleep 1 & echo $!"]).await;
    let orphan: i32 = out.trim().parse().expect("orphan pid");
    let deadline = Instant::now() + Duration::from_secs(3);
    while stat(orphan).is_some_and(|(ppid, _)| ppid != init_pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stat(orphan).map(|s| s.0),
        Some(init_pid),
        "orphan not adopted by init"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat(orphan).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stat(orphan), None, "orphan {orphan} was not reaped");
    assert!(
        children_of(init_pid).iter().all(|(_, state)| *state != 'Z'),
        "zombies under init: {:?}",
        children_of(init_pid)
    );

    // The server crashing is not the end: init starts it again.
    let servers = children_of(init_pid);
    assert_eq!(
        servers.len(),
        1,
        "init has one child, the server: {servers:?}"
    );
    let server = servers[0].0;
    kill(Pid::from_raw(server), Signal::SIGKILL).expect("kill server");
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    let restarted = loop {
        let now: Vec<_> = children_of(init_pid)
            .into_iter()
            .filter(|(p, _)| *p != server)
            .collect();
        if let Some((p, _)) = now.first() {
            break *p;
        }
        assert!(Instant::now() < deadline, "server was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_ne!(restarted, server);
    let mut client = wait_for_agent(&socket).await;
    assert_eq!(exec_stdout(&mut client, &["echo", "back"]).await, "back\n");

    // SIGTERM: forwarded to the server; init exits with its status (0); the socket is removed.
    kill(Pid::from_raw(init_pid), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = init.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "init did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "socket left behind");
}

#[test]
fn version_and_usage() {
    let out = Command::new(agent_bin())
        .arg("version")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("ironlab-agent {}\n", ironlab_agent::VERSION)
    );
    let out = Command::new(agent_bin())
        .arg("bogus")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command \"bogus\""));
}
