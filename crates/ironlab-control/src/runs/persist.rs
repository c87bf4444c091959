//! Persistent runs, the control plane's half: stop, restart, clone, save as playground, and the
//! per-user storage quota.
//!
//! Stop and restart only record the user's wish (`stopping`, `restarting`); the reconcile loop
//! carries it out on the worker. Clone and save are quick on the worker (reflinks), so the
//! handler calls it directly, after recording the new object first: a clone is a `stopped` run
//! row with `cloned_from` (the reconciler re-issues the clone if the worker never got it), a
//! save is a playground row with `saved_id` (removed again if the worker refuses).
//!
//! Storage: a stopped run holds the bytes its worker measured (extents it shares with its
//! image, clones or saves are not counted); a saved playground holds the bytes its drives held
//! when saved. The sum is checked against the user's quota (`users.storage_quota_bytes`, or
//! [`DEFAULT_STORAGE_QUOTA`]) before anything that keeps more (stop, clone, save); running runs
//! are bounded by their drive sizes and the active-run limit instead.

use ironlab_api::v1::{
    CloneRequest, PlaygroundView, RunState, RunView, SaveRequest, StorageItem, StorageView,
};
use serde_json::Value;

use super::{Run, RunEvent, apply, check_active_limit, check_title, get_for, worker_unavailable};
use crate::Ctx;
use crate::auth::User;
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};
use crate::playgrounds;
use crate::worker_client::WorkerError;

/// Storage a user may hold in stopped runs and saved playgrounds unless set per user.
pub const DEFAULT_STORAGE_QUOTA: u64 = 10 << 30;

/// The user's storage: stopped runs and saved playgrounds against the quota.
pub async fn storage(db: &Db, user: &User) -> ApiResult<StorageView> {
    let quota: Option<Option<i64>> =
        sqlx::query_scalar("SELECT storage_quota_bytes FROM users WHERE id = $1")
            .bind(&user.id)
            .fetch_optional(db)
            .await?;
    let quota_bytes = quota
        .flatten()
        .map(|q| q.max(0) as u64)
        .unwrap_or(DEFAULT_STORAGE_QUOTA);
    let runs: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT id, title, storage_bytes FROM runs WHERE owner = $1 \
         AND state IN ('stopping', 'stopped', 'restarting') ORDER BY created_at",
    )
    .bind(&user.id)
    .fetch_all(db)
    .await?;
    let saves: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT name, title, storage_bytes FROM playgrounds WHERE owner = $1 \
         AND saved_id IS NOT NULL ORDER BY created_at",
    )
    .bind(&user.id)
    .fetch_all(db)
    .await?;
    let mut items = Vec::new();
    for (kind, rows) in [("run", runs), ("playground", saves)] {
        for (id, title, bytes) in rows {
            items.push(StorageItem {
                kind: kind.to_string(),
                id,
                title,
                bytes: bytes.unwrap_or(0).max(0) as u64,
            });
        }
    }
    Ok(StorageView {
        used_bytes: items.iter().map(|i| i.bytes).sum(),
        quota_bytes,
        items,
    })
}

/// Sets a user's storage quota (admins only; `None` = the default); returns their storage.
pub async fn set_quota(
    db: &Db,
    admin: &User,
    name: &str,
    bytes: Option<u64>,
) -> ApiResult<StorageView> {
    if !admin.is_admin() {
        return Err(ApiError::Forbidden(
            "only admins may set storage quotas".into(),
        ));
    }
    let user = crate::auth::find_user(db, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {name} not found")))?;
    let bytes = bytes
        .map(|b| {
            i64::try_from(b)
                .map_err(|_| ApiError::BadRequest("bytes: larger than 2^63-1".to_string()))
        })
        .transpose()?;
    sqlx::query("UPDATE users SET storage_quota_bytes = $1 WHERE id = $2")
        .bind(bytes)
        .bind(&user.id)
        .execute(db)
        .await?;
    tracing::info!(user = %user.name, quota = ?bytes, "storage quota set");
    storage(db, &user).await
}

/// Refuses with 409 when the user's storage is at or over the quota.
async fn check_quota(db: &Db, user: &User, what: &str) -> ApiResult<()> {
    let s = storage(db, user).await?;
    if s.used_bytes >= s.quota_bytes {
        return Err(ApiError::Conflict(format!(
            "cannot {what}: your stopped runs and saved playgrounds use {} of your {} storage \
             quota; destroy stopped runs or remove saved playgrounds first",
            human_bytes(s.used_bytes),
            human_bytes(s.quota_bytes)
        )));
    }
    Ok(())
}

/// `1.5 GiB`-style sizes for messages.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn not_in(run: &Run, wanted: &str) -> ApiError {
    ApiError::Conflict(format!(
        "run {} is {}; {wanted}",
        run.id,
        run.state.as_str()
    ))
}

/// Asks for a running run to be stopped (its drives are kept). Stopping a stopping or stopped
/// run is a no-op.
pub async fn stop(ctx: &Ctx, user: &User, id: &str) -> ApiResult<RunView> {
    let run = get_for(&ctx.db, user, id).await?;
    match run.state {
        RunState::Stopping | RunState::Stopped => {}
        RunState::Running => {
            check_quota(
                &ctx.db,
                user,
                "stop this run (a stopped run keeps its drives)",
            )
            .await?;
            if let Err(e) = apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Stop, None).await? {
                return Err(ApiError::Conflict(e.to_string()));
            }
        }
        _ => return Err(not_in(&run, "only a running run can be stopped")),
    }
    Ok(get_for(&ctx.db, user, id).await?.view())
}

/// Asks for a stopped run to boot again on its drives. Restarting a restarting or running run
/// is a no-op.
pub async fn restart(ctx: &Ctx, user: &User, id: &str) -> ApiResult<RunView> {
    let run = get_for(&ctx.db, user, id).await?;
    match run.state {
        RunState::Restarting | RunState::Running => {}
        RunState::Stopped => {
            check_active_limit(ctx, user).await?;
            let now = db::now_ms();
            // A fresh lease of life, and the reconciler's attempt counter starts again.
            sqlx::query("UPDATE runs SET expires_at = $1, worker_attempts = 0 WHERE id = $2")
                .bind(now + super::DEFAULT_RUN_TTL.as_millis() as i64)
                .bind(&run.id)
                .execute(&ctx.db)
                .await?;
            if let Err(e) = apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Restart, None).await? {
                return Err(ApiError::Conflict(e.to_string()));
            }
        }
        _ => return Err(not_in(&run, "only a stopped run can be restarted")),
    }
    Ok(get_for(&ctx.db, user, id).await?.view())
}

fn worker_error(e: WorkerError) -> ApiError {
    match e {
        WorkerError::Status { status, detail } if status.as_u16() == 409 => {
            ApiError::Conflict(detail)
        }
        WorkerError::Status { status, detail } if status.is_client_error() => {
            ApiError::BadRequest(detail)
        }
        e @ WorkerError::Unreachable { .. } => worker_unavailable(e),
        e => ApiError::Internal(anyhow::anyhow!("worker call failed: {e}")),
    }
}

/// Clones a stopped run into a new stopped run (reflinked drives: instant, no space until the
/// two diverge).
pub async fn clone(ctx: &Ctx, user: &User, id: &str, req: CloneRequest) -> ApiResult<RunView> {
    let src = get_for(&ctx.db, user, id).await?;
    if src.state != RunState::Stopped {
        return Err(not_in(&src, "stop it before cloning"));
    }
    let title = match req.title {
        Some(t) => check_title(&t)?,
        None => check_title(&format!(
            "{} (clone)",
            src.title.chars().take(190).collect::<String>()
        ))?,
    };
    check_quota(&ctx.db, user, "clone this run").await?;
    let new_id = db::random_id(12);
    let mut plan = src.plan.clone();
    plan.run_id = new_id.clone();
    let plan_text = serde_json::to_string(&plan)
        .map_err(|e| anyhow::anyhow!("failed to serialize the plan of run {new_id}: {e}"))?;
    let now = db::now_ms();
    let reason = format!("cloned from run {}", src.id);
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO runs (id, owner, playground, title, state, reason, plan, worker_attempts, \
         created_at, updated_at, expires_at, storage_bytes, cloned_from, worker) \
         VALUES ($1, $2, $3, $4, 'stopped', NULL, $5, 0, $6, $6, NULL, 0, $7, $8)",
    )
    .bind(&new_id)
    .bind(&src.owner)
    .bind(&src.playground)
    .bind(&title)
    .bind(&plan_text)
    .bind(now)
    .bind(&src.id)
    // A clone is a reflink of the source's drives: on the same worker.
    .bind(ctx.workers.name_of(src.worker.as_deref()))
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO run_events (run_id, state, reason, at) VALUES ($1, 'stopped', $2, $3)",
    )
    .bind(&new_id)
    .bind(&reason)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let worker = ctx.worker_of(&src)?;
    match retry_unreachable(|| worker.clone_run(&src.id, &new_id)).await {
        Ok(st) => {
            if let Some(b) = st.storage_bytes {
                record_storage(&ctx.db, &new_id, b).await?;
            }
        }
        Err(e @ WorkerError::Unreachable { .. }) => {
            // The worker may have made it before it went away: keep the row; the reconciler
            // asks again (idempotent) once the worker answers.
            tracing::warn!(clone = %new_id, error = %e, "worker unreachable; the clone finishes later");
        }
        Err(e) => {
            // Nothing was made on the worker (or it will be found by id and cleaned): forget
            // the row so the user sees one clear error and no ghost run.
            sqlx::query("DELETE FROM runs WHERE id = $1")
                .bind(&new_id)
                .execute(&ctx.db)
                .await?;
            return Err(worker_error(e));
        }
    }
    tracing::info!(run = %src.id, clone = %new_id, "run cloned");
    ctx.signals.notify_changed();
    Ok(get_for(&ctx.db, user, &new_id).await?.view())
}

/// Calls the worker, retrying for a few seconds while it cannot be reached (a supervised worker
/// comes back within a second). Clones and saves are idempotent by id, so a retry after a call
/// that did land is harmless.
async fn retry_unreachable<T, F, Fut>(mut call: F) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WorkerError>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(WorkerError::Unreachable { .. }) if attempt < 20 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Records a run's storage use as measured by its worker.
pub async fn record_storage(db: &Db, id: &str, bytes: u64) -> ApiResult<()> {
    sqlx::query("UPDATE runs SET storage_bytes = $1 WHERE id = $2")
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Records where the off-host snapshot of a stopped run stands (as the worker reported it).
pub async fn record_snapshot(db: &Db, id: &str, state: Option<&str>) -> ApiResult<()> {
    sqlx::query("UPDATE runs SET snapshot = $1 WHERE id = $2")
        .bind(state)
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// The snapshot state word of a worker's run status.
pub fn snapshot_word(s: &ironlab_api::worker::RunStatus) -> Option<&'static str> {
    use ironlab_api::worker::SnapshotState;
    s.snapshot.as_ref().map(|sn| match sn.state {
        SnapshotState::Uploading => "uploading",
        SnapshotState::Uploaded => "uploaded",
        SnapshotState::Failed => "failed",
    })
}

/// Saves a stopped run as a new playground owned by the caller: its machines start from the
/// run's drives as they are now (`saved://ID` sources); its `parent` is the run's playground.
/// Startup files are dropped from the new manifest (the drives hold them already, and any
/// change the user made to them since).
pub async fn save(ctx: &Ctx, user: &User, id: &str, req: SaveRequest) -> ApiResult<PlaygroundView> {
    let run = get_for(&ctx.db, user, id).await?;
    if run.state != RunState::Stopped {
        return Err(not_in(&run, "stop it before saving it"));
    }
    let source = playgrounds::get(&ctx.db, user, &run.playground)
        .await
        .map_err(|_| {
            ApiError::Conflict(format!(
                "the playground {} this run came from is gone; a run can only be saved while \
                 its playground exists",
                run.playground
            ))
        })?;
    check_quota(&ctx.db, user, "save this run").await?;
    let saved_id = db::random_id(12);
    let mut manifest: Value = serde_json::to_value(&source.manifest)
        .map_err(|e| anyhow::anyhow!("failed to serialize manifest {}: {e}", run.playground))?;
    manifest["name"] = Value::String(req.name.clone());
    manifest["title"] = Value::String(match &req.title {
        Some(t) => check_title(t)?,
        None => run.title.clone(),
    });
    if let Some(d) = &req.description {
        manifest["description"] = Value::String(d.clone());
    }
    manifest["parent"] = Value::String(source.view.name.clone());
    if let Some(machines) = manifest
        .pointer_mut("/playground/machines")
        .and_then(Value::as_array_mut)
    {
        for m in machines {
            if let Some(obj) = m.as_object_mut() {
                obj.remove("startupFiles");
            }
            if let Some(drives) = m.get_mut("drives").and_then(Value::as_array_mut) {
                for d in drives {
                    if d.get("mount").and_then(Value::as_str) == Some("/") {
                        d["source"] = Value::String(format!("saved://{saved_id}"));
                    }
                }
            }
        }
    }
    let worker = ctx.worker_of(&run)?;
    let on = ctx.workers.name_of(run.worker.as_deref());
    let view = playgrounds::create_saved(&ctx.db, user, manifest, &saved_id, &run.id, on).await?;
    match retry_unreachable(|| worker.save_run(&run.id, &saved_id)).await {
        Ok(saved) => {
            sqlx::query("UPDATE playgrounds SET storage_bytes = $1 WHERE name = $2")
                .bind(i64::try_from(saved.allocated_bytes).unwrap_or(i64::MAX))
                .bind(&view.name)
                .execute(&ctx.db)
                .await?;
        }
        Err(e) => {
            sqlx::query("DELETE FROM playgrounds WHERE name = $1")
                .bind(&view.name)
                .execute(&ctx.db)
                .await?;
            return Err(worker_error(e));
        }
    }
    tracing::info!(run = %run.id, playground = %view.name, saved = %saved_id, "run saved as a playground");
    Ok(view)
}

/// How often saved drives no playground names are looked for.
pub const SAVED_GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

/// Removes saved drives on each worker that no playground names (a save whose playground
/// row was dropped after the worker call was lost, or whose removal did not reach the worker).
/// Safe against saves in flight: the playground row is written before the worker is asked.
/// A worker that does not answer is skipped (and named in the error when none answered).
/// Returns the ids removed.
pub async fn gc_saved(ctx: &Ctx) -> ApiResult<Vec<String>> {
    let known: Vec<String> =
        sqlx::query_scalar("SELECT saved_id FROM playgrounds WHERE saved_id IS NOT NULL")
            .fetch_all(&ctx.db)
            .await?;
    let mut removed = Vec::new();
    let mut unreachable = Vec::new();
    for (name, worker) in ctx.workers.iter() {
        let on_worker = match worker.list_saved().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(worker = name, error = %e, "cannot list saved drives");
                unreachable.push((name, e));
                continue;
            }
        };
        for s in on_worker {
            if known.contains(&s.id) {
                continue;
            }
            match worker.delete_saved(&s.id).await {
                Ok(()) => {
                    tracing::info!(worker = name, saved = %s.id, run = %s.run_id, "removed saved drives no playground names");
                    removed.push(s.id);
                }
                Err(e) => {
                    tracing::warn!(worker = name, saved = %s.id, error = %e, "cannot remove orphaned saved drives")
                }
            }
        }
    }
    if unreachable.len() == ctx.workers.len()
        && let Some((_, e)) = unreachable.pop()
    {
        return Err(worker_unavailable(e));
    }
    Ok(removed)
}

/// Runs [`gc_saved`] every [`SAVED_GC_INTERVAL`] until the task is aborted.
pub async fn gc_loop(ctx: Ctx) {
    loop {
        tokio::time::sleep(SAVED_GC_INTERVAL).await;
        if let Err(e) = gc_saved(&ctx).await {
            tracing::warn!(error = %e, "saved-drive clean-up failed; retrying later");
        }
    }
}

/// Removes a playground; a saved one's drives are removed from the worker too.
pub async fn remove_playground(ctx: &Ctx, user: &User, name: &str) -> ApiResult<()> {
    let saved = playgrounds::saved_id_of(&ctx.db, name).await?;
    playgrounds::remove(&ctx.db, user, name).await?;
    if let Some((id, on)) = saved
        && let Err(e) = match ctx.workers.get(Some(ctx.workers.name_of(on.as_deref()))) {
            Some(w) => w.delete_saved(&id).await.map_err(|e| e.to_string()),
            None => Err(format!(
                "worker {} is not configured",
                on.unwrap_or_default()
            )),
        }
    {
        // The files stay on the worker until an operator removes `pool/saved/ID`.
        tracing::warn!(playground = %name, saved = %id, error = %e, "could not remove saved drives");
    }
    Ok(())
}
