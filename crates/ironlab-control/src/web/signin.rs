//! Signing in: every way to prove who you are sits behind [`SignIn`], so OAuth/OIDC providers
//! can be added next to the local ones without touching the pages or sessions.
//!
//! - [`Password`]: local accounts with an Argon2id password hash (`users.password_hash`),
//!   created by an admin on `/admin/users`.
//! - [`AdminLink`]: a one-time link `…/login/admin?key=K` that `ironlab up` prints; the key is
//!   stored hashed in `login_keys`, lives [`ADMIN_LINK_TTL`], and is deleted when used.

use std::collections::HashMap;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use futures::future::BoxFuture;

use crate::auth::{self, User};
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};

/// How long an admin sign-in link works (it also stops working once used).
pub const ADMIN_LINK_TTL: Duration = Duration::from_secs(24 * 3600);

/// Shortest accepted password.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// What a sign-in form or callback submitted (form fields and query parameters).
#[derive(Debug, Default, Clone)]
pub struct SignInInput {
    /// Field name → value.
    pub fields: HashMap<String, String>,
}

impl SignInInput {
    fn get(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

/// Why a sign-in failed.
#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    /// Unknown user or wrong password (deliberately not saying which).
    #[error("wrong user name or password")]
    BadCredentials,
    /// The sign-in link is unknown, used or expired.
    #[error(
        "this sign-in link is unknown, already used or expired; restart `ironlab up` for a new one"
    )]
    BadLink,
    /// Storage failed.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// One way to sign in. Implementations check the submitted input and name the user.
pub trait SignIn: Send + Sync {
    /// Short name used in logs (`password`, `admin-link`, later `oidc:NAME`).
    fn method(&self) -> &'static str;

    /// Checks `input`; on success returns the user to start a session for.
    fn sign_in<'a>(
        &'a self,
        db: &'a Db,
        input: &'a SignInInput,
    ) -> BoxFuture<'a, Result<User, SignInError>>;
}

/// Local accounts: user name + password.
pub struct Password;

impl SignIn for Password {
    fn method(&self) -> &'static str {
        "password"
    }

    fn sign_in<'a>(
        &'a self,
        db: &'a Db,
        input: &'a SignInInput,
    ) -> BoxFuture<'a, Result<User, SignInError>> {
        Box::pin(async move {
            let name = input.get("name").trim().to_string();
            let password = input.get("password").to_string();
            let row: Option<(Option<String>,)> =
                sqlx::query_as("SELECT password_hash FROM users WHERE name = $1")
                    .bind(&name)
                    .fetch_optional(db)
                    .await
                    .map_err(ApiError::from)?;
            let stored = row.and_then(|(h,)| h);
            if !verify_password(password, stored).await? {
                return Err(SignInError::BadCredentials);
            }
            auth::find_user(db, &name)
                .await?
                .ok_or(SignInError::BadCredentials)
        })
    }
}

/// The one-time admin link.
pub struct AdminLink;

impl SignIn for AdminLink {
    fn method(&self) -> &'static str {
        "admin-link"
    }

    fn sign_in<'a>(
        &'a self,
        db: &'a Db,
        input: &'a SignInInput,
    ) -> BoxFuture<'a, Result<User, SignInError>> {
        Box::pin(async move {
            let key = input.get("key");
            if key.is_empty() || key.len() > 100 {
                return Err(SignInError::BadLink);
            }
            // Delete-and-return makes the key single-use even under concurrent requests.
            let user_id: Option<String> = sqlx::query_scalar(
                "DELETE FROM login_keys WHERE key_hash = $1 AND expires_at > $2 RETURNING user_id",
            )
            .bind(auth::hash_token(key))
            .bind(db::now_ms())
            .fetch_optional(db)
            .await
            .map_err(ApiError::from)?;
            let user_id = user_id.ok_or(SignInError::BadLink)?;
            let name: Option<String> = sqlx::query_scalar("SELECT name FROM users WHERE id = $1")
                .bind(&user_id)
                .fetch_optional(db)
                .await
                .map_err(ApiError::from)?;
            let name = name.ok_or(SignInError::BadLink)?;
            auth::find_user(db, &name)
                .await?
                .ok_or(SignInError::BadLink)
        })
    }
}

/// Mints a one-time sign-in key for the admin user; returns the key (only its hash is kept).
pub async fn create_admin_key(db: &Db) -> anyhow::Result<String> {
    let admin = auth::find_user(db, auth::ADMIN_NAME)
        .await
        .map_err(|e| anyhow::anyhow!("cannot look up the admin user: {e}"))?
        .ok_or_else(|| anyhow::anyhow!("the admin user does not exist yet"))?;
    let key = db::random_secret(40);
    let now = db::now_ms();
    sqlx::query("DELETE FROM login_keys WHERE expires_at <= $1")
        .bind(now)
        .execute(db)
        .await?;
    sqlx::query(
        "INSERT INTO login_keys (key_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(auth::hash_token(&key))
    .bind(&admin.id)
    .bind(now)
    .bind(now + ADMIN_LINK_TTL.as_millis() as i64)
    .execute(db)
    .await?;
    Ok(key)
}

/// Argon2id hash (PHC string) of a password; CPU-heavy, so it runs off the async threads.
pub async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| ApiError::Internal(anyhow::anyhow!("cannot hash a password: {e}")))
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("password hashing task failed: {e}")))?
}

/// Checks `password` against a stored hash. Without one (unknown user, no password set) it
/// still spends the time of a hash, so timing does not tell which user names exist.
async fn verify_password(password: String, hash: Option<String>) -> ApiResult<bool> {
    tokio::task::spawn_blocking(move || match hash.as_deref().map(PasswordHash::new) {
        Some(Ok(parsed)) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Some(Err(_)) | None => {
            let salt = SaltString::generate(&mut OsRng);
            let _ = Argon2::default().hash_password(password.as_bytes(), &salt);
            false
        }
    })
    .await
    .map_err(|e| ApiError::Internal(anyhow::anyhow!("password check task failed: {e}")))
}

/// Checks a new password against the rules; the message names the field.
pub fn check_new_password(password: &str) -> ApiResult<()> {
    let n = password.chars().count();
    if !(MIN_PASSWORD_CHARS..=200).contains(&n) {
        return Err(ApiError::BadRequest(format!(
            "password: must be {MIN_PASSWORD_CHARS}–200 characters"
        )));
    }
    Ok(())
}

/// Sets (or replaces) a user's password.
pub async fn set_password(db: &Db, user: &User, password: &str) -> ApiResult<()> {
    check_new_password(password)?;
    let hash = hash_password(password.to_string()).await?;
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(&user.id)
        .execute(db)
        .await?;
    Ok(())
}

/// Whether a user has a password (can sign in with [`Password`]).
pub async fn has_password(db: &Db, user: &User) -> ApiResult<bool> {
    let h: Option<Option<String>> =
        sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
            .bind(&user.id)
            .fetch_optional(db)
            .await?;
    Ok(h.flatten().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn input(pairs: &[(&str, &str)]) -> SignInInput {
        SignInInput {
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[tokio::test]
    async fn password_sign_in() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tdb = db::testing::TestDatabase::new(dir.path()).await;
        let db = db::open(&tdb.database).await.expect("db");
        let (alice, _) = auth::create_user(&db, "alice", Role::User)
            .await
            .expect("create");
        // No password yet: cannot sign in.
        let r = Password
            .sign_in(&db, &input(&[("name", "alice"), ("password", "")]))
            .await;
        assert!(matches!(r, Err(SignInError::BadCredentials)));
        assert!(set_password(&db, &alice, "short").await.is_err());
        set_password(&db, &alice, "correct horse")
            .await
            .expect("set");
        assert!(has_password(&db, &alice).await.expect("has"));
        let u = Password
            .sign_in(
                &db,
                &input(&[("name", "alice"), ("password", "correct horse")]),
            )
            .await
            .expect("signs in");
        assert_eq!(u, alice);
        for (n, p) in [("alice", "wrong horse"), ("bob", "correct horse")] {
            let r = Password
                .sign_in(&db, &input(&[("name", n), ("password", p)]))
                .await;
            assert!(matches!(r, Err(SignInError::BadCredentials)), "{n}/{p}");
        }
    }

    #[tokio::test]
    async fn admin_link_is_single_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tdb = db::testing::TestDatabase::new(dir.path()).await;
        let db = db::open(&tdb.database).await.expect("db");
        auth::bootstrap_admin(&db, &dir.path().join("admin-token"))
            .await
            .expect("admin");
        let key = create_admin_key(&db).await.expect("key");
        let u = AdminLink
            .sign_in(&db, &input(&[("key", &key)]))
            .await
            .expect("first use");
        assert!(u.is_admin());
        let again = AdminLink.sign_in(&db, &input(&[("key", &key)])).await;
        assert!(matches!(again, Err(SignInError::BadLink)));
        let bogus = AdminLink.sign_in(&db, &input(&[("key", "nope")])).await;
        assert!(matches!(bogus, Err(SignInError::BadLink)));
    }
}
