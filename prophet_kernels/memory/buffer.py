"""Paged expert buffer: S slots of one expert each on the device, a page table, eviction, pins.

    SlotTable           the decisions, no tensors: which (layer, expert) owns which slot, pins,
                        the eviction policy. The trace simulator runs exactly this.
    PagedExpertBuffer   a SlotTable plus the device tensors it describes:

    w13     [S, 2I, H]  slot s holds the gate/up rows of the expert in it
    w2      [S, H, I]   (both views of one [S, 3*I*H] block, ``blocks``: one copy fills a slot)
    page_table [L, E] int32 on the device: slot of expert e of layer l, or -1
    owner   slot -> (layer, expert) or None (host side, the source of truth for decisions)

Host-driven mode (design.md): the host decides residency and eviction; the device page table
row of a layer is uploaded before that layer's kernels run. A slot with a pin count > 0 is never
chosen as a victim (the experts of the layer being computed and those being prefetched hold pins).
"""

from __future__ import annotations

import heapq
from array import array
from collections import Counter, OrderedDict

import numpy as np
import torch

from .store import allocate_experts


class EvictionPolicy:
    """Chooses victims among unpinned occupied slots. Subclass and register in POLICIES."""

    def bind(self, table: "SlotTable") -> None:
        """Called once by the table the policy serves (policies that need slot owners keep it)."""

    def on_layer(self, layer: int, experts) -> None:
        """Called when layer `layer` starts, with the unique experts it needs (before they are acquired)."""

    def insert(self, slot: int) -> None: ...
    def touch(self, slot: int) -> None: ...
    def remove(self, slot: int) -> None: ...
    def victim(self, candidates) -> int:
        """A slot from `candidates` (the unpinned slots; supports `in`)."""
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

    def victim(self, candidates) -> int:
        for slot in self._order:  # oldest first
            if slot in candidates:
                return slot
        raise LookupError("no evictable slot")


class _HeapPolicy(EvictionPolicy):
    """Victim = the smallest key among unpinned slots; keys live in a heap, stale entries skipped."""

    def __init__(self):
        self._heap: list[tuple] = []
        self._key: dict[int, tuple] = {}

    def _set(self, slot: int, key: tuple) -> None:
        self._key[slot] = key
        heapq.heappush(self._heap, (key, slot))
        if len(self._heap) > 4 * len(self._key) + 64:  # drop stale entries now and then
            self._heap = [(k, s) for s, k in self._key.items()]
            heapq.heapify(self._heap)

    def remove(self, slot: int) -> None:
        self._key.pop(slot, None)

    def victim(self, candidates) -> int:
        aside, found = [], None
        while self._heap:
            key, slot = heapq.heappop(self._heap)
            if self._key.get(slot) != key:
                continue  # stale
            if slot in candidates:
                found = slot
            aside.append((key, slot))  # the victim's entry too: the table removes it
            if found is not None:
                break
        for item in aside:
            heapq.heappush(self._heap, item)
        if found is None:
            raise LookupError("no evictable slot")
        return found


class LFUPolicy(_HeapPolicy):
    """Least frequently used since insertion; ties broken by least recent use."""

    def __init__(self):
        super().__init__()
        self._tick = 0

    def insert(self, slot: int) -> None:
        self._tick += 1
        self._set(slot, (1, self._tick))

    def touch(self, slot: int) -> None:
        self._tick += 1
        self._set(slot, (self._key.get(slot, (0,))[0] + 1, self._tick))


class BeladyPolicy(_HeapPolicy):
    """Clairvoyant bound (Belady's MIN): evict the slot whose expert is next needed farthest in the
    future. `next_use(layer, expert)` returns when that expert is next needed after now (any
    ordered value; inf for never); the caller that knows the future (the trace simulator) supplies
    it. A key stays exact until the expert's next access, which touches it again."""

    def __init__(self, next_use):
        super().__init__()
        self.next_use = next_use
        self.table: SlotTable | None = None

    def bind(self, table):
        self.table = table

    def insert(self, slot: int) -> None:
        nu = self.next_use(*self.table.owner[slot])
        self._set(slot, (-nu, slot))  # farthest next use first

    touch = insert


class CyclicPolicy(EvictionPolicy):
    """Decode visits layers cyclically, so an expert of the layer that just ran is next needed a
    whole step later, while LRU's oldest slots belong to the layers about to run. Victim: an
    unpinned slot of the layer farthest ahead in the cycle (the one that just ran first), and
    within that layer the least frequently used (LFU, ties by recency)."""

    def __init__(self):
        self.table: SlotTable | None = None
        self.cur = 0
        self._layers: dict[int, LFUPolicy] = {}

    def bind(self, table):
        self.table = table

    def on_layer(self, layer, experts):
        self.cur = layer

    def _sub(self, slot) -> LFUPolicy:
        layer = self.table.owner[slot][0]
        sub = self._layers.get(layer)
        if sub is None:  # (not setdefault: that would build a policy on every call)
            sub = self._layers[layer] = LFUPolicy()
        return sub

    def insert(self, slot):
        self._sub(slot).insert(slot)

    def touch(self, slot):
        self._sub(slot).touch(slot)

    def remove(self, slot):
        self._sub(slot).remove(slot)

    def victim(self, candidates) -> int:
        L = self.table.num_layers
        for back in range(L):  # the current layer, then the one before, ...: farthest next use first
            sub = self._layers.get((self.cur - back) % L)
            if sub is not None:
                try:
                    return sub.victim(candidates)
                except LookupError:
                    continue
        raise LookupError("no evictable slot")


class NextUsePolicy(EvictionPolicy):
    """Belady's MIN with the future estimated: evict the slot whose expert is expected to be needed
    farthest ahead, counted in layer calls. Decode visits layers in a cycle, so an expert of layer l'
    is next visited delta = (l' - current) mod L calls from now (L for the current layer); if layer l'
    used it on a fraction p of its recent calls (a running average over about 1/alpha calls), its
    expected next use is delta + L (1 - p) / p. An expert touched since its layer last ran (a hit,
    a fill, or a predictor naming it) is taken as needed at its next visit: delta. Unlike the cyclic
    policy, a popular expert of the layer that just ran outlives a rarely used one of a later layer.
    alpha = 0.03 was chosen on the train-split traces of both routing shapes (docs/routing.md)."""

    def __init__(self, alpha: float = 0.03):
        if not 0 < alpha <= 1:
            raise ValueError(f"next-use policy: alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.table: SlotTable | None = None
        self.cur = 0

    def bind(self, table):
        self.table = table
        self._freq = np.zeros((table.num_layers, table.num_experts))  # running share of calls using (l, e)
        self._layer = np.full(table.num_slots, -1)  # owner of each slot (-1: free)
        self._expert = np.zeros(table.num_slots, dtype=np.int64)
        # wanted = touched since its layer last ran: touched[slot] > ended[its layer], on a clock that
        # ticks when the current layer changes (so a layer call's end clears its slots in O(1))
        self._clock = 0
        self._touched = np.full(table.num_slots, -1, dtype=np.int64)
        self._ended = np.full(table.num_layers, -1, dtype=np.int64)
        self._score: np.ndarray | None = None  # expected calls to next use per slot; None: stale

    def on_layer(self, layer, experts):
        if layer != self.cur:
            self._ended[self.cur] = self._clock  # the layer that ran has had its use
            self._clock += 1
        self.cur = layer
        freq = self._freq[layer]
        freq *= 1 - self.alpha
        for e in experts:  # (a Python loop: 2x faster than fancy indexing with a list at k = 8)
            freq[e] += self.alpha
        self._score = None  # every delta and this layer's frequencies moved: recompute at the next victim

    def _delta(self, layer):
        """Layer calls until `layer` (scalar or array) runs next: 1..L, L for the current layer."""
        return (layer - (self.cur + 1)) % self.table.num_layers + 1

    def _mark_wanted(self, slot):
        self._touched[slot] = self._clock
        if self._score is not None:  # within a layer call only this slot's score changes
            self._score[slot] = self._delta(self._layer[slot])

    def insert(self, slot):
        self._layer[slot], self._expert[slot] = self.table.owner[slot]
        self._mark_wanted(slot)

    def touch(self, slot):
        self._mark_wanted(slot)

    def remove(self, slot):
        self._layer[slot] = -1
        self._touched[slot] = -1
        if self._score is not None:
            self._score[slot] = -np.inf

    def _scores(self) -> np.ndarray:
        L, layer = self.table.num_layers, self._layer
        delta = self._delta(layer)
        owner = np.maximum(layer, 0)
        p = np.maximum(self._freq.take(owner * self.table.num_experts + self._expert), 1e-3)
        unwanted = self._touched <= self._ended.take(owner)
        score = delta + unwanted * (L * (1 - p) / p)  # delta if wanted, else delta + L (1 - p) / p
        score[layer < 0] = -np.inf
        return score

    def victim(self, candidates) -> int:
        if self._score is None:
            self._score = self._scores()
        score = self._score.copy()
        for _ in range(self.table.num_slots):  # pinned slots are few: skip them one by one
            slot = int(score.argmax())
            if score[slot] == -np.inf:
                break
            if slot in candidates:
                return slot
            score[slot] = -np.inf
        raise LookupError("no evictable slot")


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy, "cyclic": CyclicPolicy, "next-use": NextUsePolicy}
# The default everywhere (ProphetMoE, the plugin, the transformers integration, the simulator, the CLI):
# the best policy without a predictor in the routing study (docs/routing.md).
DEFAULT_POLICY = "next-use"
MODES = ("host", "device")  # who decides residency: the host at every layer call, or the device (memory.device)
FILLS = ("copy", "read-through")  # device mode: a copy kernel before the GEMMs, or the decode GEMMs fill as they read
# a miss waits for its copy, or (host mode) the host CPU computes it where that pays, or every
# non-resident expert is streamed once per layer per step, one layer ahead (memory.stream)
MISSES = ("wait", "cpu", "stream")
DEFAULT_MODE = "host"  # until device mode is measured on a GPU (PERF_NOTES.md)
DEVICE_POLICIES = ("next-use", "lru")  # what device mode decides with (kernels.residency), default first


def make_policy(policy) -> EvictionPolicy:
    if isinstance(policy, EvictionPolicy):
        return policy
    if policy == "belady":
        raise ValueError("the 'belady' policy needs the future routing: use it through the trace simulator "
                         "(prophet simulate) or pass BeladyPolicy(next_use)")
    try:
        return POLICIES[policy]()
    except (KeyError, TypeError):
        raise ValueError(f"unknown eviction policy {policy!r}; known: {', '.join(POLICIES)} "
                         "(or pass an EvictionPolicy instance)") from None


class _Unpinned:
    """The unpinned slots, as a view (no set is built per eviction)."""

    def __init__(self, pins: list[int]):
        self.pins = pins

    def __contains__(self, slot: int) -> bool:
        return self.pins[slot] == 0


def check_buffer(buffer: float) -> float:
    """A buffer size: a fraction of all routed experts in (0, 1], or a whole number of slots > 1."""
    if not buffer > 0 or (buffer > 1 and buffer != int(buffer)):
        raise ValueError(f"buffer={buffer}: give a fraction of the experts in (0, 1] or a whole number of slots")
    return buffer


def slots_for(buffer: float, num_layers: int, num_experts: int) -> int:
    """Slots of a buffer given as a fraction of all routed experts in (0, 1] (rounded down, at least
    one), or as a slot count > 1 (its whole part; :func:`check_buffer` refuses a fractional one)."""
    if not buffer > 0:
        raise ValueError(f"buffer={buffer}: give a fraction of the experts in (0, 1] or a whole number of slots")
    return max(1, int(buffer * num_layers * num_experts)) if buffer <= 1 else int(buffer)


def check_sizes(num_layers: int, num_experts: int, num_slots: int, min_slots: int = 1) -> None:
    """Whole numbers >= 1, and a buffer that holds one layer's unique experts (``min_slots``)."""
    for name, v in (("num_layers", num_layers), ("num_experts", num_experts), ("num_slots", num_slots)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise (ValueError if isinstance(v, int) else TypeError)(f"{name} must be a whole number >= 1, got {v!r}")
    if num_slots < max(1, min_slots):
        raise ValueError(
            f"expert buffer of {num_slots} slots is smaller than one layer's unique experts at the "
            f"configured maximum batch: need at least {max(1, min_slots)} slots")


class SlotTable:
    """Residency decisions for S slots serving L layers x E experts: owners, pins, eviction."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, policy=DEFAULT_POLICY, min_slots: int = 1):
        check_sizes(num_layers, num_experts, num_slots, min_slots)
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        # host copy, source of truth; int32 arrays, so a row uploads without a conversion
        self._table = [array("i", [-1] * num_experts) for _ in range(num_layers)]
        self.row_version = [0] * num_layers  # bumped whenever a layer's row of the table changes
        self.owner: list[tuple[int, int] | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self._pinned = 0  # slots with pins > 0
        self.policy = make_policy(policy)
        self.policy.bind(self)
        self._free = list(range(num_slots - 1, -1, -1))

    def check_expert(self, layer: int, expert: int) -> None:
        """ValueError unless (layer, expert) names one of the table's experts (no negative index:
        Python's would alias expert E-1)."""
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise ValueError(f"expert {expert!r} of layer {layer!r} is outside the table's "
                             f"{self.num_layers} layers x {self.num_experts} experts")

    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot!r} is outside [0, {self.num_slots})")

    def lookup(self, layer: int, expert: int) -> int:
        self.check_expert(layer, expert)
        return self._table[layer][expert]

    def touch(self, slot: int) -> None:
        self.policy.touch(slot)

    def pin(self, slots) -> None:
        slots = list(slots)
        for s in slots:  # all checked before any pin changes
            self.check_slot(s)
        for s in slots:
            self._pinned += self.pins[s] == 0
            self.pins[s] += 1

    def unpin(self, slots) -> None:
        slots = list(slots)
        times = Counter(slots) if len(set(slots)) != len(slots) else None  # a slot listed more than once
        for s in slots:  # all checked before any pin changes
            self.check_slot(s)
            if self.pins[s] < (times[s] if times else 1):
                raise RuntimeError(f"slot {s} unpinned more often than pinned")
        for s in slots:
            self.pins[s] -= 1
            self._pinned -= self.pins[s] == 0

    def full(self) -> bool:
        """No free slot and every occupied slot pinned: nothing can be placed now."""
        return not self._free and self._pinned == self.num_slots

    def allocate(self, layer: int, expert: int) -> tuple[int, tuple[int, int] | None]:
        """A slot for (layer, expert): a free one, else the policy's victim among unpinned slots.
        Returns (slot, evicted owner or None). The caller fills the slot before anyone reads it."""
        self.check_expert(layer, expert)
        if self._table[layer][expert] >= 0:
            raise RuntimeError(f"expert {expert} of layer {layer} is already in slot {self._table[layer][expert]}")
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            if self.full():
                raise RuntimeError(f"all {self.num_slots} slots are pinned; cannot place expert {expert} of layer {layer}")
            slot = self.policy.victim(_Unpinned(self.pins))
            evicted = self.owner[slot]
            self._table[evicted[0]][evicted[1]] = -1
            self.row_version[evicted[0]] += 1
            self.policy.remove(slot)
        self.owner[slot] = (layer, expert)
        self._table[layer][expert] = slot
        self.row_version[layer] += 1
        self.policy.insert(slot)
        return slot, evicted


class PagedExpertBuffer(SlotTable):
    """S expert slots on `device` for a model of L MoE layers with E experts each."""

    def __init__(self, num_layers: int, num_experts: int, hidden: int, intermediate: int, num_slots: int,
                 dtype: torch.dtype, device, policy=DEFAULT_POLICY, min_slots: int = 1, block_shape=None, fmt=None):
        super().__init__(num_layers, num_experts, num_slots, policy, min_slots)
        self.device = torch.device(device)
        # one block row per slot (fp8: weights and scales): a slot's bytes are contiguous, one copy fills it
        slots = allocate_experts(num_slots, hidden, intermediate, dtype, self.device, block_shape=block_shape, fmt=fmt)
        self.w13, self.w2, self.w13_scale, self.w2_scale, self.blocks = slots[:5]
        self.quant = slots.quant  # (scales and int4 zero points of the slots, or None)
        self.page_table = torch.full((num_layers, num_experts), -1, dtype=torch.int32, device=self.device)
        self._rows = list(self.page_table.unbind(0))  # one view per layer, built once (indexing costs ~2 us)
        self._uploaded = [0] * num_layers  # row_version each device row holds (all -1 at version 0)

    def upload_row(self, layer: int) -> torch.Tensor:
        """Bring layer's page-table row on the device up to date with the host table and return it.
        A row that has not changed since its last upload is not copied. On CUDA the row is staged in
        a fresh pinned tensor from PyTorch's caching host allocator and copied without blocking: a
        copy from pageable memory would synchronise the host with the compute stream on every layer
        call, and the caching allocator keeps the staging block until the copy has run. The copy is
        ordered on the compute stream, after kernels already launched that read the old row."""
        row = self._rows[layer]
        version = self.row_version[layer]
        if self._uploaded[layer] != version:
            host = torch.frombuffer(self._table[layer], dtype=torch.int32)  # a view of the host row
            if row.is_cuda:
                row.copy_(host.pin_memory(), non_blocking=True)  # pin_memory() copies: a snapshot
            else:
                row.copy_(host)
            self._uploaded[layer] = version
        return row
