//! One module per command group.

pub mod auth;
pub mod content;
pub mod playground;
pub mod portfwd;
pub mod server;
pub mod solution;
pub mod ssh;
pub mod tasks;
pub mod user;
pub mod workers;
