//! REST handlers of a run's tasks (registered in [`crate::http`]).

use axum::Json;
use axum::extract::State;
use ironlab_api::v1::RunTasksView;
use ironlab_api::worker::{TaskInput, TaskInputResult};

use crate::Ctx;
use crate::error::ApiResult;
use crate::http::{ApiJson, ApiPath, Auth};

/// The checklist of a run: every task (helpers excepted) with its state and current hint, in
/// checklist order; `ready` once every init task completed.
#[utoipa::path(get, path = "/api/v1/runs/{id}/tasks",
    params(("id" = String, Path, description = "Run id")),
    responses((status = 200, body = RunTasksView), (status = 401, body = ironlab_api::ErrorBody),
        (status = 404, body = ironlab_api::ErrorBody)))]
pub async fn list_tasks(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<RunTasksView>> {
    Ok(Json(super::list(&ctx, &user, &id).await?))
}

/// Answers an input task: the task's script runs once with `$INPUT` = `value`. `accepted`
/// means it passed (the task is completed); otherwise `hint` says why not.
#[utoipa::path(post, path = "/api/v1/runs/{id}/tasks/{task}/input", request_body = TaskInput,
    params(("id" = String, Path, description = "Run id"), ("task" = String, Path, description = "Task name")),
    responses((status = 200, body = TaskInputResult),
        (status = 400, description = "Not an input task, or a bad body", body = ironlab_api::ErrorBody),
        (status = 401, body = ironlab_api::ErrorBody),
        (status = 404, description = "No such run or task", body = ironlab_api::ErrorBody),
        (status = 409, description = "The run is not running, or the task is blocked or failed", body = ironlab_api::ErrorBody),
        (status = 503, body = ironlab_api::ErrorBody)))]
pub async fn task_input(
    State(ctx): State<Ctx>,
    Auth(user): Auth,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<TaskInput>,
) -> ApiResult<Json<TaskInputResult>> {
    Ok(Json(
        super::input(&ctx, &user, &id, &name, &req.value).await?,
    ))
}
