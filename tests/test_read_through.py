"""Read-through fills (issue 27, option (b)): the decode path's kernels read the experts listed in the
fill list from the source (the host store's layer) and write them into their slots as they go.

Against the same kernels after an explicit copy of the listed experts: the output is bit for bit
the same (fp32; fp16; fp8 weights with both scale layouts), the listed slots then hold the source's
weights and scales exactly, no other slot changes, rows of the list past its count are ignored;
the grouped path (copies first) and the PyTorch path agree; a refused call writes nothing. Device
mode with ``fill="read-through"`` equals all-resident over adversarial routing. CPU: interpreter."""

import pytest
import torch

from prophet_kernels import ProphetMoE, fused_experts_paged
from prophet_kernels.kernels.fp8 import FP8, quantize_fp8
from prophet_kernels.kernels.residency import ReadThrough
from prophet_kernels.memory.store import allocate_experts

from .test_device_mode import _weights, adversarial_routing, compiled_step_equals_eager, run_against_all_resident
from .test_moe import DEV, GEMV, GROUPED_SMALL

GEMV_PDL = {**GEMV, "down": {**GEMV["down"], "pdl": 2}}  # (PDL applies on Hopper only; the same on the CPU)


def _experts(n, H, I, dtype, block, gen, device="cpu"):
    """n experts in the one-block layout with random weights (fp8: quantized, with scales); on the
    host pinned when the kernels run on a GPU (they read the source over PCIe)."""
    pin = device == "cpu" and DEV == "cuda"
    ex = allocate_experts(n, H, I, dtype, device, pin=pin, block_shape=block)
    if dtype == FP8:
        for w, sc in ((ex.w13, ex.w13_scale), (ex.w2, ex.w2_scale)):
            q, s = quantize_fp8(torch.randn(w.shape, generator=gen) * (0.2 + torch.rand(w.shape[:2] + (1,), generator=gen)),
                                block)
            w.copy_(q.to(device))
            sc.copy_(s.to(device))
    else:
        ex.w13.copy_(torch.randn(ex.w13.shape, generator=gen) * H**-0.5)
        ex.w2.copy_(torch.randn(ex.w2.shape, generator=gen) * I**-0.5)
    return ex


def _case(T, H, I, E, S, k, dtype, block, seed, shared):
    """Source experts, slots with garbage, a routing, the page table with every routed expert
    placed, some already resident (copied), the others listed for a fill; a row past the count
    names a resident expert whose source differs from its slot (reading it would show)."""
    gen = torch.Generator().manual_seed(seed)
    src = _experts(E, H, I, dtype, block, gen)
    slots = _experts(S, H, I, dtype, block, gen, DEV)  # garbage: other random experts
    if shared:  # tokens share experts (a listed expert read by several programs)
        ids = torch.stack([torch.randperm(k + 1, generator=gen)[:k] for _ in range(T)])
    else:
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)])
    routed = torch.unique(ids)
    place = torch.randperm(S, generator=gen)[: len(routed)]
    pt = torch.full((E,), -1, dtype=torch.int32)
    pt[routed] = place.to(torch.int32)
    resident, listed = routed[: len(routed) // 2], routed[len(routed) // 2:]
    for e in resident.tolist():
        slots.block[int(pt[e])] = src.block[e].to(DEV)
    fills = torch.full((E + 1, 2), 0, dtype=torch.int32)
    for i, e in enumerate(listed.tolist()):
        fills[i] = torch.tensor([e, int(pt[e])])
    if len(resident):
        e = int(resident[0])
        fills[len(listed)] = torch.tensor([e, int(pt[e])])  # past the count: must be ignored
        src.block[e] = _experts(1, H, I, dtype, block, gen).block[0]  # (the slot keeps the old weights)
    w = torch.rand(T, k, generator=gen) + 0.1
    x = torch.randn(T, H, generator=gen)
    rt = ReadThrough(src.w13, src.w2, src.w13_scale, src.w2_scale, fills.to(DEV),
                     torch.tensor([len(listed)], dtype=torch.int32, device=DEV))
    return src, slots, x, w, ids.to(torch.int32), pt, rt, listed


CASES = [  # T, H, I, E, S, k, shared
    pytest.param(1, 70, 47, 7, 9, 3, False, id="T1"),
    pytest.param(3, 64, 40, 6, 8, 2, True, id="T3-shared"),
    pytest.param(5, 40, 24, 8, 8, 2, False, id="T5"),
]
DTYPES = [pytest.param(torch.float32, None, id="fp32"), pytest.param(torch.float16, None, id="fp16"),
          pytest.param(FP8, None, id="fp8-channel"), pytest.param(FP8, (16, 16), id="fp8-block16")]


@pytest.mark.parametrize("dtype, block", DTYPES)
@pytest.mark.parametrize("T, H, I, E, S, k, shared", CASES)
@pytest.mark.parametrize("cfg", [GEMV, GEMV_PDL, GROUPED_SMALL], ids=["gemv", "gemv-pdl", "grouped"])
def test_read_through_equals_copy_then_read(T, H, I, E, S, k, shared, dtype, block, cfg):
    src, slots, x, w, ids, pt, rt, listed = _case(T, H, I, E, S, k, dtype, block, hash((T, H, str(dtype), str(block))) % 999,
                                                  shared)
    act = torch.float32 if dtype == FP8 else dtype
    x = x.to(act).to(DEV)
    scales = dict(w13_scale=slots.w13_scale, w2_scale=slots.w2_scale, block_shape=block)
    before = slots.block.clone()
    copied_block = before.clone()
    for e in listed.tolist():
        copied_block[int(pt[e])] = src.block[e].to(DEV)
    copied = allocate_experts(S, H, I, dtype, DEV, block_shape=block)
    copied.block.copy_(copied_block)
    want = fused_experts_paged(x, copied.w13, copied.w2, pt.to(DEV), w.to(DEV), ids.to(DEV), w13_scale=copied.w13_scale,
                               w2_scale=copied.w2_scale, block_shape=block, config=cfg)
    got = fused_experts_paged(x, slots.w13, slots.w2, pt.to(DEV), w.to(DEV), ids.to(DEV), config=cfg, read_through=rt,
                              **scales)
    assert torch.equal(got, want)
    for e in listed.tolist():  # the listed slots now hold the source's weights and scales
        s = int(pt[e])
        for a, b in ((slots.w13, src.w13), (slots.w2, src.w2), (slots.w13_scale, src.w13_scale),
                     (slots.w2_scale, src.w2_scale)):
            if a is not None:
                assert torch.equal(a[s].cpu().view(torch.uint8), b[e].view(torch.uint8)), (e, s)
    others = [s for s in range(S) if s not in {int(pt[e]) for e in listed.tolist()}]
    assert torch.equal(slots.block[others].cpu(), before[others].cpu())  # nothing else written


def test_a_refused_read_through_writes_nothing():
    src, slots, x, w, ids, pt, rt, listed = _case(1, 40, 24, 6, 8, 2, torch.float32, None, 3, False)
    before = slots.block.clone()
    args = (x.to(DEV), slots.w13, slots.w2, pt.to(DEV), w.to(DEV), ids.to(DEV))
    bad = [
        (rt._replace(w13=src.w13[:-1]), ValueError, "read_through.w13 must be"),
        (rt._replace(w2=src.w2.to(torch.float16)), TypeError, "read_through.w2 must be a torch.float32"),
        (rt._replace(w13=src.w13.contiguous().transpose(1, 2).contiguous().transpose(1, 2)), ValueError, "strides"),
        (rt._replace(fills=rt.fills.long()), ValueError, "fills must be an int32"),
        (rt._replace(fill_count=torch.zeros(2, dtype=torch.int32, device=DEV)), ValueError, "fill_count"),
        (rt._replace(w13_scale=torch.ones(6, 48)), ValueError, "w13_scale must be given exactly"),
        (tuple(rt), TypeError, "ReadThrough"),
    ]
    for r, err, msg in bad:
        with pytest.raises(err, match=msg):
            fused_experts_paged(*args, config=GEMV, read_through=r)
    with pytest.raises(ValueError, match="needs a page table"):
        from prophet_kernels.kernels.moe import check_read_through
        check_read_through(rt, slots.w13, slots.w2, None)
    assert torch.equal(slots.block, before)


@pytest.mark.parametrize("fraction, cfg", [(0.25, GEMV), (0.5, GEMV), (1.0, GEMV), (0.5, GROUPED_SMALL)],
                         ids=["25%-gemv", "50%-gemv", "100%-gemv", "50%-grouped"])
def test_device_mode_read_through_equals_all_resident(monkeypatch, fraction, cfg):
    """Device mode with fill="read-through" (config pinned: the decode path, whose kernels fill; the
    grouped path, whose op copies first): exact against all-resident over adversarial routing
    (misses in every layer, batch 1 and 2, prefetch toggled: prefetches still copy), and the demand
    step launches no copy of its own."""
    import json

    from prophet_kernels.kernels import residency

    monkeypatch.setenv("PROPHET_MOE_CONFIG", json.dumps(cfg))
    L, E, H, I, K = 2, 8, 16, 8, 2
    w13, w2 = _weights(L, E, H, I, seed=8)
    moe = ProphetMoE.from_weights(w13, w2, int(fraction * L * E), device=DEV, mode="device", predictor="same",
                                  fill="read-through")
    copies = []
    real = residency.fill_slots
    monkeypatch.setattr("prophet_kernels.memory.device.fill_slots", lambda *a, **k: copies.append(1) or real(*a, **k))
    moe.residency.prefetch_depth = 0
    st = run_against_all_resident(moe, w13, w2, adversarial_routing(20, L, E, K, H, (1, 2), seed=9), False)
    assert st.misses > 0 and copies == []  # every demand miss filled by the GEMMs
    st = run_against_all_resident(moe, w13, w2, adversarial_routing(20, L, E, K, H, (1, 2), seed=10), True)
    assert (st.evictions > 0) == (fraction < 1)
    if fraction < 1:  # (at 100% the first run left every expert resident: nothing to prefetch)
        assert st.prefetched > 0 and copies  # prefetches copy (on the side stream on a GPU)


def test_fill_setting_is_checked():
    w13, w2 = _weights(1, 4, 8, 4)
    with pytest.raises(ValueError, match="fill must be one of copy, read-through"):
        ProphetMoE.from_weights(w13, w2, 4, device=DEV, mode="device", fill="zero-copy")
    with pytest.raises(ValueError, match="device-mode option"):
        ProphetMoE.from_weights(w13, w2, 4, device=DEV, mode="host", fill="read-through")


@pytest.mark.skipif(DEV == "cuda", reason="the CPU build's trace (as test_a_compiled_step_has_no_graph_break)")
def test_a_compiled_step_with_read_through_fills(monkeypatch):
    """torch.compile(fullgraph=True) of whole decode steps traces the read-through op (which declares
    the slots it writes): the same outputs and decisions as eager device mode (interpreter, decode path)."""
    import json

    monkeypatch.setenv("PROPHET_MOE_CONFIG", json.dumps(GEMV))
    compiled_step_equals_eager(fill="read-through")


HOSTILE = ["none", "source E", "source dtype", "source strides", "fills int64", "fills shape", "count shape",
           "source scale without scales"]


@pytest.mark.skipif(DEV != "cpu", reason="property test run on the CPU (interpreter)")
def test_read_through_properties():
    """Hypothesis over random shapes, routings, placements, listed subsets and counts, both paths and
    hostile read-through arguments: every call either raises a clear ValueError/TypeError and writes
    nothing, or equals an independent float64 loop over the source's experts and leaves the listed
    slots holding the source's weights."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import given
    from hypothesis import strategies as st

    from .test_properties import SETTINGS, loop_reference

    @st.composite
    def case(draw):
        E = draw(st.integers(2, 8))
        return dict(T=draw(st.integers(1, 4)), H=draw(st.integers(4, 40)), I=draw(st.integers(2, 24)), E=E,
                    k=draw(st.integers(1, min(3, E))), extra=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**31 - 1)),
                    grouped=draw(st.booleans()), hostile=draw(st.sampled_from(HOSTILE)))

    @SETTINGS
    @given(case())
    def check(c):
        T, H, I, E, k = c["T"], c["H"], c["I"], c["E"], c["k"]
        S = E + c["extra"]
        gen = torch.Generator().manual_seed(c["seed"])
        src = _experts(E, H, I, torch.float32, None, gen)
        slots = _experts(S, H, I, torch.float32, None, gen, DEV)
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
        pt = torch.randperm(S, generator=gen)[:E].to(torch.int32)
        routed = torch.unique(ids.long())
        listed = routed[torch.randperm(len(routed), generator=gen)][: int(torch.randint(0, len(routed) + 1, (1,), generator=gen))]
        for e in set(range(E)) - set(listed.tolist()):
            slots.block[int(pt[e])] = src.block[e]
        fills = torch.zeros((E + 1, 2), dtype=torch.int32)
        for i, e in enumerate(listed.tolist()):
            fills[i] = torch.tensor([e, int(pt[e])])
        rt = ReadThrough(src.w13, src.w2, None, None, fills, torch.tensor([len(listed)], dtype=torch.int32))
        h = c["hostile"]
        rt = {"none": rt, "source E": rt._replace(w13=src.w13[:-1]), "source dtype": rt._replace(w2=src.w2.double()),
              "source strides": rt._replace(w2=src.w2.contiguous()[:, :, :].transpose(1, 2).contiguous().transpose(1, 2))
              if I > 1 and H > 1 else rt._replace(w2=src.w2[:-1]),
              "fills int64": rt._replace(fills=fills.long()), "fills shape": rt._replace(fills=fills[:, :1]),
              "count shape": rt._replace(fill_count=torch.zeros(2, dtype=torch.int32)),
              "source scale without scales": rt._replace(w13_scale=torch.ones(E, 2 * I))}[h]
        x = torch.randn(T, H, generator=gen)
        w = torch.rand(T, k, generator=gen)
        before = slots.block.clone()
        cfg = GROUPED_SMALL if c["grouped"] else GEMV
        if h != "none":
            with pytest.raises((ValueError, TypeError), match="read_through"):
                fused_experts_paged(x, slots.w13, slots.w2, pt, w, ids, config=cfg, read_through=rt)
            assert torch.equal(slots.block, before)
            return
        y = fused_experts_paged(x, slots.w13, slots.w2, pt, w, ids, config=cfg, read_through=rt)
        ref = loop_reference(x, src.w13, src.w2, torch.arange(E, dtype=torch.int32), w, ids)
        torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())))
        for e in listed.tolist():
            assert torch.equal(slots.block[int(pt[e]), : 3 * I * H], src.block[e, : 3 * I * H])

    check()
