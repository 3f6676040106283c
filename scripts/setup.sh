#!/usr/bin/env bash
# Create .venv and install fedzo-flwr with its pinned dependencies (idempotent: re-installs
# only when pyproject.toml changed). torch 2.14.1 / torchvision 0.29.1 and flwr 1.41.0 are pinned.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.fedzo-installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing fedzo-flwr and its dependencies (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  rm -f .venv/.fedzo-installed-*
  touch "$stamp"
fi
