"""Stream prefetcher: host-to-device expert copies on one side stream, one event pair per slot.

    ready[s]  recorded on the copy stream after slot s was filled; a reader waits on it
    read[s]   the event recorded on the compute stream after the last layer call whose kernels
              read slot s (one event per call, shared by its slots); the next copy into s waits
              on it, so an eviction never overwrites weights a launched kernel still reads (the
              host-side pins cover kernels about to launch)

Demand copies are timed by an event pair on the copy stream, read when they have completed
(``stalls``), so timing them costs no host synchronisation.

On the CPU there are no streams or events: copies are plain synchronous copies.
NVTX ranges (``nvtx`` package, a no-op without it) name every copy for nsys timelines.
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch

try:
    import nvtx as _nvtx
except ImportError:  # the lent GPU machine has no nvtx package
    _nvtx = None


def nvtx_range(name: str, color: str = "blue"):
    """An NVTX range context for nsys timelines (none while torch.compile traces: a compiled step
    has no host code to mark)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _annotation(name, color)


@functools.lru_cache(maxsize=None)
def _annotation(name: str, color: str):
    # one object per (name, color): building an ``nvtx.annotate`` costs ~4x entering a built one,
    # and the names repeat every decode step
    return _nvtx.annotate(name, color=color) if _nvtx is not None else contextlib.nullcontext()


def copy_pairs(store, buffer, slot: int, layer: int, expert: int, n: int = 1) -> list:
    """(destination, source) tensors that fill slots slot .. slot+n-1 with experts expert .. expert+n-1
    of `layer`: one copy where the store keeps each expert as one block, else its w13 and w2 parts."""
    src = store.blocks[layer]
    if src is not None and buffer.blocks is not None:  # one block per expert: one copy
        return [(buffer.blocks[slot: slot + n], src[expert: expert + n])]
    return [(buffer.w13[slot: slot + n], store.w13[layer][expert: expert + n]),
            (buffer.w2[slot: slot + n], store.w2[layer][expert: expert + n])]


class StreamPrefetcher:
    def __init__(self, store, buffer):
        self.store, self.buffer = store, buffer
        self.cuda = buffer.device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device=buffer.device)
            self.ready = [torch.cuda.Event() for _ in range(buffer.num_slots)]
            self.read: list[torch.cuda.Event | None] = [None] * buffer.num_slots
        self._timed: list[tuple] = []  # demand copies not yet reported by stalls(): (layer, seconds | (start, end))

    def copy(self, slot: int, layer: int, expert: int, label: str = "prefetch") -> None:
        """Fill `slot` with expert `expert` of `layer` (asynchronous on CUDA)."""
        self.buffer.check_slot(slot)  # no negative index: slot -1 would write slot S-1
        self.buffer.check_expert(layer, expert)
        pairs = copy_pairs(self.store, self.buffer, slot, layer, expert)
        with nvtx_range(f"{label} L{layer} E{expert}", color="green" if label == "prefetch" else "red"):
            if not self.cuda:
                for dst, s in pairs:
                    dst.copy_(s)
                return
            with torch.cuda.stream(self.stream):
                if self.read[slot] is not None:
                    self.stream.wait_event(self.read[slot])
                for dst, s in pairs:
                    dst.copy_(s, non_blocking=True)
                self.ready[slot].record(self.stream)

    def in_flight(self, slots) -> list[int]:
        """Those of `slots` whose copy has not landed yet (non-blocking queries; none on the CPU)."""
        return [s for s in slots if not self.ready[s].query()] if self.cuda else []

    def wait_ready(self, slots) -> None:
        """Make the current (compute) stream wait until `slots` are filled."""
        if self.cuda:
            cur = torch.cuda.current_stream(self.buffer.device)
            for s in slots:
                cur.wait_event(self.ready[s])

    def mark_read(self, slots) -> None:
        """Record that kernels enqueued so far on the compute stream read `slots` (one event)."""
        if self.cuda and slots:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.buffer.device))
            for s in slots:
                self.read[s] = done

    def demand(self, layer: int, fills) -> None:
        """Fetch misses of `layer` now (the reader waits on their ready events through wait_ready).
        Their stall, reported by ``stalls``: host wall time of the copies on the CPU; on CUDA the
        copy stream's time for them, from an event pair read once the copies have completed."""
        if not fills:
            return
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
        if events:
            events[0].record(self.stream)
        t0 = time.perf_counter()
        for slot, owner, expert in fills:
            self.copy(slot, owner, expert, label="demand")
        if events:
            events[1].record(self.stream)
        self._timed.append((layer, events or time.perf_counter() - t0))

    def stalls(self, wait: bool = False) -> list[tuple[int, float]]:
        """(layer, seconds) of the demand copies timed since the last call, oldest first: those that
        have completed (non-blocking queries), or all of them with ``wait`` (synchronises with them)."""
        out = []
        while self._timed:
            layer, t = self._timed[0]
            if isinstance(t, tuple):
                start, end = t
                if not wait and not end.query():
                    break  # the copy stream runs in order: later ones are not done either
                end.synchronize()
                t = start.elapsed_time(end) / 1e3
            out.append((layer, t))
            self._timed.pop(0)
        return out
