//! Conversions between the engine's types and the gRPC messages (no transport here).

use ironlab_api::agent as pb;

use super::{TaskDef, TaskSet, TaskState, TaskStatus};

/// The engine's task set from an `ApplyTasks` request.
pub fn task_set(req: pb::ApplyTasksRequest) -> TaskSet {
    TaskSet {
        machine: req.machine,
        tasks: req
            .tasks
            .into_iter()
            .map(|t| TaskDef {
                name: t.name,
                init: t.init,
                user: t.user,
                run: t.run,
                needs: t.needs,
                hintcheck: t.hintcheck,
                failcheck: t.failcheck,
                timeout_ms: t.timeout_ms,
                interval_ms: t.interval_ms,
                env: t.env.into_iter().collect(),
                input: t.input,
                helper: t.helper,
            })
            .collect(),
        external: req.external_needs,
    }
}

/// The wire form of a task definition (for clients building `ApplyTasks`).
pub fn task_def(t: &TaskDef) -> pb::TaskDef {
    pb::TaskDef {
        name: t.name.clone(),
        init: t.init,
        user: t.user.clone(),
        run: t.run.clone(),
        needs: t.needs.clone(),
        hintcheck: t.hintcheck.clone(),
        failcheck: t.failcheck.clone(),
        timeout_ms: t.timeout_ms,
        interval_ms: t.interval_ms,
        env: t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        input: t.input,
        helper: t.helper,
    }
}

/// The wire state.
pub fn state(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Blocked => pb::TaskState::Blocked,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Completed => pb::TaskState::Completed,
        TaskState::Failed => pb::TaskState::Failed,
    }
}

/// The engine's state from the wire (None for `UNSPECIFIED` or an unknown value).
pub fn state_of(v: i32) -> Option<TaskState> {
    match pb::TaskState::try_from(v).ok()? {
        pb::TaskState::Blocked => Some(TaskState::Blocked),
        pb::TaskState::Running => Some(TaskState::Running),
        pb::TaskState::Completed => Some(TaskState::Completed),
        pb::TaskState::Failed => Some(TaskState::Failed),
        pb::TaskState::Unspecified => None,
    }
}

/// The wire event.
pub fn event(s: &TaskStatus) -> pb::TaskEvent {
    pb::TaskEvent {
        name: s.name.clone(),
        state: state(s.state) as i32,
        hint: s.hint.clone(),
        stdout: s.stdout.clone(),
        exit_code: s.exit_code.unwrap_or(-1),
        attempt: s.attempt,
        at_unix_ms: s.at_unix_ms,
        seq: s.seq,
        helper: s.helper,
        init: s.init,
        input: s.input,
        stderr: s.stderr.clone(),
    }
}
