//! The task relay: the worker's half of issue 6 (tasks).
//!
//! Who talks to whom: once a run is ready (and again after a worker restart recovered it),
//! [`crate::runs::RunManager`] calls [`TaskRelay::start`]. For every machine with tasks, one
//! tokio task connects to the machine's agent (gRPC over the bind-mounted unix socket), sends
//! the machine's task set with `ApplyTasks` (an identical set is a no-op on the agent, so this is
//! safe on every reconnect), and follows `WatchTasks` (snapshot first). The latest state of every
//! task lands in the run's [`RunTasks`] table and goes out on a broadcast channel to the HTTP
//! watchers (`GET /v1/runs/{run}/tasks/watch`, NDJSON, followed by the control plane).
//!
//! Cross-machine needs: a whole run lives on one worker, so the worker feeds them itself: when a
//! task completes, every other machine of the run whose tasks need it gets `SetExternal` (and
//! every (re)connected machine gets the current state of all of its external needs).
//!
//! When an agent restarts (its stream breaks), the machine's task reconnects with a short
//! backoff; the agent keeps its task state on the root drive, and the snapshot it sends again is
//! recognised by `(machine, seq)` and not re-broadcast.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ironlab_api::agent::{
    self, ApplyTasksRequest, SetExternalRequest, TaskDef, TaskEvent, TaskInputRequest,
    WatchTasksRequest,
};
use ironlab_api::worker::{RunPlan, TaskInputResult, TaskPlan, TaskState, TaskStatus};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::agent_client;
use crate::runs::RunError;

/// Longest pause between two attempts to reach an agent.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long connecting and `ApplyTasks` may take.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an answer for an input task may take (the agent runs the script once).
const INPUT_TIMEOUT: Duration = Duration::from_secs(120);

/// The relays of every run on this worker.
#[derive(Default)]
pub struct TaskRelay {
    runs: Mutex<HashMap<String, Arc<RunTasks>>>,
}

/// The tasks of one run: latest states and the change feed.
pub struct RunTasks {
    run_id: String,
    plan: RunPlan,
    sockets: HashMap<String, PathBuf>,
    state: Mutex<BTreeMap<(String, String), TaskStatus>>,
    events: broadcast::Sender<TaskStatus>,
    /// Bumped when a task another machine needs changed state.
    externals: watch::Sender<u64>,
    /// Names of tasks some other machine needs.
    needed_elsewhere: BTreeSet<String>,
    cancel: CancellationToken,
}

impl TaskRelay {
    /// An empty relay.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<RunTasks>>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts relaying the tasks of a ready run (idempotent). `sockets` maps each machine to
    /// its agent's socket on the host.
    pub fn start(&self, plan: &RunPlan, sockets: HashMap<String, PathBuf>) {
        let mut runs = self.lock();
        if runs.contains_key(&plan.run_id) {
            return;
        }
        let mut needed_elsewhere = BTreeSet::new();
        for m in &plan.machines {
            needed_elsewhere.extend(external_needs(plan, &m.name));
        }
        let rt = Arc::new(RunTasks {
            run_id: plan.run_id.clone(),
            plan: plan.clone(),
            sockets,
            state: Mutex::new(BTreeMap::new()),
            events: broadcast::channel(1024).0,
            externals: watch::Sender::new(0),
            needed_elsewhere,
            cancel: CancellationToken::new(),
        });
        runs.insert(plan.run_id.clone(), rt.clone());
        for m in plan.machines.iter().filter(|m| !m.tasks.is_empty()) {
            tokio::spawn(follow_machine(rt.clone(), m.name.clone()));
        }
        if plan.machines.iter().any(|m| !m.tasks.is_empty()) {
            tracing::info!(run = %plan.run_id, "relaying tasks");
        }
    }

    /// Stops relaying a run's tasks (its watchers' streams end).
    pub fn stop(&self, run_id: &str) {
        if let Some(rt) = self.lock().remove(run_id) {
            rt.cancel.cancel();
        }
    }

    /// The relay of a run, once it is running.
    pub fn get(&self, run_id: &str) -> Option<Arc<RunTasks>> {
        self.lock().get(run_id).cloned()
    }
}

/// Tasks of other machines that tasks on `machine` need.
pub fn external_needs(plan: &RunPlan, machine: &str) -> Vec<String> {
    let Some(m) = plan.machines.iter().find(|m| m.name == machine) else {
        return Vec::new();
    };
    let local: BTreeSet<&str> = m.tasks.iter().map(|t| t.name.as_str()).collect();
    let mut out: BTreeSet<String> = BTreeSet::new();
    for t in &m.tasks {
        for n in &t.needs {
            if !local.contains(n.as_str()) {
                out.insert(n.clone());
            }
        }
    }
    out.into_iter().collect()
}

fn task_def(t: &TaskPlan) -> TaskDef {
    TaskDef {
        name: t.name.clone(),
        init: t.init,
        user: t.user.clone(),
        run: t.run.clone(),
        needs: t.needs.clone(),
        hintcheck: t.hintcheck.clone(),
        failcheck: t.failcheck.clone(),
        timeout_ms: t.timeout_ms,
        interval_ms: t.interval_ms,
        env: t.env.clone().into_iter().collect(),
        input: t.input,
        helper: t.helper,
    }
}

/// Converts an agent event; `None` for an unspecified state.
pub fn status_of(machine: &str, e: &TaskEvent) -> Option<TaskStatus> {
    let state = match agent::TaskState::try_from(e.state).ok()? {
        agent::TaskState::Blocked => TaskState::Blocked,
        agent::TaskState::Running => TaskState::Running,
        agent::TaskState::Completed => TaskState::Completed,
        agent::TaskState::Failed => TaskState::Failed,
        agent::TaskState::Unspecified => return None,
    };
    Some(TaskStatus {
        machine: machine.to_string(),
        name: e.name.clone(),
        state,
        hint: e.hint.clone(),
        stdout: e.stdout.clone(),
        exit_code: e.exit_code,
        attempt: e.attempt,
        at_unix_ms: e.at_unix_ms,
        seq: e.seq,
        helper: e.helper,
        init: e.init,
        input: e.input,
    })
}

impl RunTasks {
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), TaskStatus>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The latest state of every task reported so far, in plan order.
    pub fn snapshot(&self) -> Vec<TaskStatus> {
        let table = self.table();
        self.ordered(&table)
    }

    fn ordered(&self, table: &BTreeMap<(String, String), TaskStatus>) -> Vec<TaskStatus> {
        let mut out = Vec::new();
        for m in &self.plan.machines {
            for t in &m.tasks {
                if let Some(s) = table.get(&(m.name.clone(), t.name.clone())) {
                    out.push(s.clone());
                }
            }
        }
        out
    }

    /// The current snapshot and a receiver of every later change (taken together, so nothing
    /// falls between them).
    pub fn subscribe(&self) -> (Vec<TaskStatus>, broadcast::Receiver<TaskStatus>) {
        let table = self.table();
        (self.ordered(&table), self.events.subscribe())
    }

    /// Resolves when the relay stops (the run is being destroyed).
    pub async fn stopped(&self) {
        self.cancel.cancelled().await
    }

    /// Records an agent's report; returns whether it was new (not a re-sent snapshot entry).
    fn record(&self, s: TaskStatus) -> bool {
        let key = (s.machine.clone(), s.name.clone());
        let mut table = self.table();
        if table.get(&key).is_some_and(|old| old.seq >= s.seq) {
            return false;
        }
        let external = self.needed_elsewhere.contains(&s.name)
            && table.get(&key).map(|o| o.state) != Some(s.state);
        table.insert(key, s.clone());
        // Sent under the lock, so subscribers see changes in the order they were recorded.
        let _ = self.events.send(s);
        drop(table);
        if external {
            self.externals.send_modify(|n| *n = n.wrapping_add(1));
        }
        true
    }

    fn completed(&self, name: &str) -> Option<(bool, String)> {
        self.table()
            .values()
            .find(|s| s.name == name)
            .map(|s| (s.state == TaskState::Completed, s.stdout.clone()))
    }

    /// Sends an answer for an input task to its machine's agent.
    pub async fn input(&self, name: &str, value: &str) -> Result<TaskInputResult, RunError> {
        let Some(machine) = self
            .plan
            .machines
            .iter()
            .find(|m| m.tasks.iter().any(|t| t.name == name && !t.helper))
        else {
            return Err(RunError::NotFound(format!(
                "run {} has no task {name:?}",
                self.run_id
            )));
        };
        let socket = self.sockets.get(&machine.name).ok_or_else(|| {
            RunError::Internal(anyhow::anyhow!("no agent socket for {}", machine.name))
        })?;
        let call = async {
            let mut client = agent_client::connect(socket).await.map_err(|e| {
                RunError::Internal(anyhow::anyhow!(
                    "cannot reach the agent of machine {}: {e}",
                    machine.name
                ))
            })?;
            client
                .task_input(TaskInputRequest {
                    name: name.to_string(),
                    value: value.to_string(),
                })
                .await
                .map(|r| r.into_inner())
                .map_err(|s| match s.code() {
                    tonic::Code::NotFound => RunError::NotFound(s.message().to_string()),
                    tonic::Code::InvalidArgument => RunError::BadRequest(s.message().to_string()),
                    tonic::Code::FailedPrecondition => RunError::Conflict(s.message().to_string()),
                    _ => RunError::Internal(anyhow::anyhow!(
                        "the agent of machine {} failed: {}",
                        machine.name,
                        s.message()
                    )),
                })
        };
        let r = tokio::time::timeout(INPUT_TIMEOUT, call)
            .await
            .map_err(|_| {
                RunError::Internal(anyhow::anyhow!(
                    "the agent of machine {} did not answer within {} s",
                    machine.name,
                    INPUT_TIMEOUT.as_secs()
                ))
            })??;
        Ok(TaskInputResult {
            accepted: r.accepted,
            hint: r.hint,
        })
    }
}

/// Follows one machine's agent until the relay stops, reconnecting after errors.
async fn follow_machine(rt: Arc<RunTasks>, machine: String) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            r = session(&rt, &machine) => r,
            () = rt.cancel.cancelled() => return,
        };
        match outcome {
            Ok(true) => backoff = Duration::from_millis(100),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(run = %rt.run_id, %machine, "task stream: {e:#}");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = rt.cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One connection to a machine's agent: apply, watch, feed externals. `Ok(true)` when the
/// stream delivered before it ended (so the next attempt starts with a short pause).
async fn session(rt: &RunTasks, machine: &str) -> anyhow::Result<bool> {
    let plan = rt
        .plan
        .machines
        .iter()
        .find(|m| m.name == machine)
        .ok_or_else(|| anyhow::anyhow!("no machine {machine}"))?;
    let socket = rt
        .sockets
        .get(machine)
        .ok_or_else(|| anyhow::anyhow!("no agent socket for {machine}"))?;
    let externals = external_needs(&rt.plan, machine);
    let mut ext_rx = rt.externals.subscribe();
    let (mut client, mut stream) = tokio::time::timeout(APPLY_TIMEOUT, async {
        let mut client = agent_client::connect(socket).await?;
        if let Err(s) = client
            .apply_tasks(ApplyTasksRequest {
                tasks: plan.tasks.iter().map(task_def).collect(),
                machine: machine.to_string(),
                external_needs: externals.clone(),
            })
            .await
        {
            if s.code() == tonic::Code::InvalidArgument {
                tracing::error!(run = %rt.run_id, %machine, "the agent refused the task set: {}", s.message());
            }
            anyhow::bail!("ApplyTasks: {}", s.message());
        }
        let stream = client
            .watch_tasks(WatchTasksRequest {
                include_snapshot: true,
            })
            .await?
            .into_inner();
        anyhow::Ok((client, stream))
    })
    .await
    .map_err(|_| anyhow::anyhow!("the agent did not accept the task set in time"))??;
    tracing::debug!(run = %rt.run_id, %machine, "following tasks");
    let mut sent: HashMap<String, bool> = HashMap::new();
    let mut delivered = false;
    loop {
        // Every external need whose state changed since it was last sent on this connection.
        ext_rx.borrow_and_update();
        for name in &externals {
            let (completed, stdout) = rt.completed(name).unwrap_or((false, String::new()));
            if sent.get(name) != Some(&completed) {
                client
                    .set_external(SetExternalRequest {
                        name: name.clone(),
                        completed,
                        stdout,
                    })
                    .await?;
                sent.insert(name.clone(), completed);
            }
        }
        tokio::select! {
            msg = stream.message() => match msg? {
                Some(e) => {
                    delivered = true;
                    if let Some(s) = status_of(machine, &e) {
                        rt.record(s);
                    }
                }
                None => return Ok(delivered),
            },
            r = ext_rx.changed() => r?,
        }
    }
}

#[cfg(test)]
mod tests {
    use ironlab_api::worker::{ImageRef, MachinePlan};

    use super::*;

    fn task(name: &str, needs: &[&str]) -> TaskPlan {
        TaskPlan {
            name: name.into(),
            init: false,
            user: String::new(),
            run: "true".into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            hintcheck: String::new(),
            failcheck: String::new(),
            timeout_ms: 0,
            interval_ms: 0,
            env: BTreeMap::new(),
            input: false,
            helper: false,
        }
    }

    fn machine(name: &str, tasks: Vec<TaskPlan>) -> MachinePlan {
        MachinePlan {
            name: name.into(),
            runtime: "container".into(),
            image: ImageRef::Stock {
                name: "debian".into(),
            },
            root_size_bytes: 0,
            cpus: 1,
            memory_bytes: 0,
            pids_limit: 100,
            users: vec![],
            default_user: "root".into(),
            files: vec![],
            tasks,
            interfaces: vec![],
        }
    }

    fn status(machine: &str, name: &str, state: TaskState, seq: u64) -> TaskStatus {
        TaskStatus {
            machine: machine.into(),
            name: name.into(),
            state,
            hint: String::new(),
            stdout: String::new(),
            exit_code: -1,
            attempt: 0,
            at_unix_ms: 0,
            seq,
            helper: false,
            init: false,
            input: false,
        }
    }

    fn plan() -> RunPlan {
        RunPlan {
            run_id: "r1".into(),
            machines: vec![
                machine("a", vec![task("one", &[]), task("two", &["one", "far"])]),
                machine("b", vec![task("far", &[])]),
                machine("c", vec![]),
            ],
            networks: vec![],
            egress: Default::default(),
        }
    }

    #[test]
    fn external_needs_are_the_needs_of_other_machines() {
        let p = plan();
        assert_eq!(external_needs(&p, "a"), vec!["far".to_string()]);
        assert!(external_needs(&p, "b").is_empty());
        assert!(external_needs(&p, "c").is_empty());
        assert!(external_needs(&p, "nope").is_empty());
    }

    #[tokio::test]
    async fn records_are_deduplicated_by_seq_and_external_changes_wake_feeders() {
        let relay = TaskRelay::new();
        // No sockets: the followers only retry in the background.
        relay.start(&plan(), HashMap::new());
        let rt = relay.get("r1").expect("started");
        let ext = rt.externals.subscribe();
        let (snap, mut rx) = rt.subscribe();
        assert!(snap.is_empty());
        assert!(rt.record(status("a", "one", TaskState::Running, 3)));
        assert!(
            !rt.record(status("a", "one", TaskState::Running, 3)),
            "re-sent"
        );
        assert!(!ext.has_changed().expect("open"), "nobody else needs `one`");
        assert!(rt.record(status("b", "far", TaskState::Completed, 7)));
        assert!(ext.has_changed().expect("open"), "`far` is needed on a");
        assert_eq!(rt.completed("far"), Some((true, String::new())));
        assert_eq!(rx.recv().await.expect("event").name, "one");
        assert_eq!(rx.recv().await.expect("event").name, "far");
        let names: Vec<String> = rt.snapshot().into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["one", "far"], "plan order");
        relay.stop("r1");
        assert!(relay.get("r1").is_none());
        rt.stopped().await;
    }
}
