//! Tasks in a real run: a small challenge whose tasks go blocked → running → completed as the
//! test types the solution into a terminal through the relay (the student's path), an input task
//! that refuses a wrong answer and accepts the right one, and restarts of the agent (its `serve`
//! process killed inside the machine), the worker and the control plane that lose no completed
//! task, after which tasks still complete.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Needs, Platform, Registry, http, preflight, serial, wait_for, ws};
use serde_json::{Value, json};

fn tasks(p: &Platform, id: &str) -> Value {
    let r = http(
        "GET",
        &p.api(&format!("/runs/{id}/tasks")),
        Some(&p.token()),
        None,
    );
    assert_eq!(r.status, 200, "GET tasks: {}", r.body);
    r.json()
}

fn task<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {v}"))
}

/// Waits until `cond` holds for the checklist; returns it.
fn wait_tasks(p: &Platform, id: &str, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let got = wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
        last = tasks(p, id);
        cond(&last).then(|| last.clone())
    });
    got.unwrap_or_else(|| {
        panic!(
            "{what}: never happened; last checklist: {last}\n{}",
            p.logs()
        )
    })
}

fn state(v: &Value, name: &str) -> String {
    task(v, name)["state"].as_str().unwrap_or("").to_string()
}

/// Host pid of the machine's agent `serve` process (PID 1 in the machine is `init`).
fn agent_serve_pid(run: &str, machine: &str) -> Option<u32> {
    let cgroup = format!("/ironlab/{run}/{machine}");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() < 2 || args[1] != b"serve" || !args[0].ends_with(b"agent") {
            continue;
        }
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if cg.contains(&cgroup) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn tasks_tick_as_the_solution_is_typed_and_survive_restarts() {
    let _serial = serial();
    let Some(env) = preflight(
        "tasks_tick_as_the_solution_is_typed_and_survive_restarts",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env.test_image.clone().expect("preflight checked the image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    let manifest = format!(
        r#"kind: playground
name: tasks-e2e
title: A tiny challenge
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
  tasks:
    setup:
      init: true
      run: mkdir -p /opt/lab && echo ready > /opt/lab/state
    made_file:
      run: test -f /tmp/answer.txt
      hintcheck: echo "create /tmp/answer.txt"
      interval: 200ms
    right_content:
      needs: [made_file]
      run: grep -q hello /tmp/answer.txt
      hintcheck: echo "write hello into /tmp/answer.txt"
      interval: 200ms
    answer:
      input: true
      run: test "$INPUT" = 42
      hintcheck: echo "six times seven"
    after_restart:
      needs: [right_content]
      run: test -f /tmp/after
      interval: 200ms
    watcher:
      helper: true
      run: sleep 1
"#
    );
    let out = p.create_playground(&manifest);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = p.start_run("tasks-e2e");
    let id = run["id"].as_str().expect("id").to_string();
    // `playground start` returns once the init tasks passed.
    let v = tasks(&p, &id);
    assert_eq!(
        v["ready"], true,
        "start returned before setup finished: {v}"
    );
    assert_eq!(state(&v, "setup"), "completed");

    // Init passes, the first check runs with its hint, its dependent waits.
    let v = wait_tasks(&p, &id, "the first check runs", |v| {
        v["ready"] == true
            && state(v, "made_file") == "running"
            && task(v, "made_file")["hint"] != ""
    });
    assert_eq!(task(&v, "made_file")["hint"], "create /tmp/answer.txt");
    assert_eq!(state(&v, "right_content"), "blocked");
    assert_eq!(state(&v, "setup"), "completed");
    let names: Vec<&str> = v["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec![
            "setup",
            "answer",
            "made_file",
            "right_content",
            "after_restart"
        ],
        "checklist order, helpers hidden"
    );
    let table = p.cli_ok(&["playground", "tasks", &id]);
    assert!(
        table.contains("made_file") && table.contains("create /tmp/answer.txt"),
        "{table}"
    );

    // Follow the changes with the CLI while the solution is typed.
    let mut watch = p.cli_command(&p.token());
    watch
        .args(["playground", "tasks", &id, "--watch", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut watch = watch.spawn().expect("start tasks --watch");
    let lines = Arc::new(Mutex::new(Vec::<Value>::new()));
    let reader = {
        let lines = lines.clone();
        let stdout = watch.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    lines.lock().expect("lines").push(v);
                }
            }
        })
    };

    // Type the solution into a terminal, as a student does.
    let conn = http(
        "POST",
        &p.api(&format!("/runs/{id}/connect")),
        Some(&p.token()),
        Some(&json!({"machine": "box"}).to_string()),
    );
    assert_eq!(conn.status, 200, "connect: {}", conn.body);
    let url = conn.json()["url"].as_str().expect("url").to_string();
    let mut term = ws(&url).unwrap_or_else(|r| panic!("terminal refused: {} {}", r.status, r.body));
    term.send_text(&json!({"type": "start", "tty": true, "cols": 80, "rows": 24}).to_string());
    let mut typed = |text: &str| {
        let mut frame = vec![0u8];
        frame.extend_from_slice(text.as_bytes());
        term.send_binary(&frame);
    };
    typed("echo hi > /tmp/answer.txt\n");
    let v = wait_tasks(&p, &id, "made_file completes, right_content hints", |v| {
        state(v, "made_file") == "completed"
            && state(v, "right_content") == "running"
            && task(v, "right_content")["hint"] != ""
    });
    assert_eq!(
        task(&v, "right_content")["hint"],
        "write hello into /tmp/answer.txt"
    );
    assert_eq!(
        task(&v, "made_file")["hint"],
        "",
        "a completed task has no hint"
    );
    typed("echo hello > /tmp/answer.txt\n");
    wait_tasks(&p, &id, "right_content completes", |v| {
        state(v, "right_content") == "completed" && state(v, "after_restart") == "running"
    });

    // The input task: errors first, then a wrong and a right answer.
    let input = |task: &str, body: &str| {
        http(
            "POST",
            &p.api(&format!("/runs/{id}/tasks/{task}/input")),
            Some(&p.token()),
            Some(body),
        )
    };
    let r = input("nope", r#"{"value":"42"}"#);
    assert_eq!(r.status, 404, "{}", r.body);
    let r = input("made_file", r#"{"value":"42"}"#);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("not an input task"), "{}", r.body);
    let r = input("answer", r#"{"value":"41"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"accepted": false, "hint": "six times seven"})
    );
    assert_eq!(state(&tasks(&p, &id), "answer"), "running");
    let r = input("answer", r#"{"value":"42"}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["accepted"], true);
    wait_tasks(&p, &id, "answer completes", |v| {
        state(v, "answer") == "completed"
    });

    // The watcher saw each change once, in order: running with a hint, then completed.
    let seen = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        let l = lines.lock().expect("lines").clone();
        l.iter()
            .any(|t| t["name"] == "answer" && t["state"] == "completed")
            .then_some(l)
    })
    .unwrap_or_else(|| {
        panic!(
            "`tasks --watch` printed: {:?}",
            lines.lock().expect("lines")
        )
    });
    let made: Vec<(String, String)> = seen
        .iter()
        .filter(|t| t["name"] == "made_file")
        .map(|t| {
            (
                t["state"].as_str().unwrap_or("").to_string(),
                t["hint"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        made,
        vec![
            ("running".to_string(), "create /tmp/answer.txt".to_string()),
            ("completed".to_string(), String::new())
        ],
        "the CLI follows the live stream"
    );
    assert!(
        !seen.iter().any(|t| t["name"] == "watcher"),
        "helpers are never shown"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();

    // Restart everything: the agent inside the machine, then the worker, then the control plane.
    let before = tasks(&p, &id);
    let pid = agent_serve_pid(&id, "box").expect("the machine's agent serve process");
    common::signal(pid, "KILL");
    let restarted = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        agent_serve_pid(&id, "box").filter(|n| *n != pid)
    });
    assert!(
        restarted.is_some(),
        "init did not restart the agent\n{}",
        p.logs()
    );
    p.kill_worker();
    p.start_worker();
    p.kill_control();
    p.start_control();
    let after = tasks(&p, &id);
    for name in ["setup", "made_file", "right_content", "answer"] {
        assert_eq!(
            state(&after, name),
            "completed",
            "{name} after the restarts: {after}"
        );
        assert_eq!(
            task(&after, name)["at"],
            task(&before, name)["at"],
            "{name} kept its time"
        );
    }
    // The relay is back on both ends: the last task still completes.
    p.ssh_ok(&id, &["touch", "/tmp/after"]);
    wait_tasks(&p, &id, "after_restart completes after the restarts", |v| {
        state(v, "after_restart") == "completed"
    });
    let v = tasks(&p, &id);
    assert!(
        v["tasks"]
            .as_array()
            .expect("tasks")
            .iter()
            .all(|t| t["state"] == "completed"),
        "{v}"
    );
    let out = p.cli_ok(&["playground", "tasks", &id, "--watch"]);
    assert!(out.contains("after_restart completed"), "{out}");

    p.destroy(&id);
    p.assert_clean(&id);
}

/// A task on one machine needs a task on another: the worker feeds the need (`SetExternal`) with
/// the other task's stdout, so the dependent task unblocks and sees `$NEEDS_<name>_STDOUT`.
#[test]
fn a_task_can_need_a_task_of_another_machine() {
    let _serial = serial();
    let Some(env) = preflight(
        "a_task_can_need_a_task_of_another_machine",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env.test_image.clone().expect("preflight checked the image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    let manifest = format!(
        r#"kind: playground
name: two-machines
title: Two machines
playground:
  machines:
    - name: alpha
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
    - name: beta
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
  tasks:
    on_alpha:
      machine: alpha
      run: test -f /tmp/go && echo hello-from-alpha
      interval: 200ms
    on_beta:
      machine: beta
      needs: [on_alpha]
      run: test "$NEEDS_on_alpha_STDOUT" = hello-from-alpha
      hintcheck: echo "saw '$NEEDS_on_alpha_STDOUT'"
      interval: 200ms
"#
    );
    let out = p.create_playground(&manifest);
    assert!(
        out.status.success(),
        "create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = p.start_run("two-machines");
    let id = run["id"].as_str().expect("id").to_string();
    let v = wait_tasks(&p, &id, "on_alpha runs", |v| {
        state(v, "on_alpha") == "running"
    });
    assert_eq!(
        state(&v, "on_beta"),
        "blocked",
        "waits for the other machine"
    );
    assert_eq!(task(&v, "on_beta")["machine"], "beta");
    // Nothing on beta can unblock it: only alpha's task.
    p.cli_ok(&["ssh", &id, "--machine", "beta", "--", "touch", "/tmp/go"]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(state(&tasks(&p, &id), "on_beta"), "blocked");
    p.cli_ok(&["ssh", &id, "--machine", "alpha", "--", "touch", "/tmp/go"]);
    let v = wait_tasks(&p, &id, "on_beta completes with alpha's stdout", |v| {
        state(v, "on_beta") == "completed" || task(v, "on_beta")["hint"] != ""
    });
    assert_eq!(state(&v, "on_alpha"), "completed");
    assert_eq!(state(&v, "on_beta"), "completed", "{v}");
    p.destroy(&id);
    p.assert_clean(&id);
}
