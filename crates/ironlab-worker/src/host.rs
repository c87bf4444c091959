//! Host plumbing the worker needs: the cgroup fix for crun, finding the OCI runtime, network
//! namespaces, cgroup directories, loop devices and mounts. Every function is idempotent so the
//! same code serves start, teardown and cleanup after a crash.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cmd;

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// The OCI runtime binary the worker drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntime {
    /// `crun` or `runc`.
    pub name: String,
    /// Absolute path of the binary.
    pub path: PathBuf,
}

/// What host setup found.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// The OCI runtime used for containers.
    pub oci: OciRuntime,
}

/// Prepares the host (idempotent): the crun cgroup fix, and finds `crun` (preferred) or `runc`.
pub async fn setup() -> anyhow::Result<HostInfo> {
    if let Err(e) = cgroup_hugetlb_fix() {
        tracing::warn!("cgroup hugetlb fix not applied: {e:#}");
    }
    let oci = find_oci_runtime()?;
    tracing::info!(runtime = %oci.name, path = %oci.path.display(), "OCI runtime");
    Ok(HostInfo { oci })
}

/// Finds `crun` (preferred) or `runc` on PATH (`IRONLAB_OCI_RUNTIME` overrides).
pub fn find_oci_runtime() -> anyhow::Result<OciRuntime> {
    if let Ok(p) = std::env::var("IRONLAB_OCI_RUNTIME") {
        let path = PathBuf::from(&p);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.clone());
        return Ok(OciRuntime { name, path });
    }
    for name in ["crun", "runc"] {
        if let Some(path) = which(name) {
            return Ok(OciRuntime {
                name: name.to_string(),
                path,
            });
        }
    }
    anyhow::bail!("neither crun nor runc found on PATH; install Debian's crun package")
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// Mount point.
    pub mount_point: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
}

/// Decodes the octal escapes (`\040`) mountinfo uses for spaces etc.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = s
                .get(i + 1..i + 4)
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mountinfo`.
pub fn mounts() -> anyhow::Result<Vec<MountEntry>> {
    let text = fs_err::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let source = r.next().unwrap_or("").to_string();
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                fstype,
                source: unescape_mountinfo(&source),
            })
        })
        .collect()
}

/// Mount points at or below `prefix`, deepest first (the order to unmount them in).
pub fn mounts_under(prefix: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(prefix))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    Ok(v)
}

/// Whether `path` is a mount point.
pub fn is_mount_point(path: &Path) -> bool {
    mounts()
        .map(|m| m.iter().any(|e| e.mount_point == path))
        .unwrap_or(false)
}

/// The crun fix from HOST-NOTES: when `/sys/fs/cgroup` is a v1 tmpfs layout without a `hugetlb`
/// hierarchy and the kernel has the hugetlb controller, mount it as a v1 hierarchy.
pub fn cgroup_hugetlb_fix() -> anyhow::Result<()> {
    let cgroups = fs_err::read_to_string("/proc/cgroups")?;
    if !needs_hugetlb_fix(&mounts()?, &cgroups) {
        return Ok(());
    }
    let hugetlb = Path::new(CGROUP_ROOT).join("hugetlb");
    fs_err::create_dir_all(&hugetlb)?;
    nix::mount::mount(
        Some("cgroup"),
        &hugetlb,
        Some("cgroup"),
        nix::mount::MsFlags::empty(),
        Some("hugetlb"),
    )
    .with_context(|| format!("mount -t cgroup -o hugetlb cgroup {}", hugetlb.display()))?;
    tracing::info!("mounted the v1 hugetlb cgroup hierarchy (crun hybrid-mode fix)");
    Ok(())
}

/// Whether the v1 `hugetlb` hierarchy must be mounted: `/sys/fs/cgroup` is a tmpfs (v1 or
/// hybrid layout), nothing is mounted at `hugetlb`, and the kernel has the controller enabled.
fn needs_hugetlb_fix(all: &[MountEntry], proc_cgroups: &str) -> bool {
    let root = Path::new(CGROUP_ROOT);
    let root_is_tmpfs = all
        .iter()
        .any(|m| m.mount_point == root && m.fstype == "tmpfs");
    let hugetlb = root.join("hugetlb");
    let mounted = all.iter().any(|m| m.mount_point == hugetlb);
    let available = proc_cgroups.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&"hugetlb") && f.get(3) == Some(&"1")
    });
    root_is_tmpfs && !mounted && available
}

/// Every cgroup hierarchy directory (`/sys/fs/cgroup/<ctrl>` on v1, `/sys/fs/cgroup` on v2).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let Ok(all) = mounts() else {
        return Vec::new();
    };
    all.into_iter()
        .filter(|m| m.fstype == "cgroup" || m.fstype == "cgroup2")
        .filter(|m| m.mount_point.starts_with(CGROUP_ROOT))
        .map(|m| m.mount_point)
        .collect()
}

/// Removes the cgroup `rel` (e.g. `ironlab/RUN/MACHINE`) and its children in every hierarchy.
/// Cgroups still holding processes cannot be removed; that is reported.
pub fn remove_cgroup(rel: &str) -> anyhow::Result<()> {
    let rel = rel.trim_start_matches('/');
    let mut errors = Vec::new();
    for h in cgroup_hierarchies() {
        let dir = h.join(rel);
        if dir.is_dir()
            && let Err(e) = rmdir_tree(&dir)
        {
            errors.push(format!("{}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cannot remove cgroup {rel}: {}", errors.join("; "))
    }
}

/// Removes the cgroup `rel` in every hierarchy where it has no child cgroups (best effort).
pub fn remove_cgroup_if_empty(rel: &str) -> anyhow::Result<()> {
    let rel = rel.trim_start_matches('/');
    for h in cgroup_hierarchies() {
        let dir = h.join(rel);
        let has_children = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .any(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            })
            .unwrap_or(true);
        if !has_children {
            let _ = std::fs::remove_dir(&dir);
        }
    }
    Ok(())
}

/// Removes a cgroup directory bottom-up (cgroupfs only allows rmdir of empty cgroups; their
/// control files vanish with them).
fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            rmdir_tree(&e.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Child cgroup names under `parent` (e.g. run ids under `ironlab`), across all hierarchies.
pub fn cgroup_children(parent: &str) -> Vec<String> {
    let mut out = Vec::new();
    for h in cgroup_hierarchies() {
        if let Ok(rd) = std::fs::read_dir(h.join(parent)) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !out.contains(&n) {
                        out.push(n);
                    }
                }
            }
        }
    }
    out
}

/// The directory of a cgroup in the v1 controller `controller` (or the v2 tree).
pub fn cgroup_dir(controller: &str, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    let v1 = Path::new(CGROUP_ROOT).join(controller);
    if v1.is_dir() && is_mount_point(&v1) {
        v1.join(rel)
    } else {
        Path::new(CGROUP_ROOT).join(rel)
    }
}

/// The path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates the named network namespace with `lo` up (idempotent).
pub async fn ensure_netns(name: &str) -> anyhow::Result<PathBuf> {
    let path = netns_path(name);
    if !path.exists() {
        match cmd::run("ip", &["netns", "add", name]).await {
            Ok(_) => {}
            Err(e) if e.stderr().contains("File exists") => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create netns {name}")),
        }
    }
    cmd::run("ip", &["-n", name, "link", "set", "lo", "up"])
        .await
        .with_context(|| format!("cannot bring up lo in netns {name}"))?;
    Ok(path)
}

/// Deletes the named network namespace (idempotent).
pub async fn delete_netns(name: &str) -> anyhow::Result<()> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(());
    }
    match cmd::run("ip", &["netns", "delete", name]).await {
        Ok(_) => Ok(()),
        Err(_) if !path.exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot delete netns {name}")),
    }
}

/// Names of the named network namespaces.
pub fn list_netns() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Loop devices and their backing files (`losetup -l`).
pub async fn loop_devices() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let out = cmd::stdout("losetup", &["-l", "-n", "--raw", "-O", "NAME,BACK-FILE"])
        .await
        .context("cannot list loop devices")?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (dev, file) = l.trim().split_once(' ')?;
            let file = file.trim().trim_end_matches(" (deleted)");
            Some((dev.to_string(), PathBuf::from(unescape_mountinfo(file))))
        })
        .collect())
}

/// Loop devices whose backing file is `file`.
pub async fn loops_for(file: &Path) -> anyhow::Result<Vec<String>> {
    Ok(loop_devices()
        .await?
        .into_iter()
        .filter(|(_, f)| f == file)
        .map(|(d, _)| d)
        .collect())
}

/// Detaches a loop device (idempotent).
pub async fn detach_loop(dev: &str) -> anyhow::Result<()> {
    match cmd::run("losetup", &["-d", dev]).await {
        Ok(_) => Ok(()),
        Err(e) if e.stderr().contains("No such device") => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot detach loop device {dev}")),
    }
}

/// Serialises loop-device attachment within the worker (see [`loop_mount`]).
static LOOP_ATTACH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Attaches `file` to a loop device and mounts it as ext4 at `dir` (created if missing).
/// Idempotent: an existing mount at `dir` is kept.
pub async fn loop_mount(file: &Path, dir: &Path) -> anyhow::Result<()> {
    if is_mount_point(dir) {
        return Ok(());
    }
    fs_err::create_dir_all(dir)?;
    let file_s = file.to_string_lossy().into_owned();
    // One attach at a time: two concurrent `losetup --find` pick the same free device, and the
    // loser sleeps 200 ms before it tries again (util-linux), which made every machine after
    // the first of a run start 200 ms later than the one before it.
    let dev = {
        let _one = LOOP_ATTACH.lock().await;
        cmd::stdout("losetup", &["--find", "--show", &file_s])
            .await
            .with_context(|| format!("cannot attach {} to a loop device", file.display()))?
            .trim()
            .to_string()
    };
    let res = nix::mount::mount(
        Some(dev.as_str()),
        dir,
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    if let Err(e) = res {
        let _ = detach_loop(&dev).await;
        return Err(e).with_context(|| {
            format!(
                "cannot mount {} ({dev}) at {}",
                file.display(),
                dir.display()
            )
        });
    }
    Ok(())
}

/// Unmounts `dir` (lazily if busy) if it is a mount point.
pub fn unmount(dir: &Path) -> anyhow::Result<()> {
    use nix::mount::{MntFlags, umount2};
    if !is_mount_point(dir) {
        return Ok(());
    }
    match umount2(dir, MntFlags::empty()) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EBUSY) => umount2(dir, MntFlags::MNT_DETACH)
            .with_context(|| format!("cannot unmount {} (lazy)", dir.display())),
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot unmount {}", dir.display())),
    }
}

/// Unmounts every mount at or below `prefix` and detaches every loop device whose backing file
/// is below `prefix`.
pub async fn release_mounts_and_loops(prefix: &Path) -> anyhow::Result<()> {
    let mut errors = Vec::new();
    for m in mounts_under(prefix)? {
        if let Err(e) = unmount(&m) {
            errors.push(format!("{e:#}"));
        }
    }
    for (dev, file) in loop_devices().await? {
        if file.starts_with(prefix)
            && let Err(e) = detach_loop(&dev).await
        {
            errors.push(format!("{e:#}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{}", errors.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let text = "36 35 98:0 /mnt1 /mnt/my\\040dir rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    37 35 0:5 / /sys/fs/cgroup rw shared:2 - tmpfs tmpfs rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/my dir"));
        assert_eq!(m[0].fstype, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert_eq!(m[1].fstype, "tmpfs");
    }

    #[test]
    fn hugetlb_fix_only_for_v1_layouts_missing_it() {
        let v1 = "30 1 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                  31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let with_hugetlb =
            format!("{v1}32 30 0:28 / /sys/fs/cgroup/hugetlb rw - cgroup cgroup rw,hugetlb\n");
        let v2 = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let cg = "#subsys_name\thierarchy\tnum_cgroups\tenabled\nhugetlb\t0\t1\t1\n";
        let cg_off = "#subsys_name\thierarchy\tnum_cgroups\tenabled\nhugetlb\t0\t1\t0\n";
        assert!(needs_hugetlb_fix(&parse_mountinfo(v1), cg));
        assert!(!needs_hugetlb_fix(&parse_mountinfo(&with_hugetlb), cg));
        assert!(!needs_hugetlb_fix(&parse_mountinfo(v2), cg));
        assert!(!needs_hugetlb_fix(&parse_mountinfo(v1), cg_off));
    }

    #[test]
    fn unescape_leaves_plain_text() {
        assert_eq!(unescape_mountinfo("/a/b"), "/a/b");
        assert_eq!(unescape_mountinfo("/a\\011b"), "/a\tb");
        assert_eq!(unescape_mountinfo("/a\\"), "/a\\");
    }
}
