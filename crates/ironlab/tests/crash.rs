//! Killing the worker or the control plane while a run starts, then starting it again, converges:
//! the run ends `running` or `failed` (never stuck), and destroying it leaves nothing behind.

mod common;

use std::time::Duration;

use common::{Needs, Platform, Registry, http, preflight, serial, wait_for};

fn manifest(image: &str) -> String {
    format!(
        r#"kind: playground
name: crashy
title: Crash test
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
"#
    )
}

/// Starts a run through the API and returns its id once the API says `starting` (or later).
fn start_and_wait_for_starting(p: &mut Platform) -> (String, String) {
    let token = p.token();
    let r = http(
        "POST",
        &p.api("/runs"),
        Some(&token),
        Some(r#"{"playground":"crashy"}"#),
    );
    assert_eq!(r.status, 201, "POST /runs: {}", r.body);
    let id = r.json()["id"].as_str().expect("run id").to_string();
    p.track(&id);
    let url = p.api(&format!("/runs/{id}"));
    let seen = wait_for(Duration::from_secs(60), Duration::from_millis(5), || {
        let r = http("GET", &url, Some(&token), None);
        let st = r.json()["state"].as_str().map(str::to_string)?;
        (st != "pending").then_some(st)
    })
    .unwrap_or_else(|| panic!("run {id} stayed pending for 60 s\n{}", p.logs()));
    (id, seen)
}

fn finish(p: &Platform, id: &str, what: &str) {
    let run = p.wait_state(id, &["running", "failed"], Duration::from_secs(180));
    eprintln!("{what}: run {id} converged to {}", run["state"]);
    if run["state"] == "running" {
        // It really works, not just says so.
        assert_eq!(p.ssh_ok(id, &["hostname"]), "box\n");
    } else {
        assert!(run["reason"].is_string(), "a failed run says why: {run}");
    }
    p.destroy(id);
    p.assert_clean(id);
}

#[test]
fn killing_the_worker_mid_start_converges() {
    let _serial = serial();
    let Some(env) = preflight(
        "killing_the_worker_mid_start_converges",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    assert!(
        p.create_playground(&manifest(&image)).status.success(),
        "create crashy\n{}",
        p.logs()
    );

    // Cold image: the worker is killed while it pulls/builds/starts.
    let (id, seen) = start_and_wait_for_starting(&mut p);
    p.kill_worker();
    eprintln!("killed the worker (-9) when the run was {seen}");
    std::thread::sleep(Duration::from_millis(500));
    p.start_worker();
    finish(&p, &id, "worker killed on a cold image");

    // Warm image: the kill lands while the container itself starts.
    let (id, seen) = start_and_wait_for_starting(&mut p);
    p.kill_worker();
    eprintln!("killed the worker (-9) when the run was {seen}");
    p.start_worker();
    finish(&p, &id, "worker killed on a warm image");
}

#[test]
fn killing_the_control_plane_mid_start_converges() {
    let _serial = serial();
    let Some(env) = preflight(
        "killing_the_control_plane_mid_start_converges",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    assert!(
        p.create_playground(&manifest(&image)).status.success(),
        "create crashy\n{}",
        p.logs()
    );

    let (id, seen) = start_and_wait_for_starting(&mut p);
    p.kill_control();
    eprintln!("killed the control plane (-9) when the run was {seen}");
    std::thread::sleep(Duration::from_millis(500));
    p.start_control();
    finish(&p, &id, "control plane killed");

    // Both at once.
    let (id, seen) = start_and_wait_for_starting(&mut p);
    p.kill_control();
    p.kill_worker();
    eprintln!("killed both (-9) when the run was {seen}");
    p.start_worker();
    p.start_control();
    finish(&p, &id, "both killed");
}
