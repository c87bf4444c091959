//! Static assets: the site stylesheet (always there) and the esbuild output of `web/`
//! (embedded by `build.rs` when `npm run build` ran before `cargo build`).

use axum::extract::Path;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// The site stylesheet, served as `/assets/site.css`.
const SITE_CSS: &str = include_str!("../../templates/site.css");

/// The embedded file `name`: contents and ETag.
fn find(name: &str) -> Option<(&'static [u8], &'static str)> {
    if name == "site.css" {
        return Some((SITE_CSS.as_bytes(), "\"site-css\""));
    }
    generated::FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, data, etag)| (*data, *etag))
}

/// Whether the esbuild output was embedded (the terminal island exists).
pub fn scripts_built() -> bool {
    find("terminal.js").is_some()
}

/// URL of an asset with a cache-busting version, or an empty string when it is not built.
pub fn url(name: &str) -> String {
    match find(name) {
        Some((_, etag)) => format!("/assets/{name}?v={}", etag.trim_matches('"')),
        None => String::new(),
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

/// `GET /assets/{name}`.
pub async fn serve(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some((data, etag)) = find(&name) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no asset {name}; the web scripts may not be built (npm run build in web/)"),
        )
            .into_response();
    };
    let cache = [
        (header::ETAG, etag),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return (StatusCode::NOT_MODIFIED, cache).into_response();
    }
    ([(header::CONTENT_TYPE, content_type(&name))], cache, data).into_response()
}
