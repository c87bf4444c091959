//! Networks of runs end to end, as root: real crun containers on bridges in per-run namespaces,
//! real nftables, dnsmasq and tc, and a fake internet.
//!
//! The fake internet is a network namespace each test creates (`iltf<hex>`): the worker's
//! uplinks lead there (`Uplink::Netns`), never to the host's route. It holds a dnsmasq at
//! 198.51.100.53 (`allowed.test` → 203.0.113.10, `denied.test` → 203.0.113.20, `other.test`
//! → 203.0.113.30) and an HTTP server on port 80 and 443 of every address it has, including
//! addresses a run must never reach: 169.254.169.254 (metadata), 10.255.0.1 (a private range),
//! the host's own addresses (copied in, so a leak would be answered) and the uplinks' outer ends.
//!
//! Needs: root, crun, busybox-static, e2fsprogs, iproute2, nftables, dnsmasq, and the static
//! agent (see `worker_e2e.rs`).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self as proto, ClientControl, ServerControl};
use ironlab_api::worker::{
    EgressPlan, EgressPolicy, ImageRef, InterfacePlan, MachinePlan, NetworkPlan, ObservedState,
    RunPlan, RunStatus, TokenGrant,
};
use ironlab_worker::drives::FileDrives;
use ironlab_worker::net::{NetConfig, Uplink};
use ironlab_worker::{RunningWorker, WorkerConfig};
use serial_test::serial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[macro_use]
mod common;

use common::{agent_bin, busybox_drive, is_root, sh};

const TOKEN: &str = "test-worker-token-0123456789";
const FAKE_DNS: &str = "198.51.100.53";
const ALLOWED_IP: &str = "203.0.113.10";
const DENIED_IP: &str = "203.0.113.20";
const OTHER_IP: &str = "203.0.113.30";
const METADATA_IP: &str = "169.254.169.254";
const PRIVATE_IP: &str = "10.255.0.1";

fn rand_hex() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    format!("{:016x}", h.finish())
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Binds a TCP listener inside the namespace `ns` (from a thread that enters it).
fn listen_in(ns: &str, addr: SocketAddr) -> std::net::TcpListener {
    let path = PathBuf::from("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = std::net::TcpListener::bind(addr).expect("bind in the fake internet");
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
    .join()
    .expect("listener thread")
}

/// The tests' internet: a namespace with a resolver and HTTP servers (see the module doc).
struct FakeInternet {
    name: String,
    dir: tempfile::TempDir,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl FakeInternet {
    fn start() -> Self {
        let name = format!("iltf{}", &rand_hex()[..8]);
        let dir = tempfile::tempdir().expect("tempdir");
        ip(&["netns", "add", &name]);
        let mut addrs = vec![
            FAKE_DNS,
            ALLOWED_IP,
            DENIED_IP,
            OTHER_IP,
            METADATA_IP,
            PRIVATE_IP,
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        // The host's own addresses: a run that reached them would get an answer here.
        addrs.extend(host_addresses().iter().map(|a| a.to_string()));
        let mut batch = String::from("link set lo up\n");
        for a in &addrs {
            batch.push_str(&format!("addr add {a}/32 dev lo\n"));
        }
        let mut child = Command::new("ip")
            .args(["-n", &name, "-batch", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("ip -batch");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(batch.as_bytes())
            .expect("write batch");
        assert!(
            child.wait().expect("ip").success(),
            "fake internet addresses"
        );
        let conf = dir.path().join("dnsmasq.conf");
        std::fs::write(
            &conf,
            format!(
                "no-resolv\nno-hosts\nbind-interfaces\nlisten-address={FAKE_DNS}\nuser=root\n\
                 address=/allowed.test/{ALLOWED_IP}\naddress=/denied.test/{DENIED_IP}\n\
                 address=/other.test/{OTHER_IP}\nlocal=/test/\npid-file={}\n",
                dir.path().join("dnsmasq.pid").display()
            ),
        )
        .expect("dnsmasq conf");
        let st = Command::new("ip")
            .args(["netns", "exec", &name, "dnsmasq"])
            .arg(format!("--conf-file={}", conf.display()))
            .status()
            .expect("dnsmasq");
        assert!(st.success(), "fake internet dnsmasq");
        let mut tasks = Vec::new();
        for port in [80u16, 443, 9000] {
            let l = listen_in(&name, SocketAddr::from(([0, 0, 0, 0], port)));
            let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
            tasks.push(tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(serve_http(s, port));
                }
            }));
        }
        FakeInternet { name, dir, tasks }
    }
}

impl Drop for FakeInternet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("dnsmasq.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// A tiny HTTP server: `GET /` → `hello from ADDR:PORT`; `GET /bulk/N` → N bytes.
async fn serve_http(mut s: tokio::net::TcpStream, port: u16) {
    let local = s
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    if path == "/upload" {
        // Read the body (Content-Length bytes), then say how much arrived.
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let start = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(buf.len(), |p| p + 4);
        let mut got = buf.len() - start;
        while got < len {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        let body = format!("got {got}\n");
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        return;
    }
    if let Some(n) = path
        .strip_prefix("/bulk/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let _ = s
            .write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {n}\r\n\r\n").as_bytes())
            .await;
        let block = vec![b'x'; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(block.len());
            if s.write_all(&block[..k]).await.is_err() {
                return;
            }
            left -= k;
        }
        return;
    }
    let body = format!("hello from {local}:{port}\n");
    let _ = s
        .write_all(
            format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
}

/// IPv4 addresses of the host's interfaces (not loopback).
fn host_addresses() -> Vec<Ipv4Addr> {
    sh("ip", &["-4", "-o", "addr", "show"])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.find(|w| *w == "inet")?;
            f.next()?.split('/').next()?.parse::<Ipv4Addr>().ok()
        })
        .filter(|a| !a.is_loopback() && a.octets()[0] != 100)
        .collect()
}

struct Fixture {
    tmp: tempfile::TempDir,
    runs_dir: PathBuf,
    drive: PathBuf,
    worker: Option<(RunningWorker, tokio::sync::oneshot::Sender<()>)>,
    run_ids: Vec<String>,
    http: reqwest::Client,
    fake: FakeInternet,
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
        agent_bin(); // fails early, saying how to build it
        let tmp = tempfile::tempdir().expect("tempdir");
        let drive = busybox_drive(tmp.path());
        let runs_dir = tmp.path().join("pool/runs");
        std::fs::create_dir_all(&runs_dir).expect("runs dir");
        let fake = FakeInternet::start();
        let mut f = Fixture {
            tmp,
            runs_dir,
            drive,
            worker: None,
            run_ids: Vec::new(),
            http: reqwest::Client::new(),
            fake,
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
            net: NetConfig {
                uplink: Uplink::Netns(self.fake.name.clone()),
                upstream_dns: vec![FAKE_DNS.parse().expect("ip")],
                ..Default::default()
            },
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

    fn addr(&self) -> SocketAddr {
        self.worker.as_ref().expect("worker running").0.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn new_run_id(&mut self) -> String {
        let id = format!("n{}", &rand_hex()[..11]);
        self.run_ids.push(id.clone());
        id
    }

    async fn start(&self, plan: &RunPlan) {
        let r = self
            .http
            .put(self.url(&format!("/v1/runs/{}", plan.run_id)))
            .bearer_auth(TOKEN)
            .json(plan)
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
        // Long enough for a microVM under TCG on a busy host.
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let r = self
                .http
                .get(self.url(&format!("/v1/runs/{}?wait=30", plan.run_id)))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("GET");
            let st: RunStatus = r.json().await.expect("status json");
            if st.state != ObservedState::Starting || Instant::now() > deadline {
                assert_eq!(st.state, ObservedState::Running, "{st:?}");
                return;
            }
        }
    }

    /// `POST /v1/runs/{run}/{action}` (stop, restart); asserts success.
    async fn lifecycle(&self, run: &str, action: &str) {
        let r = self
            .http
            .post(self.url(&format!("/v1/runs/{run}/{action}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("POST");
        assert!(
            r.status().is_success(),
            "{action}: {} {}",
            r.status(),
            r.text().await.unwrap_or_default()
        );
    }

    /// Waits (≤ 240 s) until the run is no longer starting; asserts it runs.
    async fn wait_running(&self, run: &str) {
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let r = self
                .http
                .get(self.url(&format!("/v1/runs/{run}?wait=30")))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("GET");
            let st: RunStatus = r.json().await.expect("status json");
            if st.state != ObservedState::Starting || Instant::now() > deadline {
                assert_eq!(st.state, ObservedState::Running, "{st:?}");
                return;
            }
        }
    }

    async fn delete(&self, run: &str) {
        let r = self
            .http
            .delete(self.url(&format!("/v1/runs/{run}")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status(), 204);
    }

    /// Runs `sh -c script` as root in the machine; returns (stdout + stderr, exit code).
    async fn sh(&self, run: &str, machine: &str, script: &str) -> (String, i32) {
        let token = format!("tok{}{}", rand_hex(), rand_hex());
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
        exec(self.addr(), run, machine, &token, &["sh", "-c", script])
            .await
            .unwrap_or_else(|e| panic!("exec {script:?} in {machine}: {e}"))
    }

    /// Asserts `script` succeeds in the machine; returns its output.
    async fn ok(&self, run: &str, machine: &str, script: &str) -> String {
        let (out, code) = self.sh(run, machine, script).await;
        assert_eq!(code, 0, "{machine}$ {script}\n{out}");
        out
    }

    /// Asserts `script` fails in the machine.
    async fn fails(&self, run: &str, machine: &str, script: &str) {
        let (out, code) = self.sh(run, machine, script).await;
        assert_ne!(
            code, 0,
            "{machine}$ {script} should fail but printed:\n{out}"
        );
    }

    /// The outer address of a run's uplink (from the worker's record).
    fn uplink(&self, run: &str) -> (String, String) {
        let text = std::fs::read_to_string(self.runs_dir.join(run).join("_net/state.json"))
            .expect("net state");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        (
            v["uplink"]["outer"].as_str().expect("outer").to_string(),
            v["uplink"]["inner"].as_str().expect("inner").to_string(),
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best-effort cleanup when a test failed half-way (sync: no runtime in Drop).
        for run in &self.run_ids {
            for pid in qemus_of(run) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            for line in sh("crun", &["list", "-q"]).lines() {
                if line.starts_with(&format!("il-{run}-")) {
                    let _ = Command::new("crun").args(["delete", "-f", line]).status();
                }
            }
            for ns in sh("ip", &["netns", "list"]).lines() {
                let ns = ns.split_whitespace().next().unwrap_or_default();
                if ns == format!("il-{run}") || ns.starts_with(&format!("ilm-{run}-")) {
                    let _ = Command::new("ip").args(["netns", "delete", ns]).output();
                }
            }
        }
        // Resolvers started for this test's runs (their command line names our pool).
        let pool = self.runs_dir.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(&pool) {
                let _ = Command::new("kill")
                    .arg(e.file_name().to_string_lossy().as_ref())
                    .status();
            }
        }
        common::scrub_host(&self.runs_dir, &self.runs_dir, &self.run_ids);
        let _ = &self.tmp;
    }
}

async fn exec(
    addr: SocketAddr,
    run: &str,
    machine: &str,
    token: &str,
    argv: &[&str],
) -> Result<(String, i32), String> {
    let url = format!("ws://{addr}/v1/runs/{run}/machines/{machine}/terminal?token={token}");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .map_err(|e| e.to_string())?;
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
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "session timed out".to_string())?;
        match msg {
            Some(Ok(Message::Binary(b))) => match proto::split_frame(&b) {
                Some((proto::STDOUT | proto::STDERR, d)) => out.extend_from_slice(d),
                other => return Err(format!("unexpected frame {other:?}")),
            },
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t) {
                Ok(ServerControl::Started { .. }) => {}
                Ok(ServerControl::Exit { code }) => {
                    return Ok((String::from_utf8_lossy(&out).into_owned(), code));
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

fn machine(name: &str, ifaces: &[(&str, &str)]) -> MachinePlan {
    MachinePlan {
        name: name.into(),
        runtime: "container".into(),
        image: ImageRef::Oci {
            reference: "127.0.0.1:5000/test/busybox:1".into(),
        },
        root_size_bytes: 128 << 20,
        cpus: 1,
        memory_bytes: 96 << 20,
        pids_limit: 256,
        users: vec![],
        default_user: "root".into(),
        files: vec![],
        tasks: vec![],
        interfaces: ifaces
            .iter()
            .map(|(n, a)| InterfacePlan {
                network: n.to_string(),
                address: a.to_string(),
            })
            .collect(),
    }
}

fn network(name: &str, subnet: &str, gateway: Option<&str>, private: bool) -> NetworkPlan {
    NetworkPlan {
        name: name.into(),
        subnet: subnet.into(),
        gateway: gateway.map(String::from),
        private,
    }
}

fn egress(policy: EgressPolicy, allow: &[&str], bandwidth_bps: u64) -> EgressPlan {
    EgressPlan {
        policy,
        allow: allow.iter().map(|s| s.to_string()).collect(),
        bandwidth_bps,
    }
}

/// A one-network run (172.16.0.0/24, the default) of machines at .2, .3, …
fn lan_plan(run: &str, machines: &[&str], egress: EgressPlan) -> RunPlan {
    RunPlan {
        run_id: run.into(),
        machines: machines
            .iter()
            .enumerate()
            .map(|(i, m)| machine(m, &[("local", &format!("172.16.0.{}", i + 2))]))
            .collect(),
        networks: vec![network("local", "172.16.0.0/24", Some("172.16.0.1"), false)],
        egress,
    }
}

/// QEMU processes of `run` (their `-name guest=il-<run>-…`).
fn qemus_of(run: &str) -> Vec<u32> {
    let want = format!("guest=il-{run}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let qemu =
            cmdline.starts_with("/usr/bin/qemu-system") || cmdline.contains("qemu-system-x86_64\0");
        if qemu && cmdline.contains(&want) {
            out.push(pid);
        }
    }
    out
}

/// Whether microVMs can run here (QEMU and the guest kit); says why not otherwise.
fn microvms_available() -> bool {
    let dir = ironlab_worker::vm_kernel_dir();
    if dir.join("vmlinuz").is_file()
        && dir.join("initramfs.cpio").is_file()
        && ironlab_worker::runtime::vm::find_qemu().is_some()
    {
        return true;
    }
    let msg = format!(
        "microVM prerequisites missing: qemu-system-x86_64 and the kit in {} (images/kernel/build.sh)",
        dir.display()
    );
    if std::env::var("IRONLAB_E2E_REQUIRED").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

fn microvm(name: &str, ifaces: &[(&str, &str)]) -> MachinePlan {
    MachinePlan {
        runtime: "microvm".into(),
        memory_bytes: 256 << 20,
        ..machine(name, ifaces)
    }
}

/// Namespaces, resolver and uplink of `run` are gone.
fn assert_network_gone(f: &Fixture, run: &str) {
    let netns = sh("ip", &["netns", "list"]);
    assert!(
        !netns.lines().any(|l| {
            let n = l.split_whitespace().next().unwrap_or_default();
            n == format!("il-{run}") || n.starts_with(&format!("ilm-{run}-"))
        }),
        "namespaces of {run} left: {netns}"
    );
    let dnsmasq = sh("pgrep", &["-af", "dnsmasq"]);
    assert!(
        !dnsmasq.contains(&format!("/{run}/_net/")),
        "resolver of {run} left: {dnsmasq}"
    );
    // The uplink's outer end goes with the run's namespace.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let links = sh("ip", &["-n", &f.fake.name, "-o", "link"]);
        if !links.contains(&format!("il-{run}")) {
            break;
        }
        assert!(Instant::now() < deadline, "uplink of {run} left: {links}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!f.runs_dir.join(run).exists(), "run dir of {run} left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn router_lab_names_reachability_forwarding_and_blocked_addresses() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    let plan = RunPlan {
        run_id: run.clone(),
        machines: vec![
            machine("router", &[("lan", "172.16.0.2"), ("back", "10.0.1.1")]),
            machine("web", &[("lan", "172.16.0.3")]),
            machine("db", &[("back", "10.0.1.2")]),
        ],
        networks: vec![
            network("lan", "172.16.0.0/24", Some("172.16.0.1"), false),
            network("back", "10.0.1.0/24", Some("10.0.1.1"), true),
        ],
        egress: egress(EgressPolicy::Open, &[], 0),
    };
    f.start(&plan).await;

    // Names: the hosts file and the resolver, bare and with the network.
    let hosts = f.ok(&run, "web", "cat /etc/hosts").await;
    assert!(hosts.contains("172.16.0.2\trouter router.lan"), "{hosts}");
    let out = f.ok(&run, "web", "nslookup router.lan").await;
    assert!(out.contains("172.16.0.2"), "{out}");
    let out = f.ok(&run, "web", "nslookup router").await;
    assert!(
        out.contains("172.16.0.2") && !out.contains("10.0.1.1"),
        "{out}"
    );
    let out = f.ok(&run, "web", "cat /etc/resolv.conf").await;
    assert!(out.contains("nameserver 172.16.0.1"), "{out}");
    f.ok(&run, "web", "ping -c1 -W2 router").await;
    f.ok(
        &run,
        "router",
        "ping -c1 -W2 db && ping -c1 -W2 db.back && ping -c1 -W2 web",
    )
    .await;
    f.ok(&run, "db", "ping -c1 -W2 router").await;
    let ifaces = f.ok(&run, "router", "ip -o -4 addr").await;
    assert!(
        ifaces.contains("eth0    inet 172.16.0.2/24")
            && ifaces.contains("eth1    inet 10.0.1.1/24"),
        "{ifaces}"
    );

    // TCP where the topology allows it.
    f.ok(
        &run,
        "db",
        "mkdir -p /tmp/www && echo db-page > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
    )
    .await;
    f.ok(
        &run,
        "router",
        "mkdir -p /tmp/www && echo router-page > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
    )
    .await;
    let out = f.ok(&run, "web", "wget -q -O - http://router:8080/").await;
    assert_eq!(out.trim(), "router-page");
    let out = f.ok(&run, "router", "wget -q -O - http://db:8080/").await;
    assert_eq!(out.trim(), "db-page");

    // Not across the LANs: web has no route to the private network, and once it has one the
    // router does not forward until the student turns forwarding on.
    f.fails(&run, "web", "ping -c1 -W1 10.0.1.2").await;
    f.fails(&run, "web", "timeout 3 wget -q -O - http://10.0.1.2:8080/")
        .await;
    f.ok(&run, "web", "ip route add 10.0.1.0/24 via 172.16.0.2")
        .await;
    f.fails(&run, "web", "ping -c1 -W1 10.0.1.2").await;
    f.ok(&run, "router", "sysctl -w net.ipv4.ip_forward=1")
        .await;
    f.ok(&run, "web", "ping -c1 -W2 10.0.1.2").await;
    let out = f
        .ok(&run, "web", "wget -q -O - http://10.0.1.2:8080/")
        .await;
    assert_eq!(out.trim(), "db-page");
    // Forwarding is the router's own: the other machines' settings did not change.
    let out = f.ok(&run, "web", "cat /proc/sys/net/ipv4/ip_forward").await;
    assert_eq!(out.trim(), "0");
    // Global sysctls stay read-only.
    f.fails(&run, "router", "echo 1 > /proc/sys/kernel/sysrq")
        .await;

    // The private network has no way out and no resolver.
    f.fails(
        &run,
        "db",
        &format!("timeout 3 wget -q -O - http://{ALLOWED_IP}/"),
    )
    .await;
    let out = f.ok(&run, "db", "cat /etc/resolv.conf").await;
    assert!(!out.contains("nameserver"), "{out}");

    // The way out (egress open) reaches the internet, by name and by address...
    let out = f
        .ok(&run, "web", &format!("wget -q -O - http://{ALLOWED_IP}/"))
        .await;
    assert_eq!(out.trim(), format!("hello from {ALLOWED_IP}:80"));
    let out = f.ok(&run, "web", "wget -q -O - http://other.test/").await;
    assert_eq!(out.trim(), format!("hello from {OTHER_IP}:80"));
    // ...but never the uplink's other end (the host in production), metadata, private ranges,
    // the host's addresses, or the worker's API.
    let (outer, _) = f.uplink(&run);
    let api_port = f.addr().port();
    let mut blocked = vec![
        format!("http://{outer}/"),
        format!("http://{METADATA_IP}/"),
        format!("http://{PRIVATE_IP}/"),
        format!("http://127.0.0.1:{api_port}/v1/status"),
        format!("http://172.16.0.1:{api_port}/v1/status"),
    ];
    for a in host_addresses() {
        blocked.push(format!("http://{a}/"));
        blocked.push(format!("http://{a}:{api_port}/v1/status"));
    }
    for url in &blocked {
        f.fails(&run, "web", &format!("timeout 3 wget -q -O - {url}"))
            .await;
    }
    f.delete(&run).await;
    assert_network_gone(&f, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn egress_allowlist_and_none() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let allow = f.new_run_id();
    let none = f.new_run_id();
    f.start(&lan_plan(
        &allow,
        &["a1"],
        egress(EgressPolicy::Allowlist, &["allowed.test"], 0),
    ))
    .await;
    f.start(&lan_plan(
        &none,
        &["b1", "b2"],
        egress(EgressPolicy::None, &[], 0),
    ))
    .await;

    // Allowlist: the allowed name resolves and answers on 80 and 443...
    let out = f.ok(&allow, "a1", "nslookup -type=a allowed.test").await;
    assert!(out.contains(ALLOWED_IP), "{out}");
    let out = f
        .ok(&allow, "a1", "wget -q -O - http://allowed.test/")
        .await;
    assert_eq!(out.trim(), format!("hello from {ALLOWED_IP}:80"));
    let out = f
        .ok(
            &allow,
            "a1",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 3 nc allowed.test 443",
        )
        .await;
    assert!(
        out.contains(&format!("hello from {ALLOWED_IP}:443")),
        "{out}"
    );
    // ...but not on other ports; other names do not resolve; raw addresses are refused.
    f.fails(&allow, "a1", "echo x | timeout 3 nc allowed.test 9000")
        .await;
    f.fails(&allow, "a1", "nslookup -type=a denied.test").await;
    f.fails(
        &allow,
        "a1",
        &format!("timeout 3 wget -q -O - http://{DENIED_IP}/"),
    )
    .await;
    f.fails(
        &allow,
        "a1",
        &format!("timeout 3 wget -q -O - http://{OTHER_IP}/"),
    )
    .await;
    // DNS goes through the run's resolver only.
    f.fails(
        &allow,
        "a1",
        &format!("nslookup -type=a denied.test {FAKE_DNS}"),
    )
    .await;

    // None: nothing leaves, not even DNS; the run's own names still resolve.
    f.fails(&none, "b1", "nslookup -type=a allowed.test").await;
    f.fails(
        &none,
        "b1",
        &format!("timeout 3 wget -q -O - http://{ALLOWED_IP}/"),
    )
    .await;
    f.fails(&none, "b1", &format!("ping -c1 -W1 {FAKE_DNS}"))
        .await;
    let out = f.ok(&none, "b1", "nslookup b2").await;
    assert!(out.contains("172.16.0.3"), "{out}");
    f.ok(&none, "b1", "ping -c1 -W2 b2").await;
    assert!(
        !f.runs_dir.join(&none).join("_net/state.json").exists()
            || !std::fs::read_to_string(f.runs_dir.join(&none).join("_net/state.json"))
                .unwrap_or_default()
                .contains("outer"),
        "a run with egress none has no uplink"
    );

    f.delete(&allow).await;
    f.delete(&none).await;
    assert_network_gone(&f, &allow);
    assert_network_gone(&f, &none);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn identical_subnets_stay_apart_and_bandwidth_holds() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let c = f.new_run_id();
    let d = f.new_run_id();
    const RATE: u64 = 16_000_000;
    f.start(&lan_plan(
        &c,
        &["c1"],
        egress(EgressPolicy::Open, &[], RATE),
    ))
    .await;
    f.start(&lan_plan(
        &d,
        &["d1", "d2"],
        egress(EgressPolicy::Open, &[], 0),
    ))
    .await;

    // Same subnet, same addresses: each run sees only its own machines.
    f.ok(
        &d,
        "d2",
        "mkdir -p /tmp/www && echo d2-page > /tmp/www/index.html && httpd -p 8080 -h /tmp/www",
    )
    .await;
    let out = f.ok(&d, "d1", "wget -q -O - http://172.16.0.3:8080/").await;
    assert_eq!(out.trim(), "d2-page");
    f.fails(&c, "c1", "ping -c1 -W1 172.16.0.3").await;
    f.fails(&c, "c1", "timeout 3 wget -q -O - http://172.16.0.3:8080/")
        .await;
    let (_, d_inner) = f.uplink(&d);
    f.fails(&c, "c1", &format!("ping -c1 -W1 {d_inner}")).await;
    f.fails(
        &c,
        "c1",
        &format!("timeout 3 wget -q -O - http://{d_inner}:8080/"),
    )
    .await;
    f.fails(&c, "c1", "nslookup -type=a d2").await;

    // Bandwidth: a bulk download from the fake internet takes as long as the limit says.
    let bytes: u64 = 6_000_000;
    let t0 = Instant::now();
    f.ok(
        &c,
        "c1",
        &format!("wget -q -O /dev/null http://{ALLOWED_IP}/bulk/{bytes}"),
    )
    .await;
    let secs = t0.elapsed().as_secs_f64();
    let rate = (bytes * 8) as f64 / secs;
    eprintln!(
        "shaped download: {bytes} bytes in {secs:.2} s = {:.1} Mbit/s",
        rate / 1e6
    );
    assert!(
        (rate - RATE as f64).abs() / RATE as f64 <= 0.2,
        "rate {:.1} Mbit/s is not within 20 % of {} Mbit/s",
        rate / 1e6,
        RATE / 1_000_000
    );
    // Uploads are shaped too.
    let size = f
        .ok(
            &c,
            "c1",
            &format!(
                "dd if=/dev/zero of=/tmp/up bs=1000 count={} 2>/dev/null && wc -c < /tmp/up",
                bytes / 1000
            ),
        )
        .await;
    assert_eq!(size.trim(), bytes.to_string());
    let t0 = Instant::now();
    let out = f
        .ok(
            &c,
            "c1",
            // (busybox wget sends `Content-Length: 0` for --post-file here, so nc it is.)
            &format!(
                "{{ printf 'POST /upload HTTP/1.0\\r\\nContent-Length: {bytes}\\r\\n\\r\\n'; cat /tmp/up; }} \
                 | nc {ALLOWED_IP} 80"
            ),
        )
        .await;
    let secs = t0.elapsed().as_secs_f64();
    assert!(out.contains(&format!("got {bytes}")), "{out}");
    let up = (bytes * 8) as f64 / secs;
    eprintln!(
        "shaped upload: {bytes} bytes in {secs:.2} s = {:.1} Mbit/s",
        up / 1e6
    );
    assert!(
        (up - RATE as f64).abs() / RATE as f64 <= 0.2,
        "upload rate {:.1} Mbit/s is not within 20 % of {} Mbit/s",
        up / 1e6,
        RATE / 1_000_000
    );
    // The other run has no limit.
    let t0 = Instant::now();
    f.ok(
        &d,
        "d1",
        &format!("wget -q -O /dev/null http://{ALLOWED_IP}/bulk/{bytes}"),
    )
    .await;
    let free = (bytes * 8) as f64 / t0.elapsed().as_secs_f64();
    eprintln!("unshaped download: {:.1} Mbit/s", free / 1e6);
    assert!(
        free > 1.5 * RATE as f64,
        "unlimited run got {:.1} Mbit/s",
        free / 1e6
    );

    f.delete(&c).await;
    f.delete(&d).await;
    assert_network_gone(&f, &c);
    assert_network_gone(&f, &d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_restarted_worker_restores_rules_and_resolver_and_cleans_leaked_networks() {
    skip_if_not_root!();
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    f.start(&lan_plan(
        &run,
        &["m1", "m2"],
        egress(EgressPolicy::Allowlist, &["allowed.test"], 0),
    ))
    .await;
    f.ok(&run, "m1", "wget -q -O - http://allowed.test/").await;

    // The worker stops; meanwhile its resolver dies and the run's rules vanish.
    f.stop_worker().await;
    let pid =
        std::fs::read_to_string(f.runs_dir.join(&run).join("_net/dnsmasq.pid")).expect("pid file");
    let pid = pid.trim().to_string();
    assert!(
        Command::new("kill")
            .arg(&pid)
            .status()
            .expect("kill")
            .success()
    );
    let st = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("il-{run}"),
            "nft",
            "delete",
            "table",
            "inet",
            "ironlab",
        ])
        .status()
        .expect("nft");
    assert!(st.success());
    // A leaked resolver of a run of this pool that no longer has a directory (a crash between
    // removing the files and stopping it).
    let ghost_ns = format!("iltg{}", &rand_hex()[..8]);
    ip(&["netns", "add", &ghost_ns]);
    ip(&["-n", &ghost_ns, "link", "set", "lo", "up"]);
    let ghost_dir = f.runs_dir.join("ghost1/_net");
    std::fs::create_dir_all(&ghost_dir).expect("ghost dir");
    let ghost_conf = ghost_dir.join("dnsmasq.conf");
    std::fs::write(
        &ghost_conf,
        format!(
            "no-resolv\nno-hosts\nbind-interfaces\nlisten-address=127.0.0.1\nuser=root\npid-file={}/pid\n",
            ghost_dir.display()
        ),
    )
    .expect("ghost conf");
    let st = Command::new("ip")
        .args(["netns", "exec", &ghost_ns, "dnsmasq"])
        .arg(format!("--conf-file={}", ghost_conf.display()))
        .status()
        .expect("dnsmasq");
    assert!(st.success());
    let ghost_pid = std::fs::read_to_string(ghost_dir.join("pid")).expect("ghost pid");
    let ghost_pid = ghost_pid.trim().to_string();
    std::fs::remove_dir_all(f.runs_dir.join("ghost1")).expect("remove ghost dir");

    f.start_worker().await;
    // The run is kept, its rules and resolver are back: names resolve, the allowlist holds.
    let out = f.ok(&run, "m1", "nslookup m2").await;
    assert!(out.contains("172.16.0.3"), "{out}");
    f.ok(&run, "m1", "wget -q -O - http://allowed.test/").await;
    f.fails(
        &run,
        "m1",
        &format!("timeout 3 wget -q -O - http://{DENIED_IP}/"),
    )
    .await;
    let new_pid =
        std::fs::read_to_string(f.runs_dir.join(&run).join("_net/dnsmasq.pid")).expect("pid file");
    assert_ne!(new_pid.trim(), pid, "the resolver was restarted");
    let cmdline = std::fs::read(format!("/proc/{ghost_pid}/cmdline")).unwrap_or_default();
    let _ = Command::new("ip")
        .args(["netns", "delete", &ghost_ns])
        .status();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains("ghost1"),
        "the leaked resolver {ghost_pid} still runs"
    );

    f.delete(&run).await;
    assert_network_gone(&f, &run);
}

/// The host-mode table (never loaded on the host by a test) is valid nftables: it loads into a
/// namespace of the test's own.
/// A microVM and a container on one network (issue 4's taps, issue 5's networks): the guest has
/// the planned address, route, hosts and resolver; names, ping and TCP work both ways; the
/// run's egress policy holds for the VM (allowlist here, `none` in a second run); stop and
/// restart keep it all working; destroy leaves no QEMU, tap or namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn a_microvm_joins_the_run_network_beside_a_container() {
    skip_if_not_root!();
    if !microvms_available() {
        return;
    }
    let mut f = Fixture::new().await;
    let run = f.new_run_id();
    let plan = RunPlan {
        run_id: run.clone(),
        machines: vec![
            microvm("vm", &[("local", "172.16.0.2")]),
            machine("c1", &[("local", "172.16.0.3")]),
        ],
        networks: vec![network("local", "172.16.0.0/24", Some("172.16.0.1"), false)],
        egress: egress(EgressPolicy::Allowlist, &["allowed.test"], 0),
    };
    f.start(&plan).await;

    // What the guest was given: the same texts as the container beside it.
    let addrs = f.ok(&run, "vm", "ip -o -4 addr show").await;
    assert!(addrs.contains("eth0    inet 172.16.0.2/24"), "{addrs}");
    let route = f.ok(&run, "vm", "ip route").await;
    assert!(route.contains("default via 172.16.0.1 dev eth0"), "{route}");
    let hosts = f.ok(&run, "vm", "cat /etc/hosts").await;
    assert!(hosts.contains("172.16.0.3\tc1 c1.local"), "{hosts}");
    assert!(hosts.contains("172.16.0.2\tvm vm.local"), "{hosts}");
    let resolv = f.ok(&run, "vm", "cat /etc/resolv.conf").await;
    assert!(resolv.contains("nameserver 172.16.0.1"), "{resolv}");
    // QEMU sees none of the host's files: its root is the jail of its machine directory,
    // which holds nothing but its own drive (a hard link, re-opened by name when a stop
    // migrates the RAM out).
    let pids = qemus_of(&run);
    assert_eq!(pids.len(), 1, "one QEMU: {pids:?}");
    let root = std::fs::read_link(format!("/proc/{}/root", pids[0])).expect("QEMU's root");
    assert_eq!(root, f.runs_dir.join(&run).join("vm/jail"));
    let seen: Vec<String> = std::fs::read_dir(format!("/proc/{}/root", pids[0]))
        .expect("read QEMU's root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(seen, ["root.ext4"], "QEMU's root holds only its drive");
    use std::os::unix::fs::MetadataExt as _;
    let ino = |p: std::path::PathBuf| std::fs::metadata(&p).map(|m| m.ino()).ok();
    assert_eq!(
        ino(root.join("root.ext4")),
        ino(f.runs_dir.join(&run).join("vm/root.ext4")),
        "the jail's drive is the machine's drive"
    );
    // The machine's namespace holds the tap, tied to eth0 by tc, and no address.
    let links = sh("ip", &["-n", &format!("ilm-{run}-vm"), "-o", "link"]);
    assert!(links.contains("tap0"), "{links}");
    let tc = sh(
        "tc",
        &[
            "-n",
            &format!("ilm-{run}-vm"),
            "filter",
            "show",
            "dev",
            "eth0",
            "ingress",
        ],
    );
    assert!(tc.contains("Egress Redirect to device tap0"), "{tc}");
    let ns_addrs = sh("ip", &["-n", &format!("ilm-{run}-vm"), "-o", "-4", "addr"]);
    assert!(!ns_addrs.contains("172.16.0.2"), "{ns_addrs}");

    // Names (hosts file and the run's resolver), ping and TCP, both ways.
    let out = f.ok(&run, "vm", "nslookup c1").await;
    assert!(out.contains("172.16.0.3"), "{out}");
    let out = f.ok(&run, "c1", "nslookup vm").await;
    assert!(out.contains("172.16.0.2"), "{out}");
    f.ok(&run, "vm", "ping -c1 -W3 c1 && ping -c1 -W3 c1.local")
        .await;
    f.ok(&run, "c1", "ping -c1 -W3 vm && ping -c1 -W3 vm.local")
        .await;
    for (m, other) in [("vm", "c1"), ("c1", "vm")] {
        f.ok(
            &run,
            m,
            &format!(
                "mkdir -p /www && echo served by {m} > /www/index.html && httpd -p 8080 -h /www"
            ),
        )
        .await;
        let out = f
            .ok(
                &run,
                other,
                &format!("timeout 10 wget -q -O - http://{m}:8080/"),
            )
            .await;
        assert_eq!(out.trim(), format!("served by {m}"));
    }

    // Egress: the allowed name through the run's resolver and uplink; nothing else.
    let out = f
        .ok(&run, "vm", "timeout 10 wget -q -O - http://allowed.test/")
        .await;
    assert_eq!(out.trim(), format!("hello from {ALLOWED_IP}:80"));
    f.fails(
        &run,
        "vm",
        &format!("timeout 5 wget -q -O - http://{DENIED_IP}/"),
    )
    .await;
    f.fails(&run, "vm", "nslookup -type=a denied.test").await;

    // Stop and restart: same drive, network made again, the guest configured again.
    f.ok(&run, "vm", "mkdir -p /root && echo kept > /root/note")
        .await;
    f.lifecycle(&run, "stop").await;
    assert!(qemus_of(&run).is_empty(), "QEMU left after stop");
    f.lifecycle(&run, "restart").await;
    f.wait_running(&run).await;
    assert_eq!(f.ok(&run, "vm", "cat /root/note").await.trim(), "kept");
    let addrs = f.ok(&run, "vm", "ip -o -4 addr show").await;
    assert!(addrs.contains("eth0    inet 172.16.0.2/24"), "{addrs}");
    f.ok(&run, "vm", "ping -c1 -W3 c1").await;
    f.ok(&run, "c1", "ping -c1 -W3 vm").await;
    let out = f
        .ok(&run, "vm", "timeout 10 wget -q -O - http://allowed.test/")
        .await;
    assert_eq!(out.trim(), format!("hello from {ALLOWED_IP}:80"));

    f.delete(&run).await;
    assert_network_gone(&f, &run);
    assert!(qemus_of(&run).is_empty(), "QEMU of {run} left");

    // Egress none: the card works (the gateway answers), nothing leaves.
    let none = f.new_run_id();
    f.start(&RunPlan {
        run_id: none.clone(),
        machines: vec![microvm("vm", &[("local", "172.16.0.2")])],
        networks: vec![network("local", "172.16.0.0/24", Some("172.16.0.1"), false)],
        egress: egress(EgressPolicy::None, &[], 0),
    })
    .await;
    f.ok(&none, "vm", "ping -c1 -W3 172.16.0.1").await;
    f.fails(&none, "vm", "nslookup -type=a allowed.test").await;
    f.fails(
        &none,
        "vm",
        &format!("timeout 5 wget -q -O - http://{ALLOWED_IP}/"),
    )
    .await;
    f.fails(&none, "vm", &format!("ping -c1 -W2 {FAKE_DNS}"))
        .await;
    f.delete(&none).await;
    assert_network_gone(&f, &none);
    assert!(qemus_of(&none).is_empty(), "QEMU of {none} left");
}

#[test]
#[serial]
fn the_host_uplink_table_loads() {
    skip_if_not_root!();
    let ns = format!("iltn{}", &rand_hex()[..8]);
    ip(&["netns", "add", &ns]);
    let ruleset = ironlab_worker::net::host_ruleset(
        ironlab_worker::net::layout::Cidr::parse("100.64.0.0/10").expect("cidr"),
    );
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ruleset.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("nft");
    let listed = sh(
        "ip",
        &[
            "netns",
            "exec",
            &ns,
            "nft",
            "list",
            "table",
            "ip",
            "ironlab_uplink",
        ],
    );
    let _ = Command::new("ip").args(["netns", "delete", &ns]).status();
    assert!(
        out.status.success(),
        "{ruleset}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(listed.contains("masquerade"), "{listed}");
}

/// Uplink mode `host`, exercised without touching the host: the worker's network code runs on a
/// thread inside a namespace standing in for the host (`iltH…`, routed to the fake internet), so
/// forwarding, the `ironlab_uplink` NAT table and the uplinks' outer ends land there.
#[test]
#[serial]
fn host_uplink_mode_forwards_and_nats_through_the_host_namespace() {
    skip_if_not_root!();
    // A multi-thread runtime serves the fake internet while this thread waits below.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let fake = rt.block_on(async { FakeInternet::start() });
    let _guard = rt.enter();
    let host_ns = format!("iltH{}", &rand_hex()[..8]);
    ip(&["netns", "add", &host_ns]);
    ip(&["-n", &host_ns, "link", "set", "lo", "up"]);
    ip(&[
        "-n", &host_ns, "link", "add", "wan", "type", "veth", "peer", "name", "lan0", "netns",
        &fake.name,
    ]);
    ip(&["-n", &host_ns, "addr", "add", "10.99.0.2/30", "dev", "wan"]);
    ip(&["-n", &host_ns, "link", "set", "wan", "up"]);
    ip(&[
        "-n",
        &host_ns,
        "route",
        "add",
        "default",
        "via",
        "10.99.0.1",
    ]);
    ip(&[
        "-n",
        &fake.name,
        "addr",
        "add",
        "10.99.0.1/30",
        "dev",
        "lan0",
    ]);
    ip(&["-n", &fake.name, "link", "set", "lan0", "up"]);
    let host_forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
    let host_tables = sh("nft", &["list", "tables"]);

    let tmp = tempfile::tempdir().expect("tempdir");
    let runs_dir = tmp.path().join("runs");
    let run = format!("h{}", &rand_hex()[..11]);
    let plan = lan_plan(&run, &["m1"], egress(EgressPolicy::Open, &[], 0));
    let ns_path = PathBuf::from("/var/run/netns").join(&host_ns);
    let (r, run_c, runs_c) = (run.clone(), run.clone(), runs_dir.clone());
    // Everything below runs on one thread inside the stand-in host namespace.
    let result = std::thread::spawn(move || -> Result<(String, String, String), String> {
        let fd = std::fs::File::open(&ns_path).map_err(|e| e.to_string())?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let net = ironlab_worker::net::Networks::new(
                NetConfig {
                    uplink: Uplink::Host,
                    upstream_dns: vec![FAKE_DNS.parse().expect("ip")],
                    ..Default::default()
                },
                runs_c,
            );
            net.setup(&plan).await.map_err(|e| format!("{e:#}"))?;
            let m1 = format!("ilm-{r}-m1");
            let wget = |url: String| {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", &m1, "timeout", "3", "busybox", "wget", "-q", "-O", "-",
                    ])
                    .arg(url)
                    .output()
                    .expect("wget");
                format!(
                    "{}|{}",
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).trim()
                )
            };
            let open = wget(format!("http://{ALLOWED_IP}/"));
            let metadata = wget(format!("http://{METADATA_IP}/"));
            let host_side = wget("http://10.99.0.2/".into());
            net.teardown(&r).await.map_err(|e| format!("{e:#}"))?;
            ironlab_worker::host::delete_netns(&format!("il-{r}"))
                .await
                .map_err(|e| format!("{e:#}"))?;
            Ok((open, metadata, host_side))
        })
    })
    .join();
    let inside_forward = sh(
        "ip",
        &[
            "netns",
            "exec",
            &host_ns,
            "cat",
            "/proc/sys/net/ipv4/ip_forward",
        ],
    );
    let inside_tables = sh("ip", &["netns", "exec", &host_ns, "nft", "list", "tables"]);
    let _ = Command::new("ip")
        .args(["netns", "delete", &host_ns])
        .status();
    for ns in [format!("il-{run_c}"), format!("ilm-{run_c}-m1")] {
        let _ = Command::new("ip").args(["netns", "delete", &ns]).output();
    }
    // The real host is untouched.
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read"),
        host_forward
    );
    assert_eq!(sh("nft", &["list", "tables"]), host_tables);
    let (open, metadata, host_side) = result.expect("thread").expect("setup and checks");
    assert_eq!(open, format!("true|hello from {ALLOWED_IP}:80"));
    assert!(metadata.starts_with("false|"), "{metadata}");
    assert!(host_side.starts_with("false|"), "{host_side}");
    assert_eq!(inside_forward.trim(), "1");
    assert!(
        inside_tables.contains("table ip ironlab_uplink"),
        "{inside_tables}"
    );
    drop(fake);
}
