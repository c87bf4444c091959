#!/usr/bin/env bash
# Benchmark: start-to-ready of the stock `debian` playground and `ironlab ssh RUN -- true`,
# next to a bare OCI-runtime run (`crun run`, process `true`) of the same rootfs, all measured in
# the same invocation on the same machine.
#
#   sudo bench/start.sh [-n N] [--record]
#
#   -n N        iterations (default 20, at most 200)
#   --record    append the results table to bench/RESULTS.md
#
# Needs: root; `ironlab` built (scripts/build.sh; $IRONLAB_BIN overrides, default
# $CARGO_TARGET_DIR/release/ironlab); the stock debian image under $IRONLAB_STOCK_IMAGES
# (default /var/lib/ironlab/stock-images; images/debian/build.sh builds it); crun (or runc) and umoci.
# It starts `ironlab up` on a temporary data dir and free ports, warms the image cache with one
# start, then measures N starts (each destroyed), N `ssh -- true`, and N bare `crun run`s.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

N=20
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
            sed -n '2,16p' "$0"
            exit 0
            ;;
        *)
            echo "bench: unknown argument: $1" >&2
            exit 2
            ;;
    esac
done
if ! [[ $N =~ ^[0-9]+$ ]] || ((N < 1 || N > 200)); then
    echo "bench: -n must be 1..200" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "bench: must run as root" >&2
    exit 1
fi

IRONLAB=${IRONLAB_BIN:-$CARGO_TARGET_DIR/release/ironlab}
STOCK=${IRONLAB_STOCK_IMAGES:-/var/lib/ironlab/stock-images}
RUNTIME=$(command -v crun || command -v runc || true)
for need in "$IRONLAB" "$STOCK/debian/index.json"; do
    if [[ ! -e $need ]]; then
        echo "bench: missing $need (scripts/build.sh, images/debian/build.sh)" >&2
        exit 1
    fi
done
if [[ -z $RUNTIME ]] || ! command -v umoci >/dev/null; then
    echo "bench: needs crun (or runc) and umoci (scripts/setup.sh installs them)" >&2
    exit 1
fi

# shellcheck source=bench/lib.sh
source "$REPO_ROOT/bench/lib.sh"

now_ns() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f\n", (b - a) / 1e6 }'; }

# stats FILE → "median p90 min max" (ms)
stats() {
    sort -n "$1" | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "- - - -"; exit }
        m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        i = int(0.9 * NR + 0.999999); if (i < 1) i = 1; if (i > NR) i = NR
        printf "%.1f %.1f %.1f %.1f\n", m, v[i], v[1], v[NR] }'
}

# --- the platform ------------------------------------------------------------------------------
bench_up

destroy() {
    local out
    out=$("$IRONLAB" playground destroy "$1" 2>&1) || { echo "bench: destroy $1 failed: $out" >&2; exit 1; }
}

echo "bench: warm-up start (imports the image and builds its drive once)"
RUN=$(start_run)
[[ -n $RUN ]] || { echo "bench: warm-up start failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
"$IRONLAB" ssh "$RUN" -- true
destroy "$RUN"
RUN=""

echo "bench: $N starts of debian (each destroyed), $N x ssh -- true"
: >"$WORK/start.ms"
: >"$WORK/ssh.ms"
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    RUN=$(start_run)
    t1=$(now_ns)
    [[ -n $RUN ]] || { echo "bench: start $i failed" >&2; tail -n 30 "$WORK/up.log" >&2; exit 1; }
    ms "$t0" "$t1" >>"$WORK/start.ms"
    t0=$(now_ns)
    "$IRONLAB" ssh "$RUN" -- true
    t1=$(now_ns)
    ms "$t0" "$t1" >>"$WORK/ssh.ms"
    destroy "$RUN"
    RUN=""
    printf '  %2d: start %s ms, ssh %s ms\n' "$i" "$(tail -n1 "$WORK/start.ms")" "$(tail -n1 "$WORK/ssh.ms")"
done

# --- the bare OCI runtime on the same rootfs ---------------------------------------------------
echo "bench: unpacking the debian image for a bare $(basename "$RUNTIME") run"
BUNDLE=$WORK/bundle
tag=$(sed -n 's/.*"org.opencontainers.image.ref.name"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' "$STOCK/debian/index.json" | head -n1)
umoci unpack --image "$STOCK/debian${tag:+:$tag}" "$BUNDLE" >/dev/null
cat >"$BUNDLE/config.json" <<'JSON'
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["true"],
    "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
    "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "bench",
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
  ],
  "linux": {
    "resources": {"memory": {"limit": 536870912}, "pids": {"limit": 1024}},
    "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]
  }
}
JSON
: >"$WORK/crun.ms"
for i in $(seq 1 "$N"); do
    t0=$(now_ns)
    timeout 30 "$RUNTIME" --root "$WORK/runtime-root" run --bundle "$BUNDLE" "ironlab-bench-$$-$i" </dev/null
    t1=$(now_ns)
    ms "$t0" "$t1" >>"$WORK/crun.ms"
done

# --- report ------------------------------------------------------------------------------------
read -r s_med s_p90 s_min s_max < <(stats "$WORK/start.ms")
read -r h_med h_p90 h_min h_max < <(stats "$WORK/ssh.ms")
read -r c_med c_p90 c_min c_max < <(stats "$WORK/crun.ms")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1fx", a / b; else print "-" }'; }
rt=$(basename "$RUNTIME")
table=$(
    cat <<TABLE
| measurement (N=$N) | median ms | p90 ms | min ms | max ms | median vs bare $rt |
|---|---:|---:|---:|---:|---:|
| \`ironlab playground start debian\` (start→ready) | $s_med | $s_p90 | $s_min | $s_max | $(ratio "$s_med" "$c_med") |
| \`ironlab ssh RUN -- true\` | $h_med | $h_p90 | $h_min | $h_max | $(ratio "$h_med" "$c_med") |
| bare \`$rt run\` of the same rootfs, process \`true\` | $c_med | $c_p90 | $c_min | $c_max | 1.0x |
TABLE
)
echo
echo "$table"
echo
echo "targets: start median < 300 ms, ssh median < 100 ms"

if ((RECORD)); then
    {
        echo
        echo "## $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo
        echo "Command: \`sudo bench/start.sh -n $N --record\`"
        echo
        echo "$table"
    } >>bench/RESULTS.md
    echo "bench: appended to bench/RESULTS.md"
fi
