#!/usr/bin/env bash
# Builds the stock `docker` image (Debian 12 bookworm, minbase, Debian's docker.io) as an OCI
# image layout, without Docker on the host: mmdebstrap → rootfs tarball → images/lib/oci-layout.sh.
# It is meant for microVMs (systemd as PID 1 starts containerd and dockerd); a container runtime
# cannot run Docker.
#
#   images/docker/build.sh [OUT_DIR]       (as root; default /var/lib/ironlab/stock-images/docker)
#
# Environment:
#   IRONLAB_IMAGE_CACHE  keep the mmdebstrap tarball here between runs (e.g. /var/cache/ironlab-ci/image-cache)
#   DEBIAN_MIRROR        default http://deb.debian.org/debian
#
# Cache: when OUT_DIR/index.json exists and OUT_DIR/.recipe-hash equals the recipe's hash (this
# script, customize.sh, load-busybox.sh, the layout script, the package list, suite and mirror),
# it does nothing.
#
# The image: what the stock debian image has (bash coreutils procps iproute2 iputils-ping curl
# less vim-tiny nano sudo systemd-sysv ca-certificates git passwd openssh-server; user `laborant`
# uid/gid 1000 with passwordless sudo; no host keys; no apt lists, caches, man pages or docs) plus
# docker.io (dockerd 20.10, containerd, runc, tini, iptables), kmod (dockerd and the kernel load
# overlay, bridge and netfilter modules from the VM's modules drive) and apparmor (the Debian
# kernel enables AppArmor, and dockerd then needs apparmor_parser to load its container profile)
# and dbus (systemd's system bus: `systemctl status` and `systemctl is-active` work without sudo).
# No recommends; without docker.io's libnetwork debugging tools dnet and ovrouter (27 MB).
# `laborant` is in the `docker` group. customize.sh tunes systemd and containerd for a small VM
# (see there: docker.socket listens before the agent answers, unused units are masked).
#
# Docker Hub is out of reach, so the Docker in the image already holds one local image,
# `ironlab/busybox:latest` (Debian's busybox-static with its applets linked in /bin, /sbin,
# /usr/bin, /usr/sbin; /etc/passwd and /etc/group with root and nobody; Cmd ["sh"]): the
# customize hook load-busybox.sh runs dockerd inside the build chroot (its own mount, network and
# PID namespaces, `--iptables=false --bridge=none`, storage driver overlay2 as in the VM, data root
# the image's /var/lib/docker), `docker load`s the image and stops it. `docker run --rm
# ironlab/busybox echo hi` then works in the VM without any registry.
set -euo pipefail

say() { printf 'docker-image: %s\n' "$*"; }
die() { printf 'docker-image: %s\n' "$*" >&2; exit 1; }

out=${1:-/var/lib/ironlab/stock-images/docker}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=(bash coreutils procps iproute2 iputils-ping curl less vim-tiny nano sudo systemd-sysv
    ca-certificates git passwd openssh-server docker.io kmod apparmor dbus)

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap root mode, dockerd in the build chroot)"

hash=$({
    cat "$0" "$here/customize.sh" "$here/load-busybox.sh" "$here/../lib/oci-layout.sh"
    printf '%s\n' "$suite" "$mirror" "${packages[@]}"
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/index.json && -f $out/.recipe-hash && $(cat "$out/.recipe-hash") == "$hash" ]]; then
    say "$out is up to date (recipe ${hash:0:12})"
    exit 0
fi
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap"
command -v unshare >/dev/null || die "unshare not found (util-linux)"

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.docker-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ -n ${IRONLAB_IMAGE_CACHE:-} ]]; then
    mkdir -p "$IRONLAB_IMAGE_CACHE"
    tarball=$IRONLAB_IMAGE_CACHE/docker-$suite-${hash:0:16}.tar
else
    tarball=$work/rootfs.tar
fi

if [[ -f $tarball ]]; then
    say "reusing cached rootfs $tarball"
else
    say "mmdebstrap $suite (minbase + ${#packages[@]} packages) from $mirror"
    start=$(date +%s)
    include=$(IFS=,; echo "${packages[*]}")
    # SOURCE_DATE_EPOCH makes mmdebstrap clamp mtimes (reproducible where the packages allow;
    # Docker's layer store has random directory names, so this image's digest is not).
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000} mmdebstrap \
        --mode=root --variant=minbase --format=tar --include="$include" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/bin/dnet' \
        --dpkgopt='path-exclude=/usr/sbin/ovrouter' \
        --customize-hook='chroot "$1" useradd --create-home --uid 1000 --user-group --groups docker --shell /bin/bash laborant' \
        --customize-hook='echo "laborant ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/laborant" && chmod 0440 "$1/etc/sudoers.d/laborant"' \
        --customize-hook='echo ironlab > "$1/etc/hostname"' \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        --customize-hook='sed -i "s/^session\s\+required\s\+pam_loginuid.so/session optional pam_loginuid.so/" "$1/etc/pam.d/sshd"' \
        --customize-hook='printf "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
        --customize-hook="\"$here/customize.sh\" \"\$1\"" \
        --customize-hook="\"$here/load-busybox.sh\" \"\$1\"" \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log "$1"/var/cache/debconf/*-old' \
        "$suite" "$work/rootfs.tar.part" "$mirror" 2>"$work/mmdebstrap.log" ||
        { tail -n 40 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
    mv "$work/rootfs.tar.part" "$tarball"
    if [[ -n ${IRONLAB_IMAGE_CACHE:-} ]]; then # drop tarballs of older recipes
        find "$IRONLAB_IMAGE_CACHE" -maxdepth 1 -name "docker-$suite-*.tar" ! -path "$tarball" -delete
    fi
    say "mmdebstrap took $(($(date +%s) - start)) s; rootfs tarball $(du -h "$tarball" | cut -f1)"
fi

"$here/../lib/oci-layout.sh" --cmd '["/bin/bash"]' \
    --env LANG=C.UTF-8 --env HOME=/root \
    --label org.ironlab.default-user=laborant \
    --label org.ironlab.docker-images=ironlab/busybox:latest \
    --label org.opencontainers.image.title="ironlab docker (bookworm, docker.io)" \
    "$work/layout" "$tarball"
echo "$hash" >"$work/layout/.recipe-hash"
rm -rf "$out.old"
if [[ -e $out ]]; then mv "$out" "$out.old"; fi
mv "$work/layout" "$out"
rm -rf "$out.old"
say "built $out"
