//! Serving the agent over a virtio-serial port (microVMs).
//!
//! Who talks to whom: in a microVM, QEMU connects the guest's port `/dev/vport0p1` to a unix
//! socket on the host; the worker's proxy (`ironlab-worker::runtime::vm::proxy`) is its only
//! client and carries every gRPC call over one HTTP/2 connection. A serial port is a single byte
//! stream that outlives host connections (a worker restart, an agent restart), so each HTTP/2
//! session starts with a handshake that discards stale bytes on both sides:
//!
//! ```text
//! host  → guest   IRONLAB-SYNC:<16 hex>\n      (the guest discards everything before it)
//! guest → host    IRONLAB-ACK:<same hex>\n     (the host discards everything before it)
//! then HTTP/2, client = host, server = guest, until either side sees EOF or an error
//! ```
//!
//! The guest reads EOF while no host is connected; it then waits and re-opens the port.
#![allow(unsafe_code)]

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

/// What the host sends to start a session.
pub const SYNC_PREFIX: &[u8] = b"IRONLAB-SYNC:";
/// What the guest answers.
pub const ACK_PREFIX: &[u8] = b"IRONLAB-ACK:";
/// Length of the nonce (hex digits).
pub const NONCE_LEN: usize = 16;
/// Pause between reads while no host is connected.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// One HTTP/2 session over the serial port. Dropping it tells [`incoming`] to re-open the port
/// for the next session.
#[derive(Debug)]
pub struct SerialConn {
    fd: AsyncFd<std::fs::File>,
    _done: Option<oneshot::Sender<()>>,
}

impl SerialConn {
    fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)?;
        // Register only while a host is connected: tokio keeps a HUP (no host) in the fd's
        // readiness for good, after which reads would never wait for data again.
        if !host_connected(&file) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "no host on the port",
            ));
        }
        // SAFETY: the `File` owns its fd: it stays open and the same until the `AsyncFd` (which
        // owns the `File`) is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(|e| e.into_parts().1)?;
        Ok(SerialConn { fd, _done: None })
    }

    async fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            let closed = guard.ready().is_read_closed();
            match guard.try_io(|f| f.get_ref().read(buf)) {
                Ok(r) => return r,
                Err(_would_block) if closed => return Ok(0),
                Err(_would_block) => continue,
            }
        }
    }

    async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) if closed => return Err(io::ErrorKind::BrokenPipe.into()),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    /// Waits for the host's SYNC line and answers it. Returns the nonce.
    async fn handshake(&self) -> io::Result<String> {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = self.read_some(&mut buf).await?;
            if n == 0 {
                // The host left: start over with a fresh registration once one connects.
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "the host left the port",
                ));
            }
            pending.extend_from_slice(&buf[..n]);
            if let Some(nonce) = find_sync(&pending) {
                let mut ack = ACK_PREFIX.to_vec();
                ack.extend_from_slice(nonce.as_bytes());
                ack.push(b'\n');
                self.write_all(&ack).await?;
                return Ok(nonce);
            }
            // Keep only a tail that may hold the start of a SYNC line.
            let keep = SYNC_PREFIX.len() + NONCE_LEN + 1;
            if pending.len() > keep {
                pending.drain(..pending.len() - keep);
            }
        }
    }
}

/// Whether a host is connected to the port now (no `POLLHUP`).
fn host_connected(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid `pollfd` for an open fd, zero timeout.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n >= 0 && pfd.revents & libc::POLLHUP == 0
}

/// The nonce of the last complete `IRONLAB-SYNC:<hex>\n` line in `buf`.
pub fn find_sync(buf: &[u8]) -> Option<String> {
    let line = SYNC_PREFIX.len() + NONCE_LEN + 1;
    if buf.len() < line {
        return None;
    }
    (0..=buf.len() - line).rev().find_map(|i| {
        let cand = &buf[i..i + line];
        let nonce = &cand[SYNC_PREFIX.len()..SYNC_PREFIX.len() + NONCE_LEN];
        (cand.starts_with(SYNC_PREFIX)
            && cand[line - 1] == b'\n'
            && nonce.iter().all(u8::is_ascii_hexdigit))
        .then(|| String::from_utf8_lossy(nonce).into_owned())
    })
}

impl AsyncRead for SerialConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // The host was gone at some point of this session: end it (EOF).
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for SerialConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl tonic::transport::server::Connected for SerialConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

/// The sessions on the serial port `path`, one at a time: the next is opened (and its handshake
/// awaited) only after the previous one was dropped.
pub fn incoming(path: PathBuf) -> ReceiverStream<io::Result<SerialConn>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut logged = false;
        loop {
            let conn = match SerialConn::open(&path) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
                Err(e) => {
                    if !logged {
                        eprintln!("ironlab-agent: cannot open {}: {e}", path.display());
                        logged = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            logged = false;
            match conn.handshake().await {
                Ok(nonce) => eprintln!(
                    "ironlab-agent: serial session {nonce} on {} (up {:.2} s)",
                    path.display(),
                    crate::uptime()
                ),
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    tokio::time::sleep(IDLE_POLL).await;
                    continue;
                }
                Err(e) => {
                    eprintln!("ironlab-agent: serial handshake on {}: {e}", path.display());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let (done_tx, done_rx) = oneshot::channel();
            let mut conn = conn;
            conn._done = Some(done_tx);
            if tx.send(Ok(conn)).await.is_err() {
                return; // the server stopped
            }
            let _ = done_rx.await;
        }
    });
    ReceiverStream::new(rx)
}

/// A connection the agent serves: its unix socket or the serial port.
#[derive(Debug)]
pub enum AgentConn {
    /// A client of the unix socket.
    Unix(tokio::net::UnixStream),
    /// A session on the serial port.
    Serial(SerialConn),
}

impl AsyncRead for AgentConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentConn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentConn::Serial(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentConn::Unix(s) => Pin::new(s).poll_write(cx, data),
            AgentConn::Serial(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentConn::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentConn::Serial(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentConn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentConn::Serial(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for AgentConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn finds_the_last_complete_sync_line() {
        assert_eq!(find_sync(b"junk"), None);
        assert_eq!(
            find_sync(b"\x00\x01PRI * HTTP/2.0IRONLAB-SYNC:0123456789abcdef\n").as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(
            find_sync(b"IRONLAB-SYNC:0123456789abcdef\nIRONLAB-SYNC:fedcba9876543210\n").as_deref(),
            Some("fedcba9876543210")
        );
        // Incomplete or malformed lines do not count.
        assert_eq!(find_sync(b"IRONLAB-SYNC:0123456789abcdef"), None);
        assert_eq!(find_sync(b"IRONLAB-SYNC:0123456789abcdeg\n"), None);
    }

    /// A pty stands in for the port: the handshake discards junk before the SYNC line and
    /// answers with the same nonce.
    #[tokio::test]
    async fn handshake_over_a_pty() {
        let pty = nix::pty::openpty(None, None).expect("openpty");
        let mut termios = nix::sys::termios::tcgetattr(&pty.slave).expect("tcgetattr");
        nix::sys::termios::cfmakeraw(&mut termios);
        nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &termios)
            .expect("raw");
        let slave_path =
            std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).expect("link");
        let conn = SerialConn::open(&slave_path).expect("open");
        let mut master = std::fs::File::from(pty.master);
        master
            .write_all(b"stale h2 bytes\x00\x04IRONLAB-SYNC:00112233aabbccdd\n")
            .expect("write");
        let nonce = tokio::time::timeout(Duration::from_secs(5), conn.handshake())
            .await
            .expect("in time")
            .expect("handshake");
        assert_eq!(nonce, "00112233aabbccdd");
        let mut got = vec![0u8; ACK_PREFIX.len() + NONCE_LEN + 1];
        master.read_exact(&mut got).expect("read ack");
        assert_eq!(got, b"IRONLAB-ACK:00112233aabbccdd\n");
    }
}
