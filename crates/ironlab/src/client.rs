//! The CLI's side of the REST API: stored credentials and one HTTP client per process.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use ironlab_api::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// `$XDG_CONFIG_HOME/ironlab/config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    /// Control plane URL.
    pub server: String,
    /// API token.
    pub token: String,
}

/// Where the login is stored.
pub fn config_path() -> anyhow::Result<PathBuf> {
    let base = directories::BaseDirs::new()
        .context("cannot find the home directory to store the login in")?;
    Ok(base.config_dir().join("ironlab").join("config.json"))
}

/// Reads the stored login, if any.
pub fn load_config() -> anyhow::Result<Option<Config>> {
    let path = config_path()?;
    match fs_err::read_to_string(&path) {
        Ok(text) => Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{} is not a valid ironlab config", path.display())
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Stores the login (mode 600).
pub fn save_config(config: &Config) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = config_path()?;
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("failed to create {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("failed to chmod {}", tmp.display()))?;
    let text = serde_json::to_string_pretty(config)?;
    writeln!(f, "{text}").with_context(|| format!("failed to write {}", tmp.display()))?;
    drop(f);
    fs_err::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes the stored login.
pub fn remove_config() -> anyhow::Result<bool> {
    let path = config_path()?;
    match fs_err::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// An error answer of the API.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable kind.
    pub kind: String,
    /// The server's explanation.
    pub detail: String,
}

/// A client of one control plane.
#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    server: String,
    token: String,
}

impl Api {
    /// Resolves server and token: flags/env first, then the stored login.
    pub fn from_flags(server: Option<String>, token: Option<String>) -> anyhow::Result<Self> {
        let stored = load_config()?;
        let server = server
            .or_else(|| stored.as_ref().map(|c| c.server.clone()))
            .context("no server: run `ironlab auth login --server URL --token TOKEN` or set IRONLAB_SERVER")?;
        let token = token
            .or_else(|| stored.as_ref().map(|c| c.token.clone()))
            .context("no API token: run `ironlab auth login --server URL --token TOKEN` or set IRONLAB_TOKEN")?;
        Api::new(&server, &token)
    }

    /// A client for `server` with `token`.
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(90))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Api {
            http,
            server: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.server)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .with_context(|| format!("cannot reach the ironlab server at {}", self.server))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let (kind, detail) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => (b.error, b.detail),
            Err(_) => (
                "http".to_string(),
                format!("the server answered {status}: {}", text.trim()),
            ),
        };
        Err(ApiError {
            status,
            kind,
            detail,
        }
        .into())
    }

    /// Sends a request and decodes the JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = self.send(req).await?;
        resp.json()
            .await
            .with_context(|| format!("unexpected answer to {method} {path}"))
    }

    /// POSTs raw bytes of `content_type` and decodes the JSON answer.
    pub async fn post_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<T> {
        let req = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body);
        let resp = self.send(req).await?;
        resp.json()
            .await
            .with_context(|| format!("unexpected answer to POST {path}"))
    }

    /// GETs `path` and returns the answer's body as bytes (plain-text endpoints).
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let resp = self.send(self.http.get(self.url(path))).await?;
        Ok(resp
            .bytes()
            .await
            .with_context(|| format!("unexpected answer to GET {path}"))?
            .to_vec())
    }

    /// Sends a request and ignores the answer's body.
    pub async fn call_empty(&self, method: Method, path: &str) -> anyhow::Result<()> {
        self.send(self.http.request(method, self.url(path))).await?;
        Ok(())
    }

    /// Opens a long-lived `GET` (an event stream); the caller reads the body as it comes.
    pub async fn stream(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        self.send(
            self.http
                .get(self.url(path))
                .header("accept", "text/event-stream")
                .timeout(Duration::from_secs(365 * 24 * 3600)),
        )
        .await
    }
}
