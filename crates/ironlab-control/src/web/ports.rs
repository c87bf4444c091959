//! http-port tabs: the control plane serves a machine's HTTP port to the run's owner, at the
//! root of a host of its own, `{run}-{port}-{machine}.{domain}`.
//!
//! Why a host per port: many web apps only work at `/` (absolute links, redirects, assets), and
//! a page served from a machine must not run in the control plane's origin (it could read the
//! CSRF token and act as the user). A separate host is a separate origin, and the session
//! cookie (host-only) never reaches it. With the control plane at `127.0.0.1:8080` or
//! `localhost:8080` the port hosts are `*.localhost:8080`, which browsers resolve to loopback
//! by themselves; behind a domain `lab.example.com` they are `*.lab.example.com` (wildcard
//! DNS and certificate needed).
//!
//! Who talks to whom:
//! 1. The run page's tab (`GET /runs/{id}/ports/{machine}/{port}`, session) or the API
//!    (`POST /api/v1/runs/{id}/http-ports`, bearer or session) checks that the caller may use
//!    the run (owner or admin, run running, machine exists) and issues a single-use key
//!    ([`KEY_TTL`]) for that (user, run, machine, port): a link to the port host's
//!    [`LOGIN_PATH`].
//! 2. [`route_port_hosts`] (a middleware in front of every route) sends each request whose Host
//!    is a port host here. The login path trades the key for a port session: a random id in the
//!    host-only cookie [`PORT_COOKIE`], kept in memory ([`PortAuth`]) for [`SESSION_TTL`].
//! 3. Every other request on a port host needs that cookie; it then gets a fresh port token
//!    (`runs::connect`, which re-checks the run), opens the worker's port WebSocket
//!    ([`crate::portfwd`]) and speaks HTTP/1.1 over it (hyper's client on an in-memory duplex
//!    pipe). Responses stream back; WebSocket (and other) upgrades are passed through as
//!    bytes both ways.
//!
//! Port sessions live in memory: a control-plane restart asks the user to open the tab again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::Utc;
use hyper_util::rt::TokioIo;
use ironlab_api::v1::HttpPortLink;

use crate::Ctx;
use crate::auth::User;
use crate::error::{ApiError, ApiResult};
use crate::portfwd::{self, PortError};
use crate::runs;

/// The cookie holding a port session (set on the port host only).
pub const PORT_COOKIE: &str = "ironlab_port";
/// The port host's path that trades a key for a port session.
pub const LOGIN_PATH: &str = "/.ironlab/login";
/// How long a sign-in link works.
pub const KEY_TTL: Duration = Duration::from_secs(60);
/// How long a port session lasts (it also ends with the run).
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Environment variable naming the domain port hosts live under (`ports.lab.example.com`,
/// optionally with `:PORT`); unset = derived from the request's host (see [`port_origin`]).
pub const PORTS_DOMAIN_ENV: &str = "IRONLAB_PORTS_DOMAIN";
/// Buffer of the in-memory pipe between hyper and the WebSocket.
const PIPE_BUFFER: usize = 64 * 1024;

/// What a port host serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHost {
    /// Run id (12 characters `[a-z0-9]`).
    pub run: String,
    /// TCP port inside the machine.
    pub port: u16,
    /// Machine name.
    pub machine: String,
}

impl PortHost {
    /// The first DNS label of its host: `{run}-{port}-{machine}` (at most 12+1+5+1+30 = 49
    /// characters, within the 63 a label may have).
    pub fn label(&self) -> String {
        format!("{}-{}-{}", self.run, self.port, self.machine)
    }

    /// Parses a `Host` header value (`abcdefghijkl-8080-web.localhost:8080`); `None` when it
    /// is not a port host.
    pub fn parse(host: &str) -> Option<PortHost> {
        let (label, rest) = host.split_once('.')?;
        if rest.is_empty() {
            return None;
        }
        let (run, rest) = label.split_once('-')?;
        let (port, machine) = rest.split_once('-')?;
        let run_ok = run.len() == 12
            && run
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let machine_ok = (1..=30).contains(&machine.len())
            && machine
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && port.bytes().all(|b| b.is_ascii_digit()))?;
        (run_ok && machine_ok).then(|| PortHost {
            run: run.to_string(),
            port,
            machine: machine.to_string(),
        })
    }
}

/// The port host URL for `target`. With `ports_domain` (from [`PORTS_DOMAIN_ENV`]):
/// `{label}.{ports_domain}`, keeping the request's port unless the setting names one.
/// Without: under the host the request reached the control plane at — an IP address or
/// `localhost` becomes `localhost` (browsers resolve `*.localhost` to loopback), a name
/// `lab.example.com` becomes `{label}.lab.example.com`, and the port is kept.
pub fn port_origin(
    request_host: &str,
    https: bool,
    target: &PortHost,
    ports_domain: Option<&str>,
) -> String {
    let (name, port) = split_host_port(request_host);
    let scheme = if https { "https" } else { "http" };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    if let Some(d) = ports_domain
        .map(|d| d.trim_matches('.'))
        .filter(|d| !d.is_empty())
    {
        let port = if split_host_port(d).1.is_some() {
            ""
        } else {
            port.as_str()
        };
        return format!("{scheme}://{}.{d}{port}", target.label());
    }
    let bracketless = name.trim_start_matches('[').trim_end_matches(']');
    let domain = if bracketless.parse::<IpAddr>().is_ok() || name == "localhost" {
        "localhost"
    } else {
        name
    };
    format!("{scheme}://{}.{domain}{port}", target.label())
}

fn split_host_port(host: &str) -> (&str, Option<&str>) {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return match rest.split_once(']') {
            Some((addr, tail)) => (
                &host[..addr.len() + 2],
                tail.strip_prefix(':').filter(|p| !p.is_empty()),
            ),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty() => {
            (name, Some(port))
        }
        _ => (host, None),
    }
}

/// A key or a session: who, for which port host, until when.
#[derive(Debug, Clone)]
struct Grant {
    user: User,
    target: PortHost,
    expires: Instant,
}

/// Sign-in keys and port sessions (in memory).
#[derive(Debug, Default)]
pub struct PortAuth {
    keys: Mutex<HashMap<String, Grant>>,
    sessions: Mutex<HashMap<String, Grant>>,
}

/// Why a port-host request is not let through.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No (live) session: sign in through the run page.
    NoSession,
    /// A session of another port host.
    OtherHost,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PortAuth {
    fn insert(
        map: &Mutex<HashMap<String, Grant>>,
        user: &User,
        target: &PortHost,
        ttl: Duration,
    ) -> String {
        let id = crate::db::random_secret(32);
        let now = Instant::now();
        let mut m = lock(map);
        m.retain(|_, g| g.expires > now);
        m.insert(
            id.clone(),
            Grant {
                user: user.clone(),
                target: target.clone(),
                expires: now + ttl,
            },
        );
        id
    }

    /// A single-use sign-in key for `target`, valid for [`KEY_TTL`].
    pub fn issue_key(&self, user: &User, target: &PortHost) -> String {
        Self::insert(&self.keys, user, target, KEY_TTL)
    }

    /// Uses up `key` (whatever the outcome); its user when it is live and for `target`.
    pub fn redeem_key(&self, key: &str, target: &PortHost) -> Option<User> {
        let g = lock(&self.keys).remove(key)?;
        (g.expires > Instant::now() && g.target == *target).then_some(g.user)
    }

    /// A new port session for `target`; returns its id (the cookie value).
    pub fn start_session(&self, user: &User, target: &PortHost) -> String {
        Self::insert(&self.sessions, user, target, SESSION_TTL)
    }

    /// The user of session `id` on `target`.
    pub fn session(&self, id: &str, target: &PortHost) -> Result<User, Denied> {
        let m = lock(&self.sessions);
        let g = m
            .get(id)
            .filter(|g| g.expires > Instant::now())
            .ok_or(Denied::NoSession)?;
        if g.target != *target {
            return Err(Denied::OtherHost);
        }
        Ok(g.user.clone())
    }
}

/// Checks that `user` may use `machine` of run `id` and issues a sign-in link for its `port`,
/// under the host the request came in at.
pub async fn open_link(
    ctx: &Ctx,
    user: &User,
    id: &str,
    machine: Option<String>,
    port: u16,
    headers: &HeaderMap,
) -> ApiResult<HttpPortLink> {
    if port == 0 {
        return Err(ApiError::BadRequest("port: 0 is not a TCP port".into()));
    }
    let (run, machine) = runs::running_machine(ctx, user, id, machine).await?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| ApiError::BadRequest("the request has no Host header".into()))?;
    let target = PortHost {
        run: run.id,
        port,
        machine: machine.clone(),
    };
    let key = ctx.web.ports.issue_key(user, &target);
    let ports_domain = std::env::var(PORTS_DOMAIN_ENV).ok();
    let origin = port_origin(
        host,
        crate::web::session::request_is_https(headers),
        &target,
        ports_domain.as_deref(),
    );
    Ok(HttpPortLink {
        url: format!("{origin}{LOGIN_PATH}?key={key}"),
        machine,
        port,
        expires_at: Utc::now()
            + chrono::Duration::from_std(KEY_TTL).unwrap_or(chrono::Duration::seconds(60)),
    })
}

/// Middleware in front of every route: requests for a port host are served here, all others
/// go on to the control plane's own routes.
pub async fn route_port_hosts(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let target = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(PortHost::parse);
    match target {
        Some(target) => serve_port_host(ctx, target, req).await,
        None => next.run(req).await,
    }
}

/// A small HTML page for the browser (the port host has no templates or assets of its own).
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Html(format!(
            "<!doctype html><meta charset=utf-8><title>{0}</title>\
             <body style=\"font-family:system-ui,sans-serif;margin:3rem\"><h1>{0}</h1><p>{1}</p>",
            esc(title),
            esc(text)
        )),
    )
        .into_response()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
}

async fn serve_port_host(ctx: Ctx, target: PortHost, req: Request) -> Response {
    let what = format!("port {} of machine {}", target.port, target.machine);
    if req.uri().path() == LOGIN_PATH {
        let key = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "key")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        let Some(user) = ctx.web.ports.redeem_key(&key, &target) else {
            return page(
                StatusCode::FORBIDDEN,
                "This link has expired",
                &format!(
                    "Sign-in links to {what} work once, within a minute. Open the tab again from the run page."
                ),
            );
        };
        let id = ctx.web.ports.start_session(&user, &target);
        let secure = if crate::web::session::request_is_https(req.headers()) {
            "; Secure"
        } else {
            ""
        };
        let set = format!(
            "{PORT_COOKIE}={id}; HttpOnly; SameSite=Lax; Path=/; Max-Age={}{secure}",
            SESSION_TTL.as_secs()
        );
        let mut resp = Redirect::to("/").into_response();
        if let Ok(v) = HeaderValue::from_str(&set) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    let user = match cookie(req.headers(), PORT_COOKIE)
        .ok_or(Denied::NoSession)
        .and_then(|id| ctx.web.ports.session(&id, &target))
    {
        Ok(u) => u,
        Err(Denied::NoSession) => {
            return page(
                StatusCode::UNAUTHORIZED,
                "Sign in through the run page",
                &format!(
                    "{what} of run {} is served only to the run's owner: open its tab on the run page.",
                    target.run
                ),
            );
        }
        Err(Denied::OtherHost) => {
            return page(
                StatusCode::FORBIDDEN,
                "Not for this port",
                "This browser session was opened for another port.",
            );
        }
    };
    match proxy(&ctx, &user, &target, req).await {
        Ok(r) => r,
        Err(e) => e,
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies end-to-end headers; with `upgrade`, keeps `Connection: upgrade` and `Upgrade`.
fn forward_headers(from: &HeaderMap, upgrade: bool) -> HeaderMap {
    let named_in_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || (n == "upgrade" && !upgrade)
            || (named_in_connection.iter().any(|c| c == n) && n != "upgrade")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    out
}

/// The request's cookies without ours.
fn strip_port_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split('=').next() != Some(PORT_COOKIE))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

async fn proxy(
    ctx: &Ctx,
    user: &User,
    target: &PortHost,
    req: Request,
) -> Result<Response, Response> {
    let what = format!("port {} of machine {}", target.port, target.machine);
    let conn = runs::connect(
        ctx,
        user,
        &target.run,
        Some(target.machine.clone()),
        Some(target.port),
    )
    .await
    .map_err(|e| match e {
        ApiError::NotFound(m) => page(StatusCode::NOT_FOUND, "Not found", &m),
        ApiError::Conflict(m) => page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The run is not running",
            &m,
        ),
        other => {
            tracing::warn!(error = %other, "http-port: no port token");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again in a moment",
                "The machine's host cannot be reached right now.",
            )
        }
    })?;
    let ws = portfwd::open(&conn.url).await.map_err(|e| match e {
        PortError::Refused {
            status: 502,
            detail,
        } => page(
            StatusCode::BAD_GATEWAY,
            &format!("Nothing answers on {what}"),
            &format!("{detail}. Start the server in the machine, then reload."),
        ),
        other => {
            tracing::warn!(error = %other, "http-port: cannot open the port WebSocket");
            page(
                StatusCode::BAD_GATEWAY,
                "Cannot reach the machine",
                &other.to_string(),
            )
        }
    })?;

    // hyper speaks HTTP/1.1 into one end of a pipe; the other end is pumped over the WebSocket.
    let (near, far) = tokio::io::duplex(PIPE_BUFFER);
    tokio::spawn(async move {
        let (r, w) = tokio::io::split(far);
        if let Err(e) = portfwd::pump(ws, r, w).await {
            tracing::debug!(error = %e, "http-port connection ended");
        }
    });
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(near))
            .await
            .map_err(|e| {
                page(
                    StatusCode::BAD_GATEWAY,
                    "Cannot reach the machine",
                    &e.to_string(),
                )
            })?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "http-port HTTP connection ended");
        }
    });

    let (mut parts, body) = req.into_parts();
    let upgrade = is_upgrade(&parts.headers);
    let client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let mut headers = forward_headers(&parts.headers, upgrade);
    strip_port_cookie(&mut headers);
    if let Some(host) = parts.headers.get(header::HOST) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host.clone());
    }
    let proto = if crate::web::session::request_is_https(&parts.headers) {
        "https"
    } else {
        "http"
    };
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let mut upstream = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(path)
        .body(body)
        .map_err(|e| page(StatusCode::BAD_REQUEST, "Bad request", &e.to_string()))?;
    *upstream.headers_mut() = headers;

    let mut resp = sender.send_request(upstream).await.map_err(|e| {
        page(
            StatusCode::BAD_GATEWAY,
            &format!("The server on {what} failed"),
            &format!("it closed the connection without a complete answer ({e})"),
        )
    })?;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let Some(client_upgrade) = client_upgrade else {
            return Err(page(
                StatusCode::BAD_GATEWAY,
                "Unexpected upgrade",
                "the server switched protocols without being asked to",
            ));
        };
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client, upstream)) => {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
                Err(e) => tracing::debug!(error = %e, "http-port upgrade failed"),
            }
        });
        let mut out = Response::new(Body::empty());
        *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *out.headers_mut() = forward_headers(resp.headers(), true);
        return Ok(out);
    }

    let (parts, body) = resp.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    *out.headers_mut() = forward_headers(&parts.headers, false);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    fn target() -> PortHost {
        PortHost {
            run: "abcdefghij12".into(),
            port: 8080,
            machine: "web-1".into(),
        }
    }

    #[test]
    fn port_hosts_round_trip_and_other_hosts_are_not_port_hosts() {
        let t = target();
        assert_eq!(t.label(), "abcdefghij12-8080-web-1");
        assert_eq!(
            PortHost::parse("abcdefghij12-8080-web-1.localhost:8080"),
            Some(t.clone())
        );
        assert_eq!(
            PortHost::parse("abcdefghij12-8080-web-1.lab.example.com"),
            Some(t.clone())
        );
        for not in [
            "127.0.0.1:8080",
            "localhost:8080",
            "lab.example.com",
            "abcdefghij12-8080-web-1",
            "abcdefghij12-8080-web-1.",
            "abcdefghij1-8080-web.localhost",
            "ABCDEFGHIJ12-8080-web.localhost",
            "abcdefghij12-0-web.localhost",
            "abcdefghij12-+80-web.localhost",
            "abcdefghij12-70000-web.localhost",
            "abcdefghij12-8080-.localhost",
            "abcdefghij12-8080-Web.localhost",
        ] {
            assert_eq!(PortHost::parse(not), None, "{not}");
        }
    }

    #[test]
    fn port_origins_follow_the_request_host() {
        let t = target();
        let l = "abcdefghij12-8080-web-1";
        assert_eq!(
            port_origin("127.0.0.1:8080", false, &t, None),
            format!("http://{l}.localhost:8080")
        );
        assert_eq!(
            port_origin("localhost:9000", false, &t, None),
            format!("http://{l}.localhost:9000")
        );
        assert_eq!(
            port_origin("[::1]:8080", false, &t, None),
            format!("http://{l}.localhost:8080")
        );
        assert_eq!(
            port_origin("lab.example.com", true, &t, None),
            format!("https://{l}.lab.example.com")
        );
        // A configured domain wins; its own port wins over the request's.
        assert_eq!(
            port_origin("10.0.0.5:8080", false, &t, Some("10.0.0.5.sslip.io")),
            format!("http://{l}.10.0.0.5.sslip.io:8080")
        );
        assert_eq!(
            port_origin("lab.example.com", true, &t, Some(".ports.example.net:8443")),
            format!("https://{l}.ports.example.net:8443")
        );
        // Whatever comes back parses to the same target.
        let host = port_origin("lab.example.com:8443", true, &t, None);
        assert_eq!(
            PortHost::parse(host.trim_start_matches("https://")),
            Some(t)
        );
    }

    #[test]
    fn keys_are_single_use_and_bound_to_their_host() {
        let auth = PortAuth::default();
        let alice = User {
            id: "u1".into(),
            name: "alice".into(),
            role: Role::User,
        };
        let t = target();
        let other = PortHost {
            port: 9090,
            ..target()
        };
        let key = auth.issue_key(&alice, &t);
        assert_eq!(auth.redeem_key(&key, &other), None, "another port's host");
        assert_eq!(auth.redeem_key(&key, &t), None, "used up by the attempt");
        let key = auth.issue_key(&alice, &t);
        assert_eq!(auth.redeem_key(&key, &t), Some(alice.clone()));
        let sid = auth.start_session(&alice, &t);
        assert_eq!(auth.session(&sid, &t), Ok(alice));
        assert_eq!(auth.session(&sid, &other), Err(Denied::OtherHost));
        assert_eq!(auth.session("nope", &t), Err(Denied::NoSession));
    }

    #[test]
    fn hop_by_hop_headers_and_our_cookie_stay_behind() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ironlab_port=secret; b=2"),
        );
        let mut out = forward_headers(&h, false);
        strip_port_cookie(&mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[header::ACCEPT], "text/html");
        assert_eq!(out[header::COOKIE], "a=1; b=2");
        let up = forward_headers(&h, true);
        assert_eq!(up[header::UPGRADE], "websocket");
        assert_eq!(up[header::CONNECTION], "upgrade");
        let mut only_ours = HeaderMap::new();
        only_ours.insert(header::COOKIE, HeaderValue::from_static("ironlab_port=x"));
        strip_port_cookie(&mut only_ours);
        assert!(only_ours.is_empty());
    }
}
