//! `ironlab up --content content/`: one process tree serves the stock debian playground and the
//! stock content; Ctrl-C stops it cleanly;
//! started again on the same data dir it keeps the run, and the machine kept running meanwhile.

mod common;

use std::time::Duration;

use common::{Needs, Platform, http, preflight, serial, try_http};

#[test]
fn up_serves_debian_and_survives_ctrl_c() {
    let _serial = serial();
    let Some(env) = preflight(
        "up_serves_debian_and_survives_ctrl_c",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    // The stock content of the repository, published at start like `scripts/up.sh` does.
    let content = concat!(env!("CARGO_MANIFEST_DIR"), "/../../content");
    let mut p = Platform::start_up_with(&env, &["--content", content]);
    let published = |p: &Platform| -> Vec<(String, i64)> {
        let r = http("GET", &p.api("/content"), Some(&p.token()), None);
        assert_eq!(r.status, 200, "GET /content: {}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        let mut items: Vec<(String, i64)> = v
            .as_array()
            .expect("a list")
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c["version"].as_i64().unwrap_or_default(),
                )
            })
            .collect();
        items.sort();
        items
    };
    // `up` publishes once its worker is ready, after the API already answers.
    let wanted = [
        "linux-first-steps",
        "shell-pipelines",
        "linux-essentials",
        "linux-foundations",
    ];
    let stock = common::wait_for(Duration::from_secs(120), Duration::from_millis(200), || {
        let items = published(&p);
        wanted
            .iter()
            .all(|w| items.iter().any(|(n, v)| n == w && *v == 1))
            .then_some(items)
    })
    .unwrap_or_else(|| {
        panic!(
            "`up --content` did not publish {wanted:?} at version 1 within 120 s: {:?}\n{}",
            published(&p),
            p.logs()
        )
    });

    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.contains("debian"),
        "no stock debian playground:\n{catalog}"
    );
    let run = p.start_run("debian");
    let id = run["id"].as_str().expect("start prints an id").to_string();
    let os = p.ssh_ok(&id, &["cat", "/etc/os-release"]);
    assert!(os.contains("Debian GNU/Linux 12"), "not Debian 12:\n{os}");
    p.ssh_ok(&id, &["sh", "-c", "echo still-here > /tmp/marker"]);

    // Ctrl-C: `up` exits 0 and takes its worker with it.
    let token = p.token();
    let status = p.interrupt(Duration::from_secs(30)).unwrap_or_else(|| {
        panic!(
            "`ironlab up` did not exit within 30 s of Ctrl-C\n{}",
            p.logs()
        )
    });
    assert!(
        status.success(),
        "`ironlab up` exited with {status} on Ctrl-C\n{}",
        p.logs()
    );
    let worker = format!("{}/v1/status", p.worker_url());
    let worker_gone = common::wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        try_http("GET", &worker, None, None).is_err().then_some(())
    });
    assert!(
        worker_gone.is_some(),
        "the worker of `ironlab up` still answers after Ctrl-C"
    );

    // Again, on the same data dir: same token, the run is still there and its machine kept running.
    p.start_control();
    assert_eq!(
        p.token(),
        token,
        "the admin token changed across a restart of `up`"
    );
    let r = http("GET", &p.api("/me"), Some(&token), None);
    assert_eq!(r.status, 200, "GET /me after restart: {}", r.body);
    // Wait until this `up` has pushed the content again (the skill path goes last).
    let pushed = common::wait_for(Duration::from_secs(120), Duration::from_millis(200), || {
        p.control_log()
            .contains("content linux-foundations (skill-path) version")
            .then_some(())
    });
    assert!(
        pushed.is_some(),
        "`up` did not push the content again:\n{}",
        p.logs()
    );
    assert_eq!(
        published(&p),
        stock,
        "a restart of `up --content` with unchanged content must keep every version"
    );
    let list = p.cli_ok(&["playground", "list"]);
    assert!(
        list.contains(&id),
        "run {id} lost across a restart of `up`:\n{list}"
    );
    let run = p.wait_state(&id, &["running", "failed"], Duration::from_secs(60));
    assert_eq!(run["state"], "running", "after restart: {run}");
    assert_eq!(p.ssh_ok(&id, &["cat", "/tmp/marker"]), "still-here\n");

    p.destroy(&id);
    p.assert_clean(&id);
}
