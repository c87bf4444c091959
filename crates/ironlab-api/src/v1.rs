//! The control plane's public REST API (`/api/v1`, `Authorization: Bearer <API token>`).
//!
//! ```text
//! GET    /api/v1/openapi.json
//! GET    /api/v1/health                            {"status":"ok"} (no token needed)
//! GET    /api/v1/me                                UserView
//! POST   /api/v1/users              CreateUser     201 CreatedUser (admins only)
//! GET    /api/v1/playgrounds                       [PlaygroundView]
//! POST   /api/v1/playgrounds        manifest JSON  201 PlaygroundView
//! GET    /api/v1/playgrounds/{name}                PlaygroundView
//! DELETE /api/v1/playgrounds/{name}                204
//! GET    /api/v1/runs                              [RunView]
//! POST   /api/v1/runs               StartRun       201 RunView (state pending)
//! GET    /api/v1/runs/{id}                         RunView
//! PATCH  /api/v1/runs/{id}          UpdateRun      RunView
//! DELETE /api/v1/runs/{id}                         202 RunView (state destroying)
//! POST   /api/v1/runs/{id}/connect  Connect        ConnectResponse (single-use token, 30 s;
//!                                                  the terminal, or a TCP port with `port`)
//! POST   /api/v1/runs/{id}/http-ports OpenHttpPort HttpPortLink (a browser link to an HTTP port)
//! GET    /api/v1/runs/{id}/events                  SSE: `run` (RunView) and `task` (TaskView) events
//! GET    /api/v1/runs/{id}/tasks                   RunTasksView
//! POST   /api/v1/runs/{id}/tasks/{name}/input  TaskInput  TaskInputResult
//! POST   /api/v1/runs/{id}/stop                    202 RunView (stopping → stopped)
//! POST   /api/v1/runs/{id}/restart                 202 RunView (restarting → running)
//! POST   /api/v1/runs/{id}/clone    CloneRequest   201 RunView (a new stopped run)
//! POST   /api/v1/runs/{id}/save     SaveRequest    201 PlaygroundView (parent = the run's playground)
//! GET    /api/v1/storage                           StorageView (the caller's use and quota)
//! PUT    /api/v1/users/{name}/storage-quota  SetQuota  StorageView of that user (admins only)
//! GET    /api/v1/content?kind&difficulty&q         [ContentView] (public + own; admins: all)
//! POST   /api/v1/content?name=N     tar archive    201 ContentView (next version; authors)
//! GET    /api/v1/content/{name}                    ContentView
//! DELETE /api/v1/content/{name}                    204 (author or admin)
//! GET    /api/v1/content/{name}/bundle?version=V   tar archive (author or admin)
//! POST   /api/v1/content/{name}/runs  StartContentRun  201 RunView (the item's playground + tasks)
//! PUT    /api/v1/users/{name}/author               204 (admins: make a content author)
//! DELETE /api/v1/users/{name}/author               204 (admins: take the role away)
//! ```
//! Errors: [`crate::ErrorBody`] with 400/401/403/404/409/5xx.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The signed-in user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    /// User id.
    pub id: String,
    /// Login name.
    pub name: String,
    /// `admin` or `user`.
    pub role: String,
}

/// Create a user (admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// Login name: 1–40 characters of `a-z`, `0-9`, `-`, `_`.
    pub name: String,
    /// `admin` or `user` (default).
    #[serde(default = "default_role")]
    pub role: String,
}

fn default_role() -> String {
    "user".to_string()
}

/// A user just created, with their first API token (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreatedUser {
    /// The user.
    pub user: UserView,
    /// Their API token (`ilt_…`); only its hash is stored.
    pub token: String,
}

/// A playground in the catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlaygroundView {
    /// Unique name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Machine names.
    pub machines: Vec<String>,
    /// Built into the platform.
    pub stock: bool,
    /// Owner user id (empty for stock playgrounds).
    pub owner: String,
    /// The playground this one was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
    /// The full manifest.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
}

/// Start a run of a playground.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRun {
    /// Playground name.
    pub playground: String,
    /// Title of the run; default: the playground's title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Change a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateRun {
    /// New title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Lifecycle state of a run, as the control plane records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Recorded, not yet sent to a worker.
    Pending,
    /// A worker is starting it.
    Starting,
    /// Every machine is ready.
    Running,
    /// Being removed from its worker.
    Destroying,
    /// Gone; the record stays.
    Destroyed,
    /// Could not start or broke; see `reason`.
    Failed,
    /// Its machines are shutting down; the drives are kept.
    Stopping,
    /// No machine runs; the drives are kept until it is destroyed (restart, clone or save it).
    Stopped,
    /// A stopped run booting again on its drives.
    Restarting,
}

impl RunState {
    /// The name used in JSON and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Destroying => "destroying",
            RunState::Destroyed => "destroyed",
            RunState::Failed => "failed",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
            RunState::Restarting => "restarting",
        }
    }

    /// Parses the SQL/JSON name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RunState::Pending,
            "starting" => RunState::Starting,
            "running" => RunState::Running,
            "destroying" => RunState::Destroying,
            "destroyed" => RunState::Destroyed,
            "failed" => RunState::Failed,
            "stopping" => RunState::Stopping,
            "stopped" => RunState::Stopped,
            "restarting" => RunState::Restarting,
            _ => return None,
        })
    }
}

/// A run (a started playground).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunView {
    /// Run id.
    pub id: String,
    /// Playground it runs.
    pub playground: String,
    /// Title.
    pub title: String,
    /// State.
    pub state: RunState,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Machine names.
    pub machines: Vec<String>,
    /// Owner user id.
    pub owner: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// Last state change.
    pub updated_at: DateTime<Utc>,
    /// Bytes of storage only this run holds (measured while it is stopped; extents shared with
    /// its image, clones or saves are not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
    /// The run this one was cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
    /// A stopped run's off-host snapshot: `uploading`, `uploaded` (its drives are in the
    /// snapshot store: the run survives the loss of its worker's pool) or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The worker (by its configured name) the run is pinned to; absent for runs recorded
    /// before workers had names (they are on the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// A worker of the control plane, as it answers now (admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkerView {
    /// Configured name (`--worker-url NAME=URL`).
    pub name: String,
    /// Its API URL.
    pub url: String,
    /// Whether `/v1/status` answered just now.
    pub reachable: bool,
    /// Why not, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Its version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Runtimes it offers (`container`, `microvm`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// `kvm`, `tcg` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// CPUs of its host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory of its host, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Runs pinned to it that hold (or are about to hold) machines, from the database.
    pub active_runs: u64,
    /// All runs pinned to it that are not destroyed (stopped ones keep drives there).
    pub runs: u64,
}

/// Clone a stopped run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// Title of the clone; default: the source's title + " (clone)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
}

/// Save a stopped run as a new playground.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveRequest {
    /// Name of the new playground (`[a-z0-9-]`, 3–40 characters).
    pub name: String,
    /// Title; default: the run's title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Description; default: the source playground's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Set a user's storage quota (admins only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuota {
    /// Bytes, or `null` for the platform default.
    pub bytes: Option<u64>,
}

/// One thing that holds storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageItem {
    /// `run` or `playground`.
    pub kind: String,
    /// Run id or playground name.
    pub id: String,
    /// Title.
    pub title: String,
    /// Bytes it holds.
    pub bytes: u64,
}

/// A user's storage: stopped runs and saved playgrounds against their quota.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StorageView {
    /// Bytes used.
    pub used_bytes: u64,
    /// The user's quota in bytes.
    pub quota_bytes: u64,
    /// What holds it.
    pub items: Vec<StorageItem>,
}

/// Ask for a terminal connection, or with `port` for a connection to a TCP port of the machine
/// (`ironlab_api::portfwd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Connect {
    /// Machine; default: the first machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// A TCP port inside the machine (1–65535) instead of the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// A single-use connection to a machine's terminal relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConnectResponse {
    /// WebSocket URL including the token; open it within `expires_at`.
    pub url: String,
    /// The token alone.
    pub token: String,
    /// Machine it opens.
    pub machine: String,
    /// The port it opens; absent for a terminal connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Expiry (30 s after issue).
    pub expires_at: DateTime<Utc>,
}

/// State of a task: `blocked → running → completed | failed`, never back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for the tasks it needs.
    Blocked,
    /// Being checked (every `interval`), or waiting for an answer (input tasks).
    Running,
    /// Passed; stays so.
    Completed,
    /// Its failcheck failed: the student broke something for good.
    Failed,
}

impl TaskState {
    /// The name used in JSON and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
        }
    }

    /// Parses the SQL/JSON name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "blocked" => TaskState::Blocked,
            "running" => TaskState::Running,
            "completed" => TaskState::Completed,
            "failed" => TaskState::Failed,
            _ => return None,
        })
    }

    /// Whether a task in this state never changes again.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed)
    }
}

/// A task of a run, as the student sees it (helper tasks are never shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Task name.
    pub name: String,
    /// Machine it runs on.
    pub machine: String,
    /// State.
    pub state: TaskState,
    /// The current hint (empty = none); for a failed task, what broke.
    #[serde(default)]
    pub hint: String,
    /// Setup task: the run is ready for the student once every init task completed.
    pub init: bool,
    /// The student answers it (`POST …/tasks/{name}/input`).
    pub input: bool,
    /// Attempts made so far.
    pub attempt: u32,
    /// When it entered this state (or its hint changed); absent before the first report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DateTime<Utc>>,
}

/// The tasks of a run (`GET /api/v1/runs/{id}/tasks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunTasksView {
    /// Run id.
    pub run: String,
    /// Every init task completed (true when there are none): the playground is set up.
    pub ready: bool,
    /// Every task, in checklist order (init tasks first, then by dependencies).
    pub tasks: Vec<TaskView>,
}

/// Ask for a browser link to an HTTP server inside a machine (what an `http-port` tab opens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenHttpPort {
    /// Machine; default: the first machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// The TCP port the server listens on inside the machine (1–65535).
    pub port: u16,
}

/// A single-use sign-in link to a machine's HTTP port. The port is served at the root of its
/// own host, `{run}-{port}-{machine}.{domain}` (`*.localhost` when the control plane is reached
/// by IP address or as `localhost`); opening the link sets a cookie for that host only, then
/// redirects to `/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HttpPortLink {
    /// Open this in a browser within `expires_at`; it works once.
    pub url: String,
    /// Machine it serves.
    pub machine: String,
    /// Port it serves.
    pub port: u16,
    /// Expiry of the link (60 s after issue); the browser session it starts lasts longer.
    pub expires_at: DateTime<Utc>,
}

/// A content item (tutorial, challenge, course or skill path) as the catalog shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContentView {
    /// Item name (its folder's name).
    pub name: String,
    /// tutorial | challenge | course | skill-path.
    pub kind: String,
    /// Latest published version (1, 2, …).
    pub version: i64,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Categories.
    pub categories: Vec<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// easy | medium | hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<String>,
    /// private | unlisted | public.
    pub visibility: String,
    /// User names who may see it while private (besides its author and admins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access: Vec<String>,
    /// Author's user id.
    pub author: String,
    /// The playground started beside it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playground: Option<String>,
    /// When the latest version was pushed.
    pub published_at: DateTime<Utc>,
    /// When the first version was pushed.
    pub created_at: DateTime<Utc>,
}

/// Filters of `GET /api/v1/content`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ContentFilter {
    /// Only this kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Only this difficulty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub difficulty: Option<String>,
    /// Words that must all appear in the title, description, tags or categories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
}

/// Start a run of a content item (its playground with its tasks).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StartContentRun {
    /// Version to run; default: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i64>,
    /// A course lesson to run, `MODULE/LESSON`; default: the item's own playground.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lesson: Option<String>,
}
