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

    /// `GET /v1/status`, re-using an answer younger than 10 s.
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
