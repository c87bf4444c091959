//! Benchmark (ignored by default): the agent's own CPU while idle-polling 50 cheap tasks
//! (`interval: 1s`, `run: test -f /nonexistent`), target < 2 % of one core (issue 6).
//!
//! ```sh
//! IRONLAB_AGENT_BIN=$(scripts/build-agent.sh) \
//!   cargo test -p ironlab-agent --test tasks_bench -- --ignored --nocapture
//! ```
//! `IRONLAB_AGENT_BIN` defaults to the test build of the binary (debug: slower than what ships);
//! `IRONLAB_BENCH_SECS` (default 30) is the measured window.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ironlab_agent::tasks::{TaskDef, proto};
use ironlab_api::agent::{ApplyTasksRequest, ListTasksRequest};

/// Kills the agent on drop (SIGTERM, then waits; SIGKILL if it lingers).
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// (own utime + stime, children's cutime + cstime) in clock ticks.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    // rest[0] is field 3 (state); utime = field 14, stime 15, cutime 16, cstime 17.
    (f[11] + f[12], f[13] + f[14])
}

#[tokio::test]
#[ignore = "benchmark: runs for 30 s"]
async fn agent_cpu_idle_polling_50_tasks() {
    let bin = std::env::var("IRONLAB_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_ironlab-agent").to_string());
    let secs: u64 = std::env::var("IRONLAB_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let agent = Agent(
        Command::new(&bin)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--tasks-state")
            .arg(dir.path().join("tasks.json"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}")),
    );
    let mut client = None;
    for _ in 0..100 {
        if let Ok(c) = ironlab_agent::connect(Path::new(&socket)).await {
            client = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = client.expect("the agent listens within 5 s");
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            proto::task_def(&TaskDef {
                name: format!("poll_{i:02}"),
                run: "test -f /nonexistent".into(),
                interval_ms: 1000,
                ..Default::default()
            })
        })
        .collect();
    client
        .apply_tasks(ApplyTasksRequest {
            tasks,
            machine: "bench".into(),
            external_needs: vec![],
        })
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = |l: &ironlab_api::agent::ListTasksResponse| -> u64 {
        l.tasks.iter().map(|t| u64::from(t.attempt)).sum()
    };
    let before_list = client
        .list_tasks(ListTasksRequest {})
        .await
        .expect("list")
        .into_inner();
    let (own0, kids0) = cpu_ticks(agent.0.id());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (own1, kids1) = cpu_ticks(agent.0.id());
    let elapsed = t0.elapsed().as_secs_f64();
    let after_list = client
        .list_tasks(ListTasksRequest {})
        .await
        .expect("list")
        .into_inner();
    // SAFETY: sysconf has no memory-safety preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let own = (own1 - own0) as f64 / hz / elapsed * 100.0;
    let kids = (kids1 - kids0) as f64 / hz / elapsed * 100.0;
    let runs = attempts(&after_list) - attempts(&before_list);
    println!(
        "agent {bin}: 50 tasks, interval 1s, {elapsed:.1} s: agent CPU {own:.2} % of one core; \
         the scripts (bash children) {kids:.2} %; {runs} attempts ({:.1}/s)",
        runs as f64 / elapsed
    );
    assert!(
        runs as f64 >= 40.0 * elapsed,
        "the tasks were not polled every second: {runs} attempts in {elapsed:.1} s"
    );
    assert!(own < 2.0, "agent CPU {own:.2} % of one core (target < 2 %)");
    drop(agent);
}
