//! `ironlab playground catalog|create|remove|start|list|destroy`.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use ironlab_api::v1::{PlaygroundView, RunState, RunView};
use reqwest::Method;
use serde_json::json;

use crate::cli::{Output, PlaygroundCommand};
use crate::client::{Api, ApiError};

/// Runs a `playground` subcommand; returns the exit code.
pub async fn run(cmd: PlaygroundCommand, api: &Api) -> anyhow::Result<i32> {
    match cmd {
        PlaygroundCommand::Catalog { output } => catalog(api, output).await,
        PlaygroundCommand::Create { file } => create(api, &file).await,
        PlaygroundCommand::Remove { name } => {
            api.call_empty(Method::DELETE, &format!("/playgrounds/{name}"))
                .await?;
            eprintln!("removed playground {name}");
            Ok(0)
        }
        PlaygroundCommand::Start {
            name,
            title,
            output,
            no_wait,
        } => start(api, &name, title, output, no_wait).await,
        PlaygroundCommand::List { output, all } => list(api, output, all).await,
        PlaygroundCommand::Destroy { run, no_wait } => destroy(api, &run, no_wait).await,
        PlaygroundCommand::Status { run, output } => status(api, &run, output).await,
        PlaygroundCommand::Logs { run, machine } => logs(api, &run, machine).await,
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let parts: Vec<String> = cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", parts.join("   ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

async fn catalog(api: &Api, output: Output) -> anyhow::Result<i32> {
    let list: Vec<PlaygroundView> = api.call(Method::GET, "/playgrounds", None).await?;
    match output {
        Output::Json => print_json(&list)?,
        Output::Text => {
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.title.clone(),
                        p.machines.join(","),
                        if p.stock { "stock" } else { "custom" }.to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "TITLE", "MACHINES", "KIND"], &rows);
        }
    }
    Ok(0)
}

async fn create(api: &Api, file: &std::path::Path) -> anyhow::Result<i32> {
    let text = fs_err::read_to_string(file)?;
    let value: serde_json::Value = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not valid YAML", file.display()))?;
    match api
        .call::<PlaygroundView>(Method::POST, "/playgrounds", Some(&value))
        .await
    {
        Ok(p) => {
            eprintln!("created playground {} ({})", p.name, p.title);
            println!("{}", p.name);
            Ok(0)
        }
        Err(e) => match e.downcast_ref::<ApiError>() {
            Some(api_err) if api_err.kind == "bad_request" => {
                eprintln!("error: the manifest {} is invalid:", file.display());
                for line in api_err.detail.lines() {
                    eprintln!("  {line}");
                }
                Ok(1)
            }
            _ => Err(e),
        },
    }
}

fn spinner(message: String) -> indicatif::ProgressBar {
    let pb = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    pb.set_message(message);
    pb.enable_steady_tick(Duration::from_millis(100));
    pb
}

fn is_transient(s: RunState) -> bool {
    matches!(
        s,
        RunState::Pending | RunState::Starting | RunState::Destroying
    )
}

/// Long-polls the run until it settles.
async fn wait_settled(
    api: &Api,
    id: &str,
    pb: &indicatif::ProgressBar,
    what: &str,
) -> anyhow::Result<RunView> {
    loop {
        let run: RunView = api
            .call(Method::GET, &format!("/runs/{id}?wait=30"), None)
            .await?;
        if !is_transient(run.state) {
            return Ok(run);
        }
        pb.set_message(format!("{what} run {id}: {}", run.state.as_str()));
    }
}

async fn start(
    api: &Api,
    name: &str,
    title: Option<String>,
    output: Output,
    no_wait: bool,
) -> anyhow::Result<i32> {
    let mut body = json!({"playground": name});
    if let Some(t) = title {
        body["title"] = json!(t);
    }
    let run: RunView = api.call(Method::POST, "/runs", Some(&body)).await?;
    let run = if no_wait {
        run
    } else {
        let pb = spinner(format!("starting run {} of {name}", run.id));
        let r = wait_settled(api, &run.id, &pb, "starting").await;
        pb.finish_and_clear();
        r?
    };
    match output {
        Output::Json => print_json(&run)?,
        Output::Text => {
            if run.state != RunState::Failed {
                println!("{}", run.id);
            }
        }
    }
    if run.state == RunState::Failed {
        eprintln!(
            "error: run {} of {name} failed: {}",
            run.id,
            run.reason.as_deref().unwrap_or("no reason given")
        );
        return Ok(1);
    }
    Ok(0)
}

/// `3s`, `5m`, `2h`, `4d`.
pub fn age(since: chrono::DateTime<Utc>) -> String {
    let s = (Utc::now() - since).num_seconds().max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

async fn list(api: &Api, output: Output, all: bool) -> anyhow::Result<i32> {
    let path = if all { "/runs?all=true" } else { "/runs" };
    let runs: Vec<RunView> = api.call(Method::GET, path, None).await?;
    match output {
        Output::Json => print_json(&runs)?,
        Output::Text => {
            let rows: Vec<Vec<String>> = runs
                .iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        r.playground.clone(),
                        r.title.clone(),
                        r.state.as_str().to_string(),
                        age(r.created_at),
                    ]
                })
                .collect();
            table(&["ID", "PLAYGROUND", "TITLE", "STATE", "AGE"], &rows);
        }
    }
    Ok(0)
}

async fn status(api: &Api, id: &str, output: Output) -> anyhow::Result<i32> {
    let run: RunView = api.call(Method::GET, &format!("/runs/{id}"), None).await?;
    match output {
        Output::Json => print_json(&run)?,
        Output::Text => {
            println!("run:        {}", run.id);
            println!("playground: {}", run.playground);
            println!("title:      {}", run.title);
            println!("state:      {}", run.state.as_str());
            if let Some(r) = &run.reason {
                println!("reason:     {r}");
            }
            println!("machines:   {}", run.machines.join(", "));
            println!("age:        {}", age(run.created_at));
        }
    }
    Ok(0)
}

async fn logs(api: &Api, id: &str, machine: Option<String>) -> anyhow::Result<i32> {
    let machine = match machine {
        Some(m) => m,
        None => {
            let run: RunView = api.call(Method::GET, &format!("/runs/{id}"), None).await?;
            run.machines
                .first()
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("run {id} has no machines"))?
        }
    };
    let bytes = api
        .get_bytes(&format!("/runs/{id}/machines/{machine}/logs"))
        .await?;
    use std::io::Write;
    std::io::stdout().write_all(&bytes)?;
    Ok(0)
}

async fn destroy(api: &Api, id: &str, no_wait: bool) -> anyhow::Result<i32> {
    let run: RunView = api
        .call(Method::DELETE, &format!("/runs/{id}"), None)
        .await?;
    if no_wait || run.state == RunState::Destroyed {
        eprintln!("run {id}: {}", run.state.as_str());
        return Ok(0);
    }
    let pb = spinner(format!("destroying run {id}"));
    let r = wait_settled(api, id, &pb, "destroying").await;
    pb.finish_and_clear();
    let run = r?;
    eprintln!("run {id}: {}", run.state.as_str());
    if run.state == RunState::Destroyed {
        Ok(0)
    } else {
        eprintln!(
            "error: run {id} ended {} instead of destroyed",
            run.state.as_str()
        );
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        let now = Utc::now();
        assert_eq!(age(now - chrono::Duration::seconds(5)), "5s");
        assert_eq!(age(now - chrono::Duration::seconds(125)), "2m");
        assert_eq!(age(now - chrono::Duration::hours(3)), "3h");
        assert_eq!(age(now - chrono::Duration::days(2)), "2d");
    }
}
