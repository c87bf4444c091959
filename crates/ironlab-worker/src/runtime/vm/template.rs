//! Boot templates: a microVM restored from a RAM snapshot of a booted guest instead of booted.
//!
//! Booting costs the same every time (kernel, initramfs, systemd: seconds under TCG), and every
//! fresh machine of one *shape* boots the same way: same QEMU and accelerator, kernel, initramfs
//! (kit + agent), image, root drive size, RAM, vCPUs, number of cards, config drive or not. The
//! first fresh start of a shape boots as usual and then, in the background, has a template
//! built ([`build_after`]): a guest of that shape (`ironlab.template=1`, its cards on hub ports
//! that lead nowhere and unconfigured) boots on a copy of the fresh drive until systemd is up,
//! the worker leaves its agent port, QEMU is stopped and its state migrated to `ram.bin`. The
//! template is the pair `ram.bin` + `root.ext4` (the drive exactly as that RAM knows it), under
//! `pool/vm/tpl/<key>/` with a `done` file, where `<key>` hashes the shape ([`key`]).
//!
//! Later fresh starts of the shape restore instead (`VmRuntime::restore`): the machine's drive
//! becomes a reflink clone of the template's, QEMU starts with `-incoming defer` and reads the
//! RAM file (hard-linked into its jail), and the agent — already serving in the snapshot —
//! makes the guest this machine at `Configure`: hostname, clock, a reseeded random generator,
//! its cards' MACs, addresses and route, `/etc/hosts`, `resolv.conf`. Restarts of stopped
//! machines always boot (their drive holds the user's work). A failed restore boots instead and
//! drops the template. What clones share: the template's boot id and machine id, and what
//! systemd did at boot before the machine had its name and network.
//!
//! `IRONLAB_VM_TEMPLATES=0` turns templates off. One template is built at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use sha2::Digest as _;

use super::cmdline::{Accel, BootMode, Nic, VmConfig};
use super::{Kit, guestnet, proxy, qmp};

/// The template's RAM (QEMU's migration stream), also its name inside a restoring QEMU's jail.
pub const RAM_FILE: &str = "ram.bin";
/// The template's drive.
pub const ROOT_FILE: &str = "root.ext4";
/// Written last: the template is complete.
const DONE_FILE: &str = "done";
/// How long a migration (either way) may take.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restored guest's agent may take to answer.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a template's guest may take to boot until its agent answers, and then until
/// systemd settled.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the build waits for the first machine of the shape to be up before it starts.
const FIRST_MACHINE_WAIT: Duration = Duration::from_secs(180);
/// Templates no start used for this long are removed when the worker starts.
const UNUSED_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// Bumped when what a template holds changes.
const FORMAT: &str = "ironlab-template-1";

/// Whether templates are on: `IRONLAB_VM_TEMPLATES` unset, or anything but `0`/`off`/`false`.
pub fn enabled_by_env() -> bool {
    std::env::var("IRONLAB_VM_TEMPLATES")
        .map(|v| !matches!(v.trim(), "0" | "off" | "false"))
        .unwrap_or(true)
}

/// The key of a shape: a hash of its parts (and the template format).
pub fn key(parts: &[&str]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(FORMAT.as_bytes());
    for p in parts {
        h.update([0u8]);
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// Copies a drive (a reflink where the pool allows) to `dst` whole or not at all.
pub async fn copy_drive(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let tmp = dst.with_extension("copy");
    let (s, t) = (src.to_string_lossy(), tmp.to_string_lossy());
    crate::cmd::run("cp", &["--reflink=auto", "--sparse=always", &s, &t])
        .await
        .with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
    fs_err::rename(&tmp, dst)?;
    Ok(())
}

/// The templates of this worker.
#[derive(Debug)]
pub struct Templates {
    dir: PathBuf,
    enabled: bool,
    /// Keys being built (`false`) or whose build or restore failed (`true`: not tried again
    /// until the worker restarts).
    busy: Mutex<HashMap<String, bool>>,
    /// One build at a time.
    builds: tokio::sync::Semaphore,
}

impl Templates {
    /// Templates under `dir` (`pool/vm/templates`). Removes unfinished builds (a worker
    /// restart) and templates no start used for [`UNUSED_FOR`].
    pub fn new(dir: PathBuf, enabled: bool) -> Self {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let done = e.path().join(DONE_FILE);
                let used = std::fs::metadata(&done)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                if used.is_none_or(|age| age > UNUSED_FOR) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Templates {
            dir,
            enabled,
            busy: Mutex::new(HashMap::new()),
            builds: tokio::sync::Semaphore::new(1),
        }
    }

    /// Whether templates are used.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, HashMap<String, bool>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The directory of the complete template `key`, if there is one (marked as used now).
    pub fn ready(&self, key: &str) -> Option<PathBuf> {
        let dir = self.dir.join(key);
        let done = dir.join(DONE_FILE);
        if !done.is_file() || self.busy().get(key).copied().unwrap_or(false) {
            return None;
        }
        if let Ok(f) = std::fs::File::options().write(true).open(&done) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(dir)
    }

    /// Claims the build of `key` when there is no template, no build and no failure for it;
    /// returns the (fresh, empty) build directory.
    pub fn claim(&self, key: &str) -> Option<PathBuf> {
        if !self.enabled || self.dir.join(key).join(DONE_FILE).is_file() {
            return None;
        }
        let mut busy = self.busy();
        if busy.contains_key(key) {
            return None;
        }
        let build = self.dir.join(format!("{key}.new"));
        let _ = std::fs::remove_dir_all(&build);
        if let Err(e) = fs_err::create_dir_all(&build) {
            tracing::warn!("cannot make {}: {e}", build.display());
            return None;
        }
        busy.insert(key.to_string(), false);
        Some(build)
    }

    /// Ends a build: `ok` keeps the key free for restores, else it is not tried again.
    pub fn release(&self, key: &str, ok: bool) {
        let mut busy = self.busy();
        if ok {
            busy.remove(key);
        } else {
            busy.insert(key.to_string(), true);
        }
    }

    /// Drops a template that failed to restore (and does not build it again).
    pub fn forget(&self, key: &str) {
        self.busy().insert(key.to_string(), true);
        let _ = std::fs::remove_dir_all(self.dir.join(key));
    }
}

/// SIGKILLs template QEMUs of builds under `dir` that a previous worker left running (it
/// crashed mid-build); other workers' builds (other pools) are left alone.
pub fn kill_orphans(dir: &Path) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    let mine = dir.to_string_lossy().into_owned();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("guest=ilt-") && cmdline.contains(&mine) {
            tracing::warn!(
                pid,
                "killing a boot template's QEMU left by a previous worker"
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// What a template build needs of the runtime and the shape.
#[derive(Debug, Clone)]
pub struct Build {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kit.
    pub kit: Kit,
    /// The initramfs with the agent.
    pub initrd: PathBuf,
    /// qboot, when present.
    pub firmware: Option<PathBuf>,
    /// The accelerator.
    pub accel: Accel,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Network cards.
    pub nics: usize,
    /// Whether the shape has a config drive (machines on a network).
    pub config_drive: bool,
}

/// Waits until the machine whose agent listens on `first` is up (so the build does not slow
/// its boot), then builds template `key` in `dir` (which holds the fresh drive).
pub async fn build_after(
    templates: Arc<Templates>,
    key: String,
    dir: PathBuf,
    job: Build,
    first: PathBuf,
) {
    let deadline = tokio::time::Instant::now() + FIRST_MACHINE_WAIT;
    while tokio::time::Instant::now() < deadline
        && crate::agent_client::health(&first, Duration::from_secs(2))
            .await
            .is_err()
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let Ok(_permit) = templates.builds.acquire().await else {
        return;
    };
    let t0 = std::time::Instant::now();
    let result = build(&job, &key, &dir).await;
    let _ = std::fs::remove_dir_all(dir.join(super::JAIL));
    match result {
        Ok(()) => {
            let done = templates.dir.join(&key);
            let _ = std::fs::remove_dir_all(&done);
            match std::fs::rename(&dir, &done) {
                Ok(()) => {
                    tracing::info!(template = %key, ms = t0.elapsed().as_millis() as u64, "boot template ready");
                    templates.release(&key, true);
                }
                Err(e) => {
                    tracing::warn!(template = %key, "cannot keep the boot template: {e}");
                    templates.release(&key, false);
                }
            }
        }
        Err(e) => {
            tracing::warn!(template = %key, "cannot build a boot template (machines of this shape boot instead): {e:#}");
            let _ = std::fs::remove_dir_all(&dir);
            templates.release(&key, false);
        }
    }
}

/// Boots the template's guest in `dir` until systemd settled, then saves its RAM there.
async fn build(job: &Build, key: &str, dir: &Path) -> anyhow::Result<()> {
    // `ilt-`: not a machine's `il-<run>-<machine>` (leftover sweeps leave it alone).
    let name = format!("ilt-{key}");
    let uid = super::vm_uid(&name);
    let jail = dir.join(super::JAIL);
    super::make_jail(&jail)?;
    let config_drive = dir.join(guestnet::CONFIG_DRIVE);
    let config = VmConfig {
        name: name.clone(),
        hostname: "ironlab".into(),
        accel: job.accel,
        mode: BootMode::Auto,
        memory_mib: job.memory_mib,
        cpus: job.cpus,
        kernel: job.kit.kernel.clone(),
        initrd: job.initrd.clone(),
        firmware: job.firmware.clone(),
        // Relative, in the jail (QEMU starts there): QEMU re-opens the drive by this name when
        // the migration ends, by then chrooted.
        root_drive: Some(PathBuf::from(ROOT_FILE)),
        modules_drive: job.kit.modules.clone(),
        agent_socket: Some(dir.join("agent.serial")),
        qmp_socket: Some(dir.join("qmp.sock")),
        console_log: dir.join("console.log"),
        pidfile: Some(dir.join("qemu.pid")),
        nics: (0..job.nics)
            .map(|i| Nic {
                tap: String::new(),
                mac: guestnet::mac(&name, i),
            })
            .collect(),
        config_drive: job.config_drive.then(|| config_drive.clone()),
        run_as: Some((uid, uid)),
        chroot: Some(jail.clone()),
        tcg_tb_mib: super::tcg_tb_mib(),
        template: true,
        incoming: false,
    };
    if job.config_drive {
        // No cards configured: the restored machine gets its own at `Configure`.
        let hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
        let mut image = super::cpio(&[
            ("net.conf", 0o100644, b""),
            ("hosts", 0o100644, hosts.as_bytes()),
            ("resolv.conf", 0o100644, b""),
        ]);
        image.resize(image.len().div_ceil(4096) * 4096, 0);
        fs_err::write(&config_drive, image)?;
    }
    fs_err::hard_link(dir.join(ROOT_FILE), jail.join(ROOT_FILE))?;
    fs_err::write(&config.console_log, b"")?;
    for f in [
        dir.join(ROOT_FILE),
        config.console_log.clone(),
        config_drive,
    ] {
        if f.exists() {
            std::os::unix::fs::chown(&f, Some(uid), Some(uid))
                .with_context(|| format!("cannot chown {}", f.display()))?;
        }
    }
    let mut args = vec!["-f".to_string(), job.qemu.to_string_lossy().into_owned()];
    args.extend(super::cmdline::qemu_args(&config));
    super::setsid(&args, Some(&jail), &dir.join("qemu.log")).await?;
    let running = Guest {
        dir: dir.to_path_buf(),
    };
    // (Short: a unix socket's path has a length limit.)
    let agent = dir.join("a.sock");
    let proxy = proxy::spawn(&agent, &dir.join("agent.serial"))?;
    let deadline = tokio::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        if crate::agent_client::health(&agent, Duration::from_secs(2))
            .await
            .is_ok()
        {
            break;
        }
        anyhow::ensure!(
            running.pid().is_some() || !dir.join("qemu.pid").exists(),
            "the template's QEMU exited: {}",
            running.tail()
        );
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the template's guest did not answer within {} s: {}",
            BOOT_TIMEOUT.as_secs(),
            running.tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // systemd done with its boot (degraded is fine); images without it: at once.
    let settle = "if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then \
                  systemctl is-system-running --wait >/dev/null 2>&1; fi; sync";
    crate::agent_client::run(&agent, &["sh", "-c", settle], BOOT_TIMEOUT)
        .await
        .context("the template's guest did not settle")?;
    // Leave the agent's port: the snapshot's agent waits for a host, which is the restoring
    // worker.
    drop(proxy);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ram = jail.join(RAM_FILE);
    fs_err::write(&ram, b"")?;
    std::os::unix::fs::chown(&ram, Some(uid), Some(uid))?;
    let mut q = qmp::Qmp::connect(&dir.join("qmp.sock"), Duration::from_secs(5)).await?;
    q.execute("stop", None).await?;
    q.execute(
        "migrate",
        Some(serde_json::json!({ "uri": format!("file:/{RAM_FILE}") })),
    )
    .await?;
    q.wait_migration(MIGRATE_TIMEOUT).await?;
    q.quit().await?;
    for _ in 0..250 {
        if running.pid().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.kill();
    let kept = dir.join(RAM_FILE);
    fs_err::rename(&ram, &kept)?;
    std::os::unix::fs::chown(&kept, Some(0), Some(0))?;
    // Readable by the restoring QEMUs' uids (it holds what the image holds, nothing else).
    fs_err::set_permissions(&kept, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::os::unix::fs::chown(dir.join(ROOT_FILE), Some(0), Some(0))?;
    for f in [
        "qmp.sock",
        "agent.serial",
        "qemu.pid",
        guestnet::CONFIG_DRIVE,
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("agent"));
    fs_err::write(dir.join(DONE_FILE), b"")?;
    Ok(())
}

/// The template's QEMU while it is built: killed when dropped.
struct Guest {
    dir: PathBuf,
}

impl Guest {
    fn pid(&self) -> Option<i32> {
        super::qemu_pid(&self.dir.join("qemu.pid"), "guest=ilt-")
    }

    fn kill(&self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn tail(&self) -> String {
        let console = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&console);
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_vms_get_half_the_translation_cache() {
        assert_eq!(super::super::restored_tb_mib(32), 16);
        assert_eq!(super::super::restored_tb_mib(8), 4);
        assert_eq!(super::super::restored_tb_mib(4), 4);
    }

    #[test]
    fn keys_differ_by_every_part_and_are_stable() {
        let a = key(&["qemu", "256", "1"]);
        assert_eq!(a, key(&["qemu", "256", "1"]));
        assert_eq!(a.len(), 16);
        assert_ne!(a, key(&["qemu", "256", "2"]));
        assert_ne!(a, key(&["qemu", "2561"]));
    }

    #[test]
    fn claims_are_exclusive_and_failures_stick() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let t = Templates::new(tmp.path().join("templates"), true);
        let build = t.claim("k1").expect("first claim");
        assert!(build.is_dir());
        assert!(t.claim("k1").is_none(), "a second claim while building");
        assert!(t.ready("k1").is_none());
        t.release("k1", false);
        assert!(t.claim("k1").is_none(), "a failed key is not built again");
        let off = Templates::new(tmp.path().join("off"), false);
        assert!(off.claim("k2").is_none());
        // A complete template is ready, and forgetting it removes it for good.
        let done = tmp.path().join("templates").join("k3");
        fs_err::create_dir_all(&done).expect("mkdir");
        fs_err::write(done.join(DONE_FILE), b"").expect("done");
        assert_eq!(t.ready("k3"), Some(done.clone()));
        assert!(t.claim("k3").is_none());
        t.forget("k3");
        assert!(t.ready("k3").is_none());
        assert!(!done.exists());
    }
}
