#!/usr/bin/env bash
# One lent-GPU session in one script (METHOD.md: batch the runs, bring results back under $OUT).
#   bench/gpu_session.sh kernels    GPU tests, retune the decode configs, the kernel benchmark (prophet bench) at T <= 64
#   bench/gpu_session.sh prefetch   ProphetMoE on the device vs all-resident, the pinned store, transformers (tests),
#                                   bench_prefetch (a)-(d), compute-sanitizer on a short (c)
#   bench/gpu_session.sh vllm       bench_vllm (vLLM 0.26 carried in first: ../shared/tools/gpu-vllm/README.md,
#                                   the c1, c2 calls, then this stage in the c3 call; installs it itself):
#                                   off with CUDA graphs vs Prophet's device mode (50%, same-experts prefetch)
#                                   with copy and read-through fills; VLLM_CONFIGS="..." overrides
#   bench/gpu_session.sh vllm-host  the same for host mode, eager, at 50/25/75% (the first stage before 2026-12-03)
#   bench/gpu_session.sh vllm-graphs  the same with vLLM's CUDA graphs (piecewise around Prophet's MoE op)
#   bench/gpu_session.sh device     device mode (issue 27): its tests on the GPU (exactness vs host and
#                                   all-resident, no host read), the device fill vs cudaMemcpyAsync, the
#                                   decode step as one CUDA graph at 100%/50% vs the resident graph and the
#                                   PCIe floor, compute-sanitizer memcheck + racecheck on 32 device steps
#   bench/gpu_session.sh fp8        fp8 experts (issue 28): their kernel tests on the GPU, prophet bench with fp8
#                                   experts at T 1..64 (per channel and 128x128 blocks; vs vLLM's fp8 fused_moe
#                                   when vLLM is on the path: run it after the gpu-vllm c1, c2 calls), the fp8
#                                   vs bf16 expert copy (bench_prefetch --only copy)
#   bench/gpu_session.sh fp8-a8     W8A8 (fp8 activations) vs W8A16 on the grouped path at prefill batches (OLMoE,
#                                   T 1024 and 4096), both tuned and timed side by side (issue 28's "if it is faster")
#   bench/gpu_session.sh fp8-tune   after fp8, if it missed 85% of HBM: tune fp8 launch configs (their own table
#                                   keys) for OLMoE and Mixtral at T 1 and 16, then the fp8 benchmark again there
#   bench/gpu_session.sh cpu-misses  misses computed on the CPU (issue 42): this host's DRAM read rate and CPU
#                                   expert rates (prophet bench cpu-experts; int4 too, Mixtral at batch 1), one
#                                   hybrid layer's latency on a 4-layer OLMoE-shaped stack
#   bench/gpu_session.sh cpu-misses-vllm  (vLLM carried in as for vllm) an OLMoE-sized engine with miss cpu beside
#                                   wait and all-resident, tok/s at batch 1 and 32
#   bench/gpu_session.sh stream     (vLLM carried in as for vllm) streaming experts (issue 43): an OLMoE-sized engine,
#                                   dummy weights, all-resident vs miss stream at 25%, tok/s at batch 1 and 128, the
#                                   copy engine's busy share (streamed bytes over the pinned copy rate)
#   bench/gpu_session.sh int4       int4 experts (issue 44): their kernel tests on the GPU (the vLLM-ported grid), prophet
#                                   bench with int4 experts at T 1..64, groups 128 and 32 (%HBM on int4 bytes; vs
#                                   vLLM's int4 WNA16 fused_moe when vLLM is on the path: after the gpu-vllm c1, c2)
# Uses the machine's python3 (torch + triton preinstalled there); results land in $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/prophet_gpu}
mkdir -p "$OUT"
# The device copy's git HEAD can lag the working tree: pass PROPHET_COMMIT=<local commit> when calling.
export PYTHONPATH=$PWD PROPHET_COMMIT=${PROPHET_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
$PY -c "from prophet_kernels.cli import main; main(['info'])" 2>&1 | tail -6 | tee -a "$OUT/gpu.txt"  # NUMA node of the GPU
sanitize() {  # sanitize NAME SECONDS ARGS...: memcheck and racecheck on bench_prefetch.py --small ARGS
  local name=$1 secs=$2
  shift 2
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$secs" compute-sanitizer --tool $tool --print-limit 20 \
      $PY bench/bench_prefetch.py --small "$@" --out "$OUT/sanitizer" > "$OUT/sanitizer_${name}_$tool.txt" 2>&1
    echo "sanitizer $name $tool rc=$? :: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitizer_${name}_$tool.txt" | tail -1)"
  done
}
case "${1:-kernels}" in
kernels)
  timeout 200 $PY -m pytest -q -x tests/test_gpu.py 2>&1 | tail -5 | tee "$OUT/test_gpu.txt"
  timeout 240 $PY bench/tune_moe.py --shapes olmoe mixtral --T 1 4 2>&1 | tee "$OUT/tune.txt" | grep -E "gemv|best|T=" | tail -12
  cp prophet_kernels/kernels/configs/*.json "$OUT/"
  timeout 150 $PY -m prophet_kernels.benchmark.moe --T 1 4 16 64 --no-reference --out-dir "$OUT" 2>&1 | tail -14
  ;;
prefetch)
  timeout 150 $PY -m pytest -q tests/test_layer.py tests/test_gpu.py tests/test_transformers_experts.py \
    -k "device_run or pinned_store or on_the_gpu" 2>&1 | tail -3 \
    | tee "$OUT/test_layer_device.txt"
  sanitize decode 150 --only decode --repeats 2
  timeout 120 $PY bench/bench_prefetch.py --only host --routing olmoe-heldout --out "$OUT" 2>&1 | grep -v "^{" \
    | tee "$OUT/host_time.txt" | grep "per layer call"
  timeout 120 $PY bench/bench_prefetch.py --only copy --out "$OUT" 2>&1 | tail -3
  timeout 60 $PY bench/bench_prefetch.py --only overlap --out "$OUT" 2>&1 | tail -2
  timeout 200 $PY bench/bench_prefetch.py --only decode --routing olmoe-heldout --policies lru,next-use --warmup 32 \
    --out "$OUT" 2>&1 | grep -E "^\||Error|error"
  timeout 200 $PY bench/bench_prefetch.py --only decode --routing olmoe-heldout --policies next-use --warmup 32 \
    --budget-experts 2 --out "$OUT" 2>&1 | grep -E "^\||Error|error"
  timeout 150 $PY bench/bench_prefetch.py --only decode --routing uniform --out "$OUT" 2>&1 | grep -E "^\||Error|error"
  ;;
device)
  timeout 240 $PY -m pytest -q tests/test_device_mode.py tests/test_layer.py tests/test_read_through.py \
    -k "device or gemv-T1" 2>&1 | tail -3 \
    | tee "$OUT/test_device.txt"
  timeout 200 $PY bench/bench_prefetch.py --only device --routing olmoe-heldout --repeats 20 --out "$OUT" 2>&1 \
    | grep -E "device_|Error|error" | tee "$OUT/device.txt"
  sanitize device 120 --only device --repeats 32
  ;;
fp8)
  if [ -d /tmp/gpu-vllm/site ]; then export PYTHONPATH=/tmp/gpu-vllm/site:$PWD; fi
  timeout 120 $PY -m pytest -q -x tests/test_fp8.py -k "paged_equals or contiguous or prophet_moe" 2>&1 | tail -3 \
    | tee "$OUT/test_fp8.txt"
  timeout 150 $PY -m prophet_kernels.benchmark.moe --experts fp8 --T 1 4 16 64 --no-reference --out-dir "$OUT" 2>&1 \
    | tail -10 | tee "$OUT/bench_fp8.txt"
  timeout 120 $PY -m prophet_kernels.benchmark.moe --experts fp8 --block 128 --T 1 16 --no-reference \
    --out-dir "$OUT" 2>&1 | tail -6 | tee -a "$OUT/bench_fp8.txt"
  timeout 150 $PY bench/bench_prefetch.py --only copy --out "$OUT" 2>&1 | grep -E "fp8_vs_bf16|Error|error" \
    | tee "$OUT/copy_fp8.txt"
  ;;
int4)  # int4 (w4a16) experts: correctness on the GPU, then %HBM at decode beside vLLM's own int4 fused_moe
  if [ -d /tmp/gpu-vllm/site ]; then export PYTHONPATH=/tmp/gpu-vllm/site:$PWD; fi
  timeout 120 $PY -m pytest -q -x tests/test_int4.py -k "dense_torch or contiguous" 2>&1 | tail -3 | tee "$OUT/test_int4.txt"
  timeout 150 $PY -m prophet_kernels.benchmark.moe --experts int4 --T 1 4 16 64 --no-reference --out-dir "$OUT" 2>&1 \
    | tail -10 | tee "$OUT/bench_int4.txt"
  timeout 100 $PY -m prophet_kernels.benchmark.moe --experts int4 --group 32 --T 1 16 --no-reference --out-dir "$OUT" \
    2>&1 | tail -6 | tee -a "$OUT/bench_int4.txt"
  ;;
fp8-a8)  # W8A8 vs W8A16 on the grouped path at prefill batches (OLMoE shape), timed side by side; the table goes to $OUT
  timeout 270 $PY bench/tune_moe.py --experts fp8 --shapes olmoe --T 1024 4096 --a8 all --out "$OUT/a8.json" 2>&1 \
    | tee "$OUT/tune_a8.txt" | grep -E "block_m=|-> T=" | tail -12
  ;;
fp8-tune)
  timeout 240 $PY bench/tune_moe.py --experts fp8 --shapes olmoe mixtral --T 1 16 2>&1 | tee "$OUT/tune_fp8.txt" \
    | grep -E "gemv|-> T=" | tail -8
  cp prophet_kernels/kernels/configs/*.json "$OUT/"
  timeout 120 $PY -m prophet_kernels.benchmark.moe --experts fp8 --T 1 16 --no-reference --out-dir "$OUT" 2>&1 \
    | tail -6 | tee "$OUT/bench_fp8_tuned.txt"
  ;;
vllm)  # device mode under vLLM's full CUDA graphs vs vLLM's own (KV tokens, tok/s, tokens), both fills
  if [ ! -d /tmp/gpu-vllm/site ]; then bash /tmp/gpu-vllm/install-on-device.sh > "$OUT/install.log" 2>&1 || exit 1; fi
  export PYTHONPATH=/tmp/gpu-vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
  timeout 540 $PY bench/bench_vllm.py --configs ${VLLM_CONFIGS:-off-graphs prophet-device:0.5:same \
    prophet-device:0.5:same:read-through} --timeout 170 --out-dir "$OUT" 2>&1 | tail -10
  ;;
vllm-host)  # host mode, eager, at three buffers (the old first stage)
  if [ ! -d /tmp/gpu-vllm/site ]; then bash /tmp/gpu-vllm/install-on-device.sh > "$OUT/install.log" 2>&1 || exit 1; fi
  export PYTHONPATH=/tmp/gpu-vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
  timeout 570 $PY bench/bench_vllm.py --configs off prophet:0.5 prophet:0.25 prophet:0.75 --timeout 150 \
    --out-dir "$OUT" 2>&1 | tail -12
  ;;
vllm-graphs)
  if [ ! -d /tmp/gpu-vllm/site ]; then bash /tmp/gpu-vllm/install-on-device.sh > "$OUT/install.log" 2>&1 || exit 1; fi
  export PYTHONPATH=/tmp/gpu-vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
  timeout 570 $PY bench/bench_vllm.py --configs off-graphs prophet-graphs:0.5 prophet-graphs:0.5:gate --timeout 180 \
    --out-dir "$OUT" 2>&1 | tail -10
  ;;
cpu-misses)  # issue 42 (<= 3 min): the host's rates first (they decide the split), then one hybrid layer
  timeout 80 $PY -m prophet_kernels.cli bench cpu-experts --shapes olmoe mixtral --batch 1 16 --backends native torch \
    --dtypes bf16 --reps 2 --out-dir "$OUT" 2>&1 | tail -10 | tee "$OUT/cpu_experts.txt"
  # int4 experts on this host's CPU (issue 44): Prophet's int4 rows beside torch's int4 op, batch 1
  timeout 40 $PY -m prophet_kernels.cli bench cpu-experts --shapes mixtral --batch 1 --backends native torch-int4 \
    --dtypes bf16 int4 --reps 3 --out-dir "$OUT" 2>&1 | tail -5 | tee "$OUT/cpu_experts_int4.txt"
  timeout 60 $PY bench/bench_hybrid_layer.py --calls 60 --out-dir "$OUT" 2>&1 | tail -8 | tee "$OUT/hybrid_layer.txt"
  ;;
cpu-misses-vllm)  # issue 42 (<= 4 min, vLLM carried in as for vllm): OLMoE all-resident vs misses waiting vs on the CPU
  if [ ! -d /tmp/gpu-vllm/site ]; then bash /tmp/gpu-vllm/install-on-device.sh > "$OUT/install.log" 2>&1 || exit 1; fi
  export PYTHONPATH=/tmp/gpu-vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
  timeout 230 $PY bench/bench_vllm.py --configs off prophet:0.25 prophet-cpu:0.25 --timeout 75 \
    --out-dir "$OUT" 2>&1 | tail -8
  ;;
stream)  # issue 43 (<= 4 min, vLLM carried in as for vllm): all-resident vs streaming at 25%, batch 1 and 128
  if [ ! -d /tmp/gpu-vllm/site ]; then bash /tmp/gpu-vllm/install-on-device.sh > "$OUT/install.log" 2>&1 || exit 1; fi
  export PYTHONPATH=/tmp/gpu-vllm/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
  timeout 220 $PY bench/bench_vllm.py --configs off prophet-stream:0.25 --weights dummy --batches 1,128 \
    --timeout 105 --out-dir "$OUT" 2>&1 | tail -8
  ;;
esac
