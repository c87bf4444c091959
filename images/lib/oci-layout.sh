#!/usr/bin/env bash
# Makes an OCI image layout from one or more rootfs layer tarballs, without Docker or umoci.
#
#   images/lib/oci-layout.sh [options] LAYOUT_DIR LAYER.tar [LAYER.tar ...]
#
# Options:
#   --cmd JSON        config.Cmd as a JSON array (default ["/bin/sh"])
#   --entrypoint JSON config.Entrypoint as a JSON array (default none)
#   --env KEY=VALUE   add to config.Env (repeatable; PATH defaults to the usual Debian PATH)
#   --user USER       config.User (default: empty = root)
#   --workdir DIR     config.WorkingDir (default /)
#   --label KEY=VALUE add to config.Labels (repeatable)
#   --ref NAME        index.json's org.opencontainers.image.ref.name (default latest)
#
# Each layer tarball (uncompressed, lowest first) becomes one tar+gzip layer (gzip -n: no name or
# timestamp, so the same tarball always gives the same digest); rootfs.diff_ids are the sha256 of
# the uncompressed tarballs. `created` is SOURCE_DATE_EPOCH (default 0). The layout is written to
# LAYOUT_DIR.tmp and renamed into place: a reader never sees half a layout.
set -euo pipefail

die() { printf 'oci-layout: %s\n' "$*" >&2; exit 1; }

json_str() { # JSON string literal of $1
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    printf '"%s"' "$s"
}

cmd='["/bin/sh"]'
entrypoint=""
user=""
workdir="/"
ref="latest"
envs=()
labels=()
while (($#)); do
    case $1 in
    --cmd) cmd=$2; shift 2 ;;
    --entrypoint) entrypoint=$2; shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --user) user=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --label) labels+=("$2"); shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --) shift; break ;;
    -*) die "unknown option $1" ;;
    *) break ;;
    esac
done
(($# >= 2)) || die "usage: oci-layout.sh [options] LAYOUT_DIR LAYER.tar [LAYER.tar ...]"
out=$1
shift
for t in "$@"; do [[ -f $t ]] || die "layer tarball $t not found"; done
if ! printf '%s\n' "${envs[@]+"${envs[@]}"}" | grep '^PATH=' >/dev/null; then
    envs=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "${envs[@]+"${envs[@]}"}")
fi

tmp=$out.tmp
rm -rf "$tmp"
mkdir -p "$tmp/blobs/sha256"
blobs=$tmp/blobs/sha256

put_blob() { # FILE -> prints "sha256:HEX SIZE", moving FILE into blobs/
    local hex size
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv -f "$1" "$blobs/$hex"
    printf 'sha256:%s %s\n' "$hex" "$size"
}

layers_json=""
diff_ids_json=""
for t in "$@"; do
    diff_id=sha256:$(sha256sum "$t" | cut -d' ' -f1)
    gzip -n -c "$t" >"$tmp/layer.tar.gz"
    read -r digest size < <(put_blob "$tmp/layer.tar.gz")
    layers_json+="${layers_json:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"$digest\",\"size\":$size}"
    diff_ids_json+="${diff_ids_json:+,}\"$diff_id\""
done

env_json=""
for e in "${envs[@]}"; do env_json+="${env_json:+,}$(json_str "$e")"; done
labels_json=""
for l in "${labels[@]+"${labels[@]}"}"; do
    labels_json+="${labels_json:+,}$(json_str "${l%%=*}"):$(json_str "${l#*=}")"
done
created=$(date -u -d "@${SOURCE_DATE_EPOCH:-0}" +%Y-%m-%dT%H:%M:%SZ)
{
    printf '{"created":"%s","architecture":"amd64","os":"linux","config":{' "$created"
    printf '"Env":[%s],"Cmd":%s,"WorkingDir":%s' "$env_json" "$cmd" "$(json_str "$workdir")"
    [[ -n $entrypoint ]] && printf ',"Entrypoint":%s' "$entrypoint"
    [[ -n $user ]] && printf ',"User":%s' "$(json_str "$user")"
    [[ -n $labels_json ]] && printf ',"Labels":{%s}' "$labels_json"
    printf '},"rootfs":{"type":"layers","diff_ids":[%s]}}' "$diff_ids_json"
} >"$tmp/config.json"
read -r config_digest config_size < <(put_blob "$tmp/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[%s]}' \
    "$config_digest" "$config_size" "$layers_json" >"$tmp/manifest.json"
read -r manifest_digest manifest_size < <(put_blob "$tmp/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":%s}}]}' \
    "$manifest_digest" "$manifest_size" "$(json_str "$ref")" >"$tmp/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$tmp/oci-layout"

rm -rf "$out.old"
if [[ -e $out ]]; then mv "$out" "$out.old"; fi
mv "$tmp" "$out"
rm -rf "$out.old"
echo "oci-layout: $out: manifest $manifest_digest ($# layer(s))"
