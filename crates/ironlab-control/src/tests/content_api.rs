//! Content REST API: push (tar), list/get with visibility and filters, versions, bundle
//! download, runs of an item, removal; bad items are refused and leave nothing behind.

use ironlab_spec::content::Bundle;

use super::*;

const CHALLENGE: &str = "---\nkind: challenge\ntitle: Make a file\ndescription: Touch it.\n\
tags: [files]\ndifficulty: easy\nvisibility: public\nplayground:\n  name: debian\n  machines:\n    - name: debian\n      resources: {cpu: 1, memory: 256MiB}\n\
tasks:\n  made:\n    run: test -e /tmp/made\n---\n\n# Make a file\n\n![d](__static__/d.png)\n\n::task{name=made}\n";

fn tar(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Bundle::default();
    for (p, t) in files {
        b.insert(p, t.as_bytes().to_vec()).expect("insert");
    }
    b.to_tar()
}

fn challenge(text: &str) -> Vec<u8> {
    tar(&[
        ("index.md", text),
        ("__static__/d.png", "png"),
        ("solution.md", "```sh\ntouch /tmp/made\n```\n"),
    ])
}

impl Harness {
    async fn push(&self, token: &str, name: &str, tar: Vec<u8>) -> (StatusCode, Value) {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/api/v1/content?name={name}"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/x-tar")
            .body(Body::from(tar))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("answer");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn raw(&self, token: &str, path: &str) -> (StatusCode, Vec<u8>) {
        let req = Request::builder()
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("answer");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, bytes.to_vec())
    }

    fn bundle_files(&self) -> Vec<String> {
        let dir = self.dir.path().join("control/objects/content");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("content dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

#[tokio::test]
async fn push_versions_pull_and_remove() {
    let h = Harness::new().await;
    let admin = h.admin.clone();
    let (s, v) = h.push(&admin, "make-file", challenge(CHALLENGE)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["kind"], "challenge");
    assert_eq!(v["playground"], "debian");
    assert_eq!(v["difficulty"], "easy");
    let v1 = challenge(CHALLENGE);
    // The same bundle again publishes nothing new.
    let (s, v) = h.push(&admin, "make-file", challenge(CHALLENGE)).await;
    assert!(s.is_success(), "{v}");
    assert_eq!(v["version"], 1, "an unchanged push keeps the version");
    assert_eq!(h.bundle_files().len(), 1);

    let edited = CHALLENGE.replace("Make a file\ndescription", "Make one file\ndescription");
    let (s, v) = h.push(&admin, "make-file", challenge(&edited)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["version"], 2);
    assert_eq!(v["title"], "Make one file");
    assert_eq!(h.bundle_files().len(), 2, "one immutable file per bundle");

    // Version 1 is still there, byte for byte.
    let (s, bytes) = h
        .raw(&admin, "/api/v1/content/make-file/bundle?version=1")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bytes, v1);
    let (s, bytes) = h.raw(&admin, "/api/v1/content/make-file/bundle").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bytes, challenge(&edited));

    let (s, list) = h.admin("GET", "/api/v1/content", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    let (s, v) = h.admin("DELETE", "/api/v1/content/make-file", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{v}");
    let (s, _) = h.admin("GET", "/api/v1/content/make-file", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(h.bundle_files().is_empty(), "{:?}", h.bundle_files());
}

#[tokio::test]
async fn bad_items_are_refused_and_nothing_is_published() {
    let h = Harness::new().await;
    let admin = h.admin.clone();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bad front matter",
            challenge(&CHALLENGE.replace("difficulty: easy", "difficulty: brutal")),
            "index.md: difficulty: unknown variant `brutal`",
        ),
        (
            "unknown playground",
            challenge(&CHALLENGE.replace("name: debian\n  machines", "name: nowhere\n  machines")),
            "index.md: playground.name: there is no playground named \"nowhere\"",
        ),
        (
            "task cycle",
            challenge(&CHALLENGE.replace(
                "  made:\n    run: test -e /tmp/made\n",
                "  made:\n    needs: [other]\n    run: 'true'\n  other:\n    needs: [made]\n    run: 'true'\n",
            )),
            "dependency cycle",
        ),
        (
            "missing image",
            tar(&[("index.md", CHALLENGE)]),
            "index.md: image \"__static__/d.png\": there is no file __static__/d.png",
        ),
        (
            "override above the playground",
            challenge(&CHALLENGE.replace("memory: 256MiB", "memory: 8GiB")),
            "index.md: playground.machines[0].resources.memory: 8GiB is more than the playground's 512MiB",
        ),
        (
            "solution on a machine that does not exist",
            tar(&[
                ("index.md", CHALLENGE),
                ("__static__/d.png", "png"),
                ("solution.md", "```sh machine=ghost\ntrue\n```\n"),
            ]),
            "solution.md: line 1: no machine named \"ghost\"",
        ),
        ("not a tar archive", b"hello".repeat(200), "(archive)"),
    ];
    for (what, body, expected) in cases {
        let (s, v) = h.push(&admin, "make-file", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{what}: {v}");
        let detail = v["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(expected), "{what}: {detail}");
    }
    let (s, list) = h.admin("GET", "/api/v1/content", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list, json!([]));
    assert!(h.bundle_files().is_empty(), "{:?}", h.bundle_files());

    // A good version 1, then a bad push: version 1 stays the latest, untouched.
    let (s, _) = h.push(&admin, "make-file", challenge(CHALLENGE)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = h
        .push(&admin, "make-file", tar(&[("index.md", CHALLENGE)]))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (_, v) = h.admin("GET", "/api/v1/content/make-file", None).await;
    assert_eq!(v["version"], 1, "{v}");

    // Not a tar body.
    let (s, v) = h
        .admin(
            "POST",
            "/api/v1/content?name=make-file",
            Some(json!({"x": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{v}");
    // A bad name.
    let (s, v) = h.push(&admin, "Bad_Name", challenge(CHALLENGE)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["detail"].as_str().unwrap_or_default().contains("name"),
        "{v}"
    );
}

#[tokio::test]
async fn visibility_authors_and_filters() {
    let h = Harness::new().await;
    let admin = h.admin.clone();
    let alice = h.new_user("alice").await;
    // Only authors publish; an admin makes alice one.
    let (s, v) = h.push(&alice, "make-file", challenge(CHALLENGE)).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");
    let (s, _) = h
        .call("PUT", "/api/v1/users/alice/author", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "not an admin");
    let (s, _) = h.admin("PUT", "/api/v1/users/nobody/author", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h.admin("PUT", "/api/v1/users/alice/author", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let own = tar(&[(
        "index.md",
        "---\nkind: tutorial\ntitle: Alice's notes\nvisibility: private\n---\nx\n",
    )]);
    let (s, v) = h.push(&alice, "alice-notes", own.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, me) = h.call("GET", "/api/v1/me", Some(&alice), None).await;
    assert_eq!(v["author"], me["id"]);
    let (s, _) = h.admin("DELETE", "/api/v1/users/alice/author", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = h.push(&alice, "alice-notes", own).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "the role is gone");
    // Her item stays, hers: she still sees it; others do not.
    let (s, _) = h
        .call("GET", "/api/v1/content/alice-notes", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h.admin("DELETE", "/api/v1/content/alice-notes", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);

    let tutorial = "---\nkind: tutorial\ntitle: Shell tour\ndescription: Walk around.\ndifficulty: medium\ntags: [shell]\nvisibility: public\n---\nText.\n";
    for (name, body) in [
        ("make-file", challenge(CHALLENGE)),
        ("shell-tour", tar(&[("index.md", tutorial)])),
        (
            "secret-one",
            tar(&[(
                "index.md",
                &tutorial.replace("visibility: public", "visibility: private"),
            )]),
        ),
        (
            "hidden-link",
            tar(&[(
                "index.md",
                &tutorial.replace("visibility: public", "visibility: unlisted"),
            )]),
        ),
    ] {
        let (s, v) = h.push(&admin, name, body).await;
        assert_eq!(s, StatusCode::CREATED, "{name}: {v}");
    }
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["name"].as_str().map(str::to_string))
            .collect()
    };
    let (_, v) = h.call("GET", "/api/v1/content", Some(&alice), None).await;
    assert_eq!(names(&v), vec!["make-file", "shell-tour"]);
    let (_, v) = h.admin("GET", "/api/v1/content", None).await;
    assert_eq!(names(&v).len(), 4);
    let (s, _) = h
        .call("GET", "/api/v1/content/secret-one", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .call("GET", "/api/v1/content/hidden-link", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    // An access list opens a private item (and lists it) to the users it names.
    let bob = h.new_user("bob").await;
    let shared = tutorial.replace("visibility: public", "visibility: private\naccess: [alice]");
    let (s, v) = h
        .push(&admin, "shared-one", tar(&[("index.md", &shared)]))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["access"], json!(["alice"]));
    let (s, _) = h
        .call("GET", "/api/v1/content/shared-one", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = h
        .call("GET", "/api/v1/content/shared-one", Some(&bob), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, v) = h.call("GET", "/api/v1/content", Some(&alice), None).await;
    assert_eq!(names(&v), vec!["make-file", "shared-one", "shell-tour"]);
    let (_, v) = h.call("GET", "/api/v1/content", Some(&bob), None).await;
    assert_eq!(names(&v), vec!["make-file", "shell-tour"]);
    let (s, _) = h.admin("DELETE", "/api/v1/content/shared-one", None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let bad = tutorial.replace("visibility: public", "access: [\"Not A Name\"]");
    let (s, v) = h
        .push(&admin, "bad-access", tar(&[("index.md", &bad)]))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        v["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("index.md: access[0]"),
        "{v}"
    );
    // Students cannot download the files (they hold the solution) nor remove.
    let (s, _) = h.raw(&alice, "/api/v1/content/make-file/bundle").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = h
        .call("DELETE", "/api/v1/content/make-file", Some(&alice), None)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    for (query, expected) in [
        ("?kind=tutorial", vec!["shell-tour"]),
        ("?kind=challenge", vec!["make-file"]),
        ("?difficulty=medium", vec!["shell-tour"]),
        ("?q=TOUCH", vec!["make-file"]),
        ("?q=walk%20shell", vec!["shell-tour"]),
        ("?q=nothing-like-this", vec![]),
    ] {
        let (_, v) = h
            .call(
                "GET",
                &format!("/api/v1/content{query}"),
                Some(&alice),
                None,
            )
            .await;
        assert_eq!(names(&v), expected, "{query}");
    }
}

#[tokio::test]
async fn a_run_of_an_item_uses_its_tasks_and_overrides_and_keeps_its_version() {
    let mut h = Harness::new().await;
    h.reconcile();
    let admin = h.admin.clone();
    let alice = h.new_user("alice").await;
    let (s, v) = h.push(&admin, "make-file", challenge(CHALLENGE)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, run) = h
        .call(
            "POST",
            "/api/v1/content/make-file/runs",
            Some(&alice),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{run}");
    assert_eq!(run["title"], "Make a file");
    let id = run["id"].as_str().expect("id").to_string();
    let run = h.settle(&alice, &id).await;
    assert_eq!(run["state"], "running", "{run}");
    let (s, tasks) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/tasks"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{tasks}");
    let task_names: Vec<&str> = tasks["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(task_names, vec!["made"]);
    let plan = h
        .fake
        .with(|s| s.runs.get(&id).map(|r| r.0.clone()))
        .expect("plan");
    assert_eq!(plan.machines[0].memory_bytes, 256 * 1024 * 1024);
    let recorded = crate::content::of_run(&h.control.ctx().db, &id)
        .await
        .expect("query");
    assert_eq!(recorded, Some(("make-file".to_string(), 1)));

    // The task completes: the item is solved for alice, and stays solved.
    let ctx = h.control.ctx();
    let alice_user = crate::auth::authenticate(&ctx.db, Some(&format!("Bearer {alice}")))
        .await
        .expect("alice");
    let progress = crate::content::progress_on(&ctx.db, &alice_user, "make-file")
        .await
        .expect("progress")
        .expect("started");
    assert_eq!(progress.solved_at, None);
    assert_eq!(progress.last_run.as_deref(), Some(id.as_str()));
    let run_row = crate::runs::get_for(&ctx.db, &alice_user, &id)
        .await
        .expect("run");
    let status = ironlab_api::worker::TaskStatus {
        machine: "debian".into(),
        name: "made".into(),
        state: ironlab_api::v1::TaskState::Completed,
        hint: String::new(),
        stdout: String::new(),
        exit_code: 0,
        attempt: 1,
        at_unix_ms: 1_700_000_000_000,
        seq: 1,
        helper: false,
        init: false,
        input: false,
    };
    crate::tasks::ingest(&ctx.db, &ctx.signals, &run_row, &status)
        .await
        .expect("ingest");
    let progress = crate::content::progress_on(&ctx.db, &alice_user, "make-file")
        .await
        .expect("progress")
        .expect("started");
    assert!(progress.solved_at.is_some(), "{progress:?}");
    assert_eq!(progress.solved_version, Some(1));

    // Version 2 drops the task; the running run keeps version 1's plan, a new run gets v2.
    let edited = CHALLENGE
        .replace(
            "  made:\n    run: test -e /tmp/made\n",
            "  other:\n    run: test -e /tmp/other\n",
        )
        .replace("::task{name=made}", "::task{name=other}");
    let (s, v) = h
        .push(
            &admin,
            "make-file",
            tar(&[("index.md", &edited), ("__static__/d.png", "png")]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (_, tasks) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id}/tasks"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(tasks["tasks"][0]["name"], "made");
    let (s, run2) = h
        .call(
            "POST",
            "/api/v1/content/make-file/runs",
            Some(&alice),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{run2}");
    let id2 = run2["id"].as_str().expect("id");
    let (_, tasks) = h
        .call(
            "GET",
            &format!("/api/v1/runs/{id2}/tasks"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(tasks["tasks"][0]["name"], "other", "{tasks}");
    let again = crate::content::progress_on(&ctx.db, &alice_user, "make-file")
        .await
        .expect("progress")
        .expect("started");
    assert_eq!(
        again.solved_at, progress.solved_at,
        "a new run does not unsolve"
    );
    assert_eq!(again.last_run.as_deref(), Some(id2));

    // A course lesson's run: its own playground and tasks; progress is kept per lesson.
    let course = tar(&[
        (
            "index.md",
            "---\nkind: course\ntitle: C\nvisibility: public\n---\n",
        ),
        (
            "01-m/01-l.md",
            "---\ntitle: L\nplayground: {name: debian}\ntasks:\n  lt:\n    run: 'true'\n---\n",
        ),
    ]);
    let (s, v) = h.push(&admin, "a-course", course).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/content/a-course/runs",
            Some(&alice),
            Some(json!({"lesson": "01-m/nope"})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, lrun) = h
        .call(
            "POST",
            "/api/v1/content/a-course/runs",
            Some(&alice),
            Some(json!({"lesson": "01-m/01-l"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{lrun}");
    let lid = lrun["id"].as_str().expect("id").to_string();
    assert_eq!(h.settle(&alice, &lid).await["state"], "running");
    let lrow = crate::runs::get_for(&ctx.db, &alice_user, &lid)
        .await
        .expect("run");
    assert_eq!(lrow.plan.machines[0].tasks[0].name, "lt");
    let mut done = status.clone();
    done.name = "lt".into();
    crate::tasks::ingest(&ctx.db, &ctx.signals, &lrow, &done)
        .await
        .expect("ingest");
    let lp = crate::content::progress_on(&ctx.db, &alice_user, "a-course/01-m/01-l")
        .await
        .expect("progress")
        .expect("lesson started");
    assert!(lp.solved_at.is_some(), "{lp:?}");
    assert!(
        crate::content::progress_on(&ctx.db, &alice_user, "a-course")
            .await
            .expect("progress")
            .is_none(),
        "the course itself was not started"
    );

    // A tutorial without a playground has nothing to start.
    let (s, _) = h
        .push(
            &admin,
            "just-text",
            tar(&[(
                "index.md",
                "---\nkind: tutorial\ntitle: T\nvisibility: public\n---\nx\n",
            )]),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = h
        .call(
            "POST",
            "/api/v1/content/just-text/runs",
            Some(&alice),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
}
