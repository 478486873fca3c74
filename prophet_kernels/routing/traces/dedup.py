"""Batch dedup measured on traces: unique experts per layer call vs batch size, next to the
independent-uniform expectation E(1-(1-k/E)^B) and the seed's power law k*B^0.932."""

from __future__ import annotations

import numpy as np

from ...planner.memory import expected_unique_experts, seed_unique_experts
from ..simulator import lanes


def unique_per_layer(trace, batch: int) -> tuple[float, float]:
    """Mean and standard deviation over steps and layers of the batch's unique experts, batch
    tokens taken one from each of `batch` sequences decoding in lockstep (simulator's lanes)."""
    grid = lanes(trace, batch)  # [steps, B]
    ids = trace.topk_ids[:, grid]  # [L, steps, B, k]
    L, steps = ids.shape[:2]
    flat = ids.reshape(L * steps, -1)
    srt = np.sort(flat, axis=1)
    uniq = 1 + (np.diff(srt, axis=1) != 0).sum(1)
    return float(uniq.mean()), float(uniq.std())


def dedup_table(trace, batches=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    E, k = trace.num_experts, trace.top_k
    rows = []
    for b in batches:
        if b > trace.num_seqs:
            break
        mean, std = unique_per_layer(trace, b)
        rows.append({"batch": b, "measured": mean, "std": std, "uniform": expected_unique_experts(E, k, b),
                     "seed_power_law": seed_unique_experts(k, b), "tokens_x_k": b * k, "experts": E})
    return rows


def verdict(rows: list[dict]) -> str:
    """One line on the seed's law k*B^0.932 against the measurement."""
    worst = max(rows, key=lambda r: abs(r["seed_power_law"] - r["measured"]) / r["measured"])
    over = [r["batch"] for r in rows if r["seed_power_law"] > r["experts"]]
    err = (worst["seed_power_law"] - worst["measured"]) / worst["measured"]
    s = (f"k*B^0.932 is off by up to {err:+.0%} (B={worst['batch']}: {worst['seed_power_law']:.1f} vs "
         f"{worst['measured']:.1f} measured)")
    if over:
        s += f" and exceeds E={rows[0]['experts']} from B={over[0]}"
    last = rows[-1]
    below = 1 - last["measured"] / last["uniform"]
    if below < 0.01:  # within a percent of chance
        return s + (f"; the measured count stays under E and within {abs(below):.1%} of the independent-uniform "
                    f"E(1-(1-k/E)^B) at B={last['batch']} (concurrent sequences share no more experts than chance).")
    return s + (f"; the measured count stays under E and {below:.0%} under the independent-uniform "
                f"E(1-(1-k/E)^B) at B={last['batch']} (tokens of concurrent sequences share experts).")
