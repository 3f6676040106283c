#!/usr/bin/env bash
# Create .venv and install fedzo-flwr with every dependency at the exact version CI tested
# (scripts/constraints.txt pins the transitive ones too). Idempotent: re-installs only when
# pyproject.toml or the constraints changed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "[setup] fedzo-flwr needs Python >= 3.11; $python is $("$python" --version 2>&1)" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.fedzo-installed-$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing fedzo-flwr and its pinned dependencies (a few minutes the first time)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[dev]"
  rm -f .venv/.fedzo-installed-*
  touch "$stamp"
fi
