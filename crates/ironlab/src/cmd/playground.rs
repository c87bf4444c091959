//! `ironlab playground catalog|create|remove|start|list|destroy` (`tasks` and `test` live in
//! `tasks.rs` and `solution.rs`). `start` returns once the run is running and its init tasks
//! passed (the playground is set up). `stop|restart|clone|save` manage a run's lifecycle.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use ironlab_api::v1::{PlaygroundView, RunState, RunTasksView, RunView, StorageView, TaskState};
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
        PlaygroundCommand::Tasks { run, watch, output } => {
            super::tasks::tasks(api, &run, watch, output).await
        }
        PlaygroundCommand::Test {
            file,
            solution,
            timeout,
        } => super::solution::test(api, &file, &solution, timeout).await,
        PlaygroundCommand::Stop { run, no_wait } => stop(api, &run, no_wait).await,
        PlaygroundCommand::Restart { run, no_wait } => restart(api, &run, no_wait).await,
        PlaygroundCommand::Clone { run, title } => {
            let body = match title {
                Some(t) => json!({ "title": t }),
                None => json!({}),
            };
            let clone: RunView = api
                .call(Method::POST, &format!("/runs/{run}/clone"), Some(&body))
                .await?;
            eprintln!("cloned run {run} into {} ({})", clone.id, clone.title);
            println!("{}", clone.id);
            Ok(0)
        }
        PlaygroundCommand::Save {
            run,
            name,
            title,
            description,
        } => {
            let mut body = json!({ "name": name });
            if let Some(t) = title {
                body["title"] = json!(t);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            let p: PlaygroundView = api
                .call(Method::POST, &format!("/runs/{run}/save"), Some(&body))
                .await?;
            eprintln!(
                "saved run {run} as playground {} (parent: {})",
                p.name,
                p.parent.as_deref().unwrap_or("-")
            );
            println!("{}", p.name);
            Ok(0)
        }
        PlaygroundCommand::Status { run, output } => status(api, &run, output).await,
        PlaygroundCommand::Logs { run, machine } => logs(api, &run, machine).await,
    }
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints rows as aligned columns.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) {
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
                        parent_chain(&list, p),
                    ]
                })
                .collect();
            table(&["NAME", "TITLE", "MACHINES", "KIND", "PARENTS"], &rows);
        }
    }
    Ok(0)
}

/// `saved-2 < saved-1 < debian`: the playgrounds `p` was saved from, nearest first ("-" when
/// none). A parent the caller cannot see is shown by name and ends the chain.
pub fn parent_chain(list: &[PlaygroundView], p: &PlaygroundView) -> String {
    let mut chain: Vec<String> = Vec::new();
    let mut next = p.parent.clone();
    while let Some(name) = next {
        if chain.contains(&name) || chain.len() > 64 {
            break;
        }
        next = list
            .iter()
            .find(|q| q.name == name)
            .and_then(|q| q.parent.clone());
        chain.push(name);
    }
    if chain.is_empty() {
        "-".to_string()
    } else {
        chain.join(" < ")
    }
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
        RunState::Pending
            | RunState::Starting
            | RunState::Destroying
            | RunState::Stopping
            | RunState::Restarting
    )
}

/// Long-polls the run until it settles.
pub(crate) async fn wait_settled(
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
        let r = match r {
            Ok(run) if run.state == RunState::Running => {
                wait_init_tasks(api, &run.id, &pb).await.map(|()| run)
            }
            other => other,
        };
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

/// How long `start` waits for the init tasks of a running run.
const INIT_WAIT: Duration = Duration::from_secs(300);

/// Waits until the run's init tasks passed (the playground is set up), if it has any.
async fn wait_init_tasks(api: &Api, id: &str, pb: &indicatif::ProgressBar) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + INIT_WAIT;
    loop {
        let v: RunTasksView = api
            .call(Method::GET, &format!("/runs/{id}/tasks"), None)
            .await?;
        if v.ready {
            return Ok(());
        }
        if let Some(t) = v
            .tasks
            .iter()
            .find(|t| t.init && t.state == TaskState::Failed)
        {
            anyhow::bail!(
                "run {id} is running but its setup task {} failed: {}",
                t.name,
                t.hint
            );
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "run {id} is running but its setup tasks did not pass within {} s \
                 (`ironlab playground tasks {id}` shows them)",
                INIT_WAIT.as_secs()
            );
        }
        pb.set_message(format!("setting up run {id} (init tasks)"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
                        match r.snapshot.as_deref() {
                            Some("uploaded") => format!("{} · saved off host", r.state.as_str()),
                            Some(other) => format!("{} · {other}", r.state.as_str()),
                            None => r.state.as_str().to_string(),
                        },
                        age(r.created_at),
                        r.storage_bytes
                            .map(human_bytes)
                            .unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            table(
                &["ID", "PLAYGROUND", "TITLE", "STATE", "AGE", "STORAGE"],
                &rows,
            );
            let s: StorageView = api.call(Method::GET, "/storage", None).await?;
            println!(
                "storage: {} of {} (stopped runs and saved playgrounds)",
                human_bytes(s.used_bytes),
                human_bytes(s.quota_bytes)
            );
        }
    }
    Ok(0)
}

/// `1.5 GiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn stop(api: &Api, id: &str, no_wait: bool) -> anyhow::Result<i32> {
    let run: RunView = api
        .call(Method::POST, &format!("/runs/{id}/stop"), None)
        .await?;
    let run = if no_wait {
        run
    } else {
        let pb = spinner(format!("stopping run {id}"));
        let r = wait_settled(api, id, &pb, "stopping").await;
        pb.finish_and_clear();
        r?
    };
    match run.state {
        RunState::Stopped => {
            eprintln!(
                "run {id}: stopped, holding {}",
                run.storage_bytes
                    .map(human_bytes)
                    .unwrap_or_else(|| "an unmeasured amount".into())
            );
            Ok(0)
        }
        RunState::Stopping if no_wait => {
            eprintln!("run {id}: stopping");
            Ok(0)
        }
        other => {
            eprintln!(
                "error: run {id} is {}{}",
                other.as_str(),
                run.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            Ok(1)
        }
    }
}

async fn restart(api: &Api, id: &str, no_wait: bool) -> anyhow::Result<i32> {
    let run: RunView = api
        .call(Method::POST, &format!("/runs/{id}/restart"), None)
        .await?;
    let run = if no_wait {
        run
    } else {
        let pb = spinner(format!("restarting run {id}"));
        let r = wait_settled(api, id, &pb, "restarting").await;
        pb.finish_and_clear();
        r?
    };
    match run.state {
        RunState::Running | RunState::Restarting => {
            println!("{id}");
            Ok(0)
        }
        other => {
            eprintln!(
                "error: run {id} is {} after the restart: {}",
                other.as_str(),
                run.reason.as_deref().unwrap_or("no reason given")
            );
            Ok(1)
        }
    }
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

    fn pg(name: &str, parent: Option<&str>) -> PlaygroundView {
        PlaygroundView {
            name: name.into(),
            title: name.into(),
            description: String::new(),
            machines: vec![],
            stock: parent.is_none(),
            owner: String::new(),
            parent: parent.map(Into::into),
            created_at: Utc::now(),
            manifest: serde_json::Value::Null,
        }
    }

    #[test]
    fn parent_chains() {
        let list = vec![
            pg("debian", None),
            pg("s1", Some("debian")),
            pg("s2", Some("s1")),
            pg("s3", Some("s2")),
            pg("orphan", Some("gone")),
        ];
        assert_eq!(parent_chain(&list, &list[0]), "-");
        assert_eq!(parent_chain(&list, &list[3]), "s2 < s1 < debian");
        assert_eq!(parent_chain(&list, &list[4]), "gone");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
