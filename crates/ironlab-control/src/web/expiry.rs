//! Run expiry: every run gets `runs.expires_at` (default [`DEFAULT_RUN_TTL`] after creation);
//! a sweep destroys active runs whose time is up and forgets expired browser sessions.
//!
//! Runs started from the pages get their expiry at once; runs started elsewhere (CLI, API)
//! get it at the next sweep, computed from their creation time.

use std::collections::HashMap;
use std::time::Duration;

use ironlab_api::v1::RunState;

use crate::Ctx;
use crate::db::{self, Db};
use crate::error::ApiResult;
use crate::runs::{self, RunEvent};

pub use crate::runs::DEFAULT_RUN_TTL;

/// How often the sweep runs.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

fn ttl_ms() -> i64 {
    DEFAULT_RUN_TTL.as_millis() as i64
}

/// Records the default expiry on a run that has none.
pub async fn set_default_expiry(db: &Db, run_id: &str) -> ApiResult<()> {
    sqlx::query(
        "UPDATE runs SET expires_at = created_at + $1 WHERE id = $2 AND expires_at IS NULL",
    )
    .bind(ttl_ms())
    .bind(run_id)
    .execute(db)
    .await?;
    Ok(())
}

/// When a run expires (ms since the epoch).
pub async fn expires_at(db: &Db, run: &runs::Run) -> ApiResult<i64> {
    let v: Option<Option<i64>> = sqlx::query_scalar("SELECT expires_at FROM runs WHERE id = $1")
        .bind(&run.id)
        .fetch_optional(db)
        .await?;
    Ok(v.flatten().unwrap_or(run.created_at + ttl_ms()))
}

/// Expiry of each of a user's runs that has one.
pub async fn expiries_of(db: &Db, owner: &str) -> ApiResult<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT id, expires_at FROM runs WHERE owner = $1 AND expires_at IS NOT NULL",
    )
    .bind(owner)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// One sweep: fills in missing expiries, destroys expired active runs, drops expired sessions.
/// Returns the ids of the runs it destroyed.
pub async fn sweep_once(ctx: &Ctx) -> ApiResult<Vec<String>> {
    sqlx::query("UPDATE runs SET expires_at = created_at + $1 WHERE expires_at IS NULL")
        .bind(ttl_ms())
        .execute(&ctx.db)
        .await?;
    let expired: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE expires_at <= $1 \
         AND state IN ('pending', 'starting', 'running', 'restarting')",
    )
    .bind(db::now_ms())
    .fetch_all(&ctx.db)
    .await?;
    let mut destroyed = Vec::new();
    for id in expired {
        let outcome = runs::apply(
            &ctx.db,
            &ctx.signals,
            &id,
            RunEvent::Destroy,
            Some("its time ran out"),
        )
        .await?;
        // A refused transition means it changed meanwhile (e.g. destroyed by its user).
        if let Ok(RunState::Destroying | RunState::Destroyed) = outcome {
            tracing::info!(run = %id, "run expired; destroying it");
            destroyed.push(id);
        }
    }
    super::session::purge_expired(&ctx.db).await?;
    Ok(destroyed)
}

/// Sweeps every [`SWEEP_INTERVAL`] until the task is aborted.
pub async fn run(ctx: Ctx) {
    loop {
        if let Err(e) = sweep_once(&ctx).await {
            tracing::warn!(error = %e, "run expiry sweep failed; retrying later");
        }
        tokio::time::sleep(SWEEP_INTERVAL).await;
    }
}
