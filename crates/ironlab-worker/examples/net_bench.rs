//! Benchmark of runs' networks (driven by `bench/net.sh`), as root, no containers:
//!
//! 1. Setup and teardown of the network of a 5-machine, 2-network run (what the worker does
//!    before the first machine starts and after the last is gone: namespaces, bridges, veth
//!    pairs, the uplink, nftables, dnsmasq, tc), median/min/max of `--iterations`; then the same
//!    with all five machines as microVMs (a tap and a bridge per interface beside the veth).
//! 2. TCP throughput between two machines of one run (machine netns → veth → bridge → veth →
//!    machine netns) next to a bare veth pair between the same two namespaces, `--seconds` each.
//!
//! Uplinks go to a namespace the benchmark creates (never the host's route).
//!
//!   net_bench [--iterations N] [--seconds S]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use ironlab_api::worker::{
    EgressPlan, EgressPolicy, ImageRef, InterfacePlan, MachinePlan, NetworkPlan, RunPlan,
};
use ironlab_worker::net::{NetConfig, Networks, Uplink};

fn machine(name: &str, ifaces: &[(&str, &str)]) -> MachinePlan {
    MachinePlan {
        name: name.into(),
        runtime: "container".into(),
        image: ImageRef::Stock {
            name: "debian".into(),
        },
        root_size_bytes: 1 << 30,
        cpus: 1,
        memory_bytes: 256 << 20,
        pids_limit: 256,
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
    }
}

/// Five machines on `lan` (non-private) and `back` (private); `m3` routes between them.
fn plan(run: &str, policy: EgressPolicy, bandwidth_bps: u64) -> RunPlan {
    plan_of(run, policy, bandwidth_bps, "container")
}

/// [`plan`] with every machine on `runtime`.
fn plan_of(run: &str, policy: EgressPolicy, bandwidth_bps: u64, runtime: &str) -> RunPlan {
    let mut p = RunPlan {
        run_id: run.into(),
        machines: vec![
            machine("m1", &[("lan", "172.16.0.2")]),
            machine("m2", &[("lan", "172.16.0.3")]),
            machine("m3", &[("lan", "172.16.0.4"), ("back", "10.0.1.1")]),
            machine("m4", &[("back", "10.0.1.2")]),
            machine("m5", &[("back", "10.0.1.3")]),
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
                gateway: Some("10.0.1.1".into()),
                private: true,
            },
        ],
        egress: EgressPlan {
            policy,
            allow: vec!["deb.debian.org".into(), "pypi.org".into()],
            bandwidth_bps,
        },
    };
    for m in &mut p.machines {
        m.runtime = runtime.into();
    }
    p
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("ip")?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Runs `f` on a thread inside the namespace `ns` (sockets made there stay there).
fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = PathBuf::from("/var/run/netns").join(ns);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path)?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// Bytes per second from namespace `from` to `to_addr` (a listener in namespace `to`).
fn throughput(from: &str, to: &str, to_addr: SocketAddr, secs: u64) -> anyhow::Result<f64> {
    let listener = in_ns(to, move || Ok(TcpListener::bind(to_addr)?))?;
    let receiver = std::thread::spawn(move || -> anyhow::Result<(u64, Duration)> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let t0 = Instant::now();
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok((total, t0.elapsed()));
            }
            total += n as u64;
        }
    });
    let mut stream = in_ns(from, move || Ok(TcpStream::connect(to_addr)?))?;
    let block = vec![0x5au8; 128 * 1024];
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        stream.write_all(&block)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    drop(stream);
    let (bytes, elapsed) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(bytes as f64 / elapsed.as_secs_f64())
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, v[0], v[v.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let mut iterations = 20usize;
    let mut seconds = 3u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => iterations = args.next().context("value")?.parse()?,
            "--seconds" => seconds = args.next().context("value")?.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let tag = format!("{:08x}", std::process::id());
    let uplink_ns = format!("iltb{tag}");
    ip(&["netns", "add", &uplink_ns])?;
    let tmp = tempfile::tempdir()?;
    let runs_dir = tmp.path().join("runs");
    let net = Networks::new(
        NetConfig {
            uplink: Uplink::Netns(uplink_ns.clone()),
            upstream_dns: vec!["198.51.100.53".parse()?],
            ..Default::default()
        },
        runs_dir.clone(),
    );
    let result = async {
        println!("| network of a 5-machine, 2-network run | median | min | max |");
        println!("|---|---:|---:|---:|");
        for (runtime, prefix, label) in [("container", "b", ""), ("microvm", "v", ", microVMs")] {
            let (mut up, mut down) = (Vec::new(), Vec::new());
            for i in 0..iterations {
                let run = format!("{prefix}{i:03}{}", &tag[..8]);
                let p = plan_of(&run, EgressPolicy::Allowlist, 100_000_000, runtime);
                let t0 = Instant::now();
                net.setup(&p).await?;
                up.push(t0.elapsed().as_secs_f64() * 1000.0);
                let t0 = Instant::now();
                net.teardown(&run).await?;
                ironlab_worker::host::delete_netns(&format!("il-{run}")).await?;
                down.push(t0.elapsed().as_secs_f64() * 1000.0);
                let _ = std::fs::remove_dir_all(runs_dir.join(&run));
            }
            let (um, umin, umax) = stats(up);
            let (dm, dmin, dmax) = stats(down);
            println!("| setup{label} (ms, n={iterations}) | **{um:.1}** | {umin:.1} | {umax:.1} |");
            println!(
                "| teardown{label} (ms, n={iterations}) | **{dm:.1}** | {dmin:.1} | {dmax:.1} |"
            );
        }

        let run = format!("bt{}", &tag[..8]);
        net.setup(&plan(&run, EgressPolicy::Open, 0)).await?;
        let m1 = format!("ilm-{run}-m1");
        let m2 = format!("ilm-{run}-m2");
        let measured = (|| -> anyhow::Result<(f64, f64)> {
            let bridged = throughput(&m2, &m1, "172.16.0.2:5201".parse()?, seconds)?;
            ip(&[
                "-n", &m1, "link", "add", "bva", "type", "veth", "peer", "name", "bvb", "netns",
                &m2,
            ])?;
            ip(&["-n", &m1, "addr", "add", "192.168.250.1/30", "dev", "bva"])?;
            ip(&["-n", &m1, "link", "set", "bva", "up"])?;
            ip(&["-n", &m2, "addr", "add", "192.168.250.2/30", "dev", "bvb"])?;
            ip(&["-n", &m2, "link", "set", "bvb", "up"])?;
            let bare = throughput(&m2, &m1, "192.168.250.1:5201".parse()?, seconds)?;
            Ok((bridged, bare))
        })();
        net.teardown(&run).await?;
        ironlab_worker::host::delete_netns(&format!("il-{run}")).await?;
        let (bridged, bare) = measured?;
        let gbit = |b: f64| b * 8.0 / 1e9;
        println!();
        println!("| TCP, one stream, {seconds} s | Gbit/s |");
        println!("|---|---:|");
        println!(
            "| machine → machine (veth, bridge, veth) | **{:.2}** |",
            gbit(bridged)
        );
        println!("| bare veth pair, same namespaces | {:.2} |", gbit(bare));
        println!(
            "| ratio | {:.0} % |",
            if bare > 0.0 {
                bridged / bare * 100.0
            } else {
                0.0
            }
        );
        anyhow::Ok(())
    }
    .await;
    let _ = ip(&["netns", "delete", &uplink_ns]);
    result
}
