//! ironlab's manifests and content formats: parsing and validation, no I/O.
//!
//! [`parse_manifest`] turns YAML (or JSON, which is YAML) into a validated [`Manifest`], or
//! returns every problem with the path of the field and the reason.

use std::fmt;

pub mod content;
pub mod manifest;
pub mod size;
pub mod solution;
pub mod task;
pub mod validate;

pub use manifest::*;
pub use size::Size;
pub use solution::{Solution, Step, parse_solution};
pub use task::{Duration, Task};
pub use validate::Subnet;

/// Most machines a playground may have.
pub const MAX_MACHINES: usize = 5;

/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;

/// One problem in a document: where and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    /// Field path such as `playground.machines[1].drives[0].size` (empty for the whole document).
    pub path: String,
    /// The reason.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A manifest that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    /// Every problem found (at least one).
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        f.write_str(&all.join("; "))
    }
}

impl ManifestError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        ManifestError {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Parses and validates a playground manifest.
pub fn parse_manifest(text: &str) -> Result<Manifest, ManifestError> {
    if text.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::one("", "manifest is larger than 1 MiB"));
    }
    let tree: serde_json::Value = serde_saphyr::from_str(text)
        .map_err(|e| ManifestError::one("", format!("not valid YAML: {e}")))?;
    from_value(tree)
}

/// Deserializes and validates a manifest given as a JSON tree (as the REST API receives it).
pub fn from_value(tree: serde_json::Value) -> Result<Manifest, ManifestError> {
    if !tree.is_object() {
        return Err(ManifestError::one("", "a manifest must be a mapping"));
    }
    let manifest: Manifest = serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ManifestError::one(path, e.into_inner().to_string())
    })?;
    let errors = validate::validate(&manifest);
    if errors.is_empty() {
        Ok(manifest)
    } else {
        Err(ManifestError { errors })
    }
}

/// Where a root drive's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A stock image the platform builds and names (`debian`).
    Stock(String),
    /// An OCI reference `REGISTRY/REPO:TAG` or `REGISTRY/REPO@sha256:…` (written `oci://…`).
    Oci(String),
    /// Drives saved from a stopped run (`saved://ID`, 1–12 characters `[a-z0-9]`); the platform
    /// writes these when a run is saved as a playground.
    Saved(String),
}

impl ImageSource {
    /// Parses `debian`, `oci://REGISTRY/REPO(:TAG|@sha256:HEX)` or `saved://ID`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(id) = s.strip_prefix("saved://") {
            if id.is_empty()
                || id.len() > 12
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(format!(
                    "{s:?}: a saved drive is saved://ID with 1-12 characters [a-z0-9]"
                ));
            }
            return Ok(ImageSource::Saved(id.to_string()));
        }
        if let Some(r) = s.strip_prefix("oci://") {
            let (repo_part, has_ref) = if let Some((repo, digest)) = r.split_once('@') {
                let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
                    format!("{s:?}: a digest must look like sha256:<64 hex digits>")
                })?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!(
                        "{s:?}: a digest must look like sha256:<64 hex digits>"
                    ));
                }
                (repo, true)
            } else {
                (r, false)
            };
            let Some((registry, path)) = repo_part.split_once('/') else {
                return Err(format!(
                    "{s:?} must name a registry and a repository: oci://REGISTRY/REPO:TAG"
                ));
            };
            if registry.is_empty() || path.is_empty() || r.contains(char::is_whitespace) {
                return Err(format!(
                    "{s:?} must name a registry and a repository: oci://REGISTRY/REPO:TAG"
                ));
            }
            let _ = has_ref;
            Ok(ImageSource::Oci(r.to_string()))
        } else if !s.is_empty()
            && s.len() <= 40
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Ok(ImageSource::Stock(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is neither a stock image name nor oci://REGISTRY/REPO:TAG"
            ))
        }
    }
}

#[cfg(test)]
mod tests;
