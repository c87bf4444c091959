//! The run page's checklist: what the template gets, and the two form actions that work
//! without scripts (the `tasks.ts` island does the same through `/api/v1`).
//!
//! Restart (shown when a task failed for good, "you broke it"): destroys this run and starts a
//! fresh run of the same playground with the same title, then opens its page. Nothing of the
//! broken run is kept; its record and task history stay in the dashboard.

use axum::Form;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use ironlab_api::v1::{RunTasksView, StartRun, TaskState};
use serde::{Deserialize, Serialize};

use super::pages::PageSession;
use super::{PageResult, expiry, session};
use crate::Ctx;
use crate::runs::{self, Run};

/// One checklist row of the run page.
#[derive(Debug, Serialize)]
pub struct TaskRow {
    name: String,
    label: String,
    machine: String,
    state: &'static str,
    hint: String,
    init: bool,
    input: bool,
}

/// The checklist the run page renders (empty when the run has no tasks).
#[derive(Debug, Serialize, Default)]
pub struct Checklist {
    tasks: Vec<TaskRow>,
    ready: bool,
    broken: bool,
    done: usize,
}

/// `made_file` → `Made file`.
fn label(name: &str) -> String {
    let spaced = name.replace('_', " ");
    let mut c = spaced.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Builds the checklist of `run` from the recorded task states.
pub async fn checklist(ctx: &Ctx, run: &Run) -> Checklist {
    let v: RunTasksView = match crate::tasks::view(&ctx.db, run).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(run = %run.id, error = %e, "cannot read the checklist");
            return Checklist::default();
        }
    };
    Checklist {
        ready: v.ready,
        broken: v.tasks.iter().any(|t| t.state == TaskState::Failed),
        done: v
            .tasks
            .iter()
            .filter(|t| t.state == TaskState::Completed)
            .count(),
        tasks: v
            .tasks
            .into_iter()
            .map(|t| TaskRow {
                label: label(&t.name),
                name: t.name,
                machine: t.machine,
                state: t.state.as_str(),
                hint: t.hint,
                init: t.init,
                input: t.input,
            })
            .collect(),
    }
}

/// Form of `POST /runs/{id}/restart`.
#[derive(Debug, Deserialize)]
pub struct RestartForm {
    csrf: Option<String>,
}

/// `POST /runs/{id}/restart`: destroy this run, start a fresh one of the same playground.
pub async fn restart_run(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<RestartForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    let old = runs::get_for(&ctx.db, &s.user, &id).await?;
    runs::destroy(&ctx, &s.user, &id).await?;
    let run = runs::create(
        &ctx,
        &s.user,
        StartRun {
            playground: old.playground.clone(),
            title: Some(old.title.clone()),
        },
    )
    .await?;
    expiry::set_default_expiry(&ctx.db, &run.id).await?;
    tracing::info!(old = %id, new = %run.id, "run restarted from its page");
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

/// Form of `POST /runs/{id}/tasks/{task}/input`.
#[derive(Debug, Deserialize)]
pub struct AnswerForm {
    csrf: Option<String>,
    value: String,
}

/// `POST /runs/{id}/tasks/{task}/input` (the checklist's answer box without scripts): the
/// answer is checked, and the page shows the outcome through the task's state and hint.
pub async fn answer(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path((id, task)): Path<(String, String)>,
    Form(form): Form<AnswerForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    crate::tasks::input(&ctx, &s.user, &id, &task, &form.value).await?;
    Ok(Redirect::to(&format!("/runs/{id}#task-{task}")).into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn labels() {
        assert_eq!(super::label("made_file"), "Made file");
        assert_eq!(super::label("x"), "X");
    }
}
