//! REST and reconcile tests: the real router (`oneshot`, no server) on a temporary SQLite
//! database, against a fake worker (a small axum app on 127.0.0.1 that keeps runs in memory).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{Request, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http_body_util::BodyExt;
use ironlab_api::worker::{
    CloneRun, MachineStatus, ObservedState, RunPlan, RunStatus, SaveRun, SavedDrives, TokenGrant,
    WorkerStatus,
};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{Control, ControlConfig};

/// How the fake worker behaves when a run is PUT.
#[derive(Clone, Debug)]
enum Mode {
    /// Runs are `running` at once.
    Ready,
    /// Runs fail with this reason.
    Fail(String),
    /// Runs stay `starting`.
    Stall,
    /// The worker forgets every run right after accepting it.
    Forget,
}

#[derive(Default)]
struct FakeState {
    runs: HashMap<String, (RunPlan, ObservedState, Option<String>)>,
    puts: Vec<String>,
    deletes: Vec<String>,
    tokens: Vec<TokenGrant>,
    mode: Option<Mode>,
    /// Saved drives: id → run.
    saves: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<FakeState>>);

impl Fake {
    fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        let mut g = self.0.lock().expect("fake worker lock");
        f(&mut g)
    }
}

const WORKER_TOKEN: &str = "worker-secret";

fn status_of(id: &str, plan: &RunPlan, state: ObservedState, error: Option<String>) -> RunStatus {
    RunStatus {
        run_id: id.to_string(),
        state,
        machines: plan
            .machines
            .iter()
            .map(|m| MachineStatus {
                name: m.name.clone(),
                state,
                runtime: m.runtime.clone(),
                error: None,
            })
            .collect(),
        error,
        storage_bytes: (state == ObservedState::Stopped).then_some(3 << 20),
        snapshot: None,
    }
}

fn authorized(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {WORKER_TOKEN}"))
}

async fn fake_worker(fake: Fake, listener: tokio::net::TcpListener) {
    async fn status(headers: axum::http::HeaderMap) -> Result<Json<WorkerStatus>, StatusCode> {
        if !authorized(&headers) {
            return Err(StatusCode::UNAUTHORIZED);
        }
        Ok(Json(WorkerStatus {
            version: "test".into(),
            accel: "none".into(),
            runtimes: vec!["container".into()],
            cpus: 2,
            memory_bytes: 1 << 30,
            runs: 0,
            public_url: "ws://127.0.0.1:9/".into(),
        }))
    }
    async fn put_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
        headers: axum::http::HeaderMap,
        Json(plan): Json<RunPlan>,
    ) -> Result<(StatusCode, Json<RunStatus>), StatusCode> {
        if !authorized(&headers) {
            return Err(StatusCode::UNAUTHORIZED);
        }
        Ok(fake.with(|s| {
            s.puts.push(id.clone());
            let (state, err) = match s.mode.clone().unwrap_or(Mode::Ready) {
                Mode::Ready => (ObservedState::Running, None),
                Mode::Fail(r) => (ObservedState::Failed, Some(r)),
                Mode::Stall | Mode::Forget => (ObservedState::Starting, None),
            };
            let st = status_of(&id, &plan, ObservedState::Starting, None);
            if !matches!(s.mode, Some(Mode::Forget)) {
                s.runs.insert(id, (plan, state, err));
            }
            (StatusCode::ACCEPTED, Json(st))
        }))
    }
    #[derive(serde::Deserialize)]
    struct W {
        wait: Option<u64>,
    }
    async fn get_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
        Query(w): Query<W>,
    ) -> Result<Json<RunStatus>, StatusCode> {
        let found = fake.with(|s| {
            s.runs
                .get(&id)
                .map(|(p, st, e)| status_of(&id, p, *st, e.clone()))
        });
        match found {
            Some(st) => {
                if st.state == ObservedState::Starting && w.wait.is_some() {
                    // A short long-poll keeps tests quick.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Json(st))
            }
            None => Err(StatusCode::NOT_FOUND),
        }
    }
    async fn delete_run(State(fake): State<Fake>, Path(id): Path<String>) -> StatusCode {
        fake.with(|s| {
            s.deletes.push(id.clone());
            if s.runs.remove(&id).is_some() {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::NOT_FOUND
            }
        })
    }
    async fn tokens(State(fake): State<Fake>, Json(g): Json<TokenGrant>) -> StatusCode {
        fake.with(|s| s.tokens.push(g));
        StatusCode::NO_CONTENT
    }
    async fn stop_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
    ) -> Result<(StatusCode, Json<RunStatus>), StatusCode> {
        fake.with(|s| match s.runs.get_mut(&id) {
            Some(r) => {
                r.1 = ObservedState::Stopped;
                Ok((StatusCode::ACCEPTED, Json(status_of(&id, &r.0, r.1, None))))
            }
            None => Err(StatusCode::NOT_FOUND),
        })
    }
    async fn restart_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
    ) -> Result<(StatusCode, Json<RunStatus>), StatusCode> {
        fake.with(|s| match s.runs.get_mut(&id) {
            Some(r) => {
                let st = status_of(&id, &r.0, ObservedState::Starting, None);
                r.1 = ObservedState::Running;
                Ok((StatusCode::ACCEPTED, Json(st)))
            }
            None => Err(StatusCode::NOT_FOUND),
        })
    }
    async fn clone_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
        Json(req): Json<CloneRun>,
    ) -> Result<(StatusCode, Json<RunStatus>), StatusCode> {
        fake.with(|s| {
            let (plan, state, _) = s.runs.get(&id).cloned().ok_or(StatusCode::NOT_FOUND)?;
            if state != ObservedState::Stopped {
                return Err(StatusCode::CONFLICT);
            }
            let mut plan = plan;
            plan.run_id = req.new_run_id.clone();
            let st = status_of(&req.new_run_id, &plan, ObservedState::Stopped, None);
            s.runs
                .insert(req.new_run_id, (plan, ObservedState::Stopped, None));
            Ok((StatusCode::CREATED, Json(st)))
        })
    }
    async fn save_run(
        State(fake): State<Fake>,
        Path(id): Path<String>,
        Json(req): Json<SaveRun>,
    ) -> Result<(StatusCode, Json<SavedDrives>), StatusCode> {
        fake.with(|s| {
            let (plan, state, _) = s.runs.get(&id).cloned().ok_or(StatusCode::NOT_FOUND)?;
            if state != ObservedState::Stopped {
                return Err(StatusCode::CONFLICT);
            }
            s.saves.insert(req.saved_id.clone(), id.clone());
            Ok((
                StatusCode::CREATED,
                Json(SavedDrives {
                    id: req.saved_id,
                    run_id: id,
                    machines: plan.machines.iter().map(|m| m.name.clone()).collect(),
                    allocated_bytes: 5 << 20,
                }),
            ))
        })
    }
    async fn list_saved(State(fake): State<Fake>) -> Json<Vec<SavedDrives>> {
        Json(fake.with(|s| {
            s.saves
                .iter()
                .map(|(id, run)| SavedDrives {
                    id: id.clone(),
                    run_id: run.clone(),
                    machines: vec![],
                    allocated_bytes: 0,
                })
                .collect()
        }))
    }
    async fn delete_saved(State(fake): State<Fake>, Path(id): Path<String>) -> StatusCode {
        fake.with(|s| s.saves.remove(&id));
        StatusCode::NO_CONTENT
    }
    let app = Router::new()
        .route("/v1/runs/{id}/stop", post(stop_run))
        .route("/v1/runs/{id}/restart", post(restart_run))
        .route("/v1/runs/{id}/clone", post(clone_run))
        .route("/v1/runs/{id}/save", post(save_run))
        .route("/v1/saved", get(list_saved))
        .route("/v1/saved/{id}", axum::routing::delete(delete_saved))
        .route("/v1/status", get(status))
        .route(
            "/v1/runs/{id}",
            put(put_run).get(get_run).delete(delete_run),
        )
        .route("/v1/tokens", post(tokens))
        .with_state(fake);
    let _ = axum::serve(listener, app).await;
}

struct Harness {
    dir: tempfile::TempDir,
    database: crate::db::testing::TestDatabase,
    worker_addr: SocketAddr,
    fake: Fake,
    worker_task: Option<tokio::task::JoinHandle<()>>,
    control: Control,
    router: Router,
    reconciler: Option<tokio::task::JoinHandle<()>>,
    admin: String,
}

impl Drop for Harness {
    fn drop(&mut self) {
        for t in [self.worker_task.take(), self.reconciler.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

async fn open_control(
    dir: &std::path::Path,
    database: &crate::db::testing::TestDatabase,
    worker: SocketAddr,
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

impl Harness {
    async fn new() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let worker_addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        let worker_task = Some(tokio::spawn(fake_worker(fake.clone(), listener)));
        let dir = tempfile::tempdir().expect("tempdir");
        let database = crate::db::testing::TestDatabase::new(dir.path()).await;
        let control = open_control(dir.path(), &database, worker_addr).await;
        let router = control.router();
        let admin = control.admin_token().to_string();
        Harness {
            dir,
            database,
            worker_addr,
            fake,
            worker_task,
            control,
            router,
            reconciler: None,
            admin,
        }
    }

    fn reconcile(&mut self) {
        self.reconciler = Some(self.control.spawn_reconciler());
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = self
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("router answers");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                panic!(
                    "{method} {path}: body is not JSON: {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, value)
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call(method, path, Some(&self.admin.clone()), body)
            .await
    }

    async fn new_user(&self, name: &str) -> String {
        let (s, v) = self
            .admin("POST", "/api/v1/users", Some(json!({"name": name})))
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["token"].as_str().expect("token").to_string()
    }

    /// Starts `playground` as the admin and waits until the run is running; returns its id.
    async fn start_running(&self, playground: &str) -> String {
        let (s, v) = self
            .admin(
                "POST",
                "/api/v1/runs",
                Some(json!({"playground": playground})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        let id = v["id"].as_str().expect("id").to_string();
        let admin = self.admin.clone();
        assert_eq!(self.settle(&admin, &id).await["state"], "running", "{id}");
        id
    }

    /// Waits (long-poll) until the run is settled; returns its view.
    async fn settle(&self, token: &str, id: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..20 {
            let (s, v) = self
                .call(
                    "GET",
                    &format!("/api/v1/runs/{id}?wait=5"),
                    Some(token),
                    None,
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if !matches!(
                v["state"].as_str(),
                Some("pending" | "starting" | "destroying" | "stopping" | "restarting")
            ) {
                return v;
            }
            last = v;
        }
        panic!("run {id} never settled: {last}");
    }
}

fn custom_manifest(name: &str) -> Value {
    json!({
        "kind": "playground",
        "name": name,
        "title": "Custom lab",
        "playground": {
            "machines": [
                {"name": "node-01", "drives": [{"source": "oci://127.0.0.1:5000/test/img:1", "mount": "/", "size": "1GiB"}],
                 "resources": {"cpu": 1, "memory": "128MiB"}},
                {"name": "node-02", "drives": [{"source": "debian", "mount": "/", "size": "2GiB"}]}
            ]
        }
    })
}

#[tokio::test]
async fn bad_manifest_is_400_naming_every_field() {
    let h = Harness::new().await;
    let mut m = custom_manifest("bad-one");
    m["playground"]["machines"][1]["drives"][0]["size"] = json!("12XB");
    let (s, v) = h.admin("POST", "/api/v1/playgrounds", Some(m)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"], "bad_request");
    let detail = v["detail"].as_str().expect("detail");
    assert!(
        detail.contains("playground.machines[1].drives[0].size: \"12XB\" is not a size"),
        "{detail}"
    );
    // Several semantic problems are all listed, one per line.
    let mut m = custom_manifest("x");
    m["playground"]["machines"][0]["name"] = json!("Bad Name");
    let (s, v) = h.admin("POST", "/api/v1/playgrounds", Some(m)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let detail = v["detail"].as_str().expect("detail");
    assert!(detail.lines().count() >= 2, "{detail}");
    assert!(detail.contains("name"), "{detail}");
    // Unknown fields are named with their path.
    let mut m = custom_manifest("unknown-field");
    m["playground"]["machines"][0]["colour"] = json!("red");
    let (s, v) = h.admin("POST", "/api/v1/playgrounds", Some(m)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"].as_str().expect("detail").contains("colour"),
        "{v}"
    );
}

#[tokio::test]
async fn yaml_manifests_are_accepted() {
    let h = Harness::new().await;
    let yaml = "kind: playground\nname: yaml-lab\ntitle: From YAML\nplayground:\n  machines:\n    - name: m\n      drives: [{source: debian, mount: /, size: 4GiB}]\n";
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/playgrounds")
        .header("authorization", format!("Bearer {}", h.admin))
        .header("content-type", "application/yaml")
        .body(Body::from(yaml))
        .expect("request");
    let resp = h.router.clone().oneshot(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::CREATED);
    let (s, v) = h.admin("GET", "/api/v1/playgrounds/yaml-lab", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["title"], "From YAML");
    assert_eq!(v["machines"], json!(["m"]));
}

#[tokio::test]
async fn auth_errors() {
    let h = Harness::new().await;
    for token in [None, Some("ilt_wrong"), Some("garbage")] {
        let (s, v) = h.call("GET", "/api/v1/me", token, None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(v["error"], "unauthorized");
        assert!(
            v["detail"]
                .as_str()
                .expect("detail")
                .contains("ironlab auth login --server URL --token TOKEN")
        );
    }
    let (s, v) = h.admin("GET", "/api/v1/me", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["name"].as_str(), v["role"].as_str()),
        (Some("admin"), Some("admin"))
    );
    // Only admins create users.
    let alice = h.new_user("alice").await;
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/users",
            Some(&alice),
            Some(json!({"name": "mallory"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, v) = h.call("GET", "/api/v1/me", Some(&alice), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["role"], "user");
    let (s, _) = h
        .admin("POST", "/api/v1/users", Some(json!({"name": "alice"})))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
}

#[tokio::test]
async fn not_found_and_bad_requests_are_json() {
    let h = Harness::new().await;
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "no-such"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(
        v["detail"]
            .as_str()
            .expect("detail")
            .contains("playground no-such not found")
    );
    let (s, v) = h.admin("GET", "/api/v1/runs/nosuchrun123", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
    let (s, _) = h.admin("DELETE", "/api/v1/runs/nosuchrun123", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = h.admin("GET", "/api/v1/nothing-here", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
    // Bad JSON bodies: 400 with serde's message, as JSON.
    let (s, v) = h
        .admin("POST", "/api/v1/runs", Some(json!({"playgrond": "debian"})))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"]
            .as_str()
            .expect("detail")
            .contains("unknown field `playgrond`"),
        "{v}"
    );
    let (s, v) = h.admin("PUT", "/api/v1/runs", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(v["error"], "method_not_allowed");
}

#[tokio::test]
async fn catalog_stock_and_custom_playgrounds() {
    let h = Harness::new().await;
    let alice = h.new_user("alice").await;
    let bob = h.new_user("bob").await;
    let (s, v) = h
        .call("GET", "/api/v1/playgrounds", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let debian = &v[0];
    assert_eq!(debian["name"], "debian");
    assert_eq!(debian["title"], "Debian 12");
    assert_eq!(debian["stock"], true);
    assert_eq!(debian["machines"], json!(["debian"]));
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/playgrounds",
            Some(&alice),
            Some(custom_manifest("alice-lab")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["machines"], json!(["node-01", "node-02"]));
    let (s, _) = h
        .call(
            "POST",
            "/api/v1/playgrounds",
            Some(&bob),
            Some(custom_manifest("alice-lab")),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = h
        .call(
            "POST",
            "/api/v1/playgrounds",
            Some(&bob),
            Some(custom_manifest("debian")),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    // Bob neither sees nor removes Alice's playground; nobody removes a stock one.
    let (_, v) = h.call("GET", "/api/v1/playgrounds", Some(&bob), None).await;
    let names: Vec<&str> = v
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        names,
        vec!["debian", "debian-pair", "docker"],
        "bob sees the stock playgrounds only"
    );
    let (s, _) = h
        .call("DELETE", "/api/v1/playgrounds/alice-lab", Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = h.admin("DELETE", "/api/v1/playgrounds/debian", None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = h
        .call(
            "DELETE",
            "/api/v1/playgrounds/alice-lab",
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h
        .call("GET", "/api/v1/playgrounds/alice-lab", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn start_connect_destroy_against_the_worker() {
    let mut h = Harness::new().await;
    h.reconcile();
    let alice = h.new_user("alice").await;
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            Some(&alice),
            Some(json!({"playground": "debian", "title": "My run"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["state"], "pending");
    assert_eq!(v["title"], "My run");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 12);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );

    let v = h.settle(&alice, &id).await;
    assert_eq!(v["state"], "running", "{v}");
    let plan = h
        .fake
        .with(|s| s.runs.get(&id).map(|r| r.0.clone()))
        .expect("worker got the plan");
    assert_eq!(plan.machines[0].name, "debian");
    assert_eq!(plan.machines[0].default_user, "laborant");
    assert_eq!(plan.machines[0].root_size_bytes, 4 << 30);

    // Another user cannot see, connect to, or destroy it.
    let bob = h.new_user("bob").await;
    for (m, p) in [
        ("GET", format!("/api/v1/runs/{id}")),
        ("DELETE", format!("/api/v1/runs/{id}")),
        ("POST", format!("/api/v1/runs/{id}/connect")),
    ] {
        let (s, _) = h.call(m, &p, Some(&bob), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{m} {p}");
    }
    let (_, v) = h.call("GET", "/api/v1/runs", Some(&bob), None).await;
    assert_eq!(v, json!([]));
    let (_, v) = h.call("GET", "/api/v1/runs", Some(&alice), None).await;
    assert_eq!(v[0]["id"], id.as_str());
    let (s, _) = h
        .call("GET", "/api/v1/runs?all=true", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (_, v) = h.admin("GET", "/api/v1/runs?all=true", None).await;
    assert_eq!(v.as_array().map(Vec::len), Some(1));

    // PATCH title.
    let (s, v) = h
        .call(
            "PATCH",
            &format!("/api/v1/runs/{id}"),
            Some(&alice),
            Some(json!({"title": "Renamed"})),
        )
        .await;
    assert_eq!((s, v["title"].as_str()), (StatusCode::OK, Some("Renamed")));

    // Connect: a token registered at the worker, URL on the worker's public URL.
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/connect"),
            Some(&alice),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["token"].as_str().expect("token");
    assert_eq!(token.len(), 32);
    assert_eq!(
        v["url"].as_str(),
        Some(
            format!("ws://127.0.0.1:9/v1/runs/{id}/machines/debian/terminal?token={token}")
                .as_str()
        )
    );
    let grant = h.fake.with(|s| s.tokens.last().cloned()).expect("grant");
    assert_eq!(
        (
            grant.run.as_str(),
            grant.machine.as_str(),
            grant.token.as_str()
        ),
        (id.as_str(), "debian", token)
    );
    let ttl = grant.expires_at - chrono::Utc::now();
    assert!(ttl <= chrono::Duration::seconds(30) && ttl > chrono::Duration::seconds(20));
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/connect"),
            Some(&alice),
            Some(json!({"machine": "nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(grant.scope, ironlab_api::worker::TokenScope::Terminal);

    // With a port: a port-scoped token and the worker's port URL.
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/connect"),
            Some(&alice),
            Some(json!({"machine": "debian", "port": 8080})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let token = v["token"].as_str().expect("token");
    assert_eq!(
        v["url"].as_str(),
        Some(
            format!("ws://127.0.0.1:9/v1/runs/{id}/machines/debian/port/8080?token={token}")
                .as_str()
        )
    );
    assert_eq!(v["port"], 8080);
    let grant = h.fake.with(|s| s.tokens.last().cloned()).expect("grant");
    assert_eq!(
        grant.scope,
        ironlab_api::worker::TokenScope::Port { port: 8080 }
    );
    for (body, why) in [
        (json!({"port": 0}), "port: 0 is not a TCP port"),
        (json!({"port": 70000}), "not a valid connect request"),
        (json!({"port": "http"}), "not a valid connect request"),
    ] {
        let (s, v) = h
            .call(
                "POST",
                &format!("/api/v1/runs/{id}/connect"),
                Some(&alice),
                Some(body.clone()),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains(why),
            "{body}: {v}"
        );
    }
    let (s, _) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/connect"),
            Some(&bob),
            Some(json!({"port": 8080})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "another user cannot open a port");

    // Destroy.
    let (s, v) = h
        .call("DELETE", &format!("/api/v1/runs/{id}"), Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["state"], "destroying");
    let v = h.settle(&alice, &id).await;
    assert_eq!(v["state"], "destroyed");
    assert!(
        h.fake.with(|s| s.runs.is_empty()),
        "the worker no longer holds the run"
    );
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/connect"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(v["detail"].as_str().expect("detail").contains("destroyed"));
    let (s, _) = h
        .call("DELETE", &format!("/api/v1/runs/{id}"), Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "destroying twice is fine");

    let history: Vec<&str> = crate::runs::events(&h.control.ctx().db, &id)
        .await
        .expect("events")
        .into_iter()
        .map(|(s, _, _)| s.as_str())
        .collect();
    assert_eq!(
        history,
        ["pending", "starting", "running", "destroying", "destroyed"]
    );
}

#[tokio::test]
async fn failures_reported_by_the_worker_end_the_run() {
    let mut h = Harness::new().await;
    h.fake
        .with(|s| s.mode = Some(Mode::Fail("image oci://x not found".into())));
    h.reconcile();
    let (_, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    let v = h.settle(&h.admin.clone(), &id).await;
    assert_eq!(v["state"], "failed");
    assert_eq!(v["reason"], "image oci://x not found");
    assert!(
        h.fake.with(|s| s.deletes.contains(&id)),
        "a failed run is removed from the worker"
    );
}

#[tokio::test]
async fn a_worker_that_keeps_losing_the_run_fails_it_after_three_attempts() {
    let mut h = Harness::new().await;
    h.fake.with(|s| s.mode = Some(Mode::Forget));
    h.reconcile();
    let (_, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    let v = h.settle(&h.admin.clone(), &id).await;
    assert_eq!(v["state"], "failed");
    assert_eq!(v["reason"], "worker lost the run 3 times");
    assert_eq!(
        h.fake.with(|s| s.puts.iter().filter(|p| **p == id).count()),
        3
    );
}

#[tokio::test]
async fn a_running_run_the_worker_lost_fails() {
    let mut h = Harness::new().await;
    h.reconcile();
    let (_, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(h.settle(&h.admin.clone(), &id).await["state"], "running");
    h.fake.with(|s| s.runs.clear());
    let mut last = Value::Null;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        last = h.admin("GET", &format!("/api/v1/runs/{id}"), None).await.1;
        if last["state"] == "failed" {
            break;
        }
    }
    assert_eq!(last["state"], "failed");
    assert_eq!(last["reason"], "the worker lost this run");
}

#[tokio::test]
async fn destroying_a_run_that_never_reached_a_worker_is_immediate() {
    let h = Harness::new().await; // no reconciler: the run stays pending
    let (_, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    let (s, v) = h.admin("DELETE", &format!("/api/v1/runs/{id}"), None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(v["state"], "destroyed");
    let (s, v) = h
        .admin("POST", &format!("/api/v1/runs/{id}/connect"), None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
}

#[tokio::test]
async fn an_unreachable_worker_is_retried_until_it_answers() {
    // Reserve a port with nothing listening on it.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = probe.local_addr().expect("addr");
    drop(probe);
    let dir = tempfile::tempdir().expect("tempdir");
    let database = crate::db::testing::TestDatabase::new(dir.path()).await;
    let control = open_control(dir.path(), &database, addr).await;
    let router = control.router();
    let reconciler = control.spawn_reconciler();
    let admin = control.admin_token().to_string();
    let call = |m: &'static str, p: String, body: Option<Value>| {
        let router = router.clone();
        let admin = admin.clone();
        async move {
            let req = Request::builder()
                .method(m)
                .uri(p)
                .header("authorization", format!("Bearer {admin}"))
                .header("content-type", "application/json")
                .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
                .expect("request");
            let resp = router.oneshot(req).await.expect("answer");
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            serde_json::from_slice::<Value>(&bytes).expect("json")
        }
    };
    let v = call(
        "POST",
        "/api/v1/runs".into(),
        Some(json!({"playground": "debian"})),
    )
    .await;
    let id = v["id"].as_str().expect("id").to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = call("GET", format!("/api/v1/runs/{id}"), None).await;
    assert_eq!(
        v["state"], "pending",
        "stays pending while the worker is down"
    );
    // The worker comes up on that address: the run converges.
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    let fake = Fake::default();
    let worker = tokio::spawn(fake_worker(fake.clone(), listener));
    let mut state = Value::Null;
    for _ in 0..10 {
        let v = call("GET", format!("/api/v1/runs/{id}?wait=5"), None).await;
        state = v["state"].clone();
        if state == "running" {
            break;
        }
    }
    assert_eq!(state, "running");
    reconciler.abort();
    worker.abort();
}

#[tokio::test]
async fn active_runs_are_limited_per_user() {
    let h = Harness::new().await;
    let alice = h.new_user("alice").await;
    for _ in 0..crate::runs::MAX_ACTIVE_RUNS_PER_USER {
        let (s, _) = h
            .call(
                "POST",
                "/api/v1/runs",
                Some(&alice),
                Some(json!({"playground": "debian"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            Some(&alice),
            Some(json!({"playground": "debian"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        v["detail"].as_str().expect("detail").contains("limit is 5"),
        "{v}"
    );
    // Others are not affected.
    let (s, _) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
}

#[tokio::test]
async fn microvm_playgrounds_are_refused_on_this_worker() {
    let h = Harness::new().await;
    let mut m = custom_manifest("vm-lab");
    m["playground"]["machines"][0]["runtime"] = json!("microvm");
    let (s, v) = h.admin("POST", "/api/v1/playgrounds", Some(m)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "vm-lab"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"]
            .as_str()
            .expect("detail")
            .contains("runtime microvm is not available on this platform yet")
    );
}

#[tokio::test]
async fn restart_keeps_users_playgrounds_and_runs() {
    let mut h = Harness::new().await;
    h.fake.with(|s| s.mode = Some(Mode::Stall));
    h.reconcile();
    let alice = h.new_user("alice").await;
    let (s, _) = h
        .call(
            "POST",
            "/api/v1/playgrounds",
            Some(&alice),
            Some(custom_manifest("kept-lab")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            Some(&alice),
            Some(json!({"playground": "kept-lab"})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    // Wait until the worker has it and the control plane recorded that (starting), then
    // "crash" the control plane. (The worker having it is not enough: a control plane killed
    // between the worker's answer and its own update dispatches again after the restart.)
    for _ in 0..100 {
        let (_, v) = h
            .call("GET", &format!("/api/v1/runs/{id}"), Some(&alice), None)
            .await;
        if h.fake.with(|s| s.runs.contains_key(&id)) && v["state"] == "starting" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin_before = h.admin.clone();
    if let Some(r) = h.reconciler.take() {
        r.abort();
    }
    let dir = h.dir.path().to_path_buf();
    // The worker finishes starting while the control plane is down.
    h.fake.with(|s| {
        if let Some(r) = s.runs.get_mut(&id) {
            r.1 = ObservedState::Running;
        }
    });
    let control = open_control(&dir, &h.database, h.worker_addr).await;
    assert_eq!(control.admin_token(), admin_before, "admin token is kept");
    h.router = control.router();
    h.reconciler = Some(control.spawn_reconciler());
    h.control = control;
    let (s, v) = h.call("GET", "/api/v1/me", Some(&alice), None).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("alice")));
    let (s, _) = h
        .call("GET", "/api/v1/playgrounds/kept-lab", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let v = h.settle(&alice, &id).await;
    assert_eq!(
        v["state"], "running",
        "the restarted control plane converges"
    );
    let (_, v) = h.admin("GET", "/api/v1/playgrounds", None).await;
    assert_eq!(
        v.as_array()
            .map(|a| a.iter().filter(|p| p["name"] == "debian").count()),
        Some(1),
        "stock playgrounds are registered once"
    );
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let h = Harness::new().await;
    let (s, doc) = h.call("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    // Every route the router serves (method, path), written out by hand.
    let served = [
        ("get", "/api/v1/openapi.json"),
        ("get", "/api/v1/health"),
        ("get", "/api/v1/me"),
        ("post", "/api/v1/users"),
        ("get", "/api/v1/workers"),
        ("get", "/api/v1/playgrounds"),
        ("post", "/api/v1/playgrounds"),
        ("get", "/api/v1/playgrounds/{name}"),
        ("delete", "/api/v1/playgrounds/{name}"),
        ("get", "/api/v1/runs"),
        ("post", "/api/v1/runs"),
        ("get", "/api/v1/runs/{id}"),
        ("patch", "/api/v1/runs/{id}"),
        ("delete", "/api/v1/runs/{id}"),
        ("post", "/api/v1/runs/{id}/connect"),
        ("get", "/api/v1/runs/{id}/machines/{machine}/logs"),
        ("get", "/api/v1/runs/{id}/events"),
        ("get", "/api/v1/runs/{id}/tasks"),
        ("post", "/api/v1/runs/{id}/tasks/{task}/input"),
        ("post", "/api/v1/runs/{id}/stop"),
        ("post", "/api/v1/runs/{id}/restart"),
        ("post", "/api/v1/runs/{id}/clone"),
        ("post", "/api/v1/runs/{id}/save"),
        ("get", "/api/v1/storage"),
        ("put", "/api/v1/users/{name}/storage-quota"),
        ("post", "/api/v1/runs/{id}/http-ports"),
        ("get", "/api/v1/content"),
        ("post", "/api/v1/content"),
        ("get", "/api/v1/content/{name}"),
        ("delete", "/api/v1/content/{name}"),
        ("get", "/api/v1/content/{name}/bundle"),
        ("post", "/api/v1/content/{name}/runs"),
        ("put", "/api/v1/users/{name}/author"),
        ("delete", "/api/v1/users/{name}/author"),
    ];
    let paths = doc["paths"].as_object().expect("paths");
    let documented: usize = paths
        .values()
        .map(|p| p.as_object().map_or(0, |o| o.len()))
        .sum();
    assert_eq!(
        documented,
        served.len(),
        "the document lists exactly the served routes"
    );
    for (method, path) in served {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not documented"
        );
        // And the router really serves it (anything but the unknown-route/method answers).
        let concrete = path
            .replace("{name}", "debian")
            .replace("{id}", "nosuchrun123")
            .replace("{task}", "check")
            .replace("{machine}", "m1");
        let (s, v) = h.admin(&method.to_uppercase(), &concrete, None).await;
        assert_ne!(s, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        assert!(
            !(s == StatusCode::NOT_FOUND
                && v["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("no such API route"))),
            "{method} {path} is not served"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// The document checked into the repository (`crates/ironlab-control/openapi.json`) is the one
/// the code serves. Regenerate with `IRONLAB_UPDATE_OPENAPI=1 cargo test -p ironlab-control openapi`.
#[test]
fn checked_in_openapi_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let current = crate::http::openapi_document()
        .to_pretty_json()
        .expect("serializes")
        + "\n";
    if std::env::var_os("IRONLAB_UPDATE_OPENAPI").is_some() {
        fs_err::write(&path, &current).expect("write openapi.json");
        return;
    }
    let stored = fs_err::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == current,
        "{} is out of date; run IRONLAB_UPDATE_OPENAPI=1 cargo test -p ironlab-control openapi",
        path.display()
    );
}

#[tokio::test]
async fn stop_restart_clone_save_and_the_storage_quota() {
    let mut h = Harness::new().await;
    h.reconcile();
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/playgrounds",
            Some(custom_manifest("base-lab")),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let alice = h.new_user("alice").await;
    let a = Some(alice.as_str());
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            a,
            Some(json!({"playground": "debian"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(h.settle(&alice, &id).await["state"], "running");

    // Clone and save need a stopped run; restarting a running run is a no-op.
    let (s, v) = h
        .call("POST", &format!("/api/v1/runs/{id}/restart"), a, None)
        .await;
    assert_eq!(
        (s, v["state"].as_str()),
        (StatusCode::ACCEPTED, Some("running")),
        "{v}"
    );
    for (op, body) in [("clone", None), ("save", Some(json!({"name": "mine"})))] {
        let (s, v) = h
            .call("POST", &format!("/api/v1/runs/{id}/{op}"), a, body)
            .await;
        assert_eq!(s, StatusCode::CONFLICT, "{op}: {v}");
        assert!(
            v["detail"].as_str().unwrap_or("").contains("running"),
            "{v}"
        );
    }
    let (s, v) = h
        .call("POST", &format!("/api/v1/runs/{id}/stop"), a, None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let v = h.settle(&alice, &id).await;
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["storage_bytes"], 3 << 20);
    // Stopping again is a no-op; a stopped run does not count as active.
    let (s, _) = h
        .call("POST", &format!("/api/v1/runs/{id}/stop"), a, None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let history: Vec<&str> = crate::runs::events(&h.control.ctx().db, &id)
        .await
        .expect("events")
        .into_iter()
        .map(|(s, _, _)| s.as_str())
        .collect();
    assert_eq!(
        history,
        ["pending", "starting", "running", "stopping", "stopped"]
    );

    // Clone: a new stopped run, titled, recorded with its source.
    let (s, c) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/clone"),
            a,
            Some(json!({"title": "try 1"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{c}");
    assert_eq!(c["state"], "stopped");
    assert_eq!(c["title"], "try 1");
    assert_eq!(c["cloned_from"], id.as_str());
    let clone_id = c["id"].as_str().expect("id").to_string();
    assert!(h.fake.with(|s| s.runs.contains_key(&clone_id)));
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/clone"),
            a,
            Some(json!({"title": ""})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or("").starts_with("title"),
        "{v}"
    );

    // Save: a playground whose root drives come from the saved drives; parent = the source.
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/save"),
            a,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "a 1-character name: {v}");
    assert!(v["detail"].as_str().unwrap_or("").contains("name"), "{v}");
    let (s, pg) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/save"),
            a,
            Some(json!({"name": "my-state", "title": "My state"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pg}");
    assert_eq!(pg["parent"], "debian");
    assert_eq!(pg["title"], "My state");
    let source = pg["manifest"]["playground"]["machines"][0]["drives"][0]["source"]
        .as_str()
        .expect("source")
        .to_string();
    let saved_id = source
        .strip_prefix("saved://")
        .expect("saved:// source")
        .to_string();
    assert!(h.fake.with(|s| s.saves.contains_key(&saved_id)));
    let (s, v) = h
        .call(
            "POST",
            &format!("/api/v1/runs/{id}/save"),
            a,
            Some(json!({"name": "my-state"})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "name taken: {v}");
    // A run of the saved playground asks the worker for the saved drive of each machine.
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            a,
            Some(json!({"playground": "my-state"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let from_saved = v["id"].as_str().expect("id").to_string();
    h.settle(&alice, &from_saved).await;
    let plan = h
        .fake
        .with(|s| s.runs.get(&from_saved).map(|r| r.0.clone()))
        .expect("on the worker");
    assert_eq!(
        serde_json::to_value(&plan.machines[0].image).expect("json"),
        json!({"kind": "saved", "id": saved_id, "machine": "debian"})
    );

    // Storage: two stopped runs (3 MiB each as measured) and the save (5 MiB).
    let (s, st) = h.call("GET", "/api/v1/storage", a, None).await;
    assert_eq!(s, StatusCode::OK, "{st}");
    assert_eq!(st["used_bytes"], (3 << 20) + (3 << 20) + (5 << 20), "{st}");
    assert_eq!(st["quota_bytes"], 10u64 << 30);

    // Over quota: stop, clone and save are refused with a clear 409; nothing is made.
    let (s, _) = h
        .call(
            "PUT",
            "/api/v1/users/alice/storage-quota",
            a,
            Some(json!({"bytes": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "only admins set quotas");
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/users/nobody/storage-quota",
            Some(json!({"bytes": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/users/alice/storage-quota",
            Some(json!({"bytes": "8MiB"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, v) = h
        .admin(
            "PUT",
            "/api/v1/users/alice/storage-quota",
            Some(json!({"bytes": 8u64 << 20})),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["quota_bytes"], 8u64 << 20);
    let runs_before = h.fake.with(|s| s.runs.len());
    let (s, v) = h
        .call("POST", &format!("/api/v1/runs/{id}/clone"), a, None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let detail = v["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("11.0 MiB of your 8.0 MiB storage quota"),
        "{detail}"
    );
    let (s, _) = h
        .call("POST", &format!("/api/v1/runs/{from_saved}/stop"), a, None)
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(h.fake.with(|s| s.runs.len()), runs_before);

    // Restart: back to running, expiry renewed.
    let (s, v) = h
        .call("POST", &format!("/api/v1/runs/{id}/restart"), a, None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    assert_eq!(h.settle(&alice, &id).await["state"], "running");

    // Saved drives no playground names (a lost save) are collected; named ones are kept.
    h.fake.with(|s| s.saves.insert("orphan".into(), id.clone()));
    let removed = crate::runs::persist::gc_saved(h.control.ctx())
        .await
        .expect("gc");
    assert_eq!(removed, vec!["orphan".to_string()]);
    assert!(h.fake.with(|s| s.saves.contains_key(&saved_id)));

    // Removing the saved playground removes its drives from the worker.
    let (s, _) = h
        .call("DELETE", "/api/v1/playgrounds/my-state", a, None)
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!h.fake.with(|s| s.saves.contains_key(&saved_id)));
    // A manifest may not name saved drives.
    let mut forged = custom_manifest("forged");
    forged["playground"]["machines"][0]["drives"][0]["source"] = json!("saved://abc");
    let (s, v) = h.call("POST", "/api/v1/playgrounds", a, Some(forged)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or("")
            .contains("playground.machines[0].drives[0].source"),
        "{v}"
    );
}

#[tokio::test]
async fn a_running_run_whose_worker_stopped_it_becomes_stopped() {
    let mut h = Harness::new().await;
    h.reconcile();
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/runs",
            Some(json!({"playground": "debian"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    let admin = h.admin.clone();
    assert_eq!(h.settle(&admin, &id).await["state"], "running");
    h.fake.with(|s| {
        if let Some(r) = s.runs.get_mut(&id) {
            r.1 = ObservedState::Stopped;
            r.2 = Some("its machines stopped while the worker was away".into());
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, v) = h.admin("GET", &format!("/api/v1/runs/{id}"), None).await;
        if v["state"] == "stopped" {
            assert!(
                v["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("worker was away"),
                "{v}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One request with explicit headers: (status, headers, body text).
async fn raw(
    router: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = router.clone().oneshot(req).await.expect("router answers");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test]
async fn http_port_links_sign_in_the_owner_on_the_port_host_only() {
    let mut h = Harness::new().await;
    h.reconcile();
    let alice = h.new_user("alice").await;
    let bob = h.new_user("bob").await;
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/runs",
            Some(&alice),
            Some(json!({"playground": "debian"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().expect("id").to_string();
    assert_eq!(h.settle(&alice, &id).await["state"], "running");
    let open = format!("/api/v1/runs/{id}/http-ports");
    let main = ("host", "127.0.0.1:8080");
    let bearer = |t: &str| format!("Bearer {t}");

    // The owner gets a link on the port's own host; others and bad requests do not.
    let (s, _, body) = raw(
        &h.router,
        "POST",
        &open,
        &[main, ("authorization", &bearer(&alice))],
        Some(json!({"port": 8080})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let link: Value = serde_json::from_str(&body).expect("json");
    let url = link["url"].as_str().expect("url");
    let host = format!("{id}-8080-debian.localhost:8080");
    let prefix = format!("http://{host}/.ironlab/login?key=");
    assert!(url.starts_with(&prefix), "{url}");
    assert_eq!(
        (link["machine"].as_str(), link["port"].as_u64()),
        (Some("debian"), Some(8080))
    );
    let login = url
        .trim_start_matches(&format!("http://{host}"))
        .to_string();
    for (token, req, status) in [
        (&bob, json!({"port": 8080}), StatusCode::NOT_FOUND),
        (&alice, json!({"port": 0}), StatusCode::BAD_REQUEST),
        (
            &alice,
            json!({"port": 8080, "machine": "nope"}),
            StatusCode::NOT_FOUND,
        ),
        (&alice, json!({"port": "http"}), StatusCode::BAD_REQUEST),
    ] {
        let (s, _, body) = raw(
            &h.router,
            "POST",
            &open,
            &[main, ("authorization", &bearer(token))],
            Some(req.clone()),
        )
        .await;
        assert_eq!(s, status, "{req}: {body}");
    }

    // The key signs the browser in on that host only (host-only cookie), once.
    let (s, headers, _) = raw(&h.router, "GET", &login, &[("host", &host)], None).await;
    assert_eq!(s, StatusCode::SEE_OTHER);
    assert_eq!(headers["location"], "/");
    let set = headers["set-cookie"].to_str().expect("ascii").to_string();
    assert!(
        set.starts_with("ironlab_port=") && set.contains("HttpOnly") && !set.contains("Domain"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("pair").to_string();
    let (s, _, body) = raw(&h.router, "GET", &login, &[("host", &host)], None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a used key: {body}");

    // Without the cookie: 401; with a cookie of another port host: 403.
    let (s, _, body) = raw(&h.router, "GET", "/", &[("host", &host)], None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert!(body.contains("run page"), "{body}");
    let other = format!("{id}-9090-debian.localhost:8080");
    let (s, _, _) = raw(
        &h.router,
        "GET",
        "/",
        &[("host", &other), ("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The control plane's own routes are not served on a port host…
    let (s, _, _) = raw(
        &h.router,
        "GET",
        "/api/v1/health",
        &[("host", &other)],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // …but with the cookie, the request goes to the machine: a port token for alice is
    // registered at the worker (whose fake WebSocket URL refuses, hence 502).
    let before = h.fake.with(|s| s.tokens.len());
    let (s, _, body) = raw(
        &h.router,
        "GET",
        "/index.html",
        &[("host", &host), ("cookie", &format!("a=1; {cookie}"))],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    let grant = h.fake.with(|s| s.tokens.last().cloned()).expect("grant");
    assert_eq!(h.fake.with(|s| s.tokens.len()), before + 1);
    assert_eq!(
        (grant.run.as_str(), grant.machine.as_str(), grant.scope),
        (
            id.as_str(),
            "debian",
            ironlab_api::worker::TokenScope::Port { port: 8080 }
        )
    );
    let (_, me) = h.call("GET", "/api/v1/me", Some(&alice), None).await;
    assert_eq!(Some(grant.user.as_str()), me["id"].as_str());

    // Once the run is gone, the port session no longer opens anything.
    let (s, _) = h
        .call("DELETE", &format!("/api/v1/runs/{id}"), Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED);
    h.settle(&alice, &id).await;
    let (s, _, body) = raw(
        &h.router,
        "GET",
        "/",
        &[("host", &host), ("cookie", &cookie)],
        None,
    )
    .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("not running"), "{body}");
}

mod content_api;

/// Several workers: new runs go to the least loaded one that answers; every call about a run
/// (start, connect, stop, clone, save, destroy) goes to the worker it is pinned to; a saved
/// playground starts where its drives are; a run on a worker no longer configured is a clear
/// 503.
#[tokio::test]
async fn runs_are_spread_over_workers_and_pinned_to_theirs() {
    let mut fakes = Vec::new();
    let mut tasks = Vec::new();
    let mut specs = Vec::new();
    for name in ["a", "b"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake::default();
        tasks.push(tokio::spawn(fake_worker(fake.clone(), listener)));
        fakes.push(fake);
        specs.push(crate::worker_client::WorkerSpec {
            name: name.into(),
            url: format!("http://{addr}"),
        });
    }
    // A third worker that does not answer: never chosen while others do.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let gone = probe.local_addr().expect("addr");
    drop(probe);
    specs.push(crate::worker_client::WorkerSpec {
        name: "c".into(),
        url: format!("http://{gone}"),
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let database = crate::db::testing::TestDatabase::new(dir.path()).await;
    let control = Control::open(ControlConfig {
        data_dir: dir.path().to_path_buf(),
        workers: specs,
        worker_token: WORKER_TOKEN.into(),
        database: Some(database.database.clone()),
    })
    .await
    .expect("control plane opens");
    let mut h = Harness {
        router: control.router(),
        admin: control.admin_token().to_string(),
        dir,
        database,
        worker_addr: gone,
        fake: fakes[0].clone(),
        worker_task: None,
        control,
        reconciler: None,
    };
    h.reconcile();
    let on = |id: &str| -> Vec<usize> {
        (0..2)
            .filter(|i| fakes[*i].with(|s| s.runs.contains_key(id)))
            .collect()
    };

    // Four runs: a, b, a, b (the least loaded; ties go to the first configured).
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(h.start_running("debian").await);
    }
    let placed: Vec<Vec<usize>> = ids.iter().map(|id| on(id)).collect();
    assert_eq!(placed, [vec![0], vec![1], vec![0], vec![1]]);

    // Connect: the token is granted by the run's own worker.
    let (s, v) = h
        .admin("POST", &format!("/api/v1/runs/{}/connect", ids[1]), None)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(fakes[1].with(|s| s.tokens.iter().any(|t| t.run == ids[1])));
    assert!(fakes[0].with(|s| s.tokens.is_empty()));

    // Stop, clone and save a run on b: the clone and the saved drives are on b.
    let (s, v) = h
        .admin("POST", &format!("/api/v1/runs/{}/stop", ids[1]), None)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{v}");
    let admin = h.admin.clone();
    assert_eq!(h.settle(&admin, &ids[1]).await["state"], "stopped");
    let (s, v) = h
        .admin(
            "POST",
            &format!("/api/v1/runs/{}/clone", ids[1]),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let clone = v["id"].as_str().expect("id").to_string();
    assert_eq!(on(&clone), [1]);
    let (s, pg) = h
        .admin(
            "POST",
            &format!("/api/v1/runs/{}/save", ids[1]),
            Some(json!({"name": "on-b"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{pg}");
    assert_eq!(fakes[1].with(|s| s.saves.len()), 1);
    assert_eq!(fakes[0].with(|s| s.saves.len()), 0);
    // a has 2 active runs, b has 1: a run of the saved playground still goes to b.
    let from_saved = h.start_running("on-b").await;
    assert_eq!(on(&from_saved), [1]);
    // Removing the playground removes its drives from b.
    let (s, v) = h.admin("DELETE", "/api/v1/playgrounds/on-b", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(fakes[1].with(|s| s.saves.len()), 0);

    // The admin's view of the workers: a has 2 active runs; b has 2 (one from the saved
    // playground) plus 2 stopped (the source and its clone); c does not answer.
    let (s, v) = h.admin("GET", "/api/v1/workers", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let seen: Vec<(String, bool, u64, u64)> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|w| {
            (
                w["name"].as_str().unwrap_or_default().to_string(),
                w["reachable"].as_bool().unwrap_or_default(),
                w["active_runs"].as_u64().unwrap_or(99),
                w["runs"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("a".to_string(), true, 2, 2),
            ("b".to_string(), true, 2, 4),
            ("c".to_string(), false, 0, 0)
        ],
        "{v}"
    );
    assert!(
        v[2]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unreachable"),
        "{v}"
    );
    assert_eq!(v[0]["runtimes"], json!(["container"]));
    let (_, run) = h.admin("GET", &format!("/api/v1/runs/{clone}"), None).await;
    assert_eq!(run["worker"], "b", "{run}");
    let bob = h.new_user("bob").await;
    let (s, _) = h.call("GET", "/api/v1/workers", Some(&bob), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Destroy: each worker deletes only its own runs.
    for id in ids.iter().chain([&clone, &from_saved]) {
        let (s, v) = h.admin("DELETE", &format!("/api/v1/runs/{id}"), None).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{id}: {v}");
        assert_eq!(h.settle(&admin, id).await["state"], "destroyed");
    }
    let deletes: Vec<Vec<String>> = fakes
        .iter()
        .map(|f| f.with(|s| s.deletes.clone()))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let w = i % 2;
        assert!(deletes[w].contains(id), "{id} deleted on its worker");
        assert!(
            !deletes[1 - w].contains(id),
            "{id} not deleted on the other"
        );
    }

    // A run pinned to a worker this control plane no longer has: a 503 naming it.
    let lost = h.start_running("debian").await;
    sqlx::query("UPDATE runs SET worker = 'retired' WHERE id = $1")
        .bind(&lost)
        .execute(&h.control.ctx().db)
        .await
        .expect("update");
    let (s, v) = h
        .admin("POST", &format!("/api/v1/runs/{lost}/connect"), None)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    let detail = v["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("worker retired") && detail.contains("--worker-url"),
        "{v}"
    );
    for t in tasks {
        t.abort();
    }
}
