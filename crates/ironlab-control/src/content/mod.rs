//! Content (issue 8): publishing tutorials, challenges, courses and skill paths, and starting
//! runs of them.
//!
//! Who talks to whom: `POST /api/v1/content` ([`crate::http`]) → [`push`] (checks the bundle
//! with `ironlab_spec::content` and against the playgrounds it names, writes the bundle to the
//! [`BundleStore`], then records the version in one SQL transaction) ; pages and
//! `POST /api/v1/content/{name}/runs` read a version back with [`load`] and start runs through
//! [`crate::runs`]. Bundles are immutable and named by their SHA-256, so a push of version N+1
//! never changes what version N's readers see; a failed check stores nothing.
//!
//! Authors: admins, and users an admin made authors ([`set_author`]); an author edits their own
//! items, admins every item. Visibility: `private` items are seen by their author, admins and
//! the users of their `access` list, `unlisted` by anyone signed in who has the name, `public`
//! ones are also listed.

pub mod api;
pub mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use ironlab_api::v1::{ContentFilter, ContentView, RunView};
use ironlab_spec::content::{Bundle, ContentError, Item, effective_manifest, parse_bundle};
use sha2::{Digest, Sha256};

use crate::auth::User;
use crate::db::{self, Db};
use crate::error::{ApiError, ApiResult};
use crate::{Ctx, playgrounds, runs};

/// Immutable bundle files, `DIR/<sha256>.tar`, written atomically (temp file, fsync, rename).
#[derive(Debug)]
pub struct BundleStore {
    dir: PathBuf,
    /// Parsed items by digest (a bundle never changes, so neither does its parse).
    cache: Mutex<BTreeMap<String, Arc<Item>>>,
    /// `(name, version)` of every publication, for open pages (hot reload).
    published: tokio::sync::broadcast::Sender<(String, i64)>,
}

impl BundleStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs_err::create_dir_all(dir)?;
        Ok(BundleStore {
            dir: dir.to_path_buf(),
            cache: Mutex::new(BTreeMap::new()),
            published: tokio::sync::broadcast::channel(64).0,
        })
    }

    /// Publications from now on: `(name, version)`.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<(String, i64)> {
        self.published.subscribe()
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}.tar"))
    }

    /// Stores `tar`, returning its digest (already there: nothing written).
    pub fn put(&self, tar: &[u8]) -> anyhow::Result<String> {
        use std::io::Write;
        let digest = hex::encode(Sha256::digest(tar));
        let path = self.path(&digest);
        if path.exists() {
            return Ok(digest);
        }
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), db::random_id(8)));
        let result = (|| -> anyhow::Result<()> {
            let mut f = fs_err::File::create(&tmp)?;
            f.write_all(tar)?;
            f.sync_all()?;
            fs_err::rename(&tmp, &path)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|()| digest)
    }

    /// Reads a bundle's archive.
    pub fn get(&self, digest: &str) -> anyhow::Result<Vec<u8>> {
        Ok(fs_err::read(self.path(digest))?)
    }

    /// Removes a bundle file (no error when it is already gone).
    pub fn remove(&self, digest: &str) {
        if let Err(e) = std::fs::remove_file(self.path(digest))
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(digest, error = %e, "failed to remove a content bundle");
        }
        if let Ok(mut c) = self.cache.lock() {
            c.remove(digest);
        }
    }
}

/// One stored item version, parsed.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The index row.
    pub view: ContentView,
    /// The version loaded.
    pub version: i64,
    /// The bundle's digest.
    pub digest: String,
    /// The parsed item.
    pub item: Arc<Item>,
}

type Row = (
    String,
    String,
    i64,
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
);

const COLUMNS: &str = "name, kind, version, title, description, categories, tags, difficulty, \
                       visibility, access, author, playground, created_at, published_at";

fn from_row(row: Row) -> ContentView {
    let (
        name,
        kind,
        version,
        title,
        description,
        categories,
        tags,
        difficulty,
        visibility,
        access,
        author,
        playground,
        created_at,
        published_at,
    ) = row;
    ContentView {
        name,
        kind,
        version,
        title,
        description,
        categories: serde_json::from_str(&categories).unwrap_or_default(),
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        difficulty,
        visibility,
        access: serde_json::from_str(&access).unwrap_or_default(),
        author,
        playground,
        created_at: db::from_ms(created_at),
        published_at: db::from_ms(published_at),
    }
}

fn bad(e: ContentError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

fn may_edit(view: &ContentView, user: &User) -> bool {
    view.author == user.id || user.is_admin()
}

fn may_see(view: &ContentView, user: &User) -> bool {
    view.visibility != "private" || may_edit(view, user) || view.access.contains(&user.name)
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "content {name} not found; `ironlab content list` lists what you can see"
    ))
}

/// Validates and publishes `bundle` as the next version of `name` (admins only). Everything is
/// checked first; a refused push changes nothing.
pub async fn push(ctx: &Ctx, user: &User, name: &str, bundle: &Bundle) -> ApiResult<ContentView> {
    if !is_author(&ctx.db, user).await? {
        return Err(ApiError::Forbidden(
            "only authors may publish content; an admin makes you one with \
             `ironlab user author NAME`"
                .into(),
        ));
    }
    let item = parse_bundle(name, bundle).map_err(bad)?;
    let existing = get_row(&ctx.db, name).await?;
    if let Some(v) = &existing
        && !may_edit(v, user)
    {
        return Err(ApiError::Forbidden(format!(
            "content {name} belongs to another author"
        )));
    }
    // Checks that need the platform: playgrounds, overrides, solution, skill path items.
    let mut problems = Vec::new();
    for (file, reference, tasks) in item.playgrounds() {
        let pg = match playgrounds::get(&ctx.db, user, &reference.name).await {
            Ok(pg) => pg,
            Err(ApiError::NotFound(_)) => {
                problems.push(format!(
                    "{file}: playground.name: there is no playground named {:?}",
                    reference.name
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        match effective_manifest(&file, &pg.manifest, reference, tasks) {
            Ok(m) => {
                for t in item.solutions() {
                    if t.file != file {
                        continue;
                    }
                    let sol_file = match &t.lesson {
                        Some(l) => format!("{l}.solution.md"),
                        None => "solution.md".to_string(),
                    };
                    if let Err(e) =
                        ironlab_spec::content::check_solution_text(&sol_file, t.solution, &m)
                    {
                        problems.extend(e.problems.iter().map(ToString::to_string));
                    }
                }
            }
            Err(e) => problems.extend(e.problems.iter().map(ToString::to_string)),
        }
    }
    for (i, u) in item.front.units.iter().enumerate() {
        for (j, it) in u.items.iter().enumerate() {
            let ok = match get_row(&ctx.db, it).await? {
                Some(v) => may_see(&v, user) && (v.kind == "challenge" || v.kind == "tutorial"),
                None => false,
            };
            if !ok {
                problems.push(format!(
                    "index.md: units[{i}].items[{j}]: there is no published challenge or tutorial named {it:?}"
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::BadRequest(problems.join("\n")));
    }

    let tar = bundle.to_tar();
    let store = ctx.content.clone();
    let tar_len = tar.len();
    let digest = tokio::task::spawn_blocking(move || store.put(&tar))
        .await
        .context("bundle writer panicked")?
        .context("failed to store a content bundle")?;
    // Pushing exactly the latest version again publishes nothing (`ironlab up --content` pushes
    // the stock items at every start).
    if let Some(latest) = &existing {
        let same: Option<String> = sqlx::query_scalar(
            "SELECT digest FROM content_versions WHERE name = $1 AND version = $2",
        )
        .bind(name)
        .bind(latest.version)
        .fetch_optional(&ctx.db)
        .await?;
        if same.as_deref() == Some(digest.as_str()) {
            tracing::info!(
                content = name,
                version = latest.version,
                "content unchanged"
            );
            return get_row(&ctx.db, name).await?.ok_or_else(|| not_found(name));
        }
    }
    let f = &item.front;
    let now = db::now_ms();
    let mut tx = ctx.db.begin().await?;
    let version: i64 = sqlx::query_scalar(
        "INSERT INTO content (name, kind, version, title, description, categories, tags, difficulty, \
         visibility, access, author, playground, created_at, published_at) \
         VALUES ($1, $2, 1, $3, $4, $5, $6, $7, $8, $12, $9, $10, $11, $11) \
         ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, version = content.version + 1, \
         title = excluded.title, description = excluded.description, categories = excluded.categories, \
         tags = excluded.tags, difficulty = excluded.difficulty, visibility = excluded.visibility, \
         access = excluded.access, \
         playground = excluded.playground, published_at = excluded.published_at \
         RETURNING version",
    )
    .bind(name)
    .bind(f.kind.as_str())
    .bind(&f.title)
    .bind(&f.description)
    .bind(serde_json::to_string(&f.categories).unwrap_or_else(|_| "[]".into()))
    .bind(serde_json::to_string(&f.tags).unwrap_or_else(|_| "[]".into()))
    .bind(f.difficulty.map(|d| d.as_str()))
    .bind(f.visibility.as_str())
    .bind(&user.id)
    .bind(f.playground.as_ref().map(|p| p.name.as_str()))
    .bind(now)
    .bind(serde_json::to_string(&f.access).unwrap_or_else(|_| "[]".into()))
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO content_versions (name, version, digest, size, pushed_by, pushed_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(name)
    .bind(version)
    .bind(&digest)
    .bind(tar_len as i64)
    .bind(&user.id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(content = name, version, %digest, user = %user.name, "content published");
    if let Ok(mut c) = ctx.content.cache.lock() {
        c.insert(digest, Arc::new(item));
    }
    // Nobody listening is fine.
    let _ = ctx.content.published.send((name.to_string(), version));
    get_row(&ctx.db, name).await?.ok_or_else(|| not_found(name))
}

/// Whether the user may publish: admins, and the users an admin made authors.
pub async fn is_author(db: &Db, user: &User) -> ApiResult<bool> {
    if user.is_admin() {
        return Ok(true);
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM content_authors WHERE user_id = $1")
        .bind(&user.id)
        .fetch_one(db)
        .await?;
    Ok(n > 0)
}

/// Makes the user `name` a content author, or not (admins only).
pub async fn set_author(db: &Db, admin: &User, name: &str, author: bool) -> ApiResult<()> {
    if !admin.is_admin() {
        return Err(ApiError::Forbidden("only admins may make authors".into()));
    }
    let target = crate::auth::find_user(db, name)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("user {name} not found")))?;
    if author {
        sqlx::query(
            "INSERT INTO content_authors (user_id, granted_by, granted_at) VALUES ($1, $2, $3) \
             ON CONFLICT (user_id) DO NOTHING",
        )
        .bind(&target.id)
        .bind(&admin.id)
        .bind(db::now_ms())
        .execute(db)
        .await?;
    } else {
        sqlx::query("DELETE FROM content_authors WHERE user_id = $1")
            .bind(&target.id)
            .execute(db)
            .await?;
    }
    tracing::info!(user = name, author, by = %admin.name, "content author role changed");
    Ok(())
}

async fn get_row(db: &Db, name: &str) -> ApiResult<Option<ContentView>> {
    let row: Option<Row> =
        sqlx::query_as(&format!("SELECT {COLUMNS} FROM content WHERE name = $1"))
            .bind(name)
            .fetch_optional(db)
            .await?;
    Ok(row.map(from_row))
}

/// One item the user may see, or 404.
pub async fn get(db: &Db, user: &User, name: &str) -> ApiResult<ContentView> {
    match get_row(db, name).await? {
        Some(v) if may_see(&v, user) => Ok(v),
        _ => Err(not_found(name)),
    }
}

/// The catalog: public items, plus the user's own (admins: all), filtered.
pub async fn list(db: &Db, user: &User, filter: &ContentFilter) -> ApiResult<Vec<ContentView>> {
    let rows: Vec<Row> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM content ORDER BY kind, title, name"
    ))
    .fetch_all(db)
    .await?;
    let words: Vec<String> = filter
        .q
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    Ok(rows
        .into_iter()
        .map(from_row)
        .filter(|v| {
            v.visibility == "public"
                || may_edit(v, user)
                || (v.visibility == "private" && v.access.contains(&user.name))
        })
        .filter(|v| {
            filter
                .kind
                .as_deref()
                .is_none_or(|k| k.is_empty() || v.kind == k)
        })
        .filter(|v| {
            filter
                .difficulty
                .as_deref()
                .is_none_or(|d| d.is_empty() || v.difficulty.as_deref() == Some(d))
        })
        .filter(|v| {
            let hay = format!(
                "{} {} {} {} {}",
                v.name,
                v.title,
                v.description,
                v.tags.join(" "),
                v.categories.join(" ")
            )
            .to_lowercase();
            words.iter().all(|w| hay.contains(w.as_str()))
        })
        .collect())
}

/// Loads and parses a version (default: the latest) of an item the user may see.
pub async fn load(ctx: &Ctx, user: &User, name: &str, version: Option<i64>) -> ApiResult<Loaded> {
    let view = get(&ctx.db, user, name).await?;
    let version = version.unwrap_or(view.version);
    let digest: Option<String> =
        sqlx::query_scalar("SELECT digest FROM content_versions WHERE name = $1 AND version = $2")
            .bind(name)
            .bind(version)
            .fetch_optional(&ctx.db)
            .await?;
    let digest = digest
        .ok_or_else(|| ApiError::NotFound(format!("content {name} has no version {version}")))?;
    let cached = ctx
        .content
        .cache
        .lock()
        .ok()
        .and_then(|c| c.get(&digest).cloned());
    let item = match cached {
        Some(i) => i,
        None => {
            let bytes = ctx
                .content
                .get(&digest)
                .with_context(|| format!("bundle of content {name} version {version}"))?;
            let bundle = Bundle::from_tar(&bytes)
                .map_err(|e| anyhow::anyhow!("stored bundle of {name} v{version}: {e}"))?;
            let item = Arc::new(
                parse_bundle(name, &bundle)
                    .map_err(|e| anyhow::anyhow!("stored bundle of {name} v{version}: {e}"))?,
            );
            if let Ok(mut c) = ctx.content.cache.lock() {
                c.insert(digest.clone(), item.clone());
            }
            item
        }
    };
    Ok(Loaded {
        view,
        version,
        digest,
        item,
    })
}

/// The archive of a version (author or admin: it holds the solution).
pub async fn bundle(
    ctx: &Ctx,
    user: &User,
    name: &str,
    version: Option<i64>,
) -> ApiResult<Vec<u8>> {
    let view = get(&ctx.db, user, name).await?;
    if !may_edit(&view, user) {
        return Err(ApiError::Forbidden(format!(
            "only the author of {name} or an admin may download its files"
        )));
    }
    let loaded = load(ctx, user, name, version).await?;
    let store = ctx.content.clone();
    let digest = loaded.digest.clone();
    Ok(tokio::task::spawn_blocking(move || store.get(&digest))
        .await
        .context("bundle reader panicked")??)
}

/// Removes an item and every version (author or admin). Runs already started keep running.
pub async fn remove(ctx: &Ctx, user: &User, name: &str) -> ApiResult<()> {
    let view = get(&ctx.db, user, name).await?;
    if !may_edit(&view, user) {
        return Err(ApiError::Forbidden(format!(
            "only the author of {name} or an admin may remove it"
        )));
    }
    let digests: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT digest FROM content_versions WHERE name = $1")
            .bind(name)
            .fetch_all(&ctx.db)
            .await?;
    let mut tx = ctx.db.begin().await?;
    sqlx::query("DELETE FROM content_versions WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM content WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    // Bundle files no other version uses (identical bundles share one file).
    for d in digests {
        let used: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM content_versions WHERE digest = $1")
                .bind(&d)
                .fetch_one(&ctx.db)
                .await?;
        if used == 0 {
            ctx.content.remove(&d);
        }
    }
    tracing::info!(content = name, user = %user.name, "content removed");
    Ok(())
}

/// Starts a run of an item (its playground with its overrides and tasks), or of one of its
/// course lessons (`MODULE/LESSON`).
pub async fn start_run(
    ctx: &Ctx,
    user: &User,
    name: &str,
    version: Option<i64>,
    lesson: Option<&str>,
) -> ApiResult<RunView> {
    let loaded = load(ctx, user, name, version).await?;
    let item = &loaded.item;
    let (file, reference, tasks, title) = match lesson {
        None => (
            "index.md".to_string(),
            item.front.playground.as_ref(),
            &item.front.tasks,
            item.front.title.clone(),
        ),
        Some(path) => {
            let (m, l) = item.lesson(path).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "lesson: content {name} has no lesson {path:?} (MODULE/LESSON)"
                ))
            })?;
            (
                format!("{}/{}.md", m.slug, l.slug),
                l.front.playground.as_ref(),
                &l.front.tasks,
                format!("{}: {}", item.front.title, l.front.title),
            )
        }
    };
    let Some(reference) = reference else {
        return Err(ApiError::BadRequest(format!(
            "{name} ({file}) has no playground to start"
        )));
    };
    let pg = playgrounds::get(&ctx.db, user, &reference.name).await?;
    let manifest = effective_manifest(&file, &pg.manifest, reference, tasks).map_err(|e| {
        ApiError::Conflict(format!(
            "content {name} no longer fits playground {}: {e}",
            reference.name
        ))
    })?;
    let run = runs::create_from(
        ctx,
        user,
        &pg.view.name,
        &manifest,
        title,
        Some((name, loaded.version, lesson)),
    )
    .await?;
    // Progress is kept per item, and per lesson under `NAME/MODULE/LESSON`.
    let key = progress_key(name, lesson);
    sqlx::query(
        "INSERT INTO content_progress (user_id, name, started_at, last_run) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (user_id, name) DO UPDATE SET last_run = excluded.last_run",
    )
    .bind(&user.id)
    .bind(&key)
    .bind(db::now_ms())
    .bind(&run.id)
    .execute(&ctx.db)
    .await?;
    Ok(run)
}

/// The `content_progress.name` of an item (`NAME`) or a course lesson (`NAME/MODULE/LESSON`).
pub fn progress_key(name: &str, lesson: Option<&str>) -> String {
    match lesson {
        Some(l) => format!("{name}/{l}"),
        None => name.to_string(),
    }
}

/// A user's progress on an item.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Progress {
    /// Item name.
    pub name: String,
    /// First started, ms.
    pub started_at: i64,
    /// First solved (every task of a run completed), ms.
    pub solved_at: Option<i64>,
    /// The version solved.
    pub solved_version: Option<i64>,
    /// Their latest run of it.
    pub last_run: Option<String>,
}

type ProgressRow = (String, i64, Option<i64>, Option<i64>, Option<String>);

fn progress_of(r: ProgressRow) -> Progress {
    Progress {
        name: r.0,
        started_at: r.1,
        solved_at: r.2,
        solved_version: r.3,
        last_run: r.4,
    }
}

/// The user's progress on every item they started, latest first.
pub async fn progress(db: &Db, user: &User) -> ApiResult<Vec<Progress>> {
    let rows: Vec<ProgressRow> = sqlx::query_as(
        "SELECT name, started_at, solved_at, solved_version, last_run FROM content_progress \
         WHERE user_id = $1 ORDER BY started_at DESC",
    )
    .bind(&user.id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(progress_of).collect())
}

/// The user's progress on one item.
pub async fn progress_on(db: &Db, user: &User, name: &str) -> ApiResult<Option<Progress>> {
    let row: Option<ProgressRow> = sqlx::query_as(
        "SELECT name, started_at, solved_at, solved_version, last_run FROM content_progress \
         WHERE user_id = $1 AND name = $2",
    )
    .bind(&user.id)
    .bind(name)
    .fetch_optional(db)
    .await?;
    Ok(row.map(progress_of))
}

/// Called when a task of `run` completed: if the run serves an item and every task the student
/// completes (init and helper tasks aside) is completed, the owner's progress becomes solved
/// (once; later runs do not change the date).
pub async fn task_completed(db: &Db, run: &runs::Run) -> ApiResult<()> {
    let Some((name, version)) = of_run(db, &run.id).await? else {
        return Ok(());
    };
    let name = progress_key(&name, lesson_of_run(db, &run.id).await?.as_deref());
    let checklist = crate::tasks::view(db, run).await?;
    let student: Vec<_> = checklist.tasks.iter().filter(|t| !t.init).collect();
    if student.is_empty()
        || !student
            .iter()
            .all(|t| t.state == ironlab_api::v1::TaskState::Completed)
    {
        return Ok(());
    }
    let now = db::now_ms();
    let updated = sqlx::query(
        "INSERT INTO content_progress (user_id, name, started_at, solved_at, solved_version, last_run) \
         VALUES ($1, $2, $3, $3, $4, $5) \
         ON CONFLICT (user_id, name) DO UPDATE SET solved_at = $3, solved_version = $4 \
         WHERE content_progress.solved_at IS NULL",
    )
    .bind(&run.owner)
    .bind(&name)
    .bind(now)
    .bind(version)
    .bind(&run.id)
    .execute(db)
    .await?;
    if updated.rows_affected() > 0 {
        tracing::info!(content = %name, run = %run.id, user = %run.owner, "content solved");
    }
    Ok(())
}

/// The course lesson (`MODULE/LESSON`) a run serves, if it was started from one.
pub async fn lesson_of_run(db: &Db, run: &str) -> ApiResult<Option<String>> {
    let v: Option<Option<String>> =
        sqlx::query_scalar("SELECT content_lesson FROM runs WHERE id = $1")
            .bind(run)
            .fetch_optional(db)
            .await?;
    Ok(v.flatten())
}

/// The content item and version a run serves, if it was started from one.
pub async fn of_run(db: &Db, run: &str) -> ApiResult<Option<(String, i64)>> {
    let row: Option<(Option<String>, Option<i64>)> =
        sqlx::query_as("SELECT content, content_version FROM runs WHERE id = $1")
            .bind(run)
            .fetch_optional(db)
            .await?;
    Ok(match row {
        Some((Some(c), Some(v))) => Some((c, v)),
        _ => None,
    })
}
