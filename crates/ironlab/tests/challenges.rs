//! The stock challenges (`challenges/*/`): each is played by the solution bot
//! (`ironlab playground test`) on a real platform and must pass; a wrong solution must fail
//! with a per-task report naming the task that did not complete.

mod common;

use std::path::PathBuf;

use common::{Needs, Platform, preflight, serial};

fn challenges_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../challenges")
}

#[test]
fn stock_challenges_pass_with_their_solutions() {
    let _serial = serial();
    let Some(env) = preflight(
        "stock_challenges_pass_with_their_solutions",
        Needs {
            debian: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let p = Platform::start(&env);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(challenges_dir())
        .expect("challenges/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("playground.yaml").is_file())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no challenges under {}",
        challenges_dir().display()
    );
    for dir in &dirs {
        let manifest = dir.join("playground.yaml");
        let solution = dir.join("solution.md");
        let out = p.cli(&[
            "playground",
            "test",
            "-f",
            &manifest.to_string_lossy(),
            "--solution",
            &solution.to_string_lossy(),
            "--timeout",
            "2m",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "challenge {} failed ({}):\n{stdout}\n{stderr}\n{}",
            dir.display(),
            out.status,
            p.logs()
        );
        assert!(
            !stdout.contains("FAIL") && stdout.contains("tasks completed"),
            "{stdout}"
        );
        eprintln!("{}:\n{stdout}{stderr}", dir.display());
    }

    // A solution that answers the question wrongly fails, and says which task.
    let dir = challenges_dir().join("debian-basics");
    let wrong = std::fs::read_to_string(dir.join("solution.md"))
        .expect("solution")
        .replace("\nLinux\n", "\nWindows\n");
    let tmp = common::TempDir::new("wrong-solution");
    let wrong_path = tmp.path().join("solution.md");
    std::fs::write(&wrong_path, wrong).expect("write");
    let out = p.cli(&[
        "playground",
        "test",
        "-f",
        &dir.join("playground.yaml").to_string_lossy(),
        "--solution",
        &wrong_path.to_string_lossy(),
        "--timeout",
        "20s",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let fail_line = stdout
        .lines()
        .find(|l| l.starts_with("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line:\n{stdout}"));
    assert!(
        fail_line.contains("kernel") && fail_line.contains("running"),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kernel refused the answer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
