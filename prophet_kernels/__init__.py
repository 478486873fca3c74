"""Prophet: serve Mixture-of-Experts models on one GPU from a paged expert buffer.

Subpackages (imports go one way: integration -> memory -> kernels, planner, cpu; routing -> memory):

- ``kernels``      Triton kernels: route plan (batch dedup), paged grouped GEMMs, the GEMV decode
                   path, launch configs as data, and a PyTorch reference per op.
- ``cpu``          routed experts computed on the host CPU (``miss: cpu``): a native kernel with its own
                   thread pool, compiled at first use, the rates a layer call's misses are split by.
- ``memory``       host expert store, paged expert buffer, residency decisions, predictors, copy
                   stream, and ``ProphetMoE``, the layer both integrations drive.
- ``routing``      the routing study: traces, the trace-driven simulator, the sweep report.
- ``planner``      the capacity planner: model and GPU catalogue, memory model, tables, figures.
- ``integration``  the vLLM plugin, the transformers experts implementation, their shared settings,
                   ``prophet demo``.
- ``benchmark``    the kernel benchmark behind ``prophet bench``.

Public names, importable from here (a contract): :func:`route_plan`, :func:`fused_experts_paged`,
:func:`fused_experts` and their ``*_reference``; :func:`quantize_fp8`, :func:`dequantize_fp8`;
:class:`HostExpertStore`,
:class:`PagedExpertBuffer`, :class:`SlotTable`, :class:`ExpertResidency`,
:class:`StreamPrefetcher`, :class:`ProphetMoE`; the predictors; :class:`Trace`,
:func:`load_trace`, :func:`simulate`.

They load on first use, so that a caller (the ``prophet`` command, a test conftest) can still
choose the Triton interpreter (``TRITON_INTERPRET=1``) after importing the package: Triton decides
interpreter or compiler when a kernel is defined.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "RoutePlan": "kernels.route_plan",
    "route_plan": "kernels.route_plan",
    "route_plan_reference": "kernels.route_plan",
    "fused_experts": "kernels.moe",
    "fused_experts_paged": "kernels.moe",
    "fused_experts_reference": "kernels.moe",
    "fused_experts_paged_reference": "kernels.moe",
    "quantize_fp8": "kernels.fp8",
    "dequantize_fp8": "kernels.fp8",
    "HostExpertStore": "memory.store",
    "PagedExpertBuffer": "memory.buffer",
    "StreamPrefetcher": "memory.prefetch",
    "ProphetMoE": "memory.layer",
    "SlotTable": "memory.buffer",
    "ExpertResidency": "memory.residency",
    "OraclePredictor": "memory.predictors",
    "SameExpertsPredictor": "memory.predictors",
    "FrequencyPredictor": "memory.predictors",
    "TransitionPredictor": "memory.predictors",
    "LearnedPredictor": "memory.predictors",
    "GateLookaheadPredictor": "memory.predictors",
    "fit_predictor": "memory.predictors",
    "Trace": "routing.traces",
    "load_trace": "routing.traces",
    "simulate": "routing.simulator",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'prophet_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
