#!/usr/bin/env bash
# Benchmark: start-to-agent-ready of a microVM playground (the stock debian image, systemd as
# PID 1, 256 MiB, 1 vCPU) next to a bare `qemu-system-x86_64` boot of the same kernel,
# initramfs and root drive to an init marker (IRONLAB-BARE-READY, printed once the root drive is
# mounted), and QEMU's resident memory beyond the guest's RAM; all in one invocation, with the
# accelerator the worker's probe chose named next to every figure.
#
#   sudo bench/vm.sh [-n N] [--record]
#
#   -n N        iterations (default 10, at most 50)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built ($IRONLAB_BIN, default $CARGO_TARGET_DIR/release/ironlab); the
# stock debian image ($IRONLAB_STOCK_IMAGES, default /var/lib/ironlab/stock-images); the microVM
# kit ($IRONLAB_VM_KERNEL_DIR, default /var/lib/ironlab/kernel; images/kernel/build.sh builds it);
# qemu-system-x86_64.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=10
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
            sed -n '2,17p' "$0"
            exit 0
            ;;
        *)
            echo "bench: unknown argument: $1" >&2
            exit 2
            ;;
    esac
done
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 50)); then
    echo "bench: -n must be 1..50" >&2
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
for need in "$IRONLAB" "$STOCK/debian/index.json" "$KIT/vmlinuz" "$KIT/initramfs.cpio" "$QEMU"; do
    if [[ -z $need || ! -e $need ]]; then
        echo "bench: missing ${need:-qemu-system-x86_64} (scripts/setup.sh, scripts/build.sh, images/debian/build.sh, images/kernel/build.sh)" >&2
        exit 1
    fi
done
export IRONLAB_VM_KERNEL_DIR=$KIT

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

now_ns() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'; }
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        i = int(0.9 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR
        printf "%.1f %.1f %.1f %.1f\n", m, v[i], v[1], v[NR] }'
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

cat >"$WORK/vm.yaml" <<'YAML'
kind: playground
name: vm-bench
title: microVM benchmark
playground:
  machines:
    - name: vm
      runtime: microvm
      resources: {cpu: 1, memory: 256MiB}
      drives: [{source: debian, mount: /, size: 2GiB}]
YAML
"$IRONLAB" playground create -f "$WORK/vm.yaml" >/dev/null
start_vm() {
    "$IRONLAB" playground start vm-bench -o json | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n1
}
destroy() {
    local out
    out=$("$IRONLAB" playground destroy "$1" 2>&1) || { echo "bench: destroy $1 failed: $out" >&2; exit 1; }
}

echo "bench: warm-up start (imports the image, builds its drive)"
RUN=$(start_vm)
[[ -n $RUN ]] || { echo "bench: warm-up start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
# QEMU's memory beyond guest RAM, on the warm-up VM once ready: total RSS minus the resident
# part of the guest-RAM mapping (the 256 MiB anonymous mapping in /proc/PID/smaps).
sleep 5
pid=$(cat "$WORK/data/worker/pool/runs/$RUN/vm/qemu.pid")
read -r RSS_KB RAM_KB < <(awk -v want=$((256 * 1024)) '
    /^[0-9a-f]+-[0-9a-f]+ / { inram = 0 }
    /^Size:/ { inram = ($2 == want) }
    /^Rss:/ { total += $2; if (inram) ram += $2 }
    END { print total, ram }' "/proc/$pid/smaps")
OVER_MB=$(awk -v a="$RSS_KB" -v b="$RAM_KB" 'BEGIN { printf "%.1f", (a - b) / 1024 }')
RSS_MB=$(awk -v a="$RSS_KB" 'BEGIN { printf "%.1f", a / 1024 }')
RAM_MB=$(awk -v a="$RAM_KB" 'BEGIN { printf "%.1f", a / 1024 }')
echo "bench: QEMU RSS $RSS_MB MiB, of which guest RAM $RAM_MB MiB: overhead $OVER_MB MiB"
destroy "$RUN"
RUN=""

echo "bench: $N microVM starts (each destroyed)"
: >"$WORK/start.ms"
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    RUN=$(start_vm)
    t1=$(now_ns)
    [[ -n $RUN ]] || { echo "bench: start $i failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    ms "$t0" "$t1" >>"$WORK/start.ms"
    destroy "$RUN"
    RUN=""
    printf '  %2d: start→ready %s ms\n' "$i" "$(tail -n1 "$WORK/start.ms")"
done
# The worker's own split: QEMU up to the kernel banner (start_ms), then to the agent (agent_ms).
cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null | grep 'machine ready' | sort -u | tail -n "$N" | sed -n 's/.*start_ms=\([0-9]*\).*agent_ms=\([0-9]*\).*/\1 \2/p' >"$WORK/split"
awk '{print $1}' "$WORK/split" >"$WORK/qemu_up.ms"
awk '{print $2}' "$WORK/split" >"$WORK/agent.ms"

# --- bare QEMU: same kernel, initramfs (with the agent), root drive; marker after the root mount
DRIVE=$(ls "$WORK"/data/worker/pool/images/*.ext4 | head -n1)
INITRD=$(ls -t "$WORK"/data/worker/pool/vm/initrd-*.img | head -n1)
cp "$DRIVE" "$WORK/bare-root.ext4"
extra=()
if [[ $ACCEL == tcg ]]; then
    accel=(-accel tcg,tb-size=32 -cpu max)
    extra=(tsc_early_khz=2000000 lpj=4000000)
else
    accel=(-accel kvm -cpu host)
fi
bios=()
[[ -f /usr/share/qemu/qboot.rom ]] && bios=(-bios /usr/share/qemu/qboot.rom)
echo "bench: $N bare QEMU boots to the init marker"
: >"$WORK/bare.ms"
for i in $(seq 1 "$N"); do
    con=$WORK/bare-$i.log
    : >"$con"
    t0=$(now_ns)
    "$QEMU" -M microvm,acpi=on "${accel[@]}" -m 256M -smp 1 -nodefaults -no-user-config \
        -display none -no-reboot "${bios[@]}" -kernel "$KIT/vmlinuz" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 reboot=t ${extra[*]} ironlab.mode=bare" \
        -chardev "file,id=con,path=$con" -serial chardev:con \
        -drive "id=root,file=$WORK/bare-root.ext4,format=raw,if=none" -device virtio-blk-device,drive=root &
    qpid=$!
    t1=""
    for _ in $(seq 1 6000); do
        if grep -F IRONLAB-BARE-READY "$con" >/dev/null 2>&1; then
            t1=$(now_ns)
            break
        fi
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.01
    done
    kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
    if [[ -z $t1 ]]; then
        echo "  $i: no marker (hung boot?), skipped"
        continue
    fi
    ms "$t0" "$t1" >>"$WORK/bare.ms"
    printf '  %2d: bare boot %s ms\n' "$i" "$(tail -n1 "$WORK/bare.ms")"
done

# --- report ------------------------------------------------------------------------------------
read -r s_med s_p90 s_min s_max < <(stats "$WORK/start.ms")
read -r q_med q_p90 q_min q_max < <(stats "$WORK/qemu_up.ms")
read -r a_med a_p90 a_min a_max < <(stats "$WORK/agent.ms")
read -r b_med b_p90 b_min b_max < <(stats "$WORK/bare.ms")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }
table=$(
    cat <<TABLE
| measurement (N=$N, accel $ACCEL) | median ms | p90 ms | min ms | max ms | median vs bare |
|---|---:|---:|---:|---:|---:|
| \`ironlab playground start vm-bench\` (debian + systemd microVM, start→agent ready) [$ACCEL] | $s_med | $s_p90 | $s_min | $s_max | $(ratio "$s_med" "$b_med") |
| worker: QEMU started → kernel banner [$ACCEL] | $q_med | $q_p90 | $q_min | $q_max | |
| worker: kernel banner → agent answers [$ACCEL] | $a_med | $a_p90 | $a_min | $a_max | |
| bare \`qemu-system-x86_64\`, same kernel/initramfs/drive → root mounted marker [$ACCEL] | $b_med | $b_p90 | $b_min | $b_max | 1.0x |

QEMU memory once the guest is ready [$ACCEL]: RSS $RSS_MB MiB, guest RAM resident $RAM_MB MiB, overhead beyond guest RAM **$OVER_MB MiB** (TCG translation cache capped at 32 MiB).
TABLE
)
echo
echo "$table"
echo
echo "targets: overhead over bare QEMU ≤ 20 %; QEMU overhead < 40 MiB beyond guest RAM"

if ((RECORD)); then
    {
        echo
        echo "## microVMs — $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/vm.sh -n $N --record\`"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
