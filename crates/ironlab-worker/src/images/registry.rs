//! Registry images: pull with `oci-client` (anonymous auth; plain HTTP for loopback registries,
//! `localhost` and the configured insecure ones). Blobs are cached in
//! `pool/images/blobs/sha256/<hex>` and only stored once their sha256 matches.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::oci::{self, ACCEPTED_MANIFESTS, AnyManifest, Descriptor};
use super::{
    ImageDrive, ImageError, ImageStore, LocalLayer, Prepared, Progress, Result, human_size, io_err,
};

/// The host part of `HOST[:PORT]` / `[V6]:PORT`.
fn registry_host(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => registry,
    }
}

/// Whether a registry is reached over plain HTTP.
pub(super) fn is_insecure(registry: &str, insecure: &[String]) -> bool {
    let host = registry_host(registry);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || insecure
            .iter()
            .any(|r| r.eq_ignore_ascii_case(registry) || r.eq_ignore_ascii_case(host))
}

fn registry_err(
    what: impl Into<String>,
    reference: &str,
) -> impl FnOnce(OciDistributionError) -> ImageError {
    let what = what.into();
    let reference = reference.to_string();
    move |e| match e {
        OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected,
            actual,
        }) => ImageError::Digest {
            object: format!("{what} of {reference}"),
            expected,
            actual,
        },
        other => ImageError::Registry {
            what: format!("fetch the {what}"),
            reference,
            source: Box::new(other),
        },
    }
}

impl ImageStore {
    fn client_for(&self, image: &Reference) -> Client {
        let mut exceptions = Vec::new();
        for r in [image.registry(), image.resolve_registry()] {
            if is_insecure(r, &self.config.insecure_registries) {
                exceptions.push(r.to_string());
            }
        }
        Client::new(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(exceptions),
            ..Default::default()
        })
    }

    /// `pool/images/<index-hex>.index` holds the platform manifest digest an index resolved to.
    fn alias_path(&self, digest: &str) -> Option<PathBuf> {
        oci::sha256_hex(digest).map(|hex| self.images_dir.join(format!("{hex}.index")))
    }

    /// The drive for `digest`, directly or through an index alias.
    fn cached_or_alias(&self, digest: &str) -> Option<ImageDrive> {
        self.cached(digest).or_else(|| {
            let target = std::fs::read_to_string(self.alias_path(digest)?).ok()?;
            self.cached(target.trim())
        })
    }

    pub(super) async fn ensure_oci(
        &self,
        reference: &str,
        progress: Progress<'_>,
    ) -> Result<ImageDrive> {
        let reference = reference.strip_prefix("oci://").unwrap_or(reference);
        let image: Reference =
            reference
                .parse()
                .map_err(|source| ImageError::InvalidReference {
                    reference: reference.to_string(),
                    source,
                })?;
        let client = self.client_for(&image);
        let auth = RegistryAuth::Anonymous;

        let top_digest = match image.digest() {
            Some(d) => d.to_string(),
            None => match client.fetch_manifest_digest(&image, &auth).await {
                Ok(d) => d,
                Err(e) => {
                    // A registry that is down must not stop machines whose image is here.
                    if is_unreachable(&e)
                        && let Some(drive) = self.recorded_ref(reference)
                    {
                        progress(format!(
                            "registry of {reference} unreachable; using the cached image {}",
                            drive.digest
                        ));
                        return Ok(drive);
                    }
                    return Err(ImageError::Registry {
                        what: "resolve the manifest digest".into(),
                        reference: reference.to_string(),
                        source: Box::new(e),
                    });
                }
            },
        };
        self.hex(&top_digest, reference)?;
        let drive = self
            .ensure_resolved(&client, &image, reference, &top_digest, progress)
            .await?;
        if image.digest().is_none() {
            self.record_ref(reference, &top_digest).await;
        }
        Ok(drive)
    }

    /// `pool/images/refs/<sha256 of the reference>`: the digest a tag last resolved to.
    fn ref_path(&self, reference: &str) -> PathBuf {
        let key = oci::sha256_digest(reference.as_bytes());
        let hex = key.trim_start_matches("sha256:");
        self.images_dir.join("refs").join(hex)
    }

    /// The drive a tag last resolved to, if it is still here.
    fn recorded_ref(&self, reference: &str) -> Option<ImageDrive> {
        let digest = std::fs::read_to_string(self.ref_path(reference)).ok()?;
        self.cached_or_alias(digest.trim())
    }

    async fn record_ref(&self, reference: &str, digest: &str) {
        let path = self.ref_path(reference);
        if tokio::fs::read_to_string(&path).await.ok().as_deref() == Some(digest) {
            return;
        }
        let dir = self.images_dir.join("refs");
        let written = match tokio::fs::create_dir_all(&dir).await {
            Ok(()) => super::write_atomic(&path, digest.as_bytes()).await,
            Err(e) => Err(io_err("create", &dir)(e)),
        };
        if let Err(e) = written {
            tracing::warn!(reference, error = %e, "could not record the digest of a tag");
        }
    }

    async fn ensure_resolved(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        top_digest: &str,
        progress: Progress<'_>,
    ) -> Result<ImageDrive> {
        let auth = RegistryAuth::Anonymous;
        let top_digest = top_digest.to_string();
        if let Some(drive) = self.cached_or_alias(&top_digest) {
            return Ok(drive);
        }
        let lock = self.lock_for(&top_digest);
        let _guard = lock.lock().await;
        if let Some(drive) = self.cached_or_alias(&top_digest) {
            return Ok(drive);
        }
        progress(format!("pulling {reference}"));

        let by_digest = image.clone_with_digest(top_digest.clone());
        let (raw, _) = client
            .pull_manifest_raw(&by_digest, &auth, &ACCEPTED_MANIFESTS)
            .await
            .map_err(registry_err("manifest", reference))?;
        check_digest(&raw, &top_digest, &format!("manifest of {reference}"))?;
        let invalid = |what: &'static str, e: serde_json::Error| ImageError::Invalid {
            what,
            image: reference.to_string(),
            detail: e.to_string(),
        };
        let (digest, manifest) =
            match AnyManifest::parse(&raw).map_err(|e| invalid("manifest", e))? {
                AnyManifest::Image(m) => (top_digest.clone(), m),
                AnyManifest::Index(index) => {
                    let entry = index.linux_amd64().ok_or_else(|| ImageError::Platform {
                        image: reference.to_string(),
                        detail: format!(
                            "the index lists {}",
                            index
                                .manifests
                                .iter()
                                .filter_map(|d| d.platform.as_ref())
                                .map(|p| format!("{}/{}", p.os, p.architecture))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    })?;
                    let digest = entry.digest.clone();
                    self.hex(&digest, reference)?;
                    let alias = self.alias_path(&top_digest).ok_or_else(|| {
                        ImageError::UnsupportedDigest {
                            digest: top_digest.clone(),
                            image: reference.to_string(),
                        }
                    })?;
                    super::write_atomic(&alias, digest.as_bytes()).await?;
                    if let Some(drive) = self.cached(&digest) {
                        return Ok(drive);
                    }
                    let (raw, _) = client
                        .pull_manifest_raw(
                            &image.clone_with_digest(digest.clone()),
                            &auth,
                            &ACCEPTED_MANIFESTS,
                        )
                        .await
                        .map_err(registry_err("linux/amd64 manifest", reference))?;
                    check_digest(
                        &raw,
                        &digest,
                        &format!("linux/amd64 manifest of {reference}"),
                    )?;
                    match AnyManifest::parse(&raw).map_err(|e| invalid("manifest", e))? {
                        AnyManifest::Image(m) => (digest, m),
                        AnyManifest::Index(_) => {
                            return Err(ImageError::Invalid {
                                what: "manifest",
                                image: reference.to_string(),
                                detail: "the linux/amd64 entry is another index".into(),
                            });
                        }
                    }
                }
            };
        // The platform manifest may be shared with another tag: its drive may exist already.
        if digest != top_digest {
            let lock = self.lock_for(&digest);
            let _inner = lock.lock().await;
            if let Some(drive) = self.cached(&digest) {
                return Ok(drive);
            }
            return self
                .pull_and_build(client, image, reference, digest, manifest, progress)
                .await;
        }
        self.pull_and_build(client, image, reference, digest, manifest, progress)
            .await
    }

    async fn pull_and_build(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        digest: String,
        manifest: oci::Manifest,
        progress: Progress<'_>,
    ) -> Result<ImageDrive> {
        let mut config = Vec::new();
        client
            .pull_blob(image, manifest.config.digest.as_str(), &mut config)
            .await
            .map_err(registry_err("image config", reference))?;
        check_digest(
            &config,
            &manifest.config.digest,
            &format!("image config of {reference}"),
        )?;

        let blobs = self.blobs_dir();
        tokio::fs::create_dir_all(&blobs)
            .await
            .map_err(io_err("create", &blobs))?;
        let count = manifest.layers.len();
        let mut layers = Vec::with_capacity(count);
        for (i, desc) in manifest.layers.iter().enumerate() {
            let object = format!("layer {}/{count}", i + 1);
            let (path, cached) = self
                .fetch_blob(client, image, reference, desc, &blobs, &object)
                .await?;
            progress(format!(
                "{object} ({}{})",
                human_size(desc.size),
                if cached { ", cached" } else { "" }
            ));
            layers.push(LocalLayer {
                path,
                desc: desc.clone(),
            });
        }
        self.build(
            Prepared {
                digest,
                source: format!("oci://{reference}"),
                config,
                layers,
            },
            progress,
        )
        .await
    }

    /// Downloads a blob into the cache unless it is there; returns its path and whether it was
    /// cached. A download is hashed as it arrives and stored only when it matches its digest.
    async fn fetch_blob(
        &self,
        client: &Client,
        image: &Reference,
        reference: &str,
        desc: &Descriptor,
        blobs: &Path,
        object: &str,
    ) -> Result<(PathBuf, bool)> {
        let hex = self.hex(&desc.digest, reference)?;
        let path = blobs.join(hex);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok((path, true));
        }
        let tmp = blobs.join(format!(".tmp-{hex}-{}", rand::random::<u32>()));
        let result = async {
            let file = tokio::fs::File::create(&tmp)
                .await
                .map_err(io_err("create", &tmp))?;
            let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
            client
                .pull_blob(image, desc.digest.as_str(), &mut out)
                .await
                .map_err(registry_err(object, reference))?;
            use tokio::io::AsyncWriteExt;
            out.flush().await.map_err(io_err("write", &tmp))?;
            out.into_inner()
                .sync_all()
                .await
                .map_err(io_err("sync", &tmp))?;
            // Hash what landed on disk, independently of the client's own check.
            let (tmp2, digest, object) = (
                tmp.clone(),
                desc.digest.clone(),
                format!("{object} of {reference}"),
            );
            tokio::task::spawn_blocking(move || super::verify_file(&tmp2, &digest, &object))
                .await
                .map_err(ImageError::Task)??;
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(io_err("move into place", &path))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result.map(|()| (path, false))
    }
}

/// Whether an error means the registry could not be reached at all.
fn is_unreachable(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(e) => e.is_connect() || e.is_timeout(),
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        _ => false,
    }
}

fn check_digest(bytes: &[u8], expected: &str, object: &str) -> Result<()> {
    let actual = oci::sha256_digest(bytes);
    if actual != expected {
        return Err(ImageError::Digest {
            object: object.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registries() {
        let list = vec!["registry.lab:5000".to_string(), "plain.example".to_string()];
        assert!(is_insecure("127.0.0.1:5000", &[]));
        assert!(is_insecure("127.1.2.3", &[]));
        assert!(is_insecure("localhost:5000", &[]));
        assert!(is_insecure("[::1]:5000", &[]));
        assert!(is_insecure("registry.lab:5000", &list));
        assert!(is_insecure("plain.example:443", &list));
        assert!(!is_insecure("registry.lab:6000", &list));
        assert!(!is_insecure("index.docker.io", &list));
        assert!(!is_insecure("10.0.0.1:5000", &list));
    }
}
