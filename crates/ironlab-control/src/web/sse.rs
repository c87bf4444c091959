//! `GET /api/v1/runs/{id}/events`: a run's state as Server-Sent Events.
//!
//! The first event is the current [`RunView`] (`event: run`); then one `run` event per change
//! (state, reason, title), woken by the reconciler's [`crate::runs::Signals`], with keep-alive
//! comments every 15 s. The stream ends after the run is `destroyed`, when the run stops being
//! visible, or when the server shuts down. Authenticated like the rest of `/api/v1` (bearer
//! token or the browser session).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use ironlab_api::v1::{RunState, RunView};
use tokio::sync::watch;

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
        return Some((Ok(event(&first)), w));
    }
    if w.done {
        return None;
    }
    loop {
        tokio::select! {
            r = w.changed.changed() => {
                if r.is_err() {
                    return None;
                }
            }
            _ = w.closing.wait_for(|c| *c) => return None,
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
#[utoipa::path(get, path = "/api/v1/runs/{id}/events",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, description = "`text/event-stream` of `run` events, each a RunView", content_type = "text/event-stream", body = RunView),
        (status = 401, body = ironlab_api::ErrorBody), (status = 404, body = ironlab_api::ErrorBody)))]
pub async fn events(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    // Subscribe before reading, so a change between the two is not missed.
    let mut changed = ctx.signals.subscribe();
    changed.borrow_and_update();
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
    };
    Ok(
        Sse::new(futures::stream::unfold(w, next))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE)),
    )
}
