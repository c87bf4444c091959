//! `EnsureUsers` with the real `useradd` (the Debian path), on a throwaway copy of the host's
//! `/etc` bind-mounted over `/etc` in a private mount namespace: the host's accounts are never
//! touched. Then a process runs as the new user.
//!
//! Needs root, `unshare` and `useradd`; skips, saying why, without them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ironlab_api::agent::{
    EnsureUsersRequest, ExecInput, ExecStart, Exit, HealthRequest, exec_input, exec_output,
};
use tokio_stream::wrappers::ReceiverStream;

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn ensure_users_with_useradd_then_run_as_the_user() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (mount namespace)");
        return;
    }
    if !Path::new("/usr/sbin/useradd").exists()
        || Command::new("unshare").arg("--help").output().is_err()
    {
        eprintln!("skipped: needs useradd and unshare");
        return;
    }
    let name = "iltest-useradd";
    let host_passwd = std::fs::read_to_string("/etc/passwd").expect("host passwd");
    assert!(
        !host_passwd.contains(name),
        "leftover {name} in the host's /etc/passwd"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path();
    let status = Command::new("cp")
        .args(["-a", "/etc"])
        .arg(t.join("etc"))
        .status()
        .expect("cp");
    assert!(status.success(), "copy /etc");
    std::fs::create_dir_all(t.join("etc/sudoers.d")).expect("sudoers.d");
    std::fs::create_dir_all(t.join("home")).expect("home");
    let socket = t.join("agent.sock");
    let td = t.display();
    // `set -e`: the agent only starts once both bind mounts are in place.
    let script = format!(
        "set -e; mount --bind {td}/etc /etc; mount --bind {td}/home /home; exec \"$0\" serve --socket {td}/agent.sock"
    );
    let child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(env!("CARGO_BIN_EXE_ironlab-agent"))
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut serve = Serve(child);

    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        if let Ok(mut c) = ironlab_agent::connect(&socket).await
            && c.health(HealthRequest {}).await.is_ok()
        {
            break c;
        }
        if let Ok(Some(st)) = serve.0.try_wait() {
            panic!("agent exited early: {st}");
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    client
        .ensure_users(EnsureUsersRequest {
            names: vec![name.into()],
            sudo: true,
        })
        .await
        .expect("ensure users");
    // Twice is fine.
    client
        .ensure_users(EnsureUsersRequest {
            names: vec![name.into()],
            sudo: true,
        })
        .await
        .expect("ensure users again");

    let passwd = std::fs::read_to_string(t.join("etc/passwd")).expect("passwd copy");
    let line = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .unwrap_or_else(|| panic!("{name} not created: {passwd}"));
    assert!(
        line.ends_with(":/bin/bash") || line.ends_with(":/bin/sh"),
        "{line}"
    );
    let uid: u32 = line
        .split(':')
        .nth(2)
        .and_then(|u| u.parse().ok())
        .expect("uid");
    let home = std::fs::metadata(t.join("home").join(name)).expect("home created by useradd -m");
    assert_eq!(home.uid(), uid);
    assert_eq!(
        std::fs::read_to_string(t.join(format!("etc/sudoers.d/90-ironlab-{name}")))
            .expect("sudoers"),
        format!("{name} ALL=(ALL) NOPASSWD:ALL\n")
    );
    assert!(
        !std::fs::read_to_string("/etc/passwd")
            .expect("host passwd")
            .contains(name),
        "the host's /etc/passwd was changed"
    );

    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(ExecInput {
        kind: Some(exec_input::Kind::Start(ExecStart {
            argv: vec!["sh".into(), "-c".into(), "id -un; id -u; pwd".into()],
            user: name.into(),
            ..Default::default()
        })),
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
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        format!("{name}\n{uid}\n/home/{name}\n")
    );
    assert_eq!(exit, Some(Exit { code: 0, signal: 0 }));
}
