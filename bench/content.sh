#!/usr/bin/env bash
# Benchmark: server-side render of content (Markdown → sanitised HTML with the components) of a
# generated ~2,000-line tutorial (sections with code blocks, tables, hints, task placeholders,
# alerts, raw HTML), N renders; target p50 under 20 ms.
#
#   bench/content.sh [-n RUNS] [--lines LINES] [--release] [--record]
#
#   --release   build the client with the release profile (default: the dev profile, whose
#               Markdown/sanitiser dependencies are optimised; see Cargo.toml)
#   --record    append the result to bench/RESULTS.md
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
cd "$REPO_ROOT"

RUNS=200
LINES=2000
PROFILE=()
PROFILE_NAME=dev
RECORD=0
while (($#)); do
    case $1 in
        -n) RUNS=$2; shift 2 ;;
        --lines) LINES=$2; shift 2 ;;
        --release) PROFILE=(--release); PROFILE_NAME=release; shift ;;
        --record) RECORD=1; shift ;;
        *) echo "usage: $0 [-n RUNS] [--lines LINES] [--release] [--record]" >&2; exit 2 ;;
    esac
done

out=$(cargo run -q "${PROFILE[@]}" -p ironlab-control --example render_bench -- "$RUNS" "$LINES")
echo "$out"
if ((RECORD)); then
    field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$out" "$1"; }
    {
        echo
        echo "## Content render — $(date -u '+%Y-%m-%d %H:%M UTC') — $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git rev-parse --short HEAD)"
        echo
        echo "Command: \`bench/content.sh -n $RUNS --lines $LINES${PROFILE:+ --release} --record\` (profile $PROFILE_NAME)"
        echo
        echo "| measurement (N=$RUNS) | median ms | p90 ms | min ms | max ms |"
        echo "|---|---:|---:|---:|---:|"
        echo "| render $(field lines)-line tutorial ($(field markdown_bytes) B Markdown → $(field html_bytes) B HTML) | $(field median_ms) | $(field p90_ms) | $(field min_ms) | $(field max_ms) |"
    } >> bench/RESULTS.md
fi
