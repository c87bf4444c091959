#!/usr/bin/env bash
# Builds the microVM guest kit: Debian's cloud kernel, a read-only modules drive and the
# project's initramfs. No kernel compile: the kernel comes as Debian built it.
#
#   images/kernel/build.sh [OUT_DIR]     (as root; default /var/lib/ironlab/kernel)
#
# OUT_DIR afterwards:
#   vmlinuz         bzImage of linux-image-cloud-amd64 (booted by QEMU -kernel, PVH/linuxboot)
#   VERSION         the kernel release (uname -r in the guest)
#   modules.ext4    /lib/modules/<release> as an ext4 image, attached read-only as the second
#                   virtio-blk drive and mounted at /lib/modules/<release> in the guest
#   initramfs.cpio  the virtio modules of the boot path (/modules, in /modules/order), mount
#                   points, /dev/console and /release; uncompressed (TCG decompresses slowly).
#                   The worker appends a second cpio holding the agent as /init
#                   (ironlab_agent::boot loads the modules and boots the guest), so an agent
#                   upgrade needs no rebuild here.
#
# Cache: when OUT_DIR/.recipe-hash equals the recipe's hash (this script, the package version),
# it does nothing. Needs: apt-get (Debian's registry), dpkg-deb, busybox-static, kmod,
# e2fsprogs.
set -euo pipefail
export PATH=/usr/local/sbin:/usr/sbin:/sbin:$PATH

say() { printf 'kernel: %s\n' "$*"; }
die() { printf 'kernel: %s\n' "$*" >&2; exit 1; }

out=${1:-/var/lib/ironlab/kernel}
[[ $(id -u) -eq 0 ]] || die "must run as root"
for tool in apt-get apt-cache dpkg-deb busybox depmod mkfs.ext4; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs it)"
done

# Boot-path modules, in load order (the cloud kernel has EXT4, ACPI, 8250 and PVH built in).
boot_modules=(virtio_ring virtio virtio_mmio virtio_blk virtio_console failover net_failover virtio_net)

pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
[[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 (run apt-get update?)"
pkgver=$(apt-cache policy "$pkg" | awk '/Candidate:/{print $2; exit}')
hash=$({
    cat "$0"
    printf '%s\n' "$pkg" "$pkgver" "${boot_modules[@]}"
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/.recipe-hash && $(cat "$out/.recipe-hash") == "$hash" && -f $out/initramfs.cpio ]]; then
    say "$out is up to date ($pkg $pkgver, recipe ${hash:0:12})"
    exit 0
fi

mkdir -p "$out"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "downloading $pkg $pkgver"
(cd "$work" && apt-get download -q "$pkg" 2>&1 | grep -v 'unsandboxed' >&2 || true)
deb=$(ls "$work"/*.deb 2>/dev/null | tail -n1)
[[ -f $deb ]] || die "apt-get download $pkg failed"
dpkg-deb -x "$deb" "$work/x"
release=$(ls "$work/x/lib/modules")
[[ -n $release && -f $work/x/boot/vmlinuz-$release ]] || die "no kernel in $deb"
depmod -b "$work/x" "$release"

# Modules drive: the whole /lib/modules/<release>, so modprobe works in the guest (overlay,
# bridge, nf_tables, veth … for Docker and Kubernetes).
mods=$work/x/lib/modules/$release
size_kb=$(($(du -sk "$mods" | cut -f1) * 12 / 10 + 8192))
mkfs.ext4 -q -b 4096 -L modules -d "$mods" "$work/modules.ext4" "${size_kb}k"

# initramfs
ir=$work/initramfs
mkdir -p "$ir"/{dev,proc,sys,newroot,modules}
for m in "${boot_modules[@]}"; do
    f=$(find "$mods/kernel" -name "$m.ko" -print -quit)
    [[ -n $f ]] || die "module $m not in $release"
    cp "$f" "$ir/modules/$m.ko"
done
printf '%s\n' "${boot_modules[@]}" >"$ir/modules/order"
echo "$release" >"$ir/release"
mknod -m 600 "$ir/dev/console" c 5 1
(cd "$ir" && find . | LC_ALL=C sort | busybox cpio -o -H newc >"$work/initramfs.cpio" 2>/dev/null)

cp "$work/x/boot/vmlinuz-$release" "$work/vmlinuz"
echo "$release" >"$work/VERSION"
for f in vmlinuz VERSION modules.ext4 initramfs.cpio; do mv -f "$work/$f" "$out/$f"; done
echo "$hash" >"$out/.recipe-hash"
say "built $out: kernel $release, initramfs $(du -h "$out/initramfs.cpio" | cut -f1), modules drive $(du -h --apparent-size "$out/modules.ext4" | cut -f1)"
