#!/usr/bin/env bash
# Pushes an OCI image layout to a registry with skopeo.
#
#   images/push.sh LAYOUT_DIR REGISTRY/REPO:TAG [LAYOUT_TAG]
#
# LAYOUT_TAG is the layout's org.opencontainers.image.ref.name (default latest). TLS verification
# is off for registries on 127.0.0.0/8 and localhost (plain HTTP), on otherwise; override with
# TLS_VERIFY=true|false.
set -euo pipefail
(($# >= 2)) || { echo "usage: images/push.sh LAYOUT_DIR REGISTRY/REPO:TAG [LAYOUT_TAG]" >&2; exit 1; }
layout=$1
ref=${2#docker://}
ref=${ref#oci://}
tag=${3:-latest}
[[ -f $layout/index.json ]] || { echo "push: $layout is not an OCI image layout" >&2; exit 1; }
registry=${ref%%/*}
host=${registry%:*}
verify=${TLS_VERIFY:-}
if [[ -z $verify ]]; then
    case $host in
    127.* | localhost | \[::1\]) verify=false ;;
    *) verify=true ;;
    esac
fi
exec skopeo copy --quiet --dest-tls-verify="$verify" "oci:$layout:$tag" "docker://$ref"
