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

/// Form of `POST /runs/{id}/start-over`.
#[derive(Debug, Deserialize)]
pub struct RestartForm {
    csrf: Option<String>,
}

/// `POST /runs/{id}/start-over`: destroy this run, start a fresh one of the same playground.
pub async fn start_over(
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
    use axum::body::Body;
    use axum::http::{Request, StatusCode, header};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::{Control, ControlConfig};

    const ORIGIN: &str = "http://127.0.0.1:8080";

    #[test]
    fn labels() {
        assert_eq!(super::label("made_file"), "Made file");
        assert_eq!(super::label("x"), "X");
    }

    async fn send(
        control: &Control,
        method: &str,
        path: &str,
        cookie: &str,
        form: Option<&str>,
    ) -> (StatusCode, String, String) {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::ORIGIN, ORIGIN);
        if !cookie.is_empty() {
            b = b.header(header::COOKIE, cookie);
        }
        let req = match form {
            Some(f) => b
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(f.to_string())),
            None => b.body(Body::empty()),
        }
        .expect("request");
        let resp = control.router().oneshot(req).await.expect("answer");
        let status = resp.status();
        let headers = resp.headers().clone();
        let cookie = headers
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .to_string();
        let location = headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        (
            status,
            if location.is_empty() { text } else { location },
            cookie,
        )
    }

    /// No worker (runs stay pending): the page renders the checklist from the plan, Restart
    /// needs the CSRF token and replaces the run, answering needs a running run.
    #[tokio::test]
    async fn checklist_renders_and_restart_replaces_the_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _db = crate::db::testing::TestDatabase::new(dir.path()).await;
        let control = Control::open(ControlConfig {
            data_dir: dir.path().to_path_buf(),
            workers: vec![crate::worker_client::WorkerSpec {
                name: "local".into(),
                url: "http://127.0.0.1:9".into(),
            }],
            worker_token: "unused".into(),
            database: Some(_db.database.clone()),
        })
        .await
        .expect("opens");
        let manifest = serde_json::json!({
            "kind": "playground", "name": "page-tasks", "title": "Page tasks",
            "playground": {
                "machines": [{"name": "box", "drives": [{"source": "debian", "mount": "/", "size": "1GiB"}]}],
                "tasks": {
                    "setup": {"init": true, "run": "true"},
                    "made_file": {"run": "test -f /x", "hintcheck": "echo hint"},
                    "answer": {"input": true, "run": "test \"$INPUT\" = 42"},
                    "bg": {"helper": true, "run": "sleep 1"}
                }
            }
        });
        let req = Request::post("/api/v1/playgrounds")
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", control.admin_token()),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(manifest.to_string()))
            .expect("request");
        let resp = control.router().oneshot(req).await.expect("answer");
        assert_eq!(resp.status(), StatusCode::CREATED);

        let link = control.admin_login_link(ORIGIN).await.expect("link");
        let path = link.strip_prefix(ORIGIN).expect("path");
        let (_, _, cookie) = send(&control, "GET", path, "", None).await;
        let (_, page, _) = send(&control, "GET", "/", &cookie, None).await;
        let at = page
            .find("name=\"csrf-token\" content=\"")
            .expect("csrf meta")
            + "name=\"csrf-token\" content=\"".len();
        let csrf = page[at..at + page[at..].find('"').expect("end")].to_string();

        let (status, to, _) = send(
            &control,
            "POST",
            "/runs",
            &cookie,
            Some(&format!("csrf={csrf}&playground=page-tasks")),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let id = to.trim_start_matches("/runs/").to_string();
        let (status, page, _) = send(&control, "GET", &to, &cookie, None).await;
        assert_eq!(status, StatusCode::OK);
        for needle in [
            "id=\"tasks\"",
            "data-task=\"setup\" data-state=\"blocked\"",
            "data-task=\"made_file\"",
            ">Made file<",
            "Setting up the playground",
            "id=\"tasks-count\">0/3<",
            &format!("action=\"/runs/{id}/tasks/answer/input\""),
            &format!("action=\"/runs/{id}/start-over\""),
        ] {
            assert!(page.contains(needle), "run page lacks {needle}");
        }
        assert!(!page.contains("data-task=\"bg\""), "helpers are not shown");
        let order: Vec<usize> = ["\"setup\"", "\"answer\"", "\"made_file\""]
            .iter()
            .map(|n| page.find(&format!("data-task={n}")).expect("row"))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "checklist order");

        // Answering needs a running run (409 page), and the CSRF token.
        let (status, _, _) = send(
            &control,
            "POST",
            &format!("/runs/{id}/tasks/answer/input"),
            &cookie,
            Some(&format!("csrf={csrf}&value=42")),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, _, _) = send(
            &control,
            "POST",
            &format!("/runs/{id}/start-over"),
            &cookie,
            Some("csrf=wrong"),
        )
        .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, to2, _) = send(
            &control,
            "POST",
            &format!("/runs/{id}/start-over"),
            &cookie,
            Some(&format!("csrf={csrf}")),
        )
        .await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert!(to2.starts_with("/runs/") && to2 != to, "{to2}");
        let old = crate::runs::load(&control.ctx().db, &id)
            .await
            .expect("load")
            .expect("kept");
        assert_eq!(old.state.as_str(), "destroyed");
        let new = crate::runs::load(&control.ctx().db, to2.trim_start_matches("/runs/"))
            .await
            .expect("load")
            .expect("new");
        assert_eq!(
            (new.playground.as_str(), new.title.as_str()),
            ("page-tasks", "Page tasks")
        );
    }
}
