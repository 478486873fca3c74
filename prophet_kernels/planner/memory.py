"""Memory model: parameters by part, KV bytes per token, and Prophet's KV extension.

All arithmetic is exact integer counting from the architecture in ``catalog``; nothing here reads
a published total. The one estimate is the activation/workspace reserve, stated by its formula in
``workspace_bytes`` and overridable.

Serving model (vLLM's): usable = GPU memory x gpu_memory_utilization; KV cache = usable - weights
- workspace. With Prophet the routed experts live in pinned host memory and the GPU holds a
paged buffer of S expert slots instead, so KV cache grows by (all routed experts - S slots).
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

from .catalog import GQA, MLA, MoA, GPUSpec, ModelSpec

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}
WEIGHT_DTYPES = (*DTYPE_BYTES, "int4")  # int4: weights only (a KV cache is never int4 here)
# The parts a quantized (fp8, int4) checkpoint quantizes: its linear layers. Embeddings, the LM head,
# routers, norms and Mamba's state-space parameters stay bf16, as DeepSeek-V3's fp8 and the GPTQ, AWQ
# and compressed-tensors W4A16 checkpoints leave them.
QUANTIZED_PARTS = ("attention", "dense_mlp", "shared_experts", "routed_experts")
INT4_CHECKPOINT_GROUP = 128  # inputs per fp16 scale of a published int4 checkpoint (GPTQ/AWQ/W4A16 default)
PARTS = ("embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "mamba", "norms")


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def check_weight_dtype(dtype: str) -> str:
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {dtype!r}; known: {', '.join(WEIGHT_DTYPES)}")
    return dtype


def weight_bytes(params: dict[str, int], dtype: str) -> int:
    """Bytes of weights by part (``count_params``' parts, or some of them) as a checkpoint of `dtype`
    holds them. bf16/fp16/fp32: every part in that dtype. fp8 and int4: the linear layers
    (``QUANTIZED_PARTS``) quantized, the rest in bf16; fp8 one byte a weight (block scales, 4 bytes per
    128 x 128, left out: 0.02%), int4 half a byte with an fp16 scale per ``INT4_CHECKPOINT_GROUP``."""
    check_weight_dtype(dtype)
    if dtype not in ("fp8", "int4"):
        return sum(params.values()) * dtype_bytes(dtype)
    quantized = sum(n for part, n in params.items() if part in QUANTIZED_PARTS)
    rest = sum(params.values()) - quantized
    return rest * 2 + (quantized if dtype == "fp8" else int4_bytes(quantized, INT4_CHECKPOINT_GROUP))


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------


def _mlp_params(h: int, inter: int, gated: bool, bias: bool) -> int:
    mats = 3 if gated else 2
    return mats * h * inter + ((2 * inter if gated else inter) + h if bias else 0)


def _attention_params(m: ModelSpec) -> int:
    """One self-attention block (projections, biases, q/k norms)."""
    a, h = m.attention, m.hidden
    if isinstance(a, GQA):
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        n = h * q * (2 if a.output_gate else 1) + 2 * h * kv + q * h
        n += (q + 2 * kv) if a.qkv_bias else 0
        n += h if a.o_bias else 0
        n += {"none": 0, "head": 2 * a.head_dim, "full": q + kv}[a.qk_norm]
        return n
    if isinstance(a, MLA):
        qk_head = a.qk_nope_dim + a.qk_rope_dim
        if a.q_lora_rank is None:
            q = h * a.heads * qk_head
        else:  # q_a_proj, q_a_layernorm, q_b_proj
            q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.heads * qk_head
        kv = h * (a.kv_lora_rank + a.qk_rope_dim) + a.kv_lora_rank  # kv_a_proj_with_mqa + kv_a_layernorm
        kv += a.kv_lora_rank * a.heads * (a.qk_nope_dim + a.v_head_dim)  # kv_b_proj
        o = a.heads * a.v_head_dim * h
        return q + kv + o
    if isinstance(a, MoA):  # per-expert q and o, one shared k/v projection, router, output bias
        width = a.kv_heads * a.head_dim
        return a.experts * 2 * h * width + h * 2 * width + h * a.experts + h
    raise TypeError(f"unknown attention kind {type(a).__name__}")


def _cross_attention_params(m: ModelSpec) -> int:
    a = m.attention
    assert isinstance(a, GQA)
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    return 2 * m.hidden * q + 2 * m.hidden * kv


def _mamba_params(m: ModelSpec) -> int:
    mb, h = m.mamba, m.hidden
    d_in = mb.expand * h
    n = h * 2 * d_in + (2 * d_in if mb.proj_bias else 0)  # in_proj
    n += d_in * mb.d_conv + (d_in if mb.conv_bias else 0)  # depthwise conv1d
    n += d_in * (mb.dt_rank + 2 * mb.d_state)  # x_proj
    n += mb.dt_rank * d_in + d_in  # dt_proj (with bias)
    n += d_in * mb.d_state + d_in  # A_log, D
    n += d_in * h + (h if mb.proj_bias else 0)  # out_proj
    n += (mb.dt_rank + 2 * mb.d_state) if mb.inner_norms else 0
    return n


def _linear_attention_params(m: ModelSpec) -> int:
    """One Gated DeltaNet mixer (counted with attention: its projections are quantized like attention's)."""
    g, h = m.linear_attn, m.hidden
    qkvz = 2 * g.key_heads * g.key_dim + 2 * g.value_heads * g.value_dim
    return (h * qkvz + h * 2 * g.value_heads  # in_proj_qkvz, in_proj_ba
            + g.conv_channels * g.conv + 2 * g.value_heads + g.value_dim  # conv1d, dt_bias and A_log, gated norm
            + g.value_heads * g.value_dim * h)  # out_proj


def count_params(m: ModelSpec) -> dict[str, int]:
    """Parameters of the model by part (exact for the architectures in the catalogue). Of one pipeline
    stage for a spec from :func:`stage_spec`: its layers, the embedding on the first stage, the final
    norm and the LM head on the last (a copy of a tied embedding, as vLLM's last stage holds one)."""
    h, e = m.hidden, m.moe
    norm = {"rms": h, "ln_nobias": h, "ln": 2 * h}[m.norm]
    parts = dict.fromkeys(PARTS, 0)
    rank, size = m.pp_stage
    head = m.vocab * h + (m.vocab if m.lm_head_bias else 0)
    if size == 1:
        parts["embeddings"] = m.vocab * h * (1 if m.tied_embeddings else 2) + (m.vocab if m.lm_head_bias else 0)
    else:
        parts["embeddings"] = (m.vocab * h if rank == 0 else 0) + (head if rank == size - 1 else 0)
    for layer in m.layers:
        if layer.mixer == "attn":
            parts["attention"] += _attention_params(m)
        elif layer.mixer == "linear":
            parts["attention"] += _linear_attention_params(m)
        else:
            parts["mamba"] += _mamba_params(m)
        parts["norms"] += 2 * norm
        if layer.cross_attn:
            parts["attention"] += _cross_attention_params(m)
            parts["norms"] += norm
        if layer.ffn in ("dense", "moe+dense"):
            parts["dense_mlp"] += _mlp_params(h, m.dense_intermediate, m.dense_gated, m.mlp_bias)
        if "moe" in layer.ffn:
            parts["routed_experts"] += e.experts * _mlp_params(h, e.intermediate, e.gated, e.expert_bias)
            parts["router"] += h * e.experts + e.router_bias
            if m.mlp_bias:  # JetMoE: one output bias per MoE block
                parts["routed_experts"] += h
            if e.shared_intermediate:
                parts["shared_experts"] += _mlp_params(h, e.shared_intermediate, True, False)
                parts["router"] += h if e.shared_gate else 0
    if rank == size - 1:
        parts["norms"] += norm * (2 if m.encoder_decoder else 1)
    parts["norms"] += m.extra_params  # (a stage's share: stage_spec)
    return parts


def pp_partition(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """[start, end) of each pipeline stage's layers, as vLLM splits them (``get_pp_indices`` without
    VLLM_PP_LAYER_PARTITION): equal parts, the remainder one each to the stages before the last,
    from the second-to-last backwards."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pipeline parallel size must be in [1, {num_layers}] (the model's layers), got {pp}")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    starts = [sum(parts[:i]) for i in range(pp)]
    return [(a, a + n) for a, n in zip(starts, parts)]


def stage_spec(m: ModelSpec, pp: int, rank: int) -> ModelSpec:
    """The part of `m` that pipeline stage `rank` of `pp` holds (its layers; see count_params)."""
    if pp == 1:
        return m
    if m.encoder_decoder:
        raise ValueError(f"{m.name}: pipeline parallelism of an encoder-decoder model is not planned (vLLM serves "
                         "encoder-decoder models without it)")
    a, b = pp_partition(len(m.layers), pp)[rank]
    return dataclasses.replace(m, layers=m.layers[a:b], pp_stage=(rank, pp),
                               extra_params=m.extra_params * (b - a) // len(m.layers))


def total_params(m: ModelSpec) -> int:
    return sum(count_params(m).values())


def routed_expert_params(m: ModelSpec) -> int:
    """Parameters of one routed expert of one layer (the unit Prophet pages)."""
    return _mlp_params(m.hidden, m.moe.intermediate, m.moe.gated, False)  # (gpt-oss's expert biases: count_params)


INT4_GROUP = 32  # inputs per fp16 scale of an int4 expert (routing.quality's quantizer, the frontier's bytes)


def int4_bytes(params: int, group: int = INT4_GROUP) -> int:
    """Bytes of `params` weights in symmetric int4 with an fp16 scale per `group` inputs."""
    return params // 2 + 2 * -(-params // group)


def int4_store_group(m: ModelSpec) -> int:
    """The group Prophet's int4 store uses for `m`: 128 (its default), else the largest of 64 and 32
    that divides both the hidden and the expert intermediate size."""
    for g in (128, 64, 32):
        if m.hidden % g == 0 and m.moe.intermediate % g == 0:
            return g
    raise ValueError(f"{m.name}: no int4 group (128, 64, 32) divides H = {m.hidden} and I = {m.moe.intermediate}")


def expert_bytes(m: ModelSpec, weight_dtype: str = "bf16") -> int:
    """Bytes of one routed expert as Prophet stores and copies it. fp8: e4m3 weights and an fp32
    scale per output row (2I + H gated, I + H otherwise), padded to 16 bytes as the store lays an
    fp8 expert out (``memory.store.fp8_expert_bytes``; equal for the catalogue's models, tested).
    int4: the store's row (``memory.store.quantized_expert_bytes``, tested): codes, padded to 4
    bytes, an fp32 scale per ``int4_store_group`` inputs, padded to 16."""
    params = routed_expert_params(m)
    if weight_dtype == "int4":
        g = int4_store_group(m)
        return -(-(-(-params // 2 // 4) * 4 + 4 * (params // g)) // 16) * 16
    if weight_dtype != "fp8":
        return params * dtype_bytes(weight_dtype)
    rows = (2 if m.moe.gated else 1) * m.moe.intermediate + m.hidden
    return -(-(-(-params // 4) * 4 + 4 * rows) // 16) * 16


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


def _kv_elems_per_layer(m: ModelSpec) -> int:
    a = m.attention
    return a.kv_lora_rank + a.qk_rope_dim if isinstance(a, MLA) else 2 * a.kv_heads * a.head_dim


def kv_elems_per_token(m: ModelSpec) -> int:
    """Cached elements per token of context, summed over layers.

    GQA/MoA: K and V of each KV head. MLA: the compressed latent plus the shared RoPE key (what
    vLLM caches). Mamba layers cache nothing per token, nor do sliding-window layers (gpt-oss's): each
    holds at most its window per sequence (see ``state_elems_per_sequence``).
    Encoder-decoder: a decoder layer caches K and V per decoder token (self-attention) and per
    encoder token (cross-attention); both cost the same, so a token of either side counts once.
    """
    full = sum(1 for layer in m.layers if layer.mixer == "attn" and layer.cached and layer.window is None)
    return _kv_elems_per_layer(m) * full


def kv_bytes_per_token(m: ModelSpec, kv_dtype: str = "bf16", tp: int = 1) -> int:
    """KV bytes per token per GPU. Tensor parallelism splits KV heads (a head is replicated when
    tp exceeds the KV heads); the MLA latent is replicated on every GPU."""
    a = m.attention
    if isinstance(a, MLA) or tp == 1:
        return kv_elems_per_token(m) * dtype_bytes(kv_dtype)
    heads_per_gpu = max(1, a.kv_heads // tp)  # a head is replicated when tp exceeds the KV heads
    return kv_elems_per_token(m) * heads_per_gpu // a.kv_heads * dtype_bytes(kv_dtype)


def state_elems_per_sequence(m: ModelSpec, context: int | None = None) -> int:
    """What one sequence holds beside the full-attention layers' KV per token: Mamba conv + SSM state,
    Gated DeltaNet conv + recurrent state (value heads x key dim x value dim), and the KV of each
    sliding-window or chunked layer: `context` tokens up to its window (None: the whole window, the
    most a sequence holds there)."""
    windows = sum(layer.window if context is None else min(context, layer.window)
                  for layer in m.layers if layer.mixer == "attn" and layer.cached and layer.window)
    state = _kv_elems_per_layer(m) * windows
    if m.linear_attn is not None:
        g = m.linear_attn
        per_layer = (g.conv - 1) * g.conv_channels + g.value_heads * g.key_dim * g.value_dim
        state += per_layer * sum(1 for layer in m.layers if layer.mixer == "linear")
    if m.mamba is None:
        return state
    d_in = m.mamba.expand * m.hidden
    per_layer = d_in * (m.mamba.d_conv - 1) + d_in * m.mamba.d_state
    return state + per_layer * sum(1 for layer in m.layers if layer.mixer == "mamba")


# ----------------------------------------------------------------------------------------------
# Batch dedup: unique experts per layer
# ----------------------------------------------------------------------------------------------


def expected_unique_experts(num_experts: int, top_k: int, batch: int) -> float:
    """E[unique experts in one layer] for `batch` tokens each picking k distinct experts
    uniformly at random (independent tokens): E * (1 - (1 - k/E)^B). Never exceeds E."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def seed_unique_experts(top_k: int, batch: int, alpha: float = 0.932) -> float:
    """The seed analysis's power law k * B^alpha (reproduced only to compare; it exceeds E)."""
    return top_k * batch**alpha


def max_unique_experts(num_experts: int, top_k: int, batch: int) -> int:
    """Worst case for one layer: every token picks experts no other token picked."""
    return min(num_experts, top_k * batch)


class UniqueCurve:
    """Measured unique experts per layer vs batch size (from a routing trace), interpolated
    linearly in log2(batch) between measured points and clamped at the ends."""

    def __init__(self, points: dict[int, float]):
        if not points:
            raise ValueError("a measured unique-experts curve needs at least one (batch, unique) point")
        self.points = dict(sorted(points.items()))

    def __call__(self, batch: int) -> float:
        bs = list(self.points)
        if batch <= bs[0]:
            return self.points[bs[0]]
        if batch >= bs[-1]:
            return self.points[bs[-1]]
        for lo, hi in zip(bs, bs[1:]):
            if lo <= batch <= hi:
                t = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
                return self.points[lo] + t * (self.points[hi] - self.points[lo])
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Workspace reserve and the plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServingConfig:
    gpu_memory_utilization: float = 0.9  # vLLM's default
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    expert_dtype: str | None = None  # Prophet's routed experts (store, buffer, copies); None: weight_dtype
    tp: int = 1
    ep: bool = False  # expert parallelism over the tp GPUs (vLLM's enable_expert_parallel): whole experts per GPU
    pp: int = 1  # pipeline stages, each on its own tp GPUs (vLLM's pipeline_parallel_size); numbers are per GPU
    max_num_batched_tokens: int = 8192  # prefill chunk vLLM profiles with
    max_num_seqs: int = 256
    non_torch_bytes: int = 1 << 30  # CUDA context, cuBLAS/NCCL workspaces, CUDA graphs
    workspace_override: int | None = None  # bytes; replaces the activation estimate when set

    def __post_init__(self):
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.tp < 1:
            raise ValueError(f"tensor parallel size must be >= 1, got {self.tp}")
        if self.ep and self.tp < 2:
            raise ValueError("expert parallelism spreads the experts over the tensor-parallel GPUs: give tp >= 2")
        if not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"pipeline parallel size must be a whole number >= 1, got {self.pp!r}")
        check_weight_dtype(self.weight_dtype)
        dtype_bytes(self.kv_dtype)
        if self.expert_dtype is not None:
            check_weight_dtype(self.expert_dtype)

    @property
    def prophet_expert_dtype(self) -> str:
        return self.expert_dtype or self.weight_dtype

    @property
    def ep_size(self) -> int:
        """GPUs the routed experts are spread over, whole (1: each GPU holds a shard of every expert)."""
        return self.tp if self.ep else 1


def local_experts(m: ModelSpec, ep_size: int) -> int:
    """Routed experts per MoE layer on the busiest GPU under expert parallelism (vLLM's linear
    placement gives the first E mod ep GPUs one more); E without it."""
    return -(-m.moe.experts // ep_size)


def workspace_bytes(m: ModelSpec, cfg: ServingConfig) -> int:
    """Activation/workspace reserve per GPU (an estimate, stated).

    Peak of one forward over max_num_batched_tokens tokens in 16-bit activations: the residual
    stream and its normalised copy (2H), the widest projection output (q/k/v, the dense MLP's
    gate+up, or the MoE's k routed copies of gate+up and their product, 3kI), divided by tp; plus
    fp32 logits for max_num_seqs rows; plus non_torch_bytes. vLLM measures the real value in its
    profiling run; ServingConfig.workspace_override replaces this estimate.
    """
    if cfg.workspace_override is not None:
        return cfg.workspace_override
    a, e = m.attention, m.moe
    if isinstance(a, MLA):
        attn_width = a.heads * (a.qk_nope_dim + a.qk_rope_dim + a.v_head_dim) + a.kv_lora_rank
    elif isinstance(a, MoA):
        attn_width = (a.top_k + 2) * a.kv_heads * a.head_dim
    else:
        attn_width = (a.heads + 2 * a.kv_heads) * a.head_dim
    widest = max(attn_width, 2 * m.dense_intermediate, 3 * e.top_k * e.intermediate, 2 * e.shared_intermediate)
    per_token = 2 * (2 * m.hidden + widest // cfg.tp)
    return cfg.max_num_batched_tokens * per_token + cfg.max_num_seqs * m.vocab * 4 // cfg.tp + cfg.non_torch_bytes


@dataclass(frozen=True)
class BufferSetting:
    """How many expert slots Prophet keeps on the GPU.

    kind "batch": slots for the unique experts of the current layer and of `prefetch_depth`
    layers ahead at the row's batch size (expected value, from the independent-uniform formula or
    a measured curve), never fewer than one layer's worst case min(E, kB).
    kind "fraction": `fraction` of all routed experts (E x MoE layers)."""

    kind: str = "batch"
    fraction: float = 0.0
    prefetch_depth: int = 1

    @staticmethod
    def parse(text: str) -> "BufferSetting":
        t = text.strip().lower()
        if t == "batch":
            return BufferSetting("batch")
        if t.startswith("batch+"):
            return BufferSetting("batch", prefetch_depth=int(t[len("batch+"):]))
        try:
            f = float(t.rstrip("%")) / (100.0 if t.endswith("%") else 1.0)
        except ValueError:
            raise ValueError(f"buffer setting {text!r}: use 'batch', 'batch+D' (D prefetch layers) or a fraction like 0.25 / 25%") from None
        if not 0.0 < f <= 1.0:
            raise ValueError(f"buffer fraction must be in (0, 1], got {f}")
        return BufferSetting("fraction", fraction=f)

    def label(self) -> str:
        if self.kind == "fraction":
            return f"{self.fraction:.0%}"
        return "batch" if self.prefetch_depth == 1 else f"batch+{self.prefetch_depth}"


def buffer_slots(m: ModelSpec, batch: int, setting: BufferSetting, unique=None, ep_size: int = 1) -> tuple[int, float]:
    """(slots, expected unique experts per layer) for one MoE model at one batch size, on one GPU.
    Under expert parallelism (``ep_size`` > 1) both are of the busiest GPU's own experts: a fraction
    of them, or its share of the batch's unique experts (expected: u x E_local / E), never fewer than
    its worst case min(E_local, kB)."""
    e, n_moe = m.moe, m.moe_layers
    local = local_experts(m, ep_size)
    if unique is None:
        u = expected_unique_experts(e.experts, e.top_k, batch)
    else:
        u = min(float(unique(batch)), float(e.experts))
    u *= local / e.experts
    if setting.kind == "fraction":
        return math.ceil(setting.fraction * local * n_moe), u
    layers = min(1 + setting.prefetch_depth, n_moe)
    need = max(math.ceil(layers * u), max_unique_experts(local, e.top_k, batch))
    return min(need, local * n_moe), u


@dataclass(frozen=True)
class Plan:
    """One configuration's answer. Bytes are per GPU."""

    model: str
    gpu: str
    tp: int
    ep: bool  # experts spread whole over the tp GPUs (slots and buffer are of the busiest GPU's experts)
    batch: int
    buffer: str
    weight_dtype: str
    kv_dtype: str
    expert_dtype: str  # Prophet's experts (the baseline's are weight_dtype)
    context: int
    total_params: int
    routed_expert_bytes: int  # one routed expert of one layer, full size, in Prophet's expert dtype
    kv_bytes_per_token: int  # per GPU
    state_bytes_per_seq: int  # per GPU (Mamba)
    usable_bytes: int
    workspace_bytes: int
    baseline_weight_bytes: int
    baseline_kv_bytes: int
    baseline_kv_tokens: int
    baseline_fits: bool
    unique_experts_per_layer: float
    buffer_slots: int
    buffer_bytes: int
    buffer_ok: bool  # buffer holds one layer's worst-case unique experts at this batch
    prophet_weight_bytes: int
    prophet_kv_bytes: int
    prophet_kv_tokens: int
    prophet_fits: bool
    extension: float | None  # prophet / baseline KV tokens; None where the baseline does not fit
    baseline_max_seqs: int
    prophet_max_seqs: int
    pp: int = 1
    # under pipeline parallelism, each side's numbers are those of its stage with the fewest KV tokens
    # (every stage holds each token's KV for its layers: the poorest stage bounds the engine's cache)
    baseline_stage: int = 0
    prophet_stage: int = 0
    # Prophet's pinned host store: every routed expert of the model (all stages, every rank's shard) in
    # Prophet's expert dtype, the host memory the servers of one replica need for it
    host_expert_bytes: int = 0


def _kv_tokens(kv_bytes: int, per_token: int) -> int:
    return max(0, kv_bytes) // per_token if per_token else 0


def _max_seqs(kv_bytes: int, per_token: int, per_seq_state: int, context: int, window: int | None) -> int:
    # A sliding-window model keeps at most `window` tokens of KV per sequence.
    per_seq = per_token * min(context, window or context) + per_seq_state
    return max(0, kv_bytes) // per_seq if per_seq else 0


def plan(
    m: ModelSpec,
    gpu: GPUSpec,
    batch: int,
    setting: BufferSetting = BufferSetting(),
    cfg: ServingConfig = ServingConfig(),
    context: int | None = None,
    unique=None,
    gpu_memory_bytes: int | None = None,
) -> Plan:
    """Baseline (all weights on the GPU) vs Prophet (routed experts in host memory, a buffer of
    slots on the GPU) for one model, GPU, batch size and buffer setting. Under pipeline parallelism
    (``cfg.pp``) each stage is planned on its own GPUs (a buffer fraction is of its experts) and each
    side reports the stage that bounds its KV cache: :func:`plan_stages` has them all."""
    if cfg.pp > 1:
        stages = plan_stages(m, gpu, batch, setting, cfg, context, unique, gpu_memory_bytes)
        p = min(stages, key=lambda r: (r.prophet_kv_tokens, r.prophet_stage))
        b = min(stages, key=lambda r: (r.baseline_kv_tokens, r.baseline_stage))
        return dataclasses.replace(
            p, baseline_weight_bytes=b.baseline_weight_bytes, baseline_kv_bytes=b.baseline_kv_bytes,
            baseline_kv_tokens=b.baseline_kv_tokens, baseline_fits=b.baseline_fits,
            baseline_max_seqs=b.baseline_max_seqs, baseline_stage=b.baseline_stage,
            buffer_ok=all(r.buffer_ok for r in stages), host_expert_bytes=sum(r.host_expert_bytes for r in stages),
            extension=(p.prophet_kv_tokens / b.baseline_kv_tokens) if b.baseline_fits else None)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    context = min(context or m.max_context, m.max_context)
    params = count_params(m)
    total = sum(params.values())
    usable = int((gpu_memory_bytes or gpu.memory_bytes) * cfg.gpu_memory_utilization)
    work = workspace_bytes(m, cfg)
    per_token = kv_bytes_per_token(m, cfg.kv_dtype, cfg.tp)
    state = state_elems_per_sequence(m, context) * dtype_bytes(cfg.kv_dtype) // cfg.tp
    # Every weight is sharded over tp (vocab-parallel embeddings, column/row-parallel layers), the
    # routed experts too without EP; with EP each GPU holds its experts whole (the busiest GPU's count).
    ep = cfg.ep_size
    local = local_experts(m, ep)
    rest = weight_bytes({part: n for part, n in params.items() if part != "routed_experts"}, cfg.weight_dtype)
    if ep == 1:
        base_weights = weight_bytes(params, cfg.weight_dtype) // cfg.tp
    else:
        base_weights = rest // cfg.tp + m.moe_layers * local * weight_bytes(
            {"routed_experts": routed_expert_params(m)}, cfg.weight_dtype)
    base_kv = usable - base_weights - work

    slots, u = buffer_slots(m, batch, setting, unique, ep)
    one_expert = expert_bytes(m, cfg.prophet_expert_dtype)
    buf = slots * one_expert // (cfg.tp if ep == 1 else 1)  # a shard of each slot, or whole experts
    page_table = m.moe_layers * local * 4
    prophet_weights = rest // cfg.tp + buf + page_table
    prophet_kv = usable - prophet_weights - work

    b_tokens, p_tokens = _kv_tokens(base_kv, per_token), _kv_tokens(prophet_kv, per_token)
    b_fits, p_fits = b_tokens > 0, p_tokens > 0
    return Plan(
        model=m.name, gpu=gpu.name, tp=cfg.tp, ep=cfg.ep, batch=batch, buffer=setting.label(),
        weight_dtype=cfg.weight_dtype, kv_dtype=cfg.kv_dtype, expert_dtype=cfg.prophet_expert_dtype, context=context,
        total_params=total, routed_expert_bytes=one_expert, kv_bytes_per_token=per_token,
        state_bytes_per_seq=state, usable_bytes=usable, workspace_bytes=work,
        baseline_weight_bytes=base_weights, baseline_kv_bytes=base_kv, baseline_kv_tokens=b_tokens,
        baseline_fits=b_fits, unique_experts_per_layer=u, buffer_slots=slots, buffer_bytes=buf,
        buffer_ok=slots >= max_unique_experts(local, m.moe.top_k, batch),
        prophet_weight_bytes=prophet_weights, prophet_kv_bytes=prophet_kv, prophet_kv_tokens=p_tokens,
        prophet_fits=p_fits, extension=(p_tokens / b_tokens) if b_fits else None,
        baseline_max_seqs=_max_seqs(base_kv, per_token, state, context, m.sliding_window),
        prophet_max_seqs=_max_seqs(prophet_kv, per_token, state, context, m.sliding_window),
        pp=m.pp_stage[1], baseline_stage=m.pp_stage[0], prophet_stage=m.pp_stage[0],
        host_expert_bytes=m.moe_layers * m.moe.experts * one_expert,
    )


def plan_stages(m: ModelSpec, gpu: GPUSpec, batch: int, setting: BufferSetting = BufferSetting(),
                cfg: ServingConfig = ServingConfig(), context: int | None = None, unique=None,
                gpu_memory_bytes: int | None = None) -> list[Plan]:
    """One plan per pipeline stage of ``cfg.pp`` (per GPU of that stage's ``cfg.tp``)."""
    one = dataclasses.replace(cfg, pp=1)
    return [plan(stage_spec(m, cfg.pp, r), gpu, batch, setting, one, context or m.max_context, unique,
                 gpu_memory_bytes) for r in range(cfg.pp)]


GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Layout:
    """The smallest tensor x pipeline layout that serves a model (None where none up to the limits)."""

    model: str
    gpu: str
    side: str  # "baseline" or "prophet"
    tp: int | None
    pp: int | None
    gpus: int | None
    nodes: int | None
    kv_tokens: int | None


def smallest_layouts(m: ModelSpec, gpu: GPUSpec, batch: int, setting: BufferSetting = BufferSetting(),
                     cfg: ServingConfig = ServingConfig(), context: int | None = None, unique=None,
                     gpus_per_node: int = GPUS_PER_NODE, max_pp: int = 16) -> list[Layout]:
    """How many GPUs and nodes `m` needs, without and with Prophet: the layout with the fewest GPUs
    (tensor parallelism within a node, 1 to `gpus_per_node` in powers of two; pipeline stages across
    nodes up to `max_pp`; ties: fewer stages) whose every GPU holds its weights and workspace and a
    KV cache for at least one sequence at `context` (the model's maximum by default); Prophet's
    buffers also hold one layer's unique experts at `batch`. Expert parallelism as ``cfg.ep``."""
    tps = [t for t in (1, 2, 4, 8, 16) if t <= gpus_per_node and (not cfg.ep or t >= 2)]
    layouts = sorted(((t, p) for t in tps for p in range(1, min(max_pp, len(m.layers)) + 1)),
                     key=lambda tp_pp: (tp_pp[0] * tp_pp[1], tp_pp[1]))
    found: dict[str, Layout] = {}
    for t, p in layouts:  # fewest GPUs first: the first layout each side fits is its answer
        r = plan(m, gpu, batch, setting, dataclasses.replace(cfg, tp=t, pp=p), context, unique)
        for side, ok, tokens in (("baseline", r.baseline_max_seqs >= 1, r.baseline_kv_tokens),
                                 ("prophet", r.prophet_max_seqs >= 1 and r.buffer_ok, r.prophet_kv_tokens)):
            if ok and side not in found:
                found[side] = Layout(m.name, gpu.name, side, t, p, t * p, -(-t * p // gpus_per_node), tokens)
        if len(found) == 2:
            break
    return [found.get(side, Layout(m.name, gpu.name, side, None, None, None, None, None))
            for side in ("baseline", "prophet")]
