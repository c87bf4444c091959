//! Stock images: import from an OCI image layout directory `stock_dir/<name>/`
//! (`index.json` → manifest → config + layers in `blobs/sha256/`), digests verified.

use std::path::{Path, PathBuf};

use super::oci::{self, AnyManifest, Descriptor, Index, REF_NAME_ANNOTATION};
use super::{ImageDrive, ImageError, ImageStore, LocalLayer, Prepared, Progress, Result, io_err};

/// An OCI image layout on disk.
struct Layout {
    dir: PathBuf,
    source: String,
}

impl Layout {
    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        let hex = oci::sha256_hex(digest).ok_or_else(|| ImageError::UnsupportedDigest {
            digest: digest.to_string(),
            image: self.source.clone(),
        })?;
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    /// Reads a (small) blob and checks its digest.
    async fn read_blob(&self, digest: &str, what: &str) -> Result<Vec<u8>> {
        let path = self.blob_path(digest)?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(io_err("read", &path))?;
        let actual = oci::sha256_digest(&bytes);
        if actual != digest {
            return Err(ImageError::Digest {
                object: format!("{what} of {}", self.source),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(bytes)
    }

    fn invalid(&self, what: &'static str, detail: impl ToString) -> ImageError {
        ImageError::Invalid {
            what,
            image: self.source.clone(),
            detail: detail.to_string(),
        }
    }

    /// The manifest descriptor to use: the entry annotated `ref.name = latest`, else the first;
    /// nested indexes are followed to their linux/amd64 entry.
    async fn manifest_descriptor(&self) -> Result<Descriptor> {
        let index_path = self.dir.join("index.json");
        let bytes = tokio::fs::read(&index_path)
            .await
            .map_err(io_err("read", &index_path))?;
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| self.invalid("index.json", e))?;
        let mut desc = index
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME_ANNOTATION).map(String::as_str) == Some("latest"))
            .or_else(|| index.manifests.first())
            .cloned()
            .ok_or_else(|| self.invalid("index.json", "no manifests"))?;
        for _ in 0..4 {
            if desc.media_type != oci::MT_OCI_INDEX && desc.media_type != oci::MT_DOCKER_LIST {
                return Ok(desc);
            }
            let nested = self.read_blob(&desc.digest, "nested index").await?;
            let nested: Index =
                serde_json::from_slice(&nested).map_err(|e| self.invalid("nested index", e))?;
            desc = nested
                .linux_amd64()
                .cloned()
                .ok_or_else(|| ImageError::Platform {
                    image: self.source.clone(),
                    detail: "no linux/amd64 entry in the nested index".into(),
                })?;
        }
        Err(self.invalid("index.json", "indexes nested too deep"))
    }
}

/// Stock names are plain directory names.
fn valid_stock_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl ImageStore {
    pub(super) async fn ensure_stock(
        &self,
        name: &str,
        progress: Progress<'_>,
    ) -> Result<ImageDrive> {
        if !valid_stock_name(name) {
            return Err(ImageError::InvalidStockName(name.to_string()));
        }
        let stock_dir: &Path = &self.config.stock_dir;
        let dir = stock_dir.join(name);
        if !dir.join("index.json").is_file() {
            return Err(ImageError::StockNotFound {
                name: name.to_string(),
                dir: stock_dir.to_path_buf(),
            });
        }
        let layout = Layout {
            dir,
            source: format!("stock:{name}"),
        };
        let desc = layout.manifest_descriptor().await?;
        let digest = desc.digest.clone();
        if let Some(drive) = self.cached(&digest) {
            return Ok(drive);
        }
        let lock = self.lock_for(&digest);
        let _guard = lock.lock().await;
        if let Some(drive) = self.cached(&digest) {
            return Ok(drive);
        }
        progress(format!(
            "importing stock image {name} ({digest}) from {}",
            layout.dir.display()
        ));

        let raw = layout.read_blob(&digest, "manifest").await?;
        let manifest = match AnyManifest::parse(&raw).map_err(|e| layout.invalid("manifest", e))? {
            AnyManifest::Image(m) => m,
            AnyManifest::Index(_) => {
                return Err(
                    layout.invalid("manifest", "expected an image manifest, found an index")
                );
            }
        };
        let config = layout
            .read_blob(&manifest.config.digest, "image config")
            .await?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for desc in &manifest.layers {
            let path = layout.blob_path(&desc.digest)?;
            if !path.is_file() {
                return Err(
                    layout.invalid("layout", format!("layer blob {} is missing", desc.digest))
                );
            }
            layers.push(LocalLayer {
                path,
                desc: desc.clone(),
            });
        }
        self.build(
            Prepared {
                digest,
                source: layout.source.clone(),
                config,
                layers,
            },
            progress,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::valid_stock_name;

    #[test]
    fn stock_names() {
        assert!(valid_stock_name("debian"));
        assert!(valid_stock_name("ubuntu-24.04"));
        assert!(!valid_stock_name("../etc"));
        assert!(!valid_stock_name("a/b"));
        assert!(!valid_stock_name(""));
        assert!(!valid_stock_name(".hidden"));
    }
}
