"""Real routing of released MoE models, read from CSV into the trace format.

The CSV layout is the one of CMU-FLAME/FLAME-MoE-Traces (one row per MoE layer and token):

    layer, token_index, token_id, e0..e{k-1}, s0..s{k-1}
    e*: the k chosen experts, highest score first; s*: their router scores (softmax over all experts)

``read_routing_csv`` turns such a file into a ``Trace``: topk_ids [L, N, k] (layers in ascending
order of the file's layer numbers), topk_weights [L, N, k] = the scores, and the token stream cut
into consecutive windows of ``window`` tokens (``seq_starts``), so that the simulator can replay it
at batch B <= N / window. At batch 1 the windows are replayed back to back: the stream's own order.
Real traces carry no hidden states, so the gate and learned-gate predictors cannot replay them.

The committed one, ``flame-moe-290m`` (traces/data/, see DATA_README there for its provenance and
licence), is built by ``python -m prophet_kernels.routing.traces.real CSV``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .format import Trace

FLAME_SOURCE = {
    "model": "FLAME-MoE-290M (CMU FLAME-MoE family): 64 routed experts, top-6, 2 always-on shared experts "
             "(not logged), MoE layers 2..9; final training checkpoint (iteration 5473)",
    "dataset": "CMU-FLAME/FLAME-MoE-Traces (Apache-2.0), the first 2,048 rows of iteration 5473: 2,048 consecutive "
               "tokens of its pretraining text stream, prefill (routing of token t depends only on tokens <= t, so "
               "it is also the batch-1 decode routing of that text)",
    "republished_in": "github.com/Akash-N-Pai/DynaNDE-Simulator, folder 'Sample routing traces', commit f274466b",
    "licence": "Apache-2.0; keep this attribution with the data and anything derived from it",
    "citation": "Kang, Hao and others. FLAME-MoE: A Foundation Language Model with Mixture of Experts. 2025.",
}


def read_routing_csv(path, num_experts: int, window: int = 64, meta: dict | None = None) -> Trace:
    """A ``Trace`` from a routing CSV (module docstring). ``num_experts``: the model's routed experts
    (the file only lists the chosen ones); ``window``: tokens per replay window (the last window
    takes the remainder); ``meta``: merged into the trace's meta."""
    path = Path(path)
    if window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        k = sum(1 for c in cols if c.startswith("e") and c[1:].isdigit())
        need = {"layer", "token_index"} | {f"e{i}" for i in range(k)}
        if not k or not need <= set(cols):
            raise ValueError(f"{path}: expected columns layer, token_index, e0..e(k-1)[, s0..s(k-1)], got {cols}")
        scored = all(f"s{i}" in cols for i in range(k))
        rows = [(int(r["layer"]), int(r["token_index"]), [int(r[f"e{i}"]) for i in range(k)],
                 [float(r[f"s{i}"]) for i in range(k)] if scored else None) for r in reader]
    if not rows:
        raise ValueError(f"{path}: no rows")
    layers = sorted({r[0] for r in rows})
    tokens = sorted({r[1] for r in rows})
    N = len(tokens)
    if tokens != list(range(tokens[0], tokens[0] + N)):
        raise ValueError(f"{path}: token_index must be consecutive (a gap after {tokens[0]})")
    if len(rows) != len(layers) * N:
        raise ValueError(f"{path}: {len(rows)} rows, expected one per layer and token ({len(layers)} x {N})")
    ids = np.full((len(layers), N, k), -1, dtype=np.int64)
    weights = np.zeros((len(layers), N, k), dtype=np.float32) if scored else None
    li = {l: i for i, l in enumerate(layers)}
    for layer, t, e, s in rows:
        ids[li[layer], t - tokens[0]] = e
        if scored:
            weights[li[layer], t - tokens[0]] = s
    if ids.min() < 0 or ids.max() >= num_experts:
        raise ValueError(f"{path}: expert ids outside [0, num_experts={num_experts})")
    if any(len(set(e)) != k for _, _, e, _ in rows):
        raise ValueError(f"{path}: a row names the same expert twice")
    starts = list(range(0, N, window)) + [N]
    info = {"num_experts": num_experts, "num_layers": len(layers), "top_k": k, "tokens": N, "source_layers": layers,
            "window": window, "split": "real", "source_file": path.name,
            "hidden_states": "none (real routing: no gate or learned-gate lookahead)"}
    return Trace(topk_ids=ids, seq_starts=np.array(starts), topk_weights=weights, meta=info | dict(meta or {}))


def flame_trace(csv_path, window: int = 64) -> Trace:
    """The committed ``flame-moe-290m`` trace from its CSV (the attribution goes into its meta)."""
    return read_routing_csv(csv_path, num_experts=64, window=window, meta={
        "shape": "flame-moe-290m", "real": True, "source": FLAME_SOURCE,
        # not a catalogue model: the simulator replays it with OLMoE-1B-7B's expert bytes and measured
        # constants unless given others (the nearest catalogued shape: 64 experts, top-8)
        "timing_model": "OLMoE-1B-7B"})


if __name__ == "__main__":
    import argparse

    from . import DATA

    ap = argparse.ArgumentParser(description="convert FLAME-MoE-290M's routing CSV into traces/data/flame-moe-290m.npz")
    ap.add_argument("csv")
    ap.add_argument("--out", default=str(DATA / "flame-moe-290m.npz"))
    a = ap.parse_args()
    tr = flame_trace(a.csv)
    print(f"{tr.num_tokens} tokens x {tr.num_layers} layers, top-{tr.top_k} of {tr.num_experts} -> {tr.save(a.out)}")
