#!/usr/bin/env bash
# README command 1: install everything, build, build the stock `debian` and `docker` images, run
# `ironlab up`.
#
#   sudo scripts/up.sh [ARGS FOR `ironlab up`...]     e.g. --listen 127.0.0.1:8080 --data-dir DIR
#
# Environment: CARGO_TARGET_DIR (default /var/cache/ironlab-ci/target or target/),
# IRONLAB_STOCK_IMAGES (default /var/lib/ironlab/stock-images), IRONLAB_IMAGE_CACHE (passed to
# the image recipe), IRONLAB_VM_KERNEL_DIR (the microVM kit, default /var/lib/ironlab/kernel).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

scripts/setup.sh
scripts/build.sh

stock=${IRONLAB_STOCK_IMAGES:-/var/lib/ironlab/stock-images}
echo "up: building the stock debian image into $stock/debian"
images/debian/build.sh "$stock/debian"
echo "up: building the stock docker image into $stock/docker"
if ! images/docker/build.sh "$stock/docker"; then
    echo "up: the stock docker image did not build; the docker playground cannot start" >&2
fi
export IRONLAB_STOCK_IMAGES=$stock

kit=${IRONLAB_VM_KERNEL_DIR:-/var/lib/ironlab/kernel}
echo "up: building the microVM kit into $kit"
if images/kernel/build.sh "$kit"; then
    export IRONLAB_VM_KERNEL_DIR=$kit
else
    echo "up: the microVM kit did not build; playgrounds run as containers only" >&2
fi

exec "$CARGO_TARGET_DIR/release/ironlab" up --content "$REPO_ROOT/content" "$@"
