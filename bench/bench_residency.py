"""Host cost of the residency decisions per MoE layer call (ExpertResidency.acquire + prefetch +
release, the Python that ProphetMoE runs between kernels in the host-driven mode), replayed on a
recorded trace at batch 1, and of the live gate and learned gate lookaheads (logits from a hidden
state, OLMoE dimensions). CPU only: no tensors move. Prints a table, writes JSON rows to
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

from prophet_kernels.benchmark.common import write_rows  # noqa: E402
from prophet_kernels.memory.buffer import SlotTable, slots_for  # noqa: E402
from prophet_kernels.memory.predictors import TraceHidden, fit_predictor  # noqa: E402
from prophet_kernels.provenance import git_commit, utc_now  # noqa: E402
from prophet_kernels.memory.residency import ExpertResidency  # noqa: E402
from prophet_kernels.routing.traces import load_trace  # noqa: E402

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
            res = ExpertResidency(SlotTable(L, E, slots_for(args.capacity, L, E), policy), 1, predictor, 1, None)
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
    rows += live_gate_rows(args.repeats)
    print(f"rows -> {write_rows('bench_residency', rows, args.out_dir)}")


def live_gate_rows(repeats: int, calls: int = 300) -> list[dict]:
    """The live gate and learned gate lookaheads' own cost per layer call at T=1 with OLMoE-1B-7B's
    dimensions (64 experts, hidden 2048; random bf16 routers and norms as vLLM holds them, random
    fp32 learned maps): logits for the next `depth` layers from this layer's MoE input, the
    ranking, one host transfer. On the CPU the matmuls are most of it; on a GPU the launches and
    the transfer's sync are."""
    from prophet_kernels.memory.predictors import GateLookaheadPredictor, LearnedGatePredictor

    g = torch.Generator().manual_seed(0)
    L, E, H, k, R, D = 16, 64, 2048, 8, 256, 3  # R: the learned fit's default MLP width at this H
    gate = GateLookaheadPredictor([(torch.randn(E, H, generator=g) / H**0.5).to(torch.bfloat16) for _ in range(L)],
                                  [(torch.rand(H, generator=g) + 0.5).to(torch.bfloat16) for _ in range(L)], top_k=k)
    shapes = [(D, L, E, H), (D, L, E), (D, L, R, H), (D, L, R), (D, L, E, R), (D, L, R, E + H), (D, L, E, E + H)]
    learned = LearnedGatePredictor(*(torch.randn(*sh, generator=g) / H**0.5 for sh in shapes), top_k=k, wrap=True)
    x, ids = torch.randn(1, H, generator=g).to(torch.bfloat16), torch.randint(0, E, (1, k), generator=g)
    rows = []
    for name, pred in (("gate", gate), ("learned-gate", learned)):
        for depth in (1, 3):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for i in range(calls):
                    pred.predict(i % (L - depth), ids, x, L, depth)
                times.append(time.perf_counter() - t0)
            us = min(times) / calls * 1e6
            print(f"live {name} lookahead, depth {depth}: {us:.1f} us per layer call (OLMoE dims, T=1)")
            rows.append({"bench": "live_gate", "predictor": name, "depth": depth, "E": E, "H": H, "T": 1,
                         "us_per_layer_call": us, "cpu": platform.processor() or platform.machine(),
                         "python": platform.python_version(), "commit": git_commit(), "date": utc_now()})
    return rows


if __name__ == "__main__":
    main()
