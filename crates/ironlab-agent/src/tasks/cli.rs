//! `ironlab-agent tasks list|watch|input|wait`: the local CLI inside a machine, a gRPC client of
//! the agent's socket (for authors debugging a challenge and for solution scripts).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ironlab_api::agent::{ListTasksRequest, TaskEvent, TaskInputRequest, WatchTasksRequest};

use super::TaskState;
use super::proto::state_of;

/// Usage of the `tasks` subcommand.
pub const USAGE: &str = "\
usage: ironlab-agent tasks [--socket PATH] list
       ironlab-agent tasks [--socket PATH] watch
       ironlab-agent tasks [--socket PATH] input NAME VALUE
       ironlab-agent tasks [--socket PATH] wait NAME [--timeout SECONDS]

list   every task: state, attempts, hint (helpers marked)
watch  the current states, then one line per change, until interrupted
input  submits an answer to an input task; exit 0 accepted, 1 refused
wait   waits until NAME is completed (exit 0); exit 1 if it failed, 124 on timeout";

/// Exit status of `wait` on timeout (as `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;

fn state_name(e: &TaskEvent) -> &'static str {
    state_of(e.state)
        .map(TaskState::as_str)
        .unwrap_or("unknown")
}

fn kind(e: &TaskEvent) -> &'static str {
    if e.helper {
        "helper"
    } else if e.init {
        "init"
    } else if e.input {
        "input"
    } else {
        "task"
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One `watch` line: `SEQ NAME STATE[: HINT]`.
pub fn event_line(e: &TaskEvent) -> String {
    let hint = one_line(&e.hint);
    if hint.is_empty() {
        format!("{} {} {}", e.seq, e.name, state_name(e))
    } else {
        format!("{} {} {}: {hint}", e.seq, e.name, state_name(e))
    }
}

/// The `list` table.
pub fn table(tasks: &[TaskEvent]) -> String {
    let width = tasks.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let mut out = format!(
        "{:width$}  {:6}  {:9}  {:>7}  HINT\n",
        "NAME", "KIND", "STATE", "ATTEMPT"
    );
    for t in tasks {
        out.push_str(&format!(
            "{:width$}  {:6}  {:9}  {:>7}  {}\n",
            t.name,
            kind(t),
            state_name(t),
            t.attempt,
            one_line(&t.hint)
        ));
    }
    out
}

/// Runs `ironlab-agent tasks ARGS…`; returns the exit status.
pub async fn run(args: &[String]) -> anyhow::Result<i32> {
    let mut socket = PathBuf::from(crate::DEFAULT_SOCKET);
    let mut timeout: Option<Duration> = None;
    let mut words = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value")),
            }
        };
        match name {
            "--socket" => socket = PathBuf::from(value()?),
            "--timeout" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .with_context(|| format!("--timeout {v:?} is not a number of seconds"))?;
                timeout = Some(Duration::from_secs_f64(secs));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(0);
            }
            _ => words.push(a.clone()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["list"] => list(&socket).await,
        ["watch"] => watch(&socket).await,
        ["input", name, value] => input(&socket, name, value).await,
        ["wait", name] => wait(&socket, name, timeout).await,
        _ => bail!("{USAGE}"),
    }
}

async fn client(
    socket: &Path,
) -> anyhow::Result<ironlab_api::agent::agent_client::AgentClient<tonic::transport::Channel>> {
    crate::connect(socket)
        .await
        .with_context(|| format!("cannot reach the agent at {}", socket.display()))
}

async fn list(socket: &Path) -> anyhow::Result<i32> {
    let resp = client(socket)
        .await?
        .list_tasks(ListTasksRequest {})
        .await
        .context("ListTasks failed")?
        .into_inner();
    print!("{}", table(&resp.tasks));
    Ok(0)
}

async fn watch(socket: &Path) -> anyhow::Result<i32> {
    let mut stream = client(socket)
        .await?
        .watch_tasks(WatchTasksRequest {
            include_snapshot: true,
        })
        .await
        .context("WatchTasks failed")?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(e) = stream.message().await.context("task stream broke")? {
        writeln!(stdout, "{}", event_line(&e)).context("cannot write to stdout")?;
        stdout.flush().context("cannot write to stdout")?;
    }
    Ok(0)
}

async fn input(socket: &Path, name: &str, value: &str) -> anyhow::Result<i32> {
    let resp = client(socket)
        .await?
        .task_input(TaskInputRequest {
            name: name.to_string(),
            value: value.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .with_context(|| format!("input for task {name:?} failed"))?
        .into_inner();
    if resp.accepted {
        println!("accepted");
        Ok(0)
    } else {
        let hint = one_line(&resp.hint);
        if hint.is_empty() {
            println!("refused");
        } else {
            println!("refused: {hint}");
        }
        Ok(1)
    }
}

async fn wait(socket: &Path, name: &str, timeout: Option<Duration>) -> anyhow::Result<i32> {
    let mut c = client(socket).await?;
    let mut stream = c
        .watch_tasks(WatchTasksRequest {
            include_snapshot: true,
        })
        .await
        .context("WatchTasks failed")?
        .into_inner();
    let known = c
        .list_tasks(ListTasksRequest {})
        .await
        .context("ListTasks failed")?
        .into_inner();
    if !known.tasks.iter().any(|t| t.name == name) {
        bail!("no task named {name:?}");
    }
    let watch = async {
        while let Some(e) = stream.message().await.context("task stream broke")? {
            if e.name != name {
                continue;
            }
            match state_of(e.state) {
                Some(TaskState::Completed) => return Ok(0),
                Some(TaskState::Failed) => {
                    let hint = one_line(&e.hint);
                    eprintln!(
                        "task {name} failed{}",
                        if hint.is_empty() {
                            String::new()
                        } else {
                            format!(": {hint}")
                        }
                    );
                    return Ok(1);
                }
                Some(TaskState::Blocked | TaskState::Running) | None => {}
            }
        }
        bail!("the agent closed the task stream")
    };
    match timeout {
        Some(t) => match tokio::time::timeout(t, watch).await {
            Ok(r) => r,
            Err(_) => {
                eprintln!("task {name} not completed after {}s", t.as_secs_f64());
                Ok(EXIT_TIMEOUT)
            }
        },
        None => watch.await,
    }
}
