//! `posix_spawn` for scripts that need no user switch, with a pidfd to wait on.
//!
//! Why not `std::process::Command`: std uses `posix_spawn` (a vfork-like clone) only when it can
//! tell the C library supports it, which a statically linked glibc binary — the agent's fallback
//! build — cannot, so every attempt would `fork` the whole agent (copying its page tables and
//! then taking copy-on-write faults). Polling 50 tasks a second made that the agent's main cost.
//! Here the child gets: its own process group, stdin `/dev/null`, stdout/stderr pipes, the
//! working directory, default signal dispositions and an empty signal mask.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// A spawned process. Dropped before [`Spawned::wait`] returned: its process group is killed and
/// a thread reaps it.
pub struct Spawned {
    pid: Pid,
    pidfd: AsyncFd<OwnedFd>,
    reaped: bool,
    /// stdout (read end).
    pub stdout: Option<pipe::Receiver>,
    /// stderr (read end).
    pub stderr: Option<pipe::Receiver>,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "NUL byte in an argument or variable",
        )
    })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// posix_spawn's attribute and file-action objects, destroyed on drop.
struct Objects {
    attr: libc::posix_spawnattr_t,
    actions: libc::posix_spawn_file_actions_t,
}

impl Drop for Objects {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `spawn` before `Objects` was built.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.actions);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

/// Starts `program` (an absolute path) with `args` (argv[1..]) and exactly `env`.
pub fn spawn(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    cwd: &Path,
) -> io::Result<Spawned> {
    let prog = cstr(program.as_bytes())?;
    let mut argv_c = vec![prog.clone()];
    for a in args {
        argv_c.push(cstr(a.as_bytes())?);
    }
    let envp_c: Vec<CString> = env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<io::Result<_>>()?;
    let cwd_c = cstr(cwd.as_os_str().as_bytes())?;
    let mut argv: Vec<*mut libc::c_char> = argv_c.iter().map(|c| c.as_ptr() as *mut _).collect();
    argv.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = envp_c.iter().map(|c| c.as_ptr() as *mut _).collect();
    envp.push(std::ptr::null_mut());

    let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let devnull = nix::fcntl::open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;

    let mut pid: libc::pid_t = 0;
    // SAFETY: the attribute and file-action objects are initialised before use and destroyed by
    // `Objects`; every pointer passed (argv, envp, paths) points into CStrings alive until
    // `posix_spawn` returns; the sigsets are initialised with sigemptyset/sigfillset.
    unsafe {
        let mut objs = Objects {
            attr: std::mem::zeroed(),
            actions: std::mem::zeroed(),
        };
        check(libc::posix_spawnattr_init(&mut objs.attr))?;
        if let Err(e) = check(libc::posix_spawn_file_actions_init(&mut objs.actions)) {
            libc::posix_spawnattr_destroy(&mut objs.attr);
            return Err(e);
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        check(libc::posix_spawnattr_setsigmask(&mut objs.attr, &none))?;
        check(libc::posix_spawnattr_setsigdefault(&mut objs.attr, &all))?;
        check(libc::posix_spawnattr_setpgroup(&mut objs.attr, 0))?;
        let flags = libc::POSIX_SPAWN_SETPGROUP
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETSIGDEF;
        check(libc::posix_spawnattr_setflags(&mut objs.attr, flags as _))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut objs.actions,
            devnull.as_raw_fd(),
            0,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut objs.actions,
            out_w.as_raw_fd(),
            1,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut objs.actions,
            err_w.as_raw_fd(),
            2,
        ))?;
        check(libc::posix_spawn_file_actions_addchdir_np(
            &mut objs.actions,
            cwd_c.as_ptr(),
        ))?;
        check(libc::posix_spawn(
            &mut pid,
            prog.as_ptr(),
            &objs.actions,
            &objs.attr,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
    }
    drop((out_w, err_w, devnull));
    let pid = Pid::from_raw(pid);
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        return Err(e);
    }
    // SAFETY: `fd` is a new descriptor owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: an OwnedFd is a valid open descriptor that stays the same until it is dropped
    // with the AsyncFd.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    let pidfd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            return Err(io::Error::from(e));
        }
    };
    let mut spawned = Spawned {
        pid,
        pidfd,
        reaped: false,
        stdout: None,
        stderr: None,
    };
    spawned.stdout = Some(pipe::Receiver::from_owned_fd(out_r)?);
    spawned.stderr = Some(pipe::Receiver::from_owned_fd(err_r)?);
    Ok(spawned)
}

impl Spawned {
    /// The process id (= its process group id).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Waits for the exit and reaps the process: its exit code, or 128 + signal.
    pub async fn wait(&mut self) -> io::Result<i32> {
        loop {
            let mut ready = self.pidfd.readable().await?;
            match waitpid(self.pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => {
                    self.reaped = true;
                    return Ok(code);
                }
                Ok(WaitStatus::Signaled(_, sig, _)) => {
                    self.reaped = true;
                    return Ok(128 + sig as i32);
                }
                Ok(_) => ready.clear_ready(),
                Err(e) => {
                    self.reaped = true;
                    return Err(e.into());
                }
            }
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = killpg(self.pid, Signal::SIGKILL);
            let pid = self.pid;
            std::thread::spawn(move || {
                let _ = waitpid(pid, None);
            });
        }
    }
}
