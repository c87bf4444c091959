//! The terminal/exec WebSocket protocol spoken between a client (CLI, browser) and the worker's
//! relay, which bridges it to the agent's `Exec` gRPC stream.
//!
//! Connect: `GET /v1/runs/{run}/machines/{machine}/terminal?token=T` (WebSocket upgrade). The token
//! is single-use and short-lived, issued by the control plane.
//!
//! Frames:
//! - Text frames carry JSON control messages ([`ClientControl`], [`ServerControl`]).
//! - Binary frames carry bytes; the first byte is the stream ([`STDIN`], [`STDOUT`], [`STDERR`]),
//!   the rest is data. A PTY session sends all output on [`STDOUT`].
//!
//! The client's first frame must be [`ClientControl::Start`]. The server ends with
//! [`ServerControl::Exit`] and closes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// The remote process started.
    Started,
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
        assert_eq!(s.as_deref(), Some(r#"{"type":"resize","cols":80,"rows":24}"#));
        let start: ClientControl =
            serde_json::from_str(r#"{"type":"start","tty":true}"#).expect("minimal start parses");
        assert!(matches!(start, ClientControl::Start { tty: true, ref command, .. } if command.is_empty()));
        let exit = serde_json::to_string(&ServerControl::Exit { code: 3 }).ok();
        assert_eq!(exit.as_deref(), Some(r#"{"type":"exit","code":3}"#));
    }

    #[test]
    fn frames() {
        assert_eq!(split_frame(&frame(STDERR, b"x")), Some((STDERR, &b"x"[..])));
        assert_eq!(split_frame(&[]), None);
    }
}
