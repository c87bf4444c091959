# Shared by scripts/*.sh (sourced, not run). Picks the cargo target dir:
# $CARGO_TARGET_DIR if set; else /var/cache/ironlab-ci/target when /var/cache/ironlab-ci is
# writable (or creatable); else target/ in the repo.
# shellcheck shell=bash

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ -z ${CARGO_TARGET_DIR:-} ]]; then
    if mkdir -p /var/cache/ironlab-ci 2>/dev/null && [[ -w /var/cache/ironlab-ci ]]; then
        CARGO_TARGET_DIR=/var/cache/ironlab-ci/target
    else
        CARGO_TARGET_DIR=$REPO_ROOT/target
    fi
fi
export CARGO_TARGET_DIR

# A cache dir for built images etc.: /var/cache/ironlab-ci/<name> when possible, else
# target-dir/<name>. Prints the path.
ironlab_cache_dir() {
    local name=$1
    if mkdir -p "/var/cache/ironlab-ci/$name" 2>/dev/null && [[ -w /var/cache/ironlab-ci/$name ]]; then
        echo "/var/cache/ironlab-ci/$name"
    else
        mkdir -p "$CARGO_TARGET_DIR/$name"
        echo "$CARGO_TARGET_DIR/$name"
    fi
}

if ! command -v cargo >/dev/null 2>&1 && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
