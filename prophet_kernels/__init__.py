"""Prophet: serve Mixture-of-Experts models on one GPU from a paged expert buffer.

Public kernel API (names are a contract):

- :func:`route_plan` -- batch dedup: token-slots grouped by unique expert, padded per block.
- :func:`fused_experts_paged` -- MoE experts reading weights through a page table.
- :func:`fused_experts` -- the same kernels on contiguous ``[E, ...]`` weights.
- ``*_reference`` -- plain PyTorch references of each.

Memory system (host-driven mode): :class:`HostExpertStore` (all experts in pinned host memory),
:class:`PagedExpertBuffer` (S device slots, page table, eviction policy, pins),
:class:`StreamPrefetcher` (copy stream, per-slot events), :class:`ProphetMoE` (the layer-level
orchestration: ``ProphetMoE.from_weights(w13, w2, num_slots, ...)``, ``forward``, ``stats``),
whose decisions live in :class:`ExpertResidency` over a :class:`SlotTable`.

Routing: :class:`Trace` / :func:`load_trace` (recorded routing), :func:`simulate` (replays a trace
through the same decisions), predictors (same, frequency, transition, learned, gate lookahead, oracle).

The kernel modules load on first use, so that a caller (the ``prophet`` command, a test
conftest) can still choose the Triton interpreter (``TRITON_INTERPRET=1``) after importing the
package: Triton decides interpreter or compiler when a kernel is defined.
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
    "HostExpertStore": "store",
    "PagedExpertBuffer": "buffer",
    "StreamPrefetcher": "prefetch",
    "ProphetMoE": "layer",
    "SlotTable": "buffer",
    "ExpertResidency": "residency",
    "OraclePredictor": "predictors",
    "SameExpertsPredictor": "predictors",
    "FrequencyPredictor": "predictors",
    "TransitionPredictor": "predictors",
    "LearnedPredictor": "predictors",
    "GateLookaheadPredictor": "predictors",
    "fit_predictor": "predictors",
    "Trace": "traces",
    "load_trace": "traces",
    "simulate": "simulator",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'prophet_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
