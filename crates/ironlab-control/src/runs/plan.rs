//! Resolving a playground manifest into the plan a worker executes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ironlab_api::worker::{
    EgressPlan, EgressPolicy, FilePlan, ImageRef, InterfacePlan, MachinePlan, NetworkPlan, RunPlan,
    TaskPlan,
};
use ironlab_spec::{Egress, ImageSource, Manifest, RuntimeKind, Subnet, Task};

use crate::error::{ApiError, ApiResult};

/// Process limit of every machine unless a later manifest field says otherwise.
pub const DEFAULT_PIDS_LIMIT: u32 = 1024;

/// Domains reachable under the `allowlist` egress policy: package registries and code hosts
/// (each name covers its subdomains).
pub const DEFAULT_EGRESS_ALLOW: &[&str] = &[
    "deb.debian.org",
    "security.debian.org",
    "archive.ubuntu.com",
    "security.ubuntu.com",
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "crates.io",
    "static.crates.io",
    "index.crates.io",
    "proxy.golang.org",
    "github.com",
    "githubusercontent.com",
];

/// Bandwidth of a run's uplink (each direction) until user plans say otherwise: 100 Mbit/s.
pub const DEFAULT_BANDWIDTH_BPS: u64 = 100_000_000;

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
    let (networks, interfaces) = resolve_networks(manifest)?;
    let mut machines = Vec::new();
    for ((i, m), interfaces) in manifest
        .playground
        .machines
        .iter()
        .enumerate()
        .zip(interfaces)
    {
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
            interfaces,
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
        networks,
        egress: EgressPlan {
            policy: match manifest.playground.egress {
                Egress::None => EgressPolicy::None,
                Egress::Allowlist => EgressPolicy::Allowlist,
                Egress::Open => EgressPolicy::Open,
            },
            allow: DEFAULT_EGRESS_ALLOW.iter().map(|d| d.to_string()).collect(),
            bandwidth_bps: DEFAULT_BANDWIDTH_BPS,
        },
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

/// The networks of a manifest (the default `local` one when none are declared) and every
/// machine's interfaces with addresses.
///
/// A non-private network's gateway is its `gateway` or the first host address. Interfaces
/// without an address get, in machine order, the lowest host address of their subnet that is
/// neither the gateway nor an address the manifest gives another interface, so the same manifest
/// always yields the same addresses. A machine without interfaces is on the first network.
fn resolve_networks(manifest: &Manifest) -> ApiResult<(Vec<NetworkPlan>, Vec<Vec<InterfacePlan>>)> {
    let nets = manifest.effective_networks();
    let mut plans = Vec::new();
    let mut subnets: BTreeMap<&str, Subnet> = BTreeMap::new();
    let mut taken: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for (i, n) in nets.iter().enumerate() {
        let bad = |field: &str, e: String| {
            ApiError::BadRequest(format!("playground.networks[{i}].{field}: {e}"))
        };
        let subnet = Subnet::parse(&n.subnet).map_err(|e| bad("subnet", e))?;
        let gateway = match (&n.gateway, n.private) {
            (Some(g), _) => Some(
                g.parse::<Ipv4Addr>()
                    .map_err(|_| bad("gateway", format!("{g:?} is not an IPv4 address")))?,
            ),
            (None, false) => Some(
                subnet
                    .host(1)
                    .ok_or_else(|| bad("subnet", format!("{} has no host address", n.subnet)))?,
            ),
            (None, true) => None,
        };
        let reserved = taken.entry(n.name.clone()).or_default();
        if let (Some(g), false) = (gateway, n.private) {
            reserved.insert(g);
        }
        subnets.insert(n.name.as_str(), subnet);
        plans.push(NetworkPlan {
            name: n.name.clone(),
            subnet: n.subnet.clone(),
            gateway: gateway.map(|g| g.to_string()),
            private: n.private,
        });
    }
    let machines = &manifest.playground.machines;
    // Explicit addresses first, so assigned ones never take them.
    for m in machines {
        for iface in &m.network.interfaces {
            if let Some(a) = iface.address.as_ref().and_then(|a| a.parse().ok()) {
                taken.entry(iface.network.clone()).or_default().insert(a);
            }
        }
    }
    let first = nets.first().map(|n| n.name.clone()).unwrap_or_default();
    let mut all = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        let declared: Vec<(String, Option<String>)> = if m.network.interfaces.is_empty() {
            vec![(first.clone(), None)]
        } else {
            m.network
                .interfaces
                .iter()
                .map(|f| (f.network.clone(), f.address.clone()))
                .collect()
        };
        let mut ifaces = Vec::new();
        for (j, (network, address)) in declared.into_iter().enumerate() {
            let path = format!("playground.machines[{i}].network.interfaces[{j}]");
            let subnet = *subnets.get(network.as_str()).ok_or_else(|| {
                ApiError::BadRequest(format!("{path}.network: no network named {network:?}"))
            })?;
            let address = match address {
                Some(a) => a,
                None => {
                    let used = taken.entry(network.clone()).or_default();
                    let ip = (1..)
                        .map_while(|k| subnet.host(k))
                        .find(|ip| !used.contains(ip))
                        .ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "{path}: network {network:?} ({}) has no free address left",
                                subnet_str(subnet)
                            ))
                        })?;
                    used.insert(ip);
                    ip.to_string()
                }
            };
            ifaces.push(InterfacePlan { network, address });
        }
        all.push(ifaces);
    }
    Ok((plans, all))
}

fn subnet_str(s: Subnet) -> String {
    format!("{}/{}", s.addr, s.prefix)
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
    fn networks_get_gateways_and_machines_get_stable_addresses() {
        let m = manifest(
            r#"
kind: playground
name: router-lab
title: Router
playground:
  networks:
    - {name: lan, subnet: 172.16.0.0/24}
    - {name: back, subnet: 10.0.1.0/24, private: true, gateway: 10.0.1.1}
  machines:
    - name: router
      drives: [{source: debian, mount: /, size: 4GiB}]
      network: {interfaces: [{network: lan}, {network: back, address: 10.0.1.1}]}
    - name: web
      drives: [{source: debian, mount: /, size: 4GiB}]
      network: {interfaces: [{network: lan, address: 172.16.0.2}]}
    - name: db
      drives: [{source: debian, mount: /, size: 4GiB}]
      network: {interfaces: [{network: back}]}
  egress: open
"#,
        );
        let plan = resolve("r", &m, &["container".into()]).expect("resolves");
        assert_eq!(plan.networks.len(), 2);
        assert_eq!(plan.networks[0].gateway.as_deref(), Some("172.16.0.1"));
        assert!(!plan.networks[0].private);
        assert_eq!(plan.networks[1].gateway.as_deref(), Some("10.0.1.1"));
        assert!(plan.networks[1].private);
        let addrs = |i: usize| -> Vec<(String, String)> {
            plan.machines[i]
                .interfaces
                .iter()
                .map(|f| (f.network.clone(), f.address.clone()))
                .collect()
        };
        // .1 is the gateway and .2 is taken by web, so the router gets .3; db skips 10.0.1.1.
        assert_eq!(
            addrs(0),
            vec![
                ("lan".into(), "172.16.0.3".into()),
                ("back".into(), "10.0.1.1".into())
            ]
        );
        assert_eq!(addrs(1), vec![("lan".into(), "172.16.0.2".into())]);
        assert_eq!(addrs(2), vec![("back".into(), "10.0.1.2".into())]);
        assert_eq!(plan.egress.policy, EgressPolicy::Open);
        assert_eq!(plan.egress.bandwidth_bps, DEFAULT_BANDWIDTH_BPS);
        assert!(plan.egress.allow.iter().any(|d| d == "deb.debian.org"));
        // The same manifest always gives the same plan.
        assert_eq!(
            plan,
            resolve("r", &m, &["container".into()]).expect("again")
        );
    }

    #[test]
    fn the_default_network_and_a_full_subnet() {
        let m = manifest(
            r#"
kind: playground
name: one
title: One
playground:
  machines:
    - {name: a, drives: [{source: debian, mount: /, size: 4GiB}]}
    - {name: b, drives: [{source: debian, mount: /, size: 4GiB}]}
"#,
        );
        let plan = resolve("r", &m, &["container".into()]).expect("resolves");
        assert_eq!(plan.networks[0].name, "local");
        assert_eq!(plan.networks[0].subnet, "172.16.0.0/24");
        assert_eq!(plan.machines[0].interfaces[0].address, "172.16.0.2");
        assert_eq!(plan.machines[1].interfaces[0].address, "172.16.0.3");
        assert_eq!(plan.egress.policy, EgressPolicy::Allowlist);

        // A /30 holds two hosts: the gateway and one machine.
        let m = manifest(
            r#"
kind: playground
name: tiny
title: Tiny
playground:
  networks: [{name: tiny, subnet: 10.9.0.0/30}]
  machines:
    - {name: a, drives: [{source: debian, mount: /, size: 4GiB}]}
    - {name: b, drives: [{source: debian, mount: /, size: 4GiB}]}
"#,
        );
        let err = resolve("r", &m, &["container".into()]).expect_err("full");
        assert!(
            err.to_string()
                .contains("playground.machines[1].network.interfaces[0]: network \"tiny\" (10.9.0.0/30) has no free address left"),
            "{err}"
        );
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
