//! The worker REST API (control plane → worker) and the terminal WebSocket endpoint.
//!
//! Handlers only translate HTTP to calls on [`RunManager`] and the in-memory token store; every
//! error leaves through the single `impl IntoResponse for ApiError`. All routes need the worker's
//! bearer token except the terminal and port WebSockets, which need a single-use connection
//! token instead (its scope says which of the two it opens).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use ironlab_api::ErrorBody;
use ironlab_api::worker::{
    CloneRun, RunPlan, RunStatus, SaveRun, SavedDrives, TokenGrant, TokenScope, WorkerStatus,
};
use serde::Deserialize;

use crate::relay::{self, Frame};
use crate::runs::{RunError, RunManager};
use crate::sessions::{Limits, Sessions};

/// Longest `?wait=` honoured on `GET /v1/runs/{run}`.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// Longest life of a terminal token after the worker received it, whatever its `expires_at`.
pub const TOKEN_TTL: Duration = Duration::from_secs(30);

/// The wall clock token expiry is checked against (injectable for tests).
pub type Clock = Arc<dyn Fn() -> chrono::DateTime<Utc> + Send + Sync>;

/// A registered terminal token.
struct Grant {
    grant: TokenGrant,
    /// `min(expires_at, received + TOKEN_TTL)`.
    deadline: chrono::DateTime<Utc>,
}

/// Shared state of the API.
pub struct ApiState {
    /// The run manager.
    pub runs: Arc<RunManager>,
    /// The bearer token the control plane presents.
    pub token: String,
    /// Base URL for terminal WebSockets.
    pub public_url: String,
    /// Runtimes offered (`container`, `microvm`).
    pub runtimes: Vec<String>,
    /// `kvm`, `tcg` or `none`.
    pub accel: String,
    /// Persistent terminal sessions.
    pub sessions: Arc<Sessions>,
    tokens: Mutex<HashMap<String, Grant>>,
    clock: Clock,
}

impl ApiState {
    /// New state with an empty token store, the system clock and default session limits.
    pub fn new(runs: Arc<RunManager>, token: String, public_url: String) -> Arc<Self> {
        Self::with(
            runs,
            token,
            public_url,
            Arc::new(Utc::now),
            Sessions::new(Limits::default()),
        )
    }

    /// New state with a given clock and session table.
    pub fn with(
        runs: Arc<RunManager>,
        token: String,
        public_url: String,
        clock: Clock,
        sessions: Arc<Sessions>,
    ) -> Arc<Self> {
        let runtimes = runs.runtimes();
        let accel = runs.accel();
        Arc::new(Self {
            runs,
            token,
            public_url,
            runtimes,
            accel,
            sessions,
            tokens: Mutex::new(HashMap::new()),
            clock,
        })
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> chrono::DateTime<Utc> {
        (self.clock)()
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
    /// 502: the machine did not accept a connection to a published port.
    #[error("{0}")]
    BadGateway(String),
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
            ApiError::BadGateway(d) => (StatusCode::BAD_GATEWAY, "bad_gateway", d),
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
        .route("/v1/runs/{run}/stop", post(stop_run))
        .route("/v1/runs/{run}/restart", post(restart_run))
        .route("/v1/runs/{run}/clone", post(clone_run))
        .route("/v1/runs/{run}/save", post(save_run))
        .route("/v1/saved", get(list_saved))
        .route("/v1/saved/{id}", delete(delete_saved))
        .route("/v1/tokens", post(grant_token))
        .merge(crate::api_tasks::routes())
        .route("/v1/runs/{run}/machines/{machine}/console", get(console))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_bearer,
        ))
        .route("/v1/runs/{run}/machines/{machine}/terminal", get(terminal))
        .route("/v1/runs/{run}/machines/{machine}/port/{port}", get(port))
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
        accel: state.accel.clone(),
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

/// `?bytes=N`: how much of the end of the console log to return.
#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    bytes: Option<u64>,
}

/// The end of a machine's console log (text/plain); kept for a day after the run is gone.
async fn console(
    State(state): State<Arc<ApiState>>,
    Path((run, machine)): Path<(String, String)>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Response, ApiError> {
    let max = q
        .bytes
        .unwrap_or(crate::runs::CONSOLE_TAIL)
        .min(crate::runs::CONSOLE_KEEP);
    let bytes = state.runs.console_log(&run, &machine, max)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

async fn delete_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.tokens().retain(|_, g| g.grant.run != run);
    state
        .sessions
        .end_run(&run, &format!("run {run} was destroyed"));
    state.runs.destroy(&run).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Ends the run's terminal sessions and forgets its tokens (its machines are going away).
fn end_terminals(state: &ApiState, run: &str, why: &str) {
    state.tokens().retain(|_, g| g.grant.run != run);
    state.sessions.end_run(run, why);
}

async fn stop_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<(StatusCode, Json<RunStatus>), ApiError> {
    end_terminals(&state, &run, &format!("run {run} was stopped"));
    let st = state.runs.stop(&run).await?;
    Ok((StatusCode::ACCEPTED, Json(st)))
}

async fn restart_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<(StatusCode, Json<RunStatus>), ApiError> {
    let st = state.runs.restart(&run).await?;
    Ok((StatusCode::ACCEPTED, Json(st)))
}

async fn clone_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
    body: Result<Json<CloneRun>, JsonRejection>,
) -> Result<(StatusCode, Json<RunStatus>), ApiError> {
    let Json(req) = body?;
    let st = state.runs.clone_run(&run, &req.new_run_id).await?;
    Ok((StatusCode::CREATED, Json(st)))
}

async fn save_run(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
    body: Result<Json<SaveRun>, JsonRejection>,
) -> Result<(StatusCode, Json<SavedDrives>), ApiError> {
    let Json(req) = body?;
    let saved = state.runs.save(&run, &req.saved_id).await?;
    Ok((StatusCode::CREATED, Json(saved)))
}

async fn list_saved(State(state): State<Arc<ApiState>>) -> Json<Vec<SavedDrives>> {
    Json(state.runs.list_saved())
}

async fn delete_saved(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.runs.delete_saved(&id).await?;
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
    if grant.user.is_empty() {
        return Err(ApiError::BadRequest(
            "a terminal token needs the user it is issued to".into(),
        ));
    }
    let now = state.now();
    let ttl = chrono::Duration::from_std(TOKEN_TTL).unwrap_or(chrono::Duration::seconds(30));
    let deadline = grant.expires_at.min(now + ttl);
    let mut tokens = state.tokens();
    tokens.retain(|_, g| g.deadline > now);
    tokens.insert(grant.token.clone(), Grant { grant, deadline });
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Checks and consumes a connection token for (run, machine, scope); returns its grant.
fn take_token(
    state: &ApiState,
    run: &str,
    machine: &str,
    scope: TokenScope,
    token: Option<&str>,
) -> Result<TokenGrant, ApiError> {
    let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
        ApiError::Unauthorized("missing ?token=: ask the control plane for a terminal token".into())
    })?;
    // Presenting a token uses it up, whatever the outcome.
    let Grant { grant, deadline } = state
        .tokens()
        .remove(token)
        .ok_or_else(|| ApiError::Unauthorized("unknown or already used terminal token".into()))?;
    if deadline <= state.now() {
        return Err(ApiError::Unauthorized(
            "terminal token expired: ask the control plane for a new one".into(),
        ));
    }
    if grant.run != run || grant.machine != machine {
        return Err(ApiError::Forbidden(format!(
            "this terminal token opens machine {} of run {}, not {machine} of {run}",
            grant.machine, grant.run
        )));
    }
    if grant.scope != scope {
        return Err(ApiError::Forbidden(format!(
            "this token opens {} of machine {machine}, not {scope}",
            grant.scope
        )));
    }
    Ok(grant)
}

/// The WebSocket as [`Frame`]s: a sink and a stream that ends at the client's close.
fn frames(
    socket: axum::extract::ws::WebSocket,
) -> (
    impl futures::Sink<Frame, Error = axum::Error> + Unpin,
    impl futures::Stream<Item = Frame> + Unpin,
) {
    let (sink, stream) = socket.split();
    let sink = sink.with(|f: Frame| async move {
        Ok::<_, axum::Error>(match f {
            Frame::Text(t) => Message::Text(t.into()),
            Frame::Binary(b) => Message::Binary(b),
            Frame::Close => Message::Close(None),
            Frame::CloseWith(code, reason) => Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            })),
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
    (Box::pin(sink), Box::pin(stream))
}

/// `GET /v1/runs/{run}/machines/{machine}/port/{port}?token=T`: a WebSocket carrying TCP bytes
/// to `127.0.0.1:port` inside the machine (`ironlab_api::portfwd`). The port is dialled before
/// the upgrade, so a port nobody listens on is a 502 with the reason.
async fn port(
    State(state): State<Arc<ApiState>>,
    Path((run, machine, port)): Path<(String, String, String)>,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::BadRequest(format!("port: {port:?} is not in 1-65535")))?;
    state.runs.has_machine(&run, &machine)?;
    let grant = take_token(
        &state,
        &run,
        &machine,
        TokenScope::Port { port },
        q.token.as_deref(),
    )?;
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("not a WebSocket request: {e}")))?;
    let agent = state.runs.machine_agent(&run, &machine).await?;
    let dialed = crate::portfwd::dial(&agent, port)
        .await
        .map_err(|e| match e {
            crate::portfwd::DialError::Refused(m) => {
                ApiError::BadGateway(format!("machine {machine}: {m}"))
            }
            crate::portfwd::DialError::Agent(m) => {
                ApiError::Internal(anyhow::anyhow!("dial {run}/{machine}:{port}: {m}"))
            }
        })?;
    // Debug, not info: an http-port page makes one connection per request.
    tracing::debug!(%run, %machine, port, peer = %dialed.peer, user = %grant.user, "port connection");
    Ok(ws.on_upgrade(move |socket| async move {
        let (sink, stream) = frames(socket);
        crate::portfwd::pump(sink, stream, dialed).await;
    }))
}

async fn terminal(
    State(state): State<Arc<ApiState>>,
    Path((run, machine)): Path<(String, String)>,
    Query(q): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    state.runs.has_machine(&run, &machine)?;
    let grant = take_token(
        &state,
        &run,
        &machine,
        TokenScope::Terminal,
        q.token.as_deref(),
    )?;
    let ws = ws.map_err(|e| ApiError::BadRequest(format!("not a WebSocket request: {e}")))?;
    let agent = state.runs.machine_agent(&run, &machine).await?;
    tracing::info!(%run, %machine, user = %grant.user, "terminal connection");
    let conn = relay::Connection {
        run,
        machine,
        user: grant.user,
        sessions: state.sessions.clone(),
        agent,
    };
    Ok(ws.on_upgrade(move |socket| async move {
        let (sink, stream) = frames(socket);
        relay::relay(sink, stream, conn).await;
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
        async fn release(&self, _: &MachineHandle) -> Result<(), RuntimeError> {
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

    #[tokio::test]
    async fn lifecycle_endpoints_refuse_bad_input_and_wrong_states() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        let t = Some("secret-token");
        let (s, _) = call(&app, "POST", "/v1/runs/nope/stop", None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        for op in ["stop", "restart"] {
            let (s, v) = call(&app, "POST", &format!("/v1/runs/zzz/{op}"), t, None).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{op}: {v}");
        }
        let (s, v) = call(&app, "POST", "/v1/runs/BAD!/stop", t, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        // A failed run (its image does not exist) cannot be stopped, cloned or saved.
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/runs/abc",
            t,
            Some(&plan_json("abc", "container")),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        let (_, v) = call(&app, "GET", "/v1/runs/abc?wait=10", t, None).await;
        assert_eq!(v["state"], "failed");
        let (s, v) = call(&app, "POST", "/v1/runs/abc/stop", t, None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or("")
                .contains("only a running run"),
            "{v}"
        );
        let (s, v) = call(&app, "POST", "/v1/runs/abc/restart", t, None).await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        let (s, v) = call(
            &app,
            "POST",
            "/v1/runs/abc/clone",
            t,
            Some(r#"{"new_run_id":"xyz"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("stop it first"),
            "{v}"
        );
        let (s, v) = call(
            &app,
            "POST",
            "/v1/runs/abc/clone",
            t,
            Some(r#"{"new_run_id":"../x"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("new_run_id"),
            "{v}"
        );
        let (s, v) = call(
            &app,
            "POST",
            "/v1/runs/abc/clone",
            t,
            Some(r#"{"new_id":"x"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        let (s, v) = call(
            &app,
            "POST",
            "/v1/runs/abc/save",
            t,
            Some(r#"{"saved_id":"s1"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::CONFLICT, "{v}");
        let (s, v) = call(
            &app,
            "POST",
            "/v1/runs/abc/save",
            t,
            Some(r#"{"saved_id":"S 1"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("saved_id"),
            "{v}"
        );
        // Nothing was made.
        assert!(!dir.path().join("xyz").exists());
        let (s, _) = call(&app, "DELETE", "/v1/saved/s1", t, None).await;
        assert_eq!(
            s,
            StatusCode::NO_CONTENT,
            "removing missing saved drives is a no-op"
        );
        let (s, _) = call(&app, "DELETE", "/v1/saved/..", t, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn terminal_tokens_are_single_use_short_lived_and_bound_to_run_and_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let runs = RunManager::new(
            dir.path().to_path_buf(),
            Arc::new(Nothing),
            Arc::new(Nothing),
        );
        // A clock the test moves.
        let offset = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let o2 = offset.clone();
        let clock: Clock = Arc::new(move || {
            Utc::now() + chrono::Duration::seconds(o2.load(std::sync::atomic::Ordering::SeqCst))
        });
        let state = ApiState::with(
            runs,
            "secret-token".into(),
            "ws://w".into(),
            clock,
            Sessions::new(Limits::default()),
        );
        let app = router(state);
        let t = Some("secret-token");
        for run in ["abc", "abd"] {
            let (s, _) = call(
                &app,
                "PUT",
                &format!("/v1/runs/{run}"),
                t,
                Some(&plan_json(run, "container")),
            )
            .await;
            assert_eq!(s, StatusCode::ACCEPTED);
            let (_, v) = call(&app, "GET", &format!("/v1/runs/{run}?wait=10"), t, None).await;
            assert_eq!(v["state"], "failed");
        }
        let grant = |token: &str, user: &str, run: &str, machine: &str, expires: &str| {
            format!(
                r#"{{"token":"{token}","user":"{user}","run":"{run}","machine":"{machine}","expires_at":"{expires}"}}"#
            )
        };
        let far = "2999-01-01T00:00:00Z";
        let term = |run: &str, machine: &str, token: &str| {
            format!("/v1/runs/{run}/machines/{machine}/terminal?token={token}")
        };
        // A good token passes the checks (then the request is refused for not being a
        // WebSocket upgrade: 400, after the token was used up).
        let (s, _) = call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("good-token-0123456789", "u1", "abc", "m1", far)),
        )
        .await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "good-token-0123456789"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        // Reused.
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "good-token-0123456789"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("already used"),
            "{v}"
        );
        // Another run; another machine (the run has only m1, so its m2 is a 404 before any
        // token is looked at; a token for run abd presented on abc is refused).
        call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("other-run-0123456789", "u1", "abd", "m1", far)),
        )
        .await;
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "other-run-0123456789"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("run abd"),
            "{v}"
        );
        call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("other-mach-0123456789", "u1", "abc", "m2", far)),
        )
        .await;
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "other-mach-0123456789"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("machine m2"),
            "{v}"
        );
        // Registered already expired.
        call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant(
                "expired-0123456789ab",
                "u1",
                "abc",
                "m1",
                "2000-01-01T00:00:00Z",
            )),
        )
        .await;
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "expired-0123456789ab"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("expired"),
            "{v}"
        );
        // A token lives at most 30 s after the worker got it, whatever its expires_at says.
        call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("lives30s-0123456789a", "u1", "abc", "m1", far)),
        )
        .await;
        call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("lives29s-0123456789a", "u1", "abc", "m1", far)),
        )
        .await;
        offset.store(29, std::sync::atomic::Ordering::SeqCst);
        let (s, _) = call(
            &app,
            "GET",
            &term("abc", "m1", "lives29s-0123456789a"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "valid at 29 s");
        offset.store(31, std::sync::atomic::Ordering::SeqCst);
        let (s, v) = call(
            &app,
            "GET",
            &term("abc", "m1", "lives30s-0123456789a"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "expired at 31 s: {v}");
        // A grant must name its user.
        let (s, _) = call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("nouser-0123456789abc", "", "abc", "m1", far)),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
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

    #[tokio::test]
    async fn terminal_tokens_cannot_open_ports_and_port_tokens_only_their_port() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path());
        let t = Some("secret-token");
        let (s, _) = call(
            &app,
            "PUT",
            "/v1/runs/abc",
            t,
            Some(&plan_json("abc", "container")),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED);
        call(&app, "GET", "/v1/runs/abc?wait=10", t, None).await;
        let grant = |token: &str, scope: &str| {
            let scope = if scope.is_empty() {
                String::new()
            } else {
                format!(r#","scope":{scope}"#)
            };
            format!(
                r#"{{"token":"{token}","user":"u1","run":"abc","machine":"m1","expires_at":"2999-01-01T00:00:00Z"{scope}}}"#
            )
        };
        let register = |token: &'static str, scope: &'static str| {
            let app = app.clone();
            let body = grant(token, scope);
            async move {
                let (s, v) = call(&app, "POST", "/v1/tokens", t, Some(&body)).await;
                assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
            }
        };
        let port =
            |p: &str, token: &str| format!("/v1/runs/abc/machines/m1/port/{p}?token={token}");
        let term = |token: &str| format!("/v1/runs/abc/machines/m1/terminal?token={token}");

        // A terminal token (no scope, as before published ports) on a port: 403, and used up.
        register("terminal-0123456789", "").await;
        let (s, v) = call(
            &app,
            "GET",
            &port("8080", "terminal-0123456789"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(
            v["detail"],
            "this token opens the terminal of machine m1, not port 8080"
        );
        let (s, _) = call(&app, "GET", &term("terminal-0123456789"), None, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "the refused token was used up");

        // A port token on the terminal, and on another port: 403.
        register("port8080-0123456789", r#"{"kind":"port","port":8080}"#).await;
        let (s, v) = call(&app, "GET", &term("port8080-0123456789"), None, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(
            v["detail"],
            "this token opens port 8080 of machine m1, not the terminal"
        );
        register("port8080-abcdefghij", r#"{"kind":"port","port":8080}"#).await;
        let (s, v) = call(
            &app,
            "GET",
            &port("9090", "port8080-abcdefghij"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
        assert_eq!(
            v["detail"],
            "this token opens port 8080 of machine m1, not port 9090"
        );

        // Its own port passes the token checks (then: not a WebSocket request).
        register("port8080-klmnopqrst", r#"{"kind":"port","port":8080}"#).await;
        let (s, v) = call(
            &app,
            "GET",
            &port("8080", "port8080-klmnopqrst"),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("not a WebSocket request"),
            "{v}"
        );

        // Bad ports are 400 naming the field; a bad scope is a 400 at registration.
        for bad in ["0", "65536", "http"] {
            let (s, v) = call(&app, "GET", &port(bad, "x"), None, None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
            assert_eq!(v["detail"], format!("port: {bad:?} is not in 1-65535"));
        }
        let (s, _) = call(
            &app,
            "POST",
            "/v1/tokens",
            t,
            Some(&grant("badscope-0123456789", r#"{"kind":"files"}"#)),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
    }
}
