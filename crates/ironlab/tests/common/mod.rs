//! Fixtures for ironlab's end-to-end tests: real processes, a real registry, real containers.
//!
//! Who talks to whom: the test process starts Debian's `docker-registry` ([`Registry`]) and the
//! `ironlab control` and `ironlab worker` processes ([`Platform`]), each as its own child so a
//! test can kill one. The test drives them through the CLI ([`Platform::cli`]) and through raw
//! HTTP/WebSocket ([`http`], [`ws`]) to check status codes. Every guard cleans up in `Drop`:
//! runs are destroyed through the API first, then processes are killed, then whatever the worker
//! could have left (containers, network namespaces, mounts, loop devices, files) is removed.
//!
//! Tests take a cross-process lock ([`serial`]) so they run one at a time under `cargo test` and
//! `cargo nextest` alike. They skip with a printed reason when they cannot run (not root, a tool
//! or artefact missing), unless `IRONLAB_E2E_REQUIRED=1` (set by `scripts/test.sh`), where they
//! fail instead.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The `ironlab` binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ironlab"))
}

/// How long a CLI call may take before the test fails (start includes a first image pull).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(240);

// ---------------------------------------------------------------------------------------------
// Preconditions
// ---------------------------------------------------------------------------------------------

/// True when `IRONLAB_E2E_REQUIRED=1`: missing preconditions fail the test instead of skipping.
pub fn required() -> bool {
    std::env::var("IRONLAB_E2E_REQUIRED").is_ok_and(|v| v == "1")
}

/// Skips (returns `None`) or, when required, panics, with a reason a person can act on.
fn unmet(test: &str, reason: String) -> Option<Env> {
    if required() {
        panic!("{test}: cannot run: {reason} (IRONLAB_E2E_REQUIRED=1, so this is a failure)");
    }
    eprintln!("SKIPPED {test}: {reason} (scripts/test.sh sets everything up)");
    None
}

/// What a test needs beyond root and the basic tools.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    /// The busybox OCI layout (`IRONLAB_TEST_IMAGE_LAYOUT`) and a registry to push it to.
    pub test_image: bool,
    /// The stock debian image under `IRONLAB_STOCK_IMAGES`.
    pub debian: bool,
    /// The stock docker image under `IRONLAB_STOCK_IMAGES` and what boots it as a microVM:
    /// `qemu-system-x86_64` and the guest kit (`IRONLAB_VM_KERNEL_DIR`).
    pub docker: bool,
    /// PostgreSQL's server binaries and `psql` ([`Postgres::start`]).
    pub postgres: bool,
}

/// Paths to the artefacts built by `scripts/test.sh`.
#[derive(Debug, Clone)]
pub struct Env {
    /// The static agent (`IRONLAB_AGENT`).
    pub agent: PathBuf,
    /// Stock image layouts dir (`IRONLAB_STOCK_IMAGES`), if set.
    pub stock_images: Option<PathBuf>,
    /// Test image OCI layout (`IRONLAB_TEST_IMAGE_LAYOUT`), if set.
    pub test_image: Option<PathBuf>,
}

/// Checks root, tools and artefacts. `None` = skip (already explained on stderr).
pub fn preflight(test: &str, needs: Needs) -> Option<Env> {
    if !is_root() {
        return unmet(test, "needs root (namespaces, mounts, containers)".into());
    }
    let mut tools = vec!["ip", "losetup", "umount", "mkfs.ext4"];
    if needs.test_image {
        tools.extend(["docker-registry", "skopeo"]);
    }
    for tool in tools {
        if which(tool).is_none() {
            return unmet(
                test,
                format!("`{tool}` is not installed (scripts/setup.sh installs it)"),
            );
        }
    }
    if which("crun").is_none() && which("runc").is_none() {
        return unmet(test, "neither crun nor runc is installed".into());
    }
    if needs.postgres && (which("psql").is_none() || Postgres::bin_dir().is_none()) {
        return unmet(
            test,
            "PostgreSQL is not installed (scripts/setup.sh installs the postgresql package)".into(),
        );
    }
    let agent = match std::env::var_os("IRONLAB_AGENT") {
        Some(p) => PathBuf::from(p),
        None => match bin().parent() {
            Some(dir) => dir.join("ironlab-agent-static"),
            None => return unmet(test, "cannot locate the ironlab binary's directory".into()),
        },
    };
    if !agent.is_file() {
        return unmet(
            test,
            format!(
                "agent binary {} missing (set IRONLAB_AGENT; scripts/build-agent.sh builds it)",
                agent.display()
            ),
        );
    }
    let stock_images = std::env::var_os("IRONLAB_STOCK_IMAGES").map(PathBuf::from);
    let test_image = std::env::var_os("IRONLAB_TEST_IMAGE_LAYOUT").map(PathBuf::from);
    if needs.test_image {
        match &test_image {
            Some(p) if p.join("index.json").is_file() => {}
            Some(p) => {
                return unmet(
                    test,
                    format!(
                        "IRONLAB_TEST_IMAGE_LAYOUT={} is not an OCI layout",
                        p.display()
                    ),
                );
            }
            None => {
                return unmet(
                    test,
                    "IRONLAB_TEST_IMAGE_LAYOUT is not set (images/testimg/build.sh OUT_DIR builds it)".into(),
                );
            }
        }
    }
    if needs.debian {
        let dir = stock_images
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/ironlab/stock-images"));
        if !dir.join("debian/index.json").is_file() {
            return unmet(
                test,
                format!(
                    "stock image {}/debian missing (set IRONLAB_STOCK_IMAGES; images/debian/build.sh builds it)",
                    dir.display()
                ),
            );
        }
    }
    if needs.docker {
        let dir = stock_images
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/ironlab/stock-images"));
        if !dir.join("docker/index.json").is_file() {
            return unmet(
                test,
                format!(
                    "stock image {}/docker missing (set IRONLAB_STOCK_IMAGES; images/docker/build.sh builds it)",
                    dir.display()
                ),
            );
        }
        if which("qemu-system-x86_64").is_none() {
            return unmet(
                test,
                "`qemu-system-x86_64` is not installed (scripts/setup.sh installs it)".into(),
            );
        }
        let kit = std::env::var_os("IRONLAB_VM_KERNEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/ironlab/kernel"));
        if !kit.join("vmlinuz").is_file() || !kit.join("initramfs.cpio").is_file() {
            return unmet(
                test,
                format!(
                    "the microVM kit {} is missing (set IRONLAB_VM_KERNEL_DIR; images/kernel/build.sh builds it)",
                    kit.display()
                ),
            );
        }
    }
    Some(Env {
        agent,
        stock_images,
        test_image,
    })
}

/// Whether we run as root.
pub fn is_root() -> bool {
    // `id -u` keeps this free of libc/unsafe.
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Finds `tool` on PATH (plus the sbin dirs, which a non-login root shell may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------------------------
// Serialisation across test processes
// ---------------------------------------------------------------------------------------------

/// Holds the e2e lock; tests run one at a time (also across nextest's processes).
pub struct Serial {
    _file: fs::File,
}

/// Takes the e2e lock (blocks until the previous test is done).
pub fn serial() -> Serial {
    let path = std::env::temp_dir().join("ironlab-e2e.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open lock file {}: {e}", path.display()));
    file.lock()
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()));
    Serial { _file: file }
}

// ---------------------------------------------------------------------------------------------
// Small helpers: ports, temp dirs, processes
// ---------------------------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for a free port");
    l.local_addr()
        .expect("local addr of a bound listener")
        .port()
}

/// A free port P on 127.0.0.1 whose successor P+1 is free too (`ironlab up` uses both).
pub fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let p = free_port();
        if p < u16::MAX && TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no two adjacent free ports on 127.0.0.1 after 100 tries");
}

/// A playground of one container `box` (64 MiB, a 128 MiB drive of `image`, user `laborant`).
pub fn box_manifest(name: &str, title: &str, image: &str) -> String {
    format!(
        r#"kind: playground
name: {name}
title: {title}
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
"#
    )
}

/// A private PostgreSQL server (`scripts/pg.sh`): its own data dir, 127.0.0.1 on a free port,
/// trust authentication; stopped and removed in `Drop`.
pub struct Postgres {
    dir: PathBuf,
    /// `postgres://ironlab@127.0.0.1:PORT/postgres`.
    pub server_url: String,
}

impl Postgres {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/pg.sh")
    }

    /// `/usr/lib/postgresql/N/bin` when the server is installed.
    pub fn bin_dir() -> Option<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|b| b.join("initdb").is_file())
            .collect();
        dirs.sort();
        dirs.pop()
    }

    /// Starts a server; panics with its log when it does not come up.
    pub fn start() -> Postgres {
        let dir = PathBuf::from("/var/tmp").join(format!(
            "ironlab-e2e-pg-{}-{:x}",
            std::process::id(),
            nanos()
        ));
        let out = run_with_timeout(
            {
                let mut c = Command::new(Self::script());
                c.args(["start", &dir.to_string_lossy()]);
                c
            },
            Duration::from_secs(120),
        );
        let pg = Postgres {
            dir,
            server_url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        };
        assert!(
            out.status.success() && pg.server_url.starts_with("postgres://"),
            "scripts/pg.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    }

    /// Creates database `name`; returns its URL.
    pub fn create_db(&self, name: &str) -> String {
        self.psql(&self.server_url, &format!("CREATE DATABASE {name}"));
        self.server_url.replace("/postgres", &format!("/{name}"))
    }

    /// Runs one statement with `psql` against `url`; returns its unaligned output.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = run_with_timeout(
            {
                let mut c = Command::new("psql");
                c.args([url, "-v", "ON_ERROR_STOP=1", "-Atc", sql]);
                c
            },
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .args(["stop", &self.dir.to_string_lossy()])
            .stdin(Stdio::null())
            .status();
    }
}

/// A fresh directory removed in `Drop`.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/var/tmp/ironlab-e2e-<tag>-<pid>-<n>` (on disk, not tmpfs: pools live here).
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = PathBuf::from("/var/tmp").join(format!(
            "ironlab-e2e-{tag}-{}-{}-{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("warning: could not remove {}: {e}", self.path.display());
        }
    }
}

/// Runs `cmd` with stdin closed, capturing output, failing the test after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let out = child.stdout.take().map(drain);
    let err = child.stderr.take().map(drain);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = err
                    .map(|h| h.join().unwrap_or_default())
                    .unwrap_or_default();
                panic!(
                    "{what} did not finish within {timeout:?}; stderr so far:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    };
    Output {
        status,
        stdout: out
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default(),
        stderr: err
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// The path of a host tool (found in the sbin dirs too), or its bare name.
fn tool(prog: &str) -> PathBuf {
    which(prog).unwrap_or_else(|| PathBuf::from(prog))
}

/// Runs a host tool and returns its stdout (empty when it fails or is missing).
pub fn sh(prog: &str, args: &[&str]) -> String {
    Command::new(tool(prog))
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Runs a host tool for its effect, ignoring failures (cleanup paths).
fn quiet(prog: &str, args: &[&str]) {
    let _ = Command::new(tool(prog))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Sends `signal` (e.g. "TERM", "KILL") to a process.
pub fn signal(pid: u32, signal: &str) {
    quiet("kill", &[&format!("-{signal}"), &pid.to_string()]);
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`. Returns its exit status.
pub fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    signal(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Polls `f` every `every` until it returns `Some`, or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(every);
    }
}

/// The last `n` lines of a log file (for failure reports).
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 and WebSocket clients over std (exact status codes, no client-side magic)
// ---------------------------------------------------------------------------------------------

/// An HTTP response: status and body text.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: String,
}

impl Response {
    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!("response ({}) is not JSON: {e}: {}", self.status, self.body)
        })
    }
}

/// Splits `http://host:port/path` or `ws://…` into (`host:port`, `/path?query`).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

fn connect(authority: &str) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(authority)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// One HTTP request; `Err` only when the server cannot be reached or answers garbage.
pub fn try_http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<Response> {
    let (authority, path) = split_url(url);
    let mut s = connect(&authority)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nAccept: application/json\r\n"
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    let mut data = Vec::new();
    if chunked {
        loop {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|e| std::io::Error::other(format!("bad chunk size {line:?}: {e}")))?;
            if size == 0 {
                break;
            }
            let mut chunk = vec![0; size];
            r.read_exact(&mut chunk)?;
            data.extend_from_slice(&chunk);
            let mut crlf = String::new();
            r.read_line(&mut crlf)?;
        }
    } else if let Some(n) = length {
        data.resize(n, 0);
        r.read_exact(&mut data)?;
    } else {
        r.read_to_end(&mut data)?;
    }
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&data).into_owned(),
    })
}

/// One HTTP request; panics naming the request when the server cannot be reached.
pub fn http(method: &str, url: &str, token: Option<&str>, body: Option<&str>) -> Response {
    try_http(method, url, token, body).unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

/// A WebSocket connection (client side) to the worker's terminal relay.
pub struct Ws {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

/// A message received on a [`Ws`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMsg {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
    /// The server closed.
    Close,
}

/// Opens a WebSocket: `Ok(Ws)` on `101`, `Err(Response)` with the refusal otherwise.
pub fn ws(url: &str) -> Result<Ws, Response> {
    let (authority, path) = split_url(url);
    let s = connect(&authority).unwrap_or_else(|e| panic!("connect {url}: {e}"));
    let mut w = s.try_clone().expect("clone a TcpStream");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    w.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("send upgrade to {url}: {e}"));
    let mut r = BufReader::new(s);
    let (status, headers) =
        read_head(&mut r).unwrap_or_else(|e| panic!("upgrade response from {url}: {e}"));
    if status == 101 {
        return Ok(Ws { r, w });
    }
    let length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut data = vec![0; length.min(64 * 1024)];
    let _ = r.read_exact(&mut data);
    Err(Response {
        status,
        body: String::from_utf8_lossy(&data).into_owned(),
    })
}

impl Ws {
    fn send(&mut self, opcode: u8, payload: &[u8]) {
        let mut f = vec![0x80 | opcode];
        let mask = [0x37u8, 0xfa, 0x21, 0x3d];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65536 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.w
            .write_all(&f)
            .unwrap_or_else(|e| panic!("websocket send: {e}"));
    }

    /// Sends a text frame (a JSON control message).
    pub fn send_text(&mut self, text: &str) {
        self.send(0x1, text.as_bytes());
    }

    /// Sends a binary frame.
    pub fn send_binary(&mut self, data: &[u8]) {
        self.send(0x2, data);
    }

    /// Receives the next data/close message (answers pings, skips pongs).
    pub fn recv(&mut self) -> std::io::Result<WsMsg> {
        let mut message = Vec::new();
        let mut message_op = 0u8;
        loop {
            let mut h = [0u8; 2];
            self.r.read_exact(&mut h)?;
            let fin = h[0] & 0x80 != 0;
            let op = h[0] & 0x0f;
            let masked = h[1] & 0x80 != 0;
            let mut len = u64::from(h[1] & 0x7f);
            if len == 126 {
                let mut b = [0u8; 2];
                self.r.read_exact(&mut b)?;
                len = u64::from(u16::from_be_bytes(b));
            } else if len == 127 {
                let mut b = [0u8; 8];
                self.r.read_exact(&mut b)?;
                len = u64::from_be_bytes(b);
            }
            let mut mask = [0u8; 4];
            if masked {
                self.r.read_exact(&mut mask)?;
            }
            let mut payload = vec![0u8; len as usize];
            self.r.read_exact(&mut payload)?;
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match op {
                0x8 => return Ok(WsMsg::Close),
                0x9 => {
                    self.send(0xA, &payload);
                    continue;
                }
                0xA => continue,
                0x0 => message.extend_from_slice(&payload),
                _ => {
                    message_op = op;
                    message = payload;
                }
            }
            if fin {
                return Ok(if message_op == 0x1 {
                    WsMsg::Text(String::from_utf8_lossy(&message).into_owned())
                } else {
                    WsMsg::Binary(message)
                });
            }
        }
    }

    /// Runs `command` over the relay protocol; returns (stdout, stderr, exit code).
    pub fn exec(&mut self, command: &[&str]) -> (Vec<u8>, Vec<u8>, i32) {
        let start = serde_json::json!({"type": "start", "command": command, "tty": false});
        self.send_text(&start.to_string());
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.recv() {
                Ok(WsMsg::Binary(b)) => match b.split_first() {
                    Some((1, d)) => out.extend_from_slice(d),
                    Some((2, d)) => err.extend_from_slice(d),
                    _ => {}
                },
                Ok(WsMsg::Text(t)) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("relay sent a non-JSON text frame {t:?}: {e}"));
                    match v["type"].as_str() {
                        Some("exit") => {
                            let code = v["code"].as_i64().unwrap_or(-1) as i32;
                            return (out, err, code);
                        }
                        Some("error") => panic!("relay reported an error: {t}"),
                        _ => {}
                    }
                }
                Ok(WsMsg::Close) => panic!("relay closed before the exit message"),
                Err(e) => panic!("relay connection failed: {e}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/// Debian's `docker-registry` serving on 127.0.0.1 from a temp directory; killed in `Drop`.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: PathBuf,
    dir: TempDir,
}

impl Registry {
    /// Starts it and waits until `GET /v2/` answers.
    pub fn start() -> Registry {
        let dir = TempDir::new("registry");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let root = dir.path().join("data");
        fs::create_dir_all(&root).expect("create the registry root dir");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                root.display()
            ),
        )
        .expect("write the registry config");
        let log = dir.path().join("registry.log");
        let logf = fs::File::create(&log).expect("create the registry log");
        let program =
            which("docker-registry").unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"));
        let child = Command::new(program)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("clone log handle"))
            .stderr(logf)
            .spawn()
            .expect("start docker-registry");
        let mut reg = Registry {
            child,
            addr,
            log,
            dir,
        };
        let url = format!("http://{}/v2/", reg.addr);
        let up = wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            if let Ok(Some(st)) = reg.child.try_wait() {
                panic!("docker-registry exited ({st}):\n{}", tail(&reg.log, 30));
            }
            try_http("GET", &url, None, None)
                .ok()
                .filter(|r| r.status == 200)
        });
        assert!(
            up.is_some(),
            "docker-registry did not answer GET /v2/ within 20 s:\n{}",
            tail(&reg.log, 30)
        );
        reg
    }

    /// Pushes an OCI layout into `repo:tag`; returns `oci://127.0.0.1:PORT/REPO:TAG`.
    pub fn push(&self, layout: &Path, repo: &str, tag: &str) -> String {
        // Use the layout's tag when it names one, else its only manifest.
        let index: Value = serde_json::from_str(
            &fs::read_to_string(layout.join("index.json"))
                .unwrap_or_else(|e| panic!("read {}/index.json: {e}", layout.display())),
        )
        .unwrap_or_else(|e| panic!("{}/index.json is not JSON: {e}", layout.display()));
        let src_tag = index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
            .as_str()
            .map(str::to_string);
        let src = match src_tag {
            Some(t) => format!("oci:{}:{t}", layout.display()),
            None => format!("oci:{}", layout.display()),
        };
        let dest = format!("docker://{}/{repo}:{tag}", self.addr);
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false", &src, &dest]);
        let out = run_with_timeout(cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "skopeo copy {src} {dest} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!("oci://{}/{repo}:{tag}", self.addr)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

// ---------------------------------------------------------------------------------------------
// Platform: control plane + worker as separate processes
// ---------------------------------------------------------------------------------------------

/// `ironlab control` and `ironlab worker` on a temp data dir.
pub struct Platform {
    env: Env,
    dir: TempDir,
    /// The data dir shared by both (`control/`, `worker/`, tokens).
    pub data: PathBuf,
    control: Option<Child>,
    worker: Option<Child>,
    control_port: u16,
    worker_port: u16,
    control_starts: u32,
    worker_starts: u32,
    token: Option<String>,
    /// Run ids this platform saw (cleaned in `Drop` even if the API forgot them).
    runs: Vec<String>,
    /// `ironlab up` (control plane + supervised worker in one process tree) instead of two.
    up: bool,
    /// Extra environment of the next worker start (e.g. `IRONLAB_TEST_CRASH_AT`).
    pub worker_env: Vec<(String, String)>,
    /// Extra arguments of `ironlab up` or `ironlab control` (e.g. `--content DIR`).
    pub up_args: Vec<String>,
    /// More workers of the control plane ([`Platform::add_worker`]): name, port, process.
    extra_workers: Vec<(String, u16, Option<Child>)>,
}

impl Platform {
    /// Starts the worker, then the control plane, and waits until both answer.
    pub fn start(env: &Env) -> Platform {
        Self::start_with(env, &[])
    }

    /// [`Platform::start`] with extra arguments of `ironlab control` (e.g. `--database URL`).
    pub fn start_with(env: &Env, control_args: &[&str]) -> Platform {
        let dir = TempDir::new("platform");
        let data = dir.path().join("data");
        fs::create_dir_all(&data).expect("create the data dir");
        let mut p = Platform {
            env: env.clone(),
            data,
            dir,
            control: None,
            worker: None,
            control_port: free_port(),
            worker_port: free_port(),
            control_starts: 0,
            worker_starts: 0,
            token: None,
            runs: Vec::new(),
            up: false,
            worker_env: Vec::new(),
            up_args: control_args.iter().map(|a| a.to_string()).collect(),
            extra_workers: Vec::new(),
        };
        p.start_worker();
        p.start_control();
        p
    }

    /// Starts `ironlab up --listen 127.0.0.1:P --data-dir DATA` (its worker listens on P+1) and
    /// waits until both answer. [`Platform::start_control`] restarts it, [`Platform::interrupt`]
    /// sends it Ctrl-C.
    pub fn start_up(env: &Env) -> Platform {
        Self::start_up_with(env, &[])
    }

    /// `ironlab up` with extra arguments.
    pub fn start_up_with(env: &Env, up_args: &[&str]) -> Platform {
        let dir = TempDir::new("up");
        let data = dir.path().join("data");
        fs::create_dir_all(&data).expect("create the data dir");
        let port = free_port_pair();
        let mut p = Platform {
            env: env.clone(),
            data,
            dir,
            control: None,
            worker: None,
            control_port: port,
            worker_port: port + 1,
            control_starts: 0,
            worker_starts: 0,
            token: None,
            runs: Vec::new(),
            up: true,
            worker_env: Vec::new(),
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
            extra_workers: Vec::new(),
        };
        p.start_control();
        p
    }

    /// `http://127.0.0.1:PORT` of the control plane.
    pub fn server(&self) -> String {
        format!("http://127.0.0.1:{}", self.control_port)
    }

    /// `http://127.0.0.1:PORT` of the worker.
    pub fn worker_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.worker_port)
    }

    /// `SERVER/api/v1` + `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server())
    }

    /// The admin's API token (written by `control` to `DATA_DIR/admin-token`).
    pub fn token(&self) -> String {
        self.token
            .clone()
            .expect("the control plane has written its admin token")
    }

    fn worker_token_file(&self) -> PathBuf {
        self.data.join("worker-token")
    }

    fn log(&self, name: &str, n: u32) -> PathBuf {
        self.dir.path().join(format!("{name}-{n}.log"))
    }

    fn spawn(&self, args: &[String], log: &Path) -> Child {
        let logf =
            fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env("IRONLAB_AGENT", &self.env.agent)
            // Tests never let a run reach the real network: no uplink.
            .env("IRONLAB_UPLINK", "none")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("clone log handle"))
            .stderr(logf);
        if let Some(s) = &self.env.stock_images {
            cmd.env("IRONLAB_STOCK_IMAGES", s);
        }
        if args.first().is_some_and(|a| a == "worker") {
            cmd.envs(self.worker_env.iter().map(|(k, v)| (k, v)));
        }
        cmd.spawn()
            .unwrap_or_else(|e| panic!("start {} {args:?}: {e}", bin().display()))
    }

    /// Starts (or restarts) the worker and waits until it answers HTTP.
    pub fn start_worker(&mut self) {
        assert!(self.worker.is_none(), "worker already running");
        let token_file = self.worker_token_file();
        if !token_file.exists() {
            let token = format!("wt-{:x}{:x}", std::process::id(), nanos());
            fs::write(&token_file, token).expect("write the worker token");
            quiet("chmod", &["600", &token_file.to_string_lossy()]);
        }
        self.worker_starts += 1;
        let log = self.log("worker", self.worker_starts);
        let args = vec![
            "worker".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.worker_port),
            "--data-dir".into(),
            self.data.join("worker").to_string_lossy().into_owned(),
            "--token-file".into(),
            token_file.to_string_lossy().into_owned(),
        ];
        let child = self.spawn(&args, &log);
        self.worker = Some(child);
        let url = format!("{}/v1/status", self.worker_url());
        let ok = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
            self.check_alive();
            try_http("GET", &url, None, None).ok()
        });
        assert!(
            ok.is_some(),
            "worker did not answer {url} within 60 s:\n{}",
            tail(&log, 40)
        );
    }

    /// Starts (or restarts) the control plane; waits for its admin token and `GET /api/v1/me`.
    pub fn start_control(&mut self) {
        assert!(self.control.is_none(), "control plane already running");
        self.control_starts += 1;
        let log = self.log("control", self.control_starts);
        let mut args = vec![
            if self.up { "up" } else { "control" }.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.control_port),
            "--data-dir".into(),
            self.data.to_string_lossy().into_owned(),
        ];
        args.extend(self.up_args.iter().cloned());
        if !self.up {
            // The first worker first: ties in placement go to it.
            args.extend([
                "--worker-url".into(),
                if self.extra_workers.is_empty() {
                    self.worker_url()
                } else {
                    format!("local={}", self.worker_url())
                },
            ]);
            for (name, port, _) in &self.extra_workers {
                args.extend([
                    "--worker-url".into(),
                    format!("{name}=http://127.0.0.1:{port}"),
                ]);
            }
            args.extend([
                "--worker-token-file".into(),
                self.worker_token_file().to_string_lossy().into_owned(),
            ]);
        }
        let child = self.spawn(&args, &log);
        self.control = Some(child);
        let token_file = self.data.join("admin-token");
        let me = self.api("/me");
        let token = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
            self.check_alive();
            let token = fs::read_to_string(&token_file).ok()?.trim().to_string();
            let r = try_http("GET", &me, Some(&token), None).ok()?;
            (r.status == 200).then_some(token)
        });
        match token {
            Some(t) => self.token = Some(t),
            None => panic!(
                "control plane did not answer GET {me} with the token from {} within 60 s:\n{}",
                token_file.display(),
                tail(&log, 40)
            ),
        }
        if self.up {
            // `up` starts its worker as a child; wait until it answers too.
            let url = format!("{}/v1/status", self.worker_url());
            let ok = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
                self.check_alive();
                try_http("GET", &url, None, None).ok()
            });
            assert!(
                ok.is_some(),
                "the worker of `ironlab up` did not answer {url} within 60 s:\n{}",
                tail(&log, 40)
            );
        }
    }

    /// Sends Ctrl-C (SIGINT) to `ironlab up` / `control` and waits up to `timeout` for it to exit.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut c = self.control.take()?;
        signal(c.id(), "INT");
        let st = wait_for(timeout, Duration::from_millis(20), || {
            c.try_wait().ok().flatten()
        });
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        st
    }

    /// Panics with the log when a started process has exited.
    fn check_alive(&mut self) {
        for (name, child, n) in [
            ("worker", &mut self.worker, self.worker_starts),
            ("control", &mut self.control, self.control_starts),
        ] {
            if let Some(c) = child
                && let Ok(Some(st)) = c.try_wait()
            {
                let log = self.dir.path().join(format!("{name}-{n}.log"));
                *child = None;
                let name = if name == "control" && self.up {
                    "up"
                } else {
                    name
                };
                panic!("`ironlab {name}` exited ({st}):\n{}", tail(&log, 60));
            }
        }
    }

    /// pid of the worker process.
    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(Child::id)
    }

    /// pid of the control-plane process.
    pub fn control_pid(&self) -> Option<u32> {
        self.control.as_ref().map(Child::id)
    }

    /// `kill -9` the worker.
    pub fn kill_worker(&mut self) {
        if let Some(mut c) = self.worker.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (up to `timeout`) for the worker to exit on its own; returns its status.
    pub fn wait_worker_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let c = self.worker.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.worker = None;
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the control plane.
    pub fn kill_control(&mut self) {
        if let Some(mut c) = self.control.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the control plane and wait (up to 20 s) for it to exit; returns its status.
    pub fn stop_control(&mut self) -> Option<ExitStatus> {
        let mut c = self.control.take()?;
        stop_child(&mut c, Duration::from_secs(20))
    }

    /// SIGTERM the worker and wait (up to 20 s) for it to exit; returns its status.
    pub fn stop_worker(&mut self) -> Option<ExitStatus> {
        let mut c = self.worker.take()?;
        stop_child(&mut c, Duration::from_secs(20))
    }

    /// Both logs' tails, for assertion messages.
    /// The whole log of the current control plane (`up`) process.
    pub fn control_log(&self) -> String {
        fs::read_to_string(self.log("control", self.control_starts)).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- control log:\n{}\n--- worker log:\n{}",
            tail(&self.log("control", self.control_starts), 40),
            tail(&self.log("worker", self.worker_starts), 40)
        )
    }

    /// Runs the CLI with `IRONLAB_SERVER`/`IRONLAB_TOKEN` set to this platform.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_token(&self.token(), args)
    }

    /// Runs the CLI with a given API token.
    pub fn cli_with_token(&self, token: &str, args: &[&str]) -> Output {
        let mut cmd = self.cli_command(token);
        cmd.args(args);
        run_with_timeout(cmd, CLI_TIMEOUT)
    }

    /// A CLI `Command` with this platform's environment (not yet run).
    pub fn cli_command(&self, token: &str) -> Command {
        let mut cmd = Command::new(bin());
        cmd.env("IRONLAB_SERVER", self.server())
            .env("IRONLAB_TOKEN", token)
            .env("XDG_CONFIG_HOME", self.dir.path().join("cli-config"))
            .env("HOME", self.dir.path())
            .env_remove("RUST_LOG");
        cmd
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "`ironlab {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `manifest` to a file and runs `playground create -f FILE`.
    pub fn create_playground(&self, manifest: &str) -> Output {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = self.dir.path().join(format!(
            "manifest-{}.yaml",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&path, manifest).expect("write the manifest file");
        self.cli(&["playground", "create", "-f", &path.to_string_lossy()])
    }

    /// `playground start NAME -o json`; returns the printed object (asserting success).
    pub fn start_run(&mut self, playground: &str) -> Value {
        let out = self.cli(&["playground", "start", playground, "-o", "json"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Option<Value> = serde_json::from_str(stdout.trim()).ok();
        if let Some(id) = v.as_ref().and_then(|v| v["id"].as_str()) {
            self.track(id);
        }
        assert!(
            out.status.success(),
            "`ironlab playground start {playground} -o json` failed ({}):\nstdout: {stdout}\nstderr: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        v.unwrap_or_else(|| panic!("`playground start -o json` printed no JSON object: {stdout:?}"))
    }

    /// Remembers a run id for cleanup.
    pub fn track(&mut self, run: &str) {
        if !self.runs.iter().any(|r| r == run) {
            self.runs.push(run.to_string());
        }
    }

    /// `GET /api/v1/runs/{run}` → the run object.
    pub fn run_view(&self, run: &str) -> Value {
        let r = http(
            "GET",
            &self.api(&format!("/runs/{run}")),
            Some(&self.token()),
            None,
        );
        assert_eq!(r.status, 200, "GET /api/v1/runs/{run}: {}", r.body);
        r.json()
    }

    /// Waits (bounded) until the run's state is one of `states`; returns the run object.
    pub fn wait_state(&self, run: &str, states: &[&str], timeout: Duration) -> Value {
        let url = self.api(&format!("/runs/{run}?wait=5"));
        let token = self.token();
        let mut last = Value::Null;
        let got = wait_for(timeout, Duration::from_millis(100), || {
            let r = try_http("GET", &url, Some(&token), None).ok()?;
            if r.status != 200 {
                return None;
            }
            last = r.json();
            let st = last["state"].as_str()?;
            states.contains(&st).then(|| last.clone())
        });
        got.unwrap_or_else(|| {
            panic!(
                "run {run} did not reach {states:?} within {timeout:?}; last seen: {last}\n{}",
                self.logs()
            )
        })
    }

    /// `ironlab ssh RUN -- ARGS…` → Output.
    pub fn ssh(&self, run: &str, args: &[&str]) -> Output {
        let mut all = vec!["ssh", run, "--"];
        all.extend_from_slice(args);
        self.cli(&all)
    }

    /// `ironlab ssh RUN -- ARGS…`, requiring exit 0; returns stdout.
    pub fn ssh_ok(&self, run: &str, args: &[&str]) -> String {
        let out = self.ssh(run, args);
        assert!(
            out.status.success(),
            "`ironlab ssh {run} -- {}` failed ({}):\nstdout: {}\nstderr: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Destroys a run through the CLI and waits until the API says `destroyed`.
    pub fn destroy(&self, run: &str) {
        self.cli_ok(&["playground", "destroy", run]);
        self.wait_state(run, &["destroyed"], Duration::from_secs(120));
    }

    /// The worker's directory for a run.
    pub fn run_dir(&self, run: &str) -> PathBuf {
        self.data.join("worker/pool/runs").join(run)
    }

    /// The worker data dir of worker `name` (`local`: the first one).
    pub fn worker_dir(&self, name: &str) -> PathBuf {
        match name {
            "local" => self.data.join("worker"),
            other => self.data.join(format!("worker-{other}")),
        }
    }

    /// Starts one more worker (`ironlab worker`, same token, data dir `DATA/worker-NAME`) and
    /// restarts the control plane with it in its `--worker-url` list (`NAME=URL`; the first
    /// worker is then `local`). Not for `up` platforms.
    pub fn add_worker(&mut self, name: &str) {
        assert!(!self.up, "`ironlab up` has one worker");
        let port = free_port();
        let child = self.spawn_worker_at(name, port, "");
        self.extra_workers
            .push((name.to_string(), port, Some(child)));
        if self.control.is_some() {
            let status = self.stop_control().expect("control plane was running");
            assert!(
                status.success(),
                "control plane exit: {status}\n{}",
                self.logs()
            );
        }
        self.start_control();
    }

    /// Starts `ironlab worker` NAME on `port` (data dir `DATA/worker-NAME`, the platform's
    /// token) and waits until it answers; `tag` tells its logs apart.
    fn spawn_worker_at(&self, name: &str, port: u16, tag: &str) -> Child {
        let log = self.dir.path().join(format!("worker-{name}{tag}.log"));
        let args = vec![
            "worker".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--data-dir".into(),
            self.worker_dir(name).to_string_lossy().into_owned(),
            "--token-file".into(),
            self.worker_token_file().to_string_lossy().into_owned(),
        ];
        let child = self.spawn(&args, &log);
        let url = format!("http://127.0.0.1:{port}/v1/status");
        let ok = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
            try_http("GET", &url, None, None).ok()
        });
        assert!(
            ok.is_some(),
            "worker {name} did not answer {url} within 60 s:\n{}",
            tail(&log, 40)
        );
        child
    }

    /// SIGTERM the extra worker `name`; returns its status.
    pub fn stop_extra_worker(&mut self, name: &str) -> Option<ExitStatus> {
        let w = self.extra_workers.iter_mut().find(|w| w.0 == name)?;
        let mut c = w.2.take()?;
        stop_child(&mut c, Duration::from_secs(20))
    }

    /// Starts the extra worker `name` again (same port and data dir).
    pub fn restart_extra_worker(&mut self, name: &str) {
        let idx = self
            .extra_workers
            .iter()
            .position(|w| w.0 == name)
            .expect("a worker added with add_worker");
        let child = self.spawn_worker_at(name, self.extra_workers[idx].1, "-again");
        self.extra_workers[idx].2 = Some(child);
    }

    /// Everything a run could leave on the host; empty = nothing.
    pub fn leftovers(&self, run: &str) -> Vec<String> {
        leftovers(run, &self.run_dir(run))
    }

    /// Asserts the host holds nothing of `run` (waits up to 10 s for asynchronous teardown).
    pub fn assert_clean(&self, run: &str) {
        self.assert_clean_on(run, "local");
    }

    /// [`Platform::assert_clean`] for a run of worker `worker` ([`Platform::add_worker`]).
    pub fn assert_clean_on(&self, run: &str, worker: &str) {
        let run_dir = self.worker_dir(worker).join("pool/runs").join(run);
        let mut left = Vec::new();
        let clean = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
            left = leftovers(run, &run_dir);
            left.is_empty().then_some(())
        });
        assert!(
            clean.is_some(),
            "run {run} left things on the host after destroy:\n  {}\n{}",
            left.join("\n  "),
            self.logs()
        );
    }
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Container ids (crun and runc, default roots) that mention `needle`.
fn containers_matching(needle: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for rt in ["crun", "runc"] {
        if which(rt).is_none() {
            continue;
        }
        for line in sh(rt, &["list", "-q"]).lines() {
            let id = line.trim();
            if !id.is_empty() && id.contains(needle) {
                found.push((rt.to_string(), id.to_string()));
            }
        }
    }
    found
}

/// Mount points (from /proc/self/mountinfo) whose path contains `needle`, deepest first.
fn mounts_matching(needle: &str) -> Vec<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount)
        .filter(|m| m.contains(needle))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v.dedup();
    v
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Loop devices (name, backing file) whose backing file contains `needle`.
fn loops_matching(needle: &str) -> Vec<(String, String)> {
    sh("losetup", &["-l", "-n", "-O", "NAME,BACK-FILE"])
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?.to_string();
            let back = it.collect::<Vec<_>>().join(" ");
            back.contains(needle).then_some((name, back))
        })
        .collect()
}

/// Cgroup directories (any hierarchy) whose name contains `needle`.
fn cgroups_matching(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(hier) = fs::read_dir("/sys/fs/cgroup") else {
        return found;
    };
    for h in hier.flatten() {
        // Containers sit at most a few levels down; bound the walk.
        let mut stack = vec![(h.path(), 0u32)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let p = e.path();
                if e.file_name().to_string_lossy().contains(needle) {
                    found.push(p.display().to_string());
                } else if depth < 3 {
                    stack.push((p, depth + 1));
                }
            }
        }
    }
    found
}

/// What `run` left on the host: netns, containers, cgroups, mounts, loop devices, its run dir.
pub fn leftovers(run: &str, run_dir: &Path) -> Vec<String> {
    let mut left = Vec::new();
    let netns = format!("il-{run}");
    if Path::new("/run/netns").join(&netns).exists()
        || sh("ip", &["netns", "list"])
            .split_whitespace()
            .any(|n| n == netns)
    {
        left.push(format!("network namespace {netns}"));
    }
    for ns in machine_netns(run) {
        left.push(format!("network namespace {ns}"));
    }
    for pid in resolvers(run) {
        left.push(format!("resolver (dnsmasq) pid {pid}"));
    }
    for (rt, id) in containers_matching(run) {
        left.push(format!("{rt} container {id}"));
    }
    for pid in qemus_matching(run) {
        left.push(format!("QEMU process {pid}"));
    }
    for cg in cgroups_matching(run) {
        left.push(format!("cgroup {cg}"));
    }
    for m in mounts_matching(run) {
        left.push(format!("mount {m}"));
    }
    for (dev, back) in loops_matching(run) {
        left.push(format!("loop device {dev} backed by {back}"));
    }
    if run_dir.exists() {
        left.push(format!("run directory {}", run_dir.display()));
    }
    left
}

/// The machines' network namespaces of a run (`ilm-<run>-<machine>`).
fn machine_netns(run: &str) -> Vec<String> {
    let prefix = format!("ilm-{run}-");
    fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Pids of the run's resolver (a dnsmasq whose configuration lives in the run's `_net/`).
fn resolvers(run: &str) -> Vec<u32> {
    let needle = format!("/{run}/_net/dnsmasq.conf");
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let pid: u32 = e.file_name().to_str()?.parse().ok()?;
                    let cmd = fs::read(e.path().join("cmdline")).ok()?;
                    String::from_utf8_lossy(&cmd)
                        .contains(&needle)
                        .then_some(pid)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// QEMU processes of the microVMs of `run` (QEMU's `-name guest=il-<run>-<machine>`).
pub fn qemus_matching(run: &str) -> Vec<u32> {
    let want = format!("guest=il-{run}-");
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Ok(c) = fs::read(e.path().join("cmdline"))
                && String::from_utf8_lossy(&c).contains(&want)
            {
                found.push(pid);
            }
        }
    }
    found
}

/// Removes whatever a run left (best effort, for `Drop`).
pub fn scrub_run(run: &str) {
    for (rt, id) in containers_matching(run) {
        quiet(&rt, &["kill", &id, "KILL"]);
        quiet(&rt, &["delete", "-f", &id]);
    }
    for pid in qemus_matching(run) {
        quiet("kill", &["-9", &pid.to_string()]);
    }
    for m in mounts_matching(run) {
        quiet("umount", &["-l", &m]);
    }
    for (dev, _) in loops_matching(run) {
        quiet("losetup", &["-d", &dev]);
    }
    for pid in resolvers(run) {
        quiet("kill", &[&pid.to_string()]);
    }
    quiet("ip", &["netns", "delete", &format!("il-{run}")]);
    for ns in machine_netns(run) {
        quiet("ip", &["netns", "delete", &ns]);
    }
    for cg in cgroups_matching(run) {
        rmdir_tree(Path::new(&cg), 0);
    }
}

/// Removes an (empty) cgroup directory tree, children first; cgroup files cannot be unlinked,
/// only their directories removed.
fn rmdir_tree(dir: &Path, depth: u32) {
    if depth < 4
        && let Ok(rd) = fs::read_dir(dir)
    {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path(), depth + 1);
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes what a worker with data dir `data` could have left: every run it knew of (`runs`,
/// plus the run dirs under `data/worker/pool/runs`), then any mount or loop device under `data`.
/// Reports leftovers on stderr. Call it after the processes are gone.
pub fn scrub_data_dir(data: &Path, runs: &[String]) {
    let mut runs = runs.to_vec();
    if let Ok(rd) = fs::read_dir(data.join("worker/pool/runs")) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !runs.contains(&name) {
                runs.push(name);
            }
        }
    }
    for run in &runs {
        let left = leftovers(run, &data.join("worker/pool/runs").join(run));
        if !left.is_empty() {
            eprintln!("cleanup: run {run} left: {}", left.join(", "));
        }
        scrub_run(run);
    }
    let data = data.to_string_lossy().into_owned();
    for m in mounts_matching(&data) {
        quiet("umount", &["-l", &m]);
    }
    for (dev, _) in loops_matching(&data) {
        quiet("losetup", &["-d", &dev]);
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        // 1. Destroy runs through the API while both processes live.
        if self.control.is_some()
            && (self.worker.is_some() || self.up)
            && let Some(token) = self.token.clone()
        {
            if let Ok(r) = try_http("GET", &self.api("/runs"), Some(&token), None)
                && let Ok(Value::Array(runs)) = serde_json::from_str::<Value>(&r.body)
            {
                for run in runs {
                    if let Some(id) = run["id"].as_str() {
                        self.track(id);
                    }
                }
            }
            for run in self.runs.clone() {
                let url = self.api(&format!("/runs/{run}"));
                let _ = try_http("DELETE", &url, Some(&token), None);
            }
            for run in self.runs.clone() {
                let url = self.api(&format!("/runs/{run}?wait=5"));
                let _ = wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
                    let r = try_http("GET", &url, Some(&token), None).ok()?;
                    let v: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
                    (r.status == 404 || v["state"] == "destroyed").then_some(())
                });
            }
        }
        if panicking {
            eprintln!("{}", self.logs());
        }
        // 2. Stop the processes.
        let extra: Vec<Child> = self
            .extra_workers
            .iter_mut()
            .filter_map(|w| w.2.take())
            .collect();
        for c in [self.control.take(), self.worker.take()]
            .into_iter()
            .flatten()
            .chain(extra)
        {
            let mut c = c;
            stop_child(&mut c, Duration::from_secs(10));
        }
        // 3. Remove what the worker could have left: per run, then anything under the data dir.
        scrub_data_dir(&self.data, &self.runs);
    }
}
