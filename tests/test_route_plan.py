"""Route plan: exact invariants (permutation, offsets, sentinel padding, slots) on fresh random
routings, under the Triton interpreter; plus exact equality with the PyTorch reference."""

import pytest
import torch

from prophet_kernels import route_plan, route_plan_reference
from prophet_kernels.kernels.route_plan import padded_rows

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # interpreter on the CPU, compiled on a GPU
FIELDS = ("counts", "offsets", "padded_offsets", "sorted_ids", "block_expert", "block_slot",
          "unique_experts", "miss_experts", "status")


def routing(T, E, k, gen, one_expert=None, experts_used=None):
    if one_expert is not None:  # all tokens to one expert (k must be 1)
        return torch.full((T, k), one_expert, dtype=torch.int32)
    pool = experts_used if experts_used is not None else torch.arange(E)
    rows = [pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(T)]
    return torch.stack(rows).to(torch.int32) if T else torch.empty((0, k), dtype=torch.int32)


def check_invariants(plan, ids, E, bm, pt, S):
    plan = type(plan)(*[getattr(plan, f).cpu() for f in FIELDS], num_experts=plan.num_experts,
                      num_token_slots=plan.num_token_slots, block_m=plan.block_m)
    flat = ids.reshape(-1).long()
    N = flat.numel()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(plan.counts.long(), counts)
    assert plan.offsets[0] == 0 and plan.offsets[-1] == N  # offsets sum to T*k
    assert torch.equal(plan.offsets[1:].long() - plan.offsets[:-1].long(), counts)
    runs = plan.padded_offsets.long()
    assert torch.all(runs % bm == 0)
    assert torch.equal(runs[1:] - runs[:-1], (counts + bm - 1) // bm * bm)
    srt = plan.sorted_ids.long()
    assert srt.numel() == padded_rows(N, E, bm)
    real = srt[srt != N]
    assert torch.equal(torch.sort(real).values, torch.arange(N))  # each token-slot exactly once
    for e in range(E):
        run = srt[runs[e]: runs[e + 1]]
        c = int(counts[e])
        assert torch.all(flat[run[:c]] == e)
        assert torch.all(run[:c][1:] > run[:c][:-1])  # stable: token-slot order kept
        assert torch.all(run[c:] == N)  # padding is the sentinel
    assert torch.all(srt[runs[E]:] == N)
    nb = int(runs[E]) // bm
    be = plan.block_expert.long()
    assert torch.equal(be[:nb], torch.repeat_interleave(torch.arange(E), (runs[1:] - runs[:-1]) // bm))
    assert torch.all(be[nb:] == -1)
    slot = pt.long() if pt is not None else torch.arange(E)
    bs = plan.block_slot.long()
    want = slot[be[:nb]]
    want = torch.where((want >= 0) & (want < S), want, -1)
    assert torch.equal(bs[:nb], want) and torch.all(bs[nb:] == -1)  # slots match the page table
    used = counts > 0
    nu = int(used.sum())
    assert torch.equal(plan.unique_experts[:nu].long(), torch.nonzero(used).flatten())
    assert torch.all(plan.unique_experts[nu:] == -1)
    miss = used & (slot < 0)
    nm = int(miss.sum())
    assert torch.equal(plan.miss_experts[:nm].long(), torch.nonzero(miss).flatten())
    assert plan.status.tolist() == [nu, nm, nb, 0, int((used & (slot >= S)).sum())]


CASES = [
    # (T, E, k, bm, note)
    (1, 1, 1, 16, "T=1, one expert"),
    (1, 5, 2, 16, "T=1"),
    (40, 13, 4, 16, "prime E"),
    (9, 7, 7, 16, "k == E"),
    (33, 11, 1, 32, "all tokens to one expert"),
    (17, 31, 2, 16, "most experts get no token"),
    (300, 7, 2, 16, "N=600 > 512: the three-kernel path"),
    (130, 64, 8, 64, "OLMoE-like k=8, multi-chunk, large block"),
]


@pytest.mark.parametrize("T,E,k,bm,note", CASES, ids=[c[-1] for c in CASES])
def test_route_plan_invariants(T, E, k, bm, note):
    gen = torch.Generator().manual_seed(T * 1000 + E)
    one = int(torch.randint(E, (1,), generator=gen)) if "one expert" in note else None
    used = torch.randperm(E, generator=gen)[: max(k, 3)] if "no token" in note else None
    ids = routing(T, E, k, gen, one_expert=one, experts_used=used)
    # page table: a random permutation into S = E + 2 slots, with a few experts not resident
    S = E + 2
    pt = torch.randperm(S, generator=gen)[:E].to(torch.int32)
    pt[torch.rand(E, generator=gen) < 0.3] = -1
    for table, s in ((None, E), (pt, S)):
        dt = table.to(DEV) if table is not None else None
        plan = route_plan(ids.to(DEV), E, bm, dt, num_slots=s if table is not None else None)
        check_invariants(plan, ids, E, bm, table, s)
        ref = route_plan_reference(ids.to(DEV), E, bm, dt, num_slots=s if table is not None else None)
        for f in FIELDS:
            assert torch.equal(getattr(plan, f), getattr(ref, f)), f


def test_bad_ids_and_missing_slots_are_reported():
    E = 6
    ids = torch.tensor([[0, 5], [6, 1], [-1, 2]], dtype=torch.int32, device=DEV)
    plan = route_plan(ids, E, 16)
    assert plan.status_dict()["num_bad_ids"] == 2
    assert int(plan.counts.sum()) == 4  # bad ids left out of the plan
    with pytest.raises(ValueError, match=r"2 expert id\(s\) outside \[0, 6\)"):
        plan.check()
    ok = torch.tensor([[0, 5], [3, 1]], dtype=torch.int32, device=DEV)
    pt = torch.tensor([2, -1, 0, 1, 4, 9], dtype=torch.int32, device=DEV)
    plan = route_plan(ok, E, 16, pt, num_slots=5)
    st = plan.status_dict()
    assert st["num_misses"] == 1 and st["num_bad_slots"] == 1
    assert plan.miss_experts[0] == 1
    with pytest.raises(ValueError, match=r"experts \[1\]"):
        plan.check(num_slots=5)


def test_argument_errors():
    ids = torch.zeros((2, 2), dtype=torch.int32)
    with pytest.raises(TypeError, match="int32 or int64"):
        route_plan(ids.float(), 4, 16)
    with pytest.raises(ValueError, match="block_m"):
        route_plan(ids, 4, 24)
    with pytest.raises(ValueError, match=r"page_table must have shape \[4\]"):
        route_plan(ids, 4, 16, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="page_table must be int32"):
        route_plan(ids, 4, 16, torch.zeros(4, dtype=torch.int64))


def test_int64_ids_and_empty_batch():
    ids = torch.tensor([[3, 1], [1, 0]], dtype=torch.int64, device=DEV)
    a, b = route_plan(ids, 4, 16), route_plan_reference(ids.int(), 4, 16)
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    empty = route_plan(torch.empty((0, 2), dtype=torch.int32, device=DEV), 4, 16)
    assert empty.status.tolist() == [0, 0, 0, 0, 0] and empty.offsets.tolist() == [0] * 5
