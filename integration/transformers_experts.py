"""Prophet as a transformers experts implementation (transformers 5's ``ExpertsInterface``): the
routed experts of a transformers OLMoE, Mixtral or Qwen3-MoE model move into Prophet's (pinned) host store,
and each MoE block's experts call runs through one ``ProphetMoE`` (the same orchestration the vLLM
plugin uses) with a paged expert buffer on the device.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)   # loaded on the host
    moe = enable_prophet(model, buffer=0.5, predictor="gate")                  # experts -> host store
    model.to("cuda")                      # the rest of the model; the experts stay on the host
    model.generate(...)
    print(moe.stats)

The experts leave the model's parameters (one layer at a time, so the host never holds them
twice); save the model from its original checkpoint, not from this one. Router, attention and the
generation loop are transformers' own: only the experts' weighted sum is Prophet's.
"""

from __future__ import annotations

import torch

from prophet_kernels.integration.settings import ProphetSettings, check_model_family
from prophet_kernels import HostExpertStore, ProphetMoE
from prophet_kernels.memory.buffer import DEFAULT_MODE, DEFAULT_POLICY
from prophet_kernels.memory.store import expert_modules

NAME = "prophet"  # the experts_implementation name


def prophet_experts_forward(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts call of one MoE block (transformers' signature: [T, H], [T, k], [T, k] -> [T, H])."""
    moe, layer = experts.prophet
    return moe.forward(layer, hidden_states, top_k_weights, top_k_index.to(torch.int64))


def _register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, prophet_experts_forward)


def enable_prophet(model, buffer: float = 0.5, device=None, policy: str = DEFAULT_POLICY, predictor: str = "none",
                   prefetch_depth: int = 1, prefetch_budget: int | None = 1, predictor_path: str = "",
                   max_batch_tokens: int | None = None, mode: str = DEFAULT_MODE, expert_dtype: str = "auto",
                   miss: str = "wait", cpu_threads: int = 0, cpu_backend: str = "native", cpu_gbps: float = 0.0,
                   cpu_gflops: float = 0.0, pcie_gbps: float = 0.0, int4_group_size: int = 128,
                   int4_zero_points: bool = False) -> ProphetMoE:
    """Moves `model`'s routed experts into a host store and serves them through a ProphetMoE.

    The settings are the vLLM plugin's (``settings.ProphetSettings``): buffer (fraction
    of all routed experts in (0, 1], or a slot count > 1), mode (host or device), policy (default
    next-use), predictor (none, same, gate: the
    next layers' routers on this layer's MoE input, learned-gate: the file at ``predictor_path``),
    prefetch_depth, prefetch_budget (most experts one layer call may prefetch; None: no limit),
    expert_dtype (auto: the model's; fp8: quantized to e4m3 with per-output-channel scales as they
    move into the store, one expert at a time: half the bytes per slot and per copy; int4: symmetric
    int4 codes with a scale per int4_group_size inputs, about a quarter, and with int4_zero_points a
    zero point per group, experimental), miss (wait: a
    miss is copied and waited for; cpu: the host CPU computes the misses whose copy does not pay,
    buffer 0 then valid; stream: every non-resident expert copied once per layer per step, one layer
    ahead, for large batches, buffer 0: the ring alone), cpu_threads (0: the cores this process may use, less one), cpu_backend,
    cpu_gbps / cpu_gflops / pcie_gbps (the rates misses are split by; 0: measured at start-up).
    device: the expert buffer's (default cuda when present, else cpu; the rest of the model follows
    with ``model.to(device)``). max_batch_tokens: the most tokens one forward carries; the buffer
    must hold the unique experts one layer can need then (default: any batch, so all E of a layer)."""
    settings = ProphetSettings(enabled=True, buffer=buffer, mode=mode, policy=policy, predictor=predictor,
                               prefetch_depth=prefetch_depth, prefetch_budget=prefetch_budget,
                               predictor_path=predictor_path, expert_dtype=expert_dtype, miss=miss,
                               cpu_threads=cpu_threads, cpu_backend=cpu_backend, cpu_gbps=cpu_gbps,
                               cpu_gflops=cpu_gflops, pcie_gbps=pcie_gbps,
                               int4_group_size=int4_group_size, int4_zero_points=int4_zero_points).validated()
    if any(hasattr(m, "prophet") for m in model.modules()):
        raise ValueError("Prophet is already enabled on this model")
    check_model_family(model_type=getattr(model.config, "model_type", None))
    modules = expert_modules(model)
    act = str(getattr(model.config, "hidden_act", None))
    for m in modules:
        problems = [p for p, bad in (("a bias", getattr(m, "has_bias", False)),
                                     ("no gate", not getattr(m, "has_gate", True)),
                                     ("transposed weights", getattr(m, "is_transposed", False)),
                                     ("interleaved gate/up weights", not getattr(m, "is_concatenated", True)),
                                     (f"activation {act}", act not in ("silu", "swish"))) if bad]
        if problems:
            raise ValueError(f"Prophet supports SiLU-gated experts without bias with [gate; up] weights "
                             f"(OLMoE, Mixtral, Qwen3-MoE); {type(m).__name__} has {', '.join(problems)}")
    top_k = int(getattr(model.config, "num_experts_per_tok"))
    L, E = len(modules), modules[0].gate_up_proj.shape[0]
    tokens = max_batch_tokens or 2**31
    settings.check_fits(L, E, top_k, tokens)  # a buffer too small is refused before the experts leave the model
    gates = None
    if predictor == "gate":  # the routers stay the model's
        from prophet_kernels.memory.predictors import gate_lookahead_parts

        routers, norms, _ = gate_lookahead_parts(model)
        gates = list(zip(routers, norms))

    def release(layer: int) -> None:  # the layer is in the store: drop the model's copy
        del modules[layer].gate_up_proj, modules[layer].down_proj

    # a generator: each layer's parameters are dropped once copied, so the host holds one layer twice at most
    dtype = modules[0].gate_up_proj.dtype
    store = HostExpertStore.from_parameters(((m.gate_up_proj.data, m.down_proj.data) for m in modules),
                                            release=release, expert_dtype=settings.quantize)
    try:
        moe = settings.build(store, device, top_k, tokens, gates)
    except BaseException:  # e.g. out of device memory: the experts go back to the model (host copies;
        for l, m in enumerate(modules):  # quantized ones dequantized: the model keeps the quantized values)
            w13, w2 = store.w13[l], store.w2[l]
            if store.fmt.kind != "float":
                q = store.quant(l)
                w13 = store.fmt.dequantize(w13, q.w13_scale, q.w13_zeros).to(dtype)
                w2 = store.fmt.dequantize(w2, q.w2_scale, q.w2_zeros).to(dtype)
            m.gate_up_proj, m.down_proj = torch.nn.Parameter(w13, False), torch.nn.Parameter(w2, False)
        raise
    for layer, m in enumerate(modules):
        m.prophet = (moe, layer)
    _register()
    model.set_experts_implementation(NAME)
    return moe
