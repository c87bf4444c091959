//! Images: a machine's root image (an OCI registry reference or a stock OCI image layout) turned
//! into one ext4 drive file per manifest digest, `pool/images/<hex>.ext4`, which runs then
//! reflink-clone.
//!
//! ```text
//! ensure_drive(image)
//!   Oci   → HEAD the tag (oci-client) → digest ─┐
//!   Stock → stock_dir/<name>/index.json → digest ┤→ cached `<hex>.ext4`? return it
//!                                                └→ per-digest lock → fetch manifest, config,
//!      layers (registry: into pool/images/blobs/sha256/, verified) → verify digests → unpack in
//!      order into pool/tmp/rootfs-… (whiteouts) → mkfs.ext4 -d → rename into place
//! ```
//!
//! Concurrency: `ensure_drive` may be called from many tasks; a per-digest async mutex makes
//! concurrent calls for one image build it once. Writers use temp names and `rename`, so a crash
//! never leaves a half-built file under a final name; [`ImageStore::clean_stale_temp`] removes
//! the leftovers of such a crash.

mod layout;
pub mod oci;
mod registry;
pub mod unpack;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ironlab_api::worker::ImageRef;
use serde::{Deserialize, Serialize};

use self::oci::{Descriptor, ImageConfigFile};
use self::unpack::{UnpackError, Unpacker};
use crate::pool::Pool;

/// Extra room in a drive besides its content: content × 1.3 + 64 MiB.
const DRIVE_SLACK_BYTES: u64 = 64 << 20;

/// How the image store is configured.
#[derive(Debug, Clone, Default)]
pub struct ImageConfig {
    /// Directory of stock images: `<stock_dir>/<name>/` is an OCI image layout.
    pub stock_dir: PathBuf,
    /// Registries (`HOST:PORT` or `HOST`) reached over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// The agent binary (used by the runtime, not by the store).
    pub agent: Option<PathBuf>,
}

/// An image's ext4 drive file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDrive {
    /// `sha256:<hex>` of the image manifest.
    pub digest: String,
    /// `pool/images/<hex>.ext4`.
    pub path: PathBuf,
    /// Size of the file in bytes.
    pub size: u64,
}

/// The runtime defaults of an image, kept beside its drive as `pool/images/<hex>.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfigInfo {
    /// `sha256:<hex>` of the image manifest.
    pub digest: String,
    /// Where it came from (`oci://REF` or `stock:NAME`).
    pub source: String,
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Default command.
    pub cmd: Vec<String>,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Working directory (empty = `/`).
    pub working_dir: String,
    /// User (empty = root).
    pub user: String,
    /// Labels (e.g. `org.ironlab.default-user`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Errors of the image store. Messages name the image or object.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No layout for a stock image name.
    #[error("stock image {name:?} not found in {}; build it with images/{name}/build.sh", dir.display())]
    StockNotFound {
        /// The stock name.
        name: String,
        /// The stock images directory.
        dir: PathBuf,
    },
    /// Asked to build an image from something that is not one.
    #[error("{0} is not an image")]
    NotAnImage(String),
    /// A stock name that cannot be a directory name.
    #[error("invalid stock image name {0:?}")]
    InvalidStockName(String),
    /// A reference that does not parse.
    #[error("invalid image reference {reference:?}")]
    InvalidReference {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: oci_client::ParseError,
    },
    /// The registry failed or refused.
    #[error("failed to {what} of {reference}")]
    Registry {
        /// What was being fetched.
        what: String,
        /// The image reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    /// Content does not match its digest.
    #[error("digest mismatch for {object}: expected {expected}, got {actual}")]
    Digest {
        /// What was checked (e.g. "layer 2/3 of 127.0.0.1:5000/x:1").
        object: String,
        /// The expected digest.
        expected: String,
        /// What the content hashes to.
        actual: String,
    },
    /// A digest that is not `sha256:<64 hex>`.
    #[error("unsupported digest {digest:?} in {image}")]
    UnsupportedDigest {
        /// The digest.
        digest: String,
        /// The image.
        image: String,
    },
    /// A media type the store does not handle.
    #[error("unsupported media type {media_type:?} for {object} of {image}")]
    UnsupportedMediaType {
        /// The media type.
        media_type: String,
        /// What it describes.
        object: String,
        /// The image.
        image: String,
    },
    /// No linux/amd64 image in an index, or an image for another platform.
    #[error("{image} has no linux/amd64 image ({detail})")]
    Platform {
        /// The image.
        image: String,
        /// What was found.
        detail: String,
    },
    /// A manifest, config or index that does not parse or is inconsistent.
    #[error("invalid {what} of {image}: {detail}")]
    Invalid {
        /// Which document.
        what: &'static str,
        /// The image.
        image: String,
        /// Why.
        detail: String,
    },
    /// Unpacking a layer failed.
    #[error("failed to unpack layer {index}/{count} ({digest}) of {image}")]
    Unpack {
        /// 1-based layer number.
        index: usize,
        /// Number of layers.
        count: usize,
        /// Layer digest.
        digest: String,
        /// The image.
        image: String,
        /// The cause.
        #[source]
        source: UnpackError,
    },
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
    /// The image is not in the store.
    #[error("image {0} is not in the store")]
    NotCached(String),
    /// A blocking task panicked or was cancelled.
    #[error("image build task failed")]
    Task(#[source] tokio::task::JoinError),
}

type Result<T, E = ImageError> = std::result::Result<T, E>;

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ImageError + use<> {
    let path = path.to_path_buf();
    move |source| ImageError::Io { op, path, source }
}

/// A progress callback: one human-readable line per step.
pub type Progress<'a> = &'a (dyn Fn(String) + Send + Sync);

/// A layer blob on local disk, ready to unpack.
struct LocalLayer {
    path: PathBuf,
    desc: Descriptor,
}

/// Everything needed to build a drive, gathered from a registry or a layout.
struct Prepared {
    /// Manifest digest.
    digest: String,
    /// Human name (`oci://…`, `stock:…`).
    source: String,
    /// Raw config blob (already verified).
    config: Vec<u8>,
    /// Layers, lowest first.
    layers: Vec<LocalLayer>,
}

/// Builds and caches image drives in the pool. Share it (`Arc`) between tasks.
pub struct ImageStore {
    images_dir: PathBuf,
    tmp_dir: PathBuf,
    config: ImageConfig,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageStore {
    /// A store over `pool/images` (blobs under `pool/images/blobs/sha256/`, scratch in
    /// `pool/tmp/`).
    pub fn new(pool: &Pool, config: ImageConfig) -> ImageStore {
        ImageStore {
            images_dir: pool.images_dir(),
            tmp_dir: pool.tmp_dir(),
            config,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The store's configuration.
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// `pool/images/blobs/sha256`: the registry blob cache.
    pub fn blobs_dir(&self) -> PathBuf {
        self.images_dir.join("blobs").join("sha256")
    }

    /// Returns the drive of `image`, building it first if this digest has none yet.
    ///
    /// A registry image is resolved to its manifest digest first (one HEAD request, or none for
    /// a `@sha256:` reference); a stock image by reading its layout's `index.json`. If the
    /// drive for that digest exists, it is returned without pulling anything.
    pub async fn ensure_drive(
        &self,
        image: &ImageRef,
        progress: Progress<'_>,
    ) -> Result<ImageDrive> {
        match image {
            ImageRef::Oci { reference } => self.ensure_oci(reference, progress).await,
            ImageRef::Stock { name } => self.ensure_stock(name, progress).await,
            ImageRef::Saved { id, machine } => Err(ImageError::NotAnImage(format!(
                "saved drive {id}/{machine} (the run manager takes it from the pool's saved/)"
            ))),
        }
    }

    /// The drive for a manifest digest, if it was built.
    pub fn cached(&self, digest: &str) -> Option<ImageDrive> {
        let path = self.drive_path(digest).ok()?;
        let meta = std::fs::metadata(&path).ok()?;
        Some(ImageDrive {
            digest: digest.to_string(),
            path,
            size: meta.len(),
        })
    }

    /// The runtime defaults (Env, Cmd, Entrypoint, WorkingDir, User) of a built image.
    pub fn image_config(&self, digest: &str) -> Result<ImageConfigInfo> {
        let hex = self.hex(digest, digest)?;
        let path = self.images_dir.join(format!("{hex}.json"));
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotCached(digest.to_string()));
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Invalid {
            what: "stored config",
            image: digest.to_string(),
            detail: e.to_string(),
        })
    }

    /// Removes what an interrupted build left (partial drives, partial blobs, unpacked trees).
    /// Call it at worker start, before any `ensure_drive`.
    pub fn clean_stale_temp(&self) -> Result<()> {
        for dir in [self.images_dir.clone(), self.blobs_dir()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(".tmp-") {
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(io_err("remove", &path))?;
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.tmp_dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("rootfs-") {
                    let path = entry.path();
                    std::fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
                }
            }
        }
        Ok(())
    }

    fn hex<'a>(&self, digest: &'a str, image: &str) -> Result<&'a str> {
        oci::sha256_hex(digest).ok_or_else(|| ImageError::UnsupportedDigest {
            digest: digest.to_string(),
            image: image.to_string(),
        })
    }

    fn drive_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .images_dir
            .join(format!("{}.ext4", self.hex(digest, digest)?)))
    }

    /// The per-digest build lock.
    fn lock_for(&self, digest: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.retain(|_, l| Arc::strong_count(l) > 1);
        locks.entry(digest.to_string()).or_default().clone()
    }

    /// Unpacks the layers, builds the ext4 file and moves it into place.
    async fn build(&self, p: Prepared, progress: Progress<'_>) -> Result<ImageDrive> {
        let hex = self.hex(&p.digest, &p.source)?.to_string();
        let cfg: ImageConfigFile =
            serde_json::from_slice(&p.config).map_err(|e| ImageError::Invalid {
                what: "image config",
                image: p.source.clone(),
                detail: e.to_string(),
            })?;
        if !(cfg.os.is_empty() || cfg.os == "linux")
            || !(cfg.architecture.is_empty() || cfg.architecture == "amd64")
        {
            return Err(ImageError::Platform {
                image: p.source.clone(),
                detail: format!("the image is {}/{}", cfg.os, cfg.architecture),
            });
        }
        let diff_ids = cfg
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.clone())
            .unwrap_or_default();
        if diff_ids.len() != p.layers.len() {
            return Err(ImageError::Invalid {
                what: "image config",
                image: p.source.clone(),
                detail: format!("{} diff_ids for {} layers", diff_ids.len(), p.layers.len()),
            });
        }
        let mut compressions = Vec::with_capacity(p.layers.len());
        for (i, l) in p.layers.iter().enumerate() {
            let c = oci::layer_compression(&l.desc.media_type).ok_or_else(|| {
                ImageError::UnsupportedMediaType {
                    media_type: l.desc.media_type.clone(),
                    object: format!("layer {}", i + 1),
                    image: p.source.clone(),
                }
            })?;
            compressions.push(c);
        }

        let rootfs = tempfile::Builder::new()
            .prefix(&format!("rootfs-{}-", &hex[..12]))
            .tempdir_in(&self.tmp_dir)
            .map_err(io_err("create a build directory in", &self.tmp_dir))?;
        let built = self
            .unpack_and_mkfs(&p, &hex, &diff_ids, &compressions, rootfs.path(), progress)
            .await;
        // Removing a rootfs is blocking work too.
        let removed = tokio::task::spawn_blocking(move || rootfs.close()).await;
        let drive = built?;
        if let Ok(Err(e)) = removed {
            tracing::warn!(error = %e, "could not remove a build directory");
        }

        let info = ImageConfigInfo {
            digest: p.digest.clone(),
            source: p.source.clone(),
            env: cfg
                .config
                .as_ref()
                .and_then(|c| c.env.clone())
                .unwrap_or_default(),
            cmd: cfg
                .config
                .as_ref()
                .and_then(|c| c.cmd.clone())
                .unwrap_or_default(),
            entrypoint: cfg
                .config
                .as_ref()
                .and_then(|c| c.entrypoint.clone())
                .unwrap_or_default(),
            working_dir: cfg
                .config
                .as_ref()
                .and_then(|c| c.working_dir.clone())
                .unwrap_or_default(),
            user: cfg
                .config
                .as_ref()
                .and_then(|c| c.user.clone())
                .unwrap_or_default(),
            labels: cfg
                .config
                .as_ref()
                .and_then(|c| c.labels.clone())
                .unwrap_or_default(),
        };
        let json = serde_json::to_vec_pretty(&info).map_err(|e| ImageError::Invalid {
            what: "image config",
            image: p.source.clone(),
            detail: e.to_string(),
        })?;
        let json_path = self.images_dir.join(format!("{hex}.json"));
        write_atomic(&json_path, &json).await?;

        let path = self.images_dir.join(format!("{hex}.ext4"));
        tokio::fs::rename(&drive, &path)
            .await
            .map_err(io_err("move into place", &path))?;
        let size = tokio::fs::metadata(&path)
            .await
            .map_err(io_err("stat", &path))?
            .len();
        progress(format!(
            "drive ready: {} ({} MiB)",
            path.display(),
            size >> 20
        ));
        Ok(ImageDrive {
            digest: p.digest,
            path,
            size,
        })
    }

    /// Verifies and unpacks each layer into `root`, then runs mkfs.ext4; returns the temp drive.
    async fn unpack_and_mkfs(
        &self,
        p: &Prepared,
        hex: &str,
        diff_ids: &[String],
        compressions: &[oci::Compression],
        root: &Path,
        progress: Progress<'_>,
    ) -> Result<PathBuf> {
        let count = p.layers.len();
        let mut unpacker = Unpacker::new(root).map_err(|source| ImageError::Unpack {
            index: 0,
            count,
            digest: String::new(),
            image: p.source.clone(),
            source,
        })?;
        for (i, layer) in p.layers.iter().enumerate() {
            progress(format!(
                "unpacking layer {}/{count} ({})",
                i + 1,
                human_size(layer.desc.size)
            ));
            let path = layer.path.clone();
            let digest = layer.desc.digest.clone();
            let diff_id = diff_ids[i].clone();
            let compression = compressions[i];
            let source = p.source.clone();
            unpacker = tokio::task::spawn_blocking(move || -> Result<Unpacker> {
                let object = format!("layer {}/{count} of {source}", i + 1);
                verify_file(&path, &digest, &object)?;
                let file = std::fs::File::open(&path).map_err(io_err("open", &path))?;
                let got = unpacker
                    .unpack_layer(io::BufReader::with_capacity(1 << 20, file), compression)
                    .map_err(|e| ImageError::Unpack {
                        index: i + 1,
                        count,
                        digest: digest.clone(),
                        image: source.clone(),
                        source: e,
                    })?;
                if got != diff_id {
                    return Err(ImageError::Digest {
                        object: format!("uncompressed {object} (diff_id)"),
                        expected: diff_id,
                        actual: got,
                    });
                }
                Ok(unpacker)
            })
            .await
            .map_err(ImageError::Task)??;
        }
        let root_owned = root.to_path_buf();
        let tree = tokio::task::spawn_blocking(move || {
            unpacker.finish().map_err(|source| ImageError::Unpack {
                index: count,
                count,
                digest: String::new(),
                image: String::new(),
                source,
            })?;
            unpack::measure(&root_owned).map_err(io_err("measure", &root_owned))
        })
        .await
        .map_err(ImageError::Task)??;

        let size = drive_size(tree.bytes);
        let inodes = (tree.inodes + tree.inodes / 2 + 4096).max(size / 16384);
        progress(format!(
            "building drive ({} MiB, {} files)",
            size >> 20,
            tree.inodes
        ));
        let tmp = self
            .images_dir
            .join(format!(".tmp-{hex}-{}.ext4", rand::random::<u32>()));
        let file = tokio::fs::File::create(&tmp)
            .await
            .map_err(io_err("create", &tmp))?;
        file.set_len(size).await.map_err(io_err("size", &tmp))?;
        drop(file);
        let out = tokio::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-L", "root", "-N"])
            .arg(inodes.to_string())
            .arg("-d")
            .arg(root)
            .arg(&tmp)
            .kill_on_drop(true)
            .output()
            .await;
        let failure = match out {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(ImageError::Command {
                command: format!("mkfs.ext4 -d {} {}", root.display(), tmp.display()),
                status: o.status.to_string(),
                stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
            }),
            Err(e) => Some(ImageError::Command {
                command: "mkfs.ext4".into(),
                status: "not started".into(),
                stderr: e.to_string(),
            }),
        };
        if let Some(e) = failure {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
        Ok(tmp)
    }
}

/// content × 1.3 + 64 MiB, rounded up to MiB.
fn drive_size(content: u64) -> u64 {
    let raw = content + content * 3 / 10 + DRIVE_SLACK_BYTES;
    raw.div_ceil(1 << 20) << 20
}

/// "2.3 MiB".
fn human_size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

/// Checks that the file at `path` hashes to `digest` (sha256).
fn verify_file(path: &Path, digest: &str, object: &str) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err("open", path))?;
    let (actual, _) = unpack::HashingReader::new(io::BufReader::with_capacity(1 << 20, file))
        .finish()
        .map_err(io_err("read", path))?;
    if actual != digest {
        return Err(ImageError::Digest {
            object: object.to_string(),
            expected: digest.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Writes `bytes` to a temp name beside `path`, then renames it over `path`.
async fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}-{}", rand::random::<u32>()));
    tokio::fs::write(&tmp, bytes)
        .await
        .map_err(io_err("write", &tmp))?;
    if let Err(e) = tokio::fs::rename(&tmp, path).await {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io_err("move into place", path)(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
