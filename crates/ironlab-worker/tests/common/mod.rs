//! Helpers shared by the worker's whole-system tests: the root check, the static agent, and a
//! busybox root drive built with `mkfs.ext4 -d` (no mount needed).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

macro_rules! skip_if_not_root {
    () => {
        if !is_root() {
            eprintln!("SKIPPED: this test needs root (containers, mounts, namespaces)");
            return;
        }
    };
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The static agent binary; panics (the test fails loudly) when it is missing.
pub fn agent_bin() -> PathBuf {
    if let Ok(p) = std::env::var("IRONLAB_AGENT") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "IRONLAB_AGENT={} does not exist", p.display());
        return p;
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let candidates = [
        target.join("release/ironlab-agent-static"),
        target.join("debug/ironlab-agent-static"),
        target.join("x86_64-unknown-linux-musl/release/ironlab-agent"),
        target.join("x86_64-unknown-linux-musl/debug/ironlab-agent"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "the static agent is not built (looked at {candidates:?}): run scripts/build-agent.sh \
                 or `cargo build --target x86_64-unknown-linux-musl -p ironlab-agent`, or set IRONLAB_AGENT"
            )
        })
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run host tool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A busybox root filesystem as an ext4 drive file (no mount needed: `mkfs.ext4 -d`).
pub fn busybox_drive(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "bin",
        "etc",
        "tmp",
        "root",
        "home/laborant",
        "dev",
        "proc",
        "sys",
        "run",
        "usr/bin",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    for a in [
        "sh", "cat", "echo", "hostname", "id", "sleep", "whoami", "true", "false", "ls", "head",
        "yes", "dd", "adduser", "addgroup", "ps", "env", "stty", "wc", "grep", "mkdir", "chown",
        "chmod", "tr", "seq", "ping", "ip", "wget", "nc", "nslookup", "sysctl", "route", "timeout",
        "httpd", "rm", "date",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a)).expect("symlink");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nlaborant:x:1000:1000:laborant:/home/laborant:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nlaborant:x:1000:\n").expect("group");
    Command::new("chown")
        .args(["1000:1000", &root.join("home/laborant").to_string_lossy()])
        .status()
        .expect("chown");
    Command::new("chmod")
        .args(["1777", &root.join("tmp").to_string_lossy()])
        .status()
        .expect("chmod");
    let file = dir.join("busybox.ext4");
    std::fs::File::create(&file).expect("drive file");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&file)
        .arg("64M")
        .status()
        .expect("mkfs.ext4");
    assert!(st.success(), "mkfs.ext4 -d failed");
    file
}

/// What a test's Drop guard does last, whatever state the test left: lazily unmounts everything
/// mounted under `mounts_under`, detaches loop devices whose file lies under `loops_under`, and
/// removes the cgroups of `runs` (`ironlab/<run>` in every hierarchy).
pub fn scrub_host(mounts_under: &Path, loops_under: &Path, runs: &[String]) {
    for line in sh("cat", &["/proc/self/mountinfo"]).lines() {
        if let Some(mp) = line.split(' ').nth(4)
            && Path::new(mp).starts_with(mounts_under)
        {
            let _ = Command::new("umount").args(["-l", mp]).status();
        }
    }
    for line in sh("losetup", &["-l", "-n", "--raw", "-O", "NAME,BACK-FILE"]).lines() {
        if let Some((dev, file)) = line.split_once(' ')
            && Path::new(file).starts_with(loops_under)
        {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
    }
    for run in runs {
        for c in [
            "memory", "pids", "cpu", "cpuacct", "cpuset", "devices", "freezer", "blkio", "hugetlb",
            "systemd", "unified",
        ] {
            let dir = format!("/sys/fs/cgroup/{c}/ironlab/{run}");
            let _ = Command::new("find")
                .args([&dir, "-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .output();
        }
    }
}
