//! Worker REST routes of the task relay ([`crate::tasks`]); bearer-protected like the rest of
//! `/v1` (merged into [`crate::api::router`] before its auth layer).
//!
//! ```text
//! GET  /v1/runs/{run}/tasks                  RunTasks
//! GET  /v1/runs/{run}/tasks/watch            application/x-ndjson: one TaskStatus per line
//! POST /v1/runs/{run}/tasks/{name}/input     TaskInput → TaskInputResult
//! ```
//!
//! The watch stream starts with the latest state of every task reported so far, then one line
//! per change, and an empty line every 15 s as keep-alive (readers skip empty lines). After a
//! lag (a reader more than 1024 changes behind) the snapshot is sent again; readers deduplicate
//! by `(machine, seq)`. The stream ends when the run is destroyed or the worker shuts down.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use ironlab_api::worker::{RunTasks, TaskInput, TaskInputResult, TaskStatus};
use tokio::sync::broadcast::error::RecvError;

use crate::api::{ApiError, ApiState};
use crate::tasks::RunTasks as Relay;

/// Interval of the keep-alive empty lines.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Longest answer accepted for an input task, in bytes.
pub const MAX_INPUT_BYTES: usize = 4096;

/// The task routes (state: the API state).
pub fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/v1/runs/{run}/tasks", get(list))
        .route("/v1/runs/{run}/tasks/watch", get(watch))
        .route("/v1/runs/{run}/tasks/{name}/input", post(input))
}

async fn relay(state: &ApiState, run: &str) -> Result<Arc<Relay>, ApiError> {
    if let Some(rt) = state.runs.tasks().get(run) {
        return Ok(rt);
    }
    // 404 for an unknown run; a known one is still starting.
    let st = state.runs.status(run).await?;
    Err(ApiError::Conflict(format!(
        "run {run} is {:?}; its tasks are relayed once it runs",
        st.state
    )))
}

async fn list(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<Json<RunTasks>, ApiError> {
    let rt = relay(&state, &run).await?;
    Ok(Json(RunTasks {
        run_id: run,
        tasks: rt.snapshot(),
    }))
}

fn line(s: &TaskStatus) -> Bytes {
    let mut v = serde_json::to_vec(s).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

async fn watch(
    State(state): State<Arc<ApiState>>,
    Path(run): Path<String>,
) -> Result<Response, ApiError> {
    let rt = relay(&state, &run).await?;
    let (snapshot, rx) = rt.subscribe();
    let first: Vec<Bytes> = snapshot.iter().map(line).collect();
    let stream = futures::stream::unfold(
        (std::collections::VecDeque::from(first), rx, rt),
        |(mut queue, mut rx, rt)| async move {
            loop {
                if let Some(b) = queue.pop_front() {
                    return Some((Ok::<_, std::io::Error>(b), (queue, rx, rt)));
                }
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(s) => queue.push_back(line(&s)),
                        Err(RecvError::Lagged(_)) => {
                            let (snap, fresh) = rt.subscribe();
                            rx = fresh;
                            queue.extend(snap.iter().map(line));
                        }
                        Err(RecvError::Closed) => return None,
                    },
                    () = rt.stopped() => return None,
                    () = tokio::time::sleep(KEEP_ALIVE) => queue.push_back(Bytes::from_static(b"\n")),
                }
            }
        },
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn input(
    State(state): State<Arc<ApiState>>,
    Path((run, name)): Path<(String, String)>,
    body: Result<Json<TaskInput>, JsonRejection>,
) -> Result<Json<TaskInputResult>, ApiError> {
    let Json(req) = body?;
    if req.value.len() > MAX_INPUT_BYTES {
        return Err(ApiError::BadRequest(format!(
            "value: longer than {MAX_INPUT_BYTES} bytes"
        )));
    }
    let rt = relay(&state, &run).await?;
    Ok(Json(rt.input(&name, &req.value).await?))
}
