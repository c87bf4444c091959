//! The playground catalog: stock playgrounds (registered at every start) and custom ones.
//!
//! Visibility: stock playgrounds are everyone's; a custom playground is seen (and started,
//! removed) by its owner and by admins.

use ironlab_api::v1::PlaygroundView;
use ironlab_spec::Manifest;
use serde_json::json;

use crate::auth::User;
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};

/// The stock playgrounds' manifests.
pub fn stock_manifests() -> Vec<serde_json::Value> {
    vec![
        json!({
            "kind": "playground",
            "name": "debian",
            "title": "Debian 12",
            "description": "A Debian 12 (bookworm) machine with bash, coreutils, curl, git, vim and sudo.",
            "playground": {
                "machines": [{
                    "name": "debian",
                    "runtime": "auto",
                    "resources": {"cpu": 1, "memory": "512MiB"},
                    "drives": [{"source": "debian", "mount": "/", "size": "4GiB"}],
                    "users": [{"name": "laborant", "default": true}]
                }],
                "tabs": [{"kind": "terminal", "machine": "debian"}]
            }
        }),
        json!({
            "kind": "playground",
            "name": "debian-pair",
            "title": "Two Debian 12 machines",
            "description": "Two Debian 12 machines, alpha and beta, on one network: they reach each other by name.",
            "playground": {
                "machines": [{
                    "name": "alpha",
                    "runtime": "auto",
                    "resources": {"cpu": 1, "memory": "256MiB"},
                    "drives": [{"source": "debian", "mount": "/", "size": "4GiB"}],
                    "users": [{"name": "laborant", "default": true}]
                }, {
                    "name": "beta",
                    "runtime": "auto",
                    "resources": {"cpu": 1, "memory": "256MiB"},
                    "drives": [{"source": "debian", "mount": "/", "size": "4GiB"}],
                    "users": [{"name": "laborant", "default": true}]
                }],
                "tabs": [
                    {"kind": "terminal", "machine": "alpha"},
                    {"kind": "terminal", "machine": "beta"}
                ]
            }
        }),
        // Always a microVM: Docker needs a kernel of its own (images/docker/build.sh).
        json!({
            "kind": "playground",
            "name": "docker",
            "title": "Docker on Debian 12",
            "description": "A Debian 12 virtual machine with systemd and Debian's Docker; the local image ironlab/busybox is ready to run.",
            "playground": {
                "machines": [{
                    "name": "docker",
                    "runtime": "microvm",
                    "resources": {"cpu": 1, "memory": "512MiB"},
                    "drives": [{"source": "docker", "mount": "/", "size": "4GiB"}],
                    "users": [{"name": "laborant", "default": true}]
                }],
                "tabs": [{"kind": "terminal", "machine": "docker"}]
            }
        }),
    ]
}

/// Registers (or refreshes) every stock playground; idempotent.
pub async fn register_stock(db: &Db) -> anyhow::Result<()> {
    for value in stock_manifests() {
        let manifest = ironlab_spec::from_value(value)
            .map_err(|e| anyhow::anyhow!("a stock playground manifest is invalid: {e}"))?;
        let text = serde_json::to_string(&manifest)?;
        sqlx::query(
            "INSERT INTO playgrounds (name, owner, title, description, manifest, stock, parent, created_at) \
             VALUES ($1, '', $2, $3, $4, TRUE, NULL, $5) \
             ON CONFLICT (name) DO UPDATE SET owner = '', title = excluded.title, \
             description = excluded.description, manifest = excluded.manifest, stock = TRUE",
        )
        .bind(&manifest.name)
        .bind(&manifest.title)
        .bind(&manifest.description)
        .bind(&text)
        .bind(db::now_ms())
        .execute(db)
        .await
        .map_err(|e| {
            anyhow::Error::new(e).context(format!(
                "failed to register the stock playground {}",
                manifest.name
            ))
        })?;
    }
    Ok(())
}

/// A stored playground.
#[derive(Debug, Clone)]
pub struct Playground {
    /// Wire view (includes the manifest JSON).
    pub view: PlaygroundView,
    /// The parsed manifest.
    pub manifest: Manifest,
}

type Row = (
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    i64,
);

/// `stock` is read as 0/1 (see [`db::bool_col`]).
const COLUMNS: &str = "name, owner, title, description, manifest, CASE WHEN stock THEN 1 ELSE 0 END, parent, created_at";

fn from_row(row: Row) -> ApiResult<Playground> {
    let (name, owner, title, description, text, stock, parent, created_at) = row;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("stored manifest of playground {name} is not JSON: {e}"))?;
    let manifest = ironlab_spec::from_value(value.clone())
        .map_err(|e| anyhow::anyhow!("stored manifest of playground {name} is invalid: {e}"))?;
    let machines = manifest
        .playground
        .machines
        .iter()
        .map(|m| m.name.clone())
        .collect();
    Ok(Playground {
        view: PlaygroundView {
            name,
            title,
            description,
            machines,
            stock: db::bool_col(stock),
            owner,
            parent,
            created_at: db::from_ms(created_at),
            manifest: value,
        },
        manifest,
    })
}

fn visible(p: &PlaygroundView, user: &User) -> bool {
    p.stock || p.owner == user.id || user.is_admin()
}

/// Every playground the user may see, stock first, then by name.
pub async fn list(db: &Db, user: &User) -> ApiResult<Vec<PlaygroundView>> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM playgrounds ORDER BY stock DESC, name"
    ))
    .fetch_all(db)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let p = from_row(row)?;
        if visible(&p.view, user) {
            out.push(p.view);
        }
    }
    Ok(out)
}

/// One playground the user may see, or 404.
pub async fn get(db: &Db, user: &User, name: &str) -> ApiResult<Playground> {
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM playgrounds WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(db)
    .await?;
    let not_found = || {
        ApiError::NotFound(format!(
            "playground {name} not found; `ironlab playground catalog` lists them"
        ))
    };
    let p = from_row(row.ok_or_else(not_found)?)?;
    if visible(&p.view, user) {
        Ok(p)
    } else {
        Err(not_found())
    }
}

/// Parses, validates and registers a custom playground owned by `user`. Drives saved from
/// runs (`saved://…`) are refused here: only `playground save` makes those.
pub async fn create(db: &Db, user: &User, value: serde_json::Value) -> ApiResult<PlaygroundView> {
    let manifest = parse(value)?;
    for (i, m) in manifest.playground.machines.iter().enumerate() {
        for (j, d) in m.drives.iter().enumerate() {
            if d.source
                .as_deref()
                .is_some_and(|s| s.starts_with("saved://"))
            {
                return Err(ApiError::BadRequest(format!(
                    "playground.machines[{i}].drives[{j}].source: saved:// drives are made by \
                     `ironlab playground save RUN`, not written in a manifest"
                )));
            }
        }
    }
    insert(db, user, &manifest, None).await
}

fn parse(value: serde_json::Value) -> ApiResult<Manifest> {
    ironlab_spec::from_value(value).map_err(|e| {
        let lines: Vec<String> = e.errors.iter().map(ToString::to_string).collect();
        ApiError::BadRequest(lines.join("\n"))
    })
}

/// Registers a playground saved from run `source_run` whose machines start from the saved
/// drives `saved_id`, kept on worker `on` (the manifest's `parent` names the playground it was
/// saved from).
pub async fn create_saved(
    db: &Db,
    user: &User,
    value: serde_json::Value,
    saved_id: &str,
    source_run: &str,
    on: &str,
) -> ApiResult<PlaygroundView> {
    let manifest = parse(value)?;
    insert(db, user, &manifest, Some((saved_id, source_run, on))).await
}

/// The saved drives a playground starts from, if it was saved from a run, and the worker
/// they are on (`None`: saved before workers had names, the first).
pub async fn saved_id_of(db: &Db, name: &str) -> ApiResult<Option<(String, Option<String>)>> {
    let v: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT saved_id, saved_worker FROM playgrounds WHERE name = $1")
            .bind(name)
            .fetch_optional(db)
            .await?;
    Ok(v.and_then(|(id, on)| id.map(|id| (id, on))))
}

async fn insert(
    db: &Db,
    user: &User,
    manifest: &Manifest,
    saved: Option<(&str, &str, &str)>,
) -> ApiResult<PlaygroundView> {
    let text = serde_json::to_string(&manifest)
        .map_err(|e| anyhow::anyhow!("failed to serialize manifest {}: {e}", manifest.name))?;
    let result = sqlx::query(
        "INSERT INTO playgrounds (name, owner, title, description, manifest, stock, parent, created_at, \
         saved_id, source_run, saved_worker) \
         VALUES ($1, $2, $3, $4, $5, FALSE, $6, $7, $8, $9, $10) ON CONFLICT (name) DO NOTHING",
    )
    .bind(&manifest.name)
    .bind(&user.id)
    .bind(&manifest.title)
    .bind(&manifest.description)
    .bind(&text)
    .bind(&manifest.parent)
    .bind(db::now_ms())
    .bind(saved.map(|s| s.0))
    .bind(saved.map(|s| s.1))
    .bind(saved.map(|s| s.2))
    .execute(db)
    .await?;
    if result.rows_affected() == 0 {
        return Err(ApiError::Conflict(format!(
            "a playground named {} already exists; choose another name",
            manifest.name
        )));
    }
    Ok(get(db, user, &manifest.name).await?.view)
}

/// Removes a custom playground (owner or admin only; stock ones cannot be removed).
pub async fn remove(db: &Db, user: &User, name: &str) -> ApiResult<()> {
    let p = get(db, user, name).await?;
    if p.view.stock {
        return Err(ApiError::Forbidden(format!(
            "playground {name} is a stock playground and cannot be removed"
        )));
    }
    if p.view.owner != user.id && !user.is_admin() {
        return Err(ApiError::Forbidden(format!(
            "only the owner of playground {name} or an admin may remove it"
        )));
    }
    sqlx::query("DELETE FROM playgrounds WHERE name = $1")
        .bind(name)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use ironlab_spec::RuntimeKind;

    use super::*;

    #[test]
    fn stock_manifests_are_valid_and_docker_is_always_a_microvm() {
        let manifests: Vec<Manifest> = stock_manifests()
            .into_iter()
            .map(|v| ironlab_spec::from_value(v).expect("a valid stock manifest"))
            .collect();
        let names: Vec<&str> = manifests.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["debian", "debian-pair", "docker"]);
        let docker = &manifests[2];
        assert_eq!(docker.playground.machines.len(), 1);
        let m = &docker.playground.machines[0];
        // Docker needs a kernel of its own: never a container, even where `auto` would pick one.
        assert_eq!(m.runtime, RuntimeKind::Microvm);
        assert_eq!(m.default_user(), "laborant");
        assert_eq!(m.drives[0].source.as_deref(), Some("docker"));
    }
}
