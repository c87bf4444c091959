//! `ironlab workers` (admins): the control plane's workers as they answer now.

use ironlab_api::v1::WorkerView;
use reqwest::Method;

use crate::cli::Output;
use crate::client::Api;
use crate::cmd::playground::{human_bytes, print_json, table};

/// Lists the workers; exits 1 when one does not answer (for monitoring scripts).
pub async fn run(api: &Api, output: Output) -> anyhow::Result<i32> {
    let workers: Vec<WorkerView> = api.call(Method::GET, "/workers", None).await?;
    match output {
        Output::Json => print_json(&workers)?,
        Output::Text => {
            let rows: Vec<Vec<String>> = workers
                .iter()
                .map(|w| {
                    vec![
                        w.name.clone(),
                        w.url.clone(),
                        if w.reachable {
                            "up".into()
                        } else {
                            "unreachable".into()
                        },
                        if w.runtimes.is_empty() {
                            "-".into()
                        } else {
                            format!(
                                "{} ({})",
                                w.runtimes.join(", "),
                                w.accel.as_deref().unwrap_or("-")
                            )
                        },
                        match (w.cpus, w.memory_bytes) {
                            (Some(c), Some(m)) => format!("{c} CPUs, {}", human_bytes(m)),
                            _ => "-".into(),
                        },
                        w.active_runs.to_string(),
                        w.runs.to_string(),
                    ]
                })
                .collect();
            table(
                &["NAME", "URL", "STATE", "RUNTIMES", "HOST", "ACTIVE", "RUNS"],
                &rows,
            );
            for w in workers.iter().filter(|w| !w.reachable) {
                eprintln!(
                    "worker {} does not answer: {} (its runs wait for it; check `ironlab worker` on that host)",
                    w.name,
                    w.error.as_deref().unwrap_or("no answer")
                );
            }
        }
    }
    Ok(if workers.iter().all(|w| w.reachable) {
        0
    } else {
        1
    })
}
