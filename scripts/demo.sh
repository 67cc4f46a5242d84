#!/usr/bin/env bash
# Set up, make synthetic blurry samples, and deblur them with the embedded default:
# Ray in this process, local storage. No trained weights can be downloaded here, so the demo
# runs --random-weights: it exercises the whole pipeline, but its output is NOT deblurred.
# For real results pass the authors' checkpoint: --weights /path/to/MIMO-UNet.pkl
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
rm -rf demo
.venv/bin/deblur samples demo/blurry --count 8
.venv/bin/deblur run demo/blurry demo/deblurred --random-weights --shard-size 4 "$@"
echo
echo "demo: inputs in demo/blurry, outputs in demo/deblurred, job ledger under demo/deblurred/_deblur/"
echo "demo: these outputs come from RANDOM weights (a smoke test). See README: 'Real weights'."
