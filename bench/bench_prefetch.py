"""Prefetcher and ProphetMoE benchmark (issue 3, part 6). GPU for real numbers; `--small` runs a
tiny functional pass anywhere (CPU: plain copies, PyTorch experts).

(a) copy engine: StreamPrefetcher H2D GB/s for an OLMoE (12 MiB) and a Mixtral (336 MiB) expert
    vs a plain pinned tensor copy of the same bytes
(b) overlap: one OLMoE layer's expert GEMMs (T=64) alone vs with prefetch copies in flight
(c) decode step of a 16-layer OLMoE-shaped stack (random bf16 weights, batch 1 and 16) with the
    oracle predictor and buffers of 25/50/75/100% of experts vs all-resident fused_experts, on
    uniform random routing (no reuse between steps: the PCIe-bound worst case) or on a recorded
    trace (`--routing olmoe-heldout`: routing of the trained OLMoE-shaped model)
(d) `--only host`: where the host's time goes per decode layer call (wall time and a cProfile's
    top functions) for all-resident fused_experts and ProphetMoE; a profile, run on request
(e) `--only device`: device mode (issue 27). The device-driven fill (a kernel reading the fill list
    and pinned host memory) vs a plain pinned copy (cudaMemcpyAsync) for 1 and 8 OLMoE experts; and
    the decode step of the stack of (c), device mode captured as one CUDA graph per step and
    replayed with each step's routing, at buffers of 100% and 50% (at 50% with both fills: the
    copy kernel, and read-through, the decode GEMMs reading missed experts from pinned memory), vs
    the all-resident step as one CUDA graph and vs the PCIe floor (missed bytes / the pinned copy
    rate measured here)

Rows (JSON lines, with device, versions, commit, date) go to bench/results/bench_prefetch.jsonl
(bench_prefetch_cpu.jsonl without a GPU). Profile (c) with bench/nsys_prefetch.sh.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prophet_kernels.benchmark.common import MOE_SHAPES, provenance, random_routing, write_rows  # noqa: E402


def _cuda_time(fn, repeats: int, stream=None) -> float:
    """Median seconds per call, CUDA events (host-driven work cannot be graph-captured), recorded on
    the current stream, or on `stream` (then the interval holds only that stream's work: for the
    prefetcher's copy stream, the copy itself without the hand-off to the compute stream)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return sorted(ts)[len(ts) // 2]


def copy_engine(dev, repeats):
    """H2D GB/s of one expert: a plain pinned copy of the same bytes (current stream, and a side
    stream with an event wait), the store -> buffer copy made directly (one block; and as the two
    copies of the earlier layout), and the prefetcher: end to end as a reader sees it (`ratio`:
    copy plus the hand-off to the compute stream), its copy alone on the copy stream
    (`ratio_copy_stream`: the copy engine's rate), and eight back to back (`ratio_x8`). The plain
    copies read memory from PyTorch's pinned allocator, the others the store's (page-locked with
    cudaHostRegister at its exact size): `direct` vs `plain` shows whether that kind matters. Each
    expert in bf16 and in fp8 (issue 28: e4m3 + scales, one block); `fp8_vs_bf16` is the fp8
    prefetcher copy's time over the bf16 one's (bar: <= 0.55)."""
    from prophet_kernels import ProphetMoE

    rows = []
    for (name, shape), experts in itertools.product(MOE_SHAPES.items(), ("bf16", "fp8")):
        H, I = shape["H"], shape["I"]
        w13 = torch.randn(1, 2, 2 * I, H, dtype=torch.bfloat16)
        w2 = torch.randn(1, 2, H, I, dtype=torch.bfloat16)
        moe = ProphetMoE.from_weights(w13, w2, 1, device=dev, expert_dtype=None if experts == "bf16" else "fp8")
        pf, eb, store, buf = moe.prefetcher, moe.store.expert_bytes, moe.store, moe.buffer
        src = torch.empty(eb, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(eb, dtype=torch.uint8, device=dev)
        side, done = torch.cuda.Stream(), torch.cuda.Event()

        def plain_side():
            with torch.cuda.stream(side):
                dst.copy_(src, non_blocking=True)
                done.record(side)
            torch.cuda.current_stream().wait_event(done)

        def direct():  # the prefetcher's one copy (one-block layout), made on the current stream
            buf.blocks[0].copy_(store.blocks[0][1], non_blocking=True)

        def direct_two():  # the two copies (w13 part, w2 part) of the layout before the one-block one
            buf.w13[0].copy_(store.w13[0][1], non_blocking=True)
            buf.w2[0].copy_(store.w2[0][1], non_blocking=True)
            if store.w13_scale is not None:  # (fp8: and the scales)
                buf.w13_scale[0].copy_(store.w13_scale[0][1], non_blocking=True)
                buf.w2_scale[0].copy_(store.w2_scale[0][1], non_blocking=True)

        def prefetch_one():
            pf.copy(0, 0, 1)
            torch.cuda.current_stream().wait_event(pf.ready[0])

        def plain_stream():  # back to back, as a prefetch queue runs
            for _ in range(8):
                dst.copy_(src, non_blocking=True)

        def prefetch_stream():
            for _ in range(8):
                pf.copy(0, 0, 1)
            torch.cuda.current_stream().wait_event(pf.ready[0])

        t = {k: _cuda_time(f, repeats) for k, f in (
            ("plain", lambda: dst.copy_(src, non_blocking=True)), ("plain_side", plain_side),
            ("direct", direct), ("direct_two", direct_two), ("prefetcher", prefetch_one))}
        t |= {k: _cuda_time(f, repeats) / 8 for k, f in (("plain_x8", plain_stream),
                                                          ("prefetcher_x8", prefetch_stream))}
        # the copy engine's rate for the prefetcher's copy, timed on its stream (no hand-off)
        t["prefetcher_copy_stream"] = _cuda_time(lambda: pf.copy(0, 0, 1), repeats, stream=pf.stream)
        rows.append({"bench": "copy", "expert": name, "experts": experts, "bytes": eb, "store_pinned": store.pinned,
                     **{f"{k}_GBps": eb / v / 1e9 for k, v in t.items()},
                     "prefetcher_copy_stream_us": t["prefetcher_copy_stream"] * 1e6,
                     "ratio": t["plain"] / t["prefetcher"], "ratio_x8": t["plain_x8"] / t["prefetcher_x8"],
                     "ratio_copy_stream": t["plain"] / t["prefetcher_copy_stream"]})
        if experts == "fp8":
            rows[-1]["fp8_vs_bf16"] = t["prefetcher_copy_stream"] * 1e6 / rows[-2]["prefetcher_copy_stream_us"]
        del moe, dst
    return rows


def overlap(dev, repeats):
    """One OLMoE layer's expert GEMMs (T=64), replayed from a CUDA graph, alone and while the
    prefetcher's copies run on the copy stream (queued to span every timed replay)."""
    from prophet_kernels import ProphetMoE, fused_experts_paged

    T = 64
    E, k, H, I = (MOE_SHAPES["olmoe"][n] for n in ("E", "k", "H", "I"))
    w13 = torch.randn(2, E, 2 * I, H, dtype=torch.bfloat16) / 32
    w2 = torch.randn(2, E, H, I, dtype=torch.bfloat16) / 32
    moe = ProphetMoE.from_weights(w13, w2, 2 * E, device=dev)
    buf, pf = moe.buffer, moe.prefetcher
    for e in range(E):  # layer 0 resident in slots 0..E-1
        s, _ = buf.allocate(0, e)
        pf.copy(s, 0, e)
    torch.cuda.synchronize()
    row = buf.upload_row(0)
    x = torch.randn(T, H, dtype=torch.bfloat16, device=dev)
    ids, w = random_routing(T, E, k, dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_experts_paged(x, buf.w13, buf.w2, row, w, ids, check=False)  # compile outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_experts_paged(x, buf.w13, buf.w2, row, w, ids, check=False)
    reps = 20

    def replays():
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2 * repeats)]
        for i in range(repeats):
            ev[2 * i].record()
            for _ in range(reps):
                graph.replay()
            ev[2 * i + 1].record()
        torch.cuda.synchronize()
        return sorted(ev[2 * i].elapsed_time(ev[2 * i + 1]) / reps * 1e3 for i in range(repeats))[repeats // 2]

    replays()
    t_alone = replays()
    copies = int(repeats * reps * t_alone * 1e-6 * 55e9 / moe.store.expert_bytes) + 8  # outlast the replays
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(pf.stream)
    for j in range(copies):
        pf.copy(E + j % E, 1, j % E)
    end.record(pf.stream)
    t_both = replays()
    torch.cuda.synchronize()
    copy_s = start.elapsed_time(end) / 1e3
    return [{"bench": "overlap", "T": T, "gemm_us": t_alone, "gemm_with_copies_us": t_both,
             "slowdown": t_both / t_alone - 1, "copies": copies,
             "copy_GBps_during": copies * moe.store.expert_bytes / copy_s / 1e9}]


def _routings(tr, steps, T, L, E, k, dev):
    """steps x L (ids [T, k] int32, weights [T, k] fp32) on the device: uniform random top-k
    (``tr`` None), or a recorded trace (T lanes of its sequences decoding in lockstep, as the
    simulator replays them)."""
    if tr is None:
        return [[random_routing(T, E, k, dev) for _ in range(L)] for _ in range(steps)]
    from prophet_kernels.routing.simulator import lanes

    tok = lanes(tr, T)
    if len(tok) < steps:
        raise ValueError(f"the trace has {len(tok)} steps at batch {T}, {steps} wanted")
    ids = torch.from_numpy(tr.topk_ids.astype("int32")).to(dev)  # [L, N, k]
    w = torch.from_numpy(tr.topk_weights.astype("float32")).to(dev)
    w = w / w.sum(-1, keepdim=True)
    return [[(ids[l, tok[i]].contiguous(), w[l, tok[i]].contiguous()) for l in range(L)] for i in range(steps)]


def _stack(dev, small, routing):
    """The decode stack of parts (c) and (d): OLMoE-shaped (16 layers; tiny with `small`), or the
    trace's layers, experts and top-k. Returns L, E, H, I, k, trace (None for uniform routing), the
    host store (pinned once, shared by every configuration) and the all-resident device weights."""
    from prophet_kernels import HostExpertStore

    olmoe = MOE_SHAPES["olmoe"]
    L, E, H, I, k = (4, 8, 64, 32, 2) if small else (16, olmoe["E"], olmoe["H"], olmoe["I"], olmoe["k"])
    tr = None
    if routing != "uniform":
        from prophet_kernels.routing.traces import load_trace

        tr = load_trace(routing)
        L, E, k = tr.num_layers, tr.num_experts, tr.top_k
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(L, E, 2 * I, H, generator=g) / 32).to(dtype)
    w2 = (torch.randn(L, E, H, I, generator=g) / 32).to(dtype)
    return L, E, H, I, k, tr, HostExpertStore.from_tensors(w13, w2), w13.to(dev), w2.to(dev)


def _resident_step(steps, xs, w13_dev, w2_dev, check):
    """run(i): decode step i with every expert resident (fused_experts on the contiguous weights)."""
    from prophet_kernels import fused_experts

    def run(i):
        for l, (ids, w) in enumerate(steps[i]):
            fused_experts(xs[l], w13_dev[l], w2_dev[l], w, ids, check=check)
    return run


def _prophet_step(moe, steps, xs):
    """run(i): decode step i through ProphetMoE."""
    def run(i):
        for l, (ids, w) in enumerate(steps[i]):
            moe.forward(l, xs[l], w, ids)
    return run


def _schedule(steps) -> list[list[int]]:
    """The unique experts of every layer call of `steps`, for the oracle predictor."""
    from prophet_kernels.memory.layer import unique_experts

    return [unique_experts(ids) for st in steps for ids, _ in st]


def host_time(dev, small, routing="olmoe-heldout", steps=24, warmup=32, top=12, stub_experts=False, passes=5):
    """(d) Where the host's time goes per decode layer call (T=1): wall time per layer call (whole
    steps timed, synchronised at step ends) and, from a cProfile of the same steps, the functions
    with the most own time per layer call, for all-resident fused_experts (with and without its id
    check, the check being one host sync) and ProphetMoE (100% buffer: no copies once warm; 50%
    with LRU alone; 50% with the oracle predictor, next-use, at most 2 prefetched experts per
    call). The profile slows Python code down, so its per-call times are shares to read against
    the wall time. The wall time is the fastest of `passes` passes over the timed steps. `stub_experts` replaces
    ProphetMoE's expert kernels by the identity (and drops the all-resident rows): what remains is
    the orchestration's own host work (route, residency, copies issued, page-table row, events)."""
    import prophet_kernels.memory.layer as layer_mod
    from prophet_kernels import OraclePredictor, ProphetMoE
    from prophet_kernels.memory.buffer import slots_for

    L, E, H, I, k, tr, store, w13_dev, w2_dev = _stack(dev, small, routing)
    steps_r = _routings(tr, warmup + steps, 1, L, E, k, dev)
    xs = [torch.randn(1, H, dtype=store.dtype, device=dev) for _ in range(L)]

    def prophet(frac, predictor, policy, budget):
        moe = ProphetMoE(store, max(slots_for(frac, L, E), 2 * k), device=dev, policy=policy, predictor=predictor,
                         prefetch_budget_bytes=None if budget is None else budget * store.expert_bytes)
        return _prophet_step(moe, steps_r, xs)

    configs = [] if stub_experts else [(f"resident, {'id check' if check else 'no check'}",
                                        _resident_step(steps_r, xs, w13_dev, w2_dev, check)) for check in (True, False)]
    configs += [("prophet 100%, no predictor", prophet(1.0, None, "lru", None)),
                ("prophet 50%, LRU, no predictor", prophet(0.5, None, "lru", None)),
                ("prophet 50%, oracle, next-use, 2/call",
                 prophet(0.5, OraclePredictor(_schedule(steps_r)), "next-use", 2))]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    timed, calls = range(warmup, warmup + steps), steps * L
    real_experts = layer_mod.fused_experts_paged
    if stub_experts:
        layer_mod.fused_experts_paged = lambda x, *args, **kwargs: x
    rows = []
    try:
        for name, run in configs:
            for i in range(warmup):
                run(i)
            best, st = _time_and_profile(run, timed, sync, passes)
            own = sorted(((v[2], f"{Path(f[0]).name}:{f[1]}({f[2]})", v[1]) for f, v in st.stats.items()),
                         reverse=True)[:top]
            row = {"bench": "host_time", "config": name, "routing": routing, "T": 1, "layers": L, "E": E,
                   "experts_stubbed": stub_experts, "us_per_layer_call": best / calls * 1e6,
                   "profiled_us_per_layer_call": st.total_tt / calls * 1e6,
                   "top_own_us_per_layer_call": [[fn, round(t / calls * 1e6, 2), round(n / calls, 2)] for t, fn, n in own]}
            rows.append(row)
            print(f"\n{name}: {row['us_per_layer_call']:.1f} us per layer call "
                  f"({row['profiled_us_per_layer_call']:.1f} under the profiler); own time per call:")
            for fn, us, n in row["top_own_us_per_layer_call"]:
                print(f"  {us:8.2f} us  {n:5.2f} calls  {fn}")
    finally:
        layer_mod.fused_experts_paged = real_experts
    return rows


def _time_and_profile(run, timed, sync, passes):
    """The fastest of `passes` passes over the `timed` steps (seconds, synchronised at step ends)
    and the cProfile stats of one more pass."""
    import cProfile
    import pstats

    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in timed:
            run(i)
            sync()
        best = min(best, time.perf_counter() - t0)
    prof = cProfile.Profile()
    prof.enable()
    for i in timed:
        run(i)
        sync()
    prof.disable()
    return best, pstats.Stats(prof)


def _graphed_step(steps, xs, w13_dev, w2_dev):
    """All-resident decode step captured once as a CUDA graph (see ``_graphed``)."""
    return _graphed(steps, xs, lambda st: _resident_step(st, xs, w13_dev, w2_dev, check=False))


def _graphed(steps, xs, make_step):
    """A decode step captured once as a CUDA graph over static routing buffers: ``make_step(static)``
    returns run(0) reading ``static`` ([(ids, w)] per layer); a run copies the step's routing in (two
    small copies) and replays. None off CUDA, and without PyTorch's caching allocator (the
    sanitizer runs turn it off; capture needs its private pools)."""
    if xs[0].device.type != "cuda" or os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return None
    all_ids = torch.stack([torch.stack([ids for ids, _ in st]) for st in steps])  # [steps, L, T, k]
    all_w = torch.stack([torch.stack([w for _, w in st]) for st in steps])
    ids, w = all_ids[0].clone(), all_w[0].clone()
    layers = make_step([list(zip(ids, w))])  # reads the static buffers

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers(0)  # compile and pick configs outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layers(0)

    def run(step):
        ids.copy_(all_ids[step])
        w.copy_(all_w[step])
        graph.replay()
    return run


def device_fill(dev, repeats):
    """(e) The device-driven fill (``fill_slots``: the list read on the device, the bytes read from
    pinned host memory by the kernel) vs a plain pinned copy of the same experts, 1 and 8 OLMoE
    experts, from the store's memory (pageable memory page-locked by cudaHostRegister) and from
    write-combined pinned memory (cudaHostAlloc, reported to raise SM reads over PCIe); then the
    read-through comparison from each. Programs: one per (expert, 8192-element chunk)."""
    from prophet_kernels.kernels.residency import fill_slots
    from prophet_kernels.memory.store import expert_block, expert_tensors

    olmoe = MOE_SHAPES["olmoe"]
    E, H, I = olmoe["E"], olmoe["H"], olmoe["I"]
    src = expert_block(*expert_tensors(E, H, I, torch.bfloat16, pin=True))  # the store's [E, 3*I*H] layout
    src.copy_(torch.randn(src.shape, dtype=torch.bfloat16))
    dst = torch.empty((16,) + tuple(src.shape[1:]), dtype=src.dtype, device=dev)
    rows, sources = [], [("registered", src, None)]
    try:
        sources.append(("write-combined", *_write_combined_copy(src)))
    except (OSError, RuntimeError, AttributeError) as e:
        rows.append({"bench": "device_fill", "host_memory": "write-combined", "error": f"{type(e).__name__}: {e}"})
    for kind, host, free in sources:
        for n in (1, 8):
            fills = torch.tensor([[e, e] for e in range(n)] + [[0, 0]], dtype=torch.int32, device=dev)
            count = torch.tensor([n], dtype=torch.int32, device=dev)
            t_fill = _cuda_time(lambda: fill_slots(host, dst, fills, count, max_fills=n), repeats)
            assert torch.equal(dst[:n].cpu(), src[:n]), f"device fill copied wrong bytes ({kind})"
            t_copy = _cuda_time(lambda: [dst[e].copy_(host[e], non_blocking=True) for e in range(n)], repeats)
            nbytes = n * src[0].numel() * src.element_size()
            chunks = -(-src.shape[1] // 8192)
            rows.append({"bench": "device_fill", "host_memory": kind, "experts": n, "bytes": nbytes,
                         "fill_GBps": nbytes / t_fill / 1e9, "memcpy_GBps": nbytes / t_copy / 1e9,
                         "ratio": t_copy / t_fill, "programs": n * chunks})
        rows += [{**r, "host_memory": kind} for r in _read_through_layer(dev, repeats, host, dst, E, H, I, expect=src)]
        if free is not None:
            torch.cuda.synchronize()
            del host
            free()
    return rows


def _write_combined_copy(t: torch.Tensor):
    """(a copy of host tensor `t` in pinned write-combined memory, a function freeing it): cudaHostAlloc
    with cudaHostAllocWriteCombined through the CUDA runtime torch has loaded (found in
    /proc/self/maps), the memory wrapped as a tensor. OSError/RuntimeError where unavailable."""
    import ctypes

    torch.cuda.init()
    paths = {line.split()[-1] for line in open("/proc/self/maps") if "libcudart" in line}
    if not paths:
        raise RuntimeError("no CUDA runtime (libcudart) loaded in this process")
    rt = ctypes.CDLL(sorted(paths)[0])
    ptr = ctypes.c_void_p()
    nbytes = t.numel() * t.element_size()
    err = rt.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(4))  # WriteCombined
    if err != 0 or not ptr.value:
        raise RuntimeError(f"cudaHostAlloc(write-combined, {nbytes} B) failed: error {err}")
    raw = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr.value), dtype=torch.uint8)
    wc = raw.view(t.dtype).view(t.shape)
    wc.copy_(t)  # (host writes to write-combined memory are fine; host reads of it are slow)
    return wc, lambda: rt.cudaFreeHost(ptr)


def _read_through_layer(dev, repeats, src, dst, E, H, I, expect=None):
    """(e) One OLMoE decode layer call (T = 1, k = 8, the tuned decode path) with n of its 8 experts
    missed, three ways: the read-through fill (the GEMMs read the n experts from pinned memory and
    write their slots), the copy kernel then the GEMMs, and n cudaMemcpyAsync then the GEMMs (the
    host-driven floor). GB/s: the n experts' bytes over the whole call; `gemm_only_us`: all resident.
    ``expect``: a host copy of `src` to check against (a write-combined `src` is slow to read back)."""
    from prophet_kernels import fused_experts_paged
    from prophet_kernels.kernels.residency import ReadThrough, fill_slots

    k = MOE_SHAPES["olmoe"]["k"]
    w13_src, w2_src = src[:, :2 * I * H].view(E, 2 * I, H), src[:, 2 * I * H:].view(E, H, I)
    w13, w2 = dst[:, :2 * I * H].view(-1, 2 * I, H), dst[:, 2 * I * H:].view(-1, H, I)
    x = torch.randn(1, H, dtype=src.dtype, device=dev)
    ids = torch.arange(k, dtype=torch.int32, device=dev).view(1, k)
    w = torch.full((1, k), 1.0 / k, device=dev)
    pt = torch.arange(E, dtype=torch.int32, device=dev) % dst.shape[0]
    dst[:k].copy_(src[:k])
    gemm = lambda: fused_experts_paged(x, w13, w2, pt, w, ids, check=False)  # noqa: E731
    want = gemm()
    t_gemm = _cuda_time(gemm, repeats)
    rows = []
    for n in (1, k):
        fills = torch.tensor([[e, e] for e in range(n)] + [[0, 0]] * (E + 1 - n), dtype=torch.int32, device=dev)
        count = torch.tensor([n], dtype=torch.int32, device=dev)
        rt = ReadThrough(w13_src, w2_src, None, None, fills, count)
        through = lambda: fused_experts_paged(x, w13, w2, pt, w, ids, check=False, read_through=rt)  # noqa: E731
        copy_then = lambda: (fill_slots(src, dst, fills, count, max_fills=n), gemm())  # noqa: E731
        memcpy_then = lambda: ([dst[e].copy_(src[e], non_blocking=True) for e in range(n)], gemm())  # noqa: E731
        times = {name: _cuda_time(fn, repeats) for name, fn in
                 (("read_through", through), ("copy_kernel", copy_then), ("memcpy", memcpy_then))}
        dst[:n].zero_()
        y = through()
        assert torch.equal(dst[:n].cpu(), (src if expect is None else expect)[:n]), "read-through wrote wrong bytes"
        assert torch.equal(y, want), "read-through changed the layer's output"
        nbytes = n * src[0].numel() * src.element_size()
        rows.append({"bench": "device_read_through", "T": 1, "k": k, "missed": n, "bytes": nbytes,
                     "gemm_only_us": t_gemm * 1e6, **{f"{m}_us": t * 1e6 for m, t in times.items()},
                     **{f"{m}_GBps": nbytes / t / 1e9 for m, t in times.items()},
                     "read_through_vs_copy_kernel": times["copy_kernel"] / times["read_through"],
                     "read_through_vs_memcpy": times["memcpy"] / times["read_through"]})
    return rows


def device_step(dev, repeats, small, routing="olmoe-heldout", fracs=(1.0, 0.5), batches=(1,), warmup=8,
                fills=("copy", "read-through")):
    """(e) Device mode, one CUDA graph per step, vs the all-resident step as one CUDA graph and the
    PCIe floor, for each way of filling a miss (``fill``: a copy kernel, or the decode GEMMs reading
    through; at 100% nothing is filled once warm: copy only). Without CUDA (or under the sanitizer)
    the same steps run eagerly (a functional pass)."""
    from prophet_kernels import ProphetMoE
    from prophet_kernels.memory.buffer import slots_for

    L, E, H, I, k, tr, store, w13_dev, w2_dev = _stack(dev, small, routing)
    rows = []
    pinned_Bps = None
    if dev.type == "cuda":
        one = store.blocks[0][0]
        slot = torch.empty_like(one, device=dev)
        pinned_Bps = one.numel() * one.element_size() / _cuda_time(lambda: slot.copy_(one, non_blocking=True), repeats)
    for T in batches:
        steps = _routings(tr, warmup + repeats, T, L, E, k, dev)
        xs = [torch.randn(T, H, dtype=store.dtype, device=dev) for _ in range(L)]
        resident = _graphed_step(steps, xs, w13_dev, w2_dev) or _resident_step(steps, xs, w13_dev, w2_dev, False)
        t_res = _median_step(resident, dev, range(warmup, warmup + repeats))
        for frac, fill in [(f, m) for f in fracs for m in (fills if f < 1 else fills[:1])]:
            slots = max(slots_for(frac, L, E), min(E, k * T))
            moe = ProphetMoE(store, slots, device=dev, mode="device", predictor=None, fill=fill)
            if slots >= L * E and E % k == 0:  # every expert resident before timing (the 100% bar)
                every = torch.arange(E, dtype=torch.int32, device=dev).view(-1, k)
                for layer in range(L):
                    moe.forward(layer, xs[layer].new_zeros(E // k, H), torch.ones(E // k, k, device=dev), every)
            run = _graphed(steps, xs, lambda st: _prophet_step(moe, st, xs)) or _prophet_step(moe, steps, xs)
            for i in range(warmup):
                run(i)
            s0 = moe.stats
            t = _median_step(run, dev, range(warmup, warmup + repeats))
            s1 = moe.stats
            missed = (s1.misses - s0.misses) / repeats
            floor = max(t_res, missed * store.expert_bytes / pinned_Bps) if pinned_Bps else None
            rows.append({"bench": "device_step", "routing": routing, "T": T, "layers": L, "E": E, "buffer_frac": frac, "fill": fill,
                         "slots": slots, "graph": dev.type == "cuda", "step_ms": t * 1e3, "resident_graph_step_ms": t_res * 1e3,
                         "ratio_to_resident_graph": t / t_res, "misses_per_step": missed,
                         "pcie_floor_ms": floor * 1e3 if floor else None, "ratio_to_floor": t / floor if floor else None,
                         "hit_rate": (s1.hits - s0.hits) / max(1, s1.hits - s0.hits + s1.misses - s0.misses)})
            del moe
    return rows


def _median_step(run, dev, steps) -> float:
    """Median wall seconds of run(i) over `steps`, the device synchronised around each."""
    ts = []
    for i in steps:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def decode_step(dev, repeats, small, routing="uniform", policies=("lru",), warmup=1,
                fracs=(0.25, 0.5, 0.75, 1.0), batches=(1, 16), budget_experts=None):
    """Time per decode step of an L-layer stack: ProphetMoE (oracle predictor; prefetch budget per
    layer call of `budget_experts` experts, unlimited if None) at each buffer fraction and policy vs
    all experts resident (fused_experts: eager with and without its id check, and on CUDA the step
    as one CUDA graph). The first `warmup` steps fill the buffer and are not timed."""
    from prophet_kernels import OraclePredictor, ProphetMoE
    from prophet_kernels.memory.buffer import slots_for

    L, E, H, I, k, tr, store, w13_dev, w2_dev = _stack(dev, small, routing)
    dtype = store.dtype
    budget = None if budget_experts is None else budget_experts * store.expert_bytes
    rows = []
    for T in batches:
        steps = _routings(tr, warmup + repeats, T, L, E, k, dev)
        xs = [torch.randn(T, H, dtype=dtype, device=dev) for _ in range(L)]

        def timed(fn):
            return _median_step(fn, dev, range(warmup, warmup + repeats))

        # Baselines, all experts resident: eager with the id check (one host sync per layer: the
        # baseline of the first runs), eager without it (what vLLM's eager mode runs), and the whole
        # step in one CUDA graph (what vLLM's decode runs; the strongest: no host work per layer).
        base = {}
        for name, run in (("resident_checked", _resident_step(steps, xs, w13_dev, w2_dev, check=True)),
                          ("resident", _resident_step(steps, xs, w13_dev, w2_dev, check=False)),
                          ("resident_graph", _graphed_step(steps, xs, w13_dev, w2_dev))):
            if run is not None:
                run(0)
                base[name] = timed(run)
        t_res = base["resident"]
        schedule = _schedule(steps)
        for policy in policies:
            for frac in fracs:
                slots = max(slots_for(frac, L, E), min(E, k * T) * 2)
                moe = ProphetMoE(store, slots, device=dev, policy=policy, predictor=OraclePredictor(schedule),
                                 prefetch_budget_bytes=budget)
                prophet = _prophet_step(moe, steps, xs)

                for i in range(warmup):  # fill the buffer (not timed)
                    prophet(i)
                s0 = moe.stats.as_dict()["total"]
                t = timed(prophet)
                s1 = moe.stats.as_dict()["total"]
                d = {f: s1[f] - s0[f] for f in ("hits", "late_hits", "misses", "stall_s", "bytes_h2d")}
                rows.append({"bench": "decode_step", "routing": routing, "policy": policy, "T": T, "layers": L,
                             "E": E, "buffer_frac": frac, "slots": slots, "budget_experts": budget_experts, "step_ms": t * 1e3,
                             **{f"{n}_step_ms": v * 1e3 for n, v in base.items()},
                             "ratio_to_resident": t / t_res,
                             "ratio_to_resident_graph": t / base["resident_graph"] if "resident_graph" in base else None,
                             "hit_rate": d["hits"] / max(1, d["hits"] + d["misses"]),
                             "ready_hit_rate": (d["hits"] - d["late_hits"]) / max(1, d["hits"] + d["misses"]),
                             "misses_per_step": d["misses"] / repeats,
                             "h2d_MB_per_step": d["bytes_h2d"] / repeats / 1e6,
                             "stall_share": d["stall_s"] / repeats / t})
                del moe
    return rows


def decode_table(rows: list[dict]) -> str:
    """Part (c) rows as a table: step time vs each all-resident baseline, hits, copies, stall."""
    graph = any(r.get("resident_graph_step_ms") for r in rows)
    head = ["policy", "T", "buffer", "budget", "step ms", "resident ms (checked/eager" + ("/graph)" if graph else ")"),
            "x eager", "x graph" if graph else None, "hit", "landed", "MB/step", "stall"]
    head = [h for h in head if h]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = "/".join(f"{r[n]:.2f}" for n in ("resident_checked_step_ms", "resident_step_ms", "resident_graph_step_ms")
                       if r.get(n))
        cells = [r["policy"], r["T"], f"{r['buffer_frac']:.0%}", r["budget_experts"] if r["budget_experts"] is not None
                 else "none", f"{r['step_ms']:.2f}", res, f"{r['ratio_to_resident']:.2f}",
                 f"{r['ratio_to_resident_graph']:.2f}" if graph else None, f"{r['hit_rate']:.1%}",
                 f"{r['ready_hit_rate']:.1%}", f"{r['h2d_MB_per_step']:.1f}", f"{r['stall_share']:.0%}"]
        lines.append("| " + " | ".join(str(c) for c in cells if c is not None) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (functional check; default without a GPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", choices=["copy", "overlap", "decode", "host", "device"], help="run one part")
    ap.add_argument("--routing", default="uniform",
                    help="part (c): 'uniform' random top-k, or a trace name/path (e.g. olmoe-heldout)")
    ap.add_argument("--policies", default="lru", help="part (c): comma-separated eviction policies")
    ap.add_argument("--warmup", type=int, default=1, help="part (c): untimed steps that fill the buffer")
    ap.add_argument("--budget-experts", type=int, default=None,
                    help="part (c): prefetch at most this many experts per layer call (default: unlimited)")
    ap.add_argument("--stub-experts", action="store_true",
                    help="part (d): ProphetMoE's expert kernels replaced by the identity (its own host work only)")
    ap.add_argument("--out", help="results folder (default bench/results)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or dev.type == "cpu"
    rows = []
    if dev.type == "cuda" and args.only in (None, "copy"):
        rows += copy_engine(dev, args.repeats)
    if dev.type == "cuda" and args.only in (None, "overlap"):
        rows += overlap(dev, args.repeats)
    if args.only in (None, "decode"):
        rows += decode_step(dev, 3 if small else args.repeats, small, args.routing,
                            tuple(args.policies.split(",")), args.warmup, budget_experts=args.budget_experts)
    if args.only == "host":  # (d) only on request: a profile, not a timing table
        rows += host_time(dev, small, args.routing, stub_experts=args.stub_experts)
    if args.only == "device":  # (e) on request (the runbook's device stage)
        if dev.type == "cuda":
            rows += device_fill(dev, args.repeats)
        rows += device_step(dev, 3 if small else args.repeats, small,
                            args.routing if args.routing != "uniform" else "olmoe-heldout")
    prov = provenance(dev)
    for r in rows:
        if r["bench"] not in ("decode_step", "host_time"):  # those print their own tables
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        r.update(prov)
    decode = [r for r in rows if r["bench"] == "decode_step"]
    if decode:
        print(decode_table(decode))
    name = "bench_prefetch" if dev.type == "cuda" else "bench_prefetch_cpu"
    print(f"rows -> {write_rows(name, rows, args.out)}")


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
