//! The fixtures' leak detector finds each kind of thing a run can leave on the host, and the
//! scrubber removes it; otherwise "nothing left after destroy" in the other tests would prove
//! nothing.

mod common;

use std::fs;
use std::process::Command;

use common::{Needs, TempDir, leftovers, preflight, scrub_run, serial};

fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn leak_detector_sees_and_scrubs_every_kind_of_leftover() {
    let _serial = serial();
    if preflight(
        "leak_detector_sees_and_scrubs_every_kind_of_leftover",
        Needs::default(),
    )
    .is_none()
    {
        return;
    }
    let run = format!("lk{:010}", std::process::id());
    let dir = TempDir::new("leak");
    let run_dir = dir.path().join("runs").join(&run);
    fs::create_dir_all(run_dir.join("box/rootfs")).expect("create a fake run dir");

    // A netns, a loop device over a file of the run, a mount inside the run dir, a cgroup.
    run_ok("ip", &["netns", "add", &format!("il-{run}")]);
    run_ok("ip", &["netns", "add", &format!("ilm-{run}-box")]);
    let img = run_dir.join("box/root.ext4");
    run_ok("truncate", &["-s", "8M", &img.to_string_lossy()]);
    run_ok("mkfs.ext4", &["-q", &img.to_string_lossy()]);
    let dev = run_ok("losetup", &["--show", "-f", &img.to_string_lossy()]);
    let mnt = run_dir.join("box/rootfs");
    run_ok("mount", &[&dev, &mnt.to_string_lossy()]);
    let cg = std::path::Path::new("/sys/fs/cgroup/pids/ironlab-leaktest").join(&run);
    let made_cgroup = fs::create_dir_all(&cg).is_ok();

    // A detached container named like the worker names them, running busybox `sleep`.
    let bundle = dir.path().join("bundle");
    fs::create_dir_all(bundle.join("rootfs/bin")).expect("create a bundle");
    fs::copy("/bin/busybox", bundle.join("rootfs/bin/busybox")).expect("copy busybox");
    std::os::unix::fs::symlink("busybox", bundle.join("rootfs/bin/sleep")).expect("symlink sleep");
    let runtime = if common::which("crun").is_some() {
        "crun"
    } else {
        "runc"
    };
    let bundle_s = bundle.to_string_lossy().into_owned();
    run_ok(runtime, &["spec", "--bundle", &bundle_s]);
    let config = bundle.join("config.json");
    let spec = fs::read_to_string(&config).expect("read config.json");
    let spec = spec
        .replace("\"terminal\": true", "\"terminal\": false")
        .replace("\"sh\"", "\"sleep\", \"60\"");
    fs::write(&config, spec).expect("write config.json");
    let container = format!("il-{run}-box");
    let status = Command::new(runtime)
        .args(["run", "--detach", "--bundle", &bundle_s, &container])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run the container");
    assert!(status.success(), "{runtime} run --detach failed");

    let left = leftovers(&run, &run_dir);
    let all = left.join("\n");
    scrub_run(&run);
    let _ = fs::remove_dir(cg.parent().unwrap_or(&cg));
    assert!(
        all.contains(&format!("network namespace il-{run}")),
        "netns not seen:\n{all}"
    );
    assert!(
        all.contains(&format!("network namespace ilm-{run}-box")),
        "machine netns not seen:\n{all}"
    );
    assert!(all.contains("loop device"), "loop device not seen:\n{all}");
    assert!(all.contains("mount "), "mount not seen:\n{all}");
    if made_cgroup {
        assert!(all.contains("cgroup "), "cgroup not seen:\n{all}");
    }
    assert!(all.contains("run directory"), "run dir not seen:\n{all}");
    assert!(
        all.contains(&format!("{runtime} container {container}")),
        "container not seen:\n{all}"
    );

    fs::remove_dir_all(&run_dir).expect("remove the fake run dir");
    let left = leftovers(&run, &run_dir);
    assert!(left.is_empty(), "scrub_run left: {left:?}");
}
