//! Client of `bench/tasks.sh`: latency from the moment a task's condition becomes true to the
//! `task` event reaching an SSE client of the control plane.
//!
//! It registers a playground with N chained tasks on one machine (`t_000` … `t_N-1`, each
//! `run: test -f /var/lib/ironlab-bench/t_NNN`, `interval` as given, each needing the previous
//! one, so exactly one task polls at a time), starts a run, follows
//! `GET /api/v1/runs/{id}/events`, and for each task: waits until it is `running`, waits a
//! random 0–interval phase (so the file lands anywhere in the polling cycle), creates the file
//! through the machine's root drive mounted on the host, and measures until the `completed`
//! event arrives. Prints `key=value` lines (ms); destroys the run.
//!
//! ```text
//! tasks_bench --server URL --token T --data-dir DIR [--trials 100] [--interval-ms 1000]
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

struct Args {
    server: String,
    token: String,
    data_dir: PathBuf,
    trials: usize,
    interval_ms: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        server: String::new(),
        token: String::new(),
        data_dir: PathBuf::new(),
        trials: 100,
        interval_ms: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().with_context(|| format!("{k} needs a value"))?;
        match k.as_str() {
            "--server" => a.server = v,
            "--token" => a.token = v,
            "--data-dir" => a.data_dir = v.into(),
            "--trials" => a.trials = v.parse()?,
            "--interval-ms" => a.interval_ms = v.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    if a.server.is_empty() || a.token.is_empty() || a.data_dir.as_os_str().is_empty() {
        bail!(
            "usage: tasks_bench --server URL --token T --data-dir DIR [--trials N] [--interval-ms MS]"
        );
    }
    if !(1..=1000).contains(&a.trials) {
        bail!("--trials must be 1..1000");
    }
    Ok(a)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let http = reqwest::Client::new();
    let api = |p: &str| format!("{}/api/v1{p}", a.server);
    let auth = format!("Bearer {}", a.token);

    let mut tasks = serde_json::Map::new();
    for i in 0..a.trials {
        let mut t = json!({
            "run": format!("test -f /var/lib/ironlab-bench/t_{i:03}"),
            "interval": format!("{}ms", a.interval_ms),
        });
        if i > 0 {
            t["needs"] = json!([format!("t_{:03}", i - 1)]);
        }
        tasks.insert(format!("t_{i:03}"), t);
    }
    let manifest = json!({
        "kind": "playground", "name": "bench-tasks", "title": "Task latency benchmark",
        "playground": {
            "machines": [{"name": "box", "resources": {"memory": "256MiB"},
                          "drives": [{"source": "debian", "mount": "/", "size": "2GiB"}]}],
            "tasks": tasks,
        }
    });
    let r = http
        .post(api("/playgrounds"))
        .header("authorization", &auth)
        .json(&manifest)
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("create playground: {} {}", r.status(), r.text().await?);
    }
    let run: Value = http
        .post(api("/runs"))
        .header("authorization", &auth)
        .json(&json!({"playground": "bench-tasks"}))
        .send()
        .await?
        .json()
        .await?;
    let id = run["id"].as_str().context("no run id")?.to_string();
    eprintln!("bench: run {id}");
    let result = measure(&a, &http, &auth, &id).await;
    let _ = http
        .delete(api(&format!("/runs/{id}")))
        .header("authorization", &auth)
        .send()
        .await;
    let lat = result?;
    let mut sorted = lat.clone();
    sorted.sort_by(f64::total_cmp);
    println!("trials={}", sorted.len());
    println!("interval_ms={}", a.interval_ms);
    println!("median_ms={:.0}", pct(&sorted, 0.5));
    println!("p99_ms={:.0}", pct(&sorted, 0.99));
    println!("min_ms={:.0}", sorted[0]);
    println!("max_ms={:.0}", sorted[sorted.len() - 1]);
    println!(
        "mean_ms={:.0}",
        sorted.iter().sum::<f64>() / sorted.len() as f64
    );
    Ok(())
}

async fn measure(
    a: &Args,
    http: &reqwest::Client,
    auth: &str,
    id: &str,
) -> anyhow::Result<Vec<f64>> {
    let mut resp = http
        .get(format!("{}/api/v1/runs/{id}/events", a.server))
        .header("authorization", auth)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("events: {}", resp.status());
    }
    let dir = a
        .data_dir
        .join("worker/pool/runs")
        .join(id)
        .join("box/rootfs/var/lib/ironlab-bench");
    let mut states: HashMap<String, String> = HashMap::new();
    let mut buf = String::new();
    let mut lat = Vec::new();
    let mut trial = 0usize;
    let mut created: Option<Instant> = None;
    let deadline =
        Instant::now() + Duration::from_secs(600 + 3 * a.trials as u64 * a.interval_ms / 1000);
    let mut event = String::new();
    // A tiny xorshift for the phase (no extra dependency).
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    loop {
        if trial == a.trials {
            return Ok(lat);
        }
        if Instant::now() > deadline {
            bail!("timed out at trial {trial}");
        }
        let name = format!("t_{trial:03}");
        if created.is_none() && states.get(&name).map(String::as_str) == Some("running") {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let phase = Duration::from_millis(seed % a.interval_ms.max(1));
            tokio::time::sleep(phase).await;
            std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
            std::fs::write(dir.join(&name), b"")?;
            created = Some(Instant::now());
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .context("the event stream was silent for 30 s")??
            .context("the event stream ended")?;
        let now = Instant::now();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let line = line.trim_end();
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                if event == "run" {
                    let v: Value = serde_json::from_str(d)?;
                    if v["state"] == "failed" {
                        bail!("the run failed: {}", v["reason"]);
                    }
                }
                if event == "task" {
                    let v: Value = serde_json::from_str(d)?;
                    let n = v["name"].as_str().unwrap_or("").to_string();
                    let s = v["state"].as_str().unwrap_or("").to_string();
                    if n == name
                        && s == "completed"
                        && let Some(t0) = created.take()
                    {
                        lat.push(now.duration_since(t0).as_secs_f64() * 1000.0);
                        trial += 1;
                    }
                    states.insert(n, s);
                }
            }
        }
    }
}
