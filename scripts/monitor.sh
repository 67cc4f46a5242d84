#!/usr/bin/env bash
# Start Prometheus (Debian's package) against a local deblur run, with the alert rules:
#   bash scripts/monitor.sh            # UI on http://127.0.0.1:9090, scrapes 127.0.0.1:9464
# Then run a job in another terminal (`deblur run ...`; metrics.port defaults to 9464) and
# import helm/deblur/files/deblur-dashboard.json into Grafana (see docs/monitoring.md).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v prometheus >/dev/null || bash scripts/install_tools.sh
data="${DEBLUR_PROMETHEUS_DATA:-.prometheus-data}"
exec prometheus --config.file=deploy/prometheus/prometheus.yml \
  --storage.tsdb.path="$data" --web.listen-address="${DEBLUR_PROMETHEUS_ADDRESS:-127.0.0.1:9090}"
