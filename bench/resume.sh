#!/usr/bin/env bash
# Benchmark: restarting a stopped microVM that kept its RAM (resume) against one that boots
# again (the same platform with IRONLAB_VM_SUSPEND=0), in the same run. A debian microVM
# (systemd, 256 MiB, the lean kit) is started once per mode and then stopped and restarted N
# times. Measured by the CLI: `playground stop` (stop → stopped) and `playground restart`
# (restart → running), plus the first command after the restart (`ironlab ssh RUN -- true`,
# which waits for systemd's manager in a booted guest). The worker's own figures (suspend time
# and snapshot size) come from its log.
#
#   sudo bench/resume.sh [-n N] [--record] [--kit DIR]
#
#   -n N        stop/restart cycles per mode (default 5)
#   --record    append the results table to bench/RESULTS.md
#   --kit DIR   the microVM kit (default $IRONLAB_VM_KERNEL_DIR or /var/cache/ironlab-ci/kernel-lean)
#
# Needs: root; `ironlab` built (scripts/build.sh; $IRONLAB_BIN overrides); the stock debian image
# (images/debian/build.sh; $IRONLAB_STOCK_IMAGES); qemu-system-x86_64.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=5
RECORD=0
KIT=${IRONLAB_VM_KERNEL_DIR:-/var/cache/ironlab-ci/kernel-lean}
ONE=""
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
        --kit)
            KIT=$2
            shift 2
            ;;
        --one)
            ONE=$2
            OUT=$3
            shift 3
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
IRONLAB=${IRONLAB_BIN:-$CARGO_TARGET_DIR/release/ironlab}
STOCK=${IRONLAB_STOCK_IMAGES:-/var/lib/ironlab/stock-images}
for need in "$IRONLAB" "$STOCK/debian/index.json" "$KIT/vmlinuz"; do
    if [[ ! -e $need ]]; then
        echo "bench: missing $need (scripts/build.sh, images/debian/build.sh, images/kernel/lean.sh)" >&2
        exit 1
    fi
done

if [[ -n $ONE ]]; then
    # One mode on a platform of its own: `resume` (the default) or `boot` (suspend off).
    export IRONLAB_VM_KERNEL_DIR=$KIT IRONLAB_VM_TEMPLATES=0
    if [[ $ONE == boot ]]; then export IRONLAB_VM_SUSPEND=0; else export IRONLAB_VM_SUSPEND=1; fi
    # shellcheck source=bench/lib.sh
    source "$REPO_ROOT/bench/lib.sh"
    now_ns() { date +%s%N; }
    ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'; }
    bench_up
    cat >"$WORK/vm.yaml" <<'YAML'
kind: playground
name: vm-resume
title: microVM resume benchmark
playground:
  machines:
    - name: vm
      runtime: microvm
      resources: {cpu: 1, memory: 256MiB}
      drives: [{source: debian, mount: /, size: 2GiB}]
YAML
    "$IRONLAB" playground create -f "$WORK/vm.yaml" >/dev/null
    RUN=$("$IRONLAB" playground start vm-resume -o json | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n1)
    [[ -n $RUN ]] || { echo "bench[$ONE]: start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    # Settled: systemd done booting, so every cycle stops the same kind of guest.
    "$IRONLAB" ssh "$RUN" -- sh -c 'systemctl is-system-running --wait >/dev/null 2>&1; true'
    : >"$OUT/stop.ms"
    : >"$OUT/restart.ms"
    : >"$OUT/first.ms"
    for i in $(seq 1 "$N"); do
        "$IRONLAB" ssh "$RUN" -- sh -c "echo $i > /dev/shm/cycle"
        t0=$(now_ns)
        "$IRONLAB" playground stop "$RUN" >/dev/null
        t1=$(now_ns)
        "$IRONLAB" playground restart "$RUN" >/dev/null
        t2=$(now_ns)
        "$IRONLAB" ssh "$RUN" -- true
        t3=$(now_ns)
        ms "$t0" "$t1" >>"$OUT/stop.ms"
        ms "$t1" "$t2" >>"$OUT/restart.ms"
        ms "$t2" "$t3" >>"$OUT/first.ms"
        # Resumed: the tmpfs file is there; booted: it is gone.
        kept=$("$IRONLAB" ssh "$RUN" -- sh -c 'cat /dev/shm/cycle 2>/dev/null || echo none')
        echo "$kept" >>"$OUT/kept"
        echo "bench[$ONE]: cycle $i: stop $(tail -n1 "$OUT/stop.ms") ms, restart $(tail -n1 "$OUT/restart.ms") ms, first command $(tail -n1 "$OUT/first.ms") ms, /dev/shm kept: $kept"
    done
    cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null | grep 'stopped keeping its RAM' |
        sed -n 's/.* ms=\([0-9]*\) mib=\([0-9]*\).*/\1 \2/p' >"$OUT/suspend" || true
    exit 0
fi

RES=$(mktemp -d /var/tmp/ironlab-bench-resume.XXXXXX)
trap 'rm -rf "$RES"' EXIT
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for mode in resume boot; do
    mkdir -p "$RES/$mode"
    "$0" -n "$N" --kit "$KIT" --one "$mode" "$RES/$mode"
done

stats() { sort -n "$1" | awk '{ v[NR] = $1 } END { printf "%.0f %.0f %.0f", v[int((NR + 1) / 2)], v[1], v[NR] }'; }
median() { stats "$1" | cut -d' ' -f1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
row() { # LABEL FILE
    read -r med lo hi < <(stats "$2")
    echo "| $1 | $med | $lo | $hi |"
}
kept_of() { sort -u "$1" | tr '\n' ' ' | sed 's/ $//'; }
susp=$(awk '{ ms += $1; mib += $2; n++ } END { if (n) printf "%.0f ms, %.0f MiB", ms / n, mib / n; else print "-" }' "$RES/resume/suspend")
table=$(
    cat <<TABLE
| debian microVM (systemd, 256 MiB, lean kit, TCG), N=$N per mode | median ms | min ms | max ms |
|---|---:|---:|---:|
$(row "RAM kept: \`playground stop\`" "$RES/resume/stop.ms")
$(row "RAM kept: \`playground restart\` → running (resumed)" "$RES/resume/restart.ms")
$(row "RAM kept: first \`ironlab ssh RUN -- true\` after the restart" "$RES/resume/first.ms")
$(row "powered off (IRONLAB_VM_SUSPEND=0): \`playground stop\`" "$RES/boot/stop.ms")
$(row "powered off: \`playground restart\` → running (booted)" "$RES/boot/restart.ms")
$(row "powered off: first \`ironlab ssh RUN -- true\` after the restart" "$RES/boot/first.ms")

Resumed vs booted: restart **$(ratio "$(median "$RES/resume/restart.ms")" "$(median "$RES/boot/restart.ms")")**, restart + first command **$(ratio "$(($(median "$RES/resume/restart.ms") + $(median "$RES/resume/first.ms")))" "$(($(median "$RES/boot/restart.ms") + $(median "$RES/boot/first.ms")))")**, stop $(ratio "$(median "$RES/resume/stop.ms")" "$(median "$RES/boot/stop.ms")"). The worker's suspend (mean): $susp. A \`/dev/shm\` file written before each stop read back after the restart: resumed \`$(kept_of "$RES/resume/kept")\`, booted \`$(kept_of "$RES/boot/kept")\`.
TABLE
)
echo
echo "$table"
if ((RECORD)); then
    {
        echo
        echo "## microVM restart: RAM kept vs booted — $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, load at start $LOAD_START, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/resume.sh -n $N --record\` (kit $KIT)"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
