//! The terminal/exec WebSocket protocol spoken between a client (CLI, browser) and the worker's
//! relay, which bridges it to the agent's `Exec` gRPC stream.
//!
//! Connect: `GET /v1/runs/{run}/machines/{machine}/terminal?token=T` (WebSocket upgrade).
//!
//! ## Tokens
//! A terminal token is issued by the control plane (`POST /api/v1/runs/{id}/connect`) and
//! registered with the worker as a `TokenGrant` (user, run, machine, expiry). The relay consumes
//! it when it is presented, whatever the outcome, and refuses the upgrade when it is missing,
//! unknown, already used or expired (401: it lives at most 30 s after the worker received it,
//! and never past its `expires_at`), or names another run or machine (403). The token's user is
//! the user of the connection: it owns the sessions it starts, and may attach only to its own.
//!
//! ## Frames
//! - Text frames carry JSON control messages ([`ClientControl`], [`ServerControl`]).
//! - Binary frames carry bytes; the first byte is the stream ([`STDIN`], [`STDOUT`], [`STDERR`]),
//!   the rest is data. A PTY session sends all output on [`STDOUT`].
//!
//! The client's first frame must be [`ClientControl::Start`]; the server answers
//! [`ServerControl::Started`] with the session id, then output. The server ends with
//! [`ServerControl::Exit`] (the process ended) or [`ServerControl::Error`] (the session could not
//! start or failed) and closes.
//!
//! ## Sessions and replay
//! - A PTY session (`tty: true`) is persistent: it outlives the WebSocket. When the connection
//!   drops, the process keeps running and its recent output is kept in a ring buffer (the last
//!   [`REPLAY_BYTES`]) for a grace period ([`DETACHED_GRACE_SECS`]); after that the process is
//!   hung up (SIGHUP, then killed) and the session forgotten.
//! - To come back, open a new WebSocket (with a fresh token for the same run and machine) and send
//!   `start` with `session` set to the id from `started`. Every other field of that `start` is
//!   ignored except `cols`/`rows`, which resize the terminal when non-zero. The server answers
//!   `started` (same id), then replays the ring buffer as ordinary [`STDOUT`] frames (so a
//!   client should reset its screen before writing them), then streams live output. The replay
//!   starts at a line boundary when the buffer has wrapped.
//! - An unknown or ended session, or one of another user or machine, gets `error` and a close;
//!   the client then starts a fresh session.
//! - One client at a time: a new attach detaches the previous connection, which is closed with
//!   code [`CLOSE_REPLACED`] and no `error` (it should not reconnect on its own).
//! - Non-PTY sessions (a command with `tty: false`, e.g. `ironlab ssh RUN -- cmd`) are tied to
//!   their WebSocket: the process is hung up when it drops. Their `started` carries an id too,
//!   but it cannot be attached to.
//! - Sessions end when the process exits and when the run is destroyed.
//!
//! ## Limits
//! - Output is never buffered without bound: while a client is attached, the process is held
//!   back by flow control when the client reads slowly (bounded channels from the agent's pipe
//!   or PTY to the WebSocket); while detached, only the ring buffer is kept.
//! - At most [`MAX_SESSIONS_PER_MACHINE`] persistent sessions per machine; starting one more
//!   ends the oldest detached one, or is refused when all are attached.
//! - A binary data frame from the server holds at most 64 KiB of data.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bytes of recent output a persistent session keeps for replay.
pub const REPLAY_BYTES: usize = 256 * 1024;
/// How long a detached persistent session waits for a client before it is ended.
pub const DETACHED_GRACE_SECS: u64 = 15 * 60;
/// Persistent sessions per machine.
pub const MAX_SESSIONS_PER_MACHINE: usize = 16;
/// WebSocket close code sent to a client whose session was taken over by a newer connection.
pub const CLOSE_REPLACED: u16 = 4001;

/// Binary-frame stream byte: client → server input.
pub const STDIN: u8 = 0;
/// Binary-frame stream byte: process stdout (or PTY output).
pub const STDOUT: u8 = 1;
/// Binary-frame stream byte: process stderr.
pub const STDERR: u8 = 2;

/// Control messages from the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientControl {
    /// Starts the session. Empty `command` = interactive login shell.
    Start {
        /// Program and arguments; empty = the login shell.
        #[serde(default)]
        command: Vec<String>,
        /// Allocate a PTY.
        #[serde(default)]
        tty: bool,
        /// Terminal width.
        #[serde(default)]
        cols: u16,
        /// Terminal height.
        #[serde(default)]
        rows: u16,
        /// Extra environment.
        #[serde(default)]
        env: BTreeMap<String, String>,
        /// TERM value for PTY sessions.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<String>,
        /// Attach to this existing persistent session instead of starting a process.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// The window changed size.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// Deliver a signal to the remote process group.
    Signal {
        /// Signal number (2 = SIGINT).
        signal: i32,
    },
    /// Close the remote stdin.
    Eof,
}

/// Control messages from the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerControl {
    /// The session is ready (started, or attached to); output follows.
    Started {
        /// The session id; for a PTY session, send it in `start` to attach again later.
        #[serde(default)]
        session: String,
    },
    /// The remote process ended; the server closes after this.
    Exit {
        /// Exit status (128 + signal when killed).
        code: i32,
    },
    /// The session failed; the server closes after this.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// Splits a binary frame into its stream byte and data.
pub fn split_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    frame.split_first().map(|(s, d)| (*s, d))
}

/// Builds a binary frame for `stream`.
pub fn frame(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(stream);
    v.extend_from_slice(data);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_json_shape() {
        let s = serde_json::to_string(&ClientControl::Resize { cols: 80, rows: 24 }).ok();
        assert_eq!(
            s.as_deref(),
            Some(r#"{"type":"resize","cols":80,"rows":24}"#)
        );
        let start: ClientControl =
            serde_json::from_str(r#"{"type":"start","tty":true}"#).expect("minimal start parses");
        assert!(
            matches!(start, ClientControl::Start { tty: true, ref command, .. } if command.is_empty())
        );
        let exit = serde_json::to_string(&ServerControl::Exit { code: 3 }).ok();
        assert_eq!(exit.as_deref(), Some(r#"{"type":"exit","code":3}"#));
    }

    #[test]
    fn sessions_json_shape() {
        let attach: ClientControl = serde_json::from_str(
            r#"{"type":"start","tty":true,"cols":80,"rows":24,"session":"abcdefgh12345678"}"#,
        )
        .expect("attach parses");
        assert!(
            matches!(attach, ClientControl::Start { session: Some(ref s), cols: 80, .. } if s == "abcdefgh12345678")
        );
        // Old clients (no session) still parse, and a fresh start does not send the field.
        let fresh = ClientControl::Start {
            command: vec![],
            tty: true,
            cols: 1,
            rows: 1,
            env: BTreeMap::new(),
            term: None,
            session: None,
        };
        let json = serde_json::to_string(&fresh).expect("json");
        assert!(!json.contains("session"), "{json}");
        let started = serde_json::to_string(&ServerControl::Started {
            session: "s1".into(),
        })
        .ok();
        assert_eq!(
            started.as_deref(),
            Some(r#"{"type":"started","session":"s1"}"#)
        );
        let old: ServerControl =
            serde_json::from_str(r#"{"type":"started"}"#).expect("old started parses");
        assert_eq!(
            old,
            ServerControl::Started {
                session: String::new()
            }
        );
    }

    #[test]
    fn frames() {
        assert_eq!(split_frame(&frame(STDERR, b"x")), Some((STDERR, &b"x"[..])));
        assert_eq!(split_frame(&[]), None);
    }
}
