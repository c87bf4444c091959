#!/usr/bin/env bash
# README command 2, and exactly what CI (.ci/run) runs: install everything, build the agent and
# the test and stock images (busybox, debian, docker), then check formatting, lint, and run the
# whole test suite as root.
#
#   sudo scripts/test.sh [EXTRA ARGS FOR THE TEST RUNNER...]
#
# Environment:
#   CARGO_TARGET_DIR     default /var/cache/ironlab-ci/target when writable, else target/
#   IRONLAB_CLIPPY=0     skip `cargo clippy` (default: run it)
#   IRONLAB_FMT=0        skip `cargo fmt --check` (default: run it)
# web/ is built first (npm ci + npm run build) so the binary embeds the terminal scripts; the
# browser tests (npm test in web/) run after the cargo tests against the debug `ironlab`. The
# control plane's tests run twice: on SQLite (in the workspace run) and on PostgreSQL.
# The tests get: IRONLAB_AGENT, IRONLAB_STOCK_IMAGES, IRONLAB_TEST_IMAGE_LAYOUT,
# IRONLAB_VM_KERNEL_DIR (the microVM kit: the lean one unless IRONLAB_VM_KIT=stock) and
# IRONLAB_E2E_REQUIRED=1 (privileged tests fail instead of skipping when something is missing).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO_ROOT"

start=$SECONDS
step() { printf '\n=== test: %s (t=%ds)\n' "$*" "$((SECONDS - start))"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "test: must run as root (the end-to-end tests create namespaces, mounts and containers); try: sudo $0" >&2
    exit 1
fi

# A non-login root shell may lack the sbin dirs (ip, losetup, mkfs.ext4 live there).
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

step "setup"
scripts/setup.sh

step "build the agent (debug: faster to compile; the tests do not measure speed)"
scripts/build-agent.sh --debug
IRONLAB_AGENT=$CARGO_TARGET_DIR/debug/ironlab-agent-static
if [[ ! -x $IRONLAB_AGENT ]]; then
    echo "test: the agent build did not produce $IRONLAB_AGENT" >&2
    exit 1
fi

step "build the test image (busybox, 2 layers, whiteout)"
images_dir=$(ironlab_cache_dir images)
IRONLAB_TEST_IMAGE_LAYOUT=$images_dir/testimg
images/testimg/build.sh "$IRONLAB_TEST_IMAGE_LAYOUT"

step "build the stock debian image"
IRONLAB_STOCK_IMAGES=$images_dir/stock-images
# Boot templates (microVMs restored from a RAM snapshot) are built in the background after a
# shape's first start: off for the test run, except in the test of templates itself.
export IRONLAB_VM_TEMPLATES=${IRONLAB_VM_TEMPLATES:-0}
export IRONLAB_IMAGE_CACHE=${IRONLAB_IMAGE_CACHE:-$(ironlab_cache_dir image-cache)}
images/debian/build.sh "$IRONLAB_STOCK_IMAGES/debian"

step "build the stock docker image (Debian 12 + docker.io + ironlab/busybox, for microVMs)"
images/docker/build.sh "$IRONLAB_STOCK_IMAGES/docker"

step "build the microVM kits (Debian's cloud kernel + modules drive; the lean kernel, the default)"
IRONLAB_VM_STOCK_KIT=$(ironlab_cache_dir kernel)
images/kernel/build.sh "$IRONLAB_VM_STOCK_KIT"
# A cold build compiles the lean kernel (10–20 min on 2 cores); it is cached by recipe hash.
# IRONLAB_VM_KIT=stock runs the tests on the cloud kernel instead.
IRONLAB_VM_LEAN_KIT=$(ironlab_cache_dir kernel-lean)
images/kernel/lean.sh "$IRONLAB_VM_LEAN_KIT"
case ${IRONLAB_VM_KIT:-lean} in
    lean) IRONLAB_VM_KERNEL_DIR=$IRONLAB_VM_LEAN_KIT ;;
    stock) IRONLAB_VM_KERNEL_DIR=$IRONLAB_VM_STOCK_KIT ;;
    *)
        echo "test: IRONLAB_VM_KIT must be lean or stock, not ${IRONLAB_VM_KIT}" >&2
        exit 1
        ;;
esac

export IRONLAB_AGENT IRONLAB_STOCK_IMAGES IRONLAB_TEST_IMAGE_LAYOUT IRONLAB_VM_KERNEL_DIR
export IRONLAB_E2E_REQUIRED=1
# No run of any test reaches the real network: workers get no uplink unless a test builds its own.
export IRONLAB_UPLINK=none
export RUST_BACKTRACE=${RUST_BACKTRACE:-1}
echo "test: IRONLAB_AGENT=$IRONLAB_AGENT"
echo "test: IRONLAB_STOCK_IMAGES=$IRONLAB_STOCK_IMAGES"
echo "test: IRONLAB_TEST_IMAGE_LAYOUT=$IRONLAB_TEST_IMAGE_LAYOUT"
echo "test: IRONLAB_VM_KERNEL_DIR=$IRONLAB_VM_KERNEL_DIR"

# The checks below all run, so one CI run reports every problem; the exit status says whether
# any failed.
failed=()

step "web: npm ci, typecheck, build (web/dist is embedded by the control plane's build)"
if (cd web && npm ci --no-audit --no-fund --loglevel=error); then
    (cd web && npm run --silent typecheck) || failed+=("web typecheck")
    (cd web && npm run --silent build) || failed+=("web build")
else
    failed+=("npm ci")
fi

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@" || failed+=("tests")
else
    cargo test --workspace --no-fail-fast "$@" || failed+=("tests")
fi

step "control plane tests again, on PostgreSQL (a private server: scripts/pg.sh)"
# The same tests as above, each on a fresh database of its own (IRONLAB_TEST_DATABASE_URL);
# the SQLite run above is the default backend's.
pg_dir=$(mktemp -d /var/tmp/ironlab-pg.XXXXXX)
trap 'scripts/pg.sh stop "$pg_dir" >/dev/null 2>&1 || true' EXIT
if pg_url=$(scripts/pg.sh start "$pg_dir"); then
    echo "test: IRONLAB_TEST_DATABASE_URL=$pg_url"
    if cargo nextest --version >/dev/null 2>&1; then
        IRONLAB_TEST_DATABASE_URL=$pg_url cargo nextest run -p ironlab-control --no-fail-fast ||
            failed+=("control plane tests on PostgreSQL")
    else
        IRONLAB_TEST_DATABASE_URL=$pg_url cargo test -p ironlab-control --no-fail-fast ||
            failed+=("control plane tests on PostgreSQL")
    fi
else
    failed+=("PostgreSQL server for the tests")
fi
scripts/pg.sh stop "$pg_dir"

step "browser tests (web/tests: Debian chromium driven by playwright-core; screenshots in target/screenshots)"
# The same cross-process lock as the Rust end-to-end tests: one platform at a time.
IRONLAB_BIN=$CARGO_TARGET_DIR/debug/ironlab IRONLAB_SCREENSHOTS=$REPO_ROOT/target/screenshots \
    flock "${TMPDIR:-/tmp}/ironlab-e2e.lock" npm --prefix web test || failed+=("browser tests")

if [[ ${IRONLAB_FMT:-1} != 0 ]]; then
    step "cargo fmt --all --check"
    cargo fmt --all --check || failed+=("cargo fmt --check")
fi

if [[ ${IRONLAB_CLIPPY:-1} != 0 ]]; then
    step "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings || failed+=("cargo clippy")
fi

if ((${#failed[@]})); then
    step "FAILED: ${failed[*]}"
    exit 1
fi
step "all passed"
