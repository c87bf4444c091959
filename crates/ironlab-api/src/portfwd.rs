//! The published-port WebSocket protocol: TCP bytes between a client (`ironlab port-forward`,
//! `ironlab ssh-proxy`, the control plane's http-port proxy) and a port inside a machine. The
//! worker bridges it to the agent's `Dial` gRPC stream; the agent connects to `127.0.0.1:PORT`
//! inside the machine.
//!
//! Connect: `GET /v1/runs/{run}/machines/{machine}/port/{port}?token=T` (WebSocket upgrade).
//!
//! ## Tokens
//! Issued by the control plane (`POST /api/v1/runs/{id}/connect` with `port`) and registered
//! with the worker as a `TokenGrant` whose `scope` is `{"kind":"port","port":P}`: single use, at
//! most 30 s, bound to (user, run, machine, port). A terminal token cannot open a port and a
//! port token cannot open the terminal or another port (403). Missing, unknown, reused or
//! expired tokens get 401, as for the terminal.
//!
//! ## Connecting
//! The worker dials the port before it accepts the upgrade: when nothing listens there the
//! answer is `502` with the reason (`cannot connect to 127.0.0.1:8080: Connection refused`),
//! never a WebSocket that closes at once.
//!
//! ## Frames
//! - Binary frames carry TCP bytes, in order, both ways.
//! - The text frame [`EOF`] says "no more bytes from me" (TCP half-close): from the client it
//!   shuts down the write side of the machine's socket; from the server it says the program in
//!   the machine closed its side. Other text frames are ignored.
//! - A close frame ends the connection both ways. The server closes after the TCP connection
//!   ended in both directions (normal close), or with code [`CLOSE_FAILED`] and the reason when
//!   it broke.

/// The half-close text frame.
pub const EOF: &str = "eof";
/// WebSocket close code when the TCP connection inside the machine failed (1011, internal
/// error in RFC 6455 terms).
pub const CLOSE_FAILED: u16 = 1011;
