//! The worker REST API (control plane → worker) and the terminal WebSocket endpoint.
//!
//! Handlers only translate HTTP to calls on [`RunManager`] and the in-memory token store; every
//! error leaves through the single `impl IntoResponse for ApiError`. All routes need the worker's
//! bearer token except the terminal WebSocket, which needs a single-use terminal token instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use ironlab_api::ErrorBody;
use ironlab_api::worker::{RunPlan, RunStatus, TokenGrant, WorkerStatus};
use serde::Deserialize;

use crate::relay::{self, Frame};
use crate::runs::{RunError, RunManager};

/// Longest `?wait=` honoured on `GET /v1/runs/{run}`.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Shared state of the API.
pub struct ApiState {
    /// The run manager.
    pub runs: Arc<RunManager>,
    /// The bearer token the control plane presents.
    pub token: String,
    /// Base URL for terminal WebSockets.
    pub public_url: String,
    /// Runtimes offered (`container`).
    pub runtimes: Vec<String>,
    tokens: Mutex<HashMap<String, TokenGrant>>,
}

impl ApiState {
    /// New state with an empty token store.
    pub fn new(runs: Arc<RunManager>, token: String, public_url: String) -> Arc<Self> {
        Arc::new(Self {
            runs,
            token,
            public_url,
            runtimes: vec!["container".to_string()],
            tokens: Mutex::new(HashMap::new()),
        })
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, TokenGrant>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An API error; the one place where errors become HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 500; the detail is logged, not sent.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<RunError> for ApiError {
    fn from(e: RunError) -> Self {
        match e {
            RunError::BadRequest(m) => ApiError::BadRequest(m),
            RunError::NotFound(m) => ApiError::NotFound(m),
            RunError::Conflict(m) => ApiError::Conflict(m),
            RunError::Internal(e) => ApiError::Internal(e),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest(format!("invalid JSON body: {}", e.body_text()))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, detail) = match self {
            ApiError::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad_request", d),
            ApiError::Unauthorized(d) => (StatusCode::UNAUTHORIZED, "unauthorized", d),
            ApiError::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d),
            ApiError::NotFound(d) => (StatusCode::NOT_FOUND, "not_found", d),
            ApiError::Conflict(d) => (StatusCode::CONFLICT, "conflict", d),
            ApiError::Internal(e) => {
                tracing::error!("internal error: {e:#}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the worker failed; see its log".to_string(),
                )
            }
        };
        let body = ErrorBody {
            error: kind.to_string(),
            detail,
        };
        (status, Json(body)).into_response()
    }
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/runs/{run}",
            put(create_run).get(get_run).delete(delete_run),
        )
        .route("/v1/tokens", post(grant_token))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ))
        .route("/v1/runs/{run}/machines/{machine}/terminal", get(terminal))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(state)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_bearer(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::Unauthorized("missing `Authorization: Bearer <worker token>`".into())
        })?;
    if !constant_time_eq(presented.trim().as_bytes(), state.token.as_bytes()) {
        return Err(ApiError::Unauthorized("wrong worker token".into()));
    }
    Ok(next.run(req).await)
}

async fn status(State(state): State<Arc<ApiState>>) -> Json<WorkerStatus> {
    Json(WorkerStatus {
        version: env!("CARGO_PKG_VERSION").to_string(),
        accel: "none".to_string(),
        runtimes: state.runtimes.clone(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        memory_bytes: mem_total(),
        runs: state.runs.count() as u32,
        public_url: state.public_url.clone(),
    })
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn create_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
    body: Result<Json<RunPlan>, JsonRejection>,
) -> Result<(StatusCode, Json<RunStatus>), ApiError> {
    let Json(plan) = body?;
    crate::runs::validate_plan(&run, &plan)?;
    let st = state.runs.create(plan)?;
    Ok((StatusCode::ACCEPTED, Json(st)))
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

async fn get_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<RunStatus>, ApiError> {
    let st = match q.wait {
        Some(s) if s > 0 => {
            let wait = Duration::from_secs(s).min(MAX_WAIT);
            state.runs.wait_status(&run, wait).await?
        }
        _ => state.runs.status(&run).await?,
    };
    Ok(Json(st))
}

async fn delete_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runs.destroy(&run).await?;
    state.tokens().retain(|_, g| g.run != run);
    Ok(StatusCode::NO_CONTENT)
}

async fn grant_token(
    State(state): State<Arc<ApiState>>,
    body: Result<Json<TokenGrant>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(grant) = body?;
    if grant.token.len() < 16 {
        return Err(ApiError::BadRequest(
            "token must be at least 16 characters".into(),
        ));
    }
    let now = Utc::now();
    let mut tokens = state.tokens();
    tokens.retain(|_, g| g.expires_at > now);
    tokens.insert(grant.token.clone(), grant);
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Checks and consumes a terminal token for (run, machine).
fn take_token(
    state: &ApiState,
    run: &str,
    machine: &str,
    token: Option<&str>,
) -> Result<(), ApiError> {
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::Unauthorized("missing ?token=: ask the control plane for a terminal token".into())
    })?;
    // Presenting a token uses it up, whatever the outcome.
    let grant = state
        .tokens()
        .remove(token)
        .ok_or_else(|| ApiError::Unauthorized("unknown or already used terminal token".into()))?;
    if grant.expires_at <= Utc::now() {
        return Err(ApiError::Unauthorized("terminal token expired".into()));
    }
    if grant.run != run || grant.machine != machine {
        return Err(ApiError::Forbidden(format!(
            "this terminal token opens machine {} of run {}, not {machine} of {run}",
            grant.machine, grant.run
        )));
    }
    Ok(())
}

async fn terminal(
    State(state): State<Arc<ApiState>>,
    Path((run, machine)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    state.runs.has_machine(&run, &machine)?;
    take_token(&state, &run, &machine, q.token.as_deref())?;
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("not a WebSocket request: {e}")))?;
    let agent = state.runs.machine_agent(&run, &machine).await?;
    tracing::info!(%run, %machine, "terminal session");
    Ok(ws.on_upgrade(move |socket| async move {
        let (sink, stream) = socket.split();
        let sink = sink.with(|f: Frame| async move {
            Ok::<_, axum::Error>(match f {
                Frame::Text(t) => Message::Text(t.into()),
                Frame::Binary(b) => Message::Binary(b),
                Frame::Close => Message::Close(None),
            })
        });
        let stream = stream
            .take_while(|m| futures::future::ready(!matches!(m, Ok(Message::Close(_)) | Err(_))))
            .filter_map(|m| async move {
                match m {
                    Ok(Message::Text(t)) => Some(Frame::Text(t.to_string())),
                    Ok(Message::Binary(b)) => Some(Frame::Binary(b)),
                    _ => None,
                }
            });
        relay::relay(Box::pin(sink), Box::pin(stream), agent).await;
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;

    use async_trait::async_trait;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use ironlab_api::worker::ImageRef;
    use tower::ServiceExt;

    use super::*;
    use crate::drives::{DriveProvider, PreparedImage, Progress};
    use crate::runtime::{
        AgentEndpoint, MachineHandle, MachineRuntime, MachineSpec, MachineState, RuntimeError,
    };

    /// A runtime and drive provider that refuse everything (these tests never start machines).
    struct Nothing;

    #[async_trait]
    impl MachineRuntime for Nothing {
        fn name(&self) -> &'static str {
            "container"
        }
        async fn start(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
            Err(RuntimeError::new(
                "start",
                spec.plan.name.clone(),
                "no runtime in this test",
            ))
        }
        async fn stop(&self, _: &MachineHandle, _: Duration) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn destroy(&self, _: &MachineHandle) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn observe(&self, _: &MachineHandle) -> Result<MachineState, RuntimeError> {
            Ok(MachineState::Missing)
        }
        fn agent(&self, m: &MachineHandle) -> AgentEndpoint {
            AgentEndpoint {
                socket: m.agent_socket(),
            }
        }
        async fn knows_run(&self, _: &str) -> anyhow::Result<bool> {
            Ok(false)
        }
        async fn clean_leftovers(&self, _: &FsPath, _: &[String]) -> anyhow::Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl DriveProvider for Nothing {
        async fn image(&self, image: &ImageRef, _: Progress) -> anyhow::Result<PreparedImage> {
            anyhow::bail!("image {image:?} not found in this test")
        }
        async fn clone_root(&self, _: &PreparedImage, _: &FsPath, _: u64) -> anyhow::Result<()> {
            anyhow::bail!("no drives in this test")
        }
    }

    fn app(dir: &FsPath) -> Router {
        let runs = RunManager::new(dir.to_path_buf(), Arc::new(Nothing), Arc::new(Nothing));
        router(ApiState::new(runs, "secret-token".into(), "ws://w".into()))
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = HttpRequest::builder().method(method).uri(uri);
        if let Some(b) = bearer {
            req = req.header("authorization", format!("Bearer {b}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Body::from(body.unwrap_or("").to_string()))
            .expect("request");
        let resp = app.clone().oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, v)
    }

    fn plan_json(run: &str, runtime: &str) -> String {
        format!(
            r#"{{"run_id":"{run}","machines":[{{"name":"m1","runtime":"{runtime}",
            "image":{{"kind":"stock","name":"nope"}},"root_size_bytes":134217728,"cpus":1,
            "memory_bytes":134217728,"pids_limit":100,"default_user":"root"}}]}}"#
        )
    }

    #[test]
    fn bearer_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[tokio::test]
    async fn bearer_is_required_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        let (s, v) = call(&app, "GET", "/v1/status", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"], "unauthorized");
        let (s, _) = call(&app, "GET", "/v1/status", Some("wrong"), None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, v) = call(&app, "GET", "/v1/status", Some("secret-token"), None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["runtimes"][0], "container");
        assert_eq!(v["public_url"], "ws://w");
    }

    #[tokio::test]
    async fn bad_requests_and_unknown_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        let t = Some("secret-token");
        let (s, v) = call(&app, "GET", "/v1/runs/abc", t, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(v["detail"].as_str().unwrap_or("").contains("abc"));
        let (s, v) = call(&app, "PUT", "/v1/runs/abc", t, Some("{not json")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"], "bad_request");
        let (s, v) = call(
            &app,
            "PUT",
            "/v1/runs/abd",
            t,
            Some(&plan_json("abc", "container")),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or("")
                .contains("does not match")
        );
        let (s, v) = call(
            &app,
            "PUT",
            "/v1/runs/abc",
            t,
            Some(&plan_json("abc", "microvm")),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["detail"].as_str().unwrap_or("").contains("runtime"));
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/runs/UPPER",
            t,
            Some(&plan_json("UPPER", "container")),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _) = call(&app, "DELETE", "/v1/runs/abc", t, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT, "deleting an unknown run is fine");
        let (s, _) = call(
            &app,
            "GET",
            "/v1/runs/abc/machines/m1/terminal?token=x",
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, v) = call(&app, "GET", "/v1/nope", t, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["error"], "not_found");
    }

    #[tokio::test]
    async fn failed_start_is_reported_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        let t = Some("secret-token");
        let (s, v) = call(
            &app,
            "PUT",
            "/v1/runs/abc",
            t,
            Some(&plan_json("abc", "container")),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        assert_eq!(v["state"], "starting");
        let (s, v) = call(&app, "GET", "/v1/runs/abc?wait=10", t, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(v["state"], "failed");
        assert!(
            v["error"]
                .as_str()
                .unwrap_or("")
                .contains("not found in this test"),
            "{v}"
        );
        // The terminal of a failed run: the token is checked first, then the state.
        let grant = r#"{"token":"0123456789abcdef0123","user":"u","run":"abc","machine":"m1",
            "expires_at":"2999-01-01T00:00:00Z"}"#;
        let (s, _) = call(&app, "POST", "/v1/tokens", t, Some(grant)).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let uri = "/v1/runs/abc/machines/m1/terminal?token=0123456789abcdef0123";
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let (s, v) = call(&app, "GET", uri, None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "a token is single-use: {v}");
        let (s, _) = call(&app, "DELETE", "/v1/runs/abc", t, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, _) = call(&app, "GET", "/v1/runs/abc", t, None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}
