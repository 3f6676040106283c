#!/usr/bin/env bash
# Regenerate scripts/constraints.txt: every package (transitive dependencies included) at the
# exact version installed in .venv, which is what CI tested. Run after changing a dependency in
# pyproject.toml and installing it (`bash scripts/setup.sh` installs from the constraints, so to
# move a pin: edit it here or remove the line, install, then run this script).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
{
  echo "# Exact versions of every dependency of fedzo-flwr (transitive ones included), as"
  echo "# installed and tested by CI. Used by scripts/setup.sh as pip constraints."
  echo "# Regenerate with: bash scripts/lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable --all \
    | grep -v -i -E '^(fedzo-flwr|fedzo_flwr|pip|setuptools|wheel)==' | LC_ALL=C sort -f
} > scripts/constraints.txt
echo "[lock] wrote scripts/constraints.txt ($(grep -c '==' scripts/constraints.txt) packages)"
