#!/usr/bin/env bash
# Benchmark, all in one invocation, for both guest kits under the same accelerator: the stock
# kit (Debian's cloud kernel + modules drive) and the lean kit (images/kernel/lean.sh). For each:
# start-to-agent-ready of a microVM playground (the stock debian image, systemd as PID 1,
# 256 MiB, 1 vCPU; median of N) next to a bare `qemu-system-x86_64` boot of the same kernel,
# initramfs and root drive to an init marker (IRONLAB-BARE-READY, printed once the root drive is
# mounted), and QEMU's memory beyond the guest's RAM, both as RSS and as private memory
# (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup: what one more VM really costs).
# Ratios: each path against its bare boot, and stock against lean. Then a third pass with boot
# templates on (the lean kit): after the warm-up start the worker builds the shape's template (a
# RAM snapshot of the guest booted to systemd), and the N starts restore from it; their start→
# ready is set against the lean bare boot, and the memory is a restored VM's. (The first two
# passes run with IRONLAB_VM_TEMPLATES=0: they measure boots.) The accelerator the worker's
# probe chose is named next to every figure.
#
#   sudo bench/vm.sh [-n N] [--record] [--stock-kit DIR] [--lean-kit DIR]
#
#   -n N             iterations (default 10, at most 50)
#   --record         append the results table to bench/RESULTS.md
#   --stock-kit DIR  default $IRONLAB_VM_STOCK_KIT or /var/lib/ironlab/kernel (build.sh)
#   --lean-kit DIR   default $IRONLAB_VM_LEAN_KIT or /var/lib/ironlab/kernel-lean (lean.sh)
#
# Needs: root; `ironlab` built ($IRONLAB_BIN, default $CARGO_TARGET_DIR/release/ironlab); the
# stock debian image ($IRONLAB_STOCK_IMAGES, default /var/lib/ironlab/stock-images); both kits;
# qemu-system-x86_64. IRONLAB_VM_TCG_TB_MIB sets the TCG translation cache (worker and bare
# boots; default 32). Internally it runs itself once per kit (`--one LABEL KIT OUT_DIR`), each
# with its own temporary platform.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=10
RECORD=0
ONE=()
STOCK_KIT=${IRONLAB_VM_STOCK_KIT:-/var/lib/ironlab/kernel}
LEAN_KIT=${IRONLAB_VM_LEAN_KIT:-/var/lib/ironlab/kernel-lean}
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
        --stock-kit)
            STOCK_KIT=$2
            shift 2
            ;;
        --lean-kit)
            LEAN_KIT=$2
            shift 2
            ;;
        --one)
            ONE=("$2" "$3" "$4")
            shift 4
            ;;
        -h | --help)
            sed -n '2,27p' "$0"
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
QEMU=$(command -v qemu-system-x86_64 || true)

stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        i = int(0.9 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR
        printf "%.1f %.1f %.1f %.1f\n", m, v[i], v[1], v[NR] }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

# --- one kit: its own platform, N starts, N bare boots, memory; samples into OUT_DIR ----------
if ((${#ONE[@]})); then
    LABEL=${ONE[0]} KIT=${ONE[1]} OUT=${ONE[2]}
    export IRONLAB_VM_KERNEL_DIR=$KIT
    # Boot templates only for the `restore` pass: the others measure boots.
    if [[ $LABEL == restore ]]; then
        export IRONLAB_VM_TEMPLATES=1
    else
        export IRONLAB_VM_TEMPLATES=0
    fi
    # shellcheck source=bench/lib.sh
    source "$REPO_ROOT/bench/lib.sh"
    now_ns() { date +%s%N; }
    ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'; }

    bench_up
    ACCEL=""
    for _ in $(seq 1 600); do
        ACCEL=$(cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null |
            sed -n 's/.*microVM runtime ready accel="\{0,1\}\([a-z]*\).*/\1/p' | tail -n1)
        [[ -n $ACCEL ]] && break
        sleep 0.1
    done
    if [[ -z $ACCEL ]]; then
        echo "bench[$LABEL]: the worker offers no microVMs:" >&2
        tail -n 20 "$WORK/up.log" >&2
        exit 1
    fi
    echo "$ACCEL" >"$OUT/accel"
    cat "$KIT/VERSION" >"$OUT/release"
    echo "bench[$LABEL]: kit $KIT (kernel $(cat "$KIT/VERSION")), accelerator $ACCEL"

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
    # The control plane learns the worker's runtimes from its next status report.
    for try in $(seq 1 60); do
        "$IRONLAB" playground create -f "$WORK/vm.yaml" >/dev/null 2>"$WORK/create.err" && break
        ((try < 60)) || { cat "$WORK/create.err" >&2; exit 1; }
        sleep 0.5
    done
    start_vm() {
        "$IRONLAB" playground start vm-bench -o json | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | head -n1
    }
    destroy() {
        local out
        out=$("$IRONLAB" playground destroy "$1" 2>&1) || { echo "bench: destroy $1 failed: $out" >&2; exit 1; }
    }

    echo "bench[$LABEL]: warm-up start (imports the image, builds its drive)"
    # (Until the worker's first status report the control plane may not offer microVMs yet.)
    for try in $(seq 1 30); do
        RUN=$(start_vm 2>"$WORK/start.err") && [[ -n $RUN ]] && break
        grep -F "not available on this platform" "$WORK/start.err" >/dev/null && ((try < 30)) || break
        sleep 1
    done
    [[ -n $RUN ]] || { echo "bench[$LABEL]: warm-up start failed" >&2; cat "$WORK/start.err" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    if [[ $LABEL == restore ]]; then
        # The worker builds the shape's template once the warm-up VM is up; then a start
        # restores, and the memory below is that of a restored VM.
        echo "bench[$LABEL]: waiting for the boot template"
        for _ in $(seq 1 1200); do
            ls "$WORK"/data/worker/pool/vm/tpl/*/done >/dev/null 2>&1 && break
            sleep 0.5
        done
        ls "$WORK"/data/worker/pool/vm/tpl/*/done >/dev/null 2>&1 || {
            echo "bench[$LABEL]: no boot template after 600 s" >&2
            grep -i template "$WORK/up.log" >&2
            exit 1
        }
        destroy "$RUN"
        RUN=$(start_vm)
        [[ -n $RUN ]] || { echo "bench[$LABEL]: restore start failed" >&2; exit 1; }
    fi
    # QEMU's memory beyond guest RAM, on the warm-up VM 10 s after ready: RSS and private memory
    # minus the resident part of the guest-RAM mapping (the 256 MiB anonymous, private mapping).
    sleep 10
    pid=$(cat "$WORK/data/worker/pool/runs/$RUN/vm/qemu.pid")
    read -r RSS_KB RAM_KB < <(awk -v want=$((256 * 1024)) '
        /^[0-9a-f]+-[0-9a-f]+ / { inram = 0 }
        /^Size:/ { inram = ($2 == want) }
        /^Rss:/ { total += $2; if (inram) ram += $2 }
        END { print total, ram }' "/proc/$pid/smaps")
    PRIV_KB=$(awk '/^Private_(Clean|Dirty):/ { p += $2 } END { print p }' "/proc/$pid/smaps_rollup")
    ANON_KB=$(awk '/^Private_Dirty:/ { p += $2 } END { print p }' "/proc/$pid/smaps_rollup")
    echo "$RSS_KB $RAM_KB $PRIV_KB $ANON_KB" >"$OUT/mem"
    echo "bench[$LABEL]: QEMU RSS $((RSS_KB / 1024)) MiB, private $((PRIV_KB / 1024)) MiB (dirty $((ANON_KB / 1024)) MiB), guest RAM resident $((RAM_KB / 1024)) MiB"
    destroy "$RUN"
    RUN=""

    echo "bench[$LABEL]: $N microVM starts (each destroyed)"
    : >"$OUT/start.ms"
    for i in $(seq 1 "$N"); do
        t0=$(now_ns)
        RUN=$(start_vm)
        t1=$(now_ns)
        [[ -n $RUN ]] || { echo "bench[$LABEL]: start $i failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
        ms "$t0" "$t1" >>"$OUT/start.ms"
        destroy "$RUN"
        RUN=""
        printf '  %2d: start→ready %s ms\n' "$i" "$(tail -n1 "$OUT/start.ms")"
    done
    # The worker's own split: QEMU up to the kernel banner (start_ms), then to the agent (agent_ms).
    cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null | grep 'machine ready' | sort -u | tail -n "$N" |
        sed -n 's/.*start_ms=\([0-9]*\).*agent_ms=\([0-9]*\).*/\1 \2/p' >"$WORK/split"
    awk '{print $1}' "$WORK/split" >"$OUT/qemu_up.ms"
    awk '{print $2}' "$WORK/split" >"$OUT/agent.ms"
    if [[ $LABEL == restore ]]; then
        # The worker's restore: drive, QEMU + RAM, agent, configure (one line per start).
        cat "$WORK/up.log" "$WORK/data/worker.log" 2>/dev/null | grep 'restored from the boot template' |
            sort -u | tail -n "$N" | sed -n 's/.* ms=\([0-9]*\) steps=\(.*\)/\1 \2/p' >"$WORK/restores"
        awk '{print $1}' "$WORK/restores" >"$OUT/restore.ms"
        tail -n 1 "$WORK/restores" | cut -d' ' -f2- >"$OUT/restore.steps"
        [[ $(wc -l <"$OUT/restore.ms") -eq $N ]] || { echo "bench[$LABEL]: only $(wc -l <"$OUT/restore.ms") of $N starts were restores" >&2; exit 1; }
        exit 0
    fi

    # Bare QEMU: same kernel, initramfs (with the agent), root drive; marker after the root mount.
    DRIVE=$(ls "$WORK"/data/worker/pool/images/*.ext4 | head -n1)
    INITRD=$(ls -t "$WORK"/data/worker/pool/vm/initrd-*.img | head -n1)
    cp "$DRIVE" "$WORK/bare-root.ext4"
    extra=()
    if [[ $ACCEL == tcg ]]; then
        accel=(-accel "tcg,tb-size=${IRONLAB_VM_TCG_TB_MIB:-32}" -cpu max)
        extra=(tsc_early_khz=2000000 lpj=4000000)
    else
        accel=(-accel kvm -cpu host)
    fi
    bios=()
    [[ -f /usr/share/qemu/qboot.rom ]] && bios=(-bios /usr/share/qemu/qboot.rom)
    echo "bench[$LABEL]: $N bare QEMU boots to the init marker"
    : >"$OUT/bare.ms"
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
        ms "$t0" "$t1" >>"$OUT/bare.ms"
        printf '  %2d: bare boot %s ms\n' "$i" "$(tail -n1 "$OUT/bare.ms")"
    done
    exit 0
fi

# --- both kits, one after the other, then the table ------------------------------------------
for need in "$IRONLAB" "$STOCK/debian/index.json" "$STOCK_KIT/vmlinuz" "$STOCK_KIT/initramfs.cpio" \
    "$LEAN_KIT/vmlinuz" "$LEAN_KIT/initramfs.cpio" "$QEMU"; do
    if [[ -z $need || ! -e $need ]]; then
        echo "bench: missing ${need:-qemu-system-x86_64} (scripts/setup.sh, scripts/build.sh, images/debian/build.sh, images/kernel/build.sh, images/kernel/lean.sh)" >&2
        exit 1
    fi
done
RES=$(mktemp -d /var/tmp/ironlab-bench-vm.XXXXXX)
trap 'rm -rf "$RES"' EXIT
for kit in stock lean restore; do
    mkdir -p "$RES/$kit"
    dir=$STOCK_KIT
    [[ $kit != stock ]] && dir=$LEAN_KIT
    "$0" -n "$N" --one "$kit" "$dir" "$RES/$kit"
done

row() { # LABEL FILE [REF_MEDIAN]
    local med p90 min max
    read -r med p90 min max < <(stats "$2")
    printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$med" "$p90" "$min" "$max" "${3:+$(ratio "$med" "$3")}"
}
median() { stats "$1" | cut -d' ' -f1; }
mem_line() { # KIT
    local rss ram priv anon
    read -r rss ram priv anon <"$RES/$1/mem"
    awk -v r="$rss" -v g="$ram" -v p="$priv" -v d="$anon" -v k="$1" -v a="$(cat "$RES/$1/accel")" 'BEGIN {
        name = (k == "restore") ? "lean kit, restored from a template" : k " kit"
        printf "| %s [%s] | %.1f | %.1f | %.1f | %.1f | **%.1f** |\n", name, a, r / 1024, g / 1024,
            (r - g) / 1024, (p - g) / 1024, (d - g) / 1024 }'
}
A_STOCK=$(cat "$RES/stock/accel")
A_LEAN=$(cat "$RES/lean/accel")
S_STOCK=$(median "$RES/stock/start.ms")
S_LEAN=$(median "$RES/lean/start.ms")
B_STOCK=$(median "$RES/stock/bare.ms")
B_LEAN=$(median "$RES/lean/bare.ms")
table=$(
    cat <<TABLE
| measurement (N=$N) | median ms | p90 ms | min ms | max ms | median vs bare |
|---|---:|---:|---:|---:|---:|
$(row "stock kit ($(cat "$RES/stock/release")): \`playground start\` debian + systemd, start→agent ready [$A_STOCK]" "$RES/stock/start.ms" "$B_STOCK")
$(row "stock kit: worker's QEMU started → kernel banner [$A_STOCK]" "$RES/stock/qemu_up.ms")
$(row "stock kit: worker's kernel banner → agent answers [$A_STOCK]" "$RES/stock/agent.ms")
$(row "stock kit: bare \`qemu-system-x86_64\` → root mounted marker [$A_STOCK]" "$RES/stock/bare.ms" "$B_STOCK")
$(row "lean kit ($(cat "$RES/lean/release")): \`playground start\` debian + systemd, start→agent ready [$A_LEAN]" "$RES/lean/start.ms" "$B_LEAN")
$(row "lean kit: worker's QEMU started → kernel banner [$A_LEAN]" "$RES/lean/qemu_up.ms")
$(row "lean kit: worker's kernel banner → agent answers [$A_LEAN]" "$RES/lean/agent.ms")
$(row "lean kit: bare \`qemu-system-x86_64\` → root mounted marker [$A_LEAN]" "$RES/lean/bare.ms" "$B_LEAN")
$(row "lean kit, restored from a boot template (debian booted to systemd running): \`playground start\` → agent ready and configured [$(cat "$RES/restore/accel")]" "$RES/restore/start.ms" "$B_LEAN")
$(row "restored: the worker's restore (drive, QEMU + RAM, agent, configure) [$(cat "$RES/restore/accel")]" "$RES/restore/restore.ms")

Lean vs stock, start→agent ready: **$(ratio "$S_STOCK" "$S_LEAN") faster** [$A_LEAN]; bare boot to the marker: $(ratio "$B_STOCK" "$B_LEAN") faster [$A_LEAN]. Restored vs the lean bare boot: **$(ratio "$(median "$RES/restore/start.ms")" "$B_LEAN")** [$(cat "$RES/restore/accel")]; one restore's steps: $(cat "$RES/restore/restore.steps").

| QEMU memory, guest ready + 10 s (256 MiB guest, TCG cache ${IRONLAB_VM_TCG_TB_MIB:-32} MiB for boots, half that for restored VMs) | RSS MiB | guest RAM resident MiB | RSS beyond guest RAM MiB | private (clean + dirty) beyond guest RAM MiB | private dirty (anonymous) beyond guest RAM MiB |
|---|---:|---:|---:|---:|---:|
$(mem_line stock)
$(mem_line lean)
$(mem_line restore)
TABLE
)
echo
echo "$table"
echo
echo "targets: start→ready within 20 % of bare QEMU; lean ≥ 2x faster than stock; < 40 MiB beyond guest RAM"

if ((RECORD)); then
    {
        echo
        echo "## microVMs, stock vs lean kernel — $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/vm.sh -n $N --record\` (stock kit $STOCK_KIT, lean kit $LEAN_KIT, TCG translation cache ${IRONLAB_VM_TCG_TB_MIB:-32} MiB)"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
