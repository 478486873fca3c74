"""Does dynamic residency add anything when misses are computed on the CPU? (issue 42, item 2)

``miss: cpu`` keeps a buffer of resident experts and computes the others on the host CPU. Which
experts are resident is a policy; this replays routing traces through the simulator (the decisions
``ProphetMoE(miss="cpu")`` makes, tested equal) under four of them, at the same GPU bytes:

  dynamic, even       the layer's: filled evenly over the layers at start-up, then copies that pay
                      (MissCost.split) and next-use eviction
  dynamic, frequency  the same, filled with the experts most routed in a profiling trace
  static, frequency   that profile's experts kept for good, no copy: KTransformers' fixed GPU expert mask
  static, layers      whole layers resident from the last down: llama.cpp's ``--n-cpu-moe N``

Each trace's profile is a disjoint trace (the study models' train traces; the first half of the
real FLAME-MoE routing for its second half). Timing: the H100's measured layer times and PCIe; the
CPU at the frontier's host targets (``planner.frontier.cpu_targets``: DRAM rates are estimates,
the CPU's efficiency and FLOP rate per core measured on this machine by ``prophet bench cpu-experts``).

    python bench/bench_placement.py [--traces olmoe,mixtral,flame] [--capacities 0.25,0.5]
                                    [--batches 1,16] [--hosts desktop-60,server-200] [--max-steps 1024]

Prints a table; rows to bench/results/placement.jsonl (simulation on this machine's CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from prophet_kernels.benchmark.common import write_rows  # noqa: E402
from prophet_kernels.planner.frontier import cpu_targets  # noqa: E402
from prophet_kernels.provenance import git_commit, utc_now  # noqa: E402
from prophet_kernels.routing.simulator import simulate  # noqa: E402
from prophet_kernels.routing.traces import load_trace  # noqa: E402

TRACES = {  # name: (replayed trace, profiling trace, bench shape for the CPU rates)
    "olmoe": ("olmoe-heldout", "olmoe-train", "olmoe"),
    "mixtral": ("mixtral-heldout", "mixtral-train", "mixtral"),
    "flame": ("flame-moe-290m[16:]", "flame-moe-290m[:16]", "olmoe"),
}
POLICIES = {  # name: (placement, static)
    "dynamic, even": ("even", False),
    "dynamic, frequency": ("frequency", False),
    "static, frequency": ("frequency", True),
    "static, layers": ("layers", True),
}


def run(traces, capacities, batches, hosts, max_steps) -> list[dict]:
    rows = []
    jobs = [(t, c, b, h, p) for t in traces for c in capacities for b in batches for h in hosts for p in POLICIES]
    loaded = {}
    for t, cap, batch, host, policy in tqdm(jobs, desc="placement"):
        held_name, profile_name, shape = TRACES[t]
        if t not in loaded:
            loaded[t] = load_trace(held_name), load_trace(profile_name)
        held, profile = loaded[t]
        rates = cpu_targets(shape)[host]
        placement, static = POLICIES[policy]
        r = simulate(held, cap, batch=batch, max_steps=max_steps, miss="cpu", placement=placement,
                     profile=profile if placement == "frequency" else None, static=static,
                     cpu_rates={k: rates[k] for k in ("cpu_gbps", "cpu_gflops", "dram_gbps", "call_us")})
        d = r.as_dict()
        rows.append(dict(trace=held_name, profile=profile_name if placement == "frequency" else None,
                         routing=held.meta.get("mimics") and f"study model mimicking {held.meta['mimics']}" or
                         "real (FLAME-MoE-290M), OLMoE's expert size and constants",
                         capacity=cap, batch=batch, host=host, policy=policy, placement=placement, static=static,
                         hit_rate=r.hit_rate, cpu_experts_per_token=d["fallbacks_per_token"],
                         h2d_mb_per_token=d["bytes_per_token"] / 1e6, us_per_step=d["us_per_step"],
                         tok_s=batch / (d["us_per_step"] * 1e-6), steps=r.steps, cpu_rates=rates,
                         device="simulated: H100 layer time and PCIe measured, the host's rates in cpu_rates",
                         commit=git_commit(), date=utc_now()))
    return rows


def table(rows: list[dict]) -> str:
    out = ["| trace | capacity | batch | host | policy | hit rate | CPU experts/token | H2D MB/token | step us | tok/s |",
           "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['trace']} | {r['capacity']:.0%} | {r['batch']} | {r['host']} | {r['policy']} | "
                   f"{r['hit_rate']:.1%} | {r['cpu_experts_per_token']:.2f} | {r['h2d_mb_per_token']:.1f} | "
                   f"{r['us_per_step']:.0f} | {r['tok_s']:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--traces", default="olmoe,mixtral,flame")
    p.add_argument("--capacities", default="0.25,0.5")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--hosts", default="desktop-60,server-200")
    p.add_argument("--max-steps", type=int, default=1024)
    p.add_argument("--out", help="folder for placement.jsonl (default bench/results)")
    a = p.parse_args(argv)
    traces = a.traces.split(",")
    unknown = [t for t in traces if t not in TRACES]
    if unknown:
        p.error(f"unknown trace(s) {unknown}: {', '.join(TRACES)}")
    rows = run(traces, [float(x) for x in a.capacities.split(",")], [int(x) for x in a.batches.split(",")],
               a.hosts.split(","), a.max_steps)
    print(table(rows))
    print(f"rows: {write_rows('placement', rows, a.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
