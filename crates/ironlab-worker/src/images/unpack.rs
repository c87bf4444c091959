//! Unpacking image layers into a rootfs directory, the way container runtimes do: layers in
//! order, whiteouts (`.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` empties a
//! directory of what lower layers put there), hard links, symlinks, device nodes, permissions
//! (setuid included) and numeric ownership from the tar headers. xattrs are not applied.
//!
//! Safety: entry paths with `..` are refused; parents are resolved inside the root (a symlink
//! in the rootfs, absolute or relative, never leads outside it), and the final component is
//! never followed (an existing symlink there is replaced, not written through).

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};

use super::oci::Compression;

/// Symlinks followed while resolving one path before giving up (as Linux does).
const MAX_SYMLINKS: u32 = 40;

/// Errors while unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
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
    /// The layer stream is not a readable (compressed) tar archive.
    #[error("failed to read the layer archive")]
    Archive(#[source] io::Error),
    /// An entry's path (or hard link target) would leave the root.
    #[error("layer entry {path:?} escapes the image root")]
    Traversal {
        /// The offending path as written in the archive.
        path: String,
    },
    /// Too many symlinks while resolving a path.
    #[error("too many levels of symbolic links resolving {path:?}")]
    SymlinkLoop {
        /// The path being resolved.
        path: String,
    },
    /// A path needs a directory where a lower layer put something else.
    #[error("{} is not a directory", path.display())]
    NotADirectory {
        /// The object.
        path: PathBuf,
    },
    /// A hard link points at nothing (or at a directory).
    #[error("hard link {path:?} points at {target:?}, which is not a file in the image")]
    BadHardlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
}

type Result<T, E = UnpackError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError + use<> {
    let path = path.to_path_buf();
    move |source| UnpackError::Io { op, path, source }
}

/// A reader that hashes (sha256) and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads the rest of the stream and returns `(sha256:<hex>, bytes)` of all of it.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.bytes,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Unpacks layers one after the other into one root; [`Unpacker::finish`] then sets directory
/// mtimes (which later entries would otherwise disturb).
pub struct Unpacker {
    root: PathBuf,
    dir_times: Vec<(PathBuf, SystemTime)>,
}

impl Unpacker {
    /// An unpacker for the (existing, empty) directory `root`.
    pub fn new(root: &Path) -> Result<Unpacker> {
        let root = fs::canonicalize(root).map_err(io_err("resolve", root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &root))?;
        Ok(Unpacker {
            root,
            dir_times: Vec::new(),
        })
    }

    /// Unpacks one layer blob; returns the diff id (`sha256:` of the uncompressed tar).
    pub fn unpack_layer(&mut self, blob: impl Read, compression: Compression) -> Result<String> {
        let decompressed: Box<dyn Read + '_> = match compression {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(blob).map_err(UnpackError::Archive)?)
            }
        };
        let mut hashing = HashingReader::new(decompressed);
        {
            let mut archive = tar::Archive::new(&mut hashing);
            let mut layer = Layer {
                root: &self.root,
                created: HashSet::new(),
                dir_times: &mut self.dir_times,
            };
            for entry in archive.entries().map_err(UnpackError::Archive)? {
                let entry = entry.map_err(UnpackError::Archive)?;
                layer.apply(entry)?;
            }
        }
        let (diff_id, _) = hashing.finish().map_err(UnpackError::Archive)?;
        Ok(diff_id)
    }

    /// Sets directory mtimes as the layers recorded them (the last layer's value wins).
    pub fn finish(self) -> Result<()> {
        let mut seen = HashSet::new();
        for (dir, mtime) in self.dir_times.iter().rev() {
            if seen.insert(dir) {
                // A directory a later whiteout removed is simply gone.
                if let Ok(f) = fs::File::open(dir) {
                    let _ = f.set_modified(*mtime);
                }
            }
        }
        Ok(())
    }
}

/// State while applying one layer.
struct Layer<'a> {
    root: &'a Path,
    /// Host paths this layer created (an opaque whiteout keeps them).
    created: HashSet<PathBuf>,
    dir_times: &'a mut Vec<(PathBuf, SystemTime)>,
}

/// Splits an archive path into its normal components; refuses `..`.
fn normalize(raw: &Path) -> Result<Vec<OsString>> {
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_os_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(UnpackError::Traversal {
                    path: raw.display().to_string(),
                });
            }
        }
    }
    Ok(parts)
}

impl Layer<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let raw = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let raw_str = raw.display().to_string();
        let mut parts = normalize(&raw)?;
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(UnpackError::Archive)? & 0o7777;
        let uid = header.uid().map_err(UnpackError::Archive)? as u32;
        let gid = header.gid().map_err(UnpackError::Archive)? as u32;
        let mtime = SystemTime::UNIX_EPOCH
            + Duration::from_secs(header.mtime().map_err(UnpackError::Archive)?);

        let Some(name) = parts.pop() else {
            // The root itself ("./"): take its mode and owner.
            if kind.is_dir() {
                chown(self.root, uid, gid)?;
                chmod(self.root, mode)?;
                self.dir_times.push((self.root.to_path_buf(), mtime));
            }
            return Ok(());
        };
        let name_str = name.to_string_lossy();

        if let Some(hidden) = name_str.strip_prefix(".wh.") {
            let Some(dir) = self.resolve_dir(&parts, false, &raw_str)? else {
                return Ok(()); // nothing below to delete
            };
            if hidden == ".wh..opq" {
                self.make_opaque(&dir)?;
            } else if !hidden.starts_with(".wh.") {
                remove_any(&dir.join(hidden))?;
            }
            return Ok(());
        }

        let Some(parent) = self.resolve_dir(&parts, true, &raw_str)? else {
            return Ok(());
        };
        let dst = parent.join(&name);
        let existing = fs::symlink_metadata(&dst).ok();

        match kind {
            tar::EntryType::Directory => {
                if existing.as_ref().is_some_and(|m| !m.is_dir()) {
                    remove_any(&dst)?;
                }
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::create_dir(&dst).map_err(io_err("create directory", &dst))?;
                }
                chown(&dst, uid, gid)?;
                chmod(&dst, mode)?;
                self.dir_times.push((dst.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                if existing.is_some() {
                    remove_any(&dst)?;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&dst)
                    .map_err(io_err("create", &dst))?;
                io::copy(&mut entry, &mut file).map_err(io_err("write", &dst))?;
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
                    .map_err(io_err("chown", &dst))?;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(io_err("chmod", &dst))?;
                let _ = file.set_modified(mtime);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| {
                        UnpackError::Archive(io::Error::other("symlink without target"))
                    })?
                    .into_owned();
                if existing.is_some() {
                    remove_any(&dst)?;
                }
                std::os::unix::fs::symlink(&target, &dst)
                    .map_err(io_err("create symlink", &dst))?;
                std::os::unix::fs::lchown(&dst, Some(uid), Some(gid))
                    .map_err(io_err("chown", &dst))?;
            }
            tar::EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| {
                        UnpackError::Archive(io::Error::other("hard link without target"))
                    })?
                    .into_owned();
                let target_str = target_raw.display().to_string();
                let mut tparts = normalize(&target_raw)?;
                let bad = || UnpackError::BadHardlink {
                    path: raw_str.clone(),
                    target: target_str.clone(),
                };
                let tname = tparts.pop().ok_or_else(bad)?;
                let tdir = self
                    .resolve_dir(&tparts, false, &target_str)?
                    .ok_or_else(bad)?;
                let target = tdir.join(tname);
                match fs::symlink_metadata(&target) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(bad()),
                }
                if target == dst {
                    return Ok(());
                }
                if existing.is_some() {
                    remove_any(&dst)?;
                }
                fs::hard_link(&target, &dst).map_err(io_err("hard link", &dst))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let sflag = match kind {
                    tar::EntryType::Char => nix::sys::stat::SFlag::S_IFCHR,
                    tar::EntryType::Block => nix::sys::stat::SFlag::S_IFBLK,
                    _ => nix::sys::stat::SFlag::S_IFIFO,
                };
                let major = header
                    .device_major()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or(0);
                let minor = header
                    .device_minor()
                    .map_err(UnpackError::Archive)?
                    .unwrap_or(0);
                if existing.is_some() {
                    remove_any(&dst)?;
                }
                nix::sys::stat::mknod(
                    &dst,
                    sflag,
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                    nix::sys::stat::makedev(major.into(), minor.into()),
                )
                .map_err(|e| UnpackError::Io {
                    op: "create device node",
                    path: dst.clone(),
                    source: e.into(),
                })?;
                chown(&dst, uid, gid)?;
                chmod(&dst, mode)?;
            }
            other => {
                tracing::debug!(path = %raw_str, kind = ?other, "skipping unsupported tar entry");
                return Ok(());
            }
        }
        self.created.insert(dst);
        Ok(())
    }

    /// Removes from `dir` everything that lower layers put there.
    fn make_opaque(&self, dir: &Path) -> Result<()> {
        let Ok(meta) = fs::symlink_metadata(dir) else {
            return Ok(());
        };
        if !meta.is_dir() {
            return Ok(());
        }
        for child in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let child = child.map_err(io_err("list", dir))?.path();
            if !self.created.contains(&child) {
                remove_any(&child)?;
            }
        }
        Ok(())
    }

    /// Resolves the directory `parts` (relative to the root) to a host path inside the root,
    /// following symlinks with the root as `/`. Missing directories are created (mode 755,
    /// root-owned) when `create`, else `None` is returned.
    fn resolve_dir(&self, parts: &[OsString], create: bool, raw: &str) -> Result<Option<PathBuf>> {
        let mut cur = self.root.to_path_buf();
        let mut pending: Vec<OsString> = parts.iter().rev().cloned().collect();
        let mut links = 0;
        while let Some(c) = pending.pop() {
            if c == ".." {
                if cur != self.root {
                    cur.pop();
                }
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let next = cur.join(&c);
            match fs::symlink_metadata(&next) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(UnpackError::SymlinkLoop {
                            path: raw.to_string(),
                        });
                    }
                    let target = fs::read_link(&next).map_err(io_err("read link", &next))?;
                    if target.is_absolute() {
                        cur = self.root.to_path_buf();
                    }
                    for tc in target.components().rev() {
                        match tc {
                            Component::Normal(p) => pending.push(p.to_os_string()),
                            Component::ParentDir => pending.push(OsString::from("..")),
                            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                        }
                    }
                }
                Ok(m) if m.is_dir() => cur = next,
                Ok(_) => return Err(UnpackError::NotADirectory { path: next }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&next).map_err(io_err("create directory", &next))?;
                    fs::set_permissions(&next, fs::Permissions::from_mode(0o755))
                        .map_err(io_err("chmod", &next))?;
                    cur = next;
                }
                Err(e) => {
                    return Err(UnpackError::Io {
                        op: "stat",
                        path: next,
                        source: e,
                    });
                }
            }
        }
        Ok(Some(cur))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Removes a file, symlink, node or whole directory; a missing path is fine.
fn remove_any(path: &Path) -> Result<()> {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
    };
    res.map_err(io_err("remove", path))
}

/// What an unpacked tree needs on an ext4 filesystem (4 KiB blocks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Bytes of data blocks (files rounded up to 4 KiB, one block per directory).
    pub bytes: u64,
    /// Inodes (files, directories, links, nodes; hard links once).
    pub inodes: u64,
}

/// Walks `root` (without following symlinks) and adds up what it needs.
pub fn measure(root: &Path) -> io::Result<TreeSize> {
    const BLOCK: u64 = 4096;
    let mut size = TreeSize::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        size.inodes += 1;
        size.bytes += BLOCK;
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
                continue;
            }
            if meta.nlink() > 1 && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            size.inodes += 1;
            if meta.is_file() || (meta.file_type().is_symlink() && meta.len() > 59) {
                size.bytes += meta.len().div_ceil(BLOCK) * BLOCK;
            }
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use super::*;

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// A tar builder that does not sanitise paths (to write hostile archives).
    struct Tar(Vec<u8>);
    impl Tar {
        fn new() -> Tar {
            Tar(Vec::new())
        }
        fn raw(&mut self, mut h: tar::Header, path: &str, link: Option<&str>, data: &[u8]) {
            {
                let gnu = h.as_gnu_mut().expect("gnu header");
                gnu.name = [0; 100];
                gnu.name[..path.len()].copy_from_slice(path.as_bytes());
                if let Some(l) = link {
                    gnu.linkname = [0; 100];
                    gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
                }
            }
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0u8, pad));
        }
        fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            self.raw(header(tar::EntryType::Directory, mode, 0), path, None, b"");
            self
        }
        fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
            self.raw(
                header(tar::EntryType::Regular, mode, data.len() as u64),
                path,
                None,
                data,
            );
            self
        }
        fn owned_file(&mut self, path: &str, uid: u64, data: &[u8]) -> &mut Self {
            let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
            h.set_uid(uid);
            h.set_gid(uid);
            self.raw(h, path, None, data);
            self
        }
        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(
                header(tar::EntryType::Symlink, 0o777, 0),
                path,
                Some(target),
                b"",
            );
            self
        }
        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.raw(
                header(tar::EntryType::Link, 0o644, 0),
                path,
                Some(target),
                b"",
            );
            self
        }
        fn chardev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
            let mut h = header(tar::EntryType::Char, 0o666, 0);
            h.set_device_major(major).expect("major");
            h.set_device_minor(minor).expect("minor");
            self.raw(h, path, None, b"");
            self
        }
        fn finish(&mut self) -> Vec<u8> {
            let mut v = self.0.clone();
            v.extend(std::iter::repeat_n(0u8, 1024));
            v
        }
    }

    fn is_root() -> bool {
        nix::unistd::Uid::effective().is_root()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    #[test]
    fn layers_whiteouts_links_and_modes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        fs::create_dir(&root).expect("mkdir");
        let mut u = Unpacker::new(&root).expect("unpacker");

        let l1 = Tar::new()
            .dir("./", 0o755)
            .dir("./etc/", 0o755)
            .file("./etc/remove-me", 0o644, b"gone soon")
            .file("./etc/keep", 0o644, b"kept")
            .dir("./opt/o/", 0o755)
            .file("./opt/o/old", 0o644, b"old")
            .dir("./opt/o/sub/", 0o755)
            .file("./opt/o/sub/deep", 0o644, b"old")
            .dir("./usr/bin/", 0o755)
            .symlink("./bin", "usr/bin")
            .file("./usr/bin/tool", 0o4755, b"#!/bin/sh\n")
            .hardlink("./usr/bin/tool-hl", "usr/bin/tool")
            .dir("./tmp/", 0o1777)
            .finish();
        let diff1 = u
            .unpack_layer(&gzip(&l1)[..], Compression::Gzip)
            .expect("layer 1");
        assert_eq!(diff1, super::super::oci::sha256_digest(&l1));

        let l2 = Tar::new()
            .file("etc/.wh.remove-me", 0o644, b"")
            .file("opt/o/new", 0o644, b"new")
            .file("opt/o/.wh..wh..opq", 0o644, b"")
            .file("bin/via-symlink", 0o755, b"x") // written through bin -> usr/bin
            .file("etc/.wh.never-existed", 0o644, b"")
            .finish();
        u.unpack_layer(&l2[..], Compression::None).expect("layer 2");
        u.finish().expect("finish");

        assert!(!root.join("etc/remove-me").exists(), "whiteout deleted it");
        assert_eq!(fs::read(root.join("etc/keep")).expect("keep"), b"kept");
        let mut opq: Vec<_> = fs::read_dir(root.join("opt/o"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        opq.sort();
        assert_eq!(
            opq,
            vec![OsString::from("new")],
            "opaque dir keeps only layer 2"
        );
        assert!(root.join("usr/bin/via-symlink").is_file());
        assert!(
            fs::symlink_metadata(root.join("bin"))
                .expect("bin")
                .file_type()
                .is_symlink()
        );
        let tool = fs::metadata(root.join("usr/bin/tool")).expect("tool");
        assert_eq!(tool.permissions().mode() & 0o7777, 0o4755, "setuid kept");
        let hl = fs::metadata(root.join("usr/bin/tool-hl")).expect("hl");
        assert_eq!(hl.ino(), tool.ino(), "hard link shares the inode");
        assert_eq!(
            fs::metadata(root.join("tmp"))
                .expect("tmp")
                .permissions()
                .mode()
                & 0o7777,
            0o1777
        );
        assert_eq!(
            fs::metadata(root.join("etc"))
                .expect("etc")
                .modified()
                .expect("mtime"),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
        let size = measure(&root).expect("measure");
        assert!(size.inodes >= 10 && size.bytes >= 4 * 4096, "{size:?}");
    }

    #[test]
    fn ownership_and_device_nodes_as_root() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut u = Unpacker::new(dir.path()).expect("unpacker");
        let l = Tar::new()
            .owned_file("home/laborant/.profile", 1000, b"x")
            .chardev("dev/null", 1, 3)
            .finish();
        u.unpack_layer(&l[..], Compression::None).expect("layer");
        let m = fs::metadata(dir.path().join("home/laborant/.profile")).expect("profile");
        assert_eq!((m.uid(), m.gid()), (1000, 1000));
        let n = fs::symlink_metadata(dir.path().join("dev/null")).expect("null");
        assert!(n.file_type().is_char_device());
        assert_eq!(n.rdev(), nix::sys::stat::makedev(1, 3));
    }

    #[test]
    fn refuses_traversal() {
        let outer = tempfile::tempdir().expect("tempdir");
        let root = outer.path().join("root");
        fs::create_dir(&root).expect("mkdir");
        for (name, tar) in [
            ("dotdot", Tar::new().file("../escape", 0o644, b"x").finish()),
            (
                "nested dotdot",
                Tar::new().file("a/../../escape", 0o644, b"x").finish(),
            ),
            (
                "hardlink out",
                Tar::new().hardlink("x", "../../etc/passwd").finish(),
            ),
        ] {
            let mut u = Unpacker::new(&root).expect("unpacker");
            let err = u.unpack_layer(&tar[..], Compression::None).expect_err(name);
            assert!(
                matches!(err, UnpackError::Traversal { .. }),
                "{name}: {err}"
            );
        }
        assert!(!outer.path().join("escape").exists());

        // Symlinks cannot carry writes outside the root: absolute and relative ones are
        // resolved with the root as "/".
        let mut u = Unpacker::new(&root).expect("unpacker");
        let l = Tar::new()
            .symlink("abs", outer.path().to_str().expect("utf-8"))
            .symlink("rel", "../../..")
            .file("abs/escape", 0o644, b"x")
            .file("rel/escape2", 0o644, b"x")
            .finish();
        u.unpack_layer(&l[..], Compression::None).expect("layer");
        assert!(!outer.path().join("escape").exists());
        assert!(!outer.path().join("escape2").exists());
        assert!(
            root.join(outer.path().strip_prefix("/").expect("abs"))
                .join("escape")
                .exists()
        );
        assert!(root.join("escape2").exists(), "rel/.. clamps at the root");
    }

    #[test]
    fn zstd_layers_and_bad_archives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut u = Unpacker::new(dir.path()).expect("unpacker");
        let l = Tar::new().file("z", 0o644, b"zstd!").finish();
        let z = zstd::encode_all(&l[..], 1).expect("zstd");
        u.unpack_layer(&z[..], Compression::Zstd)
            .expect("zstd layer");
        assert_eq!(fs::read(dir.path().join("z")).expect("z"), b"zstd!");
        let err = u
            .unpack_layer(&b"this is not gzip"[..], Compression::Gzip)
            .expect_err("garbage");
        assert!(matches!(err, UnpackError::Archive(_)), "{err}");
    }
}
