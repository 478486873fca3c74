#!/usr/bin/env bash
# nsys timeline of the ProphetMoE decode step (bench_prefetch.py part c) with NVTX ranges:
# route / ensure_resident / experts / predict / prefetch and demand copies per expert.
#   bench/nsys_prefetch.sh [OUT_PREFIX]     -> OUT_PREFIX.nsys-rep (default prophet_prefetch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
nsys profile --trace=cuda,nvtx,osrt --force-overwrite=true -o "${1:-prophet_prefetch}" \
  "$PY" bench/bench_prefetch.py --only decode --repeats 5 --out "${TMPDIR:-/tmp}"
