//! Tasks over the real gRPC socket: a small challenge goes blocked → running → completed as its
//! conditions become true, input is accepted or refused, states survive a server restart, and the
//! `ironlab-agent tasks` CLI (the real binary) lists, waits and answers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ironlab_agent::server::{self, AgentService};
use ironlab_agent::tasks::{Engine, TaskDef, proto};
use ironlab_api::agent::agent_client::AgentClient;
use ironlab_api::agent::{
    ApplyTasksRequest, ListTasksRequest, SetExternalRequest, TaskEvent, TaskInputRequest,
    TaskState, WatchTasksRequest,
};
use tokio::sync::oneshot;
use tokio::time::timeout;
use tonic::Streaming;
use tonic::transport::Channel;

/// An in-process agent on a temp socket with a task state file; stopped on drop.
struct TestAgent {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    engine: Engine,
}

impl TestAgent {
    async fn start(dir: &Path) -> Self {
        let socket = dir.join("run/agent.sock");
        let listener = server::bind(&socket).expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let service = AgentService::new("/").with_task_state(dir.join("lib/tasks.json"));
        let engine = service.tasks().clone();
        tokio::spawn(async move {
            server::serve(listener, service, async {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
        });
        TestAgent {
            socket,
            stop: Some(stop),
            engine,
        }
    }

    async fn client(&self) -> AgentClient<Channel> {
        ironlab_agent::connect(&self.socket).await.expect("connect")
    }
}

/// Stops the server and its task engine (as the agent process exiting would).
impl Drop for TestAgent {
    fn drop(&mut self) {
        self.engine.shutdown();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn task(name: &str, run: &str) -> TaskDef {
    TaskDef {
        name: name.into(),
        run: run.into(),
        interval_ms: 100,
        ..Default::default()
    }
}

fn state(e: &TaskEvent) -> TaskState {
    TaskState::try_from(e.state).expect("known state")
}

async fn until(stream: &mut Streaming<TaskEvent>, name: &str, want: TaskState) -> Vec<TaskEvent> {
    let mut seen = Vec::new();
    loop {
        let e = timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{name} not {want:?} within 10 s; saw {seen:#?}"))
            .expect("stream")
            .expect("stream ended");
        let hit = e.name == name && state(&e) == want;
        seen.push(e);
        if hit {
            return seen;
        }
    }
}

fn cli(socket: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ironlab-agent"))
        .arg("tasks")
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ironlab-agent tasks");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn challenge(dir: &Path) -> ApplyTasksRequest {
    let mut setup = task("init_files", "mkdir -p \"$D/app\" && echo prepared");
    setup.init = true;
    let mut verify = task("verify_config", "test -f \"$D/app/config\"");
    verify.hintcheck = "echo \"Create $D/app/config.\"".into();
    let mut content = task(
        "verify_content",
        "grep -q port=8080 \"$D/app/config\" && echo ok",
    );
    content.needs = vec!["verify_config".into()];
    content.hintcheck = "echo 'The config must say port=8080.'".into();
    let mut answer = task("what_port", "test \"$INPUT\" = 8080");
    answer.input = true;
    let mut remote = task("after_remote", "test \"$NEEDS_other_task_STDOUT\" = hello");
    remote.needs = vec!["other_task".into()];
    let mut tasks = vec![setup, verify, content, answer, remote];
    for t in &mut tasks {
        t.env.insert("D".into(), dir.display().to_string());
    }
    ApplyTasksRequest {
        tasks: tasks.iter().map(proto::task_def).collect(),
        machine: "node-01".into(),
        external_needs: vec!["other_task".into()],
    }
}

#[tokio::test]
async fn a_challenge_over_grpc_and_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    let agent = TestAgent::start(dir.path()).await;
    let mut c = agent.client().await;

    // Invalid sets are refused, naming the tasks.
    let mut bad = challenge(&work);
    bad.tasks[1].needs = vec!["verify_content".into()];
    let e = c.apply_tasks(bad).await.expect_err("a cycle");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.message()
            .contains("verify_config -> verify_content -> verify_config"),
        "{}",
        e.message()
    );

    let mut events = c
        .watch_tasks(WatchTasksRequest {
            include_snapshot: true,
        })
        .await
        .expect("watch")
        .into_inner();
    c.apply_tasks(challenge(&work)).await.expect("apply");
    until(&mut events, "init_files", TaskState::Completed).await;
    let seen = until(&mut events, "verify_config", TaskState::Running).await;
    let hint = loop {
        let last = until(&mut events, "verify_config", TaskState::Running).await;
        if let Some(e) = last.iter().rev().find(|e| !e.hint.is_empty()) {
            break e.hint.clone();
        }
    };
    assert_eq!(hint, format!("Create {}/app/config.", work.display()));
    assert!(
        seen.iter()
            .all(|e| e.name != "verify_content" || state(e) == TaskState::Blocked)
    );

    // The CLI sees the same states.
    let socket = agent.socket.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || cli(&socket, &["list"]))
        .await
        .expect("cli");
    assert_eq!(code, 0, "{err}");
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing in\n{out}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("init_files")[1..3], ["init", "completed"]);
    assert_eq!(line("verify_config")[1..3], ["task", "running"]);
    assert_eq!(line("verify_content")[1..3], ["task", "blocked"]);
    assert_eq!(line("what_port")[1..3], ["input", "running"]);
    assert!(out.contains("Create "), "{out}");

    // `wait` blocks until the condition becomes true (the file appears meanwhile).
    let socket = agent.socket.clone();
    let waiter = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let r = cli(&socket, &["wait", "verify_content", "--timeout", "10"]);
        (r, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(work.join("app/config"), "port=8080\n").expect("write config");
    let ((code, _, err), took) = waiter.await.expect("wait");
    assert_eq!(code, 0, "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let done = until(&mut events, "verify_content", TaskState::Completed).await;
    assert_eq!(done.last().map(|e| e.stdout.as_str()), Some("ok\n"));

    // `wait` with a deadline that passes: exit 124.
    let socket = agent.socket.clone();
    let (code, _, _) = tokio::task::spawn_blocking(move || {
        cli(&socket, &["wait", "after_remote", "--timeout", "0.3"])
    })
    .await
    .expect("cli");
    assert_eq!(code, 124);

    // Input: wrong answer refused (exit 1), right one accepted (exit 0), over the CLI and gRPC.
    let socket = agent.socket.clone();
    let (code, out, _) =
        tokio::task::spawn_blocking(move || cli(&socket, &["input", "what_port", "80"]))
            .await
            .expect("cli");
    assert_eq!((code, out.trim()), (1, "refused"));
    let r = c
        .task_input(TaskInputRequest {
            name: "what_port".into(),
            value: "8080".into(),
        })
        .await
        .expect("input")
        .into_inner();
    assert!(r.accepted);
    let e = c
        .task_input(TaskInputRequest {
            name: "verify_config".into(),
            value: "1".into(),
        })
        .await
        .expect_err("not an input task");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);

    // An external need completes through SetExternal.
    c.set_external(SetExternalRequest {
        name: "other_task".into(),
        completed: true,
        stdout: "hello\n".into(),
    })
    .await
    .expect("set external");
    until(&mut events, "after_remote", TaskState::Completed).await;

    let list = c
        .list_tasks(ListTasksRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.machine, "node-01");
    assert!(
        list.tasks.iter().all(|t| state(t) == TaskState::Completed),
        "{list:#?}"
    );
    let seqs: Vec<u64> = list.tasks.iter().map(|t| t.seq).collect();

    // Restart the agent: every completed task stays completed, init does not run again.
    drop((events, c));
    drop(agent);
    std::fs::remove_file(work.join("app/config")).expect("rm config");
    std::fs::remove_dir(work.join("app")).expect("rm app");
    let agent = TestAgent::start(dir.path()).await;
    let mut c = agent.client().await;
    let mut events = c
        .watch_tasks(WatchTasksRequest {
            include_snapshot: true,
        })
        .await
        .expect("watch")
        .into_inner();
    for seq in &seqs {
        let e = timeout(Duration::from_secs(5), events.message())
            .await
            .expect("snapshot")
            .expect("stream")
            .expect("event");
        assert_eq!(state(&e), TaskState::Completed, "{e:?}");
        assert_eq!(e.seq, *seq);
    }
    // Applying the same set again (the worker reconnecting) changes nothing.
    c.apply_tasks(challenge(&work)).await.expect("apply again");
    assert!(
        timeout(Duration::from_millis(500), events.message())
            .await
            .is_err(),
        "no event expected"
    );
    assert!(!work.join("app").exists(), "init must not run again");
}
