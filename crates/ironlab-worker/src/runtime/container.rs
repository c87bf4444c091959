//! The container runtime: one OCI bundle per machine, run by `crun` (or `runc`).
//!
//! Per machine, under `pool/runs/<run>/<machine>/`: `root.ext4` (prepared by the run manager) is
//! loop-mounted at `rootfs/`, `bundle/config.json` describes the container, `agent/` is
//! bind-mounted at `/run/ironlab` inside it (the agent's socket appears there), `console.log`
//! receives the init's stdout/stderr. The container id is `il-<run>-<machine>`; its cgroup is
//! `/ironlab/<run>/<machine>`. Containers run detached in their own process group, so they outlive
//! the worker and a Ctrl-C to the worker's terminal never reaches them.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AgentEndpoint, MachineHandle, MachineRuntime, MachineSpec, MachineState, RuntimeError,
};
use crate::cmd;
use crate::host::{self, OciRuntime};

/// Path of the agent binary inside the container.
pub const AGENT_IN_MACHINE: &str = "/.ironlab/agent";
/// Directory of the agent socket inside the container.
pub const AGENT_DIR_IN_MACHINE: &str = "/run/ironlab";
/// Default PATH when the image sets none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set plus what sudo needs; never `CAP_SYS_ADMIN`.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The container id of a machine.
pub fn container_id(run_id: &str, machine: &str) -> String {
    format!("il-{run_id}-{machine}")
}

/// The cgroup path (relative to each hierarchy) of a machine.
pub fn cgroup_path(run_id: &str, machine: &str) -> String {
    format!("ironlab/{run_id}/{machine}")
}

/// One entry of `crun list -f json`.
#[derive(Debug, Clone, Deserialize)]
pub struct OciContainer {
    /// Container id.
    pub id: String,
    /// `created`, `running`, `stopped`, `paused`.
    #[serde(default)]
    pub status: String,
    /// Bundle directory.
    #[serde(default)]
    pub bundle: String,
}

/// Runs machines as OCI containers.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    oci: OciRuntime,
    agent_bin: PathBuf,
    setsid: Option<PathBuf>,
}

impl ContainerRuntime {
    /// A runtime driving `oci`, injecting `agent_bin` (the static agent) into every machine.
    pub fn new(oci: OciRuntime, agent_bin: PathBuf) -> Self {
        let setsid = ["/usr/bin/setsid", "/bin/setsid"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        Self {
            oci,
            agent_bin,
            setsid,
        }
    }

    /// The OCI runtime in use.
    pub fn oci(&self) -> &OciRuntime {
        &self.oci
    }

    async fn oci_cmd(&self, args: &[&str]) -> Result<std::process::Output, cmd::CmdError> {
        cmd::run(&self.oci.path.to_string_lossy(), args).await
    }

    /// All containers the OCI runtime knows.
    pub async fn list(&self) -> anyhow::Result<Vec<OciContainer>> {
        let out = self
            .oci_cmd(&["list", "-f", "json"])
            .await
            .with_context(|| format!("cannot list {} containers", self.oci.name))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() || text.trim() == "null" {
            return Ok(Vec::new());
        }
        serde_json::from_str(&text)
            .with_context(|| format!("cannot parse `{} list`", self.oci.name))
    }

    async fn state(&self, id: &str) -> anyhow::Result<MachineState> {
        match self.oci_cmd(&["state", id]).await {
            Ok(out) => {
                let v: Value = serde_json::from_slice(&out.stdout)
                    .with_context(|| format!("cannot parse `{} state {id}`", self.oci.name))?;
                Ok(match v.get("status").and_then(Value::as_str) {
                    Some("running") => MachineState::Running,
                    _ => MachineState::Stopped,
                })
            }
            Err(e) if is_missing(e.stderr()) => Ok(MachineState::Missing),
            Err(e) => Err(e.into()),
        }
    }

    /// Kills and deletes the OCI container `id` (idempotent).
    async fn remove_container(&self, id: &str) -> anyhow::Result<()> {
        if let Err(e) = self.oci_cmd(&["kill", id, "KILL"]).await {
            tracing::debug!(container = id, "kill: {e}");
        }
        let mut last = None;
        for attempt in 0..20 {
            match self.oci_cmd(&["delete", "-f", id]).await {
                Ok(_) => return Ok(()),
                Err(e) if is_missing(e.stderr()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(container = id, attempt, "delete: {e}");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        match last {
            Some(e) => Err(e).with_context(|| format!("cannot delete container {id}")),
            None => Ok(()),
        }
    }

    /// Removes everything of machine `m` on the host: container, mounts, loop devices, cgroup,
    /// files.
    async fn teardown(&self, m: &MachineHandle) -> anyhow::Result<()> {
        let id = container_id(&m.run_id, &m.machine);
        let mut errors: Vec<String> = Vec::new();
        if let Err(e) = self.remove_container(&id).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = host::release_mounts_and_loops(&m.dir).await {
            errors.push(format!("{e:#}"));
        }
        if let Err(e) = remove_cgroup_retrying(&cgroup_path(&m.run_id, &m.machine)).await {
            errors.push(format!("{e:#}"));
        }
        // Never delete files while something is still mounted below the directory.
        match host::mounts_under(&m.dir) {
            Ok(left) if left.is_empty() => {
                if let Err(e) = remove_dir_all_if_exists(&m.dir) {
                    errors.push(format!("{e:#}"));
                }
            }
            Ok(left) => errors.push(format!(
                "not removing {}: still mounted: {left:?}",
                m.dir.display()
            )),
            Err(e) => errors.push(format!("{e:#}")),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{}", errors.join("; "))
        }
    }

    /// Removes the container, unmounts the root drive, detaches its loop device and removes the
    /// cgroup; keeps `m.dir` (drive, image env, console log). Waits until the drive file is no
    /// longer bound to a loop device (a lazily unmounted filesystem may take a moment).
    async fn release_inner(&self, m: &MachineHandle) -> anyhow::Result<()> {
        let id = container_id(&m.run_id, &m.machine);
        self.remove_container(&id).await?;
        host::release_mounts_and_loops(&m.dir).await?;
        remove_cgroup_retrying(&cgroup_path(&m.run_id, &m.machine)).await?;
        let drive = m.dir.join("root.ext4");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let bound = host::loops_for(&drive).await?;
            if bound.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "{} is still attached to {bound:?} after unmounting",
                    drive.display()
                );
            }
            for dev in &bound {
                let _ = host::detach_loop(dev).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sock = m.agent_socket();
        if sock.exists() {
            let _ = fs_err::remove_file(&sock);
        }
        Ok(())
    }

    async fn start_inner(&self, spec: &MachineSpec) -> anyhow::Result<MachineHandle> {
        let m = MachineHandle {
            run_id: spec.run_id.clone(),
            machine: spec.plan.name.clone(),
            dir: spec.dir.clone(),
        };
        let id = container_id(&m.run_id, &m.machine);
        let rootfs = m.dir.join("rootfs");
        let bundle = m.dir.join("bundle");
        let agent_dir = m.dir.join("agent");
        fs_err::create_dir_all(&bundle)?;
        fs_err::create_dir_all(&agent_dir)?;
        let sock = m.agent_socket();
        if sock.exists() {
            fs_err::remove_file(&sock)?;
        }
        if !self.agent_bin.is_file() {
            anyhow::bail!(
                "agent binary {} not found (set --agent or IRONLAB_AGENT to the static ironlab-agent)",
                self.agent_bin.display()
            );
        }

        let t0 = std::time::Instant::now();
        host::loop_mount(&spec.root_drive, &rootfs).await?;
        let t_mount = t0.elapsed();
        prepare_rootfs(
            &rootfs,
            &spec.plan.name,
            spec.etc_hosts.as_deref(),
            spec.resolv_conf.as_deref(),
        )
        .with_context(|| format!("cannot prepare rootfs {}", rootfs.display()))?;

        let config = bundle_config(spec, &rootfs, &agent_dir, &self.agent_bin);
        let config_path = bundle.join("config.json");
        let text = serde_json::to_vec_pretty(&config)?;
        fs_err::write(&config_path, text)?;

        // A leftover container with the same id (crash between create and record) goes first.
        // (The state directory check saves a runtime call on the usual, clean path.)
        let state_dir = Path::new("/run").join(&self.oci.name).join(&id);
        if state_dir.exists() && self.state(&id).await? != MachineState::Missing {
            self.remove_container(&id).await?;
        }

        let console_path = m.console_log();
        let console = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console_path)?;
        let console_err = console
            .file()
            .try_clone()
            .with_context(|| format!("cannot duplicate {}", console_path.display()))?;
        let bundle_s = bundle.to_string_lossy().into_owned();
        // A new session (setsid(1) execs the runtime in place, we wait on it directly) and, in
        // any case, a new process group: neither a Ctrl-C nor a hang-up of the worker's terminal
        // reaches containers.
        let mut cmd = match &self.setsid {
            Some(setsid) => {
                let mut c = tokio::process::Command::new(setsid);
                c.arg("--wait").arg(&self.oci.path);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&self.oci.path);
                c.process_group(0);
                c
            }
        };
        let mut child = cmd
            .args(["run", "--detach", "--bundle", &bundle_s, &id])
            .stdin(Stdio::null())
            .stdout(Stdio::from(console.into_parts().0))
            .stderr(Stdio::from(console_err))
            .spawn()
            .with_context(|| format!("cannot run {}", self.oci.path.display()))?;
        let status = match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
            Ok(s) => s.with_context(|| format!("waiting for {} run {id}", self.oci.name))?,
            Err(_) => {
                let _ = child.start_kill();
                anyhow::bail!("`{} run` of {id} did not return within 30 s", self.oci.name);
            }
        };
        if !status.success() {
            anyhow::bail!(
                "`{} run` failed ({status}); console.log: {}",
                self.oci.name,
                super::tail(&console_path, 10)
            );
        }
        tracing::info!(
            container = %id,
            mount_ms = t_mount.as_millis() as u64,
            run_ms = (t0.elapsed() - t_mount).as_millis() as u64,
            "started"
        );
        Ok(m)
    }
}

fn is_missing(stderr: &str) -> bool {
    stderr.contains("does not exist") || stderr.contains("No such file")
}

async fn remove_cgroup_retrying(rel: &str) -> anyhow::Result<()> {
    let mut last = Ok(());
    for _ in 0..30 {
        last = host::remove_cgroup(rel);
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last?;
    // Drop the run's parent cgroup when it is empty (other machines may still use it).
    if let Some((parent, _)) = rel.rsplit_once('/') {
        let _ = host::remove_cgroup_if_empty(parent);
    }
    Ok(())
}

fn remove_dir_all_if_exists(dir: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

/// Makes sure every directory from `root` down to `rel`'s parent is a real directory inside
/// the rootfs (a symlink there could point out of it), creating missing ones.
fn safe_parent(root: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    let mut cur = root.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        cur.push(name);
        match std::fs::symlink_metadata(&cur) {
            Ok(md) if md.is_dir() => {}
            Ok(md) if md.file_type().is_symlink() => {
                anyhow::bail!("{} is a symlink in the image", cur.display())
            }
            Ok(_) => anyhow::bail!("{} is not a directory", cur.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs_err::create_dir(&cur)?;
                fs_err::set_permissions(&cur, std::fs::Permissions::from_mode(0o755))?;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", cur.display())),
        }
    }
    Ok(cur)
}

/// Writes `content` at `rel` inside `root` without following symlinks (a symlink at the target
/// is replaced by a regular file).
fn write_in_root(root: &Path, rel: &str, content: &[u8], mode: u32) -> anyhow::Result<()> {
    let rel = Path::new(rel.trim_start_matches('/'));
    let dir = safe_parent(root, rel)?;
    let name = rel
        .file_name()
        .with_context(|| format!("{} has no file name", rel.display()))?;
    let path = dir.join(name);
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        if md.is_dir() {
            anyhow::bail!("{} is a directory", path.display());
        }
        if md.file_type().is_symlink() {
            fs_err::remove_file(&path)?;
        }
    }
    let mut f = fs_err::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    f.write_all(content)?;
    fs_err::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

use fs_err::os::unix::fs::OpenOptionsExt as _;

/// Creates the agent mountpoint and writes `/etc/hostname`, `/etc/hosts` (`hosts`, or
/// localhost and the hostname) and, when given, `/etc/resolv.conf`.
fn prepare_rootfs(
    rootfs: &Path,
    hostname: &str,
    hosts: Option<&str>,
    resolv_conf: Option<&str>,
) -> anyhow::Result<()> {
    let agent_rel = Path::new(AGENT_IN_MACHINE.trim_start_matches('/'));
    let agent_dir = safe_parent(rootfs, agent_rel)?;
    let agent_path = agent_dir.join("agent");
    match std::fs::symlink_metadata(&agent_path) {
        Ok(md) if md.is_file() => {}
        Ok(md) if md.is_dir() => anyhow::bail!("{} is a directory", agent_path.display()),
        Ok(_) => {
            fs_err::remove_file(&agent_path)?;
            write_in_root(rootfs, AGENT_IN_MACHINE, b"", 0o755)?;
        }
        Err(_) => write_in_root(rootfs, AGENT_IN_MACHINE, b"", 0o755)?,
    }
    if let Err(e) = write_in_root(
        rootfs,
        "/etc/hostname",
        format!("{hostname}\n").as_bytes(),
        0o644,
    ) {
        tracing::warn!("cannot write /etc/hostname: {e:#}");
    }
    let hosts = hosts.map(str::to_string).unwrap_or_else(|| {
        format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
    });
    if let Err(e) = write_in_root(rootfs, "/etc/hosts", hosts.as_bytes(), 0o644) {
        tracing::warn!("cannot write /etc/hosts: {e:#}");
    }
    if let Some(resolv) = resolv_conf
        && let Err(e) = write_in_root(rootfs, "/etc/resolv.conf", resolv.as_bytes(), 0o644)
    {
        tracing::warn!("cannot write /etc/resolv.conf: {e:#}");
    }
    Ok(())
}

/// The OCI runtime spec (`config.json`) of a machine.
pub fn bundle_config(
    spec: &MachineSpec,
    rootfs: &Path,
    agent_dir: &Path,
    agent_bin: &Path,
) -> Value {
    let plan = &spec.plan;
    let mut env: Vec<String> = Vec::new();
    if !spec.image_env.iter().any(|e| e.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.to_string());
    }
    env.extend(spec.image_env.iter().cloned());
    // A machine in its own network namespace administers it (addresses, routes, forwarding:
    // the router labs); the capability reaches no other namespace.
    let own_netns = !plan.interfaces.is_empty();
    let mut caps: Vec<&str> = CAPABILITIES.to_vec();
    if own_netns {
        caps.push("CAP_NET_ADMIN");
    }
    let nofile = nofile_limit();
    let cpus = u64::from(plan.cpus.max(1));
    let mut resources = json!({
        "devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 5, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 7, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 8, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 1, "access": "rwm"},
            {"allow": true, "type": "c", "major": 5, "minor": 2, "access": "rwm"},
            {"allow": true, "type": "c", "major": 136, "access": "rwm"},
            {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rwm"}
        ],
        "cpu": {"quota": cpus * 100_000, "period": 100_000u64},
        "pids": {"limit": i64::from(plan.pids_limit.max(16))},
    });
    if plan.memory_bytes > 0 {
        let mut mem = json!({"limit": plan.memory_bytes});
        if swap_accounting() {
            mem["swap"] = json!(plan.memory_bytes);
        }
        resources["memory"] = mem;
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [AGENT_IN_MACHINE, "init", "--socket", format!("{AGENT_DIR_IN_MACHINE}/agent.sock")],
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": false,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": plan.name,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755", "size=65536k"]},
            {"destination": AGENT_DIR_IN_MACHINE, "type": "bind", "source": agent_dir, "options": ["rbind", "rw"]},
            {"destination": AGENT_IN_MACHINE, "type": "bind", "source": agent_bin, "options": ["bind", "ro"]},
        ],
        "linux": {
            "cgroupsPath": format!("/{}", cgroup_path(&spec.run_id, &plan.name)),
            // As Docker: mounts made inside never propagate to the host (or back), even when
            // the host's `/` is a shared mount (systemd).
            "rootfsPropagation": "rprivate",
            "resources": resources,
            "namespaces": [
                {"type": "pid"},
                {"type": "mount"},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "network", "path": spec.netns},
            ],
            "maskedPaths": [
                "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"
            ],
            "readonlyPaths": readonly_paths(own_netns),
        },
    })
}

/// Read-only parts of `/proc`. A machine in its own network namespace may write
/// `/proc/sys/net` (namespaced: `sysctl -w net.ipv4.ip_forward=1` affects it alone); every other
/// entry of `/proc/sys` stays read-only (listed from the host's, so a new one is covered).
fn readonly_paths(own_netns: bool) -> Vec<String> {
    let mut v: Vec<String> = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sysrq-trigger"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let sys: Option<Vec<String>> = own_netns
        .then(|| std::fs::read_dir("/proc/sys").ok())
        .flatten()
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "net")
                .map(|n| format!("/proc/sys/{n}"))
                .collect()
        });
    match sys {
        Some(mut entries) if !entries.is_empty() => {
            entries.sort();
            v.extend(entries);
        }
        _ => v.push("/proc/sys".to_string()),
    }
    v
}

/// `RLIMIT_NOFILE` for machines: 1048576, capped at the worker's own hard limit (raising it
/// needs `CAP_SYS_RESOURCE`, which some hosts, e.g. sandboxed VMs, do not grant).
fn nofile_limit() -> u64 {
    const WANTED: u64 = 1_048_576;
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    match limit.maximum {
        Some(hard) if hard < WANTED => hard,
        _ => WANTED,
    }
}

/// Whether the memory cgroup accounts swap (`memory.memsw.*` on v1).
fn swap_accounting() -> bool {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.is_dir() && host::is_mount_point(v1) {
        v1.join("memory.memsw.limit_in_bytes").exists()
    } else {
        true
    }
}

#[async_trait]
impl MachineRuntime for ContainerRuntime {
    fn name(&self) -> &'static str {
        "container"
    }

    async fn start(&self, spec: &MachineSpec) -> Result<MachineHandle, RuntimeError> {
        let id = container_id(&spec.run_id, &spec.plan.name);
        self.start_inner(spec)
            .await
            .map_err(|e| RuntimeError::new("start", id, e))
    }

    async fn stop(&self, m: &MachineHandle, grace: Duration) -> Result<(), RuntimeError> {
        let id = container_id(&m.run_id, &m.machine);
        if self.observe(m).await? != MachineState::Running {
            return Ok(());
        }
        let _ = self.oci_cmd(&["kill", &id, "TERM"]).await;
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.observe(m).await? != MachineState::Running {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.oci_cmd(&["kill", &id, "KILL"]).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing(e.stderr()) => Ok(()),
            Err(e) => Err(RuntimeError::new("stop", id, e)),
        }
    }

    async fn release(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let id = container_id(&m.run_id, &m.machine);
        self.release_inner(m)
            .await
            .map_err(|e| RuntimeError::new("release", id, e))
    }

    async fn destroy(&self, m: &MachineHandle) -> Result<(), RuntimeError> {
        let id = container_id(&m.run_id, &m.machine);
        self.teardown(m)
            .await
            .map_err(|e| RuntimeError::new("destroy", id, e))
    }

    async fn observe(&self, m: &MachineHandle) -> Result<MachineState, RuntimeError> {
        let id = container_id(&m.run_id, &m.machine);
        self.state(&id)
            .await
            .map_err(|e| RuntimeError::new("observe", id, e))
    }

    fn agent(&self, m: &MachineHandle) -> AgentEndpoint {
        AgentEndpoint {
            socket: m.agent_socket(),
        }
    }

    async fn knows_run(&self, run_id: &str) -> anyhow::Result<bool> {
        let prefix = format!("il-{run_id}-");
        Ok(self.list().await?.iter().any(|c| c.id.starts_with(&prefix)))
    }

    async fn clean_leftovers(&self, runs_dir: &Path, keep: &[String]) -> anyhow::Result<()> {
        let kept = |p: &Path| keep.iter().any(|r| p.starts_with(runs_dir.join(r)));
        // Containers whose bundle lives in this worker's pool but in no kept run.
        for c in self.list().await? {
            let bundle = Path::new(&c.bundle);
            if c.id.starts_with("il-") && bundle.starts_with(runs_dir) && !kept(bundle) {
                tracing::info!(container = %c.id, "removing leftover container");
                if let Err(e) = self.remove_container(&c.id).await {
                    tracing::warn!("{e:#}");
                }
            }
        }
        // Mounts and loop devices under the pool's runs that belong to no kept run.
        for mnt in host::mounts_under(runs_dir)? {
            if !kept(&mnt) {
                tracing::info!(mount = %mnt.display(), "unmounting leftover");
                if let Err(e) = host::unmount(&mnt) {
                    tracing::warn!("{e:#}");
                }
            }
        }
        for (dev, file) in host::loop_devices().await? {
            if file.starts_with(runs_dir) && !kept(&file) {
                tracing::info!(%dev, file = %file.display(), "detaching leftover loop device");
                if let Err(e) = host::detach_loop(&dev).await {
                    tracing::warn!("{e:#}");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use ironlab_api::worker::{ImageRef, MachinePlan};

    use super::*;

    fn spec() -> MachineSpec {
        MachineSpec {
            run_id: "abc123".into(),
            plan: MachinePlan {
                name: "web".into(),
                runtime: "container".into(),
                image: ImageRef::Stock {
                    name: "debian".into(),
                },
                root_size_bytes: 1 << 30,
                cpus: 2,
                memory_bytes: 256 << 20,
                pids_limit: 500,
                users: vec![],
                default_user: "root".into(),
                files: vec![],
                tasks: vec![],
                interfaces: vec![],
            },
            dir: "/p/runs/abc123/web".into(),
            root_drive: "/p/runs/abc123/web/root.ext4".into(),
            netns: "/var/run/netns/il-abc123".into(),
            image_env: vec!["LANG=C.UTF-8".into()],
            etc_hosts: None,
            resolv_conf: None,
            net: None,
            fresh_from: None,
        }
    }

    #[test]
    fn config_has_limits_namespaces_and_agent() {
        let c = bundle_config(
            &spec(),
            Path::new("/p/runs/abc123/web/rootfs"),
            Path::new("/p/runs/abc123/web/agent"),
            Path::new("/opt/agent"),
        );
        assert_eq!(c["hostname"], "web");
        assert_eq!(c["root"]["path"], "/p/runs/abc123/web/rootfs");
        assert_eq!(c["process"]["terminal"], false);
        assert_eq!(c["process"]["args"][0], "/.ironlab/agent");
        assert_eq!(c["process"]["args"][3], "/run/ironlab/agent.sock");
        assert_eq!(c["linux"]["cgroupsPath"], "/ironlab/abc123/web");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 256u64 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 200_000u64);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], 500);
        let env: Vec<&str> = c["process"]["env"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert!(env.contains(&"LANG=C.UTF-8"));
        let caps = c["process"]["capabilities"]["bounding"].to_string();
        assert!(caps.contains("CAP_NET_RAW") && caps.contains("CAP_SETUID"));
        assert!(!caps.contains("CAP_SYS_ADMIN"));
        let ns = c["linux"]["namespaces"].to_string();
        assert!(ns.contains("/var/run/netns/il-abc123"));
        let mounts = c["mounts"].to_string();
        assert!(mounts.contains("\"/run/ironlab\"") && mounts.contains("/opt/agent"));
    }

    #[test]
    fn write_in_root_replaces_symlinks_and_refuses_symlinked_dirs() {
        let root = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let target = outside.path().join("victim");
        fs_err::write(&target, "keep").expect("write");
        fs_err::create_dir(root.path().join("etc")).expect("mkdir");
        std::os::unix::fs::symlink(&target, root.path().join("etc/hosts")).expect("symlink");
        write_in_root(root.path(), "/etc/hosts", b"new", 0o644).expect("write");
        assert_eq!(fs_err::read_to_string(&target).expect("read"), "keep");
        assert_eq!(
            fs_err::read_to_string(root.path().join("etc/hosts")).expect("read"),
            "new"
        );
        std::os::unix::fs::symlink(outside.path(), root.path().join("evil")).expect("symlink");
        assert!(write_in_root(root.path(), "/evil/x", b"no", 0o644).is_err());
        assert!(!outside.path().join("x").exists());
    }

    #[test]
    fn prepare_rootfs_creates_agent_mountpoint_and_hostname() {
        let root = tempfile::tempdir().expect("tempdir");
        prepare_rootfs(root.path(), "lb", None, None).expect("prepare");
        assert!(root.path().join(".ironlab/agent").is_file());
        assert_eq!(
            fs_err::read_to_string(root.path().join("etc/hostname")).expect("read"),
            "lb\n"
        );
        assert!(
            fs_err::read_to_string(root.path().join("etc/hosts"))
                .expect("read")
                .contains("127.0.1.1\tlb")
        );
    }
}
