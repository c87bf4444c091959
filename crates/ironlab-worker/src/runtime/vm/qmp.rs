//! A QMP (QEMU Machine Protocol) client over QEMU's unix socket: one JSON object per line.
//!
//! Connect = read the greeting, negotiate `qmp_capabilities`. Commands are sent one at a time;
//! events that arrive meanwhile are queued and handed out by [`Qmp::next_event`]. QEMU accepts
//! one QMP client at a time on a socket, so the runtime connects per operation.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP i/o on {path}: {source}")]
    Io {
        /// The socket.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection.
    #[error("QEMU closed the QMP connection")]
    Closed,
    /// No answer in time.
    #[error("QMP {0} timed out")]
    Timeout(String),
    /// QEMU answered with an error.
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
}

/// A negotiated QMP connection.
pub struct Qmp {
    path: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: VecDeque<Value>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path` and negotiates capabilities; each reply must come within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let p = path.display().to_string();
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(|source| QmpError::Io {
                path: p.clone(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            path: p,
            reader: BufReader::new(r),
            writer: w,
            events: VecDeque::new(),
            timeout,
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = tokio::time::timeout(self.timeout, self.reader.read_line(&mut line))
                .await
                .map_err(|_| QmpError::Timeout(what.to_string()))?
                .map_err(|source| QmpError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.trim().is_empty() {
                continue;
            }
            return serde_json::from_str(line.trim())
                .map_err(|_| QmpError::Protocol(line.trim().to_string()));
        }
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let v = self.read_message(command).await?;
            if v.get("event").is_some() {
                self.events.push_back(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(QmpError::Protocol(v.to_string()));
        }
    }

    /// The VM's run state (`running`, `paused`, `prelaunch`, `shutdown`, …).
    pub async fn query_status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", None).await?;
        r.get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(r.to_string()))
    }

    /// Whether the guest has the port behind chardev `label` open (`query-chardev`'s
    /// `frontend-open`; for a virtio-serial port: a guest process holds it open).
    pub async fn frontend_open(&mut self, label: &str) -> Result<bool, QmpError> {
        let r = self.execute("query-chardev", None).await?;
        r.as_array()
            .and_then(|list| {
                list.iter()
                    .find(|c| c.get("label").and_then(Value::as_str) == Some(label))
            })
            .and_then(|c| c.get("frontend-open").and_then(Value::as_bool))
            .ok_or_else(|| QmpError::Protocol(format!("no chardev {label} in {r}")))
    }

    /// Waits until the migration in either direction ended (`query-migrate` polled every 10 ms);
    /// an error names QEMU's reason when it failed.
    pub async fn wait_migration(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", None).await?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => anyhow::bail!(
                    "migration failed: {}",
                    r.get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("no reason given")
                ),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("migration did not finish within {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Presses the ACPI power button.
    pub async fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(|_| ())
    }

    /// Ends QEMU now. QEMU may close the connection before or after answering: both are success.
    pub async fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionReset
                    || source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The next event (queued first), waiting at most `wait`.
    pub async fn next_event(&mut self, wait: Duration) -> Result<Value, QmpError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        let saved = self.timeout;
        self.timeout = wait;
        let r = loop {
            match self.read_message("event").await {
                Ok(v) if v.get("event").is_some() => break Ok(v),
                Ok(_) => continue,
                Err(e) => break Err(e),
            }
        };
        self.timeout = saved;
        r
    }

    /// Waits for the event `name` (others are dropped), at most `wait`.
    pub async fn wait_event(&mut self, name: &str, wait: Duration) -> Result<Value, QmpError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(format!("waiting for {name}")));
            }
            let e = self.next_event(left).await?;
            if e["event"] == name {
                return Ok(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A paused QEMU (no guest code runs) with QMP on a socket in `dir`.
    fn qemu(dir: &Path) -> Option<std::process::Child> {
        let qemu = super::super::find_qemu()?;
        let sock = dir.join("qmp.sock");
        let child = std::process::Command::new(qemu)
            .args([
                "-M",
                "microvm",
                "-accel",
                "tcg",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-S",
                "-m",
                "32M",
                "-chardev",
                &format!("socket,id=qmp,path={},server=on,wait=off", sock.display()),
                "-mon",
                "chardev=qmp,mode=control",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(child)
    }

    async fn connect(dir: &Path) -> Qmp {
        let sock = dir.join("qmp.sock");
        for _ in 0..200 {
            if let Ok(q) = Qmp::connect(&sock, Duration::from_secs(5)).await {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("QMP did not come up on {}", sock.display());
    }

    #[tokio::test]
    async fn status_errors_events_and_quit_against_a_real_qemu() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some(mut child) = qemu(dir.path()) else {
            eprintln!("skipped: qemu-system-x86_64 not installed");
            return;
        };
        struct Kill<'a>(&'a mut std::process::Child);
        impl Drop for Kill<'_> {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let guard = Kill(&mut child);
        let mut q = connect(dir.path()).await;
        assert_eq!(q.query_status().await.expect("status"), "prelaunch");
        let e = q
            .execute("no-such-command", None)
            .await
            .expect_err("unknown command");
        assert!(
            matches!(&e, QmpError::Command { class, .. } if class == "CommandNotFound"),
            "{e}"
        );
        q.execute("cont", None).await.expect("cont");
        assert_eq!(q.query_status().await.expect("status"), "running");
        q.execute("stop", None).await.expect("stop");
        q.wait_event("STOP", Duration::from_secs(5))
            .await
            .expect("STOP event");
        q.quit().await.expect("quit");
        let shutdown = q
            .wait_event("SHUTDOWN", Duration::from_secs(5))
            .await
            .expect("SHUTDOWN event");
        assert_eq!(shutdown["data"]["reason"], "host-qmp-quit");
        let status = guard.0.wait().expect("wait");
        assert!(status.success(), "{status:?}");
    }
}
