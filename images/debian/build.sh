#!/usr/bin/env bash
# Builds the stock `debian` image (Debian 12 bookworm, minbase) as an OCI image layout, without
# Docker: mmdebstrap → rootfs tarball → images/lib/oci-layout.sh.
#
#   images/debian/build.sh [OUT_DIR]       (as root; default /var/lib/ironlab/stock-images/debian)
#
# Environment:
#   IRONLAB_IMAGE_CACHE  keep the mmdebstrap tarball here between runs (e.g. /var/cache/ironlab-ci/images)
#   DEBIAN_MIRROR        default http://deb.debian.org/debian
#
# Cache: when OUT_DIR/index.json exists and OUT_DIR/.recipe-hash equals the recipe's hash (this
# script, the layout script, the package list, suite and mirror), it does nothing.
#
# The image: bash coreutils procps iproute2 iputils-ping curl less vim-tiny nano sudo systemd-sysv
# ca-certificates git passwd openssh-server; user `laborant` (uid/gid 1000, /home/laborant, bash)
# with passwordless sudo (/etc/sudoers.d/laborant); /etc/hostname `ironlab` (the runtime sets the
# real hostname); no apt lists or caches, no man pages or docs (copyright files are kept).
# sshd is installed but not started (containers have no init system; microVMs boot the agent as
# init too), has no host keys (they would be shared by every machine) and pam_loginuid is
# optional for it (a container may not set the audit login uid: without CAP_AUDIT_CONTROL every
# login would fail): `sudo sh -c 'ssh-keygen -A && mkdir -p /run/sshd && /usr/sbin/sshd'` starts
# it, for `ssh -o ProxyCommand='ironlab ssh-proxy RUN'` (VS Code Remote-SSH).
# Under systemd (microVMs) ssh.service makes its own host keys first (a drop-in runs
# `ssh-keygen -A`), so every machine has its own and the system boots `running`, not `degraded`.
set -euo pipefail

say() { printf 'debian-image: %s\n' "$*"; }
die() { printf 'debian-image: %s\n' "$*" >&2; exit 1; }

out=${1:-/var/lib/ironlab/stock-images/debian}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=(bash coreutils procps iproute2 iputils-ping curl less vim-tiny nano sudo systemd-sysv
    ca-certificates git passwd openssh-server)

[[ $(id -u) -eq 0 ]] || die "must run as root (mmdebstrap root mode)"

hash=$({
    cat "$0" "$here/../lib/oci-layout.sh"
    printf '%s\n' "$suite" "$mirror" "${packages[@]}"
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/index.json && -f $out/.recipe-hash && $(cat "$out/.recipe-hash") == "$hash" ]]; then
    say "$out is up to date (recipe ${hash:0:12})"
    exit 0
fi
command -v mmdebstrap >/dev/null || die "mmdebstrap not found: apt-get install mmdebstrap"

mkdir -p "$(dirname "$out")"
work=$(mktemp -d "$(dirname "$out")/.debian-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [[ -n ${IRONLAB_IMAGE_CACHE:-} ]]; then
    mkdir -p "$IRONLAB_IMAGE_CACHE"
    tarball=$IRONLAB_IMAGE_CACHE/debian-$suite-${hash:0:16}.tar
else
    tarball=$work/rootfs.tar
fi

if [[ -f $tarball ]]; then
    say "reusing cached rootfs $tarball"
else
    say "mmdebstrap $suite (minbase + ${#packages[@]} packages) from $mirror"
    start=$(date +%s)
    include=$(IFS=,; echo "${packages[*]}")
    # SOURCE_DATE_EPOCH makes mmdebstrap clamp mtimes (reproducible where the packages allow).
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000} mmdebstrap \
        --mode=root --variant=minbase --format=tar --include="$include" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --customize-hook='chroot "$1" useradd --create-home --uid 1000 --user-group --shell /bin/bash laborant' \
        --customize-hook='echo "laborant ALL=(ALL) NOPASSWD:ALL" > "$1/etc/sudoers.d/laborant" && chmod 0440 "$1/etc/sudoers.d/laborant"' \
        --customize-hook='echo ironlab > "$1/etc/hostname"' \
        --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
        --customize-hook='mkdir -p "$1/etc/systemd/system/ssh.service.d" && printf "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n" > "$1/etc/systemd/system/ssh.service.d/host-keys.conf"' \
        --customize-hook='sed -i "s/^session\s\+required\s\+pam_loginuid.so/session optional pam_loginuid.so/" "$1/etc/pam.d/sshd"' \
        --customize-hook='printf "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" > "$1/etc/hosts"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/apt/archives/*.deb "$1"/var/log/*.log "$1"/var/cache/debconf/*-old' \
        "$suite" "$work/rootfs.tar.part" "$mirror" 2>"$work/mmdebstrap.log" ||
        { tail -n 30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
    mv "$work/rootfs.tar.part" "$tarball"
    if [[ -n ${IRONLAB_IMAGE_CACHE:-} ]]; then # drop tarballs of older recipes
        find "$IRONLAB_IMAGE_CACHE" -maxdepth 1 -name "debian-$suite-*.tar" ! -path "$tarball" -delete
    fi
    say "mmdebstrap took $(($(date +%s) - start)) s; rootfs tarball $(du -h "$tarball" | cut -f1)"
fi

"$here/../lib/oci-layout.sh" --cmd '["/bin/bash"]' \
    --env LANG=C.UTF-8 --env HOME=/root \
    --label org.ironlab.default-user=laborant \
    --label org.opencontainers.image.title="ironlab debian (bookworm)" \
    "$work/layout" "$tarball"
echo "$hash" >"$work/layout/.recipe-hash"
rm -rf "$out.old"
if [[ -e $out ]]; then mv "$out" "$out.old"; fi
mv "$work/layout" "$out"
rm -rf "$out.old"
say "built $out"
