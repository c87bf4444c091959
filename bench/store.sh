#!/usr/bin/env bash
# Snapshot store benchmark: upload throughput of changed data and restore throughput, to the
# local-directory store (and to a real S3 server on 127.0.0.1 when s3s-fs is installed).
#
#   bench/store.sh [--size-mib N] [--quick]
#
# Each configuration gets a fresh store, so the first upload sends every chunk ("changed
# data"). Results go to stdout; paste them into bench/RESULTS.md with this command line.
# Runs crates/ironlab-store/examples/store_bench.rs (release build).
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE=512
QUICK=0
while (($#)); do
    case $1 in
        --size-mib) SIZE=$2; shift 2 ;;
        --quick) QUICK=1; shift ;;
        *) echo "usage: $0 [--size-mib N] [--quick]" >&2; exit 2 ;;
    esac
done

cd "$REPO_ROOT"
cargo build --release -q -p ironlab-store --example store_bench
BIN=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/store_bench

WORK=$(mktemp -d /var/tmp/ironlab-store-bench.XXXXXX)
S3_PID=""
cleanup() {
    if [[ -n $S3_PID ]]; then kill "$S3_PID" 2>/dev/null || true; wait "$S3_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "# $(date -u '+%Y-%m-%d %H:%M UTC') $(uname -r), $(nproc) CPUs, commit $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)"

run() { # NAME ARGS...
    local name=$1; shift
    rm -rf "$WORK/store" "$WORK/drive"
    echo "## $name"
    "$BIN" --work "$WORK/drive" --size-mib "$SIZE" "$@"
}

if ((QUICK)); then
    run "local, defaults" --store "$WORK/store" --data mixed
else
    for data in mixed random text; do
        run "local, $data, 1 MiB chunks, zstd 1" --store "$WORK/store" --data "$data"
    done
    run "local, mixed, 1 MiB chunks, no compression" --store "$WORK/store" --data mixed --zstd none
    run "local, mixed, 4 MiB chunks, zstd 1" --store "$WORK/store" --data mixed --chunk-kib 4096
    run "local, mixed, 256 KiB chunks, zstd 1" --store "$WORK/store" --data mixed --chunk-kib 256
    run "local, mixed, 1 MiB chunks, zstd 3" --store "$WORK/store" --data mixed --zstd 3
    run "local, mixed, parallelism 2" --store "$WORK/store" --data mixed --parallelism 2
    run "local, mixed, parallelism 8" --store "$WORK/store" --data mixed --parallelism 8
fi

S3S=$(command -v s3s-fs || echo "${HOME:-/root}/.cargo/bin/s3s-fs")
if [[ -x $S3S ]]; then
    mkdir -p "$WORK/s3/bench"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$S3S" --host 127.0.0.1 --port "$PORT" --access-key bench --secret-key bench-secret "$WORK/s3" >/dev/null 2>&1 &
    S3_PID=$!
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
        sleep 0.05
    done
    export IRONLAB_S3_ENDPOINT=http://127.0.0.1:$PORT AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret
    rm -rf "$WORK/drive"
    echo "## s3s-fs on 127.0.0.1, mixed, defaults"
    "$BIN" --work "$WORK/drive" --size-mib "$SIZE" --store s3://bench/run1 --data mixed
    if ((!QUICK)); then
        echo "## s3s-fs on 127.0.0.1, mixed, parallelism 8"
        "$BIN" --work "$WORK/drive" --size-mib "$SIZE" --store s3://bench/run2 --data mixed --parallelism 8
    fi
else
    echo "## s3: skipped (s3s-fs not installed)"
fi
