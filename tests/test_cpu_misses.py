"""miss: cpu (issue 42): the CPU experts backends against an independent PyTorch reference, the
MissCost split, the residency decision, ProphetMoE's hybrid layer call (the GPU's part through the
page table, the CPU's from the host store, added) and its refusals. vLLM engines: test_vllm_plugin.py."""

import gc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prophet_kernels import HostExpertStore, ProphetMoE
from prophet_kernels.cpu import CpuExperts, native, pairs_of
from prophet_kernels.kernels.moe import fused_experts_reference
from prophet_kernels.memory.buffer import SlotTable
from prophet_kernels.memory.residency import ExpertResidency, MissCost

pytestmark = pytest.mark.usefixtures("torch_path")  # ProphetMoE's GPU part on the CPU: the PyTorch path

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative to the output's scale


def _routing(g, T, E, k):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    return ids, torch.rand(T, k, generator=g)


def _store(g, L, E, H, I, dtype=torch.float32):
    w13 = (torch.randn(L, E, 2 * I, H, generator=g) * 0.2).to(dtype)
    w2 = (torch.randn(L, E, H, I, generator=g) * 0.2).to(dtype)
    return HostExpertStore.from_tensors(w13, w2, pin=False), w13, w2


def _reference_cpu_part(x, w13, w2, ids, weights, cpu_experts):
    """fp32 reference of the token-slots routed to ``cpu_experts`` only (the others contribute zero)."""
    kept = torch.where(torch.isin(ids, torch.tensor(cpu_experts, dtype=ids.dtype)), ids, -1)
    return fused_experts_reference(x.float(), w13.float(), w2.float(), weights, kept, check=False)


def _close(got, want, dtype):
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=TOL[dtype] * scale)


# ------------------------------------------------------------------------------ the backends

@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, I, T, E, k", [
    (77, 45, 1, 8, 2),  # T=1 (decode), H and I odd: every dot product has a masked tail
    (64, 32, 9, 6, 6),  # k == E: every token on every expert; 9 tokens cross the 4-token tiles
    (33, 17, 13, 5, 3),  # prime E, tiny dims under one 16/32-wide vector
    (160, 96, 5, 16, 1),  # k = 1
])
def test_cpu_experts_equal_the_reference(backend, dtype, H, I, T, E, k):
    g = torch.Generator().manual_seed(H * 1000 + T)
    store, w13, w2 = _store(g, 2, E, H, I, dtype)
    token_index, cpu_experts, ids = _layer_1_against_the_reference(store, w13, w2, g, T, k, dtype, backend)
    assert sorted(set(token_index.tolist())) == sorted({t for t in range(T) if any(e in cpu_experts for e in ids[t].tolist())})


def _layer_1_against_the_reference(store, w13, w2, g, T, k, dtype, backend, also_fp32=False):
    """Layer 1's CPU part of a random routing (every other expert it uses on the CPU), x in ``dtype``,
    against the fp32 reference on ``w13``/``w2``; ``also_fp32``: the same call again with fp32 x.
    Returns (token_index, the CPU experts, ids)."""
    E, H = w13.shape[1], w13.shape[3]
    x = torch.randn(T, H, generator=g).to(dtype)
    ids, weights = _routing(g, T, E, k)
    used = sorted(set(ids.flatten().tolist()))
    cpu_experts = used[::2] or used
    token_index, offsets, rows, pair_w = pairs_of(ids.numpy(), weights.numpy(), cpu_experts)
    index = torch.from_numpy(token_index)
    cpu = CpuExperts(store, 2, backend)
    try:
        runs = [(x, dtype)] + ([(x.float(), torch.float32)] if also_fp32 else [])
        for xx, tol in runs:
            full = torch.zeros(T, H)
            full[index] = cpu(1, xx[index].contiguous(), cpu_experts, offsets, rows, pair_w)
            _close(full, _reference_cpu_part(xx, w13[1], w2[1], ids, weights, cpu_experts), tol)
    finally:
        cpu.close()
    return token_index, cpu_experts, ids


def _int4_store(g, L, E, H, I, group, zero_points):
    """An int4 store (codes, fp32 group scales, zero points or none) and its experts dequantized, fp32."""
    from prophet_kernels.kernels.int4 import dequantize_int4, quantize_int4
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import allocate_experts

    fmt = WeightFormat("int4", group_size=group, zero_points=zero_points)
    layers, w13s, w2s = [], [], []
    for _ in range(L):
        ex = allocate_experts(E, H, I, torch.uint8, fmt=fmt)
        for which, w in ((0, torch.randn(E, 2 * I, H, generator=g) * 0.2), (1, torch.randn(E, H, I, generator=g) * 0.2)):
            q, sc, z = quantize_int4(w, group, zero_points)
            ex[which].copy_(q)
            ex.quant.of(which)[0].copy_(sc)
            if zero_points:
                ex.quant.of(which)[1].copy_(z)
        layers.append(ex)
        w13s.append(dequantize_int4(ex.w13, ex.w13_scale, ex.w13_zeros))
        w2s.append(dequantize_int4(ex.w2, ex.w2_scale, ex.w2_zeros))
    return HostExpertStore.from_experts(layers), torch.stack(w13s), torch.stack(w2s)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H, I, T, E, k, group, zp", [
    (64, 32, 1, 8, 2, 32, False),  # decode, one group per w2 row
    (128, 96, 9, 6, 6, 32, True),  # 9 tokens cross the 4-token tiles; three groups along I
    (256, 128, 5, 16, 1, 128, True),  # k = 1, groups of 128
    (192, 64, 3, 5, 3, 64, False),
])
def test_int4_cpu_experts_equal_the_dequantized_reference(backend, dtype, H, I, T, E, k, group, zp):
    """Issue 44: the CPU backends read the store's int4 rows as they are (the one host copy serves the
    link and the CPU), x in the model's dtype: equal to the fp32 reference on the dequantized experts
    (activations rounded to the dtype between the two matmuls, as on the float path)."""
    g = torch.Generator().manual_seed(H * 1000 + T)
    store, w13, w2 = _int4_store(g, 2, E, H, I, group, zp)
    # native: the same store again with fp32 x (x's dtype is the call's)
    _layer_1_against_the_reference(store, w13, w2, g, T, k, dtype, backend, also_fp32=backend == "native")


def test_int4_cpu_experts_refusals():
    g = torch.Generator().manual_seed(3)
    store = _int4_store(g, 1, 4, 64, 32, 32, True)[0]
    cpu = CpuExperts(store, 1)
    try:
        offsets, rows, w = np.array([0, 1], np.int64), np.zeros(1, np.int32), np.ones(1, np.float32)
        with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
            cpu.submit(0, torch.zeros(1, 64, dtype=torch.float64), [0], offsets, rows, w)
        assert not cpu.busy
        y = cpu(0, torch.zeros(1, 64), [0], offsets, rows, w)  # still usable after the refusal
        assert torch.equal(y, torch.zeros(1, 64))
    finally:
        cpu.close()


def test_pairs_of_invariants():
    """Pairs grouped by expert in the given order, each (token, expert) of the CPU experts once, rows
    index the gathered tokens, weights carried along (exact)."""
    rng = np.random.default_rng(0)
    T, E, k = 11, 9, 3
    ids = np.stack([rng.permutation(E)[:k] for _ in range(T)])
    ids[2, 1] = -1  # another rank's expert (expert parallelism)
    w = rng.random((T, k)).astype(np.float32)
    cpu = [1, 4, 7]
    token_index, offsets, rows, pw = pairs_of(ids, w, cpu)
    assert offsets[0] == 0 and offsets[-1] == len(rows) == len(pw) and np.all(np.diff(offsets) >= 0)
    got = sorted((int(token_index[rows[p]]), cpu[j], float(pw[p])) for j in range(len(cpu))
                 for p in range(offsets[j], offsets[j + 1]))
    want = sorted((t, int(ids[t, j]), float(w[t, j])) for t in range(T) for j in range(k) if ids[t, j] in cpu)
    assert got == want
    assert np.all(np.diff(token_index) > 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(H=st.integers(1, 96), I=st.integers(1, 70), T=st.integers(1, 12), E=st.integers(1, 9), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), threads=st.integers(1, 2))
def test_native_backend_any_shape(H, I, T, E, data, dtype, threads):
    """Hypothesis over shapes that cross every tile and vector edge (1..96 x 1..70, 1..12 tokens):
    the native backend equals the reference."""
    k = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    store, w13, w2 = _store(g, 1, E, H, I, dtype)
    x = torch.randn(T, H, generator=g).to(dtype)
    ids, weights = _routing(g, T, E, k)
    cpu_experts = data.draw(st.lists(st.sampled_from(sorted(set(ids.flatten().tolist()))), min_size=1, unique=True))
    cpu_experts.sort()
    token_index, offsets, rows, pair_w = pairs_of(ids.numpy(), weights.numpy(), cpu_experts)
    cpu = CpuExperts(store, threads)
    try:
        y = cpu(0, x[torch.from_numpy(token_index)].contiguous(), cpu_experts, offsets, rows, pair_w)
    finally:
        cpu.close()
    full = torch.zeros(T, H)
    full[torch.from_numpy(token_index)] = y
    _close(full, _reference_cpu_part(x, w13[0], w2[0], ids, weights, cpu_experts), dtype)


def test_bad_calls_are_refused_and_change_nothing():
    g = torch.Generator().manual_seed(0)
    store, w13, w2 = _store(g, 2, 4, 32, 16)
    cpu = CpuExperts(store, 1)
    x = torch.randn(3, 32, generator=g)
    ok = (np.array([0, 3], np.int64), np.array([0, 1, 2], np.int32), np.ones(3, np.float32))
    bad = [
        (dict(layer=2), "layer 2 outside"),
        (dict(x=x.double()), "contiguous host tensor"),
        (dict(x=x.t().contiguous().t()), "contiguous host tensor"),
        (dict(x=x[:, :16].contiguous()), r"\[n, 32\]"),
        (dict(experts=[4]), r"expert ids must be in \[0, 4\)"),
        (dict(experts=[-1]), r"expert ids must be in \[0, 4\)"),
        (dict(offsets=np.array([0, 2], np.int64)), "offsets must rise from 0 to the 3 pairs"),
        (dict(offsets=np.array([0, 3, 3], np.int64)), "offsets must rise"),
        (dict(rows=np.array([0, 1, 3], np.int32)), "pair rows must index x's 3 rows"),
        (dict(weights=np.ones(2, np.float32)), "weights have one per pair"),
    ]
    for change, match in bad:
        args = dict(layer=1, x=x, experts=[2], offsets=ok[0], rows=ok[1], weights=ok[2]) | change
        with pytest.raises(ValueError, match=match):
            cpu.submit(**args)
        assert not cpu.busy
    y = cpu(1, x, [2], *ok)  # still usable, and right
    ids = torch.full((3, 1), 2, dtype=torch.int32)
    _close(y, _reference_cpu_part(x, w13[1], w2[1], ids, torch.ones(3, 1), [2]), torch.float32)
    cpu.submit(1, x, [2], *ok)
    with pytest.raises(RuntimeError, match="pending: join"):
        cpu.submit(1, x, [2], *ok)
    cpu.join()
    with pytest.raises(RuntimeError, match="no CPU experts call is pending"):
        cpu.join()
    cpu.close()


def test_inputs_live_until_joined():
    """The pool reads the call's tensors after submit returns: they are held until join, so a caller
    that drops its references (and a collection) cannot free them under the pool."""
    g = torch.Generator().manual_seed(1)
    store, w13, w2 = _store(g, 1, 4, 256, 128)
    cpu = CpuExperts(store, 2)
    x = torch.randn(16, 256, generator=g)
    ids = torch.full((16, 1), 3, dtype=torch.int32)
    want = _reference_cpu_part(x, w13[0], w2[0], ids, torch.ones(16, 1), [3])
    cpu.submit(0, x.clone(), [3], np.array([0, 16], np.int64), np.arange(16, dtype=np.int32), np.ones(16, np.float32))
    gc.collect()
    junk = [torch.full((16, 256), float("nan")) for _ in range(64)]  # reuse of freed memory, if any were freed
    y, seconds = cpu.join()
    assert seconds > 0 and len(junk) == 64
    _close(y, want, torch.float32)
    cpu.close()


@pytest.mark.parametrize("threads, match", [(0, r"cpu_threads=0: give a whole number in \[1, "),
                                            (10_000, r"cpu_threads=10000"), (1.5, r"cpu_threads=1.5")])
def test_thread_counts_the_machine_cannot_run_are_refused(threads, match):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=match):
        CpuExperts(_store(g, 1, 2, 8, 4)[0], threads)


def test_fp8_store_and_unknown_backend_are_refused():
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 16, 4, generator=g)
    fp8 = HostExpertStore.from_tensors(w13, w2, pin=False, expert_dtype="fp8")
    with pytest.raises(ValueError, match="fp8 experts on the CPU: not yet"):
        CpuExperts(fp8, 1)
    with pytest.raises(ValueError, match="cpu backend 'avx'"):
        CpuExperts(HostExpertStore.from_tensors(w13, w2, pin=False), 1, "avx")


def test_native_build_is_cached_and_a_failed_build_names_the_compiler(tmp_path, monkeypatch):
    assert native.is_available() and native.lib().prophet_cpu_abi_version() == native.ABI_VERSION
    assert "avx512f" in native.isa() or native.isa() == [] or "f16c" in native.isa()
    monkeypatch.setenv("PROPHET_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    with pytest.raises(native.NativeBuildError, match="compiling cpu_experts.cpp with false failed"):
        native.build()
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises((native.NativeBuildError, FileNotFoundError)):
        native.build()


def test_rates_are_measured_once_and_shared(tmp_path, monkeypatch):
    """Ranks on one node read the rates the first of them measured (the cache file); the numbers are
    positive and the link's was measured into a slot."""
    from prophet_kernels.cpu import rates

    monkeypatch.setenv("PROPHET_CACHE_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    store = _store(g, 1, 4, 64, 32)[0]
    cpu = CpuExperts(store, 1)
    slot = torch.empty_like(store.blocks[0][0])
    first = rates.measure(cpu, slot)
    second = rates.measure(cpu, slot)
    assert first.source == "measured" and second.source.startswith("measured earlier")
    assert (first.cpu_gbps, first.cpu_gflops, first.link_gbps, first.dram_gbps, first.call_us) == \
        (second.cpu_gbps, second.cpu_gflops, second.link_gbps, second.dram_gbps, second.call_us)
    assert min(first.cpu_gbps, first.cpu_gflops, first.link_gbps, first.dram_gbps, first.call_us) > 0
    assert torch.equal(slot, store.blocks[0][0])  # the link was timed copying expert 0 into the slot
    cpu.close()


# ------------------------------------------------------------------------------ the split

COST = dict(expert_bytes=100_000_000, flops_per_token=6 * 4096 * 14336)  # a Mixtral-sized bf16 expert (rounded)


def test_split_decode_goes_to_the_cpu_and_a_prefill_chunk_is_copied():
    """A server (100 GB/s DRAM, 1 TFLOP/s) beside PCIe 4 (25 GB/s): a decode miss (1 token) is
    computed on the CPU; an expert with a chunk's 128 tokens is copied."""
    cost = MissCost(**COST, cpu_gbps=100, cpu_gflops=1000, link_gbps=25, dram_gbps=100)
    assert cost.split([1, 1]) == [False, False]
    assert cost.split([128, 1]) == [True, False]
    assert cost.cpu_seconds(1) == pytest.approx(1e-3) and cost.copy_seconds() == pytest.approx(4e-3)


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(1, 512), max_size=12),
       cpu_gbps=st.floats(1, 500), cpu_gflops=st.floats(1, 5000), link_gbps=st.floats(1, 64),
       call_us=st.floats(0, 500))
def test_split_properties(tokens, cpu_gbps, cpu_gflops, link_gbps, call_us):
    """The split never takes longer than all-CPU or all-copy; the copied misses are those with the
    most tokens (a copied expert never has fewer tokens than one left to the CPU)."""
    cost = MissCost(**COST, cpu_gbps=cpu_gbps, cpu_gflops=cpu_gflops, link_gbps=link_gbps, cpu_call_s=call_us * 1e-6)
    copy = cost.split(tokens)
    assert len(copy) == len(tokens)
    chosen = cost.call_seconds([n for n, c in zip(tokens, copy) if not c], sum(copy))
    assert chosen <= cost.call_seconds(tokens, 0) * (1 + 1e-12)
    assert chosen <= cost.call_seconds([], len(tokens)) * (1 + 1e-12) or not tokens
    if any(copy) and not all(copy):
        assert min(n for n, c in zip(tokens, copy) if c) >= max(n for n, c in zip(tokens, copy) if not c)


@pytest.mark.parametrize("field, value", [("cpu_gbps", 0), ("link_gbps", float("inf")), ("cpu_gflops", -1.0),
                                          ("cpu_call_s", -1e-6), ("dram_gbps", float("nan"))])
def test_miss_cost_refuses_nonsense(field, value):
    with pytest.raises(ValueError, match=f"MissCost {field}="):
        MissCost(**(COST | dict(cpu_gbps=1, cpu_gflops=1, link_gbps=1) | {field: value}))


def test_acquire_with_a_cost_splits_the_misses_and_counts_them():
    table = SlotTable(2, 8, 4)
    res = ExpertResidency(table, COST["expert_bytes"])
    cost = MissCost(**COST, cpu_gbps=100, cpu_gflops=1000, link_gbps=25)
    slots, fills = res.acquire(0, [1, 2, 3], fill=cost, tokens=[200, 1, 1])
    assert slots[0] >= 0 and slots[1:] == [-1, -1] and fills == [(slots[0], 0, 1)]
    st = res.stats.layers[0]
    assert (st.misses, st.cpu_experts, st.cpu_token_slots, st.bytes_h2d) == (3, 2, 2, COST["expert_bytes"])
    assert res.stats.demand_copies == 1
    res.release([slots[0]])
    # every slot pinned (read by another call): misses whose copy would pay go to the CPU
    held = [table.allocate(1, e)[0] for e in range(3)]  # (slot of layer 0, expert 1 is the fourth)
    held.append(table.lookup(0, 1))
    table.pin(held)
    assert table.full()
    slots, fills = res.acquire(1, [5, 6], fill=cost, tokens=[300, 300])
    assert slots == [-1, -1] and fills == [] and res.stats.layers[1].cpu_experts == 2
    table.unpin(held)


def test_acquire_refusals_leave_no_trace():
    table = SlotTable(2, 8, 4)
    res = ExpertResidency(table, 10)
    cost = MissCost(10, 10, 1, 1, 1)
    before = (list(table.pins), list(table.owner), res.stats.as_dict())
    for kwargs, match in ((dict(tokens=None), "one token count >= 1 per expert"),
                          (dict(tokens=[1]), "one token count >= 1 per expert"),
                          (dict(tokens=[1, 0]), "one token count >= 1 per expert")):
        with pytest.raises(ValueError, match=match):
            res.acquire(0, [1, 2], fill=cost, **kwargs)
    with pytest.raises(TypeError, match="fill must be True, False or a MissCost"):
        res.acquire(0, [1, 2], fill="cpu")
    assert (list(table.pins), list(table.owner), res.stats.as_dict()) == before


# ------------------------------------------------------------------------------ ProphetMoE, miss: cpu

CPU_WINS = {"cpu_gbps": 1000.0, "cpu_gflops": 1e6, "link_gbps": 1e-3, "dram_gbps": 1000.0}
LINK_WINS = {"cpu_gbps": 1e-3, "cpu_gflops": 1e-3, "link_gbps": 1000.0, "dram_gbps": 1000.0}
MIXED = {"cpu_gbps": 10.0, "cpu_gflops": 0.5, "link_gbps": 1.0, "dram_gbps": 100.0}  # few tokens: CPU; many: copy


def _layer_calls(moe, w13, w2, g, steps, T, dtype=torch.float32, expert_map=None):
    L, E, k = w13.shape[0], w2.shape[1] if expert_map is None else expert_map.numel(), 2
    for _ in range(steps):
        for layer in range(L):
            x = torch.randn(T, w13.shape[3], generator=g).to(dtype)
            ids, weights = _routing(g, T, E, k)
            y = moe(layer, x, weights, ids)
            if expert_map is None:
                want = fused_experts_reference(x.float(), w13[layer].float(), w2[layer].float(), weights, ids)
            else:  # this rank's experts only
                local = torch.where(ids >= 0, expert_map[ids.long()], -1)
                want = fused_experts_reference(x.float(), w13[layer].float(), w2[layer].float(), weights, local,
                                               check=False)
            _close(y, want, dtype)


@pytest.mark.parametrize("slots", [0, 5, 32])
@pytest.mark.parametrize("rates", [CPU_WINS, LINK_WINS, MIXED], ids=["cpu-wins", "link-wins", "mixed"])
def test_hybrid_layer_equals_the_reference(slots, rates):
    """Any buffer (none, 5 of 32 slots, all) and any split: y equals the all-resident reference."""
    g = torch.Generator().manual_seed(slots)
    L, E, H, I = 4, 8, 48, 40
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g) * 0.2, torch.randn(L, E, H, I, generator=g) * 0.2
    moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=rates,
                                  top_k=2, max_batch_tokens=64)
    try:
        for T in (1, 3, 40):  # decode-sized (one host sync with x) and a chunk (x's rows gathered after)
            _layer_calls(moe, w13, w2, g, 2, T)
        st = moe.stats
    finally:
        moe.close()
    if slots == 32:  # every expert loaded at start-up: nothing for the CPU
        assert st.misses == 0 and st.cpu_experts == 0 and st.hits > 0
    elif rates is CPU_WINS:
        assert st.cpu_experts == st.misses > 0 and st.demand_copies == 0 and st.cpu_s > 0
    elif rates is LINK_WINS:  # every miss copied, but where a call needs more experts than 5 slots hold
        assert st.demand_copies > 0 and (st.cpu_experts == 0 or slots == 5)
    else:
        assert 0 < st.cpu_experts < st.misses


@pytest.mark.parametrize("dtype, zp", [(torch.float32, True), (torch.bfloat16, False)])
def test_hybrid_layer_int4(dtype, zp):
    """int4 experts with miss: cpu (issue 44): the GPU part from the buffer's int4 slots, the CPU part
    from the same host rows, read in place; y equals the reference on the dequantized experts, and
    the MissCost prices a miss at the int4 row's bytes (a quarter of bf16's, plus the scales)."""
    from prophet_kernels.memory.store import quantized_expert_bytes

    g = torch.Generator().manual_seed(11)
    L, E, H, I = 3, 8, 64, 64
    store, w13, w2 = _int4_store(g, L, E, H, I, 32, zp)
    moe = ProphetMoE(store, 6, "cpu", miss="cpu", cpu_threads=1, cpu_rates=MIXED, top_k=2, max_batch_tokens=64)
    try:
        assert moe.miss_cost.expert_bytes == quantized_expert_bytes(store.fmt, H, I) < 3 * H * I
        for T in (1, 3, 40):
            _layer_calls(moe, w13, w2, g, 2, T, dtype)
        st = moe.stats
    finally:
        moe.close()
    assert 0 < st.cpu_experts < st.misses and st.cpu_s > 0


def test_hybrid_layer_bf16_and_expert_parallel():
    g = torch.Generator().manual_seed(7)
    L, E, H, I = 3, 8, 64, 32
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g) * 0.2, torch.randn(L, E, H, I, generator=g) * 0.2
    moe = ProphetMoE.from_weights(w13.bfloat16(), w2.bfloat16(), 4, device="cpu", miss="cpu", cpu_threads=1,
                                  cpu_rates=MIXED)
    _layer_calls(moe, w13.bfloat16(), w2.bfloat16(), g, 2, 5, torch.bfloat16)
    moe.close()
    # expert parallelism: this rank holds experts 4..7 of 8 (as its 0..3); the others contribute zero
    emap = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    moe = ProphetMoE.from_weights(w13[:, 4:], w2[:, 4:], 3, device="cpu", miss="cpu", cpu_threads=1,
                                  cpu_rates=MIXED, expert_map=emap)
    _layer_calls(moe, w13[:, 4:], w2[:, 4:], g, 2, 5, expert_map=emap)
    assert moe.stats.cpu_experts > 0
    moe.close()


def test_the_buffer_is_placed_evenly_and_cpu_misses_are_not_copied_ahead():
    """With miss: cpu the buffer is filled at start-up, evenly over the layers (not counted), and a miss
    the CPU computed is not copied for the next call (on realistic routing that slowed steps for
    0-4 points of hits): the same routing again is computed on the CPU again."""
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(2, 8, 32, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    moe = ProphetMoE.from_weights(w13, w2, 4, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=CPU_WINS,
                                  prefetch_budget_bytes=None)
    assert sorted(o for o in moe.buffer.owner) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # experts 0, 1 of each layer
    assert moe.stats.bytes_h2d == 0
    x, w, ids = torch.randn(1, 16, generator=g), torch.rand(1, 2, generator=g), torch.tensor([[1, 6]], dtype=torch.int32)
    moe(0, x, w, ids)
    assert (moe.stats.hits, moe.stats.misses, moe.stats.cpu_experts) == (1, 1, 1)
    moe(0, x, w, ids)
    assert (moe.stats.hits, moe.stats.misses, moe.stats.cpu_experts, moe.stats.bytes_h2d) == (2, 2, 2, 0)
    moe.close()
    ring = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=CPU_WINS)
    assert ring.staging_only and all(o is None for o in ring.buffer.owner)  # a staging ring holds nothing yet
    ring.close()


def test_poisoned_free_slots_and_a_failing_gpu_part(monkeypatch):
    """The GPU's part reads only slots whose copy it waited for: free slots full of NaN never reach y.
    A failure in the GPU's part after the CPU's was submitted joins the pool and releases the pins,
    and the next call is right."""
    from prophet_kernels.memory import layer as layer_mod

    g = torch.Generator().manual_seed(5)
    L, E, H, I = 2, 8, 32, 24
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g) * 0.2, torch.randn(L, E, H, I, generator=g) * 0.2
    moe = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=MIXED)
    assert all(o is None for o in moe.buffer.owner)
    moe.buffer.blocks.fill_(float("nan"))  # every slot free (a staging ring): poisoned
    _layer_calls(moe, w13, w2, g, 3, 6)
    real = layer_mod.fused_experts_paged

    def broken(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(layer_mod, "fused_experts_paged", broken)
    x, (ids, weights) = torch.randn(20, H, generator=g), _routing(g, 20, E, 2)
    with pytest.raises(RuntimeError, match="device lost"):
        moe(0, x, weights, ids)
    assert not moe.cpu.busy and sum(moe.buffer.pins) == 0
    monkeypatch.setattr(layer_mod, "fused_experts_paged", real)
    _layer_calls(moe, w13, w2, g, 1, 6)
    moe.close()


def test_refused_calls_leave_no_trace():
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 8, generator=g)
    moe = ProphetMoE.from_weights(w13, w2, 4, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=MIXED)
    moe(0, torch.randn(2, 16), torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    before = (moe.stats.as_dict(), list(moe.buffer.owner), list(moe.buffer.pins))
    for ids, match in ((torch.tensor([[0, 8], [1, 2]], dtype=torch.int32), r"outside \[0, 8\) in layer 1: 8"),
                       (torch.tensor([[0, -3], [1, 2]], dtype=torch.int32), r"outside \[0, 8\) in layer 1: -3")):
        with pytest.raises(ValueError, match=match):
            moe(1, torch.randn(2, 16), torch.rand(2, 2), ids)
    with pytest.raises(TypeError):
        moe(1, torch.randn(2, 16).double(), torch.rand(2, 2), torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))
    assert (moe.stats.as_dict(), list(moe.buffer.owner), list(moe.buffer.pins)) == before and not moe.cpu.busy
    moe.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(miss="gpu"), "miss must be one of wait, cpu"),
    (dict(miss="cpu", mode="device"), "miss='cpu' runs in host mode"),
    (dict(miss="cpu", cpu_backend="amx"), "cpu_backend must be one of native, torch"),
    (dict(miss="cpu", cpu_rates={"cpu_gbps": 0}), "cpu_rates cpu_gbps=0"),
    (dict(miss="cpu", cpu_rates={"pcie": 1}), r"unknown rate\(s\) \['pcie'\]"),
    (dict(miss="cpu", cpu_threads=0), "cpu_threads=0"),
])
def test_prophet_moe_refusals(kwargs, match):
    w13, w2 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 4)
    with pytest.raises(ValueError, match=match):
        ProphetMoE.from_weights(w13, w2, 2, device="cpu", **kwargs)


def test_buffer_zero_is_a_staging_ring_with_miss_cpu_only():
    w13, w2 = torch.randn(3, 8, 8, 8), torch.randn(3, 8, 8, 4)
    moe = ProphetMoE.from_weights(w13, w2, 0, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=MIXED, top_k=2,
                                  max_batch_tokens=2)
    assert moe.staging_only and moe.buffer.num_slots == 4  # one layer's unique experts at 2 tokens x top-2
    moe.close()
    with pytest.raises((ValueError, TypeError)):
        ProphetMoE.from_weights(w13, w2, 0, device="cpu")


# ------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("cfg, match", [
    ({"miss": "host"}, "unknown Prophet miss 'host'; known: wait, cpu"),
    ({"miss": "cpu", "mode": "device"}, "miss 'cpu' runs in mode 'host'"),
    ({"miss": "cpu", "expert_dtype": "fp8"}, "int4 experts; expert_dtype fp8 on the CPU is not supported yet"),
    ({"miss": "cpu", "cpu_threads": -1}, r"cpu_threads=-1: give a whole number in \[1, "),
    ({"miss": "cpu", "cpu_threads": 100000}, "cpu_threads=100000"),
    ({"miss": "cpu", "cpu_backend": "kt"}, "unknown Prophet cpu_backend 'kt'; known: native, torch"),
    ({"miss": "cpu", "cpu_gbps": -2}, "cpu_gbps=-2"),
    ({"buffer": 0}, r"buffer=0.*\(or 0 with miss: cpu or stream\)"),
])
def test_settings_refusals(cfg, match):
    from prophet_kernels.integration.settings import ProphetSettings

    with pytest.raises(ValueError, match=match):
        ProphetSettings.resolve({"prophet": cfg}, environ={})


def test_settings_from_the_environment_and_buffer_zero():
    from prophet_kernels.integration.settings import ProphetSettings

    s = ProphetSettings.resolve(None, environ={"PROPHET": "1", "PROPHET_MISS": "cpu", "PROPHET_BUFFER": "0",
                                               "PROPHET_CPU_THREADS": "1", "PROPHET_PCIE_GBPS": "25"})
    assert (s.miss, s.buffer, s.cpu_threads, s.num_slots(4, 8)) == ("cpu", 0.0, 1, 0)
    assert s.cpu_rates() == {"link_gbps": 25.0} and s.cpu_threads_for(1) == 1
    s.check_fits(4, 8, 2, 8192)  # with miss cpu, any buffer serves any batch
    assert ProphetSettings(enabled=True, miss="cpu").cpu_threads_for(64) == 1  # never below one thread


def test_plan_reports_the_pinned_host_store():
    from prophet_kernels.planner import get_gpu, get_model
    from prophet_kernels.planner.memory import ServingConfig, plan

    m = get_model("Mixtral-8x7B")
    r = plan(m, get_gpu("H100-80GB"), 1)
    assert r.host_expert_bytes == 32 * 8 * 3 * 4096 * 14336 * 2  # every routed expert in bf16: 90.2 GB
    staged = plan(m, get_gpu("H100-80GB"), 1, cfg=ServingConfig(pp=2))
    assert staged.host_expert_bytes == r.host_expert_bytes  # the stages' shares add up


def test_pool_threads_run_on_the_cpus_given():
    """NUMA: the native pool's threads are pinned to the CPUs given (ProphetMoE gives the store node's
    cores on a machine with several nodes, numa.compute_cpus); the result is unchanged."""
    import os
    from pathlib import Path

    cpu0 = sorted(os.sched_getaffinity(0))[-1]
    g = torch.Generator().manual_seed(0)
    store, w13, w2 = _store(g, 1, 4, 32, 16)
    before = {t.name for t in Path("/proc/self/task").iterdir()}
    cpu = CpuExperts(store, 2, cpus=[cpu0])
    new = [t for t in Path("/proc/self/task").iterdir() if t.name not in before]
    allowed = {next(line.split(":")[1].strip() for line in (t / "status").read_text().splitlines()
                    if line.startswith("Cpus_allowed_list")) for t in new}
    assert allowed == {str(cpu0)} and len(new) == 2
    x = torch.randn(3, 32, generator=g)
    y = cpu(0, x, [1], np.array([0, 3], np.int64), np.arange(3, dtype=np.int32), np.ones(3, np.float32))
    _close(y, _reference_cpu_part(x, w13[0], w2[0], torch.full((3, 1), 1, dtype=torch.int32), torch.ones(3, 1), [1]),
           torch.float32)
    cpu.close()


def test_compute_cpus_are_the_store_nodes(monkeypatch):
    import os

    from prophet_kernels.memory import numa

    mine = sorted(os.sched_getaffinity(0))
    monkeypatch.setattr(numa, "store_node", lambda: None)
    assert numa.compute_cpus() is None  # one node (or no GPU): any CPU
    monkeypatch.setattr(numa, "store_node", lambda: 1)
    monkeypatch.setattr(numa, "node_cpus", lambda node: [mine[0], 10_000] if node == 1 else [])
    assert numa.compute_cpus() == [mine[0]]  # the node's CPUs this process may use
    monkeypatch.setattr(numa, "node_cpus", lambda node: [10_000])
    assert numa.compute_cpus() is None


def test_the_simulator_splits_as_the_layer_does():
    """One decision function: the trace simulator's miss-cpu replay (routing.simulator.Replay) and
    ProphetMoE(miss="cpu") fed the same routing and the same rates make the same decisions, layer by
    layer (hits, misses, experts and token-slots on the CPU, copies, evictions)."""
    from prophet_kernels.routing.simulator import make_replay

    g = torch.Generator().manual_seed(11)
    L, E, H, I, k = 3, 8, 16, 8, 2
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g)
    moe = ProphetMoE.from_weights(w13, w2, 6, device="cpu", miss="cpu", cpu_threads=1, cpu_rates=MIXED)
    replay = make_replay(L, E, 6, "next-use", None, 0, moe.store.expert_bytes, MIXED["link_gbps"] * 1e9, 1e-4,
                         miss="cpu", miss_cost=moe.miss_cost)
    for step in range(12):
        T = (1, 3, 20)[step % 3]
        for layer in range(L):
            ids, weights = _routing(g, T, E, k)
            moe(layer, torch.randn(T, H, generator=g), weights, ids)
            replay.call(layer, sorted(set(ids.flatten().tolist())), ids.numpy())
    moe.close()
    fields = ("hits", "misses", "cpu_experts", "cpu_token_slots", "evictions", "bytes_h2d")
    got = [[getattr(s, f) for f in fields] for s in moe.stats.layers]
    want = [[getattr(s, f) for f in fields] for s in replay.res.stats.layers]
    assert got == want and moe.stats.cpu_experts > 0 and moe.stats.demand_copies > 0


def test_prophet_simulate_miss_cpu(capsys):
    from prophet_kernels.cli import main

    rc = main(["simulate", "--trace", "olmoe-heldout", "--capacity", "0.25", "--max-steps", "8", "--miss", "cpu",
               "--cpu-gbps", "100", "--cpu-gflops", "1000", "--dram-gbps", "150", "--pcie-gbps", "25"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "miss cpu (given): CPU computed" in out.out
    assert main(["simulate", "--trace", "olmoe-heldout", "--cpu-gbps", "100"]) == 2
    assert "--cpu-gbps go with --miss cpu" in capsys.readouterr().err
    assert main(["simulate", "--trace", "olmoe-heldout", "--miss", "cpu", "--cpu-gbps", "-1", "--cpu-gflops", "1"]) == 2
    assert "--cpu-gbps -1.0: a finite rate > 0" in capsys.readouterr().err


def test_place_fills_in_order_and_refuses_before_changing_anything():
    res = ExpertResidency(SlotTable(3, 4, 5, "next-use", min_slots=1), expert_bytes=10)
    with pytest.raises(ValueError, match="outside the table"):
        res.place([(0, 1), (3, 0)])
    assert res.table.lookup(0, 1) < 0 and res.stats.bytes_h2d == 0
    order = [(2, 3), (0, 1), (2, 3), (1, 0), (0, 0), (1, 1), (2, 2), (0, 2)]
    fills = res.place(order)
    assert [(l, e) for _, l, e in fills] == [(2, 3), (0, 1), (1, 0), (0, 0), (1, 1)]  # repeats skipped, full at 5
    assert res.table.lookup(2, 2) < 0 and res.stats.bytes_h2d == 50
    assert res.place([(2, 2)]) == []  # nothing free: nothing evicted


def test_frequency_placement_is_most_routed_first():
    from prophet_kernels.routing.simulator import frequency_placement
    from prophet_kernels.routing.traces.format import Trace

    g = np.random.default_rng(5)
    L, E, k, T = 3, 6, 2, 50
    ids = np.stack([np.stack([g.choice(E, k, replace=False, p=np.arange(1, E + 1) / 21) for _ in range(T)])
                    for _ in range(L)])
    trace = Trace(ids.astype(np.int16), seq_starts=np.array([0, T]), meta={"num_experts": E})
    got = frequency_placement(trace)
    counts = {(l, e): int((ids[l] == e).sum()) for l in range(L) for e in range(E)}
    assert sorted(got) == sorted(counts) and len(got) == L * E
    assert [counts[p] for p in got] == sorted(counts.values(), reverse=True)


def test_static_placement_never_copies_and_layers_placement_hits_the_last_layers():
    """``static``: the start-up placement kept for good (KTransformers' fixed GPU experts): no copy,
    every miss on the CPU; ``layers``: whole layers from the last down (llama.cpp's --n-cpu-moe):
    those layers always hit, the others never."""
    from prophet_kernels.routing.simulator import simulate
    from prophet_kernels.routing.traces import load_trace

    held, profile = load_trace("olmoe-heldout[:2]"), load_trace("olmoe-train[:4]")
    rates = {"cpu_gbps": 100.0, "cpu_gflops": 2000.0, "dram_gbps": 150.0}
    static = simulate(held, 0.25, miss="cpu", cpu_rates=rates, max_steps=64, placement="frequency",
                      profile=profile, static=True)
    assert static.bytes_h2d == 0 and static.evictions == 0 and static.fallbacks == static.misses > 0
    dynamic = simulate(held, 0.25, miss="cpu", cpu_rates=rates, max_steps=64, placement="frequency",
                       profile=profile)
    assert dynamic.bytes_h2d > 0  # the same placement, copies that pay: the buffer moves
    layers = simulate(held, 0.25, miss="cpu", cpu_rates=rates, max_steps=64, placement="layers", static=True)
    L = held.num_layers
    assert layers.layer_hit_rate == [0.0] * (L - L // 4) + [1.0] * (L // 4)
    assert MissCost(10, 10, 1.0, 1.0, 100.0, copy=False).split([1000, 1]) == [False, False]


@pytest.mark.parametrize("kwargs, match", [
    (dict(placement="frequency", miss="cpu"), "needs a profile trace"),
    (dict(placement="everywhere", miss="cpu"), "placement='everywhere'"),
    (dict(static=True), "go with miss='cpu'"),
    (dict(static=True, miss="cpu", predictor="oracle"), "give no predictor"),
    (dict(placement="layers", miss="cpu", capacity=0), "go with miss='cpu' and a buffer"),
])
def test_simulate_placement_refusals(kwargs, match):
    from prophet_kernels.routing.simulator import simulate
    from prophet_kernels.routing.traces import load_trace

    kwargs = {"miss": "wait", "capacity": 0.25} | kwargs
    if kwargs["miss"] == "cpu":
        kwargs["cpu_rates"] = {"cpu_gbps": 1.0, "cpu_gflops": 1.0}
    cap = kwargs.pop("capacity")
    with pytest.raises(ValueError, match=match):
        simulate(load_trace("olmoe-heldout[:1]"), cap, max_steps=4, **kwargs)


def test_prophet_simulate_placement(capsys):
    from prophet_kernels.cli import main

    rc = main(["simulate", "--trace", "olmoe-heldout[:1]", "--train-trace", "olmoe-train[:2]", "--capacity", "0.25",
               "--max-steps", "8", "--miss", "cpu", "--cpu-gbps", "100", "--cpu-gflops", "1000",
               "--placement", "frequency", "--static"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "placement frequency (profiled on olmoe-train[:2]), static: no copy, no prefetch" in out.out
    assert "H2D 0.00 MB/token" in out.out and "a decode step" in out.out
    assert main(["simulate", "--trace", "olmoe-heldout", "--static"]) == 2
    assert "--placement and --static go with --miss cpu" in capsys.readouterr().err
    assert main(["simulate", "--trace", "olmoe-heldout", "--miss", "cpu", "--static", "--predictor", "frequency"]) == 2
    assert "give no --predictor" in capsys.readouterr().err
