//! The stock `docker` playground through the whole platform: a microVM of the stock docker image
//! (`images/docker/build.sh`: Debian 12, systemd, Debian's docker.io, the local image
//! `ironlab/busybox` loaded at build time) started from the catalog; as the default user,
//! `ironlab ssh RUN -- docker run --rm ironlab/busybox echo hi` prints `hi` without any registry;
//! destroy leaves no QEMU process, cgroup or file behind.
//!
//! TCG (no usable KVM) is slow: the first `docker` command waits for dockerd, which starts with
//! the VM (socket activation keeps the command waiting instead of failing).

mod common;

use common::{Needs, Platform, preflight, serial};

#[test]
fn docker_playground_runs_the_local_busybox_image() {
    let _serial = serial();
    let Some(env) = preflight(
        "docker_playground_runs_the_local_busybox_image",
        Needs {
            docker: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let mut p = Platform::start(&env);
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.lines().any(|l| l.starts_with("docker ")),
        "{catalog}"
    );

    let run = p.start_run("docker");
    assert_eq!(run["state"], "running", "start printed {run}");
    let id = run["id"].as_str().expect("id").to_string();

    // The default user is laborant, in the docker group: no sudo needed for docker.
    let groups = p.ssh_ok(&id, &["id", "-nG"]);
    assert!(
        groups.split_whitespace().any(|g| g == "docker"),
        "laborant's groups: {groups}"
    );
    assert_eq!(p.ssh_ok(&id, &["id", "-un"]).trim(), "laborant");

    // The image loaded at build time runs; nothing is pulled (the VM has no way out anyway).
    let out = p.ssh_ok(
        &id,
        &["docker", "run", "--rm", "ironlab/busybox", "echo", "hi"],
    );
    assert_eq!(out, "hi\n", "docker run printed {out:?}");
    let images = p.ssh_ok(
        &id,
        &[
            "docker",
            "image",
            "ls",
            "--format",
            "{{.Repository}}:{{.Tag}}",
        ],
    );
    assert!(
        images.lines().any(|l| l == "ironlab/busybox:latest"),
        "docker image ls: {images}"
    );
    // systemd runs dockerd; the system bus answers the default user.
    assert_eq!(
        p.ssh_ok(&id, &["systemctl", "is-active", "docker.service"])
            .trim(),
        "active"
    );
    assert_eq!(p.ssh_ok(&id, &["cat", "/proc/1/comm"]).trim(), "systemd");
    // The memory the catalog promises (512 MiB, part of it the kernel's).
    let mem = p.ssh_ok(&id, &["grep", "MemTotal", "/proc/meminfo"]);
    let kb: u64 = mem
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("MemTotal in {mem:?}"));
    assert!((400 * 1024..=512 * 1024).contains(&kb), "MemTotal {kb} kB");

    p.destroy(&id);
    p.assert_clean(&id);
}
