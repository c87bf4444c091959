//! The static agent as PID 1 of a busybox root: new pid, mount and UTS namespaces, `chroot` —
//! close to what the container runtime does, with nothing from the host's libc in reach.
//!
//! Needs root, `unshare`, a static busybox, and the static agent (`scripts/build-agent.sh`; found
//! via `IRONLAB_AGENT_STATIC`, `IRONLAB_AGENT`, or next to this test build). Skips, saying why, when one is missing.

use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironlab_api::agent::agent_client::AgentClient;
use ironlab_api::agent::{
    EnsureUsersRequest, ExecInput, ExecStart, Exit, HealthRequest, exec_input, exec_output,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

fn static_agent() -> Option<PathBuf> {
    for var in ["IRONLAB_AGENT_STATIC", "IRONLAB_AGENT"] {
        if let Some(p) = std::env::var_os(var) {
            return Some(PathBuf::from(p));
        }
    }
    // CARGO_BIN_EXE is TARGET/<profile>/ironlab-agent.
    let target = Path::new(env!("CARGO_BIN_EXE_ironlab-agent"))
        .parent()?
        .parent()?;
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join("ironlab-agent-static"))
        .find(|p| p.is_file())
}

fn busybox() -> Option<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The namespace's `unshare` process; killing it kills PID 1 and so the whole namespace.
struct Machine {
    unshare: Child,
    root: tempfile::TempDir,
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Ok(None) = self.unshare.try_wait() {
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
        let _ = self.root.path();
    }
}

fn build_root(busybox: &Path, agent: &Path) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in [
        "bin",
        "etc/sudoers.d",
        "root",
        "home",
        "tmp",
        "proc",
        "dev",
        "run/ironlab",
        ".ironlab",
    ] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    std::fs::copy(busybox, r.join("bin/busybox")).expect("copy busybox");
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("/bin/busybox", r.join("bin").join(applet));
        }
    }
    std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").expect("passwd");
    std::fs::write(r.join("etc/group"), "root:x:0:\n").expect("group");
    std::fs::write(r.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").expect("shadow");
    std::fs::copy(agent, r.join(".ironlab/ironlab-agent")).expect("copy agent");
    root
}

async fn wait_for_agent(socket: &Path, m: &mut Machine) -> AgentClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(mut c) = ironlab_agent::connect(socket).await
            && c.health(HealthRequest {}).await.is_ok()
        {
            return c;
        }
        if let Ok(Some(status)) = m.unshare.try_wait() {
            panic!("the machine exited with {status} before its agent came up");
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exec(client: &mut AgentClient<Channel>, start: ExecStart) -> (String, Option<Exit>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
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
    let (mut stdout, mut exit) = (Vec::new(), None);
    while let Some(m) = out.message().await.expect("stream") {
        match m.kind {
            Some(exec_output::Kind::Stdout(d)) => stdout.extend(d),
            Some(exec_output::Kind::Exit(e)) => exit = Some(e),
            _ => {}
        }
    }
    (String::from_utf8_lossy(&stdout).into_owned(), exit)
}

fn sh(script: &str) -> ExecStart {
    ExecStart {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn static_agent_is_pid_1_of_a_busybox_machine() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (namespaces, chroot)");
        return;
    }
    let (Some(agent), Some(busybox)) = (static_agent(), busybox()) else {
        eprintln!(
            "skipped: needs a static busybox and the static agent (run scripts/build-agent.sh \
             or set IRONLAB_AGENT_STATIC)"
        );
        return;
    };
    let root = build_root(&busybox, &agent);
    let r = root.path().display().to_string();
    let script = format!(
        "set -e; hostname ironlab-test; mount --rbind /dev {r}/dev; \
         mount -t proc proc {r}/proc; \
         exec chroot {r} /.ironlab/ironlab-agent init"
    );
    let unshare = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--kill-child",
            "sh",
            "-c",
        ])
        .arg(&script)
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut m = Machine { unshare, root };
    let socket = m.root.path().join("run/ironlab/agent.sock");
    let mut client = wait_for_agent(&socket, &mut m).await;

    let h = client
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.hostname, "ironlab-test");
    let mode = std::fs::metadata(&socket).expect("socket").mode() & 0o777;
    assert_eq!(mode, 0o600);

    // The agent is PID 1, and the server is its child.
    let (out, _) = exec(&mut client, sh("tr '\\0' ' ' < /proc/1/cmdline; echo")).await;
    assert_eq!(out, "/.ironlab/ironlab-agent init \n");

    // No NSS, no useradd/adduser in this image: the account is written by hand.
    client
        .ensure_users(EnsureUsersRequest {
            names: vec!["laborant".into()],
            sudo: true,
        })
        .await
        .expect("ensure users");
    let mut start = sh("id -un; id -u; echo $HOME; pwd; echo $SHELL");
    start.user = "laborant".into();
    let (out, exit) = exec(&mut client, start).await;
    assert_eq!(
        out,
        "laborant\n1000\n/home/laborant\n/home/laborant\n/bin/sh\n"
    );
    assert_eq!(exit, Some(Exit { code: 0, signal: 0 }));
    assert!(
        m.root
            .path()
            .join("etc/sudoers.d/90-ironlab-laborant")
            .is_file()
    );

    // A login shell on a PTY, as the user.
    let start = ExecStart {
        argv: vec!["tty".into()],
        user: "laborant".into(),
        tty: true,
        ..Default::default()
    };
    let (out, exit) = exec(&mut client, start).await;
    assert!(out.starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(exit, Some(Exit { code: 0, signal: 0 }));

    // Orphans are reaped by PID 1: no zombies a moment later.
    exec(&mut client, sh("for i in 1 2 3; do sleep 0.2 & done")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (out, _) = exec(
        &mut client,
        sh("cat /proc/[0-9]*/stat 2>/dev/null | awk '$3 == \"Z\"' "),
    )
    .await;
    assert_eq!(out, "", "zombies in the machine");

    // SIGTERM to PID 1 (as the runtime sends on stop): the machine ends cleanly, status 0.
    let _ = exec(&mut client, sh("kill -TERM 1")).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = m.unshare.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the machine did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(0));
}
