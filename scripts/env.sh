# Environment for running Flower offline here; sourced by the other scripts.
# Offline switches (no telemetry, no update check, no per-run dependency install).
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1
# Ray (the simulation's actors) binds to and talks over 127.0.0.1 only; without this it picks
# the machine's network address for its own daemons.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
_fedzo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_fedzo_cache="${XDG_CACHE_HOME:-$HOME/.cache}/fedzo-flwr"
# Flower's home (config, local SuperLink state, installed app bundles): outside the app folder.
export FLWR_HOME="${FLWR_HOME:-$_fedzo_cache/flwr-home}"
export MPLCONFIGDIR="${MPLCONFIGDIR:-$_fedzo_cache/matplotlib}"
# Data: $FEDZO_DATA_DIR, else ../shared/data beside the checkout.
if [ -z "${FEDZO_DATA_DIR:-}" ] && [ -d "$_fedzo_root/../shared/data" ]; then
  FEDZO_DATA_DIR="$(cd "$_fedzo_root/../shared/data" && pwd)"
fi
export FEDZO_DATA_DIR="${FEDZO_DATA_DIR:-}"
export FEDZO_OUTPUT_DIR="${FEDZO_OUTPUT_DIR:-$_fedzo_root/outputs}"
mkdir -p "$FLWR_HOME" "$MPLCONFIGDIR"
export PATH="$_fedzo_root/.venv/bin:$PATH"
