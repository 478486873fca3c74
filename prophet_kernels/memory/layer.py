"""ProphetMoE: the layer-level orchestration both integrations use (host-driven mode).

forward(layer, x, topk_weights, topk_ids) for MoE layer `layer`:
  route            unique experts of this batch (one small device-to-host copy: the host decides)
  ensure_resident  hits are pinned; misses get a slot (free, else the policy's unpinned victim),
                   are copied on the copy stream and the compute stream waits for them (stall)
  experts          fused_experts_paged through this layer's page-table row
  prefetch         the predictor's experts for layers +1..+prefetch_depth are copied into victim
                   slots within the byte budget, while this layer's slots stay pinned
The decisions (hits, misses, victims, what to prefetch within the budget) are ExpertResidency's,
the same code the trace simulator replays; this class moves the bytes and runs the kernels.

``miss="cpu"`` (host mode): a layer call's misses are split by a ``MissCost`` (fixed rates, measured
once at start-up): those whose copy pays (many tokens: a prefill chunk, a large batch) are copied as
above, the others are computed on the host CPU from the store (``cpu.CpuExperts``), started before
the GPU's part and joined after it; the two partial sums add on the device:
  route            unique experts, their token counts and the routing weights on the host (one sync)
  split            hits pinned; misses copied or left to the CPU (ExpertResidency.acquire(fill=cost))
  CPU part         the rows of x the CPU experts read, to the host; submitted to the CPU pool
  GPU part         copies, then the paged kernels over the page-table row (a CPU expert has no slot:
                   its token-slots contribute zero there)
  join             the CPU's rows back to the device, added to y

``miss="stream"`` (large batches): a fixed schedule (``memory.stream``): each layer's resident experts
stay put, its other experts are copied once per step into a ring part, one layer ahead, while the
layers before it compute; the page table never changes and nothing reads the routing on the host.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..kernels.moe import check_inputs, fused_experts_paged, fused_experts_paged_op, fused_experts_read_through_op
from ..kernels.route_plan import narrow_ids
from ..planner.memory import max_unique_experts
from ..cpu.experts import SMALL, pairs_of, route_counts
from .buffer import DEFAULT_MODE, DEFAULT_POLICY, FILLS, MISSES, MODES, PagedExpertBuffer
from .device import DeviceExpertBuffer, DeviceResidency
from .predictors import RankExperts, local_ids, make_predictor
from .prefetch import StreamPrefetcher, copy_pairs, nvtx_range
from .residency import ExpertResidency, MissCost, Stats
from .stream import StreamSchedule, min_stream_slots
from . import numa
from .store import HostExpertStore


def unique_experts(topk_ids: torch.Tensor) -> list[int]:
    """The sorted unique ids of a [T, k] routing, on the host. The host sync of the host-driven
    mode: one copy of the ids (torch.unique on the device would launch a sort and synchronise
    twice, for its output size and for the list). Decode-sized batches go through a Python set,
    larger ones through torch.unique on the host copy (each the faster one there)."""
    ids = topk_ids.reshape(-1).cpu()
    if ids.numel() <= 1024:
        return sorted(set(ids.tolist()))
    return torch.unique(ids).tolist()


def _to_host(*tensors):
    """Host copies of the given tensors (None stays None) after one synchronisation: on CUDA each is
    copied into pinned memory without blocking, then the compute stream is waited for once; host
    tensors are returned as they are."""
    if not any(t is not None and t.is_cuda for t in tensors):
        return tensors
    out = [None if t is None else t.to("cpu", non_blocking=True) if t.is_cuda else t for t in tensors]
    torch.cuda.current_stream().synchronize()  # host sync: the split needs the routing on the host
    return out


class ProphetMoE:
    """Experts of L MoE layers in a host store, S slots on the device, optional prefetching."""

    def __init__(self, store: HostExpertStore, num_slots: int, device=None, policy: str = DEFAULT_POLICY, predictor=None,
                 prefetch_depth: int = 1, prefetch_budget_bytes: int | None = None,
                 top_k: int | None = None, max_batch_tokens: int | None = None, mode: str = DEFAULT_MODE,
                 expert_map: torch.Tensor | None = None, fill: str = "copy", miss: str = "wait",
                 cpu_threads: int | None = None, cpu_backend: str = "native", cpu_rates: dict | None = None):
        """``mode``: "host" (the host decides at every layer call; every policy and predictor) or
        "device" (every decision on the device, no host sync: a step can be one CUDA graph; the
        next-use and LRU policies; the same, gate and learned-gate predictors). ``policy``: the
        eviction policy (default next-use, the routing study's best, in both modes).
        ``expert_map`` (expert parallelism, vLLM's convention): [E_global] int, the store's index of
        each global expert on this rank or -1; ``forward`` then takes global ids, and a token-slot
        routed to another rank's expert contributes zero here (the ranks' outputs add up); a
        predictor reads the global routing and prefetches the part of its answer this rank holds
        (``predictors.RankExperts``).
        ``fill`` (device mode): how a missed expert reaches its slot, "copy" (a copy kernel reading
        the fill list, then the GEMMs) or "read-through" (the decode path's GEMM kernels read it from
        the pinned store over PCIe and write its slot as they go: one pass, no copy launch; a call
        that takes the grouped path, or runs without Triton, copies them first inside the op, one
        copy per matrix). Which is faster is for a GPU to measure (PERF_NOTES.md); "copy" until then.
        ``miss`` "wait" (a miss is copied and waited for) or "cpu" (host mode: misses whose copy does
        not pay are computed on the host CPU; module docstring). With "cpu", ``num_slots`` may be 0:
        no resident experts, only a staging ring of one layer's unique experts at ``max_batch_tokens``
        (E without it) for the copies that pay; ``cpu_threads`` the CPU pool's threads (default: the
        cores this process may use, less one for the thread that drives the device),
        ``cpu_backend`` "native" or "torch" (``cpu.experts``); the buffer is filled evenly over the
        layers at start-up (``ExpertResidency.place_evenly``); ``cpu_rates`` rates that replace the
        measured ones (``cpu_gbps``, ``cpu_gflops``, ``link_gbps``, ``dram_gbps``, ``call_us``; ``cpu.rates``).
        ``miss="stream"`` (host mode, no predictor): the fixed streaming schedule of ``memory.stream``;
        ``num_slots`` 0 is its smallest buffer (a ring of two layers' experts, nothing resident)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if miss not in MISSES:
            raise ValueError(f"miss must be one of {', '.join(MISSES)}, got {miss!r}")
        if miss == "cpu" and mode != "host":
            raise ValueError("miss='cpu' runs in host mode (the host splits each layer call's misses between the "
                             "link and the CPU); device mode's misses wait")
        if miss == "stream" and mode != "host":
            raise ValueError("miss='stream' is a schedule of its own with the host mode's buffer: use mode 'host'")
        if miss == "stream" and predictor is not None:
            raise ValueError("miss='stream' copies every non-resident expert of the next layers: a predictor adds "
                             "nothing to it (give none)")
        if num_slots == 0 and miss == "stream":  # the smallest buffer that streams: the ring alone
            num_slots = min_stream_slots(store.num_layers, store.num_experts)
        if num_slots == 0 and miss == "cpu":  # no resident experts: a staging ring for the copies that pay
            num_slots = store.num_experts if top_k is None or max_batch_tokens is None else \
                max_unique_experts(store.num_experts, min(top_k, store.num_experts), max_batch_tokens)
            self.staging_only = True
        else:
            self.staging_only = False
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
        if fill != "copy" and mode != "device":
            raise ValueError(f"fill={fill!r} is a device-mode option (host mode copies on its copy stream)")
        if fill == "read-through" and store.fmt.kind == "int4":
            raise ValueError("fill='read-through' is not built for int4 experts (their zero points): use fill='copy'")
        expert_map = self._check_expert_map(expert_map, store.num_experts)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        experts = store.num_layers * store.num_experts
        if isinstance(num_slots, int) and not isinstance(num_slots, bool) and num_slots > experts:
            warnings.warn(f"Prophet: a buffer of {num_slots} slots is more than the model's {experts} routed "
                          f"experts ({store.num_layers} layers x {store.num_experts}); using {experts} slots "
                          "(every expert resident): more would only take device memory from the KV cache",
                          stacklevel=2)
            num_slots = experts
        min_slots = 1
        # the model's routed experts per layer: the ids routing names (under EP all ranks' experts)
        self.routed_experts = store.num_experts if expert_map is None else expert_map.numel()
        if top_k is not None and max_batch_tokens is not None:
            if not 1 <= top_k <= self.routed_experts:
                raise ValueError(f"top_k={top_k} must be in [1, E={self.routed_experts}]")
            if miss == "wait":  # (with miss: cpu, what has no slot is computed on the CPU)
                min_slots = max_unique_experts(store.num_experts, top_k, max_batch_tokens)
        self.store, self.mode, self.fill, self.miss = store, mode, fill, miss
        self.cpu, self.miss_cost = None, None
        if miss == "cpu":
            from ..cpu import BACKENDS, available_cpus
            from ..cpu.experts import check_threads

            if cpu_backend not in BACKENDS:
                raise ValueError(f"cpu_backend must be one of {', '.join(BACKENDS)}, got {cpu_backend!r}")
            cpu_threads = max(1, available_cpus() - 1) if cpu_threads is None else check_threads(cpu_threads)
            unknown = sorted(set(cpu_rates or {}) - {"cpu_gbps", "cpu_gflops", "link_gbps", "dram_gbps", "call_us"})
            if unknown:
                raise ValueError(f"cpu_rates: unknown rate(s) {unknown}; known: cpu_gbps, cpu_gflops, link_gbps, "
                                 "dram_gbps, call_us")
            for name, v in (cpu_rates or {}).items():
                if not (isinstance(v, (int, float)) and not isinstance(v, bool) and
                        (0 <= v if name == "call_us" else 0 < v) and v < float("inf")):
                    raise ValueError(f"cpu_rates {name}={v!r}: must be a finite number > 0")
        self.expert_map = None if expert_map is None else expert_map.to(device)  # on the device: no copy per call
        self._local_of = None if expert_map is None else expert_map.tolist()  # host mode's copy of it
        predictor = make_predictor(predictor)
        if predictor is not None and expert_map is not None:
            predictor = RankExperts(predictor, self.expert_map)
        self.current_slots: list[int] = []  # slots the layer being computed reads (pinned; host mode)
        dims = (store.num_layers, store.num_experts, store.hidden, store.intermediate, num_slots, store.dtype, device)
        if mode == "device":
            self.buffer = DeviceExpertBuffer(*dims, min_slots=min_slots, policy=policy, fmt=store.fmt)
            self.prefetcher = None
            budget = None if prefetch_budget_bytes is None else prefetch_budget_bytes // store.expert_bytes
            self.residency = DeviceResidency(self.buffer, store, predictor, prefetch_depth, budget)
        else:
            self.buffer = PagedExpertBuffer(*dims, policy, min_slots, fmt=store.fmt)
            self.prefetcher = StreamPrefetcher(store, self.buffer)
            self.residency = ExpertResidency(self.buffer, store.expert_bytes, predictor, prefetch_depth,
                                             prefetch_budget_bytes)
        # the kernels' weight-format arguments: the slots' scales and zero points (Nones for float
        # experts), fp8's scale blocks and int4's group
        self._wargs = dict(**self.buffer.quant._asdict(), block_shape=store.fmt.block_shape,
                           group_size=store.fmt.group_size)
        if miss == "cpu":
            self._start_cpu(cpu_threads, cpu_backend, cpu_rates or {})
        self.schedule = None
        if miss == "stream":
            self._start_stream()

    def _start_cpu(self, threads: int, backend: str, given: dict) -> None:
        """The CPU pool and the MissCost of ``miss="cpu"``: rates measured once (``cpu.rates``, before
        any expert is resident: slot 0 is overwritten by the link's measurement), then the given ones."""
        import dataclasses

        from ..cpu import CpuExperts
        from ..cpu import rates as cpu_rates

        self.cpu = CpuExperts(self.store, threads, backend, cpus=numa.compute_cpus())
        names = ("cpu_gbps", "cpu_gflops", "link_gbps", "dram_gbps")
        if all(n in given for n in names):
            self.rates = cpu_rates.Rates(**given, call_us=given.get("call_us", 0.0), source="given")
        else:
            measured = cpu_rates.measure(self.cpu, self.buffer.blocks[0] if self.buffer.blocks is not None else None)
            self.rates = dataclasses.replace(measured, **given, source=measured.source + (
                f"; given: {', '.join(sorted(given))}" if given else ""))
        s = self.store
        if not self.staging_only:  # the buffer filled evenly over the layers at start-up (not counted): misses
            for slot, layer, e in self.residency.place_evenly():  # are computed where they are, so it would
                self.prefetcher.copy(slot, layer, e, label="preload")  # fill only by copies that pay
            self.residency.reset_stats()
        self.miss_cost = MissCost(s.expert_bytes, 6 * s.hidden * s.intermediate, self.rates.cpu_gbps,
                                  self.rates.cpu_gflops, self.rates.link_gbps, self.rates.dram_gbps,
                                  self.rates.call_us * 1e-6)

    def close(self) -> None:
        """Stop the CPU pool's threads (``miss="cpu"``); the layer is unusable for CPU misses after."""
        if self.cpu is not None:
            self.cpu.close()

    @property
    def stats(self) -> Stats:
        """The counters, with the stall of every demand copy issued so far (waits for their timing;
        in device mode, one read of the device counters)."""
        self._add_stalls(wait=True)
        return self.schedule.stats if self.schedule is not None else self.residency.stats

    def reset_stats(self) -> None:
        """Start the counters afresh (e.g. after a serving engine's warm-up and profiling runs);
        residency is kept. A prefetch issued before the reset is not counted as used after it."""
        self._add_stalls(wait=True)
        self.residency.reset_stats()
        if self.schedule is not None:
            self.schedule.reset_stats()

    def _add_stalls(self, wait: bool) -> None:
        if self.prefetcher is None:  # device mode: no host timing
            return
        for layer, seconds in self.prefetcher.stalls(wait):
            self.residency.stats.layers[layer].stall_s += seconds

    @property
    def predictor(self):
        return self.residency.predictor

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor, num_slots: int, device=None, policy: str = DEFAULT_POLICY,
                     predictor=None, prefetch_depth: int = 1, expert_dtype: str | None = None, block_shape=None,
                     group_size=None, **kwargs) -> "ProphetMoE":
        """w13 [L, E, 2I, H], w2 [L, E, H, I] (any device; copied into the host store; ``expert_dtype
        ="fp8"``: quantized to e4m3 on the way, scales per output channel or per ``block_shape``;
        ``"int4"``: to int4 codes with a scale per ``group_size`` inputs)."""
        return cls(HostExpertStore.from_tensors(w13, w2, expert_dtype=expert_dtype, block_shape=block_shape,
                                                group_size=group_size),
                   num_slots, device, policy, predictor, prefetch_depth, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    # ---------------------------------------------------------------------------------- forward

    def forward(self, layer: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                join_prefetch: bool = False) -> torch.Tensor:
        """y [T, H] of MoE layer `layer`: x [T, H] in the store's dtype on the buffer's device,
        topk_weights [T, k] floating, topk_ids [T, k] int32/int64 in [0, E). Everything is checked
        before any expert moves or any counter changes: a refused call leaves no trace.

        ``join_prefetch`` (device mode on CUDA): the compute stream waits for this call's prefetch
        before the call returns, as after the last layer, instead of at the next layer's call. For
        a caller that captures each layer in its own CUDA graph (vLLM's piecewise graphs): a
        capture must end with its side stream joined, and a later capture cannot wait on an event
        recorded in it. The prefetch then overlaps this layer's experts only."""
        L = self.store.num_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < L:
            raise ValueError(f"layer {layer!r} out of range [0, {L})")
        check_inputs(x, self.buffer.w13, self.buffer.w2, topk_weights, topk_ids, self.buffer._rows[layer],
                     **self._wargs)
        if topk_ids.shape[1] > self.routed_experts:  # (the ops allow k > E: an EP rank's local E)
            raise ValueError(f"k = {topk_ids.shape[1]} experts per token exceeds the model's "
                             f"E = {self.routed_experts} experts")
        routing = topk_ids  # what the predictor reads (global ids under expert parallelism)
        if self.mode == "device":
            y = self._forward_device(layer, x, topk_weights, topk_ids, routing) if topk_ids.numel() else \
                x.new_empty((0, self.store.hidden))
            if join_prefetch or layer == L - 1:
                self.residency.join()  # a captured step (or graph piece) ends with its side-stream work joined
            return y
        if topk_ids.numel() == 0:
            return x.new_empty((0, self.store.hidden))
        if self.miss == "cpu":
            return self._forward_hybrid(layer, x, topk_weights, topk_ids, routing)
        if self.miss == "stream":
            return self._forward_stream(layer, x, topk_weights, topk_ids, join=join_prefetch or layer == L - 1)
        with nvtx_range(f"route L{layer}"):
            experts = unique_experts(topk_ids)  # (global ids under expert parallelism)
        if experts[0] < 0 or experts[-1] >= self.routed_experts:
            raise ValueError(f"topk_ids holds expert ids outside [0, {self.routed_experts}) in layer {layer}: "
                             f"{experts[0] if experts[0] < 0 else experts[-1]}")
        if self.expert_map is not None:  # this rank's experts, from the same host read; the rest contribute zero
            experts = sorted(e for e in (self._local_of[g] for g in experts) if e >= 0)
            topk_ids = local_ids(self.expert_map, topk_ids)
            if not experts:
                return x.new_zeros((x.shape[0], self.store.hidden))
        self._add_stalls(wait=False)
        with nvtx_range(f"ensure_resident L{layer}"):
            slots, fills = self.residency.acquire(layer, experts)
            try:
                row = self._copy_and_wait(layer, slots, fills)
            except BaseException:
                self.residency.release(slots)
                raise
        self.current_slots = slots
        try:
            with nvtx_range(f"experts L{layer}"):
                y = fused_experts_paged(x, self.buffer.w13, self.buffer.w2, row, topk_weights, topk_ids, check=False,
                                        **self._wargs)
            self.prefetcher.mark_read(slots)
            with nvtx_range(f"predict L{layer}"):
                fills = self.residency.prefetch(layer, routing, x)  # this layer's slots stay pinned
            for s, future, e in fills:
                self.prefetcher.copy(s, future, e)
        finally:
            self.residency.release(slots)
            self.current_slots = []
        return y

    def _copy_and_wait(self, layer: int, slots: list[int], fills) -> torch.Tensor:
        """Issue the demand copies of a layer call, make the compute stream wait for them and for the
        hits still landing, and return the layer's page-table row on the device. ``slots``: the call's
        slots (hits and fills)."""
        filled = [f[0] for f in fills]
        fresh = set(filled)
        # Hits whose prefetch is still in flight (queried before the demand copies queue behind it):
        # late hits; every other hit had landed, so only these and the misses need a wait on the
        # compute stream.
        late = self.prefetcher.in_flight([s for s in slots if s not in fresh])
        self.residency.stats.layers[layer].late_hits += len(late)
        self.prefetcher.demand(layer, fills)
        row = self.buffer.upload_row(layer)
        self.prefetcher.wait_ready(late + filled)
        return row

    def _forward_hybrid(self, layer: int, x, topk_weights, topk_ids, routing) -> torch.Tensor:
        """``miss="cpu"``: the GPU computes the resident experts and the copies that pay, the CPU the
        other misses, at once (module docstring)."""
        T = x.shape[0]
        with nvtx_range(f"route L{layer}"):
            # one host synchronisation: ids and weights (and, decode-sized, x: the CPU part needs its
            # rows before the GPU part starts) come to the host together
            small = T <= 64
            ids_h, w_h, x_h = _to_host(topk_ids, topk_weights.float(), x if small else None)
            k = ids_h.shape[1]
            if ids_h.numel() <= SMALL:  # a decode step: plain lists are faster than numpy calls here
                ids, w_host = ids_h.reshape(-1).tolist(), w_h.reshape(-1).tolist()
                lo, hi = min(ids), max(ids)
            else:
                ids, w_host = ids_h.numpy(), w_h.numpy()
                lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.routed_experts:
                raise ValueError(f"topk_ids holds expert ids outside [0, {self.routed_experts}) in layer {layer}: "
                                 f"{lo if lo < 0 else hi}")
            if self.expert_map is not None:  # this rank's experts; another rank's contribute zero here
                local = self._local_of
                ids = [local[g] for g in ids] if isinstance(ids, list) else np.asarray(local, dtype=np.int64)[ids]
                topk_ids = local_ids(self.expert_map, topk_ids)
            experts, counts = route_counts(ids)
            if not experts:
                return x.new_zeros((T, self.store.hidden))
        self._add_stalls(wait=False)
        st = self.residency.stats.layers[layer]
        with nvtx_range(f"split L{layer}"):
            slots, fills = self.residency.acquire(layer, experts, fill=self.miss_cost, tokens=counts)
        cpu_experts = [e for e, s in zip(experts, slots) if s < 0]
        gpu_slots = [s for s in slots if s >= 0]
        try:
            if cpu_experts:
                with nvtx_range(f"cpu submit L{layer}"):
                    token_index, offsets, rows, pair_w = pairs_of(ids, w_host, cpu_experts, k)
                    index = torch.from_numpy(token_index)
                    xs = x_h[index] if small else x[index.to(x.device)].cpu()
                    self.cpu.submit(layer, xs, cpu_experts, offsets, rows, pair_w, check=False)
            with nvtx_range(f"ensure_resident L{layer}"):
                row = self._copy_and_wait(layer, gpu_slots, fills)
            self.current_slots = gpu_slots
            if gpu_slots:
                with nvtx_range(f"experts L{layer}"):
                    y = fused_experts_paged(x, self.buffer.w13, self.buffer.w2, row, topk_weights, topk_ids, check=False,
                                            **self._wargs)
                self.prefetcher.mark_read(gpu_slots)
            else:
                y = x.new_zeros((T, self.store.hidden))
            if cpu_experts:
                with nvtx_range(f"cpu join L{layer}"):
                    y_cpu, seconds = self.cpu.join()
                    st.cpu_s += seconds
                    y.index_add_(0, index.to(y.device, non_blocking=True), y_cpu.to(y.device, y.dtype, non_blocking=True))
            with nvtx_range(f"predict L{layer}"):
                # (the misses the CPU computed are not copied for the layer's next call: on realistic routing
                # that took the link from the copies that pay, up to 78% slower steps, for 0-4 points of hits;
                # PERF_NOTES.md)
                prefetches = self.residency.prefetch(layer, routing, x)  # this layer's slots stay pinned
            for s, future, e in prefetches:
                self.prefetcher.copy(s, future, e)
        finally:
            if self.cpu.busy:  # a failure after the submit: the pool finishes before its inputs go
                self.cpu.join()
            self.residency.release(gpu_slots)
            self.current_slots = []
        return y

    def _start_stream(self) -> None:
        """``miss="stream"``: the schedule, its fixed page table, the resident experts copied once (not
        counted), and each ring part's first layer copied (counted: the step's first copies)."""
        s, b = self.store, self.buffer
        self.schedule = StreamSchedule(s.num_layers, s.num_experts, b.num_slots, s.expert_bytes)
        b.page_table.copy_(torch.from_numpy(self.schedule.rows))
        for layer in range(s.num_layers):
            for e in range(self.schedule.resident[layer]):
                self.prefetcher.copy(int(self.schedule.rows[layer, e]), layer, e, label="preload")
        cuda = b.device.type == "cuda"
        if cuda:  # the resident experts have landed before any call (calls wait only for their ring part)
            self.prefetcher.stream.synchronize()
        parts = max(1, self.schedule.parts)
        self._ring_ready = [torch.cuda.Event() for _ in range(parts)] if cuda else None
        self._ring_read = [None] * parts  # the compute stream's event after the last read of each part
        self._ring_waited = [True] * parts  # the compute stream already waits for the part's last copy
        for layer in self.schedule.start():
            self._stream_copy(layer)

    def _stream_copy(self, layer: int) -> None:
        """Copy `layer`'s streamed experts into its ring part (one copy of a contiguous range; on CUDA
        on the copy stream, after the part's last reader, recording the part's ready event)."""
        first, n, slot = self.schedule.streamed(layer)
        part = self.schedule.part_of(layer)
        pairs = copy_pairs(self.store, self.buffer, slot, layer, first, n)
        with nvtx_range(f"stream L{layer} ({n} experts)", color="red"):
            if self._ring_ready is None:
                for dst, src_ in pairs:
                    dst.copy_(src_)
                return
            stream = self.prefetcher.stream
            with torch.cuda.stream(stream):
                if self._ring_read[part] is not None:
                    stream.wait_event(self._ring_read[part])
                for dst, src_ in pairs:
                    dst.copy_(src_, non_blocking=True)
                self._ring_ready[part].record(stream)
            self._ring_waited[part] = False

    def _forward_stream(self, layer: int, x, topk_weights, topk_ids, join: bool) -> torch.Tensor:
        """``miss="stream"``: this layer's ring part holds its experts (copied one layer ahead, or now
        when the calls left the schedule's order, e.g. a profiling run); compute through the fixed
        page-table row; then copy the next layer that uses this part. ``join``: the compute stream
        waits for every copy in flight before returning (the last layer: a step is self-contained,
        as a CUDA graph capture needs)."""
        sched = self.schedule
        if self.expert_map is not None:
            topk_ids = local_ids(self.expert_map, topk_ids)  # another rank's experts contribute zero here
        else:  # no host read (as in device mode): an id outside [0, E) is dropped, it contributes zero
            E = self.store.num_experts
            topk_ids = torch.where((topk_ids >= 0) & (topk_ids < E), topk_ids, -1).to(torch.int32)
        part = sched.part_of(layer)
        streams = sched.streamed(layer)[1] > 0
        if sched.before(layer) is not None:  # out of the schedule's order: this layer's experts now
            self._stream_copy(layer)
        cur = torch.cuda.current_stream(self.buffer.device) if self._ring_ready is not None else None
        if streams and cur is not None and not self._ring_waited[part]:
            cur.wait_event(self._ring_ready[part])  # (once per copy: a step joined at its end waits for
            self._ring_waited[part] = True  # nothing recorded before it, so a capture of the next one is closed)
        with nvtx_range(f"experts L{layer}"):
            y = fused_experts_paged(x, self.buffer.w13, self.buffer.w2, self.buffer._rows[layer], topk_weights,
                                    topk_ids, check=False, **self._wargs)
        if streams:
            if cur is not None:
                self._ring_read[part] = torch.cuda.Event()
                self._ring_read[part].record(cur)
            nxt = sched.after(layer)
            if nxt is not None:
                self._stream_copy(nxt)
        if join and cur is not None:
            for p, ev in enumerate(self._ring_ready):
                if not self._ring_waited[p]:
                    cur.wait_event(ev)
                    self._ring_waited[p] = True
        return y

    def prefetch_entry(self, hidden: torch.Tensor) -> int:
        """Copy ahead the experts the predictor expects in layers 0 .. prefetch_depth-1 from the hidden
        state entering layer 0 (under pipeline parallelism, what a stage receives from the previous
        one: nothing inside the stage predicts its first layers). Host mode with the gate predictor
        (``predict_entry``); otherwise nothing. Returns the number of copies started."""
        if self.mode != "host" or self.miss == "stream" or hidden.numel() == 0:
            return 0
        if hidden.dim() != 2 or hidden.shape[1] != self.store.hidden:
            raise ValueError(f"hidden state [T, {self.store.hidden}] expected, got {list(hidden.shape)}")
        with nvtx_range("predict entry"):
            fills = self.residency.prefetch_entry(hidden)
        for s, future, e in fills:
            self.prefetcher.copy(s, future, e)
        return len(fills)

    @staticmethod
    def _check_expert_map(expert_map, num_local: int) -> torch.Tensor | None:
        if expert_map is None:
            return None
        if not isinstance(expert_map, torch.Tensor) or expert_map.dim() != 1 or expert_map.dtype.is_floating_point:
            raise ValueError("expert_map must be a 1-D integer tensor [E_global]: this rank's index of each expert, or -1")
        local = expert_map[expert_map >= 0].tolist()
        if (expert_map < -1).any() or sorted(local) != list(range(num_local)):
            raise ValueError(f"expert_map must hold each of this rank's {num_local} experts (0..{num_local - 1}) "
                             f"once and -1 for the others; got {expert_map.tolist()}")
        return expert_map.to(torch.int32)

    def _forward_device(self, layer: int, x, topk_weights, topk_ids, routing) -> torch.Tensor:
        """Device mode: no host synchronisation, fixed shapes (see ``memory.device``). The host checks
        only what needs no device read: the buffer holds this batch's unique experts."""
        if self.expert_map is not None:  # expert parallelism: global ids -> this rank's, -1 elsewhere
            topk_ids = local_ids(self.expert_map, topk_ids)  # (no host read: a bad id is dropped)
        E, S = self.store.num_experts, self.buffer.num_slots
        most = min(E, topk_ids.numel())
        if most > S:
            raise ValueError(f"layer {layer} may need {most} unique experts at T={topk_ids.shape[0]} (k="
                             f"{topk_ids.shape[1]}) but the buffer has {S} slots; need at least {most} (or a smaller batch)")
        with nvtx_range(f"ensure_resident L{layer}"):
            rt = self.residency.demand(layer, narrow_ids(topk_ids, E).reshape(-1), self.fill == "read-through")
        with nvtx_range(f"experts L{layer}"):
            w = self._wargs
            w13_scale, w2_scale, block_shape = w["w13_scale"], w["w2_scale"], w["block_shape"]
            args = (x, self.buffer.w13, self.buffer.w2, self.buffer._rows[layer], topk_weights, topk_ids)
            block = list(block_shape) if block_shape else None
            if rt is None:
                y = fused_experts_paged_op(*args, w13_scale, w2_scale, block, w["w13_zeros"], w["w2_zeros"],
                                           w["group_size"])
            else:
                y = fused_experts_read_through_op(*args, rt.w13, rt.w2, rt.fills, rt.fill_count, w13_scale, w2_scale,
                                                  rt.w13_scale, rt.w2_scale, block)
        with nvtx_range(f"predict L{layer}"):
            self.residency.prefetch(layer, routing, x)
        return y

    __call__ = forward
