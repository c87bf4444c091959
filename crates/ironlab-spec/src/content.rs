//! Content: tutorials, challenges, courses and skill paths written in Markdown.
//!
//! One folder per item (its name is the item's name):
//!
//! ```text
//! my-challenge/
//!   index.md          YAML front matter between `---` lines, then the Markdown text
//!   solution.md       optional, hidden from students (the `crate::solution` format)
//!   __static__/…      images and other files the text links to
//! ```
//!
//! A course has no text of its own beyond `index.md`; its module folders (`01-basics/`, sorted by
//! name) hold an optional `index.md` (`title`) and lesson files (`*.md`, sorted by name), each
//! with its own front matter (`title`, `playground`, `tasks`) and optionally its solution
//! (`LESSON.solution.md`). A skill path lists `units`, each
//! naming challenges or tutorials.
//!
//! [`Bundle`] is the set of files (loaded from a folder or a tar archive); [`parse_bundle`]
//! checks everything that can be checked without the platform and returns an [`Item`]; every
//! problem names the file, the field and the reason ([`ContentError`]). What needs the platform
//! (the playground exists, resources within its limits, the solution's machines) is checked by
//! [`effective_manifest`] and [`Item::check_solution`] once the playground's manifest is known.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::Read;
use std::path::Path;

use pulldown_cmark::{Event, Options, Parser, Tag};
use serde::{Deserialize, Serialize};

use crate::manifest::{Manifest, Resources, StartupFile, Tab};
use crate::task::Task;
use crate::{FieldError, ManifestError};

/// Largest bundle accepted (sum of file sizes), in bytes.
pub const MAX_BUNDLE_BYTES: usize = 32 * 1024 * 1024;
/// Most files in a bundle.
pub const MAX_BUNDLE_FILES: usize = 1000;
/// The folder of static files.
pub const STATIC_DIR: &str = "__static__";

/// What an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentKind {
    /// Text that explains, with a live playground beside it.
    Tutorial,
    /// A problem statement with tasks that check the student's work.
    Challenge,
    /// Modules of lessons.
    Course,
    /// Units ordering challenges and tutorials toward a skill.
    SkillPath,
}

impl ContentKind {
    /// The word used in front matter and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentKind::Tutorial => "tutorial",
            ContentKind::Challenge => "challenge",
            ContentKind::Course => "course",
            ContentKind::SkillPath => "skill-path",
        }
    }

    /// Parses the front-matter word.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tutorial" => Some(ContentKind::Tutorial),
            "challenge" => Some(ContentKind::Challenge),
            "course" => Some(ContentKind::Course),
            "skill-path" => Some(ContentKind::SkillPath),
            _ => None,
        }
    }
}

/// How hard an item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Difficulty {
    /// Beginners.
    Easy,
    /// Some experience.
    Medium,
    /// Experts.
    Hard,
}

impl Difficulty {
    /// The word used in front matter.
    pub fn as_str(self) -> &'static str {
        match self {
            Difficulty::Easy => "easy",
            Difficulty::Medium => "medium",
            Difficulty::Hard => "hard",
        }
    }
}

/// Who sees an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Only its author (and admins).
    #[default]
    Private,
    /// Anyone signed in with the link; not in the catalog.
    Unlisted,
    /// In the catalog.
    Public,
}

impl Visibility {
    /// The word used in front matter.
    pub fn as_str(self) -> &'static str {
        match self {
            Visibility::Private => "private",
            Visibility::Unlisted => "unlisted",
            Visibility::Public => "public",
        }
    }
}

/// The front matter of an item's `index.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FrontMatter {
    /// tutorial | challenge | course | skill-path.
    pub kind: ContentKind,
    /// Shown as the heading and in the catalog.
    pub title: String,
    /// One or two sentences for the catalog.
    #[serde(default)]
    pub description: String,
    /// Broad subjects (`linux`, `networking`).
    #[serde(default)]
    pub categories: Vec<String>,
    /// Free keywords.
    #[serde(default)]
    pub tags: Vec<String>,
    /// easy | medium | hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<Difficulty>,
    /// Cover image, a path inside `__static__/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cover: Option<String>,
    /// private (default) | unlisted | public.
    #[serde(default)]
    pub visibility: Visibility,
    /// User names who may see a private item besides its author and admins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
    /// The playground started beside the text (challenges: required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playground: Option<PlaygroundRef>,
    /// Tasks (the playground tasks format); they replace the playground's own.
    #[serde(default)]
    pub tasks: BTreeMap<String, Task>,
    /// Skill paths: the units, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Unit>,
}

/// Which playground an item (or lesson) runs, with per-machine overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlaygroundRef {
    /// A playground name (`debian`).
    pub name: String,
    /// Per-machine overrides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<MachineOverride>,
    /// Tabs shown, replacing the playground's (empty: the playground's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tabs: Vec<Tab>,
}

/// Changes to one machine of the playground.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineOverride {
    /// The machine.
    pub name: String,
    /// CPU and memory, at most the playground's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Files written at start, added to the playground's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub startup_files: Vec<StartupFile>,
}

/// One unit of a skill path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Unit {
    /// Shown as the unit's heading.
    pub title: String,
    /// What the unit teaches.
    #[serde(default)]
    pub description: String,
    /// Names of challenges and tutorials, in order.
    pub items: Vec<String>,
}

/// The front matter of a course module's `index.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModuleMatter {
    /// The module's heading.
    pub title: String,
    /// What the module covers.
    #[serde(default)]
    pub description: String,
}

/// The front matter of a course lesson.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LessonMatter {
    /// The lesson's heading.
    pub title: String,
    /// One sentence.
    #[serde(default)]
    pub description: String,
    /// The playground beside the lesson.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playground: Option<PlaygroundRef>,
    /// The lesson's tasks.
    #[serde(default)]
    pub tasks: BTreeMap<String, Task>,
}

/// A course module.
#[derive(Debug, Clone, PartialEq)]
pub struct Module {
    /// Folder name.
    pub slug: String,
    /// Front matter of its `index.md` (title defaults to the folder name).
    pub front: ModuleMatter,
    /// Text of its `index.md`.
    pub body: String,
    /// Lessons, sorted by file name.
    pub lessons: Vec<Lesson>,
}

/// A course lesson.
#[derive(Debug, Clone, PartialEq)]
pub struct Lesson {
    /// File name without `.md`.
    pub slug: String,
    /// Front matter.
    pub front: LessonMatter,
    /// Markdown text.
    pub body: String,
    /// `LESSON.solution.md`, if any.
    pub solution: Option<String>,
}

/// A checked item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The item's name (its folder).
    pub name: String,
    /// Front matter of `index.md`.
    pub front: FrontMatter,
    /// Markdown text of `index.md`.
    pub body: String,
    /// `solution.md`, if any.
    pub solution: Option<String>,
    /// Course modules.
    pub modules: Vec<Module>,
    /// Paths of the static files (relative to `__static__/`).
    pub statics: Vec<String>,
}

/// One problem in an item: file, field (may be empty) and reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContentProblem {
    /// Path inside the item's folder (`index.md`, `01-basics/02-files.md`).
    pub file: String,
    /// Field path (`tasks.motd.needs`, `line 12`), or empty.
    pub field: String,
    /// The reason.
    pub message: String,
}

impl fmt::Display for ContentProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.field, self.message)
        }
    }
}

/// An item that could not be accepted: every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ContentError {
    /// At least one problem.
    pub problems: Vec<ContentProblem>,
}

impl fmt::Display for ContentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.problems.iter().map(ToString::to_string).collect();
        f.write_str(&all.join("\n"))
    }
}

impl ContentError {
    fn one(file: &str, field: &str, message: impl Into<String>) -> Self {
        ContentError {
            problems: vec![problem(file, field, message)],
        }
    }
}

fn problem(file: &str, field: &str, message: impl Into<String>) -> ContentProblem {
    ContentProblem {
        file: file.to_string(),
        field: field.to_string(),
        message: message.into(),
    }
}

/// The files of one item, keyed by `/`-separated relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bundle {
    /// Path → bytes.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// Checks a relative bundle path: `/`-separated, no `.`/`..`/empty parts, no hidden files
/// outside `__static__`, printable.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > 200 {
        return Err("a path must have 1-200 characters".into());
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err("a path must be relative, without empty, . or .. parts".into());
        }
        if part.chars().any(|c| c.is_control() || c == '\\') {
            return Err("a path must not contain control characters or backslashes".into());
        }
    }
    Ok(())
}

impl Bundle {
    /// Adds a file, checking its path and the bundle's limits.
    pub fn insert(&mut self, path: &str, data: Vec<u8>) -> Result<(), ContentError> {
        check_path(path).map_err(|m| ContentError::one(path, "", m))?;
        if self.files.len() >= MAX_BUNDLE_FILES {
            return Err(ContentError::one(
                path,
                "",
                format!("an item may have at most {MAX_BUNDLE_FILES} files"),
            ));
        }
        if self.size() + data.len() > MAX_BUNDLE_BYTES {
            return Err(ContentError::one(
                path,
                "",
                "the item is larger than 32 MiB in all",
            ));
        }
        self.files.insert(path.to_string(), data);
        Ok(())
    }

    /// Sum of the file sizes.
    pub fn size(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }

    /// Loads a folder (hidden files and folders, whose names start with `.`, are skipped;
    /// symbolic links are refused).
    pub fn from_dir(dir: &Path) -> Result<Bundle, ContentError> {
        let mut bundle = Bundle::default();
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((d, prefix)) = stack.pop() {
            let shown = if prefix.is_empty() { "." } else { &prefix };
            let entries = std::fs::read_dir(&d).map_err(|e| {
                ContentError::one(shown, "", format!("cannot read {}: {e}", d.display()))
            })?;
            for entry in entries {
                let entry = entry.map_err(|e| {
                    ContentError::one(shown, "", format!("cannot read {}: {e}", d.display()))
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let rel = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                let ft = entry
                    .file_type()
                    .map_err(|e| ContentError::one(&rel, "", e.to_string()))?;
                if ft.is_dir() {
                    stack.push((entry.path(), rel));
                } else if ft.is_file() {
                    let data = std::fs::read(entry.path()).map_err(|e| {
                        ContentError::one(&rel, "", format!("cannot read the file: {e}"))
                    })?;
                    bundle.insert(&rel, data)?;
                } else {
                    return Err(ContentError::one(
                        &rel,
                        "",
                        "only regular files and folders may be part of an item (no links)",
                    ));
                }
            }
        }
        Ok(bundle)
    }

    /// Reads a tar archive (regular files and directories only; paths relative).
    pub fn from_tar(bytes: &[u8]) -> Result<Bundle, ContentError> {
        let bad = |m: String| ContentError::one("(archive)", "", m);
        let mut bundle = Bundle::default();
        let mut archive = tar::Archive::new(bytes);
        let entries = archive
            .entries()
            .map_err(|e| bad(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(format!("not a tar archive: {e}")))?;
            let path = entry
                .path()
                .map_err(|e| bad(format!("a path in the archive is not valid: {e}")))?
                .to_string_lossy()
                .into_owned();
            let path = path
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            match entry.header().entry_type() {
                tar::EntryType::Directory => continue,
                tar::EntryType::Regular | tar::EntryType::Continuous => {}
                _ => {
                    return Err(ContentError::one(
                        &path,
                        "",
                        "only regular files and folders may be part of an item (no links)",
                    ));
                }
            }
            if path
                .split('/')
                .any(|p| p.starts_with('.') && p != "." && p != "..")
            {
                continue;
            }
            let size = entry.header().size().unwrap_or(u64::MAX);
            if size > MAX_BUNDLE_BYTES as u64 {
                return Err(ContentError::one(
                    &path,
                    "",
                    "the item is larger than 32 MiB in all",
                ));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .read_to_end(&mut data)
                .map_err(|e| ContentError::one(&path, "", format!("cannot read: {e}")))?;
            bundle.insert(&path, data)?;
        }
        Ok(bundle)
    }

    /// Writes the bundle as a tar archive (sorted paths, fixed metadata: same files, same bytes).
    pub fn to_tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            // Writing into a Vec cannot fail, and the paths were checked on insert.
            let _ = builder.append_data(&mut header, path, data.as_slice());
        }
        builder.into_inner().unwrap_or_default()
    }

    fn text(&self, path: &str) -> Result<Option<String>, ContentError> {
        match self.files.get(path) {
            None => Ok(None),
            Some(b) => String::from_utf8(b.clone())
                .map(Some)
                .map_err(|_| ContentError::one(path, "", "not UTF-8 text")),
        }
    }
}

/// Whether `s` is a valid item name: `[a-z0-9-]`, 3–40 characters, not starting with `-`.
pub fn is_item_name(s: &str) -> bool {
    (3..=40).contains(&s.len())
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Splits `---\nYAML\n---\nBODY`.
fn split_front_matter<'a>(file: &str, text: &'a str) -> Result<(&'a str, &'a str), ContentError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let missing = || {
        ContentError::one(
            file,
            "",
            "must start with YAML front matter between two lines of ---",
        )
    };
    let rest = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))
        .ok_or_else(missing)?;
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if line.trim_end() == "---" {
            return Ok((&rest[..offset], &rest[offset + line.len()..]));
        }
        offset += line.len();
    }
    Err(missing())
}

fn parse_yaml<T: serde::de::DeserializeOwned>(file: &str, yaml: &str) -> Result<T, ContentError> {
    let tree: serde_json::Value = serde_saphyr::from_str(yaml)
        .map_err(|e| ContentError::one(file, "front matter", format!("not valid YAML: {e}")))?;
    if !tree.is_object() {
        return Err(ContentError::one(
            file,
            "front matter",
            "must be a mapping of fields",
        ));
    }
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ContentError::one(file, &path, e.into_inner().to_string())
    })
}

/// Parses and checks a bundle named `name` (everything that needs no platform).
pub fn parse_bundle(name: &str, bundle: &Bundle) -> Result<Item, ContentError> {
    if !is_item_name(name) {
        return Err(ContentError::one(
            ".",
            "name",
            format!("{name:?} is not an item name: 3-40 characters [a-z0-9-], the folder's name"),
        ));
    }
    let index = bundle.text("index.md")?.ok_or_else(|| {
        ContentError::one("index.md", "", "missing: every item needs an index.md")
    })?;
    let (yaml, body) = split_front_matter("index.md", &index)?;
    let front: FrontMatter = match parse_yaml("index.md", yaml) {
        Ok(f) => f,
        Err(mut e) => {
            // Name an unknown kind plainly rather than serde's enum wording.
            if let Ok(serde_json::Value::Object(map)) =
                serde_saphyr::from_str::<serde_json::Value>(yaml)
            {
                match map.get("kind") {
                    Some(serde_json::Value::String(k)) if ContentKind::parse(k).is_none() => {
                        e = ContentError::one(
                            "index.md",
                            "kind",
                            format!(
                                "{k:?} is not a kind of content (tutorial, challenge, course, skill-path)"
                            ),
                        );
                    }
                    None => {
                        e = ContentError::one(
                            "index.md",
                            "kind",
                            "missing (tutorial, challenge, course or skill-path)",
                        );
                    }
                    _ => {}
                }
            }
            return Err(e);
        }
    };
    let mut problems = Vec::new();
    let statics: Vec<String> = bundle
        .files
        .keys()
        .filter_map(|p| p.strip_prefix("__static__/").map(str::to_string))
        .collect();
    let solution = bundle.text("solution.md")?;

    check_common(&front, &mut problems);
    check_markdown("index.md", body, bundle, &front.tasks, &mut problems);
    if let Some(cover) = &front.cover
        && !statics.contains(cover)
    {
        problems.push(problem(
            "index.md",
            "cover",
            format!("{cover:?} is not a file in __static__/"),
        ));
    }
    if let Some(p) = &front.playground {
        check_playground_ref("index.md", "playground", p, &mut problems);
    }
    check_tasks("index.md", &front.tasks, &mut problems);

    let mut modules = Vec::new();
    match front.kind {
        ContentKind::Challenge => {
            if front.playground.is_none() {
                problems.push(problem(
                    "index.md",
                    "playground",
                    "a challenge needs a playground",
                ));
            }
            if !front.tasks.values().any(|t| !t.init && !t.helper) {
                problems.push(problem(
                    "index.md",
                    "tasks",
                    "a challenge needs at least one task the student completes",
                ));
            }
        }
        ContentKind::Tutorial => {
            if !front.tasks.is_empty() && front.playground.is_none() {
                problems.push(problem(
                    "index.md",
                    "tasks",
                    "tasks run in a playground: add playground",
                ));
            }
        }
        ContentKind::Course => {
            for (field, set) in [
                ("playground", front.playground.is_some()),
                ("tasks", !front.tasks.is_empty()),
            ] {
                if set {
                    problems.push(problem(
                        "index.md",
                        field,
                        "a course has no playground or tasks of its own; lessons have them",
                    ));
                }
            }
            modules = parse_modules(bundle, &mut problems);
            if modules.is_empty() {
                problems.push(problem(
                    ".",
                    "",
                    "a course needs at least one module folder holding lesson files",
                ));
            }
        }
        ContentKind::SkillPath => {
            for (field, set) in [
                ("playground", front.playground.is_some()),
                ("tasks", !front.tasks.is_empty()),
            ] {
                if set {
                    problems.push(problem(
                        "index.md",
                        field,
                        "a skill path has no playground or tasks; its units point at items",
                    ));
                }
            }
            if front.units.is_empty() {
                problems.push(problem("index.md", "units", "a skill path needs units"));
            }
            for (i, u) in front.units.iter().enumerate() {
                if u.title.trim().is_empty() {
                    problems.push(problem(
                        "index.md",
                        &format!("units[{i}].title"),
                        "must not be empty",
                    ));
                }
                if u.items.is_empty() {
                    problems.push(problem(
                        "index.md",
                        &format!("units[{i}].items"),
                        "a unit needs at least one item",
                    ));
                }
                for (j, it) in u.items.iter().enumerate() {
                    if !is_item_name(it) || it == name {
                        problems.push(problem(
                            "index.md",
                            &format!("units[{i}].items[{j}]"),
                            format!("{it:?} is not the name of another item"),
                        ));
                    }
                }
            }
        }
    }
    if front.kind != ContentKind::SkillPath && !front.units.is_empty() {
        problems.push(problem("index.md", "units", "only a skill path has units"));
    }
    if solution.is_some() && front.playground.is_none() {
        problems.push(problem(
            "solution.md",
            "",
            "a solution needs a playground to run in (index.md has none)",
        ));
    }
    // Files that are not part of the format.
    for path in bundle.files.keys() {
        let top_level = !path.contains('/');
        let known = path == "index.md"
            || path == "solution.md"
            || path.starts_with("__static__/")
            || (front.kind == ContentKind::Course && !top_level && path.ends_with(".md"));
        if !known {
            problems.push(problem(
                path,
                "",
                "not part of an item (index.md, solution.md, __static__/…, and for courses module/lesson.md)",
            ));
        }
    }
    if problems.is_empty() {
        Ok(Item {
            name: name.to_string(),
            front,
            body: body.to_string(),
            solution,
            modules,
            statics,
        })
    } else {
        Err(ContentError { problems })
    }
}

fn check_common(front: &FrontMatter, problems: &mut Vec<ContentProblem>) {
    let t = front.title.trim();
    if t.is_empty() || t.chars().count() > 120 {
        problems.push(problem("index.md", "title", "must have 1-120 characters"));
    }
    if front.description.chars().count() > 500 {
        problems.push(problem(
            "index.md",
            "description",
            "must have at most 500 characters",
        ));
    }
    for (i, name) in front.access.iter().enumerate() {
        if name.is_empty()
            || name.len() > 40
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            problems.push(problem(
                "index.md",
                &format!("access[{i}]"),
                format!("{name:?} is not a user name (1-40 characters of a-z, 0-9, - and _)"),
            ));
        }
    }
    for (field, list) in [("categories", &front.categories), ("tags", &front.tags)] {
        if list.len() > 20 {
            problems.push(problem("index.md", field, "at most 20 entries"));
        }
        for (i, w) in list.iter().enumerate() {
            if w.is_empty()
                || w.len() > 30
                || !w
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                problems.push(problem(
                    "index.md",
                    &format!("{field}[{i}]"),
                    format!("{w:?} must be 1-30 characters [a-z0-9-]"),
                ));
            }
        }
    }
}

fn check_playground_ref(
    file: &str,
    field: &str,
    p: &PlaygroundRef,
    problems: &mut Vec<ContentProblem>,
) {
    if !is_item_name(&p.name) {
        problems.push(problem(
            file,
            &format!("{field}.name"),
            format!("{:?} is not a playground name", p.name),
        ));
    }
    let mut seen = HashSet::new();
    for (i, m) in p.machines.iter().enumerate() {
        if !seen.insert(m.name.as_str()) {
            problems.push(problem(
                file,
                &format!("{field}.machines[{i}].name"),
                format!("machine {:?} is listed twice", m.name),
            ));
        }
    }
}

fn check_tasks(file: &str, tasks: &BTreeMap<String, Task>, problems: &mut Vec<ContentProblem>) {
    // Machines are checked against the playground later; accept every name here.
    let machines: HashSet<&str> = tasks
        .values()
        .filter_map(|t| t.machine.as_deref())
        .collect();
    let mut errs = Vec::new();
    crate::validate::validate_tasks(tasks, &machines, &mut errs);
    for e in errs {
        let field = e
            .path
            .strip_prefix("playground.")
            .unwrap_or(&e.path)
            .to_string();
        problems.push(problem(file, &field, e.message));
    }
}

/// Reads `::task{name=…}` lines: (1-based line, task name or the raw attributes when malformed).
pub fn task_directives(body: &str) -> Vec<(usize, Result<String, String>)> {
    let mut out = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (i, line) in body.lines().enumerate() {
        let t = line.trim();
        if let Some(f) = fence_of(t) {
            match fence {
                None => fence = Some(f),
                Some((c, n))
                    if f.0 == c && f.1 >= n && t.trim_start_matches(c).trim().is_empty() =>
                {
                    fence = None
                }
                _ => {}
            }
            continue;
        }
        if fence.is_some() {
            continue;
        }
        if let Some(rest) = t.strip_prefix("::task") {
            let parsed = rest
                .strip_prefix('{')
                .and_then(|r| r.strip_suffix('}'))
                .and_then(|r| r.trim().strip_prefix("name="))
                .map(|n| n.trim_matches('"').to_string())
                .filter(|n| !n.is_empty());
            out.push((i + 1, parsed.ok_or_else(|| rest.to_string())));
        }
    }
    out
}

/// A fence opener/closer: (char, length) when the line starts with ≥ 3 backticks or tildes.
pub(crate) fn fence_of(trimmed: &str) -> Option<(char, usize)> {
    let c = trimmed.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = trimmed.chars().take_while(|x| *x == c).count();
    (n >= 3).then_some((c, n))
}

/// Images and links in Markdown that point into the bundle must exist; `::task` lines must
/// name tasks.
fn check_markdown(
    file: &str,
    body: &str,
    bundle: &Bundle,
    tasks: &BTreeMap<String, Task>,
    problems: &mut Vec<ContentProblem>,
) {
    let dir = file.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    for ev in Parser::new_ext(body, Options::ENABLE_TABLES) {
        let (dest, what) = match &ev {
            Event::Start(Tag::Image { dest_url, .. }) => (dest_url.to_string(), "image"),
            Event::Start(Tag::Link { dest_url, .. }) => (dest_url.to_string(), "link"),
            _ => continue,
        };
        if let Some(rel) = bundle_target(&dest) {
            let path = if dir.is_empty() || rel.starts_with("__static__/") {
                rel.to_string()
            } else {
                format!("{dir}/{rel}")
            };
            let in_static = rel.starts_with("__static__/");
            if what == "image" && !in_static {
                problems.push(problem(
                    file,
                    "",
                    format!("image {dest:?}: images live in __static__/ (write __static__/NAME)"),
                ));
            } else if in_static && !bundle.files.contains_key(&path) {
                problems.push(problem(
                    file,
                    "",
                    format!("{what} {dest:?}: there is no file {path}"),
                ));
            }
        }
    }
    for (line, d) in task_directives(body) {
        match d {
            Ok(name) if tasks.contains_key(&name) => {}
            Ok(name) => problems.push(problem(
                file,
                &format!("line {line}"),
                format!("::task{{name={name}}} names no task in the front matter"),
            )),
            Err(raw) => problems.push(problem(
                file,
                &format!("line {line}"),
                format!("::task{raw} must be written ::task{{name=TASK}}"),
            )),
        }
    }
}

/// A destination inside the bundle (relative, no scheme, no fragment-only), without `./`.
pub fn bundle_target(dest: &str) -> Option<&str> {
    if dest.is_empty()
        || dest.starts_with('#')
        || dest.starts_with('/')
        || dest.starts_with("//")
        || dest.contains(':')
    {
        return None;
    }
    let d = dest.strip_prefix("./").unwrap_or(dest);
    Some(d.split(['#', '?']).next().unwrap_or(d))
}

fn parse_modules(bundle: &Bundle, problems: &mut Vec<ContentProblem>) -> Vec<Module> {
    let mut dirs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for path in bundle.files.keys() {
        if let Some((dir, file)) = path.split_once('/')
            && dir != STATIC_DIR
        {
            if file.contains('/') {
                problems.push(problem(
                    path,
                    "",
                    "a module holds lesson files only (no sub-folders)",
                ));
                continue;
            }
            dirs.entry(dir.to_string())
                .or_default()
                .push(file.to_string());
        }
    }
    let mut modules = Vec::new();
    for (slug, files) in dirs {
        if slug.is_empty()
            || !slug
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            problems.push(problem(
                &slug,
                "",
                "a module folder's name must be [a-z0-9-_]",
            ));
        }
        let mut front = ModuleMatter {
            title: slug.clone(),
            description: String::new(),
        };
        let mut body = String::new();
        let mut lessons = Vec::new();
        let mut solutions: BTreeMap<String, String> = BTreeMap::new();
        for f in files {
            let path = format!("{slug}/{f}");
            if let Some(lesson) = f.strip_suffix(".solution.md") {
                match bundle.text(&path) {
                    Ok(Some(t)) => {
                        solutions.insert(lesson.to_string(), t);
                    }
                    Ok(None) => {}
                    Err(e) => problems.extend(e.problems),
                }
                continue;
            }
            let text = match bundle.text(&path) {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    problems.extend(e.problems);
                    continue;
                }
            };
            let (yaml, text_body) = match split_front_matter(&path, &text) {
                Ok(x) => x,
                Err(e) => {
                    problems.extend(e.problems);
                    continue;
                }
            };
            if f == "index.md" {
                match parse_yaml::<ModuleMatter>(&path, yaml) {
                    Ok(m) => front = m,
                    Err(e) => problems.extend(e.problems),
                }
                body = text_body.to_string();
                check_markdown(&path, text_body, bundle, &BTreeMap::new(), problems);
                continue;
            }
            let Some(lesson_slug) = f.strip_suffix(".md") else {
                continue;
            };
            if lesson_slug.is_empty()
                || !lesson_slug
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            {
                problems.push(problem(
                    &path,
                    "",
                    "a lesson file's name must be [a-z0-9-_].md",
                ));
                continue;
            }
            match parse_yaml::<LessonMatter>(&path, yaml) {
                Ok(l) => {
                    if l.title.trim().is_empty() {
                        problems.push(problem(&path, "title", "must not be empty"));
                    }
                    if let Some(p) = &l.playground {
                        check_playground_ref(&path, "playground", p, problems);
                    }
                    if !l.tasks.is_empty() && l.playground.is_none() {
                        problems.push(problem(
                            &path,
                            "tasks",
                            "tasks run in a playground: add playground",
                        ));
                    }
                    check_tasks(&path, &l.tasks, problems);
                    check_markdown(&path, text_body, bundle, &l.tasks, problems);
                    lessons.push(Lesson {
                        slug: lesson_slug.to_string(),
                        front: l,
                        body: text_body.to_string(),
                        solution: None,
                    });
                }
                Err(e) => problems.extend(e.problems),
            }
        }
        for (lesson, text) in solutions {
            let path = format!("{slug}/{lesson}.solution.md");
            match lessons.iter_mut().find(|l| l.slug == lesson) {
                Some(l) if l.front.playground.is_some() => l.solution = Some(text),
                Some(_) => problems.push(problem(
                    &path,
                    "",
                    "a solution needs a playground to run in (the lesson has none)",
                )),
                None => problems.push(problem(
                    &path,
                    "",
                    format!("there is no lesson {lesson}.md for this solution"),
                )),
            }
        }
        if lessons.is_empty() {
            problems.push(problem(
                &slug,
                "",
                "a module needs at least one lesson file",
            ));
        }
        modules.push(Module {
            slug,
            front,
            body,
            lessons,
        });
    }
    modules
}

impl Item {
    /// Every playground the item (or its lessons) names, with the file naming it.
    pub fn playgrounds(&self) -> Vec<(String, &PlaygroundRef, &BTreeMap<String, Task>)> {
        let mut out = Vec::new();
        if let Some(p) = &self.front.playground {
            out.push(("index.md".to_string(), p, &self.front.tasks));
        }
        for m in &self.modules {
            for l in &m.lessons {
                if let Some(p) = &l.front.playground {
                    out.push((format!("{}/{}.md", m.slug, l.slug), p, &l.front.tasks));
                }
            }
        }
        out
    }

    /// A course lesson by `MODULE/LESSON`.
    pub fn lesson(&self, path: &str) -> Option<(&Module, &Lesson)> {
        let (m, l) = path.split_once('/')?;
        let module = self.modules.iter().find(|x| x.slug == m)?;
        let lesson = module.lessons.iter().find(|x| x.slug == l)?;
        Some((module, lesson))
    }

    /// Every lesson's `MODULE/LESSON` path, in course order.
    pub fn lesson_paths(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| {
                m.lessons
                    .iter()
                    .map(move |l| format!("{}/{}", m.slug, l.slug))
            })
            .collect()
    }

    /// Items a skill path points at.
    pub fn referenced_items(&self) -> BTreeSet<&str> {
        self.front
            .units
            .iter()
            .flat_map(|u| u.items.iter().map(String::as_str))
            .collect()
    }

    /// Checks `solution.md` against the item's effective manifest.
    pub fn check_solution(&self, manifest: &Manifest) -> Result<(), ContentError> {
        let Some(text) = &self.solution else {
            return Ok(());
        };
        check_solution_text("solution.md", text, manifest)
    }

    /// What `content test` plays: `(None, solution)` for `index.md`, `(Some("MODULE/LESSON"),
    /// solution)` for each lesson with one, each with its playground and tasks.
    pub fn solutions(&self) -> Vec<SolutionTarget<'_>> {
        let mut out = Vec::new();
        if let (Some(p), Some(s)) = (&self.front.playground, &self.solution) {
            out.push(SolutionTarget {
                lesson: None,
                file: "index.md".into(),
                playground: p,
                tasks: &self.front.tasks,
                solution: s,
            });
        }
        for m in &self.modules {
            for l in &m.lessons {
                if let (Some(p), Some(s)) = (&l.front.playground, &l.solution) {
                    out.push(SolutionTarget {
                        lesson: Some(format!("{}/{}", m.slug, l.slug)),
                        file: format!("{}/{}.md", m.slug, l.slug),
                        playground: p,
                        tasks: &l.front.tasks,
                        solution: s,
                    });
                }
            }
        }
        out
    }
}

/// One solution to play: the item's own or a lesson's.
#[derive(Debug, Clone)]
pub struct SolutionTarget<'a> {
    /// `MODULE/LESSON`, or `None` for `index.md`.
    pub lesson: Option<String>,
    /// The file whose front matter names the playground.
    pub file: String,
    /// The playground.
    pub playground: &'a PlaygroundRef,
    /// Its tasks.
    pub tasks: &'a BTreeMap<String, Task>,
    /// The solution text.
    pub solution: &'a str,
}

/// Parses a solution (`file` names it in errors) against an effective manifest.
pub fn check_solution_text(
    file: &str,
    text: &str,
    manifest: &Manifest,
) -> Result<(), ContentError> {
    crate::parse_solution(text, manifest)
        .map(|_| ())
        .map_err(|e| from_manifest_error(file, e))
}

fn from_manifest_error(file: &str, e: ManifestError) -> ContentError {
    ContentError {
        problems: e
            .errors
            .into_iter()
            .map(|FieldError { path, message }| problem(file, &path, message))
            .collect(),
    }
}

/// The manifest a run of this item starts from: the playground's, with the item's overrides
/// applied and its tasks in place of the playground's (when it has any). `file` and `field`
/// name where the reference was written, for errors.
pub fn effective_manifest(
    file: &str,
    playground: &Manifest,
    reference: &PlaygroundRef,
    tasks: &BTreeMap<String, Task>,
) -> Result<Manifest, ContentError> {
    let mut m = playground.clone();
    let mut problems = Vec::new();
    for (i, o) in reference.machines.iter().enumerate() {
        let field = format!("playground.machines[{i}]");
        let Some(machine) = m.playground.machines.iter_mut().find(|x| x.name == o.name) else {
            problems.push(problem(
                file,
                &format!("{field}.name"),
                format!("playground {} has no machine {:?}", playground.name, o.name),
            ));
            continue;
        };
        if let Some(r) = &o.resources {
            if r.cpu > machine.resources.cpu {
                problems.push(problem(
                    file,
                    &format!("{field}.resources.cpu"),
                    format!(
                        "{} is more than the playground's {}",
                        r.cpu, machine.resources.cpu
                    ),
                ));
            }
            if r.memory > machine.resources.memory {
                problems.push(problem(
                    file,
                    &format!("{field}.resources.memory"),
                    format!(
                        "{} is more than the playground's {}",
                        r.memory, machine.resources.memory
                    ),
                ));
            }
            machine.resources = r.clone();
        }
        machine
            .startup_files
            .extend(o.startup_files.iter().cloned());
    }
    if !reference.tabs.is_empty() {
        m.playground.tabs = reference.tabs.clone();
    }
    if !tasks.is_empty() {
        m.playground.tasks = tasks.clone();
    }
    if !problems.is_empty() {
        return Err(ContentError { problems });
    }
    let errors = crate::validate::validate(&m);
    if errors.is_empty() {
        Ok(m)
    } else {
        Err(ContentError {
            problems: errors
                .into_iter()
                .map(|e| {
                    let field = e.path.strip_prefix("playground.").unwrap_or(&e.path);
                    let field = if field.starts_with("tasks") {
                        field.to_string()
                    } else {
                        format!("playground ({}): {field}", playground.name)
                    };
                    problem(file, &field, e.message)
                })
                .collect(),
        })
    }
}

/// A working example of `kind` named `name` (what `ironlab content create` writes).
pub fn scaffold(kind: ContentKind, name: &str) -> Bundle {
    let mut b = Bundle::default();
    let mut put = |p: &str, s: String| {
        b.files.insert(p.to_string(), s.into_bytes());
    };
    match kind {
        ContentKind::Challenge => {
            put(
                "index.md",
                format!(
                    "---\nkind: challenge\ntitle: \"{name}\"\ndescription: Create a file with the right content.\n\
                     categories: [linux]\ntags: [files]\ndifficulty: easy\nvisibility: private\n\
                     playground:\n  name: debian\ntasks:\n  hello:\n    user: laborant\n    \
                     run: grep -qx world ~/hello.txt\n    hintcheck: echo \"Write the word world into ~/hello.txt.\"\n---\n\n\
                     # {name}\n\nCreate the file `hello.txt` in your home directory holding the single word `world`.\n\n\
                     ::task{{name=hello}}\n\n:::hint Stuck?\nRedirect the output of `echo` into the file.\n:::\n"
                ),
            );
            put(
                "solution.md",
                "# Solution\n\n```sh user=laborant\necho world > ~/hello.txt\n```\n".to_string(),
            );
        }
        ContentKind::Tutorial => {
            put(
                "index.md",
                format!(
                    "---\nkind: tutorial\ntitle: \"{name}\"\ndescription: A short walk through the shell.\n\
                     categories: [linux]\ndifficulty: easy\nvisibility: private\nplayground:\n  name: debian\n\
                     tasks:\n  listed:\n    user: laborant\n    run: test -d ~/tour\n---\n\n\
                     # {name}\n\nMake a folder for this tour:\n\n```sh\nmkdir ~/tour\n```\n\n::task{{name=listed}}\n"
                ),
            );
            put(
                "solution.md",
                "```sh user=laborant\nmkdir -p ~/tour\n```\n".to_string(),
            );
        }
        ContentKind::Course => {
            put(
                "index.md",
                format!(
                    "---\nkind: course\ntitle: \"{name}\"\ndescription: A course in modules.\nvisibility: private\n---\n\n# {name}\n"
                ),
            );
            put(
                "01-basics/index.md",
                "---\ntitle: Basics\n---\n\nThe first module.\n".to_string(),
            );
            put(
                "01-basics/01-first.md",
                "---\ntitle: The first lesson\nplayground:\n  name: debian\ntasks:\n  hello:\n    run: test -e /tmp/hello\n---\n\n\
                 Run `touch /tmp/hello`.\n\n::task{name=hello}\n"
                    .to_string(),
            );
        }
        ContentKind::SkillPath => {
            put(
                "index.md",
                format!(
                    "---\nkind: skill-path\ntitle: \"{name}\"\ndescription: Challenges in order.\nvisibility: private\n\
                     units:\n  - title: Start here\n    items: [debian-basics]\n---\n\n# {name}\n"
                ),
            );
        }
    }
    b
}

#[cfg(test)]
mod tests;
