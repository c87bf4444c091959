//! `/init` of a microVM's initramfs: the agent binary itself, run by the kernel as PID 1.
//!
//! The worker appends the agent to the kit's initramfs as `/init` (the kit holds only the boot
//! modules, `/release` and the mount points). [`run`] then does in one process what a busybox
//! script did with a fork and exec per step (each costs 10–30 ms of emulated CPU under TCG):
//!
//! 1. mounts `/dev`, `/proc` and `/sys`; loads the kit's boot modules (`/modules/order`, the
//!    stock kit's virtio drivers; the lean kernel has them built in);
//! 2. mounts the root drive `/dev/vda` (ext4) at `/newroot`, links the agent's virtio-serial
//!    port as `/dev/virtio-ports/org.ironlab.agent` (what udev would do);
//! 3. mounts the kit's read-only modules drive at `/lib/modules/<release>` when there is one;
//!    puts itself at `/newroot/.ironlab/agent` (a bind mount on a read-only tmpfs: nothing is
//!    written into the image for it); writes the hostname;
//! 4. applies the config drive (virtio-blk serial `ironlab-config`, a newc cpio of `net.conf`,
//!    `hosts`, `resolv.conf`; see the worker's `runtime::vm::guestnet`): each card with a MAC of
//!    the plan gets its name, address and the default route, and the root drive gets the plan's
//!    `/etc/hosts` and `/etc/resolv.conf`;
//! 5. hands over: to systemd when the image has it — the agent starts first, chrooted into the
//!    new root, so agent-ready does not wait for the image's boot, and a runtime unit in
//!    `/run/systemd/system` restarts it once that early agent exits — or else to
//!    `ironlab-agent init` as PID 1.
//!
//! Kernel command line: `ironlab.hostname=NAME`, `ironlab.mode=auto|agent|bare|probe` (`bare`:
//! print [`BARE_MARKER`] once the root drive is mounted and power off, the benchmark's baseline;
//! `probe`: print [`PROBE_MARKER`] once the modules are loaded and power off, the worker's
//! accelerator probe). A failure prints `ironlab-init: WHY` on the console (the worker shows it
//! as the run's reason) and powers the machine off.
// Syscalls without a safe wrapper (finit_module, interface ioctls) and a pre_exec hook.
#![allow(unsafe_code)]

use std::convert::Infallible;
use std::ffi::CString;
use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::mount::{MsFlags, mount, umount};

/// The name of the agent's virtio-serial port.
pub const SERIAL_PORT_NAME: &str = "org.ironlab.agent";
/// Where the port is linked in the guest.
pub const SERIAL_LINK: &str = "/dev/virtio-ports/org.ironlab.agent";
/// The config drive's virtio-blk serial.
pub const CONFIG_SERIAL: &str = "ironlab-config";
/// Printed in `bare` mode once the root drive is mounted.
pub const BARE_MARKER: &str = "IRONLAB-BARE-READY";
/// Printed in `probe` mode once the boot modules are loaded.
pub const PROBE_MARKER: &str = "IRONLAB-PROBE-OK";

const NEWROOT: &str = "/newroot";
/// Where the agent is put (a tmpfs mounted read-only over the image's directory).
const AGENT_DIR: &str = "/.ironlab";
const AGENT: &str = "/.ironlab/agent";
/// How long devices may take to appear.
const DEVICE_WAIT: Duration = Duration::from_secs(5);
/// `PATH` of the early agent.
const PATH: &str = crate::ROOT_PATH;

/// What the kernel command line asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// systemd when the image has it, the agent as PID 1 otherwise.
    Auto,
    /// The agent as PID 1 even where the image has systemd.
    Agent,
    /// The benchmark's baseline: [`BARE_MARKER`] after the root mount, then power off.
    Bare,
    /// The accelerator probe: [`PROBE_MARKER`] after the modules, then power off.
    Probe,
}

/// The `ironlab.*` parameters of the kernel command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Cmdline {
    /// `ironlab.hostname` (default `ironlab`).
    pub hostname: String,
    /// `ironlab.mode` (default [`Mode::Auto`]).
    pub mode: Mode,
    /// `ironlab.template=1`: this boot becomes a boot template (a RAM snapshot the worker
    /// restores for every machine of the same shape; see [`configure`]).
    pub template: bool,
}

/// Reads `ironlab.hostname=` and `ironlab.mode=` from a kernel command line.
pub fn parse_cmdline(s: &str) -> Cmdline {
    let mut c = Cmdline {
        hostname: "ironlab".into(),
        mode: Mode::Auto,
        template: false,
    };
    for arg in s.split_whitespace() {
        if let Some(h) = arg.strip_prefix("ironlab.hostname=") {
            if !h.is_empty() {
                c.hostname = h.to_string();
            }
        } else if arg == "ironlab.template=1" {
            c.template = true;
        } else if let Some(m) = arg.strip_prefix("ironlab.mode=") {
            c.mode = match m {
                "agent" => Mode::Agent,
                "bare" => Mode::Bare,
                "probe" => Mode::Probe,
                _ => Mode::Auto,
            };
        }
    }
    c
}

/// One card of `net.conf`: `iface NAME MAC ADDRESS/PREFIX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// The name the card gets (`eth0`, …).
    pub name: String,
    /// Its MAC, lower case.
    pub mac: String,
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
}

/// The config drive's `net.conf`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NetConf {
    /// Cards in order.
    pub ifaces: Vec<Iface>,
    /// `route GATEWAY`: the default route.
    pub gateway: Option<Ipv4Addr>,
}

/// Parses `net.conf` (see the module docs); a bad line is an error naming it.
pub fn parse_net_conf(s: &str) -> anyhow::Result<NetConf> {
    let mut conf = NetConf::default();
    for (i, line) in s.lines().enumerate() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let bad = || format!("net.conf line {}: {line:?}", i + 1);
        match words.as_slice() {
            [] => {}
            ["iface", name, mac, cidr] => {
                let (addr, prefix) = cidr.split_once('/').with_context(bad)?;
                let prefix: u8 = prefix.parse().with_context(bad)?;
                if prefix > 32 || name.is_empty() || name.len() > 15 {
                    bail!("{}", bad());
                }
                conf.ifaces.push(Iface {
                    name: name.to_string(),
                    mac: mac.to_ascii_lowercase(),
                    address: addr.parse().with_context(bad)?,
                    prefix,
                });
            }
            ["route", gw] => conf.gateway = Some(gw.parse().with_context(bad)?),
            _ => bail!("{}", bad()),
        }
    }
    Ok(conf)
}

/// The regular files of a newc cpio archive, by name.
pub fn cpio_files(data: &[u8]) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let align = |n: usize| n.div_ceil(4) * 4;
    let mut files = Vec::new();
    let mut pos = 0;
    loop {
        let h = data
            .get(pos..pos + 110)
            .context("the cpio archive ends inside a header")?;
        if &h[..6] != b"070701" && &h[..6] != b"070702" {
            bail!("not a newc cpio archive (at byte {pos})");
        }
        let field = |i: usize| -> anyhow::Result<usize> {
            let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8])?;
            Ok(usize::from_str_radix(s, 16)?)
        };
        let (mode, size, namesize) = (field(1)?, field(6)?, field(11)?);
        let name_end = pos + 110 + namesize;
        let name = data
            .get(pos + 110..name_end.saturating_sub(1))
            .context("the cpio archive ends inside a name")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let start = align(name_end);
        let body = data
            .get(start..start + size)
            .with_context(|| format!("the cpio archive ends inside {name}"))?;
        pos = align(start + size);
        if name == "TRAILER!!!" {
            return Ok(files);
        }
        if mode & 0o170000 == 0o100000 {
            files.push((name, body.to_vec()));
        }
    }
}

/// The restart unit systemd reads from `/run/systemd/system`: it waits for the early agent to
/// exit, then runs a new one, and again whenever it dies.
pub fn restart_unit(agent_cmd: &str) -> String {
    format!(
        "[Unit]\n\
         Description=ironlab agent (restarts the agent the initramfs started)\n\
         DefaultDependencies=no\n\
         Before=sysinit.target\n\
         \n\
         [Service]\n\
         ExecStart=/bin/sh -c 'p=$$(cat /run/ironlab/agent.pid 2>/dev/null) && rm -f /run/ironlab/agent.pid && [ -n \"$$p\" ] && {{ tail --pid=\"$$p\" -f /dev/null 2>/dev/null || while kill -0 \"$$p\" 2>/dev/null; do sleep 1; done; }}; exec {agent_cmd}'\n\
         Restart=always\n\
         RestartSec=200ms\n\
         KillMode=process\n\
         StandardOutput=journal+console\n\
         StandardError=journal+console\n"
    )
}

/// Runs as the initramfs's PID 1; never returns (hands over, or powers off on failure).
pub fn run() -> ! {
    let why = match boot() {
        Ok(never) => match never {},
        Err(e) => e,
    };
    say(&format!("ironlab-init: {why:#}"));
    power_off()
}

/// One line on the console (PID 1's stderr is the console), in one write.
fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn newroot(p: &str) -> PathBuf {
    Path::new(NEWROOT).join(p.trim_start_matches('/'))
}

fn mount_fs(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> anyhow::Result<()> {
    fs::create_dir_all(target).ok();
    mount(Some(source), target, Some(fstype), flags, data)
        .with_context(|| format!("cannot mount {fstype} on {}", target.display()))
}

fn move_mount(from: &str, to: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(to).ok();
    mount(Some(from), to, None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .with_context(|| format!("cannot move {from} to {}", to.display()))
}

/// Polls until `check` answers, for at most [`DEVICE_WAIT`].
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return Ok(v);
        }
        if start.elapsed() > DEVICE_WAIT {
            bail!("{what} after {} s", DEVICE_WAIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_trimmed(p: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// The boot's steps with the uptime each ended at, for one console line at the handover.
#[derive(Default)]
struct Steps(Vec<(&'static str, f64)>);

impl Steps {
    fn done(&mut self, step: &'static str) {
        self.0.push((step, crate::uptime()));
    }
    fn line(&self) -> String {
        let mut prev = None;
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(name, t)| {
                let s = match prev {
                    None => format!("{name} at {t:.2} s"),
                    Some(p) => format!("{name} +{:.0} ms", (t - p) * 1000.0),
                };
                prev = Some(*t);
                s
            })
            .collect();
        parts.join(", ")
    }
}

fn boot() -> anyhow::Result<Infallible> {
    let mut steps = Steps::default();
    let nosuid = MsFlags::MS_NOSUID;
    let secure = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs(
        "devtmpfs",
        Path::new("/dev"),
        "devtmpfs",
        nosuid,
        Some("mode=0755"),
    )?;
    mount_fs("proc", Path::new("/proc"), "proc", secure, None)?;
    mount_fs("sysfs", Path::new("/sys"), "sysfs", secure, None)?;
    let cmd = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let release = read_trimmed("/release").unwrap_or_default();

    load_modules()?;
    if cmd.mode == Mode::Probe {
        say(PROBE_MARKER);
        power_off();
    }

    wait_for("no root drive /dev/vda", || {
        Path::new("/dev/vda").exists().then_some(())
    })?;
    mount_fs(
        "/dev/vda",
        Path::new(NEWROOT),
        "ext4",
        MsFlags::empty(),
        None,
    )
    .context("cannot mount the root drive /dev/vda")?;
    steps.done("root drive mounted");
    if cmd.mode == Mode::Bare {
        say(BARE_MARKER);
        let _ = umount(NEWROOT);
        power_off();
    }
    link_serial_port()?;
    steps.done("agent port");

    // The stock kit's modules drive (not the config drive, which is /dev/vdb when a kit has
    // no modules drive).
    if Path::new("/dev/vdb").exists()
        && read_trimmed("/sys/block/vdb/serial").as_deref() != Some(CONFIG_SERIAL)
    {
        let dir = newroot(&format!("/lib/modules/{release}"));
        let ro = MsFlags::MS_RDONLY;
        if let Err(e) = mount_fs("/dev/vdb", &dir, "ext4", ro, None) {
            say(&format!(
                "ironlab-init: cannot mount the modules drive: {e:#}"
            ));
        }
    }

    install_agent()?;
    steps.done("agent in place");
    let hosts = default_hosts(&cmd.hostname);
    fs::write(newroot("/etc/hostname"), format!("{}\n", cmd.hostname))
        .context("cannot write /etc/hostname")?;
    fs::write(newroot("/etc/hosts"), hosts).context("cannot write /etc/hosts")?;
    nix::unistd::sethostname(&cmd.hostname).context("cannot set the hostname")?;
    steps.done("hostname");
    net::apply().context("network")?;
    steps.done("network");

    mount_fs(
        "tmpfs",
        &newroot("/run"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    fs::create_dir_all(newroot("/run/ironlab"))?;
    // (/sbin/init is usually an absolute symlink: test the link itself, not through it.)
    let systemd = cmd.mode != Mode::Agent
        && fs::symlink_metadata(newroot("/sbin/init")).is_ok()
        && fs::metadata(newroot("/lib/systemd/systemd"))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let serve = [
        "serve",
        "--socket",
        crate::DEFAULT_SOCKET,
        "--serial",
        SERIAL_LINK,
    ];
    if systemd {
        let wants = newroot("/run/systemd/system/sysinit.target.wants");
        fs::create_dir_all(&wants)?;
        fs::write(
            newroot("/run/systemd/system/ironlab-agent.service"),
            restart_unit(&format!("{AGENT} {}", serve.join(" "))),
        )?;
        std::os::unix::fs::symlink(
            "../ironlab-agent.service",
            wants.join("ironlab-agent.service"),
        )?;
    }

    move_mount("/dev", &newroot("/dev"))?;
    move_mount("/proc", &newroot("/proc"))?;
    move_mount("/sys", &newroot("/sys"))?;
    // PTYs and /dev/shm for the agent's sessions (systemd leaves existing mounts as they are).
    mount_fs(
        "devpts",
        &newroot("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    mount_fs(
        "shm",
        &newroot("/dev/shm"),
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;

    if systemd {
        // Chrooted into the new root: switch_root moves that very mount to /, so the agent's
        // root stays the image's root and it shares the mount namespace systemd sets up next.
        // It is a child of PID 1 (systemd reaps it); systemd does not kill processes it did
        // not start until the final shutdown.
        let console = fs::OpenOptions::new()
            .write(true)
            .open(newroot("/dev/console"))
            .context("cannot open the console")?;
        let mut agent = std::process::Command::new(AGENT);
        agent
            .args(serve)
            .env_clear()
            .env("PATH", PATH)
            .stdin(fs::File::open(newroot("/dev/null")).context("cannot open /dev/null")?)
            .stdout(console.try_clone()?)
            .stderr(console);
        // SAFETY: only async-signal-safe calls (setsid, chroot, chdir) between fork and exec.
        unsafe {
            agent.pre_exec(|| {
                nix::unistd::setsid()?;
                nix::unistd::chroot(NEWROOT)?;
                nix::unistd::chdir("/")?;
                Ok(())
            });
        }
        let child = agent.spawn().context("cannot start the agent")?;
        fs::write(newroot("/run/ironlab/agent.pid"), child.id().to_string())?;
        steps.done("agent started");
    }

    free_initramfs();
    steps.done(if systemd { "systemd" } else { "agent as PID 1" });
    say(&format!("ironlab-boot: {}", steps.line()));
    nix::unistd::chdir(NEWROOT)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("cannot move the root drive to /")?;
    nix::unistd::chroot(".").context("cannot chroot into the root drive")?;
    nix::unistd::chdir("/")?;
    let argv: Vec<&str> = if systemd {
        vec!["/sbin/init"]
    } else {
        vec![
            AGENT,
            "init",
            "--socket",
            crate::DEFAULT_SOCKET,
            "--serial",
            SERIAL_LINK,
        ]
    };
    let argv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(*a).expect("no NUL"))
        .collect();
    let e = nix::unistd::execv(&argv[0], &argv).unwrap_err();
    bail!("cannot start {}: {e}", argv[0].to_string_lossy())
}

/// `/etc/hosts` of a machine on no network.
fn default_hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
}

/// Whether `name` is a hostname the guest may take: 1–63 letters, digits and inner dashes.
pub fn valid_hostname(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// What the agent of a machine restored from a boot template does at the worker's `Configure`
/// (in the early agent: its root is the machine's root). The template was booted with
/// `ironlab.template=1`, its cards unconfigured. Returns the steps with their times.
pub fn configure(req: &ironlab_api::agent::ConfigureRequest) -> anyhow::Result<String> {
    let cmd = parse_cmdline(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    if !cmd.template && !req.resume {
        bail!("this machine was not restored from a boot template");
    }
    if !req.resume && !valid_hostname(&req.hostname) {
        bail!("hostname {:?} is not a valid hostname", req.hostname);
    }
    if req.seed.len() < 32 {
        bail!("seed: {} bytes, at least 32 needed", req.seed.len());
    }
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let mut step = |what: &str, t: &mut Instant| {
        steps.push(format!("{what} {} ms", t.elapsed().as_millis()));
        *t = Instant::now();
    };
    let mut t = t0;
    reseed(&req.seed).context("cannot reseed the random generator")?;
    let secs = req.time_unix_ns.div_euclid(1_000_000_000);
    let nanos = req.time_unix_ns.rem_euclid(1_000_000_000);
    #[allow(clippy::useless_conversion)] // (time_t and c_long differ between targets)
    let now = nix::sys::time::TimeSpec::new(secs.try_into()?, nanos.try_into()?);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now)
        .context("cannot set the clock")?;
    step("seed and clock", &mut t);
    if req.resume {
        // Its own snapshot: name and addresses are already this machine's; its neighbours
        // may have new cards.
        if !req.config.is_empty() {
            net::bounce(&req.config, "the configuration")?;
            step("cards down and up", &mut t);
        }
        return Ok(steps.join(", "));
    }
    nix::unistd::sethostname(&req.hostname).context("cannot set the hostname")?;
    fs::write("/etc/hostname", format!("{}\n", req.hostname))
        .context("cannot write /etc/hostname")?;
    if req.config.is_empty() {
        fs::write("/etc/hosts", default_hosts(&req.hostname)).context("cannot write /etc/hosts")?;
    }
    step("hostname", &mut t);
    if !req.config.is_empty() {
        net::apply_archive(&req.config, "the configuration", &req.macs, Path::new("/"))?;
        step("network", &mut t);
    }
    Ok(steps.join(", "))
}

/// Mixes `seed` into the kernel's random generator (credited) and makes it reseed now: every
/// machine restored from one template starts with the template's generator state.
fn reseed(seed: &[u8]) -> anyhow::Result<()> {
    const RNDADDENTROPY: u64 = 0x4008_5203;
    const RNDRESEEDCRNG: u64 = 0x5207;
    let words = seed.len().div_ceil(4);
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = vec![0u32; 2 + words];
    info[0] = u32::try_from(seed.len() * 8).unwrap_or(u32::MAX);
    info[1] = u32::try_from(seed.len()).unwrap_or(u32::MAX);
    for (i, chunk) in seed.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .context("cannot open /dev/urandom")?;
    // SAFETY: `info` is a rand_pool_info of `buf_size` bytes, alive across the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error()).context("RNDADDENTROPY");
    }
    // SAFETY: a request without an argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(std::io::Error::last_os_error()).context("RNDRESEEDCRNG");
    }
    Ok(())
}

/// Loads `/modules/<name>.ko` for each name of `/modules/order` (the stock kit's boot path).
fn load_modules() -> anyhow::Result<()> {
    let order = fs::read_to_string("/modules/order").unwrap_or_default();
    for name in order.split_whitespace() {
        let path = format!("/modules/{name}.ko");
        let f = fs::File::open(&path).with_context(|| format!("cannot load module {name}"))?;
        // SAFETY: a plain syscall on an open file and a NUL-terminated empty string.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                f.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                bail!("cannot load module {name}: {e}");
            }
        }
    }
    Ok(())
}

/// Links the agent's port by its name, as udev would: `/dev/virtio-ports/org.ironlab.agent`.
fn link_serial_port() -> anyhow::Result<()> {
    let port = wait_for("no virtio-serial port org.ironlab.agent", || {
        fs::read_dir("/sys/class/virtio-ports")
            .ok()?
            .flatten()
            .find(|d| read_trimmed(d.path().join("name")).as_deref() == Some(SERIAL_PORT_NAME))
            .map(|d| d.file_name())
    })?;
    fs::create_dir_all("/dev/virtio-ports")?;
    let _ = fs::remove_file(SERIAL_LINK);
    std::os::unix::fs::symlink(Path::new("..").join(port), SERIAL_LINK)
        .context("cannot link the agent's port")?;
    Ok(())
}

/// Puts this binary at `/newroot/.ironlab/agent`: a read-only tmpfs holding an empty file with
/// the initramfs's `/init` bind-mounted over it (no copy: 4–9 MB of memcpy is ~50 ms under
/// TCG; the mount keeps the file after the initramfs's names are deleted).
fn install_agent() -> anyhow::Result<()> {
    let dir = newroot(AGENT_DIR);
    mount_fs(
        "tmpfs",
        &dir,
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=256m"),
    )?;
    let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/init"));
    let to = newroot(AGENT);
    fs::File::create(&to).context("cannot create the agent's mount point")?;
    fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
    if let Err(e) = mount(Some(&me), &to, None::<&str>, MsFlags::MS_BIND, None::<&str>) {
        say(&format!(
            "ironlab-init: cannot bind the agent ({e}); copying it"
        ));
        fs::copy(&me, &to).context("cannot copy the agent")?;
    }
    for m in [&to, &dir] {
        let _ = mount(
            None::<&str>,
            m,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        );
    }
    Ok(())
}

/// Deletes the initramfs's files (what busybox's switch_root does) to give their memory back;
/// only on the initramfs itself (a ramfs or tmpfs root), never across a mount.
fn free_initramfs() {
    let Ok(root) = fs::metadata("/") else { return };
    let Ok(st) = nix::sys::statfs::statfs("/") else {
        return;
    };
    // RAMFS_MAGIC and TMPFS_MAGIC.
    #[allow(clippy::unnecessary_cast)] // (the field's type differs between glibc and musl)
    let magic = st.filesystem_type().0 as i64;
    if magic != 0x8584_58f6 && magic != 0x0102_1994 {
        return;
    }
    let Ok(entries) = fs::read_dir("/") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if ["newroot", "dev", "proc", "sys"].contains(&name.to_string_lossy().as_ref()) {
            continue;
        }
        let Ok(md) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if md.dev() != root.dev() {
            continue;
        }
        let _ = if md.is_dir() {
            fs::remove_dir_all(e.path())
        } else {
            fs::remove_file(e.path())
        };
    }
}

/// The config drive applied with ioctls (no `ip`: nothing to fork).
mod net {
    use std::fs;
    use std::net::Ipv4Addr;
    use std::os::fd::{AsRawFd as _, OwnedFd};
    use std::path::Path;

    use anyhow::{Context as _, bail};

    use super::{CONFIG_SERIAL, newroot, read_trimmed, wait_for};

    const SIOCGIFFLAGS: u64 = 0x8913;
    const SIOCSIFFLAGS: u64 = 0x8914;
    const SIOCSIFADDR: u64 = 0x8916;
    const SIOCSIFNETMASK: u64 = 0x891c;
    const SIOCSIFNAME: u64 = 0x8923;
    const SIOCSIFHWADDR: u64 = 0x8924;
    const SIOCADDRT: u64 = 0x890b;
    const RTF_UP: u16 = 0x1;
    const RTF_GATEWAY: u16 = 0x2;

    /// `struct ifreq`: a name and a 24-byte union.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: [u8; 24],
    }

    /// `struct rtentry` of `<linux/route.h>`.
    #[repr(C)]
    struct RtEntry {
        pad1: libc::c_ulong,
        dst: libc::sockaddr,
        gateway: libc::sockaddr,
        genmask: libc::sockaddr,
        flags: libc::c_ushort,
        pad2: libc::c_short,
        pad3: libc::c_ulong,
        pad4: *mut libc::c_void,
        metric: libc::c_short,
        dev: *mut libc::c_char,
        mtu: libc::c_ulong,
        window: libc::c_ulong,
        irtt: libc::c_ushort,
    }

    fn ifreq(name: &str) -> anyhow::Result<IfReq> {
        if name.is_empty() || name.len() > 15 {
            bail!("bad interface name {name:?}");
        }
        let mut r = IfReq {
            name: [0; 16],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }

    fn sockaddr(a: Ipv4Addr) -> libc::sockaddr {
        // SAFETY: sockaddr_in and sockaddr are both 16 plain bytes.
        unsafe {
            std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(a).to_be(),
                },
                sin_zero: [0; 8],
            })
        }
    }

    fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T, what: &str) -> anyhow::Result<()> {
        // SAFETY: `arg` is the struct the request expects and lives across the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context(what.to_string());
        }
        Ok(())
    }

    fn rename(fd: &OwnedFd, from: &str, to: &str) -> anyhow::Result<()> {
        let mut r = ifreq(from)?;
        r.data[..to.len()].copy_from_slice(ifreq(to)?.name[..to.len()].as_ref());
        ioctl(fd, SIOCSIFNAME, &mut r, &format!("cannot name {from} {to}"))
    }

    fn set_mac(fd: &OwnedFd, name: &str, mac: &str) -> anyhow::Result<()> {
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .ok()
            .filter(|b: &Vec<u8>| b.len() == 6)
            .with_context(|| format!("bad MAC {mac:?}"))?;
        let mut r = ifreq(name)?;
        // A sockaddr: sa_family ARPHRD_ETHER (1), then the address.
        r.data[..2].copy_from_slice(&1u16.to_ne_bytes());
        r.data[2..8].copy_from_slice(&bytes);
        ioctl(
            fd,
            SIOCSIFHWADDR,
            &mut r,
            &format!("cannot give {name} the MAC {mac}"),
        )
    }

    fn down(fd: &OwnedFd, name: &str) -> anyhow::Result<()> {
        let mut r = ifreq(name)?;
        ioctl(
            fd,
            SIOCGIFFLAGS,
            &mut r,
            &format!("cannot read {name}'s flags"),
        )?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) & !(libc::IFF_UP as i16);
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(
            fd,
            SIOCSIFFLAGS,
            &mut r,
            &format!("cannot take {name} down"),
        )
    }

    /// A machine resumed from its RAM: its cards are configured, but the neighbours it knew
    /// (their MACs) may be gone, restarted with new cards. Each card goes down and up (the
    /// kernel forgets its neighbours and routes), then the default route is added again.
    pub(super) fn bounce(data: &[u8], what: &str) -> anyhow::Result<()> {
        let files = super::cpio_files(data).with_context(|| what.to_string())?;
        let conf = files
            .iter()
            .find(|(n, _)| n == "net.conf")
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
            .with_context(|| format!("{what} has no net.conf"))?;
        let conf = super::parse_net_conf(&conf)?;
        // SAFETY: a plain socket(2) call; the fd is owned from here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot open a socket");
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        for f in &conf.ifaces {
            down(&fd, &f.name)?;
            up(&fd, &f.name)?;
        }
        if let Some(gw) = conf.gateway {
            default_route(&fd, gw)?;
        }
        Ok(())
    }

    fn up(fd: &OwnedFd, name: &str) -> anyhow::Result<()> {
        let mut r = ifreq(name)?;
        ioctl(
            fd,
            SIOCGIFFLAGS,
            &mut r,
            &format!("cannot read {name}'s flags"),
        )?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(fd, SIOCSIFFLAGS, &mut r, &format!("cannot bring {name} up"))
    }

    fn set_address(fd: &OwnedFd, name: &str, a: Ipv4Addr, prefix: u8) -> anyhow::Result<()> {
        let put = |r: &mut IfReq, a: Ipv4Addr| {
            let sa = sockaddr(a);
            // SAFETY: a sockaddr is 16 plain bytes.
            let bytes: [u8; 16] = unsafe { std::mem::transmute(sa) };
            r.data[..16].copy_from_slice(&bytes);
        };
        let mut r = ifreq(name)?;
        put(&mut r, a);
        ioctl(
            fd,
            SIOCSIFADDR,
            &mut r,
            &format!("cannot add {a} to {name}"),
        )?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix))
        };
        let mut r = ifreq(name)?;
        put(&mut r, Ipv4Addr::from(mask));
        ioctl(
            fd,
            SIOCSIFNETMASK,
            &mut r,
            &format!("cannot set {name}'s prefix /{prefix}"),
        )
    }

    fn default_route(fd: &OwnedFd, gw: Ipv4Addr) -> anyhow::Result<()> {
        let mut rt = RtEntry {
            pad1: 0,
            dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            gateway: sockaddr(gw),
            genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            flags: RTF_UP | RTF_GATEWAY,
            pad2: 0,
            pad3: 0,
            pad4: std::ptr::null_mut(),
            metric: 0,
            dev: std::ptr::null_mut(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        ioctl(
            fd,
            SIOCADDRT,
            &mut rt,
            &format!("cannot add the default route via {gw}"),
        )
    }

    /// The config drive's device, when the worker attached one.
    fn config_drive() -> Option<String> {
        fs::read_dir("/sys/block")
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("vd"))
            .find(|n| {
                read_trimmed(format!("/sys/block/{n}/serial")).as_deref() == Some(CONFIG_SERIAL)
            })
            .map(|n| format!("/dev/{n}"))
    }

    /// Applies the config drive, when the worker attached one, to the root drive at
    /// [`NEWROOT`](super::NEWROOT).
    pub(super) fn apply() -> anyhow::Result<()> {
        let Some(dev) = config_drive() else {
            return Ok(());
        };
        wait_for(&format!("no config drive {dev}"), || {
            Path::new(&dev).exists().then_some(())
        })?;
        let data = fs::read(&dev).with_context(|| format!("cannot read the config drive {dev}"))?;
        apply_archive(&data, &format!("the config drive {dev}"), &[], &newroot(""))
    }

    /// Applies a config archive (net.conf, hosts, resolv.conf) to the machine whose root is
    /// `root`. `macs`: first give card `i` (device order) the MAC `macs[i]` (a machine restored
    /// from a boot template has the template's MACs).
    pub(super) fn apply_archive(
        data: &[u8],
        what: &str,
        macs: &[String],
        root: &Path,
    ) -> anyhow::Result<()> {
        let files = super::cpio_files(data).with_context(|| what.to_string())?;
        let file = |name: &str| {
            files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
                .with_context(|| format!("{what} has no {name}"))
        };
        let conf = super::parse_net_conf(&file("net.conf")?)?;

        // SAFETY: a plain socket(2) call; the fd is owned from here.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot open a socket");
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        up(&fd, "lo")?;
        // Every card (a device behind it: not lo, dummy or tunnel devices) first gets a
        // temporary name, so the plan's names never clash with the kernel's; then each card
        // with a planned MAC gets its name. A renamed name is what udev keeps.
        let mut found = Vec::new();
        for e in fs::read_dir("/sys/class/net")?.flatten() {
            if !e.path().join("device").exists() {
                continue;
            }
            let index: u32 = read_trimmed(e.path().join("ifindex"))
                .and_then(|i| i.parse().ok())
                .unwrap_or(u32::MAX);
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = read_trimmed(e.path().join("address"))
                .unwrap_or_default()
                .to_ascii_lowercase();
            found.push((index, name, mac));
        }
        // Device order: the kernel numbers the cards as it finds them.
        found.sort();
        let mut cards = Vec::new();
        for (i, (_, name, mut mac)) in found.into_iter().enumerate() {
            if let Some(want) = macs.get(i)
                && *want != mac
            {
                set_mac(&fd, &name, want)?;
                mac.clone_from(want);
            }
            let tmp = format!("ilnic{i}");
            if name != tmp {
                rename(&fd, &name, &tmp)?;
            }
            cards.push((tmp, mac));
        }
        for f in &conf.ifaces {
            let Some((tmp, _)) = cards.iter().find(|(_, mac)| *mac == f.mac) else {
                bail!("no network card with MAC {} for {}", f.mac, f.name);
            };
            rename(&fd, tmp, &f.name)?;
            set_address(&fd, &f.name, f.address, f.prefix)?;
            up(&fd, &f.name)?;
        }
        if let Some(gw) = conf.gateway {
            default_route(&fd, gw)?;
        }
        fs::write(root.join("etc/hosts"), file("hosts")?).context("cannot write /etc/hosts")?;
        let resolv = root.join("etc/resolv.conf");
        let _ = fs::remove_file(&resolv);
        fs::write(&resolv, file("resolv.conf")?).context("cannot write /etc/resolv.conf")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_picks_hostname_and_mode_and_defaults() {
        let c = parse_cmdline(
            "console=ttyS0 panic=-1 ironlab.hostname=web-1 ironlab.mode=bare lpj=4000000",
        );
        assert_eq!(
            c,
            Cmdline {
                hostname: "web-1".into(),
                mode: Mode::Bare,
                template: false,
            }
        );
        assert!(parse_cmdline("ironlab.template=1 ironlab.hostname=t").template);
        assert!(!parse_cmdline("ironlab.template=0").template);
        let c = parse_cmdline("console=ttyS0 ironlab.hostname= ironlab.mode=odd");
        assert_eq!((c.hostname.as_str(), c.mode), ("ironlab", Mode::Auto));
        assert_eq!(parse_cmdline("ironlab.mode=probe").mode, Mode::Probe);
        assert_eq!(parse_cmdline("ironlab.mode=agent").mode, Mode::Agent);
    }

    #[test]
    fn hostnames_are_checked() {
        for ok in ["web-1", "a", "node2", &"x".repeat(63)] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "a b", "a.b", "ä", &"x".repeat(64)] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn net_conf_reads_cards_in_order_and_the_route() {
        let c = parse_net_conf(
            "iface eth0 52:54:00:AA:bb:01 10.0.0.2/24\niface eth1 52:54:00:aa:bb:02 192.168.7.9/16\nroute 10.0.0.1\n",
        )
        .expect("parses");
        assert_eq!(c.ifaces.len(), 2);
        assert_eq!(
            c.ifaces[0],
            Iface {
                name: "eth0".into(),
                mac: "52:54:00:aa:bb:01".into(),
                address: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24
            }
        );
        assert_eq!(c.ifaces[1].prefix, 16);
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(parse_net_conf("").expect("empty"), NetConf::default());
    }

    #[test]
    fn bad_net_conf_lines_are_named() {
        for (text, line) in [
            ("iface eth0 52:54:00:aa:bb:01 10.0.0.2\n", 1),
            ("route 10.0.0.1\niface eth0 m 10.0.0.300/24\n", 2),
            ("iface eth0 m 10.0.0.2/33\n", 1),
            ("bridge br0\n", 1),
            ("route\n", 1),
        ] {
            let e = format!("{:#}", parse_net_conf(text).expect_err("must be refused"));
            assert!(
                e.contains(&format!("net.conf line {line}")),
                "{text:?}: {e}"
            );
        }
    }

    /// A newc archive as the worker writes it (the same layout, written here by hand).
    fn newc(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let pad = |out: &mut Vec<u8>| {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        };
        let all = entries
            .iter()
            .copied()
            .chain(std::iter::once(("TRAILER!!!", 0, &[][..])));
        for (i, (name, mode, data)) in all.enumerate() {
            out.extend_from_slice(
                format!(
                    "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                    i + 1,
                    0,
                    0,
                    1,
                    0,
                    data.len(),
                    0,
                    0,
                    0,
                    0,
                    name.len() + 1,
                    0
                )
                .as_bytes(),
            );
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            pad(&mut out);
            out.extend_from_slice(data);
            pad(&mut out);
        }
        out.resize(4096, 0);
        out
    }

    #[test]
    fn cpio_files_lists_regular_files_with_their_bytes() {
        let img = newc(&[
            ("etc", 0o040755, b""),
            ("net.conf", 0o100644, b"route 10.0.0.1\n"),
            ("hosts", 0o100644, b"10.0.0.2\tweb\n"),
            ("empty", 0o100644, b""),
        ]);
        let files = cpio_files(&img).expect("parses");
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["net.conf", "hosts", "empty"]);
        assert_eq!(files[1].1, b"10.0.0.2\tweb\n");
        assert!(files[2].1.is_empty());
    }

    #[test]
    fn cpio_files_refuses_garbage_and_truncation() {
        assert!(cpio_files(&[0u8; 4096]).is_err());
        let img = newc(&[("net.conf", 0o100644, b"route 10.0.0.1\n")]);
        let e = format!("{:#}", cpio_files(&img[..120]).expect_err("truncated"));
        assert!(e.contains("ends inside"), "{e}");
    }

    #[test]
    fn restart_unit_waits_for_the_early_agent_then_runs_the_command() {
        let u = restart_unit("/.ironlab/agent serve --socket /run/ironlab/agent.sock");
        assert!(u.contains("Before=sysinit.target"));
        assert!(u.contains("Restart=always"));
        // systemd's `$$` is a literal `$` for the shell.
        assert!(u.contains("p=$$(cat /run/ironlab/agent.pid"));
        assert!(u.contains("; exec /.ironlab/agent serve --socket /run/ironlab/agent.sock'\n"));
    }
}
