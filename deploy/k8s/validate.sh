#!/usr/bin/env bash
# Validates the manifests against the Kubernetes schemas (no cluster needed).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate"
    python3 -m pip install -q --disable-pip-version-check kubernetes-validate 2>&1 | grep -v "Running pip as the 'root' user" || true
fi
kubernetes-validate --strict --kubernetes-version "${K8S_VERSION:-1.30}" ./*.yaml
