//! Page, session, CSRF and event-stream tests: the real router (`oneshot`, no server) on a
//! temporary database. No worker runs (its URL refuses connections), so runs stay `pending`.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tower::ServiceExt;

use crate::{Control, ControlConfig};

const ORIGIN: &str = "http://127.0.0.1:8080";

struct H {
    control: Control,
    _db: crate::db::testing::TestDatabase,
    _dir: tempfile::TempDir,
}

impl H {
    async fn new() -> H {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = crate::db::testing::TestDatabase::new(dir.path()).await;
        let control = Control::open(ControlConfig {
            data_dir: dir.path().to_path_buf(),
            workers: vec![crate::worker_client::WorkerSpec {
                name: "local".into(),
                url: "http://127.0.0.1:9".into(),
            }],
            worker_token: "unused".into(),
            database: Some(db.database.clone()),
        })
        .await
        .expect("control plane opens");
        H {
            control,
            _db: db,
            _dir: dir,
        }
    }

    async fn send(&self, req: Request<Body>) -> Response {
        self.control
            .router()
            .oneshot(req)
            .await
            .expect("router answers")
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, String, Response) {
        let mut b = Request::get(path).header(header::HOST, "127.0.0.1:8080");
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        let resp = self.send(b.body(Body::empty()).expect("request")).await;
        let status = resp.status();
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        (status, text, Response::from_parts(parts, Body::empty()))
    }

    /// A form POST as a browser sends it from this site.
    async fn post_form(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &str,
    ) -> (StatusCode, Response) {
        self.post_form_from(path, cookie, form, Some(ORIGIN)).await
    }

    async fn post_form_from(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &str,
        origin: Option<&str>,
    ) -> (StatusCode, Response) {
        let mut b = Request::post(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        let resp = self
            .send(b.body(Body::from(form.to_string())).expect("request"))
            .await;
        (resp.status(), resp)
    }

    /// Signs in with a fresh admin link; returns the `Cookie` header value and the CSRF token.
    async fn sign_in_admin(&self) -> (String, String) {
        let link = self
            .control
            .admin_login_link(ORIGIN)
            .await
            .expect("admin link");
        let path = link.strip_prefix(ORIGIN).expect("link under the base URL");
        let (status, _, resp) = self.get(path, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "the admin link signs in");
        let cookie = session_cookie(&resp);
        let (_, page, _) = self.get("/", Some(&cookie)).await;
        (cookie, csrf_of(&page))
    }
}

fn session_cookie(resp: &Response) -> String {
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie");
    set.split(';').next().expect("cookie pair").to_string()
}

fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf-token\" content=\"")
        .expect("page has the csrf meta tag");
    let rest = &page[at + "name=\"csrf-token\" content=\"".len()..];
    rest[..rest.find('"').expect("end of csrf")].to_string()
}

fn location(resp: &Response) -> String {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn pages_redirect_to_login_without_a_session() {
    let h = H::new().await;
    for (path, to) in [
        ("/", "/login"),
        ("/dashboard", "/login?next=/dashboard"),
        ("/runs/abc", "/login?next=/runs/abc"),
        ("/admin/users", "/login?next=/admin/users"),
    ] {
        let (status, _, resp) = h.get(path, None).await;
        assert_eq!(status, StatusCode::SEE_OTHER, "{path}");
        assert_eq!(location(&resp), to, "{path}");
    }
    let (status, body, _) = h.get("/login", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<form method=\"post\" action=\"/login\""));
    // A bogus session cookie is no session.
    let (status, _, _) = h.get("/", Some("ironlab_session=nope")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn admin_link_sets_a_session_cookie_once() {
    let h = H::new().await;
    let link = h.control.admin_login_link(ORIGIN).await.expect("link");
    assert!(
        link.starts_with("http://127.0.0.1:8080/login/admin?key="),
        "{link}"
    );
    let path = link.strip_prefix(ORIGIN).expect("path");
    let (status, _, resp) = h.get(path, None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/");
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie")
        .to_string();
    for attr in ["ironlab_session=", "HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attr), "{set} lacks {attr}");
    }
    assert!(
        !set.contains("Secure"),
        "plain HTTP gets no Secure flag: {set}"
    );
    // The link is single-use.
    let (status, body, _) = h.get(path, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body.contains("already used or expired"), "{body}");
    // Over HTTPS (a proxy says so) the cookie is Secure.
    let link = h.control.admin_login_link(ORIGIN).await.expect("link");
    let req = Request::get(link.strip_prefix(ORIGIN).expect("path"))
        .header(header::HOST, "lab.example")
        .header("x-forwarded-proto", "https")
        .body(Body::empty())
        .expect("request");
    let resp = h.send(req).await;
    let set = resp
        .headers()
        .get(header::SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(set.ends_with("; Secure"), "{set}");
}

#[tokio::test]
async fn pages_render_for_a_signed_in_user() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (status, catalog, resp) = h.get("/", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let csp = resp
        .headers()
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    for needle in [
        "Debian 12",
        "A Debian 12 (bookworm) machine",
        "<span class=\"chip\">debian</span>",
        "action=\"/runs\"",
        "name=\"playground\" value=\"debian\"",
        &format!("name=\"csrf\" value=\"{csrf}\""),
    ] {
        assert!(catalog.contains(needle), "catalog lacks {needle}");
    }
    let (status, dash, _) = h.get("/dashboard", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(dash.contains("No runs yet"));
    let (status, users, _) = h.get("/admin/users", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(users.contains("<td data-label=\"Name\">admin</td>"));
    let (status, css, _) = h.get("/assets/site.css", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(css.contains(".terminals"));
    // Unknown pages are HTML, unknown API routes JSON.
    let (status, body, _) = h.get("/nowhere", Some(&cookie)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("<!doctype html>"));
    let (status, body, _) = h.get("/api/v1/nowhere", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body.contains("no such API route"));
}

#[tokio::test]
async fn start_from_the_catalog_and_see_the_run() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (status, resp) = h
        .post_form(
            "/runs",
            Some(&cookie),
            &format!("csrf={csrf}&playground=debian"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let to = location(&resp);
    assert!(to.starts_with("/runs/"), "{to}");
    let id = to.trim_start_matches("/runs/").to_string();
    let (status, page, _) = h.get(&to, Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    for needle in [
        "id=\"run-state\"",
        ">pending<",
        "data-machine=\"debian\"",
        "id=\"add-tab\"",
        "Starting the machines",
        "1 h 59 min left",
    ] {
        assert!(page.contains(needle), "run page lacks {needle}");
    }
    if !super::assets::scripts_built() {
        assert!(page.contains("terminal scripts not built: run npm run build in web/"));
    }
    let (_, dash, _) = h.get("/dashboard", Some(&cookie)).await;
    assert!(dash.contains(&format!("data-run-id=\"{id}\"")));
    assert!(dash.contains("value=\"Debian 12\""));
    // Rename and destroy without scripts.
    let (status, _) = h
        .post_form(
            &format!("/runs/{id}/title"),
            Some(&cookie),
            &format!("csrf={csrf}&title=My+lab"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, dash, _) = h.get("/dashboard", Some(&cookie)).await;
    assert!(dash.contains("value=\"My lab\""));
    let (status, _) = h
        .post_form(
            &format!("/runs/{id}/destroy"),
            Some(&cookie),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, page, _) = h.get(&to, Some(&cookie)).await;
    assert!(
        page.contains(">destroyed<"),
        "a pending run is destroyed at once"
    );
}

#[tokio::test]
async fn csrf_and_origin_are_checked() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    // Form without the token, with a wrong one, or from another origin: 403.
    let cases = [
        ("playground=debian".to_string(), Some(ORIGIN)),
        ("csrf=wrong&playground=debian".to_string(), Some(ORIGIN)),
        (
            format!("csrf={csrf}&playground=debian"),
            Some("http://evil.test"),
        ),
        (format!("csrf={csrf}&playground=debian"), None),
    ];
    for (form, origin) in cases {
        let (status, _) = h
            .post_form_from("/runs", Some(&cookie), &form, origin)
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form} from {origin:?}");
    }
    // The JSON API with the session cookie needs X-CSRF-Token.
    let api = |token: Option<&str>| {
        let mut b = Request::post("/api/v1/runs")
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::ORIGIN, ORIGIN)
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            b = b.header("x-csrf-token", t);
        }
        b.body(Body::from(r#"{"playground":"debian"}"#))
            .expect("request")
    };
    assert_eq!(h.send(api(None)).await.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        h.send(api(Some("nope"))).await.status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(h.send(api(Some(&csrf))).await.status(), StatusCode::CREATED);
    // Reads need no token; without the cookie the API still says 401.
    let (status, body, _) = h.get("/api/v1/runs", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("\"playground\":\"debian\""));
    let (status, _, _) = h.get("/api/v1/runs", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // No nothing was started by the refused requests: exactly one run.
    assert_eq!(body.matches("\"id\":").count(), 1, "{body}");
}

#[tokio::test]
async fn local_accounts_sign_in_with_a_password() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (status, resp) = h
        .post_form(
            "/admin/users",
            Some(&cookie),
            &format!("csrf={csrf}&name=alice&password=correct+horse&role=user"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("Created alice"), "{body}");
    assert!(
        body.contains("ilt_"),
        "the new user's API token is shown once"
    );

    let (status, resp) = h
        .post_form(
            "/login",
            None,
            "name=alice&password=wrong+horse&next=/dashboard",
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
    let (status, resp) = h
        .post_form(
            "/login",
            None,
            "name=alice&password=correct+horse&next=/dashboard",
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/dashboard");
    let alice = session_cookie(&resp);
    let (status, page, _) = h.get("/dashboard", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(">alice<"));
    // Not an admin.
    let (status, _, _) = h.get("/admin/users", Some(&alice)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Sign out ends the session.
    let (status, _) = h
        .post_form("/logout", Some(&alice), &format!("csrf={}", csrf_of(&page)))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = h.get("/dashboard", Some(&alice)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn event_stream_starts_with_the_run_and_follows_changes() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (_, resp) = h
        .post_form(
            "/runs",
            Some(&cookie),
            &format!("csrf={csrf}&playground=debian"),
        )
        .await;
    let id = location(&resp).trim_start_matches("/runs/").to_string();
    let req = Request::get(format!("/api/v1/runs/{id}/events"))
        .header(header::HOST, "127.0.0.1:8080")
        .header(header::COOKIE, &cookie)
        .body(Body::empty())
        .expect("request");
    let resp = h.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut body = resp.into_body();
    let mut next_event = async || -> String {
        let mut text = String::new();
        while !text.contains("\n\n") {
            let frame = tokio::time::timeout(std::time::Duration::from_secs(10), body.frame())
                .await
                .expect("an event within 10 s")
                .expect("stream open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        text
    };
    let first = next_event().await;
    assert!(first.starts_with("event: run\n"), "{first}");
    assert!(first.contains(&format!("\"id\":\"{id}\"")), "{first}");
    assert!(first.contains("\"state\":\"pending\""), "{first}");
    // A rename arrives as the next event.
    let (status, _) = h
        .post_form(
            &format!("/runs/{id}/title"),
            Some(&cookie),
            &format!("csrf={csrf}&title=Renamed+lab"),
        )
        .await;
    assert!(status.is_success() || status.is_redirection(), "{status}");
    let renamed = next_event().await;
    assert!(renamed.contains("\"title\":\"Renamed lab\""), "{renamed}");
    // A state change (destroy) arrives as the next event.
    let (status, _) = h
        .post_form(
            &format!("/runs/{id}/destroy"),
            Some(&cookie),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let second = next_event().await;
    assert!(second.contains("\"state\":\"destroyed\""), "{second}");
    // Someone else's run is not found.
    let (status, _, _) = h
        .get("/api/v1/runs/nosuchrun123/events", Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn expiry_destroys_runs_whose_time_is_up() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (_, resp) = h
        .post_form(
            "/runs",
            Some(&cookie),
            &format!("csrf={csrf}&playground=debian"),
        )
        .await;
    let id = location(&resp).trim_start_matches("/runs/").to_string();
    let ctx = h.control.ctx();
    assert!(
        super::expiry::sweep_once(ctx)
            .await
            .expect("sweep")
            .is_empty()
    );
    sqlx::query("UPDATE runs SET expires_at = 1 WHERE id = $1")
        .bind(&id)
        .execute(&ctx.db)
        .await
        .expect("expire");
    let gone = super::expiry::sweep_once(ctx).await.expect("sweep");
    assert_eq!(gone, vec![id.clone()]);
    let (_, page, _) = h.get(&format!("/runs/{id}"), Some(&cookie)).await;
    assert!(page.contains("its time ran out"), "the reason is shown");
}

#[tokio::test]
async fn dashboard_lists_stopped_runs_first_with_their_actions_and_storage() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, resp) = h
            .post_form(
                "/runs",
                Some(&cookie),
                &format!("csrf={csrf}&playground=debian"),
            )
            .await;
        ids.push(location(&resp).trim_start_matches("/runs/").to_string());
    }
    // No worker here: put the runs where a worker would have (the older one stopped).
    let db = &h.control.ctx().db;
    for (id, state, bytes) in [
        (&ids[0], "stopped", Some(3i64 << 20)),
        (&ids[1], "running", None),
    ] {
        let snapshot = (state == "stopped").then_some("uploaded");
        sqlx::query(
            "UPDATE runs SET state = $1, storage_bytes = $2, snapshot = $3, expires_at = 1 WHERE id = $4",
        )
        .bind(state)
        .bind(bytes)
        .bind(snapshot)
        .bind(id)
            .execute(db)
            .await
            .expect("set state");
    }
    // A stopped run does not expire; the running one does.
    let gone = super::expiry::sweep_once(h.control.ctx())
        .await
        .expect("sweep");
    assert_eq!(gone, vec![ids[1].clone()]);
    sqlx::query("UPDATE runs SET state = 'running' WHERE id = $1")
        .bind(&ids[1])
        .execute(db)
        .await
        .expect("running again");

    let (_, dash, _) = h.get("/dashboard", Some(&cookie)).await;
    let stopped_at = dash
        .find(&format!("data-run-id=\"{}\"", ids[0]))
        .expect("stopped row");
    let running_at = dash
        .find(&format!("data-run-id=\"{}\"", ids[1]))
        .expect("running row");
    assert!(stopped_at < running_at, "stopped runs come first");
    let stopped_row = &dash[stopped_at..running_at];
    for needle in [
        "action=\"/runs/{}/restart\"",
        "action=\"/runs/{}/clone\"",
        "action=\"/runs/{}/save\"",
        "action=\"/runs/{}/destroy\"",
        "3.0 MiB",
        ">kept<",
        ">saved off host<",
    ] {
        let needle = needle.replace("{}", &ids[0]);
        assert!(stopped_row.contains(&needle), "stopped row lacks {needle}");
    }
    let running_row = &dash[running_at..];
    assert!(running_row.contains(&format!("action=\"/runs/{}/stop\"", ids[1])));
    assert!(
        !running_row.contains("/clone\""),
        "a running run cannot be cloned"
    );
    assert!(
        dash.contains("Storage: <strong>3.0 MiB</strong> of 10.0 GiB"),
        "{dash}"
    );

    // The run page has a Stop button while running; plain form POSTs work.
    let (_, page, _) = h.get(&format!("/runs/{}", ids[1]), Some(&cookie)).await;
    assert!(page.contains("id=\"stop-form\">"), "visible Stop form");
    let (status, resp) = h
        .post_form_from(
            &format!("/runs/{}/stop", ids[1]),
            Some(&cookie),
            &format!("csrf={csrf}"),
            Some(ORIGIN),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), "/dashboard");
    let (_, page, _) = h.get(&format!("/runs/{}", ids[1]), Some(&cookie)).await;
    assert!(page.contains(">stopping<"), "stop recorded");
    assert!(
        page.contains("id=\"run-stopped\" class=\"hint\">"),
        "the stopped hint shows"
    );
    let (status, resp) = h
        .post_form(
            &format!("/runs/{}/restart", ids[0]),
            Some(&cookie),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(location(&resp), format!("/runs/{}", ids[0]));
    let (_, page, _) = h.get(&format!("/runs/{}", ids[0]), Some(&cookie)).await;
    assert!(page.contains(">restarting<"), "restart recorded");
    // Without the CSRF token nothing happens.
    let (status, _) = h
        .post_form(&format!("/runs/{}/clone", ids[0]), Some(&cookie), "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[test]
fn every_template_compiles() {
    for name in [
        "layout.html",
        "login.html",
        "catalog.html",
        "run.html",
        "dashboard.html",
        "admin_users.html",
        "error.html",
        "macros.html",
        "tasks.html",
        "content_catalog.html",
        "content_item.html",
    ] {
        if let Err(e) = super::TEMPLATES.get_template(name) {
            panic!("template {name}: {e:#}");
        }
    }
}

#[tokio::test]
async fn http_port_tabs_are_links_to_the_port_route() {
    let h = H::new().await;
    let manifest = r#"kind: playground
name: web-lab
title: Web lab
description: A web server.
playground:
  machines:
    - name: web
      drives: [{source: debian, mount: /, size: 4GiB}]
  tabs:
    - {kind: terminal, machine: web}
    - {kind: http-port, machine: web, port: 8000, name: Site}
    - {kind: http-port, machine: web, port: 3000}
"#;
    let resp = h
        .send(
            Request::post("/api/v1/playgrounds")
                .header(header::HOST, "127.0.0.1:8080")
                .header(
                    header::AUTHORIZATION,
                    format!("Bearer {}", h.control.admin_token()),
                )
                .header(header::CONTENT_TYPE, "application/yaml")
                .body(Body::from(manifest))
                .expect("request"),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let (cookie, csrf) = h.sign_in_admin().await;
    let (status, resp) = h
        .post_form(
            "/runs",
            Some(&cookie),
            &format!("csrf={csrf}&playground=web-lab"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let to = location(&resp);
    let id = to.trim_start_matches("/runs/").to_string();
    let (_, page, _) = h.get(&to, Some(&cookie)).await;
    for needle in [
        format!(
            "<a class=\"tab port-tab\" href=\"/runs/{id}/ports/web/8000\" target=\"_blank\" rel=\"noopener\""
        ),
        "data-port=\"8000\">Site ↗</a>".to_string(),
        "data-port=\"3000\">web:3000 ↗</a>".to_string(),
        "role=\"tab\" class=\"tab\" data-machine=\"web\"".to_string(),
    ] {
        assert!(page.contains(&needle), "run page lacks {needle}");
    }
    // The run is not running (no worker here): the port route says so instead of a link.
    let (status, page, _) = h
        .get(&format!("/runs/{id}/ports/web/8000"), Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{page}");
    // Without a session: the sign-in page, coming back here after.
    let (status, _, resp) = h.get(&format!("/runs/{id}/ports/web/8000"), None).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(location(&resp).starts_with("/login?next="));
}

/// Publishes an item straight through the service (what `POST /api/v1/content` calls).
async fn publish(h: &H, name: &str, files: &[(&str, &[u8])]) {
    let mut b = ironlab_spec::content::Bundle::default();
    for (p, d) in files {
        b.insert(p, d.to_vec()).expect("insert");
    }
    let admin = crate::auth::authenticate(
        &h.control.ctx().db,
        Some(&format!("Bearer {}", h.control.admin_token())),
    )
    .await
    .expect("admin");
    crate::content::push(h.control.ctx(), &admin, name, &b)
        .await
        .expect("published");
}

const EVIL: &str = "---\nkind: challenge\ntitle: Evil text\ndescription: Sanitised.\ndifficulty: hard\n\
visibility: public\nplayground: {name: debian}\ntasks:\n  made:\n    run: test -e /tmp/made\n---\n\n\
# Hello\n\n<script>window.pwned=1</script>\n\n<img src=x onerror=\"window.pwned=2\">\n\n\
[click](javascript:window.pwned=3)\n\n<iframe src=\"/\"></iframe>\n\n![d](__static__/d.png)\n\n\
::task{name=made}\n\n```sh\ntouch /tmp/made\n```\n";

#[tokio::test]
async fn content_catalog_item_page_run_page_and_static_files() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    publish(
        &h,
        "evil-text",
        &[
            ("index.md", EVIL.as_bytes()),
            ("__static__/d.png", b"PNG-DATA"),
        ],
    )
    .await;
    publish(
        &h,
        "easy-tour",
        &[("index.md", b"---\nkind: tutorial\ntitle: Easy tour\ndifficulty: easy\nvisibility: public\n---\nText.\n")],
    )
    .await;

    let (status, page, _) = h.get("/content", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("data-content=\"evil-text\"") && page.contains("data-content=\"easy-tour\"")
    );
    let (_, page, _) = h.get("/content?kind=tutorial", Some(&cookie)).await;
    assert!(
        !page.contains("data-content=\"evil-text\"") && page.contains("data-content=\"easy-tour\"")
    );
    let (_, page, _) = h
        .get("/content?difficulty=hard&q=sanitised", Some(&cookie))
        .await;
    assert!(
        page.contains("data-content=\"evil-text\"") && !page.contains("data-content=\"easy-tour\"")
    );

    let (status, page, _) = h.get("/content/evil-text", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    let lower = page.to_lowercase();
    for bad in ["window.pwned", "onerror", "javascript:", "<iframe"] {
        assert!(!lower.contains(bad), "{bad} in the page");
    }
    for good in [
        "<h1>Hello</h1>",
        "src=\"/content/evil-text/static/v1/d.png\"",
        "data-task=\"made\"",
        "data-action=\"run\"",
        "action=\"/content/evil-text/start\"",
    ] {
        assert!(page.contains(good), "page lacks {good}");
    }
    let (status, body, resp) = h
        .get("/content/evil-text/static/v1/d.png", Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_bytes(), b"PNG-DATA");
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "image/png");
    let (status, _, _) = h
        .get("/content/evil-text/static/v1/nope.png", Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Start: a run of the item whose page shows the text beside the terminals and checklist.
    let (status, resp) = h
        .post_form(
            "/content/evil-text/start",
            Some(&cookie),
            &format!("csrf={csrf}"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let to = location(&resp);
    assert!(to.starts_with("/runs/"), "{to}");
    let (_, page, _) = h.get(&to, Some(&cookie)).await;
    for good in [
        "class=\"content-text content-beside\"",
        "<h1>Hello</h1>",
        "li id=\"task-made\"",
        "id=\"terminals\"",
    ] {
        assert!(page.contains(good), "run page lacks {good}");
    }
    assert!(!page.to_lowercase().contains("window.pwned"));
    // The item page now offers to continue that run.
    let (_, page, _) = h.get("/content/evil-text", Some(&cookie)).await;
    assert!(page.contains(&format!("href=\"{to}\"")), "continue link");
    // A skill path lists its items with their titles and the user's solved state.
    publish(
        &h,
        "a-path",
        &[(
            "index.md",
            b"---\nkind: skill-path\ntitle: A path\nvisibility: public\nunits:\n  - title: Unit one\n    items: [evil-text, easy-tour]\n---\n",
        )],
    )
    .await;
    let (_, page, _) = h.get("/content/a-path", Some(&cookie)).await;
    assert!(page.contains("<h2>Unit one</h2>"), "{page}");
    assert!(page.contains("data-item=\"evil-text\" data-solved=\"false\"><a href=\"/content/evil-text\">Evil text</a>"), "{page}");
    // Without CSRF: refused.
    let (status, _) = h
        .post_form("/content/evil-text/start", Some(&cookie), "")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn course_lessons_have_pages_navigation_and_their_own_runs() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    publish(
        &h,
        "shell-course",
        &[
            ("index.md", b"---\nkind: course\ntitle: Shell course\nvisibility: public\n---\nWelcome.\n"),
            ("01-start/index.md", b"---\ntitle: Getting started\n---\n"),
            ("01-start/01-look.md", b"---\ntitle: Look around\n---\nUse **ls**.\n"),
            (
                "02-files/01-make.md",
                b"---\ntitle: Make files\nplayground: {name: debian}\ntasks:\n  touched:\n    run: test -e /tmp/t\n---\nRun `touch /tmp/t`.\n\n::task{name=touched}\n",
            ),
        ],
    )
    .await;
    let (status, page, _) = h.get("/content/shell-course", Some(&cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("href=\"/content/shell-course/lessons/01-start/01-look\">Look around</a>"),
        "{page}"
    );
    assert!(
        page.contains("href=\"/content/shell-course/lessons/02-files/01-make\">Make files</a>")
    );
    assert!(
        !page.contains("id=\"content-start\""),
        "the course itself has no playground"
    );

    let (status, page, _) = h
        .get(
            "/content/shell-course/lessons/01-start/01-look",
            Some(&cookie),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("<strong>ls</strong>") && page.contains("Getting started"));
    assert!(page.contains("rel=\"next\" href=\"/content/shell-course/lessons/02-files/01-make\""));
    assert!(!page.contains("rel=\"prev\""));
    let (status, _, _) = h
        .get("/content/shell-course/lessons/01-start/nope", Some(&cookie))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, page, _) = h
        .get(
            "/content/shell-course/lessons/02-files/01-make",
            Some(&cookie),
        )
        .await;
    assert!(
        page.contains("name=\"lesson\" value=\"02-files&#x2f;01-make\""),
        "{page}"
    );
    assert!(page.contains("data-lesson=\"02-files&#x2f;01-make\""));
    let (status, resp) = h
        .post_form(
            "/content/shell-course/start",
            Some(&cookie),
            &format!("csrf={csrf}&lesson=02-files%2F01-make"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let to = location(&resp);
    let (_, page, _) = h.get(&to, Some(&cookie)).await;
    assert!(page.contains("Shell course: Make files"), "run title");
    assert!(
        page.contains("data-lesson=\"02-files&#x2f;01-make\"")
            && page.contains("<code>touch /tmp/t</code>")
    );
    assert!(page.contains("li id=\"task-touched\""));
    // A lesson without a playground, or no lesson at all on a course, has nothing to start.
    let (status, _) = h
        .post_form(
            "/content/shell-course/start",
            Some(&cookie),
            &format!("csrf={csrf}&lesson=01-start%2F01-look"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn admins_make_content_authors_on_the_users_page() {
    let h = H::new().await;
    let (cookie, csrf) = h.sign_in_admin().await;
    let (status, _) = h
        .post_form(
            "/admin/users",
            Some(&cookie),
            &format!("csrf={csrf}&name=writer&password=long-enough-1&role=user"),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, page, _) = h.get("/admin/users", Some(&cookie)).await;
    assert!(page.contains("data-author=\"false\""), "{page}");
    let (status, resp) = h
        .post_form(
            "/admin/users/author",
            Some(&cookie),
            &format!("csrf={csrf}&name=writer&action=grant"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER, "{:?}", resp.headers());
    let (_, page, _) = h.get("/admin/users", Some(&cookie)).await;
    assert!(page.contains("data-author=\"true\""), "{page}");
    let writer = crate::auth::find_user(&h.control.ctx().db, "writer")
        .await
        .expect("query")
        .expect("writer");
    assert!(
        crate::content::is_author(&h.control.ctx().db, &writer)
            .await
            .expect("query")
    );
    let (status, _) = h
        .post_form(
            "/admin/users/author",
            Some(&cookie),
            &format!("csrf={csrf}&name=writer&action=revoke"),
        )
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(
        !crate::content::is_author(&h.control.ctx().db, &writer)
            .await
            .expect("query")
    );
}
