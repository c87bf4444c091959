//! The agent end to end over a real unix socket: the server runs in-process (or as the built
//! binary for `init`), the client is [`ironlab_agent::connect`], and the processes are real.
//! Tests that switch users or chown need root (CI runs as root); they say so when skipped.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironlab_agent::server::{self, AgentService};
use ironlab_api::agent::agent_client::AgentClient;
use ironlab_api::agent::{
    EnsureUsersRequest, ExecInput, ExecOutput, ExecStart, Exit, HealthRequest, PutFileRequest,
    Resize, exec_input, exec_output,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

macro_rules! require_root {
    () => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (switches users / chowns files)");
            return;
        }
    };
}

/// An in-process agent on a temp socket; stopped and cleaned on drop.
struct TestAgent {
    dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
}

impl TestAgent {
    async fn start(root: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/agent.sock");
        let listener = server::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let service = AgentService::new(root);
        tokio::spawn(async move {
            server::serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        TestAgent {
            dir,
            socket,
            stop: Some(stop),
        }
    }

    async fn client(&self) -> AgentClient<Channel> {
        ironlab_agent::connect(&self.socket).await.expect("connect")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.dir.path();
    }
}

struct Session {
    tx: mpsc::Sender<ExecInput>,
    rx: Streaming<ExecOutput>,
}

#[derive(Debug, Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<Exit>,
    chunks: Vec<usize>,
    after_exit: usize,
}

impl Collected {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

fn input(kind: exec_input::Kind) -> ExecInput {
    ExecInput { kind: Some(kind) }
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

async fn open(client: &mut AgentClient<Channel>, start: ExecStart) -> Session {
    let (tx, rx) = mpsc::channel(16);
    tx.send(input(exec_input::Kind::Start(start)))
        .await
        .expect("send start");
    let rx = client
        .exec(ReceiverStream::new(rx))
        .await
        .expect("exec")
        .into_inner();
    Session { tx, rx }
}

impl Session {
    async fn send(&self, kind: exec_input::Kind) {
        self.tx.send(input(kind)).await.expect("send input");
    }

    async fn next(&mut self) -> Option<exec_output::Kind> {
        timeout(Duration::from_secs(20), self.rx.message())
            .await
            .expect("no output within 20 s")
            .expect("stream error")
            .and_then(|m| m.kind)
    }

    /// Reads stdout until it contains `needle`; returns everything read.
    async fn read_until(&mut self, needle: &str) -> String {
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains(needle) {
            match self.next().await {
                Some(exec_output::Kind::Stdout(d)) => seen.extend(d),
                Some(exec_output::Kind::Stderr(_)) => {}
                other => panic!(
                    "stream ended waiting for {needle:?} (got {other:?}); stdout so far: {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    }

    async fn collect(mut self) -> Collected {
        let mut c = Collected::default();
        while let Some(kind) = self.next().await {
            if c.exit.is_some() {
                c.after_exit += 1;
            }
            match kind {
                exec_output::Kind::Stdout(d) => {
                    c.chunks.push(d.len());
                    c.stdout.extend(d);
                }
                exec_output::Kind::Stderr(d) => {
                    c.chunks.push(d.len());
                    c.stderr.extend(d);
                }
                exec_output::Kind::Exit(e) => c.exit = Some(e),
            }
        }
        c
    }
}

async fn run(client: &mut AgentClient<Channel>, start: ExecStart) -> Collected {
    let s = open(client, start).await;
    // The session may already be over (and its input closed): that is fine.
    let _ = s.tx.send(input(exec_input::Kind::CloseStdin(true))).await;
    s.collect().await
}

fn cmd(args: &[&str]) -> ExecStart {
    ExecStart {
        argv: argv(args),
        ..Default::default()
    }
}

#[tokio::test]
async fn health_reports_version_hostname_uptime() {
    let agent = TestAgent::start(Path::new("/")).await;
    let h = agent
        .client()
        .await
        .health(HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.version, ironlab_agent::VERSION);
    let host = nix::unistd::gethostname().expect("hostname");
    assert_eq!(h.hostname, host.to_string_lossy());
    assert!(h.uptime_ms < 60_000, "uptime {}", h.uptime_ms);
}

#[tokio::test]
async fn exec_separates_stdout_stderr_and_exit_code() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let c = run(
        &mut client,
        cmd(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(c.out(), "out\n");
    assert_eq!(c.err(), "err\n");
    assert_eq!(c.exit, Some(Exit { code: 3, signal: 0 }));
    assert_eq!(c.after_exit, 0, "exit is the last message");
}

#[tokio::test]
async fn exec_env_and_cwd() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut start = cmd(&["sh", "-c", "echo $FOO $LANG; pwd; echo ${TERM:-none}"]);
    start.env = HashMap::from([("FOO".to_string(), "bar".to_string())]);
    start.cwd = "/tmp".into();
    let c = run(&mut client, start).await;
    assert_eq!(c.out(), "bar C.UTF-8\n/tmp\nnone\n");
    assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
}

#[tokio::test]
async fn stdin_round_trip_with_cat() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut s = open(&mut client, cmd(&["cat"])).await;
    s.send(exec_input::Kind::Stdin(b"hello\n".to_vec())).await;
    assert_eq!(s.read_until("hello\n").await, "hello\n");
    s.send(exec_input::Kind::Stdin(b"world".to_vec())).await;
    s.send(exec_input::Kind::CloseStdin(true)).await;
    let c = s.collect().await;
    assert_eq!(c.out(), "world");
    assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
}

#[tokio::test]
async fn output_is_streamed_as_it_comes() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let started = Instant::now();
    let mut s = open(
        &mut client,
        cmd(&["sh", "-c", "echo first; sleep 3; echo second"]),
    )
    .await;
    s.read_until("first").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "first line took {:?}",
        started.elapsed()
    );
    let c = s.collect().await;
    assert_eq!(c.out(), "second\n");
}

#[tokio::test]
async fn large_output_in_bounded_chunks() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let c = run(&mut client, cmd(&["head", "-c", "3000000", "/dev/zero"])).await;
    assert_eq!(c.stdout.len(), 3_000_000);
    assert!(c.stdout.iter().all(|b| *b == 0));
    let max = c.chunks.iter().max().copied().unwrap_or(0);
    assert!(max <= 32 * 1024, "chunk of {max} bytes");
    assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
}

fn written_bytes(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).expect("/proc/PID/io");
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("wchar")
}

#[tokio::test]
async fn a_flood_is_held_back_when_the_client_does_not_read() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut s = open(&mut client, cmd(&["sh", "-c", "echo $$ >&2; exec yes"])).await;
    let pid: u32 = loop {
        if let Some(exec_output::Kind::Stderr(d)) = s.next().await {
            break String::from_utf8_lossy(&d).trim().parse().expect("pid");
        }
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first = written_bytes(pid);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = written_bytes(pid);
    assert_eq!(first, second, "`yes` kept writing while nobody read");
    assert!(first < 32 << 20, "{first} bytes buffered");
    s.send(exec_input::Kind::Signal(9)).await;
    let c = s.collect().await;
    assert_eq!(
        c.exit,
        Some(Exit {
            code: 137,
            signal: 9
        })
    );
}

#[tokio::test]
async fn pty_session_tty_resize_and_output() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut start = cmd(&["sh", "-c", "tty; echo TERM=$TERM; read x; stty size"]);
    start.tty = true;
    start.cols = 80;
    start.rows = 24;
    let mut s = open(&mut client, start).await;
    let seen = s.read_until("TERM=").await;
    assert!(seen.contains("/dev/pts/"), "tty printed {seen:?}");
    s.send(exec_input::Kind::Resize(Resize {
        cols: 100,
        rows: 30,
    }))
    .await;
    s.send(exec_input::Kind::Stdin(b"go\r".to_vec())).await;
    let c = s.collect().await;
    let all = format!("{seen}{}", c.out());
    assert!(all.contains("TERM=xterm-256color"), "{all:?}");
    assert!(all.contains("30 100"), "stty size after resize: {all:?}");
    assert!(
        c.stderr.is_empty(),
        "a PTY session sends everything as stdout"
    );
    assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
}

#[tokio::test]
async fn pty_signal_interrupts_the_foreground_process() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut start = cmd(&["sleep", "100"]);
    start.tty = true;
    let s = open(&mut client, start).await;
    s.send(exec_input::Kind::Signal(2)).await;
    let c = timeout(Duration::from_secs(5), s.collect())
        .await
        .expect("sleep was not interrupted");
    assert_eq!(
        c.exit,
        Some(Exit {
            code: 130,
            signal: 2
        })
    );
}

#[tokio::test]
async fn ctrl_c_typed_into_the_pty_interrupts() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut start = cmd(&["sh", "-c", "echo ready; exec sleep 100"]);
    start.tty = true;
    let mut s = open(&mut client, start).await;
    s.read_until("ready").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.send(exec_input::Kind::Stdin(vec![0x03])).await;
    let c = s.collect().await;
    assert_eq!(
        c.exit,
        Some(Exit {
            code: 130,
            signal: 2
        })
    );
}

#[tokio::test]
async fn empty_argv_is_an_interactive_login_shell() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let start = ExecStart {
        tty: true,
        ..Default::default()
    };
    let mut s = open(&mut client, start).await;
    s.send(exec_input::Kind::Stdin(
        b"echo \"zero=$0 home=$HOME\"; exit 7\r".to_vec(),
    ))
    .await;
    let seen = s.read_until("home=").await;
    let c = s.collect().await;
    let all = format!("{seen}{}", c.out());
    assert!(all.contains("zero=-"), "login shell argv0: {all:?}");
    assert!(all.contains("home=/root"), "{all:?}");
    assert_eq!(c.exit, Some(Exit { code: 7, signal: 0 }));
}

#[tokio::test]
async fn runs_as_another_user() {
    require_root!();
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let db = ironlab_agent::users::UserDb::new("/");
    let nobody = db.resolve("nobody").expect("the host has a nobody user");
    let mut start = cmd(&[
        "sh",
        "-c",
        "id -u; id -g; echo $HOME $USER $LOGNAME; echo $PATH",
    ]);
    start.user = "nobody".into();
    let c = run(&mut client, start).await;
    assert_eq!(
        c.out(),
        format!(
            "{}\n{}\n{} nobody nobody\n{}\n",
            nobody.uid,
            nobody.gid,
            nobody.home.display(),
            ironlab_agent::USER_PATH
        )
    );
    assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
}

#[tokio::test]
async fn protocol_errors() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    // First message not `start`.
    let (tx, rx) = mpsc::channel(1);
    tx.send(input(exec_input::Kind::Stdin(b"x".to_vec())))
        .await
        .expect("send");
    let err = client
        .exec(ReceiverStream::new(rx))
        .await
        .expect_err("must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Unknown user.
    let (tx, rx) = mpsc::channel(1);
    let mut start = cmd(&["true"]);
    start.user = "no-such-user-here".into();
    tx.send(input(exec_input::Kind::Start(start)))
        .await
        .expect("send");
    let err = client
        .exec(ReceiverStream::new(rx))
        .await
        .expect_err("unknown user");
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("no-such-user-here"),
        "{}",
        err.message()
    );
    // Unknown program: like a shell, 127 and a message.
    let c = run(&mut client, cmd(&["no-such-program-xyz"])).await;
    assert_eq!(
        c.exit,
        Some(Exit {
            code: 127,
            signal: 0
        })
    );
    assert!(
        c.err().contains("no-such-program-xyz: command not found"),
        "{}",
        c.err()
    );
}

fn group_alive(pgid: i32) -> bool {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok()
}

#[tokio::test]
async fn client_going_away_kills_the_process_group() {
    let agent = TestAgent::start(Path::new("/")).await;
    for tty in [false, true] {
        let mut client = agent.client().await;
        let mut start = cmd(&["sh", "-c", "echo pid=$$; sleep 100; echo never"]);
        start.tty = tty;
        let mut s = open(&mut client, start).await;
        let seen = s.read_until("\n").await;
        let pid: i32 = seen
            .trim()
            .strip_prefix("pid=")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("pid line {seen:?}"));
        assert!(group_alive(pid));
        drop(s);
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(6);
        while group_alive(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !group_alive(pid),
            "process group {pid} survived (tty={tty})"
        );
    }
}

#[tokio::test]
async fn put_file_writes_atomically_with_mode_and_owner() {
    require_root!();
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("new/dir/motd");
    let path_str = path.to_string_lossy().into_owned();
    client
        .put_file(PutFileRequest {
            path: path_str.clone(),
            content: b"Welcome!\n".to_vec(),
            mode: 0o640,
            owner: "nobody".into(),
            append: false,
        })
        .await
        .expect("put");
    let meta = std::fs::metadata(&path).expect("written");
    let nobody = ironlab_agent::users::UserDb::new("/")
        .resolve("nobody")
        .expect("nobody");
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (nobody.uid, nobody.gid));
    client
        .put_file(PutFileRequest {
            path: path_str.clone(),
            content: b"more\n".to_vec(),
            append: true,
            ..Default::default()
        })
        .await
        .expect("append");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "Welcome!\nmore\n"
    );
    let err = client
        .put_file(PutFileRequest {
            path: "relative/path".into(),
            ..Default::default()
        })
        .await
        .expect_err("relative");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn ensure_users_in_a_throwaway_root() {
    require_root!();
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("etc/sudoers.d")).expect("etc");
    std::fs::write(
        root.path().join("etc/passwd"),
        "root:x:0:0::/root:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.path().join("etc/group"), "root:x:0:\n").expect("group");
    let agent = TestAgent::start(root.path()).await;
    let mut client = agent.client().await;
    client
        .ensure_users(EnsureUsersRequest {
            names: vec!["laborant".into()],
            sudo: true,
        })
        .await
        .expect("ensure");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).expect("passwd");
    assert!(
        passwd.contains("laborant:x:1000:1000::/home/laborant:"),
        "{passwd}"
    );
    let home = std::fs::metadata(root.path().join("home/laborant")).expect("home");
    assert_eq!(home.uid(), 1000);
    let sudoers = root.path().join("etc/sudoers.d/90-ironlab-laborant");
    assert_eq!(
        std::fs::read_to_string(&sudoers).expect("sudoers"),
        "laborant ALL=(ALL) NOPASSWD:ALL\n"
    );
    let err = client
        .ensure_users(EnsureUsersRequest {
            names: vec!["Bad:Name".into()],
            sudo: false,
        })
        .await
        .expect_err("bad name");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn exec_round_trip_is_fast() {
    // `ironlab ssh RUN -- true` has 100 ms end to end; the agent's part must be a small share and
    // must never wait out the drain timeout for a process that simply exits.
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let mut times = Vec::new();
    for _ in 0..15 {
        let started = Instant::now();
        let c = run(&mut client, cmd(&["true"])).await;
        times.push(started.elapsed());
        assert_eq!(c.exit, Some(Exit { code: 0, signal: 0 }));
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!(
        "exec `true` round trip: median {median:?}, min {:?}",
        times[0]
    );
    assert!(
        median < ironlab_agent::exec::DRAIN_IDLE,
        "median {median:?}: exits are waiting for the drain timeout"
    );
}

#[tokio::test]
async fn exit_does_not_wait_for_a_background_process_holding_the_pipe() {
    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let started = Instant::now();
    let c = run(
        &mut client,
        cmd(&["sh", "-c", "sleep 30 & echo $!; exit 4"]),
    )
    .await;
    let elapsed = started.elapsed();
    let pid: i32 = c.out().trim().parse().expect("background pid");
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    assert_eq!(c.exit, Some(Exit { code: 4, signal: 0 }));
    assert!(elapsed < Duration::from_secs(2), "exit took {elapsed:?}");
}

/// `Dial` over the real socket: an HTTP-like exchange with a server on 127.0.0.1 (half-close
/// included), and a refused port failing the call itself with the reason.
#[tokio::test]
async fn dial_carries_bytes_both_ways_and_reports_refused_ports() {
    use ironlab_api::agent::{DialInput, DialOpen, dial_input, dial_output};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let agent = TestAgent::start(Path::new("/")).await;
    let mut client = agent.client().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.expect("read the request");
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello from the machine")
            .await
            .expect("answer");
        req
    });
    let msg = |kind| DialInput { kind: Some(kind) };
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(dial_input::Kind::Open(DialOpen {
        host: String::new(),
        port: u32::from(port),
    })))
    .await
    .expect("queue open");
    let mut out = client
        .dial(ReceiverStream::new(rx))
        .await
        .expect("dial answers")
        .into_inner();
    let first = timeout(Duration::from_secs(5), out.message())
        .await
        .expect("in time")
        .expect("no error")
        .and_then(|m| m.kind);
    assert!(
        matches!(&first, Some(dial_output::Kind::Connected(c)) if c.peer == format!("127.0.0.1:{port}")),
        "{first:?}"
    );
    tx.send(msg(dial_input::Kind::Data(
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
    )))
    .await
    .expect("send");
    tx.send(msg(dial_input::Kind::CloseWrite(true)))
        .await
        .expect("send");
    let mut body = Vec::new();
    let mut eof = false;
    while let Some(m) = timeout(Duration::from_secs(5), out.message())
        .await
        .expect("in time")
        .expect("no error")
    {
        match m.kind {
            Some(dial_output::Kind::Data(d)) => body.extend(d),
            Some(dial_output::Kind::Eof(_)) => eof = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(eof, "the peer's close is reported as eof");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "HTTP/1.0 200 OK\r\n\r\nhello from the machine"
    );
    assert_eq!(server.await.expect("server"), b"GET / HTTP/1.0\r\n\r\n");

    // Nothing listens on port 1 here: the call fails with Unavailable and the reason.
    let (tx, rx) = mpsc::channel(1);
    tx.send(msg(dial_input::Kind::Open(DialOpen {
        host: String::new(),
        port: 1,
    })))
    .await
    .expect("queue open");
    let status = client
        .dial(ReceiverStream::new(rx))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status
            .message()
            .starts_with("cannot connect to 127.0.0.1:1: ")
            && status.message().to_lowercase().contains("refused"),
        "{}",
        status.message()
    );
}
