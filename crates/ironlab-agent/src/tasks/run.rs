//! Running one script of a task: the [`Executor`] trait and the real one, [`BashExecutor`].
//!
//! Each script runs as `bash -c SCRIPT` (`sh` when the machine has no bash) as the task's user,
//! with the login environment of [`crate::exec::environment`] plus the task's variables, in its
//! own process group (and its own session when it switches users). stdout and stderr are read concurrently and only the first
//! [`OUTPUT_CAP`] bytes of each are kept (the rest is read and dropped, so the script never blocks
//! on a full pipe). On timeout — or when the attempt is abandoned (task set replaced, agent
//! stopping) — the whole process group gets SIGKILL, grandchildren included.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use ironlab_api::agent::ExecStart;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::OUTPUT_CAP;
use crate::exec::{self, Creds, ExecError, Plan};
use crate::users::UserDb;

/// After the script exits, output is still read for this long (a background process may hold
/// the pipes open).
pub const DRAIN: Duration = Duration::from_millis(100);

/// One script to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// User name; empty = root.
    pub user: String,
    /// The bash script.
    pub script: String,
    /// Extra environment (over the login environment), in order; later entries win.
    pub env: Vec<(String, String)>,
    /// Kill the process group after this long.
    pub timeout: Option<Duration>,
}

/// How a script ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Exit code; 128 + signal when killed; 127 when it could not be started.
    pub code: i32,
    /// stdout (first [`OUTPUT_CAP`] bytes, lossy UTF-8).
    pub stdout: String,
    /// stderr (first [`OUTPUT_CAP`] bytes, lossy UTF-8); says why when it could not start.
    pub stderr: String,
    /// Killed by the timeout.
    pub timed_out: bool,
}

/// Runs scripts. The real one is [`BashExecutor`]; unit tests use fakes.
pub trait Executor: Send + Sync + 'static {
    /// Runs `job` to its end (or its timeout).
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'static>>;
}

/// Runs scripts as real processes in the machine.
#[derive(Debug, Clone)]
pub struct BashExecutor {
    db: UserDb,
    /// Resolved plans per user (without script and task variables), with when they were made.
    plans: Arc<Mutex<HashMap<String, (Instant, Plan)>>>,
}

impl BashExecutor {
    /// Users are resolved in `db` (the machine's `/etc/passwd`).
    pub fn new(db: UserDb) -> Self {
        BashExecutor {
            db,
            plans: Arc::default(),
        }
    }

    /// The user's plan, resolved at most every [`USER_CACHE_TTL`] (reading and parsing the
    /// account files for every attempt was a tenth of the agent's polling cost). Failures are
    /// not cached: a user created meanwhile is found at the next attempt.
    fn base_plan(&self, user: &str) -> Result<Plan, ExecError> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, plan)) = plans.get(user)
            && at.elapsed() < USER_CACHE_TTL
        {
            return Ok(plan.clone());
        }
        let plan = base_plan(&self.db, user)?;
        plans.insert(user.to_string(), (Instant::now(), plan.clone()));
        Ok(plan)
    }
}

impl Executor for BashExecutor {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'static>> {
        let plan = self.base_plan(&job.user);
        Box::pin(async move {
            match plan {
                Ok(plan) => run_plan(plan, job).await,
                Err(e) => failed_to_start(format!("task user {:?}: {e}", job.user)),
            }
        })
    }
}

/// How long a resolved user (home, shell, groups) is reused by [`BashExecutor`].
pub const USER_CACHE_TTL: Duration = Duration::from_secs(5);

/// `bash -c` as `user`, with the login environment, without the script.
fn base_plan(db: &UserDb, user: &str) -> Result<Plan, ExecError> {
    let start = ExecStart {
        argv: vec![shell(db).to_string(), "-c".into()],
        user: user.to_string(),
        ..Default::default()
    };
    exec::plan(db, &start)
}

/// SIGKILLs a process group on drop unless disarmed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.0
            && pgid.as_raw() > 0
        {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn failed_to_start(what: String) -> Outcome {
    Outcome {
        code: 127,
        stdout: String::new(),
        stderr: format!("ironlab-agent: {what}\n"),
        timed_out: false,
    }
}

/// Reads `r` to its end, keeping the first [`OUTPUT_CAP`] bytes in `keep`.
async fn capture<R: AsyncRead + Unpin>(r: &mut R, keep: &mut Vec<u8>) {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = OUTPUT_CAP.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn shell(db: &UserDb) -> &'static str {
    if db.path("/bin/bash").is_file() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// Runs one job as a real process (see the module docs).
pub async fn run_job(db: &UserDb, job: Job) -> Outcome {
    match base_plan(db, &job.user) {
        Ok(plan) => run_plan(plan, job).await,
        Err(e) => failed_to_start(format!("task user {:?}: {e}", job.user)),
    }
}

/// Runs `job` with a plan from [`base_plan`]: appends the script and the job's variables (which
/// override the login environment, as in `Exec`).
async fn run_plan(mut plan: Plan, job: Job) -> Outcome {
    plan.args.push(job.script.clone());
    for (k, v) in &job.env {
        plan.env.retain(|(key, _)| key != k);
        plan.env.push((k.clone(), v.clone()));
    }
    let direct = match &plan.creds {
        None => true,
        Some(c) => c.uid == 0 && c.gid == 0 && nix::unistd::getgid().as_raw() == 0,
    };
    let mut proc = if direct {
        // Nothing to switch (root, or the agent's own user): posix_spawn, see [`super::spawn`].
        match super::spawn::spawn(&plan.program, &plan.args, &plan.env, &plan.cwd) {
            Ok(s) => Proc::Spawned(s),
            Err(e) => return failed_to_start(format!("cannot start {}: {e}", plan.program)),
        }
    } else {
        let mut cmd = tokio::process::Command::new(&plan.program);
        cmd.args(&plan.args)
            .env_clear()
            .envs(plan.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&plan.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        if let Some(creds) = plan.creds.clone() {
            // SAFETY: `child_setup` only makes async-signal-safe syscalls and does not allocate.
            unsafe {
                cmd.pre_exec(move || child_setup(&creds));
            }
        }
        match cmd.spawn() {
            Ok(c) => Proc::Child(c),
            Err(e) => return failed_to_start(format!("cannot start {}: {e}", plan.program)),
        }
    };
    let guard = GroupGuard(proc.pid());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut stdout, mut stderr) = proc.take_pipes();
    let mut timed_out = false;
    let status = {
        let read = async {
            let o = async {
                if let Some(s) = stdout.as_mut() {
                    capture(s, &mut out).await;
                }
            };
            let e = async {
                if let Some(s) = stderr.as_mut() {
                    capture(s, &mut err).await;
                }
            };
            tokio::join!(o, e);
        };
        tokio::pin!(read);
        let wait = async {
            match job.timeout {
                Some(t) => match tokio::time::timeout(t, proc.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        timed_out = true;
                        guard.kill();
                        proc.wait().await
                    }
                },
                None => proc.wait().await,
            }
        };
        tokio::pin!(wait);
        let mut read_done = false;
        let status = loop {
            tokio::select! {
                s = &mut wait => break s,
                _ = &mut read, if !read_done => read_done = true,
            }
        };
        if !read_done {
            let _ = tokio::time::timeout(DRAIN, &mut read).await;
        }
        status
    };
    // The attempt is over (the group was killed already on timeout); leftover background
    // processes of a finished script keep running (an init task may start a daemon), so the
    // guard only kills when the attempt is abandoned before this point.
    let mut guard = guard;
    guard.0 = None;
    let code = match status {
        Ok(code) => code,
        Err(e) => {
            err.extend_from_slice(
                format!("ironlab-agent: cannot wait for the script: {e}\n").as_bytes(),
            );
            127
        }
    };
    Outcome {
        code,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        timed_out,
    }
}

type Pipe = Option<Box<dyn AsyncRead + Unpin + Send>>;

/// A script's process, started either way.
enum Proc {
    Spawned(super::spawn::Spawned),
    Child(tokio::process::Child),
}

impl Proc {
    fn pid(&self) -> Option<Pid> {
        match self {
            Proc::Spawned(s) => Some(s.pid()),
            Proc::Child(c) => c
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(Pid::from_raw),
        }
    }

    fn take_pipes(&mut self) -> (Pipe, Pipe) {
        fn boxed<R: AsyncRead + Unpin + Send + 'static>(r: Option<R>) -> Pipe {
            r.map(|r| Box::new(r) as Box<dyn AsyncRead + Unpin + Send>)
        }
        match self {
            Proc::Spawned(s) => (boxed(s.stdout.take()), boxed(s.stderr.take())),
            Proc::Child(c) => (boxed(c.stdout.take()), boxed(c.stderr.take())),
        }
    }

    /// Exit code, or 128 + signal.
    async fn wait(&mut self) -> std::io::Result<i32> {
        match self {
            Proc::Spawned(s) => s.wait().await,
            Proc::Child(c) => {
                let s = c.wait().await?;
                Ok(s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)))
            }
        }
    }
}

/// Runs in the child between fork and exec: own session (so its own process group), then the
/// task user's credentials.
fn child_setup(c: &Creds) -> std::io::Result<()> {
    // SAFETY: this runs in the forked child before exec; only async-signal-safe syscalls, no
    // allocation. `groups` is a live slice for the `setgroups` call.
    unsafe {
        if libc::setsid() == -1
            || libc::setgroups(c.groups.len() as _, c.groups.as_ptr()) == -1
            || libc::setgid(c.gid) == -1
            || libc::setuid(c.uid) == -1
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
