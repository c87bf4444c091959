//! ironlab's control plane: the REST API under `/api/v1`, users and API tokens, the playground
//! catalog, runs and their state machine, and the reconcile loop that drives the worker.
//!
//! Who talks to whom: clients (CLI, browser) → [`http`] handlers → services ([`auth`],
//! [`playgrounds`], [`runs`]) → SQL ([`db`]). The services wake the [`reconcile`] loop, which
//! is the only part that calls the worker's run endpoints ([`worker_client`]); `connect`
//! registers terminal and port tokens with the worker directly, and the http-port proxy
//! ([`web::ports`]) carries HTTP to a machine's port over the worker's port WebSocket
//! ([`portfwd`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use ironlab_control::{Control, ControlConfig, worker_client::WorkerSpec};
//! let control = Control::open(ControlConfig {
//!     data_dir: "/var/lib/ironlab".into(),
//!     workers: WorkerSpec::parse_all(&["http://127.0.0.1:8081"])?,
//!     worker_token: "secret".into(),
//!     database: None, // SQLite in DATA_DIR/control/ironlab.db
//! })
//! .await?;
//! println!("admin token: {}", control.admin_token());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! control.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod auth;
pub mod content;
pub mod db;
pub mod error;
pub mod http;
pub mod playgrounds;
pub mod portfwd;
pub mod reconcile;
pub mod runs;
pub mod tasks;
pub mod web;
pub mod worker_client;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

pub use error::{ApiError, ApiResult};
use runs::Signals;
use worker_client::{WorkerClient, WorkerSpec, Workers};

/// Shared state of the services and handlers (cheap to clone).
#[derive(Clone)]
pub struct Ctx {
    /// The database.
    pub db: db::Db,
    /// The workers; each run is pinned to one ([`Ctx::worker_of`]).
    pub workers: Arc<Workers>,
    /// State-change and reconciler wake-up notifications.
    pub signals: Arc<Signals>,
    /// Web-UI state (event streams' shutdown signal).
    pub web: Arc<web::WebState>,
    /// Content bundles (`DATA_DIR/control/objects/content`).
    pub content: Arc<content::BundleStore>,
}

impl Ctx {
    /// The worker `run` is pinned to. A name this control plane is not configured with is a
    /// 503 that says so (its runs are left alone until the worker is configured again).
    pub fn worker_of(&self, run: &runs::Run) -> Result<Arc<WorkerClient>, error::ApiError> {
        self.workers
            .get(run.worker.as_deref())
            .cloned()
            .ok_or_else(|| {
                error::ApiError::Unavailable(format!(
                    "run {} is on worker {}, which this control plane is not configured with \
                     (--worker-url NAME=URL)",
                    run.id,
                    run.worker.as_deref().unwrap_or_default()
                ))
            })
    }
}

/// How to run the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// Data directory: the SQLite database (unless [`ControlConfig::database`] says otherwise)
    /// in `DATA_DIR/control/ironlab.db`, content bundles, the admin token in
    /// `DATA_DIR/admin-token`.
    pub data_dir: PathBuf,
    /// The workers (at least one), in order: new runs go to the least loaded that answers.
    pub workers: Vec<WorkerSpec>,
    /// Bearer token of the workers' API (the same for all).
    pub worker_token: String,
    /// Where the state lives; `None`: SQLite in `DATA_DIR/control/ironlab.db`.
    pub database: Option<db::Database>,
}

impl ControlConfig {
    /// The configured database, or SQLite in `DATA_DIR/control/ironlab.db`.
    pub fn database(&self) -> db::Database {
        self.database.clone().unwrap_or_else(|| {
            db::Database::Sqlite(self.data_dir.join("control").join("ironlab.db"))
        })
    }

    /// `DATA_DIR/admin-token`.
    pub fn admin_token_path(&self) -> PathBuf {
        self.data_dir.join("admin-token")
    }
}

/// An opened control plane: database migrated, admin user and stock playgrounds in place.
pub struct Control {
    ctx: Ctx,
    admin_token: String,
}

impl Control {
    /// Opens the database (creating and migrating it), ensures the admin user and its token
    /// file, and registers the stock playgrounds.
    pub async fn open(config: ControlConfig) -> anyhow::Result<Self> {
        fs_err::create_dir_all(config.data_dir.join("control").join("objects"))?;
        let db = db::open(&config.database()).await?;
        let admin_token = auth::bootstrap_admin(&db, &config.admin_token_path())
            .await
            .context("failed to set up the admin user")?;
        playgrounds::register_stock(&db).await?;
        let workers = Workers::new(&config.workers, &config.worker_token)?;
        let content = content::BundleStore::open(
            &config
                .data_dir
                .join("control")
                .join("objects")
                .join("content"),
        )?;
        Ok(Control {
            ctx: Ctx {
                db,
                workers: Arc::new(workers),
                signals: Arc::new(Signals::default()),
                web: Arc::new(web::WebState::default()),
                content: Arc::new(content),
            },
            admin_token,
        })
    }

    /// The admin's API token (also in `DATA_DIR/admin-token`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A fresh one-time admin sign-in link for the web UI under `base_url`
    /// (`http://127.0.0.1:8080` → `http://127.0.0.1:8080/login/admin?key=…`), valid 24 h.
    pub async fn admin_login_link(&self, base_url: &str) -> anyhow::Result<String> {
        web::admin_login_link(&self.ctx.db, base_url).await
    }

    /// The shared state, for calling services directly.
    pub fn ctx(&self) -> &Ctx {
        &self.ctx
    }

    /// The HTTP router (for `oneshot` tests or embedding).
    pub fn router(&self) -> axum::Router {
        http::router(self.ctx.clone()).0
    }

    /// Starts the reconcile loop; it runs until the handle is aborted.
    pub fn spawn_reconciler(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(reconcile::run(self.ctx.clone()))
    }

    /// Serves the API on `listener` with the reconcile loop running, until `shutdown`
    /// completes; then stops accepting, finishes in-flight requests, and stops the loop.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr().context("listener has no address")?;
        let reconciler = self.spawn_reconciler();
        let expiry = tokio::spawn(web::expiry::run(self.ctx.clone()));
        let saved_gc = tokio::spawn(runs::persist::gc_loop(self.ctx.clone()));
        tracing::info!(%addr, "control plane listening");
        let signals = self.ctx.signals.clone();
        let web_state = self.ctx.web.clone();
        let shutdown = async move {
            shutdown.await;
            tracing::info!("control plane shutting down");
            signals.close();
            web_state.close();
        };
        let result = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
            .with_context(|| format!("control plane server on {addr} failed"));
        reconciler.abort();
        expiry.abort();
        saved_gc.abort();
        let _ = reconciler.await;
        let _ = expiry.await;
        self.ctx.db.close().await;
        result
    }
}

#[cfg(test)]
mod tests;
