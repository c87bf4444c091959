//! Runs: records in SQL, the state machine ([`state`]), plan resolution ([`plan`]), and the
//! operations the REST handlers call. State only changes through [`apply`], which writes the
//! new state and a `run_events` row in one transaction and wakes every waiter.

pub mod persist;
pub mod plan;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use ironlab_api::v1::{ConnectResponse, RunState, RunView, StartRun};
use ironlab_api::worker::{RunPlan, TokenGrant, TokenScope};
use tokio::sync::{Notify, broadcast, watch};

use crate::Ctx;
use crate::auth::User;
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};
use crate::playgrounds;
use crate::worker_client::{WorkerError, pick_worker};
pub use state::{InvalidTransition, RunEvent, transition};

/// Most runs a user may have pending, starting or running at once.
pub const MAX_ACTIVE_RUNS_PER_USER: i64 = 5;

/// Longest `?wait=` accepted, in seconds.
pub const MAX_WAIT_SECS: u64 = 30;

/// How long a terminal connection token stays valid.
pub const CONNECT_TOKEN_TTL: Duration = Duration::from_secs(30);

/// Change notifications: state changes (for long-polls) and reconciler wake-ups.
#[derive(Debug)]
pub struct Signals {
    changed: watch::Sender<u64>,
    closing: AtomicBool,
    /// Wakes the reconcile loop.
    pub wake: Notify,
    /// Task changes, `(run id, task)`, for event streams.
    tasks: broadcast::Sender<(String, ironlab_api::v1::TaskView)>,
}

impl Default for Signals {
    fn default() -> Self {
        Signals {
            changed: watch::channel(0).0,
            closing: AtomicBool::new(false),
            wake: Notify::new(),
            tasks: broadcast::channel(1024).0,
        }
    }
}

impl Signals {
    /// The server is shutting down: long-polls answer at once.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.notify_changed();
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Announces that some run changed state.
    pub fn notify_changed(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees the next change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Announces a recorded task change of run `run`.
    pub fn task_changed(&self, run: &str, task: ironlab_api::v1::TaskView) {
        let _ = self.tasks.send((run.to_string(), task));
    }

    /// A receiver of every later task change (all runs).
    pub fn subscribe_tasks(&self) -> broadcast::Receiver<(String, ironlab_api::v1::TaskView)> {
        self.tasks.subscribe()
    }
}

/// A run record.
#[derive(Debug, Clone)]
pub struct Run {
    /// 12 characters `[a-z0-9]`.
    pub id: String,
    /// Owner user id.
    pub owner: String,
    /// Playground name.
    pub playground: String,
    /// Title.
    pub title: String,
    /// Current state.
    pub state: RunState,
    /// Failure reason.
    pub reason: Option<String>,
    /// The resolved plan sent to the worker.
    pub plan: RunPlan,
    /// How many times a worker accepted the plan.
    pub worker_attempts: i64,
    /// Created, ms since the epoch.
    pub created_at: i64,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
    /// Bytes only this run holds on its worker (measured while stopped).
    pub storage_bytes: Option<i64>,
    /// The run this one was cloned from.
    pub cloned_from: Option<String>,
    /// Off-host snapshot state as the worker last reported it (`uploading|uploaded|failed`).
    pub snapshot: Option<String>,
    /// The worker it is pinned to (`None`: recorded before workers had names, the first).
    pub worker: Option<String>,
}

impl Run {
    /// The wire view.
    pub fn view(&self) -> RunView {
        RunView {
            id: self.id.clone(),
            playground: self.playground.clone(),
            title: self.title.clone(),
            state: self.state,
            reason: self.reason.clone(),
            machines: self.plan.machines.iter().map(|m| m.name.clone()).collect(),
            owner: self.owner.clone(),
            created_at: db::from_ms(self.created_at),
            updated_at: db::from_ms(self.updated_at),
            storage_bytes: self.storage_bytes.map(|b| b.max(0) as u64),
            cloned_from: self.cloned_from.clone(),
            snapshot: self
                .snapshot
                .clone()
                .filter(|_| self.state == RunState::Stopped),
            worker: self.worker.clone(),
        }
    }
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<String>,
);

const COLUMNS: &str = "id, owner, playground, title, state, reason, plan, worker_attempts, created_at, updated_at, storage_bytes, cloned_from, snapshot, worker";

fn from_row(row: Row) -> ApiResult<Run> {
    let (
        id,
        owner,
        playground,
        title,
        state,
        reason,
        plan,
        worker_attempts,
        created_at,
        updated_at,
        storage_bytes,
        cloned_from,
        snapshot,
        worker,
    ) = row;
    let state = RunState::parse(&state)
        .ok_or_else(|| anyhow::anyhow!("run {id} has an unknown state {state:?}"))?;
    let plan: RunPlan = serde_json::from_str(&plan)
        .map_err(|e| anyhow::anyhow!("stored plan of run {id} is unreadable: {e}"))?;
    Ok(Run {
        id,
        owner,
        playground,
        title,
        state,
        reason,
        plan,
        worker_attempts,
        created_at,
        updated_at,
        storage_bytes,
        cloned_from,
        snapshot,
        worker,
    })
}

/// Loads a run by id, whoever owns it.
pub async fn load(db: &Db, id: &str) -> ApiResult<Option<Run>> {
    let row: Option<Row> = sqlx::query_as(&format!("SELECT {COLUMNS} FROM runs WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await?;
    row.map(from_row).transpose()
}

/// Runs in the given states (for the reconcile loop), oldest first.
pub async fn load_in_states(db: &Db, states: &[RunState]) -> ApiResult<Vec<Run>> {
    let list: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM runs WHERE state IN ({}) ORDER BY created_at",
        list.join(", ")
    ))
    .fetch_all(db)
    .await?;
    rows.into_iter().map(from_row).collect()
}

/// A run the user may see (own, or any for admins), or 404.
pub async fn get_for(db: &Db, user: &User, id: &str) -> ApiResult<Run> {
    match load(db, id).await? {
        Some(r) if r.owner == user.id || user.is_admin() => Ok(r),
        _ => Err(ApiError::NotFound(format!(
            "run {id} not found; `ironlab playground list` shows your runs"
        ))),
    }
}

/// The user's runs, newest first; `all` (admins only) lists everyone's.
pub async fn list(db: &Db, user: &User, all: bool) -> ApiResult<Vec<RunView>> {
    if all && !user.is_admin() {
        return Err(ApiError::Forbidden("only admins may list all runs".into()));
    }
    let rows: Vec<Row> = if all {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM runs ORDER BY created_at DESC"
        ))
        .fetch_all(db)
        .await?
    } else {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM runs WHERE owner = $1 ORDER BY created_at DESC"
        ))
        .bind(&user.id)
        .fetch_all(db)
        .await?
    };
    rows.into_iter()
        .map(|r| from_row(r).map(|r| r.view()))
        .collect()
}

/// Applies `event` to run `id`: computes the next state with [`transition`], then writes it
/// and a `run_events` row in one transaction (compare-and-swap on the old state, retried if a
/// concurrent change won). `Ok(Err(_))` when the event does not apply to the current state.
pub async fn apply(
    db: &Db,
    signals: &Signals,
    id: &str,
    event: RunEvent,
    reason: Option<&str>,
) -> ApiResult<Result<RunState, InvalidTransition>> {
    loop {
        let current: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?;
        let current = current.ok_or_else(|| ApiError::NotFound(format!("run {id} not found")))?;
        let from = RunState::parse(&current)
            .ok_or_else(|| anyhow::anyhow!("run {id} has an unknown state {current:?}"))?;
        let to = match transition(from, event) {
            Ok(to) => to,
            Err(e) => return Ok(Err(e)),
        };
        let now = db::now_ms();
        let mut tx = db.begin().await?;
        let changed = sqlx::query(
            "UPDATE runs SET state = $1, reason = $2, updated_at = $3 WHERE id = $4 AND state = $5",
        )
        .bind(to.as_str())
        .bind(reason)
        .bind(now)
        .bind(id)
        .bind(from.as_str())
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() == 0 {
            tx.rollback().await?;
            continue;
        }
        sqlx::query("INSERT INTO run_events (run_id, state, reason, at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(to.as_str())
            .bind(reason)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(
            run = id,
            from = from.as_str(),
            to = to.as_str(),
            reason,
            "run state changed"
        );
        signals.notify_changed();
        signals.wake.notify_one();
        return Ok(Ok(to));
    }
}

/// The state history of a run: `(state, reason, at ms)`, oldest first.
pub async fn events(db: &Db, id: &str) -> ApiResult<Vec<(RunState, Option<String>, i64)>> {
    let rows: Vec<(String, Option<String>, i64)> =
        sqlx::query_as("SELECT state, reason, at FROM run_events WHERE run_id = $1 ORDER BY at")
            .bind(id)
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(s, r, at)| RunState::parse(&s).map(|s| (s, r, at)))
        .collect())
}

/// Records that a worker accepted the run's plan once more; returns the new count.
pub async fn count_attempt(db: &Db, id: &str) -> ApiResult<i64> {
    let n: i64 = sqlx::query_scalar(
        "UPDATE runs SET worker_attempts = worker_attempts + 1 WHERE id = $1 RETURNING worker_attempts",
    )
    .bind(id)
    .fetch_one(db)
    .await?;
    Ok(n)
}

/// How long a run lives unless extended: it is destroyed when the time is up.
pub const DEFAULT_RUN_TTL: std::time::Duration = std::time::Duration::from_secs(2 * 3600);

/// Starts a run of a playground: resolves the plan, records it as `pending`, wakes the
/// reconciler.
pub async fn create(ctx: &Ctx, user: &User, req: StartRun) -> ApiResult<RunView> {
    let pg = playgrounds::get(&ctx.db, user, &req.playground).await?;
    let title = match req.title {
        Some(t) => check_title(&t)?,
        None => pg.view.title.clone(),
    };
    create_from(ctx, user, &pg.view.name, &pg.manifest, title, None).await
}

/// Starts a run of `manifest` (the playground `playground`'s, possibly changed by a content
/// item, which `content` names with its version and, for a course lesson, `MODULE/LESSON`).
pub(crate) async fn create_from(
    ctx: &Ctx,
    user: &User,
    playground: &str,
    manifest: &ironlab_spec::Manifest,
    title: String,
    content: Option<(&str, i64, Option<&str>)>,
) -> ApiResult<RunView> {
    check_active_limit(ctx, user).await?;
    let (worker, runtimes, accel) = place(ctx, manifest).await?;
    let id = db::random_id(12);
    let plan = plan::resolve_with_accel(&id, manifest, &runtimes, &accel)?;
    let plan_text = serde_json::to_string(&plan)
        .map_err(|e| anyhow::anyhow!("failed to serialize the plan of run {id}: {e}"))?;
    let now = db::now_ms();
    let mut tx = ctx.db.begin().await?;
    sqlx::query(
        "INSERT INTO runs (id, owner, playground, title, state, reason, plan, worker_attempts, created_at, updated_at, expires_at, \
         content, content_version, content_lesson, worker) \
         VALUES ($1, $2, $3, $4, 'pending', NULL, $5, 0, $6, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&id)
    .bind(&user.id)
    .bind(playground)
    .bind(&title)
    .bind(&plan_text)
    .bind(now)
    .bind(now + DEFAULT_RUN_TTL.as_millis() as i64)
    .bind(content.map(|c| c.0))
    .bind(content.map(|c| c.1))
    .bind(content.and_then(|c| c.2))
    .bind(&worker)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO run_events (run_id, state, reason, at) VALUES ($1, 'pending', NULL, $2)",
    )
    .bind(&id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(run = %id, playground, content = content.map(|c| c.0), user = %user.name, worker = %worker, "run created");
    ctx.signals.notify_changed();
    ctx.signals.wake.notify_one();
    Ok(get_for(&ctx.db, user, &id).await?.view())
}

/// The states in which a run holds machines (or is about to) on its worker.
const ACTIVE_STATES: &str = "'pending', 'starting', 'running', 'stopping', 'restarting'";

/// Which worker a new run of `manifest` goes to, with that worker's runtimes and accelerator
/// (what the plan is resolved against). Drives saved from a run (`saved://ID`) live on the
/// worker that saved them, so such a run goes there; any other run goes to the reachable
/// worker with the fewest active runs ([`pick_worker`]).
async fn place(
    ctx: &Ctx,
    manifest: &ironlab_spec::Manifest,
) -> ApiResult<(String, Vec<String>, String)> {
    let saved: Option<String> = manifest
        .playground
        .machines
        .iter()
        .flat_map(|m| m.drives.iter())
        .find_map(|d| {
            d.source
                .as_deref()?
                .strip_prefix("saved://")
                .map(str::to_string)
        });
    let candidates: Vec<&str> = match &saved {
        Some(id) => {
            let on: Option<Option<String>> =
                sqlx::query_scalar("SELECT saved_worker FROM playgrounds WHERE saved_id = $1")
                    .bind(id)
                    .fetch_optional(&ctx.db)
                    .await?;
            let name = ctx.workers.name_of(on.flatten().as_deref()).to_string();
            let Some((name, _)) = ctx.workers.iter().find(|(n, _)| *n == name) else {
                return Err(ApiError::Unavailable(format!(
                    "the saved drives {id} are on worker {name}, which this control plane is \
                     not configured with (--worker-url NAME=URL)"
                )));
            };
            vec![name]
        }
        None => ctx.workers.iter().map(|(n, _)| n).collect(),
    };
    let mut statuses = HashMap::new();
    if candidates.len() == 1 {
        if let Some(w) = ctx.workers.get(Some(candidates[0]))
            && let Ok(s) = w.cached_status().await
        {
            statuses.insert(candidates[0], s);
        }
    } else {
        let asked = futures::future::join_all(candidates.iter().map(|n| async move {
            let w = ctx.workers.get(Some(n))?;
            w.cached_status().await.ok().map(|s| (*n, s))
        }))
        .await;
        statuses.extend(asked.into_iter().flatten());
    }
    let rows: Vec<(Option<String>, i64)> = sqlx::query_as(&format!(
        "SELECT worker, COUNT(*) FROM runs WHERE state IN ({ACTIVE_STATES}) GROUP BY worker"
    ))
    .fetch_all(&ctx.db)
    .await?;
    let mut active: HashMap<String, i64> = HashMap::new();
    for (w, n) in rows {
        *active
            .entry(ctx.workers.name_of(w.as_deref()).to_string())
            .or_default() += n;
    }
    let reachable: Vec<&str> = statuses.keys().copied().collect();
    let name = pick_worker(&candidates, &reachable, &active)
        .ok_or_else(|| anyhow::anyhow!("no worker to place the run on"))?
        .to_string();
    let (runtimes, accel) = match statuses.remove(name.as_str()) {
        Some(s) => (s.runtimes, s.accel),
        None => {
            tracing::warn!(worker = %name, "worker status unavailable; assuming the container runtime only");
            (vec!["container".to_string()], "none".to_string())
        }
    };
    Ok((name, runtimes, accel))
}

/// Every worker as it answers now (a fresh `/v1/status` each, in parallel), with the runs
/// pinned to it.
pub async fn workers(ctx: &Ctx) -> ApiResult<Vec<ironlab_api::v1::WorkerView>> {
    let rows: Vec<(Option<String>, i64, i64)> = sqlx::query_as(&format!(
        "SELECT worker, SUM(CASE WHEN state IN ({ACTIVE_STATES}) THEN 1 ELSE 0 END), COUNT(*) \
         FROM runs WHERE state NOT IN ('destroyed', 'failed') GROUP BY worker"
    ))
    .fetch_all(&ctx.db)
    .await?;
    let mut counts: HashMap<String, (i64, i64)> = HashMap::new();
    for (w, active, all) in rows {
        let c = counts
            .entry(ctx.workers.name_of(w.as_deref()).to_string())
            .or_default();
        c.0 += active;
        c.1 += all;
    }
    let answers = futures::future::join_all(
        ctx.workers
            .iter()
            .map(|(name, w)| async move { (name, w.base_url().to_string(), w.status().await) }),
    )
    .await;
    Ok(answers
        .into_iter()
        .map(|(name, url, status)| {
            let (active, all) = counts.get(name).copied().unwrap_or_default();
            let mut v = ironlab_api::v1::WorkerView {
                name: name.to_string(),
                url,
                reachable: status.is_ok(),
                error: None,
                version: None,
                runtimes: Vec::new(),
                accel: None,
                cpus: None,
                memory_bytes: None,
                active_runs: active.max(0) as u64,
                runs: all.max(0) as u64,
            };
            match status {
                Ok(s) => {
                    v.version = Some(s.version);
                    v.runtimes = s.runtimes;
                    v.accel = Some(s.accel);
                    v.cpus = Some(s.cpus);
                    v.memory_bytes = Some(s.memory_bytes);
                }
                Err(e) => v.error = Some(e.to_string()),
            }
            v
        })
        .collect())
}

/// Refuses a new active run when the user already has [`MAX_ACTIVE_RUNS_PER_USER`].
pub(crate) async fn check_active_limit(ctx: &Ctx, user: &User) -> ApiResult<()> {
    let active: i64 = sqlx::query_scalar(&format!(
        "SELECT COUNT(*) FROM runs WHERE owner = $1 AND state IN ({ACTIVE_STATES})"
    ))
    .bind(&user.id)
    .fetch_one(&ctx.db)
    .await?;
    if active >= MAX_ACTIVE_RUNS_PER_USER {
        return Err(ApiError::Conflict(format!(
            "you already have {active} active runs (the limit is {MAX_ACTIVE_RUNS_PER_USER}); \
             stop or destroy one with `ironlab playground stop|destroy RUN`"
        )));
    }
    Ok(())
}

pub(crate) fn check_title(t: &str) -> ApiResult<String> {
    let t = t.trim();
    if t.is_empty() || t.chars().count() > 200 {
        return Err(ApiError::BadRequest(
            "title: must be 1–200 characters".to_string(),
        ));
    }
    Ok(t.to_string())
}

/// Changes a run's title (and wakes its event streams).
pub async fn set_title(
    ctx: &Ctx,
    user: &User,
    id: &str,
    title: Option<String>,
) -> ApiResult<RunView> {
    let run = get_for(&ctx.db, user, id).await?;
    if let Some(t) = title {
        let t = check_title(&t)?;
        sqlx::query("UPDATE runs SET title = $1 WHERE id = $2")
            .bind(&t)
            .bind(&run.id)
            .execute(&ctx.db)
            .await?;
        ctx.signals.notify_changed();
    }
    Ok(get_for(&ctx.db, user, id).await?.view())
}

/// Asks for a run to be destroyed: `destroying` (the reconciler removes it from the worker),
/// or `destroyed` at once when it never reached one. Destroying a destroyed or destroying run
/// is a no-op.
pub async fn destroy(ctx: &Ctx, user: &User, id: &str) -> ApiResult<RunView> {
    let run = get_for(&ctx.db, user, id).await?;
    match run.state {
        RunState::Destroying | RunState::Destroyed => {}
        _ => {
            // A refusal here means a concurrent change; the view below shows the outcome.
            let _ = apply(&ctx.db, &ctx.signals, &run.id, RunEvent::Destroy, None).await?;
        }
    }
    Ok(get_for(&ctx.db, user, id).await?.view())
}

/// Returns the run once it is not pending/starting/destroying, or after `wait_secs` (max 30).
pub async fn wait(ctx: &Ctx, user: &User, id: &str, wait_secs: u64) -> ApiResult<RunView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
    let mut rx = ctx.signals.subscribe();
    loop {
        rx.borrow_and_update();
        let run = get_for(&ctx.db, user, id).await?;
        if !state::is_transient(run.state) || ctx.signals.is_closing() {
            return Ok(run.view());
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => continue,
            Ok(Err(_)) | Err(_) => return Ok(get_for(&ctx.db, user, id).await?.view()),
        }
    }
}

/// A running run the caller may use and one of its machines (default: the first): 404 for
/// runs the caller may not see and for unknown machines, 409 when the run is not running.
pub async fn running_machine(
    ctx: &Ctx,
    user: &User,
    id: &str,
    machine: Option<String>,
) -> ApiResult<(Run, String)> {
    let run = get_for(&ctx.db, user, id).await?;
    if run.state != RunState::Running {
        return Err(ApiError::Conflict(format!(
            "run {id} is {}, not running",
            run.state.as_str()
        )));
    }
    let machine = match machine {
        Some(m) => {
            if !run.plan.machines.iter().any(|p| p.name == m) {
                let names: Vec<&str> = run.plan.machines.iter().map(|p| p.name.as_str()).collect();
                return Err(ApiError::NotFound(format!(
                    "run {id} has no machine {m} (machines: {})",
                    names.join(", ")
                )));
            }
            m
        }
        None => run
            .plan
            .machines
            .first()
            .map(|m| m.name.clone())
            .ok_or_else(|| anyhow::anyhow!("run {id} has no machines"))?,
    };
    Ok((run, machine))
}

/// Issues a single-use connection token for a machine of a running run (its terminal, or the
/// TCP `port` inside it) and registers it with the worker.
pub async fn connect(
    ctx: &Ctx,
    user: &User,
    id: &str,
    machine: Option<String>,
    port: Option<u16>,
) -> ApiResult<ConnectResponse> {
    let (run, machine) = running_machine(ctx, user, id, machine).await?;
    let worker = ctx.worker_of(&run)?;
    let status = worker.cached_status().await.map_err(worker_unavailable)?;
    let token = db::random_secret(32);
    let expires_at = Utc::now()
        + chrono::Duration::from_std(CONNECT_TOKEN_TTL).unwrap_or(chrono::Duration::seconds(30));
    worker
        .grant_token(&TokenGrant {
            token: token.clone(),
            user: user.id.clone(),
            run: run.id.clone(),
            machine: machine.clone(),
            expires_at,
            scope: match port {
                Some(port) => TokenScope::Port { port },
                None => TokenScope::Terminal,
            },
        })
        .await
        .map_err(worker_unavailable)?;
    let what = match port {
        Some(p) => format!("port/{p}"),
        None => "terminal".to_string(),
    };
    let url = format!(
        "{}/v1/runs/{}/machines/{}/{what}?token={}",
        status.public_url.trim_end_matches('/'),
        run.id,
        machine,
        token
    );
    Ok(ConnectResponse {
        url,
        token,
        machine,
        port,
        expires_at,
    })
}

/// The end of the console log of `machine` of run `id` (as the worker keeps it).
pub async fn machine_logs(ctx: &Ctx, user: &User, id: &str, machine: &str) -> ApiResult<Vec<u8>> {
    let run = get_for(&ctx.db, user, id).await?;
    if !run.plan.machines.iter().any(|p| p.name == machine) {
        let names: Vec<&str> = run.plan.machines.iter().map(|p| p.name.as_str()).collect();
        return Err(ApiError::NotFound(format!(
            "run {id} has no machine {machine} (machines: {})",
            names.join(", ")
        )));
    }
    match ctx.worker_of(&run)?.console(&run.id, machine).await {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => Err(ApiError::NotFound(format!(
            "machine {machine} of run {id} has no console log (it never started, or the log \
             was dropped a day after the run ended)"
        ))),
        Err(e) => Err(worker_unavailable(e)),
    }
}

pub(crate) fn worker_unavailable(e: WorkerError) -> ApiError {
    tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "worker call failed");
    ApiError::Unavailable(format!("{e}; try again in a moment"))
}
