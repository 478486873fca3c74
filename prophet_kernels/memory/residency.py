"""Residency decisions of the host-driven mode, shared by ``ProphetMoE`` and the trace simulator.

    acquire(layer, experts)      hits are touched and pinned first; then misses get a slot (free,
                                 else the policy's unpinned victim) and are returned as fills to copy now
                                 (``fill=False``: misses get no slot, -1; a miss that does not wait;
                                 ``fill=MissCost``: the misses whose copy pays, by their token counts,
                                 get slots, the rest -1: computed on the host CPU)
    prefetch(layer, ids, hidden) asks the predictor, allocates slots for its experts for layers
                                 +1..+depth (nearest first) within the byte budget, returns fills;
                                 predicted experts already resident are touched (wanted soon)
    fill_ahead(layer, experts, budget)  slots for a layer's missed experts, for its next call, within a
                                 byte budget (what a miss that did not wait copies afterwards)
    release(slots)               unpins what acquire pinned

No tensors move here: the caller copies the fills (``StreamPrefetcher`` on a device, a timing
model in the simulator) and adds the stall it measured or modelled to ``stats``.
Stats count per layer; hits and misses are per unique expert a layer needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .buffer import SlotTable
from .predictors import Predictor


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    late_hits: int = 0  # hits whose prefetch copy had not landed yet: the compute waited for it
    prefetched: int = 0  # experts copied ahead of need
    prefetch_used: int = 0  # prefetched experts that a layer then read (before eviction)
    evictions: int = 0
    bytes_h2d: int = 0
    stall_s: float = 0.0  # time the compute waited for expert copies
    cpu_experts: int = 0  # misses computed on the host CPU (miss: cpu), unique per layer call
    cpu_token_slots: int = 0  # the (token, expert) pairs they computed
    cpu_s: float = 0.0  # time the CPU spent computing them (beside the GPU's part of each call)
    streamed: int = 0  # experts copied by the stream schedule (miss: stream), once per layer per step


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

    @property
    def ready_hit_rate(self) -> float:
        """Hits whose copy had landed when the layer ran (a late prefetch waits like a miss)."""
        n = self.hits + self.misses
        return (self.hits - self.late_hits) / n if n else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of prefetched experts that a layer read before they were evicted."""
        n = self.prefetched
        return self.prefetch_used / n if n else 0.0

    @property
    def demand_copies(self) -> int:
        """Misses copied to the device when a layer needed them (the rest were computed on the CPU;
        with miss: stream none: the stream copied them ahead)."""
        return 0 if self.streamed else self.misses - self.cpu_experts

    def as_dict(self) -> dict:
        total = {f.name: getattr(self, f.name) for f in fields(LayerStats)}
        return {"total": total | {"hit_rate": self.hit_rate, "ready_hit_rate": self.ready_hit_rate,
                                  "demand_copies": self.demand_copies},
                "layers": [{f.name: getattr(s, f.name) for f in fields(LayerStats)} for s in self.layers]}

    def __str__(self) -> str:
        if self.streamed and not self.hits + self.misses:  # miss stream at run time: no routing read on the host
            return (f"streamed {self.streamed} experts  H2D {self.bytes_h2d / 1e6:.1f} MB  (miss stream: hits and "
                    "misses are not counted)")
        return (f"hits {self.hits} ({self.late_hits} late)  misses {self.misses}  hit rate {self.hit_rate:.1%}  "
                f"landed in time {self.ready_hit_rate:.1%}  prefetched {self.prefetched} "
                f"(used {self.prefetch_used})  evictions {self.evictions}  H2D {self.bytes_h2d / 1e6:.1f} MB  "
                f"stall {self.stall_s * 1e3:.2f} ms" + (f"  CPU computed {self.cpu_experts} experts "
                                                        f"({self.cpu_token_slots} token-slots, {self.cpu_s * 1e3:.2f} ms)"
                                                        if self.cpu_experts else "")
                + (f"  streamed {self.streamed} experts" if self.streamed else ""))


Fill = tuple[int, int, int]  # (slot, layer, expert)


@dataclass(frozen=True)
class MissCost:
    """Copy a missed expert or compute it on the host CPU: the fixed rates a layer call's misses are
    split by (measured once at start-up, or given; never live timings, so ranks and the simulator
    decide alike from the same numbers).

    A miss computed on the CPU for n tokens takes max(bytes / cpu rate, n x FLOPs per token / cpu
    FLOP rate); a copy takes bytes / link rate. The CPU's misses run one after another on its pool,
    the copies one after another on the link, both beside the GPU's resident experts, and both read
    host DRAM: a call's misses take max(CPU time, link time, all their bytes / DRAM rate). ``split``
    moves the misses with the most tokens to the link while that lowers the call's time (decode: few
    tokens each, mostly the CPU; a prefill chunk: many each, copied)."""

    expert_bytes: int  # one expert's bytes in the store: what a copy moves and the CPU reads
    flops_per_token: int  # 2 x 3 x H x I: one token through one expert
    cpu_gbps: float  # the CPU backend's rate over weight bytes at batch 1
    cpu_gflops: float  # its compute rate at large batch
    link_gbps: float  # host-to-device copies (pinned)
    dram_gbps: float | None = None  # host read bandwidth that copies and CPU reads share (None: no bound)
    cpu_call_s: float = 0.0  # fixed cost of a call that has CPU experts (the rows to the host and back, the pool's start)
    copy: bool = True  # False: no miss is ever copied (a fixed placement: KTransformers' GPU expert mask)

    def __post_init__(self):
        for name in ("expert_bytes", "flops_per_token", "cpu_gbps", "cpu_gflops", "link_gbps", "dram_gbps"):
            v = getattr(self, name)
            if v is None and name == "dram_gbps":
                continue
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ValueError(f"MissCost {name}={v!r}: must be a finite number > 0")
        if not isinstance(self.copy, bool):
            raise ValueError(f"MissCost copy={self.copy!r}: must be True or False")
        if not (isinstance(self.cpu_call_s, (int, float)) and math.isfinite(self.cpu_call_s) and self.cpu_call_s >= 0):
            raise ValueError(f"MissCost cpu_call_s={self.cpu_call_s!r}: must be a finite number >= 0")

    def cpu_seconds(self, tokens: int) -> float:
        return max(self.expert_bytes / (self.cpu_gbps * 1e9), tokens * self.flops_per_token / (self.cpu_gflops * 1e9))

    def copy_seconds(self) -> float:
        return self.expert_bytes / (self.link_gbps * 1e9)

    def call_seconds(self, cpu_tokens, copies: int) -> float:
        """The misses' time in one call: the CPU computing experts of ``cpu_tokens`` tokens each, the
        link copying ``copies`` experts."""
        cpu = (self.cpu_call_s if len(cpu_tokens) else 0.0) + sum(self.cpu_seconds(n) for n in cpu_tokens)
        link = copies * self.copy_seconds()
        dram = 0.0 if self.dram_gbps is None else (len(cpu_tokens) + copies) * self.expert_bytes / (self.dram_gbps * 1e9)
        return max(cpu, link, dram)

    def split(self, tokens) -> list[bool]:
        """Per miss (its token count), whether to copy it (True) or compute it on the CPU (False)."""
        tokens = [int(n) for n in tokens]
        if not self.copy:
            return [False] * len(tokens)
        order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
        copy = [False] * len(tokens)
        cpu_s = (self.cpu_call_s if tokens else 0.0) + sum(self.cpu_seconds(n) for n in tokens)
        link_s = 0.0
        for done, i in enumerate(order, 1):
            moved_cpu = cpu_s - self.cpu_seconds(tokens[i]) - (self.cpu_call_s if done == len(order) else 0.0)
            moved_link = link_s + self.copy_seconds()
            if max(moved_cpu, moved_link) >= max(cpu_s, link_s):
                break
            copy[i], cpu_s, link_s = True, moved_cpu, moved_link
        return copy


class ExpertResidency:
    def __init__(self, table: SlotTable, expert_bytes: int, predictor: Predictor | None = None,
                 prefetch_depth: int = 1, prefetch_budget_bytes: int | None = None):
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        if prefetch_budget_bytes is not None and prefetch_budget_bytes < 0:
            raise ValueError(f"prefetch_budget_bytes must be >= 0, got {prefetch_budget_bytes}")
        self.table, self.expert_bytes = table, expert_bytes
        self.predictor, self.prefetch_depth, self.prefetch_budget_bytes = predictor, prefetch_depth, prefetch_budget_bytes
        self.stats = Stats(table.num_layers)
        self._unread_prefetch: set[int] = set()  # slots filled by prefetch, not yet read

    def reset_stats(self) -> None:
        self.stats = Stats(self.table.num_layers)
        self._unread_prefetch.clear()

    def acquire(self, layer: int, experts, fill: "bool | MissCost" = True,
                tokens=None) -> tuple[list[int], list[Fill]]:
        """Slots for `experts` (unique ids of one layer, all pinned on return) and the demand fills.
        ``fill=False``: a missed expert gets no slot (-1) and no fill (the caller computes it another
        way and may ``fill_ahead`` it). ``fill=MissCost``: ``tokens`` (one count per expert) decide
        which misses are copied (``MissCost.split``), as long as a slot is free or unpinned; the
        others get -1 and count as computed on the CPU. Refused before anything changes (pins,
        owners, policy, stats) when `experts` repeats an id or names one outside the table, or (with
        every miss copied) needs more slots than there are."""
        experts = list(experts)
        if not 0 <= layer < self.table.num_layers:
            raise ValueError(f"layer {layer!r} is outside [0, {self.table.num_layers})")
        if len(set(experts)) != len(experts):
            raise ValueError(f"layer {layer}: experts must be unique ids, got {experts}")
        for e in experts:
            self.table.check_expert(layer, e)
        cost = fill if isinstance(fill, MissCost) else None
        if cost is not None:
            tokens = [int(n) for n in tokens] if tokens is not None else None
            if tokens is None or len(tokens) != len(experts) or min(tokens, default=1) < 1:
                raise ValueError(f"layer {layer}: a MissCost split needs one token count >= 1 per expert, got {tokens}")
        elif fill is not True and fill is not False:
            raise TypeError(f"fill must be True, False or a MissCost, got {fill!r}")
        if fill is True and len(experts) > self.table.num_slots:
            raise ValueError(f"layer {layer} needs {len(experts)} unique experts but the buffer has "
                             f"{self.table.num_slots} slots; need at least {len(experts)} (or a smaller batch)")
        st, table = self.stats.layers[layer], self.table
        table.policy.on_layer(layer, experts)
        # pin every resident expert of the layer before allocating any missing one, so that a demand
        # fill never evicts an expert this same call needs (that would turn a hit into a second copy)
        slots, fills = [table.lookup(layer, e) for e in experts], []
        for s in slots:
            if s >= 0:
                st.hits += 1
                table.touch(s)
                if s in self._unread_prefetch:
                    st.prefetch_used += 1
                    self._unread_prefetch.discard(s)
        table.pin([s for s in slots if s >= 0])
        missed = [i for i, s in enumerate(slots) if s < 0]
        if cost is not None:
            copy = dict(zip(missed, cost.split([tokens[i] for i in missed])))
        for i, e in enumerate(experts):
            if slots[i] < 0:
                st.misses += 1
                if cost is not None and (not copy[i] or table.full()):
                    st.cpu_experts += 1
                    st.cpu_token_slots += tokens[i]
                    continue
                if not fill:
                    continue
                s, evicted = table.allocate(layer, e)
                self._evicted(evicted, s, layer)
                fills.append((s, layer, e))
                table.pin([s])  # before the next allocation, so this layer never evicts itself
                slots[i] = s
        st.bytes_h2d += len(fills) * self.expert_bytes
        return slots, fills

    def release(self, slots) -> None:
        self.table.unpin(slots)

    def _evicted(self, evicted, slot: int, layer: int) -> None:
        if evicted is not None:
            self.stats.layers[layer].evictions += 1
            self._unread_prefetch.discard(slot)

    def prefetch(self, layer: int, topk_ids, hidden) -> list[Fill]:
        """Slots allocated (and their owners set) for the predictor's experts; the caller copies."""
        if self.predictor is None or self.prefetch_depth == 0:
            return []
        L = self.table.num_layers
        want = self.predictor.predict(layer, topk_ids, hidden, L, self.prefetch_depth)
        return self._allocate_ahead([((layer + d) % L, want.get((layer + d) % L, ()))
                                     for d in range(1, self.prefetch_depth + 1)], self.prefetch_budget_bytes, True)

    def prefetch_entry(self, hidden) -> list[Fill]:
        """Slots for the predictor's experts of layers 0 .. depth-1 from the hidden state entering layer 0
        (a pipeline stage's input; predictors with ``predict_entry`` only), within one call's budget."""
        entry = getattr(self.predictor, "predict_entry", None)
        if entry is None or self.prefetch_depth == 0:
            return []
        L = self.table.num_layers
        want = entry(hidden, L, self.prefetch_depth)
        return self._allocate_ahead([(j, want.get(j, ())) for j in range(min(self.prefetch_depth, L))],
                                    self.prefetch_budget_bytes, True)

    def place_evenly(self) -> list[Fill]:
        """Free slots for experts spread evenly over the layers (expert 0 of every layer, then expert 1,
        ...) until no slot is free: a start-up placement that evicts nothing (``miss="cpu"``: misses
        are computed where they are, so a buffer fills only this way, by copies that pay and by
        prefetches). Returns the fills; counted as copied bytes (reset the stats after start-up)."""
        L, E = self.table.num_layers, self.table.num_experts
        return self.place((layer, e) for e in range(E) for layer in range(L))

    def place(self, pairs) -> list[Fill]:
        """Free slots for the (layer, expert) `pairs` in the order given, until no slot is free or the
        pairs run out (e.g. most used first, from a profile: KTransformers' fixed GPU experts). Evicts
        nothing; refused before anything changes when a pair names a layer or expert outside the table.
        Returns the fills, counted as copied bytes."""
        pairs = [(int(layer), int(e)) for layer, e in pairs]
        for layer, e in pairs:
            self.table.check_expert(layer, e)
        table, fills = self.table, []
        for layer, e in pairs:
            if not table._free:
                break
            if table.lookup(layer, e) < 0:
                s, _ = table.allocate(layer, e)
                self.stats.layers[layer].bytes_h2d += self.expert_bytes
                fills.append((s, layer, e))
        return fills

    def fill_ahead(self, layer: int, experts, budget_bytes: int | None) -> list[Fill]:
        """Slots for `experts` of `layer` that are not resident (a call's misses that did not wait), for
        the layer's next call, within `budget_bytes` (None: no limit); their bytes count as copied,
        not as prefetched."""
        return self._allocate_ahead([(layer, experts)], budget_bytes, False)

    def _allocate_ahead(self, wanted, budget_bytes: int | None, prefetched: bool) -> list[Fill]:
        """Slots for [(layer, experts best first), ...] in order, within the byte budget; experts already
        resident are held for the call and touched (wanted soon)."""
        E, eb, table = self.table.num_experts, self.expert_bytes, self.table
        fills, held = [], []
        try:
            for future, experts in wanted:
                for e in experts:
                    if not 0 <= e < E:
                        raise ValueError(f"predictor returned expert {e} outside [0, {E}) for layer {future}")
                    s = table.lookup(future, e)
                    if s >= 0:  # already resident: hold it so this call's later copies keep it,
                        table.pin([s])  # and tell the policy it is wanted soon
                        table.touch(s)
                        held.append(s)
                        continue
                    if budget_bytes is not None and (len(fills) + 1) * eb > budget_bytes:
                        return fills
                    if table.full():
                        return fills  # every slot is read now or was just prefetched
                    s, evicted = table.allocate(future, e)
                    self._evicted(evicted, s, future)
                    fs = self.stats.layers[future]
                    fs.bytes_h2d += eb
                    if prefetched:
                        fs.prefetched += 1
                        self._unread_prefetch.add(s)
                    table.pin([s])  # nearer layers' prefetches are not evicted by farther ones
                    held.append(s)
                    fills.append((s, future, e))
            return fills
        finally:
            table.unpin(held)
