#!/usr/bin/env bash
# The main job: set up .venv, then run the default `flwr run .` simulation on CIFAR-10
# (10 simulated clients, Dirichlet alpha=0.5, LeNet-5 pruned on the server with data-free NTK-SAP,
# forward-only clients). Extra arguments are run-config overrides, e.g.
#   bash scripts/run.sh 'num-server-rounds=50 density=0.2'
# Environment: FEDZO_DATA_DIR (default ../shared/data), FEDZO_NUM_CLIENTS (default 10),
# FEDZO_OUTPUT_DIR (default ./outputs).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# shellcheck source=scripts/env.sh
source scripts/env.sh
if [ -z "$FEDZO_DATA_DIR" ]; then
  echo "No data folder: put cifar10.npz in ../shared/data or set FEDZO_DATA_DIR" >&2
  exit 2
fi
python scripts/stop_local_superlink.py   # a stale SuperLink would keep an old environment
trap 'python scripts/stop_local_superlink.py' EXIT
echo "[fedzo] data: $FEDZO_DATA_DIR; outputs: $FEDZO_OUTPUT_DIR; Flower home: $FLWR_HOME"
flwr run . --stream \
  --federation-config "num-supernodes=${FEDZO_NUM_CLIENTS:-10} client-resources-num-cpus=1" \
  --run-config "data-dir=\"$FEDZO_DATA_DIR\" output-dir=\"$FEDZO_OUTPUT_DIR\" ${*:-}"
