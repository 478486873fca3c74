"""Paged expert buffer: S slots of one expert each on the device, a page table, eviction, pins.

    w13     [S, 2I, H]  slot s holds the gate/up rows of the expert in it
    w2      [S, H, I]
    page_table [L, E] int32 on the device: slot of expert e of layer l, or -1
    owner   slot -> (layer, expert) or None (host side, the source of truth for decisions)

Host-driven mode (design.md): the host decides residency and eviction; the device page table
row of a layer is uploaded before that layer's kernels run. A slot with a pin count > 0 is never
chosen as a victim (the experts of the layer being computed and those being prefetched hold pins).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EvictionPolicy:
    """Chooses victims among unpinned occupied slots. Subclass and register in POLICIES."""

    def insert(self, slot: int) -> None: ...
    def touch(self, slot: int) -> None: ...
    def remove(self, slot: int) -> None: ...
    def victim(self, candidates: set[int]) -> int:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used: the slot touched longest ago."""

    def __init__(self):
        self._order: OrderedDict[int, None] = OrderedDict()

    def insert(self, slot: int) -> None:
        self._order[slot] = None
        self._order.move_to_end(slot)

    touch = insert

    def remove(self, slot: int) -> None:
        self._order.pop(slot, None)

    def victim(self, candidates: set[int]) -> int:
        for slot in self._order:  # oldest first
            if slot in candidates:
                return slot
        raise LookupError("no evictable slot")


class LFUPolicy(LRUPolicy):
    """Least frequently used since insertion; ties broken by least recent use."""

    def __init__(self):
        super().__init__()
        self._count: dict[int, int] = {}

    def insert(self, slot: int) -> None:
        super().insert(slot)
        self._count[slot] = 1

    def touch(self, slot: int) -> None:
        super().touch(slot)
        self._count[slot] = self._count.get(slot, 0) + 1

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self._count.pop(slot, None)

    def victim(self, candidates: set[int]) -> int:
        rank = {s: i for i, s in enumerate(self._order)}
        pool = [s for s in candidates if s in rank]
        if not pool:
            raise LookupError("no evictable slot")
        return min(pool, key=lambda s: (self._count[s], rank[s]))


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(policy) -> EvictionPolicy:
    if isinstance(policy, EvictionPolicy):
        return policy
    try:
        return POLICIES[policy]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)} "
                         "(or pass an EvictionPolicy instance)") from None


class PagedExpertBuffer:
    """S expert slots on `device` for a model of L MoE layers with E experts each."""

    def __init__(self, num_layers: int, num_experts: int, hidden: int, intermediate: int, num_slots: int,
                 dtype: torch.dtype, device, policy="lru", min_slots: int = 1):
        if num_slots < max(1, min_slots):
            raise ValueError(
                f"expert buffer of {num_slots} slots is smaller than one layer's unique experts at the "
                f"configured maximum batch: need at least {max(1, min_slots)} slots")
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.device = torch.device(device)
        self.w13 = torch.empty((num_slots, 2 * intermediate, hidden), dtype=dtype, device=self.device)
        self.w2 = torch.empty((num_slots, hidden, intermediate), dtype=dtype, device=self.device)
        self.page_table = torch.full((num_layers, num_experts), -1, dtype=torch.int32, device=self.device)
        self._table = [[-1] * num_experts for _ in range(num_layers)]  # host copy, source of truth
        self.owner: list[tuple[int, int] | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.policy = make_policy(policy)
        self._free = list(range(num_slots - 1, -1, -1))

    def lookup(self, layer: int, expert: int) -> int:
        return self._table[layer][expert]

    def touch(self, slot: int) -> None:
        self.policy.touch(slot)

    def pin(self, slots) -> None:
        for s in slots:
            self.pins[s] += 1

    def unpin(self, slots) -> None:
        for s in slots:
            if self.pins[s] <= 0:
                raise RuntimeError(f"slot {s} unpinned more often than pinned")
            self.pins[s] -= 1

    def full(self) -> bool:
        """No free slot and every occupied slot pinned: nothing can be placed now."""
        return not self._free and all(p > 0 for p in self.pins)

    def allocate(self, layer: int, expert: int) -> tuple[int, tuple[int, int] | None]:
        """A slot for (layer, expert): a free one, else the policy's victim among unpinned slots.
        Returns (slot, evicted owner or None). The caller fills the slot before anyone reads it."""
        if self._table[layer][expert] >= 0:
            raise RuntimeError(f"expert {expert} of layer {layer} is already in slot {self._table[layer][expert]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            if self.full():
                raise RuntimeError(f"all {self.num_slots} slots are pinned; cannot place expert {expert} of layer {layer}")
            slot = self.policy.victim({s for s in range(self.num_slots) if self.pins[s] == 0})
            evicted = self.owner[slot]
            self._table[evicted[0]][evicted[1]] = -1
            self.policy.remove(slot)
        self.owner[slot] = (layer, expert)
        self._table[layer][expert] = slot
        self.policy.insert(slot)
        return slot, evicted

    def upload_row(self, layer: int) -> torch.Tensor:
        """Write layer's page-table row to the device (from a pageable host tensor: the copy is
        staged before this returns, so later host edits cannot race it) and return the row."""
        row = self.page_table[layer]
        row.copy_(torch.tensor(self._table[layer], dtype=torch.int32))
        return row
