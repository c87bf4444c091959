//! The network of a run, computed from its plan: names, addresses, routes, and the texts the
//! worker feeds to `ip -batch`, `nft -f`, `tc -batch` and dnsmasq. Pure functions, no I/O, so
//! every rule is unit tested without root.
//!
//! Topology (one run):
//!
//! ```text
//!  machine netns ilm-<run>-<m>          run netns il-<run>                       uplink netns
//!  eth0 172.16.0.2/24 ── veth ── v0e0 ─┐                                       (the host, or the
//!  eth1 10.0.1.2/24  ── veth ── v0e1 ─┼─ br0 172.16.0.1/24 (gateway, dnsmasq)  tests' fake
//!                                     └─ br1 (private: no address)            internet)
//!                                        uplink 100.64.x.2/30 ── veth ── il-<run> 100.64.x.1/30
//! ```
//!
//! A microVM machine has the same namespace and veth pairs, but `eth<i>` in its namespace carries
//! no address: a tap `tap<i>` beside it is tied to it by `tc` (the ingress of each redirected to
//! the egress of the other, as kata does), QEMU (in that namespace) opens the tap, and the guest
//! configures the planned address and routes on its own `eth<i>` (the card with the planned MAC).
//!
//! nftables in the run netns: machines on a non-private network may query the resolver on its
//! gateway and ping it; nothing else reaches the run netns. Forwarding goes only from non-private
//! bridges to the uplink (never between bridges: machines route between LANs themselves), never
//! to the blocked ranges (private, link-local, shared, loopback, multicast, the host's own
//! addresses and subnets), and per policy: `allowlist` = TCP 80/443 to addresses dnsmasq put in
//! the `allowed` set while resolving an allowed name; `open` = anything else; `none` = no uplink.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ironlab_api::worker::{EgressPolicy, RunPlan};

/// Name of the nftables table in the run's namespace (family `inet`).
pub const NFT_TABLE: &str = "ironlab";
/// The run-side end of the uplink veth pair.
pub const UPLINK_INNER: &str = "uplink";
/// Most interfaces a machine may have.
pub const MAX_INTERFACES: usize = 4;

/// Ranges no run may reach, besides the host's own addresses and subnets.
pub const ALWAYS_BLOCKED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/nn` (host bits must be zero; prefix 8–30).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a subnet in CIDR form"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("{p:?} is not a prefix length between 8 and 30"))?;
        let c = Cidr { addr, prefix };
        if u32::from(addr) & !c.mask() != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(c)
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` is a host address of the subnet (not the network or broadcast address).
    pub fn contains_host(self, ip: Ipv4Addr) -> bool {
        let (ip, net) = (u32::from(ip), u32::from(self.addr));
        ip & self.mask() == net && ip != net && ip != net | !self.mask()
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One network: a bridge in the run's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// `br0`, `br1`, … in plan order.
    pub dev: String,
    /// Network name.
    pub network: String,
    /// Its subnet.
    pub subnet: Cidr,
    /// The bridge's own address (non-private networks only).
    pub address: Option<Ipv4Addr>,
    /// The default route of machines on private networks only (a machine's address).
    pub private_gateway: Option<Ipv4Addr>,
}

/// One interface of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// Name inside the machine: `eth0`, `eth1`, …
    pub name: String,
    /// The other end, a port of the bridge in the run's namespace: `v<machine>e<iface>`.
    pub peer: String,
    /// The bridge device.
    pub bridge: String,
    /// Network name.
    pub network: String,
    /// Address.
    pub address: Ipv4Addr,
    /// Prefix length of the network.
    pub prefix: u8,
}

/// The network side of one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineNet {
    /// Machine name.
    pub machine: String,
    /// Its network namespace.
    pub netns: String,
    /// Interfaces in order.
    pub ifaces: Vec<Iface>,
    /// Default route.
    pub default_route: Option<Ipv4Addr>,
    /// The resolver it uses (the gateway of its first non-private network).
    pub nameserver: Option<Ipv4Addr>,
    /// A microVM (`runtime: microvm`): its namespace holds a tap per interface tied to the
    /// veth; addresses and routes are configured inside the guest.
    pub vm: bool,
}

impl MachineNet {
    /// The tap of interface `i` of a microVM machine (in its namespace).
    pub fn tap(i: usize) -> String {
        format!("tap{i}")
    }
}

/// The addresses of a run's uplink: a /30, `outer` on the uplink side, `inner` in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UplinkAddrs {
    /// Outside end (`il-<run>` in the uplink namespace); the run's default route.
    pub outer: Ipv4Addr,
    /// Inside end (`uplink` in the run namespace); NAT source of the run's traffic.
    pub inner: Ipv4Addr,
}

/// The network of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Run id.
    pub run_id: String,
    /// The run's namespace `il-<run>`.
    pub run_netns: String,
    /// Bridges in plan order.
    pub bridges: Vec<Bridge>,
    /// Machines in plan order.
    pub machines: Vec<MachineNet>,
    /// Egress policy.
    pub policy: EgressPolicy,
    /// Allowed domains (lower case, no trailing dot).
    pub allow: Vec<String>,
    /// Bandwidth limit in bit/s (0 = none).
    pub bandwidth_bps: u64,
}

/// The run's network namespace.
pub fn run_netns(run_id: &str) -> String {
    format!("il-{run_id}")
}

/// A machine's network namespace. (Not `il-…`: workers before this scheme treated every
/// `il-X` namespace as the run `X`.)
pub fn machine_netns(run_id: &str, machine: &str) -> String {
    format!("ilm-{run_id}-{machine}")
}

/// The run a machine namespace belongs to.
pub fn run_of_machine_netns(ns: &str) -> Option<&str> {
    ns.strip_prefix("ilm-")?.split_once('-').map(|(run, _)| run)
}

/// The outside end of a run's uplink (15 characters: a valid interface name).
pub fn uplink_outer_dev(run_id: &str) -> String {
    format!("il-{run_id}")
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Checks the network part of a plan; the error names the field.
pub fn validate(plan: &RunPlan) -> Result<(), String> {
    Layout::new(plan).map(|_| ())
}

impl Layout {
    /// Computes the layout of a plan that has networks (checking it on the way).
    pub fn new(plan: &RunPlan) -> Result<Self, String> {
        let mut bridges = Vec::new();
        let mut by_name: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, n) in plan.networks.iter().enumerate() {
            let path = format!("networks[{i}]");
            let valid_name = (1..=20).contains(&n.name.len())
                && n.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid_name {
                return Err(format!(
                    "{path}.name {:?} must be 1-20 characters [a-z0-9-]",
                    n.name
                ));
            }
            if by_name.insert(n.name.as_str(), i).is_some() {
                return Err(format!("{path}.name {:?} is used twice", n.name));
            }
            let subnet = Cidr::parse(&n.subnet).map_err(|e| format!("{path}.subnet: {e}"))?;
            let gateway = match &n.gateway {
                Some(g) => {
                    let ip: Ipv4Addr = g
                        .parse()
                        .map_err(|_| format!("{path}.gateway {g:?} is not an IPv4 address"))?;
                    if !subnet.contains_host(ip) {
                        return Err(format!(
                            "{path}.gateway {ip} is not a host address of {subnet}"
                        ));
                    }
                    Some(ip)
                }
                None => None,
            };
            if !n.private && gateway.is_none() {
                return Err(format!(
                    "{path}.gateway is required on a non-private network"
                ));
            }
            bridges.push(Bridge {
                dev: format!("br{i}"),
                network: n.name.clone(),
                subnet,
                address: if n.private { None } else { gateway },
                private_gateway: if n.private { gateway } else { None },
            });
        }
        let mut used: BTreeMap<(usize, Ipv4Addr), String> = BTreeMap::new();
        for b in &bridges {
            if let Some(a) = b.address {
                used.insert((by_name[b.network.as_str()], a), "the gateway".into());
            }
        }
        let mut machines = Vec::new();
        for (i, m) in plan.machines.iter().enumerate() {
            if m.interfaces.len() > MAX_INTERFACES {
                return Err(format!(
                    "machines[{i}].interfaces: at most {MAX_INTERFACES} interfaces"
                ));
            }
            let mut ifaces: Vec<Iface> = Vec::new();
            for (j, f) in m.interfaces.iter().enumerate() {
                let path = format!("machines[{i}].interfaces[{j}]");
                let k = *by_name
                    .get(f.network.as_str())
                    .ok_or_else(|| format!("{path}.network: no network named {:?}", f.network))?;
                if ifaces.iter().any(|x| x.network == f.network) {
                    return Err(format!(
                        "{path}.network: machine {} is on {:?} twice",
                        m.name, f.network
                    ));
                }
                let b = &bridges[k];
                let address: Ipv4Addr = f.address.parse().map_err(|_| {
                    format!("{path}.address {:?} is not an IPv4 address", f.address)
                })?;
                if !b.subnet.contains_host(address) {
                    return Err(format!(
                        "{path}.address {address} is not a host address of {}",
                        b.subnet
                    ));
                }
                if let Some(other) = used.insert((k, address), m.name.clone()) {
                    return Err(format!(
                        "{path}.address {address} is already used by {other} on {:?}",
                        f.network
                    ));
                }
                ifaces.push(Iface {
                    name: format!("eth{j}"),
                    peer: format!("v{i}e{j}"),
                    bridge: b.dev.clone(),
                    network: b.network.clone(),
                    address,
                    prefix: b.subnet.prefix,
                });
            }
            let public = ifaces
                .iter()
                .find_map(|f| bridges.iter().find(|b| b.dev == f.bridge)?.address);
            let private = ifaces.iter().find_map(|f| {
                bridges
                    .iter()
                    .find(|b| b.dev == f.bridge)?
                    .private_gateway
                    .filter(|g| !ifaces.iter().any(|x| x.address == *g))
            });
            machines.push(MachineNet {
                machine: m.name.clone(),
                netns: machine_netns(&plan.run_id, &m.name),
                default_route: public.or(private),
                nameserver: public,
                ifaces,
                vm: m.runtime == "microvm",
            });
        }
        let mut allow = Vec::new();
        for (i, d) in plan.egress.allow.iter().enumerate() {
            let d = d.trim_end_matches('.').to_ascii_lowercase();
            if !is_domain(&d) {
                return Err(format!("egress.allow[{i}] {d:?} is not a domain name"));
            }
            allow.push(d);
        }
        Ok(Layout {
            run_id: plan.run_id.clone(),
            run_netns: run_netns(&plan.run_id),
            bridges,
            machines,
            policy: plan.egress.policy,
            allow,
            bandwidth_bps: plan.egress.bandwidth_bps,
        })
    }

    /// Bridges with a gateway address (where the resolver listens, whence NAT is allowed).
    pub fn public_bridges(&self) -> impl Iterator<Item = &Bridge> {
        self.bridges.iter().filter(|b| b.address.is_some())
    }

    /// Whether the run gets an uplink: some network is non-private and traffic may leave.
    pub fn has_uplink(&self) -> bool {
        self.policy != EgressPolicy::None && self.public_bridges().next().is_some()
    }

    /// Whether a resolver runs (some network is non-private).
    pub fn has_resolver(&self) -> bool {
        self.public_bridges().next().is_some()
    }

    /// `ip -batch` for the run namespace: bridges, veth pairs into the machine namespaces, and
    /// the uplink (its peer goes to `uplink_ns`: a namespace name or a PID).
    pub fn run_ns_batch(&self, uplink: Option<(&UplinkAddrs, &str)>) -> String {
        let mut s = String::from("link set lo up\n");
        for b in &self.bridges {
            let _ = writeln!(s, "link add {} type bridge", b.dev);
            if let Some(a) = b.address {
                let _ = writeln!(s, "addr add {a}/{} dev {}", b.subnet.prefix, b.dev);
            }
            let _ = writeln!(s, "link set {} up", b.dev);
        }
        for m in &self.machines {
            for f in &m.ifaces {
                let _ = writeln!(
                    s,
                    "link add {} type veth peer name {} netns {}",
                    f.peer, f.name, m.netns
                );
                let _ = writeln!(s, "link set {} master {} up", f.peer, f.bridge);
            }
        }
        if let Some((addrs, ns)) = uplink {
            let _ = writeln!(
                s,
                "link add {UPLINK_INNER} type veth peer name {} netns {ns}",
                uplink_outer_dev(&self.run_id)
            );
            let _ = writeln!(s, "addr add {}/30 dev {UPLINK_INNER}", addrs.inner);
            let _ = writeln!(s, "link set {UPLINK_INNER} up");
            let _ = writeln!(s, "route add default via {}", addrs.outer);
        }
        s
    }

    /// `ip -batch` for the uplink namespace: address the outside end.
    pub fn outer_batch(&self, addrs: &UplinkAddrs) -> String {
        let dev = uplink_outer_dev(&self.run_id);
        format!("addr add {}/30 dev {dev}\nlink set {dev} up\n", addrs.outer)
    }

    /// `ip -batch` for a machine's namespace. A container's `eth<i>` gets its address and the
    /// default route; a microVM's `eth<i>` stays bare beside a tap `tap<i>` (tied together by
    /// [`Layout::machine_tc_batch`]) and the guest configures addresses and routes on its card.
    pub fn machine_batch(m: &MachineNet) -> String {
        let mut s = String::from("link set lo up\n");
        if m.vm {
            for (i, f) in m.ifaces.iter().enumerate() {
                let tap = MachineNet::tap(i);
                let _ = writeln!(s, "tuntap add dev {tap} mode tap");
                let _ = writeln!(s, "link set {tap} up");
                let _ = writeln!(s, "link set {} up", f.name);
            }
            return s;
        }
        for f in &m.ifaces {
            let _ = writeln!(s, "addr add {}/{} dev {}", f.address, f.prefix, f.name);
            let _ = writeln!(s, "link set {} up", f.name);
        }
        if let Some(g) = m.default_route {
            let _ = writeln!(s, "route add default via {g}");
        }
        s
    }

    /// `tc -batch` for a microVM machine's namespace (empty for containers), as kata does:
    /// every frame arriving on `eth<i>` (from the run's bridge) leaves through `tap<i>` (to the
    /// guest) and back, so the namespace's own stack never sees the guest's traffic. (`u32
    /// match u8 0 0`: this host's kernel has no `matchall` classifier.)
    pub fn machine_tc_batch(m: &MachineNet) -> String {
        let mut s = String::new();
        if !m.vm {
            return s;
        }
        for (i, f) in m.ifaces.iter().enumerate() {
            let tap = MachineNet::tap(i);
            for (from, to) in [
                (f.name.as_str(), tap.as_str()),
                (tap.as_str(), f.name.as_str()),
            ] {
                let _ = writeln!(s, "qdisc add dev {from} ingress");
                let _ = writeln!(
                    s,
                    "filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
                     action mirred egress redirect dev {to}"
                );
            }
        }
        s
    }

    /// `/etc/hosts` of a machine: itself, and every other machine on each network they share
    /// (`NAME.NETWORK`, and the bare `NAME` on the first shared network in this machine's
    /// interface order).
    pub fn hosts_file(&self, machine: &str) -> String {
        let mut s =
            String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        let Some(me) = self.machines.iter().find(|m| m.machine == machine) else {
            return s;
        };
        if me.ifaces.is_empty() {
            let _ = writeln!(s, "127.0.1.1\t{machine}");
        }
        for (k, f) in me.ifaces.iter().enumerate() {
            if k == 0 {
                let _ = writeln!(s, "{}\t{machine} {machine}.{}", f.address, f.network);
            } else {
                let _ = writeln!(s, "{}\t{machine}.{}", f.address, f.network);
            }
        }
        for other in self.machines.iter().filter(|m| m.machine != machine) {
            let mut named = false;
            for mine in &me.ifaces {
                if let Some(f) = other.ifaces.iter().find(|f| f.network == mine.network) {
                    let n = &other.machine;
                    if named {
                        let _ = writeln!(s, "{}\t{n}.{}", f.address, f.network);
                    } else {
                        let _ = writeln!(s, "{}\t{n} {n}.{}", f.address, f.network);
                        named = true;
                    }
                }
            }
        }
        s
    }

    /// `/etc/resolv.conf` of a machine.
    pub fn resolv_conf(&self, machine: &str) -> String {
        match self
            .machines
            .iter()
            .find(|m| m.machine == machine)
            .and_then(|m| m.nameserver)
        {
            Some(ns) => format!("nameserver {ns}\noptions ndots:1\n"),
            None => "# This machine is on private networks only: there is no resolver.\n\
                     # The run's machines are listed in /etc/hosts.\n"
                .to_string(),
        }
    }

    /// The hosts file dnsmasq serves: every address of every machine as `NAME` and
    /// `NAME.NETWORK` (dnsmasq's `localise-queries` answers a bare name with the address on the
    /// asker's network).
    pub fn dns_hosts(&self) -> String {
        let mut s = String::new();
        for m in &self.machines {
            for f in &m.ifaces {
                let _ = writeln!(
                    s,
                    "{}\t{} {}.{}",
                    f.address, m.machine, m.machine, f.network
                );
            }
        }
        s
    }

    /// dnsmasq's configuration. `dir` holds the pid file, log and hosts file; `upstream` are the
    /// resolvers names are forwarded to (per policy).
    pub fn dnsmasq_conf(&self, dir: &str, upstream: &[Ipv4Addr]) -> String {
        let mut s = String::new();
        s.push_str(
            "# ironlab: the resolver of one run (generated)\n\
             no-resolv\nno-hosts\nno-poll\nbind-interfaces\nlocalise-queries\n\
             domain-needed\nbogus-priv\ncache-size=1000\nuser=root\n",
        );
        let _ = writeln!(s, "pid-file={dir}/dnsmasq.pid");
        let _ = writeln!(s, "addn-hosts={dir}/hosts");
        let _ = writeln!(s, "log-facility={dir}/dnsmasq.log");
        for b in self.public_bridges() {
            if let Some(a) = b.address {
                let _ = writeln!(s, "listen-address={a}");
            }
        }
        // Names of networks are answered here only (NXDOMAIN/NODATA, never forwarded).
        for b in &self.bridges {
            let _ = writeln!(s, "local=/{}/", b.network);
        }
        if !self.has_uplink() {
            return s;
        }
        match self.policy {
            EgressPolicy::None => {}
            EgressPolicy::Allowlist => {
                for d in &self.allow {
                    for u in upstream {
                        let _ = writeln!(s, "server=/{d}/{u}");
                    }
                    let _ = writeln!(s, "nftset=/{d}/4#inet#{NFT_TABLE}#allowed");
                }
            }
            EgressPolicy::Open => {
                for u in upstream {
                    let _ = writeln!(s, "server={u}");
                }
            }
        }
        s
    }

    /// The nftables ruleset of the run's namespace (replaces the table atomically).
    pub fn nft_ruleset(&self, host_blocked: &[String]) -> String {
        let public: Vec<String> = self
            .public_bridges()
            .map(|b| format!("\"{}\"", b.dev))
            .collect();
        let mut blocked: Vec<String> = ALWAYS_BLOCKED.iter().map(|s| s.to_string()).collect();
        for h in host_blocked {
            if !blocked.contains(h) {
                blocked.push(h.clone());
            }
        }
        let mut s = format!(
            "table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
        );
        let _ = writeln!(
            s,
            "  set blocked {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {} }} }}",
            blocked.join(", ")
        );
        s.push_str("  set allowed { type ipv4_addr; }\n");
        s.push_str(
            "  chain input {\n    type filter hook input priority filter; policy drop;\n    \
             iif \"lo\" accept\n    ct state established,related accept\n",
        );
        if !public.is_empty() {
            let set = public.join(", ");
            let _ = writeln!(
                s,
                "    iifname {{ {set} }} meta l4proto {{ tcp, udp }} th dport 53 accept"
            );
            let _ = writeln!(s, "    iifname {{ {set} }} icmp type echo-request accept");
        }
        s.push_str("    reject with icmpx type admin-prohibited\n  }\n");
        s.push_str(
            "  chain forward {\n    type filter hook forward priority filter; policy drop;\n    \
             ct state established,related accept\n",
        );
        if self.has_uplink() {
            let set = public.join(", ");
            let out = format!("iifname {{ {set} }} oifname \"{UPLINK_INNER}\"");
            let _ = writeln!(
                s,
                "    {out} ip daddr @blocked reject with icmpx type admin-prohibited"
            );
            match self.policy {
                EgressPolicy::None => {}
                EgressPolicy::Allowlist => {
                    let _ = writeln!(
                        s,
                        "    {out} ip daddr @allowed tcp dport {{ 80, 443 }} accept"
                    );
                }
                EgressPolicy::Open => {
                    let _ = writeln!(s, "    {out} meta nfproto ipv4 accept");
                }
            }
        }
        s.push_str("    reject with icmpx type admin-prohibited\n  }\n");
        s.push_str(
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n",
        );
        let _ = writeln!(s, "    oifname \"{UPLINK_INNER}\" masquerade\n  }}");
        s.push_str("}\n");
        s
    }

    /// `tc -batch` lines shaping `dev` to the run's bandwidth (empty when unlimited).
    pub fn tc_batch(&self, dev: &str) -> String {
        if self.bandwidth_bps == 0 {
            return String::new();
        }
        let rate = self.bandwidth_bps;
        // A burst of 10 ms at the rate (at least 32 KiB) keeps TCP steady without overshoot.
        let burst = (rate / 8 / 100).max(32 * 1024);
        format!(
            "qdisc replace dev {dev} root handle 1: htb default 10\n\
             class replace dev {dev} parent 1: classid 1:10 htb rate {rate}bit ceil {rate}bit burst {burst} cburst {burst}\n"
        )
    }
}

/// The /30 for a run's uplink: derived from the run id (FNV-1a), skipping blocks in `taken`.
pub fn uplink_addrs(run_id: &str, range: Cidr, taken: &[Ipv4Addr]) -> Option<UplinkAddrs> {
    let blocks = 1u64 << (30 - u32::from(range.prefix));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    let base = u32::from(range.addr);
    (0..blocks.min(4096)).find_map(|k| {
        let block = ((h + k) % blocks) as u32;
        let net = base + block * 4;
        let (outer, inner) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
        let free = !taken.iter().any(|t| u32::from(*t) & !3 == net);
        free.then_some(UplinkAddrs { outer, inner })
    })
}

#[cfg(test)]
mod tests {
    use ironlab_api::worker::{
        EgressPlan, ImageRef, InterfacePlan, MachinePlan, NetworkPlan, RunPlan,
    };

    use super::*;

    fn machine(name: &str, ifaces: &[(&str, &str)]) -> MachinePlan {
        MachinePlan {
            name: name.into(),
            runtime: "container".into(),
            image: ImageRef::Stock {
                name: "debian".into(),
            },
            root_size_bytes: 1 << 30,
            cpus: 1,
            memory_bytes: 128 << 20,
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
        }
    }

    /// The router lab: `lan` (public) and `back` (private, default route via the router).
    fn router_plan(policy: EgressPolicy) -> RunPlan {
        RunPlan {
            run_id: "abc123".into(),
            machines: vec![
                machine("router", &[("lan", "172.16.0.2"), ("back", "10.0.1.1")]),
                machine("web", &[("lan", "172.16.0.3")]),
                machine("db", &[("back", "10.0.1.2")]),
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
                allow: vec!["Allowed.TEST.".into()],
                bandwidth_bps: 16_000_000,
            },
        }
    }

    #[test]
    fn routes_resolvers_and_names() {
        let l = Layout::new(&router_plan(EgressPolicy::Allowlist)).expect("valid");
        let [router, web, db] = &l.machines[..] else {
            panic!("three machines")
        };
        assert_eq!(router.netns, "ilm-abc123-router");
        assert_eq!(router.ifaces[1].name, "eth1");
        assert_eq!(router.ifaces[1].peer, "v0e1");
        assert_eq!(router.ifaces[1].bridge, "br1");
        // The router's own address is the private gateway: its default route is the LAN's.
        assert_eq!(
            router.default_route,
            Some("172.16.0.1".parse().expect("ip"))
        );
        assert_eq!(web.default_route, Some("172.16.0.1".parse().expect("ip")));
        assert_eq!(web.nameserver, Some("172.16.0.1".parse().expect("ip")));
        assert_eq!(db.default_route, Some("10.0.1.1".parse().expect("ip")));
        assert_eq!(db.nameserver, None);
        assert_eq!(l.allow, vec!["allowed.test".to_string()]);
        assert_eq!(l.bridges[1].address, None);
        assert!(l.has_uplink() && l.has_resolver());

        let hosts = l.hosts_file("web");
        assert!(hosts.contains("172.16.0.3\tweb web.lan\n"), "{hosts}");
        assert!(hosts.contains("172.16.0.2\trouter router.lan\n"), "{hosts}");
        assert!(
            !hosts.contains("db"),
            "web shares no network with db: {hosts}"
        );
        let hosts = l.hosts_file("router");
        assert!(hosts.contains("10.0.1.1\trouter.back\n"), "{hosts}");
        assert!(hosts.contains("10.0.1.2\tdb db.back\n"), "{hosts}");
        assert!(l.resolv_conf("web").starts_with("nameserver 172.16.0.1\n"));
        assert!(!l.resolv_conf("db").contains("nameserver"));
        assert!(l.dns_hosts().contains("10.0.1.2\tdb db.back\n"));
    }

    #[test]
    fn batches_build_bridges_veths_and_uplink() {
        let l = Layout::new(&router_plan(EgressPolicy::Open)).expect("valid");
        let up = UplinkAddrs {
            outer: "100.64.0.1".parse().expect("ip"),
            inner: "100.64.0.2".parse().expect("ip"),
        };
        let b = l.run_ns_batch(Some((&up, "4242")));
        assert!(b.contains("addr add 172.16.0.1/24 dev br0\n"), "{b}");
        assert!(
            !b.contains("dev br1\n"),
            "a private bridge has no address: {b}"
        );
        assert!(b.contains("link add v2e0 type veth peer name eth0 netns ilm-abc123-db\n"));
        assert!(b.contains("link set v2e0 master br1 up\n"));
        assert!(b.contains("link add uplink type veth peer name il-abc123 netns 4242\n"));
        assert!(b.contains("route add default via 100.64.0.1\n"));
        let m = Layout::machine_batch(&l.machines[2]);
        assert_eq!(
            m,
            "link set lo up\naddr add 10.0.1.2/24 dev eth0\nlink set eth0 up\nroute add default via 10.0.1.1\n"
        );
        assert!(
            l.outer_batch(&up)
                .contains("addr add 100.64.0.1/30 dev il-abc123")
        );
        let tc = l.tc_batch("uplink");
        assert!(tc.contains("htb rate 16000000bit ceil 16000000bit"), "{tc}");
    }

    #[test]
    fn a_microvm_gets_taps_tied_to_its_veths_and_no_addresses_in_its_namespace() {
        let mut plan = router_plan(EgressPolicy::None);
        plan.machines[0].runtime = "microvm".into();
        let l = Layout::new(&plan).expect("valid");
        let router = &l.machines[0];
        assert!(router.vm && !l.machines[1].vm);
        assert_eq!(
            Layout::machine_batch(router),
            "link set lo up\ntuntap add dev tap0 mode tap\nlink set tap0 up\nlink set eth0 up\n\
             tuntap add dev tap1 mode tap\nlink set tap1 up\nlink set eth1 up\n"
        );
        let tc = Layout::machine_tc_batch(router);
        for (from, to) in [
            ("eth0", "tap0"),
            ("tap0", "eth0"),
            ("eth1", "tap1"),
            ("tap1", "eth1"),
        ] {
            assert!(
                tc.contains(&format!("qdisc add dev {from} ingress\n")),
                "{tc}"
            );
            assert!(
                tc.contains(&format!(
                    "filter add dev {from} parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev {to}\n"
                )),
                "{tc}"
            );
        }
        assert_eq!(Layout::machine_tc_batch(&l.machines[1]), "");
        // The run side is the same as a container's; the guest gets the same texts.
        let b = l.run_ns_batch(None);
        assert!(b.contains("link add v0e1 type veth peer name eth1 netns ilm-abc123-router\n"));
        assert!(l.hosts_file("router").contains("172.16.0.3\tweb web.lan\n"));
        assert_eq!(router.ifaces[1].address, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(router.default_route, Some(Ipv4Addr::new(172, 16, 0, 1)));
    }

    #[test]
    fn rules_follow_the_policy() {
        let host = vec!["192.0.2.2".to_string(), "192.0.2.0/24".to_string()];
        let allow = Layout::new(&router_plan(EgressPolicy::Allowlist)).expect("valid");
        let r = allow.nft_ruleset(&host);
        assert!(
            r.contains("169.254.0.0/16") && r.contains("192.0.2.2"),
            "{r}"
        );
        assert!(r.contains("iifname { \"br0\" } meta l4proto { tcp, udp } th dport 53 accept"));
        assert!(
            r.contains("ip daddr @allowed tcp dport { 80, 443 } accept"),
            "{r}"
        );
        assert!(!r.contains("nfproto ipv4 accept"), "{r}");
        assert!(
            !r.contains("br1"),
            "nothing is allowed from a private bridge: {r}"
        );
        let c = allow.dnsmasq_conf("/d", &["198.51.100.53".parse().expect("ip")]);
        assert!(c.contains("server=/allowed.test/198.51.100.53\n"), "{c}");
        assert!(
            c.contains("nftset=/allowed.test/4#inet#ironlab#allowed\n"),
            "{c}"
        );
        assert!(c.contains("listen-address=172.16.0.1\n") && !c.contains("10.0.1."));
        assert!(c.contains("local=/back/\n"));

        let open = Layout::new(&router_plan(EgressPolicy::Open)).expect("valid");
        let r = open.nft_ruleset(&host);
        assert!(
            r.contains("oifname \"uplink\" meta nfproto ipv4 accept"),
            "{r}"
        );
        assert!(r.contains("ip daddr @blocked reject"), "{r}");
        let c = open.dnsmasq_conf("/d", &["198.51.100.53".parse().expect("ip")]);
        assert!(
            c.contains("server=198.51.100.53\n") && !c.contains("nftset"),
            "{c}"
        );

        let none = Layout::new(&router_plan(EgressPolicy::None)).expect("valid");
        assert!(!none.has_uplink());
        let r = none.nft_ruleset(&host);
        assert!(!r.contains("oifname \"uplink\" ip"), "{r}");
        let c = none.dnsmasq_conf("/d", &["198.51.100.53".parse().expect("ip")]);
        assert!(!c.contains("server="), "{c}");
        assert!(none.run_ns_batch(None).find("uplink").is_none());
    }

    #[test]
    fn bad_plans_name_the_field() {
        let mut p = router_plan(EgressPolicy::Open);
        p.machines[1].interfaces[0].address = "172.16.1.3".into();
        let e = Layout::new(&p).expect_err("outside");
        assert!(e.starts_with("machines[1].interfaces[0].address"), "{e}");
        let mut p = router_plan(EgressPolicy::Open);
        p.machines[1].interfaces[0].address = "172.16.0.2".into();
        let e = Layout::new(&p).expect_err("dup");
        assert!(e.contains("already used by router"), "{e}");
        let mut p = router_plan(EgressPolicy::Open);
        p.machines[1].interfaces[0].address = "172.16.0.1".into();
        assert!(Layout::new(&p).expect_err("gw").contains("the gateway"));
        let mut p = router_plan(EgressPolicy::Open);
        p.machines[1].interfaces[0].network = "nope".into();
        assert!(
            Layout::new(&p)
                .expect_err("net")
                .contains("no network named")
        );
        let mut p = router_plan(EgressPolicy::Open);
        p.networks[0].subnet = "172.16.0.5/24".into();
        assert!(
            Layout::new(&p)
                .expect_err("cidr")
                .starts_with("networks[0].subnet")
        );
        let mut p = router_plan(EgressPolicy::Open);
        p.networks[0].gateway = None;
        assert!(
            Layout::new(&p)
                .expect_err("gw")
                .contains("networks[0].gateway")
        );
        let mut p = router_plan(EgressPolicy::Open);
        p.egress.allow.push("bad domain;".into());
        assert!(
            Layout::new(&p)
                .expect_err("dom")
                .starts_with("egress.allow[1]")
        );
    }

    #[test]
    fn uplinks_are_stable_and_avoid_taken_blocks() {
        let range = Cidr::parse("100.64.0.0/10").expect("cidr");
        let a = uplink_addrs("abc123", range, &[]).expect("free");
        assert_eq!(a, uplink_addrs("abc123", range, &[]).expect("free"));
        assert_eq!(u32::from(a.inner), u32::from(a.outer) + 1);
        assert!(
            Cidr::parse("100.64.0.0/10")
                .expect("cidr")
                .contains_host(a.outer)
        );
        let b = uplink_addrs("abc123", range, &[a.outer]).expect("free");
        assert_ne!(a, b);
        assert_eq!(run_of_machine_netns("ilm-abc123-web-1"), Some("abc123"));
        assert_eq!(run_of_machine_netns("il-abc123"), None);
    }
}
