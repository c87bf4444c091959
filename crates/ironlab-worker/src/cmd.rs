//! Running host tools (`crun`, `ip`, `losetup`, `mount`) with errors that name the command and
//! carry its stderr.

use std::ffi::OsStr;
use std::process::Output;

use tokio::process::Command;

/// A host tool failed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The program could not be started at all.
    #[error("cannot run `{cmd}`")]
    Spawn {
        /// The command line.
        cmd: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The program exited non-zero.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Exit status.
        status: std::process::ExitStatus,
        /// Its stderr (trimmed).
        stderr: String,
    },
}

impl CmdError {
    /// The stderr of a failed command ("" when it did not run).
    pub fn stderr(&self) -> &str {
        match self {
            CmdError::Spawn { .. } => "",
            CmdError::Failed { stderr, .. } => stderr,
        }
    }
}

fn display<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(&a.as_ref().to_string_lossy());
    }
    s
}

/// Runs `program args…` to completion; non-zero exit is an error carrying stderr.
pub async fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output, CmdError> {
    let cmd = display(program, args);
    tracing::trace!(%cmd, "running");
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .output()
        .await
        .map_err(|source| CmdError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Like [`run`], returning stdout as a string.
pub async fn stdout<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<String, CmdError> {
    let out = run(program, args).await?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Like [`run`], writing `input` to the program's stdin (e.g. `ip -batch -`).
pub async fn run_with_input<S: AsRef<OsStr>>(
    program: &str,
    args: &[S],
    input: &str,
) -> Result<Output, CmdError> {
    use tokio::io::AsyncWriteExt;
    let cmd = display(program, args);
    tracing::trace!(%cmd, "running with input");
    let spawn_err = |source| CmdError::Spawn {
        cmd: cmd.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A program that exits early closes the pipe; its status tells why.
        let _ = stdin.write_all(input.as_bytes()).await;
    }
    let out = child.wait_with_output().await.map_err(spawn_err)?;
    if !out.status.success() {
        return Err(CmdError::Failed {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}
