//! Browser sessions, CSRF tokens and the same-origin check.
//!
//! A session is a random id (32 URL-safe characters) in the `ironlab_session` cookie
//! (`HttpOnly; SameSite=Lax; Path=/`, plus `Secure` when the request came over HTTPS); the
//! database keeps only its SHA-256, the user, a per-session CSRF token and the expiry.
//!
//! Every state-changing request authenticated by the cookie must carry the session's CSRF token
//! (a `csrf` form field, or the `X-CSRF-Token` header for `fetch`) and come from this origin
//! (`Origin`, else `Referer`, names the `Host` the request was sent to). Bearer-token API calls
//! are not cookie-based and skip both checks.

use std::time::Duration;

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};

use crate::Ctx;
use crate::auth::{self, Role, User};
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};

/// Name of the session cookie.
pub const COOKIE: &str = "ironlab_session";

/// Header that carries the CSRF token on `fetch` requests.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// How long a browser session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A signed-in browser session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who is signed in.
    pub user: User,
    /// The CSRF token every state-changing request of this session must carry.
    pub csrf: String,
    /// When the session ends (ms since the epoch).
    pub expires_at: i64,
}

/// Starts a session for `user`; returns the cookie value (the only copy of the session id).
pub async fn create(db: &Db, user: &User) -> ApiResult<(String, Session)> {
    let id = db::random_secret(32);
    let csrf = db::random_secret(32);
    let now = db::now_ms();
    let expires_at = now + SESSION_TTL.as_millis() as i64;
    sqlx::query(
        "INSERT INTO web_sessions (id_hash, user_id, csrf_token, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(auth::hash_token(&id))
    .bind(&user.id)
    .bind(&csrf)
    .bind(now)
    .bind(expires_at)
    .execute(db)
    .await?;
    tracing::info!(user = %user.name, "browser session started");
    Ok((
        id,
        Session {
            user: user.clone(),
            csrf,
            expires_at,
        },
    ))
}

/// The live session a cookie value names, if any.
pub async fn lookup(db: &Db, id: &str) -> ApiResult<Option<Session>> {
    if id.is_empty() || id.len() > 64 {
        return Ok(None);
    }
    let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
        "SELECT u.id, u.name, u.role, s.csrf_token, s.expires_at FROM web_sessions s \
         JOIN users u ON u.id = s.user_id WHERE s.id_hash = $1 AND s.expires_at > $2",
    )
    .bind(auth::hash_token(id))
    .bind(db::now_ms())
    .fetch_optional(db)
    .await?;
    Ok(row.and_then(|(id, name, role, csrf, expires_at)| {
        let role = match role.as_str() {
            "admin" => Role::Admin,
            "user" => Role::User,
            _ => return None,
        };
        Some(Session {
            user: User { id, name, role },
            csrf,
            expires_at,
        })
    }))
}

/// Ends the session a cookie value names (no-op when there is none).
pub async fn delete(db: &Db, id: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM web_sessions WHERE id_hash = $1")
        .bind(auth::hash_token(id))
        .execute(db)
        .await?;
    Ok(())
}

/// Removes expired sessions; returns how many.
pub async fn purge_expired(db: &Db) -> ApiResult<u64> {
    let r = sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
        .bind(db::now_ms())
        .execute(db)
        .await?;
    Ok(r.rows_affected())
}

/// The session cookie's value in a request, if present.
pub fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_string())
}

/// Whether the request reached us over HTTPS (directly or through a proxy that says so).
pub fn request_is_https(headers: &HeaderMap) -> bool {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    get("x-forwarded-proto").is_some_and(|p| p.split(',').next().map(str::trim) == Some("https"))
        || get("forwarded").is_some_and(|f| f.contains("proto=https"))
        || get("origin").is_some_and(|o| o.starts_with("https://"))
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &str, secure: bool) -> HeaderValue {
    let max_age = SESSION_TTL.as_secs();
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Lax; Path=/; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("ironlab_session=; Path=/; Max-Age=0"))
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie(secure: bool) -> HeaderValue {
    if secure {
        HeaderValue::from_static(
            "ironlab_session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0; Secure",
        )
    } else {
        HeaderValue::from_static("ironlab_session=; HttpOnly; SameSite=Lax; Path=/; Max-Age=0")
    }
}

/// `scheme://host[:port]` → `host[:port]`, lower-cased.
fn authority_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
}

/// Checks that a cookie-authenticated, state-changing request comes from this site: its
/// `Origin` (or, when a browser sent none, its `Referer`) names the `Host` it was sent to.
pub fn check_same_origin(headers: &HeaderMap) -> ApiResult<()> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase)
        .ok_or_else(|| ApiError::Forbidden("the request has no Host header".into()))?;
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match source {
        Some(s) if authority_of(s).as_deref() == Some(host.as_str()) => Ok(()),
        Some(s) => Err(ApiError::Forbidden(format!(
            "cross-site request refused: it comes from {s}, not from {host}"
        ))),
        None => Err(ApiError::Forbidden(
            "request refused: a browser request must carry an Origin or Referer header".into(),
        )),
    }
}

/// Compares two tokens in time independent of where they differ.
pub fn tokens_match(expected: &str, got: &str) -> bool {
    let (a, b) = (expected.as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks the CSRF token and the origin of a state-changing request of `session`.
pub fn check_csrf(session: &Session, headers: &HeaderMap, token: Option<&str>) -> ApiResult<()> {
    check_same_origin(headers)?;
    match token {
        Some(t) if tokens_match(&session.csrf, t) => Ok(()),
        Some(_) => Err(ApiError::Forbidden(
            "the CSRF token does not match this session; reload the page and try again".into(),
        )),
        None => Err(ApiError::Forbidden(
            "the CSRF token is missing; reload the page and try again".into(),
        )),
    }
}

/// Whether a method changes state (and so needs the CSRF checks).
pub fn is_state_changing(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Authenticates an API request that has no `Authorization` header by its session cookie;
/// state-changing requests must carry `X-CSRF-Token` and come from this origin.
pub async fn authenticate_api(ctx: &Ctx, parts: &Parts) -> ApiResult<User> {
    let id = cookie_value(&parts.headers).ok_or(ApiError::Unauthorized)?;
    let session = lookup(&ctx.db, &id).await?.ok_or(ApiError::Unauthorized)?;
    if is_state_changing(&parts.method) {
        let token = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        check_csrf(&session, &parts.headers, token)?;
    }
    Ok(session.user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        let h = headers(&[("cookie", "a=1; ironlab_session=abc; b=2")]);
        assert_eq!(cookie_value(&h).as_deref(), Some("abc"));
        assert_eq!(cookie_value(&headers(&[("cookie", "a=1")])), None);
    }

    #[test]
    fn same_origin_needs_a_matching_origin_or_referer() {
        let ok = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert!(check_same_origin(&ok).is_ok());
        let referer = headers(&[
            ("host", "127.0.0.1:8080"),
            ("referer", "http://127.0.0.1:8080/runs/x"),
        ]);
        assert!(check_same_origin(&referer).is_ok());
        let evil = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://evil.test")]);
        assert!(matches!(
            check_same_origin(&evil),
            Err(ApiError::Forbidden(_))
        ));
        let other_port = headers(&[("host", "127.0.0.1:8080"), ("origin", "http://127.0.0.1:9")]);
        assert!(check_same_origin(&other_port).is_err());
        assert!(check_same_origin(&headers(&[("host", "127.0.0.1:8080")])).is_err());
    }

    #[test]
    fn cookie_attributes() {
        let c = set_cookie("abc", false);
        let c = c.to_str().expect("ascii");
        assert!(c.starts_with("ironlab_session=abc;"));
        for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
            assert!(c.contains(attr), "{c} lacks {attr}");
        }
        assert!(!c.contains("Secure"));
        assert!(
            set_cookie("abc", true)
                .to_str()
                .is_ok_and(|c| c.ends_with("; Secure"))
        );
        assert!(request_is_https(&headers(&[(
            "x-forwarded-proto",
            "https"
        )])));
        assert!(!request_is_https(&headers(&[(
            "origin",
            "http://127.0.0.1"
        )])));
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abc", "abd"));
        assert!(!tokens_match("abc", "abcd"));
    }
}
