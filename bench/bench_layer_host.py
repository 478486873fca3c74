"""Host time of one ProphetMoE layer call beyond its kernels: the Python and bookkeeping a decode step
pays per MoE layer (issue 42's budget: <= 50 us here for miss: cpu).

A tiny expert shape (so the kernels take microseconds) on this machine's CPU; per layer call: the
wall time of ``ProphetMoE.forward``, less the time inside the expert kernels (``fused_experts_paged``,
which on a GPU would be an asynchronous launch) and inside the CPU pool's join (the CPU's compute).
What remains is routing to the host, the split, building the CPU's pairs, slot bookkeeping, the
copies' issue and the prefetch decisions. Configurations: misses that wait with every expert
resident (hits only) and with a quarter of them (the same residency work as the miss: cpu rows),
and miss: cpu with every miss on the CPU, and split between CPU and copies.

    python bench/bench_layer_host.py [--calls 2000] [--batch 1 4]

Prints a table; rows to bench/results/layer_host.jsonl (device, versions, commit, date).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

CONFIGS = {  # name: ProphetMoE keyword arguments (tiny model: 16 layers x 64 experts, top-8, as OLMoE routes)
    "wait, all resident": dict(num_slots=16 * 64),
    "wait, 25% buffer": dict(num_slots=16 * 16),
    "cpu, every miss on the CPU": dict(num_slots=16 * 16, miss="cpu",
                                       cpu_rates={"cpu_gbps": 1e3, "cpu_gflops": 1e6, "link_gbps": 1e-3,
                                                  "dram_gbps": 1e3}),
    "cpu, split CPU / copies": dict(num_slots=16 * 16, miss="cpu",
                                    cpu_rates={"cpu_gbps": 1.0, "cpu_gflops": 1e3, "link_gbps": 1.5,
                                               "dram_gbps": 1e3}),
}


def measure(config: dict, batch: int, calls: int, seed: int = 0) -> dict:
    from prophet_kernels import ProphetMoE
    from prophet_kernels.memory import layer as layer_mod

    L, E, H, I, k = 16, 64, 64, 32, 8
    g = torch.Generator().manual_seed(seed)
    w13, w2 = torch.randn(L, E, 2 * I, H, generator=g) * 0.1, torch.randn(L, E, H, I, generator=g) * 0.1
    kwargs = dict(config)
    slots = kwargs.pop("num_slots")
    if "miss" in kwargs:
        kwargs["cpu_threads"] = 1
    kwargs.setdefault("prefetch_budget_bytes", 3 * H * I * 4)  # the plugin's default: one expert per layer call
    moe = ProphetMoE.from_weights(w13, w2, slots, device="cpu", **kwargs)
    inside = [0.0]
    kernel = layer_mod.fused_experts_paged

    def timed_kernel(*a, **kw):
        t = time.perf_counter()
        try:
            return kernel(*a, **kw)
        finally:
            inside[0] += time.perf_counter() - t

    layer_mod.fused_experts_paged = timed_kernel
    join = moe.cpu.join if moe.cpu is not None else None
    if join is not None:
        def timed_join():
            t = time.perf_counter()
            try:
                return join()
            finally:
                inside[0] += time.perf_counter() - t
        moe.cpu.join = timed_join
    xs = [torch.randn(batch, H, generator=g) for _ in range(64)]
    ids = [torch.rand(batch, E, generator=g).topk(k, dim=1).indices.int() for _ in range(64)]
    w = torch.rand(batch, k, generator=g)
    host, total = [], []
    try:
        for c in range(calls + 200):  # the first 200: warm-up
            inside[0] = 0.0
            t = time.perf_counter()
            moe(c % L, xs[c % 64], w, ids[(c * 7) % 64])
            dt = time.perf_counter() - t
            if c >= 200:
                total.append(dt)
                host.append(dt - inside[0])
    finally:
        layer_mod.fused_experts_paged = kernel
        moe.close()
    st = moe.stats
    return {"batch": batch, "calls": calls, "host_us_median": statistics.median(host) * 1e6,
            "host_us_p90": sorted(host)[int(0.9 * len(host))] * 1e6, "total_us_median": statistics.median(total) * 1e6,
            "cpu_experts_per_call": st.cpu_experts / (calls + 200), "copies_per_call": st.demand_copies / (calls + 200)}


def main(argv=None) -> int:
    from prophet_kernels.benchmark.common import provenance, write_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as vLLM's GPU worker runs torch after loading: the host thread drives the device
    prov = provenance(torch.device("cpu"))
    rows = []
    print(f"{'configuration':30} {'B':>3} {'host us (median)':>16} {'p90':>6} {'call us':>8} {'CPU experts':>11} "
          f"{'copies':>6}")
    for name, cfg in CONFIGS.items():
        for b in args.batch:
            r = {"config": name, **measure(cfg, b, args.calls), **prov}
            rows.append(r)
            print(f"{name:30} {b:>3} {r['host_us_median']:>16.1f} {r['host_us_p90']:>6.1f} {r['total_us_median']:>8.1f} "
                  f"{r['cpu_experts_per_call']:>11.2f} {r['copies_per_call']:>6.2f}")
    print(f"rows -> {write_rows('layer_host', rows, args.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
