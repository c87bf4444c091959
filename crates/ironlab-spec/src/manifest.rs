//! The playground manifest: the contract every part of ironlab shares.
//!
//! Parsing is two steps: YAML is read into a generic tree, then deserialized into these types
//! with `serde_path_to_error`, so a type error names the field path
//! (`playground.machines[1].drives[0].size`). Semantic checks (names, references, limits) run
//! afterwards in [`crate::validate`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::size::Size;
use crate::task::Task;

/// The top-level document: `kind: playground`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Always `playground`.
    pub kind: String,
    /// `[a-z0-9-]`, 3–40 characters, unique per owner.
    pub name: String,
    /// Human title shown in the catalog.
    pub title: String,
    /// One or two sentences shown in the catalog.
    #[serde(default)]
    pub description: String,
    /// The playground this one was saved from (prototype chain); set by the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Machines, networks, tabs, egress and tasks.
    pub playground: PlaygroundSpec,
}

/// The body of a playground.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PlaygroundSpec {
    /// Virtual LANs; default: one network `local`, 172.16.0.0/24.
    #[serde(default)]
    pub networks: Vec<Network>,
    /// 1–5 machines.
    pub machines: Vec<Machine>,
    /// Tabs of the playground page.
    #[serde(default)]
    pub tabs: Vec<Tab>,
    /// Egress policy, capped by the user's plan.
    #[serde(default)]
    pub egress: Egress,
    /// Tasks (checks), same format as content front matter.
    #[serde(default)]
    pub tasks: BTreeMap<String, Task>,
}

/// A virtual LAN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Network {
    /// `[a-z0-9-]`, 1–20 characters.
    pub name: String,
    /// IPv4 CIDR, e.g. `172.16.0.0/24`.
    pub subnet: String,
    /// Gateway address inside the subnet. On a non-private network the platform owns it
    /// (NAT, resolver); default: the first host address. On a private network it is optional
    /// and names a machine's address (a router the student sets up): machines that are on no
    /// non-private network get their default route through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// No platform gateway, NAT or resolver on this network.
    #[serde(default)]
    pub private: bool,
}

/// Which runtime runs a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// A microVM where hardware virtualisation works, a container otherwise.
    #[default]
    Auto,
    /// A QEMU microVM.
    Microvm,
    /// An OCI container.
    Container,
}

/// One machine of a playground.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Machine {
    /// `[a-z0-9-]`, 1–30 characters; also the hostname.
    pub name: String,
    /// Runtime choice.
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// CPU and memory.
    #[serde(default)]
    pub resources: Resources,
    /// Drives; exactly one has `mount: /` and a `source`.
    pub drives: Vec<Drive>,
    /// Network interfaces; default: one interface on the first network.
    #[serde(default)]
    pub network: MachineNetwork,
    /// Users; the `default: true` one is used by terminals (default: root).
    #[serde(default)]
    pub users: Vec<User>,
    /// Files written into the machine before it starts.
    #[serde(default)]
    pub startup_files: Vec<StartupFile>,
}

/// CPU and memory of a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    /// Virtual CPUs (1–8).
    #[serde(default = "default_cpu")]
    pub cpu: u32,
    /// Memory, 64MiB–16GiB.
    #[serde(default = "default_memory")]
    pub memory: Size,
}

fn default_cpu() -> u32 {
    1
}

fn default_memory() -> Size {
    Size::mib(512)
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu: default_cpu(),
            memory: default_memory(),
        }
    }
}

/// A drive of a machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Drive {
    /// Stock image name (`debian`) or `oci://REGISTRY/REPO:TAG` / `oci://REGISTRY/REPO@sha256:…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Name of an empty data drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Absolute mount point in the machine.
    pub mount: String,
    /// Size of the drive (grown from the image).
    pub size: Size,
    /// Filesystem of an empty drive; only `ext4` for now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
}

/// The interfaces of a machine.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MachineNetwork {
    /// eth0, eth1, … in order.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
}

/// One interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Interface {
    /// Name of a network of the playground.
    pub network: String,
    /// Static address inside the network's subnet; assigned when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A user account in the machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct User {
    /// Login name, `[a-z_][a-z0-9_-]*`, up to 32 characters.
    pub name: String,
    /// The user terminals open as.
    #[serde(default)]
    pub default: bool,
}

/// A file written into the machine before start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StartupFile {
    /// Absolute path.
    pub path: String,
    /// File content (UTF-8).
    #[serde(default)]
    pub content: String,
    /// Octal mode as a string, e.g. `"0644"`.
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Owner, `user` or `user:group`; default root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Append instead of overwrite.
    #[serde(default)]
    pub append: bool,
}

fn default_mode() -> String {
    "0644".to_string()
}

/// Kinds of tabs on the playground page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TabKind {
    /// A terminal on a machine.
    Terminal,
    /// A web page served by a machine's HTTP port.
    HttpPort,
}

/// A tab of the playground page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Tab {
    /// Tab kind.
    pub kind: TabKind,
    /// Machine the tab belongs to.
    pub machine: String,
    /// Port, for `http-port` tabs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Label; default: the machine name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Egress policy of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// No traffic leaves the run.
    None,
    /// DNS, and HTTP(S) to allowlisted domains.
    #[default]
    Allowlist,
    /// Anything (capped by plan).
    Open,
}

impl Manifest {
    /// The networks, with the default `local` network when none are declared.
    pub fn effective_networks(&self) -> Vec<Network> {
        if self.playground.networks.is_empty() {
            vec![Network {
                name: "local".into(),
                subnet: "172.16.0.0/24".into(),
                gateway: None,
                private: false,
            }]
        } else {
            self.playground.networks.clone()
        }
    }
}

impl Machine {
    /// The root drive (`mount: /`); validation guarantees exactly one.
    pub fn root_drive(&self) -> Option<&Drive> {
        self.drives.iter().find(|d| d.mount == "/")
    }

    /// The user terminals and `ssh` open as (`root` when none is marked default).
    pub fn default_user(&self) -> &str {
        self.users
            .iter()
            .find(|u| u.default)
            .map(|u| u.name.as_str())
            .unwrap_or("root")
    }
}
