"""FP8 (e4m3) experts (issue 28): the paged kernels with fp8 weights equal a PyTorch reference that
dequantizes the same fp8 weights (fp32 activations: accumulation order only), at shapes that cross
tile edges (T = 1, 3, 33, odd H and I), with scrambled page tables and garbage in the unused slots,
per output channel and block scales, on the grouped and the GEMV paths; quantization's error; the
error contract. CPU: Triton interpreter (fp8 casts and fp32/fp16 dots work there)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import triton
import triton.language as tl

from prophet_kernels import fused_experts, fused_experts_paged, fused_experts_paged_reference, fused_experts_reference
from prophet_kernels.kernels.fp8 import FP8, dequantize_fp8, e4m3_bits_to, quantize_fp8, scale_shape
from prophet_kernels.kernels.weight_format import Quant, WeightFormat

from .test_moe import DEV, GEMV, GROUPED_SMALL, rel_err

BLOCKS = [None, (16, 16), (16, 32), (128, 128)]  # per channel; blocks a K tile of 32/64 spans; one block
BLOCK_IDS = ["per-channel", "block16x16", "block16x32", "block128"]


def experts_fp8(E, H, I, gen, block_shape):
    """fp8 experts quantized from random fp32 weights (rows of different magnitudes, so the scales
    differ), as [E, 2I, H] / [E, H, I] with their scales."""
    w13 = torch.randn(E, 2 * I, H, generator=gen) * H**-0.5 * (0.2 + torch.rand(E, 2 * I, 1, generator=gen))
    w2 = torch.randn(E, H, I, generator=gen) * I**-0.5 * (0.2 + torch.rand(E, H, 1, generator=gen))
    return (*quantize_fp8(w13, block_shape), *quantize_fp8(w2, block_shape))


def scrambled(E, S, gen, q13, s13, q2, s2):
    """The experts in a random placement of S > E slots; the free slots hold random fp8 garbage and
    garbage scales (a read of one would show)."""
    pt = torch.randperm(S, generator=gen)[:E].to(torch.int32)
    slots = []
    for t in (q13, s13, q2, s2):
        junk = (torch.randn((S,) + t.shape[1:], generator=gen) * 50).to(t.dtype)
        junk[pt.long()] = t
        slots.append(junk)
    return slots, pt


def routing(T, E, k, gen):
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k, generator=gen) + 0.1
    return w / w.sum(1, keepdim=True), ids


CASES = [  # (T, H, I, E, k), launch config: decode shapes on both paths, a batch on both tile sizes
    pytest.param((1, 70, 47, 7, 2), GEMV, id="T1-gemv"), pytest.param((1, 70, 47, 7, 2), None, id="T1-default"),
    pytest.param((3, 70, 47, 7, 3), GEMV, id="T3-gemv"), pytest.param((3, 70, 47, 7, 3), None, id="T3-default"),
    pytest.param((33, 40, 24, 5, 2), None, id="T33-default"),
    pytest.param((33, 40, 24, 5, 2), GROUPED_SMALL, id="T33-grouped-small"),
]


@pytest.mark.parametrize("block_shape", BLOCKS, ids=BLOCK_IDS)
@pytest.mark.parametrize("shape,cfg", CASES)
def test_fp8_paged_equals_dequantized_reference(shape, cfg, block_shape):
    T, H, I, E, k = shape
    gen = torch.Generator().manual_seed(hash((T, H, I, E, k, str(block_shape))) % 2**31)
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, block_shape)
    (q13s, s13s, q2s, s2s), pt = scrambled(E, E + 3, gen, q13, s13, q2, s2)
    w, ids = routing(T, E, k, gen)
    for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 5e-3)):
        x = torch.randn(T, H, generator=gen).to(dtype)
        ref = fused_experts_paged_reference(*(t.to(DEV) for t in (x, q13s, q2s, pt, w, ids)), compute_dtype=torch.float64,
                                            w13_scale=s13s.to(DEV), w2_scale=s2s.to(DEV), block_shape=block_shape)
        y = fused_experts_paged(*(t.to(DEV) for t in (x, q13s, q2s, pt, w, ids)), w13_scale=s13s.to(DEV),
                                w2_scale=s2s.to(DEV), block_shape=block_shape, config=cfg)
        assert y.dtype == dtype and y.shape == (T, H)
        assert rel_err(y, ref) < tol, (dtype, rel_err(y, ref))
        # the reference on the dequantized weights as plain fp32 experts: the same numbers
        deq = fused_experts_paged_reference(*(t.to(DEV) for t in (x.float(), dequantize_fp8(q13s, s13s, block_shape),
                                                                  dequantize_fp8(q2s, s2s, block_shape), pt, w, ids)),
                                            compute_dtype=torch.float64)
        assert rel_err(ref.float(), deq) < 1e-3 if dtype == torch.float16 else rel_err(ref, deq) < 1e-12


@pytest.mark.parametrize("block_shape", [None, (16, 16)], ids=["per-channel", "block16x16"])
def test_fp8_contiguous_equals_paged(block_shape):
    """fused_experts on contiguous fp8 experts = the paged op on a permuted buffer, bit for bit (fp32)."""
    gen = torch.Generator().manual_seed(4)
    T, H, I, E, k = 5, 50, 37, 6, 2
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, block_shape)
    (q13s, s13s, q2s, s2s), pt = scrambled(E, E + 2, gen, q13, s13, q2, s2)
    w, ids = routing(T, E, k, gen)
    x = torch.randn(T, H, generator=gen)
    a = fused_experts(*(t.to(DEV) for t in (x, q13, q2, w, ids)), w13_scale=s13.to(DEV), w2_scale=s2.to(DEV),
                      block_shape=block_shape)
    b = fused_experts_paged(*(t.to(DEV) for t in (x, q13s, q2s, pt, w, ids)), w13_scale=s13s.to(DEV),
                            w2_scale=s2s.to(DEV), block_shape=block_shape)
    assert torch.equal(a, b)


@pytest.mark.parametrize("block_shape", [None, (16, 16), (128, 128)], ids=["per-channel", "block16", "block128"])
def test_quantize_round_trip(block_shape):
    """e4m3 keeps 3 mantissa bits: each element within 2**-4 relative of its value (plus the
    subnormal floor of its row or block), the largest of each row/block exact up to rounding."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 40, 70, generator=gen) * (0.01 + torch.rand(3, 40, 1, generator=gen))
    q, s = quantize_fp8(w, block_shape)
    assert q.dtype == FP8 and s.dtype == torch.float32
    assert tuple(s.shape) == (3, *scale_shape(40, 70, block_shape))
    back = dequantize_fp8(q, s, block_shape)
    from prophet_kernels.kernels.fp8 import expand_scale

    step = expand_scale(s, 40, 70, block_shape) * 2.0**-9  # e4m3's smallest subnormal, scaled
    assert bool(((back - w).abs() <= w.abs() * 2.0**-4 + step).all())
    assert 0.005 < rel_err(back, w) < 0.04


def test_fp8_errors_name_the_problem():
    gen = torch.Generator().manual_seed(2)
    T, H, I, E, k = 2, 32, 16, 4, 2
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, None)
    w, ids = routing(T, E, k, gen)
    x = torch.randn(T, H, generator=gen)
    pt = torch.arange(E, dtype=torch.int32)
    with pytest.raises(ValueError, match="w13 is float8_e4m3fn: pass w13_scale"):
        fused_experts_paged(x, q13, q2, pt, w, ids)
    with pytest.raises(ValueError, match=r"w2_scale must be \[4, 32\] for w2 \[4, 32, 16\] with scales per output"):
        fused_experts_paged(x, q13, q2, pt, w, ids, w13_scale=s13, w2_scale=s2[:, :5])
    with pytest.raises(ValueError, match=r"w13_scale must be \[4, 2, 2\] .* blocks of 16x16"):
        fused_experts_paged(x, q13, q2, pt, w, ids, w13_scale=s13, w2_scale=s2, block_shape=(16, 16))
    with pytest.raises(TypeError, match="w13_scale must be a float32 tensor, got torch.float16"):
        fused_experts_paged(x, q13, q2, pt, w, ids, w13_scale=s13.half(), w2_scale=s2)
    with pytest.raises(ValueError, match="w13_scale given for torch.float32 weights"):
        fused_experts_paged(x, q13.float(), q2.float(), pt, w, ids, w13_scale=s13, w2_scale=s2)
    with pytest.raises(TypeError, match="or both be float8_e4m3fn"):
        fused_experts_paged(x, q13, q2.float(), pt, w, ids, w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="block sizes must be powers of two >= 16"):
        fused_experts_paged(x, q13, q2, pt, w, ids, w13_scale=s13, w2_scale=s2, block_shape=(100, 128))
    with pytest.raises(TypeError, match="quantize_fp8 takes fp32/fp16/bf16 weights"):
        quantize_fp8(q13)


# ------------------------------------------------------------------ fp8 experts in ProphetMoE


@pytest.mark.parametrize("mode", ["host", "device"])
@pytest.mark.parametrize("block_shape", [None, (16, 16)], ids=["per-channel", "block16x16"])
def test_prophet_moe_fp8_equals_all_resident(mode, block_shape):
    """ProphetMoE over an fp8 store (quantized as it is built): every layer call equals the
    all-resident fp8 experts (fused_experts on the store's own fp8 weights and scales) to fp32
    rounding, over steps with misses, evictions and prefetches, in both modes; weights and scales
    move as one block per expert."""
    from prophet_kernels import ProphetMoE
    from prophet_kernels.memory.store import fp8_expert_bytes

    gen = torch.Generator().manual_seed(8)
    L, E, H, I, K, T = 3, 8, 40, 24, 2, 3
    w13 = torch.randn(L, E, 2 * I, H, generator=gen) / 7
    w2 = torch.randn(L, E, H, I, generator=gen) / 5
    moe = ProphetMoE.from_weights(w13, w2, 9, device=DEV, mode=mode, expert_dtype="fp8", block_shape=block_shape,
                                  predictor="same")
    st = moe.store
    assert st.dtype == FP8 and st.blocks[0].dtype == torch.uint8 and st.blocks[0].shape == (E, st.expert_bytes)
    assert st.expert_bytes == fp8_expert_bytes(H, I, block_shape) < 3 * H * I * 2  # under half of fp32's, under bf16's
    for step in range(6):
        for layer in range(L):
            x = torch.randn(T, H, generator=gen)
            ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
            w = torch.rand(T, K, generator=gen)
            y = moe.forward(layer, x.to(DEV), w.to(DEV), ids.to(DEV))
            ref = fused_experts(x, st.w13[layer], st.w2[layer], w, ids, w13_scale=st.w13_scale[layer],
                                w2_scale=st.w2_scale[layer], block_shape=block_shape)
            assert rel_err(y.cpu(), ref) < 2e-6, (step, layer)
    s = moe.stats
    assert s.misses > 0 and s.evictions > 0 and s.bytes_h2d == (s.misses + s.prefetched) * st.expert_bytes


def test_fp8_store_bytes_and_refusals():
    """Bytes per expert = fp8 weights + fp32 scales, padded to 16 (printed by the planner and the
    demo); a store of fp8 tensors without scales, or in another layout, is refused by name."""
    from prophet_kernels import HostExpertStore
    from prophet_kernels.memory.store import fp8_expert_bytes

    H, I = 2048, 1024  # OLMoE-1B-7B's expert
    assert fp8_expert_bytes(H, I) == 3 * H * I + 4 * (2 * I + H)  # 6,307,840 (bf16: 12,582,912)
    assert fp8_expert_bytes(H, I, (128, 128)) == 3 * H * I + 4 * (16 * 16 + 16 * 8)
    assert fp8_expert_bytes(40, 24, (16, 16)) == 2944  # 2880 + 60 bytes of scales, padded to 16
    q13, s13, q2, s2 = experts_fp8(4, 32, 16, torch.Generator().manual_seed(0), None)
    with pytest.raises(ValueError, match="fp8 experts need one w13_scale and one w2_scale per layer"):
        HostExpertStore([q13], [q2])
    with pytest.raises(ValueError, match="must be in the one-block layout"):
        HostExpertStore([q13], [q2], [s13], [s2])
    with pytest.raises(ValueError, match="scales go with float8_e4m3fn or int4 weights"):
        HostExpertStore([q13.float()], [q2.float()], [s13], [s2])
    with pytest.raises(ValueError, match="expert_dtype must be None .*, 'fp8', 'int4' or a WeightFormat, got 'int8'"):
        HostExpertStore.from_tensors(q13.float()[None], q2.float()[None], expert_dtype="int8")


def test_simulator_counts_fp8_bytes_and_slots():
    """The simulator with fp8 experts: bytes per copy are the planner's (= the store's) fp8 expert,
    PCIe time per miss scales with them, and the bytes of a bf16 buffer hold twice the slots."""
    from prophet_kernels import load_trace, simulate
    from prophet_kernels.planner import expert_bytes, get_model

    tr = load_trace("olmoe-heldout")
    olmoe = get_model("OLMoE-1B-7B")
    bf16 = simulate(tr, 0.25, "lru", max_steps=16)
    fp8 = simulate(tr, 0.25, "lru", max_steps=16, expert_dtype="fp8")
    same_bytes = simulate(tr, 0.25, "lru", max_steps=16, expert_dtype="fp8", capacity_dtype="bf16")
    assert bf16.slots == fp8.slots == 256 and same_bytes.slots == 256 * 12_582_912 // 6_307_840 == 510
    assert fp8.bytes_h2d == (fp8.misses + fp8.prefetched) * expert_bytes(olmoe, "fp8")
    assert (fp8.misses, fp8.hits) == (bf16.misses, bf16.hits)  # same slots, same decisions
    assert 0.45 < fp8.stall_s / bf16.stall_s < 0.55  # half the bytes per miss
    assert same_bytes.hits > fp8.hits


@pytest.mark.parametrize("block_shape", [None, (16, 16)], ids=["per-channel", "block16"])
def test_tuner_runs_its_fp8_candidates(monkeypatch, block_shape):
    """`bench/tune_moe.py --experts fp8`: every candidate call (grouped gate_up/down, GEMV) goes
    through the fp8 kernels with the experts' scales, and the best is written under the fp8 key.
    The timing is stubbed (no GPU here: the tuner times CUDA graphs), two tiles per candidate list:
    a check of the GPU session's tuning step before device time is spent on it, not a tuning."""
    from bench import tune_moe
    from prophet_kernels.benchmark.common import make_experts
    from prophet_kernels.kernels.launch_config import shape_key

    calls = []
    monkeypatch.setattr(tune_moe, "bench", lambda cs: calls.extend(c() for c in cs) or float(len(calls) % 7))
    tiles = [dict(BN=16, BK=16, num_warps=4, num_stages=2), dict(BN=32, BK=32, num_warps=4, num_stages=2)]
    monkeypatch.setattr(tune_moe, "candidates", lambda rows: ([16], tiles))
    monkeypatch.setattr(tune_moe, "gemv_candidates", lambda: tiles[:1])
    monkeypatch.setattr(tune_moe, "pdl_level", lambda *a: 0)
    shape = dict(E=8, H=32, I=32, k=2)
    w13, w2 = make_experts(8, 32, 32, torch.float32, DEV)
    (q13, s13), (q2, s2) = quantize_fp8(w13, block_shape), quantize_fp8(w2, block_shape)
    for T in (1, 8):  # the GEMV path competes at T=1 (T*k <= E), not at 8
        us, cfg = tune_moe.tune_one(shape, T, torch.float32, torch.device(DEV), q13, q2, rotations=2,
                                    quant=Quant(s13, s2), fmt=WeightFormat("fp8", block_shape=block_shape))
        assert cfg["block_m"] == 16 and us < float("inf")
    assert len(calls) > 20  # (outputs not checked: padded rows of the grouped path are left unwritten)
    key = shape_key(8, 32, 32, 2, torch.float32, WeightFormat("fp8", block_shape=block_shape))
    assert ",weights=float8_e4m3fn" in key and (",block=16x16" in key) == (block_shape is not None)


def test_tuner_times_w8a8_where_asked(monkeypatch, capsys):
    """`tune_moe.py --experts fp8 --a8 all`: the grouped search runs again with e4m3 activations (the
    kernels get x's scales), printed as W8A8 beside W8A16; "off", or block scales narrower than a
    32-wide K tile, time W8A16 only. (Timing stubbed, as above.)"""
    from bench import tune_moe
    from prophet_kernels.benchmark.common import make_experts

    monkeypatch.setattr(tune_moe, "bench", lambda cs: [c() for c in cs] and 1.0)
    tiles = [dict(BN=16, BK=16, num_warps=4, num_stages=2), dict(BN=32, BK=32, num_warps=4, num_stages=2)]
    monkeypatch.setattr(tune_moe, "candidates", lambda rows: ([16], tiles))
    a8_calls = []
    real = tune_moe.launch_gate_up
    monkeypatch.setattr(tune_moe, "launch_gate_up", lambda *a, **kw: a8_calls.append("x_scale" in kw) or real(*a, **kw))
    shape = dict(E=8, H=64, I=32, k=2)
    w13, w2 = make_experts(8, 64, 32, torch.float32, DEV)
    for block_shape, a8, timed in ((None, "all", True), (None, "off", False), ((16, 16), "all", False),
                                   ((32, 32), "prefill", False)):  # 8 tokens x 2 / 8 experts: not prefill
        (q13, s13), (q2, s2) = quantize_fp8(w13, block_shape), quantize_fp8(w2, block_shape)
        a8_calls.clear()
        tune_moe.tune_one(shape, 8, torch.float32, torch.device(DEV), q13, q2, rotations=2, quant=Quant(s13, s2),
                          fmt=WeightFormat("fp8", block_shape=block_shape), a8=a8)
        out = capsys.readouterr().out
        assert ("W8A8" in out) == timed and any(a8_calls) == timed, (block_shape, a8, out)
        assert not all(a8_calls)  # W8A16 is always timed


@triton.jit
def _decode_all(src, dst32, dst16, dstb16):
    i = tl.arange(0, 256)
    v = tl.load(src + i)
    tl.store(dst32 + i, e4m3_bits_to(v, tl.float32))
    tl.store(dst16 + i, e4m3_bits_to(v, tl.float16))
    tl.store(dstb16 + i, e4m3_bits_to(v, tl.bfloat16))


def test_e4m3_bits_decode_is_exact():
    """The decode of GPUs without an fp8 type (A100: ``load_weights_as`` with FP8_BITS) gives every
    one of the 256 e4m3fn bytes exactly torch's value, into fp32, fp16 and bf16: the two NaN bytes
    (0x7f, 0xff) decode to NaN, not to a finite +-480."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    outs = [torch.empty(256, dtype=d, device=DEV) for d in (torch.float32, torch.float16, torch.bfloat16)]
    _decode_all[(1,)](bits.to(DEV), *outs)
    want = bits.view(FP8).float()
    nan = want.isnan()
    assert nan.sum() == 2 and bits[nan].tolist() == [0x7F, 0xFF]
    for out in outs:  # (every e4m3 value fits fp16 and bf16 exactly)
        got = out.cpu().float()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), out.dtype


def test_fp8_nan_weight_propagates_on_the_bytes_path(monkeypatch):
    """An expert weight that is the e4m3 NaN byte gives NaN in the tokens routed to that expert on the
    bytes path (A100), as in the torch reference (and on an fp8 GPU), and leaves the others as the
    reference has them (it decoded to a finite +-480 before)."""
    import prophet_kernels.kernels.fp8 as fp8

    torch.manual_seed(3)
    E, H, I, T, k = 4, 32, 32, 6, 1
    w13, s13 = quantize_fp8(torch.randn(E, 2 * I, H, device=DEV) * 0.05)
    w2, s2 = quantize_fp8(torch.randn(E, H, I, device=DEV) * 0.05)
    w13.view(torch.uint8)[2, 5, 7] = 0x7F  # a NaN weight in expert 2's gate rows
    x = torch.randn(T, H, device=DEV)
    ids = torch.tensor([[0], [2], [1], [2], [3], [0]], dtype=torch.int32, device=DEV)
    wts = torch.ones(T, k, device=DEV)
    ref = fused_experts_reference(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2)
    routed = (ids == 2).any(1).cpu()
    assert ref.isnan().any(1).cpu().equal(routed)
    native = fused_experts(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2)
    launched, real = [], WeightFormat.kernel_args
    monkeypatch.setattr(fp8, "has_fp8_type", lambda device: False)  # the A100's path: bytes decoded in-kernel
    monkeypatch.setattr(WeightFormat, "kernel_args",
                        lambda self, *a: launched.append(real(self, *a)[3]["FP8_BITS"]) or real(self, *a))
    bytes_path = fused_experts(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2)
    assert launched and all(launched)
    # (the Triton interpreter's own fp8 load turns the NaN byte into a finite value, which no GPU does:
    # the fp8-type path is held to the reference on a GPU only)
    for out in (native, bytes_path) if DEV == "cuda" else (bytes_path,):
        assert out.isnan().any(1).cpu().equal(routed)
        assert torch.allclose(out[~routed.to(out.device)], ref[~routed.to(ref.device)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_shape", [None, (16, 16)], ids=["per-channel", "block16x16"])
@pytest.mark.parametrize("shape,cfg", [CASES[0], CASES[4], CASES[5]])
def test_fp8_bytes_path_equals_fp8_type_path(monkeypatch, shape, cfg, block_shape):
    """Where the GPU has no fp8 type (compute capability < 8.9: A100), the kernels read the weights
    as uint8 and decode them (``fp8.has_fp8_type`` False): the results equal the fp8-type path's bit
    for bit (fp32 activations), GEMV and grouped paths, both scale layouts."""
    import prophet_kernels.kernels.fp8 as fp8

    T, H, I, E, k = shape
    gen = torch.Generator().manual_seed(11)
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, block_shape)
    (q13s, s13s, q2s, s2s), pt = scrambled(E, E + 3, gen, q13, s13, q2, s2)
    w, ids = routing(T, E, k, gen)
    args = [t.to(DEV) for t in (torch.randn(T, H, generator=gen), q13s, q2s, pt, w, ids)]
    kw = dict(w13_scale=s13s.to(DEV), w2_scale=s2s.to(DEV), block_shape=block_shape, config=cfg)
    native = fused_experts_paged(*args, **kw)
    launched = []
    real = WeightFormat.kernel_args
    monkeypatch.setattr(fp8, "has_fp8_type", lambda device: False)
    monkeypatch.setattr(WeightFormat, "kernel_args",  # (count the bytes-path launches)
                        lambda self, *a: launched.append(real(self, *a)[3]["FP8_BITS"]) or real(self, *a))
    bits = fused_experts_paged(*args, **kw)
    assert launched and all(launched)
    assert torch.equal(bits, native)


# W8A8 (issue 28): the grouped path with e4m3 activations (a scale per token, then per intermediate
# row) and fp8 x fp8 dots, where a launch config asks for it ("a8") and the GPU has an fp8 type
A8 = {"a8": True, "block_m": 16, "gate_up": {"BN": 16, "BK": 32, "GROUP_M": 2}, "down": {"BN": 32, "BK": 32, "GROUP_M": 2}}
A8_BLOCKS = [None, (16, 32), (128, 128)]  # fp8 dots take K tiles of 32: blocks at least 32 wide in K


@pytest.mark.parametrize("block_shape", A8_BLOCKS, ids=["per-channel", "block16x32", "block128"])
@pytest.mark.parametrize("T", [1, 3, 33])
def test_w8a8_equals_reference_with_quantized_activations(T, block_shape):
    H, I, E, k = 70, 47, 7, 2  # odd H and I: ragged K and N tiles
    gen = torch.Generator().manual_seed(1000 * T + (block_shape or (0,))[0])
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, block_shape)
    (q13s, s13s, q2s, s2s), pt = scrambled(E, E + 3, gen, q13, s13, q2, s2)
    w, ids = routing(T, E, k, gen)
    w8a16 = {key: v for key, v in A8.items() if key != "a8"}
    for dtype, tol in ((torch.float32, 2e-6), (torch.float16, 5e-3)):
        x = torch.randn(T, H, generator=gen).to(dtype) * (0.5 + torch.rand(T, 1, generator=gen)).to(dtype)
        args = [t.to(DEV) for t in (x, q13s, q2s, pt, w, ids)]
        kw = dict(w13_scale=s13s.to(DEV), w2_scale=s2s.to(DEV), block_shape=block_shape)
        ref = fused_experts_paged_reference(*args, compute_dtype=torch.float64, quantize_activations=True, **kw)
        y = fused_experts_paged(*args, config=A8, **kw)
        assert y.dtype == dtype and y.shape == (T, H)
        assert rel_err(y, ref) < tol, (dtype, rel_err(y, ref))
        # the activations' rounding is real (a8 is not ignored), and small next to the result
        plain = fused_experts_paged(*args, config=w8a16, **kw)
        assert 1e-4 < rel_err(y, plain) < 0.1, rel_err(y, plain)


def test_w8a8_runs_w8a16_where_the_gpu_has_no_fp8_type(monkeypatch):
    """An "a8" config on a GPU without an fp8 type (A100: the bytes path), with unquantized experts
    or with block scales narrower than a 32-wide K tile runs W8A16: the same result as without the
    flag, bit for bit."""
    from prophet_kernels.kernels import fp8 as fp8_module

    T, H, I, E, k = 5, 64, 48, 6, 2
    gen = torch.Generator().manual_seed(5)
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, None)
    w, ids = routing(T, E, k, gen)
    x = torch.randn(T, H, generator=gen)
    w8a16 = {key: v for key, v in A8.items() if key != "a8"}
    monkeypatch.setattr(fp8_module, "has_fp8_type", lambda device: False)
    y = fused_experts(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, config=A8)
    assert torch.equal(y, fused_experts(x, q13, q2, w, ids, w13_scale=s13, w2_scale=s2, config=w8a16))
    monkeypatch.undo()
    w13, w2 = dequantize_fp8(q13, s13), dequantize_fp8(q2, s2)
    assert torch.equal(fused_experts(x, w13, w2, w, ids, config=A8), fused_experts(x, w13, w2, w, ids, config=w8a16))
    q13, s13, q2, s2 = experts_fp8(E, H, I, gen, (16, 16))
    kw = dict(w13_scale=s13, w2_scale=s2, block_shape=(16, 16))
    assert torch.equal(fused_experts(x, q13, q2, w, ids, config=A8, **kw),
                       fused_experts(x, q13, q2, w, ids, config=w8a16, **kw))


@settings(max_examples=60, deadline=None)
@given(bn=st.sampled_from([16, 32, 64, 128]), bk=st.sampled_from([16, 32, 64, 128]),
       form=st.sampled_from(["tuple", "list", "tensor", "ndarray", "floats"]))
def test_block_shape_forms_are_one_tuple_of_ints(bn, bk, form):
    """Whatever container holds two whole block sizes, the kernels and references get (bn, bk) as ints
    (a tensor or float form used to pass the checks and reach the launch as is)."""
    import numpy as np

    from prophet_kernels.kernels.fp8 import check_block_shape

    given_shape = {"tuple": (bn, bk), "list": [bn, bk], "tensor": torch.tensor([bn, bk]),
                   "ndarray": np.array([bn, bk]), "floats": (float(bn), float(bk))}[form]
    got = check_block_shape(given_shape)
    assert got == (bn, bk) and all(type(b) is int for b in got)


@settings(max_examples=60, deadline=None)
@given(bad=st.one_of(
    st.tuples(st.floats(16, 256).filter(lambda f: f != int(f)), st.sampled_from([16, 128])),  # 128.5: never truncated
    st.tuples(st.sampled_from([16, 128]), st.floats(16, 256).filter(lambda f: f != int(f))),
    st.lists(st.sampled_from([16, 32]), min_size=0, max_size=5).filter(lambda v: len(v) != 2),
    st.tuples(st.booleans(), st.just(16)),
    st.sampled_from(["ab", 16, (16, None), (float("nan"), 16), (float("inf"), 16)])))
def test_block_shape_fractions_and_nonsense_are_refused(bad):
    from prophet_kernels.kernels.fp8 import check_block_shape

    with pytest.raises(ValueError, match="block_shape"):
        check_block_shape(bad)


def test_fused_experts_takes_a_tensor_block_shape():
    """The same fp8 blocks given as a tensor and as a tuple give the same output on every path (the
    kernels and the torch reference), and a fractional one is refused before any launch."""
    torch.manual_seed(5)
    E, H, I, T, k = 3, 32, 32, 5, 2
    w13, s13 = quantize_fp8(torch.randn(E, 2 * I, H, device=DEV) * 0.05, (16, 16))
    w2, s2 = quantize_fp8(torch.randn(E, H, I, device=DEV) * 0.05, (16, 16))
    x = torch.randn(T, H, device=DEV)
    ids = torch.randint(0, E, (T, k), dtype=torch.int32, device=DEV)
    wts = torch.rand(T, k, device=DEV)
    want = fused_experts(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2, block_shape=(16, 16))
    got = fused_experts(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2, block_shape=torch.tensor([16, 16]))
    ref = fused_experts_reference(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2, block_shape=[16.0, 16.0])
    assert torch.equal(got, want) and torch.allclose(ref, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="two whole numbers"):
        fused_experts_reference(x, w13, w2, wts, ids, w13_scale=s13, w2_scale=s2, block_shape=(16.5, 16.9))
