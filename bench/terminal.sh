#!/usr/bin/env bash
# Benchmark: the terminal path. Keystroke echo round trip (median, p99 over N keystrokes) and
# `cat` throughput of a 100 MiB text file through the browser path (WebSocket client speaking
# the relay protocol, token from the control plane → worker relay → agent gRPC → PTY in a
# machine of the stock `debian` playground), next to the same over the agent's gRPC directly and
# over a local PTY on the host; plus the worker's RSS before, during and after the `cat` and a
# `yes` flood read slowly.
#
#   sudo bench/terminal.sh [-n KEYS] [--mib MIB] [--rounds R] [--record]
#
#   -n KEYS     keystrokes per path (default 1000)
#   --mib MIB   size of the file `cat` prints (default 100)
#   --rounds R  `cat` rounds, each through all three paths in turn; the median round is
#               reported, with the slowest and fastest (default 5)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built (scripts/build.sh; $IRONLAB_BIN overrides); the stock debian image
# (images/debian/build.sh). Builds the client (`cargo build --release -p ironlab-worker
# --example terminal_bench`) unless $TERMINAL_BENCH_BIN points to it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

KEYS=1000
MIB=100
ROUNDS=5
RECORD=0
while (($#)); do
    case $1 in
        -n)
            KEYS=$2
            shift 2
            ;;
        --mib)
            MIB=$2
            shift 2
            ;;
        --rounds)
            ROUNDS=$2
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
if ! [[ $KEYS =~ ^[0-9]+$ ]] || ((KEYS < 10 || KEYS > 100000)); then
    echo "bench: -n must be 10..100000" >&2
    exit 2
fi
if ! [[ $MIB =~ ^[0-9]+$ ]] || ((MIB < 1 || MIB > 2048)); then
    echo "bench: --mib must be 1..2048" >&2
    exit 2
fi
if ! [[ $ROUNDS =~ ^[0-9]+$ ]] || ((ROUNDS < 1 || ROUNDS > 100)); then
    echo "bench: --rounds must be 1..100" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench: must run as root" >&2
    exit 1
fi

IRONLAB=${IRONLAB_BIN:-$CARGO_TARGET_DIR/release/ironlab}
STOCK=${IRONLAB_STOCK_IMAGES:-/var/lib/ironlab/stock-images}
for need in "$IRONLAB" "$STOCK/debian/index.json"; do
    if [[ ! -e $need ]]; then
        echo "bench: missing $need (scripts/build.sh, images/debian/build.sh)" >&2
        exit 1
    fi
done
CLIENT=${TERMINAL_BENCH_BIN:-}
if [[ -z $CLIENT ]]; then
    echo "bench: building the client (cargo build --release -p ironlab-worker --example terminal_bench)"
    cargo build --quiet --release -p ironlab-worker --example terminal_bench
    CLIENT=$CARGO_TARGET_DIR/release/examples/terminal_bench
fi

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
bench_up

# The worker is `up`'s child process.
WORKER_PID=""
for _ in $(seq 1 100); do
    for c in $(cat "/proc/$UP_PID/task/"*/children 2>/dev/null); do
        if tr '\0' ' ' <"/proc/$c/cmdline" 2>/dev/null | grep -q ' worker'; then WORKER_PID=$c; fi
    done
    [[ -n $WORKER_PID ]] && break
    sleep 0.1
done
[[ -n $WORKER_PID ]] || { echo "bench: cannot find the worker process of ironlab up ($UP_PID)" >&2; exit 1; }

echo "bench: starting the debian playground"
RUN=$(start_run)
[[ -n $RUN ]] || { echo "bench: start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
MACHINE=$(curl -fsS -H "Authorization: Bearer $IRONLAB_TOKEN" "$IRONLAB_SERVER/api/v1/runs/$RUN" |
    sed -n 's/.*"machines"[[:space:]]*:[[:space:]]*\["\([^"]*\)".*/\1/p')
SOCKET=$WORK/data/worker/pool/runs/$RUN/$MACHINE/agent/agent.sock
[[ -S $SOCKET ]] || { echo "bench: no agent socket at $SOCKET" >&2; exit 1; }
echo "bench: run $RUN, machine $MACHINE, worker pid $WORKER_PID"

"$CLIENT" --server "$IRONLAB_SERVER" --token "$IRONLAB_TOKEN" --run "$RUN" --machine "$MACHINE" \
    --worker-pid "$WORKER_PID" --agent-socket "$SOCKET" --keys "$KEYS" --mib "$MIB" \
    --rounds "$ROUNDS" \
    --local-dir "$WORK" >"$WORK/result.env"
declare -A R
while IFS='=' read -r k v; do R[$k]=$v; done <"$WORK/result.env"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }
per() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.0f", a / b; else print "-" }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
table=$(
    cat <<TABLE
| keystroke echo (N=$KEYS) | median ms | p99 ms | min ms | max ms | median vs direct agent | median vs local PTY |
|---|---:|---:|---:|---:|---:|---:|
| WebSocket → relay → agent → PTY (browser path) | ${R[echo_relay_median_ms]} | ${R[echo_relay_p99_ms]} | ${R[echo_relay_min_ms]} | ${R[echo_relay_max_ms]} | $(ratio "${R[echo_relay_median_ms]}" "${R[echo_direct_median_ms]}") | $(ratio "${R[echo_relay_median_ms]}" "${R[echo_local_median_ms]}") |
| agent gRPC directly → PTY | ${R[echo_direct_median_ms]} | ${R[echo_direct_p99_ms]} | ${R[echo_direct_min_ms]} | ${R[echo_direct_max_ms]} | 1.0x | $(ratio "${R[echo_direct_median_ms]}" "${R[echo_local_median_ms]}") |
| local PTY on the host | ${R[echo_local_median_ms]} | ${R[echo_local_p99_ms]} | ${R[echo_local_min_ms]} | ${R[echo_local_max_ms]} | - | 1.0x |

| \`cat\` of a $MIB MiB text file on a PTY (median of $ROUNDS rounds) | seconds | MiB/s | slowest–fastest MiB/s | vs direct agent | vs local PTY | avg bytes per frame/message/read |
|---|---:|---:|---:|---:|---:|---:|
| WebSocket → relay → agent → PTY (browser path) | ${R[cat_relay_s]} | ${R[cat_relay_mibps]} | ${R[cat_relay_mibps_min]}–${R[cat_relay_mibps_max]} | $(ratio "${R[cat_relay_mibps]}" "${R[cat_direct_mibps]}") | $(ratio "${R[cat_relay_mibps]}" "${R[cat_local_mibps]}") | $(per "${R[cat_relay_wire_bytes]}" "${R[cat_relay_chunks]}") |
| agent gRPC directly → PTY | ${R[cat_direct_s]} | ${R[cat_direct_mibps]} | ${R[cat_direct_mibps_min]}–${R[cat_direct_mibps_max]} | 1.0x | $(ratio "${R[cat_direct_mibps]}" "${R[cat_local_mibps]}") | $(per "${R[cat_direct_wire_bytes]}" "${R[cat_direct_chunks]}") |
| local PTY on the host | ${R[cat_local_s]} | ${R[cat_local_mibps]} | ${R[cat_local_mibps_min]}–${R[cat_local_mibps_max]} | - | 1.0x | $(per "${R[cat_local_wire_bytes]}" "${R[cat_local_chunks]}") |

| worker RSS (MiB) | start | before \`cat\` | peak during the relay \`cat\`s | after the \`cat\`s | peak during 3 s slow-read \`yes\` | end |
|---|---:|---:|---:|---:|---:|---:|
| \`ironlab worker\` (pid of \`up\`'s child) | $(mib "${R[rss_start_kib]}") | $(mib "${R[rss_before_cat_kib]}") | $(mib "${R[rss_peak_cat_kib]}") | $(mib "${R[rss_after_cat_kib]}") | $(mib "${R[rss_peak_yes_kib]}") | $(mib "${R[rss_end_kib]}") |
TABLE
)
echo
echo "$table"
echo
echo "targets: echo median < 5 ms, cat >= 50 MiB/s, worker memory flat during the flood"

if ((RECORD)); then
    {
        echo
        echo "## Terminal path: $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), load at start $LOAD_START, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/terminal.sh -n $KEYS --mib $MIB --rounds $ROUNDS --record\`"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
