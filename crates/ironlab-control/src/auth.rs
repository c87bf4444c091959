//! Users and API tokens.
//!
//! API tokens are `ilt_` + 32 random URL-safe characters; only their SHA-256 (hex) is stored.
//! The first start creates the user `admin` and writes its token to `DATA_DIR/admin-token`
//! (mode 600); later starts re-use it, or mint a new one when the file is gone.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use ironlab_api::v1::UserView;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};

/// Prefix of every API token.
pub const TOKEN_PREFIX: &str = "ilt_";

/// Name of the admin user created at first start.
pub const ADMIN_NAME: &str = "admin";

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees and manages everything.
    Admin,
    /// Sees their own runs and playgrounds.
    User,
}

impl Role {
    /// SQL/JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "user" => Some(Role::User),
            _ => None,
        }
    }
}

/// An authenticated user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub id: String,
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
}

impl User {
    /// Whether the user is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// The wire view.
    pub fn view(&self) -> UserView {
        UserView {
            id: self.id.clone(),
            name: self.name.clone(),
            role: self.role.as_str().to_string(),
        }
    }
}

/// SHA-256 of a token, hex-encoded: the stored form.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh API token.
pub fn new_api_token() -> String {
    format!("{TOKEN_PREFIX}{}", db::random_secret(32))
}

/// Resolves an `Authorization` header value (`Bearer ilt_…`) to a user.
pub async fn authenticate(db: &Db, authorization: Option<&str>) -> ApiResult<User> {
    let token = authorization
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| t.starts_with(TOKEN_PREFIX))
        .ok_or(ApiError::Unauthorized)?;
    let hash = hash_token(token);
    let row: Option<(String, String, String, Option<i64>)> = sqlx::query_as(
        "SELECT u.id, u.name, u.role, t.last_used_at FROM api_tokens t \
         JOIN users u ON u.id = t.user_id WHERE t.token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(db)
    .await?;
    let (id, name, role, last_used) = row.ok_or(ApiError::Unauthorized)?;
    let role = Role::parse(&role)
        .ok_or_else(|| anyhow::anyhow!("user {name} has an unknown role {role:?}"))?;
    let now = db::now_ms();
    // Record use at most once a minute: keeps the hot path (ssh) free of writes.
    if last_used.is_none_or(|t| now - t > 60_000) {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE token_hash = $2")
            .bind(now)
            .bind(&hash)
            .execute(db)
            .await?;
    }
    Ok(User { id, name, role })
}

fn valid_user_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Finds a user by name.
pub async fn find_user(db: &Db, name: &str) -> ApiResult<Option<User>> {
    let row: Option<(String, String, String)> =
        sqlx::query_as("SELECT id, name, role FROM users WHERE name = $1")
            .bind(name)
            .fetch_optional(db)
            .await?;
    Ok(row.and_then(|(id, name, role)| Role::parse(&role).map(|role| User { id, name, role })))
}

/// Creates a user and a first API token for them; returns both.
pub async fn create_user(db: &Db, name: &str, role: Role) -> ApiResult<(User, String)> {
    if !valid_user_name(name) {
        return Err(ApiError::BadRequest(format!(
            "name: {name:?} is not a user name (1–40 characters of a-z, 0-9, - and _)"
        )));
    }
    if find_user(db, name).await?.is_some() {
        return Err(ApiError::Conflict(format!("user {name} already exists")));
    }
    let user = User {
        id: db::random_id(12),
        name: name.to_string(),
        role,
    };
    let token = new_api_token();
    let now = db::now_ms();
    let mut tx = db.begin().await?;
    sqlx::query("INSERT INTO users (id, name, role, created_at) VALUES ($1, $2, $3, $4)")
        .bind(&user.id)
        .bind(&user.name)
        .bind(role.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(hash_token(&token))
    .bind(&user.id)
    .bind("initial")
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((user, token))
}

async fn add_token(db: &Db, user: &User, token: &str, name: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO api_tokens (token_hash, user_id, name, created_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (token_hash) DO NOTHING",
    )
    .bind(hash_token(token))
    .bind(&user.id)
    .bind(name)
    .bind(db::now_ms())
    .execute(db)
    .await
    .with_context(|| format!("failed to store an API token for {}", user.name))?;
    Ok(())
}

/// Ensures the `admin` user exists and `token_file` holds a working token for it; returns the
/// token.
pub async fn bootstrap_admin(db: &Db, token_file: &Path) -> anyhow::Result<String> {
    let admin = match find_user(db, ADMIN_NAME).await.map_err(api_to_anyhow)? {
        Some(u) => u,
        None => {
            let (_admin, token) = create_user(db, ADMIN_NAME, Role::Admin)
                .await
                .map_err(api_to_anyhow)?;
            write_secret_file(token_file, &token)?;
            tracing::info!(file = %token_file.display(), "created the admin user and its token");
            return Ok(token);
        }
    };
    if let Some(existing) = read_secret_file(token_file)?
        && existing.starts_with(TOKEN_PREFIX)
    {
        // Re-register in case the database was replaced; a no-op otherwise.
        add_token(db, &admin, &existing, "admin-token file").await?;
        return Ok(existing);
    }
    let token = new_api_token();
    add_token(db, &admin, &token, "admin-token file").await?;
    write_secret_file(token_file, &token)?;
    tracing::info!(file = %token_file.display(), "minted a new admin token");
    Ok(token)
}

fn api_to_anyhow(e: ApiError) -> anyhow::Error {
    match e {
        ApiError::Internal(e) => e,
        other => anyhow::anyhow!("{other}"),
    }
}

/// Reads a one-line secret file; `None` when it does not exist.
pub fn read_secret_file(path: &Path) -> anyhow::Result<Option<String>> {
    match fs_err::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes a secret file with mode 600 (atomically: temp file + rename).
pub fn write_secret_file(path: &Path, secret: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("failed to chmod {}", tmp.display()))?;
        writeln!(f, "{secret}").with_context(|| format!("failed to write {}", tmp.display()))?;
    }
    fs_err::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_token_survives_restart_and_file_loss() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tdb = db::testing::TestDatabase::new(dir.path()).await;
        let db = db::open(&tdb.database).await.expect("db");
        let file = dir.path().join("admin-token");
        let t1 = bootstrap_admin(&db, &file).await.expect("first");
        assert!(t1.starts_with("ilt_") && t1.len() == 36);
        let mode = fs_err::metadata(&file).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let t2 = bootstrap_admin(&db, &file).await.expect("second");
        assert_eq!(t1, t2, "the token file is re-used");
        fs_err::remove_file(&file).expect("rm");
        let t3 = bootstrap_admin(&db, &file).await.expect("third");
        assert_ne!(t3, t1, "a new token is minted when the file is gone");
        for t in [&t1, &t3] {
            let u = authenticate(&db, Some(&format!("Bearer {t}")))
                .await
                .expect("auth");
            assert_eq!(u.name, "admin");
            assert!(u.is_admin());
        }
    }

    #[tokio::test]
    async fn rejects_bad_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tdb = db::testing::TestDatabase::new(dir.path()).await;
        let db = db::open(&tdb.database).await.expect("db");
        for h in [
            None,
            Some("Bearer"),
            Some("Bearer ilt_nope"),
            Some("Basic abc"),
        ] {
            assert!(
                matches!(authenticate(&db, h).await, Err(ApiError::Unauthorized)),
                "{h:?}"
            );
        }
        let (u, t) = create_user(&db, "alice", Role::User).await.expect("create");
        assert_eq!(u.role, Role::User);
        let got = authenticate(&db, Some(&format!("Bearer {t}")))
            .await
            .expect("auth");
        assert_eq!(got, u);
        assert!(matches!(
            create_user(&db, "alice", Role::User).await,
            Err(ApiError::Conflict(_))
        ));
        assert!(matches!(
            create_user(&db, "Bad Name", Role::User).await,
            Err(ApiError::BadRequest(_))
        ));
    }
}
