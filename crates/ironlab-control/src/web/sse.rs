//! `GET /api/v1/runs/{id}/events`: a run's state as Server-Sent Events.
//!
//! The first event is the current [`RunView`] (`event: run`); then one `run` event per change
//! (state, reason, title), woken by the reconciler's [`crate::runs::Signals`], with keep-alive
//! comments every 15 s. The stream ends after the run is `destroyed`, when the run stops being
//! visible, or when the server shuts down. Authenticated like the rest of `/api/v1` (bearer
//! token or the browser session).
//!
//! Runs with tasks also get `event: task` (a [`TaskView`]): one per task right after the first
//! `run` event (the checklist as recorded), then one per recorded change (from
//! [`crate::runs::Signals::task_changed`]). A stream that falls more than 1024 task changes
//! behind gets the whole checklist again.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use ironlab_api::v1::{RunState, RunView, TaskView};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};

use crate::Ctx;
use crate::auth::User;
use crate::error::ApiResult;
use crate::http::{ApiPath, Auth};
use crate::runs;

/// Interval of the keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct Watch {
    ctx: Ctx,
    user: User,
    id: String,
    first: Option<RunView>,
    last: RunView,
    changed: watch::Receiver<u64>,
    closing: watch::Receiver<bool>,
    done: bool,
    /// Task events waiting to be sent.
    queue: VecDeque<Event>,
    tasks: broadcast::Receiver<(String, TaskView)>,
}

fn task_event(t: &TaskView) -> Event {
    Event::default()
        .event("task")
        .json_data(t)
        .unwrap_or_else(|_| Event::default().event("task").data("{}"))
}

/// The whole recorded checklist of the run (none when it has no tasks).
async fn checklist(w: &Watch) -> Vec<Event> {
    let Ok(run) = runs::get_for(&w.ctx.db, &w.user, &w.id).await else {
        return Vec::new();
    };
    match crate::tasks::view(&w.ctx.db, &run).await {
        Ok(v) => v.tasks.iter().map(task_event).collect(),
        Err(e) => {
            tracing::warn!(run = %w.id, error = %e, "cannot read the checklist");
            Vec::new()
        }
    }
}

fn event(view: &RunView) -> Event {
    Event::default()
        .event("run")
        .json_data(view)
        .unwrap_or_else(|_| Event::default().event("run").data("{}"))
}

fn differs(a: &RunView, b: &RunView) -> bool {
    a.state != b.state || a.reason != b.reason || a.title != b.title || a.updated_at != b.updated_at
}

async fn next(mut w: Watch) -> Option<(Result<Event, Infallible>, Watch)> {
    if let Some(first) = w.first.take() {
        w.done = first.state == RunState::Destroyed;
        let list = checklist(&w).await;
        w.queue.extend(list);
        return Some((Ok(event(&first)), w));
    }
    loop {
        if let Some(e) = w.queue.pop_front() {
            return Some((Ok(e), w));
        }
        if w.done {
            return None;
        }
        let task = tokio::select! {
            r = w.changed.changed() => {
                if r.is_err() {
                    return None;
                }
                None
            }
            r = w.tasks.recv() => Some(r),
            _ = w.closing.wait_for(|c| *c) => return None,
        };
        if let Some(r) = task {
            match r {
                Ok((run, t)) if run == w.id => w.queue.push_back(task_event(&t)),
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    let list = checklist(&w).await;
                    w.queue.extend(list);
                }
                Err(RecvError::Closed) => return None,
            }
            continue;
        }
        if *w.closing.borrow() {
            return None;
        }
        let view = match runs::get_for(&w.ctx.db, &w.user, &w.id).await {
            Ok(run) => run.view(),
            Err(_) => return None,
        };
        if differs(&view, &w.last) {
            w.done = view.state == RunState::Destroyed;
            w.last = view.clone();
            return Some((Ok(event(&view)), w));
        }
    }
}

/// A run's state as Server-Sent Events: the current run first (`event: run`), then one event per
/// change (state, reason, title), keep-alive comments every 15 s; ends once the run is destroyed.
/// Runs with tasks also get `event: task` (a TaskView): the checklist after the first `run`
/// event, then one per task change.
#[utoipa::path(get, path = "/api/v1/runs/{id}/events",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "`text/event-stream` of `run` events (each a RunView) and `task` events (each a TaskView)", content_type = "text/event-stream", body = RunView),
        (status = 401, body = ironlab_api::ErrorBody), (status = 404, body = ironlab_api::ErrorBody)))]
pub async fn events(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    // Subscribe before reading, so a change between the two is not missed.
    let mut changed = ctx.signals.subscribe();
    changed.borrow_and_update();
    let tasks = ctx.signals.subscribe_tasks();
    let closing = ctx.web.closing();
    let view = runs::get_for(&ctx.db, &user, &id).await?.view();
    let w = Watch {
        ctx,
        user,
        id,
        first: Some(view.clone()),
        last: view,
        changed,
        closing,
        done: false,
        queue: VecDeque::new(),
        tasks,
    };
    Ok(
        Sse::new(futures::stream::unfold(w, next))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
}
