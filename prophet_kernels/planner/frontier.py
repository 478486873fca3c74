"""The frontier: where Prophet wins and where it does not (``prophet plan --frontier``).

For a model, a GPU and a batch, every way to hold the routed experts, at the GPU bytes it takes:

    resident-{bf16,fp8,int4}      every expert on the GPU in that dtype (where it fits): the simplest
                                  alternative at the same GPU bytes
    prophet-{bf16,fp8,int4} c     Prophet today: a buffer of c of the experts on the GPU, the rest in
                                  pinned host memory; a miss waits for its copy (int4: the store's rows,
                                  groups of 128 with fp32 scales; quality: the study's int4, groups of 32);
                                  every Prophet row pays host mode's work per layer (``HOST_US_PER_LAYER``,
                                  Prophet's default mode: device mode would not, not measured on a GPU)
    prophet-stream-{bf16,fp8} c   Prophet with miss: stream (built): a buffer of c (ring: the ring alone) whose
                                  non-resident experts are copied once per layer per step, one layer ahead
                                  (the schedule's own replay, ``routing.simulator.stream_step``); batch >= 16
    prophet-cpu[-int4] T c        Prophet with miss: cpu (built): a bf16 (int4) buffer of c (0: a staging ring of
                                  one layer's experts) whose misses are split between the link and host T's CPU
                                  by ProphetMoE's own MissCost (simulated with T's rates in that dtype: ``cpu_targets``)
    cpu-moe-{bf16,int4} T N/L     llama.cpp's --n-cpu-moe N (KTransformers when N = L): the routed experts of N
                                  MoE layers in host T's memory and computed by its CPU, every time, the rest
                                  resident; no copies (analytic: ``cpu_moe_seconds``); N = L, and the smallest
                                  N whose rest fits with ``CPU_MOE_CONTEXT`` tokens per sequence
    {stand-in,substitute,skip,skip-renorm,host-cpu} c
                                  a bf16 buffer of c whose misses do not wait (simulated, no kernels yet):
                                  the expert's int4 copy, resident for every expert beside the buffer;
                                  the token's best-scoring landed expert; nothing (weights renormalised
                                  or not); the host CPU computing it

Columns: expert GPU bytes, host bytes, KV tokens left and the context each of the B sequences can hold (a
row fits when each holds its prompt, ``PROMPT`` tokens or --prompt, and one more token), predicted decode
tokens/s, one prompt's prefill tokens/s and time to first token (``prefill_seconds``), held-out quality. Every input
is a measurement or a stated constant (``CONSTANTS``, ``GPU_CONSTANTS``):

    decode step    L x t_layer + stall + fallback time, t_layer = t_other + U(B) x expert bytes / (eff x HBM):
                   U(B) the unique experts per layer at batch B on the model's realistic trace (measured),
                   eff the paged MoE kernel's measured fraction of HBM at decode, t_other the rest of a
                   layer (attention, norms, launches: fixed part from OLMoE's vLLM decode on the H100
                   minus its MoE kernel, plus the layer's non-expert bytes at the HBM rate); plus the step's
                   KV reads, B sequences of the prompt at the HBM rate (attention's compute not modelled)
    stall          Prophet's waiting misses: the trace simulator (copy engine at the GPU's PCIe rate,
                   the layer time above), on the model's realistic held-out trace
    fallbacks      no-wait: the simulator's counts; the stand-in's int4 bytes at the HBM rate; the host
                   CPU at ``cpu_gbps`` (an estimate) beside the GPU plus a round trip
    KV tokens      (GPU memory x 0.9 - non-expert weights - expert GPU bytes - workspace) / KV bytes per
                   token (the planner's memory model, bf16 KV)
    quality        held-out bits per byte of the routing-study model of that shape, served that way
                   (``routing.quality``), relative to its fp32 experts

The inputs that take hours (simulations, quality runs) are measured by ``bench/frontier_inputs.py``
into ``bench/results/frontier_inputs.jsonl``; this module only does the arithmetic.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .catalog import MLA, MoA, ModelSpec, get_gpu, get_model
from .memory import (ServingConfig, _kv_tokens, count_params, expert_bytes, int4_bytes, kv_bytes_per_token,
                     routed_expert_params, state_elems_per_sequence, weight_bytes, workspace_bytes)

MODELS = ("OLMoE-1B-7B", "Mixtral-8x7B", "Qwen3-30B-A3B")
SHAPE_OF = {"OLMoE-1B-7B": "olmoe", "Mixtral-8x7B": "mixtral", "Qwen3-30B-A3B": "qwen3"}
GPUS_DEFAULT = ("H100-80GB", "A100-80GB", "RTX4090-24GB")
BATCHES = (1, 4, 16)
LARGE_BATCHES = (64, 128, 256)  # where streaming every non-resident expert per step pays (resident, wait, stream rows)
STREAM_BATCHES = (16,) + LARGE_BATCHES
CAPACITIES = (0.125, 0.25, 0.5, 0.75)
NO_WAIT = ("stand-in", "substitute", "skip", "skip-renorm", "host-cpu")
INPUTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "frontier_inputs.jsonl"

# Measured on the H100 (PERF_NOTES, bench/results/bench_moe.jsonl, environment.md):
CONSTANTS = {
    "olmoe_layer_us_b1": 1e6 / 512 / 16,  # vLLM 0.26 greedy decode of OLMoE-1B-7B, CUDA graphs: 512 tok/s, 16 layers
    "olmoe_moe_us_b1": 39.0,  # Prophet's paged MoE kernel, OLMoE shape, T=1 (bench_moe, tuned)
    "moe_hbm_fraction": 33.5595 / 39.0,  # that kernel's share of HBM at decode: its 33.56 us floor / 39.0 us
    "h100_hbm_gbps": 2999.5,  # device-to-device copy, bench_moe's hbm_GBps
    "h100_hbm_datasheet_gbps": 3350.0,
    "h100_matmul_tflops": 680.47,  # bench_moe's matmul_TFLOPs: a bf16 matmul on the H100 (2026-11-22)
    # Prophet's paged grouped GEMM at prefill, Mixtral shape, T = 4,096, bf16: 510.3 TFLOP/s (bench_moe, 2026-11-22)
    "moe_prefill_fraction": 510.29 / 680.47,
    "cpu_gbps": 100.0,  # ESTIMATE (not measured): host memory bandwidth a CPU expert GEMV reaches
    "host_round_trip_us": 20.0,  # ESTIMATE: activations to the host and the result back, one layer
}

# Every Prophet row (waiting, streaming, miss: cpu): the host's work per layer call in host mode, Prophet's default,
# measured on the H100's host with every expert resident (PERF_NOTES, issue 3, 2026-11-22, before later host-path
# fixes): serial with the GPU. (The simulations ran at the layer time without it: added after, the stall is not
# shortened by the longer layer.)
HOST_US_PER_LAYER = 260.0
CPU_CALL_US = 40.0  # a layer call's CPU part: submit + join of an empty call, 24-42 us measured on this VM
# The hosts a prophet-cpu row is computed for. "this-vm": this development machine's measured rates
# (prophet bench cpu-experts rows: 2 Zen 4 vCPUs; its DRAM is below an H100's PCIe: such a row's link is
# capped at the DRAM rate, a host cannot copy faster than it reads). The others are ESTIMATES: their DRAM
# rate is stated, the CPU reaches the fraction of it this VM's native backend reaches at batch 1 (median
# of its rows), and each core computes what one of this VM's cores does at batch 64 (best shape).
CPU_TARGETS = {
    "this-vm": None,
    "desktop-60": {"dram_gbps": 60.0, "cores": 16,
                   "source": "ESTIMATE: two-channel DDR5-5600 (89.6 GB/s peak, ~60 read), 16 Zen 4 cores"},
    "server-200": {"dram_gbps": 200.0, "cores": 32,
                   "source": "ESTIMATE: one socket of 8-channel DDR5-4800 (307 GB/s peak, ~200 read), 32 Zen 4 cores"},
}


def cpu_targets(shape: str, bench_rows: list[dict] | None = None, dtype: str = "bf16") -> dict[str, dict]:
    """Per target host: cpu_gbps, cpu_gflops (and gflops_per_core, measured here), dram_gbps, call_us and where
    they come from (``CPU_TARGETS``),
    from this machine's ``prophet bench cpu-experts`` rows of the native backend in ``dtype`` (bf16, or
    int4: the store's int4 rows; cpu_gbps then counts int4 bytes) (``bench_rows``: default the committed ones)."""
    import statistics

    if bench_rows is None:
        path = INPUTS.parent / "cpu_experts.jsonl"
        bench_rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    native = [r for r in bench_rows if r["backend"] == "native" and r["dtype"] == dtype]
    if not native:
        raise FileNotFoundError(f"no native {dtype} rows of prophet bench cpu-experts (bench/results/cpu_experts.jsonl)")
    one = [r for r in native if r["batch"] == 1]
    eff = statistics.median(r["gbps"] / r["read_gbps"] for r in one)
    per_core = max(r["gflops"] / r["threads"] for r in native if r["batch"] == max(x["batch"] for x in native))
    mine = [r for r in one if r["shape"] == shape] or one
    out = {}
    for name, spec in CPU_TARGETS.items():
        if spec is None:
            out[name] = {"cpu_gbps": statistics.median(r["gbps"] for r in mine),
                         "dram_gbps": statistics.median(r["read_gbps"] for r in mine),
                         "cpu_gflops": per_core * mine[0]["threads"], "call_us": CPU_CALL_US, "gflops_per_core": per_core,
                         "source": f"measured on {mine[0]['device']} ({mine[0]['threads']} threads, {mine[0]['date'][:10]})"}
        else:
            out[name] = {"cpu_gbps": eff * spec["dram_gbps"], "dram_gbps": spec["dram_gbps"],
                         "cpu_gflops": per_core * spec["cores"], "call_us": CPU_CALL_US, "gflops_per_core": per_core,
                         "source": f"{spec['source']}; {eff:.0%} of DRAM and {per_core:.0f} GFLOP/s per core as "
                                   "measured here"}
    return out


GPU_CONSTANTS = {  # HBM and pinned host-to-device rates per GPU, and where each comes from
    "H100-80GB": {"hbm_gbps": CONSTANTS["h100_hbm_gbps"], "pcie_gbps": 52.7, "tflops": CONSTANTS["h100_matmul_tflops"],
                  "source": "measured on an H100 80GB HBM3 (HBM: D2D copy; PCIe: pinned 12.6 MB copies; a bf16 matmul)"},
    "RTX4090-24GB": {"hbm_gbps": 1008.0 * CONSTANTS["h100_hbm_gbps"] / CONSTANTS["h100_hbm_datasheet_gbps"],
                     "pcie_gbps": 25.0, "tflops": 165.2 * CONSTANTS["h100_matmul_tflops"] / 989.4,
                     "source": "NOT measured: datasheet 1,008 GB/s x the H100's measured/datasheet ratio; PCIe 4.0 "
                               "x16 pinned copies assumed at 25 GB/s"},
}


# Host-to-device rates assumed for the catalogue GPUs without a measurement, by PCIe generation (x16,
# pinned copies): 3.0 ~12 GB/s, 4.0 ~25 GB/s (the RTX 4090's assumption above), 5.0 the H100's measured 52.7.
PCIE_ASSUMED_GBPS = {"V100-32GB": 12.0, "A100-40GB": 25.0, "A100-80GB": 25.0, "L40S-48GB": 25.0,
                     "H200-141GB": GPU_CONSTANTS["H100-80GB"]["pcie_gbps"]}


def gpu_constants(gpu: str) -> dict:
    """HBM and PCIe rates of a catalogue GPU: measured (``GPU_CONSTANTS``), else NOT measured: its
    datasheet bandwidth x the H100's measured/datasheet ratio, and ``PCIE_ASSUMED_GBPS``."""
    g = get_gpu(gpu)
    if g.name in GPU_CONSTANTS:
        return GPU_CONSTANTS[g.name]
    if g.name not in PCIE_ASSUMED_GBPS:
        raise ValueError(f"no HBM/PCIe constants for {g.name}; the frontier knows "
                         f"{', '.join([*GPU_CONSTANTS, *PCIE_ASSUMED_GBPS])}")
    ratio = CONSTANTS["h100_hbm_gbps"] / CONSTANTS["h100_hbm_datasheet_gbps"]
    pcie = PCIE_ASSUMED_GBPS[g.name]
    return {"hbm_gbps": g.hbm_gbps * ratio, "pcie_gbps": pcie,
            "tflops": g.bf16_tflops * CONSTANTS["h100_matmul_tflops"] / get_gpu("H100-80GB").bf16_tflops,
            "source": f"NOT measured: datasheet {g.hbm_gbps:,.0f} GB/s and {g.bf16_tflops:g} TFLOP/s x the H100's "
                      f"measured/datasheet ratios ({ratio:.3f}); pinned copies assumed at {pcie} GB/s"}


NONEXPERT_DTYPES = ("bf16", "fp8", "int4")


def check_nonexpert_dtype(dtype: str) -> None:
    if dtype not in NONEXPERT_DTYPES:
        raise ValueError(f"non-expert dtype {dtype!r}: one of {', '.join(NONEXPERT_DTYPES)}")


def nonexpert_bytes(m: ModelSpec, dtype: str = "bf16") -> int:
    """GPU bytes of everything but the routed experts: bf16, or the linear layers (attention, dense and
    shared MLPs) in fp8 / int4 as a quantized checkpoint holds them (``memory.weight_bytes``: embeddings,
    LM head, routers and norms stay bf16)."""
    check_nonexpert_dtype(dtype)
    p = count_params(m)
    p.pop("routed_experts")
    return weight_bytes(p, dtype)


def int4_expert_bytes(m: ModelSpec) -> int:
    return int4_bytes(routed_expert_params(m))


def one_expert_bytes(m: ModelSpec, dtype: str) -> int:
    return int4_expert_bytes(m) if dtype == "int4" else expert_bytes(m, dtype)


# The routing-study shapes (experts E, top-k; ``routing.traces.train.SHAPES``, tested equal): a catalogue
# model without its own trace takes its routing statistics from the shape of the nearest sparsity k / E
STUDY_SHAPES = {"olmoe": (64, 8), "mixtral": (8, 2), "qwen3": (128, 8)}


def routing_proxy(m: ModelSpec) -> tuple[str, float]:
    """(shape, unit): the routing-study trace that stands in for `m`'s routing, and how many of `m`'s
    experts one of the trace's experts stands for (k_m / k_shape: a token then reads k_m of `m`'s experts'
    bytes). A study model is its own shape (unit 1); another takes the shape of the nearest sparsity
    k / E (then the nearest k): its unique experts per layer at batch B are the shape's x unit, and a
    buffer of a fraction c of its experts hits as the shape's buffer of c does."""
    import math

    if m.name in SHAPE_OF:
        return SHAPE_OF[m.name], 1.0
    k, e = m.moe.top_k, m.moe.experts
    name = min(STUDY_SHAPES, key=lambda s: (abs(math.log(k / e * STUDY_SHAPES[s][0] / STUDY_SHAPES[s][1])),
                                            abs(math.log(k / STUDY_SHAPES[s][1]))))
    return name, k / STUDY_SHAPES[name][1]


def unique_experts(m: ModelSpec, batch: int, inputs: list[dict]) -> float | None:
    """Unique experts per MoE layer of `m` at `batch`: measured on its study trace, or its routing
    proxy's x unit (at most E and batch x k); None without a measured row at that batch."""
    shape, unit = routing_proxy(m)
    row = _pick(inputs, kind="unique", shape=shape, batch=batch)
    if row is None:
        return None
    return min(float(m.moe.experts), batch * m.moe.top_k, row["unique_per_layer"] * unit)


# cpu-moe rows: the context each sequence must hold when N is chosen as the smallest that fits (llama.cpp
# users size --n-cpu-moe to their context; this is the one the table sizes it for)
CPU_MOE_CONTEXT = 4096


def expert_flops(m: ModelSpec) -> int:
    """FLOPs of one token through one routed expert (2 x its weights)."""
    return 2 * routed_expert_params(m)


def nonexpert_layer_bytes(m: ModelSpec, dtype: str = "bf16") -> float:
    """One MoE layer's share of the non-expert weights (bf16, or ``nonexpert_bytes``' fp8 / int4), the
    embedding rows aside (a token reads one row)."""
    return (nonexpert_bytes(m, dtype) - m.vocab * m.hidden * 2) / m.moe_layers


def cpu_layer_seconds(m: ModelSpec, unique: float, batch: int, cpu: dict, expert_bytes_cpu: float) -> float:
    """One MoE layer's routed experts on the host CPU: `unique` experts of `expert_bytes_cpu` read at
    cpu_gbps, or batch x k tokens' FLOPs at cpu_gflops, whichever is longer, plus the call's overhead
    (call_us: handing the activations over and back)."""
    read = unique * expert_bytes_cpu / (cpu["cpu_gbps"] * 1e9)
    compute = batch * m.moe.top_k * expert_flops(m) / (cpu["cpu_gflops"] * 1e9)
    return max(read, compute) + cpu["call_us"] * 1e-6


def cpu_moe_seconds(m: ModelSpec, gpu: str, batch: int, unique: float, n_cpu: int, cpu: dict, dtype: str = "bf16",
                    gpu_rates: dict | None = None, weight_bpp: float | None = None, nonexpert_dtype: str = "bf16") -> float:
    """A decode step with the routed experts of `n_cpu` MoE layers on the host CPU (llama.cpp's
    --n-cpu-moe; KTransformers when n_cpu = L) and the rest resident on the GPU in `dtype`: every
    layer's non-expert part on the GPU (``layer_seconds`` with no expert), the resident layers' experts
    at the kernel's share of HBM, the CPU layers' at ``cpu_layer_seconds``; serial, as those run.
    `weight_bpp`: every weight (GPU and CPU) at that many bytes per parameter (``layer_seconds``)."""
    per_expert = one_expert_bytes(m, dtype) if weight_bpp is None else routed_expert_params(m) * weight_bpp
    return (cpu_moe_gpu_seconds(m, gpu, batch, unique, n_cpu, dtype, gpu_rates, weight_bpp, nonexpert_dtype)
            + n_cpu * cpu_layer_seconds(m, unique, batch, cpu, per_expert))


def cpu_moe_gpu_seconds(m: ModelSpec, gpu: str, batch: int, unique: float, n_cpu: int, dtype: str = "bf16",
                        gpu_rates: dict | None = None, weight_bpp: float | None = None,
                        nonexpert_dtype: str = "bf16") -> float:
    """The GPU's part of ``cpu_moe_seconds``: every layer's non-expert part, and the resident layers' experts."""
    L = m.moe_layers
    if not 0 <= n_cpu <= L:
        raise ValueError(f"{m.name}: {n_cpu} CPU MoE layers; it has {L}")
    return (L - n_cpu) * layer_seconds(m, gpu, unique, dtype, gpu_rates, weight_bpp, batch, nonexpert_dtype) + n_cpu * (
        layer_seconds(m, gpu, 0, dtype, gpu_rates, weight_bpp, batch, nonexpert_dtype))


def cpu_moe_layers(m: ModelSpec, gpu: str, batch: int, dtype: str, context: int = CPU_MOE_CONTEXT,
                   memory_bytes: int | None = None, nonexpert_dtype: str = "bf16") -> int | None:
    """The smallest N of --n-cpu-moe N whose resident rest leaves KV for `batch` sequences of `context`
    tokens (None: not even N = L does)."""
    per_layer = m.moe.experts * one_expert_bytes(m, dtype)
    for n in range(m.moe_layers + 1):
        free = kv_free_bytes(m, gpu, (m.moe_layers - n) * per_layer, memory_bytes=memory_bytes,
                             nonexpert_dtype=nonexpert_dtype)
        if context_per_sequence(m, free, batch) >= context:
            return n
    return None


PREFILL_CHUNK = 8192  # vLLM's max_num_batched_tokens: a long prompt is prefilled in chunks of this many tokens
PROMPT = 1024  # the prompt each sequence holds (the frontier's --prompt): prefill, its KV reads in decode, fits


def prefill_seconds(m: ModelSpec, gpu: str, prompt: int, dtype: str = "bf16", copied: float = 0.0, n_cpu: int = 0,
                    cpu: dict | None = None, rates: dict | None = None) -> float:
    """Time to prefill one prompt of `prompt` tokens, in chunks of ``PREFILL_CHUNK``. Per chunk and MoE layer:
    its FLOPs (non-expert weights and attention over the context so far at the GPU's matmul rate, ``tflops``;
    the experts at the paged grouped GEMM's measured share of it) against the copy of `copied` of the layer's
    experts at the PCIe rate, one layer ahead (a chunk's tokens touch every expert: Prophet's non-resident
    experts are each copied once per chunk), whichever is longer. `n_cpu` layers' experts live on the host
    (cpu-moe): each such layer runs its non-expert part on the GPU and its experts either on the host CPU
    (cpu_gflops) or copied to the GPU for the chunk, whichever is faster (KTransformers computes them on
    the CPU; llama.cpp copies a large batch's weights)."""
    rates = rates or gpu_constants(gpu)
    flops, pcie = rates["tflops"] * 1e12, rates["pcie_gbps"] * 1e9
    L, E, k = m.moe_layers, m.moe.experts, m.moe.top_k
    a = m.attention
    qk, v = (a.qk_nope_dim + a.qk_rope_dim, a.v_head_dim) if isinstance(a, MLA) else (a.head_dim, a.head_dim)
    heads = a.top_k * a.kv_heads if isinstance(a, MoA) else a.heads  # (MoA: the heads a token's experts run)
    dense_params = nonexpert_layer_bytes(m) / 2
    expert_flops_token = k * expert_flops(m)
    copy = E * one_expert_bytes(m, dtype) / pcie
    total, done = 0.0, 0
    while done < prompt:
        c = min(PREFILL_CHUNK, prompt - done)
        rest = (2 * c * dense_params + 2 * c * (done + c / 2) * heads * (qk + v)) / flops
        experts = c * expert_flops_token / (CONSTANTS["moe_prefill_fraction"] * flops)
        total += (L - n_cpu) * max(rest + experts, copied * copy)
        if n_cpu:
            total += n_cpu * (rest + min(c * expert_flops_token / (cpu["cpu_gflops"] * 1e9), copy + experts))
        done += c
    return total


def kv_read_seconds(m: ModelSpec, gpu: str, batch: int, context: int, rates: dict | None = None) -> float:
    """A decode step's reads of the KV cache: `batch` sequences of `context` tokens (sliding-window layers: at
    most their window) at the HBM rate."""
    return batch * kv_bytes_per_sequence(m, context) / ((rates or gpu_constants(gpu))["hbm_gbps"] * 1e9)


def kv_bytes_per_sequence(m: ModelSpec, context: int) -> int:
    """The bf16 KV and state one sequence of `context` tokens holds (windowed layers: up to their window)."""
    return context * kv_bytes_per_token(m, "bf16") + state_elems_per_sequence(m, context) * 2


def context_per_sequence(m: ModelSpec, free_bytes: int, batch: int) -> int:
    """The longest context each of `batch` sequences can hold in `free_bytes` of KV cache (0: none)."""
    per_token, fixed = kv_bytes_per_token(m, "bf16"), state_elems_per_sequence(m, 0) * 2  # (Mamba, DeltaNet state)
    if free_bytes < batch * fixed:
        return 0
    lo, hi = 0, (free_bytes // batch - fixed) // per_token  # exact without windowed layers, else a bound
    if not any(layer.window for layer in m.layers):
        return hi
    while lo < hi:  # the largest c with batch x kv_bytes_per_sequence(c) <= free_bytes
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if batch * kv_bytes_per_sequence(m, mid) <= free_bytes else (lo, mid - 1)
    return lo


@functools.cache
def fixed_layer_seconds() -> float:
    """The part of a decode layer that is neither weight bytes nor FLOPs (launches, norms, short attention):
    OLMoE's measured vLLM layer on the H100, less its MoE kernel and its non-expert bytes at the HBM rate."""
    c = CONSTANTS
    return ((c["olmoe_layer_us_b1"] - c["olmoe_moe_us_b1"]) * 1e-6
            - nonexpert_layer_bytes(get_model("OLMoE-1B-7B")) / (c["h100_hbm_gbps"] * 1e9))


def layer_seconds(m: ModelSpec, gpu: str, unique: float, dtype: str = "bf16", rates: dict | None = None,
                  weight_bpp: float | None = None, batch: int = 1, nonexpert_dtype: str = "bf16") -> float:
    """One decode layer at a batch whose layer calls need `unique` experts (module docstring); `rates`:
    the GPU's (``gpu_constants``), given to override the catalogue's; `weight_bpp`: every weight at that
    many bytes per parameter instead of bf16 non-expert weights and `dtype` experts; `batch`: its tokens'
    FLOPs bound the non-expert part (at the GPU's matmul rate) and the experts' (at the grouped GEMM's
    measured share of it) where they take longer than the bytes (batch 1, the default: never); `nonexpert_dtype`:
    the non-expert weights' (``nonexpert_bytes``)."""
    c = CONSTANTS
    rates = rates or gpu_constants(gpu)
    hbm, flops = rates["hbm_gbps"] * 1e9, rates["tflops"] * 1e12
    if weight_bpp is not None:  # every weight at weight_bpp bytes per parameter (a GGUF file's average)
        rest, experts = nonexpert_layer_bytes(m) * weight_bpp / 2, unique * routed_expert_params(m) * weight_bpp
    else:
        rest, experts = nonexpert_layer_bytes(m, nonexpert_dtype), unique * one_expert_bytes(m, dtype)
    rest_flops = 2 * batch * nonexpert_layer_bytes(m) / 2  # (bf16 bytes / 2: the parameters)
    expert_flops_ = batch * m.moe.top_k * expert_flops(m) if unique else 0  # (0: none on the GPU)
    return (fixed_layer_seconds() + max(rest / hbm, rest_flops / flops)
            + max(experts / (c["moe_hbm_fraction"] * hbm), expert_flops_ / (c["moe_prefill_fraction"] * flops)))


def kv_free_bytes(m: ModelSpec, gpu: str, expert_gpu_bytes: int, util: float = 0.9, memory_bytes: int | None = None,
                  nonexpert_dtype: str = "bf16") -> int:
    """The GPU bytes left for the KV cache (negative: the weights do not fit)."""
    cfg = ServingConfig(gpu_memory_utilization=util)
    return (int((memory_bytes or get_gpu(gpu).memory_bytes) * util) - nonexpert_bytes(m, nonexpert_dtype)
            - expert_gpu_bytes - workspace_bytes(m, cfg))


def kv_tokens(m: ModelSpec, gpu: str, expert_gpu_bytes: int, util: float = 0.9, memory_bytes: int | None = None) -> int:
    """Tokens of full-attention KV the free bytes hold (the figure vLLM logs as its KV cache size)."""
    return _kv_tokens(kv_free_bytes(m, gpu, expert_gpu_bytes, util, memory_bytes), kv_bytes_per_token(m, "bf16"))


# Catalogue models the vLLM plugin serves (integration.settings.MODEL_FAMILIES, tested); the others' rows say
# why not: what the frontier predicts for them is what Prophet would give once their family is served
SERVED = {"OLMoE-1B-7B", "Mixtral-8x7B", "Mixtral-8x22B", "Qwen3-30B-A3B", "Qwen3-235B-A22B", "Qwen1.5-MoE-A2.7B",
          "Qwen2-57B-A14B", "DeepSeek-V2", "DeepSeek-V2-Lite"}
NOT_SERVED_WHY = {
    "DeepSeek-V3": "biased grouped routing (noaux_tc) not served by Prophet yet",
    "Kimi-K2": "DeepSeek-V3's biased grouped routing, not served by Prophet yet",
    "Jamba-1.5-Large": "Mamba layers: a hybrid family Prophet does not serve yet",
    "JetMoE-8B": "mixture-of-attention family not served by Prophet yet",
    "GLM-4.5": "GLM-4.5's biased grouped routing (noaux_tc) not served by Prophet yet",
    "GLM-4.5-Air": "GLM-4.5's biased grouped routing (noaux_tc) not served by Prophet yet",
    "gpt-oss-120b": "attention sinks, MXFP4 experts with biases: not served by Prophet yet",
    "gpt-oss-20b": "attention sinks, MXFP4 experts with biases: not served by Prophet yet",
    "Qwen3-Next-80B-A3B": "Gated DeltaNet (linear attention) layers: a hybrid family Prophet does not serve yet",
    "Llama-4-Scout": "top-1 sigmoid routing on the expert's input, chunked attention: not served by Prophet yet",
}


def served(m: ModelSpec) -> str:
    """'' where the vLLM plugin serves `m`'s family, else why not (the row is then a prediction for a family
    not served yet)."""
    if m.name in SERVED:
        return ""
    if m.encoder_decoder:
        return "encoder-decoder: not served by Prophet (vLLM serves decoder-only MoE)"
    return "not served yet: " + NOT_SERVED_WHY.get(m.name, f"the {m.family} family is not one of the plugin's")


@dataclass
class Row:
    model: str
    gpu: str
    batch: int
    config: str  # resident-bf16, prophet-fp8 25%, substitute 50%, cpu-moe-int4 server-200 32/32, ...
    kind: str  # resident | prophet | prophet-stream | prophet-cpu | cpu-moe | no-wait
    expert_dtype: str
    capacity: float | None
    expert_gpu_bytes: int
    host_bytes: int  # pinned host memory the experts take (0: all on the GPU)
    kv_tokens: int
    context_tokens: int  # KV tokens per sequence at this batch: the longest context each of the B can reach
    fits: bool
    step_ms: float | None  # predicted decode step (with the KV reads of B sequences of the prompt)
    tokens_per_s: float | None
    prefill_tok_s: float | None  # one prompt's prefill (``prefill_seconds``)
    ttft_s: float | None  # time to first token: that prefill
    ready_hit_rate: float | None  # experts landed in time (resident rows: 1)
    bits_per_byte: float | None  # the routing-study model's held-out quality, served this way
    quality_loss_pct: float | None  # vs its fp32 experts (study models), vs its published checkpoint (others)
    routing: str  # whose routing the hit rates and unique experts come from
    served: str  # '' where Prophet serves the family, else why not
    missing: str  # '' where tokens/s is computed, else why not
    inputs: dict  # what each number came from


def read_inputs(path: Path = INPUTS) -> list[dict]:
    if not Path(path).exists():
        raise FileNotFoundError(f"no frontier inputs at {path}: run bench/frontier_inputs.py (hours on 2 cores)")
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _pick(inputs, **match):
    for r in inputs:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


MODEL_OF_SHAPE = {v: k for k, v in SHAPE_OF.items()}


def input_model(row: dict) -> str | None:
    """The catalogue model a simulation row is for: its ``model``, else its study shape's model."""
    return row.get("model") or MODEL_OF_SHAPE.get(row.get("shape"))


def frontier(models=MODELS, gpus=GPUS_DEFAULT, batches=BATCHES + LARGE_BATCHES,
             inputs: list[dict] | None = None, cpu_moe: tuple[int, ...] | None = None, hbm_gbps: float | None = None,
             pcie_gbps: float | None = None,
             memory_gib: float | None = None, cpu_gbps: float | None = None, cpu_gflops: float | None = None,
             prompt: int = PROMPT, nonexpert_dtype: str = "bf16") -> list[Row]:
    """Rows for every model x GPU x batch x configuration; a row whose measured inputs are missing
    carries None where it would need them and says why (``missing``). Above batch 16 only the kinds
    measured there: resident, misses waiting, streaming, cpu-moe. `cpu_moe`: the --n-cpu-moe values of
    the cpu-moe rows (default: every MoE layer, and the smallest that fits ``CPU_MOE_CONTEXT``).
    `hbm_gbps`, `memory_gib`, `pcie_gbps`: the user's GPU and link (each GPU's label then says so): resident and
    cpu-moe rows at those rates (the link: every row's prefill copies); the simulated rows ran at the catalogue's
    and are left without tok/s, saying so. `cpu_gbps`,
    `cpu_gflops`: the user's host (target "given"; either one not given: this machine's measured figure) for
    the cpu-moe rows, in place of the catalogue hosts. `prompt`: each sequence's prompt: its prefill and time to
    first token, its KV read by every decode step, and a row fits when each of the B sequences holds it and
    one more token. `nonexpert_dtype`: the non-expert weights' (bf16, or fp8 / int4 as a quantized checkpoint
    holds its linear layers: ``nonexpert_bytes``) in the resident and cpu-moe rows (each GPU's label says so);
    the simulated rows ran with bf16 ones and are left without tok/s, saying so. Quality is the experts' dtype's
    only: the non-expert weights' quantization is not measured."""
    check_nonexpert_dtype(nonexpert_dtype)
    inputs = read_inputs() if inputs is None else inputs
    given_gpu = hbm_gbps is not None or memory_gib is not None or pcie_gbps is not None
    quantized_rest = nonexpert_dtype != "bf16"
    memory_bytes = None if memory_gib is None else int(memory_gib * 2**30)
    rows = []
    for name in models:
        m = get_model(name)
        shape, unit = routing_proxy(m)
        study = m.name in SHAPE_OF
        routing = f"{shape} study trace" if study else f"{shape} study trace as proxy (k/E {m.moe.top_k}/{m.moe.experts} " \
                                                       f"vs {STUDY_SHAPES[shape][1]}/{STUDY_SHAPES[shape][0]})"
        mine = [r for r in inputs if input_model(r) == m.name]
        why_not = served(m)
        L, E = m.moe_layers, m.moe.experts
        ref = _pick(inputs, kind="quality_resident", shape=shape, dtype="fp32") if study else None
        ref_bpb = ref["bits_per_byte"] if ref else None

        def quality(bpb):
            """(bits per byte, loss % against the fp32 experts) of a study model's row."""
            return bpb, (None if bpb is None or ref_bpb is None else 100 * (bpb / ref_bpb - 1))

        def measured_bpb(dtype):
            """(bits per byte, loss %) of the experts in `dtype`: measured on the study model; for another,
            bf16 is its checkpoint's own experts (exact), the rest not measured."""
            if not study:
                return None, (0.0 if dtype == "bf16" else None)
            q = _pick(inputs, kind="quality_resident", shape=shape, dtype=dtype)
            return quality(q and q["bits_per_byte"])

        for gpu in gpus:
            g = get_gpu(gpu).name
            rates = (gpu_constants(g) | ({} if hbm_gbps is None else {"hbm_gbps": hbm_gbps})
                     | ({} if pcie_gbps is None else {"pcie_gbps": pcie_gbps}))
            label = g if not given_gpu else g + " (given: " + ", ".join(
                ([] if hbm_gbps is None else [f"{hbm_gbps:g} GB/s"]) + ([] if memory_gib is None else [f"{memory_gib:g} GiB"])
                + ([] if pcie_gbps is None else [f"PCIe {pcie_gbps:g} GB/s"])) + ")"
            label += f" (non-expert {nonexpert_dtype})" if quantized_rest else ""
            sims = [] if given_gpu or quantized_rest else mine  # (simulated at the catalogue GPU's rates, bf16 rest)
            for B in batches:
                U = unique_experts(m, B, inputs)

                def add(config, kind, dtype, cap, gpu_bytes, host_bytes, step_s, ready, quality, src, missing="",
                        prefill_s=None):
                    free = kv_free_bytes(m, g, gpu_bytes, memory_bytes=memory_bytes, nonexpert_dtype=nonexpert_dtype)
                    kv, ctx = _kv_tokens(free, kv_bytes_per_token(m, "bf16")), context_per_sequence(m, free, B)
                    if step_s is not None:
                        step_s += kv_read_seconds(m, g, B, prompt, rates)
                    bpb, loss = quality
                    if step_s is None and not missing:
                        missing = ("simulated at the catalogue GPUs' rates only, not at the given ones" if given_gpu else
                                   "simulated with bf16 non-expert weights only" if quantized_rest else
                                   "no simulation of this model at this GPU and batch (bench/frontier_inputs.py)")
                    rows.append(Row(m.name, label, B, config, kind, dtype, cap, gpu_bytes, host_bytes, kv, ctx,
                                    ctx > prompt, None if step_s is None else step_s * 1e3,
                                    None if step_s is None else B / step_s, None if prefill_s is None else prompt / prefill_s,
                                    prefill_s, ready, bpb, loss, routing, why_not, "" if step_s is not None else missing, src))

                no_unique = f"no measured unique experts at batch {B} on the {shape} trace"
                for dtype in ("bf16", "fp8", "int4"):
                    step = None if U is None else L * layer_seconds(m, g, U, dtype, rates, batch=B,
                                                                    nonexpert_dtype=nonexpert_dtype)
                    add(f"resident-{dtype}", "resident", dtype, 1.0, L * E * one_expert_bytes(m, dtype), 0, step, 1.0,
                        measured_bpb(dtype), {"unique_per_layer": U}, no_unique,
                        prefill_s=prefill_seconds(m, g, prompt, dtype, rates=rates))
                for dtype in ("bf16", "fp8", "int4"):
                    for cap in CAPACITIES:
                        sim = _pick(sims, kind="sim_wait", gpu=g, batch=B, capacity=cap, expert_dtype=dtype)
                        if sim is None and B in LARGE_BATCHES:
                            continue
                        slots = max(1, int(cap * L * E))
                        step = None if sim is None else (L * (sim["layer_us"] + HOST_US_PER_LAYER)
                                                         + sim["stall_us_per_step"]) * 1e-6  # (host mode's work)
                        add(f"prophet-{dtype} {cap:.1%}", "prophet", dtype, cap, slots * expert_bytes(m, dtype),
                            L * E * expert_bytes(m, dtype), step, sim and sim["ready_hit_rate"], measured_bpb(dtype),
                            {"simulation": sim and {k: sim[k] for k in ("policy", "predictor", "depth", "hit_rate")}},
                            prefill_s=prefill_seconds(m, g, prompt, dtype, copied=1 - cap, rates=rates))
                for r in sims:  # Prophet with miss: stream (the schedule's replay at this batch's layer time)
                    if (r.get("kind"), r.get("gpu"), r.get("batch")) != ("stream", g, B):
                        continue
                    cap, dtype = r["capacity"], r["expert_dtype"]
                    add(f"prophet-stream-{dtype} {'ring' if cap == 0 else f'{cap:.1%}'}", "prophet-stream", dtype, cap,
                        r["slots"] * one_expert_bytes(m, dtype), L * E * one_expert_bytes(m, dtype),
                        (r["step_us"] + L * HOST_US_PER_LAYER) * 1e-6,
                        r["hit_rate"], measured_bpb(dtype),
                        {"stream": {k: r[k] for k in ("layer_us", "pcie_gbps", "stall_us_per_step", "copy_busy",
                                                      "resident_per_layer")}},
                        prefill_s=prefill_seconds(m, g, prompt, dtype, copied=1 - cap, rates=rates))
                for dtype in ("bf16", "int4"):  # llama.cpp's --n-cpu-moe N, KTransformers' N = L (analytic)
                    fit = cpu_moe_layers(m, g, B, dtype, memory_bytes=memory_bytes, nonexpert_dtype=nonexpert_dtype)
                    counts = sorted({L, *(() if fit is None else (fit,))}) if cpu_moe is None else sorted(set(cpu_moe))
                    hosts = cpu_targets(shape, dtype=dtype)
                    if cpu_gbps is not None or cpu_gflops is not None:
                        here = hosts["this-vm"]
                        hosts = {"given": {"cpu_gbps": cpu_gbps or here["cpu_gbps"], "cpu_gflops": cpu_gflops or here["cpu_gflops"],
                                           "call_us": CPU_CALL_US, "source": "given" + ("" if cpu_gbps and cpu_gflops else
                                                                                        "; the rest " + here["source"])}}
                    for target, host in hosts.items():
                        for n in counts:
                            if n == 0 and cpu_moe is None:
                                continue  # (nothing on the CPU: the resident row)
                            if n > L:
                                raise ValueError(f"--cpu-moe-layers {n}: {m.name} has {L} MoE layers")
                            step = None if U is None else cpu_moe_seconds(m, g, B, U, n, host, dtype, rates,
                                                                          nonexpert_dtype=nonexpert_dtype)
                            add(f"cpu-moe-{dtype} {target} {n}/{L}", "cpu-moe", dtype, (L - n) / L,
                                (L - n) * E * one_expert_bytes(m, dtype), n * E * one_expert_bytes(m, dtype), step, 1.0,
                                measured_bpb(dtype),
                                {"cpu": {k: host[k] for k in ("cpu_gbps", "cpu_gflops", "call_us", "source")},
                                 "cpu_moe_layers": n, "unique_per_layer": U}, no_unique,
                                prefill_s=prefill_seconds(m, g, prompt, dtype, n_cpu=n, cpu=host, rates=rates))
                if B in LARGE_BATCHES:
                    continue  # (misses that do not wait, and on the CPU: measured at batch 1-16 only)
                for r in sims:  # Prophet with miss: cpu (simulated with each target host's rates)
                    if (r.get("kind"), r.get("gpu"), r.get("batch")) != ("miss_cpu", g, B):
                        continue
                    cap = r["capacity"]
                    dtype = r.get("expert_dtype", "bf16")
                    step = (L * (r["layer_us"] + r["host_us_per_layer"]) + r["stall_us_per_step"]
                            + r["extra_us_per_step"]) * 1e-6
                    add(f"prophet-cpu{'' if dtype == 'bf16' else '-' + dtype} {r['cpu_target']} "
                        f"{'ring' if cap == 0 else f'{cap:.1%}'}", "prophet-cpu", dtype,
                        cap, r["slots"] * expert_bytes(m, dtype), L * E * expert_bytes(m, dtype), step,
                        r["ready_hit_rate"], (ref_bpb, 0.0) if dtype == "bf16" and study else measured_bpb(dtype),
                        {"cpu": {k: r[k] for k in ("cpu_target", "cpu_gbps", "cpu_gflops", "dram_gbps", "link_gbps",
                                                   "cpu_source")},
                         "cpu_experts_per_token": r["cpu_experts_per_token"], "host_us_per_layer": r["host_us_per_layer"]},
                        prefill_s=prefill_seconds(m, g, prompt, dtype, copied=1 - cap, rates=rates))
                if not study:
                    continue  # (no-wait rows decode the study model itself: their quality is its own)
                for strategy in NO_WAIT:
                    for cap in CAPACITIES:
                        r = _pick(sims, kind="no_wait", gpu=g, batch=B, capacity=cap, strategy=strategy)
                        slots = max(1, int(cap * L * E))
                        gpu_bytes = slots * expert_bytes(m, "bf16") + (L * E * int4_expert_bytes(m)
                                                                       if strategy == "stand-in" else 0)
                        step = None if r is None else (L * r["layer_us"] + r["extra_us_per_step"]) * 1e-6
                        bpb = r and (r["bits_per_byte"] if r["bits_per_byte"] is not None
                                     else ref_bpb if str(r.get("quality_from", "")).startswith("exact") else None)
                        add(f"{strategy} {cap:.1%}", "no-wait", "bf16", cap, gpu_bytes, L * E * expert_bytes(m, "bf16"),
                            step, r and r["ready_hit_rate"], quality(bpb),
                            {"run": r and {k: r.get(k) for k in ("policy", "fallbacks_per_token", "quality_from")}})
    return rows


def markdown(rows: list[Row]) -> str:
    head = ("| model | GPU | B | configuration | expert GiB on GPU | host GiB | KV tokens | context per sequence | "
            "tok/s (predicted) | prefill tok/s | TTFT s | landed | bits/byte | vs reference |")
    lines = [head, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:  # (a row without its inputs says so; bits/byte: the study model's, empty for another model)
        tps = "no input" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
        lines.append(
            f"| {r.model}{' (not served)' if r.served else ''} | {r.gpu} | {r.batch} | {r.config} | "
            f"{r.expert_gpu_bytes / 2**30:.2f} | {r.host_bytes / 2**30:.1f} | {r.kv_tokens:,} | {r.context_tokens:,} | "
            + (tps if r.fits else "does not hold the prompt") + " | "
            + ("not modelled | " if r.prefill_tok_s is None else f"{r.prefill_tok_s:,.0f} | {r.ttft_s:.2f}") + " | "
            + ("no input" if r.ready_hit_rate is None else f"{r.ready_hit_rate:.1%}") + " | "
            + ("" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}") + " | "
            + ("not measured" if r.quality_loss_pct is None else f"{r.quality_loss_pct:+.2f}%") + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r) | {"inputs": json.dumps(r.inputs)})
    return path


def write_jsonl(rows: list[Row], path: Path) -> Path:
    """One JSON object per row: every column, and the inputs it came from (``inputs``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
    return path


def recommend(rows: list[Row], max_loss_pct: float = 1.0, min_kv_tokens: int = 0) -> list[Row]:
    """Per model, GPU and batch: the fastest predicted configuration that fits with at least
    `min_kv_tokens` of KV cache and loses at most `max_loss_pct` of held-out quality."""
    best: dict[tuple, Row] = {}
    for r in rows:
        ok = (r.fits and r.kv_tokens >= min_kv_tokens and r.tokens_per_s is not None and r.quality_loss_pct is not None
              and r.quality_loss_pct <= max_loss_pct)
        key = (r.model, r.gpu, r.batch)
        if ok and (key not in best or r.tokens_per_s > best[key].tokens_per_s):
            best[key] = r
    return list(best.values())


def summary(rows: list[Row], max_loss_pct: float = 1.0) -> str:
    """Markdown: per model, GPU and batch, the fastest fitting row of each kind (resident, Prophet with
    waiting misses, on the CPU, streamed, cpu-moe, no-wait) among those within `max_loss_pct` of the reference's
    quality, each followed, where faster, by the fastest whose quality is not measured (a catalogue model's fp8
    and int4 rows), and the pick (measured quality only); a model the vLLM plugin does not serve says so."""
    lines = ["| model | GPU | B | fastest resident | fastest Prophet (misses wait) | fastest Prophet (miss: cpu) | "
             "fastest Prophet (stream) | fastest cpu-moe (llama.cpp, KTransformers) | fastest no-wait | pick |",
             "|---|---|---:|---|---|---|---|---|---|---|"]
    picks = {(r.model, r.gpu, r.batch): r for r in recommend(rows, max_loss_pct)}

    def one(r):
        return (f"{r.config}: {r.tokens_per_s:,.0f} tok/s, {r.expert_gpu_bytes / 2**30:.1f} GiB, "
                f"{r.kv_tokens:,} KV ({r.context_tokens:,} per sequence), "
                + ("" if r.ttft_s is None else f"TTFT {r.ttft_s:.2f} s, ")
                + ("quality not measured" if r.quality_loss_pct is None else f"{r.quality_loss_pct:+.2f}%"))

    def cell(kind):
        r, u = best.get(kind), unmeasured.get(kind)
        parts = [one(x) for x in (r, u) if x is not None and (x is r or r is None or x.tokens_per_s > r.tokens_per_s)]
        return "; ".join(parts)

    served = {r.model: r.served for r in rows}
    for key in dict.fromkeys((r.model, r.gpu, r.batch) for r in rows):
        best, unmeasured = {}, {}
        for r in rows:
            if (r.model, r.gpu, r.batch) != key or not r.fits or r.tokens_per_s is None:
                continue
            into = unmeasured if r.quality_loss_pct is None else best if r.quality_loss_pct <= max_loss_pct else None
            if into is not None and (r.kind not in into or r.tokens_per_s > into[r.kind].tokens_per_s):
                into[r.kind] = r
        pick = picks.get(key)
        lines.append(f"| {key[0]}{' (' + served[key[0]] + ')' if served[key[0]] else ''} | {key[1]} | "
                     f"{key[2]} | {cell('resident')} | {cell('prophet')} | {cell('prophet-cpu')} | "
                     f"{cell('prophet-stream')} | {cell('cpu-moe')} | {cell('no-wait')} | "
                     f"{pick.config if pick else 'nothing fits'} |")
    return "\n".join(lines)


def figure(rows: list[Row], path: Path, batch: int = 1) -> Path:
    """Per model (columns) and GPU (rows): expert GPU GiB against the quality loss, each point labelled
    with its predicted tokens/s at `batch`; configurations that do not fit are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.batch == batch and r.fits and r.quality_loss_pct is not None]
    models = list(dict.fromkeys(r.model for r in rows))
    gpus = list(dict.fromkeys(r.gpu for r in rows))
    fig, axes = plt.subplots(len(gpus), len(models), figsize=(5.6 * len(models), 4.4 * len(gpus)), squeeze=False)
    style = {"resident": ("s", "black"), "prophet": ("o", "tab:blue"), "stand-in": ("^", "tab:green"),
             "substitute": ("v", "tab:orange"), "skip": ("x", "tab:red"), "skip-renorm": ("+", "tab:purple"),
             "host-cpu": ("D", "tab:brown"), "prophet-cpu": ("P", "tab:olive"), "prophet-stream": ("*", "tab:pink"),
             "cpu-moe": ("h", "tab:red")}
    for i, g in enumerate(gpus):
        for j, name in enumerate(models):
            ax = axes[i][j]
            for r in (r for r in sel if r.gpu == g and r.model == name):
                key = r.kind if r.kind != "no-wait" else r.config.split()[0]
                marker, color = style.get(key, ("o", "gray"))
                if r.kind in ("prophet", "prophet-cpu") and r.expert_dtype in ("fp8", "int4"):
                    color = {"fp8": "tab:cyan", "int4": "tab:gray"}[r.expert_dtype]
                ax.scatter(r.expert_gpu_bytes / 2**30, r.quality_loss_pct, marker=marker, color=color, s=30)
                if r.tokens_per_s is not None:
                    ax.annotate(f"{r.tokens_per_s:.0f}", (r.expert_gpu_bytes / 2**30, r.quality_loss_pct), fontsize=6,
                                xytext=(3, 2), textcoords="offset points")
            ax.set_title(f"{name} on {g}, batch {batch}", fontsize=9)
            ax.set_xlabel("expert bytes on the GPU (GiB)")
            ax.set_ylabel("held-out bits/byte vs fp32 experts (%)")
            ax.set_yscale("symlog", linthresh=0.1)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, color=c, ls="", label=k) for k, (m, c) in style.items()]
    handles.append(plt.Line2D([], [], marker="o", color="tab:cyan", ls="", label="prophet fp8"))
    handles.append(plt.Line2D([], [], marker="o", color="tab:gray", ls="", label="prophet int4 (o, P: cpu)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.suptitle("Where Prophet wins: GPU bytes against quality; labels: predicted decode tokens/s", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_gpus(gpus) -> list[str]:
    out = []
    for gpu in gpus:
        gpu_constants(gpu)
        out.append(get_gpu(gpu).name)
    return out
