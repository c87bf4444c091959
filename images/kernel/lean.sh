#!/usr/bin/env bash
# Builds the lean microVM guest kit: a kernel compiled from Debian's `linux-source` package with
# everything a playground needs built in (lean.config beside this script, over `tinyconfig`),
# and the project's initramfs without modules. Same layout as build.sh's kit, so the worker uses
# it as is (`--vm-kernel-dir` / IRONLAB_VM_KERNEL_DIR).
#
#   images/kernel/lean.sh [OUT_DIR]     (as root; default /var/lib/ironlab/kernel-lean)
#
# OUT_DIR afterwards:
#   vmlinuz         the uncompressed, stripped vmlinux ELF: QEMU boots it through its PVH entry
#                   (no decompression, which is slow under TCG). Named like the cloud kit's file.
#   VERSION         the kernel release (uname -r in the guest), e.g. 6.1.192-ironlab-lean
#   config          the kernel's full .config (also in the guest as /proc/config.gz)
#   initramfs.cpio  mount points, /dev/console, /release and an empty module order; uncompressed.
#                   No /init: the worker appends the agent as /init (ironlab_agent::boot boots
#                   the guest). No modules.ext4: nothing is a module.
#   .build/         the source tree and objects (kept, so a config change rebuilds incrementally)
#
# Cache: two hashes. The kernel (this script's kernel recipe, lean.config, the source package
# version) is compiled only when OUT_DIR/.kernel-hash differs; the initramfs (this script)
# is rebuilt when OUT_DIR/.recipe-hash differs. The compile runs `nice -n 19 make -j$(nproc)`
# (the machine is shared) and takes 10–20 min on 2 cores; progress goes to OUT_DIR/.build/make.log
# and a line every minute here. Needs: apt-get (Debian's registry), dpkg-deb, xz, gcc, make, flex,
# bison, bc, libelf-dev, busybox-static (scripts/setup.sh installs them).
set -euo pipefail
export PATH=/usr/local/sbin:/usr/sbin:/sbin:$PATH

say() { printf 'kernel-lean: %s\n' "$*"; }
die() { printf 'kernel-lean: %s\n' "$*" >&2; exit 1; }

out=${1:-/var/lib/ironlab/kernel-lean}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $(id -u) -eq 0 ]] || die "must run as root"
for tool in apt-get apt-cache dpkg-deb xz gcc make flex bison bc busybox strip readelf; do
    command -v "$tool" >/dev/null || die "$tool not found (scripts/setup.sh installs it)"
done

# The source: linux-source-<series> of the cloud kernel's series (6.1 on bookworm), so both kits
# run the same kernel version.
series=6.1
pkg=linux-source-$series
pkgver=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/{print $2; exit}')
[[ -n $pkgver && $pkgver != "(none)" ]] || die "cannot resolve $pkg (run apt-get update?)"

kernel_hash=$({
    sed -n '/^# --- kernel recipe/,/^# --- end of kernel recipe/p' "$0"
    cat "$here/lean.config"
    printf '%s\n' "$pkg" "$pkgver"
} | sha256sum | cut -d' ' -f1)
recipe_hash=$({
    echo "$kernel_hash"
    cat "$0"
} | sha256sum | cut -d' ' -f1)
if [[ -f $out/.recipe-hash && $(cat "$out/.recipe-hash") == "$recipe_hash" && -f $out/vmlinuz &&
    -f $out/initramfs.cpio ]]; then
    say "$out is up to date ($pkg $pkgver, kernel ${kernel_hash:0:12}, recipe ${recipe_hash:0:12})"
    exit 0
fi
mkdir -p "$out/.build"

# --- kernel recipe (hashed: a change here recompiles) -------------------------------------------
build_kernel() {
    local b=$out/.build src obj
    src=$b/linux-source-$series-$pkgver
    obj=$b/obj
    if [[ ! -f $src/Makefile ]]; then
        say "downloading $pkg $pkgver"
        rm -rf "$b"/linux-source-* "$b/deb"
        mkdir -p "$b/deb"
        (cd "$b/deb" && apt-get download -q "$pkg=$pkgver" 2>&1 | grep -v 'unsandboxed' >&2 || true)
        local deb
        deb=$(ls "$b"/deb/*.deb 2>/dev/null | tail -n1)
        [[ -f $deb ]] || die "apt-get download $pkg failed"
        dpkg-deb -x "$deb" "$b/deb/x"
        say "unpacking the source (about 1.4 GB)"
        mkdir -p "$src.tmp"
        tar -xf "$b/deb/x/usr/src/linux-source-$series.tar.xz" -C "$src.tmp" --strip-components=1
        rm -rf "$b/deb"
        mv "$src.tmp" "$src"
    fi
    mkdir -p "$obj"
    local mk=(nice -n 19 make -C "$src" O="$obj" ARCH=x86_64)
    "${mk[@]}" -s tinyconfig >"$b/merge.log" 2>&1 || die "make tinyconfig failed (see $b/merge.log)"
    "$src/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" "$here/lean.config" >>"$b/merge.log" 2>&1 ||
        die "merging lean.config failed (see $b/merge.log)"
    "${mk[@]}" -s olddefconfig >>"$b/merge.log" 2>&1
    # Every option lean.config sets must have survived (olddefconfig silently drops options
    # whose dependencies are off).
    local line key val bad=()
    while IFS= read -r line; do
        [[ $line == CONFIG_* ]] || continue
        key=${line%%=*} val=${line#*=}
        if [[ $val == n ]]; then
            grep "^$key=" "$obj/.config" >/dev/null && bad+=("$key should be off")
        else
            grep -xF "$line" "$obj/.config" >/dev/null || bad+=("$line did not survive olddefconfig")
        fi
    done <"$here/lean.config"
    ((${#bad[@]} == 0)) || die "lean.config: ${bad[*]}"

    say "compiling the kernel (nice -n 19 make -j$(nproc) vmlinux; log in $b/make.log)"
    local t0=$SECONDS
    "${mk[@]}" -j"$(nproc)" vmlinux >"$b/make.log" 2>&1 &
    local pid=$! last=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        if ((SECONDS - last >= 60)); then
            last=$SECONDS
            say "  … $((SECONDS - t0)) s, $(grep -c '^  CC' "$b/make.log" || true) files compiled"
        fi
    done
    wait "$pid" || die "kernel compile failed: $(tail -n 20 "$b/make.log")"
    say "compiled in $((SECONDS - t0)) s"

    strip --strip-all -o "$b/vmlinux.stripped" "$obj/vmlinux"
    # QEMU boots an ELF kernel only through the PVH note (XEN_ELFNOTE_PHYS32_ENTRY).
    readelf -n "$b/vmlinux.stripped" | grep -E 'Xen.*0x00000012|PHYS32_ENTRY' >/dev/null ||
        die "the kernel has no PVH entry note (CONFIG_PVH)"
    "${mk[@]}" -s kernelrelease >"$b/release"
    cp "$obj/.config" "$b/config"
    echo "$kernel_hash" >"$b/kernel-hash"
}
# --- end of kernel recipe ------------------------------------------------------------------------

if [[ $(cat "$out/.build/kernel-hash" 2>/dev/null) != "$kernel_hash" || ! -f $out/.build/vmlinux.stripped ]]; then
    build_kernel
else
    say "kernel ${kernel_hash:0:12} already compiled"
fi
release=$(cat "$out/.build/release")

work=$(mktemp -d "$out/.tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
ir=$work/initramfs
mkdir -p "$ir"/{dev,proc,sys,newroot,modules}
: >"$ir/modules/order"
echo "$release" >"$ir/release"
mknod -m 600 "$ir/dev/console" c 5 1
(cd "$ir" && find . | LC_ALL=C sort | busybox cpio -o -H newc >"$work/initramfs.cpio" 2>/dev/null)

cp "$out/.build/vmlinux.stripped" "$work/vmlinuz"
cp "$out/.build/config" "$work/config"
echo "$release" >"$work/VERSION"
for f in vmlinuz VERSION config initramfs.cpio; do mv -f "$work/$f" "$out/$f"; done
rm -f "$out/modules.ext4"
echo "$recipe_hash" >"$out/.recipe-hash"
say "built $out: kernel $release ($(du -h "$out/vmlinuz" | cut -f1), PVH ELF), initramfs $(du -h "$out/initramfs.cpio" | cut -f1)"
