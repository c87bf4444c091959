//! The reconcile loop: drives the worker towards each run's desired state.
//!
//! One task owns the loop. It wakes on [`crate::runs::Signals::wake`] (a run was created or
//! changed) and every second, reads the runs that still need work from SQL, and starts one
//! step per run in a `JoinSet` (never two at once for the same run, so a long-poll on one run
//! never delays another). Every worker call is idempotent and keyed by the run id, so restarts
//! of the control plane or the worker converge:
//!
//! - `pending`: `PUT /v1/runs/{id}` → `starting` (a 4xx from the worker → `failed`).
//! - `starting`: `GET /v1/runs/{id}?wait=5` → `running` | `failed`; 404 → re-PUT, at most
//!   [`MAX_WORKER_ATTEMPTS`] times; older than [`START_TIMEOUT`] → `failed` + `DELETE`.
//! - `running`: every [`RUNNING_CHECK_INTERVAL`], `GET`: 404 → `failed` ("the worker lost this run").
//! - `destroying`: `DELETE` (204 or 404) → `destroyed`.
//! - `stopping`: `POST …/stop` (returns once the machines are down) → `stopped` with its storage
//!   use; 404 → `failed`.
//! - `restarting`: `POST …/restart` once, then `GET ?wait=5` → `running`, or `stopped` with the
//!   reason when the restart failed (the drives are kept).
//! - `stopped`: every [`STOPPED_CHECK_INTERVAL`], `GET` refreshes its storage use; a clone the
//!   worker never made (the control plane died before asking) is asked for again; otherwise 404
//!   → `failed` (this is where restoring from the off-host store will go).
//! - `running` whose worker reports it `stopped` (its machines died while the worker was away)
//!   → `stopped`, keeping the drives.
//!
//! An unreachable worker leaves the run as it is; the step is retried with exponential backoff.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use ironlab_api::v1::RunState;
use ironlab_api::worker::{ObservedState, RunStatus};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::Ctx;
use crate::error::ApiError;
use crate::runs::{self, Run, RunEvent};
use crate::worker_client::WorkerError;

/// Times the plan is handed to a worker that keeps losing the run.
pub const MAX_WORKER_ATTEMPTS: i64 = 3;
/// A run that is still starting after this fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a running run is checked on its worker.
pub const RUNNING_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How often a stopped run is checked on its worker.
pub const STOPPED_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// How often a stopped run whose off-host snapshot is not uploaded yet is looked at.
pub const UPLOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Long-poll of a starting run on the worker, seconds.
const START_POLL_SECS: u64 = 5;
/// Longest retry delay when the worker is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why a step must be retried later.
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("the step panicked")]
    Panicked,
}

#[derive(Default)]
struct Backoff {
    failures: u32,
    next: Option<Instant>,
}

/// Runs the loop until the task is dropped or aborted.
pub async fn run(ctx: Ctx) {
    // Task followers live as long as the loop (aborted with it).
    let _followers = crate::tasks::spawn_followers(ctx.clone());
    let mut in_flight: JoinSet<(String, Result<(), StepError>)> = JoinSet::new();
    let mut busy: HashMap<String, ()> = HashMap::new();
    let mut backoff: HashMap<String, Backoff> = HashMap::new();
    let mut last_check: HashMap<String, Instant> = HashMap::new();
    loop {
        match runs::load_in_states(
            &ctx.db,
            &[
                RunState::Pending,
                RunState::Starting,
                RunState::Running,
                RunState::Destroying,
                RunState::Stopping,
                RunState::Stopped,
                RunState::Restarting,
            ],
        )
        .await
        {
            Ok(list) => {
                let now = Instant::now();
                let live: std::collections::HashSet<&str> =
                    list.iter().map(|r| r.id.as_str()).collect();
                backoff.retain(|id, _| live.contains(id.as_str()));
                last_check.retain(|id, _| live.contains(id.as_str()));
                for run in list {
                    if busy.contains_key(&run.id) {
                        continue;
                    }
                    if backoff
                        .get(&run.id)
                        .and_then(|b| b.next)
                        .is_some_and(|t| t > now)
                    {
                        continue;
                    }
                    let interval = match run.state {
                        RunState::Running => Some(RUNNING_CHECK_INTERVAL),
                        RunState::Stopped if run.snapshot.as_deref() == Some("uploading") => {
                            Some(UPLOAD_CHECK_INTERVAL)
                        }
                        RunState::Stopped => Some(STOPPED_CHECK_INTERVAL),
                        _ => None,
                    };
                    if let Some(interval) = interval {
                        if last_check
                            .get(&run.id)
                            .is_some_and(|t| now.duration_since(*t) < interval)
                        {
                            continue;
                        }
                        last_check.insert(run.id.clone(), now);
                    }
                    busy.insert(run.id.clone(), ());
                    let ctx = ctx.clone();
                    in_flight.spawn(async move {
                        let id = run.id.clone();
                        let result = AssertUnwindSafe(step(&ctx, run))
                            .catch_unwind()
                            .await
                            .unwrap_or(Err(StepError::Panicked));
                        (id, result)
                    });
                }
            }
            Err(e) => tracing::error!(error = %e, "reconcile: failed to read runs"),
        }
        tokio::select! {
            _ = ctx.signals.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                match done {
                    Ok((id, result)) => {
                        busy.remove(&id);
                        match result {
                            Ok(()) => { backoff.remove(&id); }
                            Err(e) => {
                                let b = backoff.entry(id.clone()).or_default();
                                b.failures = b.failures.saturating_add(1);
                                let delay = Duration::from_millis(500)
                                    .saturating_mul(1 << b.failures.min(6))
                                    .min(MAX_BACKOFF);
                                b.next = Some(Instant::now() + delay);
                                tracing::warn!(run = %id, error = %e, source = ?std::error::Error::source(&e),
                                    retry_in_ms = delay.as_millis() as u64, "reconcile step failed");
                            }
                        }
                    }
                    Err(e) => {
                        // Only cancellation gets here (panics are caught in the task).
                        tracing::error!(error = %e, "reconcile step was cancelled");
                        if in_flight.is_empty() {
                            busy.clear();
                        }
                    }
                }
            }
        }
    }
}

/// One step of one run, from the state it was read in.
async fn step(ctx: &Ctx, run: Run) -> Result<(), StepError> {
    match run.state {
        RunState::Pending => dispatch(ctx, &run).await,
        RunState::Starting => watch_start(ctx, &run).await,
        RunState::Running => check_running(ctx, &run).await,
        RunState::Destroying => {
            ctx.worker_of(&run)?.delete_run(&run.id).await?;
            runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Gone, None)
                .await?
                .ok();
            Ok(())
        }
        RunState::Stopping => stop_on_worker(ctx, &run).await,
        RunState::Restarting => watch_restart(ctx, &run).await,
        RunState::Stopped => check_stopped(ctx, &run).await,
        RunState::Destroyed | RunState::Failed => Ok(()),
    }
}

async fn fail(ctx: &Ctx, run: &Run, reason: &str) -> Result<(), StepError> {
    // Leave nothing behind on the worker before the run reads `failed`; a later destroy
    // repeats this idempotently if the worker cannot be reached now.
    if let Err(e) = ctx.worker_of(run)?.delete_run(&run.id).await {
        tracing::warn!(run = %run.id, error = %e, "could not remove a failed run from the worker");
    }
    runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Fail, Some(reason))
        .await?
        .ok();
    Ok(())
}

async fn dispatch(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    match ctx.worker_of(run)?.put_run(&run.plan).await {
        Ok(_) => {
            runs::count_attempt(&ctx.db, &run.id).await?;
        }
        Err(e) if e.is_client_error() => {
            return fail(
                ctx,
                run,
                &format!("the worker refused the run: {}", detail_of(&e)),
            )
            .await;
        }
        Err(e) => return Err(e.into()),
    }
    if runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Dispatch, None)
        .await?
        .is_err()
    {
        // The run changed while the plan was in flight (destroyed before it reached the
        // worker): take it back off the worker.
        if let Some(now) = runs::load(&ctx.db, &run.id).await?
            && matches!(now.state, RunState::Destroyed | RunState::Failed)
        {
            ctx.worker_of(run)?.delete_run(&run.id).await?;
        }
    }
    Ok(())
}

fn detail_of(e: &WorkerError) -> String {
    match e {
        WorkerError::Status { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

fn failure_reason(s: &RunStatus) -> String {
    if let Some(e) = &s.error {
        return e.clone();
    }
    let machines: Vec<String> = s
        .machines
        .iter()
        .filter_map(|m| m.error.as_ref().map(|e| format!("{}: {e}", m.name)))
        .collect();
    if machines.is_empty() {
        "the worker reported a failure without a reason".to_string()
    } else {
        machines.join("; ")
    }
}

async fn watch_start(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    let age = crate::db::now_ms().saturating_sub(run.updated_at);
    if age > START_TIMEOUT.as_millis() as i64 {
        return fail(ctx, run, "timed out").await;
    }
    match ctx
        .worker_of(run)?
        .get_run(&run.id, Some(START_POLL_SECS))
        .await?
    {
        Some(s) => match s.state {
            ObservedState::Running => {
                runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Ready, None)
                    .await?
                    .ok();
            }
            ObservedState::Failed => fail(ctx, run, &failure_reason(&s)).await?,
            ObservedState::Stopped => {
                // Ready on the worker, then its machines died before this loop saw it running.
                fail(ctx, run, &failure_reason(&s)).await?
            }
            ObservedState::Starting | ObservedState::Stopping => {}
        },
        None => {
            if run.worker_attempts >= MAX_WORKER_ATTEMPTS {
                return fail(ctx, run, "worker lost the run 3 times").await;
            }
            tracing::warn!(run = %run.id, attempt = run.worker_attempts + 1, "the worker does not know a starting run; sending the plan again");
            match ctx.worker_of(run)?.put_run(&run.plan).await {
                Ok(_) => {
                    runs::count_attempt(&ctx.db, &run.id).await?;
                }
                Err(e) if e.is_client_error() => {
                    return fail(
                        ctx,
                        run,
                        &format!("the worker refused the run: {}", detail_of(&e)),
                    )
                    .await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

async fn check_running(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    match ctx.worker_of(run)?.get_run(&run.id, None).await? {
        None => fail(ctx, run, "the worker lost this run").await,
        Some(s) if s.state == ObservedState::Failed => fail(ctx, run, &failure_reason(&s)).await,
        Some(s) if s.state == ObservedState::Stopped => {
            let reason = s
                .error
                .clone()
                .unwrap_or_else(|| "its machines stopped".to_string());
            mark_stopped(ctx, run, &s, Some(&reason)).await
        }
        Some(_) => Ok(()),
    }
}

async fn mark_stopped(
    ctx: &Ctx,
    run: &Run,
    s: &RunStatus,
    reason: Option<&str>,
) -> Result<(), StepError> {
    if let Some(b) = s.storage_bytes {
        runs::persist::record_storage(&ctx.db, &run.id, b).await?;
    }
    runs::persist::record_snapshot(&ctx.db, &run.id, runs::persist::snapshot_word(s)).await?;
    runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Stopped, reason)
        .await?
        .ok();
    Ok(())
}

async fn stop_on_worker(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    match ctx.worker_of(run)?.stop_run(&run.id).await {
        Ok(s) if s.state == ObservedState::Stopped => mark_stopped(ctx, run, &s, None).await,
        Ok(_) => Ok(()),
        Err(WorkerError::Status { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
            fail(ctx, run, "the worker lost this run").await
        }
        Err(e) if e.is_client_error() => {
            fail(
                ctx,
                run,
                &format!("the worker could not stop the run: {}", detail_of(&e)),
            )
            .await
        }
        Err(e) => Err(e.into()),
    }
}

async fn watch_restart(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    if run.worker_attempts == 0 {
        match ctx.worker_of(run)?.restart_run(&run.id).await {
            Ok(_) => {
                runs::count_attempt(&ctx.db, &run.id).await?;
                return Ok(());
            }
            Err(WorkerError::Status { status, .. }) if status == reqwest::StatusCode::NOT_FOUND => {
                return fail(ctx, run, "the worker lost this run").await;
            }
            Err(e) if e.is_client_error() => {
                let reason = format!("restart refused: {}", detail_of(&e));
                runs::apply(
                    &ctx.db,
                    &ctx.signals,
                    &run.id,
                    RunEvent::Stopped,
                    Some(&reason),
                )
                .await?
                .ok();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
    }
    match ctx
        .worker_of(run)?
        .get_run(&run.id, Some(START_POLL_SECS))
        .await?
    {
        None => fail(ctx, run, "the worker lost this run").await,
        Some(s) => match s.state {
            ObservedState::Running => {
                runs::apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Ready, None)
                    .await?
                    .ok();
                Ok(())
            }
            ObservedState::Stopped => {
                let reason = s
                    .error
                    .clone()
                    .unwrap_or_else(|| "the restart did not finish".to_string());
                mark_stopped(ctx, run, &s, Some(&reason)).await
            }
            ObservedState::Failed => fail(ctx, run, &failure_reason(&s)).await,
            ObservedState::Starting | ObservedState::Stopping => Ok(()),
        },
    }
}

async fn check_stopped(ctx: &Ctx, run: &Run) -> Result<(), StepError> {
    match ctx.worker_of(run)?.get_run(&run.id, None).await? {
        Some(s) => {
            if let Some(b) = s.storage_bytes
                && run.storage_bytes != i64::try_from(b).ok()
            {
                runs::persist::record_storage(&ctx.db, &run.id, b).await?;
                ctx.signals.notify_changed();
            }
            let snapshot = runs::persist::snapshot_word(&s);
            if run.snapshot.as_deref() != snapshot {
                runs::persist::record_snapshot(&ctx.db, &run.id, snapshot).await?;
                ctx.signals.notify_changed();
            }
            Ok(())
        }
        None => {
            // A clone recorded here but never made on the worker: ask again (idempotent).
            if let Some(src) = &run.cloned_from {
                match ctx.worker_of(run)?.clone_run(src, &run.id).await {
                    Ok(s) => {
                        if let Some(b) = s.storage_bytes {
                            runs::persist::record_storage(&ctx.db, &run.id, b).await?;
                        }
                        return Ok(());
                    }
                    Err(e) if e.is_client_error() => {
                        tracing::warn!(run = %run.id, source = %src, error = %e, "cannot redo a lost clone");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            // A worker that lost the run but kept its snapshot index brings it back by itself
            // (see the worker's `runs::snapshots`); recreating it from SQL is not built.
            fail(ctx, run, "the worker lost this stopped run and its drives").await
        }
    }
}
