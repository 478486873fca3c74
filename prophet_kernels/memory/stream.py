"""Streaming experts (``miss="stream"``): a fixed schedule for large batches.

At serving batch sizes a layer touches nearly every expert (OLMoE: 63 of 64 at 32 tokens), so paging
by demand copies every missed expert each step anyway, and waits. Streaming copies each layer's
non-resident experts once per step, one layer ahead, while the previous layer computes:

    resident   experts 0 .. r_l - 1 of layer l, in fixed slots (filled once at start-up)
    ring       ``parts`` parts of W = E - min(r) slots each; layer l's experts r_l .. E-1 are copied
               into part ``part_of(l)`` while layer l-1 computes (one copy per layer: the store's
               experts of a layer are contiguous, and so are a part's slots)
    page table fixed: expert e of layer l reads its resident slot, or slot e - r_l of its ring part

Two parts when L is even (layer l and l+1 never share one, nor do the last layer and the next step's
layer 0); three when L is odd; one when L is 1. r is the most the buffer allows beside the ring:
L x r + parts x (E - r) <= S, with the leftover slots one more resident expert for the first layers.
Nothing depends on the routing: no host synchronisation, the same copies every step, so a step can
be captured in a CUDA graph (each step ends with the copy of the next step's layer 0 joined). The
decisions here have no tensors: ``ProphetMoE(miss="stream")`` moves the bytes, the trace simulator
replays the same schedule (``routing.simulator``).
"""

from __future__ import annotations

import numpy as np

from .residency import Stats


def stream_parts(num_layers: int) -> int:
    """Ring parts a schedule of `num_layers` needs so that consecutive layers (cyclically) differ."""
    return 1 if num_layers == 1 else 2 if num_layers % 2 == 0 else 3


def min_stream_slots(num_layers: int, num_experts: int) -> int:
    """The smallest buffer that streams: a ring of ``stream_parts`` layers' experts, none resident
    (or every expert resident, where that is fewer: one or two layers)."""
    return min(num_layers, stream_parts(num_layers)) * num_experts


class StreamSchedule:
    """The fixed decisions of ``miss="stream"`` for L layers x E experts in S slots (module docstring)."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, expert_bytes: int = 0):
        L, E, S = num_layers, num_experts, num_slots
        for name, v in (("num_layers", L), ("num_experts", E), ("num_slots", S)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        need = min_stream_slots(L, E)
        if S < need:
            raise ValueError(f"streaming needs at least {need} slots (a ring of {min(L, stream_parts(L))} layers' "
                             f"{E} experts); the buffer has {S}")
        P = stream_parts(L)
        self.num_layers, self.num_experts, self.num_slots, self.expert_bytes = L, E, S, expert_bytes
        if S >= L * E or L <= P:  # every expert resident: nothing to stream
            r, extra, self.parts = E, 0, 0
        else:
            r = min(E, (S - P * E) // (L - P))
            extra = 0 if r == E else min(L, S - (L * r + P * (E - r)))
            self.parts = P if r < E else 0
        self.resident = [min(E, r + (l < extra)) for l in range(L)]  # experts [0, resident[l]) of layer l
        self.width = E - min(self.resident)  # slots per ring part
        self.ring_start = sum(self.resident)  # the ring's first slot
        rows = np.full((L, E), -1, dtype=np.int32)
        first = 0
        for l in range(L):
            rows[l, :self.resident[l]] = np.arange(first, first + self.resident[l])
            first += self.resident[l]
            n = E - self.resident[l]
            if n:
                start = self.ring_start + self.part_of(l) * self.width
                rows[l, self.resident[l]:] = np.arange(start, start + n)
        self.rows = rows  # [L, E]: the page table, fixed
        self.stats = Stats(L)
        self.holds = [-1] * max(1, self.parts)  # the layer whose experts each ring part holds (or is filled with)

    @property
    def used_slots(self) -> int:
        """Slots the schedule uses (resident and ring): at most ``num_slots``."""
        return self.ring_start + self.parts * self.width

    def part_of(self, layer: int) -> int:
        """The ring part layer `layer` streams into."""
        if self.parts == 3 and layer == self.num_layers - 1:
            return 2
        return layer % 2 if self.parts else 0

    def streamed(self, layer: int) -> tuple[int, int, int]:
        """(first expert, count, first slot) of layer `layer`'s streamed experts: experts
        first .. first+count-1 go to slots first slot .. first slot+count-1 (count 0: none)."""
        r = self.resident[layer]
        return r, self.num_experts - r, int(self.rows[layer, r]) if r < self.num_experts else -1

    def _copy(self, layer: int) -> int:
        """`layer`'s streamed experts go to its ring part now: the part holds them, the copy is counted."""
        n = self.num_experts - self.resident[layer]
        self.holds[self.part_of(layer)] = layer
        st = self.stats.layers[layer]
        st.streamed += n
        st.bytes_h2d += n * self.expert_bytes
        return layer

    def start(self) -> list[int]:
        """The layers to copy at start-up: each ring part's first layer (counted: the first step's copies)."""
        first = {}
        for layer in range(self.num_layers):
            if self.streamed(layer)[1]:
                first.setdefault(self.part_of(layer), layer)
        return [self._copy(layer) for layer in first.values()]

    def before(self, layer: int) -> int | None:
        """At a call of `layer`: the layer to copy now and wait for (`layer` itself, when its part holds
        another layer's experts: calls out of the schedule's order), or None."""
        if self.streamed(layer)[1] and self.holds[self.part_of(layer)] != layer:
            return self._copy(layer)
        return None

    def after(self, layer: int) -> int | None:
        """Once `layer`'s call has read its part: the next layer (cyclically) that streams into that part,
        to copy now, or None (no stream, or the part already holds it: a part of one layer's own)."""
        if not self.streamed(layer)[1]:
            return None
        part, L = self.part_of(layer), self.num_layers
        nxt = next(m for m in ((layer + d) % L for d in range(1, L + 1)) if self.part_of(m) == part)
        return None if self.holds[part] == nxt else self._copy(nxt)

    def count_call(self, layer: int, experts) -> None:
        """Count a layer call's unique experts as hits (resident) and misses (streamed), where the
        caller knows them (the simulator; the layer reads no routing on the host)."""
        st, r = self.stats.layers[layer], self.resident[layer]
        hits = sum(1 for e in experts if e < r)
        st.hits += hits
        st.misses += len(experts) - hits

    def reset_stats(self) -> None:
        self.stats = Stats(self.num_layers)
