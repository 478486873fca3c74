"""Prophet's settings and the ``ProphetMoE`` they build: one definition for both integrations (the
vLLM plugin resolves them from ``additional_config`` and ``PROPHET_<KEY>`` environment variables,
the transformers integration from ``enable_prophet``'s arguments), so both accept and refuse the
same things and build the same layer."""

from __future__ import annotations

import contextlib
import dataclasses
import os

from prophet_kernels.memory.buffer import DEFAULT_MODE, DEFAULT_POLICY

RUNTIME_PREDICTORS = ("none", "same", "gate", "learned-gate")
EXPERT_DTYPES = ("auto", "fp8", "int4")  # auto: the checkpoint's; fp8: e4m3 with per-output-channel scales; int4:
# codes with a scale per int4_group_size inputs, symmetric or (int4_zero_points) with a zero point per group
# (experimental): both quantized on load

# The model families Prophet serves, tested end to end (tokens identical with and without Prophet) in
# both integrations: transformers model_type -> (vLLM architecture, name). Qwen2-MoE and DeepSeek-V2
# have shared experts: resident, computed by the framework's own module beside Prophet's routed
# experts (vLLM: its MoE runner). Others are refused by name: biased or non-SiLU experts (GPT-OSS),
# DeepSeek-V3's and GLM-4.5's biased grouped routing (untested), ... are not Prophet's yet.
MODEL_FAMILIES = {
    "olmoe": ("OlmoeForCausalLM", "OLMoE"),
    "mixtral": ("MixtralForCausalLM", "Mixtral"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3-MoE"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2-MoE"),
    "deepseek_v2": ("DeepseekV2ForCausalLM", "DeepSeek-V2"),
}


def check_model_family(model_type: str | None = None, architectures=()) -> None:
    """ValueError naming the model and the supported families unless it is one of MODEL_FAMILIES
    (given by transformers ``model_type`` or by vLLM's ``architectures``)."""
    archs = {a for a, _ in MODEL_FAMILIES.values()}
    if model_type in MODEL_FAMILIES or any(a in archs for a in architectures or ()):
        return
    names = ", ".join(f"{name} ({arch})" for arch, name in MODEL_FAMILIES.values())
    given = model_type or ", ".join(architectures or ()) or "unknown"
    raise ValueError(f"Prophet serves {names}; this model is {given}, which is not supported")


@dataclasses.dataclass(frozen=True)
class ProphetSettings:
    enabled: bool = False
    buffer: float = 0.5
    mode: str = DEFAULT_MODE  # "host" or "device" (ProphetMoE's mode)
    fill: str = "copy"  # device mode: "copy" or "read-through" (ProphetMoE's fill)
    policy: str = DEFAULT_POLICY  # next-use in both modes
    predictor: str = "none"
    prefetch_depth: int = 1
    prefetch_budget: int | None = 1  # experts per layer call; None: no limit
    log_every_s: float = 30.0
    predictor_path: str = ""
    expert_dtype: str = "auto"  # EXPERT_DTYPES
    int4_group_size: int = 128  # expert_dtype int4: inputs per scale (32, 64, 128)
    int4_zero_points: bool = False  # expert_dtype int4: a zero point per group (AWQ's and GPTQ's asymmetric codes)
    miss: str = "wait"  # MISSES: a miss waits for its copy, (host mode) the CPU computes it where that pays, or
    # every non-resident expert is streamed once per layer per step (large batches; memory.stream)
    cpu_threads: int = 0  # miss cpu: the CPU pool's threads per rank (0: the node's cores shared among its ranks)
    cpu_backend: str = "native"  # miss cpu: cpu.BACKENDS
    cpu_gbps: float = 0.0  # miss cpu: the rates the misses are split by; 0: measured once at start-up (cpu.rates)
    cpu_gflops: float = 0.0
    pcie_gbps: float = 0.0

    @property
    def quantize(self):
        """``HostExpertStore``'s expert_dtype for these settings: None (keep the checkpoint's), "fp8", or the
        int4 ``WeightFormat`` (group size and zero points in it)."""
        if self.expert_dtype == "int4":
            from prophet_kernels.kernels.weight_format import WeightFormat

            return WeightFormat("int4", group_size=self.int4_group_size, zero_points=self.int4_zero_points)
        return None if self.expert_dtype == "auto" else self.expert_dtype

    @property
    def group_size(self) -> int | None:
        """The int4 group size these settings quantize to (None: not int4)."""
        return self.int4_group_size if self.expert_dtype == "int4" else None

    @classmethod
    def resolve(cls, additional_config=None, environ=None) -> "ProphetSettings":
        """Environment (``PROPHET=1``, ``PROPHET_<KEY>``) overlaid by ``additional_config["prophet"]``.
        Prophet is on with ``PROPHET=1`` or an ``additional_config["prophet"]`` dict (unless it says
        ``enabled: false``); off, nothing else is read: a stray ``PROPHET_<KEY>`` cannot stop an engine."""
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        extra = (additional_config or {}).get("prophet") if isinstance(additional_config, dict) else None
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"additional_config['prophet'] must be a dict of settings, got {extra!r}")
        enabled = cls._parse("enabled", environ.get("PROPHET", ""))
        if extra is not None:
            enabled = cls._parse("enabled", extra.get("enabled", True))
        if not enabled:
            return cls()
        values: dict = {"enabled": True}
        for name in fields:
            raw = environ.get(f"PROPHET_{name.upper()}")
            if raw is not None and name != "enabled":
                values[name] = raw
        if extra is not None:
            unknown = sorted(set(extra) - set(fields))
            if unknown:
                raise ValueError(f"unknown Prophet setting(s) {unknown}; known: {sorted(fields)}")
            values.update(extra)
        return cls(**{k: cls._parse(k, v) for k, v in values.items()}).validated()

    @staticmethod
    def _parse(name, value):
        if name == "enabled" and isinstance(value, str):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if name == "int4_zero_points" and isinstance(value, str):
            word = value.strip().lower()
            if word not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"Prophet int4_zero_points must be true or false, got {value!r}")
            return word in ("1", "true", "yes", "on")
        if name == "prefetch_budget" and isinstance(value, str) and value.strip().lower() in ("none", "unlimited"):
            return None
        kind = {"buffer": float, "prefetch_depth": int, "prefetch_budget": int, "log_every_s": float,
                "cpu_threads": int, "int4_group_size": int, "cpu_gbps": float, "cpu_gflops": float, "pcie_gbps": float}.get(name)
        if kind is None or not isinstance(value, str):
            return value
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"Prophet setting {name}={value!r} is not a number") from None

    def validated(self) -> "ProphetSettings":
        from prophet_kernels.memory.buffer import DEVICE_POLICIES, FILLS, MISSES, MODES, POLICIES, check_buffer

        if self.miss not in MISSES:
            raise ValueError(f"unknown Prophet miss {self.miss!r}; known: {', '.join(MISSES)} (wait: a miss is copied "
                             "and waited for; cpu: the host CPU computes the misses whose copy does not pay; stream: "
                             "every non-resident expert is copied once per layer per step, for large batches)")
        if not (self.miss in ("cpu", "stream") and self.buffer == 0):  # buffer 0: no resident experts
            try:
                check_buffer(self.buffer)
            except ValueError as e:
                raise ValueError(f"Prophet {e}" + (" (or 0 with miss: cpu or stream)" if self.miss == "wait"
                                                   else "")) from None
        if self.mode not in MODES:
            raise ValueError(f"unknown Prophet mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.miss == "cpu":
            self._check_cpu()
        if self.miss == "stream":
            if self.mode != "host":
                raise ValueError("Prophet miss 'stream' uses the host mode's buffer (a fixed schedule, no decisions "
                                 "per call); use mode host")
            if self.predictor != "none":
                raise ValueError(f"Prophet miss 'stream' copies every non-resident expert of the next layers: "
                                 f"predictor {self.predictor!r} adds nothing to it; use predictor none")
        if self.fill not in FILLS or (self.fill != "copy" and self.mode != "device"):
            raise ValueError(f"unknown Prophet fill {self.fill!r}; known: {', '.join(FILLS)} "
                             "(read-through with mode device only)")
        known = POLICIES if self.mode == "host" else DEVICE_POLICIES
        if self.policy not in known:
            raise ValueError(f"unknown Prophet policy {self.policy!r}" + (f" for mode {self.mode}" if self.policy in POLICIES
                                                                           else "") + f"; known: {', '.join(known)}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"unknown Prophet expert_dtype {self.expert_dtype!r}; known: {', '.join(EXPERT_DTYPES)} "
                             "(auto: the checkpoint's dtype; fp8: e4m3 experts with per-output-channel scales; int4: "
                             "int4 codes with a scale per int4_group_size inputs, and with int4_zero_points a zero "
                             "point per group, experimental)")
        if self.expert_dtype == "int4":
            from prophet_kernels.kernels.int4 import check_group_size

            try:
                check_group_size(self.int4_group_size)
            except ValueError as e:
                raise ValueError(f"Prophet int4_group_size: {e}") from None
            if self.mode == "device" and self.fill == "read-through":
                raise ValueError("Prophet fill read-through is not built for expert_dtype int4: use fill copy")
        if not isinstance(self.int4_zero_points, bool):
            raise ValueError(f"Prophet int4_zero_points must be true or false, got {self.int4_zero_points!r}")
        if self.int4_zero_points and self.expert_dtype != "int4":
            raise ValueError(f"Prophet int4_zero_points goes with expert_dtype int4 (quantized at load), not "
                             f"{self.expert_dtype!r}; an int4 checkpoint's own zero points are read as they are")
        if self.predictor not in RUNTIME_PREDICTORS:
            raise ValueError(f"Prophet predictor {self.predictor!r} is not available while serving; known: "
                             f"{', '.join(RUNTIME_PREDICTORS)}")
        if self.prefetch_depth < 0:
            raise ValueError(f"Prophet prefetch_depth must be >= 0, got {self.prefetch_depth}")
        if self.prefetch_budget is not None and (not isinstance(self.prefetch_budget, int) or self.prefetch_budget < 1):
            raise ValueError(f"Prophet prefetch_budget must be a whole number of experts >= 1 (or none: no limit), "
                             f"got {self.prefetch_budget!r}")
        if self.predictor == "learned-gate" and not os.path.isfile(self.predictor_path):
            raise ValueError(f"Prophet predictor 'learned-gate' needs predictor_path, the file saved by "
                             f"`prophet trace fit-lookahead` (got {self.predictor_path!r})")
        return self

    def _check_cpu(self) -> None:
        """The refusals of ``miss: cpu`` that need no model: mode, expert dtype, threads, backend, rates."""
        import math

        from prophet_kernels.cpu import BACKENDS, available_cpus

        if self.mode != "host":
            raise ValueError("Prophet miss 'cpu' runs in mode 'host' (the host splits each layer call's misses "
                             "between the link and the CPU); use mode host, or miss wait")
        if self.expert_dtype not in ("auto", "int4"):
            raise ValueError(f"Prophet miss 'cpu' computes bf16, fp16, fp32 or int4 experts; expert_dtype "
                             f"{self.expert_dtype} on the CPU is not supported yet")
        n = available_cpus()
        if not isinstance(self.cpu_threads, int) or isinstance(self.cpu_threads, bool) or not 0 <= self.cpu_threads <= n:
            raise ValueError(f"Prophet cpu_threads={self.cpu_threads!r}: give a whole number in [1, {n}] (the cores "
                             "this process may use), or 0 for the node's cores shared among its ranks")
        if self.cpu_backend not in BACKENDS:
            raise ValueError(f"unknown Prophet cpu_backend {self.cpu_backend!r}; known: {', '.join(BACKENDS)}")
        if self.cpu_backend == "native":
            from prophet_kernels.cpu import native

            try:
                native.lib()
            except native.NativeBuildError as e:
                raise ValueError(f"Prophet cpu_backend 'native' is not available here ({str(e).splitlines()[0]}); "
                                 "install a C++ compiler, or use cpu_backend 'torch' (torch's CPU matmuls, slower)") from None
        for name in ("cpu_gbps", "cpu_gflops", "pcie_gbps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
                raise ValueError(f"Prophet {name}={v!r}: a rate > 0, or 0 to measure it at start-up")

    def cpu_threads_for(self, local_ranks: int = 1) -> int:
        """The CPU pool's threads on one of ``local_ranks`` ranks sharing this node: ``cpu_threads``, or
        the cores this process may use, less one for the serving front end, shared among the ranks,
        less one per rank for the thread that drives its device (at least 1)."""
        from prophet_kernels.cpu import available_cpus

        return self.cpu_threads or max(1, (available_cpus() - 1) // max(1, local_ranks) - 1)

    def cpu_rates(self) -> dict:
        """The rates given (``ProphetMoE``'s ``cpu_rates``): those set > 0."""
        given = {"cpu_gbps": self.cpu_gbps, "cpu_gflops": self.cpu_gflops, "link_gbps": self.pcie_gbps}
        return {k: v for k, v in given.items() if v}

    def num_slots(self, num_layers: int, num_experts: int) -> int:
        from prophet_kernels.memory.buffer import slots_for

        if self.buffer == 0:  # miss cpu / stream: no resident experts (ProphetMoE adds a staging or stream ring)
            return 0
        return slots_for(self.buffer, num_layers, num_experts)

    @contextlib.contextmanager
    def _buffer_named(self, num_layers: int, num_experts: int, max_batch_tokens: int):
        """A ValueError from sizing the buffer, with this buffer setting and what it came to."""
        try:
            yield
        except ValueError as e:
            raise ValueError(f"Prophet buffer={self.buffer} ({self.num_slots(num_layers, num_experts)} slots for "
                             f"{num_layers} layers x {num_experts} experts, up to {max_batch_tokens} tokens per "
                             f"step): {e}") from None

    def check_fits(self, num_layers: int, num_experts: int, top_k: int, max_batch_tokens: int) -> None:
        """The refusal ``build`` gives a buffer too small for one layer's unique experts at
        ``max_batch_tokens`` (ProphetMoE's own check), before anything is built or moved."""
        from prophet_kernels.memory.buffer import check_sizes
        from prophet_kernels.planner.memory import max_unique_experts

        if self.miss == "cpu":  # what has no slot is computed on the CPU: any buffer serves any batch
            return
        if self.miss == "stream":  # any batch: the ring holds a whole layer's non-resident experts
            from prophet_kernels.memory.stream import min_stream_slots

            need, have = min_stream_slots(num_layers, num_experts), self.num_slots(num_layers, num_experts)
            if have and have < need:
                with self._buffer_named(num_layers, num_experts, max_batch_tokens):
                    raise ValueError(f"streaming needs at least {need} slots (a ring of two layers' {num_experts} "
                                     "experts); give a larger buffer, or 0 for the ring alone")
            return
        with self._buffer_named(num_layers, num_experts, max_batch_tokens):
            check_sizes(num_layers, num_experts, self.num_slots(num_layers, num_experts),
                        max_unique_experts(num_experts, top_k, max_batch_tokens))

    def build(self, store, device, top_k: int, max_batch_tokens: int, gates=None, expert_map=None,
              local_ranks: int = 1):
        """The ``ProphetMoE`` these settings describe over ``store``. ``gates``: each layer's (router
        [E, H], MoE-input norm weight [H]), which the ``gate`` predictor needs. ``expert_map``
        (expert parallelism): [E_global], this rank's index of each expert or -1; the store holds this
        rank's experts, the predictors read all of them. A buffer too small for one layer's unique
        experts at ``max_batch_tokens`` is refused with the numbers. ``local_ranks``: the ranks sharing
        this node's cores (``miss: cpu``'s default thread count)."""
        from prophet_kernels import ProphetMoE

        predictor = None if self.predictor == "none" else self.predictor
        if self.predictor == "gate":
            from prophet_kernels.memory.predictors import GateLookaheadPredictor

            if gates is None or len(gates) != store.num_layers:
                raise ValueError("Prophet predictor 'gate' needs every MoE layer's router and MoE-input norm")
            predictor = GateLookaheadPredictor([g for g, _ in gates], [n for _, n in gates], top_k)
        elif self.predictor == "learned-gate":
            from prophet_kernels.memory.predictors import LearnedGatePredictor

            predictor = LearnedGatePredictor.load(self.predictor_path)
            predictor.check_model(store.num_layers, store.num_experts if expert_map is None else expert_map.numel(),
                                  store.hidden)
        with self._buffer_named(store.num_layers, store.num_experts, max_batch_tokens):
            return ProphetMoE(store, self.num_slots(store.num_layers, store.num_experts), device=device,
                              policy=self.policy, predictor=predictor, prefetch_depth=self.prefetch_depth,
                              prefetch_budget_bytes=None if self.prefetch_budget is None
                              else self.prefetch_budget * store.expert_bytes,
                              top_k=top_k, max_batch_tokens=max_batch_tokens, mode=self.mode, expert_map=expert_map,
                              fill=self.fill, miss=self.miss,
                              **({"cpu_threads": self.cpu_threads_for(local_ranks), "cpu_backend": self.cpu_backend,
                                  "cpu_rates": self.cpu_rates()} if self.miss == "cpu" else {}))
