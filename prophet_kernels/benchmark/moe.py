"""Benchmark the MoE expert kernels: paged vs contiguous vs torch._grouped_mm vs the reference.

On a GPU (default: OLMoE-1B-7B and Mixtral-8x7B expert shapes, T in 1..4096, bf16) every op is
timed as CUDA-graph replays over several rotated routings and inputs (so weights come from HBM,
not L2, and launch gaps shrink as in serving); the eager PyTorch reference with do_bench. The
roofline uses the HBM bandwidth and bf16 matmul rate measured at the start of the run.

Without a GPU it runs a small shape under the Triton interpreter (a smoke run, not a speed claim).

    prophet bench                                 # GPU if present, else the small CPU run
    prophet bench --shapes olmoe --T 1 16 256
    prophet bench --experts fp8 [--block 128]     # fp8 e4m3 experts (W8A16), vs vLLM's fp8 fused_moe when
                                                  # vLLM is installed (its Triton path, W8A8, per-token)
    prophet bench --experts int4 [--group 128] [--zero-points]
                                                  # int4 experts (w4a16), vs vLLM's int4 fused_moe when vLLM
                                                  # is installed (its Triton WNA16 path, same packing)

With quantized experts the bytes (GB/s, %HBM) are the codes with their fp32 scales (and zero points).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from .common import (BATCH_SIZES, MOE_SHAPES, make_experts, measure_hbm_bandwidth, measure_matmul_peak, paged_copy,
                     provenance, random_routing, weight_format_from_flags, write_rows)

SMALL_SHAPE = {"small": dict(E=8, k=2, H=96, I=96)}  # CPU interpreter smoke size (int4: groups of 32)
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


def vllm_fp8_moe(x, w13, w2, s13, s2, topk_weights, topk_ids, block_shape):
    """vLLM's own fp8 fused_moe (its Triton path): fp8 W8A8 with per-token dynamic activation scales
    (per output channel weights) or vLLM's block fp8 (block scales, per-group activations)."""
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts as vllm_fused_experts

    if block_shape is None:
        cfg = fp8_w8a8_moe_quant_config(s13[..., None], s2[..., None], per_act_token_quant=True, per_out_ch_quant=True)
    else:
        cfg = fp8_w8a8_moe_quant_config(s13, s2, block_shape=list(block_shape))
    return vllm_fused_experts(x, w13, w2, topk_weights, topk_ids, quant_config=cfg)


def vllm_int4_moe(x, w13, w2, quant, group_size, topk_weights, topk_ids):
    """vLLM's own int4 fused_moe (its Triton WNA16 path, ``int4_w4a16_moe_quant_config``): the same
    codes (two a byte along K, low nibble first), its scales in the activations' dtype, its zero
    points packed two a byte along N."""
    from vllm.model_executor.layers.fused_moe.config import int4_w4a16_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts as vllm_fused_experts

    from prophet_kernels.kernels.int4 import pack_int4

    def zp(z):  # [E, N, K/G] uint8 -> [E, N/2, K/G], even n in the low nibble
        return None if z is None else pack_int4(z.transpose(1, 2)).transpose(1, 2).contiguous()

    cfg = int4_w4a16_moe_quant_config(quant.w13_scale.to(x.dtype), quant.w2_scale.to(x.dtype), zp(quant.w13_zeros),
                                      zp(quant.w2_zeros), block_shape=[0, group_size])
    return vllm_fused_experts(x, w13, w2, topk_weights, topk_ids, quant_config=cfg)


def bench_shape(name, shape, Ts, dtype, device, rotations, hw, meta, with_ref=True, fmt=None):
    from prophet_kernels import fused_experts, fused_experts_paged, fused_experts_reference
    from prophet_kernels.kernels.weight_format import Quant, WeightFormat

    fmt = fmt or WeightFormat()
    E, k, H, I = shape["E"], shape["k"], shape["H"], shape["I"]
    w13, w2 = make_experts(E, H, I, dtype, device)
    scales, sc_slots, quant = {}, {}, Quant()
    if fmt.kind != "float":  # quantized on the device, one expert at a time (Mixtral's fp32 temporaries)
        q = [fmt.quantize(w) for w in w13.unbind(0)], [fmt.quantize(w) for w in w2.unbind(0)]
        (w13, s13, z13), (w2, s2, z2) = [tuple(None if t[0] is None else torch.stack(t) for t in zip(*parts))
                                         for parts in q]
        quant = Quant(s13, s2, z13, z2)
        scales = dict(**quant._asdict(), block_shape=fmt.block_shape, group_size=fmt.group_size)
    extra = [t for t in quant if t is not None]
    w13s, w2s, pt, *placed = paged_copy(w13, w2, None, 0, *extra)
    if scales:
        it = iter(placed)
        sc_slots = dict(**Quant(*(None if t is None else next(it) for t in quant))._asdict(),
                        block_shape=fmt.block_shape, group_size=fmt.group_size)
    expert_bytes = w13[0].nbytes + w2[0].nbytes + sum(s.nbytes for s in placed) // E
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
                 experts={"float": "same", "fp8": "fp8" if fmt.block_shape is None else f"fp8 block {fmt.block_shape}",
                          "int4": f"int4 group {fmt.group_size}{' zp' if fmt.zero_points else ''}"}[fmt.kind],
                 unique_experts=uniq, unique_bytes=ubytes, flops=flops, **meta)
        ops = {
            "paged": lambda x, i, w: fused_experts_paged(x, w13s, w2s, pt, w, i, check=False, **sc_slots),
            "contig": lambda x, i, w: fused_experts(x, w13, w2, w, i, check=False, **scales),
        }
        if has_gmm and not scales:
            ops["grouped_mm"] = lambda x, i, w: grouped_mm_moe(x, w13, w2, w, i)
        if fmt.kind == "fp8" and device.type == "cuda":  # the strongest fp8 baseline we can run: vLLM's own
            ops["vllm_fp8"] = lambda x, i, w: vllm_fp8_moe(x, w13, w2, s13, s2, w, i, fmt.block_shape)
        if fmt.kind == "int4" and device.type == "cuda":  # and int4's: vLLM's WNA16 fused_moe
            ops["vllm_int4"] = lambda x, i, w: vllm_int4_moe(x, w13, w2, quant, fmt.group_size, w, i)
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
                lambda: fused_experts_reference(x, w13, w2, w, i, compute_dtype=dtype, **scales), device)
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
           f"{'base us':>9} {'base/p':>6} {'ref us':>9} {'GB/s':>7} {'%HBM':>5} {'TFLOP/s':>7} "
           f"{'roof us':>8} {'%roof':>5}")


def print_row(r, hw):
    def f(v, fmt):
        return format(v, fmt) if v is not None and v == v else "-"

    gm = r.get("grouped_mm_us", r.get("vllm_fp8_us", r.get("vllm_int4_us")))  # the baseline: torch._grouped_mm, vLLM's
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
    ap.add_argument("--experts", default="same", choices=["same", "fp8", "int4"],
                    help="expert weights: the activations' dtype, fp8 e4m3 with fp32 scales, or int4 (w4a16) with "
                         "fp32 scales per --group inputs (default same)")
    ap.add_argument("--block", type=int, default=None,
                    help="fp8 scales per block of BLOCK x BLOCK (e.g. 128) instead of per output channel")
    ap.add_argument("--group", type=int, default=128, help="int4: inputs per scale (32, 64 or 128; default 128)")
    ap.add_argument("--zero-points", action="store_true", help="int4: asymmetric, with stored zero points")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow eager reference")
    ap.add_argument("--out-dir", default=None, help="JSON rows directory (default bench/results under the current "
                                                    "directory: the repository's when run from its root)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (before the kernels are imported)
    if (args.zero_points or args.group != 128) and args.experts != "int4":
        ap.error("--group and --zero-points go with --experts int4")
    try:
        fmt = weight_format_from_flags(args.experts, args.block, args.group, args.zero_points)
    except ValueError as e:
        ap.error(str(e))

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
    print("base: torch._grouped_mm (bf16 experts) or vLLM's fp8 / int4 fused_moe (quantized experts); "
          "p = Prophet's paged op")
    print(_HEADER)
    rows = []
    for name in shapes:
        shape = {**MOE_SHAPES, **SMALL_SHAPE}[name]
        rows += bench_shape(name, shape, Ts, dtype, device, args.rotations if gpu else 1, hw, meta,
                            with_ref=not args.no_reference, fmt=fmt)
    path = write_rows("bench_moe" if gpu else "bench_moe_cpu", rows, args.out_dir)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
