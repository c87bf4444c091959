//! Stopping the control plane (SIGTERM) and starting it again on the same data dir keeps users,
//! tokens, playgrounds and runs; a running machine keeps working.

mod common;

use common::{Needs, Platform, Registry, box_manifest, http, preflight, serial};

#[test]
fn control_plane_restart_keeps_everything() {
    let _serial = serial();
    let Some(env) = preflight(
        "control_plane_restart_keeps_everything",
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
    let manifest = box_manifest("keeper", "Kept across restarts", &image);
    assert!(
        p.create_playground(&manifest).status.success(),
        "create keeper\n{}",
        p.logs()
    );
    let run = p.start_run("keeper");
    let id = run["id"].as_str().expect("start prints an id").to_string();
    let token = p.token();
    let me_before = http("GET", &p.api("/me"), Some(&token), None).json();
    // A second user, whose token must survive too.
    let bob_token = p.cli_ok(&["user", "create", "bob"]).trim().to_string();
    assert!(!bob_token.is_empty(), "`user create` printed no token");
    let bob_before = http("GET", &p.api("/me"), Some(&bob_token), None);
    assert_eq!(
        bob_before.status, 200,
        "bob's new token: {}",
        bob_before.body
    );
    p.ssh_ok(&id, &["sh", "-c", "echo kept > /tmp/marker"]);

    let status = p.stop_control().expect("control plane was running");
    assert!(
        status.success(),
        "control plane did not exit cleanly on SIGTERM: {status}\n{}",
        p.logs()
    );
    p.start_control();

    // Same admin token, same user.
    assert_eq!(p.token(), token, "the admin token changed across a restart");
    let me_after = http("GET", &p.api("/me"), Some(&token), None).json();
    assert_eq!(me_after, me_before, "the user changed across a restart");
    let bob_after = http("GET", &p.api("/me"), Some(&bob_token), None);
    assert_eq!(
        bob_after.status, 200,
        "bob's token after a restart: {}",
        bob_after.body
    );
    assert_eq!(
        bob_after.json(),
        bob_before.json(),
        "bob changed across a restart"
    );
    assert_eq!(bob_after.json()["name"], "bob");
    // The playground and the run are still there, and the run still works.
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.contains("keeper"),
        "custom playground lost across a restart:\n{catalog}"
    );
    let list = p.cli_ok(&["playground", "list"]);
    assert!(
        list.contains(&id),
        "run {id} lost across a restart:\n{list}"
    );
    assert_eq!(p.run_view(&id)["state"], "running");
    assert_eq!(p.ssh_ok(&id, &["cat", "/tmp/marker"]), "kept\n");

    p.destroy(&id);
    p.assert_clean(&id);
}
