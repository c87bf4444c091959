//! `ironlab playground tasks RUN [--watch] [-o json]`: a run's checklist, optionally followed
//! live over the run's event stream (`GET /api/v1/runs/{id}/events`, `event: task`).

use std::collections::BTreeMap;

use anyhow::Context;
use ironlab_api::v1::{RunState, RunTasksView, RunView, TaskState, TaskView};
use reqwest::Method;

use super::playground::{print_json, table};
use crate::cli::Output;
use crate::client::Api;

/// One Server-Sent Event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (default `message`).
    pub event: String,
    /// `data:` lines joined by newlines.
    pub data: String,
}

/// Incremental parser of a `text/event-stream` body.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    current: SseEvent,
}

impl SseParser {
    /// Feeds bytes; returns the events completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.current.data.is_empty() || !self.current.event.is_empty() {
                    let mut e = std::mem::take(&mut self.current);
                    if e.event.is_empty() {
                        e.event = "message".into();
                    }
                    out.push(e);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.current.event = value.to_string(),
                "data" => {
                    if !self.current.data.is_empty() {
                        self.current.data.push('\n');
                    }
                    self.current.data.push_str(value);
                }
                _ => {}
            }
        }
        out
    }
}

fn kind(t: &TaskView) -> &'static str {
    match (t.init, t.input) {
        (true, _) => "init",
        (_, true) => "input",
        _ => "check",
    }
}

fn print_table(v: &RunTasksView) {
    let rows: Vec<Vec<String>> = v
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.machine.clone(),
                kind(t).to_string(),
                t.state.as_str().to_string(),
                t.hint.lines().next().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(&["TASK", "MACHINE", "KIND", "STATE", "HINT"], &rows);
}

/// Every task completed: `Some(true)`; one failed: `Some(false)`; else `None`.
pub fn outcome<'a>(tasks: impl IntoIterator<Item = &'a TaskView>) -> Option<bool> {
    let mut all = true;
    for t in tasks {
        match t.state {
            TaskState::Failed => return Some(false),
            TaskState::Completed => {}
            TaskState::Blocked | TaskState::Running => all = false,
        }
    }
    all.then_some(true)
}

/// Runs `playground tasks`; returns the exit code.
pub async fn tasks(api: &Api, run: &str, watch: bool, output: Output) -> anyhow::Result<i32> {
    let v: RunTasksView = api
        .call(Method::GET, &format!("/runs/{run}/tasks"), None)
        .await?;
    if !watch {
        match output {
            Output::Json => print_json(&v)?,
            Output::Text => {
                if v.tasks.is_empty() {
                    eprintln!("run {run} has no tasks");
                } else {
                    print_table(&v);
                    if !v.ready {
                        eprintln!("(init tasks still running: the playground is being set up)");
                    }
                }
            }
        }
        return Ok(0);
    }
    if v.tasks.is_empty() {
        eprintln!("run {run} has no tasks");
        return Ok(0);
    }
    let mut known: BTreeMap<String, TaskView> = BTreeMap::new();
    let show = |t: &TaskView| -> anyhow::Result<()> {
        match output {
            Output::Json => println!("{}", serde_json::to_string(t)?),
            Output::Text => {
                let at =
                    t.at.map(|a| {
                        a.with_timezone(&chrono::Local)
                            .format("%H:%M:%S")
                            .to_string()
                    })
                    .unwrap_or_else(|| "--:--:--".into());
                let hint = if t.hint.is_empty() {
                    String::new()
                } else {
                    format!(": {}", t.hint.lines().next().unwrap_or(""))
                };
                println!("{at}  {} {}{hint}", t.name, t.state.as_str());
            }
        }
        Ok(())
    };
    let mut resp = api.stream(&format!("/runs/{run}/events")).await?;
    let mut parser = SseParser::default();
    loop {
        let Some(chunk) = resp
            .chunk()
            .await
            .context("the event stream of the run broke")?
        else {
            eprintln!("the event stream ended");
            return Ok(1);
        };
        for e in parser.push(&chunk) {
            match e.event.as_str() {
                "task" => {
                    let t: TaskView = serde_json::from_str(&e.data)
                        .with_context(|| format!("unreadable task event: {}", e.data))?;
                    let changed = known
                        .get(&t.name)
                        .is_none_or(|k| k.state != t.state || k.hint != t.hint);
                    if changed {
                        show(&t)?;
                        known.insert(t.name.clone(), t);
                    }
                    if known.len() >= v.tasks.len() {
                        match outcome(known.values()) {
                            Some(true) => {
                                eprintln!("every task completed");
                                return Ok(0);
                            }
                            Some(false) => {
                                eprintln!("a task failed");
                                return Ok(1);
                            }
                            None => {}
                        }
                    }
                }
                "run" => {
                    let r: RunView = serde_json::from_str(&e.data)
                        .with_context(|| format!("unreadable run event: {}", e.data))?;
                    if matches!(
                        r.state,
                        RunState::Failed | RunState::Destroying | RunState::Destroyed
                    ) {
                        eprintln!("run {run} is {}", r.state.as_str());
                        return Ok(1);
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_on_blank_lines() {
        let mut p = SseParser::default();
        assert!(
            p.push(b": keep-alive\n\nevent: run\ndata: {\"a\"")
                .is_empty()
        );
        let got = p.push(b":1}\n\nevent: task\r\ndata: x\ndata: y\n\n");
        assert_eq!(
            got,
            vec![
                SseEvent {
                    event: "run".into(),
                    data: "{\"a\":1}".into()
                },
                SseEvent {
                    event: "task".into(),
                    data: "x\ny".into()
                }
            ]
        );
    }
}
