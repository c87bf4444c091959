//! `ironlab ssh RUN [--machine M] [-- CMD...]`: the terminal path the browser uses too.
//!
//! CLI → control plane `POST /api/v1/runs/{id}/connect` (single-use token) → WebSocket to the
//! worker relay → agent exec/PTY. Frames follow `ironlab_api::relay`. With a command: no PTY,
//! stdout and stderr kept apart, our stdin forwarded when it is not a terminal, exit with the
//! remote status. Without: a PTY, our terminal in raw mode (restored on every exit path,
//! panics included), window size changes forwarded. The PTY session is persistent on the
//! worker: when the connection drops unexpectedly, `ssh` fetches a fresh token and attaches to
//! the same session again (at most [`MAX_REATTACH`] times), clearing the screen before the
//! worker replays recent output.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self, CLOSE_REPLACED, ClientControl, ServerControl};
use ironlab_api::v1::{ConnectResponse, RunState, RunView};
use reqwest::Method;
use rustix::termios::{self, OptionalActions, Termios};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::signal::unix::{SignalKind, signal};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::cli::SshArgs;
use crate::client::Api;

/// Times an interactive session is re-attached after unexpected drops.
const MAX_REATTACH: u32 = 3;
/// Pause before re-attaching.
const REATTACH_DELAY: std::time::Duration = std::time::Duration::from_millis(500);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type WsSink = futures::stream::SplitSink<Ws, Message>;
type WsStream = futures::stream::SplitStream<Ws>;

/// The terminal settings to put back, for the panic hook.
static SAVED_TERMIOS: Mutex<Option<Termios>> = Mutex::new(None);

fn restore_terminal() {
    if let Ok(mut saved) = SAVED_TERMIOS.lock()
        && let Some(t) = saved.take()
    {
        let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &t);
    }
}

/// Puts stdin's terminal in raw mode until dropped.
struct RawMode;

impl RawMode {
    fn enable() -> anyhow::Result<Self> {
        let stdin = std::io::stdin();
        let orig = termios::tcgetattr(&stdin).context("cannot read the terminal settings")?;
        let mut raw = orig.clone();
        raw.make_raw();
        if let Ok(mut saved) = SAVED_TERMIOS.lock() {
            *saved = Some(orig);
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
        termios::tcsetattr(&stdin, OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn window_size() -> (u16, u16) {
    termios::tcgetwinsize(std::io::stdout())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map(|w| (w.ws_col, w.ws_row))
        .unwrap_or((80, 24))
}

fn control(msg: &ClientControl) -> anyhow::Result<Message> {
    Ok(Message::Text(serde_json::to_string(msg)?.into()))
}

fn describe_ws_error(e: tungstenite::Error, url: &str) -> anyhow::Error {
    let base = url.split('?').next().unwrap_or(url).to_string();
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status();
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let detail = serde_json::from_str::<ironlab_api::ErrorBody>(&body)
                .map(|b| b.detail)
                .unwrap_or_else(|_| body.trim().to_string());
            anyhow::anyhow!(
                "the terminal relay at {base} refused the connection ({status}): {detail}"
            )
        }
        other => anyhow::Error::new(other).context(format!("cannot open the terminal at {base}")),
    }
}

pub(crate) fn is_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<crate::client::ApiError>()
        .is_some_and(|a| a.status == reqwest::StatusCode::CONFLICT)
}

/// A run that is still pending/starting is waited for (long-poll); true once it is running.
pub(crate) async fn wait_until_running(api: &Api, run: &str) -> anyhow::Result<bool> {
    loop {
        let view: RunView = api
            .call(Method::GET, &format!("/runs/{run}?wait=30"), None)
            .await?;
        match view.state {
            RunState::Running => return Ok(true),
            RunState::Pending | RunState::Starting | RunState::Restarting => continue,
            RunState::Destroying
            | RunState::Destroyed
            | RunState::Failed
            | RunState::Stopping
            | RunState::Stopped => return Ok(false),
        }
    }
}

/// Asks the control plane for a terminal token and opens the WebSocket.
async fn open(api: &Api, args: &SshArgs) -> anyhow::Result<(WsSink, WsStream)> {
    let body = match &args.machine {
        Some(m) => json!({ "machine": m }),
        None => json!({}),
    };
    let connect_path = format!("/runs/{}/connect", args.run);
    let conn: ConnectResponse = match api.call(Method::POST, &connect_path, Some(&body)).await {
        Ok(c) => c,
        Err(e) if is_conflict(&e) && wait_until_running(api, &args.run).await? => {
            api.call(Method::POST, &connect_path, Some(&body)).await?
        }
        Err(e) => return Err(e),
    };
    let (ws, _) = tokio_tungstenite::connect_async(conn.url.as_str())
        .await
        .map_err(|e| describe_ws_error(e, &conn.url))?;
    Ok(ws.split())
}

/// Opens a new connection and attaches it to `session` with the current window size.
async fn reattach(api: &Api, args: &SshArgs, session: &str) -> anyhow::Result<(WsSink, WsStream)> {
    tokio::time::sleep(REATTACH_DELAY).await;
    let (mut sink, stream) = open(api, args).await?;
    let (cols, rows) = window_size();
    sink.send(control(&ClientControl::Start {
        command: Vec::new(),
        tty: true,
        cols,
        rows,
        env: BTreeMap::new(),
        term: None,
        session: Some(session.to_string()),
    })?)
    .await
    .context("cannot re-attach to the terminal session")?;
    Ok((sink, stream))
}

/// Runs `ssh`; returns the remote exit status.
pub async fn run(args: SshArgs, api: &Api) -> anyhow::Result<i32> {
    let (mut sink, mut stream) = open(api, &args).await?;

    let tty = args.command.is_empty();
    let stdin_is_tty = std::io::stdin().is_terminal();
    let (cols, rows) = if tty { window_size() } else { (0, 0) };
    sink.send(control(&ClientControl::Start {
        command: args.command.clone(),
        tty,
        cols,
        rows,
        env: BTreeMap::new(),
        term: tty.then(|| std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into())),
        session: None,
    })?)
    .await
    .context("cannot start the remote session")?;

    // Raw mode only for an interactive session on a real terminal.
    let _raw = if tty && stdin_is_tty {
        Some(RawMode::enable()?)
    } else {
        None
    };

    // Forward stdin: always for a PTY session; for a command only when it is a pipe/file.
    let forward_stdin = tty || !stdin_is_tty;
    let (in_tx, mut in_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(16);
    if forward_stdin {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = in_tx.send(None).await;
                        break;
                    }
                    Ok(n) => {
                        if in_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    } else {
        drop(in_tx);
        sink.send(control(&ClientControl::Eof)?).await?;
    }
    let mut stdin_open = forward_stdin;

    let mut winch = signal(SignalKind::window_change()).context("cannot watch window size")?;
    let mut interrupts = 0u32;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();

    let mut session: Option<String> = None;
    let mut reattached = 0u32;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let broken = match msg {
                    Some(Ok(Message::Binary(data))) => {
                        match relay::split_frame(&data) {
                            Some((relay::STDOUT, d)) => {
                                stdout.write_all(d).await.context("cannot write to stdout")?;
                                stdout.flush().await.context("cannot write to stdout")?;
                            }
                            Some((relay::STDERR, d)) => {
                                stderr.write_all(d).await.context("cannot write to stderr")?;
                                stderr.flush().await.context("cannot write to stderr")?;
                            }
                            _ => {}
                        }
                        None
                    }
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerControl>(&text) {
                        Ok(ServerControl::Started { session: id }) => {
                            if tty && !id.is_empty() {
                                session = Some(id);
                            }
                            None
                        }
                        Ok(ServerControl::Exit { code }) => {
                            let _ = sink.send(Message::Close(None)).await;
                            return Ok(code);
                        }
                        Ok(ServerControl::Error { message }) => {
                            anyhow::bail!("the remote session failed: {message}");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "ignoring an unknown control message");
                            None
                        }
                    },
                    Some(Ok(Message::Close(frame))) => {
                        if frame.as_ref().is_some_and(|f| u16::from(f.code) == CLOSE_REPLACED) {
                            anyhow::bail!("another client attached to this terminal session");
                        }
                        let why = frame.map(|f| f.reason.to_string()).filter(|r| !r.is_empty());
                        Some(anyhow::anyhow!(
                            "the terminal connection closed without an exit status{}",
                            why.map(|r| format!(": {r}")).unwrap_or_default()
                        ))
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => None,
                    Some(Err(e)) => Some(anyhow::Error::new(e).context("the terminal connection broke")),
                    None => Some(anyhow::anyhow!("the terminal connection closed without an exit status")),
                };
                if let Some(err) = broken {
                    match (&session, tty && reattached < MAX_REATTACH) {
                        (Some(id), true) => {
                            reattached += 1;
                            tracing::debug!(error = %format!("{err:#}"), "re-attaching to session {id}");
                            let (s, st) = reattach(api, &args, id)
                                .await
                                .map_err(|e| e.context(format!("{err:#}; re-attaching failed")))?;
                            (sink, stream) = (s, st);
                            // The worker replays recent output: start from a clean screen.
                            stdout.write_all(b"\x1b[H\x1b[2J").await.context("cannot write to stdout")?;
                        }
                        _ => return Err(err),
                    }
                }
            }
            input = in_rx.recv(), if stdin_open => {
                match input {
                    Some(Some(data)) => {
                        sink.send(Message::Binary(relay::frame(relay::STDIN, &data).into())).await
                            .context("cannot send input")?;
                    }
                    Some(None) | None => {
                        stdin_open = false;
                        if !tty {
                            sink.send(control(&ClientControl::Eof)?).await.context("cannot send end of input")?;
                        }
                    }
                }
            }
            _ = winch.recv(), if tty => {
                let (cols, rows) = window_size();
                sink.send(control(&ClientControl::Resize { cols, rows })?).await
                    .context("cannot send the window size")?;
            }
            _ = tokio::signal::ctrl_c(), if !tty || !stdin_is_tty => {
                // Without raw mode, Ctrl-C reaches us as SIGINT: pass it on once, then give up.
                interrupts += 1;
                if interrupts > 1 {
                    return Ok(130);
                }
                sink.send(control(&ClientControl::Signal { signal: 2 })?).await
                    .context("cannot send the interrupt")?;
            }
        }
    }
}
