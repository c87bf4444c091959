//! Task recording against a fake worker that serves the NDJSON task stream: each change is
//! recorded once, re-sent snapshots after a reconnect are not duplicated, a completed task
//! never goes back, input answers are forwarded, and a control-plane restart keeps everything.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Request, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use http_body_util::BodyExt;
use ironlab_api::worker::{
    MachineStatus, ObservedState, RunPlan, RunStatus, TaskInput, TaskInputResult, TaskState,
    TaskStatus, WorkerStatus,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tower::ServiceExt;

use crate::{Control, ControlConfig};

const WORKER_TOKEN: &str = "worker-secret";

/// `Some(status)`: a change; `None`: drop every open stream (a worker restart).
type Feed = broadcast::Sender<Option<TaskStatus>>;

struct FakeState {
    runs: BTreeMap<String, RunPlan>,
    /// Every change sent so far; the snapshot is the latest per task.
    sent: Vec<TaskStatus>,
    feed: Feed,
    inputs: Vec<(String, String, String)>,
}

#[derive(Clone)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn new() -> Self {
        Fake(Arc::new(Mutex::new(FakeState {
            runs: BTreeMap::new(),
            sent: Vec::new(),
            feed: broadcast::channel(64).0,
            inputs: Vec::new(),
        })))
    }

    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.0.lock().expect("fake lock"))
    }

    fn send(&self, s: TaskStatus) {
        self.with(|st| {
            st.sent.push(s.clone());
            let _ = st.feed.send(Some(s));
        });
    }

    /// Waits until the control plane's follower holds a task stream (changes sent before would
    /// only reach it as the snapshot, their intermediate states folded away).
    async fn wait_follower(&self) {
        for _ in 0..200 {
            if self.with(|st| st.feed.receiver_count()) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the control plane never opened the task stream");
    }

    fn drop_streams(&self) {
        self.with(|st| {
            let _ = st.feed.send(None);
        });
    }
}

fn running(id: &str, plan: &RunPlan) -> RunStatus {
    RunStatus {
        run_id: id.into(),
        state: ObservedState::Running,
        machines: plan
            .machines
            .iter()
            .map(|m| MachineStatus {
                name: m.name.clone(),
                state: ObservedState::Running,
                runtime: "container".into(),
                error: None,
            })
            .collect(),
        error: None,
        storage_bytes: None,
        snapshot: None,
    }
}

fn line(s: &TaskStatus) -> Result<bytes::Bytes, std::io::Error> {
    let mut v = serde_json::to_vec(s).expect("json");
    v.push(b'\n');
    Ok(v.into())
}

async fn fake_worker(fake: Fake, listener: tokio::net::TcpListener) {
    async fn status() -> Json<WorkerStatus> {
        Json(WorkerStatus {
            version: "test".into(),
            accel: "none".into(),
            runtimes: vec!["container".into()],
            cpus: 2,
            memory_bytes: 1 << 30,
            runs: 0,
            public_url: "ws://127.0.0.1:9/".into(),
        })
    }
    async fn put_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
        Json(plan): Json<RunPlan>,
    ) -> (StatusCode, Json<RunStatus>) {
        let st = running(&id, &plan);
        fake.with(|s| s.runs.insert(id, plan));
        (StatusCode::ACCEPTED, Json(st))
    }
    async fn get_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
    ) -> Result<Json<RunStatus>, StatusCode> {
        fake.with(|s| s.runs.get(&id).map(|p| Json(running(&id, p))))
            .ok_or(StatusCode::NOT_FOUND)
    }
    async fn delete_run(State(fake): State<Fake>, Path(id): Path<String>) -> StatusCode {
        fake.with(|s| s.runs.remove(&id));
        StatusCode::NO_CONTENT
    }
    async fn watch(
        State(fake): State<Fake>,
        headers: axum::http::HeaderMap,
    ) -> axum::response::Response {
        assert_eq!(
            headers.get("authorization").and_then(|v| v.to_str().ok()),
            Some("Bearer worker-secret")
        );
        let (snapshot, rx) = fake.with(|s| {
            let mut latest: BTreeMap<String, TaskStatus> = BTreeMap::new();
            for t in &s.sent {
                latest.insert(t.name.clone(), t.clone());
            }
            (latest.into_values().collect::<Vec<_>>(), s.feed.subscribe())
        });
        let first = futures::stream::iter(snapshot.into_iter().map(|s| line(&s)));
        let rest = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(Some(s)) => Some((line(&s), rx)),
                _ => None,
            }
        });
        Body::from_stream(first.chain(rest)).into_response_ok()
    }
    async fn input(
        State(fake): State<Fake>,
        Path((id, name)): Path<(String, String)>,
        Json(req): Json<TaskInput>,
    ) -> Json<TaskInputResult> {
        fake.with(|s| s.inputs.push((id, name, req.value.clone())));
        Json(TaskInputResult {
            accepted: req.value == "42",
            hint: if req.value == "42" {
                String::new()
            } else {
                "not quite".into()
            },
        })
    }
    trait Ok200 {
        fn into_response_ok(self) -> axum::response::Response;
    }
    impl Ok200 for Body {
        fn into_response_ok(self) -> axum::response::Response {
            axum::response::Response::new(self)
        }
    }
    let app = Router::new()
        .route("/v1/status", get(status))
        .route(
            "/v1/runs/{id}",
            put(put_run).get(get_run).delete(delete_run),
        )
        .route("/v1/runs/{id}/tasks/watch", get(watch))
        .route("/v1/runs/{id}/tasks/{name}/input", post(input))
        .with_state(fake);
    let _ = axum::serve(listener, app).await;
}

async fn open_control(
    dir: &std::path::Path,
    database: &crate::db::testing::TestDatabase,
    worker: std::net::SocketAddr,
) -> Control {
    Control::open(ControlConfig {
        data_dir: dir.to_path_buf(),
        workers: vec![crate::worker_client::WorkerSpec {
            name: "local".into(),
            url: format!("http://{worker}"),
        }],
        worker_token: WORKER_TOKEN.into(),
        database: Some(database.database.clone()),
    })
    .await
    .expect("control plane opens")
}

async fn call(
    router: &Router,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {token}"));
    let req = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            req.body(Body::from(b.to_string()))
        }
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = router.clone().oneshot(req).await.expect("answer");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn status(name: &str, state: TaskState, seq: u64, hint: &str) -> TaskStatus {
    TaskStatus {
        machine: "node-01".into(),
        name: name.into(),
        state,
        hint: hint.into(),
        stdout: String::new(),
        exit_code: 0,
        attempt: 1,
        at_unix_ms: 1_700_000_000_000 + seq,
        seq,
        helper: name == "watcher",
        init: name == "setup",
        input: name == "answer",
    }
}

async fn wait_for_tasks(
    router: &Router,
    token: &str,
    id: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..100 {
        let (s, v) = call(
            router,
            token,
            "GET",
            &format!("/api/v1/runs/{id}/tasks"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if f(&v) {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the tasks of run {id} never reached the expected state");
}

fn state_of(v: &Value, task: &str) -> String {
    v["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == task))
        .and_then(|t| t["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

async fn rows(control: &Control, id: &str) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT task, state, seq FROM task_events WHERE run_id = $1 ORDER BY seq")
        .bind(id)
        .fetch_all(&control.ctx().db)
        .await
        .expect("rows")
}

#[tokio::test]
async fn task_changes_are_recorded_once_streamed_and_survive_restarts() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let worker_addr = listener.local_addr().expect("addr");
    let fake = Fake::new();
    let worker = tokio::spawn(fake_worker(fake.clone(), listener));
    let dir = tempfile::tempdir().expect("tempdir");
    let database = crate::db::testing::TestDatabase::new(dir.path()).await;
    let control = open_control(dir.path(), &database, worker_addr).await;
    let router = control.router();
    let admin = control.admin_token().to_string();
    let reconciler = control.spawn_reconciler();

    let manifest = json!({
        "kind": "playground", "name": "tasks-lab", "title": "Tasks",
        "playground": {
            "machines": [{"name": "node-01", "drives": [{"source": "debian", "mount": "/", "size": "1GiB"}]}],
            "tasks": {
                "setup": {"init": true, "run": "true"},
                "check": {"run": "test -f /x", "hintcheck": "echo create /x"},
                "answer": {"input": true, "run": "test \"$INPUT\" = 42"},
                "watcher": {"helper": true, "run": "sleep 1"}
            }
        }
    });
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        "/api/v1/playgrounds",
        Some(manifest),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        "/api/v1/runs",
        Some(json!({"playground": "tasks-lab"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_string();

    // Before any report: every shown task blocked, in checklist order, not ready.
    let v = wait_for_tasks(&router, &admin, &id, |_| true).await;
    let names: Vec<&str> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec!["setup", "answer", "check"],
        "helpers hidden, init first"
    );
    assert_eq!(v["ready"], false);
    assert_eq!(state_of(&v, "check"), "blocked");

    // An SSE client sees the checklist, then live changes.
    let req = Request::builder()
        .uri(format!("/api/v1/runs/{id}/events"))
        .header("authorization", format!("Bearer {admin}"))
        .body(Body::empty())
        .expect("request");
    let resp = router.clone().oneshot(req).await.expect("sse");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut sse = resp.into_body().into_data_stream();
    let mut seen = String::new();
    let mut read_until = async |needle: &str| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !seen.contains(needle) {
            let chunk = tokio::time::timeout_at(deadline, sse.next())
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} on the event stream; saw {seen}"))
                .expect("stream open")
                .expect("chunk");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
        seen.clone()
    };
    read_until("\"name\":\"check\"").await;

    // The run must be running before the follower starts.
    for _ in 0..100 {
        let (_, v) = call(&router, &admin, "GET", &format!("/api/v1/runs/{id}"), None).await;
        if v["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.wait_follower().await;
    fake.send(status("setup", TaskState::Running, 1, ""));
    fake.send(status("setup", TaskState::Completed, 2, ""));
    fake.send(status("watcher", TaskState::Running, 3, ""));
    fake.send(status("check", TaskState::Running, 4, "create /x"));
    let v = wait_for_tasks(&router, &admin, &id, |v| state_of(v, "check") == "running").await;
    assert_eq!(v["ready"], true, "every init task completed");
    let check = v["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == "check"))
        .expect("check");
    assert_eq!(check["hint"], "create /x");
    let text = read_until("create /x").await;
    assert!(text.contains("event: task"), "{text}");
    assert!(
        !text.contains("watcher"),
        "helpers never reach the page: {text}"
    );

    // The worker restarts: the stream drops, the snapshot is sent again, then a new change.
    fake.drop_streams();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.send(status("check", TaskState::Completed, 5, ""));
    wait_for_tasks(&router, &admin, &id, |v| {
        state_of(v, "check") == "completed"
    })
    .await;
    read_until("\"state\":\"completed\",\"hint\":\"\",\"init\":false").await;
    // A report that would move a completed task back is ignored.
    fake.send(status("check", TaskState::Running, 6, "again"));
    fake.drop_streams();
    fake.send(status("answer", TaskState::Running, 7, ""));
    wait_for_tasks(&router, &admin, &id, |v| state_of(v, "answer") == "running").await;
    assert_eq!(
        rows(&control, &id).await,
        vec![
            ("setup".to_string(), "running".to_string(), 1),
            ("setup".into(), "completed".into(), 2),
            ("check".into(), "running".into(), 4),
            ("check".into(), "completed".into(), 5),
            ("answer".into(), "running".into(), 7),
        ],
        "each change once, no helper, no regression"
    );

    // Input: unknown task 404, not an input task 400, right and wrong answers forwarded.
    let path = |t: &str| format!("/api/v1/runs/{id}/tasks/{t}/input");
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("nope"),
        Some(json!({"value": "1"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no task \"nope\""),
        "{v}"
    );
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("watcher"),
        Some(json!({"value": "1"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "helpers are not shown: {v}");
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("check"),
        Some(json!({"value": "1"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not an input task"),
        "{v}"
    );
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("answer"),
        Some(json!({"valeu": "1"})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("answer"),
        Some(json!({"value": "41"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"accepted": false, "hint": "not quite"}));
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        &path("answer"),
        Some(json!({"value": "42"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["accepted"], true);
    assert_eq!(
        fake.with(|s| s.inputs.iter().map(|i| i.2.clone()).collect::<Vec<_>>()),
        vec!["41", "42"]
    );
    // Another user's run is not theirs to answer.
    let (s, v) = call(
        &router,
        &admin,
        "POST",
        "/api/v1/users",
        Some(json!({"name": "bob"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let bob = v["token"].as_str().expect("token").to_string();
    let (s, _) = call(
        &router,
        &bob,
        "POST",
        &path("answer"),
        Some(json!({"value": "42"})),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = call(
        &router,
        &bob,
        "GET",
        &format!("/api/v1/runs/{id}/tasks"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The control plane restarts: the checklist is still there, and following resumes.
    reconciler.abort();
    let _ = reconciler.await;
    drop(router);
    control.ctx().db.close().await;
    drop(control);
    let control = open_control(dir.path(), &database, worker_addr).await;
    let router = control.router();
    let v = wait_for_tasks(&router, &admin, &id, |_| true).await;
    assert_eq!(state_of(&v, "check"), "completed");
    assert_eq!(state_of(&v, "setup"), "completed");
    let reconciler = control.spawn_reconciler();
    fake.send(status("answer", TaskState::Completed, 8, ""));
    wait_for_tasks(&router, &admin, &id, |v| {
        state_of(v, "answer") == "completed"
    })
    .await;
    assert_eq!(
        rows(&control, &id).await.len(),
        6,
        "the re-sent snapshot added nothing"
    );
    reconciler.abort();
    worker.abort();
}
