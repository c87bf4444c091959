//! The terminal relay: a client WebSocket (CLI, browser) ↔ the agent's `Exec` gRPC stream.
//!
//! Who talks to whom: `api.rs` upgrades the connection after checking the single-use token and
//! hands the socket (as [`Frame`] sink + stream), the token's user and an agent client to
//! [`relay`]. The first client text frame must be `start`; then, by kind of session:
//! - **PTY (`tty`)**: persistent. A fresh start opens `Exec` and registers the stream in the
//!   session table ([`crate::sessions`]), whose task owns the agent output from then on; a start
//!   with `session` attaches to an existing one. Either way the connection is served by
//!   [`serve_attachment`]: `started`, the replay, then live output from the attachment's bounded
//!   channel (coalesced into frames of at most [`MAX_FRAME_DATA`]) while client input goes to
//!   the session's bounded input channel. When the client leaves, the session only detaches.
//! - **Command (no `tty`)**: tied to the socket ([`pump`]): client binary `0|data` / `resize` /
//!   `signal` / `eof` → `ExecInput`s, and agent stdout/stderr/exit → binary `1|data` / `2|data`
//!   and a final `{"type":"exit","code":N}`; the process is hung up when the client leaves.
//!
//! Both directions are bounded everywhere: input channels hold a few messages, and output is
//! pulled from the agent only when the WebSocket accepted the previous frame, so a flood in
//! either direction is held back by flow control, not buffered.

use std::fmt::Display;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{Sink, SinkExt, Stream, StreamExt};
use ironlab_api::agent::exec_input::Kind as InKind;
use ironlab_api::agent::exec_output::Kind as OutKind;
use ironlab_api::agent::{ExecInput, ExecOutput, ExecStart, Resize};
use ironlab_api::relay::{self as proto, CLOSE_REPLACED, ClientControl, ServerControl};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::runs::MachineAgent;
use crate::sessions::{Attachment, Event, OutputStream, Sessions};

/// Input messages buffered towards the agent before reading from the client pauses.
const INPUT_BUFFER: usize = 16;
/// SIGHUP: sent to the remote process when the client goes away without an exit.
const SIGHUP: i32 = 1;
/// How long to wait for the client's close after the server closed.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Most data bytes in one output frame (chunks queued together are coalesced up to this).
pub const MAX_FRAME_DATA: usize = 64 * 1024;

/// A WebSocket message, independent of the WebSocket library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame (JSON control message).
    Text(String),
    /// A binary frame (stream byte + data).
    Binary(Bytes),
    /// The peer closed (incoming) / close the connection (outgoing).
    Close,
    /// Close the connection with an application close code and reason (outgoing only).
    CloseWith(u16, String),
}

/// One accepted terminal connection: who it is for and where it goes.
pub struct Connection {
    /// Run id.
    pub run: String,
    /// Machine name.
    pub machine: String,
    /// The user the terminal token was issued to.
    pub user: String,
    /// The persistent session table.
    pub sessions: Arc<Sessions>,
    /// The machine's agent.
    pub agent: MachineAgent,
}

fn control(msg: &ServerControl) -> Frame {
    // Serializing these plain enums cannot fail; fall back to a fixed error text regardless.
    Frame::Text(
        serde_json::to_string(msg)
            .unwrap_or_else(|_| r#"{"type":"error","message":"internal"}"#.to_string()),
    )
}

async fn send_error<Si>(sink: &mut Si, message: String)
where
    Si: Sink<Frame> + Unpin,
{
    tracing::debug!("relay error: {message}");
    let _ = sink.send(control(&ServerControl::Error { message })).await;
    let _ = sink.send(Frame::Close).await;
    let _ = sink.close().await;
}

/// Opens `Exec` on the agent: the input sender (with `start` already queued) and the output.
async fn open_exec(
    agent: &MachineAgent,
    start: ExecStart,
) -> Result<(mpsc::Sender<ExecInput>, OutputStream), String> {
    let (tx, rx) = mpsc::channel::<ExecInput>(INPUT_BUFFER);
    tx.send(ExecInput {
        kind: Some(InKind::Start(start)),
    })
    .await
    .map_err(|_| "cannot queue the start message".to_string())?;
    let mut client = agent.client.clone();
    match client.exec(ReceiverStream::new(rx)).await {
        Ok(r) => Ok((tx, Box::pin(r.into_inner()))),
        Err(status) => Err(format!("cannot start the process: {}", status.message())),
    }
}

/// Runs one terminal connection: reads `start`, then starts, attaches to, or runs a session.
pub async fn relay<Si, St>(mut sink: Si, mut stream: St, conn: Connection)
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Frame> + Unpin,
{
    let (start, session) = match stream.next().await {
        Some(Frame::Text(t)) => match serde_json::from_str::<ClientControl>(&t) {
            Ok(ClientControl::Start {
                command,
                tty,
                cols,
                rows,
                env,
                term,
                session,
            }) => (
                ExecStart {
                    argv: command,
                    user: conn.agent.default_user.clone(),
                    env: conn.agent.image_env.iter().cloned().chain(env).collect(),
                    cwd: String::new(),
                    tty,
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                    term: term.unwrap_or_default(),
                },
                session,
            ),
            Ok(other) => {
                return send_error(
                    &mut sink,
                    format!("the first message must be start, got {other:?}"),
                )
                .await;
            }
            Err(e) => {
                return send_error(&mut sink, format!("invalid start message: {e}")).await;
            }
        },
        Some(Frame::Binary(_)) => {
            return send_error(
                &mut sink,
                "the first message must be a start text frame".into(),
            )
            .await;
        }
        Some(Frame::Close | Frame::CloseWith(..)) | None => return,
    };
    let Connection {
        run,
        machine,
        user,
        sessions,
        agent,
    } = conn;

    if let Some(id) = session {
        let attachment = match sessions.attach(&run, &machine, &id, &user) {
            Ok(a) => a,
            Err(e) => return send_error(&mut sink, e.to_string()).await,
        };
        if start.cols > 0 && start.rows > 0 {
            let resize = ExecInput {
                kind: Some(InKind::Resize(Resize {
                    cols: start.cols,
                    rows: start.rows,
                })),
            };
            let _ = attachment.session.input().send(resize).await;
        }
        return serve_attachment(sink, stream, attachment).await;
    }

    if start.tty {
        if let Err(e) = sessions.make_room(&run, &machine) {
            return send_error(&mut sink, e.to_string()).await;
        }
        let (tx, output) = match open_exec(&agent, start).await {
            Ok(x) => x,
            Err(m) => return send_error(&mut sink, m).await,
        };
        let attachment = match sessions.create(&run, &machine, &user, tx, output) {
            Ok(a) => a,
            Err(e) => return send_error(&mut sink, e.to_string()).await,
        };
        return serve_attachment(sink, stream, attachment).await;
    }

    let (tx, output) = match open_exec(&agent, start).await {
        Ok(x) => x,
        Err(m) => return send_error(&mut sink, m).await,
    };
    let started = ServerControl::Started {
        session: crate::sessions::new_id(),
    };
    if sink.send(control(&started)).await.is_err() {
        return;
    }
    pump(sink, stream, tx, output).await;
}

/// Appends `data` as frames of at most [`MAX_FRAME_DATA`] to `frames`.
fn stdout_frames(chunks: &[Bytes]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = BytesMut::new();
    for chunk in chunks {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            if buf.is_empty() {
                buf.reserve(1 + MAX_FRAME_DATA.min(rest.len()));
                buf.extend_from_slice(&[proto::STDOUT]);
            }
            let n = rest.len().min(MAX_FRAME_DATA + 1 - buf.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if buf.len() == MAX_FRAME_DATA + 1 {
                frames.push(Frame::Binary(buf.split().freeze()));
            }
        }
    }
    if !buf.is_empty() {
        frames.push(Frame::Binary(buf.freeze()));
    }
    frames
}

/// Serves an attached client of a persistent session until the process exits, the session
/// ends, another client takes over, or this client leaves (which only detaches).
pub async fn serve_attachment<Si, St>(mut sink: Si, mut stream: St, mut att: Attachment)
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Frame> + Unpin,
{
    let started = ServerControl::Started {
        session: att.session.id().to_string(),
    };
    if sink.send(control(&started)).await.is_err() {
        return;
    }
    let replay = std::mem::take(&mut att.replay);
    for frame in stdout_frames(&replay) {
        if sink.send(frame).await.is_err() {
            return;
        }
    }
    drop(replay);
    let input = att.session.input().clone();
    let replaced = att.replaced.clone();
    let finished = {
        let c2a = client_to_agent(&mut stream, &input);
        tokio::pin!(c2a);
        let mut input_done = false;
        let mut pending: Option<Event> = None;
        loop {
            let event = match pending.take() {
                Some(e) => Some(e),
                None => tokio::select! {
                    // Replacement first: it also drops this attachment's event sender.
                    biased;
                    () = replaced.cancelled() => {
                        let close = Frame::CloseWith(
                            CLOSE_REPLACED,
                            "another client attached to this terminal session".into(),
                        );
                        let _ = tokio::time::timeout(CLOSE_GRACE, async {
                            let _ = sink.send(close).await;
                            let _ = sink.close().await;
                        })
                        .await;
                        return;
                    }
                    end = &mut c2a, if !input_done => {
                        input_done = true;
                        if end == ClientEnd::Gone {
                            tracing::debug!(session = %att.session.id(), "client left; the session stays");
                            return;
                        }
                        continue;
                    }
                    e = att.events.recv() => e,
                },
            };
            match event {
                Some(Event::Output(first)) => {
                    // Coalesce what is already queued into one frame.
                    let mut chunks = vec![first];
                    let mut size = chunks[0].len();
                    while size < MAX_FRAME_DATA {
                        match att.events.try_recv() {
                            Ok(Event::Output(more)) => {
                                size += more.len();
                                chunks.push(more);
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    for frame in stdout_frames(&chunks) {
                        let sent = tokio::select! {
                            r = sink.send(frame) => r.is_ok(),
                            () = replaced.cancelled() => false,
                        };
                        if !sent {
                            // Gone or replaced: the session keeps the output in its ring.
                            return;
                        }
                    }
                }
                Some(Event::Exit(code)) => {
                    let _ = sink.send(control(&ServerControl::Exit { code })).await;
                    let _ = sink.send(Frame::Close).await;
                    let _ = sink.close().await;
                    break true;
                }
                Some(Event::Ended(message)) => {
                    send_error(&mut sink, message).await;
                    break true;
                }
                None if replaced.is_cancelled() => continue,
                None => {
                    send_error(&mut sink, "the terminal session ended".into()).await;
                    break true;
                }
            }
        }
    };
    if finished {
        drain_until_close(&mut stream).await;
    }
}

/// After the server closed: let the client's remaining frames and its close arrive before the
/// connection drops, or unread data would make the kernel reset it under the last frame.
async fn drain_until_close<St>(stream: &mut St)
where
    St: Stream<Item = Frame> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(f) = stream.next().await {
            if f == Frame::Close {
                break;
            }
        }
    })
    .await;
}

/// Why the client → agent direction ended.
#[derive(Debug, PartialEq, Eq)]
enum ClientEnd {
    /// The client closed the WebSocket.
    Gone,
    /// The agent no longer accepts input (its side ended).
    AgentClosed,
}

async fn client_to_agent<St>(stream: &mut St, tx: &mpsc::Sender<ExecInput>) -> ClientEnd
where
    St: Stream<Item = Frame> + Unpin,
{
    while let Some(frame) = stream.next().await {
        let kind = match frame {
            Frame::Binary(b) => match proto::split_frame(&b) {
                Some((proto::STDIN, data)) if !data.is_empty() => InKind::Stdin(data.to_vec()),
                _ => continue,
            },
            Frame::Text(t) => match serde_json::from_str::<ClientControl>(&t) {
                Ok(ClientControl::Resize { cols, rows }) => InKind::Resize(Resize {
                    cols: u32::from(cols),
                    rows: u32::from(rows),
                }),
                Ok(ClientControl::Signal { signal }) => InKind::Signal(signal),
                Ok(ClientControl::Eof) => InKind::CloseStdin(true),
                Ok(ClientControl::Start { .. }) => {
                    tracing::debug!("ignoring a second start message");
                    continue;
                }
                Err(e) => {
                    tracing::debug!("ignoring an invalid control message: {e}");
                    continue;
                }
            },
            Frame::Close | Frame::CloseWith(..) => return ClientEnd::Gone,
        };
        // Awaiting here is the backpressure: a full channel stops reading the WebSocket.
        if tx.send(ExecInput { kind: Some(kind) }).await.is_err() {
            return ClientEnd::AgentClosed;
        }
    }
    ClientEnd::Gone
}

async fn agent_to_client<Si, O>(sink: &mut Si, output: &mut O)
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    O: Stream<Item = Result<ExecOutput, tonic::Status>> + Unpin,
{
    loop {
        let frame = match output.next().await {
            Some(Ok(ExecOutput {
                kind: Some(OutKind::Stdout(d)),
            })) => Frame::Binary(Bytes::from(proto::frame(proto::STDOUT, &d))),
            Some(Ok(ExecOutput {
                kind: Some(OutKind::Stderr(d)),
            })) => Frame::Binary(Bytes::from(proto::frame(proto::STDERR, &d))),
            Some(Ok(ExecOutput {
                kind: Some(OutKind::Exit(exit)),
            })) => {
                let _ = sink
                    .send(control(&ServerControl::Exit { code: exit.code }))
                    .await;
                let _ = sink.send(Frame::Close).await;
                let _ = sink.close().await;
                return;
            }
            Some(Ok(ExecOutput { kind: None })) => continue,
            Some(Err(status)) => {
                return send_error(sink, format!("agent session failed: {}", status.message()))
                    .await;
            }
            None => {
                return send_error(
                    sink,
                    "the agent ended the session without an exit status".into(),
                )
                .await;
            }
        };
        if let Err(e) = sink.send(frame).await {
            tracing::debug!("client went away: {e}");
            return;
        }
    }
}

/// Pumps an established session until the process exits or the client leaves.
pub async fn pump<Si, St, O>(
    mut sink: Si,
    mut stream: St,
    tx: mpsc::Sender<ExecInput>,
    mut output: O,
) where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Frame> + Unpin,
    O: Stream<Item = Result<ExecOutput, tonic::Status>> + Unpin,
{
    let client_gone = {
        let a2c = agent_to_client(&mut sink, &mut output);
        tokio::pin!(a2c);
        let c2a = client_to_agent(&mut stream, &tx);
        tokio::pin!(c2a);
        let mut input_done = false;
        loop {
            tokio::select! {
                () = &mut a2c => break false,
                end = &mut c2a, if !input_done => {
                    input_done = true;
                    if end == ClientEnd::Gone {
                        break true;
                    }
                }
            }
        }
    };
    if client_gone {
        // Nobody will read the output: hang up the remote process and stop.
        let _ = tx.try_send(ExecInput {
            kind: Some(InKind::Signal(SIGHUP)),
        });
        return;
    }
    // We sent exit + close.
    drain_until_close(&mut stream).await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::channel::mpsc as fmpsc;
    use ironlab_api::agent::Exit;

    use super::*;

    fn out(kind: OutKind) -> Result<ExecOutput, tonic::Status> {
        Ok(ExecOutput { kind: Some(kind) })
    }

    /// A fake agent: echoes stdin as stdout (uppercased) and exits 7 at EOF.
    fn fake_agent(
        mut rx: mpsc::Receiver<ExecInput>,
    ) -> (
        tokio::task::JoinHandle<Vec<ExecInput>>,
        mpsc::Receiver<Result<ExecOutput, tonic::Status>>,
    ) {
        let (otx, orx) = mpsc::channel(4);
        let h = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(i) = rx.recv().await {
                seen.push(i.clone());
                match i.kind {
                    Some(InKind::Stdin(d)) => {
                        let _ = otx.send(out(OutKind::Stdout(d.to_ascii_uppercase()))).await;
                        let _ = otx.send(out(OutKind::Stderr(b"e".to_vec()))).await;
                    }
                    Some(InKind::CloseStdin(_)) => {
                        let _ = otx
                            .send(out(OutKind::Exit(Exit { code: 7, signal: 0 })))
                            .await;
                        break;
                    }
                    _ => {}
                }
            }
            seen
        });
        (h, orx)
    }

    #[tokio::test]
    async fn pump_relays_both_ways_and_ends_with_exit() {
        let (tx, rx) = mpsc::channel(INPUT_BUFFER);
        let (agent, orx) = fake_agent(rx);
        let (client_tx, client_rx) = fmpsc::channel::<Frame>(8);
        let (server_tx, mut server_rx) = fmpsc::channel::<Frame>(8);
        let pump_task = tokio::spawn(pump(server_tx, client_rx, tx, ReceiverStream::new(orx)));
        let mut client_tx = client_tx;
        client_tx
            .send(Frame::Text(
                r#"{"type":"resize","cols":100,"rows":30}"#.into(),
            ))
            .await
            .expect("send");
        client_tx
            .send(Frame::Binary(Bytes::from(proto::frame(
                proto::STDIN,
                b"hi",
            ))))
            .await
            .expect("send");
        assert_eq!(
            server_rx.next().await,
            Some(Frame::Binary(Bytes::from(proto::frame(
                proto::STDOUT,
                b"HI"
            ))))
        );
        assert_eq!(
            server_rx.next().await,
            Some(Frame::Binary(Bytes::from(proto::frame(
                proto::STDERR,
                b"e"
            ))))
        );
        client_tx
            .send(Frame::Text(r#"{"type":"eof"}"#.into()))
            .await
            .expect("send");
        assert_eq!(
            server_rx.next().await,
            Some(Frame::Text(r#"{"type":"exit","code":7}"#.into()))
        );
        assert_eq!(server_rx.next().await, Some(Frame::Close));
        tokio::time::timeout(Duration::from_secs(5), pump_task)
            .await
            .expect("pump ends after exit")
            .expect("pump task");
        let seen = agent.await.expect("agent");
        assert!(matches!(
            seen[0].kind,
            Some(InKind::Resize(Resize {
                cols: 100,
                rows: 30
            }))
        ));
    }

    #[tokio::test]
    async fn slow_client_holds_back_the_agent() {
        // The agent tries to send far more output than any buffer holds; the client reads
        // nothing. The agent must block on the bounded gRPC-side channel.
        let (tx, _rx) = mpsc::channel(INPUT_BUFFER);
        let (otx, orx) = mpsc::channel(4);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = sent.clone();
        let producer = tokio::spawn(async move {
            for _ in 0..10_000 {
                if otx
                    .send(out(OutKind::Stdout(vec![b'y'; 1024])))
                    .await
                    .is_err()
                {
                    break;
                }
                s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let (_client_tx, client_rx) = fmpsc::channel::<Frame>(1);
        let (server_tx, server_rx) = fmpsc::channel::<Frame>(1);
        let pump_task = tokio::spawn(pump(server_tx, client_rx, tx, ReceiverStream::new(orx)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            n < 20,
            "the producer ran ahead by {n} messages: output is not bounded"
        );
        drop(server_rx);
        pump_task.abort();
        producer.abort();
    }

    #[test]
    fn output_frames_are_coalesced_and_capped() {
        let chunks = vec![
            Bytes::from(vec![b'a'; 40 * 1024]),
            Bytes::from(vec![b'b'; 40 * 1024]),
            Bytes::from_static(b"c"),
        ];
        let frames = stdout_frames(&chunks);
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| match f {
                Frame::Binary(b) => {
                    assert_eq!(b[0], proto::STDOUT);
                    b.len() - 1
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![MAX_FRAME_DATA, 80 * 1024 + 1 - MAX_FRAME_DATA]);
        assert!(stdout_frames(&[]).is_empty());
    }

    /// Reads server frames until one matches, with a timeout.
    async fn read_until(
        rx: &mut fmpsc::Receiver<Frame>,
        mut want: impl FnMut(&Frame) -> bool,
    ) -> Vec<Frame> {
        let mut seen = Vec::new();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(5), rx.next())
                .await
                .expect("a frame in time")
                .expect("a frame");
            let done = want(&f);
            seen.push(f);
            if done {
                return seen;
            }
        }
    }

    #[tokio::test]
    async fn attached_clients_get_replay_then_live_and_a_newer_client_takes_over() {
        use crate::sessions::{Limits, Sessions};
        let sessions = Sessions::new(Limits::default());
        let (itx, mut irx) = mpsc::channel(INPUT_BUFFER);
        let (otx, orx) = mpsc::channel(4);
        let att = sessions
            .create("r1", "m1", "alice", itx, Box::pin(ReceiverStream::new(orx)))
            .expect("create");
        let id = att.session.id().to_string();

        // First client: started, then live output; its input reaches the agent.
        let (mut c1_tx, c1_rx) = fmpsc::channel::<Frame>(8);
        let (s1_tx, mut s1_rx) = fmpsc::channel::<Frame>(8);
        let first = tokio::spawn(serve_attachment(s1_tx, c1_rx, att));
        let f = read_until(&mut s1_rx, |_| true).await;
        assert_eq!(
            f[0],
            control(&ServerControl::Started {
                session: id.clone()
            })
        );
        otx.send(out(OutKind::Stdout(b"hello\r\n".to_vec())))
            .await
            .expect("agent output");
        let f = read_until(&mut s1_rx, |f| matches!(f, Frame::Binary(_))).await;
        assert_eq!(
            f.last(),
            Some(&Frame::Binary(Bytes::from(proto::frame(
                proto::STDOUT,
                b"hello\r\n"
            ))))
        );
        c1_tx
            .send(Frame::Binary(Bytes::from(proto::frame(
                proto::STDIN,
                b"ls\r",
            ))))
            .await
            .expect("input");
        let got = tokio::time::timeout(Duration::from_secs(5), irx.recv())
            .await
            .expect("input in time")
            .expect("input");
        assert!(matches!(got.kind, Some(InKind::Stdin(ref d)) if d == b"ls\r"));

        // A second client attaches: the first is closed with CLOSE_REPLACED, the second gets
        // started + the replay, then live output.
        let att2 = sessions.attach("r1", "m1", &id, "alice").expect("attach");
        let (_c2_tx, c2_rx) = fmpsc::channel::<Frame>(8);
        let (s2_tx, mut s2_rx) = fmpsc::channel::<Frame>(8);
        let second = tokio::spawn(serve_attachment(s2_tx, c2_rx, att2));
        let f = read_until(&mut s1_rx, |f| matches!(f, Frame::CloseWith(..))).await;
        assert!(matches!(
            f.last(),
            Some(Frame::CloseWith(CLOSE_REPLACED, _))
        ));
        tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("first connection ends")
            .expect("task");
        let f = read_until(&mut s2_rx, |f| matches!(f, Frame::Binary(_))).await;
        assert_eq!(
            f,
            vec![
                control(&ServerControl::Started {
                    session: id.clone()
                }),
                Frame::Binary(Bytes::from(proto::frame(proto::STDOUT, b"hello\r\n")))
            ]
        );
        otx.send(out(OutKind::Stdout(b"$ ".to_vec())))
            .await
            .expect("agent output");
        let f = read_until(&mut s2_rx, |f| matches!(f, Frame::Binary(_))).await;
        assert_eq!(
            f,
            vec![Frame::Binary(Bytes::from(proto::frame(
                proto::STDOUT,
                b"$ "
            )))]
        );
        // The process exits: exit, close, and the session is gone.
        otx.send(out(OutKind::Exit(Exit { code: 0, signal: 0 })))
            .await
            .expect("exit");
        let f = read_until(&mut s2_rx, |f| *f == Frame::Close).await;
        assert_eq!(
            f,
            vec![
                Frame::Text(r#"{"type":"exit","code":0}"#.into()),
                Frame::Close
            ]
        );
        drop(_c2_tx);
        tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("second connection ends")
            .expect("task");
        assert!(sessions.is_empty());
    }

    #[tokio::test]
    async fn a_client_leaving_a_pty_session_only_detaches() {
        use crate::sessions::{Limits, Sessions};
        let sessions = Sessions::new(Limits::default());
        let (itx, mut irx) = mpsc::channel(INPUT_BUFFER);
        let (otx, orx) = mpsc::channel(4);
        let att = sessions
            .create("r1", "m1", "alice", itx, Box::pin(ReceiverStream::new(orx)))
            .expect("create");
        let id = att.session.id().to_string();
        let (c_tx, c_rx) = fmpsc::channel::<Frame>(8);
        let (s_tx, _s_rx) = fmpsc::channel::<Frame>(8);
        let task = tokio::spawn(serve_attachment(s_tx, c_rx, att));
        drop(c_tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the connection ends")
            .expect("task");
        assert!(irx.try_recv().is_err(), "no hang-up was sent");
        otx.send(out(OutKind::Stdout(b"while away\n".to_vec())))
            .await
            .expect("the session still reads output");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = sessions.attach("r1", "m1", &id, "alice").expect("reattach");
        assert_eq!(again.replay, vec![Bytes::from_static(b"while away\n")]);
    }

    #[tokio::test]
    async fn client_leaving_hangs_up_the_process() {
        let (tx, mut rx) = mpsc::channel(INPUT_BUFFER);
        let (_otx, orx) = mpsc::channel::<Result<ExecOutput, tonic::Status>>(4);
        let (client_tx, client_rx) = fmpsc::channel::<Frame>(1);
        let (server_tx, _server_rx) = fmpsc::channel::<Frame>(8);
        let pump_task = tokio::spawn(pump(server_tx, client_rx, tx, ReceiverStream::new(orx)));
        drop(client_tx);
        tokio::time::timeout(Duration::from_secs(5), pump_task)
            .await
            .expect("pump ends when the client leaves")
            .expect("pump task");
        let msg = rx.recv().await.expect("a hang-up signal");
        assert!(matches!(msg.kind, Some(InKind::Signal(SIGHUP))));
    }
}
