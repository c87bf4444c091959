//! `ironlab playground test -f MANIFEST --solution FILE [--timeout 5m]`: the solution bot.
//!
//! Registers the playground (replacing an earlier registration of the same name by the caller),
//! starts a run, waits for the init tasks, then plays the solution the way a student would:
//! each ```` ```sh ```` chunk is typed into a PTY terminal session of its machine through the
//! relay (`POST …/connect` → WebSocket → agent), one session per (machine, user), kept open
//! across chunks; each ```` ```input ```` block is answered through the public API like the
//! page's input box. A chunk is done when the shell prints a marker the typed text itself does
//! not contain (`echo ironlab-step-$((1000+N))-done`). Then it waits for every task to complete,
//! prints a per-task report, destroys the run, and exits 0 only if every task completed.
//!
//! A chunk for another user than the machine's terminal user is typed into `su - USER` (when the
//! terminal user is root) or `sudo -i -u USER` (otherwise), as a student would switch users.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use ironlab_api::relay::{self, ClientControl, ServerControl};
use ironlab_api::v1::{
    ConnectResponse, PlaygroundView, RunState, RunTasksView, RunView, TaskState,
};
use ironlab_api::worker::TaskInputResult;
use ironlab_spec::{Manifest, Step};
use reqwest::Method;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::tasks::outcome;
use crate::client::{Api, ApiError};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How often the checklist is polled while waiting.
const POLL: Duration = Duration::from_millis(250);
/// How long a new terminal has to echo a marker before it is typed again (see `Term::wait_ready`).
const READY_RETRY: Duration = Duration::from_secs(3);

/// One terminal session typed into.
struct Term {
    sink: futures::stream::SplitSink<Ws, Message>,
    output: Arc<Mutex<Vec<u8>>>,
    more: Arc<Notify>,
    ended: Arc<Mutex<Option<String>>>,
}

impl Term {
    async fn open(
        api: &Api,
        run: &str,
        machine: &str,
        command: Vec<String>,
    ) -> anyhow::Result<Self> {
        let conn: ConnectResponse = api
            .call(
                Method::POST,
                &format!("/runs/{run}/connect"),
                Some(&json!({ "machine": machine })),
            )
            .await?;
        let (ws, _) = tokio_tungstenite::connect_async(conn.url.as_str())
            .await
            .with_context(|| format!("cannot open a terminal on machine {machine}"))?;
        let (mut sink, mut stream) = ws.split();
        let start = ClientControl::Start {
            command,
            tty: true,
            cols: 160,
            rows: 48,
            env: BTreeMap::new(),
            term: Some("xterm-256color".into()),
            session: None,
        };
        sink.send(Message::Text(serde_json::to_string(&start)?.into()))
            .await
            .context("cannot start the terminal session")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let more = Arc::new(Notify::new());
        let ended = Arc::new(Mutex::new(None));
        let (o, m, e) = (output.clone(), more.clone(), ended.clone());
        tokio::spawn(async move {
            let why = loop {
                match stream.next().await {
                    Some(Ok(Message::Binary(data))) => {
                        if let Some((_, d)) = relay::split_frame(&data) {
                            o.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .extend_from_slice(d);
                            m.notify_waiters();
                        }
                    }
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerControl>(&t) {
                        Ok(ServerControl::Exit { code }) => {
                            break format!("the shell exited ({code})");
                        }
                        Ok(ServerControl::Error { message }) => break message,
                        _ => {}
                    },
                    Some(Ok(_)) => {}
                    Some(Err(err)) => break format!("the terminal connection broke: {err}"),
                    None => break "the terminal connection closed".to_string(),
                }
            };
            *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            m.notify_waiters();
        });
        Ok(Term {
            sink,
            output,
            more,
            ended,
        })
    }

    fn len(&self) -> usize {
        self.output.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn tail(&self, n: usize) -> String {
        let out = self.output.lock().unwrap_or_else(|p| p.into_inner());
        let start = out.len().saturating_sub(n);
        String::from_utf8_lossy(&out[start..]).into_owned()
    }

    async fn type_text(&mut self, text: &str) -> anyhow::Result<()> {
        self.sink
            .send(Message::Binary(
                relay::frame(relay::STDIN, text.as_bytes()).into(),
            ))
            .await
            .context("cannot type into the terminal")
    }

    /// Waits until the shell reads what is typed: types a marker command until its output
    /// appears. Text typed while `sudo -i` or `su -` is still starting can be lost (sudo
    /// flushes the terminal's pending input when it sets up its own; seen on a microVM whose
    /// systemd was still booting, where PAM made sudo slow), and the step would then wait for
    /// a marker that never comes.
    async fn wait_ready(&mut self, deadline: Instant) -> anyhow::Result<()> {
        let mut attempt = 0u32;
        loop {
            let from = self.len();
            // `$((N+0))`: the echoed command line itself does not contain the marker.
            self.type_text(&format!("echo ironlab-ready-$(({attempt}+0))-ok\n"))
                .await?;
            let until = (Instant::now() + READY_RETRY).min(deadline);
            match self
                .wait_for(&format!("ironlab-ready-{attempt}-ok"), from, until)
                .await
            {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline && self.ended_why().is_none() => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn ended_why(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until `needle` appears in the output after byte `from`.
    async fn wait_for(&self, needle: &str, from: usize, deadline: Instant) -> anyhow::Result<()> {
        loop {
            let notified = self.more.notified();
            {
                let out = self.output.lock().unwrap_or_else(|p| p.into_inner());
                let hay = &out[from.min(out.len())..];
                if hay.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    return Ok(());
                }
            }
            if let Some(why) = self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                anyhow::bail!("{why}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("timed out");
            }
            let _ = tokio::time::timeout(left, notified).await;
        }
    }
}

/// The command a terminal of `machine` needs to act as `user`.
fn switch_user(default_user: &str, user: &str) -> Vec<String> {
    if user == default_user {
        Vec::new()
    } else if default_user == "root" {
        vec!["su".into(), "-".into(), user.into()]
    } else if user == "root" {
        vec!["sudo".into(), "-i".into()]
    } else {
        vec!["sudo".into(), "-i".into(), "-u".into(), user.into()]
    }
}

fn is_status(e: &anyhow::Error, status: u16) -> bool {
    e.downcast_ref::<ApiError>()
        .is_some_and(|a| a.status.as_u16() == status)
}

/// Registers the playground, replacing the caller's earlier one of the same name.
pub(crate) async fn register(
    api: &Api,
    manifest_text: &str,
    file: &Path,
) -> anyhow::Result<String> {
    let value: serde_json::Value = serde_saphyr::from_str(manifest_text)
        .with_context(|| format!("{} is not valid YAML", file.display()))?;
    let name = value["name"].as_str().unwrap_or_default().to_string();
    match api
        .call::<PlaygroundView>(Method::POST, "/playgrounds", Some(&value))
        .await
    {
        Ok(p) => Ok(p.name),
        Err(e) if is_status(&e, 409) => {
            api.call_empty(Method::DELETE, &format!("/playgrounds/{name}"))
                .await
                .with_context(|| format!("playground {name} exists and cannot be replaced"))?;
            let p: PlaygroundView = api.call(Method::POST, "/playgrounds", Some(&value)).await?;
            Ok(p.name)
        }
        Err(e) => Err(e),
    }
}

/// Runs `playground test`; returns the exit code.
pub async fn test(
    api: &Api,
    file: &Path,
    solution: &Path,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let text = fs_err::read_to_string(file)?;
    let manifest = match ironlab_spec::parse_manifest(&text) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: the manifest {} is invalid:", file.display());
            for fe in &e.errors {
                eprintln!("  {fe}");
            }
            return Ok(2);
        }
    };
    let sol_text = fs_err::read_to_string(solution)?;
    let sol = match ironlab_spec::parse_solution(&sol_text, &manifest) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: the solution {} is invalid:", solution.display());
            for fe in &e.errors {
                eprintln!(
                    "  {}:{}",
                    solution.display(),
                    fe.to_string().trim_start_matches("line ")
                );
            }
            return Ok(2);
        }
    };
    let name = register(api, &text, file).await?;
    let run: RunView = api
        .call(Method::POST, "/runs", Some(&json!({ "playground": name })))
        .await?;
    eprintln!("run {} of {name}: starting", run.id);
    play_and_destroy(api, &run, &manifest, &sol.steps, timeout).await
}

/// Plays `steps` in the just-started `run` of `manifest`, reports per task, and destroys the
/// run whatever happens; returns the exit code (0 only if every task completed).
pub(crate) async fn play_and_destroy(
    api: &Api,
    run: &RunView,
    manifest: &Manifest,
    steps: &[Step],
    timeout: Duration,
) -> anyhow::Result<i32> {
    let started = Instant::now();
    let result = tokio::select! {
        r = play(api, &run.id, manifest, steps, timeout, started) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: destroying run {}", run.id);
            Ok(130)
        }
    };
    // Always destroy the run, whatever happened.
    match api
        .call::<RunView>(Method::DELETE, &format!("/runs/{}", run.id), None)
        .await
    {
        Ok(_) => {
            let pb = indicatif::ProgressBar::hidden();
            let _ = super::playground::wait_settled(api, &run.id, &pb, "destroying").await;
            eprintln!("run {}: destroyed", run.id);
        }
        Err(e) => eprintln!("warning: cannot destroy run {}: {e:#}", run.id),
    }
    result
}

async fn play(
    api: &Api,
    run: &str,
    manifest: &Manifest,
    steps: &[Step],
    timeout: Duration,
    started: Instant,
) -> anyhow::Result<i32> {
    // The run comes up (image pulls are not part of the deadline).
    let view = loop {
        let v: RunView = api
            .call(Method::GET, &format!("/runs/{run}?wait=30"), None)
            .await?;
        if !matches!(v.state, RunState::Pending | RunState::Starting) {
            break v;
        }
    };
    if view.state != RunState::Running {
        eprintln!(
            "error: run {run} is {}: {}",
            view.state.as_str(),
            view.reason.as_deref().unwrap_or("no reason given")
        );
        return Ok(1);
    }
    let up = Instant::now();
    let deadline = up + timeout;
    eprintln!(
        "run {run}: running after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // Init tasks first: the playground is ready for the student when they passed.
    let checklist = |v: &RunTasksView| {
        v.tasks
            .iter()
            .any(|t| t.init && t.state == TaskState::Failed)
    };
    loop {
        let v: RunTasksView = api
            .call(Method::GET, &format!("/runs/{run}/tasks"), None)
            .await?;
        if v.ready {
            eprintln!(
                "run {run}: init tasks passed after {:.1}s",
                up.elapsed().as_secs_f64()
            );
            break;
        }
        if checklist(&v) || Instant::now() >= deadline {
            eprintln!("error: the init tasks did not pass");
            report(&v, up);
            return Ok(1);
        }
        tokio::time::sleep(POLL).await;
    }

    let mut terms: HashMap<(String, String), Term> = HashMap::new();
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Shell {
                machine,
                user,
                script,
                line,
            } => {
                let key = (machine.clone(), user.clone());
                if !terms.contains_key(&key) {
                    let default_user = manifest
                        .playground
                        .machines
                        .iter()
                        .find(|m| m.name == *machine)
                        .map(|m| m.default_user().to_string())
                        .unwrap_or_else(|| "root".into());
                    let mut t =
                        Term::open(api, run, machine, switch_user(&default_user, user)).await?;
                    if let Err(e) = t.wait_ready(deadline).await {
                        eprintln!(
                            "error: step {} (line {line}): the shell on {machine} as {user} did not start: {e:#}; the terminal shows:\n{}",
                            n + 1,
                            t.tail(2000)
                        );
                        return finish(api, run, up).await.map(|_| 1);
                    }
                    terms.insert(key.clone(), t);
                }
                let Some(term) = terms.get_mut(&key) else {
                    continue;
                };
                eprintln!(
                    "step {} (line {line}): typing into {machine} as {user}",
                    n + 1
                );
                let marker_n = 1000 + n;
                let from = term.len();
                let mut text = script.clone();
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&format!("echo ironlab-step-$(({marker_n}+0))-done\n"));
                term.type_text(&text).await?;
                if let Err(e) = term
                    .wait_for(&format!("ironlab-step-{marker_n}-done"), from, deadline)
                    .await
                {
                    eprintln!(
                        "error: step {} (line {line}) on {machine} did not finish: {e:#}; the terminal shows:\n{}",
                        n + 1,
                        term.tail(2000)
                    );
                    return finish(api, run, up).await.map(|_| 1);
                }
            }
            Step::Input { task, value, line } => {
                let r: TaskInputResult = api
                    .call(
                        Method::POST,
                        &format!("/runs/{run}/tasks/{task}/input"),
                        Some(&json!({ "value": value })),
                    )
                    .await
                    .with_context(|| format!("step {} (line {line}): answering {task}", n + 1))?;
                if r.accepted {
                    eprintln!("step {} (line {line}): {task} accepted the answer", n + 1);
                } else {
                    eprintln!(
                        "step {} (line {line}): {task} refused the answer: {}",
                        n + 1,
                        r.hint
                    );
                }
            }
        }
    }
    // Every task completes, or one fails, or time runs out.
    loop {
        let v: RunTasksView = api
            .call(Method::GET, &format!("/runs/{run}/tasks"), None)
            .await?;
        if outcome(&v.tasks).is_some() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    for t in terms.values_mut() {
        let _ = t.sink.send(Message::Close(None)).await;
    }
    finish(api, run, up).await
}

async fn finish(api: &Api, run: &str, up: Instant) -> anyhow::Result<i32> {
    let v: RunTasksView = api
        .call(Method::GET, &format!("/runs/{run}/tasks"), None)
        .await?;
    report(&v, up);
    Ok(if outcome(&v.tasks) == Some(true) {
        0
    } else {
        1
    })
}

fn report(v: &RunTasksView, up: Instant) {
    let since_up =
        chrono::Utc::now() - chrono::Duration::from_std(up.elapsed()).unwrap_or_default();
    let rows: Vec<Vec<String>> = v
        .tasks
        .iter()
        .map(|t| {
            let verdict = if t.state == TaskState::Completed {
                "ok"
            } else {
                "FAIL"
            };
            let when = match (t.state, t.at) {
                (TaskState::Completed, Some(at)) => {
                    format!(
                        "{:.1}s",
                        (at - since_up).num_milliseconds().max(0) as f64 / 1000.0
                    )
                }
                _ => "-".into(),
            };
            vec![
                verdict.to_string(),
                t.name.clone(),
                t.machine.clone(),
                t.state.as_str().to_string(),
                when,
                t.hint.lines().next().unwrap_or("").to_string(),
            ]
        })
        .collect();
    super::playground::table(&["RESULT", "TASK", "MACHINE", "STATE", "AT", "HINT"], &rows);
    let done = v
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Completed)
        .count();
    println!("{done}/{} tasks completed", v.tasks.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_switched_like_a_student_would() {
        assert!(switch_user("laborant", "laborant").is_empty());
        assert_eq!(switch_user("root", "laborant"), vec!["su", "-", "laborant"]);
        assert_eq!(switch_user("laborant", "root"), vec!["sudo", "-i"]);
        assert_eq!(
            switch_user("laborant", "bob"),
            vec!["sudo", "-i", "-u", "bob"]
        );
    }
}
