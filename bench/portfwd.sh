#!/usr/bin/env bash
# Benchmark: published ports (issue 5). In one run of the stock `debian` playground:
# - HTTP request latency (a small response, a new TCP connection each time) through
#   `ironlab port-forward` (each connection: a port token, a WebSocket, an agent Dial) and through
#   the http-port host of the control plane (each request: the same, plus hyper), next to the
#   same request made directly inside the run's network namespace;
# - bulk TCP throughput (256 MiB from a server in the machine) through `port-forward`, next to
#   the same transfer inside the run's network namespace.
#
#   sudo bench/portfwd.sh [-n N] [--record]
#
#   -n N        latency samples per path (default 50, at most 500)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built ($IRONLAB_BIN, default $CARGO_TARGET_DIR/release/ironlab); the
# stock debian image under $IRONLAB_STOCK_IMAGES; curl. Traffic stays on 127.0.0.1 and inside the
# run's own namespace.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=50
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
            sed -n '2,18p' "$0"
            exit 0
            ;;
        *)
            echo "bench: unknown argument: $1" >&2
            exit 2
            ;;
    esac
done
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 500)); then
    echo "bench: -n must be 1..500" >&2
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
command -v curl >/dev/null || { echo "bench: needs curl" >&2; exit 1; }

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

# stats FILE → "median p90 min max" (ms)
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        i = int(0.9 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR
        printf "%.1f %.1f %.1f %.1f\n", m, v[i], v[1], v[NR] }'
}

bench_up
RUN=$(start_run)
[[ -n $RUN ]] || { echo "bench: start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
echo "bench: run $RUN"

# Two perl servers in the machine (perl is in every Debian): HTTP on 8000 (a 13-byte page), and
# a bulk source on 9000 (256 MiB per connection).
"$IRONLAB" ssh "$RUN" -- sh -c '
perl -MIO::Socket::INET -e '"'"'$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1:8000",Listen=>64,ReuseAddr=>1) or die;
  while($c=$s->accept){while(<$c>){last if /^\r?$/} print $c "HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\nhello, bench\n"; close $c}'"'"' </dev/null >/dev/null 2>&1 &
perl -MIO::Socket::INET -e '"'"'$s=IO::Socket::INET->new(LocalAddr=>"127.0.0.1:9000",Listen=>4,ReuseAddr=>1) or die; $b="\0" x 1048576;
  while($c=$s->accept){print $c $b for 1..256; close $c}'"'"' </dev/null >/dev/null 2>&1 &
sleep 0.5'

NS=il-$RUN
curl_ms() { curl -fsS -o /dev/null -w '%{time_total}\n' "$@" | awk '{ printf "%.2f\n", $1 * 1000 }'; }

# --- port-forward -------------------------------------------------------------------------------
"$IRONLAB" port-forward "$RUN" 0:8000 0:9000 >"$WORK/fwd.out" 2>"$WORK/fwd.err" &
FWD_PID=$!
trap 'kill $FWD_PID 2>/dev/null; bench_cleanup' EXIT
for _ in $(seq 1 100); do [[ $(wc -l <"$WORK/fwd.out") -ge 2 ]] && break; sleep 0.1; done
HTTP_ADDR=$(sed -n '1s/^Forwarding \([^ ]*\) .*/\1/p' "$WORK/fwd.out")
BULK_ADDR=$(sed -n '2s/^Forwarding \([^ ]*\) .*/\1/p' "$WORK/fwd.out")
[[ -n $HTTP_ADDR && -n $BULK_ADDR ]] || { echo "bench: port-forward did not start" >&2; cat "$WORK/fwd.err" >&2; exit 1; }

# --- http-port host: sign in once, keep the cookie ------------------------------------------
PORT=${IRONLAB_SERVER##*:}
LINK=$(curl -fsS -X POST -H "Authorization: Bearer $IRONLAB_TOKEN" -H 'Content-Type: application/json' \
    -d '{"port":8000}' "$IRONLAB_SERVER/api/v1/runs/$RUN/http-ports" |
    sed -n 's/.*"url"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
PHOST=$(echo "$LINK" | sed -n 's#^http://\([^/]*\)/.*#\1#p')
JAR=$WORK/cookies
curl -fsS -o /dev/null -c "$JAR" --connect-to "$PHOST:127.0.0.1:$PORT" "$LINK"

echo "bench: warm-up"
for _ in 1 2 3; do
    curl_ms "http://$HTTP_ADDR/" >/dev/null
    curl_ms -b "$JAR" --connect-to "$PHOST:127.0.0.1:$PORT" "http://$PHOST/" >/dev/null
    ip netns exec "$NS" curl -fsS -o /dev/null "http://127.0.0.1:8000/"
done

echo "bench: $N HTTP requests per path"
: >"$WORK/direct.ms"
: >"$WORK/fwd.ms"
: >"$WORK/host.ms"
for _ in $(seq 1 "$N"); do
    ip netns exec "$NS" curl -fsS -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:8000/" |
        awk '{ printf "%.2f\n", $1 * 1000 }' >>"$WORK/direct.ms"
    curl_ms "http://$HTTP_ADDR/" >>"$WORK/fwd.ms"
    curl_ms -b "$JAR" --connect-to "$PHOST:127.0.0.1:$PORT" "http://$PHOST/" >>"$WORK/host.ms"
done

echo "bench: 256 MiB bulk transfers (3 each)"
now_ns() { date +%s%N; }
mib_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", 256 / ((b - a) / 1e9) }'; }
: >"$WORK/bulk-direct"
: >"$WORK/bulk-fwd"
for _ in 1 2 3; do
    t0=$(now_ns)
    ip netns exec "$NS" bash -c 'cat </dev/tcp/127.0.0.1/9000 | wc -c' >"$WORK/bytes"
    mib_s "$t0" "$(now_ns)" >>"$WORK/bulk-direct"
    [[ $(cat "$WORK/bytes") -eq 268435456 ]] || { echo "bench: short direct transfer" >&2; exit 1; }
    t0=$(now_ns)
    bash -c "cat </dev/tcp/${BULK_ADDR%:*}/${BULK_ADDR##*:} | wc -c" >"$WORK/bytes"
    mib_s "$t0" "$(now_ns)" >>"$WORK/bulk-fwd"
    [[ $(cat "$WORK/bytes") -eq 268435456 ]] || { echo "bench: short transfer through port-forward" >&2; exit 1; }
done
best() { sort -n "$1" | tail -n1; }

read -r d_med d_p90 d_min d_max < <(stats "$WORK/direct.ms")
read -r f_med f_p90 f_min f_max < <(stats "$WORK/fwd.ms")
read -r h_med h_p90 h_min h_max < <(stats "$WORK/host.ms")
build=$(if [[ $IRONLAB == */debug/* ]]; then echo debug; else echo release; fi)
table=$(
    cat <<TABLE
| measurement (N=$N, $build build) | median ms | p90 ms | min ms | max ms |
|---|---:|---:|---:|---:|
| HTTP GET inside the run's netns (\`ip netns exec … curl\`) | $d_med | $d_p90 | $d_min | $d_max |
| HTTP GET through \`ironlab port-forward\` (new connection each) | $f_med | $f_p90 | $f_min | $f_max |
| HTTP GET through the http-port host (\`{run}-8000-debian.localhost\`) | $h_med | $h_p90 | $h_min | $h_max |

| bulk TCP, 256 MiB (best of 3) | MiB/s |
|---|---:|
| inside the run's netns | $(best "$WORK/bulk-direct") |
| through \`ironlab port-forward\` | $(best "$WORK/bulk-fwd") |
TABLE
)
echo
echo "$table"

if ((RECORD)); then
    {
        echo
        echo "## Published ports: $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/portfwd.sh -n $N --record\`"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
