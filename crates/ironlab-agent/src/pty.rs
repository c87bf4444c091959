//! PTY pairs for interactive sessions: the master side stays in the agent (non-blocking, driven
//! by tokio's reactor), the slave side becomes the child's stdin/stdout/stderr and controlling
//! terminal (see `exec`).
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::fcntl::OFlag;
use nix::pty::{PtyMaster, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, ReadBuf};

/// The agent's end of a PTY.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<PtyMaster>,
}

/// Window size used when a request gives 0 columns or rows.
pub const DEFAULT_SIZE: (u16, u16) = (80, 24);

fn clamp(v: u32, default: u16) -> u16 {
    if v == 0 {
        default
    } else {
        u16::try_from(v).unwrap_or(u16::MAX)
    }
}

impl Pty {
    /// Opens a PTY pair of `cols`×`rows` (0 = 80×24). Both ends are close-on-exec; the slave is
    /// returned as a file to hand to a child as its stdio.
    pub fn open(cols: u32, rows: u32) -> io::Result<(Arc<Pty>, File)> {
        let master =
            posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        grantpt(&master)?;
        unlockpt(&master)?;
        let name = ptsname_r(&master)?;
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&name)?;
        // SAFETY: `PtyMaster` owns its fd: it stays open and the same until the `AsyncFd` (which
        // owns the `PtyMaster`) is dropped.
        let master = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
        let pty = Pty { master };
        pty.resize(cols, rows)?;
        Ok((Arc::new(pty), slave))
    }

    /// Sets the window size (the kernel sends SIGWINCH to the foreground process group).
    pub fn resize(&self, cols: u32, rows: u32) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: clamp(rows, DEFAULT_SIZE.1),
            ws_col: clamp(cols, DEFAULT_SIZE.0),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which is valid for the call;
        // the fd is owned by `self.master` and open.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The terminal's foreground process group, if it has one.
    pub fn foreground_group(&self) -> Option<Pid> {
        nix::unistd::tcgetpgrp(self.master.get_ref())
            .ok()
            .filter(|p| p.as_raw() > 0)
    }

    /// Writes all of `data` to the terminal (the child's input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|m| nix::unistd::write(m.get_ref(), data).map_err(io::Error::from)) {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// Reads the terminal's output; EIO (every slave fd closed) is end of file.
#[derive(Debug, Clone)]
pub struct PtyReader(pub Arc<Pty>);

impl AsyncRead for PtyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.master.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|m| nix::unistd::read(m.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}
