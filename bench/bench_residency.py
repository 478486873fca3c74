"""Host cost of the residency decisions per MoE layer call (ExpertResidency.acquire + prefetch +
release, the Python that ProphetMoE runs between kernels in the host-driven mode), replayed on a
recorded trace at batch 1. CPU only: no tensors move. Prints a table, writes JSON rows to
bench/results/bench_residency.jsonl.

    python bench/bench_residency.py [--trace olmoe-heldout] [--steps 2000] [--capacity 0.5]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_rows  # noqa: E402
from prophet_kernels.buffer import SlotTable  # noqa: E402
from prophet_kernels.predictors import TraceHidden, fit_predictor  # noqa: E402
from prophet_kernels.provenance import git_commit, utc_now  # noqa: E402
from prophet_kernels.residency import ExpertResidency  # noqa: E402
from prophet_kernels.traces import load_trace  # noqa: E402

CASES = [("lru", "none"), ("cyclic", "none"), ("next-use", "none"), ("lru", "same"), ("cyclic", "same"),
         ("lru", "gate"), ("cyclic", "gate"), ("next-use", "gate"), ("next-use", "learned-gate")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="olmoe-heldout")
    ap.add_argument("--steps", type=int, default=2000, help="tokens replayed (batch 1)")
    ap.add_argument("--capacity", type=float, default=0.5, help="buffer as a fraction of all experts")
    ap.add_argument("--repeats", type=int, default=3, help="replays per case; the fastest is reported (shared CPU)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    tr = load_trace(args.trace)
    L, N, k = tr.topk_ids.shape
    E = tr.num_experts
    steps = min(args.steps, N)
    ids = [[torch.from_numpy(tr.topk_ids[l, t:t + 1].astype(np.int32)) for l in range(L)] for t in range(steps)]
    needed = [[sorted(set(tr.topk_ids[l, t].tolist())) for l in range(L)] for t in range(steps)]
    rows = []
    print(f"{'policy':10s}{'predictor':>14s}{'us/layer':>10s}{'hit rate':>10s}")
    for policy, pred in CASES:
        times = []
        for _ in range(args.repeats):
            predictor = None if pred == "none" else fit_predictor(pred, tr, tr)
            res = ExpertResidency(SlotTable(L, E, int(args.capacity * L * E), policy), 1, predictor, 1, None)
            hidden = None
            t0 = time.perf_counter()
            for t in range(steps):
                for layer in range(L):
                    slots, _ = res.acquire(layer, needed[t][layer])
                    if predictor is not None:
                        if pred in ("gate", "learned-gate"):  # the replay form reads the recorded ranking of token t
                            hidden = TraceHidden(tr, np.array([t]))
                        res.prefetch(layer, ids[t][layer], hidden)
                    res.release(slots)
            times.append(time.perf_counter() - t0)
        us = min(times) / (steps * L) * 1e6
        print(f"{policy:10s}{pred:>14s}{us:>10.1f}{res.stats.hit_rate:>10.3f}")
        rows.append({"bench": "residency", "trace": args.trace, "policy": policy, "predictor": pred,
                     "capacity": args.capacity, "steps": steps, "repeats": args.repeats, "us_per_layer_call": us,
                     "hit_rate": res.stats.hit_rate, "cpu": platform.processor() or platform.machine(),
                     "python": platform.python_version(), "commit": git_commit(), "date": utc_now()})
    print(f"rows -> {write_rows('bench_residency', rows, args.out_dir)}")


if __name__ == "__main__":
    main()
