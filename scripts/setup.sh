#!/usr/bin/env bash
# Create .venv inside the repository and install Prophet with what the tests need.
# Idempotent: re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "prophet: environment ready in $(pwd)/.venv"
