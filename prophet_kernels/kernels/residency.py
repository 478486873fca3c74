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
    freq      [L*E + 1] int32   running share of its layer's calls that used the expert, in 1/2**16
                                (next-use policy): f <- f - f/32 + [used] * 2**16/32 at each demand step
    ran       [L + 1]   int64   clock of each layer's last demand step (-1: never ran)
    current   [1]       int32   the layer of the last demand step

One step (``residency_step``; ``mode`` DEMAND or PREFETCH) for layer ``target``::

    cand [N] int32  -> wanted experts (demand: every valid id; prefetch: the listed ones, in rank order)
    resident wanted experts are touched (stamp = clock; excluded from victims)
    demand:   hits, misses, prefetch_used counted; excl reset to this call's slots
    missing wanted experts, in order (demand: ascending id; prefetch: rank), take the free slots and
      then the least recently used ones among slots not excluded, up to the budget (prefetch) or all
      (demand: the caller guarantees S >= the layer's unique experts); a victim's previous expert
      leaves the page table (an eviction, counted at ``target``)
    fills [F + 1, 2] int32 (expert, slot) and fill_count [1]: the copies to make, for ``fill_slots``

Victim order (the state's ``policy``): free slots first, then

    LRU       the oldest stamp first
    NEXT_USE  the farthest expected next use first, in layer calls (Belady's MIN with the future
              estimated, as the host's ``NextUsePolicy``): an expert of layer l' is next visited
              delta = (l' - current - 1) mod L + 1 calls from now; if it was touched (hit, filled,
              or named by the predictor) since its layer last ran it is taken as needed then
              (score delta), else its layer uses it on a share p = freq / 2**16 of its calls and
              the score is delta + L (1 - p) / p (p >= 1/1024), in 1/16 calls, integer arithmetic
              so that kernel and reference agree exactly

ties by slot index (a sort of key * S_PAD + slot; the slots a layer call reads or filled last).
The PyTorch reference (``residency_step_reference``) is the same function in tensor ops (no host
sync either): it runs where Triton does not (a CPU without the interpreter) and in the trace
simulator, and the kernel is tested equal to it decision for decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .route_plan import _chunk_hist, _e_pad, _load_chunk

DEMAND, PREFETCH = 0, 1
LRU, NEXT_USE = 0, 1
POLICY_IDS = {"lru": LRU, "next-use": NEXT_USE}  # the device policies, by the names the host policies use
FREQ_ONE, FREQ_SHIFT, FREQ_MIN = 1 << 16, 5, 64  # use share in 1/2**16, decay 1/32 per call, floor ~1/1024
SCORE_UNIT = 16  # next-use scores in 1/16 layer calls
_SCORE_CAP = 1 << 40  # used slots' next-use key: cap - score (> 0; the farthest next use first)
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
    freq: torch.Tensor
    ran: torch.Tensor
    current: torch.Tensor
    num_layers: int
    num_experts: int
    num_slots: int
    policy: int = LRU

    @classmethod
    def empty(cls, num_layers: int, num_experts: int, num_slots: int, device, policy: int = LRU) -> "ResidencyState":
        L, E, S = num_layers, num_experts, num_slots
        if policy not in POLICY_IDS.values():
            raise ValueError(f"unknown device policy id {policy!r}; known: {POLICY_IDS}")
        kw = dict(device=device)
        return cls(pt=torch.full((L * E + 1,), -1, dtype=torch.int32, **kw),
                   owner=torch.full((S + 1,), -1, dtype=torch.int32, **kw),
                   stamp=torch.full((S + 1,), -1, dtype=torch.int64, **kw),
                   unread=torch.zeros(S + 1, dtype=torch.int32, **kw),
                   excl=torch.zeros(S + 1, dtype=torch.int32, **kw),
                   clock=torch.zeros(1, dtype=torch.int64, **kw),
                   budget=torch.zeros(1, dtype=torch.int32, **kw),
                   counters=torch.zeros((L, len(COUNTERS)), dtype=torch.int64, **kw),
                   freq=torch.zeros(L * E + 1, dtype=torch.int32, **kw),
                   ran=torch.full((L + 1,), -1, dtype=torch.int64, **kw),
                   current=torch.zeros(1, dtype=torch.int32, **kw),
                   num_layers=L, num_experts=E, num_slots=S, policy=policy)

    @property
    def page_table(self) -> torch.Tensor:
        """[L, E] int32 view of the page table (what the paged kernels read, row by row)."""
        L, E = self.num_layers, self.num_experts
        return self.pt[: L * E].view(L, E)

    def tensors(self) -> list[torch.Tensor]:
        return [self.pt, self.owner, self.stamp, self.unread, self.excl, self.clock, self.budget, self.counters,
                self.freq, self.ran, self.current]

    def clone(self) -> "ResidencyState":
        return ResidencyState(*[t.clone() for t in self.tensors()], self.num_layers, self.num_experts,
                              self.num_slots, self.policy)


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
        f = state.freq[target * E: (target + 1) * E]
        f.copy_(torch.clamp(f - (f >> FREQ_SHIFT) + wanted.to(torch.int32) * (FREQ_ONE >> FREQ_SHIFT), max=FREQ_ONE))
        state.ran[target: target + 1].copy_(clock)
        state.current.fill_(target)
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
    # victims: free slots first, then by the policy's key, ties by slot; excluded slots last
    s = torch.arange(S, device=dev)
    key = torch.where(state.owner[:S] < 0, _FREE_KEY, _policy_key_reference(state))
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


def _policy_key_reference(state: ResidencyState) -> torch.Tensor:
    """[S] int64 victim keys of the occupied slots (smallest first; > 0), by the state's policy."""
    S, L, E = state.num_slots, state.num_layers, state.num_experts
    if state.policy == LRU:
        return state.stamp[:S] + 1
    owner = state.owner[:S].to(torch.int64).clamp(min=0)
    layer = owner // E
    delta = (layer - state.current.to(torch.int64) - 1 + L) % L + 1
    wanted = state.stamp[:S] > state.ran.gather(0, layer)
    f = state.freq.gather(0, owner).to(torch.int64).clamp(FREQ_MIN, FREQ_ONE)
    unwanted = (L * (FREQ_ONE - f) * SCORE_UNIT) // f
    score = delta * SCORE_UNIT + torch.where(wanted, 0, unwanted)
    return _SCORE_CAP - score


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
    freq_ptr,  # (L*E + 1,) int32
    ran_ptr,  # (L + 1,) int64
    current_ptr,  # (1,) int32
    order_ptr,  # (S_PAD,) int64 scratch: slots in victim order
    fills_ptr,  # (F + 1, 2) int32 out
    count_ptr,  # (1,) int32 out
    # sizes
    N, L, E, S, target, BUDGET,
    # meta-parameters
    MODE: tl.constexpr, POLICY: tl.constexpr, X_PAD: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
    FREQ_ONE: tl.constexpr, FREQ_SHIFT: tl.constexpr, FREQ_MIN: tl.constexpr, SCORE_UNIT: tl.constexpr,
    SCORE_CAP: tl.constexpr,
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
        share = tl.load(freq_ptr + target * E + x, mask=x < E, other=0)
        share = tl.minimum(share - (share >> FREQ_SHIFT) + wanted.to(tl.int32) * (FREQ_ONE >> FREQ_SHIFT), FREQ_ONE)
        tl.store(freq_ptr + target * E + x, share, mask=x < E)
        tl.store(ran_ptr + target, clock)
        tl.store(current_ptr, target)
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
        if POLICY == 0:  # LRU
            key = stamp + 1
        else:  # NEXT_USE: the farthest expected next use first (see _policy_key_reference)
            used = owner >= 0
            o = tl.maximum(owner, 0)
            layer = o // E
            delta = (layer - tl.load(current_ptr) - 1 + L) % L + 1
            needed = stamp > tl.load(ran_ptr + layer, mask=used, other=0)
            # (not `share`: a name the demand step above binds to an [X_PAD] int32 tensor, which the
            # GPU compiler would have to merge with this [S_PAD] int64 one)
            slot_share = tl.load(freq_ptr + o, mask=used, other=FREQ_ONE).to(tl.int64)
            slot_share = tl.minimum(tl.maximum(slot_share, FREQ_MIN), FREQ_ONE)
            unneeded = (L * (FREQ_ONE - slot_share) * SCORE_UNIT) // slot_share
            key = SCORE_CAP - (delta * SCORE_UNIT + tl.where(needed, 0, unneeded)).to(tl.int64)
        key = tl.where(owner < 0, 0, key)  # free slots first
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
                                     state.num_experts, state.num_slots, target, mode, budget, state.policy)


@torch.library.custom_op("prophet::residency_step",
                         mutates_args=("pt", "owner", "stamp", "unread", "excl", "clock", "budget", "counters",
                                       "freq", "ran", "current", "fills", "fill_count"))
def _residency_step_op(pt: torch.Tensor, owner: torch.Tensor, stamp: torch.Tensor, unread: torch.Tensor,
                       excl: torch.Tensor, clock: torch.Tensor, budget: torch.Tensor, counters: torch.Tensor,
                       freq: torch.Tensor, ran: torch.Tensor, current: torch.Tensor,
                       cand: torch.Tensor, fills: torch.Tensor, fill_count: torch.Tensor, num_layers: int,
                       num_experts: int, num_slots: int, target: int, step_mode: int, budget_init: int,
                       policy: int) -> None:
    # (not "mode": torch's functionalization passes a keyword of that name through custom ops)
    from . import use_triton

    state = ResidencyState(pt, owner, stamp, unread, excl, clock, budget, counters, freq, ran, current, num_layers,
                           num_experts, num_slots, policy)
    if not use_triton(cand.device):
        return residency_step_reference(state, target, cand, step_mode, fills, fill_count, budget_init)
    _launch_residency(state, target, cand, step_mode, fills, fill_count, budget_init)


@_residency_step_op.register_fake
def _(pt, owner, stamp, unread, excl, clock, budget, counters, freq, ran, current, cand, fills, fill_count,
      num_layers, num_experts, num_slots, target, step_mode, budget_init, policy):
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
        state.counters, state.freq, state.ran, state.current, order, fills, fill_count,
        N, state.num_layers, state.num_experts, S, target, budget,
        FREQ_ONE=FREQ_ONE, FREQ_SHIFT=FREQ_SHIFT, FREQ_MIN=FREQ_MIN, SCORE_UNIT=SCORE_UNIT, SCORE_CAP=_SCORE_CAP,
        MODE=mode, POLICY=state.policy, X_PAD=x_pad, S_PAD=S_PAD, CHUNK=min(_CHUNK, max(16, triton.next_power_of_2(max(N, 1)))),
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


class ReadThrough(NamedTuple):
    """A read-through fill (device mode's ``fill="read-through"``): the experts listed in ``fills``
    (the demand step's (expert, slot) rows, ``fill_count`` of them) are not copied before the
    experts' GEMMs; the decode path's kernels read them from the source (the host store's layer,
    pinned memory read over PCIe on a GPU) and write them into their slots as they go: one pass
    over PCIe, no copy launch. Source tensors are indexed by expert and have the slots' layout
    (every stride but the first the slots')."""

    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]
    w13_scale: torch.Tensor | None  # fp8: [E, ...] as the slots' scales
    w2_scale: torch.Tensor | None
    fills: torch.Tensor  # [F + 1, 2] int32
    fill_count: torch.Tensor  # [1] int32

    def fill_now(self, w13_slots, w2_slots, w13_scale=None, w2_scale=None, max_fills: int | None = None) -> None:
        """Copy the listed experts into their slots first, for the paths that only read slots (the
        grouped GEMMs, the PyTorch references): one ``fill_slots`` per matrix (two launches, four
        with fp8 scales, where "copy" makes one per expert block: only these paths pay it)."""
        pairs = [(self.w13, w13_slots), (self.w2, w2_slots), (self.w13_scale, w13_scale), (self.w2_scale, w2_scale)]
        for src, dst in pairs:
            if src is not None:
                fill_slots(_bytes(src.flatten(1)), _bytes(dst.flatten(1)), self.fills, self.fill_count, max_fills)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    # fp8 rows as uint8 (copied bytewise: no fp8 type needed on the GPU)
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
