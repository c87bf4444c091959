//! The REST API under `/api/v1`: thin handlers that authenticate, extract, and call the
//! services in [`crate::auth`], [`crate::playgrounds`] and [`crate::runs`]. The OpenAPI
//! document is built from the same `#[utoipa::path]` annotations that register the routes.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use ironlab_api::ErrorBody;
use ironlab_api::v1::{
    CloneRequest, Connect, ConnectResponse, CreateUser, CreatedUser, HttpPortLink, OpenHttpPort,
    PlaygroundView, RunView, SaveRequest, SetQuota, StartRun, StorageView, UpdateRun, UserView,
};
use serde::Deserialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Ctx;
use crate::auth::{self, Role, User};
use crate::error::{ApiError, ApiResult};
use crate::{playgrounds, runs};

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s (400 JSON with serde's message).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// `axum::extract::Query` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `axum::extract::Path` with JSON errors.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller: an `Authorization: Bearer` API token, or else the browser
/// session cookie (state-changing requests then need `X-CSRF-Token` and a same-origin
/// `Origin`; see [`crate::web::session`]).
pub struct Auth(pub User);

impl FromRequestParts<Ctx> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &Ctx) -> Result<Self, Self::Rejection> {
        match parts.headers.get(header::AUTHORIZATION) {
            Some(v) => auth::authenticate(&ctx.db, v.to_str().ok()).await.map(Auth),
            None => crate::web::session::authenticate_api(ctx, parts)
                .await
                .map(Auth),
        }
    }
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ironlab control plane API",
        description = "Playgrounds, runs and terminal connections. Authenticate with `Authorization: Bearer ilt_…`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody))
)]
struct ApiDoc;

/// The OpenAPI document, serialized once at router build.
#[derive(Clone)]
struct OpenApiJson(Arc<String>);

fn api_router() -> OpenApiRouter<Ctx> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openapi_json))
        .routes(routes!(health))
        .routes(routes!(me))
        .routes(routes!(create_user))
        .routes(routes!(list_workers))
        .routes(routes!(list_playgrounds, create_playground))
        .routes(routes!(get_playground, remove_playground))
        .routes(routes!(list_runs, start_run))
        .routes(routes!(get_run, update_run, destroy_run))
        .routes(routes!(connect))
        .routes(routes!(stop_run))
        .routes(routes!(restart_run))
        .routes(routes!(clone_run))
        .routes(routes!(save_run))
        .routes(routes!(storage))
        .routes(routes!(set_quota))
        .routes(routes!(open_http_port))
        .routes(routes!(machine_logs))
        .routes(routes!(crate::web::sse::events))
        .routes(routes!(crate::tasks::api::list_tasks))
        .routes(routes!(crate::tasks::api::task_input))
        .routes(routes!(
            crate::content::api::list_content,
            crate::content::api::push_content
        ))
        .routes(routes!(
            crate::content::api::get_content,
            crate::content::api::remove_content
        ))
        .routes(routes!(crate::content::api::content_bundle))
        .routes(routes!(crate::content::api::start_content_run))
        .routes(routes!(
            crate::content::api::grant_author,
            crate::content::api::revoke_author
        ))
}

/// The OpenAPI document of the REST API (what `GET /api/v1/openapi.json` serves).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api_router().into_openapi()
}

/// Builds the router and the OpenAPI document it serves.
pub fn router(ctx: Ctx) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = api_router().with_state(ctx.clone()).split_for_parts();
    let json = doc.to_pretty_json().unwrap_or_else(|e| {
        tracing::error!(error = %e, "failed to serialize the OpenAPI document");
        "{}".to_string()
    });
    let router = router
        .merge(crate::web::router(ctx.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Extension(OpenApiJson(Arc::new(json))));
    // Requests for an http-port host never reach the control plane's own routes.
    let router = Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn_with_state(
            ctx,
            crate::web::ports::route_port_hosts,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http());
    (router, doc)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/") {
        ApiError::NotFound("no such API route; see /api/v1/openapi.json".into()).into_response()
    } else {
        crate::web::not_found_page().await
    }
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: "method_not_allowed".into(),
            detail: "this route does not take that method; see /api/v1/openapi.json".into(),
        }),
    )
        .into_response()
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/api/v1/openapi.json", security(()),
    responses((status = 200, description = "OpenAPI 3.1 document", body = Object)))]
async fn openapi_json(Extension(doc): Extension<OpenApiJson>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.as_str().to_owned(),
    )
        .into_response()
}

/// Liveness of the control plane (no token needed).
#[utoipa::path(get, path = "/api/v1/health", security(()),
    responses((status = 200, description = "The control plane is up", body = Object)))]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// The signed-in user.
#[utoipa::path(get, path = "/api/v1/me",
    responses((status = 200, body = UserView), (status = 401, body = ErrorBody)))]
async fn me(Auth(user): Auth) -> Json<UserView> {
    Json(user.view())
}

/// The control plane's workers as they answer now, with the runs pinned to each (admins only).
#[utoipa::path(get, path = "/api/v1/workers",
    responses((status = 200, body = Vec<ironlab_api::v1::WorkerView>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody)))]
async fn list_workers(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
) -> ApiResult<Json<Vec<ironlab_api::v1::WorkerView>>> {
    if !user.is_admin() {
        return Err(ApiError::Forbidden("only admins may list workers".into()));
    }
    Ok(Json(runs::workers(&ctx).await?))
}

/// Creates a user with a first API token (admins only).
#[utoipa::path(post, path = "/api/v1/users", request_body = CreateUser,
    responses((status = 201, body = CreatedUser), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_user(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiJson(req): ApiJson<CreateUser>,
) -> ApiResult<(StatusCode, Json<CreatedUser>)> {
    if !user.is_admin() {
        return Err(ApiError::Forbidden("only admins may create users".into()));
    }
    let role = match req.role.as_str() {
        "admin" => Role::Admin,
        "user" => Role::User,
        other => {
            return Err(ApiError::BadRequest(format!(
                "role: {other:?} is not a role (admin or user)"
            )));
        }
    };
    let (created, token) = auth::create_user(&ctx.db, &req.name, role).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            user: created.view(),
            token,
        }),
    ))
}

/// The playgrounds the caller may start: stock ones and their own.
#[utoipa::path(get, path = "/api/v1/playgrounds",
    responses((status = 200, body = Vec<PlaygroundView>), (status = 401, body = ErrorBody)))]
async fn list_playgrounds(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
) -> ApiResult<Json<Vec<PlaygroundView>>> {
    Ok(Json(playgrounds::list(&ctx.db, &user).await?))
}

/// Registers a custom playground from a manifest (JSON, or YAML with
/// `Content-Type: application/yaml`). A bad manifest gets 400 with one `path: reason` line per
/// problem in `detail`.
#[utoipa::path(post, path = "/api/v1/playgrounds",
    request_body(content = Object, description = "The playground manifest", content_type = "application/json"),
    responses((status = 201, body = PlaygroundView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn create_playground(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<PlaygroundView>)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    if body.len() > ironlab_spec::MAX_MANIFEST_BYTES {
        return Err(ApiError::BadRequest("manifest is larger than 1 MiB".into()));
    }
    let value: serde_json::Value = if content_type.contains("yaml") {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::BadRequest("the manifest is not UTF-8".into()))?;
        serde_saphyr::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("not valid YAML: {e}")))?
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("not valid JSON: {e}")))?
    };
    let view = playgrounds::create(&ctx.db, &user, value).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// One playground.
#[utoipa::path(get, path = "/api/v1/playgrounds/{name}",
    params(("name" = String, Path, description = "Playground name")),
    responses((status = 200, body = PlaygroundView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_playground(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<PlaygroundView>> {
    Ok(Json(playgrounds::get(&ctx.db, &user, &name).await?.view))
}

/// Removes a custom playground (owner or admin; stock playgrounds cannot be removed).
#[utoipa::path(delete, path = "/api/v1/playgrounds/{name}",
    params(("name" = String, Path, description = "Playground name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn remove_playground(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    runs::persist::remove_playground(&ctx, &user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `GET /api/v1/runs`.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Everyone's runs (admins only).
    #[serde(default)]
    all: bool,
}

/// The caller's runs, newest first.
#[utoipa::path(get, path = "/api/v1/runs", params(ListQuery),
    responses((status = 200, body = Vec<RunView>), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_runs(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<RunView>>> {
    Ok(Json(runs::list(&ctx.db, &user, q.all).await?))
}

/// Starts a run of a playground; it is `pending` until the reconciler hands it to a worker.
#[utoipa::path(post, path = "/api/v1/runs", request_body = StartRun,
    responses((status = 201, body = RunView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn start_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiJson(req): ApiJson<StartRun>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    Ok((
        StatusCode::CREATED,
        Json(runs::create(&ctx, &user, req).await?),
    ))
}

/// Query of `GET /api/v1/runs/{id}`.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Long-poll: answer as soon as the run is not pending/starting/destroying, or after this
    /// many seconds (max 30).
    wait: Option<u64>,
}

/// One run; with `?wait=SECS`, waits for it to settle.
#[utoipa::path(get, path = "/api/v1/runs/{id}",
    params(("id" = String, Path, description = "Run id"), WaitQuery),
    responses((status = 200, body = RunView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Json<RunView>> {
    match q.wait {
        Some(secs) if secs > 0 => Ok(Json(runs::wait(&ctx, &user, &id, secs).await?)),
        _ => Ok(Json(runs::get_for(&ctx.db, &user, &id).await?.view())),
    }
}

/// Changes a run's title.
#[utoipa::path(patch, path = "/api/v1/runs/{id}", request_body = UpdateRun,
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn update_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateRun>,
) -> ApiResult<Json<RunView>> {
    Ok(Json(runs::set_title(&ctx, &user, &id, req.title).await?))
}

/// Destroys a run: `destroying` until its worker removed everything, then `destroyed`.
#[utoipa::path(delete, path = "/api/v1/runs/{id}",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 202, body = RunView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn destroy_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(runs::destroy(&ctx, &user, &id).await?),
    ))
}

/// The end (256 KiB) of a machine's console log: the serial console of a microVM, the init's
/// output of a container. Still there for a day after the run failed or was destroyed.
#[utoipa::path(get, path = "/api/v1/runs/{id}/machines/{machine}/logs",
    params(("id" = String, Path, description = "Run id"), ("machine" = String, Path, description = "Machine name")),
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn machine_logs(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath((id, machine)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let text = runs::machine_logs(&ctx, &user, &id, &machine).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Issues a single-use, 30-second connection token for a machine of a running run: its terminal,
/// or with `port` a TCP port inside it (a WebSocket carrying the bytes).
#[utoipa::path(post, path = "/api/v1/runs/{id}/connect", request_body = Connect,
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = ConnectResponse), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn connect(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    body: Bytes,
) -> ApiResult<Json<ConnectResponse>> {
    // The body is optional: empty means the first machine's terminal.
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        Connect {
            machine: None,
            port: None,
        }
    } else {
        serde_json::from_slice::<Connect>(&body)
            .map_err(|e| ApiError::BadRequest(format!("not a valid connect request: {e}")))?
    };
    if req.port == Some(0) {
        return Err(ApiError::BadRequest("port: 0 is not a TCP port".into()));
    }
    Ok(Json(
        runs::connect(&ctx, &user, &id, req.machine, req.port).await?,
    ))
}

/// A single-use browser link (60 s) to an HTTP server inside a machine of a running run, served
/// at the root of its own host (see `HttpPortLink`); what an `http-port` tab opens.
#[utoipa::path(post, path = "/api/v1/runs/{id}/http-ports", request_body = OpenHttpPort,
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = HttpPortLink), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn open_http_port(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<OpenHttpPort>,
) -> ApiResult<Json<HttpPortLink>> {
    Ok(Json(
        crate::web::ports::open_link(&ctx, &user, &id, req.machine, req.port, &headers).await?,
    ))
}

/// Stops a running run: its machines shut down, its drives are kept (`stopping`, then
/// `stopped`). A stopped run is kept until destroyed and counts against the storage quota.
#[utoipa::path(post, path = "/api/v1/runs/{id}/stop",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 202, body = RunView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn stop_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(runs::persist::stop(&ctx, &user, &id).await?),
    ))
}

/// Boots a stopped run's machines again on the same drives (`restarting`, then `running`;
/// back to `stopped` with a reason if it fails).
#[utoipa::path(post, path = "/api/v1/runs/{id}/restart",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 202, body = RunView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
async fn restart_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(runs::persist::restart(&ctx, &user, &id).await?),
    ))
}

/// Clones a stopped run into a new stopped run (reflinked drives: instant, no extra space until
/// they diverge). The body is optional.
#[utoipa::path(post, path = "/api/v1/runs/{id}/clone", request_body = CloneRequest,
    params(("id" = String, Path, description = "Run id")),
    responses((status = 201, body = RunView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn clone_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let req = if body.iter().all(u8::is_ascii_whitespace) {
        CloneRequest::default()
    } else {
        serde_json::from_slice::<CloneRequest>(&body)
            .map_err(|e| ApiError::BadRequest(format!("not a valid clone request: {e}")))?
    };
    Ok((
        StatusCode::CREATED,
        Json(runs::persist::clone(&ctx, &user, &id, req).await?),
    ))
}

/// Saves a stopped run as a new playground whose machines start from the run's drives; its
/// `parent` is the playground the run came from.
#[utoipa::path(post, path = "/api/v1/runs/{id}/save", request_body = SaveRequest,
    params(("id" = String, Path, description = "Run id")),
    responses((status = 201, body = PlaygroundView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn save_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SaveRequest>,
) -> ApiResult<(StatusCode, Json<PlaygroundView>)> {
    Ok((
        StatusCode::CREATED,
        Json(runs::persist::save(&ctx, &user, &id, req).await?),
    ))
}

/// The caller's storage: stopped runs and saved playgrounds against their quota.
#[utoipa::path(get, path = "/api/v1/storage",
    responses((status = 200, body = StorageView), (status = 401, body = ErrorBody)))]
async fn storage(State(ctx): State<Ctx>, Auth(user): Auth) -> ApiResult<Json<StorageView>> {
    Ok(Json(runs::persist::storage(&ctx.db, &user).await?))
}

/// Sets a user's storage quota for stopped runs and saved playgrounds (admins only;
/// `{"bytes": null}` = the platform default).
#[utoipa::path(put, path = "/api/v1/users/{name}/storage-quota", request_body = SetQuota,
    params(("name" = String, Path, description = "User name")),
    responses((status = 200, body = StorageView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_quota(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<SetQuota>,
) -> ApiResult<Json<StorageView>> {
    Ok(Json(
        runs::persist::set_quota(&ctx.db, &user, &name, req.bytes).await?,
    ))
}
