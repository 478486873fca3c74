"""INT4 (w4a16) experts (issue 44): the paged kernels with int4 codes equal an independent PyTorch
computation on the dequantized weights, on the GEMV and the grouped paths, symmetric and with zero
points, at groups of 32, 64 and 128; scrambled page tables with poisoned free slots; expert maps
(expert parallelism: experts of other ranks -1 in the page table); the packing read as
compressed-tensors packs; hostile inputs refused before any launch. CPU: Triton interpreter
(fp32 and fp16 activations; bf16 goes to the reference there, ``kernels.use_triton``).

The grid is ported from vLLM's ``tests/kernels/moe/test_moe.py::test_fused_moe_wn16`` (its int4
cases: m in {1, 32, 222}, n = 128, k = 128, e in {8, 64}, topk in {2, 6}, ep_size in {1, 4}, group
64 / 128 with and without zero points, activations and weights randn / 10, atol 2e-2 rtol 0 in
fp16), trimmed to the sizes the interpreter runs in CI time, with group 32 added (the issue's).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prophet_kernels import fused_experts, fused_experts_paged
from prophet_kernels.kernels.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4

from .test_fp8 import routing
from .test_moe import DEV, GEMV, GROUPED_SMALL, rel_err

GEMV64 = {"gemv": True, "block_m": 16, "gate_up": {"BN": 16, "BK": 64}, "down": {"BN": 32, "BK": 128}}


def torch_moe(x, w13, w2, weights, ids, expert_map=None):
    """Dense PyTorch MoE on float weights w13 [E, 2I, H], w2 [E, H, I] in fp32 (independent of the
    library's references); ``expert_map`` [E] bool: experts of this rank (others contribute 0)."""
    I = w2.shape[2]
    y = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if expert_map is not None and not expert_map[e]:
                continue
            h = w13[e].float() @ x[t].float()
            y[t] += weights[t, j].float() * (w2[e].float() @ (F.silu(h[:I]) * h[I:]))
    return y


def int4_experts(E, H, I, group, zero_points, gen, dtype=torch.float32):
    """int4 experts from random weights (randn / 10, as vLLM's test): (codes, scales, zeros) of w13 and w2."""
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / 10).to(dtype)
    w2 = (torch.randn(E, H, I, generator=gen) / 10).to(dtype)
    return quantize_int4(w13, group, zero_points), quantize_int4(w2, group, zero_points)


def poisoned_slots(E, S, gen, *tensors):
    """The experts' tensors in a random placement of S >= E slots; the free slots hold random bytes,
    scales of +-1e4 and zero points of any code (a read of one would show). Returns (slot tensors, pt)."""
    pt = torch.randperm(S, generator=gen)[:E].to(torch.int32)
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if t.dtype == torch.uint8:
            junk = torch.randint(0, 256, (S,) + t.shape[1:], generator=gen, dtype=torch.uint8)
        else:
            junk = torch.randn((S,) + t.shape[1:], generator=gen) * 1e4
        junk[pt.long()] = t
        out.append(junk)
    return out, pt


# (m, e, topk, ep_size, group, zero points): vLLM's wn16 int4 grid, one case per (m, group, zp)
# with (e, topk, ep_size) cycling through its values (at m = 222 with e = 8 only: the interpreter's
# time); n = k = 128 (H = I = 128: every group edge of 32 / 64 / 128 and BN tiles of 16 / 32 cross
# the rows)
_E_TOPK_EP = [(8, 2, 1), (8, 6, 4), (64, 2, 4), (64, 6, 1)]
GRID = [(m, *_E_TOPK_EP[(i + j) % (2 if m == 222 else 4)], g, zp)
        for i, m in enumerate((1, 32, 222)) for j, (g, zp) in enumerate(
            [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)])]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-5), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("m,e,topk,ep_size,group,zp", GRID)
def test_int4_paged_equals_dense_torch(m, e, topk, ep_size, group, zp, dtype, atol):
    if dtype == torch.float16 and m == 222:
        pytest.skip("(fp16 is covered at m = 1 and 32; the grouped path's fp16 dots are the same code)")
    H = I = 128
    gen = torch.Generator().manual_seed(m * 1000 + e * 10 + group + zp)
    (q13, s13, z13), (q2, s2, z2) = int4_experts(e, H, I, group, zp, gen)
    x = (torch.randn(m, H, generator=gen) / 10).to(dtype)
    w, ids = routing(m, e, topk, gen)
    local = torch.zeros(e, dtype=torch.bool)  # expert parallelism: this rank holds 1/ep_size of the experts
    local[torch.randperm(e, generator=gen)[:e // ep_size]] = True
    (q13s, s13s, z13s, q2s, s2s, z2s), pt = poisoned_slots(e, e + 5, gen, q13, s13, z13, q2, s2, z2)
    pt = torch.where(local, pt, -1)
    ref = torch_moe(x, dequantize_int4(q13, s13, z13), dequantize_int4(q2, s2, z2), w, ids, local)
    kw = dict(w13_scale=s13s, w2_scale=s2s, w13_zeros=z13s, w2_zeros=z2s, group_size=group)
    args = [t.to(DEV) for t in (x, q13s, q2s, pt, w, ids)]
    kw = {key: v.to(DEV) if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    for cfg in (None, GEMV64) if m == 1 else ((None, GROUPED_SMALL)[(group + zp) % 2],):
        y = fused_experts_paged(*args, **kw, config=cfg, check=False).cpu().float()
        torch.testing.assert_close(y, ref, atol=atol, rtol=0 if dtype == torch.float16 else 1e-4)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 20), E=st.integers(1, 9), k=st.integers(1, 4), h_groups=st.integers(1, 3),
       i_groups=st.integers(1, 3), group=st.sampled_from([32, 64]), zp=st.booleans(),
       path=st.sampled_from(["gemv", "grouped", "default"]), seed=st.integers(0, 2**16))
def test_int4_hypothesis_shapes_cross_tile_and_group_edges(T, E, k, h_groups, i_groups, group, zp, path, seed):
    """H and I of 1-3 groups (32 / 64 inputs: K tiles of 32 and 64 within them, N tiles of 16 and
    32 across 2I and H), T and E small and odd, k up to 4 (k > E: repeated experts add up)."""
    H, I = h_groups * group, i_groups * group
    gen = torch.Generator().manual_seed(seed)
    (q13, s13, z13), (q2, s2, z2) = int4_experts(E, H, I, group, zp, gen)
    x = torch.randn(T, H, generator=gen) / 10
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    w = torch.rand(T, k, generator=gen)
    (q13s, s13s, z13s, q2s, s2s, z2s), pt = poisoned_slots(E, E + 2, gen, q13, s13, z13, q2, s2, z2)
    cfg = {"gemv": GEMV, "grouped": GROUPED_SMALL, "default": None}[path]
    y = fused_experts_paged(x.to(DEV), q13s.to(DEV), q2s.to(DEV), pt.to(DEV), w.to(DEV), ids.to(DEV),
                            w13_scale=s13s.to(DEV), w2_scale=s2s.to(DEV), group_size=group, config=cfg,
                            w13_zeros=None if z13s is None else z13s.to(DEV),
                            w2_zeros=None if z2s is None else z2s.to(DEV)).cpu()
    ref = torch_moe(x, dequantize_int4(q13, s13, z13), dequantize_int4(q2, s2, z2), w, ids)
    assert rel_err(y, ref) < 1e-5


def test_int4_contiguous_equals_paged_and_quantization_error():
    gen = torch.Generator().manual_seed(3)
    E, H, I, T, k = 5, 64, 96, 7, 2
    w13 = torch.randn(E, 2 * I, H, generator=gen) / 10
    w2 = torch.randn(E, H, I, generator=gen) / 10
    for zp in (False, True):
        (q13, s13, z13), (q2, s2, z2) = quantize_int4(w13, 32, zp), quantize_int4(w2, 32, zp)
        # 16 codes over a group's range: the error of a weight is at most half a step of its group
        step = s13.repeat_interleave(32, -1)
        assert ((dequantize_int4(q13, s13, z13) - w13).abs() <= step / 2 + 1e-7).all()
        x = torch.randn(T, H, generator=gen)
        w, ids = routing(T, E, k, gen)
        kw = dict(w13_scale=s13, w2_scale=s2, w13_zeros=z13, w2_zeros=z2, group_size=32)
        pt = torch.arange(E, dtype=torch.int32)
        a = fused_experts(x, q13, q2, w, ids, **kw)
        b = fused_experts_paged(x, q13, q2, pt, w, ids, **kw)
        assert torch.equal(a, b)
        # int4's own error against the float weights: about 9% rms per weight at group 32, through two matmuls
        assert rel_err(a, torch_moe(x, w13, w2, w, ids)) < 0.25


def test_packing_is_compressed_tensors_pack_quantized():
    """compressed-tensors' ``pack_to_int32`` (its pack-quantized format: signed codes + 8, eight to
    an int32 word along K) viewed as bytes is this module's packing: its checkpoints are read as they are."""
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(4)
    signed = torch.randint(-8, 8, (6, 64), generator=gen, dtype=torch.int8)
    words = helpers.pack_to_int32(signed, 4)  # [6, 8] int32
    assert torch.equal(words.contiguous().view(torch.uint8), pack_int4((signed + 8).to(torch.uint8)))
    assert torch.equal(unpack_int4(words.contiguous().view(torch.uint8)).to(torch.int8) - 8, signed)


def test_int4_hostile_inputs_are_refused_before_any_launch(monkeypatch):
    from prophet_kernels.kernels import gemv, grouped_gemm

    launched = []
    for mod, name in ((gemv, "_gemv_gate_up_kernel"), (grouped_gemm, "_gate_up_kernel")):
        monkeypatch.setattr(mod, name, type("K", (), {"__getitem__": lambda self, g: launched.append(g)})())
    gen = torch.Generator().manual_seed(5)
    E, H, I, T, k = 4, 64, 64, 2, 2
    (q13, s13, z13), (q2, s2, z2) = int4_experts(E, H, I, 32, True, gen)
    x = torch.randn(T, H, generator=gen)
    w, ids = routing(T, E, k, gen)
    pt = torch.arange(E, dtype=torch.int32)
    kw = dict(w13_scale=s13, w2_scale=s2, w13_zeros=z13, w2_zeros=z2, group_size=32)

    def refused(exc, match, *a, **over):
        args = list(a) or [x, q13, q2, pt, w, ids]
        with pytest.raises(exc, match=match):
            fused_experts_paged(*args, **{**kw, **over})

    refused(ValueError, "pass group_size", group_size=None)
    refused(ValueError, r"group_size must be one of \[32, 64, 128\], got 48", group_size=48)
    refused(ValueError, "block_shape is fp8's scale layout", block_shape=(16, 16))
    refused(ValueError, "zero points go with both", w2_zeros=None)
    refused(ValueError, "w13: its input size 64 is not a multiple of the int4 group size 128", group_size=128)
    refused(ValueError, r"hidden size mismatch: x has H=64, w13 has H=128", x, torch.cat([q13, q13], -1), q2, pt, w,
            ids)
    refused(ValueError, r"w2 must be \[S, H, I/2\]", x, q13, q2[:, :, :16], pt, w, ids)
    refused(ValueError, r"w13_scale must be \[4, 128, 2\]", w13_scale=s13[:, :, :1])
    refused(TypeError, "w13_scale must be a float32 tensor, got torch.float16", w13_scale=s13.half())
    refused(TypeError, "w13_zeros must be a uint8 tensor", w13_zeros=z13.int())
    refused(ValueError, "w13 is int4: pass w13_scale", w13_scale=None)
    bad = s13.clone()
    bad[1, 3, 0] = float("nan")
    refused(ValueError, "w13_scale holds NaN or inf", w13_scale=bad)
    bad[1, 3, 0] = float("inf")
    refused(ValueError, "w13_scale holds NaN or inf", w13_scale=bad)
    badz = z2.clone()
    badz[0, 0, 0] = 16
    refused(ValueError, "w2_zeros holds a zero point above 15", w2_zeros=badz)
    refused(ValueError, "zero points given for torch.float32 weights", x, q13.float(), q2.float(), pt, w, ids,
            w13_scale=None, w2_scale=None, group_size=None)
    refused(TypeError, "or both uint8 int4 codes, with group_size", x, q13, q2.float(), pt, w, ids)
    assert launched == []
    # a NaN scale of a free slot (not in the page table) is no error: free slots hold anything
    (q13s, s13s, z13s, q2s, s2s, z2s), pts = poisoned_slots(E, E + 2, gen, q13, s13, z13, q2, s2, z2)
    free = sorted(set(range(E + 2)) - set(pts.tolist()))[0]
    s13s[free] = float("nan")
    monkeypatch.undo()
    y = fused_experts_paged(x, q13s, q2s, pts, w, ids, w13_scale=s13s, w2_scale=s2s, w13_zeros=z13s, w2_zeros=z2s,
                            group_size=32)
    assert torch.isfinite(y).all()


def test_quantize_int4_refusals():
    with pytest.raises(TypeError, match="quantize_int4 takes fp32/fp16/bf16 weights"):
        quantize_int4(torch.zeros(4, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input size 40 is not a multiple of the int4 group size 32"):
        quantize_int4(torch.randn(4, 40), 32)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(torch.randn(4, 64), 16)


# ------------------------------------------------------------------ int4 experts in the store and ProphetMoE


def _stack(L, E, H, I, gen):
    return torch.randn(L, E, 2 * I, H, generator=gen) / 8, torch.randn(L, E, H, I, generator=gen) / 8


@pytest.mark.parametrize("group", [32, 128])
def test_store_quantizes_at_load_with_zero_points_when_the_format_says_so(group):
    """``expert_dtype`` as the int4 WeightFormat with zero points (the plugin's ``int4_zero_points``):
    the store quantizes each expert asymmetrically as it is copied, codes, scales and zero points equal
    ``quantize_int4(..., zero_points=True)``'s, and no dequantized weight is further than half a step from
    the original; the symmetric format keeps z = 8. A group size beside a WeightFormat is refused."""
    from prophet_kernels import HostExpertStore
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import quantized_expert_bytes

    gen = torch.Generator().manual_seed(11)
    L, E, H, I = 2, 3, 128, 160 if group == 32 else 256
    w13, w2 = _stack(L, E, H, I, gen)
    w13 = w13 + 0.05  # (off-centre groups: where zero points differ from the symmetric codes)
    fmt = WeightFormat("int4", group_size=group, zero_points=True)
    store = HostExpertStore.from_tensors(w13, w2, pin=False, expert_dtype=fmt)
    assert store.fmt == fmt and store.expert_bytes == quantized_expert_bytes(fmt, H, I)
    sym = HostExpertStore.from_tensors(w13, w2, pin=False, expert_dtype="int4", group_size=group)
    assert not sym.fmt.zero_points and sym.expert_bytes < store.expert_bytes
    for l in range(L):
        for e in range(E):
            for got, codes, scales, zeros, w in ((0, store.w13, store.w13_scale, store.w13_zeros, w13),
                                                 (1, store.w2, store.w2_scale, store.w2_zeros, w2)):
                q, s, z = quantize_int4(w[l, e], group, zero_points=True)
                assert torch.equal(codes[l][e], q) and torch.equal(scales[l][e], s) and torch.equal(zeros[l][e], z)
                deq = dequantize_int4(codes[l][e], scales[l][e], zeros[l][e])
                step = s.repeat_interleave(group, dim=-1)
                assert ((deq - w[l, e]).abs() <= step / 2 + 1e-6).all()
    err = lambda st: sum((dequantize_int4(st.w13[l], st.w13_scale[l], st.w13_zeros[l] if st.w13_zeros else None)
                          - w13[l]).pow(2).sum() for l in range(L))
    assert err(store) < err(sym)  # (off-centre weights: the zero points' range is the tighter one)
    with pytest.raises(ValueError, match="its block_shape and group_size are its own"):
        HostExpertStore.from_tensors(w13, w2, pin=False, expert_dtype=fmt, group_size=group)
    with pytest.raises(ValueError, match="fp8 or int4 one"):
        HostExpertStore.from_tensors(w13, w2, pin=False, expert_dtype=WeightFormat("float"))


@pytest.mark.parametrize("mode, miss, zp", [("host", "wait", False), ("host", "stream", True), ("device", "wait", True)])
def test_prophet_moe_int4_equals_dequantized_reference(mode, miss, zp):
    """int4 experts in the host store (one row per expert: codes, scales, zero points) served by
    ProphetMoE with misses and evictions (12 slots of 24), streamed, and in device mode: each layer
    call equals the reference on the dequantized experts; a slot holds the int4 bytes."""
    from prophet_kernels import HostExpertStore, ProphetMoE
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import allocate_experts, quantized_expert_bytes

    gen = torch.Generator().manual_seed(7)
    L, E, H, I, k, G = 3, 8, 64, 96, 2, 32
    w13, w2 = _stack(L, E, H, I, gen)
    fmt = WeightFormat("int4", group_size=G, zero_points=zp)
    layers, deq = [], []
    for l in range(L):  # (zero points: built as a checkpoint's would be, into allocate_experts' rows)
        ex = allocate_experts(E, H, I, torch.uint8, fmt=fmt)
        for which, w in ((0, w13[l]), (1, w2[l])):
            q, s, z = quantize_int4(w, G, zp)
            ex[which].copy_(q)
            ex.quant.of(which)[0].copy_(s)
            if zp:
                ex.quant.of(which)[1].copy_(z)
        layers.append(ex)
        deq.append((dequantize_int4(ex.w13, ex.w13_scale, ex.w13_zeros), dequantize_int4(ex.w2, ex.w2_scale, ex.w2_zeros)))
    store = HostExpertStore.from_experts(layers)
    assert store.fmt == fmt and store.expert_bytes == quantized_expert_bytes(fmt, H, I) < 3 * H * I * 2 // 3
    assert None not in store.blocks
    kw = {"predictor": None} if miss == "stream" else {}
    moe = ProphetMoE(store, 0 if miss == "stream" else 12, DEV, mode=mode, miss=miss, **kw)
    for step in range(3):
        x = torch.randn(5, H, generator=gen)
        for l in range(L):
            w, ids = routing(5, E, k, gen)
            y = moe(l, x.to(DEV), w.to(DEV), ids.to(DEV)).cpu()
            assert rel_err(y, torch_moe(x, *deq[l], w, ids)) < 1e-5
    if miss == "wait":
        assert moe.stats.misses > 0 and moe.stats.evictions > 0
    moe.close()


def test_int4_store_from_tensors_and_refusals():
    from prophet_kernels import HostExpertStore, ProphetMoE
    from prophet_kernels.memory.store import DEFAULT_INT4_GROUP, host_copy

    gen = torch.Generator().manual_seed(8)
    w13, w2 = _stack(2, 4, 128, 128, gen)
    store = HostExpertStore.from_tensors(w13, w2, expert_dtype="int4")
    assert store.fmt.group_size == DEFAULT_INT4_GROUP and store.dtype == torch.uint8
    q, s, _ = quantize_int4(w13[1, 2], DEFAULT_INT4_GROUP)
    assert torch.equal(store.w13[1][2], q) and torch.equal(store.w13_scale[1][2], s)
    assert store.expert_bytes == 3 * 128 * 128 // 2 + 4 * 3 * 128 * 128 // 128
    with pytest.raises(ValueError, match="input size 96 is not a multiple of the int4 group size 128"):
        HostExpertStore.from_tensors(*_stack(1, 2, 128, 96, gen), expert_dtype="int4")
    with pytest.raises(ValueError, match="group_size goes with expert_dtype='int4'"):
        HostExpertStore.from_tensors(w13, w2, group_size=32)
    with pytest.raises(ValueError, match="block_shape is fp8's scale layout"):
        HostExpertStore.from_tensors(w13, w2, expert_dtype="int4", block_shape=(16, 16))
    with pytest.raises(ValueError, match=r"int4 \(uint8 codes\) experts come with their scales"):
        host_copy(store.w13[0], store.w2[0], False, "int4")
    with pytest.raises(ValueError, match="int4 experts need one w13_scale and one w2_scale per layer"):
        HostExpertStore(store.w13, store.w2, group_size=128)
    with pytest.raises(ValueError, match="must be in the one-block layout"):
        HostExpertStore([t.clone() for t in store.w13], store.w2, store.w13_scale, store.w2_scale, group_size=128)
    with pytest.raises(ValueError, match="'read-through' is not built for int4 experts"):
        ProphetMoE(store, 4, "cpu", mode="device", fill="read-through")  # (its zero points)


def test_expert_quality_bench_runs_its_int4_variants(tmp_path):
    """bench/expert_quality.py's variants on a random-init OLMoE-shaped study model cut to 2 layers
    (2 windows of 16 tokens): Prophet's int4 store, symmetric and with zero points, gives finite bits per byte near
    fp32's, with zero points the same as the experts quantized and dequantized in place (an independent path); a
    group that does not divide the shape's I = 64 (128) is skipped, not run wrong."""
    import numpy as np

    from bench import expert_quality
    from prophet_kernels.routing.traces.train import get_shape, model_class

    import dataclasses

    shape = dataclasses.replace(get_shape("olmoe"), num_layers=2)
    torch.manual_seed(0)
    model_class(shape)(shape.config(32, 256)).save_pretrained(tmp_path / "olmoe")
    rng = np.random.default_rng(0)
    windows, token_bytes = rng.integers(0, 256, (2, 16)), np.ones(256, dtype=np.int64)
    bpb = {v: expert_quality.bits_per_byte(tmp_path / "olmoe", "olmoe", windows, token_bytes, v)
           for v in ("fp32", "bf16", "prophet-int4-g32", "prophet-int4-g32-zp", "prophet-int4-g128-zp")}
    assert bpb["prophet-int4-g128-zp"] is None
    assert np.isfinite(bpb["bf16"]) and abs(bpb["bf16"] / bpb["fp32"] - 1) < 1e-3  # (saved in bf16: the same)
    for v in ("prophet-int4-g32", "prophet-int4-g32-zp"):
        assert np.isfinite(bpb[v]) and bpb[v] != bpb["fp32"] and abs(bpb[v] / bpb["fp32"] - 1) < 0.05
    from prophet_kernels.kernels.int4 import dequantize_int4, quantize_int4
    from prophet_kernels.memory.store import expert_modules
    from prophet_kernels.routing.traces.train import evaluate

    model = model_class(shape).from_pretrained(tmp_path / "olmoe", dtype=torch.float32)
    with torch.no_grad():
        for m in expert_modules(model):
            for p in (m.gate_up_proj, m.down_proj):
                p.copy_(dequantize_int4(*quantize_int4(p, 32, zero_points=True)))
    assert evaluate(model, windows, token_bytes) == pytest.approx(bpb["prophet-int4-g32-zp"], rel=1e-5)
    with pytest.raises(ValueError, match="unknown variant 'int3'"):
        expert_quality.bits_per_byte(tmp_path / "olmoe", "olmoe", windows, token_bytes, "int3")


# --- GPTQ and AWQ checkpoints (issue 44 item 3): their packing written out from the formats' own
# pack loops (AutoGPTQ's QuantLinear.pack, AutoAWQ's WQLinear_GEMM.from_linear), one nibble at a time

def _words(values_by_word) -> torch.Tensor:
    """Lists of eight 4-bit values per word (nibble i = bits 4i..4i+3) -> int32, as the packers' uint32 sums."""
    import numpy as np

    out = np.zeros(len(values_by_word), dtype=np.uint32)
    for w, vals in enumerate(values_by_word):
        for i, v in enumerate(vals):
            out[w] |= np.uint32(int(v) & 0xF) << np.uint32(4 * i)
    return torch.from_numpy(out.view(np.int32).copy())


def _gptq_pack(q, z, v1):
    """codes q [N, K] and zero points z [N, K/G] -> qweight [K/8, N], qzeros [K/G, N/8] (AutoGPTQ:
    eight inputs a word down each column; zero points minus one (v1) eight outputs a word)."""
    N, K = q.shape
    qweight = _words([q[n, 8 * r:8 * r + 8].tolist() for r in range(K // 8) for n in range(N)]).reshape(K // 8, N)
    zz = (z.to(torch.int16) - (1 if v1 else 0)).t()  # [K/G, N]
    qzeros = _words([zz[g, 8 * c:8 * c + 8].tolist() for g in range(zz.shape[0]) for c in range(N // 8)])
    return qweight, qzeros.reshape(zz.shape[0], N // 8)


AUTOAWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's: nibble i of word c holds output 8c + order_map[i]


def _awq_pack(q, z):
    """codes q [N, K] and zero points z [N, K/G] -> qweight [K, N/8], qzeros [K/G, N/8] (AutoAWQ GEMM)."""
    N, K = q.shape
    qt, zt = q.t(), z.t()

    def pack(m):
        return _words([[m[r, 8 * c + AUTOAWQ_ORDER_MAP[i]] for i in range(8)]
                       for r in range(m.shape[0]) for c in range(N // 8)]).reshape(m.shape[0], N // 8)
    return pack(qt), pack(zt)


def _random_int4(N, K, group, gen, zero_min=0):
    q = torch.randint(0, 16, (N, K), generator=gen, dtype=torch.uint8)
    z = torch.randint(zero_min, 16, (N, K // group), generator=gen, dtype=torch.uint8)
    s = torch.rand(N, K // group, generator=gen) + 0.1
    return q, z, s


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
def test_gptq_checkpoint_repacked_equals_its_own_dequantization(v1):
    """GPTQ's qweight [K/8, N] and qzeros [K/G, N/8] (stored minus one in v1, a zero point of 0 then
    being stored as 15) read into Prophet's layout give GPTQ's (q - z) x s, weight for weight."""
    from prophet_kernels.kernels.int4 import gptq_int4

    gen = torch.Generator().manual_seed(11)
    N, K, G = 24, 96, 32
    q, z, s = _random_int4(N, K, G, gen)
    z[0, 0] = 0  # (v1 stores it as 15: read back modulo 16)
    qweight, qzeros = _gptq_pack(q, z, v1)
    packed, scale, zeros = gptq_int4(qweight, s.t().half(), qzeros, symmetric=False, v1=v1)
    assert torch.equal(unpack_int4(packed), q) and torch.equal(zeros, z)
    expected = (q.float() - z.float().repeat_interleave(G, 1)) * s.half().float().repeat_interleave(G, 1)
    assert torch.equal(dequantize_int4(packed, scale, zeros), expected)
    # a symmetric checkpoint holds zero point 8 everywhere (v1: 7): read as None; anything else is refused
    q8 = _gptq_pack(q, torch.full_like(z, 8), v1)
    assert gptq_int4(q8[0], s.t(), q8[1], symmetric=True, v1=v1)[2] is None
    with pytest.raises(ValueError, match="marked sym holds zero points other than 8"):
        gptq_int4(q8[0], s.t(), q8[1], symmetric=True, v1=not v1)  # v1 read as v2, or v2 as v1: off by one


def test_awq_checkpoint_repacked_equals_its_own_dequantization():
    """AWQ's qweight [K, N/8] and qzeros [K/G, N/8], interleaved along N, read into Prophet's layout."""
    from prophet_kernels.kernels.int4 import awq_int4, pack_words, unpack_words, AWQ_ORDER

    gen = torch.Generator().manual_seed(12)
    N, K, G = 40, 64, 32
    q, z, s = _random_int4(N, K, G, gen)
    qweight, qzeros = _awq_pack(q, z)
    packed, scale, zeros = awq_int4(qweight, s.t(), qzeros)
    assert torch.equal(unpack_int4(packed), q) and torch.equal(zeros, z) and torch.equal(scale, s)
    # the in-order reading of the same words is not the same matrix (the interleave is not a no-op)
    assert not torch.equal(unpack_words(qweight).t(), q)
    # pack_words (the demo's writer) is unpack_words' inverse, and writes AutoAWQ's words
    assert torch.equal(pack_words(q.t(), AWQ_ORDER), qweight)
    assert torch.equal(unpack_words(pack_words(q.t())), q.t())
    with pytest.raises(TypeError, match="int32"):
        awq_int4(qweight.to(torch.int64), s.t(), qzeros)
