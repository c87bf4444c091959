//! Stock content (`content/*/`) and the `ironlab content` CLI on a real platform: every item is
//! published and its solution played by the solution bot (`content test NAME`), one item is
//! tested from its local folder without publishing (`content test DIR`), `pull` gives back the
//! pushed files, a bad item is refused naming the file and field and publishes nothing, and a
//! wrong solution fails naming the task. Items on the `docker` playground (systemd-services,
//! docker-containers) boot microVMs: slow under TCG, so they get a longer deadline.

mod common;

use std::path::PathBuf;

use common::{Needs, Platform, TempDir, preflight, serial};

fn content_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../content")
}

/// Stock items in publishing order: what skill paths point at (challenges, tutorials) first.
fn stock_items() -> Vec<PathBuf> {
    let mut dirs: Vec<(bool, PathBuf)> = std::fs::read_dir(content_dir())
        .expect("content/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("index.md").is_file())
        .map(|d| {
            let index = std::fs::read_to_string(d.join("index.md")).expect("index.md");
            (index.contains("\nkind: skill-path\n"), d)
        })
        .collect();
    dirs.sort();
    dirs.into_iter().map(|(_, d)| d).collect()
}

#[test]
fn stock_content_passes_its_solutions() {
    let _serial = serial();
    let Some(env) = preflight(
        "stock_content_passes_its_solutions",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    // Items on the `docker` playground boot a microVM: they need the docker image and the kit.
    let vm_ready = preflight(
        "stock_content_passes_its_solutions (items on the docker playground)",
        Needs {
            docker: true,
            ..Needs::default()
        },
    )
    .is_some();
    let p = Platform::start(&env);
    let items = stock_items();
    assert!(items.len() >= 6, "stock items: {items:?}");
    for dir in &items {
        let name = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let out = p.cli_ok(&["content", "push", &dir.to_string_lossy()]);
        assert_eq!(out.trim(), "1", "{name}: first version");
        let index = std::fs::read_to_string(dir.join("index.md")).expect("index.md");
        if index.contains("\nkind: skill-path\n") {
            // Skill paths: published, nothing to play.
            continue;
        }
        // A microVM under TCG boots, starts dockerd and runs containers slowly on a loaded host.
        let on_docker = index.contains("\nplayground:\n  name: docker\n");
        if on_docker && !vm_ready {
            eprintln!("SKIPPED playing {name}: it needs the docker playground (see above)");
            continue;
        }
        let timeout = if on_docker { "10m" } else { "2m" };
        let out = p.cli(&["content", "test", &name, "--timeout", timeout]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "content {name} failed ({}):\n{stdout}\n{stderr}\n{}",
            out.status,
            p.logs()
        );
        assert!(
            !stdout.contains("FAIL") && stdout.contains("tasks completed"),
            "{stdout}"
        );
        eprintln!("{name}:\n{stdout}{stderr}");
    }
    let listed = p.cli_ok(&["content", "list"]);
    for dir in &items {
        let name = dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(listed.contains(&name), "{listed}");
    }

    // Pull gives back exactly the pushed files.
    let tmp = TempDir::new("content-pull");
    let pulled = tmp.path().join("pulled");
    p.cli_ok(&[
        "content",
        "pull",
        "permissions-and-owners",
        "--dir",
        &pulled.to_string_lossy(),
    ]);
    for f in ["index.md", "solution.md"] {
        assert_eq!(
            std::fs::read(pulled.join(f)).expect("pulled"),
            std::fs::read(content_dir().join("permissions-and-owners").join(f)).expect("stock"),
            "{f}"
        );
    }

    // A local folder is tested without being published; a wrong answer fails on its task.
    let local = tmp.path().join("first-steps-copy");
    std::fs::create_dir_all(&local).expect("mkdir");
    let src = content_dir().join("linux-first-steps");
    std::fs::copy(src.join("index.md"), local.join("index.md")).expect("copy");
    let wrong = std::fs::read_to_string(src.join("solution.md"))
        .expect("solution")
        .replace("\nLinux\n", "\nWindows\n");
    std::fs::write(local.join("solution.md"), wrong).expect("write");
    let out = p.cli(&[
        "content",
        "test",
        &local.to_string_lossy(),
        "--timeout",
        "20s",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fail_line = stdout
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line:\n{stdout}"));
    assert!(fail_line.contains("kernel"), "{stdout}");
    let listed = p.cli_ok(&["content", "list"]);
    assert!(!listed.contains("first-steps-copy"), "{listed}");
    let playgrounds = p.cli_ok(&["playground", "catalog"]);
    assert!(
        !playgrounds.contains("ct-first-steps-copy"),
        "the temporary playground is removed: {playgrounds}"
    );

    // A bad item is refused with the file, field and reason; nothing is published.
    let bad = tmp.path().join("bad-item");
    std::fs::create_dir_all(&bad).expect("mkdir");
    std::fs::write(
        bad.join("index.md"),
        "---\nkind: challenge\ntitle: Bad\nplayground: {name: no-such-playground}\n\
         tasks:\n  a:\n    run: 'true'\n---\n![x](__static__/x.png)\n",
    )
    .expect("write");
    let out = p.cli(&["content", "push", &bad.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("index.md: image \"__static__/x.png\": there is no file __static__/x.png"),
        "{stderr}"
    );
    std::fs::create_dir_all(bad.join("__static__")).expect("mkdir");
    std::fs::write(bad.join("__static__/x.png"), "png").expect("write");
    let out = p.cli(&["content", "push", &bad.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "index.md: playground.name: there is no playground named \"no-such-playground\""
        ),
        "{stderr}"
    );
    let listed = p.cli_ok(&["content", "list"]);
    assert!(!listed.contains("bad-item"), "{listed}");

    // Scaffolds pass the server's checks too, and rm removes.
    let made = tmp.path().join("made");
    std::fs::create_dir_all(&made).expect("mkdir");
    p.cli_ok(&[
        "content",
        "create",
        "challenge",
        "my-challenge",
        "--dir",
        &made.to_string_lossy(),
    ]);
    p.cli_ok(&[
        "content",
        "push",
        &made.join("my-challenge").to_string_lossy(),
    ]);
    p.cli_ok(&["content", "rm", "my-challenge"]);
    let listed = p.cli_ok(&["content", "list"]);
    assert!(!listed.contains("my-challenge"), "{listed}");
}
