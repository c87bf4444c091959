//! The terminal relay: a client WebSocket (CLI, browser) ↔ the agent's `Exec` gRPC stream.
//!
//! Who talks to whom: `api.rs` upgrades the connection after checking the single-use token and
//! hands the socket (as [`Frame`] sink + stream) and an agent client to [`relay`]. The first client
//! text frame must be `start`; after that two directions run concurrently:
//! client binary `0|data` / `resize` / `signal` / `eof` → `ExecInput`s, and agent
//! stdout/stderr/exit → binary `1|data` / `2|data` and a final `{"type":"exit","code":N}`.
//! Both directions are bounded: the input channel holds a few messages and output is pulled from
//! the gRPC stream only when the WebSocket accepted the previous frame, so a flood in either
//! direction is held back by flow control, not buffered.

use std::fmt::Display;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use ironlab_api::agent::exec_input::Kind as InKind;
use ironlab_api::agent::exec_output::Kind as OutKind;
use ironlab_api::agent::{ExecInput, ExecOutput, ExecStart, Resize};
use ironlab_api::relay::{self as proto, ClientControl, ServerControl};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::runs::MachineAgent;

/// Input messages buffered towards the agent before reading from the client pauses.
const INPUT_BUFFER: usize = 16;
/// SIGHUP: sent to the remote process when the client goes away without an exit.
const SIGHUP: i32 = 1;
/// How long to wait for the client's close after the server closed.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A WebSocket message, independent of the WebSocket library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame (JSON control message).
    Text(String),
    /// A binary frame (stream byte + data).
    Binary(Bytes),
    /// The peer closed (incoming) / close the connection (outgoing).
    Close,
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

/// Runs one terminal session: reads `start`, opens `Exec` on the agent and pumps until exit.
pub async fn relay<Si, St>(mut sink: Si, mut stream: St, agent: MachineAgent)
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Frame> + Unpin,
{
    let start = match stream.next().await {
        Some(Frame::Text(t)) => match serde_json::from_str::<ClientControl>(&t) {
            Ok(ClientControl::Start {
                command,
                tty,
                cols,
                rows,
                env,
                term,
            }) => ExecStart {
                argv: command,
                user: agent.default_user.clone(),
                env: agent.image_env.iter().cloned().chain(env).collect(),
                cwd: String::new(),
                tty,
                cols: u32::from(cols),
                rows: u32::from(rows),
                term: term.unwrap_or_default(),
            },
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
        Some(Frame::Close) | None => return,
    };
    let (tx, rx) = mpsc::channel::<ExecInput>(INPUT_BUFFER);
    if tx
        .send(ExecInput {
            kind: Some(InKind::Start(start)),
        })
        .await
        .is_err()
    {
        return;
    }
    let mut client = agent.client;
    let output = match client.exec(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return send_error(
                &mut sink,
                format!("cannot start the process: {}", status.message()),
            )
            .await;
        }
    };
    if sink.send(control(&ServerControl::Started)).await.is_err() {
        return;
    }
    pump(sink, stream, tx, output).await;
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
            Frame::Close => return ClientEnd::Gone,
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
    // We sent exit + close: let the client's remaining frames and its close arrive before the
    // connection drops, or unread data would make the kernel reset it under the exit frame.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(f) = stream.next().await {
            if f == Frame::Close {
                break;
            }
        }
    })
    .await;
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
