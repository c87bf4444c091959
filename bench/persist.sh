#!/usr/bin/env bash
# Benchmark: persistent playgrounds. In one invocation, on a 3-machine debian playground:
#   - clone of a stopped run: N clones (CLI round trip, and the worker's own time from its log)
#     and the pool's used space per clone;
#   - restart of a stopped run to ready, next to a fresh start of the same playground
#     (alternating, R times each);
#   - the off-host snapshot upload of a stopped run's changed data (64 MiB of new random data per
#     machine) to the worker's default (local directory) snapshot store, from the worker's log.
#
#   sudo bench/persist.sh [-n N] [-r R] [--record]
#
#   -n N        clones (default 20, at most 200)
#   -r R        restart/start pairs (default 5, at most 50)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built ($IRONLAB_BIN overrides, default $CARGO_TARGET_DIR/release/ironlab);
# the stock debian image under $IRONLAB_STOCK_IMAGES (default /var/lib/ironlab/stock-images).
# Targets (issue 7): clone median < 100 ms and < 1 MiB of space; restart ≤ 1.2x a fresh start;
# snapshot upload ≥ 200 MiB/s of changed data. Every stop is followed by the upload of the run's
# drives in the background: the script waits for it (untimed) so it never overlaps a measurement.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=20
R=5
RECORD=0
while (($#)); do
    case $1 in
        -n)
            N=$2
            shift 2
            ;;
        -r)
            R=$2
            shift 2
            ;;
        --record)
            RECORD=1
            shift
            ;;
        -h | --help)
            sed -n '2,22p' "$0"
            exit 0
            ;;
        *)
            echo "bench: unknown argument: $1" >&2
            exit 2
            ;;
    esac
done
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 200)) || ! [[ $R =~ ^[0-9]+$ ]] || ((R < 1 || R > 50)); then
    echo "bench: -n must be 1..200, -r 1..50" >&2
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

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

now_ns() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'; }
# stats FILE → "median p90 min max"
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        i = int(0.9 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR
        printf "%.1f %.1f %.1f %.1f\n", m, v[i], v[1], v[NR] }'
}
pool_used() {
    sync
    df -B1 --output=used "$WORK/data/worker/pool" | tail -n1 | tr -d ' '
}
run_id_of() { sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' | awk 'NR == 1'; }
RUNS=()
bench_persist_cleanup() {
    set +e
    for r in "${RUNS[@]}"; do "$IRONLAB" playground destroy --no-wait "$r" >/dev/null 2>&1; done
    for _ in $(seq 1 100); do
        [[ -z $(ls -A "$WORK/data/worker/pool/runs" 2>/dev/null) ]] && break
        sleep 0.2
    done
    bench_cleanup
}
trap bench_persist_cleanup EXIT

bench_up
WORKER_URL=http://127.0.0.1:$((${IRONLAB_SERVER##*:} + 1))
# wait_uploaded RUN: until the worker reports the stopped run's snapshot uploaded (≤ 10 min).
wait_uploaded() {
    local body
    for _ in $(seq 1 3000); do
        body=$(curl -fsS -H "Authorization: Bearer $(cat "$WORK/data/worker-token")" "$WORKER_URL/v1/runs/$1" 2>/dev/null || true)
        if [[ $body == *'"state":"uploaded"'* ]]; then
            return 0
        fi
        sleep 0.2
    done
    echo "bench: the snapshot of run $1 was not uploaded within 10 min: $body" >&2
    exit 1
}
cat >"$WORK/trio.yaml" <<'YAML'
kind: playground
name: bench-trio
title: Three debian machines
playground:
  machines:
    - {name: m1, resources: {cpu: 1, memory: 256MiB}, drives: [{source: debian, mount: /, size: 2GiB}], users: [{name: laborant, default: true}]}
    - {name: m2, resources: {cpu: 1, memory: 256MiB}, drives: [{source: debian, mount: /, size: 2GiB}], users: [{name: laborant, default: true}]}
    - {name: m3, resources: {cpu: 1, memory: 256MiB}, drives: [{source: debian, mount: /, size: 2GiB}], users: [{name: laborant, default: true}]}
YAML
"$IRONLAB" playground create -f "$WORK/trio.yaml" >/dev/null

echo "bench: warm-up start (imports the image and builds its drive once)"
ORIGIN=$("$IRONLAB" playground start bench-trio -o json | run_id_of)
[[ -n $ORIGIN ]] || { echo "bench: start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
RUNS+=("$ORIGIN")
# Some state worth keeping: 8 MiB of data on each machine.
for m in m1 m2 m3; do
    "$IRONLAB" ssh "$ORIGIN" --machine "$m" -- sh -c 'head -c 8M /dev/urandom > ~/data.bin'
done
"$IRONLAB" playground stop "$ORIGIN" 2>/dev/null
wait_uploaded "$ORIGIN"

echo "bench: $N clones of the stopped 3-machine run"
: >"$WORK/clone.ms"
before=$(pool_used)
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    c=$("$IRONLAB" playground clone "$ORIGIN" 2>/dev/null)
    t1=$(now_ns)
    [[ -n $c ]] || { echo "bench: clone $i failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    RUNS+=("$c")
    ms "$t0" "$t1" >>"$WORK/clone.ms"
done
after=$(pool_used)
per_clone_kib=$(awk -v a="$before" -v b="$after" -v n="$N" 'BEGIN { printf "%.1f", (b - a) / n / 1024 }')
# The worker's own time per clone (reflinks + fsyncs + rename), from its log.
sed 's/\x1b\[[0-9;]*m//g' "$WORK/data/worker.log" |
    awk '/run cloned/ && match($0, /elapsed_ms=[0-9]+/) { print substr($0, RSTART + 11, RLENGTH - 11) }' >"$WORK/clone-worker.ms"

echo "bench: $R x (fresh start of bench-trio) vs (restart of the stopped run)"
: >"$WORK/start.ms"
: >"$WORK/restart.ms"
for i in $(seq 1 "$R"); do
    t0=$(now_ns)
    fresh=$("$IRONLAB" playground start bench-trio -o json | run_id_of)
    t1=$(now_ns)
    [[ -n $fresh ]] || { echo "bench: start $i failed" >&2; exit 1; }
    ms "$t0" "$t1" >>"$WORK/start.ms"
    "$IRONLAB" playground destroy "$fresh" >/dev/null 2>&1
    t0=$(now_ns)
    "$IRONLAB" playground restart "$ORIGIN" >/dev/null
    t1=$(now_ns)
    ms "$t0" "$t1" >>"$WORK/restart.ms"
    "$IRONLAB" ssh "$ORIGIN" --machine m3 -- test -s data.bin
    "$IRONLAB" playground stop "$ORIGIN" 2>/dev/null
    wait_uploaded "$ORIGIN"
    printf '  %2d: start %s ms, restart %s ms\n' "$i" "$(tail -n1 "$WORK/start.ms")" "$(tail -n1 "$WORK/restart.ms")"
done

# The worker's own start→ready and restart→ready times of the same runs.
sed 's/\x1b\[[0-9;]*m//g' "$WORK/data/worker.log" |
    awk '/run ready/ && match($0, /elapsed_ms=[0-9]+/) { print substr($0, RSTART + 11, RLENGTH - 11) }' |
    awk -v n="$R" '{ v[NR] = $0 } END { for (i = NR - n + 1; i <= NR; i++) if (i > 0) print v[i] }' >"$WORK/start-worker.ms"
sed 's/\x1b\[[0-9;]*m//g' "$WORK/data/worker.log" |
    awk '/run restarted/ && match($0, /elapsed_ms=[0-9]+/) { print substr($0, RSTART + 11, RLENGTH - 11) }' >"$WORK/restart-worker.ms"
echo "bench: snapshot upload of changed data (64 MiB of new random data on each machine)"
"$IRONLAB" playground restart "$ORIGIN" >/dev/null
for m in m1 m2 m3; do
    "$IRONLAB" ssh "$ORIGIN" --machine "$m" -- sh -c 'head -c 64M /dev/urandom > ~/changed.bin && sync'
done
"$IRONLAB" playground stop "$ORIGIN" 2>/dev/null
wait_uploaded "$ORIGIN"
# The last upload's line: bytes_read (drive data scanned), bytes_uploaded (new chunks), elapsed_ms.
up_line=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/data/worker.log" | awk '/snapshot uploaded/ { l = $0 } END { print l }')
field() { awk -v k="$1" '{ for (i = 1; i <= NF; i++) if (index($i, k "=") == 1) print substr($i, length(k) + 2) }' <<<"$up_line"; }
up_read=$(field bytes_read)
up_sent=$(field bytes_uploaded)
up_ms=$(field elapsed_ms)
up_changed_mibs=$(awk -v b="$up_sent" -v t="$up_ms" 'BEGIN { if (t > 0) printf "%.0f", b / 1048576 / (t / 1000); else print "-" }')
up_scan_mibs=$(awk -v b="$up_read" -v t="$up_ms" 'BEGIN { if (t > 0) printf "%.0f", b / 1048576 / (t / 1000); else print "-" }')
up_sent_mib=$(awk -v b="$up_sent" 'BEGIN { printf "%.1f", b / 1048576 }')
up_read_mib=$(awk -v b="$up_read" 'BEGIN { printf "%.1f", b / 1048576 }')

read -r c_med c_p90 c_min c_max < <(stats "$WORK/clone.ms")
read -r sw_med sw_p90 sw_min sw_max < <(stats "$WORK/start-worker.ms")
read -r rw_med rw_p90 rw_min rw_max < <(stats "$WORK/restart-worker.ms")
read -r w_med w_p90 w_min w_max < <(stats "$WORK/clone-worker.ms")
read -r s_med s_p90 s_min s_max < <(stats "$WORK/start.ms")
read -r r_med r_p90 r_min r_max < <(stats "$WORK/restart.ms")
ratio=$(awk -v a="$r_med" -v b="$s_med" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
wratio=$(awk -v a="$rw_med" -v b="$sw_med" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }')
table=$(
    cat <<TABLE
| measurement (3 debian machines) | n | median ms | p90 ms | min ms | max ms | note |
|---|---:|---:|---:|---:|---:|---|
| \`ironlab playground clone RUN\` (CLI round trip) | $N | $c_med | $c_p90 | $c_min | $c_max | pool grew $per_clone_kib KiB per clone |
| worker's clone (reflinks, fsyncs, rename; from its log) | $N | $w_med | $w_p90 | $w_min | $w_max | |
| \`ironlab playground start bench-trio\` (fresh, start→ready) | $R | $s_med | $s_p90 | $s_min | $s_max | |
| \`ironlab playground restart RUN\` (stopped→ready) | $R | $r_med | $r_p90 | $r_min | $r_max | $ratio of a fresh start |
| worker's fresh start→ready (from its log) | $R | $sw_med | $sw_p90 | $sw_min | $sw_max | |
| worker's restart→ready (from its log) | $R | $rw_med | $rw_p90 | $rw_min | $rw_max | $wratio of a fresh start |
| snapshot upload after 3 x 64 MiB changed (worker's log) | 1 | $up_ms | | | | $up_sent_mib MiB sent (**$up_changed_mibs MiB/s** of changed data); $up_read_mib MiB of drive data scanned ($up_scan_mibs MiB/s) |
TABLE
)
echo
echo "$table"
echo
echo "targets: clone median < 100 ms and < 1 MiB per clone; restart ≤ 1.2x a fresh start; upload ≥ 200 MiB/s of changed data"

if ((RECORD)); then
    {
        echo
        echo "## Persistent playgrounds: $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo IRONLAB_BIN=${IRONLAB_BIN:-} bench/persist.sh -n $N -r $R --record\` (binary: $IRONLAB)"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
