//! Persistent playgrounds on the real platform (crun containers, the loop-backed XFS pool):
//! stop and restart keep files and installed packages; clones are instant, independent and cost
//! no space; a stopped run saved as a playground starts again from its state, across a chain of
//! saves; killing the worker during stop, clone and save leaves a consistent state and no leaks.
//!
//! "Installing a package" without internet: on the stock debian image, a real `.deb` is built in
//! the machine with `dpkg-deb` and installed with `dpkg -i` (dpkg's database and the installed
//! program must survive); on the busybox test image, a program is installed into
//! `/usr/local/bin` (what `make install` does).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Needs, Platform, Registry, http, preflight, serial, wait_for};
use serde_json::Value;

fn busybox_manifest(name: &str, image: &str) -> String {
    format!(
        r#"kind: playground
name: {name}
title: Persistence test
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
      startupFiles: [{{path: /etc/motd, content: "from the manifest\n", mode: "0644"}}]
"#
    )
}

fn pool(p: &Platform) -> PathBuf {
    p.data.join("worker/pool")
}

/// Bytes used on the pool's filesystem (after a sync).
fn pool_used(p: &Platform) -> u64 {
    let _ = std::process::Command::new("sync").status();
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=used"])
        .arg(pool(p))
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the used bytes")
}

fn stop(p: &Platform, id: &str) -> Value {
    p.cli_ok(&["playground", "stop", id]);
    let run = p.wait_state(id, &["stopped"], Duration::from_secs(60));
    assert!(
        run["storage_bytes"].is_u64(),
        "a stopped run reports its storage: {run}"
    );
    run
}

fn restart(p: &Platform, id: &str) {
    let out = p.cli_ok(&["playground", "restart", id]);
    assert_eq!(out.trim(), id, "restart prints the run id");
    assert_eq!(p.run_view(id)["state"], "running");
}

fn clone(p: &mut Platform, id: &str, title: &str) -> String {
    let new = p
        .cli_ok(&["playground", "clone", id, "--title", title])
        .trim()
        .to_string();
    p.track(&new);
    let v = p.run_view(&new);
    assert_eq!(v["state"], "stopped", "a clone starts stopped: {v}");
    assert_eq!(v["title"], title);
    assert_eq!(v["cloned_from"], id);
    new
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn start_busybox_platform(test: &str) -> Option<(Platform, Registry, String)> {
    let env = preflight(
        test,
        Needs {
            test_image: true,
            ..Needs::default()
        },
    )?;
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let p = Platform::start(&env);
    Some((p, registry, image))
}

#[test]
fn stop_and_restart_keep_files_and_an_installed_package() {
    let _serial = serial();
    let Some(env) = preflight(
        "stop_and_restart_keep_files_and_an_installed_package",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let mut p = Platform::start(&env);
    let run = p.start_run("debian");
    let id = run["id"].as_str().expect("run id").to_string();

    p.ssh_ok(&id, &["sh", "-c", "echo 'my notes' > ~/notes.txt"]);
    // A real package: built here, installed with dpkg.
    let build = r#"set -e
d=$(mktemp -d)
mkdir -p $d/pkg/DEBIAN $d/pkg/usr/local/bin
printf 'Package: ironlab-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test package\n' > $d/pkg/DEBIAN/control
printf '#!/bin/sh\necho hello from a package\n' > $d/pkg/usr/local/bin/ironlab-hello
chmod 755 $d/pkg/usr/local/bin/ironlab-hello
dpkg-deb --build $d/pkg $d/hello.deb >/dev/null
sudo -n dpkg -i $d/hello.deb >/dev/null
"#;
    p.ssh_ok(&id, &["bash", "-c", build]);
    assert_eq!(p.ssh_ok(&id, &["ironlab-hello"]), "hello from a package\n");

    let stopped = stop(&p, &id);
    assert!(
        !p.run_dir(&id).join("debian/rootfs/etc").exists(),
        "the drive is unmounted while stopped"
    );
    let left = p.leftovers(&id);
    assert!(
        left.iter().all(|l| l.starts_with("run directory")),
        "a stopped run holds nothing but its files: {left:?}"
    );
    eprintln!(
        "stopped debian run holds {} bytes",
        stopped["storage_bytes"]
    );
    let list = p.cli_ok(&["playground", "list"]);
    assert!(
        list.contains("stopped") && list.contains("storage:"),
        "{list}"
    );

    restart(&p, &id);
    assert_eq!(p.ssh_ok(&id, &["cat", "notes.txt"]), "my notes\n");
    assert_eq!(p.ssh_ok(&id, &["ironlab-hello"]), "hello from a package\n");
    let status = p.ssh_ok(&id, &["dpkg-query", "-W", "-f=${Status}", "ironlab-hello"]);
    assert_eq!(status, "install ok installed");
    // The default user still works as before (not re-created).
    assert_eq!(p.ssh_ok(&id, &["id", "-un"]), "laborant\n");

    p.destroy(&id);
    p.assert_clean(&id);
}

#[test]
fn clones_are_instant_independent_and_take_no_space() {
    let _serial = serial();
    let Some((mut p, _registry, image)) =
        start_busybox_platform("clones_are_instant_independent_and_take_no_space")
    else {
        return;
    };
    assert!(
        p.create_playground(&busybox_manifest("persist-clone", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    let run = p.start_run("persist-clone");
    let origin = run["id"].as_str().expect("run id").to_string();
    p.ssh_ok(
        &origin,
        &["sh", "-c", "echo origin > /home/laborant/origin"],
    );
    // Clone and save need a stopped run.
    let r = http(
        "POST",
        &p.api(&format!("/runs/{origin}/clone")),
        Some(&p.token()),
        None,
    );
    assert_eq!(r.status, 409, "cloning a running run: {}", r.body);
    assert!(r.body.contains("stop it"), "{}", r.body);
    stop(&p, &origin);

    let before = pool_used(&p);
    let mut clones = Vec::new();
    for i in 0..3 {
        let t0 = Instant::now();
        clones.push(clone(&mut p, &origin, &format!("clone {i}")));
        eprintln!("clone {i} took {:?} (CLI round trip)", t0.elapsed());
    }
    let grown = pool_used(&p).saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "3 clones grew the pool by {grown} bytes (limit 1 MiB)"
    );

    for (i, c) in clones.iter().enumerate() {
        restart(&p, c);
        assert_eq!(p.ssh_ok(c, &["cat", "/home/laborant/origin"]), "origin\n");
        p.ssh_ok(
            c,
            &["sh", "-c", &format!("echo {i} > /home/laborant/mine-{i}")],
        );
    }
    restart(&p, &origin);
    assert_eq!(
        p.ssh_ok(&origin, &["ls", "/home/laborant"]),
        "origin\n",
        "the origin sees none of its clones' changes"
    );
    for (i, c) in clones.iter().enumerate() {
        let ls = p.ssh_ok(c, &["ls", "/home/laborant"]);
        assert_eq!(
            ls,
            format!("mine-{i}\norigin\n"),
            "clone {c} sees only its own change"
        );
    }
    for id in clones.iter().chain([&origin]) {
        p.destroy(id);
        p.assert_clean(id);
    }
}

#[test]
fn saved_playgrounds_start_from_the_saved_state_across_a_chain() {
    let _serial = serial();
    let Some((mut p, _registry, image)) =
        start_busybox_platform("saved_playgrounds_start_from_the_saved_state_across_a_chain")
    else {
        return;
    };
    assert!(
        p.create_playground(&busybox_manifest("persist-base", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    // A manifest may not name saved drives itself.
    let forged = busybox_manifest("forged", "saved://abc123");
    let out = p.create_playground(&forged);
    assert!(
        !out.status.success(),
        "a manifest with saved:// was accepted"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("drives[0].source"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut from = "persist-base".to_string();
    let mut all_runs = Vec::new();
    for generation in 1..=3 {
        let run = p.start_run(&from);
        let id = run["id"].as_str().expect("run id").to_string();
        all_runs.push(id.clone());
        let have = p.ssh_ok(&id, &["ls", "/home/laborant"]);
        let want: String = (1..generation).map(|g| format!("gen{g}\n")).collect();
        assert_eq!(
            have, want,
            "generation {generation} starts from the saved state"
        );
        p.ssh_ok(
            &id,
            &[
                "sh",
                "-c",
                &format!("echo {generation} > /home/laborant/gen{generation}"),
            ],
        );
        stop(&p, &id);
        let name = format!("persist-save{generation}");
        let printed = p.cli_ok(&[
            "playground",
            "save",
            &id,
            "--name",
            &name,
            "--title",
            &format!("Generation {generation}"),
        ]);
        assert_eq!(printed.trim(), name);
        let pg = http(
            "GET",
            &p.api(&format!("/playgrounds/{name}")),
            Some(&p.token()),
            None,
        );
        assert_eq!(pg.status, 200, "{}", pg.body);
        assert_eq!(pg.json()["parent"], from.as_str());
        from = name;
    }
    let catalog = p.cli_ok(&["playground", "catalog"]);
    assert!(
        catalog.contains("persist-save2 < persist-save1 < persist-base"),
        "the catalog shows the chain:\n{catalog}"
    );

    // The last save, started twice: both from the saved state, independent of each other.
    let a = p.start_run("persist-save3")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let b = p.start_run("persist-save3")["id"]
        .as_str()
        .expect("id")
        .to_string();
    for id in [&a, &b] {
        assert_eq!(
            p.ssh_ok(id, &["ls", "/home/laborant"]),
            "gen1\ngen2\ngen3\n"
        );
    }
    p.ssh_ok(&a, &["sh", "-c", "echo a > /home/laborant/only-a"]);
    assert_eq!(
        p.ssh_ok(&b, &["ls", "/home/laborant"]),
        "gen1\ngen2\ngen3\n"
    );
    let storage = http("GET", &p.api("/storage"), Some(&p.token()), None).json();
    assert_eq!(
        storage["items"]
            .as_array()
            .map(|a| a.iter().filter(|i| i["kind"] == "playground").count()),
        Some(3),
        "{storage}"
    );

    // The quota: over it, stopping (which keeps drives) is refused with a clear message.
    let out = p.cli_ok(&["user", "quota", "admin", "1MiB"]);
    assert!(out.contains("of 1.0 MiB used"), "{out}");
    let refused = p.cli(&["playground", "stop", &a]);
    assert!(!refused.status.success(), "stop over quota succeeded");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("storage quota"), "{err}");
    assert_eq!(p.run_view(&a)["state"], "running", "nothing changed");
    let out = p.cli_ok(&["user", "quota", "admin", "default"]);
    assert!(out.contains("of 10.0 GiB used"), "{out}");
    stop(&p, &a);

    for id in all_runs.iter().chain([&a, &b]) {
        p.destroy(id);
        p.assert_clean(id);
    }
    for generation in 1..=3 {
        p.cli_ok(&["playground", "remove", &format!("persist-save{generation}")]);
    }
    assert_eq!(
        entries(&pool(&p).join("saved")),
        Vec::<String>::new(),
        "removing saved playgrounds removes their drives"
    );
}

/// Runs `f` in a thread, kills the worker (-9) after `delay`, starts it again; returns what `f`
/// returned.
fn kill_worker_during<T: Send + 'static>(
    p: &mut Platform,
    delay: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let h = std::thread::spawn(f);
    std::thread::sleep(delay);
    p.kill_worker();
    std::thread::sleep(Duration::from_millis(200));
    p.start_worker();
    h.join().expect("the request thread")
}

#[test]
fn killing_the_worker_during_stop_clone_and_save_stays_consistent() {
    let _serial = serial();
    let Some((mut p, _registry, image)) =
        start_busybox_platform("killing_the_worker_during_stop_clone_and_save_stays_consistent")
    else {
        return;
    };
    assert!(
        p.create_playground(&busybox_manifest("persist-crash", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    let id = p.start_run("persist-crash")["id"]
        .as_str()
        .expect("id")
        .to_string();
    p.ssh_ok(&id, &["sh", "-c", "echo kept > /home/laborant/kept"]);

    // Stop: the kill lands while the worker shuts the machine down.
    let (server, token) = (p.server(), p.token());
    let url = format!("{server}/api/v1/runs/{id}/stop");
    let r = kill_worker_during(&mut p, Duration::from_millis(100), move || {
        http("POST", &url, Some(&token), None)
    });
    assert_eq!(r.status, 202, "{}", r.body);
    p.wait_state(&id, &["stopped"], Duration::from_secs(120));
    restart(&p, &id);
    assert_eq!(p.ssh_ok(&id, &["cat", "/home/laborant/kept"]), "kept\n");
    stop(&p, &id);

    // Clone and save, each killed a few times at different moments.
    let mut made_runs = Vec::new();
    for (i, delay_ms) in [0u64, 3, 10, 25].into_iter().enumerate() {
        let (url, token) = (p.api(&format!("/runs/{id}/clone")), p.token());
        let r = kill_worker_during(&mut p, Duration::from_millis(delay_ms), move || {
            common::try_http("POST", &url, Some(&token), Some("{}"))
        });
        eprintln!(
            "clone killed after {delay_ms} ms: {:?}",
            r.as_ref().map(|r| r.status)
        );
        let (url, token) = (p.api(&format!("/runs/{id}/save")), p.token());
        let name = format!("persist-crash-save{i}");
        let body = format!(r#"{{"name":"{name}"}}"#);
        let r = kill_worker_during(&mut p, Duration::from_millis(delay_ms), move || {
            common::try_http("POST", &url, Some(&token), Some(&body))
        });
        eprintln!(
            "save killed after {delay_ms} ms: {:?}",
            r.as_ref().map(|r| r.status)
        );
    }
    // Let the reconciler finish whatever was in flight.
    let token = p.token();
    let settled = wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
        let runs = http("GET", &p.api("/runs"), Some(&token), None).json();
        let list = runs.as_array()?.clone();
        list.iter()
            .all(|r| {
                matches!(
                    r["state"].as_str(),
                    Some("stopped" | "destroyed" | "failed")
                )
            })
            .then_some(list)
    })
    .unwrap_or_else(|| panic!("runs did not settle\n{}", p.logs()));
    for r in &settled {
        let rid = r["id"].as_str().expect("id").to_string();
        p.track(&rid);
        if rid != id && r["state"] == "stopped" {
            made_runs.push(rid);
        }
    }
    // The pool holds exactly the runs the control plane knows, and no half-made copy.
    let on_disk: Vec<String> = entries(&pool(&p).join("runs"));
    let mut known: Vec<String> = made_runs.clone();
    known.push(id.clone());
    known.sort();
    assert_eq!(
        on_disk, known,
        "runs on the worker vs stopped runs in the API"
    );
    let playgrounds = http("GET", &p.api("/playgrounds"), Some(&token), None).json();
    let saved_names: Vec<String> = playgrounds
        .as_array()
        .expect("list")
        .iter()
        .filter(|pg| pg["parent"] == "persist-crash")
        .map(|pg| pg["name"].as_str().expect("name").to_string())
        .collect();
    let saved_dirs = entries(&pool(&p).join("saved"));
    assert!(
        saved_dirs.iter().all(|d| !d.starts_with('.')),
        "no half-made save remains: {saved_dirs:?}"
    );
    assert_eq!(
        saved_dirs.len(),
        saved_names.len(),
        "saved drives on the worker {saved_dirs:?} vs saved playgrounds {saved_names:?}"
    );
    // Every clone and save that exists works and holds the state.
    for c in &made_runs {
        restart(&p, c);
        assert_eq!(p.ssh_ok(c, &["cat", "/home/laborant/kept"]), "kept\n");
    }
    if let Some(name) = saved_names.first() {
        let s = p.start_run(name)["id"].as_str().expect("id").to_string();
        assert_eq!(p.ssh_ok(&s, &["cat", "/home/laborant/kept"]), "kept\n");
        made_runs.push(s);
    }
    for r in made_runs.iter().chain([&id]) {
        p.destroy(r);
        p.assert_clean(r);
    }
    for name in &saved_names {
        p.cli_ok(&["playground", "remove", name]);
    }
    assert_eq!(entries(&pool(&p).join("saved")), Vec::<String>::new());
}

/// Restarts the worker so that it kills itself (SIGKILL) at `point`, runs `action` in a thread,
/// waits for the worker to die there, starts it again normally; returns what `action` returned.
fn crash_at<T: Send + 'static>(
    p: &mut Platform,
    point: &str,
    action: impl FnOnce() -> T + Send + 'static,
) -> T {
    p.stop_worker();
    p.worker_env = vec![("IRONLAB_TEST_CRASH_AT".into(), point.into())];
    p.start_worker();
    let h = std::thread::spawn(action);
    let died = p.wait_worker_exit(Duration::from_secs(60));
    assert!(
        died.is_some(),
        "the worker did not reach crash point {point}\n{}",
        p.logs()
    );
    p.worker_env.clear();
    p.start_worker();
    h.join().expect("the request thread")
}

fn no_temporaries(p: &Platform) {
    for dir in ["runs", "saved"] {
        let left: Vec<String> = entries(&pool(p).join(dir))
            .into_iter()
            .filter(|e| e.starts_with('.'))
            .collect();
        assert!(
            left.is_empty(),
            "pool/{dir} holds half-made copies: {left:?}"
        );
    }
}

#[test]
fn a_worker_killed_at_each_step_ends_in_the_old_or_the_new_state() {
    let _serial = serial();
    let Some((mut p, _registry, image)) =
        start_busybox_platform("a_worker_killed_at_each_step_ends_in_the_old_or_the_new_state")
    else {
        return;
    };
    assert!(
        p.create_playground(&busybox_manifest("persist-points", &image))
            .status
            .success(),
        "create\n{}",
        p.logs()
    );
    let id = p.start_run("persist-points")["id"]
        .as_str()
        .expect("id")
        .to_string();
    p.ssh_ok(&id, &["sh", "-c", "echo kept > /home/laborant/kept"]);

    // Stop, killed before and after the machines went down: the stop is finished at recovery.
    for point in ["stop:stopping", "stop:halted"] {
        let (url, token) = (p.api(&format!("/runs/{id}/stop")), p.token());
        let r = crash_at(&mut p, point, move || {
            http("POST", &url, Some(&token), None)
        });
        assert_eq!(r.status, 202, "{}", r.body);
        p.wait_state(&id, &["stopped"], Duration::from_secs(90));
        let left = p.leftovers(&id);
        assert!(
            left.iter().all(|l| l.starts_with("run directory")),
            "{point}: a stopped run holds nothing but its files: {left:?}"
        );
        no_temporaries(&p);
        restart(&p, &id);
        assert_eq!(
            p.ssh_ok(&id, &["cat", "/home/laborant/kept"]),
            "kept\n",
            "{point}"
        );
    }
    stop(&p, &id);

    // Restart, killed once the machines are up: undone at recovery (stopped, with the reason).
    let (url, token) = (p.api(&format!("/runs/{id}/restart")), p.token());
    let r = crash_at(&mut p, "restart:booted", move || {
        http("POST", &url, Some(&token), None)
    });
    assert_eq!(r.status, 202, "{}", r.body);
    let v = p.wait_state(&id, &["stopped"], Duration::from_secs(90));
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("worker restarted"),
        "the run says why it is stopped: {v}"
    );
    let left = p.leftovers(&id);
    assert!(
        left.iter().all(|l| l.starts_with("run directory")),
        "{left:?}"
    );
    restart(&p, &id);
    assert_eq!(p.ssh_ok(&id, &["cat", "/home/laborant/kept"]), "kept\n");
    stop(&p, &id);

    // Clone and save, killed before and after the rename: the request still succeeds (the
    // control plane asks again; the worker's clone and save are idempotent by id).
    let mut made = Vec::new();
    for point in ["clone:assembled", "clone:renamed"] {
        let (url, token) = (p.api(&format!("/runs/{id}/clone")), p.token());
        let r = crash_at(&mut p, point, move || {
            http("POST", &url, Some(&token), Some("{}"))
        });
        assert_eq!(r.status, 201, "{point}: {}", r.body);
        let c = r.json()["id"].as_str().expect("id").to_string();
        p.track(&c);
        no_temporaries(&p);
        restart(&p, &c);
        assert_eq!(
            p.ssh_ok(&c, &["cat", "/home/laborant/kept"]),
            "kept\n",
            "{point}"
        );
        made.push(c);
    }
    let mut saves = Vec::new();
    for (i, point) in ["save:assembled", "save:renamed"].into_iter().enumerate() {
        let (url, token) = (p.api(&format!("/runs/{id}/save")), p.token());
        let name = format!("persist-point-save{i}");
        let body = format!(r#"{{"name":"{name}"}}"#);
        let r = crash_at(&mut p, point, move || {
            http("POST", &url, Some(&token), Some(&body))
        });
        assert_eq!(r.status, 201, "{point}: {}", r.body);
        no_temporaries(&p);
        let s = p.start_run(&name)["id"].as_str().expect("id").to_string();
        assert_eq!(
            p.ssh_ok(&s, &["cat", "/home/laborant/kept"]),
            "kept\n",
            "{point}"
        );
        made.push(s);
        saves.push(name);
    }
    assert_eq!(entries(&pool(&p).join("saved")).len(), saves.len());

    for r in made.iter().chain([&id]) {
        p.destroy(r);
        p.assert_clean(r);
    }
    for name in &saves {
        p.cli_ok(&["playground", "remove", name]);
    }
    assert_eq!(entries(&pool(&p).join("saved")), Vec::<String>::new());
}

/// The microVM kit and QEMU, or `None` (with a message; a failure under
/// `IRONLAB_E2E_REQUIRED=1`).
fn vm_kit(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("IRONLAB_VM_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/ironlab/kernel".into());
    let qemu = common::which("qemu-system-x86_64").is_some()
        || Path::new("/usr/bin/qemu-system-x86_64").is_file();
    if qemu && dir.join("vmlinuz").is_file() && dir.join("initramfs.cpio").is_file() {
        return Some(dir);
    }
    let reason = format!(
        "needs qemu-system-x86_64 and the microVM kit in {} (images/kernel/build.sh)",
        dir.display()
    );
    if common::required() {
        panic!("{test}: cannot run: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
    None
}

const VM_AND_CONTAINER: &str = r#"
kind: playground
name: vm-persist
title: A microVM and a container
playground:
  networks:
    - {name: lan, subnet: 172.16.9.0/24}
  machines:
    - name: vm
      runtime: microvm
      resources: {cpu: 1, memory: 256MiB}
      drives: [{source: debian, mount: /, size: 2GiB}]
      network: {interfaces: [{network: lan}]}
    - name: box
      runtime: container
      resources: {memory: 64MiB}
      drives: [{source: debian, mount: /, size: 1GiB}]
      network: {interfaces: [{network: lan}]}
  egress: none
"#;

/// `ironlab ssh RUN --machine M -- sh -c SCRIPT`, requiring exit 0; returns stdout.
fn on(p: &Platform, run: &str, machine: &str, script: &str) -> String {
    let out = p.cli(&["ssh", run, "--machine", machine, "--", "sh", "-c", script]);
    assert!(
        out.status.success(),
        "{machine}$ {script} failed ({}):\n{}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        p.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The microVM and the container of one run find each other by name and ping each other.
fn assert_neighbours(p: &Platform, run: &str) {
    assert_eq!(
        on(p, run, "vm", "getent hosts box")
            .split_whitespace()
            .next(),
        Some("172.16.9.3")
    );
    assert_eq!(
        on(p, run, "box", "getent hosts vm")
            .split_whitespace()
            .next(),
        Some("172.16.9.2")
    );
    let addr = on(p, run, "vm", "ip -o -4 addr show eth0");
    assert!(addr.contains("inet 172.16.9.2/24"), "{addr}");
    on(p, run, "vm", "sudo -n ping -c1 -W5 box >/dev/null");
    on(p, run, "box", "sudo -n ping -c1 -W5 vm >/dev/null");
}

/// Issue 7 for microVMs, through the whole platform: a debian microVM (systemd) beside a
/// container on one network. A file and a program installed in `/usr/local/bin` survive stop and
/// restart, and so does the network (names, addresses, ping both ways); a clone sees the state,
/// and what changes in the clone does not show in the origin. The stop keeps the microVM's RAM:
/// the restart resumes it (same boot id, a process started before still runs, a tmpfs file is
/// there, the clock is set), once; a clone boots from the synced drive.
#[test]
fn a_microvm_keeps_its_state_and_network_across_stop_restart_and_clone() {
    let _serial = serial();
    let test = "a_microvm_keeps_its_state_and_network_across_stop_restart_and_clone";
    let Some(env) = preflight(
        test,
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    if vm_kit(test).is_none() {
        return;
    }
    let mut p = Platform::start(&env);
    let out = p.create_playground(VM_AND_CONTAINER);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = p.start_run("vm-persist");
    assert_eq!(run["state"], "running", "start printed {run}");
    let id = run["id"].as_str().expect("run id").to_string();
    assert_neighbours(&p, &id);

    on(&p, &id, "vm", "echo 'my notes' > ~/notes.txt");
    on(
        &p,
        &id,
        "vm",
        "printf '#!/bin/sh\\necho hello from the vm\\n' | sudo -n tee /usr/local/bin/vm-hello >/dev/null \
         && sudo -n chmod 755 /usr/local/bin/vm-hello",
    );
    assert_eq!(on(&p, &id, "vm", "vm-hello"), "hello from the vm\n");

    // What lives only in RAM: a running process, a file on a tmpfs, the boot id.
    let sleeper = on(
        &p,
        &id,
        "vm",
        "setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $! | tee /dev/shm/sleeper",
    );
    let boot_id = on(&p, &id, "vm", "cat /proc/sys/kernel/random/boot_id");

    stop(&p, &id);
    assert!(
        common::qemus_matching(&id).is_empty(),
        "a stopped run has no QEMU"
    );
    let ram = p.run_dir(&id).join("vm/state.ram");
    assert!(
        ram.is_file() && std::fs::metadata(&ram).map(|m| m.len()).unwrap_or(0) > 1 << 20,
        "a stopped microVM keeps its RAM in {}",
        ram.display()
    );
    // Stopped long enough for a clock that was not set to show it.
    std::thread::sleep(Duration::from_secs(5));
    restart(&p, &id);
    assert!(!ram.exists(), "the RAM snapshot is used once");
    assert_eq!(
        on(&p, &id, "vm", "cat /proc/sys/kernel/random/boot_id"),
        boot_id,
        "resumed, not booted"
    );
    assert_eq!(
        on(
            &p,
            &id,
            "vm",
            "cat /dev/shm/sleeper; kill -0 $(cat /dev/shm/sleeper) && echo alive"
        ),
        format!("{}alive\n", sleeper),
        "the process started before the stop still runs"
    );
    let guest_now: i64 = on(&p, &id, "vm", "date +%s").trim().parse().expect("date");
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() < 30,
        "the resumed guest's clock is set: guest {guest_now}, host {host_now}"
    );
    assert_eq!(on(&p, &id, "vm", "cat ~/notes.txt"), "my notes\n");
    assert_eq!(on(&p, &id, "vm", "vm-hello"), "hello from the vm\n");
    assert_neighbours(&p, &id);

    // A clone sees the state; its changes stay its own.
    stop(&p, &id);
    let copy = clone(&mut p, &id, "vm clone");
    restart(&p, &copy);
    // A clone boots from the copied drive (synced at the stop): its own boot, not the RAM.
    assert_ne!(
        on(&p, &copy, "vm", "cat /proc/sys/kernel/random/boot_id"),
        boot_id
    );
    assert_eq!(on(&p, &copy, "vm", "cat ~/notes.txt"), "my notes\n");
    assert_eq!(on(&p, &copy, "vm", "vm-hello"), "hello from the vm\n");
    on(
        &p,
        &copy,
        "vm",
        "echo clone > ~/who && sudo -n rm /usr/local/bin/vm-hello",
    );
    assert_neighbours(&p, &copy);
    p.destroy(&copy);
    p.assert_clean(&copy);

    restart(&p, &id);
    on(&p, &id, "vm", "test ! -e ~/who");
    assert_eq!(on(&p, &id, "vm", "vm-hello"), "hello from the vm\n");
    p.destroy(&id);
    p.assert_clean(&id);
}
