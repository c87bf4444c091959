//! Terminal relay end to end, as root: a real worker (axum on 127.0.0.1:0), a real crun
//! container from a busybox ext4 drive, the real static agent and PTYs, and a WebSocket client
//! speaking the relay protocol the way the browser does.
//!
//! Checks what a user of the browser terminal relies on: the same shell comes back after the
//! connection drops (with recent output replayed), only one client holds a session, tokens open
//! only what they name for whom they name, a `yes` flood does not grow the worker's memory, and
//! sessions end with the process and with the run.
//!
//! Needs: root, crun (or runc), busybox-static, e2fsprogs, iproute2, and the static agent
//! (`IRONLAB_AGENT`, or `scripts/build-agent.sh`). Without root the tests print why and return.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self as proto, CLOSE_REPLACED, ClientControl, ServerControl};
use ironlab_api::worker::{ImageRef, MachinePlan, ObservedState, RunPlan, RunStatus, TokenGrant};
use ironlab_worker::drives::FileDrives;
use ironlab_worker::{RunningWorker, WorkerConfig};
use serial_test::serial;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[macro_use]
mod common;

use common::{agent_bin, busybox_drive, is_root, sh};

const TOKEN: &str = "test-worker-token-0123456789";

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

/// A worker with one running run (machines `m1`, `m2`), cleaned up on drop.
struct Fixture {
    tmp: tempfile::TempDir,
    runs_dir: PathBuf,
    worker: Option<(RunningWorker, tokio::sync::oneshot::Sender<()>)>,
    run: String,
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
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = WorkerConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: tmp.path().to_path_buf(),
            token: TOKEN.into(),
            public_url: None,
            agent_bin: agent,
            stock_dir: tmp.path().join("stock"),
            insecure_registries: vec![],
            net: Default::default(),
            snapshot_store: None,
        };
        let drives = Arc::new(FileDrives {
            file: drive,
            env: vec![],
        });
        let w = ironlab_worker::start_with(config, runs_dir.clone(), drives, async {
            let _ = rx.await;
        })
        .await
        .expect("worker starts");
        let run = format!("t{}", &rand_hex()[..11]);
        let f = Fixture {
            tmp,
            runs_dir,
            worker: Some((w, tx)),
            run,
            http: reqwest::Client::new(),
        };
        let plan = RunPlan {
            run_id: f.run.clone(),
            machines: ["m1", "m2"]
                .iter()
                .map(|m| MachinePlan {
                    name: m.to_string(),
                    runtime: "container".into(),
                    image: ImageRef::Oci {
                        reference: "127.0.0.1:5000/test/busybox:1".into(),
                    },
                    root_size_bytes: 128 << 20,
                    cpus: 1,
                    memory_bytes: 128 << 20,
                    pids_limit: 256,
                    users: vec!["laborant".into()],
                    default_user: "laborant".into(),
                    files: vec![],
                    tasks: vec![],
                    interfaces: vec![],
                })
                .collect(),
            networks: vec![],
            egress: Default::default(),
        };
        let r = f
            .http
            .put(f.url(&format!("/v1/runs/{}", f.run)))
            .bearer_auth(TOKEN)
            .json(&plan)
            .send()
            .await
            .expect("PUT");
        assert_eq!(r.status(), 202);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st: RunStatus = f
                .http
                .get(f.url(&format!("/v1/runs/{}?wait=30", f.run)))
                .bearer_auth(TOKEN)
                .send()
                .await
                .expect("GET")
                .json()
                .await
                .expect("status");
            if st.state == ObservedState::Running {
                break;
            }
            assert!(
                st.state == ObservedState::Starting && Instant::now() < deadline,
                "run did not start: {st:?}"
            );
        }
        f
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.worker.as_ref().expect("worker").0.addr
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    async fn grant_as(
        &self,
        user: &str,
        run: &str,
        machine: &str,
        expires: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let token = format!("tok{}{}", rand_hex(), rand_hex());
        let r = self
            .http
            .post(self.url("/v1/tokens"))
            .bearer_auth(TOKEN)
            .json(&TokenGrant {
                token: token.clone(),
                user: user.into(),
                run: run.into(),
                machine: machine.into(),
                expires_at: expires,
                scope: Default::default(),
            })
            .send()
            .await
            .expect("POST token");
        assert_eq!(r.status(), 204);
        token
    }

    async fn grant(&self, user: &str, machine: &str) -> String {
        self.grant_as(
            user,
            &self.run,
            machine,
            chrono::Utc::now() + chrono::Duration::seconds(30),
        )
        .await
    }

    /// Connects with a fresh token for `user` on `machine`.
    async fn connect(&self, user: &str, machine: &str) -> Term {
        let token = self.grant(user, machine).await;
        Term::connect(self.addr(), &self.run, machine, &token)
            .await
            .expect("connect")
    }

    async fn destroy(&mut self) {
        let r = self
            .http
            .delete(self.url(&format!("/v1/runs/{}", self.run)))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("DELETE");
        assert_eq!(r.status(), 204);
    }

    async fn stop(mut self) {
        self.destroy().await;
        if let Some((w, tx)) = self.worker.take() {
            let _ = tx.send(());
            tokio::time::timeout(Duration::from_secs(10), w.wait())
                .await
                .expect("worker stops")
                .expect("worker ran");
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Best-effort cleanup when a test failed half-way (the happy path destroyed the run).
        let run = &self.run;
        for line in sh("crun", &["list", "-q"]).lines() {
            if line.starts_with(&format!("il-{run}-")) {
                let _ = Command::new("crun").args(["delete", "-f", line]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "delete", &format!("il-{run}")])
            .output();
        common::scrub_host(&self.runs_dir, self.tmp.path(), std::slice::from_ref(run));
    }
}

/// What the server said, besides output.
#[derive(Debug, PartialEq)]
enum End {
    Exit(i32),
    Error(String),
    Closed(Option<u16>),
}

/// A browser-equivalent terminal client.
struct Term {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// All output received so far.
    out: Vec<u8>,
    session: Option<String>,
    end: Option<End>,
}

impl Term {
    async fn connect(
        addr: std::net::SocketAddr,
        run: &str,
        machine: &str,
        token: &str,
    ) -> Result<Term, String> {
        let url = format!("ws://{addr}/v1/runs/{run}/machines/{machine}/terminal?token={token}");
        let (ws, _) = tokio_tungstenite::connect_async(&url)
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    format!("HTTP {}", r.status().as_u16())
                }
                e => e.to_string(),
            })?;
        Ok(Term {
            ws,
            out: Vec::new(),
            session: None,
            end: None,
        })
    }

    async fn start(&mut self, command: &[&str], session: Option<&str>, cols: u16, rows: u16) {
        let start = ClientControl::Start {
            command: command.iter().map(|s| s.to_string()).collect(),
            tty: true,
            cols,
            rows,
            env: BTreeMap::new(),
            term: Some("xterm-256color".into()),
            session: session.map(str::to_string),
        };
        self.ws
            .send(Message::Text(
                serde_json::to_string(&start).expect("json").into(),
            ))
            .await
            .expect("send start");
    }

    async fn type_text(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(
                proto::frame(proto::STDIN, text.as_bytes()).into(),
            ))
            .await
            .expect("send input");
    }

    /// Reads one message; false once the session ended.
    async fn read_one(&mut self, deadline: tokio::time::Instant) -> bool {
        if self.end.is_some() {
            return false;
        }
        let msg = tokio::time::timeout_at(deadline, self.ws.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out; output so far: {:?}",
                    String::from_utf8_lossy(&self.out)
                )
            });
        match msg {
            Some(Ok(Message::Binary(b))) => {
                if let Some((proto::STDOUT, d)) = proto::split_frame(&b) {
                    self.out.extend_from_slice(d);
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t) {
                Ok(ServerControl::Started { session }) => self.session = Some(session),
                Ok(ServerControl::Exit { code }) => self.end = Some(End::Exit(code)),
                Ok(ServerControl::Error { message }) => self.end = Some(End::Error(message)),
                Err(e) => panic!("bad control frame {t}: {e}"),
            },
            Some(Ok(Message::Close(f))) => {
                if self.end.is_none() {
                    self.end = Some(End::Closed(f.map(|f| u16::from(f.code))));
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => {
                if self.end.is_none() {
                    self.end = Some(End::Closed(None));
                }
            }
        }
        true
    }

    /// Waits until the output contains `needle`; returns the output.
    async fn expect(&mut self, needle: &str) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = String::from_utf8_lossy(&self.out).into_owned();
            if text.contains(needle) {
                return text;
            }
            assert!(
                self.read_one(deadline).await,
                "session ended ({:?}) before {needle:?} appeared in {text:?}",
                self.end
            );
        }
    }

    async fn wait_started(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.session.is_none() {
            assert!(
                self.read_one(deadline).await,
                "ended before started: {:?}",
                self.end
            );
        }
        self.session.clone().unwrap_or_default()
    }

    async fn wait_end(&mut self) -> End {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.read_one(deadline).await {}
        self.end.take().unwrap_or(End::Closed(None))
    }

    /// Sends `echo MARK$((1+1))` style commands and returns the value printed after `tag=`.
    async fn ask(&mut self, tag: &str, expr: &str) -> String {
        self.type_text(&format!("echo {tag}=[{expr}]\r")).await;
        let needle = format!("{tag}=[");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let text = String::from_utf8_lossy(&self.out).into_owned();
            // The echoed command line contains `tag=[$…]`; the answer contains the value.
            if let Some(v) = text
                .match_indices(&needle)
                .filter_map(|(i, _)| {
                    let rest = &text[i + needle.len()..];
                    rest.find(']').map(|j| rest[..j].to_string())
                })
                .find(|v| !v.contains('$') && !v.is_empty())
            {
                return v;
            }
            assert!(
                self.read_one(deadline).await,
                "session ended before {tag} was answered"
            );
        }
    }
}

/// A new client attached to `session`; returns after `started`.
async fn attach(f: &Fixture, user: &str, machine: &str, session: &str, size: (u16, u16)) -> Term {
    let mut t = f.connect(user, machine).await;
    t.start(&[], Some(session), size.0, size.1).await;
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn the_same_shell_comes_back_after_the_connection_drops() {
    skip_if_not_root!();
    let f = Fixture::new().await;
    let mut t = f.connect("alice", "m1").await;
    t.start(&[], None, 80, 24).await;
    let session = t.wait_started().await;
    assert_eq!(session.len(), 16, "session id {session:?}");
    let pid = t.ask("PID", "$$").await;
    assert!(pid.parse::<u32>().is_ok(), "$$ = {pid:?}");
    t.type_text("export MARK=kept; seq 11 15\r").await;
    t.expect("14\r\n15\r\n").await;
    // The connection drops (no close frame, like a network failure or a closed tab).
    drop(t);
    // Output produced while nobody is attached is kept.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut t = attach(&f, "alice", "m1", &session, (100, 40)).await;
    assert_eq!(t.wait_started().await, session, "same session id");
    let replay = t.expect(&format!("PID=[{pid}]")).await;
    assert!(replay.contains("export MARK=kept"), "replay: {replay:?}");
    assert_eq!(t.ask("PID2", "$$").await, pid, "the same shell");
    assert_eq!(t.ask("MARK", "$MARK").await, "kept", "its state is intact");
    // The attach carried a window size: the terminal was resized.
    assert_eq!(t.ask("SIZE", "$(stty size)").await, "40 100");

    // The process exits: exit status, then the session is gone.
    t.type_text("exit 4\r").await;
    assert_eq!(t.wait_end().await, End::Exit(4));
    let mut t = attach(&f, "alice", "m1", &session, (0, 0)).await;
    match t.wait_end().await {
        End::Error(m) => assert!(m.contains("unknown or has ended"), "{m}"),
        other => panic!("attaching an ended session: {other:?}"),
    }
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[serial]
async fn tokens_and_sessions_open_only_what_they_name_for_whom_they_name() {
    skip_if_not_root!();
    let f = Fixture::new().await;
    let addr = f.addr();
    let run = f.run.clone();
    let mut alice = f.connect("alice", "m1").await;
    alice.start(&[], None, 80, 24).await;
    let session = alice.wait_started().await;
    let pid = alice.ask("PID", "$$").await;

    // Reused token.
    let t = f.grant("alice", "m1").await;
    Term::connect(addr, &run, "m1", &t)
        .await
        .expect("first use");
    let e = Term::connect(addr, &run, "m1", &t).await.err();
    assert_eq!(e.as_deref(), Some("HTTP 401"), "reuse");
    // Expired.
    let t = f
        .grant_as(
            "alice",
            &run,
            "m1",
            chrono::Utc::now() - chrono::Duration::seconds(1),
        )
        .await;
    let e = Term::connect(addr, &run, "m1", &t).await.err();
    assert_eq!(e.as_deref(), Some("HTTP 401"), "expired");
    // Another machine of the run, another run.
    let t = f.grant("alice", "m2").await;
    let e = Term::connect(addr, &run, "m1", &t).await.err();
    assert_eq!(e.as_deref(), Some("HTTP 403"), "token of another machine");
    let t = f
        .grant_as(
            "alice",
            "zzzzzzzz",
            "m1",
            chrono::Utc::now() + chrono::Duration::seconds(30),
        )
        .await;
    let e = Term::connect(addr, &run, "m1", &t).await.err();
    assert_eq!(e.as_deref(), Some("HTTP 403"), "token of another run");

    // Another user's session: a clear error, and alice's shell is untouched.
    let mut mallory = attach(&f, "mallory", "m1", &session, (0, 0)).await;
    match mallory.wait_end().await {
        End::Error(m) => assert!(m.contains("another user"), "{m}"),
        other => panic!("mallory attached: {other:?}"),
    }
    // Alice's session on the other machine does not exist.
    let mut wrong = attach(&f, "alice", "m2", &session, (0, 0)).await;
    assert!(matches!(wrong.wait_end().await, End::Error(_)));
    assert_eq!(alice.ask("STILL", "$$").await, pid);

    // A second client of the same user takes over; the first is closed with CLOSE_REPLACED.
    let mut second = attach(&f, "alice", "m1", &session, (0, 0)).await;
    second.wait_started().await;
    assert_eq!(
        alice.wait_end().await,
        End::Closed(Some(CLOSE_REPLACED)),
        "the first client is told it was replaced"
    );
    assert_eq!(second.ask("PID2", "$$").await, pid);

    // Destroying the run ends its sessions with a message.
    let mut f = f;
    f.destroy().await;
    match second.wait_end().await {
        End::Error(m) => assert!(m.contains("destroyed"), "{m}"),
        End::Closed(_) => {}
        other => panic!("after destroy: {other:?}"),
    }
    f.stop_worker_only().await;
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
async fn a_yes_flood_does_not_grow_the_worker_attached_or_detached() {
    skip_if_not_root!();
    let f = Fixture::new().await;
    let mut t = f.connect("alice", "m1").await;
    t.start(&["yes", "flood"], None, 80, 24).await;
    let session = t.wait_started().await;
    t.expect("flood\r\nflood").await;
    let before = rss_kib();
    let mut peak = before;
    // Attached, reading slowly for 3 s: one message every 20 ms.
    let mut got = 0usize;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let n = t.out.len();
        t.read_one(tokio::time::Instant::now() + Duration::from_secs(5))
            .await;
        got += t.out.len() - n;
        t.out.clear();
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(got > 0);
    let grown = peak.saturating_sub(before);
    eprintln!("attached slow reader: read {got} bytes in 3 s, RSS {before} KiB -> peak {peak} KiB");
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB while a slow client was attached"
    );
    // Detached: `yes` keeps running into the ring buffer only.
    drop(t);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        peak = peak.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = peak.saturating_sub(before);
    eprintln!("detached 3 s: RSS peak {peak} KiB");
    assert!(
        grown < 64 * 1024,
        "memory grew by {grown} KiB while detached"
    );
    // Reattach: the replay is the ring (≤ 256 KiB, from a line start), then live output.
    let mut t = attach(&f, "alice", "m1", &session, (0, 0)).await;
    t.wait_started().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while t.out.len() < proto::REPLAY_BYTES + 64 * 1024 {
        assert!(t.read_one(deadline).await, "ended: {:?}", t.end);
    }
    let text = String::from_utf8_lossy(&t.out[..proto::REPLAY_BYTES]).into_owned();
    assert!(text.starts_with("flood\r\n"), "{:?}", &text[..40]);
    t.ws.send(Message::Text(r#"{"type":"signal","signal":2}"#.into()))
        .await
        .expect("interrupt");
    assert!(matches!(t.wait_end().await, End::Exit(130)));
    f.stop().await;
}

impl Fixture {
    async fn stop_worker_only(mut self) {
        if let Some((w, tx)) = self.worker.take() {
            let _ = tx.send(());
            tokio::time::timeout(Duration::from_secs(10), w.wait())
                .await
                .expect("worker stops")
                .expect("worker ran");
        }
    }
}
