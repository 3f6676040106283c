#!/usr/bin/env bash
# Static checks, as CI runs them: ruff lint, ruff format check, mypy (strict on fedzo_flwr/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
echo "[lint] ruff check"
.venv/bin/ruff check .
echo "[lint] ruff format --check"
.venv/bin/ruff format --check .
echo "[lint] mypy"
.venv/bin/mypy
