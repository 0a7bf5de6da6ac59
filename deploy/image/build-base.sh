#!/usr/bin/env bash
# Makes a minimal Debian base image without any image registry: debootstrap
# of this machine's Debian release from this machine's apt mirror, imported
# with `docker import`. Usage: build-base.sh [TAG]   (default chat-base:bookworm)
set -euo pipefail
tag="${1:-chat-base:bookworm}"
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "installing debootstrap"
    apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null
fi
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
if [ -z "$mirror" ]; then
    mirror="$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
fi
if [ -z "$mirror" ]; then
    echo "no apt mirror configured on this machine; set BASE_IMAGE to an image you have" >&2
    exit 1
fi
suite="$(. /etc/os-release && echo "$VERSION_CODENAME")"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap $suite from $mirror"
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "built $tag"
