#!/usr/bin/env bash
# Benchmark: runs' networks, without containers (crates/ironlab-worker/examples/net_bench.rs).
#
# 1. Setup and teardown time of the network of a 5-machine, 2-network run (namespaces, bridges,
#    veth pairs, uplink, nftables, dnsmasq, tc: what the worker does before the first machine
#    starts and after the last one is gone), median/min/max of N (target < 100 ms each way).
# 2. TCP throughput between two machines of one run (veth → bridge → veth) next to a bare veth
#    pair between the same two namespaces.
#
#   sudo bench/net.sh [-n N] [--seconds S] [--record]
#
#   -n N          setup/teardown repetitions (default 20)
#   --seconds S   duration of each throughput measurement (default 3)
#   --record      append the results to bench/RESULTS.md
#
# Uplinks lead to a namespace the benchmark creates, never to the host's route. Builds the
# example (debug: the time goes to the kernel and host tools) unless $NET_BENCH_BIN points to it.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

N=20
SECONDS_EACH=3
RECORD=0
while (($#)); do
    case $1 in
        -n)
            N=$2
            shift 2
            ;;
        --seconds)
            SECONDS_EACH=$2
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
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 1000)); then
    echo "bench: -n must be 1..1000" >&2
    exit 2
fi
if ! [[ $SECONDS_EACH =~ ^[0-9]+$ ]] || ((SECONDS_EACH < 1 || SECONDS_EACH > 60)); then
    echo "bench: --seconds must be 1..60" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench: must run as root" >&2
    exit 1
fi
BIN=${NET_BENCH_BIN:-}
if [[ -z $BIN ]]; then
    echo "bench: building the benchmark (cargo build -p ironlab-worker --example net_bench)"
    cargo build --quiet -p ironlab-worker --example net_bench
    BIN=$CARGO_TARGET_DIR/debug/examples/net_bench
fi

load_before=$(cut -d' ' -f1 /proc/loadavg)
table=$("$BIN" --iterations "$N" --seconds "$SECONDS_EACH")
load_after=$(cut -d' ' -f1 /proc/loadavg)
echo
echo "$table"
echo
echo "load average (1 min) before/after: $load_before / $load_after; target: setup and teardown < 100 ms"

if ((RECORD)); then
    {
        echo
        echo "## Networks: $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "\`sudo bench/net.sh -n $N --seconds $SECONDS_EACH --record\`; load average (1 min) before/after: $load_before / $load_after."
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
