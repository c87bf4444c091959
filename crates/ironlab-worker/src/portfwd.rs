//! Published ports: a client WebSocket (`ironlab port-forward`, `ssh-proxy`, the control plane's
//! http-port proxy) ↔ the agent's `Dial` gRPC stream ↔ a TCP port inside the machine.
//!
//! Who talks to whom: `api.rs` checks the single-use port token, calls [`dial`] (so a refused
//! port becomes an HTTP 502 before any upgrade), then upgrades and hands the socket (as
//! [`Frame`] sink + stream) to [`pump`]. The protocol is in `ironlab_api::portfwd`: binary
//! frames are bytes, the text frame `eof` is a half-close, a close frame ends everything.
//!
//! Both directions are bounded: client frames go to the agent through a channel of
//! [`INPUT_BUFFER`] messages (a full channel stops reading the WebSocket), and agent output is
//! pulled only once the WebSocket took the previous frame.

use std::fmt::Display;

use bytes::Bytes;
use futures::{Sink, SinkExt, Stream, StreamExt};
use ironlab_api::agent::{DialInput, DialOpen, DialOutput, dial_input, dial_output};
use ironlab_api::portfwd::{CLOSE_FAILED, EOF};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::relay::Frame;
use crate::runs::MachineAgent;

/// Client messages buffered towards the agent before reading the WebSocket pauses.
pub const INPUT_BUFFER: usize = 8;
/// How long to wait for the client's close after the server closed.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Longest close reason (RFC 6455 allows 123 bytes).
const MAX_REASON: usize = 120;

/// The agent's output for one connection.
pub type DialStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<DialOutput, tonic::Status>> + Send + 'static>>;

/// An established connection to a port inside a machine.
pub struct Dialed {
    /// Input towards the agent (data, `close_write`).
    pub input: mpsc::Sender<DialInput>,
    /// The agent's output after `connected`.
    pub output: DialStream,
    /// The address the agent connected to.
    pub peer: String,
}

/// Why a port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Nothing accepted the connection in the machine (refused, unreachable, timeout).
    #[error("{0}")]
    Refused(String),
    /// The agent failed or answered nonsense.
    #[error("the machine's agent failed: {0}")]
    Agent(String),
}

/// Asks the machine's agent to connect to `127.0.0.1:port` inside the machine.
pub async fn dial(agent: &MachineAgent, port: u16) -> Result<Dialed, DialError> {
    let (tx, rx) = mpsc::channel::<DialInput>(INPUT_BUFFER);
    tx.send(DialInput {
        kind: Some(dial_input::Kind::Open(DialOpen {
            host: String::new(),
            port: u32::from(port),
        })),
    })
    .await
    .map_err(|_| DialError::Agent("cannot queue the open message".into()))?;
    let mut client = agent.client.clone();
    let mut output = match client.dial(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            return Err(match status.code() {
                tonic::Code::Unavailable | tonic::Code::NotFound | tonic::Code::InvalidArgument => {
                    DialError::Refused(status.message().to_string())
                }
                // A machine started before its agent learnt `Dial` keeps that agent.
                tonic::Code::Unimplemented => DialError::Refused(
                    "the agent in this machine is too old to open ports: start a new run".into(),
                ),
                _ => DialError::Agent(status.message().to_string()),
            });
        }
    };
    match output.message().await {
        Ok(Some(DialOutput {
            kind: Some(dial_output::Kind::Connected(c)),
        })) => Ok(Dialed {
            input: tx,
            output: Box::pin(output),
            peer: c.peer,
        }),
        Ok(other) => Err(DialError::Agent(format!(
            "expected `connected`, got {other:?}"
        ))),
        Err(status) => Err(DialError::Refused(status.message().to_string())),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Why the client → agent direction ended.
#[derive(Debug, PartialEq, Eq)]
enum ClientEnd {
    /// The client closed the WebSocket (or it broke).
    Gone,
    /// The agent no longer takes input.
    AgentClosed,
}

async fn client_to_agent<St>(stream: &mut St, tx: &mpsc::Sender<DialInput>) -> ClientEnd
where
    St: Stream<Item = Frame> + Unpin,
{
    let mut write_closed = false;
    while let Some(frame) = stream.next().await {
        let kind = match frame {
            Frame::Binary(b) if !b.is_empty() && !write_closed => {
                dial_input::Kind::Data(b.to_vec())
            }
            Frame::Text(t) if t == EOF && !write_closed => {
                write_closed = true;
                dial_input::Kind::CloseWrite(true)
            }
            // Empty frames, data after `eof`, unknown text: ignored.
            Frame::Binary(_) | Frame::Text(_) => continue,
            Frame::Close | Frame::CloseWith(..) => return ClientEnd::Gone,
        };
        // Awaiting room is the backpressure: a full channel stops reading the WebSocket.
        if tx.send(DialInput { kind: Some(kind) }).await.is_err() {
            return ClientEnd::AgentClosed;
        }
    }
    ClientEnd::Gone
}

/// Sends agent output to the client until the agent's stream ends; returns the closing frame.
async fn agent_to_client<Si, O>(sink: &mut Si, output: &mut O) -> Option<Frame>
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    O: Stream<Item = Result<DialOutput, tonic::Status>> + Unpin,
{
    loop {
        let frame = match output.next().await {
            Some(Ok(DialOutput {
                kind: Some(dial_output::Kind::Data(d)),
            })) => Frame::Binary(Bytes::from(d)),
            Some(Ok(DialOutput {
                kind: Some(dial_output::Kind::Eof(_)),
            })) => Frame::Text(EOF.to_string()),
            Some(Ok(_)) => continue,
            Some(Err(status)) => {
                return Some(Frame::CloseWith(
                    CLOSE_FAILED,
                    truncate(status.message().to_string(), MAX_REASON),
                ));
            }
            None => return Some(Frame::Close),
        };
        if let Err(e) = sink.send(frame).await {
            tracing::debug!("port client went away: {e}");
            return None;
        }
    }
}

/// Relays one established connection until both directions are done, it fails, or the client
/// leaves (which drops the connection inside the machine).
pub async fn pump<Si, St>(mut sink: Si, mut stream: St, dialed: Dialed)
where
    Si: Sink<Frame> + Unpin,
    Si::Error: Display,
    St: Stream<Item = Frame> + Unpin,
{
    let Dialed {
        input, mut output, ..
    } = dialed;
    let close = {
        let a2c = agent_to_client(&mut sink, &mut output);
        tokio::pin!(a2c);
        let c2a = client_to_agent(&mut stream, &input);
        tokio::pin!(c2a);
        let mut input_done = false;
        loop {
            tokio::select! {
                close = &mut a2c => break close,
                end = &mut c2a, if !input_done => {
                    input_done = true;
                    if end == ClientEnd::Gone {
                        // Dropping the input (without close_write) makes the agent drop the
                        // socket.
                        return;
                    }
                }
            }
        }
    };
    drop(input);
    let Some(close) = close else { return };
    let _ = sink.send(close).await;
    let _ = sink.close().await;
    // Let the client's close arrive before the connection drops.
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(f) = stream.next().await {
            if matches!(f, Frame::Close | Frame::CloseWith(..)) {
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

    use super::*;

    fn out(kind: dial_output::Kind) -> Result<DialOutput, tonic::Status> {
        Ok(DialOutput { kind: Some(kind) })
    }

    fn dialed(
        input: mpsc::Sender<DialInput>,
        output: mpsc::Receiver<Result<DialOutput, tonic::Status>>,
    ) -> Dialed {
        Dialed {
            input,
            output: Box::pin(ReceiverStream::new(output)),
            peer: "127.0.0.1:80".into(),
        }
    }

    async fn next<T>(rx: &mut (impl Stream<Item = T> + Unpin)) -> T {
        tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("in time")
            .expect("an item")
    }

    #[tokio::test]
    async fn bytes_and_half_closes_cross_in_both_directions() {
        let (in_tx, in_rx) = mpsc::channel(INPUT_BUFFER);
        let mut in_rx = ReceiverStream::new(in_rx);
        let (out_tx, out_rx) = mpsc::channel(4);
        let (mut client_tx, client_rx) = fmpsc::channel::<Frame>(8);
        let (server_tx, mut server_rx) = fmpsc::channel::<Frame>(8);
        let task = tokio::spawn(pump(server_tx, client_rx, dialed(in_tx, out_rx)));

        client_tx
            .send(Frame::Binary(Bytes::from_static(b"GET /")))
            .await
            .expect("send");
        client_tx
            .send(Frame::Text("eof".into()))
            .await
            .expect("send");
        let got = next(&mut in_rx).await;
        assert_eq!(got.kind, Some(dial_input::Kind::Data(b"GET /".to_vec())));
        let got = next(&mut in_rx).await;
        assert_eq!(got.kind, Some(dial_input::Kind::CloseWrite(true)));

        out_tx
            .send(out(dial_output::Kind::Data(b"200 OK".to_vec())))
            .await
            .expect("agent output");
        out_tx
            .send(out(dial_output::Kind::Eof(true)))
            .await
            .expect("agent eof");
        drop(out_tx);
        assert_eq!(
            next(&mut server_rx).await,
            Frame::Binary(Bytes::from_static(b"200 OK"))
        );
        assert_eq!(next(&mut server_rx).await, Frame::Text("eof".into()));
        assert_eq!(next(&mut server_rx).await, Frame::Close);
        client_tx.send(Frame::Close).await.expect("client close");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("pump ends")
            .expect("task");
    }

    #[tokio::test]
    async fn a_broken_connection_closes_with_the_reason() {
        let (in_tx, _in_rx) = mpsc::channel(INPUT_BUFFER);
        let (out_tx, out_rx) = mpsc::channel(4);
        let (_client_tx, client_rx) = fmpsc::channel::<Frame>(8);
        let (server_tx, mut server_rx) = fmpsc::channel::<Frame>(8);
        let task = tokio::spawn(pump(server_tx, client_rx, dialed(in_tx, out_rx)));
        out_tx
            .send(Err(tonic::Status::unavailable(
                "connection to 127.0.0.1:80 failed: Connection reset by peer",
            )))
            .await
            .expect("agent error");
        assert_eq!(
            next(&mut server_rx).await,
            Frame::CloseWith(
                CLOSE_FAILED,
                "connection to 127.0.0.1:80 failed: Connection reset by peer".into()
            )
        );
        drop(_client_tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("pump ends")
            .expect("task");
    }

    #[tokio::test]
    async fn a_client_leaving_drops_the_connection() {
        let (in_tx, mut in_rx) = mpsc::channel(INPUT_BUFFER);
        let (_out_tx, out_rx) = mpsc::channel(4);
        let (client_tx, client_rx) = fmpsc::channel::<Frame>(8);
        let (server_tx, _server_rx) = fmpsc::channel::<Frame>(8);
        let task = tokio::spawn(pump(server_tx, client_rx, dialed(in_tx, out_rx)));
        drop(client_tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("pump ends")
            .expect("task");
        // The input ended without close_write: the agent drops the socket.
        assert!(in_rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_holds_back_the_agent() {
        let (in_tx, _in_rx) = mpsc::channel(INPUT_BUFFER);
        let (out_tx, out_rx) = mpsc::channel(4);
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let s2 = sent.clone();
        let producer = tokio::spawn(async move {
            for _ in 0..10_000 {
                if out_tx
                    .send(out(dial_output::Kind::Data(vec![b'y'; 1024])))
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
        let task = tokio::spawn(pump(server_tx, client_rx, dialed(in_tx, out_rx)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let n = sent.load(std::sync::atomic::Ordering::SeqCst);
        assert!(n < 20, "the agent ran ahead by {n} messages: not bounded");
        drop(server_rx);
        task.abort();
        producer.abort();
    }
}
