//! Worker end to end, as root: a real worker (axum on 127.0.0.1:0), real crun containers from a
//! busybox ext4 drive, the real static agent, terminals through the WebSocket relay.
//!
//! Needs: root, crun (or runc), busybox-static, e2fsprogs, iproute2, and the static agent
//! (`IRONLAB_AGENT`, or built by `scripts/build-agent.sh` /
//! `cargo build --target x86_64-unknown-linux-musl -p ironlab-agent`). Without root the tests
//! print why and return; without the agent they fail, saying how to build it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self as proto, ClientControl, ServerControl};
use ironlab_api::worker::{
    FilePlan, ImageRef, MachinePlan, ObservedState, RunPlan, RunStatus, TokenGrant,
};
use ironlab_worker::drives::FileDrives;
use ironlab_worker::{RunningWorker, WorkerConfig};
use serial_test::serial;
use tokio_tungstenite::tungstenite::Message;

#[macro_use]
mod common;

use common::{agent_bin, busybox_drive, is_root, sh};

const TOKEN: &str = "test-worker-token-0123456789";

struct Fixture {
    _tmp: tempfile::TempDir,
    runs_dir: PathBuf,
    drive: PathBuf,
    agent: PathBuf,
    worker: Option<(RunningWorker, tokio::sync::oneshot::Sender<()>)>,
    run_ids: Vec<String>,
    http: reqwest::Client,
}

impl Fixture {
    async fn new() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "ironlab_worker=info".into()),
            )
            .with_test_writer()
            .try_init();
        let agent = agent_bin();
        let tmp = tempfile::tempdir().expect("tempdir");
        let drive = busybox_drive(tmp.path());
        let runs_dir = tmp.path().join("pool/runs");
        std::fs::create_dir_all(&runs_dir).expect("runs dir");
        let mut f = Fixture {
            _tmp: tmp,
            runs_dir,
            drive,
            agent,
            worker: None,
            run_ids: Vec::new(),
            http: reqwest::Client::new(),
        };
        f.start_worker().await;
        f
    }

    async fn start_worker(&mut self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: self._tmp.path().to_path_buf(),
            token: TOKEN.into(),
            public_url: None,
            agent_bin: self.agent.clone(),
            stock_dir: self._tmp.path().join("stock"),
            insecure_registries: vec![],
            net: Default::default(),
            snapshot_store: None,
        };
        let drives = Arc::new(FileDrives {
            file: self.drive.clone(),
            env: vec!["IMAGE_VAR=from-image".into()],
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
        self.worker.as_ref().expect("worker running").0.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn new_run_id(&mut self) -> String {
        let id: String = format!("t{:011x}", rand_u64() & 0xfff_ffff_ffff);
        self.run_ids.push(id.clone());
        id
    }

    async fn put(&self, plan: &RunPlan) -> reqwest::Response {
        self.http
            .put(self.url(&format!("/v1/runs/{}", plan.run_id)))
            .bearer_auth(TOKEN)
            .json(plan)
            .send()
            .await
            .expect("PUT")
    }

    async fn wait_run(&self, run: &str) -> RunStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self
                .http
                .get(self.url(&format!("/v1/runs/{run}?wait=30")))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("GET");
            assert_eq!(r.status(), 200, "GET run {run}");
            let st: RunStatus = r.json().await.expect("status json");
            if st.state != ObservedState::Starting || Instant::now() > deadline {
                return st;
            }
        }
    }

    async fn delete(&self, run: &str) -> reqwest::StatusCode {
        self.http
            .delete(self.url(&format!("/v1/runs/{run}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE")
            .status()
    }

    async fn grant(&self, run: &str, machine: &str) -> String {
        let token = format!("tok{:016x}{:016x}", rand_u64(), rand_u64());
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
        token
    }

    /// Runs `argv` in the machine through the relay; returns (stdout, stderr, exit code).
    async fn exec(&self, run: &str, machine: &str, argv: &[&str]) -> (String, String, i32) {
        let token = self.grant(run, machine).await;
        exec_with_token(self.addr(), run, machine, &token, argv)
            .await
            .expect("terminal session")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best-effort cleanup when a test failed half-way (sync: no runtime in Drop).
        for run in &self.run_ids {
            for line in sh("crun", &["list", "-q"]).lines() {
                if line.starts_with(&format!("il-{run}-")) {
                    let _ = Command::new("crun").args(["delete", "-f", line]).status();
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "delete", &format!("il-{run}")])
                .output();
        }
        common::scrub_host(&self.runs_dir, &self.runs_dir, &self.run_ids);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

async fn exec_with_token(
    addr: std::net::SocketAddr,
    run: &str,
    machine: &str,
    token: &str,
    argv: &[&str],
) -> Result<(String, String, i32), String> {
    let url = format!("ws://{addr}/v1/runs/{run}/machines/{machine}/terminal?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                format!("HTTP {}", r.status().as_u16())
            }
            e => e.to_string(),
        })?;
    let start = ClientControl::Start {
        command: argv.iter().map(|s| s.to_string()).collect(),
        tty: false,
        cols: 0,
        rows: 0,
        env: BTreeMap::new(),
        term: None,
        session: None,
    };
    ws.send(Message::Text(
        serde_json::to_string(&start).expect("json").into(),
    ))
    .await
    .map_err(|e| e.to_string())?;
    ws.send(Message::Text(r#"{"type":"eof"}"#.into()))
        .await
        .map_err(|e| e.to_string())?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "session timed out".to_string())?;
        match msg {
            Some(Ok(Message::Binary(b))) => match proto::split_frame(&b) {
                Some((proto::STDOUT, d)) => out.extend_from_slice(d),
                Some((proto::STDERR, d)) => err.extend_from_slice(d),
                other => return Err(format!("unexpected frame {other:?}")),
            },
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t) {
                Ok(ServerControl::Started { .. }) => {}
                Ok(ServerControl::Exit { code }) => {
                    return Ok((
                        String::from_utf8_lossy(&out).into_owned(),
                        String::from_utf8_lossy(&err).into_owned(),
                        code,
                    ));
                }
                Ok(ServerControl::Error { message }) => return Err(message),
                Err(e) => return Err(format!("bad control frame {t}: {e}")),
            },
            Some(Ok(Message::Close(_))) | None => return Err("closed without exit".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
}

fn plan(run: &str, machines: &[&str]) -> RunPlan {
    RunPlan {
        run_id: run.into(),
        machines: machines
            .iter()
            .map(|m| MachinePlan {
                name: m.to_string(),
                runtime: "container".into(),
                image: ImageRef::Oci {
                    reference: "127.0.0.1:5000/test/busybox:1".into(),
                },
                root_size_bytes: 128 << 20,
                cpus: 1,
                memory_bytes: 96 << 20,
                pids_limit: 256,
                users: vec!["laborant".into()],
                default_user: "laborant".into(),
                files: vec![FilePlan {
                    path: "/etc/motd".into(),
                    content: format!("Welcome to {m}!\n"),
                    mode: 0o644,
                    owner: String::new(),
                    append: false,
                }],
                tasks: vec![],
                interfaces: vec![],
            })
            .collect(),
        networks: vec![],
        egress: Default::default(),
    }
}

/// Asserts nothing of `run` is left on the host.
fn assert_clean(runs_dir: &Path, run: &str) {
    let netns = sh("ip", &["netns", "list"]);
    assert!(
        !netns
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&format!("il-{run}"))),
        "netns il-{run} left: {netns}"
    );
    let run_dir = runs_dir.join(run);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mountinfo.contains(&run_dir.to_string_lossy().to_string()),
        "mount under {} left",
        run_dir.display()
    );
    let loops = sh("losetup", &["-l", "-n", "--raw", "-O", "NAME,BACK-FILE"]);
    assert!(
        !loops.contains(&run_dir.to_string_lossy().to_string()),
        "loop device left: {loops}"
    );
    let crun = sh("crun", &["list", "-q"]);
    assert!(
        !crun.lines().any(|l| l.starts_with(&format!("il-{run}-"))),
        "crun container left: {crun}"
    );
    assert!(!run_dir.exists(), "run dir {} left", run_dir.display());
    assert!(
        !Path::new(&format!("/sys/fs/cgroup/memory/ironlab/{run}")).exists(),
        "memory cgroup of {run} left"
    );
    assert!(
        !Path::new(&format!("/sys/fs/cgroup/pids/ironlab/{run}")).exists(),
        "pids cgroup of {run} left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn run_lifecycle_exec_limits_tokens_and_clean_destroy() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    let p = plan(&run, &["web", "db"]);

    let r = f.put(&p).await;
    assert_eq!(r.status(), 202);
    // Idempotent: the same PUT again is the same run, not a second start.
    assert_eq!(f.put(&p).await.status(), 202);
    // A different plan under the same id is a conflict.
    let mut other = p.clone();
    other.machines[0].cpus = 2;
    let r = f.put(&other).await;
    assert_eq!(r.status(), 409);
    let body: ironlab_api::ErrorBody = r.json().await.expect("error body");
    assert_eq!(body.error, "conflict");

    let st = f.wait_run(&run).await;
    assert_eq!(st.state, ObservedState::Running, "{st:?}");
    assert!(
        st.machines
            .iter()
            .all(|m| m.state == ObservedState::Running)
    );
    assert!(f.runs_dir.join(&run).join("ready").exists());
    assert!(f.runs_dir.join(&run).join("plan.json").exists());

    // Exec: stdout/stderr separated, exit code, default user, hostname.
    let (out, err, code) = f
        .exec(&run, "web", &["sh", "-c", "echo out; echo err >&2; exit 3"])
        .await;
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));
    let (out, _, code) = f.exec(&run, "web", &["hostname"]).await;
    assert_eq!((out.trim(), code), ("web", 0));
    let (out, _, _) = f.exec(&run, "db", &["cat", "/etc/hostname"]).await;
    assert_eq!(out.trim(), "db");
    let (out, _, _) = f.exec(&run, "web", &["whoami"]).await;
    assert_eq!(out.trim(), "laborant");
    let (out, _, _) = f.exec(&run, "web", &["cat", "/etc/motd"]).await;
    assert_eq!(out, "Welcome to web!\n");
    let (out, _, _) = f.exec(&run, "web", &["sh", "-c", "echo $IMAGE_VAR"]).await;
    assert_eq!(out.trim(), "from-image");
    // The agent is PID 1.
    let (out, _, _) = f.exec(&run, "web", &["cat", "/proc/1/cmdline"]).await;
    assert!(out.starts_with("/.ironlab/agent"), "pid 1 is {out:?}");

    // The machine runs in its own session, away from the worker's terminal and its Ctrl-C.
    let state: serde_json::Value =
        serde_json::from_str(&sh("crun", &["state", &format!("il-{run}-web")])).expect("state");
    let pid = state["pid"].as_u64().expect("pid");
    let session = |stat: &str| -> Option<String> {
        // Fields after the `(comm)`: state ppid pgrp session …
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(3).map(str::to_string))
    };
    let machine_sid = session(&std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat"));
    let own_sid = session(&std::fs::read_to_string("/proc/self/stat").expect("stat"));
    assert!(machine_sid.is_some());
    assert_ne!(
        machine_sid, own_sid,
        "the machine shares the worker's session"
    );

    // cgroup limits.
    let mem = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/ironlab/{run}/web/memory.limit_in_bytes"
    ))
    .expect("memory cgroup of the machine");
    assert_eq!(mem.trim(), (96u64 << 20).to_string());
    if let Ok(memsw) = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/ironlab/{run}/web/memory.memsw.limit_in_bytes"
    )) {
        assert_eq!(
            memsw.trim(),
            (96u64 << 20).to_string(),
            "no swap beyond the limit"
        );
    }
    // The limit is enforced: allocating past it gets the process killed.
    let (_, _, code) = f
        .exec(
            &run,
            "web",
            &[
                "sh",
                "-c",
                "dd if=/dev/zero bs=1M count=200 | tr '\\0' x | sh -c 'v=$(cat); echo ${#v}'",
            ],
        )
        .await;
    assert_ne!(
        code, 0,
        "reading 200 MiB into memory under a 96 MiB limit must fail"
    );
    let pids = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/ironlab/{run}/web/pids.max"))
        .expect("pids cgroup");
    assert_eq!(pids.trim(), "256");

    // Tokens: reuse → 401; another machine's token → 403; unknown machine → 404; no token → 401.
    let t = f.grant(&run, "web").await;
    exec_with_token(f.addr(), &run, "web", &t, &["true"])
        .await
        .expect("first use works");
    let e = exec_with_token(f.addr(), &run, "web", &t, &["true"])
        .await
        .expect_err("reuse rejected");
    assert_eq!(e, "HTTP 401");
    let t = f.grant(&run, "db").await;
    let e = exec_with_token(f.addr(), &run, "web", &t, &["true"])
        .await
        .expect_err("wrong machine rejected");
    assert_eq!(e, "HTTP 403");
    let t = f.grant(&run, "web").await;
    let e = exec_with_token(f.addr(), &run, "nope", &t, &["true"])
        .await
        .expect_err("unknown machine");
    assert_eq!(e, "HTTP 404");
    let e = exec_with_token(f.addr(), &run, "web", "", &["true"])
        .await
        .expect_err("no token");
    assert_eq!(e, "HTTP 401");
    // Bearer required on the API.
    let r = f
        .http
        .get(f.url(&format!("/v1/runs/{run}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 401);
    let r = f
        .http
        .get(f.url("/v1/runs/zzzzzz"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);

    // Destroy: nothing left; twice is fine; then 404.
    assert_eq!(f.delete(&run).await, 204);
    assert_clean(&f.runs_dir, &run);
    assert_eq!(f.delete(&run).await, 204);
    let r = f
        .http
        .get(f.url(&format!("/v1/runs/{run}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    f.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn destroy_during_start_wins_and_cleans() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    for delay_ms in [0u64, 30, 120] {
        let run = f.new_run_id();
        assert_eq!(f.put(&plan(&run, &["m1"])).await.status(), 202);
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        assert_eq!(f.delete(&run).await, 204);
        assert_clean(&f.runs_dir, &run);
    }
    f.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn restart_keeps_ready_runs_stops_dead_ones_and_removes_the_rest() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let keep = f.new_run_id();
    assert_eq!(f.put(&plan(&keep, &["m1"])).await.status(), 202);
    assert_eq!(f.wait_run(&keep).await.state, ObservedState::Running);
    let broken = f.new_run_id();
    assert_eq!(f.put(&plan(&broken, &["m1"])).await.status(), 202);
    assert_eq!(f.wait_run(&broken).await.state, ObservedState::Running);
    f.stop_worker().await;

    // While the worker is down, `broken` loses its machine; a half-made run appears too.
    let st = Command::new("crun")
        .args(["delete", "-f", &format!("il-{broken}-m1")])
        .status()
        .expect("crun");
    assert!(st.success());
    let half = f.new_run_id();
    std::fs::create_dir_all(f.runs_dir.join(&half).join("m1")).expect("mkdir");
    std::fs::write(
        f.runs_dir.join(&half).join("plan.json"),
        serde_json::to_vec(&plan(&half, &["m1"])).expect("json"),
    )
    .expect("plan");
    let _ = Command::new("ip")
        .args(["netns", "add", &format!("il-{half}")])
        .status();

    f.start_worker().await;
    let st = f.wait_run(&keep).await;
    assert_eq!(st.state, ObservedState::Running);
    let (out, _, code) = f.exec(&keep, "m1", &["hostname"]).await;
    assert_eq!((out.trim(), code), ("m1", 0));
    // `broken` was ready: its drive holds the user's work, so it is kept, stopped, with why.
    let st = f.wait_run(&broken).await;
    assert_eq!(st.state, ObservedState::Stopped, "{st:?}");
    assert!(
        st.error
            .as_deref()
            .unwrap_or("")
            .contains("while the worker was away"),
        "{st:?}"
    );
    assert!(f.runs_dir.join(&broken).join("m1/root.ext4").is_file());
    assert!(
        !Path::new("/run/netns")
            .join(format!("il-{broken}"))
            .exists(),
        "a stopped run holds no network namespace"
    );
    assert_eq!(f.delete(&broken).await, 204);
    assert_clean(&f.runs_dir, &broken);
    for gone in [&half] {
        let r = f
            .http
            .get(f.url(&format!("/v1/runs/{gone}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("GET");
        assert_eq!(r.status(), 404, "run {gone} is forgotten");
        assert_clean(&f.runs_dir, gone);
    }
    assert_eq!(f.delete(&keep).await, 204);
    assert_clean(&f.runs_dir, &keep);
    f.stop_worker().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_failing_machine_fails_the_run_with_a_reason_and_cleans() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    let mut p = plan(&run, &["m1", "m2"]);
    // A startup file under a path that cannot be written makes provisioning fail.
    p.machines[1].files.push(FilePlan {
        path: "/proc/version/nope".into(),
        content: "x".into(),
        mode: 0o644,
        owner: String::new(),
        append: false,
    });
    assert_eq!(f.put(&p).await.status(), 202);
    let st = f.wait_run(&run).await;
    assert_eq!(st.state, ObservedState::Failed, "{st:?}");
    let err = st.error.clone().unwrap_or_default();
    assert!(
        err.contains("m2") && err.contains("/proc/version/nope"),
        "{err}"
    );
    assert_clean(&f.runs_dir, &run);
    assert_eq!(f.delete(&run).await, 204);
    f.stop_worker().await;
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn output_flood_is_bounded_and_leaving_kills_the_process() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    assert_eq!(f.put(&plan(&run, &["m1"])).await.status(), 202);
    assert_eq!(f.wait_run(&run).await.state, ObservedState::Running);

    let token = f.grant(&run, "m1").await;
    let url = format!(
        "ws://{}/v1/runs/{run}/machines/m1/terminal?token={token}",
        f.addr()
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let start = ClientControl::Start {
        command: vec!["yes".into(), "flood".into()],
        tty: false,
        cols: 0,
        rows: 0,
        env: BTreeMap::new(),
        term: None,
        session: None,
    };
    ws.send(Message::Text(
        serde_json::to_string(&start).expect("json").into(),
    ))
    .await
    .expect("start");
    // Read a little, then stop reading for a while: `yes` keeps writing, the worker must not
    // buffer its output.
    let mut got = 0usize;
    while got < 64 * 1024 {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => got += b.len(),
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let before = rss_kib();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "worker memory grew by {grown} KiB while the client did not read"
    );
    drop(ws);

    // Leaving hangs up the process: no `yes` remains in the machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (out, _, _) = f.exec(&run, "m1", &["ps", "-o", "comm"]).await;
        if !out.lines().any(|l| l.trim() == "yes") {
            break;
        }
        assert!(Instant::now() < deadline, "yes still runs: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(f.delete(&run).await, 204);
    assert_clean(&f.runs_dir, &run);
    f.stop_worker().await;
}
