//! Networks of runs: bridges, per-machine namespaces, the uplink, nftables, the resolver and
//! bandwidth shaping (issue 5). [`layout`] computes everything from the plan; this module applies
//! it to the host.
//!
//! Who talks to whom: the run manager (`runs.rs`) calls [`Networks::setup`] before the first
//! machine of a run starts (the container runtime then joins each machine to its own namespace),
//! [`Networks::teardown`] after the machines are gone, [`Networks::ensure`] for runs it keeps at a
//! restart and [`Networks::clean_leftovers`] at start. Host tools: `ip -batch` (links, addresses,
//! routes, namespaces), `tc -batch`, `nft -f` and `dnsmasq`, the last two started from a thread
//! that entered the run's namespace (`setns`), so they run inside it.
//!
//! On disk, per run (`_net` is no valid machine name, so never a machine's directory):
//! `pool/runs/<run>/_net/{state.json, hosts, dnsmasq.conf, dnsmasq.pid,
//! dnsmasq.log}`. A microVM machine's namespace also holds a tap per interface, tied to its veth
//! by `tc` redirects (see [`layout`]).

pub mod layout;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use ironlab_api::worker::RunPlan;
use serde::{Deserialize, Serialize};

use self::layout::{Cidr, Layout, UplinkAddrs};
use crate::{cmd, host};

/// Where runs' uplinks lead.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Uplink {
    /// The host's namespace: the worker turns on forwarding and NATs `100.64.0.0/10` out of
    /// the host's own interfaces (table `ip ironlab_uplink`). `ironlab worker`'s default.
    Host,
    /// No uplink: nothing leaves any run, whatever its policy. The library default, so a test
    /// never reaches the real network by accident.
    #[default]
    None,
    /// A named network namespace that routes the runs' traffic (the tests' fake internet).
    Netns(String),
}

impl Uplink {
    /// Parses `host`, `none` or `netns:NAME`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Uplink::Host),
            "none" => Ok(Uplink::None),
            _ => match s.strip_prefix("netns:") {
                Some(n) if !n.is_empty() && !n.contains('/') => Ok(Uplink::Netns(n.to_string())),
                _ => Err(format!(
                    "{s:?} is not an uplink: expected host, none or netns:NAME"
                )),
            },
        }
    }
}

/// Network configuration of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Where uplinks lead.
    pub uplink: Uplink,
    /// Resolvers the runs' dnsmasq forwards to; empty = the host's `/etc/resolv.conf`
    /// nameservers (loopback ones skipped).
    pub upstream_dns: Vec<Ipv4Addr>,
    /// Addresses for uplinks, one /30 per run.
    pub uplink_range: Cidr,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            uplink: Uplink::None,
            upstream_dns: Vec::new(),
            uplink_range: Cidr {
                addr: Ipv4Addr::new(100, 64, 0, 0),
                prefix: 10,
            },
        }
    }
}

/// What the worker records about a run's network, for restarts and teardown.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct NetState {
    uplink: Option<UplinkAddrs>,
}

/// The network half of the worker.
#[derive(Debug)]
pub struct Networks {
    config: NetConfig,
    runs_dir: PathBuf,
    host_ready: tokio::sync::OnceCell<()>,
}

/// Runs `f` on a fresh thread inside the network namespace at `ns` (the thread is discarded
/// afterwards, so no other task ever runs in that namespace). Processes it spawns live there.
async fn in_netns<T: Send + 'static>(
    ns: PathBuf,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("ironlab-netns".into())
        .spawn(move || {
            let r = (|| {
                let fd = std::fs::File::open(&ns)
                    .with_context(|| format!("cannot open {}", ns.display()))?;
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("cannot enter {}", ns.display()))?;
                f()
            })();
            let _ = tx.send(r);
        })
        .context("cannot spawn a thread")?;
    rx.await.context("the namespace thread died")?
}

/// Runs a host tool synchronously (inside [`in_netns`]), feeding `input` to its stdin.
fn run_sync(program: &str, args: &[&str], input: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {program}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {program}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn write_sysctl(key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    fs_err::write(&path, value).map_err(Into::into)
}

/// IPv4 addresses (`a.b.c.d/nn`) of the interfaces of a namespace (`None` = the worker's own).
async fn addresses(netns: Option<&str>) -> anyhow::Result<Vec<String>> {
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-4", "-o", "addr", "show"]);
    let out = cmd::stdout("ip", &args)
        .await
        .context("cannot list addresses")?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            while let Some(w) = f.next() {
                if w == "inet" {
                    return f.next().map(str::to_string);
                }
            }
            None
        })
        .collect())
}

/// The host's own addresses and subnets, as nftables set elements (loopback and uplink
/// addresses are blocked anyway).
fn host_blocked(addrs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for a in addrs {
        let Some((ip, prefix)) = a.split_once('/') else {
            continue;
        };
        let (Ok(ip), Ok(prefix)) = (ip.parse::<Ipv4Addr>(), prefix.parse::<u8>()) else {
            continue;
        };
        if ip.is_loopback() || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64) {
            continue;
        }
        out.push(ip.to_string());
        if (8..32).contains(&prefix) {
            let mask = u32::MAX << (32 - u32::from(prefix));
            out.push(format!("{}/{prefix}", Ipv4Addr::from(u32::from(ip) & mask)));
        }
    }
    out
}

/// The host's table in uplink mode `host`: NAT of the uplink range out of the host's own
/// interfaces; nothing from an uplink (`il-*`) reaches the host itself or another run.
pub fn host_ruleset(range: Cidr) -> String {
    format!(
        "table ip ironlab_uplink\ndelete table ip ironlab_uplink\n\
         table ip ironlab_uplink {{\n\
         \x20 chain input {{ type filter hook input priority filter; policy accept;\n\
         \x20   iifname \"il-*\" ct state established,related accept\n\
         \x20   iifname \"il-*\" drop\n  }}\n\
         \x20 chain forward {{ type filter hook forward priority filter; policy accept;\n\
         \x20   iifname \"il-*\" oifname \"il-*\" drop\n  }}\n\
         \x20 chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {range} oifname != \"il-*\" masquerade\n  }}\n}}\n"
    )
}

/// Nameservers of the host's `/etc/resolv.conf` that a namespace can reach (not loopback).
fn host_resolvers() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

fn pid_alive_with(pid: i32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

impl Networks {
    /// Networks of runs under `runs_dir`.
    pub fn new(config: NetConfig, runs_dir: PathBuf) -> Self {
        Self {
            config,
            runs_dir,
            host_ready: tokio::sync::OnceCell::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    fn dir(&self, run_id: &str) -> PathBuf {
        self.runs_dir.join(run_id).join("_net")
    }

    fn conf_path(&self, run_id: &str) -> PathBuf {
        self.dir(run_id).join("dnsmasq.conf")
    }

    /// The namespace name the uplink's outer end lives in, as `ip link … netns` takes it.
    fn uplink_target(&self) -> Option<String> {
        match &self.config.uplink {
            // The calling thread's namespace (`/proc/<tid>/ns/net`): the host's in the worker;
            // a test may run the worker's network code from a thread in a namespace of its own.
            Uplink::Host => Some(nix::unistd::gettid().to_string()),
            Uplink::None => None,
            Uplink::Netns(n) => Some(n.clone()),
        }
    }

    fn uplink_ns_arg(&self) -> Option<&str> {
        match &self.config.uplink {
            Uplink::Netns(n) => Some(n.as_str()),
            _ => None,
        }
    }

    fn upstream(&self) -> Vec<Ipv4Addr> {
        if self.config.upstream_dns.is_empty() {
            host_resolvers()
        } else {
            self.config.upstream_dns.clone()
        }
    }

    /// Host mode: forwarding on and NAT of the uplink range out of the host's interfaces;
    /// nothing from an uplink reaches the host itself or another run. Once per worker.
    async fn prepare_host(&self) -> anyhow::Result<()> {
        let range = self.config.uplink_range;
        self.host_ready
            .get_or_try_init(|| async move {
                let ruleset = host_ruleset(range);
                cmd::run_with_input("nft", &["-f", "-"], &ruleset)
                    .await
                    .context("cannot load the host's uplink table")?;
                write_sysctl("net.ipv4.ip_forward", "1")
                    .context("cannot turn on forwarding on the host")?;
                tracing::info!(%range, "host uplink ready (forwarding on, NAT for the runs)");
                anyhow::Ok(())
            })
            .await?;
        Ok(())
    }

    /// Creates the run's network: namespaces, bridges, veth pairs, uplink, rules, resolver,
    /// shaping. Returns each machine's namespace path. Idempotent only through
    /// [`Self::teardown`]: a half-made network is removed before the error is returned.
    pub async fn setup(&self, plan: &RunPlan) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let t0 = std::time::Instant::now();
        let l = Layout::new(plan).map_err(|e| anyhow::anyhow!("invalid network plan: {e}"))?;
        match self.setup_inner(&l).await {
            Ok(()) => {
                tracing::info!(
                    run = %l.run_id,
                    ms = t0.elapsed().as_millis() as u64,
                    "network ready"
                );
                Ok(l.machines
                    .iter()
                    .map(|m| (m.machine.clone(), host::netns_path(&m.netns)))
                    .collect())
            }
            Err(e) => {
                if let Err(te) = self.teardown(&l.run_id).await {
                    tracing::warn!(run = %l.run_id, "network teardown after failure: {te:#}");
                }
                let _ = host::delete_netns(&l.run_netns).await;
                Err(e.context(format!("cannot set up the network of run {}", l.run_id)))
            }
        }
    }

    async fn setup_inner(&self, l: &Layout) -> anyhow::Result<()> {
        let dir = self.dir(&l.run_id);
        fs_err::create_dir_all(&dir)?;
        let t0 = std::time::Instant::now();
        let lap = |step: &str| {
            tracing::debug!(step, ms = t0.elapsed().as_millis() as u64, "network setup");
        };
        let uplink_target = self.uplink_target().filter(|_| l.has_uplink());
        if uplink_target.is_some() && self.config.uplink == Uplink::Host {
            self.prepare_host().await?;
        }
        // 1. Namespaces (one `ip` for all), with the address lists the rules and the uplink
        //    need, concurrently.
        let mut names = vec![l.run_netns.clone()];
        names.extend(l.machines.iter().map(|m| m.netns.clone()));
        let missing: String = names
            .iter()
            .filter(|n| !host::netns_path(n).exists())
            .map(|n| format!("netns add {n}\n"))
            .collect();
        let namespaces = async {
            if !missing.is_empty() {
                cmd::run_with_input("ip", &["-batch", "-"], &missing)
                    .await
                    .context("cannot create the network namespaces")?;
            }
            anyhow::Ok(())
        };
        let uplink_taken = async {
            match uplink_target {
                Some(_) => addresses(self.uplink_ns_arg()).await.map(Some),
                None => Ok(None),
            }
        };
        let (ns, taken, host_addrs) = tokio::join!(namespaces, uplink_taken, addresses(None));
        ns?;
        let uplink = match (taken?, uplink_target) {
            (Some(taken), Some(target)) => {
                let taken: Vec<Ipv4Addr> = taken
                    .iter()
                    .filter_map(|a| a.split('/').next()?.parse().ok())
                    .collect();
                let addrs = layout::uplink_addrs(&l.run_id, self.config.uplink_range, &taken)
                    .context("no free uplink address block")?;
                Some((addrs, target))
            }
            _ => None,
        };
        let state = NetState {
            uplink: uplink.as_ref().map(|(a, _)| *a),
        };
        fs_err::write(dir.join("state.json"), serde_json::to_vec(&state)?)?;
        let ruleset = l.nft_ruleset(&host_blocked(&host_addrs?));
        fs_err::write(dir.join("hosts"), l.dns_hosts())?;
        let dir_s = dir.to_string_lossy().into_owned();
        let upstream = self.upstream();
        if upstream.is_empty() && uplink.is_some() {
            tracing::warn!(
                run = %l.run_id,
                "no upstream resolver (none usable in /etc/resolv.conf; set --upstream-dns): \
                 only the run's own names resolve"
            );
        }
        fs_err::write(self.conf_path(&l.run_id), l.dnsmasq_conf(&dir_s, &upstream))?;
        lap("namespaces");
        // 2. Bridges, veth pairs, uplink (one `ip` in the run's namespace).
        let batch = l.run_ns_batch(uplink.as_ref().map(|(a, t)| (a, t.as_str())));
        cmd::run_with_input("ip", &["-n", &l.run_netns, "-batch", "-"], &batch)
            .await
            .context("cannot build the run's bridges and links")?;
        lap("bridges and links");
        // 3. Concurrently: each machine's addresses and routes (a microVM's taps and their tc
        //    redirects), the uplink's outer end and shaping, and inside the run's namespace
        //    sysctls, rules and the resolver.
        let machines = futures::future::try_join_all(l.machines.iter().map(|m| async move {
            let batch = Layout::machine_batch(m);
            cmd::run_with_input("ip", &["-n", &m.netns, "-batch", "-"], &batch)
                .await
                .with_context(|| format!("cannot configure the interfaces of {}", m.machine))?;
            let tc = Layout::machine_tc_batch(m);
            if !tc.is_empty() {
                cmd::run_with_input("tc", &["-n", &m.netns, "-batch", "-"], &tc)
                    .await
                    .with_context(|| {
                        format!("cannot tie the taps of {} to its links", m.machine)
                    })?;
            }
            anyhow::Ok(())
        }));
        let outer = async {
            let Some((addrs, _)) = &uplink else {
                return anyhow::Ok(());
            };
            let mut args: Vec<&str> = Vec::new();
            if let Some(ns) = self.uplink_ns_arg() {
                args.extend(["-n", ns]);
            }
            args.extend(["-batch", "-"]);
            cmd::run_with_input("ip", &args, &l.outer_batch(addrs))
                .await
                .context("cannot configure the uplink's outer end")?;
            let tc = l.tc_batch(&layout::uplink_outer_dev(&l.run_id));
            if !tc.is_empty() {
                cmd::run_with_input("tc", &args, &tc)
                    .await
                    .context("cannot shape the uplink (outer end)")?;
            }
            anyhow::Ok(())
        };
        let inner_tc = async {
            let tc = l.tc_batch(layout::UPLINK_INNER);
            if uplink.is_some() && !tc.is_empty() {
                cmd::run_with_input("tc", &["-n", &l.run_netns, "-batch", "-"], &tc)
                    .await
                    .context("cannot shape the uplink")?;
            }
            anyhow::Ok(())
        };
        let conf = self.conf_path(&l.run_id);
        let resolver = l.has_resolver();
        let inside = in_netns(host::netns_path(&l.run_netns), move || {
            write_sysctl("net.ipv4.ip_forward", "1")?;
            for k in ["iptables", "ip6tables", "arptables"] {
                // Bridged frames skip the inet hooks (only routed traffic is filtered).
                let key = format!("net.bridge.bridge-nf-call-{k}");
                if Path::new("/proc/sys").join(key.replace('.', "/")).exists() {
                    write_sysctl(&key, "0")?;
                }
            }
            run_sync("nft", &["-f", "-"], &ruleset).context("cannot load the run's rules")
        });
        // dnsmasq fills the nftables set only when it answers a query (after the machines
        // start), so it may start alongside the rules.
        let dns = async {
            if resolver {
                in_netns(host::netns_path(&l.run_netns), move || start_dnsmasq(&conf)).await?;
            }
            anyhow::Ok(())
        };
        let part = |step: &'static str| {
            tracing::debug!(
                step,
                ms = t0.elapsed().as_millis() as u64,
                "network setup part done"
            );
        };
        let (m, o, t, i, d) = tokio::join!(
            async {
                let r = machines.await;
                part("machines");
                r
            },
            async {
                let r = outer.await;
                part("uplink outer end");
                r
            },
            async {
                let r = inner_tc.await;
                part("uplink shaping");
                r
            },
            async {
                let r = inside.await;
                part("sysctl and rules");
                r
            },
            async {
                let r = dns.await;
                part("resolver");
                r
            }
        );
        m?;
        o?;
        t?;
        i?;
        d?;
        lap("machines, uplink, rules, resolver");
        Ok(())
    }

    /// Brings a kept run's network back to its plan after a worker restart: reloads the rules
    /// if the table is gone, restarts the resolver if it died.
    pub async fn ensure(&self, plan: &RunPlan) -> anyhow::Result<()> {
        let l = Layout::new(plan).map_err(|e| anyhow::anyhow!("invalid network plan: {e}"))?;
        let ns = host::netns_path(&l.run_netns);
        if !ns.exists() {
            anyhow::bail!("network namespace {} is gone", l.run_netns);
        }
        for m in &l.machines {
            if !host::netns_path(&m.netns).exists() {
                anyhow::bail!("network namespace {} is gone", m.netns);
            }
        }
        let host_addrs = addresses(None).await?;
        let ruleset = l.nft_ruleset(&host_blocked(&host_addrs));
        let conf = self.conf_path(&l.run_id);
        let resolver = l.has_resolver() && !self.dnsmasq_alive(&l.run_id);
        if l.has_uplink() && self.config.uplink == Uplink::Host {
            self.prepare_host().await?;
        }
        in_netns(ns, move || {
            let present = std::process::Command::new("nft")
                .args(["list", "table", "inet", layout::NFT_TABLE])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !present {
                tracing::info!("reloading the run's nftables rules");
                run_sync("nft", &["-f", "-"], &ruleset)?;
            }
            if resolver {
                tracing::info!("restarting the run's resolver");
                start_dnsmasq(&conf)?;
            }
            Ok(())
        })
        .await
    }

    fn dnsmasq_pid(&self, run_id: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir(run_id).join("dnsmasq.pid")).ok()?;
        text.trim().parse().ok()
    }

    fn dnsmasq_alive(&self, run_id: &str) -> bool {
        let conf = self.conf_path(run_id).to_string_lossy().into_owned();
        self.dnsmasq_pid(run_id)
            .is_some_and(|pid| pid_alive_with(pid, &conf))
    }

    /// Removes a run's network: its resolver, the uplink pair and the machines' namespaces
    /// (idempotent). The run's namespace itself is deleted by the run manager.
    pub async fn teardown(&self, run_id: &str) -> anyhow::Result<()> {
        let conf = self.conf_path(run_id).to_string_lossy().into_owned();
        if let Some(pid) = self.dnsmasq_pid(run_id) {
            kill_and_wait(pid, &conf).await;
        }
        // The uplink's outer end lives in another namespace: deleting the run's namespace
        // removes the pair only when the kernel gets round to cleaning that namespace up, so
        // a quick restart would find the name still taken. Remove the pair now.
        let state: NetState = std::fs::read(self.dir(run_id).join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        if state.uplink.is_some() {
            let ns = layout::run_netns(run_id);
            if host::netns_path(&ns).exists()
                && let Err(e) =
                    cmd::run("ip", &["-n", &ns, "link", "del", layout::UPLINK_INNER]).await
            {
                tracing::debug!(run = %run_id, "uplink: {e}");
            }
        }
        let prefix = format!("ilm-{run_id}-");
        let doomed: Vec<String> = host::list_netns()
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect();
        delete_namespaces(&doomed).await
    }

    /// Removes network objects of runs this worker does not keep: resolvers started from this
    /// pool, and machine namespaces of runs with no directory that are older than a minute and
    /// whose run has no container (`has_machines`), since other workers may share the host.
    pub async fn clean_leftovers(
        &self,
        keep: &[String],
        has_machines: impl AsyncFn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let prefix = self.runs_dir.to_string_lossy().into_owned() + "/";
        for (pid, cmdline) in dnsmasq_processes() {
            let Some(rest) = cmdline
                .split_once("--conf-file=")
                .and_then(|(_, r)| r.strip_prefix(&prefix))
            else {
                continue;
            };
            let run = rest.split('/').next().unwrap_or_default();
            if !keep.iter().any(|k| k == run) {
                tracing::info!(pid, run, "stopping a leftover resolver");
                let conf = format!("{prefix}{}", rest.split(' ').next().unwrap_or_default());
                kill_and_wait(pid, &conf).await;
            }
        }
        let mut doomed = Vec::new();
        for ns in host::list_netns() {
            let Some(run) = layout::run_of_machine_netns(&ns) else {
                continue;
            };
            if keep.iter().any(|k| k == run) || self.runs_dir.join(run).exists() {
                continue;
            }
            let old = std::fs::symlink_metadata(host::netns_path(&ns))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(60));
            if old && !has_machines(run).await {
                tracing::info!(netns = %ns, "removing a leftover machine namespace");
                doomed.push(ns);
            }
        }
        delete_namespaces(&doomed).await
    }
}

/// Starts dnsmasq with `conf` (from a thread inside the run's namespace); it daemonizes once
/// it listens, so an error (e.g. a busy port) comes back here.
fn start_dnsmasq(conf: &Path) -> anyhow::Result<()> {
    let arg = format!("--conf-file={}", conf.display());
    run_sync("dnsmasq", &[&arg], "").context("cannot start the run's resolver (dnsmasq)")
}

fn dnsmasq_processes() -> Vec<(i32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            let prog = cmdline.split(' ').next()?;
            (prog.ends_with("dnsmasq") && cmdline.contains("--conf-file="))
                .then_some((pid, cmdline))
        })
        .collect()
}

/// SIGTERM to `pid` if its command line still contains `needle`, then wait up to 1 s
/// (SIGKILL after).
async fn kill_and_wait(pid: i32, needle: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if !pid_alive_with(pid, needle) {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    for _ in 0..100 {
        if !pid_alive_with(pid, needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}

async fn delete_namespaces(names: &[String]) -> anyhow::Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let batch: String = names
        .iter()
        .map(|n| format!("netns delete {n}\n"))
        .collect();
    if cmd::run_with_input("ip", &["-force", "-batch", "-"], &batch)
        .await
        .is_err()
    {
        // One by one, so the error names what is left.
        for n in names {
            host::delete_netns(n).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplinks_parse() {
        assert_eq!(Uplink::parse("host"), Ok(Uplink::Host));
        assert_eq!(Uplink::parse("none"), Ok(Uplink::None));
        assert_eq!(
            Uplink::parse("netns:fake"),
            Ok(Uplink::Netns("fake".into()))
        );
        assert!(Uplink::parse("netns:").is_err());
        assert!(Uplink::parse("eth0").is_err());
    }

    #[test]
    fn host_addresses_become_blocked_elements() {
        let b = host_blocked(&[
            "127.0.0.1/8".into(),
            "192.0.2.2/24".into(),
            "100.64.3.1/30".into(),
            "203.0.113.7/32".into(),
        ]);
        assert_eq!(b, vec!["192.0.2.2", "192.0.2.0/24", "203.0.113.7"]);
    }
}
