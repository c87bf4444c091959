#!/usr/bin/env bash
# Builds the static in-machine agent and prints the path of the result:
#   $CARGO_TARGET_DIR/{release|debug}/ironlab-agent-static
# usage: scripts/build-agent.sh [--debug]
#
# The agent must run in any image (busybox, Debian), so it is linked statically: the musl target
# first; if that build fails, the gnu target with `-C target-feature=+crt-static` (said on stderr).
# IRONLAB_AGENT_FORCE_GNU=1 skips the musl attempt (to exercise the fallback).
set -eu

profile=release
case "${1:-}" in
    --debug) profile=debug ;;
    "") ;;
    *) echo "usage: $0 [--debug]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh # picks CARGO_TARGET_DIR the same way as the other scripts
target_dir=$CARGO_TARGET_DIR
case "$target_dir" in
    /*) ;;
    *) target_dir="$(pwd)/$target_dir" ;;
esac
export CARGO_TARGET_DIR="$target_dir"

cargo_profile=""
[ "$profile" = release ] && cargo_profile="--release"

musl=x86_64-unknown-linux-musl
gnu=x86_64-unknown-linux-gnu
if [ "${IRONLAB_AGENT_FORCE_GNU:-}" != 1 ] &&
    cargo build $cargo_profile --target "$musl" -p ironlab-agent --bin ironlab-agent >&2; then
    built="$target_dir/$musl/$profile/ironlab-agent"
    how="musl"
else
    if [ "${IRONLAB_AGENT_FORCE_GNU:-}" = 1 ]; then
        echo "build-agent: IRONLAB_AGENT_FORCE_GNU=1: building for $gnu with +crt-static" >&2
    else
        echo "build-agent: the $musl build failed; falling back to $gnu with +crt-static" >&2
    fi
    # A separate target dir keeps these RUSTFLAGS from invalidating everyone's gnu build cache.
    CARGO_TARGET_DIR="$target_dir/agent-crt-static" \
        RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build $cargo_profile --target "$gnu" -p ironlab-agent --bin ironlab-agent >&2
    built="$target_dir/agent-crt-static/$gnu/$profile/ironlab-agent"
    how="gnu +crt-static"
fi

out="$target_dir/$profile/ironlab-agent-static"
mkdir -p "$(dirname "$out")"
cp -f "$built" "$out.tmp"
# Symbols are not needed inside machines (about half the size).
if [ "$profile" = release ] && command -v strip >/dev/null 2>&1; then
    strip "$out.tmp"
fi
mv -f "$out.tmp" "$out"

if command -v file >/dev/null 2>&1; then
    desc=$(file -b "$out")
    case "$desc" in
        *"statically linked"*|*"static-pie linked"*) ;;
        *) echo "build-agent: $out is not statically linked: $desc" >&2; exit 1 ;;
    esac
else
    # Without `file`: a dynamic binary has an ELF interpreter.
    if readelf -l "$out" 2>/dev/null | grep "program interpreter" >/dev/null; then
        echo "build-agent: $out is dynamically linked" >&2
        exit 1
    fi
fi
echo "build-agent: built $out ($how, $profile)" >&2
echo "$out"
