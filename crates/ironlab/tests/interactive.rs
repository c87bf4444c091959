//! `ironlab ssh RUN` without a command: an interactive shell under a real PTY (`script`), where
//! typed input runs, Ctrl-C interrupts the remote foreground process, and `exit` ends the session.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Needs, Platform, Registry, preflight, serial, wait_for, which};

fn manifest(image: &str) -> String {
    format!(
        r#"kind: playground
name: shell-box
title: Interactive shell
playground:
  machines:
    - name: box
      runtime: container
      resources: {{memory: 64MiB}}
      drives: [{{source: "{image}", mount: /, size: 128MiB}}]
      users: [{{name: laborant, default: true}}]
"#
    )
}

#[test]
fn interactive_shell_over_a_pty() {
    let _serial = serial();
    let Some(env) = preflight(
        "interactive_shell_over_a_pty",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    if which("script").is_none() {
        if common::required() {
            panic!("`script` (util-linux) is missing");
        }
        eprintln!("SKIPPED interactive_shell_over_a_pty: `script` (util-linux) is missing");
        return;
    }
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    assert!(
        p.create_playground(&manifest(&image)).status.success(),
        "create shell-box\n{}",
        p.logs()
    );
    let run = p.start_run("shell-box");
    let id = run["id"].as_str().expect("start prints an id").to_string();

    // `script` gives the CLI a real terminal; we type into it and read what it shows.
    let inner = format!(
        "stty cols 100 rows 30; exec {} ssh {id}",
        common::bin().display()
    );
    let cli = p.cli_command(&p.token());
    let mut child = Command::new("script")
        .args(["-q", "-f", "-e", "-c", &inner, "/dev/null"])
        .envs(
            cli.get_envs()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v.to_owned()))),
        )
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start script(1)");
    let script_pid = child.id().to_string();
    let screen = Arc::new(Mutex::new(Vec::<u8>::new()));
    let reader = {
        let screen = Arc::clone(&screen);
        let mut out = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut s) = screen.lock() {
                    s.extend_from_slice(&buf[..n]);
                }
            }
        })
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let shown = |needle: &str| {
        screen
            .lock()
            .map(|s| String::from_utf8_lossy(&s).contains(needle))
            .unwrap_or(false)
    };
    let dump = || {
        screen
            .lock()
            .map(|s| String::from_utf8_lossy(&s).into_owned())
            .unwrap_or_default()
    };
    let mut expect = |what: &str, needle: &str, timeout: Duration| {
        if wait_for(timeout, Duration::from_millis(20), || {
            shown(needle).then_some(())
        })
        .is_none()
        {
            let _ = child_kill(&mut child);
            panic!(
                "{what}: {needle:?} did not appear within {timeout:?}; the terminal showed:\n{}\n{}",
                dump(),
                p.logs()
            );
        }
    };

    // Typed input runs; the output shows the evaluated result, not just the echo.
    std::thread::sleep(Duration::from_millis(300));
    stdin
        .write_all(b"echo hi-$((1+1))\r")
        .expect("type into the terminal");
    expect("typed command", "hi-2", Duration::from_secs(30));

    // The session is a login as the default user on the right machine.
    stdin
        .write_all(b"echo who-$(id -un)-$(hostname)\r")
        .expect("type into the terminal");
    expect("user and host", "who-laborant-box", Duration::from_secs(10));

    // The window size came through the PTY.
    stdin
        .write_all(b"echo size-$(stty size | tr ' ' x)\r")
        .expect("type into the terminal");
    expect("window size", "size-30x100", Duration::from_secs(10));

    // Resizing the local terminal resizes the remote one (SIGWINCH → resize message).
    let cli_pid = common::sh("pgrep", &["-P", &script_pid]);
    let cli_pid = cli_pid.lines().next().unwrap_or("").trim().to_string();
    let pts = std::fs::read_link(format!("/proc/{cli_pid}/fd/0")).unwrap_or_else(|e| {
        panic!("cannot find the terminal of `ironlab ssh` (pid {cli_pid:?}): {e}")
    });
    let resized = Command::new("stty")
        .arg("-F")
        .arg(&pts)
        .args(["cols", "120", "rows", "40"])
        .status()
        .expect("run stty");
    assert!(resized.success(), "stty -F {} failed", pts.display());
    std::thread::sleep(Duration::from_millis(300));
    stdin
        .write_all(b"echo size-$(stty size | tr ' ' x)\r")
        .expect("type into the terminal");
    expect(
        "window size after resize",
        "size-40x120",
        Duration::from_secs(10),
    );

    // Ctrl-C interrupts the remote foreground process and the shell prompt comes back.
    let t = Instant::now();
    stdin
        .write_all(b"sleep 100\r")
        .expect("type into the terminal");
    std::thread::sleep(Duration::from_millis(500));
    stdin.write_all(b"\x03").expect("type Ctrl-C");
    stdin
        .write_all(b"echo back-$((2+3))\r")
        .expect("type into the terminal");
    expect("after Ctrl-C", "back-5", Duration::from_secs(15));
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "Ctrl-C did not interrupt `sleep 100`"
    );

    // `exit` ends the session and the CLI.
    stdin.write_all(b"exit\r").expect("type exit");
    let done = wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
        child.try_wait().ok().flatten()
    });
    let _ = child_kill(&mut child);
    let _ = reader.join();
    let status = done.unwrap_or_else(|| {
        panic!(
            "`ironlab ssh` did not end after `exit`; terminal:\n{}",
            dump()
        )
    });
    assert!(
        status.success(),
        "interactive `ironlab ssh` exited with {status}; terminal:\n{}",
        dump()
    );

    p.destroy(&id);
    p.assert_clean(&id);
}

fn child_kill(c: &mut std::process::Child) -> std::io::Result<()> {
    if c.try_wait()?.is_none() {
        c.kill()?;
        c.wait()?;
    }
    Ok(())
}
