//! Exec sessions: one child process per `Exec` stream.
//!
//! Who talks to whom, per session:
//! - reader tasks (stdout + stderr pipes, or the PTY master) → a bounded output channel → the gRPC
//!   response stream. The channel is small, so a flooding child (`yes`) blocks on its pipe
//!   instead of the agent buffering without bound;
//! - an input task reads the client's messages: stdin (to a writer task, or the PTY), resize,
//!   signals (to the child's process group, or the terminal's foreground group);
//! - the supervisor waits for the child, lets the readers drain, sends exactly one `exit`, and
//!   ends the stream. If the client goes away first, it hangs up the process group (SIGHUP, then
//!   SIGKILL after [`KILL_GRACE`]).
//!
//! The child runs in its own session (`setsid`), so its process group id is its pid; with a PTY,
//! the slave is its controlling terminal (TIOCSCTTY).
#![allow(unsafe_code)]

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ironlab_api::agent::{ExecInput, ExecOutput, ExecStart, Exit, exec_input, exec_output};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt};

use crate::pty::{Pty, PtyReader};
use crate::users::{Identity, UserDb, UserError};
use crate::{ROOT_PATH, USER_PATH};

/// Largest output chunk sent in one message.
pub const CHUNK_SIZE: usize = 32 * 1024;
/// Output messages queued per session before readers (and so the child) are held back.
pub const OUTPUT_QUEUE: usize = 8;
/// After the child exits, output is drained until end of file, or until no output came for this
/// long (a background process may hold the pipe or terminal open).
pub const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// Time between SIGHUP and SIGKILL when the client went away.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// `TERM` of PTY sessions when the request names none.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// How long a session waits for a systemd guest's manager ([`wait_for_init`]).
pub const INIT_WAIT: Duration = Duration::from_secs(20);

/// In a machine whose PID 1 is systemd (a microVM: the agent answers before systemd is up),
/// waits until the manager listens on `/run/systemd/private`, at most [`INIT_WAIT`], so that a
/// session's first `systemctl` works instead of failing with "Failed to connect to bus" (and
/// PAM's sudo is not slowed by the boot). Returns at once elsewhere (a container's PID 1 is
/// the agent).
pub async fn wait_for_init() {
    // sd_booted()'s test, plus PID 1's name: right after the initramfs execs `/sbin/init`,
    // PID 1 is still called `init` until systemd renames itself (the initramfs creates
    // /run/systemd/system for the agent's unit before it starts the agent). A container's
    // PID 1 is the agent, whatever its /run holds.
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let systemd =
        Path::new("/run/systemd/system").is_dir() && matches!(pid1.trim(), "systemd" | "init");
    if !systemd {
        return;
    }
    let deadline = tokio::time::Instant::now() + INIT_WAIT;
    while !Path::new("/run/systemd/private").exists() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Errors that keep a session from starting.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The user could not be resolved.
    #[error(transparent)]
    User(#[from] UserError),
    /// The requested working directory is missing.
    #[error("working directory {0} does not exist")]
    NoCwd(PathBuf),
    /// The agent is not root and cannot switch to another user.
    #[error("the agent runs as uid {agent} and cannot run a process as {user}")]
    NotRoot {
        /// The agent's effective uid.
        agent: u32,
        /// The requested user.
        user: String,
    },
    /// No PTY could be allocated.
    #[error("cannot allocate a PTY")]
    Pty(#[source] io::Error),
    /// The process could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What to run, resolved from an [`ExecStart`] and the machine's user database.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Program path or name (looked up in the child's `PATH`).
    pub program: String,
    /// `argv[0]` when it differs from `program` (login shells: `-bash`).
    pub argv0: Option<String>,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// The whole environment of the child.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Credentials to switch to (None: keep the agent's).
    pub creds: Option<Creds>,
    /// Allocate a PTY.
    pub tty: bool,
    /// Initial PTY size.
    pub cols: u32,
    /// Initial PTY size.
    pub rows: u32,
}

/// Credentials applied in the child before `exec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creds {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// All group ids (for `setgroups`).
    pub groups: Vec<libc::gid_t>,
}

/// Resolves a start request: user, environment, program (the login shell for an empty argv),
/// working directory.
pub fn plan(db: &UserDb, start: &ExecStart) -> Result<Plan, ExecError> {
    let id = db.resolve(&start.user)?;
    let (program, argv0, args) = match start.argv.split_first() {
        Some((program, args)) => (program.clone(), None, args.to_vec()),
        None => {
            let shell = if is_executable(&db.path(&id.shell.to_string_lossy())) {
                id.shell.clone()
            } else {
                PathBuf::from("/bin/sh")
            };
            let base = shell
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            (
                shell.to_string_lossy().into_owned(),
                Some(format!("-{base}")),
                Vec::new(),
            )
        }
    };
    let cwd = if start.cwd.is_empty() {
        let home = db.path(&id.home.to_string_lossy());
        if home.is_dir() { home } else { db.path("/") }
    } else {
        let cwd = db.path(&start.cwd);
        if !cwd.is_dir() {
            return Err(ExecError::NoCwd(PathBuf::from(&start.cwd)));
        }
        cwd
    };
    let term = if start.term.is_empty() {
        DEFAULT_TERM.to_string()
    } else {
        start.term.clone()
    };
    let env = environment(&id, start.tty.then_some(term.as_str()), &start.env);
    Ok(Plan {
        program,
        argv0,
        args,
        env,
        cwd,
        creds: creds_for(&id)?,
        tty: start.tty,
        cols: start.cols,
        rows: start.rows,
    })
}

/// The login-like environment of a user, `extra` last (it may override anything).
pub fn environment<'a>(
    id: &Identity,
    term: Option<&str>,
    extra: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("HOME".into(), id.home.to_string_lossy().into_owned()),
        ("USER".into(), id.name.clone()),
        ("LOGNAME".into(), id.name.clone()),
        ("SHELL".into(), id.shell.to_string_lossy().into_owned()),
        (
            "PATH".into(),
            if id.uid == 0 { ROOT_PATH } else { USER_PATH }.into(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    if let Some(term) = term {
        env.push(("TERM".into(), term.into()));
    }
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

fn creds_for(id: &Identity) -> Result<Option<Creds>, ExecError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid == 0 {
        Ok(Some(Creds {
            uid: id.uid,
            gid: id.gid,
            groups: id.groups.clone(),
        }))
    } else if euid == id.uid {
        Ok(None)
    } else {
        Err(ExecError::NotRoot {
            agent: euid,
            user: id.name.clone(),
        })
    }
}

/// Runs in the child between fork and exec: own session, controlling terminal, credentials.
fn child_setup(tty: bool, creds: Option<&Creds>) -> io::Result<()> {
    // SAFETY: this runs in the forked child before exec; it makes only async-signal-safe
    // syscalls and does not allocate. `groups` is a live slice for the `setgroups` call.
    unsafe {
        if libc::setsid() == -1 {
            return Err(io::Error::last_os_error());
        }
        if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
            return Err(io::Error::last_os_error());
        }
        if let Some(c) = creds
            && (libc::setgroups(c.groups.len() as _, c.groups.as_ptr()) == -1
                || libc::setgid(c.gid) == -1
                || libc::setuid(c.uid) == -1)
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

enum Io {
    Pipes(
        Option<ChildStdin>,
        tokio::process::ChildStdout,
        tokio::process::ChildStderr,
    ),
    Pty(Arc<Pty>),
}

/// Starts a session for `start` and returns its output. `input` is the rest of the client's
/// stream (after `start`); an `Err` item means the client went away. Must be called within a
/// tokio runtime.
///
/// A program that cannot be found (or executed) is not an error: the session reports it on
/// stderr and exits 127 (126), as a shell would.
pub fn spawn_session<S, E>(
    db: &UserDb,
    start: ExecStart,
    input: S,
) -> Result<mpsc::Receiver<ExecOutput>, ExecError>
where
    S: Stream<Item = Result<ExecInput, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let plan = plan(db, &start)?;
    let (out, rx) = mpsc::channel(OUTPUT_QUEUE);
    match spawn(&plan) {
        Ok((child, io)) => {
            tokio::spawn(supervise(child, io, input, out));
        }
        Err(ExecError::Spawn { program, source })
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::EACCES)) =>
        {
            let code = if source.raw_os_error() == Some(libc::ENOENT) {
                127
            } else {
                126
            };
            let reason = if code == 127 {
                "command not found"
            } else {
                "permission denied"
            };
            let nl = if plan.tty { "\r\n" } else { "\n" };
            let text = format!("ironlab-agent: {program}: {reason}{nl}").into_bytes();
            let kind = if plan.tty {
                exec_output::Kind::Stdout(text)
            } else {
                exec_output::Kind::Stderr(text)
            };
            tokio::spawn(async move {
                let _ = out.send(ExecOutput { kind: Some(kind) }).await;
                let _ = out.send(exit_message(Exit { code, signal: 0 })).await;
            });
        }
        Err(e) => return Err(e),
    }
    Ok(rx)
}

fn spawn(plan: &Plan) -> Result<(Child, Io), ExecError> {
    let mut cmd = Command::new(&plan.program);
    if let Some(argv0) = &plan.argv0 {
        cmd.arg0(argv0);
    }
    cmd.args(&plan.args)
        .env_clear()
        .envs(plan.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&plan.cwd)
        .kill_on_drop(false);
    let pty = if plan.tty {
        let (pty, slave) = Pty::open(plan.cols, plan.rows).map_err(ExecError::Pty)?;
        let dup = |f: &std::fs::File| f.try_clone().map_err(ExecError::Pty);
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        Some(pty)
    } else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        None
    };
    let (tty, creds) = (plan.tty, plan.creds.clone());
    // SAFETY: `child_setup` only makes async-signal-safe syscalls (see there).
    unsafe {
        cmd.pre_exec(move || child_setup(tty, creds.as_ref()));
    }
    let spawned = cmd.spawn();
    // Closes the agent's copies of the PTY slave, so EOF (EIO) comes when the child's go.
    drop(cmd);
    let mut child = spawned.map_err(|source| ExecError::Spawn {
        program: plan.program.clone(),
        source,
    })?;
    let io = match pty {
        Some(pty) => Io::Pty(pty),
        None => {
            let missing = || ExecError::Spawn {
                program: plan.program.clone(),
                source: io::Error::other("child stdio pipes missing"),
            };
            let stdout = child.stdout.take().ok_or_else(missing)?;
            let stderr = child.stderr.take().ok_or_else(missing)?;
            Io::Pipes(child.stdin.take(), stdout, stderr)
        }
    };
    Ok((child, io))
}

/// What the input task acts on.
enum Control {
    Pipes {
        pgid: Pid,
        stdin: Option<mpsc::Sender<Vec<u8>>>,
    },
    Pty {
        pgid: Pid,
        pty: Arc<Pty>,
    },
}

impl Control {
    async fn stdin(&mut self, data: Vec<u8>) {
        match self {
            Control::Pipes { stdin, .. } => {
                if let Some(tx) = stdin
                    && tx.send(data).await.is_err()
                {
                    *stdin = None;
                }
            }
            Control::Pty { pty, .. } => {
                let _ = pty.write_all(&data).await;
            }
        }
    }

    /// Pipes: EOF on stdin. PTY: the terminal's EOF character (^D), as a user would type it.
    async fn close_stdin(&mut self) {
        match self {
            Control::Pipes { stdin, .. } => *stdin = None,
            Control::Pty { pty, .. } => {
                let _ = pty.write_all(&[0x04]).await;
            }
        }
    }

    fn resize(&self, cols: u32, rows: u32) {
        if let Control::Pty { pty, .. } = self {
            let _ = pty.resize(cols, rows);
        }
    }

    fn signal(&self, signal: i32) {
        let Ok(signal) = Signal::try_from(signal) else {
            return;
        };
        let group = match self {
            Control::Pipes { pgid, .. } => *pgid,
            Control::Pty { pgid, pty } => pty.foreground_group().unwrap_or(*pgid),
        };
        kill_group(group, signal);
    }
}

/// Signals a process group; never group 0 or below (that would be the agent's own).
fn kill_group(group: Pid, signal: Signal) {
    if group.as_raw() > 0 {
        let _ = killpg(group, signal);
    }
}

async fn input_loop<S, E>(mut input: S, mut ctl: Control, gone: oneshot::Sender<()>)
where
    S: Stream<Item = Result<ExecInput, E>> + Unpin,
{
    use exec_input::Kind;
    loop {
        match input.next().await {
            // The client finished sending: EOF for a pipe; a terminal stays open.
            None => {
                if matches!(ctl, Control::Pipes { .. }) {
                    ctl.close_stdin().await;
                }
                return;
            }
            Some(Err(_)) => {
                let _ = gone.send(());
                return;
            }
            Some(Ok(ExecInput { kind })) => match kind {
                Some(Kind::Stdin(data)) => ctl.stdin(data).await,
                Some(Kind::CloseStdin(true)) => ctl.close_stdin().await,
                Some(Kind::Resize(r)) => ctl.resize(r.cols, r.rows),
                Some(Kind::Signal(s)) => ctl.signal(s),
                Some(Kind::CloseStdin(false)) | Some(Kind::Start(_)) | None => {}
            },
        }
    }
}

async fn write_stdin(mut stdin: ChildStdin, mut rx: mpsc::Receiver<Vec<u8>>) {
    while let Some(data) = rx.recv().await {
        if stdin.write_all(&data).await.is_err() {
            break;
        }
    }
    // Dropping `stdin` closes the pipe: the child sees EOF.
}

/// Reads one chunk; once the child has exited, gives up after [`DRAIN_IDLE`] without output.
async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    exited: &mut watch::Receiver<bool>,
) -> Option<usize> {
    loop {
        if *exited.borrow_and_update() {
            return match tokio::time::timeout(DRAIN_IDLE, r.read(buf)).await {
                Ok(Ok(n)) if n > 0 => Some(n),
                _ => None,
            };
        }
        tokio::select! {
            res = r.read(buf) => return res.ok().filter(|n| *n > 0),
            changed = exited.changed() => if changed.is_err() { return None },
        }
    }
}

/// Reads what is available right now without waiting: `None` when a read would block.
async fn try_read_now<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<usize> {
    let mut rb = tokio::io::ReadBuf::new(buf);
    std::future::poll_fn(
        |cx| match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
            std::task::Poll::Pending => std::task::Poll::Ready(None),
            std::task::Poll::Ready(res) => std::task::Poll::Ready(res.ok()),
        },
    )
    .await
    .map(|()| rb.filled().len())
}

async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    stderr: bool,
    out: mpsc::Sender<ExecOutput>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    while let Some(mut n) = read_chunk(&mut r, &mut buf, &mut exited).await {
        // A PTY hands out at most a few KiB per read; take whatever else is already waiting so
        // a busy session sends fewer, larger messages (throughput), without ever waiting for
        // more (latency).
        while n < buf.len() {
            match try_read_now(&mut r, &mut buf[n..]).await {
                Some(m) if m > 0 => n += m,
                _ => break,
            }
        }
        let data = buf[..n].to_vec();
        let kind = if stderr {
            exec_output::Kind::Stderr(data)
        } else {
            exec_output::Kind::Stdout(data)
        };
        if out.send(ExecOutput { kind: Some(kind) }).await.is_err() {
            break;
        }
    }
}

fn exit_message(exit: Exit) -> ExecOutput {
    ExecOutput {
        kind: Some(exec_output::Kind::Exit(exit)),
    }
}

/// `code` is the exit status, or 128 + signal when killed by one.
pub fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit { code, signal: 0 },
        (None, Some(signal)) => Exit {
            code: 128 + signal,
            signal,
        },
        (None, None) => Exit {
            code: -1,
            signal: 0,
        },
    }
}

async fn supervise<S, E>(mut child: Child, io: Io, input: S, out: mpsc::Sender<ExecOutput>)
where
    S: Stream<Item = Result<ExecInput, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let pgid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));
    let (exited_tx, exited_rx) = watch::channel(false);
    let mut readers = Vec::new();
    let (ctl, pty) = match io {
        Io::Pipes(stdin, stdout, stderr) => {
            readers.push(tokio::spawn(pump(
                stdout,
                false,
                out.clone(),
                exited_rx.clone(),
            )));
            readers.push(tokio::spawn(pump(
                stderr,
                true,
                out.clone(),
                exited_rx.clone(),
            )));
            let stdin = stdin.map(|stdin| {
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(write_stdin(stdin, rx));
                tx
            });
            (Control::Pipes { pgid, stdin }, None)
        }
        Io::Pty(pty) => {
            let reader = PtyReader(pty.clone());
            readers.push(tokio::spawn(pump(reader, false, out.clone(), exited_rx)));
            (
                Control::Pty {
                    pgid,
                    pty: pty.clone(),
                },
                Some(pty),
            )
        }
    };
    let (gone_tx, mut gone_rx) = oneshot::channel();
    let input_task = tokio::spawn(input_loop(input, ctl, gone_tx));

    let status = tokio::select! {
        status = child.wait() => Some(status),
        _ = out.closed() => None,
        Ok(()) = &mut gone_rx => None,
    };
    match status {
        Some(status) => {
            let _ = exited_tx.send(true);
            for reader in readers {
                let _ = reader.await;
            }
            input_task.abort();
            let exit = match status {
                Ok(status) => exit_of(status),
                Err(_) => Exit {
                    code: -1,
                    signal: 0,
                },
            };
            let _ = out.send(exit_message(exit)).await;
        }
        None => {
            // The client went away: hang up the session, then make sure.
            input_task.abort();
            let groups = [Some(pgid), pty.as_ref().and_then(|p| p.foreground_group())];
            for g in groups.iter().flatten() {
                kill_group(*g, Signal::SIGHUP);
            }
            if tokio::time::timeout(KILL_GRACE, child.wait())
                .await
                .is_err()
            {
                for g in groups.iter().flatten() {
                    kill_group(*g, Signal::SIGKILL);
                }
                let _ = child.wait().await;
            }
            for reader in readers {
                reader.abort();
            }
        }
    }
}

/// Whether a path is an executable file (used to pick shells and tools).
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn id() -> Identity {
        Identity {
            name: "alice".into(),
            uid: 1001,
            gid: 1001,
            groups: vec![1001],
            home: "/home/alice".into(),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn login_environment() {
        let extra: HashMap<String, String> = [
            ("FOO".to_string(), "bar".to_string()),
            ("LANG".into(), "de_DE.UTF-8".into()),
        ]
        .into();
        let env: HashMap<_, _> = environment(&id(), Some("vt100"), &extra)
            .into_iter()
            .collect();
        assert_eq!(env["HOME"], "/home/alice");
        assert_eq!(env["USER"], "alice");
        assert_eq!(env["LOGNAME"], "alice");
        assert_eq!(env["SHELL"], "/bin/bash");
        assert_eq!(env["PATH"], USER_PATH);
        assert_eq!(env["TERM"], "vt100");
        assert_eq!(env["FOO"], "bar");
        assert_eq!(env["LANG"], "de_DE.UTF-8", "request env overrides");
        let root = Identity { uid: 0, ..id() };
        let env: HashMap<_, _> = environment(&root, None, &HashMap::new())
            .into_iter()
            .collect();
        assert!(env["PATH"].contains("/usr/sbin"));
        assert!(!env.contains_key("TERM"));
    }

    #[test]
    fn exit_codes() {
        assert_eq!(
            exit_of(ExitStatus::from_raw(3 << 8)),
            Exit { code: 3, signal: 0 }
        );
        assert_eq!(
            exit_of(ExitStatus::from_raw(2)),
            Exit {
                code: 130,
                signal: 2
            }
        );
    }

    #[test]
    fn empty_argv_is_a_login_shell() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("etc")).expect("etc");
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin");
        std::fs::write(dir.path().join("bin/sh"), "").expect("sh");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/zsh\n",
        )
        .expect("passwd");
        let db = UserDb::new(dir.path());
        let p = plan(&db, &ExecStart::default()).expect("plan");
        // /bin/zsh is not in this root: falls back to /bin/sh; /root is missing: cwd = /.
        assert_eq!(p.program, "/bin/sh");
        assert_eq!(p.argv0.as_deref(), Some("-sh"));
        assert!(p.args.is_empty());
        assert_eq!(p.cwd, dir.path());
        let err = plan(
            &db,
            &ExecStart {
                argv: vec!["true".into()],
                cwd: "/nope".into(),
                ..Default::default()
            },
        )
        .expect_err("cwd");
        assert!(matches!(err, ExecError::NoCwd(_)));
    }
}
