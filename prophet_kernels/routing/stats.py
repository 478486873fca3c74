"""Routing statistics: how predictable a trace's routing is, next to real routing.

Per trace (batch 1, sequences replayed back to back, as ``prophet simulate``):

    top25_share        share of a layer's expert uses taken by its ceil(E/4) most used experts, mean over
                       layers (uniform routing: ~25%; FLAME-MoE-290M's real routing: 31.4%)
    prev_overlap       experts a token shares with the previous token of its sequence at the same layer,
                       as a share of k, mean over layers; ``prev_overlap_random`` = k/E is what independent
                       uniform picks share
    entropy            entropy of a layer's expert-use distribution / log2(E) (1: uniform), mean over
                       layers; ``layer_entropy`` per layer
    lru, belady        hit rate of a global buffer of (layer, expert) pages at each capacity, LRU and
                       Belady's MIN (the clairvoyant bound), no prefetching; ``prophet_kernels.routing.simulator``

``prophet trace stats --trace NAMES`` prints them side by side (``format_table``); ``--uniform`` adds,
for each trace, routing of its shape drawn uniformly and independently (``uniform_like``): what a
trace's numbers would be with no expert preference and no reuse at all (a top-2-of-8 shape hits more
at 25% than a top-6-of-64 one, whatever the routing).
"""

from __future__ import annotations

import math

import numpy as np

CAPACITIES = (0.25, 0.5, 0.75)


def multi_hot(trace, layer: int) -> np.ndarray:
    """[N, E] bool: which experts each token used at `layer`."""
    N, E = trace.num_tokens, trace.num_experts
    mh = np.zeros((N, E), dtype=bool)
    mh[np.arange(N)[:, None], trace.topk_ids[layer]] = True
    return mh


def uniform_like(trace, seed: int = 0):
    """A trace of `trace`'s shape (layers, experts, top-k, tokens, sequences) whose every token picks k
    distinct experts uniformly at random, independently of everything else."""
    from .traces import Trace

    L, N, k, E = trace.num_layers, trace.num_tokens, trace.top_k, trace.num_experts
    ids = np.argsort(np.random.default_rng(seed).random((L, N, E)), axis=-1)[..., :k]
    return Trace(ids, trace.seq_starts.copy(), meta={"num_experts": E, "shape": f"uniform {L} x {E}, top-{k}"})


def routing_stats(trace, capacities=CAPACITIES, max_steps: int | None = None) -> dict:
    """The statistics of the module docstring for `trace` (hit rates over at most `max_steps` tokens)."""
    from .simulator import simulate

    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    top = math.ceil(E / 4)
    share, overlap, entropy = [], [], []
    first = np.zeros(trace.num_tokens, dtype=bool)
    first[trace.seq_starts[:-1]] = True  # a sequence's first token has no previous token
    for l in range(L):
        counts = np.bincount(trace.topk_ids[l].reshape(-1), minlength=E)
        share.append(np.sort(counts)[::-1][:top].sum() / counts.sum())
        p = counts[counts > 0] / counts.sum()
        entropy.append(float(-(p * np.log2(p)).sum() / math.log2(E)))
        mh = multi_hot(trace, l)
        both = (mh[1:] & mh[:-1]).sum(1)[~first[1:]]
        overlap.append(both.mean() / k if len(both) else float("nan"))
    out = {"trace": trace.meta.get("shape", "?"), "layers": L, "experts": E, "top_k": k, "tokens": trace.num_tokens,
           "top25_share": float(np.mean(share)), "prev_overlap": float(np.nanmean(overlap)),
           "prev_overlap_random": k / E, "entropy": float(np.mean(entropy)), "layer_entropy": entropy,
           "layer_top25_share": [float(s) for s in share]}
    for policy in ("lru", "belady"):  # hit rates do not depend on timing without prefetching
        out[policy] = {c: simulate(trace, c, policy, expert_bytes=1, pcie_gbps=1.0, layer_us=1.0,
                                   max_steps=max_steps).hit_rate for c in capacities}
    return out


def distance(stats: dict, reference: dict) -> dict:
    """Points (percentage points) between two traces' statistics: the top-25% share and every LRU and
    Belady hit rate; ``max`` is the largest of them (the issue's bar: within 5 points)."""
    d = {"top25_share": 100 * (stats["top25_share"] - reference["top25_share"])}
    for policy in ("lru", "belady"):
        for c, v in stats[policy].items():
            if c in reference[policy]:
                d[f"{policy}@{c:g}"] = 100 * (v - reference[policy][c])
    d["max"] = max(abs(v) for v in d.values())
    return d


def format_table(rows: list[dict], reference: dict | None = None) -> str:
    """Markdown: one row per trace; with `reference`, the largest distance to it in points."""
    caps = sorted({c for r in rows for c in r["lru"]})
    head = ["trace", "L x E, top-k", "tokens", "top-25% share", "overlap with prev. token (random)", "entropy"]
    head += [f"LRU {c:.0%}" for c in caps] + [f"Belady {c:.0%}" for c in caps]
    if reference:
        head.append(f"max distance to {reference['trace']} (points)")
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [r["trace"], f"{r['layers']} x {r['experts']}, top-{r['top_k']}", f"{r['tokens']:,}",
                 f"{r['top25_share']:.1%}", f"{r['prev_overlap']:.1%} ({r['prev_overlap_random']:.1%})",
                 f"{r['entropy']:.3f}"]
        cells += [f"{r['lru'][c]:.1%}" for c in caps] + [f"{r['belady'][c]:.1%}" for c in caps]
        if reference:
            cells.append("" if r is reference else f"{distance(r, reference)['max']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
