//! Semantic checks of a parsed manifest: names, limits, references, addresses, the task graph.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use crate::manifest::{Manifest, TabKind};
use crate::size::Size;
use crate::{FieldError, MAX_MACHINES};

/// An IPv4 subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Network address.
    pub addr: Ipv4Addr,
    /// Prefix length (16–30 allowed in manifests).
    pub prefix: u8,
}

impl Subnet {
    /// Parses `a.b.c.d/nn`; the address must be the network address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not a subnet (expected CIDR such as 172.16.0.0/24)")
        })?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{p:?} is not a prefix length"))?;
        if !(16..=30).contains(&prefix) {
            return Err(format!("prefix /{prefix} must be between /16 and /30"));
        }
        let net = Subnet { addr, prefix };
        if u32::from(addr) & !net.mask() != 0 {
            return Err(format!(
                "{s:?} has host bits set (the network address is {}/{prefix})",
                Ipv4Addr::from(u32::from(addr) & net.mask())
            ));
        }
        Ok(net)
    }

    fn mask(self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// Whether `ip` is a usable host address of this subnet (not network or broadcast).
    pub fn contains_host(self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        let net = u32::from(self.addr);
        ip & self.mask() == net && ip != net && ip != net | !self.mask()
    }

    /// The `n`-th host address (1-based), if it exists.
    pub fn host(self, n: u32) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from(u32::from(self.addr).checked_add(n)?);
        self.contains_host(ip).then_some(ip)
    }
}

fn is_name(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_user_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && s.len() <= 32
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Returns every problem of the manifest (empty when it is valid).
pub fn validate(m: &Manifest) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut err = |path: String, message: String| errs.push(FieldError { path, message });

    if m.kind != "playground" {
        err(
            "kind".into(),
            format!("{:?} is not a known kind (expected \"playground\")", m.kind),
        );
    }
    if !is_name(&m.name, 3, 40) {
        err(
            "name".into(),
            format!("{:?} must be 3–40 characters of a-z, 0-9 and '-'", m.name),
        );
    }
    if m.title.trim().is_empty() || m.title.len() > 120 {
        err("title".into(), "must be 1–120 characters".into());
    }

    let p = &m.playground;
    // Networks.
    let mut nets: BTreeMap<&str, Subnet> = BTreeMap::new();
    for (i, n) in p.networks.iter().enumerate() {
        let path = format!("playground.networks[{i}]");
        if !is_name(&n.name, 1, 20) {
            err(
                format!("{path}.name"),
                format!("{:?} must be 1–20 characters of a-z, 0-9 and '-'", n.name),
            );
        }
        match Subnet::parse(&n.subnet) {
            Ok(s) => {
                if nets.insert(n.name.as_str(), s).is_some() {
                    err(
                        format!("{path}.name"),
                        format!("network {:?} is declared twice", n.name),
                    );
                }
                if let Some(g) = &n.gateway {
                    match g.parse::<Ipv4Addr>() {
                        Ok(ip) if s.contains_host(ip) => {}
                        Ok(_) => err(
                            format!("{path}.gateway"),
                            format!("{g} is not a host address of {}", n.subnet),
                        ),
                        Err(_) => err(
                            format!("{path}.gateway"),
                            format!("{g:?} is not an IPv4 address"),
                        ),
                    }
                }
            }
            Err(e) => err(format!("{path}.subnet"), e),
        }
    }
    let default_net = if p.networks.is_empty() {
        Some("local")
    } else {
        None
    };

    // Machines.
    if p.machines.is_empty() || p.machines.len() > MAX_MACHINES {
        err(
            "playground.machines".into(),
            format!(
                "must have 1–{MAX_MACHINES} machines, found {}",
                p.machines.len()
            ),
        );
    }
    let mut machine_names = HashSet::new();
    let mut addresses: HashSet<(String, Ipv4Addr)> = HashSet::new();
    // The platform's address on each non-private network (its gateway, default the first host).
    let gateways: BTreeMap<&str, Ipv4Addr> = p
        .networks
        .iter()
        .filter(|n| !n.private)
        .filter_map(|n| {
            let s = Subnet::parse(&n.subnet).ok()?;
            let g = match &n.gateway {
                Some(g) => g.parse().ok()?,
                None => s.host(1)?,
            };
            Some((n.name.as_str(), g))
        })
        .chain(default_net.and_then(|d| Some((d, Subnet::parse("172.16.0.0/24").ok()?.host(1)?))))
        .collect();
    for (i, mach) in p.machines.iter().enumerate() {
        let path = format!("playground.machines[{i}]");
        if !is_name(&mach.name, 1, 30) {
            err(
                format!("{path}.name"),
                format!(
                    "{:?} must be 1–30 characters of a-z, 0-9 and '-'",
                    mach.name
                ),
            );
        }
        if !machine_names.insert(mach.name.as_str()) {
            err(
                format!("{path}.name"),
                format!("machine {:?} is declared twice", mach.name),
            );
        }
        if !(1..=8).contains(&mach.resources.cpu) {
            err(
                format!("{path}.resources.cpu"),
                format!("{} must be between 1 and 8", mach.resources.cpu),
            );
        }
        if mach.resources.memory < Size::mib(64) || mach.resources.memory > Size::gib(16) {
            err(
                format!("{path}.resources.memory"),
                format!("{} must be between 64MiB and 16GiB", mach.resources.memory),
            );
        }
        // Drives.
        let roots = mach.drives.iter().filter(|d| d.mount == "/").count();
        if roots != 1 {
            err(
                format!("{path}.drives"),
                format!("exactly one drive must have mount: / (found {roots})"),
            );
        }
        let mut mounts = HashSet::new();
        for (j, d) in mach.drives.iter().enumerate() {
            let dpath = format!("{path}.drives[{j}]");
            if !d.mount.starts_with('/') || d.mount.contains("..") {
                err(
                    format!("{dpath}.mount"),
                    format!("{:?} must be an absolute path without '..'", d.mount),
                );
            }
            if !mounts.insert(d.mount.as_str()) {
                err(
                    format!("{dpath}.mount"),
                    format!("{:?} is mounted twice", d.mount),
                );
            }
            if d.size < Size::mib(16) || d.size > Size::gib(256) {
                err(
                    format!("{dpath}.size"),
                    format!("{} must be between 16MiB and 256GiB", d.size),
                );
            }
            match (&d.source, d.mount == "/") {
                (None, true) => err(
                    format!("{dpath}.source"),
                    "the root drive needs a source image".into(),
                ),
                (Some(s), _) => {
                    if let Err(e) = crate::ImageSource::parse(s) {
                        err(format!("{dpath}.source"), e);
                    }
                }
                (None, false) => match &d.name {
                    Some(n) if is_name(n, 1, 30) => {}
                    Some(n) => err(
                        format!("{dpath}.name"),
                        format!("{n:?} must be 1–30 characters of a-z, 0-9 and '-'"),
                    ),
                    None => err(
                        format!("{dpath}.name"),
                        "an empty data drive needs a name".into(),
                    ),
                },
            }
            if let Some(fs) = d.filesystem.as_ref().filter(|fs| *fs != "ext4") {
                err(
                    format!("{dpath}.filesystem"),
                    format!("{fs:?} is not supported (only ext4)"),
                );
            }
        }
        // Interfaces.
        if mach.network.interfaces.len() > 4 {
            err(
                format!("{path}.network.interfaces"),
                "at most 4 interfaces".into(),
            );
        }
        let mut seen_nets = HashSet::new();
        for (j, iface) in mach.network.interfaces.iter().enumerate() {
            let ipath = format!("{path}.network.interfaces[{j}]");
            let subnet = nets.get(iface.network.as_str()).copied();
            if subnet.is_none() && default_net != Some(iface.network.as_str()) {
                err(
                    format!("{ipath}.network"),
                    format!("no network named {:?}", iface.network),
                );
            }
            if !seen_nets.insert(iface.network.as_str()) {
                err(
                    format!("{ipath}.network"),
                    format!("machine is on {:?} twice", iface.network),
                );
            }
            if let Some(a) = &iface.address {
                let subnet = subnet.or_else(|| Subnet::parse("172.16.0.0/24").ok());
                match (a.parse::<Ipv4Addr>(), subnet) {
                    (Ok(ip), Some(_)) if gateways.get(iface.network.as_str()) == Some(&ip) => err(
                        format!("{ipath}.address"),
                        format!("{ip} is the gateway of network {:?}", iface.network),
                    ),
                    (Ok(ip), Some(s)) if s.contains_host(ip) => {
                        if !addresses.insert((iface.network.clone(), ip)) {
                            err(
                                format!("{ipath}.address"),
                                format!("{ip} is used twice on {:?}", iface.network),
                            );
                        }
                    }
                    (Ok(ip), _) => err(
                        format!("{ipath}.address"),
                        format!("{ip} is not a host address of network {:?}", iface.network),
                    ),
                    (Err(_), _) => err(
                        format!("{ipath}.address"),
                        format!("{a:?} is not an IPv4 address"),
                    ),
                }
            }
        }
        // Users.
        let mut defaults = 0;
        let mut users = HashSet::new();
        for (j, u) in mach.users.iter().enumerate() {
            if !is_user_name(&u.name) {
                err(
                    format!("{path}.users[{j}].name"),
                    format!("{:?} is not a valid user name", u.name),
                );
            }
            if !users.insert(u.name.as_str()) {
                err(
                    format!("{path}.users[{j}].name"),
                    format!("user {:?} is declared twice", u.name),
                );
            }
            defaults += usize::from(u.default);
        }
        if defaults > 1 {
            err(
                format!("{path}.users"),
                "at most one user can be default".into(),
            );
        }
        for (j, f) in mach.startup_files.iter().enumerate() {
            let fpath = format!("{path}.startupFiles[{j}]");
            if !f.path.starts_with('/') || f.path.contains("..") || f.path.ends_with('/') {
                err(
                    format!("{fpath}.path"),
                    format!("{:?} must be an absolute file path without '..'", f.path),
                );
            }
            if f.mode.len() < 3 || f.mode.len() > 4 || u32::from_str_radix(&f.mode, 8).is_err() {
                err(
                    format!("{fpath}.mode"),
                    format!("{:?} is not an octal mode such as \"0644\"", f.mode),
                );
            }
            if f.content.len() > 1024 * 1024 {
                err(format!("{fpath}.content"), "must be at most 1 MiB".into());
            }
        }
    }

    // Tabs.
    for (i, t) in p.tabs.iter().enumerate() {
        let path = format!("playground.tabs[{i}]");
        if !machine_names.contains(t.machine.as_str()) {
            err(
                format!("{path}.machine"),
                format!("no machine named {:?}", t.machine),
            );
        }
        match (t.kind, t.port) {
            (TabKind::HttpPort, None) => err(
                format!("{path}.port"),
                "an http-port tab needs a port".into(),
            ),
            (TabKind::HttpPort, Some(0)) => {
                err(format!("{path}.port"), "port 0 is not a port".into())
            }
            (TabKind::Terminal, Some(_)) => {
                err(format!("{path}.port"), "a terminal tab has no port".into())
            }
            _ => {}
        }
    }

    // Tasks.
    validate_tasks(&p.tasks, &machine_names, &mut errs);
    errs
}

pub(crate) fn validate_tasks(
    tasks: &BTreeMap<String, crate::Task>,
    machines: &HashSet<&str>,
    errs: &mut Vec<FieldError>,
) {
    for (name, t) in tasks {
        let path = format!("playground.tasks.{name}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            errs.push(FieldError {
                path: path.clone(),
                message: format!("task name {name:?} must be [a-z0-9_]+"),
            });
        }
        if let Some(m) = t
            .machine
            .as_ref()
            .filter(|m| !machines.contains(m.as_str()))
        {
            errs.push(FieldError {
                path: format!("{path}.machine"),
                message: format!("no machine named {m:?}"),
            });
        }
        if t.run.trim().is_empty() {
            errs.push(FieldError {
                path: format!("{path}.run"),
                message: "must not be empty".into(),
            });
        }
        for n in &t.needs {
            if !tasks.contains_key(n) {
                errs.push(FieldError {
                    path: format!("{path}.needs"),
                    message: format!("no task named {n:?}"),
                });
            }
        }
    }
    // Cycle detection (iterative DFS with colours).
    let mut state: BTreeMap<&str, u8> = BTreeMap::new(); // 1 = on stack, 2 = done
    let mut reported = BTreeSet::new();
    for start in tasks.keys() {
        let mut stack: Vec<(&str, usize)> = vec![(start.as_str(), 0)];
        while let Some((node, idx)) = stack.pop() {
            if idx == 0 {
                match state.get(node) {
                    Some(2) => continue,
                    _ => {
                        state.insert(node, 1);
                    }
                }
            }
            let needs = tasks.get(node).map(|t| t.needs.as_slice()).unwrap_or(&[]);
            if let Some(next) = needs.get(idx) {
                stack.push((node, idx + 1));
                match state.get(next.as_str()) {
                    Some(1) => {
                        let cycle: Vec<&str> = stack
                            .iter()
                            .map(|(n, _)| *n)
                            .skip_while(|n| *n != next.as_str())
                            .collect();
                        let key = cycle.iter().copied().collect::<BTreeSet<_>>();
                        if reported.insert(key.into_iter().collect::<Vec<_>>().join(",")) {
                            errs.push(FieldError {
                                path: format!("playground.tasks.{node}.needs"),
                                message: format!(
                                    "dependency cycle: {} -> {next}",
                                    cycle.join(" -> ")
                                ),
                            });
                        }
                    }
                    Some(2) => {}
                    _ if tasks.contains_key(next) => stack.push((next.as_str(), 0)),
                    _ => {}
                }
            } else {
                state.insert(node, 2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_cannot_take_the_gateway() {
        let m = crate::parse_manifest(
            r#"
kind: playground
name: gw-clash
title: Clash
playground:
  networks:
    - {name: lan, subnet: 10.1.0.0/24}
    - {name: back, subnet: 10.2.0.0/24, private: true, gateway: 10.2.0.1}
  machines:
    - name: a
      drives: [{source: debian, mount: /, size: 1GiB}]
      network: {interfaces: [{network: lan, address: 10.1.0.1}, {network: back, address: 10.2.0.1}]}
"#,
        );
        let errs = match m {
            Ok(_) => panic!("accepted"),
            Err(e) => e.errors,
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(
            errs[0].path,
            "playground.machines[0].network.interfaces[0].address"
        );
        assert!(
            errs[0]
                .message
                .contains("is the gateway of network \"lan\"")
        );
    }

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.0.1.0/24").expect("valid");
        assert!(s.contains_host("10.0.1.10".parse().expect("ip")));
        assert!(!s.contains_host("10.0.1.0".parse().expect("ip")));
        assert!(!s.contains_host("10.0.1.255".parse().expect("ip")));
        assert!(!s.contains_host("10.0.2.1".parse().expect("ip")));
        assert_eq!(s.host(1), Some("10.0.1.1".parse().expect("ip")));
        assert_eq!(s.host(255), None);
        assert!(Subnet::parse("10.0.1.5/24").is_err());
        assert!(Subnet::parse("10.0.1.0/8").is_err());
        assert!(Subnet::parse("10.0.1.0").is_err());
    }
}
