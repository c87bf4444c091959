//! The worker's storage pool: one directory on a reflink-capable filesystem that holds every
//! drive file (image drives under `images/`, run drives under `runs/`, scratch under `tmp/`).
//!
//! Starting a machine reflink-clones its image's ext4 file (`FICLONE`: O(1), no data copied) and
//! grows it. When the worker directory is not on a reflink-capable filesystem (the usual ext4
//! root), the pool is a sparse XFS file `WORKER_DIR/pool.xfs` (`mkfs.xfs -m reflink=1`),
//! loop-mounted at `WORKER_DIR/pool`. Opening is idempotent: an existing mount is reused.
//!
//! Loop devices: the container runtime mounts a root drive with [`mount_ext4`] (mount(8) with
//! `-o loop`, so the kernel auto-clears the loop device when the filesystem is unmounted) and
//! removes it with [`umount_and_detach`], which also detaches a loop device that is still bound
//! to the file. [`loops_for`] lists the loop devices backed by a file (from sysfs), for leak
//! checks. [`loop_attach`] / [`loop_detach`] exist for callers that need a bare block device
//! (e.g. a microVM), and are not auto-cleared.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Smallest size of a loop-backed XFS pool file (sparse, so it costs nothing until used).
pub const MIN_POOL_FILE_BYTES: u64 = 20 * 1024 * 1024 * 1024;

/// Errors of the storage pool and its loop-device helpers.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A file system call failed.
    #[error("failed to {op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The object.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper program could not be started.
    #[error("failed to run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper program failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// `FICLONE` failed: the pool's filesystem cannot share extents between these files.
    #[error("failed to reflink {} to {} (the pool must be on XFS with reflink or btrfs)", src.display(), dst.display())]
    Reflink {
        /// Source file.
        src: PathBuf,
        /// Destination file.
        dst: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A mounted pool turned out not to support reflinks.
    #[error("the filesystem mounted at {} does not support reflinks", path.display())]
    NoReflink {
        /// The mount point.
        path: PathBuf,
    },
    /// Asked to shrink a drive.
    #[error("cannot shrink {} from {current} to {requested} bytes", path.display())]
    Shrink {
        /// The drive file.
        path: PathBuf,
        /// Its size.
        current: u64,
        /// The requested size.
        requested: u64,
    },
}

type Result<T, E = PoolError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PoolError + use<> {
    let path = path.to_path_buf();
    move |source| PoolError::Io { op, path, source }
}

/// How the pool's filesystem is provided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolBacking {
    /// The worker directory itself is reflink-capable (or an operator mounted the pool).
    Native,
    /// A loop-mounted XFS file made by [`Pool::open`].
    LoopXfs {
        /// The XFS image file (`WORKER_DIR/pool.xfs`).
        file: PathBuf,
    },
}

/// The storage pool. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Pool {
    root: PathBuf,
    backing: PoolBacking,
}

impl Pool {
    /// Opens (creating on first use) the pool at `worker_dir/pool`.
    ///
    /// If `worker_dir` supports reflinks the pool is a plain directory; otherwise a sparse XFS
    /// file `worker_dir/pool.xfs` of `max(size_hint_bytes, 20 GiB)` is made once and
    /// loop-mounted at `worker_dir/pool` (an existing mount is reused). Creates `images/`,
    /// `runs/` and `tmp/` inside.
    pub fn open(worker_dir: &Path, size_hint_bytes: u64) -> Result<Pool> {
        fs::create_dir_all(worker_dir).map_err(io_err("create", worker_dir))?;
        let worker_dir = fs::canonicalize(worker_dir).map_err(io_err("resolve", worker_dir))?;
        let root = worker_dir.join("pool");
        let file = worker_dir.join("pool.xfs");

        let backing = if is_mountpoint(&root)? {
            if !probe_reflink(&root)? {
                return Err(PoolError::NoReflink { path: root });
            }
            if file.exists() && mount_source_file(&root)?.as_deref() == Some(file.as_path()) {
                PoolBacking::LoopXfs { file }
            } else {
                PoolBacking::Native
            }
        } else if probe_reflink(&worker_dir)? {
            fs::create_dir_all(&root).map_err(io_err("create", &root))?;
            PoolBacking::Native
        } else {
            if !file.exists() {
                make_xfs_file(&file, size_hint_bytes.max(MIN_POOL_FILE_BYTES))?;
            }
            fs::create_dir_all(&root).map_err(io_err("create", &root))?;
            run(Command::new("mount")
                .args(["-t", "xfs", "-o", "loop,noatime"])
                .arg(&file)
                .arg(&root))?;
            if !probe_reflink(&root)? {
                return Err(PoolError::NoReflink { path: root });
            }
            PoolBacking::LoopXfs { file }
        };

        let pool = Pool { root, backing };
        for dir in [pool.images_dir(), pool.runs_dir(), pool.tmp_dir()] {
            fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        Ok(pool)
    }

    /// The pool directory (`WORKER_DIR/pool`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `pool/images`: image drives (`<hex>.ext4`), their configs and the blob cache.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// `pool/runs`: per-run state and drives.
    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    /// `pool/tmp`: scratch space on the pool's filesystem (unpacked rootfs, partial files).
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// How the pool's filesystem is provided.
    pub fn backing(&self) -> &PoolBacking {
        &self.backing
    }

    /// Unmounts a loop-backed pool and detaches its loop device (tests, teardown). A native
    /// pool is left alone. The pool file stays, so a later [`Pool::open`] reuses its content.
    pub fn unmount(&self) -> Result<()> {
        if let PoolBacking::LoopXfs { file } = &self.backing {
            if is_mountpoint(&self.root)? {
                umount_and_detach(&self.root)?;
            }
            for dev in loops_for(file)? {
                loop_detach(&dev)?;
            }
        }
        Ok(())
    }

    /// Reflink-clones `src` to `dst` (created or replaced): O(1), no data copied. Fails (never
    /// falls back to copying) when the filesystem cannot share the extents.
    pub fn clone_file(&self, src: &Path, dst: &Path) -> Result<()> {
        clone_file(src, dst)
    }

    /// Reflink-clones the ext4 drive `src` to `dst`, then grows `dst` to `size` bytes (if larger)
    /// and its filesystem with `resize2fs`. On failure `dst` is removed.
    pub fn clone_grow(&self, src: &Path, dst: &Path, size: u64) -> Result<()> {
        clone_file(src, dst)?;
        let grown = grow_ext4(dst, size);
        if grown.is_err() {
            let _ = fs::remove_file(dst);
        }
        grown
    }
}

/// Grows an ext4 drive file to `size` bytes (no-op when it is already that big) and its
/// filesystem with `resize2fs -f`. Shrinking is an error.
pub fn grow_ext4(path: &Path, size: u64) -> Result<()> {
    let current = fs::metadata(path).map_err(io_err("stat", path))?.len();
    if size < current {
        return Err(PoolError::Shrink {
            path: path.to_path_buf(),
            current,
            requested: size,
        });
    }
    if size == current {
        return Ok(());
    }
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.set_len(size).map_err(io_err("grow", path))?;
    drop(file);
    run(Command::new("resize2fs").arg("-f").arg(path))?;
    Ok(())
}

/// Reflink-clones `src` to `dst` (created or replaced) with `FICLONE`: O(1), no data copied.
/// Fails (never falls back to copying) when the filesystem cannot share the extents.
pub fn reflink(src: &Path, dst: &Path) -> Result<()> {
    clone_file(src, dst)
}

fn clone_file(src: &Path, dst: &Path) -> Result<()> {
    let from = fs::File::open(src).map_err(io_err("open", src))?;
    let to = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(io_err("create", dst))?;
    if let Err(e) = rustix::fs::ioctl_ficlone(&to, &from) {
        drop(to);
        let _ = fs::remove_file(dst);
        return Err(PoolError::Reflink {
            src: src.to_path_buf(),
            dst: dst.to_path_buf(),
            source: e.into(),
        });
    }
    Ok(())
}

/// Whether `dir` is on a filesystem that supports `FICLONE` (tries it on two temp files).
pub fn probe_reflink(dir: &Path) -> Result<bool> {
    let mut src = tempfile::Builder::new()
        .prefix(".reflink-probe-")
        .tempfile_in(dir)
        .map_err(io_err("create a probe file in", dir))?;
    src.write_all(&[0x5a; 4096])
        .and_then(|()| src.flush())
        .map_err(io_err("write", src.path()))?;
    let dst = tempfile::Builder::new()
        .prefix(".reflink-probe-")
        .tempfile_in(dir)
        .map_err(io_err("create a probe file in", dir))?;
    Ok(rustix::fs::ioctl_ficlone(dst.as_file(), src.as_file()).is_ok())
}

fn make_xfs_file(file: &Path, size: u64) -> Result<()> {
    let mut tmp = file.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let f = fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    f.set_len(size).map_err(io_err("size", &tmp))?;
    drop(f);
    let made = run(Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1"])
        .arg(&tmp))
    .and_then(|_| fs::rename(&tmp, file).map_err(io_err("rename into place", file)));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// Runs a command; returns its stdout, or an error with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| PoolError::Spawn {
        command: command.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(PoolError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Source (e.g. `/dev/loop3`).
    pub source: String,
}

/// The mounts of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err("read", path))?;
    Ok(text.lines().filter_map(parse_mountinfo_line).collect())
}

fn parse_mountinfo_line(line: &str) -> Option<MountEntry> {
    // id parent major:minor root target options [optional...] - fstype source superoptions
    let (left, right) = line.split_once(" - ")?;
    let target = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fstype = right.next()?.to_string();
    let source = unescape_mountinfo(right.next()?);
    Some(MountEntry {
        target: PathBuf::from(unescape_mountinfo(target)),
        fstype,
        source,
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The last mount whose target is `path` (the one visible there), if any.
pub fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    Ok(mounts()?.into_iter().rev().find(|m| m.target == path))
}

/// Whether something is mounted at `path`.
pub fn is_mountpoint(path: &Path) -> Result<bool> {
    Ok(mount_at(path)?.is_some())
}

/// The file behind the loop device mounted at `path`, if it is a loop mount.
fn mount_source_file(path: &Path) -> Result<Option<PathBuf>> {
    let Some(m) = mount_at(path)? else {
        return Ok(None);
    };
    Ok(m.source.strip_prefix("/dev/").and_then(|dev| {
        fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file"))
            .ok()
            .map(|s| PathBuf::from(s.trim_end()))
    }))
}

/// Attaches `file` to a free loop device (`losetup --find --show`) and returns the device.
/// Not auto-cleared: pair with [`loop_detach`].
pub fn loop_attach(file: &Path) -> Result<PathBuf> {
    let out = run(Command::new("losetup").args(["--find", "--show"]).arg(file))?;
    Ok(PathBuf::from(out.trim()))
}

/// Detaches a loop device (`losetup -d`). A device that is already free is not an error.
pub fn loop_detach(dev: &Path) -> Result<()> {
    match run(Command::new("losetup").arg("-d").arg(dev)) {
        Ok(_) => Ok(()),
        Err(e) if loop_backing_file(dev).is_none() => {
            tracing::debug!(dev = %dev.display(), error = %e, "loop device already detached");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn loop_backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| PathBuf::from(s.trim_end()))
}

/// The loop devices currently backed by `file` (read from `/sys/block/loop*/loop/backing_file`).
pub fn loops_for(file: &Path) -> Result<Vec<PathBuf>> {
    let file = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let sys = Path::new("/sys/block");
    let mut devs = Vec::new();
    for entry in fs::read_dir(sys).map_err(io_err("list", sys))? {
        let entry = entry.map_err(io_err("list", sys))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let dev = Path::new("/dev").join(name);
        if let Some(backing) = loop_backing_file(&dev) {
            let backing = backing
                .to_str()
                .and_then(|s| s.strip_suffix(" (deleted)"))
                .map(PathBuf::from)
                .unwrap_or(backing);
            if backing == file {
                devs.push(dev);
            }
        }
    }
    devs.sort();
    Ok(devs)
}

/// Mounts the ext4 drive file `file` at `target` through an auto-clearing loop device
/// (`mount -t ext4 -o loop`): the kernel frees the loop device when the filesystem is unmounted.
pub fn mount_ext4(file: &Path, target: &Path) -> Result<()> {
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,noatime"])
        .arg(file)
        .arg(target))?;
    Ok(())
}

/// Unmounts `target` and makes sure the loop device that backed it is detached (waits up to
/// 2 s for the kernel's auto-clear, then detaches it explicitly).
pub fn umount_and_detach(target: &Path) -> Result<()> {
    let Some(mount) = mount_at(target)? else {
        return Ok(());
    };
    let backing = mount
        .source
        .starts_with("/dev/loop")
        .then(|| PathBuf::from(&mount.source))
        .and_then(|dev| loop_backing_file(&dev).map(|file| (dev, file)));
    nix::mount::umount(&mount.target).map_err(|e| PoolError::Io {
        op: "unmount",
        path: mount.target.clone(),
        source: e.into(),
    })?;
    if let Some((dev, file)) = backing {
        let deadline = Instant::now() + Duration::from_secs(2);
        while loop_backing_file(&dev).as_deref() == Some(file.as_path()) {
            if Instant::now() >= deadline {
                loop_detach(&dev)?;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Skips a test (with a message) unless it runs as root.
    macro_rules! skip_if_not_root {
        () => {
            if !nix::unistd::Uid::effective().is_root() {
                eprintln!("skipped: needs root");
                return;
            }
        };
    }

    /// Unmounts the pool when a test ends, even on panic.
    struct PoolGuard(Pool);
    impl Drop for PoolGuard {
        fn drop(&mut self) {
            if let Err(e) = self.0.unmount() {
                eprintln!("cleanup: {e}");
            }
        }
    }

    fn ext4_dir() -> tempfile::TempDir {
        // /var/tmp is on the root filesystem (ext4 here: no reflink).
        tempfile::Builder::new()
            .prefix("ironlab-pool-test-")
            .tempdir_in("/var/tmp")
            .expect("temp dir")
    }

    fn free_bytes(path: &Path) -> u64 {
        let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    fn tune2fs_field(img: &Path, field: &str) -> u64 {
        let out = run(Command::new("tune2fs").arg("-l").arg(img)).expect("tune2fs -l");
        out.lines()
            .find_map(|l| l.strip_prefix(field)?.trim().strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {field} in tune2fs output"))
            .trim()
            .parse()
            .expect("number")
    }

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let l = "36 35 98:0 / /mnt/my\\040pool rw,noatime master:1 - xfs /dev/loop3 rw,attr2";
        let m = parse_mountinfo_line(l).expect("parses");
        assert_eq!(m.target, PathBuf::from("/mnt/my pool"));
        assert_eq!(m.fstype, "xfs");
        assert_eq!(m.source, "/dev/loop3");
    }

    #[test]
    #[serial_test::serial(loopdev)]
    fn loop_xfs_pool_reflinks_grows_and_unmounts_cleanly() {
        skip_if_not_root!();
        let dir = ext4_dir();
        assert!(
            !probe_reflink(dir.path()).expect("probe"),
            "test needs a non-reflink temp dir"
        );
        let pool = PoolGuard(Pool::open(dir.path(), 0).expect("open pool"));
        let xfs = dir.path().join("pool.xfs");
        assert_eq!(
            pool.0.backing(),
            &PoolBacking::LoopXfs {
                file: fs::canonicalize(&xfs).expect("pool.xfs")
            }
        );
        assert_eq!(
            fs::metadata(&xfs).expect("pool.xfs").len(),
            MIN_POOL_FILE_BYTES
        );
        let m = mount_at(pool.0.root())
            .expect("mountinfo")
            .expect("mounted");
        assert_eq!(m.fstype, "xfs");
        for d in ["images", "runs", "tmp"] {
            assert!(pool.0.root().join(d).is_dir(), "{d}/ exists");
        }
        assert_eq!(loops_for(&xfs).expect("loops").len(), 1);

        // Opening again reuses the mount (idempotent across restarts).
        let again = Pool::open(dir.path(), 0).expect("reopen");
        assert_eq!(again.root(), pool.0.root());
        assert_eq!(loops_for(&xfs).expect("loops").len(), 1);
        assert_eq!(
            mounts()
                .expect("mounts")
                .iter()
                .filter(|m| m.target == pool.0.root())
                .count(),
            1
        );

        // A reflink clone of a 1 GiB file takes no space.
        let big = pool.0.images_dir().join("big.bin");
        let f = fs::File::create(&big).expect("create");
        f.set_len(1 << 30).expect("size");
        let mut f = f;
        for i in 0..64u64 {
            use std::io::{Seek, SeekFrom};
            f.seek(SeekFrom::Start(i * (16 << 20))).expect("seek");
            f.write_all(&[0xab; 1 << 20]).expect("write 1 MiB");
        }
        f.sync_all().expect("sync");
        drop(f);
        let before = free_bytes(pool.0.root());
        let t = Instant::now();
        let copy = pool.0.runs_dir().join("copy.bin");
        pool.0.clone_file(&big, &copy).expect("reflink");
        let took = t.elapsed();
        fs::File::open(&copy)
            .expect("open copy")
            .sync_all()
            .expect("sync");
        let after = free_bytes(pool.0.root());
        assert_eq!(fs::metadata(&copy).expect("copy").len(), 1 << 30);
        assert!(
            before.saturating_sub(after) < 4 << 20,
            "clone used {} bytes",
            before - after
        );
        assert_eq!(
            fs::read(&copy).expect("read copy")[16 << 20],
            0xab,
            "clone has the data"
        );
        eprintln!("reflink of 1 GiB (64 MiB data): {took:?}");

        // clone_grow: reflink + grow the ext4 filesystem.
        let img = pool.0.images_dir().join("small.ext4");
        let f = fs::File::create(&img).expect("create img");
        f.set_len(64 << 20).expect("size img");
        drop(f);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", "root"])
            .arg(&img))
        .expect("mkfs.ext4");
        assert_eq!(tune2fs_field(&img, "Block count"), 16384);
        let grown = pool.0.runs_dir().join("root.ext4");
        let t = Instant::now();
        pool.0
            .clone_grow(&img, &grown, 4 << 30)
            .expect("clone_grow");
        eprintln!("clone_grow 64 MiB -> 4 GiB: {:?}", t.elapsed());
        assert_eq!(fs::metadata(&grown).expect("grown").len(), 4 << 30);
        assert_eq!(tune2fs_field(&grown, "Block count"), (4 << 30) / 4096);
        assert_eq!(
            tune2fs_field(&img, "Block count"),
            16384,
            "source untouched"
        );
        let err = pool
            .0
            .clone_grow(&grown, &copy, 1 << 20)
            .expect_err("shrink");
        assert!(matches!(err, PoolError::Shrink { .. }), "{err}");
        assert!(!copy.exists(), "failed clone_grow leaves no file");

        // mount_ext4 / umount_and_detach leave no loop device behind.
        let target = dir.path().join("mnt");
        fs::create_dir(&target).expect("mkdir mnt");
        mount_ext4(&grown, &target).expect("mount");
        assert_eq!(loops_for(&grown).expect("loops").len(), 1);
        assert!(target.join("lost+found").is_dir());
        umount_and_detach(&target).expect("umount");
        assert!(!is_mountpoint(&target).expect("mountinfo"));
        assert!(loops_for(&grown).expect("loops").is_empty());

        // loop_attach / loop_detach
        let dev = loop_attach(&grown).expect("attach");
        assert_eq!(loops_for(&grown).expect("loops"), vec![dev.clone()]);
        loop_detach(&dev).expect("detach");
        assert!(loops_for(&grown).expect("loops").is_empty());

        // Cross-filesystem reflink is an error, never a silent copy.
        let outside = dir.path().join("outside.bin");
        fs::write(&outside, b"x").expect("write");
        let err = pool
            .0
            .clone_file(&outside, &pool.0.tmp_dir().join("x"))
            .expect_err("EXDEV");
        assert!(matches!(err, PoolError::Reflink { .. }), "{err}");
        assert!(!pool.0.tmp_dir().join("x").exists());

        pool.0.unmount().expect("unmount");
        assert!(!is_mountpoint(pool.0.root()).expect("mountinfo"));
        let losetup = run(Command::new("losetup").arg("-j").arg(&xfs)).expect("losetup -j");
        assert!(losetup.trim().is_empty(), "loop left: {losetup}");
    }
}
