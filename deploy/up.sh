#!/usr/bin/env bash
# Builds the image (deploy/build-image.sh) and starts the compose cluster,
# waiting until every service is healthy. The token key is made once and
# kept in deploy/.env (read by docker-compose). The cluster makes its own
# CA and identities (the `certs` service); the operator identity is copied
# to deploy/.certs/operator for chatctl on this host. Stop with
# deploy/down.sh.
set -euo pipefail
cd "$(dirname "$0")"
./build-image.sh
if [ ! -s .env ]; then
    umask 077
    echo "CHAT_TOKEN_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > .env
fi
compose="docker-compose -p ${CHAT_PROJECT:-chat} -f docker-compose.yml"
$compose up -d
echo "waiting for every service to be healthy"
for _ in $(seq 1 120); do
    unhealthy="$($compose ps -q | xargs docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' | grep -v ' healthy$' | grep -v ' none$' || true)"
    if [ -z "$unhealthy" ]; then
        rm -rf .certs/operator
        mkdir -p .certs && chmod 700 .certs
        docker cp "$($compose ps -q operator)":/tls .certs/operator
        gw1="127.0.0.1:${CHAT_GATEWAY1_PORT:-7201}"; gw2="127.0.0.1:${CHAT_GATEWAY2_PORT:-7202}"
        echo "ready gateways=$gw1,$gw2"
        echo "status page: http://127.0.0.1:${CHAT_STATUS_PORT:-7280}/ (JSON at /status)"
        echo "export CHAT_GATEWAYS=$gw1,$gw2 CHAT_GATEWAY_CA=$PWD/.certs/operator/ca.crt CHAT_TLS_DIR=$PWD/.certs/operator $(cat .env)"
        echo "# store commands: docker-compose -p ${CHAT_PROJECT:-chat} exec operator chatctl store status"
        echo "target/release/chatctl --as alice conversation create demo --members bob"
        exit 0
    fi
    sleep 1
done
echo "not healthy after 120 s:" >&2
echo "$unhealthy" >&2
exit 1
