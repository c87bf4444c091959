#!/usr/bin/env bash
# mmdebstrap customize hook of images/docker/build.sh: systemd and containerd settings for a
# small microVM that boots under TCG as well as KVM (under TCG every unit costs seconds of the
# one emulated CPU, so the boot does only what a Docker playground needs).
#
#   images/docker/customize.sh ROOT
#
# - docker.socket listens before the ironlab agent answers (DefaultDependencies=no, ordered
#   before ironlab-agent.service, the unit the VM's initramfs adds): a `docker` command typed as
#   soon as the playground is ready waits for dockerd (socket activation) instead of failing with
#   "Cannot connect to the Docker daemon". dockerd and containerd still start at boot.
# - containerd without its Kubernetes (CRI) plugin and the snapshotters Docker 20.10 does not use
#   (Docker keeps its own overlay2 layer store): they cost seconds at start and memory.
# - Masked: apparmor.service (dockerd loads its own docker-default profile with apparmor_parser),
#   e2scrub_reap.service, getty.target and getty-static.service (no console logins: terminals come
#   through the agent), systemd-pstore.service and the modprobe@ units for loop, dm_mod, fuse and
#   efi_pstore (unused here), and the apt/dpkg/e2scrub/fstrim timers (no work behind the
#   student's back). ssh.service is disabled (no host keys in the image; as in the debian image,
#   `sudo sh -c 'ssh-keygen -A && systemctl start ssh'` starts it).
set -euo pipefail

die() { printf 'docker-customize: %s\n' "$*" >&2; exit 1; }
(($# == 1)) || die "usage: customize.sh ROOT"
root=$1
[[ -f $root/lib/systemd/system/docker.socket ]] || die "$root has no docker.socket"

mkdir -p "$root/etc/systemd/system/docker.socket.d"
cat >"$root/etc/systemd/system/docker.socket.d/ironlab.conf" <<'EOF'
# ironlab (images/docker/customize.sh): listen before the ironlab agent answers, so that a docker
# command typed right after start waits for dockerd instead of failing.
[Unit]
DefaultDependencies=no
Before=sockets.target ironlab-agent.service shutdown.target
Conflicts=shutdown.target
EOF

cat >"$root/etc/containerd/config.toml" <<'EOF'
# ironlab (images/docker/customize.sh): containerd for Docker only. Docker 20.10 keeps its own
# overlay2 layer store and does not use containerd's CRI plugin or snapshotters.
version = 2
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
EOF

for unit in apparmor.service e2scrub_reap.service getty.target getty-static.service \
    systemd-pstore.service modprobe@loop.service modprobe@dm_mod.service \
    modprobe@fuse.service modprobe@efi_pstore.service apt-daily.timer \
    apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
    ln -sfn /dev/null "$root/etc/systemd/system/$unit"
done
chroot "$root" systemctl disable ssh.service >/dev/null 2>&1 ||
    die "systemctl disable ssh.service failed"
rm -f "$root/etc/systemd/system/sysinit.target.wants/apparmor.service" \
    "$root/etc/systemd/system/sysinit.target.wants/systemd-pstore.service" \
    "$root/etc/systemd/system/multi-user.target.wants/e2scrub_reap.service" \
    "$root/etc/systemd/system/getty.target.wants/getty@tty1.service"
rm -f "$root"/etc/systemd/system/timers.target.wants/{apt-daily-upgrade,apt-daily,dpkg-db-backup,e2scrub_all,fstrim}.timer
[[ -L $root/etc/systemd/system/multi-user.target.wants/docker.service ]] ||
    die "docker.service is not enabled in $root"
