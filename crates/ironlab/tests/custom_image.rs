//! A custom playground from an image in a real registry, driven through the CLI: start, run
//! commands over `ironlab ssh`, check what a user sees, destroy, and find nothing left behind.

mod common;

use common::{Needs, Platform, Registry, preflight, serial};

fn manifest(name: &str, image: &str) -> String {
    format!(
        r#"kind: playground
name: {name}
title: Busybox from the test registry
description: One tiny machine.
playground:
  machines:
    - name: box
      runtime: container
      resources: {{cpu: 1, memory: 64MiB}}
      drives:
        - {{source: "{image}", mount: /, size: 256MiB}}
      users: [{{name: laborant, default: true}}]
"#
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn custom_playground_from_registry_image() {
    let _serial = serial();
    let Some(env) = preflight(
        "custom_playground_from_registry_image",
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

    // Register the playground; the catalog shows it.
    let out = p.create_playground(&manifest("busybox-box", &image));
    assert!(
        out.status.success(),
        "playground create failed: {}{}",
        text(&out.stderr),
        p.logs()
    );
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.contains("busybox-box"),
        "catalog does not list busybox-box:\n{catalog}"
    );

    // Start: one JSON object, running.
    let run = p.start_run("busybox-box");
    assert_eq!(run["state"], "running", "start printed {run}");
    assert_eq!(run["playground"], "busybox-box", "start printed {run}");
    let id = run["id"].as_str().expect("start prints an id").to_string();

    // Default user and hostname.
    assert_eq!(p.ssh_ok(&id, &["id", "-un"]), "laborant\n");
    assert_eq!(p.ssh_ok(&id, &["hostname"]), "box\n");

    // stdout and stderr are separate streams, and the exit status comes through.
    let out = p.ssh(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(text(&out.stdout), "out\n", "stdout of the remote command");
    assert_eq!(text(&out.stderr), "err\n", "stderr of the remote command");
    assert_eq!(
        out.status.code(),
        Some(7),
        "exit status of the remote command"
    );

    // The 64 MiB memory limit is enforced: a 200 MiB buffer gets the process killed, 8 MiB is fine.
    let big = p.ssh(
        &id,
        &["sh", "-c", "dd if=/dev/zero of=/dev/null bs=200M count=1"],
    );
    assert!(
        !big.status.success(),
        "a 200 MiB allocation succeeded in a 64 MiB machine: {}",
        text(&big.stderr)
    );
    let small = p.ssh(
        &id,
        &["sh", "-c", "dd if=/dev/zero of=/dev/null bs=8M count=1"],
    );
    assert!(
        small.status.success(),
        "an 8 MiB allocation failed ({}): {}",
        small.status,
        text(&small.stderr)
    );

    // The upper layer's whiteout removed /etc/remove-me from the lower layer.
    let out = p.ssh(&id, &["test", "-e", "/etc/remove-me"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "/etc/remove-me should be deleted by the whiteout"
    );
    // ... and the opaque whiteout hid the lower layer's entries of /opt/opaque.
    assert_eq!(
        p.ssh_ok(&id, &["ls", "/opt/opaque"]),
        "new\n",
        "opaque directory after unpacking"
    );

    // The run is listed.
    let list = p.cli_ok(&["playground", "list"]);
    assert!(
        list.contains(&id),
        "playground list does not show {id}:\n{list}"
    );

    // Destroy: nothing of the run stays on the host.
    assert!(
        p.run_dir(&id).exists(),
        "worker keeps runs under {}",
        p.run_dir(&id).display()
    );
    p.destroy(&id);
    p.assert_clean(&id);
    let list = p.cli_ok(&["playground", "list"]);
    assert!(
        !list
            .lines()
            .any(|l| l.contains(&id) && l.contains("running")),
        "a destroyed run still shows as running:\n{list}"
    );

    // And the playground can be removed again.
    p.cli_ok(&["playground", "remove", "busybox-box"]);
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        !catalog.contains("busybox-box"),
        "removed playground still listed:\n{catalog}"
    );
}
