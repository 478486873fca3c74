"""Prophet: serve Mixture-of-Experts models on one GPU from a paged expert buffer.

Public kernel API (names are a contract):

- :func:`route_plan` -- batch dedup: token-slots grouped by unique expert, padded per block.
- :func:`fused_experts_paged` -- MoE experts reading weights through a page table.
- :func:`fused_experts` -- the same kernels on contiguous ``[E, ...]`` weights.
- ``*_reference`` -- plain PyTorch references of each.
"""

__version__ = "0.1.0"

from .kernels.moe import (  # noqa: E402
    fused_experts,
    fused_experts_paged,
    fused_experts_paged_reference,
    fused_experts_reference,
)
from .kernels.route_plan import RoutePlan, route_plan, route_plan_reference  # noqa: E402

__all__ = [
    "RoutePlan",
    "route_plan",
    "route_plan_reference",
    "fused_experts",
    "fused_experts_paged",
    "fused_experts_reference",
    "fused_experts_paged_reference",
]
