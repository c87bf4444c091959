//! Root drives for machines: the run manager asks a [`DriveProvider`] for an image's drive file
//! and for a per-machine clone grown to the planned size. The production provider sits on the
//! image store and the reflink pool ([`PoolDrives`]); [`FileDrives`] serves one prepared ext4
//! file for every image (tests, benchmarks of the runtime alone).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use ironlab_api::worker::ImageRef;

use crate::cmd;

/// An image's drive, ready to be cloned.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// Content digest (`sha256:…`), or a label for test providers.
    pub digest: String,
    /// The drive file (ext4).
    pub path: PathBuf,
    /// Size of the drive file in bytes.
    pub size: u64,
    /// Environment from the image config (`KEY=VALUE`).
    pub env: Vec<String>,
}

/// Progress callback (human-readable lines, logged by the caller).
pub type Progress = Arc<dyn Fn(String) + Send + Sync>;

/// Source of machine root drives.
#[async_trait]
pub trait DriveProvider: Send + Sync {
    /// Pulls/imports the image if needed and returns its drive (cached by digest).
    async fn image(&self, image: &ImageRef, progress: Progress) -> anyhow::Result<PreparedImage>;
    /// Clones the image drive to `dst` (reflink where possible) and grows it to `size` bytes.
    async fn clone_root(&self, image: &PreparedImage, dst: &Path, size: u64) -> anyhow::Result<()>;
}

/// Grows the ext4 file `file` to `size` bytes (never shrinks) and resizes its filesystem.
pub async fn grow_ext4(file: &Path, size: u64) -> anyhow::Result<()> {
    let cur = fs_err::metadata(file)?.len();
    if size <= cur {
        return Ok(());
    }
    let f = fs_err::OpenOptions::new().write(true).open(file)?;
    f.set_len(size)?;
    drop(f);
    let file_s = file.to_string_lossy().into_owned();
    cmd::run("resize2fs", &["-f", &file_s])
        .await
        .with_context(|| format!("cannot grow the filesystem in {}", file.display()))?;
    Ok(())
}

/// Serves one prepared ext4 file for every image; clones by `cp --reflink=auto`.
#[derive(Debug, Clone)]
pub struct FileDrives {
    /// The ext4 drive file.
    pub file: PathBuf,
    /// Environment to report as the image's.
    pub env: Vec<String>,
}

#[async_trait]
impl DriveProvider for FileDrives {
    async fn image(&self, _image: &ImageRef, _progress: Progress) -> anyhow::Result<PreparedImage> {
        let size = fs_err::metadata(&self.file)?.len();
        Ok(PreparedImage {
            digest: format!("file:{}", self.file.display()),
            path: self.file.clone(),
            size,
            env: self.env.clone(),
        })
    }

    async fn clone_root(&self, image: &PreparedImage, dst: &Path, size: u64) -> anyhow::Result<()> {
        if let Some(parent) = dst.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let src = image.path.to_string_lossy().into_owned();
        let dst_s = dst.to_string_lossy().into_owned();
        cmd::run("cp", &["--reflink=auto", "--sparse=always", &src, &dst_s])
            .await
            .with_context(|| {
                format!("cannot copy {} to {}", image.path.display(), dst.display())
            })?;
        grow_ext4(dst, size).await
    }
}

/// The production provider: the image store (pull/import → ext4 drive per digest) and the
/// reflink pool (clone + grow).
pub struct PoolDrives {
    pool: crate::pool::Pool,
    store: crate::images::ImageStore,
}

impl PoolDrives {
    /// Opens the image store on `pool` and removes what an interrupted build left.
    pub fn new(pool: crate::pool::Pool, config: &crate::WorkerConfig) -> anyhow::Result<Self> {
        let store = crate::images::ImageStore::new(
            &pool,
            crate::images::ImageConfig {
                stock_dir: config.stock_dir.clone(),
                insecure_registries: config.insecure_registries.clone(),
                agent: Some(config.agent_bin.clone()),
            },
        );
        if let Err(e) = store.clean_stale_temp() {
            tracing::warn!("cannot clean interrupted image builds: {e:#}");
        }
        Ok(Self { pool, store })
    }
}

#[async_trait]
impl DriveProvider for PoolDrives {
    async fn image(&self, image: &ImageRef, progress: Progress) -> anyhow::Result<PreparedImage> {
        let drive = self.store.ensure_drive(image, &*progress).await?;
        let config = self
            .store
            .image_config(&drive.digest)
            .with_context(|| format!("cannot read the config of image {}", drive.digest))?;
        Ok(PreparedImage {
            digest: drive.digest,
            path: drive.path,
            size: drive.size,
            env: config.env,
        })
    }

    async fn clone_root(&self, image: &PreparedImage, dst: &Path, size: u64) -> anyhow::Result<()> {
        let pool = self.pool.clone();
        let (src, dst) = (image.path.clone(), dst.to_path_buf());
        tokio::task::spawn_blocking(move || pool.clone_grow(&src, &dst, size))
            .await
            .context("clone task panicked")??;
        Ok(())
    }
}
