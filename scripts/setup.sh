#!/usr/bin/env bash
# Installs everything ironlab needs on a Debian 12 (bookworm) machine, as root. Idempotent:
# run it as often as you like; it only changes what is missing, and says what it did.
#
#   sudo scripts/setup.sh
#
# It exports nothing. What it does:
#   1. adds a bookworm-backports apt source (QEMU 10 for microVMs comes from there);
#   2. installs the Debian packages below (skipping `apt-get update` when all are present), and
#      qemu-system-x86 from bookworm-backports (10.0; bookworm's 7.2 is blocked by qemu-utils 10);
#   3. adds the Rust musl target for the static in-machine agent (tolerates failure: the agent
#      build falls back to a static glibc build);
#   4. installs cargo-nextest and s3s-fs (a real S3 server for the snapshot store's tests) when
#      missing;
#   5. checks Node.js and npm for the web build (installs Debian's when missing).
set -euo pipefail

say() { printf 'setup: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: must run as root (try: sudo $0)" >&2
    exit 1
fi

PACKAGES=(
    crun runc docker-registry skopeo mmdebstrap xfsprogs e2fsprogs nftables iproute2
    busybox-static dnsmasq-base file ca-certificates util-linux procps curl openssh-client
    umoci build-essential pkg-config musl-tools
    chromium fonts-liberation
    kmod
    # The control plane's PostgreSQL backend is tested against a private server (scripts/pg.sh).
    postgresql postgresql-client
    # The lean microVM kernel (images/kernel/lean.sh compiles Debian's linux-source).
    flex bison bc libelf-dev xz-utils
)
# From bookworm-backports where that suite exists (microVMs: QEMU 10 with qboot and microvm).
BACKPORTS_PACKAGES=(qemu-system-x86)

# --- 1. bookworm-backports source --------------------------------------------------------------
codename=""
if [[ -r /etc/os-release ]]; then
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
fi
backports_added=0
if [[ $codename == bookworm ]]; then
    if grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "bookworm-backports source already present"
    else
        cat >/etc/apt/sources.list.d/ironlab-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        backports_added=1
        say "added apt source /etc/apt/sources.list.d/ironlab-backports.sources"
    fi
else
    say "not Debian bookworm (VERSION_CODENAME=${codename:-unknown}); skipping the backports source"
fi

# --- 2. Debian packages ------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null; then
        missing+=("$p")
    fi
done
if ((${#missing[@]} == 0)); then
    say "all ${#PACKAGES[@]} Debian packages already installed (skipped apt-get update)"
    if ((backports_added)); then
        say "note: run 'apt-get update' before installing from bookworm-backports"
    fi
else
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "installed ${#missing[@]} package(s)"
fi

missing_bp=()
for p in "${BACKPORTS_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null; then
        missing_bp+=("$p")
    fi
done
if ((${#missing_bp[@]} > 0)); then
    say "installing: ${missing_bp[*]} (bookworm-backports where available)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    if [[ $codename == bookworm ]]; then
        apt-get install -y -qq --no-install-recommends -t bookworm-backports "${missing_bp[@]}" >/dev/null
    else
        apt-get install -y -qq --no-install-recommends "${missing_bp[@]}" >/dev/null
    fi
fi

# --- 3. Rust toolchain: musl target for the static agent ---------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
    export PATH="${HOME:-/root}/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found: install a Rust toolchain (rustup) first" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    if rustup target list --installed 2>/dev/null | grep -x 'x86_64-unknown-linux-musl' >/dev/null; then
        say "rust target x86_64-unknown-linux-musl already installed"
    elif rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1; then
        say "added rust target x86_64-unknown-linux-musl"
    else
        say "could not add rust target x86_64-unknown-linux-musl; the agent build falls back to static glibc"
    fi
else
    say "rustup not found; the agent build uses whatever targets the toolchain has"
fi

# --- 4. cargo-nextest --------------------------------------------------------------------------
if cargo nextest --version >/dev/null 2>&1; then
    say "cargo-nextest present ($(cargo nextest --version 2>/dev/null | head -n1))"
elif cargo install --locked cargo-nextest >/dev/null 2>&1; then
    say "installed cargo-nextest"
else
    say "could not install cargo-nextest; scripts/test.sh falls back to cargo test"
fi

# --- 4b. s3s-fs: the S3 server the snapshot store's tests start on 127.0.0.1 -----------------
# 0.14 is the last release that builds with Rust < 1.96.
if command -v s3s-fs >/dev/null 2>&1 || [[ -x ${HOME:-/root}/.cargo/bin/s3s-fs ]]; then
    say "s3s-fs present"
elif cargo install --locked s3s-fs --version 0.14.1 --features binary >/dev/null 2>&1; then
    say "installed s3s-fs 0.14.1"
else
    say "could not install s3s-fs; the snapshot store's S3 tests will skip"
fi

# --- 5. Node.js + npm (web/: esbuild bundles, browser tests) ------------------------------------
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    say "node $(node --version) and npm $(npm --version) present"
else
    say "installing Debian's nodejs and npm (web/ needs them)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

say "done"
