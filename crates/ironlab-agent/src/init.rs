//! `ironlab-agent init`: a tiny PID 1.
//!
//! Who talks to whom: the OCI runtime (or the microVM's kernel) starts `init` as PID 1; `init`
//! forks and execs `ironlab-agent serve` (the same binary: its path, else `/proc/self/exe`), then only
//! waits for signals: SIGCHLD → reap every zombie (`waitpid(-1)`, orphans included); SIGTERM,
//! SIGINT, SIGQUIT → forward to `serve` and exit with its status once it ends; SIGHUP, SIGUSR1,
//! SIGUSR2 → forward.
//!
//! `serve` runs the tokio runtime, whose child reaping must not race a `waitpid(-1)`: hence two
//! processes. If `serve` dies without being asked to, `init` starts it again (after a short
//! pause) so a crash of the agent does not take the machine and the student's processes with
//! it; after [`MAX_RESTARTS`] deaths within [`RESTART_WINDOW`] it gives up and exits with the
//! last status, and the runtime sees the machine stop.
//!
//! Not PID 1 (tests, debugging): `init` makes itself a child subreaper so orphans still come to
//! it.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::errno::Errno;
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, execve, fork};

/// `PATH` given to `serve` when the environment has none (and used for account tools).
pub const DEFAULT_PATH: &str = crate::ROOT_PATH;
/// Deaths of `serve` tolerated within [`RESTART_WINDOW`] before `init` gives up.
pub const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// Pause before restarting `serve`.
pub const RESTART_DELAY: Duration = Duration::from_millis(200);

const HANDLED: [Signal; 7] = [
    Signal::SIGCHLD,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn cstring(bytes: &[u8], what: &str) -> anyhow::Result<CString> {
    CString::new(bytes).with_context(|| format!("{what} contains a NUL byte"))
}

struct ServeCommand {
    exe: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
}

impl ServeCommand {
    fn new(socket: &Path, serial: Option<&Path>) -> anyhow::Result<Self> {
        // The real path keeps `ps` showing `ironlab-agent` (exec of /proc/self/exe shows `exe`);
        // /proc/self/exe still works when the file was replaced or deleted.
        let exe = match std::env::current_exe() {
            Ok(path) if path.is_file() => path.into_os_string(),
            _ if Path::new("/proc/self/exe").exists() => OsString::from("/proc/self/exe"),
            Ok(path) => path.into_os_string(),
            Err(e) => {
                return Err(e)
                    .context("cannot find the agent's own executable (is /proc mounted?)");
            }
        };
        let mut env: Vec<CString> = Vec::new();
        let mut has_path = false;
        for (k, v) in std::env::vars_os() {
            has_path |= k == "PATH";
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(cstring(&kv, "an environment variable")?);
        }
        if !has_path {
            env.push(cstring(format!("PATH={DEFAULT_PATH}").as_bytes(), "PATH")?);
        }
        let mut argv = vec![
            cstring(b"ironlab-agent", "argv")?,
            cstring(b"serve", "argv")?,
            cstring(b"--socket", "argv")?,
            cstring(socket.as_os_str().as_bytes(), "the socket path")?,
        ];
        if let Some(serial) = serial {
            argv.push(cstring(b"--serial", "argv")?);
            argv.push(cstring(serial.as_os_str().as_bytes(), "the serial path")?);
        }
        Ok(ServeCommand {
            exe: cstring(exe.as_bytes(), "the executable path")?,
            argv,
            env,
        })
    }

    fn spawn(&self) -> anyhow::Result<Pid> {
        // SAFETY: `init` is single-threaded (no runtime has been started), so the child may do
        // anything; it only resets its signal mask and execs.
        match unsafe { fork() }.context("cannot fork the agent server")? {
            ForkResult::Parent { child } => Ok(child),
            ForkResult::Child => {
                let _ = SigSet::empty().thread_set_mask();
                let err = execve(&self.exe, &self.argv, &self.env).err();
                eprintln!("ironlab-agent init: cannot exec {:?}: {err:?}", self.exe);
                // SAFETY: `_exit` ends the forked child without running the parent's destructors.
                unsafe { libc::_exit(127) }
            }
        }
    }
}

fn status_code(status: WaitStatus) -> Option<(Pid, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid, code)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as i32)),
        _ => None,
    }
}

/// Runs the init loop serving on `socket` (and the serial port `serial`, in microVMs); returns
/// the exit code for the process.
pub fn run(socket: &Path, serial: Option<&Path>) -> anyhow::Result<i32> {
    let cmd = ServeCommand::new(socket, serial)?;
    let mut signals = SigSet::empty();
    for s in HANDLED {
        signals.add(s);
    }
    signals
        .thread_block()
        .context("cannot block signals in init")?;
    if nix::unistd::getpid().as_raw() != 1 {
        nix::sys::prctl::set_child_subreaper(true).context("cannot become a child subreaper")?;
    }
    let mut child = cmd.spawn()?;
    let mut stopping = false;
    let mut deaths: VecDeque<Instant> = VecDeque::new();
    loop {
        let sig = signals.wait().context("sigwait failed in init")?;
        if sig != Signal::SIGCHLD {
            stopping |= matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT);
            let _ = kill(child, sig);
            continue;
        }
        // Reap everything that is dead; note whether it was the server.
        let mut server_exit = None;
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    eprintln!("ironlab-agent init: waitpid failed: {e}");
                    break;
                }
                Ok(status) => {
                    if let Some((pid, code)) = status_code(status)
                        && pid == child
                    {
                        server_exit = Some(code);
                    }
                }
            }
        }
        let Some(code) = server_exit else {
            continue;
        };
        if stopping {
            return Ok(code);
        }
        let now = Instant::now();
        deaths.push_back(now);
        while deaths
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            deaths.pop_front();
        }
        if deaths.len() >= MAX_RESTARTS {
            eprintln!(
                "ironlab-agent init: the agent server died {} times within {:?} (last status {code}); giving up",
                deaths.len(),
                RESTART_WINDOW
            );
            return Ok(code);
        }
        eprintln!("ironlab-agent init: the agent server exited with status {code}; restarting");
        std::thread::sleep(RESTART_DELAY);
        child = cmd.spawn()?;
    }
}
