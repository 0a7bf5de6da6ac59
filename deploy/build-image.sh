#!/usr/bin/env bash
# Builds the release binaries and the runtime image (CHAT_IMAGE, default
# chat-backend:local). The base is BASE_IMAGE if given (pulled if absent),
# otherwise chat-base:bookworm, made locally by image/build-base.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
image="${CHAT_IMAGE:-chat-backend:local}"
base="${BASE_IMAGE:-chat-base:bookworm}"
cargo build --release -q -p chat-store -p chat-router -p chat-gateway -p chatctl
if ! docker image inspect "$base" >/dev/null 2>&1; then
    if [ -n "${BASE_IMAGE:-}" ]; then
        docker pull "$base"
    else
        deploy/image/build-base.sh "$base"
    fi
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
rel="${CARGO_TARGET_DIR:-target}/release"
cp "$rel/chat-store" "$rel/chat-router" "$rel/chat-gateway" "$rel/chatctl" \
    deploy/image/Dockerfile "$ctx"/
docker build -q --build-arg BASE_IMAGE="$base" -t "$image" "$ctx" >/dev/null
echo "built $image"
