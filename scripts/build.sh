#!/usr/bin/env bash
# Builds the `ironlab` binary and the static in-machine agent, side by side:
#   $CARGO_TARGET_DIR/release/ironlab
#   $CARGO_TARGET_DIR/release/ironlab-agent-static
# (the worker finds the agent next to its own executable by default).
#
#   scripts/build.sh [--debug]     --debug: build the agent in debug mode (faster to compile)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

agent_args=()
for arg in "$@"; do
    case $arg in
        --debug) agent_args+=(--debug) ;;
        -h | --help)
            sed -n '2,7p' "$0"
            exit 0
            ;;
        *)
            echo "build: unknown argument: $arg" >&2
            exit 2
            ;;
    esac
done

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
