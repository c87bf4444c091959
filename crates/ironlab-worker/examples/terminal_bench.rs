//! Terminal-path benchmark client (driven by `bench/terminal.sh`).
//!
//! Measures, against a running `ironlab up` and one running run:
//! - keystroke echo round trip: one byte sent, the same byte back, through
//!   (a) the browser path: WebSocket client speaking the relay protocol → worker relay → agent
//!   gRPC → PTY in the machine (`stty raw -echo; exec cat`, so the echo comes from a process,
//!   as a shell's line editor does), with a token from the control plane for every connection;
//!   (b) the agent's gRPC directly (the worker's own hop, no relay);
//!   (c) a local PTY on the host (the floor);
//! - output throughput of `cat` of a 100 MiB text file through the same three paths, in
//!   `--rounds` interleaved rounds (relay, direct, local in each), reported as the median round
//!   per path with its min and max;
//! - the worker's RSS (`/proc/PID/status`) before, during (peak) and after the `cat`, and during
//!   a `yes` flood read slowly for 3 s.
//!
//! ```text
//! terminal_bench --server URL --token T --run RUN --worker-pid PID --agent-socket PATH
//!                [--machine M] [--keys 1000] [--mib 100] [--rounds 5] [--local-dir DIR]
//!                [--user laborant]
//! ```
//! Prints a human summary on stderr and `key=value` lines on stdout.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use ironlab_api::agent::exec_input::Kind as InKind;
use ironlab_api::agent::exec_output::Kind as OutKind;
use ironlab_api::agent::{ExecInput, ExecStart};
use ironlab_api::relay::{self as proto, ClientControl, ServerControl};
use ironlab_api::v1::ConnectResponse;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;

const ECHO_CMD: &str = "stty raw -echo; printf READY; exec cat";
const WARMUP: usize = 50;
const LINE: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ012345678\n";

struct Args {
    server: String,
    token: String,
    run: String,
    machine: Option<String>,
    worker_pid: u32,
    agent_socket: PathBuf,
    keys: usize,
    mib: u64,
    rounds: usize,
    local_dir: PathBuf,
    user: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut m: BTreeMap<String, String> = BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let Some(name) = k.strip_prefix("--") else {
            bail!("unexpected argument {k:?}");
        };
        let v = it
            .next()
            .with_context(|| format!("--{name} needs a value"))?;
        m.insert(name.to_string(), v);
    }
    let need = |k: &str| {
        m.get(k)
            .cloned()
            .with_context(|| format!("missing --{k} (see the file header)"))
    };
    Ok(Args {
        server: need("server")?,
        token: need("token")?,
        run: need("run")?,
        machine: m.get("machine").cloned(),
        worker_pid: need("worker-pid")?.parse().context("--worker-pid")?,
        agent_socket: PathBuf::from(need("agent-socket")?),
        keys: m
            .get("keys")
            .map_or(Ok(1000), |v| v.parse())
            .context("--keys")?,
        mib: m
            .get("mib")
            .map_or(Ok(100), |v| v.parse())
            .context("--mib")?,
        rounds: m
            .get("rounds")
            .map_or(Ok(5), |v| v.parse())
            .context("--rounds")?,
        local_dir: PathBuf::from(
            m.get("local-dir")
                .cloned()
                .unwrap_or_else(|| "/var/tmp".into()),
        ),
        user: m.get("user").cloned().unwrap_or_else(|| "laborant".into()),
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms while running; `peak()` is the highest seen.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            peak,
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    median_ms: f64,
    p99_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let n = v.len();
    let median = if n % 2 == 1 {
        ms(v[n / 2])
    } else {
        (ms(v[n / 2 - 1]) + ms(v[n / 2])) / 2.0
    };
    let p99 = ms(v[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1]);
    Stats {
        median_ms: median,
        p99_ms: p99,
        min_ms: ms(v[0]),
        max_ms: ms(v[n - 1]),
    }
}

fn key(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

// ---------------------------------------------------------------------------------------------
// The browser path: control plane token → WebSocket → relay → agent → PTY.

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Relay<'a> {
    args: &'a Args,
    http: reqwest::Client,
}

impl Relay<'_> {
    async fn connect(&self) -> anyhow::Result<Ws> {
        let mut body = serde_json::json!({});
        if let Some(m) = &self.args.machine {
            body = serde_json::json!({ "machine": m });
        }
        let r = self
            .http
            .post(format!(
                "{}/api/v1/runs/{}/connect",
                self.args.server, self.args.run
            ))
            .bearer_auth(&self.args.token)
            .json(&body)
            .send()
            .await
            .context("POST connect")?;
        if !r.status().is_success() {
            bail!(
                "connect: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        let conn: ConnectResponse = r.json().await.context("connect response")?;
        // Browsers disable Nagle on their sockets; so does this client.
        let (ws, _) = tokio_tungstenite::connect_async_with_config(conn.url.as_str(), None, true)
            .await
            .with_context(|| format!("WebSocket to {}", conn.url))?;
        Ok(ws)
    }

    async fn start(&self, command: &[&str], tty: bool) -> anyhow::Result<Ws> {
        let mut ws = self.connect().await?;
        let start = ClientControl::Start {
            command: command.iter().map(|s| s.to_string()).collect(),
            tty,
            cols: 200,
            rows: 50,
            env: BTreeMap::new(),
            term: Some("xterm-256color".into()),
            session: None,
        };
        ws.send(Message::Text(serde_json::to_string(&start)?.into()))
            .await?;
        Ok(ws)
    }

    /// Runs a command without a PTY to its end.
    async fn exec(&self, command: &[&str]) -> anyhow::Result<i32> {
        let mut ws = self.start(command, false).await?;
        ws.send(Message::Text(r#"{"type":"eof"}"#.into())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t)? {
                    ServerControl::Exit { code } => return Ok(code),
                    ServerControl::Error { message } => bail!("exec failed: {message}"),
                    ServerControl::Started { .. } => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => bail!("closed without exit"),
            }
        }
    }

    async fn read_data(ws: &mut Ws) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => {
                    if let Some((proto::STDOUT | proto::STDERR, d)) = proto::split_frame(&b) {
                        return Ok(Some(d.to_vec()));
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t)? {
                    ServerControl::Exit { .. } => return Ok(None),
                    ServerControl::Error { message } => bail!("session failed: {message}"),
                    ServerControl::Started { .. } => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(None),
            }
        }
    }

    async fn echo(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let mut ws = self.start(&["sh", "-c", ECHO_CMD], true).await?;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("READY") {
            let d = Self::read_data(&mut ws)
                .await?
                .context("ended before READY")?;
            seen.extend_from_slice(&d);
        }
        let mut rtts = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let c = key(i);
            let t0 = Instant::now();
            ws.send(Message::Binary(proto::frame(proto::STDIN, &[c]).into()))
                .await?;
            loop {
                let d = Self::read_data(&mut ws)
                    .await?
                    .context("ended during echo")?;
                if d.contains(&c) {
                    break;
                }
            }
            if i >= WARMUP {
                rtts.push(t0.elapsed());
            }
        }
        ws.send(Message::Text(r#"{"type":"signal","signal":9}"#.into()))
            .await?;
        while Self::read_data(&mut ws).await?.is_some() {}
        Ok(rtts)
    }

    /// `cat FILE` on a PTY; returns (elapsed, bytes received, data frames).
    async fn cat(&self, file: &str) -> anyhow::Result<(Duration, u64, u64)> {
        let t0 = Instant::now();
        let mut ws = self.start(&["cat", file], true).await?;
        let (mut bytes, mut frames) = (0u64, 0u64);
        while let Some(d) = Self::read_data(&mut ws).await? {
            bytes += d.len() as u64;
            frames += 1;
        }
        Ok((t0.elapsed(), bytes, frames))
    }

    /// `yes` on a PTY read slowly (one frame per 10 ms) for `secs`; returns bytes read.
    async fn slow_yes(&self, secs: u64) -> anyhow::Result<u64> {
        let mut ws = self.start(&["yes", "flood"], true).await?;
        let until = Instant::now() + Duration::from_secs(secs);
        let mut bytes = 0u64;
        while Instant::now() < until {
            if let Some(d) = Self::read_data(&mut ws).await? {
                bytes += d.len() as u64;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ws.send(Message::Text(r#"{"type":"signal","signal":9}"#.into()))
            .await?;
        while Self::read_data(&mut ws).await?.is_some() {}
        Ok(bytes)
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's gRPC directly (what the relay itself talks to).

struct Direct {
    socket: PathBuf,
    user: String,
}

impl Direct {
    async fn open(
        &self,
        argv: &[&str],
    ) -> anyhow::Result<(
        mpsc::Sender<ExecInput>,
        tonic::Streaming<ironlab_api::agent::ExecOutput>,
    )> {
        let mut client = ironlab_worker::agent_client::connect(&self.socket)
            .await
            .with_context(|| format!("agent at {}", self.socket.display()))?;
        let (tx, rx) = mpsc::channel(16);
        tx.send(ExecInput {
            kind: Some(InKind::Start(ExecStart {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                user: self.user.clone(),
                env: BTreeMap::new().into_iter().collect(),
                cwd: String::new(),
                tty: true,
                cols: 200,
                rows: 50,
                term: "xterm-256color".into(),
            })),
        })
        .await?;
        let out = client.exec(ReceiverStream::new(rx)).await?.into_inner();
        Ok((tx, out))
    }

    async fn read_data(
        out: &mut tonic::Streaming<ironlab_api::agent::ExecOutput>,
    ) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            match out.message().await? {
                Some(m) => match m.kind {
                    Some(OutKind::Stdout(d) | OutKind::Stderr(d)) => return Ok(Some(d)),
                    Some(OutKind::Exit(_)) => return Ok(None),
                    None => {}
                },
                None => return Ok(None),
            }
        }
    }

    async fn echo(&self, n: usize) -> anyhow::Result<Vec<Duration>> {
        let (tx, mut out) = self.open(&["sh", "-c", ECHO_CMD]).await?;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("READY") {
            let d = Self::read_data(&mut out)
                .await?
                .context("ended before READY")?;
            seen.extend_from_slice(&d);
        }
        let mut rtts = Vec::with_capacity(n);
        for i in 0..WARMUP + n {
            let c = key(i);
            let t0 = Instant::now();
            tx.send(ExecInput {
                kind: Some(InKind::Stdin(vec![c])),
            })
            .await?;
            loop {
                let d = Self::read_data(&mut out)
                    .await?
                    .context("ended during echo")?;
                if d.contains(&c) {
                    break;
                }
            }
            if i >= WARMUP {
                rtts.push(t0.elapsed());
            }
        }
        tx.send(ExecInput {
            kind: Some(InKind::Signal(9)),
        })
        .await?;
        while Self::read_data(&mut out).await?.is_some() {}
        Ok(rtts)
    }

    async fn cat(&self, file: &str) -> anyhow::Result<(Duration, u64, u64)> {
        let t0 = Instant::now();
        let (_tx, mut out) = self.open(&["cat", file]).await?;
        let (mut bytes, mut msgs) = (0u64, 0u64);
        while let Some(d) = Self::read_data(&mut out).await? {
            bytes += d.len() as u64;
            msgs += 1;
        }
        Ok((t0.elapsed(), bytes, msgs))
    }
}

// ---------------------------------------------------------------------------------------------
// A local PTY on the host (the floor).

fn local_pty(argv: &[&str]) -> anyhow::Result<(std::fs::File, std::process::Child)> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = std::process::Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    let child = cmd.spawn().with_context(|| format!("spawn {argv:?}"))?;
    drop(cmd);
    Ok((std::fs::File::from(pty.master), child))
}

fn local_echo(n: usize) -> anyhow::Result<Vec<Duration>> {
    let (mut master, mut child) = local_pty(&["sh", "-c", ECHO_CMD])?;
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("READY") {
        let k = master.read(&mut buf)?;
        if k == 0 {
            bail!("local pty ended before READY");
        }
        seen.extend_from_slice(&buf[..k]);
    }
    let mut rtts = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let c = key(i);
        let t0 = Instant::now();
        master.write_all(&[c])?;
        loop {
            let k = master.read(&mut buf)?;
            if k == 0 {
                bail!("local pty ended during echo");
            }
            if buf[..k].contains(&c) {
                break;
            }
        }
        if i >= WARMUP {
            rtts.push(t0.elapsed());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(rtts)
}

fn local_cat(file: &Path) -> anyhow::Result<(Duration, u64, u64)> {
    let t0 = Instant::now();
    let path = file.to_string_lossy().into_owned();
    let (mut master, mut child) = local_pty(&["cat", &path])?;
    let mut buf = vec![0u8; 64 * 1024];
    let (mut bytes, mut reads) = (0u64, 0u64);
    loop {
        match master.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => {
                bytes += k as u64;
                reads += 1;
            }
            // EIO: every slave end is closed (the child exited).
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => return Err(e.into()),
        }
    }
    child.wait()?;
    Ok((t0.elapsed(), bytes, reads))
}

fn write_text_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
    let mut left = bytes;
    while left > 0 {
        let n = left.min(LINE.len() as u64) as usize;
        f.write_all(&LINE[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// One path's `cat` rounds: the median round (time, wire bytes, chunks) and the spread.
struct CatStats {
    median: (Duration, u64, u64),
    mibps: f64,
    mibps_min: f64,
    mibps_max: f64,
}

impl CatStats {
    /// `runs` is not empty. With an even count the median is the slower of the middle two.
    fn of(mut runs: Vec<(Duration, u64, u64)>, size: u64) -> CatStats {
        runs.sort_by_key(|r| r.0);
        let median = runs[runs.len() / 2];
        CatStats {
            median,
            mibps: mibps(size, median.0),
            mibps_min: mibps(size, runs[runs.len() - 1].0),
            mibps_max: mibps(size, runs[0].0),
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let relay = Relay {
        args: &args,
        http: reqwest::Client::new(),
    };
    let direct = Direct {
        socket: args.agent_socket.clone(),
        user: args.user.clone(),
    };
    let size = args.mib << 20;
    let remote_file = "/tmp/ironlab-bench-cat";
    let local_file = args.local_dir.join("ironlab-bench-cat");

    eprintln!("terminal_bench: preparing {} MiB text files", args.mib);
    let make_file = format!(
        "yes {} | head -c {size} > {remote_file}",
        String::from_utf8_lossy(&LINE[..LINE.len() - 1])
    );
    let code = relay.exec(&["sh", "-c", &make_file]).await?;
    if code != 0 {
        bail!("creating {remote_file} in the machine failed ({code})");
    }
    write_text_file(&local_file, size)?;

    let rss_start = rss_kib(args.worker_pid);
    eprintln!("terminal_bench: {} keystrokes through the relay", args.keys);
    let echo_relay = stats(relay.echo(args.keys).await?);
    eprintln!(
        "terminal_bench: {} keystrokes to the agent directly",
        args.keys
    );
    let echo_direct = stats(direct.echo(args.keys).await?);
    eprintln!("terminal_bench: {} keystrokes on a local PTY", args.keys);
    let keys = args.keys;
    let echo_local = stats(tokio::task::spawn_blocking(move || local_echo(keys)).await??);

    if args.rounds == 0 || args.rounds > 100 {
        bail!("--rounds must be 1..100");
    }
    let rss_before = rss_kib(args.worker_pid);
    let mut rss_peak_cat = rss_before;
    let (mut relay_runs, mut direct_runs, mut local_runs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        eprintln!(
            "terminal_bench: round {round}/{}: cat {} MiB through the relay, from the agent \
             directly, on a local PTY",
            args.rounds, args.mib
        );
        let sampler = RssSampler::start(args.worker_pid);
        relay_runs.push(relay.cat(remote_file).await?);
        rss_peak_cat = rss_peak_cat.max(sampler.finish());
        direct_runs.push(direct.cat(remote_file).await?);
        let lf = local_file.clone();
        local_runs.push(tokio::task::spawn_blocking(move || local_cat(&lf)).await??);
    }
    let rss_after = rss_kib(args.worker_pid);
    let cat_relay = CatStats::of(relay_runs, size);
    let cat_direct = CatStats::of(direct_runs, size);
    let cat_local = CatStats::of(local_runs, size);

    eprintln!("terminal_bench: yes flood read slowly for 3 s through the relay");
    let sampler = RssSampler::start(args.worker_pid);
    let yes_bytes = relay.slow_yes(3).await?;
    let rss_peak_yes = sampler.finish();
    let rss_end = rss_kib(args.worker_pid);

    let _ = relay.exec(&["rm", "-f", remote_file]).await;
    let _ = std::fs::remove_file(&local_file);

    let out = [
        ("keys", keys.to_string()),
        (
            "echo_relay_median_ms",
            format!("{:.3}", echo_relay.median_ms),
        ),
        ("echo_relay_p99_ms", format!("{:.3}", echo_relay.p99_ms)),
        ("echo_relay_min_ms", format!("{:.3}", echo_relay.min_ms)),
        ("echo_relay_max_ms", format!("{:.3}", echo_relay.max_ms)),
        (
            "echo_direct_median_ms",
            format!("{:.3}", echo_direct.median_ms),
        ),
        ("echo_direct_p99_ms", format!("{:.3}", echo_direct.p99_ms)),
        ("echo_direct_min_ms", format!("{:.3}", echo_direct.min_ms)),
        ("echo_direct_max_ms", format!("{:.3}", echo_direct.max_ms)),
        (
            "echo_local_median_ms",
            format!("{:.3}", echo_local.median_ms),
        ),
        ("echo_local_p99_ms", format!("{:.3}", echo_local.p99_ms)),
        ("echo_local_min_ms", format!("{:.3}", echo_local.min_ms)),
        ("echo_local_max_ms", format!("{:.3}", echo_local.max_ms)),
        ("cat_mib", args.mib.to_string()),
        ("cat_rounds", args.rounds.to_string()),
        ("rss_start_kib", rss_start.to_string()),
        ("rss_before_cat_kib", rss_before.to_string()),
        ("rss_peak_cat_kib", rss_peak_cat.to_string()),
        ("rss_after_cat_kib", rss_after.to_string()),
        ("rss_peak_yes_kib", rss_peak_yes.to_string()),
        ("rss_end_kib", rss_end.to_string()),
        ("yes_slow_bytes", yes_bytes.to_string()),
    ];
    for (k, v) in out {
        println!("{k}={v}");
    }
    for (path, c) in [
        ("relay", &cat_relay),
        ("direct", &cat_direct),
        ("local", &cat_local),
    ] {
        println!("cat_{path}_s={:.3}", c.median.0.as_secs_f64());
        println!("cat_{path}_mibps={:.1}", c.mibps);
        println!("cat_{path}_mibps_min={:.1}", c.mibps_min);
        println!("cat_{path}_mibps_max={:.1}", c.mibps_max);
        println!("cat_{path}_wire_bytes={}", c.median.1);
        println!("cat_{path}_chunks={}", c.median.2);
    }
    Ok(())
}
