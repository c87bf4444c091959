//! A microVM's place on the run's networks, seen from the guest (pure: no I/O, unit-tested).
//!
//! The worker's network code gives a microVM machine a tap `tap<i>` per planned interface in
//! the machine's namespace, tied to the veth `eth<i>` on the run's bridge (see
//! [`crate::net::layout`]). QEMU turns each tap into a virtio-net card with a MAC derived from
//! the machine and the interface index ([`mac`]). The guest learns what to do with them from
//! the **config drive**: a read-only virtio-blk drive (serial [`CONFIG_DRIVE_SERIAL`]) holding a
//! newc cpio archive with
//!
//! - `net.conf`: one line per interface in order, `iface eth<i> <mac> <address>/<prefix>`, then
//!   `route <gateway>` when the machine has a default route;
//! - `hosts` and `resolv.conf`: the same texts a container machine of the plan gets
//!   (`MachineSpec::etc_hosts` / `resolv_conf`).
//!
//! `images/kernel/init.sh` (`apply_network`) reads it before handing over: it names the card
//! with each MAC `eth<i>`, adds the address and the route, and writes `/etc/hosts` and
//! `/etc/resolv.conf` into the root drive. Nothing needs a kernel option beyond virtio-blk,
//! virtio-net and IPv4. The drive is `pool/runs/<run>/<machine>/config.img`, rewritten at each
//! boot.

use std::fmt::Write as _;

use sha2::Digest;

pub use super::cmdline::CONFIG_DRIVE_SERIAL;
use super::cmdline::Nic;
use crate::net::layout::MachineNet;
use crate::runtime::MachineSpec;

/// The config drive's file name in the machine directory.
pub const CONFIG_DRIVE: &str = "config.img";

/// The MAC of interface `i` of the microVM `vm_name` (`il-<run>-<machine>`): QEMU's prefix
/// `52:54:00` and three bytes of a hash, so machines of a run differ.
pub fn mac(vm_name: &str, i: usize) -> String {
    let h = sha2::Sha256::digest(format!("{vm_name}/eth{i}").as_bytes());
    format!("52:54:00:{:02x}:{:02x}:{:02x}", h[0], h[1], h[2])
}

/// The guest's cards: one per planned interface, on the machine namespace's `tap<i>`. None for
/// plans without networks (the machine then shares the run's namespace, which has only `lo`).
pub fn nics(spec: &MachineSpec) -> Vec<Nic> {
    let name = super::vm_name(&spec.run_id, &spec.plan.name);
    spec.net
        .as_ref()
        .map(|n| {
            (0..n.ifaces.len())
                .map(|i| Nic {
                    tap: MachineNet::tap(i),
                    mac: mac(&name, i),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `net.conf` of the config drive.
pub fn net_conf(vm_name: &str, net: &MachineNet) -> String {
    let mut s = String::new();
    for (i, f) in net.ifaces.iter().enumerate() {
        let _ = writeln!(
            s,
            "iface {} {} {}/{}",
            f.name,
            mac(vm_name, i),
            f.address,
            f.prefix
        );
    }
    if let Some(g) = net.default_route {
        let _ = writeln!(s, "route {g}");
    }
    s
}

/// The config drive's bytes (a cpio archive padded to 4 KiB), or `None` when the machine is on
/// no network.
pub fn config_drive(spec: &MachineSpec) -> Option<Vec<u8>> {
    let net = spec.net.as_ref()?;
    let name = super::vm_name(&spec.run_id, &spec.plan.name);
    let conf = net_conf(&name, net);
    let hosts = spec.etc_hosts.clone().unwrap_or_default();
    let resolv = spec.resolv_conf.clone().unwrap_or_default();
    let mut img = super::cpio(&[
        ("net.conf", 0o100644, conf.as_bytes()),
        ("hosts", 0o100644, hosts.as_bytes()),
        ("resolv.conf", 0o100644, resolv.as_bytes()),
    ]);
    img.resize(img.len().div_ceil(4096) * 4096, 0);
    Some(img)
}

#[cfg(test)]
mod tests {
    use ironlab_api::worker::{
        EgressPlan, EgressPolicy, ImageRef, InterfacePlan, MachinePlan, NetworkPlan, RunPlan,
    };

    use super::*;
    use crate::net::layout::Layout;

    fn plan() -> RunPlan {
        let machine = |name: &str, runtime: &str, ifaces: &[(&str, &str)]| MachinePlan {
            name: name.into(),
            runtime: runtime.into(),
            image: ImageRef::Stock {
                name: "debian".into(),
            },
            root_size_bytes: 1 << 30,
            cpus: 1,
            memory_bytes: 256 << 20,
            pids_limit: 100,
            users: vec![],
            default_user: "root".into(),
            files: vec![],
            tasks: vec![],
            interfaces: ifaces
                .iter()
                .map(|(n, a)| InterfacePlan {
                    network: n.to_string(),
                    address: a.to_string(),
                })
                .collect(),
        };
        RunPlan {
            run_id: "r1".into(),
            machines: vec![
                machine(
                    "vm",
                    "microvm",
                    &[("lan", "172.16.0.2"), ("back", "10.0.1.1")],
                ),
                machine("web", "container", &[("lan", "172.16.0.3")]),
            ],
            networks: vec![
                NetworkPlan {
                    name: "lan".into(),
                    subnet: "172.16.0.0/24".into(),
                    gateway: Some("172.16.0.1".into()),
                    private: false,
                },
                NetworkPlan {
                    name: "back".into(),
                    subnet: "10.0.1.0/24".into(),
                    gateway: None,
                    private: true,
                },
            ],
            egress: EgressPlan {
                policy: EgressPolicy::None,
                allow: vec![],
                bandwidth_bps: 0,
            },
        }
    }

    fn spec(with_net: bool) -> MachineSpec {
        let p = plan();
        let l = Layout::new(&p).expect("valid plan");
        MachineSpec {
            run_id: "r1".into(),
            plan: p.machines[0].clone(),
            dir: "/p/runs/r1/vm".into(),
            root_drive: "/p/runs/r1/vm/root.ext4".into(),
            netns: "/var/run/netns/ilm-r1-vm".into(),
            image_env: vec![],
            etc_hosts: with_net.then(|| l.hosts_file("vm")),
            resolv_conf: with_net.then(|| l.resolv_conf("vm")),
            fresh_from: None,
            net: with_net.then(|| l.machines[0].clone()),
        }
    }

    #[test]
    fn one_card_per_interface_with_stable_distinct_macs() {
        let n = nics(&spec(true));
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].tap, "tap0");
        assert_eq!(n[1].tap, "tap1");
        assert_ne!(n[0].mac, n[1].mac);
        assert_eq!(n[0].mac, mac("il-r1-vm", 0));
        assert_ne!(mac("il-r1-vm", 0), mac("il-r1-web", 0));
        assert!(n[0].mac.starts_with("52:54:00:") && n[0].mac.len() == 17);
        assert!(nics(&spec(false)).is_empty());
        assert!(config_drive(&spec(false)).is_none());
    }

    #[test]
    fn net_conf_lists_addresses_in_order_and_the_route() {
        let s = spec(true);
        let conf = net_conf("il-r1-vm", s.net.as_ref().expect("net"));
        assert_eq!(
            conf,
            format!(
                "iface eth0 {} 172.16.0.2/24\niface eth1 {} 10.0.1.1/24\nroute 172.16.0.1\n",
                mac("il-r1-vm", 0),
                mac("il-r1-vm", 1)
            )
        );
    }

    #[test]
    fn the_config_drive_is_a_padded_cpio_with_the_plans_texts() {
        let s = spec(true);
        let img = config_drive(&s).expect("a drive");
        assert_eq!(img.len() % 4096, 0);
        assert!(img.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&img);
        for name in ["net.conf", "hosts", "resolv.conf", "TRAILER!!!"] {
            assert!(text.contains(name), "{name} in the archive");
        }
        assert!(text.contains("172.16.0.3\tweb web.lan\n"), "hosts: {text}");
        assert!(
            text.contains("nameserver 172.16.0.1\n"),
            "resolv.conf: {text}"
        );
        // What the guest's busybox makes of it (padding and all).
        let Some(busybox) = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
        else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let drive = dir.path().join("config.img");
        std::fs::write(&drive, &img).expect("write");
        let out = std::process::Command::new(busybox)
            .args(["cpio", "-i", "-d", "-F"])
            .arg(&drive)
            .current_dir(dir.path())
            .output()
            .expect("busybox cpio");
        assert!(out.status.success(), "{out:?}");
        let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).expect(f);
        assert_eq!(
            read("net.conf"),
            net_conf("il-r1-vm", s.net.as_ref().expect("net"))
        );
        assert_eq!(Some(read("hosts")), s.etc_hosts);
        assert_eq!(Some(read("resolv.conf")), s.resolv_conf);
    }
}
