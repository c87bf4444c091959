//! Outgoing TCP connections from inside the machine (`Dial`): the agent's half of published
//! ports (`ironlab port-forward`, `ssh-proxy`, http-port tabs).
//!
//! Who talks to whom, per call: [`connect`] resolves and connects before the call is answered
//! (so "connection refused" fails the call itself); then [`pump`] runs two tasks over the
//! socket:
//! - a reader: socket → [`CHUNK_SIZE`] reads → a bounded channel of [`OUTPUT_QUEUE`] messages →
//!   the gRPC response stream. A client that stops reading stops the reader, and TCP flow
//!   control then holds back the peer: nothing is buffered without bound;
//! - a writer: the client's input stream → `write_all` on the socket, one message at a time (the
//!   next message is pulled only once the previous one is written). `close_write` shuts down the
//!   socket's write side; the input stream ending without it means the client went away, and the
//!   writer then stops the reader and drops the socket.
//!
//! The response stream ends once both directions are done: the reader saw end of file (and sent
//! `eof`) and the writer saw `close_write` — or at the first error.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ironlab_api::agent::{DialConnected, DialInput, DialOpen, DialOutput, dial_input, dial_output};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

/// Largest data chunk sent in one message.
pub const CHUNK_SIZE: usize = 32 * 1024;
/// Output messages queued per connection before the reader is held back.
pub const OUTPUT_QUEUE: usize = 8;
/// How long resolving and connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The host dialled when the request names none.
pub const DEFAULT_HOST: &str = "127.0.0.1";

/// Why a connection could not be made or broke.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The request itself is wrong (port out of range, bad first message).
    #[error("{0}")]
    Invalid(String),
    /// The host name did not resolve.
    #[error("cannot resolve {host}")]
    Resolve {
        /// Host name as requested.
        host: String,
        /// Resolver error.
        #[source]
        source: io::Error,
    },
    /// Connecting failed (refused, unreachable, …).
    #[error("cannot connect to {target}")]
    Connect {
        /// `host:port`.
        target: String,
        /// The last address's error.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than [`CONNECT_TIMEOUT`].
    #[error("cannot connect to {target}: no answer within {}s", CONNECT_TIMEOUT.as_secs())]
    Timeout {
        /// `host:port`.
        target: String,
    },
    /// The established connection broke.
    #[error("connection to {peer} failed")]
    Io {
        /// The peer address.
        peer: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

/// Resolves `open.host` (default [`DEFAULT_HOST`]) inside the machine and connects to the first
/// address that accepts, within [`CONNECT_TIMEOUT`].
pub async fn connect(open: &DialOpen) -> Result<(TcpStream, SocketAddr), DialError> {
    let port = u16::try_from(open.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| DialError::Invalid(format!("port {} is not in 1-65535", open.port)))?;
    let host = if open.host.is_empty() {
        DEFAULT_HOST
    } else {
        open.host.as_str()
    };
    let target = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let attempt = async {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| DialError::Resolve {
                host: host.to_string(),
                source,
            })?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no addresses");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok((s, addr));
                }
                Err(e) => last = e,
            }
        }
        Err(DialError::Connect {
            target: target.clone(),
            source: last,
        })
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout { target }),
    }
}

fn output(kind: dial_output::Kind) -> DialOutput {
    DialOutput { kind: Some(kind) }
}

/// Relays between `socket` and the client's `input` (after `open`); returns the response
/// stream's receiver, which starts with `connected`.
pub fn pump<S, E>(
    socket: TcpStream,
    peer: SocketAddr,
    mut input: S,
) -> mpsc::Receiver<Result<DialOutput, DialError>>
where
    S: Stream<Item = Result<DialInput, E>> + Send + Unpin + 'static,
    E: Send + 'static,
{
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    let connected = output(dial_output::Kind::Connected(DialConnected {
        peer: peer.to_string(),
    }));
    // The channel is empty: the first message always fits.
    let _ = tx.try_send(Ok(connected));
    let (mut rd, mut wr) = socket.into_split();

    let reader_tx = tx.clone();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let msg = match rd.read(&mut buf).await {
                Ok(0) => {
                    let _ = reader_tx
                        .send(Ok(output(dial_output::Kind::Eof(true))))
                        .await;
                    return;
                }
                Ok(n) => Ok(output(dial_output::Kind::Data(buf[..n].to_vec()))),
                Err(source) => Err(DialError::Io { peer, source }),
            };
            let failed = msg.is_err();
            // Awaiting room here is the backpressure towards the peer.
            if reader_tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });

    // The writer keeps `tx` (and so the response stream) alive until the write side is done.
    tokio::spawn(async move {
        while let Some(msg) = input.next().await {
            let Ok(DialInput { kind }) = msg else { break };
            match kind {
                Some(dial_input::Kind::Data(d)) => {
                    if let Err(source) = wr.write_all(&d).await {
                        let _ = tx.send(Err(DialError::Io { peer, source })).await;
                        reader.abort();
                        return;
                    }
                }
                Some(dial_input::Kind::CloseWrite(_)) => {
                    let _ = wr.shutdown().await;
                    // Done writing; the stream ends when the reader is done too.
                    return;
                }
                Some(dial_input::Kind::Open(_)) => {
                    let _ = tx
                        .send(Err(DialError::Invalid(
                            "`open` may only be the first Dial message".into(),
                        )))
                        .await;
                    reader.abort();
                    return;
                }
                None => {}
            }
        }
        // The client went away (or its stream failed): drop the connection.
        reader.abort();
    });
    rx
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    fn data(d: &[u8]) -> Result<DialInput, ()> {
        Ok(DialInput {
            kind: Some(dial_input::Kind::Data(d.to_vec())),
        })
    }

    fn close_write() -> Result<DialInput, ()> {
        Ok(DialInput {
            kind: Some(dial_input::Kind::CloseWrite(true)),
        })
    }

    async fn next(rx: &mut mpsc::Receiver<Result<DialOutput, DialError>>) -> dial_output::Kind {
        let msg = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a message in time")
            .expect("a message");
        msg.expect("not an error").kind.expect("a kind")
    }

    #[tokio::test]
    async fn refused_ports_and_bad_ports_fail_clearly() {
        // Bind then drop: nothing listens on this port any more.
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let e = connect(&DialOpen {
            host: String::new(),
            port: u32::from(port),
        })
        .await
        .expect_err("nothing listens");
        let text = format!("{e}: {}", std::error::Error::source(&e).expect("a source"));
        assert!(
            text.starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
        for bad in [0, 65536, 100_000] {
            let e = connect(&DialOpen {
                host: String::new(),
                port: bad,
            })
            .await
            .expect_err("bad port");
            assert_eq!(e.to_string(), format!("port {bad} is not in 1-65535"));
        }
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_with_half_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        // The server reads everything until EOF, then answers with its length and closes.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            s.write_all(format!("got {} bytes", got.len()).as_bytes())
                .await
                .expect("write");
            got
        });
        let (socket, peer) = connect(&DialOpen {
            host: "localhost".into(),
            port: u32::from(port),
        })
        .await
        .expect("connect");
        let (in_tx, in_rx) = mpsc::channel(2);
        let mut rx = pump(socket, peer, ReceiverStream::new(in_rx));
        assert!(
            matches!(next(&mut rx).await, dial_output::Kind::Connected(c) if c.peer == peer.to_string())
        );
        in_tx.send(data(b"hello ")).await.expect("send");
        in_tx.send(data(b"world")).await.expect("send");
        in_tx.send(close_write()).await.expect("send");
        let mut answer = Vec::new();
        loop {
            match next(&mut rx).await {
                dial_output::Kind::Data(d) => answer.extend(d),
                dial_output::Kind::Eof(_) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(answer, b"got 11 bytes");
        // Both directions are done: the stream ends, with the client's input still open.
        let end = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the stream ends");
        assert!(end.is_none(), "{end:?}");
        assert_eq!(server.await.expect("server"), b"hello world");
        drop(in_tx);
    }

    #[tokio::test]
    async fn a_client_that_goes_away_closes_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (socket, peer) = connect(&DialOpen {
            host: String::new(),
            port: u32::from(port),
        })
        .await
        .expect("connect");
        let (mut s, _) = listener.accept().await.expect("accept");
        let (in_tx, in_rx) = mpsc::channel::<Result<DialInput, ()>>(2);
        let _rx = pump(socket, peer, ReceiverStream::new(in_rx));
        drop(in_tx);
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the server sees the close in time");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_holds_back_the_peer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (socket, peer) = connect(&DialOpen {
            host: String::new(),
            port: u32::from(port),
        })
        .await
        .expect("connect");
        let (mut s, _) = listener.accept().await.expect("accept");
        let (_in_tx, in_rx) = mpsc::channel::<Result<DialInput, ()>>(2);
        let _rx = pump(socket, peer, ReceiverStream::new(in_rx));
        // Nobody reads `_rx`: the server can write only what the queue and the socket buffers
        // hold, then blocks.
        let chunk = vec![b'y'; 64 * 1024];
        let mut written = 0usize;
        let flood = async {
            loop {
                s.write_all(&chunk).await.expect("write");
                written += chunk.len();
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), flood).await;
        // 8 queued chunks of 32 KiB + kernel socket buffers (a few MiB at most on loopback).
        assert!(
            written < 32 * 1024 * 1024,
            "{written} bytes went in without a reader: not bounded"
        );
    }
}
