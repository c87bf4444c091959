//! The microVM runtime: one QEMU per machine, the same agent as in containers.
//!
//! Split as kata does: [`cmdline`] builds QEMU's arguments, [`qmp`] talks to a running QEMU,
//! [`proxy`] carries the agent's gRPC over the virtio-serial port, and this module holds the
//! state: start (supervised, with one retry), stop (ACPI power button, then `quit`), observe,
//! exit reasons, destroy, leftovers.
//!
//! Per machine, under `pool/runs/<run>/<machine>/`: `runtime` (the word `microvm`: tells the
//! dispatcher whose machine this is), `root.ext4` (virtio-blk `/dev/vda`), `qmp.sock`,
//! `agent.serial` (QEMU's end of the agent port), `agent/agent.sock` (the proxy: what every
//! agent client dials, as with containers), `console.log` (the guest's serial console),
//! `qemu.log` (QEMU's stderr), `qemu.pid`, `stopped` (written when the worker stopped it).
//!
//! QEMU runs detached (`setsid -f`: it outlives the worker), in the run's network namespace
//! (its tap is created there and vanishes with it), in the cgroup `/ironlab/<run>/<machine>`
//! (cpu, memory = guest RAM + [`MEMORY_OVERHEAD`], pids) and, after start-up, as an unprivileged
//! uid of its own (`-run-with user=`) under `-sandbox on`, `chroot`ed into the empty, read-only
//! `jail/` of its machine directory (`-run-with chroot=`: every file it uses is open by then).
//!
//! The guest kit (`--vm-kernel-dir`, built by `images/kernel/lean.sh` or `build.sh`): `vmlinuz`,
//! `initramfs.cpio` (boot modules, `/release`, mount points), `modules.ext4` (stock kit only),
//! `VERSION`. The agent is appended to the initramfs as a second cpio archive holding it as
//! `/init` (`pool/vm/initrd-<hash>.img`, made once per agent binary): the kernel runs it as PID
//! 1 and it boots the guest itself (`ironlab_agent::boot`: no shell, no fork per step).

pub mod cmdline;
pub mod guestnet;
pub mod proxy;
pub mod qmp;
pub mod template;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sha2::Digest;

use self::cmdline::{Accel, BootMode, VmConfig};
use super::{
    AgentEndpoint, MachineHandle, MachineRuntime, MachineSpec, MachineState, RuntimeError,
};
use crate::host;

/// Memory the cgroup allows QEMU beyond the guest's RAM (TCG cache, device emulation, I/O).
pub const MEMORY_OVERHEAD: u64 = 192 << 20;
/// TCG translation cache (MiB); `IRONLAB_VM_TCG_TB_MIB` (4–1024) overrides it (see
/// [`tcg_tb_mib`]).
pub const TCG_TB_MIB: u32 = 32;

/// The TCG translation cache size QEMU gets: `IRONLAB_VM_TCG_TB_MIB` when it holds a number in
/// 4..=1024, else [`TCG_TB_MIB`]. Under TCG the cache is nearly all touched, so it is private
/// memory of every VM (the benchmark measures boots and memory with other sizes).
pub fn tcg_tb_mib() -> u32 {
    std::env::var("IRONLAB_VM_TCG_TB_MIB")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|v| (4..=1024).contains(v))
        .unwrap_or(TCG_TB_MIB)
}
/// The TCG translation cache of a VM restored from a boot template: half a booting VM's (at
/// least 4 MiB). A boot runs a large amount of code once (kernel init, systemd), where a bigger
/// cache pays; a restored guest starts after all that. Measured (`bench/vm.sh`, debian, lean
/// kit): 16 MiB instead of 32 takes a restored start from 0.46–0.50 s to 0.66 s and its private
/// dirty memory beyond guest RAM from 45 to 33 MiB.
pub fn restored_tb_mib(boot: u32) -> u32 {
    (boot / 2).max(4)
}
/// How long QEMU may take to write its pidfile before a missing one counts as an exit.
const PIDFILE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a boot may take to print the kernel banner before it counts as hung.
pub const BANNER_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the agent of a microVM has to answer (TCG boots are slow on a busy host);
/// `IRONLAB_VM_AGENT_TIMEOUT` (seconds) overrides it.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
/// Base of the unprivileged uids/gids QEMU processes run as.
const UID_BASE: u32 = 3_000_000;
/// The empty directory QEMU `chroot`s into once set up (in the machine directory).
pub const JAIL: &str = "jail";
/// A stopped machine's RAM snapshot (in the machine directory; written in the jail).
pub const SUSPEND_FILE: &str = "state.ram";
/// The [`VmRuntime::resume_key`] the RAM snapshot was taken with.
const SUSPEND_KEY: &str = "state.key";
/// The resume key of the QEMU running now (copied to [`SUSPEND_KEY`] by a suspend).
const RUNNING_KEY: &str = "qemu.key";
/// How long the guest's agent gets to leave its session once its host left (a busy TCG guest
/// can take seconds).
const AGENT_LEAVE: Duration = Duration::from_secs(5);

/// A restored guest's agent that has not answered by then gets a new SYNC (a new proxy).
const RESYNC_AFTER: Duration = Duration::from_millis(700);

/// Whether stopping a microVM keeps its RAM (`IRONLAB_VM_SUSPEND`, default on; `0` turns it
/// off: stops power the guest off, restarts boot).
pub fn suspend_enabled() -> bool {
    std::env::var("IRONLAB_VM_SUSPEND").map_or(true, |v| v != "0")
}
/// The marker file's name and content.
const MARKER: &str = "runtime";

/// The guest kit: kernel, initramfs, modules drive.
#[derive(Debug, Clone)]
pub struct Kit {
    /// The directory.
    pub dir: PathBuf,
    /// bzImage.
    pub kernel: PathBuf,
    /// The kit's initramfs (without the agent).
    pub initramfs: PathBuf,
    /// Read-only modules drive, when present.
    pub modules: Option<PathBuf>,
    /// Kernel release.
    pub release: String,
}

impl Kit {
    /// The kit in `dir`, if its kernel and initramfs are there.
    pub fn find(dir: &Path) -> anyhow::Result<Self> {
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio");
        if !kernel.is_file() || !initramfs.is_file() {
            anyhow::bail!(
                "no microVM kernel in {} (build it with images/kernel/build.sh {})",
                dir.display(),
                dir.display()
            );
        }
        let modules = Some(dir.join("modules.ext4")).filter(|p| p.is_file());
        let release = std::fs::read_to_string(dir.join("VERSION"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        Ok(Kit {
            dir: dir.to_path_buf(),
            kernel,
            initramfs,
            modules,
            release,
        })
    }
}

/// `qemu-system-x86_64` on PATH or in the usual places.
pub fn find_qemu() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/bin".into());
    dirs.push("/usr/local/bin".into());
    dirs.into_iter()
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// A newc cpio archive of `entries` (`(path, mode, data)`, directories before their files).
pub fn cpio(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let namesize = name.len() + 1;
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let size: usize = entries.iter().map(|(_, _, d)| d.len() + 256).sum();
    let mut out = Vec::with_capacity(size + 256);
    for (i, (name, mode, data)) in entries.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// A newc cpio archive holding the agent as `/init` (appended to the kit's initramfs: a later
/// entry replaces an earlier one of the same name).
pub fn agent_cpio(agent: &[u8]) -> Vec<u8> {
    cpio(&[("init", 0o100755, agent)])
}

/// The uid/gid QEMU of `name` (`il-<run>-<machine>`) runs as: one per machine, from a range no
/// account uses.
pub fn vm_uid(name: &str) -> u32 {
    let h = sha2::Sha256::digest(name.as_bytes());
    UID_BASE + (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) % 1_000_000)
}

/// What QEMU's console and log say about why it ended.
pub fn exit_reason(console: &str, qemu_log: &str, stopped_by_worker: bool) -> String {
    if stopped_by_worker {
        return "the machine was stopped".into();
    }
    let last = |pat: &str| console.rfind(pat);
    if let Some(p) = last("Kernel panic") {
        let line = console[p..].lines().next().unwrap_or("").trim();
        return format!("the guest kernel panicked: {line}");
    }
    if last("reboot: Power down").is_some() || last("System halted").is_some() {
        return "the guest powered itself off".into();
    }
    if last("reboot: Restarting system").is_some() {
        return "the guest rebooted (a microVM ends when its guest reboots)".into();
    }
    if let Some(p) = last("ironlab-init: ") {
        let line = console[p..].lines().next().unwrap_or("").trim();
        return format!("the guest's boot failed: {line}");
    }
    let qlog = qemu_log.trim();
    if let Some(sig) = qlog
        .lines()
        .rev()
        .find(|l| l.contains("terminating on signal"))
    {
        return format!("QEMU was stopped from outside ({})", sig.trim());
    }
    if qlog.is_empty() {
        "QEMU exited unexpectedly (killed?)".into()
    } else {
        let tail: Vec<&str> = qlog.lines().rev().take(3).collect();
        format!(
            "QEMU exited unexpectedly: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        )
    }
}

/// Runs machines as QEMU microVMs.
pub struct VmRuntime {
    qemu: PathBuf,
    kit: Kit,
    initrd: PathBuf,
    firmware: Option<PathBuf>,
    accel: Accel,
    proxies: Mutex<HashMap<PathBuf, proxy::AgentProxy>>,
    templates: std::sync::Arc<template::Templates>,
}

impl std::fmt::Debug for VmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmRuntime")
            .field("qemu", &self.qemu)
            .field("kit", &self.kit.dir)
            .field("accel", &self.accel)
            .finish()
    }
}

impl VmRuntime {
    /// A runtime using the kit in `kit_dir`, the agent `agent_bin` and `state_dir` for the
    /// generated initramfs. `accel`: `None` probes (see [`probe_accel`]).
    pub async fn new(
        kit_dir: &Path,
        agent_bin: &Path,
        state_dir: &Path,
        accel: Option<Accel>,
    ) -> anyhow::Result<Self> {
        let qemu =
            find_qemu().context("qemu-system-x86_64 not found (scripts/setup.sh installs it)")?;
        let kit = Kit::find(kit_dir)?;
        let initrd = build_initrd(&kit, agent_bin, state_dir).await?;
        let firmware = Some(PathBuf::from("/usr/share/qemu/qboot.rom")).filter(|p| p.is_file());
        let accel = match accel {
            Some(a) => a,
            None => probe_accel(&qemu, &kit, &initrd, state_dir).await,
        };
        tracing::info!(accel = accel.as_str(), kernel = %kit.release, "microVM runtime ready");
        Ok(VmRuntime {
            qemu,
            kit,
            initrd,
            firmware,
            accel,
            proxies: Mutex::new(HashMap::new()),
            templates: {
                let dir = state_dir.join("tpl");
                template::kill_orphans(&dir);
                std::sync::Arc::new(template::Templates::new(dir, template::enabled_by_env()))
            },
        })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The guest kit.
    pub fn kit(&self) -> &Kit {
        &self.kit
    }

    /// The initramfs with the agent.
    pub fn initrd(&self) -> &Path {
        &self.initrd
    }

    /// Whether the machine directory belongs to this runtime.
    pub fn owns(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join(MARKER)).is_ok_and(|s| s.trim() == "microvm")
    }

    fn proxies(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, proxy::AgentProxy>> {
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ensure_proxy(&self, m: &MachineHandle) -> anyhow::Result<()> {
        let mut proxies = self.proxies();
        if !proxies.contains_key(&m.dir) {
            let p = proxy::spawn(&m.agent_socket(), &m.dir.join("agent.serial"))?;
            proxies.insert(m.dir.clone(), p);
        }
        Ok(())
    }

    /// The QEMU process of `m`, if it runs (pid file + the process's command line names it).
    pub fn pid(m: &MachineHandle) -> Option<i32> {
        qemu_pid(
            &m.dir.join("qemu.pid"),
            &format!("guest={},", vm_name(&m.run_id, &m.machine)),
        )
    }

    fn config(&self, spec: &MachineSpec, mode: BootMode) -> VmConfig {
        let name = vm_name(&spec.run_id, &spec.plan.name);
        let uid = vm_uid(&name);
        let memory_mib = if spec.plan.memory_bytes > 0 {
            spec.plan.memory_bytes.div_ceil(1 << 20)
        } else {
            512
        };
        VmConfig {
            name,
            hostname: spec.plan.name.clone(),
            accel: self.accel,
            mode,
            memory_mib,
            cpus: spec.plan.cpus.max(1),
            kernel: self.kit.kernel.clone(),
            initrd: self.initrd.clone(),
            firmware: self.firmware.clone(),
            // A hard link in the jail, named relative to QEMU's working directory (the jail):
            // a migration out (`stop` keeping the RAM) re-opens the drive by this name when it
            // hands the drive over, by then chrooted.
            root_drive: Some(PathBuf::from(template::ROOT_FILE)),
            modules_drive: self.kit.modules.clone(),
            agent_socket: Some(spec.dir.join("agent.serial")),
            qmp_socket: Some(spec.dir.join("qmp.sock")),
            console_log: spec.dir.join("console.log"),
            pidfile: Some(spec.dir.join("qemu.pid")),
            nics: guestnet::nics(spec),
            config_drive: spec
                .net
                .as_ref()
                .map(|_| spec.dir.join(guestnet::CONFIG_DRIVE)),
            run_as: Some((uid, uid)),
            chroot: Some(spec.dir.join(JAIL)),
            tcg_tb_mib: tcg_tb_mib(),
            template: false,
            incoming: false,
        }
    }

    /// Creates the machine's cgroup (cpu, memory, pids) with its limits; returns the
    /// `cgroup.procs` files QEMU joins.
    fn make_cgroup(&self, spec: &MachineSpec, memory_mib: u64) -> Vec<PathBuf> {
        let rel = super::container::cgroup_path(&spec.run_id, &spec.plan.name);
        let mut procs = Vec::new();
        let mut set = |ctrl: &str, files: &[(&str, String)]| {
            let dir = host::cgroup_dir(ctrl, &rel);
            if let Err(e) = fs_err::create_dir_all(&dir) {
                tracing::warn!("cannot create cgroup {}: {e}", dir.display());
                return;
            }
            for (f, v) in files {
                let p = dir.join(f);
                if p.exists()
                    && let Err(e) = std::fs::write(&p, v)
                {
                    tracing::warn!("cannot set {}={v}: {e}", p.display());
                }
            }
            procs.push(dir.join("cgroup.procs"));
        };
        let cpus = u64::from(spec.plan.cpus.max(1));
        // vCPU threads plus half a CPU for QEMU's main loop and I/O.
        set(
            "cpu",
            &[
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", (cpus * 100_000 + 50_000).to_string()),
            ],
        );
        let limit = (memory_mib << 20) + MEMORY_OVERHEAD;
        set(
            "memory",
            &[
                ("memory.limit_in_bytes", limit.to_string()),
                ("memory.memsw.limit_in_bytes", limit.to_string()),
            ],
        );
        set("pids", &[("pids.max", "256".into())]);
        procs
    }

    /// Launches QEMU once; returns when QMP answers and the kernel printed its banner.
    async fn launch(&self, spec: &MachineSpec, m: &MachineHandle) -> anyhow::Result<()> {
        let config = self.config(spec, BootMode::Auto);
        let qemu_log = self.spawn_qemu(spec, m, &config, None).await?;
        self.wait_banner(m, &config, &qemu_log).await
    }

    /// Starts QEMU (detached, in the machine's namespace and cgroup) for `config`; returns the
    /// path of its log. `ram`: a template's RAM file, hard-linked into the jail as `/ram.bin`
    /// (QEMU reads it there once chrooted).
    async fn spawn_qemu(
        &self,
        spec: &MachineSpec,
        m: &MachineHandle,
        config: &VmConfig,
        ram: Option<&Path>,
    ) -> anyhow::Result<PathBuf> {
        for f in ["qmp.sock", "agent.serial", "qemu.pid", "stopped"] {
            let _ = std::fs::remove_file(m.dir.join(f));
        }
        if let (Some(path), Some(image)) = (&config.config_drive, guestnet::config_drive(spec)) {
            write_file_atomic(path, &image)?;
        }
        if let Some(jail) = &config.chroot {
            // What an earlier start linked into the jail.
            for f in [template::RAM_FILE, template::ROOT_FILE, SUSPEND_FILE] {
                let _ = std::fs::remove_file(jail.join(f));
            }
            make_jail(jail)?;
            if let Some(ram) = ram {
                fs_err::hard_link(ram, jail.join(template::RAM_FILE))?;
            }
            // QEMU re-opens the drive by its name when a migration hands the drive over, by
            // then inside the jail: the drive is there too, under the relative name the
            // command line uses (QEMU starts in the jail directory).
            if config.root_drive.as_deref().is_some_and(Path::is_relative) {
                fs_err::hard_link(&spec.root_drive, jail.join(template::ROOT_FILE))?;
            }
        }
        let procs = self.make_cgroup(spec, config.memory_mib);
        let (uid, gid) = config.run_as.unwrap_or((0, 0));
        // QEMU drops to `uid` once set up; files it may reopen later stay reachable.
        for f in [
            Some(&spec.root_drive),
            Some(&config.console_log),
            config.config_drive.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !f.exists() {
                fs_err::write(f, b"")?;
            }
            if let Err(e) = std::os::unix::fs::chown(f, Some(uid), Some(gid)) {
                tracing::warn!("cannot chown {}: {e}", f.display());
            }
        }
        let qemu_log = m.dir.join("qemu.log");
        // sh joins the cgroups and execs nsenter, which execs QEMU: one pid all along.
        let mut script = String::new();
        for p in &procs {
            script.push_str(&format!("echo $$ > '{}' || exit 1; ", p.display()));
        }
        script.push_str("exec \"$@\"");
        let mut args: Vec<String> = vec![
            "-f".into(),
            "sh".into(),
            "-c".into(),
            script,
            "sh".into(),
            "nsenter".into(),
            format!("--net={}", spec.netns.display()),
            "--".into(),
            self.qemu.to_string_lossy().into_owned(),
        ];
        args.extend(cmdline::qemu_args(config));
        setsid(&args, config.chroot.as_deref(), &qemu_log).await?;
        // What a RAM snapshot of this QEMU will need to be resumed (see `suspend`).
        fs_err::write(m.dir.join(RUNNING_KEY), self.resume_key(config))?;
        Ok(qemu_log)
    }

    /// What a machine's RAM snapshot depends on: QEMU (binary), the kernel and modules the RAM
    /// holds, the accelerator and the devices. A snapshot whose key differs is not resumed.
    fn resume_key(&self, config: &VmConfig) -> String {
        template::key(&[
            &file_stamp(&self.qemu),
            &file_stamp(&self.kit.kernel),
            &format!("{:?}", self.kit.modules.as_deref().map(file_stamp)),
            &self.kit.release,
            self.accel.as_str(),
            &config.memory_mib.to_string(),
            &config.cpus.to_string(),
            &config.nics.len().to_string(),
            &config.config_drive.is_some().to_string(),
        ])
    }

    /// Waits until QMP answers and the kernel printed its banner.
    async fn wait_banner(
        &self,
        m: &MachineHandle,
        config: &VmConfig,
        qemu_log: &Path,
    ) -> anyhow::Result<()> {
        // QMP up (QEMU running), then the kernel banner (the rare hang is before it).
        let deadline = tokio::time::Instant::now() + BANNER_TIMEOUT;
        let qmp_path = m.dir.join("qmp.sock");
        let mut qmp_ok = false;
        loop {
            let started = tokio::time::Instant::now() + BANNER_TIMEOUT - deadline;
            if !qmp_ok
                && qmp_path.exists()
                && let Ok(mut q) = qmp::Qmp::connect(&qmp_path, Duration::from_secs(5)).await
            {
                let st = q.query_status().await.unwrap_or_default();
                if st != "running" {
                    anyhow::bail!("QEMU is {st}, not running");
                }
                qmp_ok = true;
            }
            if qmp_ok {
                let console = std::fs::read(&config.console_log).unwrap_or_default();
                if memchr_find(&console, b"Linux version") {
                    return Ok(());
                }
            }
            // QEMU writes its pidfile early in its start-up; on a busy host that can take a while,
            // so only a pidfile whose process is gone (or none after PIDFILE_TIMEOUT) means it
            // exited.
            let pidfile = m.dir.join("qemu.pid").exists();
            if ((pidfile && started > Duration::from_millis(500)) || started > PIDFILE_TIMEOUT)
                && Self::pid(m).is_none()
            {
                anyhow::bail!(
                    "QEMU exited during boot: {}",
                    exit_reason(
                        &String::from_utf8_lossy(
                            &std::fs::read(&config.console_log).unwrap_or_default()
                        ),
                        &std::fs::read_to_string(qemu_log).unwrap_or_default(),
                        false
                    )
                );
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the guest did not start its kernel within {} s",
                    BANNER_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn start_inner(&self, spec: &MachineSpec) -> anyhow::Result<MachineHandle> {
        let m = MachineHandle {
            run_id: spec.run_id.clone(),
            machine: spec.plan.name.clone(),
            dir: spec.dir.clone(),
        };
        fs_err::create_dir_all(&m.dir)?;
        fs_err::write(m.dir.join(MARKER), "microvm\n")?;
        fs_err::create_dir_all(m.dir.join("agent"))?;
        if spec.fresh_from.is_none() && m.dir.join(SUSPEND_FILE).exists() {
            let t0 = std::time::Instant::now();
            match self.resume(spec, &m).await {
                Ok(steps) => {
                    tracing::info!(
                        machine = %m.machine,
                        ms = t0.elapsed().as_millis() as u64,
                        %steps,
                        "resumed from its RAM snapshot"
                    );
                    return Ok(m);
                }
                Err(e) => {
                    // The drive was synced before the snapshot: boot from it.
                    tracing::warn!(machine = %m.machine, "cannot resume from the RAM snapshot, booting instead: {e:#}");
                    self.proxies().remove(&m.dir);
                    self.kill(&m).await;
                    let _ = std::fs::remove_file(m.dir.join(SUSPEND_FILE));
                }
            }
        }
        if let Some(key) = self.template_key(spec) {
            if let Some(dir) = self.templates.ready(&key) {
                let t0 = std::time::Instant::now();
                match self.restore(spec, &m, &dir).await {
                    Ok(steps) => {
                        tracing::info!(
                            machine = %m.machine,
                            template = %key,
                            ms = t0.elapsed().as_millis() as u64,
                            %steps,
                            "restored from the boot template"
                        );
                        return Ok(m);
                    }
                    Err(e) => {
                        // A stale or broken template: boot instead (the drive is the template's
                        // clone of the same image, which boots like the image's own).
                        tracing::warn!(machine = %m.machine, template = %key, "cannot restore from the boot template, booting instead: {e:#}");
                        self.proxies().remove(&m.dir);
                        self.kill(&m).await;
                        self.templates.forget(&key);
                    }
                }
            } else if let Some(build) = self.templates.claim(&key) {
                // The drive as cloned from the image, before this machine changes it.
                match template::copy_drive(&spec.root_drive, &build.join(template::ROOT_FILE)).await
                {
                    Ok(()) => {
                        let job = template::Build {
                            qemu: self.qemu.clone(),
                            kit: self.kit.clone(),
                            initrd: self.initrd.clone(),
                            firmware: self.firmware.clone(),
                            accel: self.accel,
                            memory_mib: self.config(spec, BootMode::Auto).memory_mib,
                            cpus: spec.plan.cpus.max(1),
                            nics: guestnet::nics(spec).len(),
                            config_drive: spec.net.is_some(),
                        };
                        let templates = self.templates.clone();
                        let after = m.agent_socket();
                        tokio::spawn(template::build_after(templates, key, build, job, after));
                    }
                    Err(e) => {
                        tracing::warn!("cannot prepare a boot template: {e:#}");
                        self.templates.release(&key, false);
                    }
                }
            }
        }
        let mut last = None;
        for attempt in 0..2 {
            match self.launch(spec, &m).await {
                Ok(()) => {
                    self.ensure_proxy(&m)?;
                    return Ok(m);
                }
                Err(e) => {
                    tracing::warn!(machine = %m.machine, attempt, "microVM boot failed: {e:#}");
                    self.kill(&m).await;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("boot failed")))
            .context("the microVM did not boot (tried twice)")
    }

    /// The boot-template key of a fresh start's machine (`None`: restarts, templates off).
    fn template_key(&self, spec: &MachineSpec) -> Option<String> {
        let image = spec.fresh_from.as_ref()?;
        if !self.templates.enabled() {
            return None;
        }
        let config = self.config(spec, BootMode::Auto);
        let size = std::fs::metadata(&spec.root_drive).ok()?.len();
        std::fs::metadata(&self.kit.kernel).ok()?;
        Some(template::key(&[
            &self.qemu.to_string_lossy(),
            &file_stamp(&self.kit.kernel),
            &self.kit.release,
            &self.initrd.to_string_lossy(),
            &format!("{:?}", self.kit.modules),
            self.accel.as_str(),
            &config.tcg_tb_mib.to_string(),
            &config.memory_mib.to_string(),
            &config.cpus.to_string(),
            &config.nics.len().to_string(),
            &config.config_drive.is_some().to_string(),
            &size.to_string(),
            &image.to_string_lossy(),
        ]))
    }

    /// Restores the machine from the boot template in `dir`: its drive becomes a clone of the
    /// template's, QEMU starts with `-incoming defer` and loads the template's RAM, then the
    /// agent makes the guest this machine (`Configure`). Returns the steps with their times.
    async fn restore(
        &self,
        spec: &MachineSpec,
        m: &MachineHandle,
        dir: &Path,
    ) -> anyhow::Result<String> {
        let mut steps = Vec::new();
        let mut t = std::time::Instant::now();
        let mut step = |what: &str, t: &mut std::time::Instant| {
            steps.push(format!("{what} {} ms", t.elapsed().as_millis()));
            *t = std::time::Instant::now();
        };
        template::copy_drive(&dir.join(template::ROOT_FILE), &spec.root_drive).await?;
        // The console log starts with the template's boot (what `playground logs` shows).
        let mut log = std::fs::read(dir.join("console.log")).unwrap_or_default();
        log.extend_from_slice(
            format!(
                "\nironlab: the lines above are the boot of the template this machine was restored from ({})\n",
                dir.file_name().unwrap_or_default().to_string_lossy()
            )
            .as_bytes(),
        );
        fs_err::write(spec.dir.join("console.log"), log)?;
        step("drive", &mut t);
        let mut config = self.config(spec, BootMode::Auto);
        config.incoming = true;
        config.tcg_tb_mib = restored_tb_mib(config.tcg_tb_mib);
        let ram = dir.join(template::RAM_FILE);
        let qemu_log = self.spawn_qemu(spec, m, &config, Some(&ram)).await?;
        self.incoming(m, &config, &qemu_log).await?;
        step("QEMU and RAM", &mut t);
        self.ensure_proxy(m)?;
        let guest = self
            .configure_guest(
                m,
                ironlab_api::agent::ConfigureRequest {
                    hostname: spec.plan.name.clone(),
                    config: guestnet::config_drive(spec).unwrap_or_default(),
                    macs: config.nics.iter().map(|n| n.mac.clone()).collect(),
                    ..Default::default()
                },
            )
            .await?;
        step("agent and configure", &mut t);
        Ok(format!("{} (guest: {guest})", steps.join(", ")))
    }

    /// Loads the RAM linked into the jail as `ram.bin` into the QEMU started with
    /// `-incoming defer`, removes the link and lets the guest run.
    async fn incoming(
        &self,
        m: &MachineHandle,
        config: &VmConfig,
        qemu_log: &Path,
    ) -> anyhow::Result<()> {
        let jail_ram = config.chroot.as_ref().map(|j| j.join(template::RAM_FILE));
        let loaded = async {
            let qmp_path = m.dir.join("qmp.sock");
            let deadline = tokio::time::Instant::now() + PIDFILE_TIMEOUT;
            let mut q = loop {
                if qmp_path.exists()
                    && let Ok(q) = qmp::Qmp::connect(&qmp_path, Duration::from_secs(5)).await
                {
                    break q;
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "QEMU did not open its QMP socket: {}",
                        std::fs::read_to_string(qemu_log).unwrap_or_default().trim()
                    );
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            q.execute(
                "migrate-incoming",
                Some(serde_json::json!({ "uri": format!("file:/{}", template::RAM_FILE) })),
            )
            .await?;
            q.wait_migration(template::MIGRATE_TIMEOUT).await?;
            if q.query_status().await? != "running" {
                q.execute("cont", None).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Some(p) = &jail_ram {
            let _ = std::fs::remove_file(p);
        }
        loaded
    }

    /// Waits until the agent of a guest loaded from RAM answers; then asks it to configure
    /// itself with `req` (its clock and seed always; name and network unless resuming).
    async fn configure_guest(
        &self,
        m: &MachineHandle,
        mut req: ironlab_api::agent::ConfigureRequest,
    ) -> anyhow::Result<String> {
        let socket = m.agent_socket();
        let deadline = tokio::time::Instant::now() + template::AGENT_TIMEOUT;
        let mut proxy_made = tokio::time::Instant::now();
        let mut client = loop {
            match crate::agent_client::health(&socket, Duration::from_secs(1)).await {
                Ok((client, _)) => break client,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(e.context("the guest's agent did not answer after the restore"));
                }
                Err(_) if proxy_made.elapsed() >= RESYNC_AFTER => {
                    // The snapshot may hold an agent still in a session with the host that
                    // left (it noticed too late): the first SYNC only ends that session. A
                    // new proxy sends a new one rather than waiting out its ACK timeout.
                    tracing::debug!(machine = %m.machine, "no answer from the restored agent yet; a new SYNC");
                    self.proxies().remove(&m.dir);
                    self.ensure_proxy(m)?;
                    proxy_made = tokio::time::Instant::now();
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        req.time_unix_ns = i64::try_from(now.as_nanos()).unwrap_or(i64::MAX);
        req.seed = (0..64).map(|_| rand::random::<u8>()).collect();
        let reply = client
            .configure(req)
            .await
            .map_err(|s| anyhow::anyhow!("the guest could not configure itself: {}", s.message()))?
            .into_inner();
        Ok(reply.steps)
    }

    /// Stops a running machine keeping its RAM: the agent's port is left (the guest's agent
    /// waits for a host again), QEMU is paused and its state migrated to `state.ram` in the
    /// jail, QEMU quits; the snapshot moves to the machine directory with its resume key.
    /// Returns the snapshot's size. On error nothing is kept and QEMU runs on (not paused).
    async fn suspend(&self, m: &MachineHandle) -> anyhow::Result<u64> {
        let jail = m.dir.join(JAIL);
        let in_jail = jail.join(SUSPEND_FILE);
        let key = fs_err::read_to_string(m.dir.join(RUNNING_KEY))
            .context("the running QEMU's resume key is missing")?;
        let uid = vm_uid(&vm_name(&m.run_id, &m.machine));
        let saved = async {
            fs_err::write(&in_jail, b"")?;
            std::os::unix::fs::chown(&in_jail, Some(uid), Some(uid))?;
            self.proxies().remove(&m.dir);
            let mut q = qmp::Qmp::connect(&m.dir.join("qmp.sock"), Duration::from_secs(5)).await?;
            // The agent ends its session when the host leaves and then only opens its port
            // for a moment every 20 ms to look for a new host: seeing the port closed means
            // the snapshot holds an agent waiting for a host (a resumed guest whose agent
            // still sat in the old session would swallow the new host's SYNC).
            let deadline = tokio::time::Instant::now() + AGENT_LEAVE;
            while q.frontend_open("agent").await? {
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "the guest's agent did not leave its session within {} s",
                        AGENT_LEAVE.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            q.execute("stop", None).await?;
            let migrated = async {
                q.execute(
                    "migrate",
                    Some(serde_json::json!({ "uri": format!("file:/{SUSPEND_FILE}") })),
                )
                .await?;
                q.wait_migration(template::MIGRATE_TIMEOUT).await
            }
            .await;
            if let Err(e) = migrated {
                let _ = q.execute("cont", None).await;
                return Err(e);
            }
            q.quit().await?;
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = saved {
            let _ = std::fs::remove_file(&in_jail);
            let _ = self.ensure_proxy(m);
            return Err(e);
        }
        for _ in 0..250 {
            if Self::pid(m).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if Self::pid(m).is_some() {
            self.kill(m).await;
        }
        let kept = m.dir.join(SUSPEND_FILE);
        fs_err::rename(&in_jail, &kept)?;
        // The machine's own uid reads it back at the restart; nobody else.
        fs_err::set_permissions(&kept, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        fs_err::write(m.dir.join(SUSPEND_KEY), key)?;
        Ok(fs_err::metadata(&kept)?.len())
    }

    /// Restarts a stopped machine from its RAM snapshot: QEMU starts with `-incoming defer` on
    /// the machine's own drive, loads the RAM and runs on where it stopped; the agent sets the
    /// guest's clock and seed. The snapshot is gone once QEMU holds it (the drive moves on from
    /// here, so it can never be resumed twice). Returns the steps with their times.
    async fn resume(&self, spec: &MachineSpec, m: &MachineHandle) -> anyhow::Result<String> {
        let ram = m.dir.join(SUSPEND_FILE);
        let want = fs_err::read_to_string(m.dir.join(SUSPEND_KEY)).unwrap_or_default();
        let mut config = self.config(spec, BootMode::Auto);
        let now = self.resume_key(&config);
        let _ = std::fs::remove_file(m.dir.join(SUSPEND_KEY));
        if want != now {
            let _ = std::fs::remove_file(&ram);
            anyhow::bail!("the RAM snapshot was taken with another QEMU, kernel or machine shape");
        }
        let t = std::time::Instant::now();
        config.incoming = true;
        let spawned = self.spawn_qemu(spec, m, &config, Some(&ram)).await;
        // The jail's link holds it now; from here on a failure boots from the drive.
        let _ = std::fs::remove_file(&ram);
        let qemu_log = spawned?;
        self.incoming(m, &config, &qemu_log).await?;
        let loaded = t.elapsed().as_millis();
        self.ensure_proxy(m)?;
        let guest = self
            .configure_guest(
                m,
                ironlab_api::agent::ConfigureRequest {
                    resume: true,
                    config: guestnet::config_drive(spec).unwrap_or_default(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(format!(
            "QEMU and RAM {loaded} ms, agent and clock {} ms (guest: {guest})",
            t.elapsed().as_millis() - loaded
        ))
    }

    /// SIGKILLs QEMU (by its pidfile, and every process in the machine's cgroup: a QEMU that
    /// has not written its pidfile yet is found there too) and waits (≤ 5 s) until all are gone.
    async fn kill(&self, m: &MachineHandle) {
        let procs = host::cgroup_dir(
            "pids",
            &super::container::cgroup_path(&m.run_id, &m.machine),
        )
        .join("cgroup.procs");
        let in_cgroup = || -> Vec<i32> {
            std::fs::read_to_string(&procs)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        };
        let sigkill = |pid: i32| {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        let first = Self::pid(m);
        let members = in_cgroup();
        if first.is_none() && members.is_empty() {
            return;
        }
        first.into_iter().chain(members).for_each(sigkill);
        for _ in 0..250 {
            let left = in_cgroup();
            if Self::pid(m).is_none() && left.is_empty() {
                return;
            }
            left.into_iter().for_each(sigkill);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(machine = %m.machine, "QEMU did not go away after SIGKILL");
    }

    async fn teardown(&self, m: &MachineHandle) -> anyhow::Result<()> {
        self.proxies().remove(&m.dir);
        let _ = fs_err::write(m.dir.join("stopped"), b"");
        self.kill(m).await;
        let mut errors = Vec::new();
        if Self::pid(m).is_some() {
            errors.push(format!("QEMU of {} still runs", m.machine));
        }
        let rel = super::container::cgroup_path(&m.run_id, &m.machine);
        let mut removed = false;
        for _ in 0..50 {
            if host::remove_cgroup(&rel).is_ok() {
                removed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !removed && let Err(e) = host::remove_cgroup(&rel) {
            errors.push(format!("{e:#}"));
        }
        match std::fs::remove_dir_all(&m.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("cannot remove {}: {e}", m.dir.display())),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", errors.join("; "))
        }
    }

    /// What `release` does: QEMU gone, its proxy, cgroup, sockets and pid file removed; the
    /// directory and its drives kept.
    async fn release_inner(&self, m: &MachineHandle) -> anyhow::Result<()> {
        self.proxies().remove(&m.dir);
        if Self::pid(m).is_some() {
            let _ = fs_err::write(m.dir.join("stopped"), b"");
            self.kill(m).await;
        }
        if Self::pid(m).is_some() {
            anyhow::bail!("QEMU of {} still runs", m.machine);
        }
        let rel = super::container::cgroup_path(&m.run_id, &m.machine);
        for _ in 0..50 {
            if host::remove_cgroup(&rel).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        host::remove_cgroup(&rel).or_else(|e| {
            if std::path::Path::new("/sys/fs/cgroup").join(&rel).exists() {
                Err(e)
            } else {
                Ok(())
            }
        })?;
        for f in ["qemu.pid", "qmp.sock", "stopped"] {
            let _ = std::fs::remove_file(m.dir.join(f));
        }
        let _ = std::fs::remove_file(m.agent_socket());
        Ok(())
    }

    /// Why the machine is not running (console, QEMU's log, whether the worker stopped it).
    pub fn why_stopped(m: &MachineHandle) -> String {
        let console = std::fs::read(m.console_log()).unwrap_or_default();
        let console = String::from_utf8_lossy(&console);
        let qlog = std::fs::read_to_string(m.dir.join("qemu.log")).unwrap_or_default();
        exit_reason(&console, &qlog, m.dir.join("stopped").exists())
    }

    /// QEMU processes (pid, `-name` guest value) of ironlab machines on this host.
    fn qemu_processes() -> Vec<(i32, String)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return out;
        };
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !args
                .first()
                .is_some_and(|a| a.ends_with("qemu-system-x86_64"))
            {
                continue;
            }
            if let Some(name) = args
                .windows(2)
                .find(|w| w[0] == "-name")
                .and_then(|w| w[1].strip_prefix("guest="))
                .and_then(|v| v.split(',').next())
                && name.starts_with("il-")
            {
                out.push((pid, name.to_string()));
            }
        }
        out
    }
}

/// A file's identity for a cache key: path, size and modification time (`missing` when gone).
fn file_stamp(p: &Path) -> String {
    std::fs::metadata(p)
        .map(|md| {
            let t = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            format!("{}:{}/{t}", p.display(), md.len())
        })
        .unwrap_or_else(|_| format!("{}:missing", p.display()))
}

/// Makes `dir` an empty directory owned by root, mode 0555 (QEMU's root after start-up: it
/// can neither see nor create anything there).
pub(crate) fn make_jail(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    match std::fs::symlink_metadata(dir) {
        Ok(md) if md.is_dir() => {
            if fs_err::read_dir(dir)?.next().is_some() {
                anyhow::bail!("{} is not empty", dir.display());
            }
        }
        Ok(_) => anyhow::bail!("{} is not a directory", dir.display()),
        Err(_) => fs_err::create_dir(dir)?,
    }
    std::os::unix::fs::chown(dir, Some(0), Some(0))
        .with_context(|| format!("cannot chown {}", dir.display()))?;
    fs_err::set_permissions(dir, std::fs::Permissions::from_mode(0o555))?;
    Ok(())
}

/// The live (not zombie) process of `pidfile` whose command line contains `want`.
pub(crate) fn qemu_pid(pidfile: &Path, want: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(") ")
        .is_some_and(|(_, rest)| rest.starts_with('Z'));
    (!zombie && String::from_utf8_lossy(&cmdline).contains(want)).then_some(pid)
}

/// Runs `setsid ARGS` (ARGS starting with `-f`: what it runs detaches and outlives the worker)
/// in `cwd`, its output appended to `log`.
pub(crate) async fn setsid(args: &[String], cwd: Option<&Path>, log: &Path) -> anyhow::Result<()> {
    let out = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.file().try_clone()?;
    let mut command = tokio::process::Command::new("setsid");
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let status = command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(out.into_parts().0))
        .stderr(std::process::Stdio::from(err))
        .status()
        .await
        .context("cannot run setsid")?;
    if !status.success() {
        anyhow::bail!("setsid failed ({status})");
    }
    Ok(())
}

/// Writes `path` whole or not at all (temp file + rename).
fn write_file_atomic(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a path with a directory")?;
    let tmp = tempfile::Builder::new()
        .prefix(".config-")
        .tempfile_in(dir)?;
    fs_err::write(tmp.path(), data)?;
    tmp.persist(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// QEMU's `-name` of a machine.
pub fn vm_name(run_id: &str, machine: &str) -> String {
    format!("il-{run_id}-{machine}")
}

fn memchr_find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Writes `state_dir/initrd-<hash>.img` = the kit's initramfs + a cpio with the agent (stripped
/// of debug info when `strip` is available: a debug agent is ~70 MB, stripped ~9 MB).
pub async fn build_initrd(
    kit: &Kit,
    agent_bin: &Path,
    state_dir: &Path,
) -> anyhow::Result<PathBuf> {
    let base = fs_err::read(&kit.initramfs)?;
    let agent = fs_err::read(agent_bin).with_context(|| {
        format!(
            "the agent binary {} is needed for microVMs",
            agent_bin.display()
        )
    })?;
    let mut h = sha2::Sha256::new();
    h.update(&base);
    h.update(&agent);
    let hex = hex::encode(&h.finalize()[..8]);
    fs_err::create_dir_all(state_dir)?;
    let out = state_dir.join(format!("initrd-{hex}.img"));
    if out.is_file() {
        return Ok(out);
    }
    let tmp = tempfile::Builder::new()
        .prefix(".agent-")
        .tempfile_in(state_dir)?;
    let stripped = tmp.path().with_extension("strip");
    let agent = match crate::cmd::run(
        "strip",
        &[
            "-o",
            &stripped.to_string_lossy(),
            &agent_bin.to_string_lossy(),
        ],
    )
    .await
    {
        Ok(_) => {
            let a = fs_err::read(&stripped)?;
            let _ = std::fs::remove_file(&stripped);
            a
        }
        Err(e) => {
            tracing::debug!("strip: {e}; using the agent as is");
            agent
        }
    };
    let mut img = base;
    while !img.len().is_multiple_of(4) {
        img.push(0);
    }
    img.extend_from_slice(&agent_cpio(&agent));
    fs_err::write(tmp.path(), &img)?;
    tmp.persist(&out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    // Older initramfs images of other agent builds are no longer used by new boots.
    if let Ok(rd) = std::fs::read_dir(state_dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("initrd-") && e.path() != out {
                let old = e
                    .metadata()
                    .and_then(|md| md.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(24 * 3600));
                if old {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    Ok(out)
}

/// Whether KVM boots the kit here: a tiny boot (`ironlab.mode=probe`) that must print its
/// marker within 10 s. This host kind's `/dev/kvm` is PVM, which cannot run a stock kernel, so
/// the answer there is TCG. The result is cached until the host reboots in
/// `/run/ironlab/vm-accel-<kernel release>`; `IRONLAB_VM_ACCEL=kvm|tcg` skips the probe.
pub async fn probe_accel(qemu: &Path, kit: &Kit, initrd: &Path, state_dir: &Path) -> Accel {
    match std::env::var("IRONLAB_VM_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    // /run is emptied at boot: the answer holds until the host reboots, for every worker.
    let cache_dir = Path::new("/run/ironlab");
    let _ = std::fs::create_dir_all(cache_dir);
    let cache = cache_dir.join(format!("vm-accel-{}", kit.release));
    if let Ok(s) = std::fs::read_to_string(&cache) {
        match s.trim() {
            "kvm" => return Accel::Kvm,
            "tcg" => return Accel::Tcg,
            _ => {}
        }
    }
    let accel = if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        tracing::info!("no usable /dev/kvm: microVMs use TCG");
        Accel::Tcg
    } else {
        match probe_kvm(qemu, kit, initrd, state_dir).await {
            Ok(()) => Accel::Kvm,
            Err(e) => {
                tracing::info!("KVM probe failed ({e:#}): microVMs use TCG");
                Accel::Tcg
            }
        }
    };
    let _ = std::fs::write(&cache, accel.as_str());
    accel
}

async fn probe_kvm(qemu: &Path, kit: &Kit, initrd: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix(".probe-")
        .tempdir_in(state_dir)?;
    let console = dir.path().join("console.log");
    let config = VmConfig {
        name: "il-probe".into(),
        hostname: "probe".into(),
        accel: Accel::Kvm,
        mode: BootMode::Probe,
        memory_mib: 128,
        cpus: 1,
        kernel: kit.kernel.clone(),
        initrd: initrd.to_path_buf(),
        firmware: Some(PathBuf::from("/usr/share/qemu/qboot.rom")).filter(|p| p.is_file()),
        root_drive: None,
        modules_drive: None,
        agent_socket: None,
        qmp_socket: None,
        console_log: console.clone(),
        pidfile: None,
        nics: Vec::new(),
        config_drive: None,
        run_as: None,
        chroot: None,
        tcg_tb_mib: tcg_tb_mib(),
        template: false,
        incoming: false,
    };
    let mut child = tokio::process::Command::new(qemu)
        .args(cmdline::qemu_args(&config))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let done = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    if out.contains("IRONLAB-PROBE-OK") {
        return Ok(());
    }
    match done {
        Err(_) => anyhow::bail!("no marker within 10 s"),
        Ok(s) => anyhow::bail!("QEMU ended ({:?}) without the marker", s.ok()),
    }
}

#[async_trait]
impl MachineRuntime for VmRuntime {
    fn name(&self) -> &'static str {
        "microvm"
    }

    async fn start(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        self.start_inner(spec)
            .await
            .map_err(|e| RuntimeError::new("start", vm_name(&spec.run_id, &spec.plan.name), e))
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<(), RuntimeError> {
        if Self::pid(m).is_none() {
            return Ok(());
        }
        let _ = fs_err::write(m.dir.join("stopped"), b"");
        // The guest's page cache is not the host's: a guest without an init that acts on the
        // power button (agent as PID 1) would be quit with its last writes unwritten. Flush
        // them first (a systemd guest syncs again while powering off). Through `sh`: a busybox
        // image may have no `sync` link, but its shell runs applets by name.
        match crate::agent_client::run(
            &m.agent_socket(),
            &["sh", "-c", "sync"],
            grace.min(Duration::from_secs(10)),
        )
        .await
        {
            Ok(0) => {}
            Ok(code) => tracing::warn!(machine = %m.machine, code, "sync in the guest failed"),
            Err(e) => tracing::warn!(machine = %m.machine, "cannot sync the guest: {e:#}"),
        }
        if suspend_enabled() {
            let t0 = std::time::Instant::now();
            match self.suspend(m).await {
                Ok(bytes) => {
                    tracing::info!(
                        machine = %m.machine,
                        ms = t0.elapsed().as_millis() as u64,
                        mib = bytes >> 20,
                        "stopped keeping its RAM"
                    );
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(machine = %m.machine, "cannot keep the RAM, powering off: {e:#}")
                }
            }
        }
        let qmp_path = m.dir.join("qmp.sock");
        if let Ok(mut q) = qmp::Qmp::connect(&qmp_path, Duration::from_secs(2)).await {
            let _ = q.system_powerdown().await;
        }
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if Self::pid(m).is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Ok(mut q) = qmp::Qmp::connect(&qmp_path, Duration::from_secs(2)).await {
            let _ = q.quit().await;
        }
        for _ in 0..100 {
            if Self::pid(m).is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill(m).await;
        Ok(())
    }

    async fn release(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        self.release_inner(m)
            .await
            .map_err(|e| RuntimeError::new("release", vm_name(&m.run_id, &m.machine), e))
    }

    async fn destroy(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        self.teardown(m)
            .await
            .map_err(|e| RuntimeError::new("destroy", vm_name(&m.run_id, &m.machine), e))
    }

    async fn observe(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        if Self::pid(m).is_some() {
            // A worker restart finds QEMU running without its proxy.
            if let Err(e) = self.ensure_proxy(m) {
                return Err(RuntimeError::new(
                    "observe",
                    vm_name(&m.run_id, &m.machine),
                    e,
                ));
            }
            return Ok(MachineState::Running);
        }
        self.proxies().remove(&m.dir);
        if m.dir.join("qemu.pid").exists() {
            Ok(MachineState::Stopped)
        } else {
            Ok(MachineState::Missing)
        }
    }

    fn agent(&self, m: &MachineHandle) -> AgentEndpoint {
        AgentEndpoint {
            socket: m.agent_socket(),
        }
    }

    async fn knows_run(&self, run_id: &str) -> anyhow::Result<bool> {
        let prefix = format!("il-{run_id}-");
        Ok(Self::qemu_processes()
            .iter()
            .any(|(_, n)| n.starts_with(&prefix)))
    }

    async fn clean_leftovers(&self, runs_dir: &Path, keep: &[String]) -> anyhow::Result<()> {
        // QEMUs whose pid file lies in this pool's runs directory, of runs not kept (their
        // directory may already be gone after an interrupted teardown).
        let prefix = format!("{}/", runs_dir.display());
        for (pid, name) in Self::qemu_processes() {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
            let ours = cmdline.split('\0').any(|a| a.starts_with(&prefix));
            let kept = keep.iter().any(|r| name.starts_with(&format!("il-{r}-")));
            if ours && !kept {
                tracing::info!(pid, %name, "killing leftover QEMU");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        Ok(())
    }

    fn agent_timeout(&self, _m: &MachineHandle) -> Duration {
        std::env::var("IRONLAB_VM_AGENT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(AGENT_TIMEOUT)
    }

    fn exit_reason(&self, m: &MachineHandle) -> Option<String> {
        Some(Self::why_stopped(m))
    }

    /// The new worker's proxy needs a fresh serial session: the guest first has to see the old
    /// one end, which a TCG guest on a busy host may take seconds to do.
    fn recover_timeout(&self, _m: &MachineHandle) -> Duration {
        Duration::from_secs(30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_with_the_agent() {
        let c = agent_cpio(b"\x7fELFdata");
        assert!(c.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&c);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(c.len() % 4, 0);
        // The first entry is `init` (name size 5 with its NUL), mode 0100755.
        assert_eq!(&c[110..115], b"init\0");
        let pos = 110;
        assert_eq!(&c[14..22], b"000081ed");
        assert_eq!(&c[94..102], b"00000005");
        let header = &c[pos - 110..pos];
        assert_eq!(&header[54..62], b"00000008");
    }

    #[test]
    fn uids_are_per_machine_and_unprivileged() {
        let a = vm_uid("il-abc-web");
        assert!(a >= UID_BASE);
        assert_eq!(a, vm_uid("il-abc-web"));
        assert_ne!(a, vm_uid("il-abc-db"));
    }

    #[test]
    fn exit_reasons_read_like_a_user_would_say_them() {
        assert_eq!(
            exit_reason("...\n[ 5.1] reboot: Power down\n", "", false),
            "the guest powered itself off"
        );
        assert!(
            exit_reason(
                "[1.0] Kernel panic - not syncing: Attempted to kill init!\n",
                "",
                false
            )
            .starts_with("the guest kernel panicked: Kernel panic - not syncing")
        );
        assert!(
            exit_reason(
                "",
                "qemu-system-x86_64: terminating on signal 15 from pid 42 (bash)",
                false
            )
            .starts_with("QEMU was stopped from outside")
        );
        assert_eq!(
            exit_reason("booting...", "", false),
            "QEMU exited unexpectedly (killed?)"
        );
        assert_eq!(
            exit_reason("reboot: Power down", "", true),
            "the machine was stopped"
        );
        assert!(
            exit_reason(
                "ironlab-init: no root drive /dev/vda after 5 s\n",
                "",
                false
            )
            .contains("no root drive")
        );
    }
}
