//! Resolving a playground manifest into the plan a worker executes.

use ironlab_api::worker::{FilePlan, ImageRef, MachinePlan, RunPlan};
use ironlab_spec::{ImageSource, Manifest, RuntimeKind};

use crate::error::{ApiError, ApiResult};

/// Process limit of every machine unless a later manifest field says otherwise.
pub const DEFAULT_PIDS_LIMIT: u32 = 1024;

/// Turns a validated manifest into a [`RunPlan`] for run `run_id`.
///
/// `worker_runtimes` is what the worker's status lists; `container` resolves to `container`,
/// `auto` to `container` (see [`resolve_with_accel`]), and `microvm` is refused unless the
/// worker offers it.
pub fn resolve(
    run_id: &str,
    manifest: &Manifest,
    worker_runtimes: &[String],
) -> ApiResult<RunPlan> {
    resolve_with_accel(run_id, manifest, worker_runtimes, "none")
}

/// Like [`resolve`], knowing the worker's microVM accelerator (`kvm`, `tcg`, `none`): `auto`
/// becomes `microvm` only where the worker offers microVMs on KVM. Under TCG (software
/// emulation, seconds per boot) `auto` stays a container; `runtime: microvm` asks for a VM
/// regardless.
pub fn resolve_with_accel(
    run_id: &str,
    manifest: &Manifest,
    worker_runtimes: &[String],
    accel: &str,
) -> ApiResult<RunPlan> {
    let offers_vm = worker_runtimes.iter().any(|r| r == "microvm");
    let mut machines = Vec::new();
    for (i, m) in manifest.playground.machines.iter().enumerate() {
        let path = format!("playground.machines[{i}]");
        let runtime = match m.runtime {
            RuntimeKind::Auto if offers_vm && accel == "kvm" => "microvm",
            RuntimeKind::Auto | RuntimeKind::Container => "container",
            RuntimeKind::Microvm => {
                if offers_vm {
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
        });
    }
    Ok(RunPlan {
        run_id: run_id.to_string(),
        machines,
    })
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
        let both: Vec<String> = vec!["container".into(), "microvm".into()];
        let auto = manifest(
            r#"
kind: playground
name: auto-lab
title: Auto
playground:
  machines:
    - {name: m, drives: [{source: debian, mount: /, size: 4GiB}]}
"#,
        );
        // `auto` is a microVM only on KVM; under TCG it stays a container.
        let on_kvm = resolve_with_accel("r", &auto, &both, "kvm").expect("kvm");
        assert_eq!(on_kvm.machines[0].runtime, "microvm");
        let on_tcg = resolve_with_accel("r", &auto, &both, "tcg").expect("tcg");
        assert_eq!(on_tcg.machines[0].runtime, "container");
        let no_vm = resolve_with_accel("r", &auto, &["container".into()], "kvm").expect("no vm");
        assert_eq!(no_vm.machines[0].runtime, "container");
    }
}
