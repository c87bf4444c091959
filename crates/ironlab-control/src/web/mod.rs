//! The web UI: server-rendered pages, browser sessions, the run-state event stream, and the
//! embedded static assets of the TypeScript islands.
//!
//! Who talks to whom: the browser loads pages from [`pages`] (signed in by the session cookie
//! of [`session`], sign-in methods behind [`signin::SignIn`]); the islands in `web/src` call the
//! same `/api/v1` endpoints as the CLI with the cookie + `X-CSRF-Token` (see
//! [`crate::http::Auth`]), listen to [`sse`] for run changes (fed by the reconciler's
//! [`crate::runs::Signals`]), and open terminals on the worker relay with tokens from
//! `POST /api/v1/runs/{id}/connect`. [`expiry`] destroys runs whose time is up. [`ports`]
//! serves machines' HTTP ports (http-port tabs) on hosts of their own.
//!
//! Templates (`crates/ironlab-control/templates/`) are compiled into the binary; the esbuild
//! output (`web/dist`) is embedded by `build.rs` when it exists.

pub mod assets;
pub mod content_pages;
pub mod expiry;
pub mod pages;
pub mod ports;
pub mod session;
pub mod signin;
pub mod sse;
pub mod tasks_page;

use std::sync::LazyLock;

use axum::Router;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use minijinja::Environment;
use serde::Serialize;
use tokio::sync::watch;

use crate::Ctx;
use crate::error::ApiError;

/// Web-UI state shared through [`Ctx`].
#[derive(Debug)]
pub struct WebState {
    closing: watch::Sender<bool>,
    /// Sign-in keys and sessions of http-port hosts.
    pub ports: ports::PortAuth,
}

impl Default for WebState {
    fn default() -> Self {
        WebState {
            closing: watch::channel(false).0,
            ports: ports::PortAuth::default(),
        }
    }
}

impl WebState {
    /// The server is shutting down: event streams end so graceful shutdown can finish.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A receiver that turns `true` at shutdown.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

/// The pages, the event stream and the assets (mounted next to the `/api/v1` router).
pub fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/", get(pages::catalog))
        .route("/login", get(pages::login_form).post(pages::login_password))
        .route("/login/admin", get(pages::login_admin_link))
        .route("/logout", post(pages::logout))
        .route("/runs", post(pages::start_run))
        .route("/runs/{id}", get(pages::run_page))
        .route("/runs/{id}/title", post(pages::rename_run))
        .route("/runs/{id}/destroy", post(pages::destroy_run))
        .route("/runs/{id}/start-over", post(tasks_page::start_over))
        .route("/runs/{id}/tasks/{task}/input", post(tasks_page::answer))
        .route("/runs/{id}/stop", post(pages::stop_run))
        .route("/runs/{id}/restart", post(pages::restart_run))
        .route("/runs/{id}/clone", post(pages::clone_run))
        .route("/runs/{id}/save", post(pages::save_run))
        .route(
            "/runs/{id}/ports/{machine}/{port}",
            get(pages::open_http_port),
        )
        .route("/dashboard", get(pages::dashboard))
        .route("/content", get(content_pages::catalog))
        .route("/content/{name}", get(content_pages::item))
        .route("/content/{name}/start", post(content_pages::start))
        .route("/content/{name}/events", get(content_pages::events))
        .route(
            "/content/{name}/lessons/{module}/{lesson}",
            get(content_pages::lesson),
        )
        .route(
            "/content/{name}/static/{*path}",
            get(content_pages::static_file),
        )
        .route(
            "/admin/users",
            get(pages::admin_users).post(pages::admin_create_user),
        )
        .route("/admin/users/password", post(pages::admin_set_password))
        .route("/admin/users/author", post(content_pages::admin_set_author))
        .route("/assets/{name}", get(assets::serve))
        .with_state(ctx)
}

/// Creates a one-time admin sign-in link under `base_url` (e.g. `http://127.0.0.1:8080`).
pub async fn admin_login_link(db: &crate::db::Db, base_url: &str) -> anyhow::Result<String> {
    let key = signin::create_admin_key(db).await?;
    Ok(format!(
        "{}/login/admin?key={key}",
        base_url.trim_end_matches('/')
    ))
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    let templates: [(&str, &str); 11] = [
        ("layout.html", include_str!("../../templates/layout.html")),
        ("login.html", include_str!("../../templates/login.html")),
        ("catalog.html", include_str!("../../templates/catalog.html")),
        ("run.html", include_str!("../../templates/run.html")),
        (
            "dashboard.html",
            include_str!("../../templates/dashboard.html"),
        ),
        (
            "admin_users.html",
            include_str!("../../templates/admin_users.html"),
        ),
        ("error.html", include_str!("../../templates/error.html")),
        ("macros.html", include_str!("../../templates/macros.html")),
        ("tasks.html", include_str!("../../templates/tasks.html")),
        (
            "content_catalog.html",
            include_str!("../../templates/content_catalog.html"),
        ),
        (
            "content_item.html",
            include_str!("../../templates/content_item.html"),
        ),
    ];
    for (name, source) in templates {
        if let Err(e) = env.add_template(name, source) {
            // A broken template is a bug caught by the tests; render() reports it per page.
            tracing::error!(template = name, error = %e, "template does not compile");
        }
    }
    env.add_function("asset", |name: String| assets::url(&name));
    env
});

/// Renders a template with `ctx`.
pub fn render(name: &str, ctx: impl Serialize) -> Result<String, ApiError> {
    TEMPLATES
        .get_template(name)
        .and_then(|t| t.render(ctx))
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot render template {name}: {e:#}")))
}

/// An error shown as an HTML page.
#[derive(Debug)]
pub struct PageError(pub ApiError);

impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        PageError(e)
    }
}

impl From<sqlx::Error> for PageError {
    fn from(e: sqlx::Error) -> Self {
        PageError(e.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, _) = self.0.status();
        if let ApiError::Internal(e) = &self.0 {
            tracing::error!(error = format!("{e:#}"), "internal error on a page");
        }
        let body = self.0.body();
        let heading = match status {
            StatusCode::NOT_FOUND => "Not found",
            StatusCode::FORBIDDEN => "Not allowed",
            StatusCode::CONFLICT => "Not now",
            StatusCode::BAD_REQUEST => "Something is wrong with that request",
            StatusCode::UNAUTHORIZED => "Please sign in",
            _ => "Something went wrong",
        };
        let html = render(
            "error.html",
            minijinja::context! { status => status.as_u16(), heading, detail => body.detail },
        )
        .unwrap_or_else(|_| format!("<!doctype html><title>{status}</title><p>{status}</p>"));
        (status, Html(html)).into_response()
    }
}

/// Result of a page handler.
pub type PageResult<T> = Result<T, PageError>;

/// The HTML 404 page for unknown paths outside `/api`.
pub async fn not_found_page() -> Response {
    PageError(ApiError::NotFound("There is no page here.".into())).into_response()
}

#[cfg(test)]
mod tests;
