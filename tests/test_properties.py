"""Property-based tests (hypothesis) over the public kernel API and ProphetMoE: random shapes,
routings (ids in and out of range, int32 and int64), page tables (scrambled, strided, with experts
missing or sharing a slot, garbage in unused slots) and hostile arguments. Every call either raises
a clear ValueError/TypeError or equals an independent PyTorch reference (a float64 loop over
token-slots, written here); after a refused call, ProphetMoE's state and counters are as before.

Examples per test: PROPHET_HYPOTHESIS_EXAMPLES (default 25, derandomized so CI is reproducible;
set PROPHET_HYPOTHESIS_RANDOM=1 to explore new examples)."""

import dataclasses
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from prophet_kernels import ProphetMoE, fused_experts, fused_experts_paged, fused_experts_reference  # noqa: E402
from tests.test_moe import DEV, GEMV  # noqa: E402

EXAMPLES = int(os.environ.get("PROPHET_HYPOTHESIS_EXAMPLES", "25"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    derandomize=os.environ.get("PROPHET_HYPOTHESIS_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HOSTILE = ["none", "ids float", "page table int64", "x hidden", "x dtype", "weights shape", "w2 shape", "k > E"]


def loop_reference(x, w13s, w2s, pt, w, ids):
    """y[t] = sum over token-slots (t, j) whose id e is in [0, E) and whose slot s = pt[e] is in
    [0, S) of w[t, j] * W2[s] (silu(Wg[s] x[t]) * Wu[s] x[t]), in float64; the rest contribute 0."""
    T, H = x.shape
    S, E = w13s.shape[0], pt.shape[0]
    I = w13s.shape[1] // 2
    y = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if not 0 <= e < E or not 0 <= int(pt[e]) < S:
                continue
            s = int(pt[e])
            h = w13s[s].double() @ x[t].double()
            a = torch.nn.functional.silu(h[:I]) * h[I:]
            y[t] += float(w[t, j]) * (w2s[s].double() @ a)
    return y


@st.composite
def kernel_case(draw):
    T = draw(st.integers(0, 9))
    H = draw(st.integers(1, 40))
    I = draw(st.integers(1, 24))
    E = draw(st.integers(1, 10))
    k = draw(st.integers(1, min(E, 4)))
    S = draw(st.integers(1, E + 3))
    return dict(T=T, H=H, I=I, E=E, k=k, S=S, seed=draw(st.integers(0, 2**31 - 1)),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                gemv=draw(st.booleans()), check=draw(st.booleans()), int64=draw(st.booleans()),
                bad_ids=draw(st.sampled_from([0, 0, 1, 2])), huge=draw(st.booleans()),
                holes=draw(st.integers(0, 2)), share=draw(st.booleans()), strided=draw(st.booleans()),
                contiguous_op=draw(st.booleans()), hostile=draw(st.sampled_from(["none"] * 14 + HOSTILE[1:])))


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    T, H, I, E, k, S = c["T"], c["H"], c["I"], c["E"], c["k"], c["S"]
    x = torch.randn(T, H, generator=g)
    w13s = torch.randn(S, 2 * I, H, generator=g) * H**-0.5  # every slot random: garbage where no expert lives
    w2s = torch.randn(S, H, I, generator=g) * I**-0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    for _ in range(c["bad_ids"] if T else 0):  # ids out of range: -1, E, or one that int32 would alias
        t, j = int(torch.randint(T, (1,), generator=g)), int(torch.randint(k, (1,), generator=g))
        ids[t, j] = (2**32 + 1 if c["huge"] and c["int64"] else [-1, E][int(torch.randint(2, (1,), generator=g))])
    ids = ids if c["int64"] else ids.to(torch.int32)
    w = torch.rand(T, k, generator=g) + 0.05
    pt = torch.full((E,), -1, dtype=torch.int32)
    placed = torch.randperm(E, generator=g)[: min(E, S)]
    pt[placed] = torch.randperm(S, generator=g)[: len(placed)].to(torch.int32)
    for _ in range(c["holes"]):  # a routed expert may lose its slot, or point past the buffer
        pt[int(torch.randint(E, (1,), generator=g))] = [-1, S][int(torch.randint(2, (1,), generator=g))]
    if c["share"] and E > 1:
        pt[1] = pt[0] if pt[0] >= 0 else 0
    return x, w13s, w2s, pt, w, ids


def expected_refusal(x, w13s, w2s, pt, w, ids, check):
    """Whether check=True must refuse this routing (an id outside [0, E), a routed expert without a
    slot in [0, S), or two experts given one slot)."""
    if not check or ids.numel() == 0:
        return False
    E, S = pt.shape[0], w13s.shape[0]
    flat = ids.reshape(-1).tolist()
    if any(not 0 <= e < E for e in flat):
        return True
    if any(not 0 <= int(pt[e]) < S for e in flat):
        return True
    held = [int(s) for s in pt if s >= 0]
    return len(held) != len(set(held))


def hostile_args(c, x, w13s, w2s, pt, w, ids):
    """One argument made wrong in a way the host-side checks must name."""
    h = c["hostile"]
    if h == "ids float":
        ids = ids.float()
    elif h == "page table int64":
        pt = pt.long()
    elif h == "x hidden":
        x = torch.randn(x.shape[0], x.shape[1] + 1)
    elif h == "x dtype":
        x = x.double()
    elif h == "weights shape":
        w = w[:, :0] if w.shape[1] > 1 else torch.rand(w.shape[0], 2)
    elif h == "w2 shape":
        w2s = w2s[:, :, :-1] if w2s.shape[2] > 1 else torch.randn(w2s.shape[0], w2s.shape[1], 2)
    elif h == "k > E":
        ids = torch.zeros(x.shape[0], pt.shape[0] + 1, dtype=torch.int32)
        w = torch.rand(x.shape[0], pt.shape[0] + 1)
    return x, w13s, w2s, pt, w, ids


@SETTINGS
@given(kernel_case())
def test_kernel_ops_raise_or_equal_the_reference(c):
    x, w13s, w2s, pt, w, ids = build(c)
    dtype = c["dtype"]
    x, w13s, w2s = x.to(dtype), w13s.to(dtype), w2s.to(dtype)
    cfg = GEMV if c["gemv"] else None
    if c["hostile"] != "none":
        args = hostile_args(c, x, w13s, w2s, pt, w, ids)
        with pytest.raises((ValueError, TypeError)):
            fused_experts_paged(*(t.to(DEV) for t in args), check=c["check"], config=cfg)
        return
    if c["contiguous_op"] and pt.shape[0] == w13s.shape[0]:  # fused_experts: expert e in slot e
        pt = torch.arange(w13s.shape[0], dtype=torch.int32)
        run = lambda check: fused_experts(*(t.to(DEV) for t in (x, w13s, w2s, w, ids)), check=check,  # noqa: E731
                                          config=cfg)
    else:
        page = pt
        if c["strided"]:  # a strided view; the gaps hold -7, which a read ignoring the stride would see
            wide = torch.full((2 * pt.shape[0],), -7, dtype=torch.int32)
            wide[::2] = pt
            page = wide[::2]
        run = lambda check: fused_experts_paged(*(t.to(DEV) for t in (x, w13s, w2s, page, w, ids)),  # noqa: E731
                                                check=check, config=cfg)
    if expected_refusal(x, w13s, w2s, pt, w, ids, c["check"]):
        with pytest.raises(ValueError):
            run(True)
        return
    want = loop_reference(x, w13s, w2s, pt, w, ids)
    got = run(c["check"])
    assert got.shape == (x.shape[0], x.shape[1]) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    assert torch.allclose(got.double().cpu(), want, atol=tol * scale, rtol=tol)


# ------------------------------------------------------------------ ProphetMoE

L, E, H, I, K = 3, 6, 12, 8, 2


def snapshot(moe):
    return ([dataclasses.asdict(s) for s in moe.residency.stats.layers], list(moe.buffer.owner),
            list(moe.buffer.pins), [list(r) for r in moe.buffer._table], moe.buffer.page_table.clone(),
            set(moe.residency._unread_prefetch))


def same(a, b):
    return all(torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q for p, q in zip(a, b))


call = st.fixed_dictionaries(dict(
    layer=st.integers(-1, L), T=st.integers(0, 5), seed=st.integers(0, 2**31 - 1),
    hostile=st.sampled_from(["none"] * 4 + ["bad id", "huge id", "x dtype", "x hidden", "ids float", "layer float",
                                            "weights shape", "repeat"])))


@SETTINGS
@given(slots=st.integers(K * 4, L * E + 3), policy=st.sampled_from(["lru", "lfu", "cyclic", "next-use"]),
       predictor=st.sampled_from([None, "same"]), calls=st.lists(call, min_size=1, max_size=8))
def test_prophet_moe_refuses_cleanly_or_equals_all_resident(monkeypatch_module, slots, policy, predictor, calls):
    """A sequence of layer calls, good and hostile, on the PyTorch path: a good call equals the
    all-resident reference exactly (fp32) and leaves no pin held; a hostile one raises ValueError or
    TypeError and changes nothing (counters, owners, pins, page table)."""
    g = torch.Generator().manual_seed(slots * 7 + len(calls))
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # more slots than experts: capped with a warning (tested elsewhere)
        moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", policy=policy, predictor=predictor)
    assert moe.buffer.num_slots == min(slots, L * E)
    for c in calls:
        gc = torch.Generator().manual_seed(c["seed"])
        layer, T = c["layer"], c["T"]
        x = torch.randn(T, H, generator=gc)
        w = torch.rand(T, K, generator=gc)
        ids = torch.stack([torch.randperm(E, generator=gc)[:K] for _ in range(T)]).to(torch.int32) if T else \
            torch.zeros(0, K, dtype=torch.int32)
        h = c["hostile"]
        bad = not 0 <= layer < L
        if h == "bad id" and T:
            ids[0, 0], bad = E, True
        elif h == "huge id" and T:
            ids, bad = ids.long(), True
            ids[-1, -1] = 2**32 + 1
        elif h == "x dtype":
            x, bad = x.double(), True
        elif h == "x hidden":
            x, bad = torch.randn(T, H + 1), True
        elif h == "ids float":
            ids, bad = ids.float(), True
        elif h == "layer float":
            layer, bad = float(max(0, min(layer, L - 1))), True
        elif h == "weights shape":
            w, bad = torch.rand(T, K + 1), True
        elif h == "repeat" and T:
            ids[0, 1] = ids[0, 0]  # a token routed twice to one expert: allowed (its weights add up)
        before = snapshot(moe)
        if bad:
            with pytest.raises((ValueError, TypeError)):
                moe.forward(layer, x, w, ids)
            assert same(before, snapshot(moe)), f"refused call ({h}, layer {layer}) changed the state"
            continue
        y = moe.forward(layer, x, w, ids)
        assert torch.equal(y, fused_experts_reference(x, w13[layer], w2[layer], w, ids))
        assert moe.buffer.pins == [0] * moe.buffer.num_slots
        for l in range(L):
            row = moe.buffer.upload_row(l)
            assert row.tolist() == [moe.buffer.lookup(l, e) for e in range(E)]
    s = moe.stats
    assert s.bytes_h2d == (s.misses + s.prefetched) * moe.store.expert_bytes and 0 <= s.prefetch_used <= s.prefetched


@pytest.fixture(scope="module")
def monkeypatch_module():
    """ProphetMoE's PyTorch path (exact, fast); the Triton kernels behind it have their own tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        yield


FP8_HOSTILE = ["none", "no w2 scale", "scale shape", "scale dtype", "block shape", "weights not fp8", "scale device"]


@st.composite
def fp8_case(draw):
    return dict(T=draw(st.integers(1, 6)), H=draw(st.integers(1, 40)), I=draw(st.integers(1, 24)),
                E=draw(st.integers(1, 6)), block=draw(st.sampled_from([None, (16, 16), (16, 32), (32, 16)])),
                seed=draw(st.integers(0, 2**31 - 1)), gemv=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])), hostile=draw(st.sampled_from(FP8_HOSTILE)))


@SETTINGS
@given(fp8_case())
def test_fp8_kernel_ops_raise_or_equal_the_reference(c):
    """fp8 experts (issue 28): any shape and scale layout equals the float64 loop over the same fp8
    values dequantized; a hostile scale argument raises a ValueError/TypeError that names it."""
    from prophet_kernels.kernels.fp8 import dequantize_fp8, quantize_fp8

    g = torch.Generator().manual_seed(c["seed"])
    T, H, I, E, block = c["T"], c["H"], c["I"], c["E"], c["block"]
    k = min(E, 2)
    q13, s13 = quantize_fp8(torch.randn(E, 2 * I, H, generator=g), block)
    q2, s2 = quantize_fp8(torch.randn(E, H, I, generator=g), block)
    x = torch.randn(T, H, generator=g).to(c["dtype"])
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)
    w = torch.rand(T, k, generator=g)
    pt = torch.randperm(E, generator=g).to(torch.int32)
    q13s, q2s, s13s, s2s = (torch.empty_like(t) for t in (q13, q2, s13, s2))
    for t, src in ((q13s, q13), (q2s, q2), (s13s, s13), (s2s, s2)):
        t[pt.long()] = src
    kw = dict(w13_scale=s13s, w2_scale=s2s, block_shape=block)
    h = c["hostile"]
    if h == "no w2 scale":
        kw["w2_scale"] = None
    elif h == "scale shape":
        kw["w13_scale"] = s13s[..., :-1] if s13s.shape[-1] > 1 else s13s[:, None]
    elif h == "scale dtype":
        kw["w2_scale"] = s2s.double()
    elif h == "block shape":
        kw["block_shape"] = (24, 16)
    elif h == "scale device":
        kw["w13_scale"] = s13s.to("meta")
    args = [t.to(DEV) for t in (x, q13s if h != "weights not fp8" else q13s.float(), q2s, pt, w, ids)]
    kw = {n: (v.to(DEV) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v) for n, v in kw.items()}
    if h != "none":
        with pytest.raises((ValueError, TypeError), match="scale|float8|block"):
            fused_experts_paged(*args, **kw, config=GEMV if c["gemv"] else None)
        return
    y = fused_experts_paged(*args, **kw, config=GEMV if c["gemv"] else None)
    want = loop_reference(x, dequantize_fp8(q13s, s13s, block), dequantize_fp8(q2s, s2s, block), pt, w, ids)
    tol = 1e-5 if c["dtype"] == torch.float32 else 2e-2
    torch.testing.assert_close(y.cpu().double(), want.to(y.dtype).double(), rtol=tol, atol=tol * (1 + want.abs().max()))


# ------------------------------------------------------------------ expert parallelism (issue 29)

MAP_HOSTILE = ["none"] * 4 + ["duplicate", "missing", "below -1", "float", "2-D"]


@SETTINGS
@given(ranks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["host", "device"]),
       predictor=st.sampled_from([None, "same"]), hostile=st.sampled_from(MAP_HOSTILE),
       steps=st.lists(st.tuples(st.integers(0, L - 1), st.integers(1, 4), st.booleans()), min_size=1, max_size=6))
def test_expert_parallel_ranks_refuse_bad_maps_or_add_up(monkeypatch_module, ranks, seed, mode, predictor, hostile,
                                                          steps):
    """Random placements of E experts over 1-3 ranks (vLLM's expert_map convention), random routings
    (some with an id outside [0, E)), with or without a predictor, in both modes: a malformed map is
    refused by name at construction; otherwise the ranks' outputs add up to the all-resident output
    (fp32) and each rank's counters count only its own experts; a routing with an out-of-range id is
    refused in host mode with every rank's counters unchanged (device mode, which reads nothing
    back, drops the id, as the kernels do)."""
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g), torch.randn(L, E, H, I, generator=g) / 4
    owner = torch.cat([torch.arange(ranks), torch.randint(0, ranks, (E - ranks,), generator=g)])[torch.randperm(E, generator=g)]
    moes = []
    for r in range(ranks):
        mine = (owner == r).nonzero().flatten()
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[mine] = torch.randperm(len(mine), generator=g).to(torch.int32)  # any local order
        if r == 0 and hostile != "none":
            emap = {"duplicate": emap.masked_fill(emap == emap.max(), 0) if len(mine) > 1 else emap.masked_fill(
                        emap < 0, 0),
                    "missing": emap.masked_fill(emap == emap.max(), -1),
                    "below -1": emap.masked_fill(emap < 0, -2) if ranks > 1 else emap - 2,
                    "float": emap.float(), "2-D": emap[None]}[hostile]
            with pytest.raises(ValueError, match="expert_map must"):
                ProphetMoE.from_weights(w13[:, mine], w2[:, mine], len(mine) * L, device="cpu", mode=mode,
                                        expert_map=emap)
            return
        order = torch.argsort(emap[mine])  # store index i holds the global expert mine[order[i]]
        local = mine[order]
        moes.append(ProphetMoE.from_weights(w13[:, local], w2[:, local], max(K, len(mine) * L // 2 + 1), device="cpu",
                                            mode=mode, expert_map=emap, predictor=predictor))
    unique = 0  # unique experts of the calls served: each counted once, as a hit or a miss, by its rank
    for layer, T, out_of_range in steps:
        x = torch.randn(T, H, generator=g)
        w = torch.rand(T, K, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if out_of_range:
            ids[-1, -1] = E
            if mode == "host":
                before = [[dataclasses.asdict(s) for s in m.residency.stats.layers] for m in moes]
                for m in moes:
                    with pytest.raises(ValueError, match="outside"):
                        m.forward(layer, x, w, ids)
                assert before == [[dataclasses.asdict(s) for s in m.residency.stats.layers] for m in moes]
                continue
        y = sum(m.forward(layer, x, w, ids) for m in moes)
        keep = (ids >= 0) & (ids < E)
        unique += len(set(ids[keep].tolist()))
        want = fused_experts_reference(x, w13[layer], w2[layer], w * keep, ids.clamp(0, E - 1))
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert sum(m.stats.hits + m.stats.misses for m in moes) == unique
    assert [m.store.num_experts for m in moes] == [int((owner == r).sum()) for r in range(ranks)]
