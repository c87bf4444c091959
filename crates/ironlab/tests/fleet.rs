//! A fleet: one control plane on PostgreSQL, two workers (`--worker-url local=… --worker-url
//! w2=…`), real processes. Runs are spread over the workers and pinned to theirs: each
//! machine lives in its own worker's pool, and the terminal reaches it through that worker's
//! relay. A worker that stops answering gets no new runs; when it comes back its run still
//! works. Destroy leaves nothing on either worker.

mod common;

use std::time::Duration;

use common::{Needs, Platform, Postgres, Registry, box_manifest, preflight, serial, wait_for};

#[test]
fn runs_spread_over_two_workers() {
    let _serial = serial();
    let Some(env) = preflight(
        "runs_spread_over_two_workers",
        Needs {
            test_image: true,
            postgres: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let pg = Postgres::start();
    let url = pg.create_db("fleet");
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start_with(&env, &["--database", &url]);
    p.add_worker("w2");
    let manifest = box_manifest("fleet-box", "One box", &image);
    assert!(
        p.create_playground(&manifest).status.success(),
        "create fleet-box\n{}",
        p.logs()
    );
    let on_disk = |p: &Platform, worker: &str, run: &str| {
        p.worker_dir(worker).join("pool/runs").join(run).is_dir()
    };

    // Two runs: the first worker takes the first (a tie), the other the second.
    let r1 = p.start_run("fleet-box")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let r2 = p.start_run("fleet-box")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(
        on_disk(&p, "local", &r1) && !on_disk(&p, "w2", &r1),
        "{r1} on local"
    );
    assert!(
        on_disk(&p, "w2", &r2) && !on_disk(&p, "local", &r2),
        "{r2} on w2"
    );
    assert_eq!(
        pg.psql(
            &url,
            "SELECT id || ' ' || worker FROM runs ORDER BY created_at"
        ),
        format!("{r1} local\n{r2} w2\n")
    );
    // Each terminal goes through its own worker's relay to its own machine.
    p.ssh_ok(&r1, &["sh", "-c", "echo one > /tmp/which"]);
    p.ssh_ok(&r2, &["sh", "-c", "echo two > /tmp/which"]);
    assert_eq!(p.ssh_ok(&r1, &["cat", "/tmp/which"]), "one\n");
    assert_eq!(p.ssh_ok(&r2, &["cat", "/tmp/which"]), "two\n");

    // w2 stops answering: the next run goes to the first worker although w2 is less loaded
    // once r3 is there.
    let r3 = p.start_run("fleet-box")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(on_disk(&p, "local", &r3), "{r3}: a tie goes to local");
    let status = p.stop_extra_worker("w2").expect("w2 was running");
    assert!(status.success(), "w2 exit: {status}");
    // The admin sees it: `ironlab workers` names it and exits 1.
    let out = p.cli(&["workers"]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("worker w2 does not answer") && text.contains("unreachable"),
        "{text}"
    );
    // The control plane re-uses a worker's status for up to 10 s unless a call failed.
    std::thread::sleep(Duration::from_secs(11));
    let r4 = p.start_run("fleet-box")["id"]
        .as_str()
        .expect("id")
        .to_string();
    assert!(on_disk(&p, "local", &r4), "{r4}: w2 does not answer");

    // w2 comes back: its run is still there and still works.
    p.restart_extra_worker("w2");
    let back = wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
        let out = p.cli(&["ssh", &r2, "--", "cat", "/tmp/which"]);
        (out.status.success() && String::from_utf8_lossy(&out.stdout) == "two\n").then_some(())
    });
    assert!(
        back.is_some(),
        "run {r2} on w2 after its restart\n{}",
        p.logs()
    );

    for (run, worker) in [(&r1, "local"), (&r2, "w2"), (&r3, "local"), (&r4, "local")] {
        p.destroy(run);
        p.assert_clean_on(run, worker);
    }
    assert_eq!(
        pg.psql(&url, "SELECT DISTINCT state FROM runs"),
        "destroyed\n"
    );
}
