//! The control plane on PostgreSQL (`ironlab control --database postgres://…`), the fleet
//! set-up: a private PostgreSQL server, a worker, a control plane whose state lives in that
//! database. A user, a custom playground and a running run are written there (not to a SQLite
//! file), survive a control-plane restart, and the machine keeps working; a bad `--database`
//! is refused with a clear error before anything starts.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    Needs, Platform, Postgres, Registry, TempDir, bin, box_manifest, free_port, http, preflight,
    run_with_timeout, serial,
};

/// `ironlab control ARGS` that must fail at once: returns (exit status code, stderr).
fn control_fails(args: &[&str]) -> (Option<i32>, String) {
    let dir = TempDir::new("pg-bad");
    let token = dir.path().join("worker-token");
    std::fs::write(&token, "unused").expect("write token");
    let mut cmd = Command::new(bin());
    cmd.args([
        "control",
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--data-dir",
        &dir.path().join("data").to_string_lossy(),
        "--worker-url",
        "http://127.0.0.1:9",
        "--worker-token-file",
        &token.to_string_lossy(),
    ])
    .args(args)
    .env("NO_COLOR", "1");
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        !dir.path().join("data/control/ironlab.db").exists(),
        "a refused --database must not fall back to SQLite"
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn control_plane_on_postgresql() {
    let _serial = serial();
    let Some(env) = preflight(
        "control_plane_on_postgresql",
        Needs {
            test_image: true,
            postgres: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let pg = Postgres::start();

    // Bad input: refused with the flag named and the reason, and nothing created.
    let (code, err) = control_fails(&["--database", "mysql://db.example/ironlab"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("--database") && err.contains("unsupported scheme"),
        "{err}"
    );
    let (code, err) = control_fails(&["--database", "postgres://u:hunter2@127.0.0.1:5"]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("names no database"), "{err}");
    assert!(
        !err.contains("hunter2"),
        "the password is never printed: {err}"
    );
    let missing = pg.server_url.replace("/postgres", "/no_such_db");
    let (code, err) = control_fails(&["--database", &missing]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("cannot open the PostgreSQL database") && err.contains("createdb"),
        "{err}"
    );

    let url = pg.create_db("ironlab");
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start_with(&env, &["--database", &url]);
    assert!(
        !p.data.join("control/ironlab.db").exists(),
        "with --database postgres://… no SQLite file is made"
    );
    let manifest = box_manifest("pg-keeper", "Kept in PostgreSQL", &image);
    assert!(
        p.create_playground(&manifest).status.success(),
        "create pg-keeper\n{}",
        p.logs()
    );
    let run = p.start_run("pg-keeper");
    let id = run["id"].as_str().expect("start prints an id").to_string();
    let bob = p.cli_ok(&["user", "create", "bob"]).trim().to_string();
    p.ssh_ok(&id, &["sh", "-c", "echo kept > /tmp/marker"]);

    // The state is in PostgreSQL, as a user of psql would find it.
    assert_eq!(
        pg.psql(&url, &format!("SELECT state FROM runs WHERE id = '{id}'")),
        "running\n"
    );
    assert_eq!(
        pg.psql(&url, "SELECT name FROM users ORDER BY name"),
        "admin\nbob\n"
    );
    assert_eq!(
        pg.psql(
            &url,
            "SELECT stock FROM playgrounds WHERE name IN ('pg-keeper', 'debian') ORDER BY name"
        ),
        "t\nf\n",
        "stock is a real boolean: the stock debian playground and the custom one"
    );

    // Restart the control plane: everything is still there and the machine still works.
    let status = p.stop_control().expect("control plane was running");
    assert!(
        status.success(),
        "control plane exit: {status}\n{}",
        p.logs()
    );
    p.start_control();
    let me = http("GET", &p.api("/me"), Some(&bob), None);
    assert_eq!(me.status, 200, "bob's token after a restart: {}", me.body);
    assert_eq!(me.json()["name"], "bob");
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(catalog.contains("pg-keeper"), "{catalog}");
    assert_eq!(p.run_view(&id)["state"], "running");
    assert_eq!(p.ssh_ok(&id, &["cat", "/tmp/marker"]), "kept\n");

    p.destroy(&id);
    p.assert_clean(&id);
    assert_eq!(
        pg.psql(&url, &format!("SELECT state FROM runs WHERE id = '{id}'")),
        "destroyed\n"
    );
}
