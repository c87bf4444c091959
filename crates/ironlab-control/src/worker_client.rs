//! HTTP client of the worker REST API (`ironlab_api::worker`), used by the reconcile loop and
//! the connect handler. One `reqwest::Client` (connection pool) for the process.

use std::time::{Duration, Instant};

use ironlab_api::ErrorBody;
use ironlab_api::worker::{
    CloneRun, RunPlan, RunStatus, SaveRun, SavedDrives, TaskInput, TaskInputResult, TokenGrant,
    WorkerStatus,
};
use reqwest::StatusCode;
use tokio::sync::Mutex;

/// How long a fetched `/v1/status` is re-used.
const STATUS_TTL: Duration = Duration::from_secs(10);

/// A failed worker call.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No answer (connection refused, timeout, broken body).
    #[error("worker at {url} is unreachable")]
    Unreachable {
        /// Worker base URL.
        url: String,
        /// Transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The worker answered with an error status.
    #[error("worker answered {status}: {detail}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The worker's error detail.
        detail: String,
    },
}

impl WorkerError {
    /// Whether the worker rejected the request itself (4xx): retrying the same call won't help.
    pub fn is_client_error(&self) -> bool {
        matches!(self, WorkerError::Status { status, .. } if status.is_client_error())
    }
}

/// Client of one worker.
#[derive(Debug)]
pub struct WorkerClient {
    http: reqwest::Client,
    base: String,
    token: String,
    status_cache: Mutex<Option<(Instant, WorkerStatus)>>,
}

impl WorkerClient {
    /// A client for the worker at `base_url` (`http://127.0.0.1:8081`) using `token`.
    pub fn new(base_url: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| anyhow::anyhow!("failed to build the worker HTTP client: {e}"))?;
        Ok(WorkerClient {
            http,
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            status_cache: Mutex::new(None),
        })
    }

    /// The worker's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn unreachable(&self, source: reqwest::Error) -> WorkerError {
        // A worker that stopped answering is not offered new runs on an old status.
        if let Ok(mut cache) = self.status_cache.try_lock() {
            *cache = None;
        }
        WorkerError::Unreachable {
            url: self.base.clone(),
            source,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, WorkerError> {
        req.bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| self.unreachable(e))
    }

    async fn error_of(&self, resp: reqwest::Response) -> WorkerError {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let detail = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.detail)
            .unwrap_or(text);
        WorkerError::Status { status, detail }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
    ) -> Result<T, WorkerError> {
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        resp.json().await.map_err(|e| self.unreachable(e))
    }

    /// `GET /v1/status`, fresh.
    pub async fn status(&self) -> Result<WorkerStatus, WorkerError> {
        let resp = self
            .send(self.http.get(format!("{}/v1/status", self.base)))
            .await?;
        let status: WorkerStatus = self.json(resp).await?;
        *self.status_cache.lock().await = Some((Instant::now(), status.clone()));
        Ok(status)
    }

    /// `GET /v1/status`, re-using an answer younger than 10 s (dropped as soon as any call
    /// finds the worker unreachable).
    pub async fn cached_status(&self) -> Result<WorkerStatus, WorkerError> {
        if let Some((at, s)) = self.status_cache.lock().await.as_ref()
            && at.elapsed() < STATUS_TTL
        {
            return Ok(s.clone());
        }
        self.status().await
    }

    /// `PUT /v1/runs/{run}`: create and start (idempotent by run id).
    pub async fn put_run(&self, plan: &RunPlan) -> Result<RunStatus, WorkerError> {
        let resp = self
            .send(
                self.http
                    .put(format!("{}/v1/runs/{}", self.base, plan.run_id))
                    .json(plan),
            )
            .await?;
        self.json(resp).await
    }

    /// `GET /v1/runs/{run}[?wait=SECS]`; `None` when the worker does not know the run.
    pub async fn get_run(
        &self,
        run: &str,
        wait: Option<u64>,
    ) -> Result<Option<RunStatus>, WorkerError> {
        let mut req = self.http.get(format!("{}/v1/runs/{run}", self.base));
        if let Some(w) = wait {
            req = req
                .query(&[("wait", w)])
                .timeout(Duration::from_secs(w + 10));
        }
        let resp = self.send(req).await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        self.json(resp).await.map(Some)
    }

    /// `GET /v1/runs/{run}/machines/{machine}/console`: the end of a machine's console log;
    /// `None` when the worker has none.
    pub async fn console(&self, run: &str, machine: &str) -> Result<Option<Vec<u8>>, WorkerError> {
        let resp = self
            .send(self.http.get(format!(
                "{}/v1/runs/{run}/machines/{machine}/console",
                self.base
            )))
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status().is_success() {
            return Err(self.error_of(resp).await);
        }
        resp.bytes()
            .await
            .map(|b| Some(b.to_vec()))
            .map_err(|e| self.unreachable(e))
    }

    /// `DELETE /v1/runs/{run}`; success when the worker removed it or never had it.
    pub async fn delete_run(&self, run: &str) -> Result<(), WorkerError> {
        let resp = self
            .send(
                self.http
                    .delete(format!("{}/v1/runs/{run}", self.base))
                    .timeout(Duration::from_secs(120)),
            )
            .await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.error_of(resp).await)
        }
    }

    /// `POST /v1/tokens`: registers a single-use terminal token.
    pub async fn grant_token(&self, grant: &TokenGrant) -> Result<(), WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/tokens", self.base))
                    .json(grant)
                    .timeout(Duration::from_secs(10)),
            )
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.error_of(resp).await)
        }
    }

    /// `GET /v1/runs/{run}/tasks/watch`: the NDJSON stream of task states (no overall
    /// timeout; the caller watches for silence, the worker sends a blank line every 15 s).
    pub async fn watch_tasks(&self, run: &str) -> Result<reqwest::Response, WorkerError> {
        let resp = self
            .send(
                self.http
                    .get(format!("{}/v1/runs/{run}/tasks/watch", self.base))
                    .timeout(Duration::from_secs(365 * 24 * 3600)),
            )
            .await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.error_of(resp).await)
        }
    }

    /// `POST /v1/runs/{run}/tasks/{name}/input`: one answer for an input task.
    pub async fn task_input(
        &self,
        run: &str,
        name: &str,
        value: &str,
    ) -> Result<TaskInputResult, WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/runs/{run}/tasks/{name}/input", self.base))
                    .json(&TaskInput {
                        value: value.to_string(),
                    })
                    .timeout(Duration::from_secs(150)),
            )
            .await?;
        self.json(resp).await
    }

    /// `POST /v1/runs/{run}/stop`: returns once the machines are down (idempotent).
    pub async fn stop_run(&self, run: &str) -> Result<RunStatus, WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/runs/{run}/stop", self.base))
                    .timeout(Duration::from_secs(120)),
            )
            .await?;
        self.json(resp).await
    }

    /// `POST /v1/runs/{run}/restart`: the run is `starting` on return (idempotent).
    pub async fn restart_run(&self, run: &str) -> Result<RunStatus, WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/runs/{run}/restart", self.base)),
            )
            .await?;
        self.json(resp).await
    }

    /// `POST /v1/runs/{run}/clone`: a new stopped run whose drives are reflinks (idempotent by
    /// `new_run_id`).
    pub async fn clone_run(&self, run: &str, new_run_id: &str) -> Result<RunStatus, WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/runs/{run}/clone", self.base))
                    .json(&CloneRun {
                        new_run_id: new_run_id.to_string(),
                    }),
            )
            .await?;
        self.json(resp).await
    }

    /// `POST /v1/runs/{run}/save`: the stopped run's drives become saved drives `saved_id`
    /// (idempotent).
    pub async fn save_run(&self, run: &str, saved_id: &str) -> Result<SavedDrives, WorkerError> {
        let resp = self
            .send(
                self.http
                    .post(format!("{}/v1/runs/{run}/save", self.base))
                    .json(&SaveRun {
                        saved_id: saved_id.to_string(),
                    }),
            )
            .await?;
        self.json(resp).await
    }

    /// `GET /v1/saved`: every save the worker holds.
    pub async fn list_saved(&self) -> Result<Vec<SavedDrives>, WorkerError> {
        let resp = self
            .send(self.http.get(format!("{}/v1/saved", self.base)))
            .await?;
        self.json(resp).await
    }

    /// `DELETE /v1/saved/{id}` (idempotent).
    pub async fn delete_saved(&self, id: &str) -> Result<(), WorkerError> {
        let resp = self
            .send(self.http.delete(format!("{}/v1/saved/{id}", self.base)))
            .await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.error_of(resp).await)
        }
    }
}

/// A worker as the control plane is configured with it: a name (stored with each run it
/// holds) and its API URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// `[a-z0-9-]`, 1–40 characters; stable across restarts (runs are pinned by it).
    pub name: String,
    /// Base URL of its REST API.
    pub url: String,
}

impl WorkerSpec {
    /// The one worker of `ironlab up` (and of an unnamed `--worker-url URL`).
    pub const LOCAL: &'static str = "local";

    /// Parses the `--worker-url` values: `NAME=URL` or, when there is only one, `URL` (named
    /// [`WorkerSpec::LOCAL`]). Names must be unique.
    pub fn parse_all<S: AsRef<str>>(values: &[S]) -> anyhow::Result<Vec<WorkerSpec>> {
        if values.is_empty() {
            anyhow::bail!("--worker-url: at least one worker is needed");
        }
        let mut out: Vec<WorkerSpec> = Vec::new();
        for v in values {
            let v = v.as_ref().trim();
            let (name, url) = match v.split_once('=') {
                Some((n, u)) if !n.contains("://") => (n.trim().to_string(), u.trim()),
                _ if values.len() == 1 => (Self::LOCAL.to_string(), v),
                _ => anyhow::bail!(
                    "--worker-url {v}: with several workers, name each one (NAME=URL, e.g. \
                     w1=http://10.0.0.2:7070): runs are pinned to a worker by its name"
                ),
            };
            let valid = !name.is_empty()
                && name.len() <= 40
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid {
                anyhow::bail!(
                    "--worker-url {v}: worker name {name:?} must be 1–40 characters of a-z, 0-9 and -"
                );
            }
            let parsed = url::Url::parse(url)
                .map_err(|e| anyhow::anyhow!("--worker-url {v}: {url:?} is not a URL: {e}"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                anyhow::bail!("--worker-url {v}: the URL must be http:// or https://");
            }
            if out.iter().any(|w| w.name == name) {
                anyhow::bail!("--worker-url {v}: the name {name} is given twice");
            }
            out.push(WorkerSpec {
                name,
                url: url.to_string(),
            });
        }
        Ok(out)
    }
}

/// The workers of this control plane, in configuration order. Every run is pinned to one (the
/// `runs.worker` column); a run recorded before workers had names (`NULL`) belongs to the
/// first.
#[derive(Debug)]
pub struct Workers {
    list: Vec<(String, std::sync::Arc<WorkerClient>)>,
}

impl Workers {
    /// Clients for `specs` (not empty), all presenting `token`.
    pub fn new(specs: &[WorkerSpec], token: &str) -> anyhow::Result<Workers> {
        if specs.is_empty() {
            anyhow::bail!("the control plane needs at least one worker");
        }
        let list = specs
            .iter()
            .map(|s| {
                Ok((
                    s.name.clone(),
                    std::sync::Arc::new(WorkerClient::new(&s.url, token)?),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Workers { list })
    }

    /// The worker named `name` (`None`: the first). `None` when no such worker is configured.
    pub fn get(&self, name: Option<&str>) -> Option<&std::sync::Arc<WorkerClient>> {
        match name {
            None => self.list.first().map(|(_, c)| c),
            Some(n) => self.list.iter().find(|(k, _)| k == n).map(|(_, c)| c),
        }
    }

    /// The name a run with `name` (possibly `NULL`) is on.
    pub fn name_of<'a>(&'a self, name: Option<&'a str>) -> &'a str {
        name.unwrap_or_else(|| self.list.first().map(|(k, _)| k.as_str()).unwrap_or(""))
    }

    /// Every worker, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &std::sync::Arc<WorkerClient>)> {
        self.list.iter().map(|(k, c)| (k.as_str(), c))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Never true (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// Which worker a new run goes to: among `candidates` (names, in configuration order) whose
/// status answered (`reachable`), the one with the fewest active runs (`active`); ties go to
/// the earlier one. When none answered, the least loaded candidate all the same (the
/// reconciler retries until it answers).
pub fn pick_worker<'a>(
    candidates: &[&'a str],
    reachable: &[&str],
    active: &std::collections::HashMap<String, i64>,
) -> Option<&'a str> {
    let load = |n: &str| active.get(n).copied().unwrap_or(0);
    let best = |it: &mut dyn Iterator<Item = &'a str>| {
        let mut best: Option<&'a str> = None;
        for n in it {
            if best.is_none_or(|b| load(n) < load(b)) {
                best = Some(n);
            }
        }
        best
    };
    best(&mut candidates.iter().copied().filter(|n| reachable.contains(n)))
        .or_else(|| best(&mut candidates.iter().copied()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_urls_parse_and_bad_ones_say_why() {
        let one = WorkerSpec::parse_all(&["http://127.0.0.1:7070"]).expect("one");
        assert_eq!(one[0].name, "local");
        let two = WorkerSpec::parse_all(&["w1=http://10.0.0.2:7070", "w2=http://10.0.0.3:7070"])
            .expect("two");
        assert_eq!(
            two.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["w1", "w2"]
        );
        for (bad, why) in [
            (vec!["http://a:1", "http://b:1"], "name each one"),
            (vec!["W1=http://a:1"], "must be 1–40"),
            (vec!["w1=http://a:1", "w1=http://b:1"], "given twice"),
            (vec!["w1=ftp://a"], "http:// or https://"),
            (vec!["w1=not a url"], "is not a URL"),
        ] {
            let e = WorkerSpec::parse_all(&bad)
                .expect_err("refused")
                .to_string();
            assert!(
                e.contains("--worker-url") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
        assert!(WorkerSpec::parse_all::<&str>(&[]).is_err());
    }

    #[test]
    fn new_runs_go_to_the_least_loaded_reachable_worker() {
        let active: std::collections::HashMap<String, i64> =
            [("a".to_string(), 2), ("b".to_string(), 1)].into();
        let all = ["a", "b", "c"];
        assert_eq!(pick_worker(&all, &["a", "b", "c"], &active), Some("c"));
        assert_eq!(pick_worker(&all, &["a", "b"], &active), Some("b"));
        assert_eq!(pick_worker(&all, &["a"], &active), Some("a"));
        // None answers: still the least loaded, the reconciler waits for it.
        assert_eq!(pick_worker(&all, &[], &active), Some("c"));
        // Ties go to the first configured.
        assert_eq!(pick_worker(&["b", "c"], &["b", "c"], &[].into()), Some("b"));
        assert_eq!(pick_worker(&[], &["a"], &active), None);
    }
}
