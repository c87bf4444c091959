//! The QEMU command line of a microVM (pure: no I/O, unit-tested).
//!
//! `-M microvm` (ACPI on: Debian's cloud kernel has no `VIRTIO_MMIO_CMDLINE_DEVICES`, so the
//! virtio-mmio devices are found through ACPI), qboot firmware when present, the kernel and
//! initramfs given directly, virtio-blk drives (root first, so it is `/dev/vda`; the read-only
//! modules drive second, the read-only config drive with serial `ironlab-config` third), a
//! virtio-serial port for the agent (a unix-socket chardev), a virtio-net NIC per tap, the
//! serial console to a file, QMP on a unix socket, `-sandbox on`, an unprivileged user after
//! start-up.

use std::path::PathBuf;

/// The accelerator QEMU runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg -cpu max`).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the initramfs hands over to (`ironlab.mode=` on the kernel command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// systemd when the image has it, else the agent as PID 1.
    Auto,
    /// The agent as PID 1 whatever the image has.
    Agent,
    /// Print `IRONLAB-BARE-READY` once the root drive is mounted, then power off (benchmark).
    Bare,
    /// Print `IRONLAB-PROBE-OK` once the modules are loaded, then power off (accelerator probe).
    Probe,
}

impl BootMode {
    fn as_str(self) -> &'static str {
        match self {
            BootMode::Auto => "auto",
            BootMode::Agent => "agent",
            BootMode::Bare => "bare",
            BootMode::Probe => "probe",
        }
    }
}

/// The virtio-blk serial of the config drive (how the guest's `/init` finds it).
pub const CONFIG_DRIVE_SERIAL: &str = "ironlab-config";

/// A guest network card on a tap device of QEMU's network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The tap (it exists before QEMU starts); empty: a card on a hub port of its own, which
    /// leads nowhere (a boot template's cards).
    pub tap: String,
    /// The guest NIC's MAC address (how the guest tells its cards apart).
    pub mac: String,
}

/// Everything the command line is made of.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `il-<run>-<machine>` (QEMU's `-name`; also how leftovers are found in `/proc`).
    pub name: String,
    /// Guest hostname (`ironlab.hostname=`; `[a-z0-9-]`).
    pub hostname: String,
    /// Accelerator.
    pub accel: Accel,
    /// Boot mode.
    pub mode: BootMode,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub cpus: u32,
    /// bzImage.
    pub kernel: PathBuf,
    /// initramfs (the kit's + the agent's cpio).
    pub initrd: PathBuf,
    /// Firmware (`qboot.rom`) when present.
    pub firmware: Option<PathBuf>,
    /// Root drive (raw ext4).
    pub root_drive: Option<PathBuf>,
    /// Read-only modules drive.
    pub modules_drive: Option<PathBuf>,
    /// Host end of the agent's virtio-serial port (QEMU listens).
    pub agent_socket: Option<PathBuf>,
    /// QMP socket (QEMU listens).
    pub qmp_socket: Option<PathBuf>,
    /// Serial console output (appended).
    pub console_log: PathBuf,
    /// QEMU writes its pid here.
    pub pidfile: Option<PathBuf>,
    /// Network cards, `eth0`, `eth1`, … of the guest in order.
    pub nics: Vec<Nic>,
    /// Read-only config drive (the guest's network settings, hosts, resolv.conf).
    pub config_drive: Option<PathBuf>,
    /// Drop to this `uid:gid` once the VM is set up.
    pub run_as: Option<(u32, u32)>,
    /// `chroot` into this (empty) directory just before the VM starts: every file QEMU needs is
    /// open by then, so afterwards it sees none of the host's.
    pub chroot: Option<PathBuf>,
    /// TCG translation cache in MiB (bounds QEMU's memory overhead).
    pub tcg_tb_mib: u32,
    /// A boot template's boot (`ironlab.template=1`: the guest leaves its cards unconfigured
    /// and accepts `Configure` once restored).
    pub template: bool,
    /// Wait for a migration stream (`-incoming defer`): the VM is restored from a template.
    pub incoming: bool,
}

/// The kernel command line.
pub fn kernel_cmdline(c: &VmConfig) -> String {
    let mut parts = vec![
        "console=ttyS0".to_string(),
        "panic=-1".to_string(),
        "reboot=t".to_string(),
    ];
    if c.accel == Accel::Tcg {
        // Without KVM's clock the kernel finds no reference to calibrate the TSC against and
        // hangs; tell it the rate and skip the delay-loop calibration.
        parts.push("tsc_early_khz=2000000".into());
        parts.push("lpj=4000000".into());
    }
    parts.push(format!("ironlab.hostname={}", c.hostname));
    parts.push(format!("ironlab.mode={}", c.mode.as_str()));
    if c.template {
        parts.push("ironlab.template=1".into());
    }
    parts.join(" ")
}

/// QEMU's own option escaping: a comma inside a value is written twice.
fn esc(p: &std::path::Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// The arguments after `qemu-system-x86_64`.
pub fn qemu_args(c: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", c.name)]);
    push(&["-M", "microvm,acpi=on"]);
    match c.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&[
            "-accel",
            &format!("tcg,tb-size={}", c.tcg_tb_mib),
            "-cpu",
            "max",
        ]),
    }
    push(&[
        "-m",
        &format!("{}M", c.memory_mib),
        "-smp",
        &c.cpus.max(1).to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-sandbox",
        // set*id stays allowed: `-run-with user=` drops privileges after the filter is in place.
        "on,obsolete=deny,spawn=deny,resourcecontrol=deny",
    ]);
    if let Some((uid, gid)) = c.run_as {
        push(&["-run-with", &format!("user={uid}:{gid}")]);
    }
    if let Some(dir) = &c.chroot {
        push(&["-run-with", &format!("chroot={}", esc(dir))]);
    }
    if let Some(fw) = &c.firmware {
        push(&["-bios", &fw.to_string_lossy()]);
    }
    // A restored guest's kernel and initramfs are in its RAM already: without them QEMU keeps
    // no copies of the files for the firmware (≈ 15 MiB of private memory for the lean kit).
    if !c.incoming {
        push(&[
            "-kernel",
            &c.kernel.to_string_lossy(),
            "-initrd",
            &c.initrd.to_string_lossy(),
            "-append",
            &kernel_cmdline(c),
        ]);
    }
    push(&[
        "-chardev",
        &format!("file,id=console,path={},append=on", esc(&c.console_log)),
        "-serial",
        "chardev:console",
    ]);
    if let Some(pid) = &c.pidfile {
        push(&["-pidfile", &pid.to_string_lossy()]);
    }
    if let Some(qmp) = &c.qmp_socket {
        push(&[
            "-chardev",
            &format!("socket,id=qmp,path={},server=on,wait=off", esc(qmp)),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
    }
    if let Some(root) = &c.root_drive {
        push(&[
            "-drive",
            &format!(
                "id=root,file={},format=raw,if=none,discard=unmap",
                esc(root)
            ),
            "-device",
            "virtio-blk-device,drive=root",
        ]);
    }
    if let Some(mods) = &c.modules_drive {
        push(&[
            "-drive",
            &format!(
                "id=modules,file={},format=raw,if=none,readonly=on,file.locking=off",
                esc(mods)
            ),
            "-device",
            "virtio-blk-device,drive=modules",
        ]);
    }
    if let Some(config) = &c.config_drive {
        push(&[
            "-drive",
            &format!(
                "id=config,file={},format=raw,if=none,readonly=on,file.locking=off",
                esc(config)
            ),
            "-device",
            &format!("virtio-blk-device,drive=config,serial={CONFIG_DRIVE_SERIAL}"),
        ]);
    }
    if let Some(agent) = &c.agent_socket {
        push(&[
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", esc(agent)),
            "-device",
            "virtserialport,chardev=agent,name=org.ironlab.agent",
        ]);
    }
    for (i, nic) in c.nics.iter().enumerate() {
        let backend = if nic.tap.is_empty() {
            format!("hubport,id=net{i},hubid={i}")
        } else {
            format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap)
        };
        push(&[
            "-netdev",
            &backend,
            "-device",
            &format!("virtio-net-device,netdev=net{i},mac={}", nic.mac),
        ]);
    }
    if c.incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            name: "il-abc-web".into(),
            hostname: "web".into(),
            accel: Accel::Tcg,
            mode: BootMode::Auto,
            memory_mib: 256,
            cpus: 2,
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            firmware: Some("/usr/share/qemu/qboot.rom".into()),
            root_drive: Some("/p/runs/abc/web/root.ext4".into()),
            modules_drive: Some("/k/modules.ext4".into()),
            agent_socket: Some("/p/runs/abc/web/agent.serial".into()),
            qmp_socket: Some("/p/runs/abc/web/qmp.sock".into()),
            console_log: "/p/runs/abc/web/console.log".into(),
            pidfile: Some("/p/runs/abc/web/qemu.pid".into()),
            nics: vec![
                Nic {
                    tap: "tap0".into(),
                    mac: "52:54:00:12:34:56".into(),
                },
                Nic {
                    tap: "tap1".into(),
                    mac: "52:54:00:12:34:57".into(),
                },
            ],
            config_drive: Some("/p/runs/abc/web/config.img".into()),
            run_as: Some((1_000_123, 1_000_123)),
            chroot: Some("/p/runs/abc/web/jail".into()),
            tcg_tb_mib: 64,
            template: false,
            incoming: false,
        }
    }

    /// The value following `flag` (the first occurrence).
    fn after<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_machine_with_limits_and_isolation() {
        let a = qemu_args(&config());
        assert_eq!(after(&a, "-M"), ["microvm,acpi=on"]);
        assert_eq!(after(&a, "-accel"), ["tcg,tb-size=64"]);
        assert_eq!(after(&a, "-cpu"), ["max"]);
        assert_eq!(after(&a, "-m"), ["256M"]);
        assert_eq!(after(&a, "-smp"), ["2"]);
        assert!(a.contains(&"-nodefaults".to_string()));
        assert!(a.contains(&"-no-user-config".to_string()));
        assert!(after(&a, "-sandbox")[0].starts_with("on,"));
        assert_eq!(
            after(&a, "-run-with"),
            ["user=1000123:1000123", "chroot=/p/runs/abc/web/jail"]
        );
        assert_eq!(after(&a, "-bios"), ["/usr/share/qemu/qboot.rom"]);
        let append = after(&a, "-append")[0];
        assert!(append.contains("console=ttyS0"));
        assert!(append.contains("ironlab.hostname=web"));
        assert!(append.contains("ironlab.mode=auto"));
        assert!(
            append.contains("lpj="),
            "TCG needs the calibration hints: {append}"
        );
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_calibration_hints() {
        let mut c = config();
        c.accel = Accel::Kvm;
        let a = qemu_args(&c);
        assert_eq!(after(&a, "-accel"), ["kvm"]);
        assert_eq!(after(&a, "-cpu"), ["host"]);
        assert!(!after(&a, "-append")[0].contains("lpj="));
    }

    #[test]
    fn drives_serial_console_qmp_and_tap() {
        let a = qemu_args(&config());
        let drives = after(&a, "-drive");
        assert_eq!(drives.len(), 3);
        assert!(drives[0].starts_with("id=root,file=/p/runs/abc/web/root.ext4,format=raw"));
        assert!(drives[1].contains("readonly=on"), "{}", drives[1]);
        assert!(
            drives[2].starts_with("id=config,file=/p/runs/abc/web/config.img,")
                && drives[2].contains("readonly=on"),
            "{}",
            drives[2]
        );
        let devices = after(&a, "-device");
        assert_eq!(
            devices[0], "virtio-blk-device,drive=root",
            "root is /dev/vda"
        );
        assert!(devices.contains(&"virtserialport,chardev=agent,name=org.ironlab.agent"));
        assert_eq!(devices[1], "virtio-blk-device,drive=modules");
        assert_eq!(
            devices[2],
            "virtio-blk-device,drive=config,serial=ironlab-config"
        );
        assert!(devices.contains(&"virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"));
        assert!(devices.contains(&"virtio-net-device,netdev=net1,mac=52:54:00:12:34:57"));
        let chardevs = after(&a, "-chardev");
        assert!(chardevs.contains(&"file,id=console,path=/p/runs/abc/web/console.log,append=on"));
        assert!(
            chardevs
                .contains(&"socket,id=agent,path=/p/runs/abc/web/agent.serial,server=on,wait=off")
        );
        assert!(
            chardevs.contains(&"socket,id=qmp,path=/p/runs/abc/web/qmp.sock,server=on,wait=off")
        );
        assert_eq!(after(&a, "-serial"), ["chardev:console"]);
        assert_eq!(
            after(&a, "-netdev"),
            [
                "tap,id=net0,ifname=tap0,script=no,downscript=no",
                "tap,id=net1,ifname=tap1,script=no,downscript=no"
            ]
        );
        assert_eq!(after(&a, "-name"), ["guest=il-abc-web,debug-threads=on"]);
    }

    #[test]
    fn templates_boot_with_the_flag_on_hub_ports_and_restores_wait_for_the_stream() {
        let mut c = config();
        c.template = true;
        c.nics[1].tap = String::new();
        let args = qemu_args(&c);
        let joined = args.join(" ");
        assert!(kernel_cmdline(&c).ends_with(" ironlab.template=1"));
        assert!(
            joined.contains("-netdev tap,id=net0,ifname=tap0,"),
            "{joined}"
        );
        assert!(
            joined.contains("-netdev hubport,id=net1,hubid=1 "),
            "{joined}"
        );
        assert!(!joined.contains("-incoming"));

        let mut r = config();
        r.incoming = true;
        let args = qemu_args(&r);
        assert_eq!(&args[args.len() - 2..], ["-incoming", "defer"]);
        // The restored guest needs neither the kernel nor the initramfs files.
        assert!(
            !args
                .iter()
                .any(|a| a == "-kernel" || a == "-initrd" || a == "-append")
        );
        assert!(!kernel_cmdline(&r).contains("template"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut c = config();
        c.root_drive = Some("/data,x/root.ext4".into());
        let a = qemu_args(&c);
        assert!(after(&a, "-drive")[0].contains("file=/data,,x/root.ext4,"));
    }
}
