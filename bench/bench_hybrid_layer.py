"""One MoE layer call with misses computed on the host CPU, on a GPU: ProphetMoE's latency per layer
call for a small OLMoE-shaped stack (4 layers x 64 experts of 2048 x 1024, bf16, top-8) at batch 1
and 16, all resident vs a 25% buffer whose misses wait vs the same buffer with miss: cpu (rates
measured at start-up), random uniform routing. Wall time per layer call (host + device, synchronised
each call), the CPU's share of it (``cpu_s``), the split (CPU experts, copies per call).

    python bench/bench_hybrid_layer.py [--calls 200] [--threads N]

Rows to bench/results/hybrid_layer.jsonl (device name, versions, commit, date). GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(calls: int, threads: int | None, batches=(1, 16)) -> list[dict]:
    from prophet_kernels import ProphetMoE
    from prophet_kernels.benchmark.common import provenance

    L, E, H, I, k = 4, 64, 2048, 1024, 8
    g = torch.Generator().manual_seed(0)
    w13 = (torch.randn(L, E, 2 * I, H, generator=g) * H ** -0.5).bfloat16()
    w2 = (torch.randn(L, E, H, I, generator=g) * I ** -0.5).bfloat16()
    configs = {"all resident": dict(num_slots=L * E), "wait 25%": dict(num_slots=L * E // 4),
               "cpu 25%": dict(num_slots=L * E // 4, miss="cpu", cpu_threads=threads)}
    prov = provenance(torch.device("cuda"))
    rows = []
    for name, cfg in configs.items():
        moe = ProphetMoE.from_weights(w13, w2, device="cuda", prefetch_budget_bytes=None, **cfg)
        for B in batches:
            xs = [torch.randn(B, H, device="cuda", dtype=torch.bfloat16) for _ in range(8)]
            ids = [torch.rand(B, E, device="cuda").topk(k, dim=1).indices.int() for _ in range(8)]
            w = torch.rand(B, k, device="cuda")
            for c in range(2 * L):  # warm-up (the all-resident buffer fills here)
                moe(c % L, xs[c % 8], w, ids[c % 8])
            torch.cuda.synchronize()
            moe.reset_stats()
            times = []
            for c in range(calls):
                t0 = time.perf_counter()
                moe(c % L, xs[c % 8], w, ids[(c * 3) % 8])
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            st = moe.stats
            rows.append({"config": name, "batch": B, "calls": calls, "ms_median": statistics.median(times) * 1e3,
                         "ms_p90": sorted(times)[int(0.9 * calls)] * 1e3, "cpu_ms_per_call": st.cpu_s / calls * 1e3,
                         "cpu_experts_per_call": st.cpu_experts / calls, "copies_per_call": st.demand_copies / calls,
                         "hit_rate": st.hit_rate, "cpu_threads": moe.cpu.threads if moe.cpu else 0,
                         "rates": vars(moe.rates) if moe.cpu else None, **prov})
            print(f"{name:14} B={B:<3} {rows[-1]['ms_median']:8.3f} ms/call (p90 {rows[-1]['ms_p90']:.3f})  "
                  f"CPU {rows[-1]['cpu_ms_per_call']:.3f} ms  CPU experts {rows[-1]['cpu_experts_per_call']:.2f}  "
                  f"copies {rows[-1]['copies_per_call']:.2f}", flush=True)
        moe.close()
    return rows


def main(argv=None) -> int:
    from prophet_kernels.benchmark.common import write_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="the CPU pool's threads (default: cores - 1)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a GPU (bench/bench_layer_host.py measures the host part on a CPU)")
    rows = run(args.calls, args.threads)
    print(f"rows -> {write_rows('hybrid_layer', rows, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
