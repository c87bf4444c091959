//! REST handlers of content (registered in [`crate::http`]).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ironlab_api::ErrorBody;
use ironlab_api::v1::{ContentFilter, ContentView, RunView, StartContentRun};
use ironlab_spec::content::{Bundle, MAX_BUNDLE_BYTES};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::Ctx;
use crate::error::{ApiError, ApiResult};
use crate::http::{ApiJson, ApiPath, ApiQuery, Auth};

/// Query of `POST /api/v1/content`.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct PushQuery {
    /// The item's name (its folder's name): 3-40 characters `[a-z0-9-]`.
    name: String,
}

/// Query of `GET /api/v1/content`.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct ListContentQuery {
    /// Only this kind (tutorial, challenge, course, skill-path).
    #[serde(default)]
    kind: Option<String>,
    /// Only this difficulty (easy, medium, hard).
    #[serde(default)]
    difficulty: Option<String>,
    /// Words that must all appear in the name, title, description, tags or categories.
    #[serde(default)]
    q: Option<String>,
}

/// Query naming a version.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct VersionQuery {
    /// Version; default: the latest.
    #[serde(default)]
    version: Option<i64>,
}

/// Publishes the next version of an item (authors and admins). The body is a tar archive of the item's
/// folder (`Content-Type: application/x-tar`). Everything is checked first (front matter,
/// Markdown references, tasks, playground and overrides, solution); a bad item gets 400 with
/// one `file: field: reason` line per problem and nothing is stored.
#[utoipa::path(post, path = "/api/v1/content", params(PushQuery),
    request_body(content = Vec<u8>, description = "tar archive of the item's folder", content_type = "application/x-tar"),
    responses((status = 201, body = ContentView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn push_content(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiQuery(q): ApiQuery<PushQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/x-tar") {
        let e = ApiError::BadRequest(format!(
            "Content-Type: {content_type:?}; send the item's folder as application/x-tar"
        ));
        let mut r = e.into_response();
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Ok(r);
    }
    // Tar headers and padding add a little to the files' own limit.
    let bytes = axum::body::to_bytes(body, MAX_BUNDLE_BYTES + 4 * 1024 * 1024)
        .await
        .map_err(|_| ApiError::BadRequest("the archive is larger than 36 MiB".into()))?;
    let bundle = Bundle::from_tar(&bytes).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let view = super::push(&ctx, &user, &q.name, &bundle).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The catalog: public items and the caller's own (admins: every item), filtered.
#[utoipa::path(get, path = "/api/v1/content", params(ListContentQuery),
    responses((status = 200, body = Vec<ContentView>), (status = 401, body = ErrorBody)))]
pub async fn list_content(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiQuery(q): ApiQuery<ListContentQuery>,
) -> ApiResult<Json<Vec<ContentView>>> {
    let filter = ContentFilter {
        kind: q.kind,
        difficulty: q.difficulty,
        q: q.q,
    };
    Ok(Json(super::list(&ctx.db, &user, &filter).await?))
}

/// One item (private items: author and admins only; unlisted: anyone signed in).
#[utoipa::path(get, path = "/api/v1/content/{name}",
    params(("name" = String, Path, description = "Item name")),
    responses((status = 200, body = ContentView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get_content(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ContentView>> {
    Ok(Json(super::get(&ctx.db, &user, &name).await?))
}

/// Removes an item and all its versions (author or admin); runs already started keep running.
#[utoipa::path(delete, path = "/api/v1/content/{name}",
    params(("name" = String, Path, description = "Item name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn remove_content(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    super::remove(&ctx, &user, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The tar archive of a version, solution included (author or admin).
#[utoipa::path(get, path = "/api/v1/content/{name}/bundle",
    params(("name" = String, Path, description = "Item name"), VersionQuery),
    responses((status = 200, content_type = "application/x-tar", body = Vec<u8>), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn content_bundle(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<VersionQuery>,
) -> ApiResult<Response> {
    let tar = super::bundle(&ctx, &user, &name, q.version).await?;
    Ok(([(header::CONTENT_TYPE, "application/x-tar")], tar).into_response())
}

/// Makes a user a content author (admins only).
#[utoipa::path(put, path = "/api/v1/users/{name}/author",
    params(("name" = String, Path, description = "User name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn grant_author(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    super::set_author(&ctx.db, &user, &name, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Takes the author role away (admins only); their items stay.
#[utoipa::path(delete, path = "/api/v1/users/{name}/author",
    params(("name" = String, Path, description = "User name")),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn revoke_author(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    super::set_author(&ctx.db, &user, &name, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a run of an item: its playground, with its overrides and its tasks.
#[utoipa::path(post, path = "/api/v1/content/{name}/runs", request_body = StartContentRun,
    params(("name" = String, Path, description = "Item name")),
    responses((status = 201, body = RunView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn start_content_run(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<StartContentRun>,
) -> ApiResult<(StatusCode, Json<RunView>)> {
    let run = super::start_run(&ctx, &user, &name, req.version, req.lesson.as_deref()).await?;
    Ok((StatusCode::CREATED, Json(run)))
}
