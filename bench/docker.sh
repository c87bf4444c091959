#!/usr/bin/env bash
# Benchmark: the stock `docker` playground (a microVM: Debian 12, systemd, docker.io, 512 MiB,
# 1 vCPU). Per iteration: `playground start docker` → running, then running → the first
# `ironlab ssh RUN -- docker run --rm ironlab/busybox echo hi` prints `hi` (it waits for dockerd,
# which starts with the VM), then the guest's memory in use (`free -m`: used, with dockerd and
# containerd up) and QEMU's resident memory; then destroy. The accelerator the worker's probe
# chose is named next to every figure.
#
#   sudo bench/docker.sh [-n N] [--record]
#
#   -n N        iterations (default 3, at most 20; under TCG one takes about two minutes)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built ($IRONLAB_BIN, default $CARGO_TARGET_DIR/release/ironlab); the
# stock docker image ($IRONLAB_STOCK_IMAGES, default /var/lib/ironlab/stock-images;
# images/docker/build.sh builds it); the microVM kit ($IRONLAB_VM_KERNEL_DIR, default
# /var/lib/ironlab/kernel); qemu-system-x86_64. The warm-up start (image import, drive build) is
# not counted.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=3
RECORD=0
while (($#)); do
    case $1 in
        -n)
            N=$2
            shift 2
            ;;
        --record)
            RECORD=1
            shift
            ;;
        -h | --help)
            sed -n '2,19p' "$0"
            exit 0
            ;;
        *)
            echo "bench: unknown argument: $1" >&2
            exit 2
            ;;
    esac
done
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 20)); then
    echo "bench: -n must be 1..20" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench: must run as root" >&2
    exit 1
fi
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

IRONLAB=${IRONLAB_BIN:-$CARGO_TARGET_DIR/release/ironlab}
STOCK=${IRONLAB_STOCK_IMAGES:-/var/lib/ironlab/stock-images}
KIT=${IRONLAB_VM_KERNEL_DIR:-/var/lib/ironlab/kernel}
QEMU=$(command -v qemu-system-x86_64 || true)
for need in "$IRONLAB" "$STOCK/docker/index.json" "$KIT/vmlinuz" "$KIT/initramfs.cpio" "$QEMU"; do
    if [[ -z $need || ! -e $need ]]; then
        echo "bench: missing ${need:-qemu-system-x86_64} (scripts/setup.sh, scripts/build.sh, images/docker/build.sh, images/kernel/build.sh)" >&2
        exit 1
    fi
done
export IRONLAB_VM_KERNEL_DIR=$KIT

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

now_ns() { date +%s%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e9 }'; }
median() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "-"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        printf "%.1f (min %.1f, max %.1f)\n", m, v[1], v[NR] }'
}

bench_up
ACCEL=""
for _ in $(seq 1 600); do
    ACCEL=$(cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null |
        sed -n 's/.*microVM runtime ready accel="\{0,1\}\([a-z]*\).*/\1/p' | tail -n1)
    [[ -n $ACCEL ]] && break
    sleep 0.1
done
if [[ -z $ACCEL ]]; then
    echo "bench: the worker offers no microVMs:" >&2
    tail -n 20 "$WORK/up.log" >&2
    exit 1
fi
echo "bench: accelerator $ACCEL"
# The API answers before the worker does; until then the control plane offers containers only.
for _ in $(seq 1 600); do
    grep -q 'worker ready' "$WORK/up.log" && break
    sleep 0.1
done

start_docker() {
    local out
    out=$("$IRONLAB" playground start docker -o json) || return 0
    sed -n 's/^ *"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' <<<"$out"
}
destroy() {
    local out
    out=$("$IRONLAB" playground destroy "$1" 2>&1) || { echo "bench: destroy $1 failed: $out" >&2; exit 1; }
}

echo "bench: warm-up start (imports the image, builds its drive)"
RUN=$(start_docker)
[[ -n $RUN ]] || { echo "bench: warm-up start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
destroy "$RUN"
RUN=""

: >"$WORK/start.s"
: >"$WORK/hi.s"
: >"$WORK/used.mb"
: >"$WORK/rss.mb"
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    RUN=$(start_docker)
    t1=$(now_ns)
    [[ -n $RUN ]] || { echo "bench: start $i failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    out=$("$IRONLAB" ssh "$RUN" -- docker run --rm ironlab/busybox echo hi)
    t2=$(now_ns)
    [[ $out == hi ]] || { echo "bench: docker run printed ${out@Q}" >&2; exit 1; }
    secs "$t0" "$t1" >>"$WORK/start.s"
    secs "$t1" "$t2" >>"$WORK/hi.s"
    free=$("$IRONLAB" ssh "$RUN" -- free -m)
    awk '$1 == "Mem:" { print $3 }' <<<"$free" >>"$WORK/used.mb"
    pid=$(cat "$WORK/data/worker/pool/runs/$RUN/docker/qemu.pid")
    awk '/^VmRSS:/ { printf "%.0f\n", $2 / 1024 }' "/proc/$pid/status" >>"$WORK/rss.mb"
    destroy "$RUN"
    RUN=""
    printf '  %d: start→running %s s, running→hi %s s, guest used %s MiB, QEMU RSS %s MiB\n' "$i" \
        "$(tail -n1 "$WORK/start.s")" "$(tail -n1 "$WORK/hi.s")" "$(tail -n1 "$WORK/used.mb")" \
        "$(tail -n1 "$WORK/rss.mb")"
done

table=$(
    printf '| metric (accel %s, 1 vCPU, 512 MiB, N=%d) | median |\n|---|---|\n' "$ACCEL" "$N"
    printf '| `playground start docker` → running | %s s |\n' "$(median "$WORK/start.s")"
    printf '| running → first `docker run --rm ironlab/busybox echo hi` printed hi | %s s |\n' "$(median "$WORK/hi.s")"
    printf '| guest memory used (`free -m`, dockerd + containerd up) | %s MiB |\n' "$(median "$WORK/used.mb")"
    printf '| QEMU resident memory | %s MiB |\n' "$(median "$WORK/rss.mb")"
)
echo
echo "$table"
if ((RECORD)); then
    {
        printf '\n## Stock docker playground (%s, %s)\n\n' "$(date -u +%Y-%m-%d)" "$ACCEL"
        printf 'Command: `sudo bench/docker.sh -n %d --record` (%s, host load: %s)\n\n' "$N" \
            "$(basename "$(dirname "$IRONLAB")")/ironlab" "$(cut -d' ' -f1-3 /proc/loadavg)"
        echo "$table"
    } >>"$REPO_ROOT/bench/RESULTS.md"
    echo "bench: appended to bench/RESULTS.md"
fi
