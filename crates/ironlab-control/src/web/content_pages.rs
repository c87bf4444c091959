//! Content pages: `/content` (the catalog with kind/difficulty/text filters), `/content/{name}`
//! (the rendered text, Start or Continue), `POST /content/{name}/start` (a run of the item, then
//! its run page, where the text sits beside the terminals and the checklist), and
//! `/content/{name}/static/vV/…` (the item's `__static__/` files of version V), and
//! `/content/{name}/events` (hot reload: Server-Sent Events `content` with `{version, html}` for
//! every version published while the page is open; the first event carries only the current
//! version).

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use ironlab_api::v1::ContentFilter;
use minijinja::context;
use serde::{Deserialize, Serialize};

use super::pages::{PageSession, base, human_duration, is_active, page};
use super::session::{self, Session};
use super::{PageResult, expiry, render};
use crate::Ctx;
use crate::content::{self, render as md};
use crate::error::ApiError;
use crate::runs;

/// The rendered text of an item version, for a page.
#[derive(Debug, Serialize)]
pub struct ContentText {
    /// Item name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Kind.
    pub kind: String,
    /// Version shown.
    pub version: i64,
    /// Sanitised HTML of `index.md`.
    pub html: String,
    /// The run's owner has solved the item (in this run or before).
    pub solved: bool,
    /// The course lesson shown, `MODULE/LESSON`.
    pub lesson: Option<String>,
}

fn static_base(name: &str, version: i64) -> String {
    format!("/content/{name}/static/v{version}/")
}

/// The text of the item a run serves (the version it was started with), if any.
pub async fn text_of_run(ctx: &Ctx, s: &Session, run: &str) -> Option<ContentText> {
    let (name, version) = content::of_run(&ctx.db, run).await.ok()??;
    let loaded = content::load(ctx, &s.user, &name, Some(version))
        .await
        .ok()?;
    let solved = content::progress_on(&ctx.db, &s.user, &name)
        .await
        .ok()
        .flatten()
        .is_some_and(|p| p.solved_at.is_some());
    let lesson = content::lesson_of_run(&ctx.db, run).await.ok().flatten();
    let body = match lesson.as_deref().and_then(|l| loaded.item.lesson(l)) {
        Some((_, l)) => &l.body,
        None => &loaded.item.body,
    };
    Some(ContentText {
        solved,
        html: md::render(body, &static_base(&name, version)),
        lesson,
        title: loaded.item.front.title.clone(),
        kind: loaded.view.kind.clone(),
        name,
        version,
    })
}

/// `GET /content`.
pub async fn catalog(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Query(filter): Query<ContentFilter>,
) -> PageResult<Response> {
    let items = content::list(&ctx.db, &s.user, &filter).await?;
    Ok(page(render(
        "content_catalog.html",
        context! {
            base => base(&s, "content"), items,
            kind => filter.kind.unwrap_or_default(),
            difficulty => filter.difficulty.unwrap_or_default(),
            q => filter.q.unwrap_or_default(),
        },
    )?))
}

/// `GET /content/{name}`.
pub async fn item(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Path(name): Path<String>,
) -> PageResult<Response> {
    let loaded = content::load(&ctx, &s.user, &name, None).await?;
    let html = md::render(&loaded.item.body, &static_base(&name, loaded.version));
    // The user's newest active run of this item, if any.
    let mut current = None;
    for r in runs::list(&ctx.db, &s.user, false).await? {
        if is_active(r.state)
            && content::of_run(&ctx.db, &r.id)
                .await?
                .is_some_and(|(n, _)| n == name)
        {
            current = Some(r.id);
            break;
        }
    }
    let progress = content::progress_on(&ctx.db, &s.user, &name).await?;
    let solved = progress
        .as_ref()
        .and_then(|p| p.solved_at)
        .map(|at| human_duration(crate::db::now_ms() - at));
    let solved_lessons: Vec<String> = content::progress(&ctx.db, &s.user)
        .await?
        .into_iter()
        .filter(|p| p.solved_at.is_some() && p.name.starts_with(&format!("{name}/")))
        .map(|p| p.name)
        .collect();
    let f = &loaded.item.front;
    // Skill paths: each unit's items with their title and whether the user solved them.
    let mut units = Vec::new();
    for u in &f.units {
        let mut items = Vec::new();
        for it in &u.items {
            let title = content::get(&ctx.db, &s.user, it)
                .await
                .map(|v| v.title)
                .unwrap_or_else(|_| it.clone());
            let done = content::progress_on(&ctx.db, &s.user, it)
                .await?
                .is_some_and(|p| p.solved_at.is_some());
            items.push(context! { name => it, title, solved => done });
        }
        units.push(context! { title => u.title, description => u.description, items });
    }
    let tasks: Vec<_> = f
        .tasks
        .iter()
        .filter(|(_, t)| !t.helper && !t.init)
        .map(|(n, _)| n.clone())
        .collect();
    Ok(page(render(
        "content_item.html",
        context! {
            base => base(&s, "content"),
            item => loaded.view,
            html,
            has_playground => f.playground.is_some(),
            tasks,
            current,
            solved,
            units,
            modules => loaded.item.modules.iter().map(|m| context! {
                title => m.front.title,
                lessons => m.lessons.iter().map(|l| context! {
                    title => l.front.title,
                    module => m.slug,
                    slug => l.slug,
                    solved => solved_lessons.contains(&format!("{name}/{}/{}", m.slug, l.slug)),
                }).collect::<Vec<_>>(),
            }).collect::<Vec<_>>(),
        },
    )?))
}

/// Form of `POST /admin/users/author`.
#[derive(Debug, Deserialize)]
pub struct AuthorForm {
    csrf: Option<String>,
    name: String,
    /// `grant` or `revoke`.
    action: String,
}

/// `POST /admin/users/author`: an admin makes a user a content author, or not.
pub async fn admin_set_author(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Form(form): Form<AuthorForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    content::set_author(&ctx.db, &s.user, &form.name, form.action == "grant").await?;
    Ok(Redirect::to("/admin/users").into_response())
}

/// Form of `POST /content/{name}/start`.
#[derive(Debug, Deserialize)]
pub struct StartForm {
    csrf: Option<String>,
    /// A course lesson, `MODULE/LESSON`.
    #[serde(default)]
    lesson: Option<String>,
}

/// `POST /content/{name}/start`: starts a run of the item (or of a course lesson) and opens
/// its page.
pub async fn start(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<StartForm>,
) -> PageResult<Response> {
    session::check_csrf(&s, &headers, form.csrf.as_deref())?;
    let lesson = form.lesson.filter(|l| !l.is_empty());
    let run = content::start_run(&ctx, &s.user, &name, None, lesson.as_deref()).await?;
    expiry::set_default_expiry(&ctx.db, &run.id).await?;
    Ok(Redirect::to(&format!("/runs/{}", run.id)).into_response())
}

/// Query of a static file.
#[derive(Debug, Deserialize)]
pub struct StaticPath {
    name: String,
    path: String,
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        // SVG can carry scripts: served as a download-only type, never rendered as a document.
        Some("txt" | "md" | "sh" | "yaml" | "yml" | "json" | "conf") => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// `GET /content/{name}/static/v{version}/{path}`: one file of the item's `__static__/`.
pub async fn static_file(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Path(p): Path<StaticPath>,
) -> PageResult<Response> {
    let (version, rest) = p
        .path
        .split_once('/')
        .and_then(|(v, rest)| Some((v.strip_prefix('v')?.parse::<i64>().ok()?, rest)))
        .ok_or_else(|| ApiError::NotFound("no such file".into()))?;
    let loaded = content::load(&ctx, &s.user, &p.name, Some(version)).await?;
    if !loaded.item.statics.iter().any(|x| x == rest) {
        return Err(ApiError::NotFound(format!("{} has no file __static__/{rest}", p.name)).into());
    }
    let tar = ctx
        .content
        .get(&loaded.digest)
        .map_err(ApiError::Internal)?;
    let bundle = ironlab_spec::content::Bundle::from_tar(&tar)
        .map_err(|e| ApiError::Internal(anyhow::anyhow!("{e}")))?;
    let data = bundle
        .files
        .get(&format!("__static__/{rest}"))
        .cloned()
        .unwrap_or_default();
    Ok((
        [
            (header::CONTENT_TYPE, content_type(rest)),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "private, max-age=3600"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; sandbox",
            ),
        ],
        data,
    )
        .into_response())
}

/// One `content` event.
#[derive(Debug, Serialize)]
struct Published {
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    html: Option<String>,
}

/// Query of the events stream.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Follow this course lesson's text instead of `index.md`.
    #[serde(default)]
    lesson: Option<String>,
}

struct Follow {
    first: Option<Event>,
    rx: tokio::sync::broadcast::Receiver<(String, i64)>,
    closing: tokio::sync::watch::Receiver<bool>,
    ctx: Ctx,
    session: Session,
    name: String,
    lesson: Option<String>,
}

fn content_event(p: &Published) -> Event {
    Event::default()
        .event("content")
        .json_data(p)
        .unwrap_or_else(|_| Event::default().event("content").data("{}"))
}

async fn next_event(mut f: Follow) -> Option<(Result<Event, std::convert::Infallible>, Follow)> {
    use tokio::sync::broadcast::error::RecvError;
    if let Some(e) = f.first.take() {
        return Some((Ok(e), f));
    }
    loop {
        let got = tokio::select! {
            r = f.rx.recv() => r,
            _ = f.closing.wait_for(|c| *c) => return None,
        };
        let version = match got {
            Ok((n, v)) if n == f.name => Some(v),
            Ok(_) => continue,
            // Fell behind: send the latest.
            Err(RecvError::Lagged(_)) => None,
            Err(RecvError::Closed) => return None,
        };
        let Ok(loaded) = content::load(&f.ctx, &f.session.user, &f.name, version).await else {
            continue;
        };
        let body = match f.lesson.as_deref().and_then(|l| loaded.item.lesson(l)) {
            Some((_, l)) => &l.body,
            None => &loaded.item.body,
        };
        let p = Published {
            version: loaded.version,
            html: Some(md::render(body, &static_base(&f.name, loaded.version))),
        };
        return Some((Ok(content_event(&p)), f));
    }
}

/// `GET /content/{name}/events[?lesson=MODULE/LESSON]`: hot reload of an item's text (see the
/// module docs).
pub async fn events(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Path(name): Path<String>,
    Query(q): Query<EventsQuery>,
) -> PageResult<Response> {
    // Subscribe first, so a push between the read and the subscription is not missed.
    let rx = ctx.content.subscribe();
    let view = content::get(&ctx.db, &s.user, &name).await?;
    let closing = ctx.web.closing();
    let first = content_event(&Published {
        version: view.version,
        html: None,
    });
    let follow = Follow {
        first: Some(first),
        rx,
        closing,
        ctx,
        session: s,
        name,
        lesson: q.lesson.filter(|l| !l.is_empty()),
    };
    Ok(Sse::new(futures::stream::unfold(follow, next_event))
        .keep_alive(KeepAlive::new().interval(super::sse::KEEP_ALIVE))
        .into_response())
}

/// The dashboard's "Your learning" rows: items started, time spent in their runs, solved.
pub async fn learning(ctx: &Ctx, s: &Session) -> PageResult<Vec<minijinja::Value>> {
    let now = crate::db::now_ms();
    let mut out = Vec::new();
    for p in content::progress(&ctx.db, &s.user).await? {
        // Lessons are kept as NAME/MODULE/LESSON.
        let (item, lesson) = match p.name.split_once('/') {
            Some((i, l)) => (i.to_string(), Some(l.to_string())),
            None => (p.name.clone(), None),
        };
        let title = match content::get(&ctx.db, &s.user, &item).await {
            Ok(v) => match &lesson {
                Some(l) => format!("{} — {l}", v.title),
                None => v.title,
            },
            Err(_) => p.name.clone(),
        };
        let href = match &lesson {
            Some(l) => format!("/content/{item}/lessons/{l}"),
            None => format!("/content/{item}"),
        };
        // Time spent: the lifetimes of the user's runs of the item (until destroyed or now).
        let spans: Vec<(i64, i64, String)> = sqlx::query_as(
            "SELECT created_at, updated_at, state FROM runs WHERE owner = $1 AND content = $2 \
             AND COALESCE(content_lesson, '') = $3",
        )
        .bind(&s.user.id)
        .bind(&item)
        .bind(lesson.as_deref().unwrap_or(""))
        .fetch_all(&ctx.db)
        .await?;
        let spent: i64 = spans
            .iter()
            .map(|(c, u, state)| {
                if state == "destroyed" || state == "failed" {
                    u - c
                } else {
                    now - c
                }
            })
            .sum();
        out.push(context! {
            name => p.name,
            href,
            title,
            started => human_duration(now - p.started_at),
            spent => human_duration(spent),
            solved => p.solved_at.map(|at| human_duration(now - at)),
        });
    }
    Ok(out)
}

/// `GET /content/{name}/lessons/{module}/{lesson}`: a course lesson (text, Start when it has a
/// playground, previous/next lesson).
pub async fn lesson(
    State(ctx): State<Ctx>,
    PageSession(s): PageSession,
    Path((name, module, lesson)): Path<(String, String, String)>,
) -> PageResult<Response> {
    let loaded = content::load(&ctx, &s.user, &name, None).await?;
    let path = format!("{module}/{lesson}");
    let (m, l) = loaded
        .item
        .lesson(&path)
        .ok_or_else(|| ApiError::NotFound(format!("{name} has no lesson {path}")))?;
    let paths = loaded.item.lesson_paths();
    let at = paths.iter().position(|p| *p == path).unwrap_or(0);
    let link = |p: &String| {
        let (mm, ll) = loaded.item.lesson(p)?;
        Some(context! { module => mm.slug, slug => ll.slug, title => ll.front.title })
    };
    let prev = at.checked_sub(1).and_then(|i| paths.get(i)).and_then(link);
    let next = paths.get(at + 1).and_then(link);
    let html = md::render(&l.body, &static_base(&name, loaded.version));
    let tasks: Vec<String> = l
        .front
        .tasks
        .iter()
        .filter(|(_, t)| !t.helper && !t.init)
        .map(|(n, _)| n.clone())
        .collect();
    Ok(page(render(
        "content_item.html",
        context! {
            base => base(&s, "content"),
            item => loaded.view,
            lesson => context! { path, title => l.front.title, module => m.front.title, prev, next },
            html,
            has_playground => l.front.playground.is_some(),
            tasks,
        },
    )?))
}
