"""Device-driven residency (``ProphetMoE(..., mode="device")``): every decision on the device, no
host synchronisation in a layer call, fixed shapes and fixed tensor addresses, so a decode step of
all layers can be captured in one CUDA graph and replayed with any routing.

    DeviceExpertBuffer   S device slots (one [S, 3*I*H] block, w13/w2 views) and the residency state
                         (``kernels.residency.ResidencyState``: page table, owners, stamps, use shares,
                         counters)
    DeviceResidency      one layer call: the demand step (hits, misses, victims: one kernel), the
                         fills from the host store (one copy kernel reading the fill list on the
                         device; or, ``fill="read-through"``, the decode path's GEMM kernels reading
                         the missed experts from the store and writing their slots as they go), and,
                         after the experts, the prefetch steps for the next layers with
                         the predictor's ranked experts (on a side stream on CUDA, joined before the
                         next layer call decides); stats read from the device counters (one sync)

Policies (``kernels.residency``): next-use (the farthest expected next use, Belady's MIN with the
future estimated from the cyclic layer order and each expert's use share, as the host's next-use
policy) or LRU; free slots first, and the slots a layer call reads or prefetched into are never
victims in that call. Invalid ids contribute zero (no host check is
possible without a sync); the host checks what it can without one: shapes, dtypes, devices, and
that the buffer holds the layer's unique experts at this batch (min(E, T*k) <= S).
"""

from __future__ import annotations

import torch

from ..kernels.residency import (COUNTERS, DEMAND, POLICY_IDS, PREFETCH, ReadThrough, ResidencyState, fill_slots,
                                 residency_step, residency_step_reference)
from .buffer import DEVICE_POLICIES, check_sizes
from .predictors import runs_on_device
from .residency import LayerStats, Stats
from .store import allocate_experts

def prefetch_copies(num_experts: int, prefetch_depth: int, budget: int | None) -> int:
    """Copies one layer call's prefetch steps may make: ``budget``, or without one every expert of
    each layer ahead (no limit in effect)."""
    return num_experts * max(prefetch_depth, 1) if budget is None else budget


def check_device_policy(policy: str) -> None:
    if policy not in DEVICE_POLICIES:
        raise ValueError(f"device mode decides with the {' or '.join(DEVICE_POLICIES)} policy on the device; "
                         f"got policy {policy!r} (host mode runs it)")


class DeviceExpertBuffer:
    """S expert slots on `device` and the device residency state over them."""

    def __init__(self, num_layers: int, num_experts: int, hidden: int, intermediate: int, num_slots: int,
                 dtype: torch.dtype, device, min_slots: int = 1, policy: str = "next-use", block_shape=None, fmt=None):
        check_sizes(num_layers, num_experts, num_slots, min_slots)
        check_device_policy(policy)
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.device = torch.device(device)
        slots = allocate_experts(num_slots, hidden, intermediate, dtype, self.device, block_shape=block_shape, fmt=fmt)
        self.w13, self.w2, self.w13_scale, self.w2_scale, self.blocks = slots[:5]
        self.quant = slots.quant  # (scales and int4 zero points of the slots, or None)
        self.state = ResidencyState.empty(num_layers, num_experts, num_slots, self.device, POLICY_IDS[policy])
        self._rows = list(self.page_table.unbind(0))

    @property
    def page_table(self) -> torch.Tensor:
        return self.state.page_table

    def lookup(self, layer: int, expert: int) -> int:
        """Slot of an expert (reads the device: for tests and inspection, not the forward path)."""
        return int(self.page_table[layer, expert])


class DeviceResidency:
    """The device mode's decisions, copies and counters (see the module docstring)."""

    def __init__(self, buffer: DeviceExpertBuffer, store, predictor=None, prefetch_depth: int = 1,
                 prefetch_budget: int | None = None):
        if predictor is not None and not runs_on_device(predictor):
            raise ValueError(f"predictor {getattr(predictor, 'name', predictor)!r} does not run on the device; "
                             "device mode runs none, same, gate and learned-gate")
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
        if store.blocks[0] is None:
            raise ValueError("device mode copies an expert as one block: build the store with its builders "
                             "(HostExpertStore.from_tensors, from_parameters, ...), whose layout is one block per expert")
        self.buffer, self.store, self.predictor = buffer, store, predictor
        self.prefetch_depth = prefetch_depth
        E = buffer.num_experts
        self.budget = prefetch_copies(E, prefetch_depth, prefetch_budget)
        self.prefetch_budget_bytes = None if prefetch_budget is None else prefetch_budget * store.expert_bytes
        dev = buffer.device
        # fill lists, one per stream (demand on the compute stream, prefetch on the side stream)
        self._demand = (torch.zeros((E + 1, 2), dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
        self._prefetch = (torch.zeros((E + 1, 2), dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
        self.cuda = dev.type == "cuda"
        if self.cuda:
            self.side = torch.cuda.Stream(device=dev)
            self._forked = torch.cuda.Event()
            self._joined = torch.cuda.Event()
        self._pending = False  # a prefetch issued on the side stream, not yet joined

    # ------------------------------------------------------------------------------ one layer call

    def demand(self, layer: int, ids_flat: torch.Tensor, read_through: bool = False) -> ReadThrough | None:
        """Make `layer`'s routed experts resident: decide on the device, then fill the misses; with
        ``read_through`` the fills are left to the experts' kernels: returns them as a
        ``ReadThrough`` (the store's layer is the source)."""
        self.join()
        fills, count = self._demand
        residency_step(self.buffer.state, layer, ids_flat, DEMAND, fills, count, budget=self.budget)
        rt = None
        if read_through:
            st = self.store
            rt = ReadThrough(st.w13[layer], st.w2[layer], st.w13_scale[layer] if st.w13_scale else None,
                             st.w2_scale[layer] if st.w2_scale else None, fills, count)
        else:
            fill_slots(self.store.blocks[layer], self.buffer.blocks, fills, count,
                       max_fills=min(self.buffer.num_experts, ids_flat.numel()))
        if self.cuda and self.predictor is not None and self.prefetch_depth:
            # the prefetch (issued after the experts) starts once the demand fills are done, and runs
            # beside the experts' GEMMs: it never evicts the slots this call reads (excl)
            self._forked.record(torch.cuda.current_stream(self.buffer.device))
        return rt

    def prefetch(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """The predictor's experts for layers +1..+depth, nearest first, within the budget; on CUDA on
        the side stream, after the work enqueued so far (the next ``demand`` joins it)."""
        if self.predictor is None or self.prefetch_depth == 0:
            return
        if self.cuda:
            self.side.wait_event(self._forked)
            hidden.record_stream(self.side)
            topk_ids.record_stream(self.side)
            with torch.cuda.stream(self.side):
                self._prefetch_steps(layer, topk_ids, hidden)
                self._joined.record(self.side)
            self._pending = True
        else:
            self._prefetch_steps(layer, topk_ids, hidden)

    def _prefetch_steps(self, layer, topk_ids, hidden) -> None:
        L = self.buffer.num_layers
        fills, count = self._prefetch
        E = self.buffer.num_experts
        ranked = self.predictor.device_predict(layer, topk_ids, hidden, L, self.prefetch_depth, E)
        for future, cand in ranked.items():  # nearest first
            residency_step(self.buffer.state, future, cand, PREFETCH, fills, count)
            fill_slots(self.store.blocks[future], self.buffer.blocks, fills, count,
                       max_fills=min(self.buffer.num_experts, cand.numel(), self.budget))

    def join(self) -> None:
        """Make the compute stream wait for the prefetch issued by the last layer call (CUDA)."""
        if self._pending:
            torch.cuda.current_stream(self.buffer.device).wait_event(self._joined)
            self._pending = False

    # ------------------------------------------------------------------------------ stats

    @property
    def stats(self) -> Stats:
        """The device counters as ``Stats`` (one host synchronisation). bytes_h2d = (misses +
        prefetched) x expert bytes; late_hits is 0 (a layer call waits for every prefetch before it
        decides) and stall_s is not measured in device mode (0)."""
        self.join()
        counts = self.buffer.state.counters.tolist()  # host sync: reads the counters, outside any step
        return _copy_counters(counts, Stats(self.buffer.num_layers), self.store.expert_bytes)

    def reset_stats(self) -> None:
        self.join()
        self.buffer.state.counters.zero_()
        self.buffer.state.unread.zero_()


class DeviceDecisions:
    """The device mode's decisions replayed on host tensors with ``ExpertResidency``'s interface
    (``acquire``, ``prefetch``, ``release``, ``stats``), for the trace simulator: the same step
    function (``residency_step_reference``, which the device kernel is tested equal to), so the
    routing study's device-policy rows are the device mode's decisions."""

    def __init__(self, num_layers: int, num_experts: int, num_slots: int, expert_bytes: int, predictor=None,
                 prefetch_depth: int = 1, prefetch_budget_bytes: int | None = None, min_slots: int = 1,
                 policy: str = "next-use"):
        check_sizes(num_layers, num_experts, num_slots, min_slots)
        check_device_policy(policy)
        self.state = ResidencyState.empty(num_layers, num_experts, num_slots, "cpu", POLICY_IDS[policy])
        self.expert_bytes, self.predictor, self.prefetch_depth = expert_bytes, predictor, prefetch_depth
        self.prefetch_budget_bytes = prefetch_budget_bytes
        self._fills = (torch.zeros((num_experts + 1, 2), dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        self._stats = Stats(num_layers)  # the simulator adds its timing (late hits, stall) to it

    def _budget(self) -> int:
        return prefetch_copies(self.state.num_experts, self.prefetch_depth, None if self.prefetch_budget_bytes is None
                               else self.prefetch_budget_bytes // self.expert_bytes)

    def _step(self, target: int, cand, mode: int) -> list[tuple[int, int, int]]:
        fills, count = self._fills
        residency_step_reference(self.state, target, torch.as_tensor(cand, dtype=torch.int32), mode, fills, count,
                                 budget=self._budget())
        return [(slot, target, expert) for expert, slot in fills[: int(count)].tolist()]

    def acquire(self, layer: int, experts) -> tuple[list[int], list[tuple[int, int, int]]]:
        """Slots for `experts` (unique ids of one layer call) and the demand fills (slot, layer, expert)."""
        fills = self._step(layer, list(experts), DEMAND)
        row = self.state.page_table[layer]
        return [int(row[e]) for e in experts], fills

    def prefetch(self, layer: int, topk_ids, hidden) -> list[tuple[int, int, int]]:
        if self.predictor is None or self.prefetch_depth == 0:
            return []
        self.state.budget.fill_(self._budget())  # the simulator may set the budget per call
        want = self.predictor.predict(layer, topk_ids, hidden, self.state.num_layers, self.prefetch_depth)
        fills = []
        for future, ranked in want.items():  # nearest first
            if len(ranked):
                fills += self._step(future, list(ranked), PREFETCH)
        return fills

    def release(self, slots) -> None:
        """Nothing to unpin: a layer call's slots are excluded from victims until the next one."""

    def reset_stats(self) -> None:
        """Start the counters afresh (the decision state is kept)."""
        self.state.counters.zero_()
        self._stats = Stats(self.state.num_layers)

    @property
    def stats(self) -> Stats:
        """The decision counters (from the state) in a Stats that keeps what the caller added."""
        _copy_counters(self.state.counters.tolist(), self._stats, self.expert_bytes)
        return self._stats


def _copy_counters(rows, stats: Stats, expert_bytes: int) -> Stats:
    """The device counters [L, 5] into ``stats``' layers; bytes_h2d = (misses + prefetched) x expert bytes."""
    for layer, row in zip(stats.layers, rows):
        for name, v in zip(COUNTERS, row):
            setattr(layer, name, int(v))
        layer.bytes_h2d = (layer.misses + layer.prefetched) * expert_bytes
    return stats


assert set(COUNTERS) <= {f for f in LayerStats.__dataclass_fields__}
