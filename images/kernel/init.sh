#!/bin/busybox sh
# ironlab microVM initramfs /init (PID 1 until switch_root).
#
# Loads the virtio modules of the boot path, mounts the root drive (/dev/vda, ext4) and the
# read-only modules drive (/dev/vdb) at /lib/modules/<release> inside it, puts the agent (from
# the cpio the worker appends: /ironlab/agent) on a tmpfs at /.ironlab, writes the hostname, and
# hands over:
#   - systemd, when the image has /sbin/init and /lib/systemd/systemd: the agent starts first,
#     chrooted into the new root just before switch_root (ready without waiting for systemd's
#     boot; devpts and /dev/shm are mounted for it), and a runtime unit in /run/systemd/system
#     (a tmpfs: nothing is written into the image) restarts it once that early agent exits;
#   - otherwise the agent is PID 1 (`ironlab-agent init`).
# The agent serves on /run/ironlab/agent.sock and on the virtio-serial port /dev/virtio-ports/org.ironlab.agent.
#
# Networks: when the worker attached a config drive (virtio-blk serial ironlab-config), the
# guest's cards get the planned names, addresses and default route, and /etc/hosts and
# /etc/resolv.conf are the plan's (see apply_network).
#
# Kernel command line: ironlab.hostname=NAME, ironlab.mode=auto|agent|bare|probe (bare: print
# IRONLAB-BARE-READY once the root drive is mounted and power off, the benchmark's baseline;
# probe: print IRONLAB-PROBE-OK once the modules are loaded and power off, the worker's
# accelerator probe).
export PATH=/bin
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys

fail() {
    echo "ironlab-init: $*" >/dev/console
    echo o >/proc/sysrq-trigger
    sleep 5
    poweroff -f
}

hostname=ironlab
mode=auto
for arg in $(cat /proc/cmdline); do
    case $arg in
    ironlab.hostname=*) hostname=${arg#ironlab.hostname=} ;;
    ironlab.mode=*) mode=${arg#ironlab.mode=} ;;
    esac
done
release=$(cat /release)

for m in $(cat /modules/order); do
    insmod "/modules/$m.ko" || fail "cannot load module $m"
done
if [ "$mode" = probe ]; then
    echo "IRONLAB-PROBE-OK" >/dev/console
    poweroff -f
fi

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt 500 ] && fail "no root drive /dev/vda after 5 s"
    usleep 10000
done
mount -t ext4 -o rw /dev/vda /newroot || fail "cannot mount the root drive /dev/vda"

# The agent's port, by name (what udev would link): /dev/virtio-ports/org.ironlab.agent.
port=
i=0
while [ -z "$port" ] && [ "$mode" != bare ]; do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = org.ironlab.agent ] && port=${d##*/}
    done
    if [ -z "$port" ]; then
        i=$((i + 1))
        [ $i -gt 500 ] && fail "no virtio-serial port org.ironlab.agent after 5 s"
        usleep 10000
    fi
done
if [ -n "$port" ]; then
    mkdir -p /dev/virtio-ports
    ln -sf "../$port" /dev/virtio-ports/org.ironlab.agent
fi

if [ "$mode" = bare ]; then
    echo "IRONLAB-BARE-READY" >/dev/console
    umount /newroot
    poweroff -f
fi

# (Not the config drive, which is /dev/vdb when a kit has no modules drive.)
if [ -b /dev/vdb ] && [ "$(cat /sys/block/vdb/serial 2>/dev/null)" != ironlab-config ]; then
    mkdir -p "/newroot/lib/modules/$release" 2>/dev/null
    mount -t ext4 -o ro /dev/vdb "/newroot/lib/modules/$release" ||
        echo "ironlab-init: cannot mount the modules drive" >/dev/console
fi

[ -x /ironlab/agent ] || fail "no agent in the initramfs"
mkdir -p /newroot/.ironlab
mount -t tmpfs -o mode=0755,size=256m,nodev,nosuid tmpfs /newroot/.ironlab
cp /ironlab/agent /newroot/.ironlab/agent || fail "cannot copy the agent"
chmod 0755 /newroot/.ironlab/agent
mount -o remount,ro,bind /newroot/.ironlab 2>/dev/null

echo "$hostname" >/newroot/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' "$hostname" >/newroot/etc/hosts
hostname "$hostname"

# --- Network: the run's networks, from the config drive -------------------------------------
# The drive (read-only, serial ironlab-config) is a newc cpio archive: net.conf (`iface NAME MAC
# ADDRESS/PREFIX` per interface in order, then `route GATEWAY`), hosts and resolv.conf (the
# texts a container machine of the same plan gets). Cards are matched by MAC; each is renamed
# even when the kernel already gave it the right name, so a renamed name is what udev keeps.
apply_network() {
    cfg=
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = ironlab-config ] && cfg=/dev/${b##*/}
    done
    [ -n "$cfg" ] || return 0
    i=0
    while [ ! -b "$cfg" ]; do
        i=$((i + 1))
        [ $i -gt 500 ] && fail "no config drive $cfg after 5 s"
        usleep 10000
    done
    mkdir -p /config
    (cd /config && cpio -i -d -F "$cfg" 2>/dev/null) || fail "cannot read the config drive $cfg"
    [ -f /config/net.conf ] || fail "the config drive $cfg has no net.conf"
    ip link set lo up
    n=0
    for d in /sys/class/net/*; do
        dev=${d##*/}
        [ "$dev" = lo ] && continue
        ip link set dev "$dev" name "ilnic$n" || fail "cannot rename the network card $dev"
        n=$((n + 1))
    done
    while read -r kind a b c; do
        case $kind in
        iface)
            dev=
            for d in /sys/class/net/ilnic*; do
                [ "$(cat "$d/address" 2>/dev/null)" = "$b" ] && dev=${d##*/}
            done
            [ -n "$dev" ] || fail "no network card with MAC $b for $a"
            ip link set dev "$dev" name "$a" || fail "cannot name the network card $a"
            ip addr add "$c" dev "$a" || fail "cannot add $c to $a"
            ip link set "$a" up || fail "cannot bring $a up"
            ;;
        route)
            ip route add default via "$a" || fail "cannot add the default route via $a"
            ;;
        esac
    done </config/net.conf
    cp /config/hosts /newroot/etc/hosts || fail "cannot write /etc/hosts"
    rm -f /newroot/etc/resolv.conf
    cp /config/resolv.conf /newroot/etc/resolv.conf || fail "cannot write /etc/resolv.conf"
}
apply_network

mkdir -p /newroot/run /newroot/dev /newroot/proc /newroot/sys
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /newroot/run
mkdir -p /newroot/run/ironlab

init=agent
# (/sbin/init is usually an absolute symlink: test it inside the new root, not through it.)
if [ "$mode" != agent ] && { [ -L /newroot/sbin/init ] || [ -e /newroot/sbin/init ]; } &&
    [ -x /newroot/lib/systemd/systemd ]; then
    init=systemd
fi

agent_cmd="/.ironlab/agent serve --socket /run/ironlab/agent.sock --serial /dev/virtio-ports/org.ironlab.agent"
if [ $init = systemd ]; then
    # The agent starts now, before systemd (agent-ready does not wait for the image's boot), and
    # the runtime unit only restarts it: it waits for this early agent to exit, then runs a new
    # one (Restart=always). /run is a tmpfs: nothing is written into the image for it.
    mkdir -p /newroot/run/systemd/system/sysinit.target.wants
    cat >/newroot/run/systemd/system/ironlab-agent.service <<UNIT
[Unit]
Description=ironlab agent (restarts the agent the initramfs started)
DefaultDependencies=no
Before=sysinit.target

[Service]
ExecStart=/bin/sh -c 'p=\$\$(cat /run/ironlab/agent.pid 2>/dev/null) && rm -f /run/ironlab/agent.pid && [ -n "\$\$p" ] && { tail --pid="\$\$p" -f /dev/null 2>/dev/null || while kill -0 "\$\$p" 2>/dev/null; do sleep 1; done; }; exec $agent_cmd'
Restart=always
RestartSec=200ms
KillMode=process
StandardOutput=journal+console
StandardError=journal+console
UNIT
    ln -s ../ironlab-agent.service /newroot/run/systemd/system/sysinit.target.wants/ironlab-agent.service
fi

mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
# PTYs and /dev/shm for the agent's sessions (systemd leaves existing mounts as they are).
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o nosuid,noexec,newinstance,ptmxmode=0666,mode=0620,gid=5 devpts /newroot/dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 shm /newroot/dev/shm

if [ $init = systemd ]; then
    # Chrooted into the new root: switch_root moves that very mount to /, so the agent's root
    # stays the image's root, and it shares the mount namespace systemd sets up next. It is a
    # child of PID 1 (systemd reaps it) in the root cgroup; systemd does not kill processes it
    # did not start until the final shutdown.
    # (ash gives a background command /dev/null as stdin first: the initramfs needs its own.)
    [ -e /dev/null ] || mknod -m 666 /dev/null c 1 3
    # shellcheck disable=SC2086
    setsid env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /bin/chroot /newroot $agent_cmd </newroot/dev/null >/newroot/dev/console 2>&1 &
    echo $! >/newroot/run/ironlab/agent.pid
    exec switch_root /newroot /sbin/init
fi
exec switch_root /newroot /.ironlab/agent init --socket /run/ironlab/agent.sock --serial /dev/virtio-ports/org.ironlab.agent
