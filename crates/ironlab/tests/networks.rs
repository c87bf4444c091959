//! Multi-machine networks through the whole system: a manifest with two networks (one private)
//! goes through the control plane (addresses assigned there) to the worker, and the machines see
//! their interfaces, each other's names and the topology. The worker runs with no uplink
//! (`IRONLAB_UPLINK=none`, set by the fixture): nothing leaves the run.

mod common;

use common::{Needs, Platform, Registry, preflight, serial};

fn manifest(image: &str) -> String {
    let drive = format!(r#"drives: [{{source: "{image}", mount: /, size: 256MiB}}]"#);
    format!(
        r#"kind: playground
name: two-lans
title: Two LANs and a router
playground:
  networks:
    - {{name: lan, subnet: 172.16.5.0/24}}
    - {{name: back, subnet: 10.0.9.0/24, private: true, gateway: 10.0.9.1}}
  machines:
    - name: router
      resources: {{memory: 64MiB}}
      {drive}
      network: {{interfaces: [{{network: lan}}, {{network: back, address: 10.0.9.1}}]}}
    - name: web
      resources: {{memory: 64MiB}}
      {drive}
      network: {{interfaces: [{{network: lan}}]}}
    - name: db
      resources: {{memory: 64MiB}}
      {drive}
      network: {{interfaces: [{{network: back}}]}}
  egress: none
"#
    )
}

fn ssh_ok(p: &Platform, run: &str, machine: &str, script: &str) -> String {
    let out = p.cli(&["ssh", run, "--machine", machine, "--", "sh", "-c", script]);
    assert!(
        out.status.success(),
        "{machine}$ {script} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ssh_fails(p: &Platform, run: &str, machine: &str, script: &str) {
    let out = p.cli(&["ssh", run, "--machine", machine, "--", "sh", "-c", script]);
    assert!(
        !out.status.success(),
        "{machine}$ {script} should fail:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn two_lans_and_a_router_through_the_control_plane() {
    let _serial = serial();
    let Some(env) = preflight(
        "two_lans_and_a_router_through_the_control_plane",
        Needs {
            test_image: true,
            ..Needs::default()
        },
    ) else {
        return;
    };
    let layout = env
        .test_image
        .clone()
        .expect("preflight checked the test image");
    let registry = Registry::start();
    let image = registry.push(&layout, "test/busybox", "1");
    let mut p = Platform::start(&env);
    let out = p.create_playground(&manifest(&image));
    assert!(
        out.status.success(),
        "playground create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = p.start_run("two-lans");
    assert_eq!(run["state"], "running", "start printed {run}");
    let id = run["id"].as_str().expect("id").to_string();

    // Addresses from the control plane: the gateway .1, then machines in order.
    let addrs = ssh_ok(&p, &id, "router", "ip -o -4 addr");
    assert!(addrs.contains("eth0    inet 172.16.5.2/24"), "{addrs}");
    assert!(addrs.contains("eth1    inet 10.0.9.1/24"), "{addrs}");
    let addrs = ssh_ok(&p, &id, "web", "ip -o -4 addr");
    assert!(addrs.contains("eth0    inet 172.16.5.3/24"), "{addrs}");
    let route = ssh_ok(&p, &id, "db", "ip route");
    assert!(route.contains("default via 10.0.9.1"), "{route}");

    // Names where networks are shared; nothing across them until the router forwards.
    ssh_ok(
        &p,
        &id,
        "web",
        "ping -c1 -W2 router && ping -c1 -W2 router.lan",
    );
    ssh_ok(&p, &id, "router", "ping -c1 -W2 db && ping -c1 -W2 web");
    let out = ssh_ok(&p, &id, "web", "nslookup router");
    assert!(out.contains("172.16.5.2"), "{out}");
    ssh_fails(&p, &id, "web", "ping -c1 -W1 10.0.9.2");
    ssh_ok(&p, &id, "web", "ip route add 10.0.9.0/24 via 172.16.5.2");
    ssh_fails(&p, &id, "web", "ping -c1 -W1 10.0.9.2");
    ssh_ok(&p, &id, "router", "echo 1 > /proc/sys/net/ipv4/ip_forward");
    ssh_ok(&p, &id, "web", "ping -c1 -W2 10.0.9.2");

    p.destroy(&id);
    p.assert_clean(&id);
}
