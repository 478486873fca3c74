"""Device-driven residency: one small kernel per step decides hits, misses and victims on the
device and updates the page table; a copy kernel fills the chosen slots from the host store. No
host synchronisation and fixed shapes, so a whole decode step can be captured in one CUDA graph.

Legend: L layers, E experts per layer, S slots, N candidate ids (a demand step: the layer's T*k
token-slots; a prefetch step: a ranked list of W experts, -1 padded), F = E fill rows, BLK the
elements of one expert (3*I*H). Every state array has one extra "sink" element (index S, resp.
L*E) that masked-out scatters write to, so no update needs a data-dependent shape.

State (``ResidencyState``, all on the device)::

    pt        [L*E + 1] int32   page table, flat (row l = pt[l*E:(l+1)*E]): slot of expert, or -1
    owner     [S + 1]   int32   l*E + e of the expert in each slot, or -1 (free)
    stamp     [S + 1]   int64   clock of the slot's last use (LRU key), -1 when free
    unread    [S + 1]   int32   1 while a prefetched expert has not been read
    excl      [S + 1]   int32   slots this layer call reads or prefetched into: never victims
    clock     [1]       int64   +1 per step
    budget    [1]       int32   prefetch copies left in this layer call
    counters  [L, 5]    int64   hits, misses, prefetched, prefetch_used, evictions (per layer)

One step (``residency_step``; ``mode`` DEMAND or PREFETCH) for layer ``target``::

    cand [N] int32  -> wanted experts (demand: every valid id; prefetch: the listed ones, in rank order)
    resident wanted experts are touched (stamp = clock; excluded from victims)
    demand:   hits, misses, prefetch_used counted; excl reset to this call's slots
    missing wanted experts, in order (demand: ascending id; prefetch: rank), take the free slots and
      then the least recently used ones among slots not excluded, up to the budget (prefetch) or all
      (demand: the caller guarantees S >= the layer's unique experts); a victim's previous expert
      leaves the page table (an eviction, counted at ``target``)
    fills [F + 1, 2] int32 (expert, slot) and fill_count [1]: the copies to make, for ``fill_slots``

Victim order: free slots first, then by stamp, ties by slot index (a sort of stamp * S_PAD + slot).
The PyTorch reference (``residency_step_reference``) is the same function in tensor ops (no host
sync either): it runs where Triton does not (a CPU without the interpreter) and in the trace
simulator, and the kernel is tested equal to it decision for decision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .route_plan import _chunk_hist, _e_pad, _load_chunk

DEMAND, PREFETCH = 0, 1
HITS, MISSES, PREFETCHED, PREFETCH_USED, EVICTIONS = range(5)
COUNTERS = ("hits", "misses", "prefetched", "prefetch_used", "evictions")
_FREE_KEY = 0  # free slots sort first; used slots by stamp + 1; excluded ones last
_EXCLUDED_KEY = 1 << 42


@dataclass
class ResidencyState:
    """The device residency state of L layers x E experts over S slots (see the module docstring)."""

    pt: torch.Tensor
    owner: torch.Tensor
    stamp: torch.Tensor
    unread: torch.Tensor
    excl: torch.Tensor
    clock: torch.Tensor
    budget: torch.Tensor
    counters: torch.Tensor
    num_layers: int
    num_experts: int
    num_slots: int

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, num_slots: int, device) -> "ResidencyState":
        L, E, S = num_layers, num_experts, num_slots
        kw = dict(device=device)
        return cls(pt=torch.full((L * E + 1,), -1, dtype=torch.int32, **kw),
                   owner=torch.full((S + 1,), -1, dtype=torch.int32, **kw),
                   stamp=torch.full((S + 1,), -1, dtype=torch.int64, **kw),
                   unread=torch.zeros(S + 1, dtype=torch.int32, **kw),
                   excl=torch.zeros(S + 1, dtype=torch.int32, **kw),
                   clock=torch.zeros(1, dtype=torch.int64, **kw),
                   budget=torch.zeros(1, dtype=torch.int32, **kw),
                   counters=torch.zeros((L, len(COUNTERS)), dtype=torch.int64, **kw),
                   num_layers=L, num_experts=E, num_slots=S)

    @property
    def page_table(self) -> torch.Tensor:
        """[L, E] int32 view of the page table (what the paged kernels read, row by row)."""
        L, E = self.num_layers, self.num_experts
        return self.pt[: L * E].view(L, E)

    def tensors(self) -> list[torch.Tensor]:
        return [self.pt, self.owner, self.stamp, self.unread, self.excl, self.clock, self.budget, self.counters]

    def clone(self) -> "ResidencyState":
        return ResidencyState(*[t.clone() for t in self.tensors()], self.num_layers, self.num_experts,
                              self.num_slots)


def _s_pad(num_slots: int) -> int:
    return triton.next_power_of_2(num_slots + 1)


# ----------------------------------------------------------------------------- PyTorch reference


def residency_step_reference(state: ResidencyState, target: int, cand: torch.Tensor, mode: int,
                             fills: torch.Tensor, fill_count: torch.Tensor, budget: int = 0) -> None:
    """The residency step in PyTorch tensor ops (no host synchronisation), in place on ``state``,
    ``fills`` [F + 1, 2] and ``fill_count`` [1]. ``budget``: with DEMAND, the prefetch budget this
    layer call starts with (the copies its PREFETCH steps may make)."""
    L, E, S = state.num_layers, state.num_experts, state.num_slots
    dev = cand.device
    e = torch.arange(E, device=dev)
    cand = cand.reshape(-1).to(torch.int64)
    valid = (cand >= 0) & (cand < E)
    safe = torch.where(valid, cand, E)  # bin E: invalid
    state.clock += 1
    clock = state.clock
    if mode == DEMAND:
        counts = torch.zeros(E + 1, dtype=torch.int64, device=dev).scatter_add_(0, safe, torch.ones_like(safe))[:E]
        wanted = counts > 0
        order_key = e  # misses take slots in ascending expert order
        state.excl.zero_()
        state.budget.fill_(budget)
    else:
        pos = torch.arange(cand.numel(), device=dev)
        first = torch.full((E + 1,), cand.numel(), dtype=torch.int64, device=dev).scatter_reduce_(
            0, safe, pos, reduce="amin")[:E]
        wanted = first < cand.numel()
        order_key = first  # in rank order
    row = state.pt[target * E: (target + 1) * E].to(torch.int64)
    resident = wanted & (row >= 0)
    missing = wanted & (row < 0)
    res_slot = torch.where(resident, row, S)  # sink for the rest
    # touch what is resident and wanted; never evict it in this layer call
    state.stamp.scatter_(0, res_slot, clock.expand(E))
    state.excl.scatter_(0, res_slot, torch.ones(E, dtype=torch.int32, device=dev))
    if mode == DEMAND:
        unread_hits = state.unread.gather(0, res_slot) * resident
        state.counters[target, HITS] += resident.sum()
        state.counters[target, MISSES] += missing.sum()
        state.counters[target, PREFETCH_USED] += unread_hits.sum()
        state.unread.scatter_(0, res_slot, torch.zeros(E, dtype=torch.int32, device=dev))
    # victims: free slots first, then least recently used, ties by slot; excluded slots last
    s = torch.arange(S, device=dev)
    key = torch.where(state.owner[:S] < 0, _FREE_KEY, state.stamp[:S] + 1)
    key = torch.where(state.excl[:S] > 0, _EXCLUDED_KEY, key)
    order = torch.sort(key * _s_pad(S) + s).values % _s_pad(S)
    eligible = (state.excl[:S] == 0).sum()
    n_missing = missing.sum()
    limit = torch.minimum(n_missing, eligible)
    if mode == PREFETCH:
        limit = torch.minimum(limit, state.budget.to(torch.int64).squeeze(0))
    # rank of each missing expert among the missing ones, in order_key order
    rank = (missing[None, :] & (order_key[None, :] < order_key[:, None])).sum(1)
    take = missing & (rank < limit)
    victim = torch.where(take, order.gather(0, rank.clamp(max=S - 1)), S)
    prev = state.owner.gather(0, victim).to(torch.int64)
    evicted = take & (prev >= 0)
    state.pt.scatter_(0, torch.where(evicted, prev, L * E), torch.full((E,), -1, dtype=torch.int32, device=dev))
    state.pt.scatter_(0, torch.where(take, target * E + e, L * E), victim.to(torch.int32))
    state.owner.scatter_(0, victim, (target * E + e).to(torch.int32))
    state.stamp.scatter_(0, victim, clock.expand(E))
    state.unread.scatter_(0, victim, torch.full((E,), mode, dtype=torch.int32, device=dev))
    state.excl.scatter_(0, victim, torch.ones(E, dtype=torch.int32, device=dev))
    state.counters[target, EVICTIONS] += evicted.sum()
    if mode == PREFETCH:
        state.counters[target, PREFETCHED] += limit
        state.budget -= limit.to(torch.int32)
    row_of = torch.where(take, rank, fills.shape[0] - 1)
    fills.index_copy_(0, row_of, torch.stack([e, victim], 1).to(torch.int32))  # (sink row gets the rest)
    fill_count.copy_(limit.view(1))
    # keep the sinks inert
    state.pt[L * E] = -1
    state.owner[S] = -1
    state.stamp[S] = -1
    state.unread[S] = 0
    state.excl[S] = 0


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _residency_kernel(
    # pointers
    cand_ptr,  # (N,) int32 candidate ids
    pt_ptr,  # (L*E + 1,) int32
    owner_ptr,  # (S + 1,) int32
    stamp_ptr,  # (S + 1,) int64
    unread_ptr,  # (S + 1,) int32
    excl_ptr,  # (S + 1,) int32
    clock_ptr,  # (1,) int64
    budget_ptr,  # (1,) int32
    counters_ptr,  # (L, 5) int64
    order_ptr,  # (S_PAD,) int64 scratch: slots in victim order
    fills_ptr,  # (F + 1, 2) int32 out
    count_ptr,  # (1,) int32 out
    # sizes
    N, E, S, target, BUDGET,
    # meta-parameters
    MODE: tl.constexpr, X_PAD: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
):
    """grid = (1,): one program, every decision of one step (see the module docstring). Candidates
    live in X: the experts (DEMAND, X_PAD >= E: wanted = routed at least once, in id order) or the
    ranked list's positions (PREFETCH, X_PAD >= N: wanted = a valid id's first listing, in rank order)."""
    clock = tl.load(clock_ptr) + 1
    tl.store(clock_ptr, clock)
    x = tl.arange(0, X_PAD)
    if MODE == 0:
        counts = tl.zeros([X_PAD], tl.int32)
        for c0 in range(0, N, CHUNK):
            offs, ids, good = _load_chunk(cand_ptr, c0 // CHUNK, N, E, CHUNK)
            counts += _chunk_hist(ids, good, CHUNK, X_PAD)
        expert = x
        wanted = (counts > 0) & (x < E)
    else:
        expert = tl.load(cand_ptr + x, mask=x < N, other=-1)
        valid = (x < N) & (expert >= 0) & (expert < E)
        earlier = (expert[None, :] == expert[:, None]) & (x[None, :] < x[:, None]) & valid[None, :]
        wanted = valid & (tl.sum(earlier.to(tl.int32), axis=1) == 0)
    row = tl.load(pt_ptr + target * E + expert, mask=wanted, other=-1)
    resident = wanted & (row >= 0)
    missing = wanted & (row < 0)
    s = tl.arange(0, S_PAD)
    in_s = s < S
    if MODE == 0:
        tl.store(excl_ptr + s, tl.zeros([S_PAD], tl.int32), mask=in_s)
        tl.store(budget_ptr, BUDGET)
        unread_hits = tl.load(unread_ptr + row, mask=resident, other=0)
        tl.atomic_add(counters_ptr + target * 5 + 0, tl.sum(resident.to(tl.int64), axis=0))
        tl.atomic_add(counters_ptr + target * 5 + 1, tl.sum(missing.to(tl.int64), axis=0))
        tl.atomic_add(counters_ptr + target * 5 + 3, tl.sum(unread_hits.to(tl.int64), axis=0))
        tl.store(unread_ptr + row, tl.zeros([X_PAD], tl.int32), mask=resident)
    tl.debug_barrier()  # the excl reset lands before the marks below
    tl.store(stamp_ptr + row, tl.zeros([X_PAD], tl.int64) + clock, mask=resident)
    tl.store(excl_ptr + row, tl.full([X_PAD], 1, tl.int32), mask=resident)
    n_missing = tl.sum(missing.to(tl.int32), axis=0)
    limit = n_missing * 0
    if n_missing > 0:  # (uniform across the program) all hits: no victim to choose, no sort
        tl.debug_barrier()  # the slot arrays are read back below, after these scattered writes
        owner = tl.load(owner_ptr + s, mask=in_s, other=-1)
        stamp = tl.load(stamp_ptr + s, mask=in_s, other=0)
        excl = tl.load(excl_ptr + s, mask=in_s, other=1)
        key = tl.where(owner < 0, 0, stamp + 1)  # free slots first, then least recently used
        key = tl.where(excl > 0, 1 << 42, key)  # never a slot this layer call reads or filled
        packed = tl.sort(key * S_PAD + s.to(tl.int64))  # ties by slot index
        tl.store(order_ptr + s, packed % S_PAD)
        eligible = tl.sum(((excl == 0) & in_s).to(tl.int32), axis=0)
        limit = tl.minimum(n_missing, eligible)
        if MODE == 1:
            limit = tl.minimum(limit, tl.load(budget_ptr))
        rank = tl.cumsum(missing.to(tl.int32), axis=0) - 1  # among the missing, in X order
        take = missing & (rank < limit)
        tl.debug_barrier()  # order_ptr was stored above by other threads
        victim = tl.load(order_ptr + rank, mask=take, other=S).to(tl.int32)
        prev = tl.load(owner_ptr + victim, mask=take, other=-1)
        evicted = take & (prev >= 0)
        tl.store(pt_ptr + prev, tl.full([X_PAD], -1, tl.int32), mask=evicted)
        tl.store(pt_ptr + target * E + expert, victim, mask=take)
        tl.store(owner_ptr + victim, target * E + expert, mask=take)
        tl.store(stamp_ptr + victim, tl.zeros([X_PAD], tl.int64) + clock, mask=take)
        tl.store(unread_ptr + victim, tl.full([X_PAD], MODE, tl.int32), mask=take)
        tl.store(excl_ptr + victim, tl.full([X_PAD], 1, tl.int32), mask=take)
        tl.atomic_add(counters_ptr + target * 5 + 4, tl.sum(evicted.to(tl.int64), axis=0))
        if MODE == 1:
            tl.atomic_add(counters_ptr + target * 5 + 2, limit.to(tl.int64))
            tl.store(budget_ptr, tl.load(budget_ptr) - limit)
        tl.store(fills_ptr + rank * 2, expert, mask=take)
        tl.store(fills_ptr + rank * 2 + 1, victim, mask=take)
    tl.store(count_ptr, limit)


_CHUNK = 128  # demand: token-slots histogrammed per step


def residency_step(state: ResidencyState, target: int, cand: torch.Tensor, mode: int, fills: torch.Tensor,
                   fill_count: torch.Tensor, budget: int = 0) -> None:
    """One residency step on the device (Triton where it runs, else the PyTorch reference); in place,
    no host synchronisation. ``cand`` [N] int32; ``fills`` [F + 1, 2] int32 with F >= E;
    ``fill_count`` [1] int32. A ``torch.library`` op (``prophet::residency_step``), so that
    torch.compile traces a layer call through it without a graph break."""
    torch.ops.prophet.residency_step(*state.tensors(), cand, fills, fill_count, state.num_layers,
                                     state.num_experts, state.num_slots, target, mode, budget)


@torch.library.custom_op("prophet::residency_step",
                         mutates_args=("pt", "owner", "stamp", "unread", "excl", "clock", "budget", "counters",
                                       "fills", "fill_count"))
def _residency_step_op(pt: torch.Tensor, owner: torch.Tensor, stamp: torch.Tensor, unread: torch.Tensor,
                       excl: torch.Tensor, clock: torch.Tensor, budget: torch.Tensor, counters: torch.Tensor,
                       cand: torch.Tensor, fills: torch.Tensor, fill_count: torch.Tensor, num_layers: int,
                       num_experts: int, num_slots: int, target: int, step_mode: int, budget_init: int) -> None:
    # (not "mode": torch's functionalization passes a keyword of that name through custom ops)
    from . import use_triton

    state = ResidencyState(pt, owner, stamp, unread, excl, clock, budget, counters, num_layers, num_experts, num_slots)
    if not use_triton(cand.device):
        return residency_step_reference(state, target, cand, step_mode, fills, fill_count, budget_init)
    _launch_residency(state, target, cand, step_mode, fills, fill_count, budget_init)


@_residency_step_op.register_fake
def _(pt, owner, stamp, unread, excl, clock, budget, counters, cand, fills, fill_count, num_layers, num_experts,
      num_slots, target, step_mode, budget_init):
    return None


def _launch_residency(state: ResidencyState, target: int, cand: torch.Tensor, mode: int, fills: torch.Tensor,
                      fill_count: torch.Tensor, budget: int) -> None:
    cand = cand.reshape(-1)
    N = cand.numel()
    S = state.num_slots
    S_PAD = _s_pad(S)
    x_pad = _e_pad(state.num_experts) if mode == DEMAND else max(16, triton.next_power_of_2(max(N, 1)))
    order = torch.empty(S_PAD, dtype=torch.int64, device=cand.device)
    _residency_kernel[(1,)](
        cand, state.pt, state.owner, state.stamp, state.unread, state.excl, state.clock, state.budget,
        state.counters, order, fills, fill_count,
        N, state.num_experts, S, target, budget,
        MODE=mode, X_PAD=x_pad, S_PAD=S_PAD, CHUNK=min(_CHUNK, max(16, triton.next_power_of_2(max(N, 1)))),
        num_warps=4,
    )


# ----------------------------------------------------------------------------- slot fills


@triton.jit
def _fill_kernel(
    src_ptr,  # (E, BLK) the store's experts of one layer (pinned host memory on a GPU: read over PCIe)
    dst_ptr,  # (S, BLK) the device slots
    fills_ptr,  # (F + 1, 2) int32 (expert, slot)
    count_ptr,  # (1,) int32
    BLK, stride_src, stride_dst,
    CHUNK: tl.constexpr,
):
    """grid = (F, cdiv(BLK, CHUNK)): program (i, c) copies chunk c of the i-th fill, if i < count."""
    i = tl.program_id(0)
    if i >= tl.load(count_ptr):
        return
    expert = tl.load(fills_ptr + i * 2).to(tl.int64)
    slot = tl.load(fills_ptr + i * 2 + 1).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    ok = offs < BLK
    # expert * stride and slot * stride overflow int32 for large layers and buffers: int64
    v = tl.load(src_ptr + expert * stride_src + offs, mask=ok)
    tl.store(dst_ptr + slot * stride_dst + offs, v, mask=ok)


def fill_slots(src: torch.Tensor, dst: torch.Tensor, fills: torch.Tensor, fill_count: torch.Tensor,
               max_fills: int | None = None) -> None:
    """Copy the listed experts of ``src`` [E, BLK] (one layer of the host store) into the slots of
    ``dst`` [S, BLK] (the device buffer), reading the list on the device: no host sync, a fixed
    launch of ``max_fills`` (default F) x chunks programs, those past the count returning at once.
    A ``torch.library`` op (``prophet::fill_slots``)."""
    torch.ops.prophet.fill_slots(src, dst, fills, fill_count, max_fills or fills.shape[0] - 1)


@torch.library.custom_op("prophet::fill_slots", mutates_args=("dst",))
def _fill_slots_op(src: torch.Tensor, dst: torch.Tensor, fills: torch.Tensor, fill_count: torch.Tensor,
                   max_fills: int) -> None:
    from . import use_triton

    if not use_triton(dst.device):  # a CPU without Triton: host and device are one, read the list
        for expert, slot in fills[: int(fill_count)].tolist():
            dst[slot].copy_(src[expert])
        return
    F = max_fills
    if F < 1:  # (a budget of no copies)
        return
    BLK = src.shape[1]
    chunk = min(8192, triton.next_power_of_2(BLK))
    _fill_kernel[(F, triton.cdiv(BLK, chunk))](src, dst, fills, fill_count, BLK, src.stride(0), dst.stride(0),
                                               CHUNK=chunk, num_warps=4)


@_fill_slots_op.register_fake
def _(src, dst, fills, fill_count, max_fills):
    return None
