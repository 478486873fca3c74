"""What would it take to reach 99% hits at 50% capacity on the OLMoE-shape trace? Two parts:

  predictors  bounds that keep the realisable predictor's candidate list but remove its wrong
              guesses (which no real predictor can do), next to the realisable configuration and
              the oracle; same simulator, policy, depth and copy budget as `prophet simulate`
  budgets     the learned lookahead and the oracle under each rule for how many copies one layer
              call may issue: derived (`prophet simulate`'s default: what can start before the
              farthest target layer begins, behind the copies queued), a fixed 1 / 2 / 3 experts
              per call (the vLLM plugin's `prefetch_budget`), and no limit (copies queue on the one
              copy engine); the bandwidth and its timing are the same in all

    python bench/routing_bounds.py [--trace olmoe-heldout] [--capacity 0.5] [--depth 3] [--max-steps 4096]
                                   [--parts predictors,budgets] [--batch 1]

Rows: bench/results/routing_bounds.jsonl (simulation on the CPU with the measured H100 constants).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prophet_kernels.benchmark.common import write_rows  # noqa: E402
from prophet_kernels.memory.predictors import LearnedGatePredictor, OraclePredictor, Predictor  # noqa: E402
from prophet_kernels.provenance import git_commit, utc_now  # noqa: E402
from prophet_kernels.routing.simulator import call_schedule, lanes, simulate  # noqa: E402
from prophet_kernels.routing.traces import load_trace  # noqa: E402


class WithoutWrongGuesses(Predictor):
    """`inner`'s answer, best first, less every expert the future routing does not use (a bound)."""

    def __init__(self, inner: Predictor, schedule):
        self.inner, self.name = inner, f"{inner.name} without wrong guesses"
        self.future = OraclePredictor(schedule)

    def predict(self, layer, topk_ids, hidden, num_layers, depth):
        want = self.inner.predict(layer, topk_ids, hidden, num_layers, depth)
        need = self.future.predict(layer, topk_ids, hidden, num_layers, depth)
        out = {}
        for f, experts in want.items():
            used = set(need.get(f, ()))
            out[f] = [e for e in experts if e in used]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default="olmoe-heldout")
    ap.add_argument("--capacity", type=float, default=0.5)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--policy", default="next-use")
    ap.add_argument("--max-steps", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoding together (default 1)")
    ap.add_argument("--parts", default="predictors,budgets", help="predictors, budgets, or both (default)")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"predictors", "budgets"}:
        raise SystemExit(f"--parts: unknown part(s) {sorted(parts - {'predictors', 'budgets'})}")

    held = load_trace(args.trace)
    fit = held.meta.get("learned_lookahead") or {}
    width = held.learned_lookahead.shape[-1] if held.learned_lookahead is not None else None
    if width is None:
        raise SystemExit(f"{args.trace} has no learned-gate ranking (record it with --learned-gate)")
    schedule = call_schedule(held, lanes(held, args.batch)[:args.max_steps])
    top_k = held.top_k
    configs = [
        (f"learned-gate top-{top_k} (realisable)", LearnedGatePredictor(meta=fit)),
        (f"learned-gate top-{width} (realisable)", LearnedGatePredictor(meta=fit, width=width)),
        (f"learned-gate top-{top_k}, wrong guesses removed", WithoutWrongGuesses(LearnedGatePredictor(meta=fit), schedule)),
        (f"learned-gate top-{width}, wrong guesses removed", WithoutWrongGuesses(LearnedGatePredictor(meta=fit, width=width), schedule)),
        ("oracle (exact future routing)", "oracle"),
    ]
    runs = []  # (part, label, predictor, budget rule: None = derived, an int = fixed per call, "none" = no limit)
    if "predictors" in parts:
        runs += [("predictors", label, pred, None) for label, pred in configs]
    if "budgets" in parts:
        for budget in (None, 1, 2, 3, "none"):
            runs += [("budgets", f"learned-gate top-{top_k}", LearnedGatePredictor(meta=fit), budget),
                     ("budgets", "oracle", "oracle", budget)]
    rows, part = [], None
    print(f"{args.trace}, capacity {args.capacity}, {args.policy}, depth {args.depth}, batch {args.batch}, {args.max_steps} steps")
    for part_, label, pred, budget in runs:
        if part_ != part:
            part = part_
            print(f"\n{part}:")
            print("| predictor | copies per layer call | hit rate | landed | missed, never named | missed, named | "
                  "stall us/token | H2D MB/token | recall d=1..3 |")
            print("|---|---|---:|---:|---:|---:|---:|---:|---|")
        rule = {None: "derived", "none": "no limit"}.get(budget, f"at most {budget}")
        r = simulate(held, args.capacity, args.policy, pred, args.depth, batch=args.batch, max_steps=args.max_steps, progress=True,
                     unlimited_budget=budget == "none", prefetch_budget=budget if isinstance(budget, int) else None)
        d = r.as_dict()
        never = r.misses_unpredicted / r.requests
        named = (r.misses - r.misses_unpredicted) / r.requests
        print(f"| {label} | {rule} | {r.hit_rate:.2%} | {r.ready_hit_rate:.2%} | {never:.2%} | {named:.2%} | "
              f"{d['stall_us_per_token']:.0f} | {d['bytes_per_token'] / 1e6:.1f} | "
              + ", ".join(f"{x:.1%}" for x in r.pred_recall) + " |", flush=True)
        rows.append({"bench": "routing_bounds", "part": part, "trace": args.trace, "config": label,
                     "copies_per_call": rule, "capacity": args.capacity, **d,
                     "missed_never_named": never, "missed_named": named,
                     "device": "cpu (simulation, measured H100 constants)", "commit": git_commit(), "date": utc_now()})
    print(f"rows: {write_rows('routing_bounds', rows)}")


if __name__ == "__main__":
    main()
