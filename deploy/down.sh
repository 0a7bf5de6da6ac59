#!/usr/bin/env bash
# Stops the compose cluster and removes its volumes (all stored messages,
# the CA and every identity) and the operator identity copied out.
set -euo pipefail
cd "$(dirname "$0")"
docker-compose -p "${CHAT_PROJECT:-chat}" -f docker-compose.yml down -v --remove-orphans
rm -rf .certs
