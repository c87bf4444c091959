//! Resolving a playground manifest into the plan a worker executes.

use std::collections::{BTreeMap, BTreeSet};

use ironlab_api::worker::{FilePlan, ImageRef, MachinePlan, RunPlan, TaskPlan};
use ironlab_spec::{ImageSource, Manifest, RuntimeKind, Task};

use crate::error::{ApiError, ApiResult};

/// Process limit of every machine unless a later manifest field says otherwise.
pub const DEFAULT_PIDS_LIMIT: u32 = 1024;

/// Turns a validated manifest into a [`RunPlan`] for run `run_id`.
///
/// `worker_runtimes` is what the worker's status lists; `auto` and `container` resolve to
/// `container` for now, and `microvm` is refused unless the worker offers it.
pub fn resolve(
    run_id: &str,
    manifest: &Manifest,
    worker_runtimes: &[String],
) -> ApiResult<RunPlan> {
    let mut machines = Vec::new();
    for (i, m) in manifest.playground.machines.iter().enumerate() {
        let path = format!("playground.machines[{i}]");
        let runtime = match m.runtime {
            RuntimeKind::Auto | RuntimeKind::Container => "container",
            RuntimeKind::Microvm => {
                if worker_runtimes.iter().any(|r| r == "microvm") {
                    "microvm"
                } else {
                    return Err(ApiError::BadRequest(format!(
                        "{path}.runtime: runtime microvm is not available on this platform yet"
                    )));
                }
            }
        };
        let root = m.root_drive().ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{path}.drives: machine {} has no root drive",
                m.name
            ))
        })?;
        let source = root.source.as_deref().ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{path}.drives: the root drive of machine {} has no source",
                m.name
            ))
        })?;
        let image = match ImageSource::parse(source)
            .map_err(|e| ApiError::BadRequest(format!("{path}.drives: {e}")))?
        {
            ImageSource::Stock(name) => ImageRef::Stock { name },
            ImageSource::Oci(reference) => ImageRef::Oci { reference },
            ImageSource::Saved(id) => ImageRef::Saved {
                id,
                machine: m.name.clone(),
            },
        };
        let mut files = Vec::new();
        for (j, f) in m.startup_files.iter().enumerate() {
            let mode = u32::from_str_radix(&f.mode, 8).map_err(|_| {
                ApiError::BadRequest(format!(
                    "{path}.startupFiles[{j}].mode: {:?} is not an octal mode",
                    f.mode
                ))
            })?;
            files.push(FilePlan {
                path: f.path.clone(),
                content: f.content.clone(),
                mode,
                owner: f.owner.clone().unwrap_or_default(),
                append: f.append,
            });
        }
        machines.push(MachinePlan {
            name: m.name.clone(),
            runtime: runtime.to_string(),
            image,
            root_size_bytes: root.size.bytes(),
            cpus: m.resources.cpu,
            memory_bytes: m.resources.memory.bytes(),
            pids_limit: DEFAULT_PIDS_LIMIT,
            users: m.users.iter().map(|u| u.name.clone()).collect(),
            default_user: m.default_user().to_string(),
            files,
            tasks: Vec::new(),
        });
    }
    let first = machines.first().map(|m| m.name.clone()).unwrap_or_default();
    for name in checklist_order(&manifest.playground.tasks) {
        let t = &manifest.playground.tasks[&name];
        let on = t.machine.clone().unwrap_or_else(|| first.clone());
        let machine = machines.iter_mut().find(|m| m.name == on).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "playground.tasks.{name}.machine: no machine named {on:?}"
            ))
        })?;
        machine.tasks.push(task_plan(&name, t));
    }
    Ok(RunPlan {
        run_id: run_id.to_string(),
        machines,
    })
}

fn task_plan(name: &str, t: &Task) -> TaskPlan {
    let ms = |d: Option<ironlab_spec::Duration>| d.map(|d| d.0.as_millis() as u64).unwrap_or(0);
    TaskPlan {
        name: name.to_string(),
        init: t.init,
        user: t.user.clone().unwrap_or_default(),
        run: t.run.clone(),
        needs: t.needs.clone(),
        hintcheck: t.hintcheck.clone().unwrap_or_default(),
        failcheck: t.failcheck.clone().unwrap_or_default(),
        timeout_ms: ms(t.timeout),
        interval_ms: ms(t.interval),
        env: t.env.clone(),
        input: t.input,
        helper: t.helper,
    }
}

/// The order a checklist shows tasks in: init tasks first, then each task after everything it
/// needs (regular tasks implicitly need every init task), ties by name. A validated manifest
/// has no cycles; anything left over (none in practice) goes last by name.
pub fn checklist_order(tasks: &BTreeMap<String, Task>) -> Vec<String> {
    let inits: Vec<&str> = tasks
        .iter()
        .filter(|(_, t)| t.init)
        .map(|(n, _)| n.as_str())
        .collect();
    let needs = |name: &str| -> BTreeSet<&str> {
        let t = &tasks[name];
        let mut n: BTreeSet<&str> = t
            .needs
            .iter()
            .map(String::as_str)
            .filter(|n| tasks.contains_key(*n))
            .collect();
        if !t.init {
            n.extend(inits.iter().copied());
        }
        n
    };
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut order = Vec::new();
    loop {
        // Init tasks before the rest, each group by name.
        let next = tasks
            .iter()
            .filter(|(n, _)| !done.contains(n.as_str()))
            .filter(|(n, _)| needs(n).iter().all(|d| done.contains(d)))
            .min_by_key(|(n, t)| (!t.init, n.as_str()))
            .map(|(n, _)| n.as_str());
        match next {
            Some(n) => {
                done.insert(n);
                order.push(n.to_string());
            }
            None => break,
        }
    }
    order.extend(tasks.keys().filter(|n| !done.contains(n.as_str())).cloned());
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(yaml: &str) -> Manifest {
        ironlab_spec::parse_manifest(yaml).expect("valid manifest")
    }

    #[test]
    fn resolves_stock_and_oci_images_limits_users_and_files() {
        let m = manifest(
            r#"
kind: playground
name: two
title: Two
playground:
  machines:
    - name: a
      resources: {cpu: 2, memory: 256MiB}
      drives: [{source: debian, mount: /, size: 4GiB}]
      users: [{name: laborant, default: true}]
      startupFiles: [{path: /etc/motd, content: "hi\n", mode: "0600", owner: laborant}]
    - name: b
      runtime: container
      drives: [{source: "oci://127.0.0.1:5000/test/alpine:3", mount: /, size: 1GiB}]
"#,
        );
        let plan = resolve("abc123def456", &m, &["container".into()]).expect("resolves");
        assert_eq!(plan.run_id, "abc123def456");
        let a = &plan.machines[0];
        assert_eq!(a.runtime, "container");
        assert_eq!(
            a.image,
            ImageRef::Stock {
                name: "debian".into()
            }
        );
        assert_eq!(a.root_size_bytes, 4 << 30);
        assert_eq!((a.cpus, a.memory_bytes, a.pids_limit), (2, 256 << 20, 1024));
        assert_eq!(a.default_user, "laborant");
        assert_eq!(a.users, vec!["laborant".to_string()]);
        assert_eq!(a.files[0].mode, 0o600);
        assert_eq!(a.files[0].owner, "laborant");
        let b = &plan.machines[1];
        assert_eq!(
            b.image,
            ImageRef::Oci {
                reference: "127.0.0.1:5000/test/alpine:3".into()
            }
        );
        assert_eq!(b.default_user, "root");
        assert_eq!(b.memory_bytes, 512 << 20);
    }

    #[test]
    fn tasks_go_to_their_machine_in_checklist_order() {
        let m = manifest(
            r#"
kind: playground
name: tasks-lab
title: Tasks
playground:
  machines:
    - {name: a, drives: [{source: debian, mount: /, size: 1GiB}]}
    - {name: b, drives: [{source: debian, mount: /, size: 1GiB}]}
  tasks:
    zz_setup: {init: true, run: "true"}
    alpha: {needs: [beta], run: "test -f /a", hintcheck: "echo hint", timeout: 5s, interval: 500ms}
    beta: {machine: b, user: laborant, run: "test -f /b", env: {X: "1"}}
    answer: {input: true, run: 'test "$INPUT" = 42'}
"#,
        );
        let plan = resolve("r", &m, &["container".into()]).expect("resolves");
        let names = |i: usize| -> Vec<&str> {
            plan.machines[i]
                .tasks
                .iter()
                .map(|t| t.name.as_str())
                .collect()
        };
        assert_eq!(names(0), vec!["zz_setup", "answer", "alpha"]);
        assert_eq!(names(1), vec!["beta"]);
        let alpha = &plan.machines[0].tasks[2];
        assert_eq!((alpha.timeout_ms, alpha.interval_ms), (5000, 500));
        assert_eq!(alpha.hintcheck, "echo hint");
        assert_eq!(alpha.failcheck, "");
        assert_eq!(alpha.user, "");
        assert_eq!(alpha.needs, vec!["beta".to_string()]);
        let beta = &plan.machines[1].tasks[0];
        assert_eq!(beta.user, "laborant");
        assert_eq!(beta.env.get("X").map(String::as_str), Some("1"));
        assert!(plan.machines[0].tasks[1].input);
        assert!(plan.machines[0].tasks[0].init);
    }

    #[test]
    fn microvm_needs_a_worker_that_offers_it() {
        let m = manifest(
            r#"
kind: playground
name: vm-lab
title: VM
playground:
  machines:
    - {name: vm, runtime: microvm, drives: [{source: debian, mount: /, size: 4GiB}]}
"#,
        );
        let err = resolve("r", &m, &["container".into()]).expect_err("refused");
        assert!(
            err.to_string()
                .contains("runtime microvm is not available on this platform yet"),
            "{err}"
        );
        let plan = resolve("r", &m, &["container".into(), "microvm".into()]).expect("offered");
        assert_eq!(plan.machines[0].runtime, "microvm");
    }
}
