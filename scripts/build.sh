#!/usr/bin/env bash
# Builds the web UI's scripts (web/dist, embedded into the binary), the `ironlab` binary and the
# static in-machine agent, side by side:
#   $CARGO_TARGET_DIR/release/ironlab
#   $CARGO_TARGET_DIR/release/ironlab-agent-static
# (the worker finds the agent next to its own executable by default).
#
#   scripts/build.sh [--debug]     --debug: build the agent in debug mode (faster to compile)
#   IRONLAB_SKIP_WEB=1             skip the web build (pages then say the terminal is not built)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

agent_args=()
for arg in "$@"; do
    case $arg in
        --debug) agent_args+=(--debug) ;;
        -h | --help)
            sed -n '2,9p' "$0"
            exit 0
            ;;
        *)
            echo "build: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

if [[ ${IRONLAB_SKIP_WEB:-0} == 1 ]]; then
    echo "build: IRONLAB_SKIP_WEB=1: not building web/ (the binary embeds whatever web/dist holds)"
elif ! command -v npm >/dev/null 2>&1; then
    echo "build: npm not found: run scripts/setup.sh (or set IRONLAB_SKIP_WEB=1 to build without the web scripts)" >&2
    exit 1
else
    echo "build: web/: npm ci && npm run build"
    (cd web && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
fi

echo "build: cargo build --release -p ironlab (target dir $CARGO_TARGET_DIR)"
cargo build --release -p ironlab

echo "build: scripts/build-agent.sh ${agent_args[*]}"
scripts/build-agent.sh "${agent_args[@]}"

profile=release
if ((${#agent_args[@]})); then profile=debug; fi
agent=$CARGO_TARGET_DIR/$profile/ironlab-agent-static
if [[ ! -x $agent ]]; then
    echo "build: the agent build did not produce $agent" >&2
    exit 1
fi
if [[ $profile == debug ]]; then
    # Keep the pair side by side: the worker looks next to its own executable.
    cp -f "$agent" "$CARGO_TARGET_DIR/release/ironlab-agent-static"
fi
echo "build: ironlab  $CARGO_TARGET_DIR/release/ironlab"
echo "build: agent    $CARGO_TARGET_DIR/release/ironlab-agent-static"
