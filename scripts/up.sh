#!/usr/bin/env bash
# README command 1: install everything, build, build the stock `debian` and `docker` images, run
# `ironlab up`.
#
#   sudo scripts/up.sh [ARGS FOR `ironlab up`...]     e.g. --listen 127.0.0.1:8080 --data-dir DIR
#
# Environment: CARGO_TARGET_DIR (default /var/cache/ironlab-ci/target or target/),
# IRONLAB_STOCK_IMAGES (default /var/lib/ironlab/stock-images), IRONLAB_IMAGE_CACHE (passed to
# the image recipe), IRONLAB_VM_KIT=lean|stock (the microVM kit: lean, the default, is
# images/kernel/lean.sh; stock is build.sh, Debian's cloud kernel), IRONLAB_VM_KERNEL_DIR (where
# that kit is built; default /var/lib/ironlab/kernel-lean or /var/lib/ironlab/kernel).
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

# The lean kernel (compiled from Debian's linux-source, cached; the first build takes 10–20 min)
# is the default kit; IRONLAB_VM_KIT=stock uses Debian's cloud kernel + modules drive instead.
case ${IRONLAB_VM_KIT:-lean} in
    lean) kit=${IRONLAB_VM_KERNEL_DIR:-/var/lib/ironlab/kernel-lean} builder=images/kernel/lean.sh ;;
    stock) kit=${IRONLAB_VM_KERNEL_DIR:-/var/lib/ironlab/kernel} builder=images/kernel/build.sh ;;
    *)
        echo "up: IRONLAB_VM_KIT must be lean or stock, not ${IRONLAB_VM_KIT}" >&2
        exit 1
        ;;
esac
echo "up: building the microVM kit into $kit ($builder)"
if "$builder" "$kit"; then
    export IRONLAB_VM_KERNEL_DIR=$kit
else
    echo "up: the microVM kit did not build; playgrounds run as containers only" >&2
fi

exec "$CARGO_TARGET_DIR/release/ironlab" up --content "$REPO_ROOT/content" "$@"
