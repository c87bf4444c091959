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
    use super::*;

    #[test]
    fn bearer_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
