//! Restore over an older copy on a reflink-capable file system (XFS, as the worker's pool):
//! the result starts as a reflink clone of the old copy, only changed chunks are fetched, and
//! the unchanged chunks keep sharing blocks with the old copy. Needs root (loop mount);
//! skipped otherwise (failed with `IRONLAB_E2E_REQUIRED=1`).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, bail};
use common::{Backend, allocated, ext4_write, file_hash, make_ext4, random_bytes};
use ironlab_store::{RestoreOptions, UploadOptions, restore_drive, upload_drive};

const MIB: u64 = 1 << 20;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A loop-mounted XFS (reflink=1) in a temp dir; unmounted (and its loop device freed) on drop.
struct Xfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xfs {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir_in("/var/tmp")?;
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)?.set_len(512 * MIB)?;
        let mkfs = Command::new("/usr/sbin/mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img)
            .output()?;
        if !mkfs.status.success() {
            bail!("mkfs.xfs: {}", String::from_utf8_lossy(&mkfs.stderr));
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        let mount = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .output()?;
        if !mount.status.success() {
            bail!("mount: {}", String::from_utf8_lossy(&mount.stderr));
        }
        Ok(Self { mnt, _dir: dir })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // `mount -o loop` frees the loop device at unmount.
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// The file system's used bytes (a reflink clone does not grow it).
fn fs_used(path: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_over_an_old_copy_reflinks_and_fetches_only_changes() -> Result<()> {
    if !is_root() || !Path::new("/usr/sbin/mkfs.xfs").exists() {
        if std::env::var_os("IRONLAB_E2E_REQUIRED").is_some() {
            bail!("this test needs root and mkfs.xfs");
        }
        eprintln!("SKIPPED: this test needs root and mkfs.xfs (loop-mounted XFS)");
        return Ok(());
    }
    let xfs = Xfs::new()?;
    let backend = Backend::local()?;
    let store = backend.store()?;

    let img = xfs.mnt.join("drive.ext4");
    make_ext4(&img, 128)?;
    ext4_write(&img, "a.bin", &random_bytes(24 * MIB as usize))?;
    let old = upload_drive(&store, &img, &UploadOptions::default())
        .await?
        .manifest;
    let copy = xfs.mnt.join("copy.ext4");
    restore_drive(&store, &old.id, &copy, &RestoreOptions::default()).await?;
    let old_hash = file_hash(&copy)?;

    ext4_write(&img, "b.bin", &random_bytes(4 * MIB as usize))?;
    let new = upload_drive(&store, &img, &UploadOptions::default())
        .await?
        .manifest;

    let used_before = fs_used(&xfs.mnt)?;
    let dest = xfs.mnt.join("restored.ext4");
    let r = restore_drive(
        &store,
        &new.id,
        &dest,
        &RestoreOptions {
            have: Some(copy.clone()),
            ..Default::default()
        },
    )
    .await?;
    assert!(r.reflinked, "{r:?}");
    assert_eq!(file_hash(&dest)?, file_hash(&img)?);
    // The old copy is untouched.
    assert_eq!(file_hash(&copy)?, old_hash);
    // Only the changed chunks were fetched and only they take new space.
    assert!(r.chunks_fetched <= 8, "{r:?}");
    assert!(
        r.chunks_reused + r.chunks_fetched == new.chunks.len(),
        "{r:?}"
    );
    let grew = fs_used(&xfs.mnt)? - used_before;
    assert!(
        grew < 10 * MIB,
        "restore over a reflinked copy used {grew} new bytes"
    );
    assert!(allocated(&dest)? >= 28 * MIB);
    Ok(())
}
