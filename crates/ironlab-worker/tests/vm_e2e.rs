//! MicroVMs end to end, as root: a real worker with real QEMU VMs (TCG on hosts whose KVM cannot
//! boot a stock kernel), Debian's cloud kernel and the project's initramfs, a busybox root drive,
//! the real static agent over virtio-serial, commands through the WebSocket relay.
//!
//! Needs: root, qemu-system-x86_64, the guest kit (`images/kernel/build.sh DIR`, found through
//! `IRONLAB_VM_KERNEL_DIR`, default /var/lib/ironlab/kernel), busybox-static, e2fsprogs, the static
//! agent. Without root or the kit the tests say why and return, unless
//! `IRONLAB_E2E_REQUIRED=1`, which turns that into a failure. VMs are small (256 MiB, 1 vCPU)
//! and one at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self as proto, ClientControl, ServerControl};
use ironlab_api::worker::{ImageRef, MachinePlan, ObservedState, RunPlan, RunStatus, TokenGrant};
use ironlab_worker::drives::FileDrives;
use ironlab_worker::{RunningWorker, WorkerConfig};
use serial_test::serial;
use tokio_tungstenite::tungstenite::Message;

#[macro_use]
mod common;

use common::{agent_bin, busybox_drive, is_root};

const TOKEN: &str = "test-worker-token-vm-0123456789";

fn kit_dir() -> Option<PathBuf> {
    let dir = ironlab_worker::vm_kernel_dir();
    let ok = dir.join("vmlinuz").is_file()
        && dir.join("initramfs.cpio").is_file()
        && ironlab_worker::runtime::vm::find_qemu().is_some();
    if ok {
        return Some(dir);
    }
    let msg = format!(
        "microVM prerequisites missing: qemu-system-x86_64 and the kit in {} (images/kernel/build.sh)",
        dir.display()
    );
    if std::env::var("IRONLAB_E2E_REQUIRED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    None
}

struct Fixture {
    tmp: tempfile::TempDir,
    runs_dir: PathBuf,
    kit: PathBuf,
    drive: PathBuf,
    worker: Option<(RunningWorker, tokio::sync::oneshot::Sender<()>)>,
    runs: Vec<String>,
    http: reqwest::Client,
}

impl Fixture {
    async fn new(kit: PathBuf, drive: impl FnOnce(&Path) -> PathBuf) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "ironlab_worker=info".into()),
            )
            .with_test_writer()
            .try_init();
        let tmp = tempfile::tempdir().expect("tempdir");
        let drive = drive(tmp.path());
        let runs_dir = tmp.path().join("pool/runs");
        std::fs::create_dir_all(&runs_dir).expect("runs dir");
        let mut f = Fixture {
            tmp,
            runs_dir,
            kit,
            drive,
            worker: None,
            runs: Vec::new(),
            http: reqwest::Client::new(),
        };
        f.start_worker().await;
        f
    }

    async fn start_worker(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: self.tmp.path().to_path_buf(),
            token: TOKEN.into(),
            public_url: None,
            agent_bin: agent_bin(),
            stock_dir: self.tmp.path().join("stock"),
            insecure_registries: vec![],
            net: Default::default(),
            snapshot_store: None,
        };
        let drives = Arc::new(FileDrives {
            file: self.drive.clone(),
            env: vec![],
        });
        let w = ironlab_worker::start_with(config, self.runs_dir.clone(), drives, async {
            let _ = rx.await;
        })
        .await
        .expect("worker starts");
        self.worker = Some((w, tx));
    }

    async fn stop_worker(&mut self) {
        if let Some((w, tx)) = self.worker.take() {
            let _ = tx.send(());
            tokio::time::timeout(Duration::from_secs(10), w.wait())
                .await
                .expect("worker stops")
                .expect("worker ran");
        }
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.worker.as_ref().expect("worker").0.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn plan(&mut self, machine: &str) -> RunPlan {
        let id = format!("v{:011x}", rand::random::<u64>() & 0xfff_ffff_ffff);
        self.runs.push(id.clone());
        RunPlan {
            run_id: id,
            machines: vec![MachinePlan {
                name: machine.into(),
                runtime: "microvm".into(),
                image: ImageRef::Stock {
                    name: "busybox".into(),
                },
                root_size_bytes: 128 << 20,
                cpus: 1,
                memory_bytes: 256 << 20,
                pids_limit: 200,
                users: vec![],
                default_user: "root".into(),
                files: vec![],
                tasks: vec![],
                interfaces: vec![],
            }],
            networks: vec![],
            egress: Default::default(),
        }
    }

    async fn start(&self, plan: &RunPlan) -> RunStatus {
        let r = self
            .http
            .put(self.url(&format!("/v1/runs/{}", plan.run_id)))
            .bearer_auth(TOKEN)
            .json(plan)
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let st = self.status(&plan.run_id, 30).await;
            if st.state != ObservedState::Starting || Instant::now() > deadline {
                return st;
            }
        }
    }

    async fn status(&self, run: &str, wait: u64) -> RunStatus {
        let r = self
            .http
            .get(self.url(&format!("/v1/runs/{run}?wait={wait}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 200);
        r.json().await.expect("status json")
    }

    async fn destroy(&self, run: &str) {
        let r = self
            .http
            .delete(self.url(&format!("/v1/runs/{run}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status(), 204);
    }

    async fn exec(&self, run: &str, machine: &str, argv: &[&str], tty: bool) -> (String, i32) {
        self.try_exec(run, machine, argv, tty)
            .await
            .unwrap_or_else(|e| panic!("terminal error: {e}"))
    }

    /// Like [`Self::exec`]; a session error is returned, not a failure.
    async fn try_exec(
        &self,
        run: &str,
        machine: &str,
        argv: &[&str],
        tty: bool,
    ) -> Result<(String, i32), String> {
        let token = format!(
            "tok{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let r = self
            .http
            .post(self.url("/v1/tokens"))
            .bearer_auth(TOKEN)
            .json(&TokenGrant {
                token: token.clone(),
                user: "u1".into(),
                run: run.into(),
                machine: machine.into(),
                expires_at: chrono::Utc::now() + chrono::Duration::seconds(30),
                scope: Default::default(),
            })
            .send()
            .await
            .expect("POST token");
        assert_eq!(r.status(), 204);
        let url = format!(
            "ws://{}/v1/runs/{run}/machines/{machine}/terminal?token={token}",
            self.addr()
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("websocket");
        let start = ClientControl::Start {
            command: argv.iter().map(|s| s.to_string()).collect(),
            tty,
            cols: 80,
            rows: 24,
            env: Default::default(),
            term: None,
            session: None,
        };
        ws.send(Message::Text(
            serde_json::to_string(&start).expect("json").into(),
        ))
        .await
        .expect("send start");
        if !tty {
            ws.send(Message::Text(r#"{"type":"eof"}"#.into()))
                .await
                .expect("send eof");
        }
        let mut out = Vec::new();
        let fut = async {
            while let Some(msg) = ws.next().await {
                match msg.expect("ws message") {
                    Message::Binary(b) => {
                        if let Some((_, data)) = proto::split_frame(&b) {
                            out.extend_from_slice(data);
                        }
                    }
                    Message::Text(t) => {
                        match serde_json::from_str::<ServerControl>(&t).expect("control") {
                            ServerControl::Exit { code } => return Ok(code),
                            ServerControl::Error { message } => return Err(message),
                            ServerControl::Started { .. } => {}
                        }
                    }
                    Message::Close(_) => return Ok(-1),
                    _ => {}
                }
            }
            Ok(-1)
        };
        let code = tokio::time::timeout(Duration::from_secs(60), fut)
            .await
            .expect("command finishes")?;
        Ok((String::from_utf8_lossy(&out).into_owned(), code))
    }

    fn qemu_pid(&self, run: &str, machine: &str) -> Option<i32> {
        std::fs::read_to_string(self.runs_dir.join(run).join(machine).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// What a run left on the host: QEMU processes, cgroups, netns, files.
    fn leftovers(&self, run: &str) -> Vec<String> {
        let mut left = Vec::new();
        let want = format!("guest=il-{run}-");
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                if let Ok(c) = std::fs::read(e.path().join("cmdline"))
                    && String::from_utf8_lossy(&c).contains(&want)
                {
                    left.push(format!("process {}", e.file_name().to_string_lossy()));
                }
            }
        }
        for c in ["memory", "pids", "cpu"] {
            let d = format!("/sys/fs/cgroup/{c}/ironlab/{run}");
            if Path::new(&d).exists() {
                left.push(d);
            }
        }
        if Path::new(&format!("/var/run/netns/il-{run}")).exists() {
            left.push(format!("netns il-{run}"));
        }
        if self.runs_dir.join(run).exists() {
            left.push(format!("dir {}", self.runs_dir.join(run).display()));
        }
        left
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best effort when a test failed half-way: kill our QEMUs, remove netns and cgroups.
        for run in &self.runs {
            for m in ["vm"] {
                if let Some(pid) = self.qemu_pid(run, m) {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "delete", &format!("il-{run}")])
                .output();
            for c in ["memory", "pids", "cpu"] {
                let dir = format!("/sys/fs/cgroup/{c}/ironlab/{run}");
                let _ = Command::new("find")
                    .args([&dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .output();
            }
        }
        let _ = &self.tmp;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn microvm_runs_the_guest_kernel_with_the_planned_memory_and_cleans_up() {
    skip_if_not_root!();
    let Some(kit) = kit_dir() else { return };
    let mut f = Fixture::new(kit, busybox_drive).await;
    let st: serde_json::Value = f
        .http
        .get(f.url("/v1/status"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert!(
        st["runtimes"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == "microvm")),
        "{st}"
    );
    let accel = st["accel"].as_str().unwrap_or_default().to_string();
    assert!(accel == "kvm" || accel == "tcg", "{st}");

    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    let st = f.start(&plan).await;
    assert_eq!(st.state, ObservedState::Running, "{st:?}");
    assert_eq!(st.machines[0].runtime, "microvm");

    // The guest's kernel, not the host's.
    let release = std::fs::read_to_string(f.kit.join("VERSION")).expect("VERSION");
    let (out, code) = f.exec(&run, "vm", &["busybox", "uname", "-r"], false).await;
    assert_eq!((out.trim(), code), (release.trim(), 0));
    let host = String::from_utf8_lossy(
        &Command::new("uname")
            .arg("-r")
            .output()
            .expect("uname")
            .stdout,
    )
    .trim()
    .to_string();
    assert_ne!(out.trim(), host);

    // Memory as planned: MemTotal is the 256 MiB minus what the kernel keeps for itself.
    let (out, _) = f
        .exec(&run, "vm", &["grep", "MemTotal", "/proc/meminfo"], false)
        .await;
    let kb: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal in {out:?}"));
    assert!(
        (200 * 1024..=256 * 1024).contains(&kb),
        "MemTotal {kb} kB for a 256 MiB plan"
    );

    // Hostname, a PTY session, the agent as PID 1 in a guest without systemd.
    let (out, _) = f.exec(&run, "vm", &["hostname"], false).await;
    assert_eq!(out.trim(), "vm");
    let (out, code) = f
        .exec(&run, "vm", &["sh", "-c", "busybox tty; stty size"], true)
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("24 80"), "{out:?}");
    let (out, _) = f.exec(&run, "vm", &["cat", "/proc/1/cmdline"], false).await;
    assert!(out.starts_with("/.ironlab/agent"), "pid 1 is {out:?}");

    // QEMU runs as its own unprivileged user, in the machine's cgroup, with a memory limit.
    let pid = f.qemu_pid(&run, "vm").expect("qemu pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).expect("Uid");
    assert!(!uid_line.split_whitespace().any(|u| u == "0"), "{uid_line}");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    assert!(
        cgroup.contains(&format!("memory:/ironlab/{run}/vm")),
        "{cgroup}"
    );
    let limit: u64 = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/ironlab/{run}/vm/memory.limit_in_bytes"
    ))
    .expect("limit")
    .trim()
    .parse()
    .expect("number");
    assert!(limit > 256 << 20 && limit < 1 << 30, "limit {limit}");

    f.destroy(&run).await;
    assert_eq!(f.leftovers(&run), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_worker_restart_keeps_the_microvm_and_its_agent_channel() {
    skip_if_not_root!();
    let Some(kit) = kit_dir() else { return };
    let mut f = Fixture::new(kit, busybox_drive).await;
    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    assert_eq!(f.start(&plan).await.state, ObservedState::Running);
    let (out, _) = f
        .exec(
            &run,
            "vm",
            &["sh", "-c", "echo $$ > /tmp/marker; cat /tmp/marker"],
            false,
        )
        .await;
    let pid = f.qemu_pid(&run, "vm").expect("pid");

    // The worker goes away and comes back: the VM keeps running, the new worker re-attaches
    // to its agent over a fresh serial session, and what the user made is still there.
    f.stop_worker().await;
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU survived the worker"
    );
    f.start_worker().await;
    let st = f.status(&run, 0).await;
    assert_eq!(st.state, ObservedState::Running, "{st:?}");
    let (again, code) = f.exec(&run, "vm", &["cat", "/tmp/marker"], false).await;
    assert_eq!((again.as_str(), code), (out.as_str(), 0));
    assert_eq!(f.qemu_pid(&run, "vm"), Some(pid));

    f.destroy(&run).await;
    assert_eq!(f.leftovers(&run), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_guest_that_powers_off_and_a_killed_qemu_fail_the_run_with_a_reason() {
    skip_if_not_root!();
    let Some(kit) = kit_dir() else { return };
    let mut f = Fixture::new(kit, busybox_drive).await;

    // The guest powers itself off.
    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    assert_eq!(f.start(&plan).await.state, ObservedState::Running);
    let pid = f.qemu_pid(&run, "vm").expect("pid");
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        f.try_exec(
            &run,
            "vm",
            &["sh", "-c", "echo o > /proc/sysrq-trigger"],
            false,
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = f.status(&run, 0).await;
    assert_eq!(st.state, ObservedState::Failed, "{st:?}");
    let reason = st.error.clone().unwrap_or_default();
    assert!(reason.contains("the guest powered itself off"), "{reason}");
    f.destroy(&run).await;
    assert_eq!(f.leftovers(&run), Vec::<String>::new());

    // QEMU is killed from outside.
    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    assert_eq!(f.start(&plan).await.state, ObservedState::Running);
    let pid = f.qemu_pid(&run, "vm").expect("pid");
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = f.status(&run, 0).await;
    assert_eq!(st.state, ObservedState::Failed, "{st:?}");
    let reason = st.error.clone().unwrap_or_default();
    assert!(reason.contains("QEMU exited unexpectedly"), "{reason}");
    f.destroy(&run).await;
    assert_eq!(f.leftovers(&run), Vec::<String>::new());
}

/// A busybox drive whose `/lib/systemd/systemd` (with `/sbin/init` linking to it, so the
/// initramfs hands over to "systemd") is the shell script `script`.
fn fake_systemd_drive(dir: &Path, script: &str) -> PathBuf {
    let file = busybox_drive(dir);
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("lib/systemd")).expect("mkdir");
    std::fs::create_dir_all(root.join("sbin")).expect("mkdir");
    std::fs::write(root.join("lib/systemd/systemd"), script).expect("write");
    Command::new("chmod")
        .args(["755", &root.join("lib/systemd/systemd").to_string_lossy()])
        .status()
        .expect("chmod");
    std::os::unix::fs::symlink("/lib/systemd/systemd", root.join("sbin/init")).expect("symlink");
    std::fs::remove_file(&file).expect("rm");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&file)
        .arg("64M")
        .status()
        .expect("mkfs");
    assert!(st.success());
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn the_agent_of_a_systemd_guest_answers_before_systemd_starts_any_unit() {
    skip_if_not_root!();
    let Some(kit) = kit_dir() else { return };
    // A "systemd" that never starts a unit: the initramfs started the agent before handing
    // over, so the machine is ready anyway, PID 1 is that "systemd", and PTYs work (devpts was
    // mounted for the agent, not by systemd).
    let drive = |dir: &Path| {
        fake_systemd_drive(
            dir,
            "#!/bin/sh\necho fake-systemd-running\nwhile :; do sleep 1000; done\n",
        )
    };
    let mut f = Fixture::new(kit, drive).await;
    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    let st = f.start(&plan).await;
    assert_eq!(st.state, ObservedState::Running, "{st:?}");
    let (out, _) = f.exec(&run, "vm", &["cat", "/proc/1/cmdline"], false).await;
    assert!(
        out.contains("/sbin/init") && !out.contains("ironlab"),
        "pid 1 is {out:?}"
    );
    let (out, code) = f
        .exec(&run, "vm", &["sh", "-c", "busybox tty; stty size"], true)
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    // The unit that restarts the agent once this early one exits is in place for systemd.
    let (out, code) = f
        .exec(
            &run,
            "vm",
            &[
                "cat",
                "/run/systemd/system/sysinit.target.wants/ironlab-agent.service",
            ],
            false,
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("tail --pid"), "{out}");
    f.destroy(&run).await;
    assert_eq!(f.leftovers(&run), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_guest_whose_agent_never_answers_fails_with_a_reason_and_cleans_up() {
    skip_if_not_root!();
    let Some(kit) = kit_dir() else { return };
    // A "systemd" that freezes the agent the initramfs started (before the agent's first serial
    // session: the agent needs several round trips with the host, this script none) and never
    // starts a unit: the agent never answers.
    let drive = |dir: &Path| {
        fake_systemd_drive(
            dir,
            "#!/bin/sh\nbusybox kill -STOP $(busybox cat /run/ironlab/agent.pid)\n\
             echo fake-systemd-running\nwhile :; do sleep 1000; done\n",
        )
    };
    unsafe_env_timeout();
    let mut f = Fixture::new(kit, drive).await;
    let plan = f.plan("vm");
    let run = plan.run_id.clone();
    let st = f.start(&plan).await;
    assert_eq!(st.state, ObservedState::Failed, "{st:?}");
    let reason = st.error.clone().unwrap_or_default();
    assert!(reason.contains("agent did not answer within"), "{reason}");
    assert!(
        reason.contains("fake-systemd-running"),
        "console tail in: {reason}"
    );
    // A failed start is torn down by the worker.
    assert_eq!(f.leftovers(&run), Vec::<String>::new());
    f.destroy(&run).await;
}

/// Shortens the microVM agent timeout for the never-ready test (nextest runs each test in its
/// own process).
#[allow(unsafe_code)]
fn unsafe_env_timeout() {
    // SAFETY: `set_var` is unsafe because other threads may read the environment at the same
    // time; this runs before the worker starts, and nothing else in this test reads it.
    unsafe {
        std::env::set_var("IRONLAB_VM_AGENT_TIMEOUT", "45");
    }
}
