"""Route plan: batch deduplication of top-k routing (tokens grouped by unique expert).

Legend: T tokens, k experts per token, E experts, S slots in the expert buffer,
N = T*k token-slots (token-slot ``t*k + j`` is the j-th expert choice of token t),
BM = ``block_m`` rows per GEMM block, P = padded rows, NB = P / BM blocks (upper bound),
E_PAD = next power of two >= max(E, 16), C = number of chunks of ``CHUNK`` token-slots.

Pipeline (everything on the device, no host synchronisation)::

    topk_ids        [T, k]   int32   expert of each token-slot
    page_table      [E]      int32   slot of each expert, or -1 (not resident)
      -> per chunk c: histogram over experts          chunk_base [C, E_PAD] int32 (scratch)
      -> scan over chunks and experts:
         counts         [E]      int32   token-slots routed to each expert
         offsets        [E+1]    int32   CSR offsets of the unpadded runs (offsets[E] = N - bad ids)
         padded_offsets [E+1]    int32   CSR offsets, each run padded to a multiple of BM
         block_expert   [NB]     int32   expert of each BM-row block, -1 past the last used block
         block_slot     [NB]     int32   slot of that expert, -1 if unused / not resident / slot >= S
         unique_experts [E]      int32   experts with count > 0, ascending, then -1
         miss_experts   [E]      int32   unique experts whose slot is -1, ascending, then -1
         status         [5]      int32   (num_unique, num_misses, num_blocks, num_bad_ids, num_bad_slots)
      -> per chunk c: stable rank of each token-slot within its expert
         sorted_ids     [P]      int32   token-slot ids sorted by expert (stable), runs padded
                                         with the sentinel N

The order is deterministic (stable by token-slot), so results are reproducible bit for bit.
Small batches (C <= _FUSED_MAX_CHUNKS, all decode sizes) use one single-program launch;
larger ones use three launches (count, scan, scatter) sharing the same ``@triton.jit`` helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_CHUNK = 128  # token-slots per chunk: the stable-rank step compares CHUNK x CHUNK pairs
_FUSED_MAX_CHUNKS = 4  # up to 512 token-slots (OLMoE T <= 64) run as one launch
_BLOCK_B = 128  # blocks handled per step when writing block_expert / block_slot
_STATUS_FIELDS = ("num_unique", "num_misses", "num_blocks", "num_bad_ids", "num_bad_slots")


def _e_pad(num_experts: int) -> int:
    return max(16, triton.next_power_of_2(num_experts))


def padded_rows(num_token_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound P on the rows of the padded, expert-sorted layout (a multiple of block_m)."""
    n = num_token_slots
    worst = n + min(num_experts, n) * (block_m - 1)
    return triton.cdiv(worst, block_m) * block_m


@dataclass
class RoutePlan:
    """Device-side result of :func:`route_plan`. All tensors are int32 on the ids' device.

    Paged structure in FlashInfer terms: ``padded_offsets`` is the indptr of the expert-sorted
    rows and ``sorted_ids`` their indices (token-slots, sentinel ``num_token_slots`` for padding).
    """

    counts: torch.Tensor  # [E]
    offsets: torch.Tensor  # [E+1]
    padded_offsets: torch.Tensor  # [E+1]
    sorted_ids: torch.Tensor  # [P]
    block_expert: torch.Tensor  # [NB]
    block_slot: torch.Tensor  # [NB]
    unique_experts: torch.Tensor  # [E]
    miss_experts: torch.Tensor  # [E]
    status: torch.Tensor  # [5]
    num_experts: int
    num_token_slots: int  # N = T*k, also the padding sentinel
    block_m: int

    @property
    def sentinel(self) -> int:
        return self.num_token_slots

    @property
    def num_unique(self) -> torch.Tensor:
        """Number of unique experts, as a 0-d device tensor (no host sync)."""
        return self.status[0]

    @property
    def num_misses(self) -> torch.Tensor:
        return self.status[1]

    def status_dict(self) -> dict:
        # Host synchronisation: reads five counters back; only called to check or report.
        return dict(zip(_STATUS_FIELDS, self.status.tolist()))

    def check(self, num_slots: int | None = None, page_table: torch.Tensor | None = None) -> None:
        """Raise ValueError if the routing held an invalid expert id or a routed expert whose
        slot is not in [0, num_slots), or if ``page_table`` gives two experts one slot. One
        explicit host synchronisation (the status and the shared-slot count read together)."""
        status = self.status
        if page_table is not None:
            status = torch.cat([status, _shared_slot_count(page_table).view(1)])
        values = status.tolist()
        st = dict(zip(_STATUS_FIELDS, values))
        if st["num_bad_ids"]:
            raise ValueError(
                f"topk_ids holds {st['num_bad_ids']} expert id(s) outside [0, {self.num_experts})"
            )
        if st["num_bad_slots"] or st["num_misses"]:
            missing = self.miss_experts[: st["num_misses"]].tolist()
            where = f"[0, {num_slots})" if num_slots is not None else "the buffer"
            raise ValueError(
                f"{st['num_misses'] + st['num_bad_slots']} routed expert(s) have no slot in {where}: "
                f"{st['num_misses']} with page_table slot -1 (experts {missing}), "
                f"{st['num_bad_slots']} with a slot >= num_slots"
            )
        if page_table is not None and values[-1]:
            raise_shared_slots(page_table)


def _shared_slot_count(page_table: torch.Tensor) -> torch.Tensor:
    """Number of experts whose slot (>= 0) an earlier expert of the sorted table also holds (device, no sync)."""
    s = torch.sort(page_table.reshape(-1)).values
    return ((s[1:] == s[:-1]) & (s[1:] >= 0)).sum().to(torch.int32)


def raise_shared_slots(page_table: torch.Tensor) -> None:
    """Raise ValueError naming the experts if ``page_table`` [E] gives one slot (>= 0) to several
    experts (each slot holds one expert: a kernel would read one expert's weights for another)."""
    pt = page_table.reshape(-1).long()
    slots, counts = torch.unique(pt[pt >= 0], return_counts=True)
    shared = slots[counts > 1].tolist()
    if shared:
        s = shared[0]
        experts = torch.nonzero(pt == s).flatten().tolist()
        raise ValueError(f"page_table gives slot {s} to experts {experts} (each slot holds one expert); "
                         f"{len(shared)} slot(s) shared in all")


def narrow_ids(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``topk_ids`` as int32, same shape. An int64 id outside [0, E) becomes -1 first (on the device,
    no sync), so that narrowing cannot turn it into a valid one (2**32 + 1 would become expert 1)."""
    if topk_ids.dtype == torch.int64:
        topk_ids = torch.where((topk_ids >= 0) & (topk_ids < num_experts), topk_ids, -1)
    return topk_ids.to(torch.int32)


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _load_chunk(ids_ptr, c, N, E, CHUNK: tl.constexpr):
    offs = c * CHUNK + tl.arange(0, CHUNK)
    valid = offs < N
    e = tl.load(ids_ptr + offs, mask=valid, other=-1)
    good = valid & (e >= 0) & (e < E)
    return offs, e, good


@triton.jit
def _chunk_hist(e, good, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    # Invalid lanes are counted in bin 0 and taken out again (histogram has no mask on triton 3.6).
    hist = tl.histogram(tl.where(good, e, 0), E_PAD)
    n_bad = CHUNK - tl.sum(good.to(tl.int32), axis=0)
    return hist - tl.where(tl.arange(0, E_PAD) == 0, n_bad, 0)


@triton.jit
def _fill(ptr, start, end, value, BLOCK: tl.constexpr):
    for s in range(start, end, BLOCK):
        offs = s + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.zeros([BLOCK], tl.int32) + value, mask=offs < end)


@triton.jit
def _compact(ptr, keep, e, E, num_kept):
    # Write experts with keep=1 in ascending order, then -1: position of expert e is its rank
    # among the kept (inclusive scan - 1), or num_kept + its rank among the dropped.
    incl = tl.cumsum(keep.to(tl.int32), axis=0)
    pos = tl.where(keep, incl - 1, num_kept + e - incl)
    tl.store(ptr + pos, tl.where(keep, e, -1), mask=e < E)


@triton.jit
def _plan_meta(
    counts,  # [E_PAD] int32 register tensor: token-slots per expert
    pt_ptr,  # (E,) int32 page table
    counts_ptr, offsets_ptr, poffs_ptr, block_expert_ptr, block_slot_ptr,
    unique_ptr, miss_ptr, status_ptr,
    N, E, S, NB,
    BM: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr, HAS_PT: tl.constexpr,
):
    e = tl.arange(0, E_PAD)
    in_e = e < E
    counts = tl.where(in_e, counts, 0)
    padded = (counts + BM - 1) // BM * BM
    incl = tl.cumsum(counts, axis=0)
    pincl = tl.cumsum(padded, axis=0)
    tl.store(counts_ptr + e, counts, mask=in_e)
    tl.store(offsets_ptr + 1 + e, incl, mask=in_e)
    tl.store(poffs_ptr + 1 + e, pincl, mask=in_e)
    zero = tl.zeros([1], tl.int32)
    tl.store(offsets_ptr + tl.arange(0, 1), zero)
    tl.store(poffs_ptr + tl.arange(0, 1), zero)

    if HAS_PT:
        slot = tl.load(pt_ptr + e, mask=in_e, other=-1)
    else:
        slot = e
    used = counts > 0
    miss = used & (slot < 0)
    bad_slot = used & (slot >= S)
    num_unique = tl.sum(used.to(tl.int32), axis=0)
    num_miss = tl.sum(miss.to(tl.int32), axis=0)
    _compact(unique_ptr, used, e, E, num_unique)
    _compact(miss_ptr, miss, e, E, num_miss)

    num_blocks = tl.sum(padded, axis=0) // BM
    sf = tl.arange(0, 8)
    st = tl.where(sf == 0, num_unique, 0)
    st = tl.where(sf == 1, num_miss, st)
    st = tl.where(sf == 2, num_blocks, st)
    st = tl.where(sf == 3, N - tl.sum(counts, axis=0), st)
    st = tl.where(sf == 4, tl.sum(bad_slot.to(tl.int32), axis=0), st)
    tl.store(status_ptr + sf, st, mask=sf < 5)

    # Block b covers rows [b*BM, (b+1)*BM): its expert is the number of runs ending at or before
    # its first row. Blocks past the last used one get -1. The run ends are re-read from
    # padded_offsets (written above by other threads: hence the barrier) instead of broadcasting
    # the register tensor: on triton 3.6 / H100 that broadcast gave wrong lanes (seen 2026-11-22).
    tl.debug_barrier()
    ends = tl.load(poffs_ptr + 1 + e, mask=in_e, other=2147483647)
    for b0 in range(0, NB, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        row = b * BM
        be = tl.sum((ends[None, :] <= row[:, None]).to(tl.int32), axis=1)
        live = be < E
        if HAS_PT:
            bs = tl.load(pt_ptr + be, mask=live & (b < NB), other=-1)
        else:
            bs = be
        bs = tl.where(live & (bs >= 0) & (bs < S), bs, -1)
        tl.store(block_expert_ptr + b, tl.where(live, be, -1), mask=b < NB)
        tl.store(block_slot_ptr + b, bs, mask=b < NB)


@triton.jit
def _chunk_scatter(ids_ptr, base_ptr, poffs_ptr, sorted_ptr, c, N, E,
                   CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    # Stable rank of each token-slot among the earlier ones of this chunk with the same expert.
    offs, e, good = _load_chunk(ids_ptr, c, N, E, CHUNK)
    i = tl.arange(0, CHUNK)
    same = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None]) & good[None, :]
    rank = tl.sum(same.to(tl.int32), axis=1)
    base = tl.load(base_ptr + c * E_PAD + e, mask=good, other=0)  # earlier chunks, same expert
    start = tl.load(poffs_ptr + e, mask=good, other=0)  # first padded row of the expert
    tl.store(sorted_ptr + start + base + rank, offs, mask=good)


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["N", "P", "NB", "C"])  # one compile for every batch size
def _route_plan_fused_kernel(
    ids_ptr,  # (N,) int32 flattened topk_ids
    pt_ptr,  # (E,) int32 page table (unused if not HAS_PT)
    base_ptr,  # (C, E_PAD) int32 scratch: per-chunk running counts
    counts_ptr, offsets_ptr, poffs_ptr, sorted_ptr, block_expert_ptr, block_slot_ptr,
    unique_ptr, miss_ptr, status_ptr,
    N, E, S, P, NB, C,
    BM: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr,
    HAS_PT: tl.constexpr,
):
    """Whole plan in one program. grid = (1,)."""
    _fill(sorted_ptr, 0, P, N, 1024)
    running = tl.zeros([E_PAD], tl.int32)
    for c in range(0, C):
        _, e, good = _load_chunk(ids_ptr, c, N, E, CHUNK)
        tl.store(base_ptr + c * E_PAD + tl.arange(0, E_PAD), running)
        running += _chunk_hist(e, good, CHUNK, E_PAD)
    _plan_meta(running, pt_ptr, counts_ptr, offsets_ptr, poffs_ptr, block_expert_ptr,
               block_slot_ptr, unique_ptr, miss_ptr, status_ptr, N, E, S, NB,
               BM, E_PAD, BLOCK_B, HAS_PT)
    # The scatter below reads padded_offsets / scratch written above by other threads of this
    # program, and overwrites sentinel fills: a block-wide barrier orders them.
    tl.debug_barrier()
    for c in range(0, C):
        _chunk_scatter(ids_ptr, base_ptr, poffs_ptr, sorted_ptr, c, N, E, CHUNK, E_PAD)


@triton.jit(do_not_specialize=["N", "P", "FILL_PER_PROGRAM"])
def _route_count_kernel(
    ids_ptr,  # (N,) int32
    hist_ptr,  # (C, E_PAD) int32 out: per-chunk histogram
    sorted_ptr,  # (P,) int32 out: filled with the sentinel N (the scatter overwrites used rows)
    N, E, P, FILL_PER_PROGRAM,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr, FILL_BLOCK: tl.constexpr,
):
    """grid = (C,)."""
    c = tl.program_id(0)
    _, e, good = _load_chunk(ids_ptr, c, N, E, CHUNK)
    tl.store(hist_ptr + c * E_PAD + tl.arange(0, E_PAD), _chunk_hist(e, good, CHUNK, E_PAD))
    start = c * FILL_PER_PROGRAM
    _fill(sorted_ptr, start, tl.minimum(start + FILL_PER_PROGRAM, P), N, FILL_BLOCK)


@triton.jit(do_not_specialize=["N", "NB", "C"])
def _route_scan_kernel(
    pt_ptr,  # (E,) int32
    base_ptr,  # (C, E_PAD) int32 in: per-chunk histogram; out: exclusive scan over chunks
    counts_ptr, offsets_ptr, poffs_ptr, block_expert_ptr, block_slot_ptr,
    unique_ptr, miss_ptr, status_ptr,
    N, E, S, NB, C,
    BM: tl.constexpr, E_PAD: tl.constexpr, BLOCK_B: tl.constexpr, HAS_PT: tl.constexpr,
):
    """grid = (1,)."""
    running = tl.zeros([E_PAD], tl.int32)
    cols = tl.arange(0, E_PAD)
    for c in range(0, C):
        h = tl.load(base_ptr + c * E_PAD + cols)
        tl.store(base_ptr + c * E_PAD + cols, running)
        running += h
    _plan_meta(running, pt_ptr, counts_ptr, offsets_ptr, poffs_ptr, block_expert_ptr,
               block_slot_ptr, unique_ptr, miss_ptr, status_ptr, N, E, S, NB,
               BM, E_PAD, BLOCK_B, HAS_PT)


@triton.jit(do_not_specialize=["N"])
def _route_scatter_kernel(ids_ptr, base_ptr, poffs_ptr, sorted_ptr, N, E,
                          CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """grid = (C,)."""
    _chunk_scatter(ids_ptr, base_ptr, poffs_ptr, sorted_ptr, tl.program_id(0), N, E, CHUNK, E_PAD)


# ----------------------------------------------------------------------------- launchers


def _alloc(E: int, P: int, NB: int, device, num_experts: int, N: int, block_m: int):
    sizes = [E, E + 1, E + 1, P, NB, NB, E, E, 5]
    buf = torch.empty(sum(sizes), dtype=torch.int32, device=device)
    parts = torch.split(buf, sizes)
    return RoutePlan(*parts, num_experts=num_experts, num_token_slots=N, block_m=block_m)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_args(topk_ids: torch.Tensor, num_experts: int, block_m: int, page_table):
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be a 2-D tensor [T, k], got {getattr(topk_ids, 'shape', type(topk_ids))}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not _is_int(num_experts) or num_experts < 1:
        raise ValueError(f"num_experts must be a whole number >= 1, got {num_experts!r}")
    if not _is_int(block_m) or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m!r}")
    if topk_ids.shape[1] < 1 and topk_ids.shape[0] > 0:
        raise ValueError("topk_ids has k = 0 experts per token")
    if page_table is not None:
        if not isinstance(page_table, torch.Tensor):
            raise TypeError(f"page_table must be an int32 tensor [E], got {type(page_table).__name__}")
        if page_table.dim() != 1 or page_table.shape[0] != num_experts:
            raise ValueError(f"page_table must have shape [{num_experts}], got {list(page_table.shape)}")
        if page_table.dtype != torch.int32:
            raise TypeError(f"page_table must be int32, got {page_table.dtype}")
        if page_table.device != topk_ids.device:
            raise ValueError(f"page_table is on {page_table.device}, topk_ids on {topk_ids.device}")


def route_plan(topk_ids: torch.Tensor, num_experts: int, block_m: int,
               page_table: torch.Tensor | None = None, *, num_slots: int | None = None) -> RoutePlan:
    """Group token-slots by expert, padded to ``block_m``; no host synchronisation.

    Parameters
    ----------
    topk_ids : ``[T, k]`` int32 (int64 is converted)
        Expert of each token-slot.
    num_experts : int
        E. Ids outside ``[0, E)`` are counted in ``status[3]`` and left out of the plan.
    block_m : int
        Rows per GEMM block (power of two >= 16).
    page_table : ``[E]`` int32, optional
        Slot of each expert or -1. Without it, expert e lives in slot e.
    num_slots : int, optional
        S; routed experts with a slot >= S are counted in ``status[4]``. Defaults to E without a
        page table and to no limit with one.
    """
    _check_args(topk_ids, num_experts, block_m, page_table)
    from . import use_triton

    if not use_triton(topk_ids.device):
        return route_plan_reference(topk_ids, num_experts, block_m, page_table, num_slots=num_slots)
    ids = narrow_ids(topk_ids, num_experts).reshape(-1).contiguous()
    page_table = page_table.contiguous() if page_table is not None else None  # indexed without a stride
    N = ids.numel()
    E = num_experts
    E_PAD = _e_pad(E)
    P = padded_rows(N, E, block_m)
    NB = P // block_m
    S = num_slots if num_slots is not None else (2**31 - 1 if page_table is not None else E)
    plan = _alloc(E, P, NB, ids.device, E, N, block_m)
    has_pt = page_table is not None
    pt = page_table if has_pt else ids  # dummy pointer when unused
    C = triton.cdiv(max(N, 1), _CHUNK)
    if C <= _FUSED_MAX_CHUNKS:
        chunk = min(_CHUNK, max(16, triton.next_power_of_2(max(N, 1))))
        C = triton.cdiv(max(N, 1), chunk)
        scratch = torch.empty((C, E_PAD), dtype=torch.int32, device=ids.device)
        _route_plan_fused_kernel[(1,)](
            ids, pt, scratch, plan.counts, plan.offsets, plan.padded_offsets, plan.sorted_ids,
            plan.block_expert, plan.block_slot, plan.unique_experts, plan.miss_experts, plan.status,
            N, E, S, P, NB, C,
            BM=block_m, E_PAD=E_PAD, CHUNK=chunk, BLOCK_B=_BLOCK_B, HAS_PT=has_pt, num_warps=4,
        )
        return plan
    scratch = torch.empty((C, E_PAD), dtype=torch.int32, device=ids.device)
    fill = triton.cdiv(P, C)
    _route_count_kernel[(C,)](ids, scratch, plan.sorted_ids, N, E, P, fill, CHUNK=_CHUNK,
                              E_PAD=E_PAD, FILL_BLOCK=min(1024, triton.next_power_of_2(fill)),
                              num_warps=4)
    _route_scan_kernel[(1,)](
        pt, scratch, plan.counts, plan.offsets, plan.padded_offsets, plan.block_expert,
        plan.block_slot, plan.unique_experts, plan.miss_experts, plan.status,
        N, E, S, NB, C, BM=block_m, E_PAD=E_PAD, BLOCK_B=_BLOCK_B, HAS_PT=has_pt, num_warps=4,
    )
    _route_scatter_kernel[(C,)](ids, scratch, plan.padded_offsets, plan.sorted_ids, N, E,
                                CHUNK=_CHUNK, E_PAD=E_PAD, num_warps=8)
    return plan


def route_plan_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                         page_table: torch.Tensor | None = None, *,
                         num_slots: int | None = None) -> RoutePlan:
    """Plain PyTorch route plan with the same outputs as :func:`route_plan` (stable sort)."""
    _check_args(topk_ids, num_experts, block_m, page_table)
    dev = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    N, E, bm = ids.numel(), num_experts, block_m
    P = padded_rows(N, E, bm)
    NB = P // bm
    plan = _alloc(E, P, NB, dev, E, N, bm)
    good = (ids >= 0) & (ids < E)
    counts = torch.bincount(ids[good], minlength=E)
    padded = (counts + bm - 1) // bm * bm
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    offsets = torch.cat([zero, counts.cumsum(0)])
    poffs = torch.cat([zero, padded.cumsum(0)])
    slot = page_table.to(torch.int64) if page_table is not None else torch.arange(E, device=dev)
    S = num_slots if num_slots is not None else (2**31 - 1 if page_table is not None else E)
    used = counts > 0
    miss = used & (slot < 0)
    bad_slot = used & (slot >= S)

    sorted_ids = torch.full((P,), N, dtype=torch.int64, device=dev)
    slot_ids = torch.arange(N, device=dev)[good]
    e_good = ids[good]
    order = torch.sort(e_good, stable=True).indices
    e_sorted = e_good[order]
    rank = torch.arange(e_sorted.numel(), device=dev) - offsets[e_sorted]
    sorted_ids[poffs[e_sorted] + rank] = slot_ids[order]

    num_blocks = int(padded.sum()) // bm
    be = torch.full((NB,), -1, dtype=torch.int64, device=dev)
    rows = torch.arange(num_blocks, device=dev) * bm
    be[:num_blocks] = torch.searchsorted(poffs[1:], rows, right=True)
    bs = torch.full((NB,), -1, dtype=torch.int64, device=dev)
    live = be >= 0
    s_live = slot[be[live]]
    bs[live] = torch.where((s_live >= 0) & (s_live < S), s_live, -1)

    ar = torch.arange(E, device=dev)
    unique = torch.cat([ar[used], torch.full((E - int(used.sum()),), -1, device=dev)])
    misses = torch.cat([ar[miss], torch.full((E - int(miss.sum()),), -1, device=dev)])
    status = torch.tensor([int(used.sum()), int(miss.sum()), num_blocks, int((~good).sum()),
                           int(bad_slot.sum())], device=dev)
    for dst, src in ((plan.counts, counts), (plan.offsets, offsets), (plan.padded_offsets, poffs),
                     (plan.sorted_ids, sorted_ids), (plan.block_expert, be), (plan.block_slot, bs),
                     (plan.unique_experts, unique), (plan.miss_experts, misses), (plan.status, status)):
        dst.copy_(src)
    return plan
