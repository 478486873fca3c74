"""Benchmark the MoE expert kernels: paged vs contiguous vs torch._grouped_mm vs the reference.

On a GPU (default: OLMoE-1B-7B and Mixtral-8x7B expert shapes, T in 1..4096, bf16) every op is
timed as CUDA-graph replays over several rotated routings and inputs (so weights come from HBM,
not L2, and launch gaps shrink as in serving); the eager PyTorch reference with do_bench. The
roofline uses the HBM bandwidth and bf16 matmul rate measured at the start of the run.

Without a GPU it runs a small shape under the Triton interpreter (a smoke run, not a speed claim).

    prophet bench                                 # GPU if present, else the small CPU run
    prophet bench --shapes olmoe --T 1 16 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from .common import (BATCH_SIZES, MOE_SHAPES, make_experts, measure_hbm_bandwidth, measure_matmul_peak, paged_copy,
                     provenance, random_routing, write_rows)

SMALL_SHAPE = {"small": dict(E=8, k=2, H=96, I=80)}  # CPU interpreter smoke size
SMALL_T = (1, 4, 16)


def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """Strongest PyTorch baseline: sort by expert, two torch._grouped_mm calls, scatter, sum.
    Graph-capturable (no host sync)."""
    T, H = x.shape
    k = topk_ids.shape[1]
    E, two_i, _ = w13.shape
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x[order // k]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    a = torch.nn.functional.silu(h[:, : two_i // 2]) * h[:, two_i // 2:]
    o = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    o = o * topk_weights.reshape(-1)[order, None].to(o.dtype)
    out = torch.empty_like(o)
    out[order] = o
    return out.view(T, k, H).sum(1)


def time_graph(calls, repeats: int = 20) -> tuple[float, float, float]:
    """Capture all ``calls`` (one op each, different inputs) in one CUDA graph; return the
    median, 20% and 80% quantile time per call in microseconds over ``repeats`` replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compile, allocator) outside the capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    q = statistics.quantiles(times, n=10)
    del g
    return statistics.median(times), q[1], q[7]


def time_eager(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median") * 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def bench_shape(name, shape, Ts, dtype, device, rotations, hw, meta, with_ref=True):
    from prophet_kernels import fused_experts, fused_experts_paged, fused_experts_reference

    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    w13, w2 = make_experts(E, H, I, dtype, device)
    w13s, w2s, pt = paged_copy(w13, w2)
    expert_bytes = 3 * H * I * w13.element_size()
    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    has_gmm = device.type == "cuda" and hasattr(torch, "_grouped_mm") and dtype == torch.bfloat16
    for T in Ts:
        inputs = []
        for _ in range(rotations):
            x = torch.randn(T, H, device=device, dtype=dtype, generator=g)
            ids, w = random_routing(T, E, k, device, generator=g)
            inputs.append((x, ids, w))
        uniq = statistics.mean(int(torch.unique(i).numel()) for _, i, _ in inputs)
        ubytes = uniq * expert_bytes
        flops = 6 * T * k * H * I
        r = dict(shape=name, E=E, k=k, H=H, I=I, T=T, dtype=str(dtype).replace("torch.", ""),
                 unique_experts=uniq, unique_bytes=ubytes, flops=flops, **meta)
        ops = {
            "paged": lambda x, i, w: fused_experts_paged(x, w13s, w2s, pt, w, i, check=False),
            "contig": lambda x, i, w: fused_experts(x, w13, w2, w, i, check=False),
        }
        if has_gmm:
            ops["grouped_mm"] = lambda x, i, w: grouped_mm_moe(x, w13, w2, w, i)
        for op, fn in ops.items():
            calls = [lambda fn=fn, a=a: fn(*a) for a in inputs]
            try:
                if device.type == "cuda":
                    med, q20, q80 = time_graph(calls)
                else:
                    med = q20 = q80 = time_eager(calls[0], device)
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                print(f"  {op} failed at T={T}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                med = q20 = q80 = float("nan")
            r[f"{op}_us"], r[f"{op}_us_q20"], r[f"{op}_us_q80"] = med, q20, q80
        if with_ref:
            x, i, w = inputs[0]
            r["reference_us"] = time_eager(
                lambda: fused_experts_reference(x, w13, w2, w, i, compute_dtype=dtype), device)
        if hw:
            roof_us = max(ubytes / hw["hbm_Bps"], flops / hw["matmul_flops"]) * 1e6
            r["roofline_us"] = roof_us
            r["paged_GBps"] = ubytes / (r["paged_us"] * 1e-6) / 1e9
            r["paged_TFLOPs"] = flops / (r["paged_us"] * 1e-6) / 1e12
            r["paged_frac_roofline"] = roof_us / r["paged_us"]
            r["paged_frac_hbm"] = ubytes / hw["hbm_Bps"] / (r["paged_us"] * 1e-6)
        rows.append(r)
        print_row(r, hw)
    del w13, w2, w13s, w2s
    return rows


_HEADER = (f"{'shape':8} {'T':>5} {'uniq':>5} {'paged us':>9} {'contig us':>9} {'p/c':>5} "
           f"{'gmm us':>9} {'gmm/p':>6} {'ref us':>9} {'GB/s':>7} {'%HBM':>5} {'TFLOP/s':>7} "
           f"{'roof us':>8} {'%roof':>5}")


def print_row(r, hw):
    def f(v, fmt):
        return format(v, fmt) if v is not None and v == v else "-"

    gm = r.get("grouped_mm_us")
    print(f"{r['shape']:8} {r['T']:>5} {r['unique_experts']:>5.1f} {f(r['paged_us'], '9.1f')} "
          f"{f(r['contig_us'], '9.1f')} {f(r['paged_us'] / r['contig_us'], '5.3f')} "
          f"{f(gm, '9.1f'):>9} {f(gm / r['paged_us'] if gm else None, '6.2f'):>6} "
          f"{f(r.get('reference_us'), '9.1f'):>9} "
          f"{f(r.get('paged_GBps'), '7.0f'):>7} {f(100 * r['paged_frac_hbm'] if hw else None, '5.1f'):>5} "
          f"{f(r.get('paged_TFLOPs'), '7.1f'):>7} {f(r.get('roofline_us'), '8.1f'):>8} "
          f"{f(100 * r['paged_frac_roofline'] if hw else None, '5.1f'):>5}", flush=True)


def main(argv=None, prog=None):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=None, help="olmoe, mixtral (GPU default) or small")
    ap.add_argument("--T", type=int, nargs="+", default=None, help="batch sizes (tokens)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rotations", type=int, default=8, help="routings/inputs rotated per graph")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow eager reference")
    ap.add_argument("--out-dir", default=None, help="JSON rows directory (default bench/results under the current "
                                                    "directory: the repository's when run from its root)")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shapes = args.shapes or (list(MOE_SHAPES) if gpu else ["small"])
    Ts = args.T or (BATCH_SIZES if gpu else SMALL_T)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    meta = provenance(device)
    hw = None
    if gpu:
        hw = {"hbm_Bps": measure_hbm_bandwidth(device), "matmul_flops": measure_matmul_peak(device)}
        meta.update(hbm_GBps=hw["hbm_Bps"] / 1e9, matmul_TFLOPs=hw["matmul_flops"] / 1e12)
        print(f"{meta['device']}: measured HBM {hw['hbm_Bps'] / 1e12:.2f} TB/s (copy, read+write), "
              f"bf16 matmul {hw['matmul_flops'] / 1e12:.0f} TFLOP/s")
    else:
        print("no GPU: small shape under the Triton interpreter (functional smoke run; times are "
              "interpreter overhead, not kernel speed)")
    print(_HEADER)
    rows = []
    for name in shapes:
        shape = {**MOE_SHAPES, **SMALL_SHAPE}[name]
        rows += bench_shape(name, shape, Ts, dtype, device, args.rotations if gpu else 1, hw, meta,
                            with_ref=not args.no_reference)
    path = write_rows("bench_moe" if gpu else "bench_moe_cpu", rows, args.out_dir)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
