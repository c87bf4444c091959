//! Tasks: author-defined checks run inside the machine as a DAG (issue 6).
//!
//! Who talks to whom:
//! - the worker sends the machine's task set ([`TaskSet`]) with `ApplyTasks`; [`Engine::apply`]
//!   validates it ([`graph`]) and starts one runner (a tokio task) per task;
//! - a runner waits until its needs are completed (a `watch` notification on every change), then
//!   runs attempts through an [`Executor`] ([`run::BashExecutor`] in a machine, a fake in unit
//!   tests): `failcheck`, `run`, and `hintcheck` after a failed run, every `interval`;
//! - every state or hint change updates the shared state under one lock, is persisted
//!   ([`store`]) and broadcast as a [`TaskStatus`] event to `WatchTasks` streams;
//! - `TaskInput` goes to the runner of an input task through a channel, with a reply channel;
//! - `SetExternal` records the state of other machines' tasks, which wakes runners like a local
//!   change does.
//!
//! States go `blocked → running → completed | failed` and never back ([`TaskState::can_become`]).

pub mod cli;
pub mod graph;
pub mod proto;
pub mod run;
pub mod spawn;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use run::{BashExecutor, Executor, Job, Outcome};

/// Per-attempt timeout when a task sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time between attempts when a task sets none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Most bytes of stdout (and of stderr) kept per attempt.
pub const OUTPUT_CAP: usize = 16 * 1024;
/// Most bytes of a hint.
pub const HINT_CAP: usize = 4 * 1024;
/// Where the engine keeps its state unless told otherwise (on the root drive: `/run` is a tmpfs).
pub const DEFAULT_STATE_PATH: &str = "/var/lib/ironlab-agent/tasks.json";
/// Events buffered per `WatchTasks` stream before it lags (and gets a fresh snapshot).
pub const EVENT_BUFFER: usize = 1024;

/// One task, resolved for this machine (mirrors `ironlab_spec::Task` without `machine`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskDef {
    /// `[a-z0-9_]+`.
    pub name: String,
    /// Setup task: every regular task of the machine needs it.
    #[serde(default)]
    pub init: bool,
    /// User it runs as; empty = root.
    #[serde(default)]
    pub user: String,
    /// Bash script; exit 0 = passed.
    pub run: String,
    /// Local task names or external needs.
    #[serde(default)]
    pub needs: Vec<String>,
    /// Runs after a failed `run`; its stdout is the hint. Empty = none.
    #[serde(default)]
    pub hintcheck: String,
    /// Runs before `run`; non-zero = failed for good. Empty = none.
    #[serde(default)]
    pub failcheck: String,
    /// Per attempt in ms; 0 = [`DEFAULT_TIMEOUT`] (helpers: no timeout).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Between attempts in ms; 0 = [`DEFAULT_INTERVAL`].
    #[serde(default)]
    pub interval_ms: u64,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Attempts are made only with an answer (`$INPUT`), through [`Engine::input`].
    #[serde(default)]
    pub input: bool,
    /// Loops in the background; not shown, not counted, never completes.
    #[serde(default)]
    pub helper: bool,
}

impl TaskDef {
    /// The per-attempt timeout (None: helpers without one).
    pub fn timeout(&self) -> Option<Duration> {
        match (self.timeout_ms, self.helper) {
            (0, true) => None,
            (0, false) => Some(DEFAULT_TIMEOUT),
            (ms, _) => Some(Duration::from_millis(ms)),
        }
    }

    /// The time between attempts.
    pub fn interval(&self) -> Duration {
        if self.interval_ms == 0 {
            DEFAULT_INTERVAL
        } else {
            Duration::from_millis(self.interval_ms)
        }
    }
}

/// The task set of one machine.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskSet {
    /// The machine's name (informational).
    #[serde(default)]
    pub machine: String,
    /// Tasks in definition order.
    pub tasks: Vec<TaskDef>,
    /// Tasks of other machines needed here.
    #[serde(default)]
    pub external: Vec<String>,
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for its needs.
    Blocked,
    /// Attempts are being made.
    Running,
    /// `run` passed (final).
    Completed,
    /// `failcheck` failed (final).
    Failed,
}

impl TaskState {
    /// Whether `self → next` is allowed: forward only, and completed/failed are final.
    pub fn can_become(self, next: TaskState) -> bool {
        use TaskState::*;
        match (self, next) {
            (Blocked, Running) | (Running, Completed) | (Running, Failed) => true,
            (Blocked, Blocked | Completed | Failed)
            | (Running, Blocked | Running)
            | (Completed, Blocked | Running | Completed | Failed)
            | (Failed, Blocked | Running | Completed | Failed) => false,
        }
    }

    /// Completed or failed.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed)
    }

    /// The lowercase name (`blocked`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
        }
    }
}

/// A task's current state; also the payload of every event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// Task name.
    pub name: String,
    /// State.
    pub state: TaskState,
    /// Current hint.
    #[serde(default)]
    pub hint: String,
    /// stdout of the last attempt (bounded).
    #[serde(default)]
    pub stdout: String,
    /// stderr of the last attempt (bounded).
    #[serde(default)]
    pub stderr: String,
    /// Exit code of the last attempt; None before the first.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// Attempts made.
    #[serde(default)]
    pub attempt: u32,
    /// When the state (or hint) last changed.
    pub at_unix_ms: u64,
    /// Sequence number of the last event about this task.
    pub seq: u64,
    /// Helper task.
    #[serde(default)]
    pub helper: bool,
    /// Init task.
    #[serde(default)]
    pub init: bool,
    /// Input task.
    #[serde(default)]
    pub input: bool,
}

impl TaskStatus {
    /// A blocked task that has made no attempt.
    pub fn new(def: &TaskDef, seq: u64) -> Self {
        TaskStatus {
            name: def.name.clone(),
            state: TaskState::Blocked,
            hint: String::new(),
            stdout: String::new(),
            stderr: String::new(),
            exit_code: None,
            attempt: 0,
            at_unix_ms: now_ms(),
            seq,
            helper: def.helper,
            init: def.init,
            input: def.input,
        }
    }
}

/// An external task's state as reported by [`Engine::set_external`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct External {
    /// Completed on its machine.
    pub completed: bool,
    /// Its stdout.
    #[serde(default)]
    pub stdout: String,
}

/// What the engine refuses.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The task set is invalid (the message names the tasks).
    #[error("invalid task set: {0}")]
    Invalid(String),
    /// No task of that name.
    #[error("no task named {0:?}")]
    UnknownTask(String),
    /// Not an input task.
    #[error("task {0:?} does not take input")]
    NotInput(String),
    /// The input task's needs are not completed yet.
    #[error("task {name:?} is {state} and does not take input yet", state = state.as_str())]
    NotReady {
        /// Task name.
        name: String,
        /// Its state.
        state: TaskState,
    },
    /// Not an external need of this machine.
    #[error("{0:?} is not an external need of this machine's tasks")]
    UnknownExternal(String),
}

/// The reply to an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputReply {
    /// The run script passed with it.
    pub accepted: bool,
    /// The hint after a refusal.
    pub hint: String,
}

struct InputRequest {
    value: String,
    reply: oneshot::Sender<InputReply>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Everything behind the engine's lock.
#[derive(Default)]
struct State {
    set: TaskSet,
    status: HashMap<String, TaskStatus>,
    external: BTreeMap<String, External>,
    seq: u64,
    generation: u64,
    runners: Vec<JoinHandle<()>>,
    inputs: HashMap<String, mpsc::Sender<InputRequest>>,
}

struct Shared {
    exec: Arc<dyn Executor>,
    store: Option<PathBuf>,
    state: Mutex<State>,
    events: broadcast::Sender<TaskStatus>,
    changed: watch::Sender<u64>,
}

/// Aborts the runners when the last [`Engine`] clone goes away (runners hold only [`Shared`]).
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        for r in st.runners.drain(..) {
            r.abort();
        }
        st.inputs.clear();
    }
}

/// The task engine of one machine. Cheap to clone; dropping the last clone stops the runners
/// (an attempt in flight has its process group killed).
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

/// How the needs of a task stand.
enum Needs {
    /// All completed: `NEEDS_<name>_STDOUT` values.
    Done(Vec<(String, String)>),
    /// Some not completed yet.
    Waiting,
    /// One failed: the task stays blocked for good.
    Never,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (plain assignments).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, st: &State) {
        if let Some(path) = &self.store
            && let Err(e) = store::save(
                path,
                &store::Saved::of(&st.set, &st.status, &st.external, st.seq),
            )
        {
            eprintln!("ironlab-agent: tasks: {e:#}");
        }
    }

    fn needs(&self, generation: u64, deps: &[String]) -> Option<Needs> {
        let st = self.lock();
        if st.generation != generation {
            return None;
        }
        let mut env = Vec::new();
        for d in deps {
            let (done, stdout) = match st.status.get(d) {
                Some(s) => match s.state {
                    TaskState::Completed => (true, s.stdout.clone()),
                    TaskState::Failed => return Some(Needs::Never),
                    TaskState::Blocked | TaskState::Running => (false, String::new()),
                },
                None => match st.external.get(d) {
                    Some(x) => (x.completed, x.stdout.clone()),
                    None => (false, String::new()),
                },
            };
            if !done {
                return Some(Needs::Waiting);
            }
            env.push((
                format!("NEEDS_{d}_STDOUT"),
                stdout.trim_end_matches('\n').to_string(),
            ));
        }
        Some(Needs::Done(env))
    }

    /// Records an attempt's outcome and moves the task to `state` with `hint`; emits an event
    /// when the state or the hint changed. Returns false when the runner is stale.
    fn update(
        &self,
        generation: u64,
        name: &str,
        state: TaskState,
        hint: Option<String>,
        outcome: Option<&Outcome>,
    ) -> bool {
        let mut st = self.lock();
        if st.generation != generation {
            return false;
        }
        let seq = st.seq;
        let Some(s) = st.status.get_mut(name) else {
            return false;
        };
        if let Some(o) = outcome {
            s.attempt = s.attempt.saturating_add(1);
            s.stdout = o.stdout.clone();
            s.stderr = o.stderr.clone();
            s.exit_code = Some(o.code);
        }
        let state_changed = s.state != state;
        if state_changed && !s.state.can_become(state) {
            return true;
        }
        let hint_changed = hint.as_ref().is_some_and(|h| *h != s.hint);
        if !state_changed && !hint_changed {
            return true;
        }
        s.state = state;
        if let Some(h) = hint {
            s.hint = h;
        }
        s.at_unix_ms = now_ms();
        s.seq = seq + 1;
        let event = s.clone();
        st.seq = seq + 1;
        self.persist(&st);
        // Sent under the lock, so events leave in `seq` order.
        let _ = self.events.send(event);
        drop(st);
        if state_changed {
            self.changed.send_modify(|n| *n += 1);
        }
        true
    }
}

impl Engine {
    /// An engine with no tasks, or with the tasks and states saved at `store` (an agent restart:
    /// completed and failed tasks keep their state, the others resume).
    pub fn new(exec: Arc<dyn Executor>, store: Option<PathBuf>) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            exec,
            store: store.clone(),
            state: Mutex::new(State::default()),
            events,
            changed,
        });
        let engine = Engine {
            _owner: Arc::new(Owner(shared.clone())),
            shared,
        };
        if let Some(path) = &store {
            match store::load(path) {
                Ok(Some(saved)) => engine.restore(saved),
                Ok(None) => {}
                Err(e) => eprintln!("ironlab-agent: tasks: {e:#} (starting without tasks)"),
            }
        }
        engine
    }

    fn restore(&self, saved: store::Saved) {
        if graph::validate(&saved.set).is_err() {
            eprintln!("ironlab-agent: tasks: ignoring an invalid saved task set");
            return;
        }
        let mut st = self.shared.lock();
        st.seq = saved.seq;
        st.external = saved.external;
        st.status = saved.tasks;
        for def in &saved.set.tasks {
            if !st.status.contains_key(&def.name) {
                st.seq += 1;
                let s = TaskStatus::new(def, st.seq);
                st.status.insert(def.name.clone(), s);
            }
        }
        st.status
            .retain(|name, _| saved.set.tasks.iter().any(|t| t.name == *name));
        st.set = saved.set;
        self.start_runners(&mut st);
    }

    /// Replaces the task set. Identical set: nothing happens. Otherwise every task whose
    /// definition is unchanged keeps a final state (completed/failed); the others start over
    /// from blocked.
    pub fn apply(&self, set: TaskSet) -> Result<(), TaskError> {
        graph::validate(&set)?;
        let mut st = self.shared.lock();
        if st.set == set {
            return Ok(());
        }
        for r in st.runners.drain(..) {
            r.abort();
        }
        st.inputs.clear();
        let old: HashMap<&str, &TaskDef> =
            st.set.tasks.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut status = HashMap::new();
        let mut events = Vec::new();
        let mut seq = st.seq;
        for def in &set.tasks {
            let kept = old
                .get(def.name.as_str())
                .filter(|o| **o == def)
                .and_then(|_| st.status.get(&def.name))
                .filter(|s| s.state.is_final())
                .cloned();
            let s = match kept {
                Some(s) => s,
                None => {
                    seq += 1;
                    let s = TaskStatus::new(def, seq);
                    events.push(s.clone());
                    s
                }
            };
            status.insert(def.name.clone(), s);
        }
        st.seq = seq;
        st.status = status;
        st.external
            .retain(|name, _| set.external.iter().any(|e| e == name));
        st.set = set;
        self.shared.persist(&st);
        self.start_runners(&mut st);
        for e in events {
            let _ = self.shared.events.send(e);
        }
        drop(st);
        self.shared.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    fn start_runners(&self, st: &mut State) {
        st.generation += 1;
        let generation = st.generation;
        let deps = graph::effective_needs(&st.set);
        let defs = st.set.tasks.clone();
        for def in defs {
            if st.status.get(&def.name).is_some_and(|s| s.state.is_final()) {
                continue;
            }
            let inputs = if def.input {
                let (tx, rx) = mpsc::channel(4);
                st.inputs.insert(def.name.clone(), tx);
                Some(rx)
            } else {
                None
            };
            let needs = deps.get(&def.name).cloned().unwrap_or_default();
            let runner = Runner {
                shared: self.shared.clone(),
                generation,
                def,
                needs,
            };
            st.runners.push(tokio::spawn(runner.run(inputs)));
        }
    }

    /// Stops every runner (an attempt in flight has its process group killed); the state stays
    /// as it is (and as saved). Later calls other than [`Engine::list`]/[`Engine::watch`] start
    /// nothing until the next [`Engine::apply`]. What dropping the last clone does, for owners
    /// that cannot drop every clone (open `WatchTasks` streams hold one).
    pub fn shutdown(&self) {
        let mut st = self.shared.lock();
        st.generation += 1;
        for r in st.runners.drain(..) {
            r.abort();
        }
        st.inputs.clear();
    }

    /// Records the state of an external need (a task of another machine).
    pub fn set_external(&self, name: &str, completed: bool, stdout: &str) -> Result<(), TaskError> {
        let mut st = self.shared.lock();
        if !st.set.external.iter().any(|e| e == name) {
            return Err(TaskError::UnknownExternal(name.to_string()));
        }
        let x = External {
            completed,
            stdout: stdout.to_string(),
        };
        if st.external.get(name) != Some(&x) {
            st.external.insert(name.to_string(), x);
            self.shared.persist(&st);
            drop(st);
            self.shared.changed.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// The current state of every task, in definition order, and the machine's name.
    pub fn list(&self) -> (String, Vec<TaskStatus>) {
        let st = self.shared.lock();
        let list = st
            .set
            .tasks
            .iter()
            .filter_map(|t| st.status.get(&t.name).cloned())
            .collect();
        (st.set.machine.clone(), list)
    }

    /// Subscribes to events, with the current snapshot taken atomically with the subscription:
    /// every event received is newer than the snapshot.
    pub fn watch(&self) -> (Vec<TaskStatus>, broadcast::Receiver<TaskStatus>) {
        let st = self.shared.lock();
        let rx = self.shared.events.subscribe();
        let list = st
            .set
            .tasks
            .iter()
            .filter_map(|t| st.status.get(&t.name).cloned())
            .collect();
        (list, rx)
    }

    /// Submits an answer to an input task: one attempt with `$INPUT = value`.
    pub async fn input(&self, name: &str, value: &str) -> Result<InputReply, TaskError> {
        let tx = {
            let st = self.shared.lock();
            let def = st
                .set
                .tasks
                .iter()
                .find(|t| t.name == name)
                .ok_or_else(|| TaskError::UnknownTask(name.to_string()))?;
            if !def.input {
                return Err(TaskError::NotInput(name.to_string()));
            }
            let s = st
                .status
                .get(name)
                .ok_or_else(|| TaskError::UnknownTask(name.to_string()))?;
            match s.state {
                TaskState::Completed => {
                    return Ok(InputReply {
                        accepted: true,
                        hint: String::new(),
                    });
                }
                TaskState::Failed | TaskState::Blocked => {
                    return Err(TaskError::NotReady {
                        name: name.to_string(),
                        state: s.state,
                    });
                }
                TaskState::Running => st.inputs.get(name).cloned(),
            }
        };
        let not_ready = |engine: &Engine| {
            let state = engine
                .shared
                .lock()
                .status
                .get(name)
                .map(|s| s.state)
                .unwrap_or(TaskState::Blocked);
            TaskError::NotReady {
                name: name.to_string(),
                state,
            }
        };
        let tx = tx.ok_or_else(|| not_ready(self))?;
        let (reply, rx) = oneshot::channel();
        let req = InputRequest {
            value: value.to_string(),
            reply,
        };
        if tx.send(req).await.is_err() {
            return Err(not_ready(self));
        }
        rx.await.map_err(|_| not_ready(self))
    }
}

/// One task's loop.
struct Runner {
    shared: Arc<Shared>,
    generation: u64,
    def: TaskDef,
    needs: Vec<String>,
}

enum Attempt {
    Passed(Outcome),
    FailedForGood(Outcome),
    /// Not passed: the hint (if a hintcheck ran) and the run's outcome.
    NotYet(Option<String>, Outcome),
}

fn hint_of(stdout: &str) -> String {
    let h = stdout.trim();
    let mut end = h.len().min(HINT_CAP);
    while !h.is_char_boundary(end) {
        end -= 1;
    }
    h[..end].to_string()
}

impl Runner {
    async fn run(self, mut inputs: Option<mpsc::Receiver<InputRequest>>) {
        let mut changed = self.shared.changed.subscribe();
        let env = loop {
            changed.borrow_and_update();
            match self.shared.needs(self.generation, &self.needs) {
                None | Some(Needs::Never) => return,
                Some(Needs::Done(env)) => break env,
                Some(Needs::Waiting) => {
                    if changed.changed().await.is_err() {
                        return;
                    }
                }
            }
        };
        let name = self.def.name.clone();
        if !self
            .shared
            .update(self.generation, &name, TaskState::Running, None, None)
        {
            return;
        }
        if self.def.helper {
            return self.helper(env).await;
        }
        loop {
            let (attempt, reply) = match inputs.as_mut() {
                Some(rx) => {
                    let Some(req) = rx.recv().await else { return };
                    let mut env = env.clone();
                    env.push(("INPUT".into(), req.value));
                    (self.attempt(&env).await, Some(req.reply))
                }
                None => (self.attempt(&env).await, None),
            };
            let (state, hint, outcome, done) = match attempt {
                Attempt::Passed(o) => (TaskState::Completed, Some(String::new()), o, true),
                Attempt::FailedForGood(o) => {
                    let hint = hint_of(&o.stdout);
                    (TaskState::Failed, Some(hint), o, true)
                }
                Attempt::NotYet(hint, o) => (TaskState::Running, hint, o, false),
            };
            let reply_hint = hint.clone().unwrap_or_default();
            if !self
                .shared
                .update(self.generation, &name, state, hint, Some(&outcome))
            {
                return;
            }
            if let Some(reply) = reply {
                let _ = reply.send(InputReply {
                    accepted: state == TaskState::Completed,
                    hint: reply_hint,
                });
            }
            if done {
                return;
            }
            if inputs.is_none() {
                tokio::time::sleep(self.def.interval()).await;
            }
        }
    }

    fn job(&self, script: &str, env: &[(String, String)]) -> Job {
        let mut all: Vec<(String, String)> = self
            .def
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.extend(env.iter().cloned());
        all.push(("TASK_NAME".into(), self.def.name.clone()));
        Job {
            user: self.def.user.clone(),
            script: script.to_string(),
            env: all,
            timeout: self.def.timeout(),
        }
    }

    async fn attempt(&self, env: &[(String, String)]) -> Attempt {
        if !self.def.failcheck.is_empty() {
            let o = self
                .shared
                .exec
                .run(self.job(&self.def.failcheck, env))
                .await;
            if o.code != 0 {
                return Attempt::FailedForGood(o);
            }
        }
        let o = self.shared.exec.run(self.job(&self.def.run, env)).await;
        if o.code == 0 {
            return Attempt::Passed(o);
        }
        let hint = if self.def.hintcheck.is_empty() {
            None
        } else {
            let h = self
                .shared
                .exec
                .run(self.job(&self.def.hintcheck, env))
                .await;
            Some(hint_of(&h.stdout))
        };
        Attempt::NotYet(hint, o)
    }

    /// Helpers run `run` again `interval` after it ends, forever.
    async fn helper(&self, env: Vec<(String, String)>) {
        loop {
            let o = self.shared.exec.run(self.job(&self.def.run, &env)).await;
            if !self.shared.update(
                self.generation,
                &self.def.name,
                TaskState::Running,
                None,
                Some(&o),
            ) {
                return;
            }
            tokio::time::sleep(self.def.interval()).await;
        }
    }
}

#[cfg(test)]
mod tests;
