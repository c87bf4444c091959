//! Client side of the worker's published-port WebSocket (`ironlab_api::portfwd`): opens it and
//! relays bytes between it and a local byte stream. Used by the http-port proxy
//! ([`crate::web::ports`]) and by the CLI (`ironlab port-forward`, `ironlab ssh-proxy`).
//!
//! Who talks to whom: [`open`] connects to the URL a `POST /api/v1/runs/{id}/connect` with
//! `port` returned; [`pump`] then copies local reads into binary frames (end of file → the `eof`
//! text frame) and binary frames into local writes (`eof` → shutdown of the local write side)
//! until the worker closes. One direction waits while the other's write is pending, so neither
//! buffers more than one read.

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use ironlab_api::portfwd::{CLOSE_FAILED, EOF};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Largest chunk read from the local side per frame.
pub const CHUNK_SIZE: usize = 32 * 1024;

/// An open port WebSocket to the worker.
pub type PortSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a port connection failed.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// The worker refused the upgrade (bad token, nothing listening on the port: 502, …).
    #[error("{detail}")]
    Refused {
        /// HTTP status of the refusal.
        status: u16,
        /// The worker's explanation.
        detail: String,
    },
    /// The worker could not be reached or the WebSocket broke.
    #[error("the connection to the worker failed")]
    WebSocket(#[source] tungstenite::Error),
    /// The connection inside the machine failed (reset, …).
    #[error("{0}")]
    Broken(String),
}

/// Opens the port WebSocket at `url` (with its token).
pub async fn open(url: &str) -> Result<PortSocket, PortError> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let detail = serde_json::from_str::<ironlab_api::ErrorBody>(&body)
                .map(|b| b.detail)
                .unwrap_or_else(|_| body.trim().to_string());
            Err(PortError::Refused { status, detail })
        }
        Err(e) => Err(PortError::WebSocket(e)),
    }
}

/// Relays between `ws` and a local reader/writer until the worker closes the connection (both
/// directions done), the local side goes away, or the connection fails.
pub async fn pump<R, W>(ws: PortSocket, mut reader: R, mut writer: W) -> Result<(), PortError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut reading = true;
    let mut writing = true;
    loop {
        tokio::select! {
            n = reader.read(&mut buf), if reading => match n {
                Ok(0) => {
                    reading = false;
                    sink.send(Message::Text(EOF.into()))
                        .await
                        .map_err(PortError::WebSocket)?;
                }
                Ok(n) => sink
                    .send(Message::Binary(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .map_err(PortError::WebSocket)?,
                Err(e) => {
                    tracing::debug!(error = %e, "local side failed; closing");
                    let _ = sink.send(Message::Close(None)).await;
                    return Ok(());
                }
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    if !writing {
                        continue;
                    }
                    let written = async {
                        writer.write_all(&data).await?;
                        writer.flush().await
                    };
                    if let Err(e) = written.await {
                        tracing::debug!(error = %e, "local side went away; closing");
                        let _ = sink.send(Message::Close(None)).await;
                        return Ok(());
                    }
                }
                Some(Ok(Message::Text(t))) if t.as_str() == EOF => {
                    writing = false;
                    let _ = writer.shutdown().await;
                }
                Some(Ok(Message::Close(frame))) => {
                    return match frame {
                        Some(f) if u16::from(f.code) == CLOSE_FAILED => {
                            Err(PortError::Broken(f.reason.to_string()))
                        }
                        _ => Ok(()),
                    };
                }
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed)) | None => return Ok(()),
                Some(Err(e)) => return Err(PortError::WebSocket(e)),
            },
        }
    }
}
