//! Engine tests: DAG semantics with a fake executor on a paused clock, and real bash runs.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::broadcast;

use super::*;
use crate::users::UserDb;

/// A fake executor: `f(job, call number of this script)` decides the outcome; every call is
/// logged. Each run takes 10 ms of (paused) time.
struct Fake {
    log: Mutex<Vec<String>>,
    calls: Mutex<HashMap<String, usize>>,
    #[allow(clippy::type_complexity)]
    f: Box<dyn Fn(&Job, usize) -> i32 + Send + Sync>,
}

impl Fake {
    fn new(f: impl Fn(&Job, usize) -> i32 + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Fake {
            log: Mutex::new(Vec::new()),
            calls: Mutex::new(HashMap::new()),
            f: Box::new(f),
        })
    }
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Executor for Fake {
    fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'static>> {
        self.log.lock().unwrap().push(job.script.clone());
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(job.script.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let code = (self.f)(&job, n);
        let stdout = format!("{} #{n}\n", job.script);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            Outcome {
                code,
                stdout,
                ..Default::default()
            }
        })
    }
}

use std::future::Future;
use std::pin::Pin;

fn task(name: &str, run: &str) -> TaskDef {
    TaskDef {
        name: name.into(),
        run: run.into(),
        interval_ms: 100,
        ..Default::default()
    }
}

fn set(tasks: Vec<TaskDef>) -> TaskSet {
    TaskSet {
        machine: "node".into(),
        tasks,
        external: vec![],
    }
}

fn state_of(engine: &Engine, name: &str) -> TaskStatus {
    engine
        .list()
        .1
        .into_iter()
        .find(|s| s.name == name)
        .unwrap()
}

/// Waits (up to `within`) for an event putting `name` in `state`; returns every event seen.
async fn until(
    rx: &mut broadcast::Receiver<TaskStatus>,
    name: &str,
    state: TaskState,
    within: Duration,
) -> Vec<TaskStatus> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) => {
                let hit = e.name == name && e.state == state;
                seen.push(e);
                if hit {
                    return seen;
                }
            }
            Ok(Err(e)) => panic!("event stream: {e}"),
            Err(_) => panic!("{name} did not become {state:?} within {within:?}; saw {seen:#?}"),
        }
    }
}

fn real() -> Arc<dyn Executor> {
    Arc::new(BashExecutor::new(UserDb::new("/")))
}

#[test]
fn transitions() {
    use TaskState::*;
    let all = [Blocked, Running, Completed, Failed];
    for a in all {
        for b in all {
            let ok = matches!(
                (a, b),
                (Blocked, Running) | (Running, Completed) | (Running, Failed)
            );
            assert_eq!(a.can_become(b), ok, "{a:?} -> {b:?}");
        }
    }
}

#[test]
fn validation_names_the_tasks() {
    let mut a = task("a", "true");
    a.needs = vec!["b".into()];
    let mut b = task("b", "true");
    b.needs = vec!["a".into()];
    let e = graph::validate(&set(vec![a.clone(), b]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("cycle") && e.contains("a -> b -> a"), "{e}");

    // An init task needing a regular task is a cycle through the implicit need.
    let mut init = task("setup", "true");
    init.init = true;
    init.needs = vec!["check".into()];
    let e = graph::validate(&set(vec![init, task("check", "true")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("check -> setup -> check"), "{e}");

    let e = graph::validate(&set(vec![a])).unwrap_err().to_string();
    assert!(e.contains("\"a\" needs unknown task \"b\""), "{e}");
    let e = graph::validate(&set(vec![task("Bad-Name", "true")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("Bad-Name"), "{e}");
    let mut h = task("watcher", "true");
    h.helper = true;
    let mut n = task("x", "true");
    n.needs = vec!["watcher".into()];
    let e = graph::validate(&set(vec![h, n])).unwrap_err().to_string();
    assert!(e.contains("helper task \"watcher\""), "{e}");
    let mut ext = task("x", "true");
    ext.needs = vec!["other_machine_task".into()];
    let mut s = set(vec![ext]);
    s.external = vec!["other_machine_task".into()];
    graph::validate(&s).unwrap();
}

#[tokio::test(start_paused = true)]
async fn needs_run_first_and_dependents_wait() {
    // `second` passes at once; `first` passes on its third attempt.
    let fake = Fake::new(|job, n| if job.script == "first" && n < 3 { 1 } else { 0 });
    let engine = Engine::new(fake.clone(), None);
    let (_, mut rx) = engine.watch();
    let mut second = task("second", "second");
    second.needs = vec!["first".into()];
    engine
        .apply(set(vec![second, task("first", "first")]))
        .unwrap();
    until(
        &mut rx,
        "second",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(fake.log(), ["first", "first", "first", "second"]);
    assert_eq!(state_of(&engine, "first").attempt, 3);
    // Listed in definition order.
    let names: Vec<String> = engine.list().1.into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["second", "first"]);
}

#[tokio::test(start_paused = true)]
async fn regular_tasks_implicitly_need_init_tasks() {
    let ready = Arc::new(AtomicUsize::new(0));
    let r = ready.clone();
    let fake = Fake::new(move |job, _| match job.script.as_str() {
        "setup" if r.load(Ordering::SeqCst) == 0 => 1,
        _ => 0,
    });
    let engine = Engine::new(fake.clone(), None);
    let (_, mut rx) = engine.watch();
    let mut setup = task("setup", "setup");
    setup.init = true;
    let mut setup2 = task("setup2", "setup2");
    setup2.init = true;
    engine
        .apply(set(vec![task("check", "check"), setup, setup2]))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(&engine, "check").state, TaskState::Blocked);
    assert_eq!(state_of(&engine, "setup").state, TaskState::Running);
    assert_eq!(state_of(&engine, "setup2").state, TaskState::Completed);
    assert!(!fake.log().contains(&"check".to_string()));
    ready.store(1, Ordering::SeqCst);
    let seen = until(
        &mut rx,
        "check",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    let order: Vec<(&str, TaskState)> = seen.iter().map(|e| (e.name.as_str(), e.state)).collect();
    let setup_done = order
        .iter()
        .position(|e| *e == ("setup", TaskState::Completed))
        .unwrap();
    let check_running = order
        .iter()
        .position(|e| *e == ("check", TaskState::Running))
        .unwrap();
    assert!(setup_done < check_running, "{order:?}");
}

#[tokio::test(start_paused = true)]
async fn events_are_edge_triggered() {
    // Fails 5 times with the same hint each time, then passes.
    struct SameHint;
    impl Executor for SameHint {
        fn run(&self, job: Job) -> Pin<Box<dyn Future<Output = Outcome> + Send + 'static>> {
            static CALLS: AtomicUsize = AtomicUsize::new(0);
            Box::pin(async move {
                let code = match job.script.as_str() {
                    "check" if CALLS.fetch_add(1, Ordering::SeqCst) < 5 => 1,
                    _ => 0,
                };
                let stdout = if job.script == "hint" {
                    "Nothing listens on port 8080 yet.\n".into()
                } else {
                    String::new()
                };
                Outcome {
                    code,
                    stdout,
                    ..Default::default()
                }
            })
        }
    }
    let engine = Engine::new(Arc::new(SameHint), None);
    let (_, mut rx) = engine.watch();
    let mut t = task("t", "check");
    t.hintcheck = "hint".into();
    engine.apply(set(vec![t])).unwrap();
    let seen = until(&mut rx, "t", TaskState::Completed, Duration::from_secs(5)).await;
    let summary: Vec<(TaskState, &str)> = seen.iter().map(|e| (e.state, e.hint.as_str())).collect();
    assert_eq!(
        summary,
        [
            (TaskState::Blocked, ""),
            (TaskState::Running, ""),
            (TaskState::Running, "Nothing listens on port 8080 yet."),
            (TaskState::Completed, ""),
        ]
    );
    let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(state_of(&engine, "t").attempt, 6);
}

#[tokio::test(start_paused = true)]
async fn reapplying_the_same_set_changes_nothing_and_a_new_one_keeps_finished_tasks() {
    let fake = Fake::new(|job, _| if job.script == "never" { 1 } else { 0 });
    let engine = Engine::new(fake.clone(), None);
    let (_, mut rx) = engine.watch();
    let s = set(vec![task("done", "ok"), task("pending", "never")]);
    engine.apply(s.clone()).unwrap();
    until(
        &mut rx,
        "done",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    let before = engine.list().1;
    engine.apply(s.clone()).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after = engine.list().1;
    assert_eq!(before[0], after[0]);
    assert_eq!(after[1].state, TaskState::Running);
    // A new set with `pending` changed: `done` stays completed, `pending` starts over.
    let mut s2 = s;
    s2.tasks[1].run = "ok2".into();
    engine.apply(s2).unwrap();
    until(
        &mut rx,
        "pending",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(state_of(&engine, "done").seq, before[0].seq);
    assert_eq!(fake.log().iter().filter(|s| *s == "ok").count(), 1);
}

#[tokio::test(start_paused = true)]
async fn external_needs_wait_for_set_external() {
    let fake = Fake::new(|_, _| 0);
    let engine = Engine::new(fake.clone(), None);
    let (_, mut rx) = engine.watch();
    let mut t = task("local", "local");
    t.needs = vec!["remote_task".into()];
    let mut s = set(vec![t]);
    s.external = vec!["remote_task".into()];
    engine.apply(s).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(&engine, "local").state, TaskState::Blocked);
    assert!(matches!(
        engine.set_external("nope", true, ""),
        Err(TaskError::UnknownExternal(_))
    ));
    engine.set_external("remote_task", true, "42\n").unwrap();
    until(
        &mut rx,
        "local",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
}

// ---- real processes ----

#[tokio::test]
async fn retries_until_a_file_appears_and_dependents_read_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("flag");
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut wait = task("wait_flag", "test -f \"$FLAG\" && echo found it");
    wait.env.insert("FLAG".into(), flag.display().to_string());
    let mut next = task(
        "next",
        "test \"$NEEDS_wait_flag_STDOUT\" = 'found it' && whoami",
    );
    next.needs = vec!["wait_flag".into()];
    engine.apply(set(vec![wait, next])).unwrap();
    until(
        &mut rx,
        "wait_flag",
        TaskState::Running,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(state_of(&engine, "wait_flag").state, TaskState::Running);
    std::fs::write(&flag, "").unwrap();
    let t0 = Instant::now();
    until(
        &mut rx,
        "next",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let w = state_of(&engine, "wait_flag");
    assert!(w.attempt >= 3, "{w:?}");
    assert_eq!(w.stdout, "found it\n");
    assert_eq!(w.exit_code, Some(0));
    let n = state_of(&engine, "next");
    assert_eq!(n.state, TaskState::Completed, "{n:?}");
}

/// Processes whose command line contains `marker`.
fn survivors(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && !cmd.contains("cargo") {
                found.push(format!("{}: {cmd}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[tokio::test]
async fn timeout_kills_the_whole_process_group() {
    let db = UserDb::new("/");
    let t0 = Instant::now();
    let o = run::run_job(
        &db,
        Job {
            user: String::new(),
            script: "echo started; sleep 101.371 & sleep 101.371; echo never".into(),
            env: vec![],
            timeout: Some(Duration::from_millis(300)),
        },
    )
    .await;
    assert!(o.timed_out, "{o:?}");
    assert_eq!(o.code, 128 + 9);
    assert_eq!(o.stdout, "started\n");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // The background sleep (a grandchild) is gone too; give the kernel a moment to reap it.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !survivors("101.371").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(survivors("101.371"), Vec::<String>::new());

    // Through the engine: a task whose every attempt times out keeps running (retrying).
    let engine = Engine::new(real(), None);
    let mut t = task("slow", "sleep 101.372 & sleep 101.372");
    t.timeout_ms = 200;
    engine.apply(set(vec![t])).unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let s = state_of(&engine, "slow");
    assert_eq!(s.state, TaskState::Running);
    assert!(s.attempt >= 2, "{s:?}");
    assert_eq!(s.exit_code, Some(137));
    drop(engine);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !survivors("101.372").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(survivors("101.372"), Vec::<String>::new());
}

#[tokio::test]
async fn output_is_bounded() {
    let o = run::run_job(
        &UserDb::new("/"),
        Job {
            user: String::new(),
            script: "head -c 1000000 /dev/zero | tr '\\0' x; head -c 100000 /dev/zero >&2".into(),
            env: vec![],
            timeout: Some(Duration::from_secs(10)),
        },
    )
    .await;
    assert_eq!(o.code, 0, "{}", o.stderr.len());
    assert_eq!(o.stdout.len(), OUTPUT_CAP);
    assert!(o.stdout.bytes().all(|b| b == b'x'));
    assert_eq!(o.stderr.len(), OUTPUT_CAP);
}

#[tokio::test]
async fn failcheck_fails_for_good_before_run() {
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut t = task("verify", "touch \"$RAN\"; false");
    t.env.insert("RAN".into(), ran.display().to_string());
    t.failcheck =
        "test -f /nonexistent/important.conf || { echo 'You deleted important.conf.'; exit 1; }"
            .into();
    let mut after = task("after", "true");
    after.needs = vec!["verify".into()];
    engine.apply(set(vec![t, after])).unwrap();
    let seen = until(&mut rx, "verify", TaskState::Failed, Duration::from_secs(5)).await;
    let failed = seen.last().unwrap();
    assert_eq!(failed.hint, "You deleted important.conf.");
    assert_eq!(failed.exit_code, Some(1));
    assert!(!ran.exists(), "run must not run after a failcheck failure");
    // Failed is final; dependents stay blocked.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state_of(&engine, "verify").state, TaskState::Failed);
    assert_eq!(state_of(&engine, "verify").attempt, 1);
    assert_eq!(state_of(&engine, "after").state, TaskState::Blocked);
}

#[tokio::test]
async fn hintcheck_output_is_the_live_hint() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("port");
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut t = task("verify_nginx", "test \"$(cat \"$P\" 2>/dev/null)\" = 8080");
    t.env.insert("P".into(), port.display().to_string());
    t.hintcheck = "test -f \"$P\" && echo \"Wrong port: $(cat \"$P\")\" || echo 'Nothing listens on port 8080 yet.'".into();
    engine.apply(set(vec![t])).unwrap();
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &TaskStatus| e.hint == "Nothing listens on port 8080 yet.")
    {
        seen = until(
            &mut rx,
            "verify_nginx",
            TaskState::Running,
            Duration::from_secs(5),
        )
        .await;
    }
    std::fs::write(&port, "80").unwrap();
    loop {
        let e = until(
            &mut rx,
            "verify_nginx",
            TaskState::Running,
            Duration::from_secs(5),
        )
        .await;
        if e.last().unwrap().hint == "Wrong port: 80" {
            break;
        }
    }
    std::fs::write(&port, "8080").unwrap();
    let done = until(
        &mut rx,
        "verify_nginx",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(done.last().unwrap().hint, "");
}

#[tokio::test]
async fn helper_tasks_loop_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut h = task("watcher", "echo tick >> \"$LOG\"");
    h.helper = true;
    h.interval_ms = 50;
    h.env.insert("LOG".into(), log.display().to_string());
    engine.apply(set(vec![h, task("regular", "true")])).unwrap();
    until(
        &mut rx,
        "regular",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ticks = std::fs::read_to_string(&log).unwrap().lines().count();
    assert!(ticks >= 4, "{ticks} ticks");
    let w = state_of(&engine, "watcher");
    assert!(w.helper);
    assert_eq!(w.state, TaskState::Running);
    assert!(!state_of(&engine, "regular").helper);
    drop(engine);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = std::fs::read_to_string(&log).unwrap().lines().count();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        stopped,
        "the helper must stop with the engine"
    );
}

#[tokio::test]
async fn input_tasks_accept_the_right_answer_and_refuse_a_wrong_one() {
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut gate = task("gate", "test -f /nonexistent/gate");
    gate.init = true;
    let mut answer = task("answer", "test \"$INPUT\" = 42");
    answer.input = true;
    answer.hintcheck = "echo \"$INPUT is not the answer\"".into();
    engine.apply(set(vec![answer.clone()])).unwrap();
    until(
        &mut rx,
        "answer",
        TaskState::Running,
        Duration::from_secs(5),
    )
    .await;
    let r = engine.input("answer", "41").await.unwrap();
    assert!(!r.accepted);
    assert_eq!(r.hint, "41 is not the answer");
    assert_eq!(state_of(&engine, "answer").state, TaskState::Running);
    let r = engine.input("answer", "42").await.unwrap();
    assert!(r.accepted, "{r:?}");
    assert_eq!(state_of(&engine, "answer").state, TaskState::Completed);
    assert_eq!(state_of(&engine, "answer").attempt, 2);
    assert!(engine.input("answer", "7").await.unwrap().accepted);
    assert!(matches!(
        engine.input("nope", "1").await,
        Err(TaskError::UnknownTask(_))
    ));

    // Blocked behind an init task that never passes: not ready for input.
    let engine = Engine::new(real(), None);
    engine.apply(set(vec![gate.clone(), answer])).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = engine.input("answer", "42").await.unwrap_err();
    assert!(matches!(e, TaskError::NotReady { .. }), "{e}");
    let e = engine.input("gate", "42").await.unwrap_err();
    assert!(matches!(e, TaskError::NotInput(_)), "{e}");
}

#[tokio::test]
async fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("state/tasks.json");
    let count = dir.path().join("init-runs");
    let flag = dir.path().join("flag");
    let mut init = task("setup", "echo run >> \"$COUNT\"");
    init.init = true;
    init.env.insert("COUNT".into(), count.display().to_string());
    let mut wait = task("wait_flag", "test -f \"$FLAG\"");
    wait.env.insert("FLAG".into(), flag.display().to_string());
    let mut answer = task("answer", "test \"$INPUT\" = yes");
    answer.input = true;
    let s = set(vec![init, wait, answer]);

    let engine = Engine::new(real(), Some(store.clone()));
    let (_, mut rx) = engine.watch();
    engine.apply(s.clone()).unwrap();
    until(
        &mut rx,
        "answer",
        TaskState::Running,
        Duration::from_secs(5),
    )
    .await;
    assert!(engine.input("answer", "yes").await.unwrap().accepted);
    // Its needs are those of `answer` (the init task): running by now or very soon.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(&engine, "wait_flag").state != TaskState::Running {
        assert!(Instant::now() < deadline, "wait_flag not running");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seq = engine.list().1.iter().map(|s| s.seq).max().unwrap();
    drop(engine);

    // The agent restarts: the saved set resumes without an ApplyTasks.
    let engine = Engine::new(real(), Some(store.clone()));
    let (list, mut rx) = engine.watch();
    let states: Vec<(String, TaskState)> = list.iter().map(|s| (s.name.clone(), s.state)).collect();
    assert_eq!(
        states,
        [
            ("setup".to_string(), TaskState::Completed),
            ("wait_flag".to_string(), TaskState::Running),
            ("answer".to_string(), TaskState::Completed),
        ]
    );
    std::fs::write(&flag, "").unwrap();
    let seen = until(
        &mut rx,
        "wait_flag",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        seen.last().unwrap().seq > seq,
        "seq continues across restarts"
    );
    // The same set applied again by the worker after the restart changes nothing.
    engine.apply(s).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        engine
            .list()
            .1
            .iter()
            .all(|s| s.state == TaskState::Completed)
    );
    assert_eq!(
        std::fs::read_to_string(&count).unwrap(),
        "run\n",
        "init ran once"
    );
}

#[tokio::test]
async fn tasks_run_as_their_user_with_a_login_environment() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (switches users)");
        return;
    }
    let engine = Engine::new(real(), None);
    let (_, mut rx) = engine.watch();
    let mut t = task(
        "as_nobody",
        "id -un; echo \"$USER $HOME\"; test \"$(id -u)\" = 65534",
    );
    t.user = "nobody".into();
    let mut ghost = task("ghost", "true");
    ghost.user = "no_such_user_xyz".into();
    engine.apply(set(vec![t, ghost])).unwrap();
    until(
        &mut rx,
        "as_nobody",
        TaskState::Completed,
        Duration::from_secs(5),
    )
    .await;
    let s = state_of(&engine, "as_nobody");
    assert!(s.stdout.starts_with("nobody\nnobody /"), "{s:?}");
    let g = state_of(&engine, "ghost");
    assert_eq!(g.state, TaskState::Running);
    assert_eq!(g.exit_code, Some(127));
    assert!(g.stderr.contains("no_such_user_xyz"), "{g:?}");
}
