//! Tasks of runs: recording every transition, the followers that bring them from the worker,
//! and the operations the REST handlers ([`api`]) call.
//!
//! Who talks to whom: [`spawn_followers`] (started with the reconcile loop) keeps one follower
//! per `running` run whose plan has tasks. A follower reads the worker's NDJSON task stream
//! (`GET /v1/runs/{run}/tasks/watch`: the latest state of every task first, then changes) and
//! passes each line to [`ingest`], which writes a `task_events` row and announces the change on
//! [`crate::runs::Signals::task_changed`] (the SSE streams listen there). A follower that loses
//! the worker (restart, network) reconnects with a backoff; the snapshot the worker sends first
//! fills in anything that changed meanwhile, and rows are keyed by `(run, machine, seq)`, so a
//! re-sent change is never stored twice and a completed task is never lost or undone.

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use ironlab_api::v1::{RunState, RunTasksView, TaskState, TaskView};
use ironlab_api::worker::{RunPlan, TaskInputResult, TaskPlan, TaskStatus};
use tokio::task::{AbortHandle, JoinSet};

use crate::Ctx;
use crate::auth::User;
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};
use crate::runs::{self, Run, Signals};
use crate::worker_client::WorkerError;

/// Longest answer accepted for an input task, in bytes.
pub const MAX_INPUT_BYTES: usize = 4096;
/// A task stream silent for this long (the worker sends a blank line every 15 s) is reopened.
const SILENCE: Duration = Duration::from_secs(45);
/// Longest pause before a follower retries the worker.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The non-helper tasks of a plan with their machine, in checklist order.
pub fn shown_tasks(plan: &RunPlan) -> Vec<(&str, &TaskPlan)> {
    plan.machines
        .iter()
        .flat_map(|m| m.tasks.iter().map(move |t| (m.name.as_str(), t)))
        .filter(|(_, t)| !t.helper)
        .collect()
}

/// Whether a plan has any task to follow (helpers count: they are relayed, not shown).
pub fn has_tasks(plan: &RunPlan) -> bool {
    plan.machines.iter().any(|m| !m.tasks.is_empty())
}

type EventRow = (String, String, String, String, i64, i64, i64);

/// The checklist of a run: every shown task with its latest recorded state (`blocked` before
/// the first report). Tasks come in checklist order: plan order is checklist order per
/// machine, and the machines' lists are merged by the manifest-wide order.
pub async fn view(db: &Db, run: &Run) -> ApiResult<RunTasksView> {
    let rows: Vec<EventRow> = sqlx::query_as(
        "SELECT machine, task, state, hint, attempt, at, seq FROM task_events \
         WHERE run_id = $1 ORDER BY seq",
    )
    .bind(&run.id)
    .fetch_all(db)
    .await?;
    // Latest row per task (seq grows per machine, and a task lives on one machine).
    let mut latest: HashMap<(String, String), EventRow> = HashMap::new();
    for r in rows {
        latest.insert((r.0.clone(), r.1.clone()), r);
    }
    let tasks: Vec<TaskView> = ordered(&run.plan)
        .into_iter()
        .map(|(machine, t)| {
            let mut v = TaskView {
                name: t.name.clone(),
                machine: machine.to_string(),
                state: TaskState::Blocked,
                hint: String::new(),
                init: t.init,
                input: t.input,
                attempt: 0,
                at: None,
            };
            if let Some((_, _, state, hint, attempt, at, _)) =
                latest.get(&(machine.to_string(), t.name.clone()))
            {
                v.state = TaskState::parse(state).unwrap_or(TaskState::Blocked);
                v.hint = hint.clone();
                v.attempt = u32::try_from(*attempt).unwrap_or(0);
                v.at = Some(db::from_ms(*at));
            }
            v
        })
        .collect();
    Ok(RunTasksView {
        run: run.id.clone(),
        ready: tasks
            .iter()
            .filter(|t| t.init)
            .all(|t| t.state == TaskState::Completed),
        tasks,
    })
}

/// Shown tasks in the order of the whole manifest's checklist: each machine's list is in that
/// order already; interleave them by the position the name has in the manifest-wide order
/// (init first, then dependencies, then name), which the plan does not keep across machines,
/// so recompute it from the names and needs.
fn ordered(plan: &RunPlan) -> Vec<(&str, &TaskPlan)> {
    let shown = shown_tasks(plan);
    let all: BTreeMap<String, ironlab_spec::Task> = plan
        .machines
        .iter()
        .flat_map(|m| m.tasks.iter())
        .map(|t| {
            (
                t.name.clone(),
                ironlab_spec::Task {
                    init: t.init,
                    run: t.run.clone(),
                    needs: t.needs.clone(),
                    ..Default::default()
                },
            )
        })
        .collect();
    let order = crate::runs::plan::checklist_order(&all);
    let pos = |n: &str| order.iter().position(|o| o == n).unwrap_or(usize::MAX);
    let mut shown = shown;
    shown.sort_by_key(|(_, t)| pos(&t.name));
    shown
}

/// Records one task report of run `run` (from the worker's stream). Returns the task's new view
/// when it changed; `None` for a helper, an unknown task, a re-sent change, a report older than
/// what is recorded, or one that would move a completed or failed task back.
pub async fn ingest(
    db: &Db,
    signals: &Signals,
    run: &Run,
    s: &TaskStatus,
) -> ApiResult<Option<TaskView>> {
    let Some((_, plan)) = shown_tasks(&run.plan)
        .into_iter()
        .find(|(m, t)| *m == s.machine && t.name == s.name)
    else {
        return Ok(None);
    };
    let current: Option<(String, String, i64)> = sqlx::query_as(
        "SELECT state, hint, seq FROM task_events WHERE run_id = $1 AND machine = $2 AND task = $3 \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(&run.id)
    .bind(&s.machine)
    .bind(&s.name)
    .fetch_optional(db)
    .await?;
    let seq = i64::try_from(s.seq).unwrap_or(i64::MAX);
    if let Some((state, hint, last_seq)) = &current {
        let state = TaskState::parse(state).unwrap_or(TaskState::Blocked);
        if *last_seq >= seq
            || (state.is_final() && s.state != state)
            || (state == s.state && *hint == s.hint)
        {
            return Ok(None);
        }
    }
    let at = i64::try_from(s.at_unix_ms).unwrap_or(0);
    let done = sqlx::query(
        "INSERT INTO task_events (run_id, machine, task, seq, state, hint, attempt, at, recorded_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (run_id, machine, seq) DO NOTHING",
    )
    .bind(&run.id)
    .bind(&s.machine)
    .bind(&s.name)
    .bind(seq)
    .bind(s.state.as_str())
    .bind(&s.hint)
    .bind(i64::from(s.attempt))
    .bind(at)
    .bind(db::now_ms())
    .execute(db)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    tracing::info!(run = %run.id, machine = %s.machine, task = %s.name, state = s.state.as_str(), "task changed");
    let view = TaskView {
        name: s.name.clone(),
        machine: s.machine.clone(),
        state: s.state,
        hint: s.hint.clone(),
        init: plan.init,
        input: plan.input,
        attempt: s.attempt,
        at: Some(db::from_ms(at)),
    };
    signals.task_changed(&run.id, view.clone());
    if s.state == TaskState::Completed
        && let Err(e) = crate::content::task_completed(db, run).await
    {
        tracing::warn!(run = %run.id, error = %e, "cannot record content progress");
    }
    Ok(Some(view))
}

/// The checklist of a run the user may see.
pub async fn list(ctx: &Ctx, user: &User, id: &str) -> ApiResult<RunTasksView> {
    let run = runs::get_for(&ctx.db, user, id).await?;
    view(&ctx.db, &run).await
}

/// Sends an answer for input task `name` of a running run to its machine.
pub async fn input(
    ctx: &Ctx,
    user: &User,
    id: &str,
    name: &str,
    value: &str,
) -> ApiResult<TaskInputResult> {
    let run = runs::get_for(&ctx.db, user, id).await?;
    let shown = shown_tasks(&run.plan);
    let Some((_, task)) = shown.iter().find(|(_, t)| t.name == name) else {
        let names: Vec<&str> = shown.iter().map(|(_, t)| t.name.as_str()).collect();
        return Err(ApiError::NotFound(if names.is_empty() {
            format!("run {id} has no tasks")
        } else {
            format!(
                "run {id} has no task {name:?} (tasks: {})",
                names.join(", ")
            )
        }));
    };
    if !task.input {
        return Err(ApiError::BadRequest(format!(
            "task {name} is not an input task: it checks the machine by itself"
        )));
    }
    if value.len() > MAX_INPUT_BYTES {
        return Err(ApiError::BadRequest(format!(
            "value: longer than {MAX_INPUT_BYTES} bytes"
        )));
    }
    if run.state != RunState::Running {
        return Err(ApiError::Conflict(format!(
            "run {id} is {}, not running",
            run.state.as_str()
        )));
    }
    ctx.worker_of(&run)?
        .task_input(id, name, value)
        .await
        .map_err(|e| match e {
            WorkerError::Status { status, detail } => match status.as_u16() {
                400 => ApiError::BadRequest(detail),
                404 => ApiError::NotFound(detail),
                409 => ApiError::Conflict(detail),
                _ => ApiError::Unavailable(format!("the worker failed: {detail}")),
            },
            other => ApiError::Unavailable(format!("{other}; try again in a moment")),
        })
}

/// Aborts the followers when dropped (the reconcile loop holds it).
pub struct Followers(AbortHandle);

impl Drop for Followers {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the follower manager; it stops when the returned guard is dropped.
pub fn spawn_followers(ctx: Ctx) -> Followers {
    Followers(tokio::spawn(follow_all(ctx)).abort_handle())
}

/// Keeps one follower per running run with tasks, until aborted.
async fn follow_all(ctx: Ctx) {
    let mut set: JoinSet<()> = JoinSet::new();
    let mut followers: HashMap<String, AbortHandle> = HashMap::new();
    let mut changed = ctx.signals.subscribe();
    loop {
        while set.try_join_next().is_some() {}
        match runs::load_in_states(&ctx.db, &[RunState::Running]).await {
            Ok(list) => {
                let live: HashMap<String, Run> = list
                    .into_iter()
                    .filter(|r| has_tasks(&r.plan))
                    .map(|r| (r.id.clone(), r))
                    .collect();
                followers.retain(|id, h| {
                    let keep = live.contains_key(id) && !h.is_finished();
                    if !keep {
                        h.abort();
                    }
                    keep
                });
                for (id, run) in live {
                    if let std::collections::hash_map::Entry::Vacant(e) = followers.entry(id) {
                        e.insert(set.spawn(follow(ctx.clone(), run)));
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "tasks: failed to read running runs"),
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Follows one run's task stream on the worker, reconnecting, until aborted.
async fn follow(ctx: Ctx, run: Run) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match follow_once(&ctx, &run).await {
            Ok(()) => backoff = Duration::from_millis(250),
            Err(e) => tracing::debug!(run = %run.id, "task stream: {e:#}"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn follow_once(ctx: &Ctx, run: &Run) -> anyhow::Result<()> {
    let mut resp = ctx.worker_of(run)?.watch_tasks(&run.id).await?;
    tracing::debug!(run = %run.id, "following tasks");
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::time::timeout(SILENCE, resp.chunk())
            .await
            .map_err(|_| anyhow::anyhow!("the task stream was silent for {SILENCE:?}"))??;
        let Some(chunk) = chunk else {
            return Ok(());
        };
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<TaskStatus>(line) {
                Ok(s) => {
                    ingest(&ctx.db, &ctx.signals, run, &s).await?;
                }
                Err(e) => {
                    tracing::warn!(run = %run.id, "unreadable task line from the worker: {e}")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
