#!/usr/bin/env bash
# Builds the tiny two-layer test image (busybox) as an OCI image layout, in well under 2 s.
#
#   images/testimg/build.sh OUT_DIR        (as root: files are owned by root and uid 1000)
#
# Layer 1: /bin/busybox (from Debian's busybox-static) with applet symlinks, /etc/passwd and
#          /etc/group (root, laborant 1000:1000 with home /home/laborant and shell /bin/sh),
#          /tmp (1777), /root (700), /home/laborant (owned by 1000), plus whiteout fixtures:
#          /etc/remove-me, /opt/opaque/{old-1,old-2}, and a hard link /etc/hardlink-b → -a.
# Layer 2: /etc/.wh.remove-me (deletes /etc/remove-me), /opt/opaque/.wh..wh..opq with
#          /opt/opaque/new (the directory keeps only `new`), and /etc/layer2.
# So an unpacked image must have no /etc/remove-me, /opt/opaque containing only `new`.
#
# Cache-aware: does nothing when OUT_DIR holds a layout built from the same recipe and busybox.
set -euo pipefail

die() { printf 'testimg: %s\n' "$*" >&2; exit 1; }
(($# == 1)) || die "usage: images/testimg/build.sh OUT_DIR"
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[[ $(id -u) -eq 0 ]] || die "must run as root (files are owned by uid 0 and 1000)"
busybox=/bin/busybox
# No pipeline here: under pipefail, `head` closing the pipe early made busybox die of SIGPIPE.
banner=$("$busybox" 2>&1 || true)
[[ -x $busybox && $banner == *BusyBox* ]] ||
    die "$busybox not found: apt-get install busybox-static"
file -L "$busybox" 2>/dev/null | grep 'statically linked' >/dev/null ||
    die "$busybox is not static: apt-get install busybox-static"

hash=$(cat "$0" "$here/../lib/oci-layout.sh" "$busybox" | sha256sum | cut -d' ' -f1)
if [[ -f $out/index.json && -f $out/.recipe-hash && $(cat "$out/.recipe-hash") == "$hash" ]]; then
    echo "testimg: $out is up to date"
    exit 0
fi

work=$(mktemp -d /tmp/ironlab-testimg.XXXXXX)
trap 'rm -rf "$work"' EXIT
l1=$work/l1
l2=$work/l2

mkdir -p "$l1"/{bin,etc,tmp,root,home/laborant,opt/opaque,dev,proc,sys,run,usr/bin,var}
install -m 0755 "$busybox" "$l1/bin/busybox"
for a in sh ash ls cat echo id hostname dd sleep whoami head tail stty tty env grep mkdir rm \
    mv cp ln chmod chown touch ps kill adduser addgroup su true false test printf wc sort uniq \
    sed awk tr cut date uname df du mount umount free top vi less find xargs which ping ip \
    nslookup wget seq yes nproc stat readlink realpath basename dirname tee clear reset; do
    ln -s busybox "$l1/bin/$a"
done
cat >"$l1/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
laborant:x:1000:1000:laborant:/home/laborant:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat >"$l1/etc/group" <<'G'
root:x:0:
laborant:x:1000:
nogroup:x:65534:
G
printf 'root:*:19000:0:99999:7:::\nlaborant:*:19000:0:99999:7:::\n' >"$l1/etc/shadow"
chmod 0640 "$l1/etc/shadow"
echo "testimg" >"$l1/etc/hostname"
echo "this file is deleted by a whiteout in layer 2" >"$l1/etc/remove-me"
echo "hard link" >"$l1/etc/hardlink-a"
ln "$l1/etc/hardlink-a" "$l1/etc/hardlink-b"
echo old >"$l1/opt/opaque/old-1"
echo old >"$l1/opt/opaque/old-2"
chmod 1777 "$l1/tmp"
chmod 0700 "$l1/root"
chown 1000:1000 "$l1/home/laborant"
chmod 0755 "$l1/home/laborant"

mkdir -p "$l2/etc" "$l2/opt/opaque"
: >"$l2/etc/.wh.remove-me"
: >"$l2/opt/opaque/.wh..wh..opq"
echo new >"$l2/opt/opaque/new"
echo "from layer 2" >"$l2/etc/layer2"

for l in l1 l2; do
    tar --numeric-owner --sort=name --mtime=@0 --format=gnu -C "$work/$l" -cf "$work/$l.tar" .
done

SOURCE_DATE_EPOCH=0 "$here/../lib/oci-layout.sh" --cmd '["/bin/sh"]' --env HOME=/root \
    "$out" "$work/l1.tar" "$work/l2.tar"
echo "$hash" >"$out/.recipe-hash"
