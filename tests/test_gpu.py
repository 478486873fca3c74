"""GPU checks at the benchmark shapes (bf16): paged and contiguous ops against the fp32 reference,
eagerly and replayed from a CUDA graph. Skipped without a GPU."""

import pytest
import torch

from prophet_kernels.benchmark.common import BATCH_SIZES, MOE_SHAPES, make_experts, paged_copy, random_routing
from prophet_kernels import fused_experts, fused_experts_paged, fused_experts_reference, route_plan
from prophet_kernels import route_plan_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

_weights = {}


def _experts(name):
    if name not in _weights:
        _weights.clear()
        s = MOE_SHAPES[name]
        w13, w2 = make_experts(s["E"], s["H"], s["I"], torch.bfloat16, "cuda", seed=7)
        _weights[name] = (w13, w2) + paged_copy(w13, w2, num_slots=s["E"] + 3, seed=3)
    return _weights[name]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(MOE_SHAPES))
@pytest.mark.parametrize("T", BATCH_SIZES)
def test_bf16_matches_reference(name, T):
    s = MOE_SHAPES[name]
    w13, w2, w13s, w2s, pt = _experts(name)
    x = torch.randn(T, s["H"], device="cuda", dtype=torch.bfloat16)
    ids, w = random_routing(T, s["E"], s["k"], "cuda")
    ref = fused_experts_reference(x, w13, w2, w, ids)  # fp32 compute
    y_paged = fused_experts_paged(x, w13s, w2s, pt, w, ids)
    y_contig = fused_experts(x, w13, w2, w, ids)
    assert torch.isfinite(y_paged).all()
    assert rel_err(y_paged, ref) < 1e-2
    assert rel_err(y_contig, ref) < 1e-2


@pytest.mark.parametrize("name", list(MOE_SHAPES))
@pytest.mark.parametrize("T", BATCH_SIZES)
def test_route_plan_gpu_equals_reference(name, T):
    s = MOE_SHAPES[name]
    ids, _ = random_routing(T, s["E"], s["k"], "cuda")
    pt = torch.randperm(s["E"], device="cuda").to(torch.int32)
    for bm in (16, 64):
        a, b = route_plan(ids, s["E"], bm, pt), route_plan_reference(ids, s["E"], bm, pt)
        for f in ("counts", "offsets", "padded_offsets", "sorted_ids", "block_expert",
                  "block_slot", "unique_experts", "miss_experts", "status"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


@pytest.mark.parametrize("name", list(MOE_SHAPES))
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_cuda_graph_replay(name, T):
    """Capture once, then replay on new inputs copied into the static buffers."""
    s = MOE_SHAPES[name]
    w13, w2, w13s, w2s, pt = _experts(name)
    x = torch.randn(T, s["H"], device="cuda", dtype=torch.bfloat16)
    ids, w = random_routing(T, s["E"], s["k"], "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_experts_paged(x, w13s, w2s, pt, w, ids)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = fused_experts_paged(x, w13s, w2s, pt, w, ids)
    for _ in range(3):
        ids2, w2_ = random_routing(T, s["E"], s["k"], "cuda")
        x.copy_(torch.randn_like(x))
        ids.copy_(ids2)
        w.copy_(w2_)
        y.fill_(float("nan"))  # poison: every element must be rewritten by the replay
        g.replay()
        ref = fused_experts_reference(x, w13, w2, w, ids)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("name", list(MOE_SHAPES))
@pytest.mark.parametrize("pdl", [0, 1, 2])
def test_gemv_pdl_levels(name, pdl):
    """The decode path with down launched as a programmatic dependent of gate_up (levels 1, 2)
    computes the same function, eagerly and replayed from a graph."""
    from prophet_kernels.kernels.gemv import gemv_experts

    s = MOE_SHAPES[name]
    w13, w2, w13s, w2s, pt = _experts(name)
    cfg = {"gate_up": dict(BN=16, BK=128, num_warps=8, num_stages=4),
           "down": dict(BN=8, BK=256, num_warps=4, num_stages=2, pdl=pdl)}
    for T in (1, 4):
        x = torch.randn(T, s["H"], device="cuda", dtype=torch.bfloat16)
        ids, w = random_routing(T, s["E"], s["k"], "cuda")
        run = lambda: gemv_experts(x, w13s, w2s, pt, w.reshape(-1).contiguous(), ids, s["E"], cfg)  # noqa: E731
        y = run()
        assert rel_err(y, fused_experts_reference(x, w13, w2, w, ids)) < 1e-2
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            yg = run()
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            ids.copy_(random_routing(T, s["E"], s["k"], "cuda")[0])
            yg.fill_(float("nan"))
            g.replay()
            assert rel_err(yg, fused_experts_reference(x, w13, w2, w, ids)) < 1e-2


def test_pinned_store_memory_is_exact_and_unregistered(monkeypatch):
    """A pinned store's layer blocks are page-locked at their exact size, outside PyTorch's pinned
    allocator (which would round 768 MiB up to 1 GiB), copy to the device without blocking, and are
    unregistered from CUDA (successfully: they were registered) once no tensor uses them."""
    import gc

    from prophet_kernels.memory.store import HostExpertStore

    real, unregistered = torch.cuda.cudart(), []

    class Recording:
        def cudaHostRegister(self, ptr, size, flags):
            return real.cudaHostRegister(ptr, size, flags)

        def cudaHostUnregister(self, ptr):
            err = real.cudaHostUnregister(ptr)
            unregistered.append((ptr, int(getattr(err, "value", err))))
            return err

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Recording())
    g = torch.Generator().manual_seed(11)
    w13, w2 = torch.randn(2, 5, 2 * 96, 160, generator=g), torch.randn(2, 5, 160, 96, generator=g)
    stats = getattr(torch.cuda.memory, "host_memory_stats", None)
    before = stats()["allocated_bytes.current"] if stats else None
    store = HostExpertStore.from_tensors(w13, w2, pin=True)
    assert store.pinned and store.blocks[0] is not None
    if stats:
        assert stats()["allocated_bytes.current"] == before  # nothing from PyTorch's pinned allocator
    dev = torch.empty_like(store.blocks[1], device="cuda")
    dev.copy_(store.blocks[1], non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), store.blocks[1])
    ptrs = [t.data_ptr() for t in store.w13]
    del store
    gc.collect()
    assert sorted(unregistered) == sorted((p, 0) for p in ptrs)
