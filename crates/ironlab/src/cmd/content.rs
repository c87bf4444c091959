//! `ironlab content …`: scaffold, check, publish, list, download, remove and test content items.
//!
//! An item is a folder (`index.md` + `solution.md` + `__static__/`, see
//! `ironlab_spec::content`); `push` sends it as a tar archive to `POST /api/v1/content?name=`,
//! `pull` writes the archive of `GET /api/v1/content/{name}/bundle` back into a folder. `test`
//! plays `solution.md` with the solution bot of `playground test` (`super::solution`): a
//! published item runs through `POST /api/v1/content/{name}/runs`; a local folder is run
//! without publishing it, as a temporary playground `ct-<name>` built from the item's
//! playground, overrides and tasks (removed afterwards).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ironlab_api::v1::{ContentView, PlaygroundView, RunView};
use ironlab_spec::Manifest;
use ironlab_spec::content::{
    Bundle, ContentKind, Item, effective_manifest, parse_bundle, scaffold,
};
use reqwest::Method;
use serde_json::json;

use crate::cli::{ContentCommand, ContentKindArg};
use crate::client::Api;

/// Runs a `content` subcommand; returns the exit code.
pub async fn run(
    cmd: ContentCommand,
    server: Option<String>,
    token: Option<String>,
) -> anyhow::Result<i32> {
    let api = || Api::from_flags(server.clone(), token.clone());
    match cmd {
        ContentCommand::Create { kind, name, dir } => create(kind, &name, dir),
        ContentCommand::Check { dir } => {
            let (_, item) = match load(dir.as_deref()) {
                Ok(x) => x,
                Err(code) => return Ok(code),
            };
            eprintln!("{} ({}) is valid", item.name, item.front.kind.as_str());
            Ok(0)
        }
        ContentCommand::Push { dir, watch: false } => push(&api()?, dir.as_deref()).await,
        ContentCommand::Push { dir, watch: true } => watch(&api()?, dir.as_deref()).await,
        ContentCommand::List { kind, query, json } => list(&api()?, kind, query, json).await,
        ContentCommand::Pull {
            name,
            at_version,
            dir,
        } => pull(&api()?, &name, at_version, dir).await,
        ContentCommand::Rm { name } => {
            api()?
                .call_empty(Method::DELETE, &format!("/content/{name}"))
                .await?;
            eprintln!("removed {name}");
            Ok(0)
        }
        ContentCommand::Test { target, timeout } => test(&api()?, &target, timeout).await,
    }
}

fn create(kind: ContentKindArg, name: &str, dir: Option<PathBuf>) -> anyhow::Result<i32> {
    if !ironlab_spec::content::is_item_name(name) {
        eprintln!("error: {name:?} is not an item name: 3-40 characters [a-z0-9-]");
        return Ok(2);
    }
    let kind = match kind {
        ContentKindArg::Tutorial => ContentKind::Tutorial,
        ContentKindArg::Challenge => ContentKind::Challenge,
        ContentKindArg::Course => ContentKind::Course,
        ContentKindArg::SkillPath => ContentKind::SkillPath,
    };
    let root = dir.unwrap_or_else(|| PathBuf::from(".")).join(name);
    if root.exists() {
        eprintln!("error: {} exists already", root.display());
        return Ok(2);
    }
    write_bundle(&root, &scaffold(kind, name))?;
    eprintln!(
        "created {} {}: edit {}/index.md, then `ironlab content push {}`",
        kind.as_str(),
        name,
        root.display(),
        root.display()
    );
    Ok(0)
}

fn write_bundle(root: &Path, bundle: &Bundle) -> anyhow::Result<()> {
    for (path, data) in &bundle.files {
        let file = root.join(path);
        if let Some(parent) = file.parent() {
            fs_err::create_dir_all(parent)?;
        }
        fs_err::write(&file, data)?;
    }
    Ok(())
}

/// The folder's name and its parsed item, or an exit code after printing every problem.
fn load(dir: Option<&Path>) -> Result<(Bundle, Item), i32> {
    let dir = dir.unwrap_or(Path::new("."));
    let abs = match fs_err::canonicalize(dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Err(2);
        }
    };
    let name = abs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let checked = Bundle::from_dir(&abs).and_then(|b| parse_bundle(&name, &b).map(|i| (b, i)));
    match checked {
        Ok(x) => Ok(x),
        Err(e) => {
            eprintln!("error: {} is not a valid item:", dir.display());
            for p in &e.problems {
                eprintln!("  {p}");
            }
            Err(2)
        }
    }
}

async fn push(api: &Api, dir: Option<&Path>) -> anyhow::Result<i32> {
    let (bundle, item) = match load(dir) {
        Ok(x) => x,
        Err(code) => return Ok(code),
    };
    let view: Result<ContentView, _> = api
        .post_bytes(
            &format!("/content?name={}", item.name),
            "application/x-tar",
            bundle.to_tar(),
        )
        .await;
    match view {
        Ok(v) => {
            eprintln!(
                "published {} ({}) version {} [{}]",
                v.name, v.kind, v.version, v.visibility
            );
            println!("{}", v.version);
            Ok(0)
        }
        Err(e) => match e.downcast_ref::<crate::client::ApiError>() {
            Some(a) if a.status.as_u16() == 400 => {
                eprintln!("error: the server refused {}:", item.name);
                for line in a.detail.lines() {
                    eprintln!("  {line}");
                }
                Ok(2)
            }
            _ => Err(e),
        },
    }
}

/// What changes when a file of the folder is saved: every path with its size and mtime.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), md.len(), md.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// `content push --watch`: publishes now and after every change (polled every 200 ms, so an
/// editor's save is picked up within a quarter second); a refused version is reported and the
/// watch goes on. Ends with Ctrl-C.
async fn watch(api: &Api, dir: Option<&Path>) -> anyhow::Result<i32> {
    let root = dir.unwrap_or(Path::new(".")).to_path_buf();
    let mut last = Vec::new();
    eprintln!("watching {} (Ctrl-C to stop)", root.display());
    loop {
        let now = fingerprint(&root);
        if now != last {
            // Let a multi-file save settle.
            tokio::time::sleep(Duration::from_millis(50)).await;
            last = fingerprint(&root);
            match push(api, Some(&root)).await {
                Ok(_) => {}
                Err(e) => eprintln!("error: {e:#}"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}

async fn list(
    api: &Api,
    kind: Option<String>,
    query: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let mut params = Vec::new();
    if let Some(k) = kind {
        params.push(format!("kind={}", encode(&k)));
    }
    if let Some(q) = query {
        params.push(format!("q={}", encode(&q)));
    }
    let path = if params.is_empty() {
        "/content".to_string()
    } else {
        format!("/content?{}", params.join("&"))
    };
    let items: Vec<ContentView> = api.call(Method::GET, &path, None).await?;
    if json {
        super::playground::print_json(&items)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.kind.clone(),
                c.version.to_string(),
                c.visibility.clone(),
                c.difficulty.clone().unwrap_or_else(|| "-".into()),
                c.title.clone(),
            ]
        })
        .collect();
    super::playground::table(
        &[
            "NAME",
            "KIND",
            "VERSION",
            "VISIBILITY",
            "DIFFICULTY",
            "TITLE",
        ],
        &rows,
    );
    Ok(0)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn pull(
    api: &Api,
    name: &str,
    version: Option<i64>,
    dir: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let path = match version {
        Some(v) => format!("/content/{name}/bundle?version={v}"),
        None => format!("/content/{name}/bundle"),
    };
    let tar = api.get_bytes(&path).await?;
    let bundle = Bundle::from_tar(&tar).map_err(|e| anyhow::anyhow!("{e}"))?;
    let root = dir.unwrap_or_else(|| PathBuf::from(name));
    if root.exists()
        && fs_err::read_dir(&root)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        eprintln!("error: {} exists and is not empty", root.display());
        return Ok(2);
    }
    write_bundle(&root, &bundle)?;
    eprintln!(
        "wrote {name} ({} files) to {}",
        bundle.files.len(),
        root.display()
    );
    Ok(0)
}

async fn test(api: &Api, target: &str, timeout: Duration) -> anyhow::Result<i32> {
    let local = Path::new(target).join("index.md").is_file();
    let (item, name) = if local {
        match load(Some(Path::new(target))) {
            Ok((_, item)) => {
                let n = item.name.clone();
                (item, n)
            }
            Err(code) => return Ok(code),
        }
    } else {
        let tar = api
            .get_bytes(&format!("/content/{target}/bundle"))
            .await
            .with_context(|| {
                format!("{target} is neither a folder with index.md nor a published item")
            })?;
        let bundle = Bundle::from_tar(&tar).map_err(|e| anyhow::anyhow!("{e}"))?;
        let item = parse_bundle(target, &bundle).map_err(|e| anyhow::anyhow!("{e}"))?;
        (item, target.to_string())
    };
    let targets = item.solutions();
    if targets.is_empty() {
        eprintln!(
            "error: {name} has no solution to play (solution.md beside a playground, or \
             MODULE/LESSON.solution.md for a course lesson with one)"
        );
        return Ok(2);
    }
    let mut worst = 0;
    for t in &targets {
        let what = match &t.lesson {
            Some(l) => format!("{name} lesson {l}"),
            None => name.clone(),
        };
        eprintln!("== {what}");
        let code = test_one(api, local, target, &name, &what, t, timeout).await?;
        worst = worst.max(code);
    }
    Ok(worst)
}

/// Plays one solution (the item's or a lesson's); returns the exit code.
async fn test_one(
    api: &Api,
    local: bool,
    target: &str,
    name: &str,
    what: &str,
    t: &ironlab_spec::content::SolutionTarget<'_>,
    timeout: Duration,
) -> anyhow::Result<i32> {
    let reference = t.playground;
    let pg: PlaygroundView = api
        .call(
            Method::GET,
            &format!("/playgrounds/{}", reference.name),
            None,
        )
        .await?;
    let base: Manifest = ironlab_spec::from_value(pg.manifest.clone())
        .map_err(|e| anyhow::anyhow!("playground {}: {e}", reference.name))?;
    let manifest = match effective_manifest(&t.file, &base, reference, t.tasks) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {what} does not fit playground {}:", reference.name);
            for p in &e.problems {
                eprintln!("  {p}");
            }
            return Ok(2);
        }
    };
    let steps = match ironlab_spec::parse_solution(t.solution, &manifest) {
        Ok(s) => s.steps,
        Err(e) => {
            eprintln!("error: the solution of {what} is invalid:");
            for fe in &e.errors {
                eprintln!("  {fe}");
            }
            return Ok(2);
        }
    };
    if local {
        // A temporary playground holding the effective manifest.
        let mut temp = manifest.clone();
        temp.name = temp_name(name);
        temp.title = format!("test of {what}");
        temp.parent = None;
        let text = serde_json::to_string(&temp)?;
        let pg_name = super::solution::register(api, &text, Path::new(target)).await?;
        let run: RunView = api
            .call(
                Method::POST,
                "/runs",
                Some(&json!({ "playground": pg_name })),
            )
            .await?;
        eprintln!("run {} of {what} (local folder): starting", run.id);
        let code = super::solution::play_and_destroy(api, &run, &manifest, &steps, timeout).await;
        if let Err(e) = api
            .call_empty(Method::DELETE, &format!("/playgrounds/{pg_name}"))
            .await
        {
            eprintln!("warning: cannot remove the temporary playground {pg_name}: {e:#}");
        }
        code
    } else {
        let mut body = json!({});
        if let Some(l) = &t.lesson {
            body["lesson"] = json!(l);
        }
        let run: RunView = api
            .call(Method::POST, &format!("/content/{name}/runs"), Some(&body))
            .await?;
        eprintln!("run {} of {what}: starting", run.id);
        super::solution::play_and_destroy(api, &run, &manifest, &steps, timeout).await
    }
}

/// `ct-<name>`, cut to the 40 characters a playground name may have.
fn temp_name(name: &str) -> String {
    let mut n = format!("ct-{name}");
    n.truncate(40);
    n.trim_end_matches('-').to_string()
}

/// Publishes every item folder under `root` (what `ironlab up --content DIR` does at start):
/// challenges and tutorials first, then courses, skill paths last (they list the others). An
/// unchanged item keeps its version. Returns how many items were refused (each is reported).
pub async fn publish_dir(api: &Api, root: &Path) -> anyhow::Result<usize> {
    let mut items = Vec::new();
    let mut refused = 0;
    let mut dirs: Vec<PathBuf> = fs_err::read_dir(root)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("index.md").is_file())
        .collect();
    dirs.sort();
    for dir in dirs {
        match load(Some(&dir)) {
            Ok((bundle, item)) => items.push((bundle, item)),
            Err(_) => refused += 1,
        }
    }
    let rank = |k: ContentKind| match k {
        ContentKind::Tutorial | ContentKind::Challenge => 0,
        ContentKind::Course => 1,
        ContentKind::SkillPath => 2,
    };
    items.sort_by_key(|(_, item)| rank(item.front.kind));
    for (bundle, item) in items {
        let r: anyhow::Result<ContentView> = api
            .post_bytes(
                &format!("/content?name={}", item.name),
                "application/x-tar",
                bundle.to_tar(),
            )
            .await;
        match r {
            Ok(v) => eprintln!(
                "ironlab: content {} ({}) version {}",
                v.name, v.kind, v.version
            ),
            Err(e) => {
                refused += 1;
                eprintln!(
                    "ironlab: warning: content {} was not published: {e:#}",
                    item.name
                );
            }
        }
    }
    Ok(refused)
}
