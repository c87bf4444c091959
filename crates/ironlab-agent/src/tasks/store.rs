//! The engine's state on disk: one JSON file, written atomically (temp file + fsync + rename)
//! on every state or hint change, read at agent start.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{External, TaskSet, TaskStatus};

/// Format version of the file.
pub const VERSION: u32 = 1;

/// What is saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// [`VERSION`].
    pub version: u32,
    /// The task set.
    pub set: TaskSet,
    /// Last event sequence number.
    pub seq: u64,
    /// State per task.
    pub tasks: HashMap<String, TaskStatus>,
    /// External needs' states.
    #[serde(default)]
    pub external: BTreeMap<String, External>,
}

impl Saved {
    /// A snapshot of the engine's state.
    pub fn of(
        set: &TaskSet,
        tasks: &HashMap<String, TaskStatus>,
        external: &BTreeMap<String, External>,
        seq: u64,
    ) -> Self {
        Saved {
            version: VERSION,
            set: set.clone(),
            seq,
            tasks: tasks.clone(),
            external: external.clone(),
        }
    }
}

/// Writes `saved` to `path` atomically, creating the directory.
pub fn save(path: &Path, saved: &Saved) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let json = serde_json::to_vec(saved).context("cannot encode the task state")?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().with_context(|| format!("cannot write the task state {}", path.display()))
}

/// Reads the state at `path`; None when there is none.
pub fn load(path: &Path) -> anyhow::Result<Option<Saved>> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the task state {}", path.display()));
        }
    };
    let saved: Saved = serde_json::from_slice(&bytes)
        .with_context(|| format!("cannot parse the task state {}", path.display()))?;
    anyhow::ensure!(
        saved.version == VERSION,
        "task state {} has version {}, expected {VERSION}",
        path.display(),
        saved.version
    );
    Ok(Some(saved))
}
