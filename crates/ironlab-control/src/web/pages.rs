//! Page handlers: they authenticate the browser session, call the same services as the REST
//! API, and render templates. Forms post back here (`csrf` field checked) and redirect
//! (303) so every action also works without scripts.

use std::collections::HashMap;

use axum::Form;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use ironlab_api::v1::{RunState, StartRun};
use ironlab_spec::TabKind;
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::session::{self, Session};
use super::signin::{self, AdminLink, Password, SignIn, SignInError, SignInInput};
use super::{PageError, PageResult, assets, expiry, render};
use crate::Ctx;
use crate::auth::{self, Role};
use crate::db;
use crate::error::ApiError;
use crate::{playgrounds, runs};

/// The signed-in browser session of a page request; without one the browser is sent to
/// `/login?next=<this page>`.
pub struct PageSession(pub Session);

fn encode_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl FromRequestParts<Ctx> for PageSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, Self::Rejection> {
        let found = match session::cookie_value(&parts.headers) {
            Some(id) => session::lookup(&ctx.db, &id)
                .await
                .map_err(|e| PageError(e).into_response())?,
            None => None,
        };
        match found {
            Some(s) => Ok(PageSession(s)),
            None => {
                let path = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let target = if path == "/" {
                    "/login".to_string()
                } else {
                    format!("/login?next={}", encode_component(path))
                };
                Err(Redirect::to(&target).into_response())
            }
        }
    }
}

/// What every page's layout needs.
#[derive(Debug, Serialize)]
pub(super) struct Base {
    user: String,
    is_admin: bool,
    csrf: String,
    nav: &'static str,
    scripts_built: bool,
}

pub(super) fn base(s: &Session, nav: &'static str) -> Base {
    Base {
        user: s.user.name.clone(),
        is_admin: s.user.is_admin(),
        csrf: s.csrf.clone(),
        nav,
        scripts_built: assets::scripts_built(),
    }
}

fn anonymous_base() -> Base {
    Base {
        user: String::new(),
        is_admin: false,
        csrf: String::new(),
        nav: "",
        scripts_built: assets::scripts_built(),
    }
}

/// Content-Security-Policy of every page. xterm.js sets inline styles; nothing else is inline.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; \
     form-action 'self'";

pub(super) fn page(html: String) -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::HeaderName::from_static("x-frame-options"), "DENY"),
            (
                header::HeaderName::from_static("referrer-policy"),
                "same-origin",
            ),
            // Scripts only from here; terminals connect to the worker's relay (another port).
            (header::CONTENT_SECURITY_POLICY, CSP),
        ],
        Html(html),
    )
        .into_response()
}

/// "3 min", "2 h 5 min", "4 d 2 h".
pub fn human_duration(ms: i64) -> String {
    let mins = ms.max(0) / 60_000;
    match mins {
        0 => "less than a minute".to_string(),
        m if m < 60 => format!("{m} min"),
        m if m < 24 * 60 => match m % 60 {
            0 => format!("{} h", m / 60),
            r => format!("{} h {r} min", m / 60),
        },
        m => match (m / 60) % 24 {
            0 => format!("{} d", m / (24 * 60)),
            h => format!("{} d {h} h", m / (24 * 60)),
        },
    }
}

pub(super) fn is_active(state: RunState) -> bool {
    matches!(
        state,
        RunState::Pending | RunState::Starting | RunState::Running
    )
}

/// Only local paths are followed after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

// --- sign-in --------------------------------------------------------------------------------

/// Query of `/login`.
#[derive(Debug, Deserialize)]
pub struct NextQuery {
    next: Option<String>,
}

fn login_page(status: StatusCode, error: Option<String>, name: &str, next: &str) -> Response {
    match render(
        "login.html",
        context! { base => anonymous_base(), error, name, next },
    ) {
        Ok(html) => (status, page(html)).into_response(),
        Err(e) => PageError(e).into_response(),
    }
}

/// `GET /login`.
pub async fn login_form(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> PageResult<Response> {
    let next = safe_next(q.next.as_deref());
    if let Some(id) = session::cookie_value(&headers)
        && session::lookup(&ctx.db, &id).await?.is_some()
    {
        return Ok(Redirect::to(&next).into_response());
    }
    Ok(login_page(StatusCode::OK, None, "", &next))
}

/// Starts a session for whoever `method` signs in and redirects to `next`.
async fn finish_sign_in(
    ctx: &Ctx,
    headers: &HeaderMap,
    method: &dyn SignIn,
    input: SignInInput,
    next: &str,
) -> PageResult<Result<Response, SignInError>> {
    let user = match method.sign_in(&ctx.db, &input).await {
        Ok(u) => u,
        Err(SignInError::Api(e)) => return Err(PageError(e)),
        Err(e) => {
            tracing::info!(method = method.method(), "sign-in refused: {e}");
            return Ok(Err(e));
        }
    };
    // A session id from before sign-in is never re-used (session fixation).
    if let Some(old) = session::cookie_value(headers) {
        session::delete(&ctx.db, &old).await?;
    }
    let (id, _) = session::create(&ctx.db, &user).await?;
    tracing::info!(user = %user.name, method = method.method(), "signed in");
    let mut resp = Redirect::to(next).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(&id, session::request_is_https(headers)),
    );
    Ok(Ok(resp))
}

/// Form of `POST /login`.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    next: Option<String>,
}

/// `POST /login`: local account sign-in.
pub async fn login_password(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> PageResult<Response> {
    let next = safe_next(form.next.as_deref());
    // No session yet, so no CSRF token: the same-origin check guards against login CSRF.
    if headers.contains_key(header::ORIGIN) || headers.contains_key(header::REFERER) {
        session::check_same_origin(&headers)?;
    }
    let input = SignInInput {
        fields: HashMap::from([
            ("name".to_string(), form.name.clone()),
            ("password".to_string(), form.password),
        ]),
    };
    match finish_sign_in(&ctx, &headers, &Password, input, &next).await? {
        Ok(resp) => Ok(resp),
        Err(e) => Ok(login_page(
            StatusCode::UNAUTHORIZED,
            Some(e.to_string()),
            &form.name,
            &next,
        )),
    }
}

/// Query of `/login/admin`.
#[derive(Debug, Deserialize)]
pub struct KeyQuery {
    #[serde(default)]
    key: String,
}

/// `GET /login/admin?key=K`: the one-time admin link printed by `ironlab up`.
pub async fn login_admin_link(
    State(ctx): State<Ctx>,
    headers: HeaderMap,
    Query(q): Query<KeyQuery>,
) -> PageResult<Response> {
    let input = SignInInput {
        fields: HashMap::from([("key".to_string(), q.key)]),
    };
    match finish_sign_in(&ctx, &headers, &AdminLink, input, "/").await? {
        Ok(resp) => Ok(resp),
        Err(e) => Ok(login_page(
            StatusCode::UNAUTHORIZED,
            Some(e.to_string()),
            "",
            "/",
        )),
    }
}

/// A form that carries only the CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    pub(super) csrf: Option<String>,
}

/// `POST /logout`.
pub async fn logout(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    if let Some(id) = session::cookie_value(&headers) {
        session::delete(&ctx.db, &id).await?;
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie(session::request_is_https(&headers)),
    );
    Ok(resp)
}

// --- catalog and runs -------------------------------------------------------------------------

/// `GET /`: the playground catalog.
pub async fn catalog(State(ctx): State<Ctx>, PageSession(s): PageSession) -> PageResult<Response> {
    let list = playgrounds::list(&ctx.db, &s.user).await?;
    let active = runs::list(&ctx.db, &s.user, false)
        .await?
        .into_iter()
        .filter(|r| is_active(r.state))
        .count();
    let cards: Vec<_> = list
        .iter()
        .map(|p| {
            context! {
                name => p.name, title => p.title, description => p.description,
                machines => p.machines, stock => p.stock,
            }
        })
        .collect();
    Ok(page(render(
        "catalog.html",
        context! { base => base(&s, "catalog"), playgrounds => cards, active },
    )?))
}

/// Form of `POST /runs`.
#[derive(Debug, Deserialize)]
pub struct StartForm {
    csrf: Option<String>,
    playground: String,
}

/// `POST /runs`: starts a run from the catalog and opens its page.
pub async fn start_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Form(form): Form<StartForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    let run = runs::create(
        &ctx,
        &s.user,
        StartRun {
            playground: form.playground,
            title: None,
        },
    )
    .await?;
    expiry::set_default_expiry(&ctx.db, &run.id).await?;
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

/// A terminal tab of the run page.
#[derive(Debug, Serialize)]
struct TabView {
    machine: String,
    label: String,
}

async fn terminal_tabs(ctx: &Ctx, s: &Session, run: &runs::Run) -> Vec<TabView> {
    let machines: Vec<String> = run.plan.machines.iter().map(|m| m.name.clone()).collect();
    let from_manifest = match playgrounds::get(&ctx.db, &s.user, &run.playground).await {
        Ok(pg) => pg
            .manifest
            .playground
            .tabs
            .iter()
            .filter(|t| t.kind == TabKind::Terminal && machines.contains(&t.machine))
            .map(|t| TabView {
                machine: t.machine.clone(),
                label: t.name.clone().unwrap_or_else(|| t.machine.clone()),
            })
            .collect(),
        // The playground may be gone; the run still has its machines.
        Err(_) => Vec::new(),
    };
    if from_manifest.is_empty() {
        machines
            .into_iter()
            .map(|m| TabView {
                label: m.clone(),
                machine: m,
            })
            .collect()
    } else {
        from_manifest
    }
}

/// An http-port tab of the run page: a link that opens the machine's port in a new browser
/// tab, on its own host (see [`super::ports`]).
#[derive(Debug, Serialize)]
struct PortTabView {
    machine: String,
    port: u16,
    label: String,
}

async fn port_tabs(ctx: &Ctx, s: &Session, run: &runs::Run) -> Vec<PortTabView> {
    let Ok(pg) = playgrounds::get(&ctx.db, &s.user, &run.playground).await else {
        return Vec::new();
    };
    pg.manifest
        .playground
        .tabs
        .iter()
        .filter(|t| t.kind == TabKind::HttpPort)
        .filter(|t| run.plan.machines.iter().any(|m| m.name == t.machine))
        .filter_map(|t| {
            let port = t.port?;
            Some(PortTabView {
                machine: t.machine.clone(),
                port,
                label: t
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("{}:{port}", t.machine)),
            })
        })
        .collect()
}

/// `GET /runs/{id}/ports/{machine}/{port}`: signs the browser in to the machine's HTTP port
/// on its own host and sends it there (what an http-port tab links to).
pub async fn open_http_port(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path((id, machine, port)): Path<(String, String, u16)>,
) -> PageResult<Response> {
    let link = super::ports::open_link(&ctx, &s.user, &id, Some(machine), port, &headers).await?;
    Ok(Redirect::to(&link.url).into_response())
}

/// `GET /runs/{id}`: the playground page (live state, terminals).
pub async fn run_page(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Path(id): Path<String>,
) -> PageResult<Response> {
    let run = runs::get_for(&ctx.db, &s.user, &id).await?;
    let tabs = terminal_tabs(&ctx, &s, &run).await;
    let port_tabs = port_tabs(&ctx, &s, &run).await;
    let expires_at = expiry::expires_at(&ctx.db, &run).await?;
    let checklist = super::tasks_page::checklist(&ctx, &run).await;
    let content = super::content_pages::text_of_run(&ctx, &s, &run.id).await;
    let view = run.view();
    let kept = runs::state::holds_storage(run.state);
    let time_left = if is_active(run.state) {
        format!("{} left", human_duration(expires_at - db::now_ms()))
    } else {
        String::new()
    };
    Ok(page(render(
        "run.html",
        context! {
            base => base(&s, "run"),
            run => view,
            state => run.state.as_str(),
            transient => runs::state::is_transient(run.state),
            active => is_active(run.state),
            kept,
            tabs, port_tabs, time_left, expires_at, checklist, content,
        },
    )?))
}

/// Form of `POST /runs/{id}/title`.
#[derive(Debug, Deserialize)]
pub struct TitleForm {
    csrf: Option<String>,
    title: String,
}

/// `POST /runs/{id}/title` (the dashboard's rename without scripts).
pub async fn rename_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TitleForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    runs::set_title(&ctx, &s.user, &id, Some(form.title)).await?;
    Ok(Redirect::to("/dashboard").into_response())
}

/// `POST /runs/{id}/destroy`.
pub async fn destroy_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    runs::destroy(&ctx, &s.user, &id).await?;
    Ok(Redirect::to("/dashboard").into_response())
}

/// `POST /runs/{id}/stop`: back to the page the form was on (the run page or the dashboard).
pub async fn stop_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    runs::persist::stop(&ctx, &s.user, &id).await?;
    Ok(Redirect::to(&back(&headers, "/dashboard")).into_response())
}

/// `POST /runs/{id}/restart`: to the run page, which follows it to running.
pub async fn restart_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    runs::persist::restart(&ctx, &s.user, &id).await?;
    Ok(Redirect::to(&format!("/runs/{}", encode_component(&id))).into_response())
}

/// `POST /runs/{id}/clone`: the clone appears (stopped) on the dashboard.
pub async fn clone_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    runs::persist::clone(&ctx, &s.user, &id, Default::default()).await?;
    Ok(Redirect::to("/dashboard").into_response())
}

/// Form of `POST /runs/{id}/save`.
#[derive(Debug, Deserialize)]
pub struct SaveForm {
    csrf: Option<String>,
    name: String,
}

/// `POST /runs/{id}/save`: the new playground appears in the catalog.
pub async fn save_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<SaveForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    let req = ironlab_api::v1::SaveRequest {
        name: form.name.trim().to_string(),
        title: None,
        description: None,
    };
    runs::persist::save(&ctx, &s.user, &id, req).await?;
    Ok(Redirect::to("/").into_response())
}

/// The same-origin page a form was posted from (`Referer`), else `default`.
fn back(headers: &HeaderMap, default: &str) -> String {
    headers
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| {
            let host = headers.get(header::HOST)?.to_str().ok()?;
            let rest = r.split_once("://")?.1.strip_prefix(host)?;
            Some(safe_next(Some(rest)))
        })
        .unwrap_or_else(|| default.to_string())
}

/// `GET /dashboard`: the user's runs.
pub async fn dashboard(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
) -> PageResult<Response> {
    let mut list = runs::list(&ctx.db, &s.user, false).await?;
    // Stopped runs first (they wait for the user); otherwise newest first, as listed.
    list.sort_by_key(|r| !runs::state::holds_storage(r.state));
    let expiries = expiry::expiries_of(&ctx.db, &s.user.id).await?;
    let storage = runs::persist::storage(&ctx.db, &s.user).await?;
    let now = db::now_ms();
    let rows: Vec<_> = list
        .iter()
        .map(|r| {
            let created = r.created_at.timestamp_millis();
            let expires = expiries
                .get(&r.id)
                .copied()
                .unwrap_or(created + expiry::DEFAULT_RUN_TTL.as_millis() as i64);
            let active = is_active(r.state);
            let kept = runs::state::holds_storage(r.state);
            context! {
                id => r.id, title => r.title, state => r.state.as_str(), reason => r.reason,
                playground => r.playground, active, kept, snapshot => r.snapshot,
                storage => r.storage_bytes.filter(|_| kept).map(runs::persist::human_bytes).unwrap_or_else(|| "—".to_string()),
                created => r.created_at.to_rfc3339(), created_ms => created,
                age => human_duration(now - created),
                expires_ms => if active { Some(expires) } else { None },
                time_left => if active { human_duration(expires - now) } else if kept { "kept".to_string() } else { "—".to_string() },
            }
        })
        .collect();
    let learning = super::content_pages::learning(&ctx, &s).await?;
    Ok(page(render(
        "dashboard.html",
        context! {
            base => base(&s, "dashboard"), runs => rows, learning,
            storage => context! {
                used => runs::persist::human_bytes(storage.used_bytes),
                quota => runs::persist::human_bytes(storage.quota_bytes),
                over => storage.used_bytes >= storage.quota_bytes,
            },
        },
    )?))
}

// --- admin ----------------------------------------------------------------------------------

fn require_admin(s: &Session) -> Result<(), PageError> {
    if s.user.is_admin() {
        Ok(())
    } else {
        Err(PageError(ApiError::Forbidden(
            "only admins may manage accounts".into(),
        )))
    }
}

async fn admin_users_page(
    ctx: &Ctx,
    s: &Session,
    status: StatusCode,
    message: Option<String>,
    error: Option<String>,
    token: Option<String>,
) -> PageResult<Response> {
    let rows: Vec<(String, String, Option<String>, i64, i64)> = sqlx::query_as(
        "SELECT name, role, password_hash, created_at, \
         CASE WHEN EXISTS (SELECT 1 FROM content_authors a WHERE a.user_id = users.id) THEN 1 ELSE 0 END \
         FROM users ORDER BY name",
    )
    .fetch_all(&ctx.db)
    .await?;
    let users: Vec<_> = rows
        .into_iter()
        .map(|(name, role, hash, created, author)| {
            context! {
                name, role, has_password => hash.is_some(), author => db::bool_col(author),
                created => db::from_ms(created).format("%Y-%m-%d").to_string(),
            }
        })
        .collect();
    let html = render(
        "admin_users.html",
        context! { base => base(s, "admin"), users, message, error, token },
    )?;
    Ok((status, page(html)).into_response())
}

/// `GET /admin/users`.
pub async fn admin_users(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
) -> PageResult<Response> {
    require_admin(&s)?;
    admin_users_page(&ctx, &s, StatusCode::OK, None, None, None).await
}

/// Form of `POST /admin/users`.
#[derive(Debug, Deserialize)]
pub struct NewUserForm {
    csrf: Option<String>,
    name: String,
    password: String,
    #[serde(default)]
    role: String,
}

/// `POST /admin/users`: creates a local account with a password.
pub async fn admin_create_user(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Form(form): Form<NewUserForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    require_admin(&s)?;
    let role = if form.role == "admin" {
        Role::Admin
    } else {
        Role::User
    };
    let name = form.name.trim().to_string();
    let result = async {
        signin::check_new_password(&form.password)?;
        let (user, token) = auth::create_user(&ctx.db, &name, role).await?;
        signin::set_password(&ctx.db, &user, &form.password).await?;
        Ok::<_, ApiError>(token)
    }
    .await;
    match result {
        Ok(token) => {
            let msg = format!("Created {name} ({}). They can sign in now.", role.as_str());
            admin_users_page(&ctx, &s, StatusCode::OK, Some(msg), None, Some(token)).await
        }
        Err(e @ (ApiError::BadRequest(_) | ApiError::Conflict(_))) => {
            let status = e.status().0;
            admin_users_page(&ctx, &s, status, None, Some(e.to_string()), None).await
        }
        Err(e) => Err(PageError(e)),
    }
}

/// Form of `POST /admin/users/password`.
#[derive(Debug, Deserialize)]
pub struct PasswordForm {
    csrf: Option<String>,
    name: String,
    password: String,
}

/// `POST /admin/users/password`: sets a user's password.
pub async fn admin_set_password(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    require_admin(&s)?;
    let user = auth::find_user(&ctx.db, &form.name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {} not found", form.name)))?;
    match signin::set_password(&ctx.db, &user, &form.password).await {
        Ok(()) => {
            let msg = format!("Set the password of {}.", user.name);
            admin_users_page(&ctx, &s, StatusCode::OK, Some(msg), None, None).await
        }
        Err(e @ ApiError::BadRequest(_)) => {
            admin_users_page(
                &ctx,
                &s,
                StatusCode::BAD_REQUEST,
                None,
                Some(e.to_string()),
                None,
            )
            .await
        }
        Err(e) => Err(PageError(e)),
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(30_000), "less than a minute");
        assert_eq!(human_duration(5 * 60_000), "5 min");
        assert_eq!(human_duration(125 * 60_000), "2 h 5 min");
        assert_eq!(human_duration(120 * 60_000), "2 h");
        assert_eq!(human_duration(26 * 3_600_000), "1 d 2 h");
        assert_eq!(human_duration(-5), "less than a minute");
    }

    #[test]
    fn next_is_local_only() {
        assert_eq!(safe_next(Some("/runs/abc")), "/runs/abc");
        for bad in ["//evil.test", "https://evil.test", "/\\evil", "runs"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(encode_component("/runs/a b?x=1"), "/runs/a%20b%3Fx%3D1");
    }
}
