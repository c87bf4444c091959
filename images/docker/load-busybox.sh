#!/usr/bin/env bash
# mmdebstrap customize hook of images/docker/build.sh: puts the local image
# `ironlab/busybox:latest` into the Docker of the chroot ROOT (its /var/lib/docker).
#
#   images/docker/load-busybox.sh ROOT     (as root, on the host; ROOT has docker.io installed)
#
# 1. `apt-get download busybox-static` inside ROOT (same suite and mirror as the image), unpack it.
# 2. One layer: /bin/busybox and a symlink per applet (`busybox --list-full`), /etc/passwd and
#    /etc/group (root, nobody), /root, /tmp (1777). Owned by root, mtimes clamped, sorted: the
#    same busybox gives the same layer and image id.
# 3. A `docker save` archive (manifest.json, config, layer.tar) with RepoTags ironlab/busybox:latest.
# 4. dockerd in ROOT under `unshare --mount --net --pid` (private mounts, no network but lo, dies
#    with this script), `--iptables=false --ip6tables=false --bridge=none`, storage driver overlay2
#    (what the VM's dockerd picks on its ext4 root), its own socket and exec root under a tmpfs
#    /run; `docker load`; `docker image inspect` checks the tag; dockerd is stopped.
# 5. What the VM must not inherit is removed: the managed containerd's state, the network store
#    (the VM's dockerd makes its default bridge at first start), the engine id (each VM makes its
#    own), BuildKit's state, temp files.
set -euo pipefail

die() { printf 'load-busybox: %s\n' "$*" >&2; exit 1; }
(($# == 1)) || die "usage: load-busybox.sh ROOT"
root=$1
[[ -x $root/usr/sbin/dockerd ]] || die "$root has no /usr/sbin/dockerd (docker.io not installed?)"

tag=ironlab/busybox:latest
work_in=/tmp/ironlab-busybox # inside ROOT
work=$root$work_in
rm -rf "$work"
mkdir -p "$work/deb" "$work/layer" "$work/archive"
chmod 0777 "$work/deb" # apt downloads as _apt
trap 'rm -rf "$work"' EXIT

# 1. Debian's busybox-static, from the chroot's own apt sources.
chroot "$root" sh -c "cd $work_in/deb && apt-get download -q busybox-static" >"$work/apt.log" 2>&1 ||
    { cat "$work/apt.log" >&2; die "apt-get download busybox-static failed"; }
deb=$(find "$work/deb" -name 'busybox-static_*.deb' -print -quit)
[[ -n $deb ]] || die "apt-get download left no busybox-static .deb"
dpkg-deb -x "$deb" "$work/unpacked"
bb=$work/unpacked/bin/busybox
[[ -x $bb ]] || die "the busybox-static package has no /bin/busybox"

# 2. The layer.
l=$work/layer
mkdir -p "$l"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,dev,proc,sys,home,var}
install -m 0755 "$bb" "$l/bin/busybox"
while read -r applet; do
    # Applets live in bin, sbin, usr/bin, usr/sbin (`linuxrc` at the top is not wanted).
    [[ $applet == */* && $applet != bin/busybox ]] || continue
    dir=$(dirname "$applet")
    mkdir -p "$l/$dir"
    case $dir in
    bin) target=busybox ;;
    sbin | usr) target=../bin/busybox ;;
    *) target=../../bin/busybox ;;
    esac
    [[ -e $l/$applet || -L $l/$applet ]] || ln -s "$target" "$l/$applet"
done < <("$bb" --list-full)
[[ -L $l/bin/sh && -L $l/bin/echo ]] || die "busybox --list-full gave no sh/echo applets"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$l/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$l/etc/group"
chmod 0700 "$l/root"
chmod 1777 "$l/tmp"
epoch=${SOURCE_DATE_EPOCH:-1700000000}
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$l" -cf "$work/layer.tar" .

# 3. The `docker save` archive: config named by its digest, one layer, the tag.
diff=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
a=$work/archive
mkdir -p "$a/$diff"
mv "$work/layer.tar" "$a/$diff/layer.tar"
printf '{"architecture":"amd64","os":"linux","created":"%s","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"ironlab images/docker/load-busybox.sh: Debian busybox-static"}]}' \
    "$created" "$diff" "$created" >"$a/config.json"
config=$(sha256sum "$a/config.json" | cut -d' ' -f1)
mv "$a/config.json" "$a/$config.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$config" "$tag" "$diff" >"$a/manifest.json"
tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner -C "$a" -cf "$work/busybox.tar" .

# 4. dockerd in the chroot, in its own namespaces; the inner script runs as PID 1 of the new PID
# namespace, so everything it started dies with it.
cat >"$work/load.sh" <<EOF
#!/bin/sh
set -eu
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=0755 tmpfs /run
# dockerd refuses to start without a cgroup hierarchy; cgroup2 makes it need no v1 controllers
# (it creates no cgroup here: no container runs).
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ip link set lo up 2>/dev/null || true
sock=unix:///run/ironlab-build/docker.sock
mkdir -p /run/ironlab-build
dockerd --data-root /var/lib/docker --exec-root /run/ironlab-build/exec \\
    --pidfile /run/ironlab-build/dockerd.pid -H "\$sock" \\
    --iptables=false --ip6tables=false --bridge=none --ip-masq=false \\
    --storage-driver overlay2 >$work_in/dockerd.log 2>&1 &
i=0
until docker -H "\$sock" version >/dev/null 2>&1; do
    i=\$((i + 1))
    if [ \$i -gt 120 ] || ! kill -0 \$! 2>/dev/null; then
        echo "load-busybox: dockerd did not come up" >&2
        exit 1
    fi
    sleep 0.5
done
docker -H "\$sock" load -i $work_in/busybox.tar
docker -H "\$sock" image inspect --format '{{.Id}} {{.RepoTags}}' $tag
kill \$!
wait \$! || true
EOF
chmod 0755 "$work/load.sh"
# ROOT is bind-mounted onto itself so that / is a mount point in the chroot (dockerd makes / rprivate
# before unpacking a layer); the host's /dev is bound in (private mounts: nothing leaks out).
# shellcheck disable=SC2016
if ! unshare --mount --propagation private --net --pid --fork --kill-child \
    sh -c 'mount --bind "$1" "$1" && mount --rbind /dev "$1/dev" && exec chroot "$1" "$2"' \
    sh "$root" "$work_in/load.sh" >"$work/load.log" 2>&1; then
    cat "$work/load.log" >&2
    tail -n 40 "$work/dockerd.log" >&2 || true
    die "loading $tag into the image's docker failed"
fi
cat "$work/load.log"
grep -q "$tag" "$work/load.log" || die "docker image inspect did not show $tag"

# 5. Leave only the image and layer stores.
rm -rf "$root/var/lib/docker/containerd" "$root/var/lib/docker/network" "$root/var/lib/docker/buildkit" \
    "$root/var/lib/docker/engine-id" "$root/var/lib/docker/tmp" "$root/var/lib/docker/runtimes"
[[ -d $root/var/lib/docker/image/overlay2 && -d $root/var/lib/docker/overlay2 ]] ||
    die "no overlay2 image store in $root/var/lib/docker"
