"""ProphetMoE: the layer-level orchestration both integrations use (host-driven mode).

forward(layer, x, topk_weights, topk_ids) for MoE layer `layer`:
  route            unique experts of this batch (one small device-to-host copy: the host decides)
  ensure_resident  hits are pinned; misses get a slot (free, else the policy's unpinned victim),
                   are copied on the copy stream and the compute stream waits for them (stall)
  experts          fused_experts_paged through this layer's page-table row
  prefetch         the predictor's experts for layers +1..+prefetch_depth are copied into victim
                   slots within the byte budget, while this layer's slots stay pinned
Stats count per layer; hits and misses are per unique expert a layer needs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .buffer import PagedExpertBuffer
from .kernels.moe import fused_experts_paged
from .planner.memory import max_unique_experts
from .predictors import make_predictor
from .prefetch import StreamPrefetcher, nvtx_range
from .store import HostExpertStore


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # experts copied ahead of need
    prefetch_used: int = 0  # prefetched experts that a layer then read (before eviction)
    evictions: int = 0
    bytes_h2d: int = 0
    stall_s: float = 0.0  # time spent fetching misses on demand


class Stats:
    """Per-layer counters (``stats.layers[l]``) and their totals as attributes."""

    def __init__(self, num_layers: int):
        self.layers = [LayerStats() for _ in range(num_layers)]

    def __getattr__(self, name):
        if name in LayerStats.__dataclass_fields__:
            return sum(getattr(s, name) for s in self.layers)
        raise AttributeError(name)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        total = {f.name: getattr(self, f.name) for f in fields(LayerStats)}
        return {"total": total | {"hit_rate": self.hit_rate},
                "layers": [{f.name: getattr(s, f.name) for f in fields(LayerStats)} for s in self.layers]}

    def __str__(self) -> str:
        return (f"hits {self.hits}  misses {self.misses}  hit rate {self.hit_rate:.1%}  prefetched {self.prefetched} "
                f"(used {self.prefetch_used})  evictions {self.evictions}  H2D {self.bytes_h2d / 1e6:.1f} MB  "
                f"stall {self.stall_s * 1e3:.2f} ms")


class ProphetMoE:
    """Experts of L MoE layers in a host store, S slots on the device, optional prefetching."""

    def __init__(self, store: HostExpertStore, num_slots: int, device=None, policy="lru", predictor=None,
                 prefetch_depth: int = 1, prefetch_budget_bytes: int | None = None,
                 top_k: int | None = None, max_batch_tokens: int | None = None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        if prefetch_budget_bytes is not None and prefetch_budget_bytes < 0:
            raise ValueError(f"prefetch_budget_bytes must be >= 0, got {prefetch_budget_bytes}")
        min_slots = 1
        if top_k is not None and max_batch_tokens is not None:
            if not 1 <= top_k <= store.num_experts:
                raise ValueError(f"top_k={top_k} must be in [1, E={store.num_experts}]")
            min_slots = max_unique_experts(store.num_experts, top_k, max_batch_tokens)
        self.store = store
        self.buffer = PagedExpertBuffer(store.num_layers, store.num_experts, store.hidden, store.intermediate,
                                        num_slots, store.dtype, device, policy, min_slots)
        self.prefetcher = StreamPrefetcher(store, self.buffer)
        self.predictor = make_predictor(predictor)
        self.prefetch_depth = prefetch_depth
        self.prefetch_budget_bytes = prefetch_budget_bytes
        self.stats = Stats(store.num_layers)
        self._unread_prefetch: set[int] = set()  # slots filled by prefetch, not yet read
        self.current_slots: list[int] = []  # slots the layer being computed reads (pinned)

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor, num_slots: int, device=None, policy="lru",
                     predictor=None, prefetch_depth: int = 1, **kwargs) -> "ProphetMoE":
        """w13 [L, E, 2I, H], w2 [L, E, H, I] (any device; copied into the host store)."""
        return cls(HostExpertStore.from_tensors(w13, w2), num_slots, device, policy, predictor,
                   prefetch_depth, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    # ---------------------------------------------------------------------------------- forward

    def forward(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        L, E, S = self.store.num_layers, self.store.num_experts, self.buffer.num_slots
        if not 0 <= layer < L:
            raise ValueError(f"layer {layer} out of range [0, {L})")
        if topk_ids.dim() != 2:
            raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
        if topk_ids.numel() == 0:
            return x.new_empty((0, self.store.hidden))
        with nvtx_range(f"route L{layer}"):
            # Host sync (host-driven mode): the host must know which experts to make resident.
            experts = torch.unique(topk_ids).tolist()
        if experts[0] < 0 or experts[-1] >= E:
            raise ValueError(f"topk_ids holds expert ids outside [0, {E}) in layer {layer}")
        if len(experts) > S:
            raise ValueError(f"layer {layer} needs {len(experts)} unique experts but the buffer has {S} slots; "
                             f"need at least {len(experts)} (or a smaller batch)")
        st = self.stats.layers[layer]
        slots, fills = [], []
        with nvtx_range(f"ensure_resident L{layer}"):
            for e in experts:
                s = self.buffer.lookup(layer, e)
                if s >= 0:
                    st.hits += 1
                    self.buffer.touch(s)
                    if s in self._unread_prefetch:
                        st.prefetch_used += 1
                else:
                    st.misses += 1
                    s, evicted = self.buffer.allocate(layer, e)
                    st.evictions += evicted is not None
                    fills.append((s, layer, e))
                self._unread_prefetch.discard(s)
                self.buffer.pin([s])  # before the next allocation, so this layer never evicts itself
                slots.append(s)
            st.stall_s += self.prefetcher.demand(fills)
            st.bytes_h2d += len(fills) * self.store.expert_bytes
            row = self.buffer.upload_row(layer)
            self.prefetcher.wait_ready(slots)
        self.current_slots = slots
        try:
            with nvtx_range(f"experts L{layer}"):
                y = fused_experts_paged(x, self.buffer.w13, self.buffer.w2, row, topk_weights, topk_ids, check=False)
            self.prefetcher.mark_read(slots)
            self._prefetch(layer, topk_ids, x)
        finally:
            self.buffer.unpin(slots)
            self.current_slots = []
        return y

    __call__ = forward

    def _prefetch(self, layer: int, topk_ids: torch.Tensor, x: torch.Tensor) -> None:
        if self.predictor is None or self.prefetch_depth == 0:
            return
        L, E, eb = self.store.num_layers, self.store.num_experts, self.store.expert_bytes
        with nvtx_range(f"predict L{layer}"):
            want = self.predictor.predict(layer, topk_ids, x, L, self.prefetch_depth)
        spent, held = 0, []
        try:
            for d in range(1, self.prefetch_depth + 1):
                future = (layer + d) % L
                for e in want.get(future, []):
                    if not 0 <= e < E:
                        raise ValueError(f"predictor returned expert {e} outside [0, {E}) for layer {future}")
                    s = self.buffer.lookup(future, e)
                    if s >= 0:  # already resident: hold it so this call's later copies keep it
                        self.buffer.pin([s])
                        held.append(s)
                        continue
                    if self.prefetch_budget_bytes is not None and spent + eb > self.prefetch_budget_bytes:
                        return
                    if self.buffer.full():
                        return  # every slot is read now or was just prefetched
                    s, evicted = self.buffer.allocate(future, e)
                    self.prefetcher.copy(s, future, e)
                    fs = self.stats.layers[future]
                    fs.prefetched += 1
                    fs.bytes_h2d += eb
                    fs.evictions += evicted is not None
                    self._unread_prefetch.add(s)
                    self.buffer.pin([s])  # nearer layers' prefetches are not evicted by farther ones
                    held.append(s)
                    spent += eb
        finally:
            self.buffer.unpin(held)
