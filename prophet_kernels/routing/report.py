"""The routing study: hit-rate table (policies, predictors, depths, capacities) on held-out traces,
the batch-dedup measurement, figures, and a markdown report. Used by ``prophet simulate --sweep``."""

from __future__ import annotations

import json
import time
from pathlib import Path

CAPACITIES = (0.125, 0.25, 0.5, 0.75)
BASE_POLICIES = ("lru", "lfu", "cyclic", "next-use", "belady")
PREDICTORS = ("same", "frequency", "transition", "learned", "gate", "learned-gate", "oracle")
DEPTHS = (1, 2, 3)


def configs(predictors=PREDICTORS, depths=DEPTHS) -> list[tuple[str, str | None, int]]:
    """(policy, predictor, depth): each policy alone, each predictor with LRU at each depth, the
    best-informed ones (learned, gate, learned-gate, oracle) with the next-use policy too, and the
    oracle predictor with Belady (the clairvoyant bound on both decisions)."""
    out = [(p, None, 0) for p in BASE_POLICIES]
    out += [("lru", pred, d) for pred in predictors for d in depths]
    out += [("next-use", pred, d) for pred in ("learned", "gate", "learned-gate", "oracle") if pred in predictors
            for d in depths]
    if "oracle" in predictors:
        out += [("belady", "oracle", d) for d in depths]
    return out


def replayable(predictor: str | None, heldout) -> bool:
    """Whether `heldout` carries what the predictor replays: the gate's and the learned gate's recorded
    rankings (traces of real routing carry neither: no hidden states)."""
    if predictor == "gate":
        return heldout.lookahead is not None
    return predictor != "learned-gate" or heldout.learned_lookahead is not None


def fit_all(predictors, train, heldout=None, progress: bool = False) -> tuple[dict, dict]:
    """Each named predictor fitted once on `train` (the oracle needs no fit) and (bytes, fit seconds).
    Fitted predictors are reused across runs: history predictors reset at each new step."""
    from tqdm import tqdm

    from ..memory.predictors import fit_predictor

    fitted, sizes = {}, {}
    names = [n for n in predictors if n != "oracle"]
    bar = tqdm(names, desc="fit predictors", disable=not progress or not names)
    for name in bar:
        bar.set_postfix_str(name)
        t0 = time.time()
        fitted[name] = fit_predictor(name, train, heldout)
        sizes[name] = (fitted[name].nbytes, time.time() - t0)
    return fitted, sizes


def _instance(pred: str | None, fitted: dict):
    return "oracle" if pred == "oracle" else (fitted[pred] if pred else None)


def _sweep_key(cap, policy, pred, depth) -> list:
    return [cap, policy, pred or "none", depth]


def run_table(heldout, train, capacities=CAPACITIES, batch: int = 1, max_steps: int | None = None,
              predictors=PREDICTORS, depths=DEPTHS, progress: bool = True, rows_path: Path | None = None,
              **timing) -> list[dict]:
    """Simulated rows for every configuration x capacity. ``timing``: ``simulate``'s copy-budget and
    timing arguments (unlimited_budget, prefetch_budget, pcie_gbps, layer_us), applied to every row
    and recorded in it. ``rows_path``: each row is appended there as it completes, and rows already
    there (an interrupted sweep's) are kept instead of simulated again."""
    from tqdm import tqdm

    from .simulator import simulate

    predictors = [p for p in predictors if replayable(p, heldout)]
    todo = [(c, cfg) for cfg in configs(predictors, depths) for c in capacities]
    done = {}
    if rows_path is not None and Path(rows_path).exists():
        done = {tuple(r["sweep_key"]): r for r in read_rows(rows_path) if "sweep_key" in r}
    left = [(c, cfg) for c, cfg in todo if tuple(_sweep_key(c, *cfg)) not in done]
    if done and progress:
        print(f"{rows_path}: {len(todo) - len(left)} of {len(todo)} rows already there, simulating the rest")
    fitted, sizes = fit_all(sorted({cfg[1] for _, cfg in left if cfg[1]}), train, heldout, progress)
    shape = heldout.meta.get("shape", "?")
    for cap, (policy, pred, depth) in tqdm(left, desc=f"sweep {shape}", disable=not progress or not left):
        p = _instance(pred, fitted)
        r = simulate(heldout, cap, policy, p, depth, batch=batch, max_steps=max_steps, **timing)
        row = r.as_dict() | {"shape": shape, "mimics": heldout.meta.get("mimics"),
                             "timing_model": heldout.meta.get("timing_model"), "capacity": cap,
                             "unlimited_budget": False, "sweep_key": _sweep_key(cap, policy, pred, depth)} | timing
        if pred in sizes:
            row["predictor_bytes"], row["predictor_fit_s"] = sizes[pred]
        if rows_path is not None:
            append_row(row, rows_path)
        done[tuple(row["sweep_key"])] = row
    return [done[tuple(_sweep_key(c, *cfg))] for c, cfg in todo]


def _label(row) -> str:
    pol = {"belady": "Belady", "cyclic": "cyclic", "next-use": "next-use", "device-next-use": "device-next-use",
           "device-lru": "device-lru"}.get(row["policy"], row["policy"].upper())
    if row["predictor"] == "none":
        return pol
    return f"{row['predictor']} d={row['depth']} + {pol}"


def markdown_table(rows: list[dict], field: str = "hit_rate") -> str:
    caps = sorted({r["capacity"] for r in rows})
    lines = ["| configuration | " + " | ".join(f"{c:.1%}" for c in caps) + " | size |",
             "|---|" + "---:|" * (len(caps) + 1)]
    seen = {}
    for r in rows:
        seen.setdefault(_label(r), {})[r["capacity"]] = r
    for label, by_cap in seen.items():
        r0 = next(iter(by_cap.values()))
        size = r0.get("predictor_bytes")
        size = "" if size is None else (f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB")
        lines.append(f"| {label} | " + " | ".join(f"{by_cap[c][field]:.1%}" if c in by_cap else "" for c in caps)
                     + f" | {size} |")
    return "\n".join(lines)


def best_vs_oracle(rows: list[dict], capacity: float = 0.5) -> dict:
    """Prophet's best realisable configuration by what landed in time (not oracle, not Belady) vs the
    oracle predictor with the same policy and budget (its best depth), at `capacity`."""
    at = [r for r in rows if r["capacity"] == capacity]
    real = [r for r in at if r["policy"] != "belady" and r["predictor"] != "oracle"]
    best = max(real, key=lambda r: r["ready_hit_rate"])
    oracles = [r for r in at if r["predictor"] == "oracle"]
    same = [r for r in oracles if r["policy"] == best["policy"]] or [r for r in oracles if r["policy"] == "lru"]
    oracle = max(same, key=lambda r: r["ready_hit_rate"])
    bound = max(at, key=lambda r: r["ready_hit_rate"])
    return {"best": _label(best), "best_hit": best["hit_rate"], "oracle": _label(oracle), "oracle_hit": oracle["hit_rate"],
            "gap_points": 100 * (oracle["ready_hit_rate"] - best["ready_hit_rate"]), "bound": _label(bound),
            "bound_hit": bound["hit_rate"], "bound_landed": bound["ready_hit_rate"],
            "best_landed": best["ready_hit_rate"], "oracle_landed": oracle["ready_hit_rate"],
            "best_stall_us": best["stall_us_per_token"], "oracle_stall_us": oracle["stall_us_per_token"]}


def figure_hit_vs_capacity(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    groups: dict[str, list] = {}
    for r in rows:
        if r["predictor"] == "none" or r["depth"] == max(x["depth"] for x in rows if x["predictor"] == r["predictor"]):
            groups.setdefault(_label(r), []).append(r)
    colors = plt.get_cmap("tab20").colors
    for i, (label, rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["capacity"])
        style = "--" if "Belady" in label or "oracle" in label else "-"
        ax.plot([100 * r["capacity"] for r in rs], [100 * r["ready_hit_rate"] for r in rs], style, marker="o", label=label,
                color=colors[(2 * i) % 20 + (i >= 10)])
    ax.set_xlabel("buffer capacity (% of all experts)")
    ax.set_ylabel("landed in time (% of unique experts needed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_dedup(tables: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], tables.items()):
        b = [r["batch"] for r in rows]
        ax.errorbar(b, [r["measured"] for r in rows], yerr=[r["std"] for r in rows], marker="o", label="measured (trace)")
        ax.plot(b, [r["uniform"] for r in rows], "--", label="E(1-(1-k/E)^B) uniform")
        ax.plot(b, [r["seed_power_law"] for r in rows], ":", label="seed: k*B^0.932")
        ax.axhline(rows[0]["experts"], color="gray", lw=0.8, label=f"E = {rows[0]['experts']}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (tokens decoding together)")
        ax.set_ylabel("unique experts per layer")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _stamp() -> dict:
    import numpy
    import torch

    from ..provenance import git_commit, utc_now

    return {"commit": git_commit(), "date": utc_now(), "device": "cpu (simulation)", "torch": torch.__version__,
            "numpy": numpy.__version__}


def write_rows(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = _stamp()
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r | stamp) + "\n")
    return path


def append_row(row: dict, path: Path) -> None:
    """One row, stamped, appended to `path` (JSON lines) and flushed: it survives an interruption."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row | _stamp()) + "\n")


def render_section(rows: list[dict]) -> str:
    """Markdown for one trace's sweep: hit rate, landed-in-time hit rate, stall and traffic at 50%,
    predictor quality, and the best-vs-oracle line."""
    r0 = rows[0]
    b = best_vs_oracle(rows)
    at50 = [r for r in rows if r["capacity"] == 0.5]
    what = (f"{r0['mimics']} routing shape" if r0.get("mimics") else
            f"real routing, replayed with {r0.get('timing_model')}'s expert size and constants")
    lines = [f"### {r0['shape']} ({what}), batch {r0['batch']}, {r0['tokens']} held-out tokens",
             "", "Hit rate (resident when needed; unique experts per layer call):", "", markdown_table(rows), "",
             "Landed in time (the copy had completed when the layer needed the expert):", "",
             markdown_table(rows, "ready_hit_rate"), "",
             "At 50% capacity: traffic, stall and prediction quality (recall/precision of the predicted set "
             "for layer +d, d = 1..3; 'missed, never predicted': misses of experts no prediction named for "
             "that layer call, % of requests — the rest of the misses were named but not copied in time "
             "or evicted before use):", "",
             "| configuration | misses/token | missed, never predicted | H2D MB/token | stall us/token | prefetch precision "
             "| recall by d | precision by d |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in at50:
        never = f"{r['misses_unpredicted'] / r['requests']:.2%}" if r["predictor"] != "none" else ""
        lines.append(f"| {_label(r)} | {r['misses_per_token']:.2f} | {never} | {r['bytes_per_token'] / 1e6:.1f} | "
                     f"{r['stall_us_per_token']:.0f} | "
                     + (f"{r['prefetch_precision']:.1%}" if r["prefetched"] else "") + " | "
                     + ", ".join(f"{x:.0%}" for x in r["pred_recall"]) + " | "
                     + ", ".join(f"{x:.0%}" for x in r["pred_precision"]) + " |")
    lines += ["", f"Best realisable at 50% by what landed in time: **{b['best']}** {b['best_landed']:.2%} landed "
              f"({b['best_hit']:.2%} hits), stall {b['best_stall_us']:.0f} us/token; the oracle predictor with the same "
              f"policy and budget: {b['oracle']} {b['oracle_landed']:.2%} landed ({b['oracle_hit']:.2%} hits), stall "
              f"{b['oracle_stall_us']:.0f} us/token; gap {b['gap_points']:.2f} points; bound (Belady + oracle): "
              f"{b['bound']} {b['bound_landed']:.2%} landed.", ""]
    return "\n".join(lines)


BATCH_CONFIGS = (("lru", None, 0), ("cyclic", None, 0), ("next-use", None, 0), ("belady", None, 0),
                 ("next-use", "gate", 1), ("next-use", "learned-gate", 1), ("next-use", "learned-gate", 3),
                 ("next-use", "oracle", 3),
                 ("device-next-use", None, 0), ("device-next-use", "gate", 1),
                 ("device-next-use", "learned-gate", 1))  # the last three: the device mode's decisions


def batch_rows(heldout, train, batches=(1, 4, 16), capacity: float = 0.5, max_steps: int | None = None,
               progress: bool = True, configs=BATCH_CONFIGS, **timing) -> list[dict]:
    """Simulated rows for ``configs`` ((policy, predictor, depth), default ``BATCH_CONFIGS``) x
    batches at one capacity. Layer time per batch comes from ``simulator.layer_seconds`` (measured
    at the end points); ``timing`` as in ``run_table`` except layer_us, which would give every batch
    the same layer time."""
    if timing.get("layer_us") is not None:
        raise ValueError("layer_us fixes one layer time for every batch; a batch sweep takes each batch's measured one")
    from tqdm import tqdm

    from .simulator import layer_seconds, simulate, timing_model

    model = timing_model(heldout)
    configs = [c for c in configs if replayable(c[1], heldout)]
    fitted, _ = fit_all({pred for _, pred, _ in configs if pred}, train, heldout)
    rows = []
    todo = [(cfg, b) for cfg in configs for b in batches]
    for (policy, pred, depth), b in tqdm(todo, desc=f"batch sweep {heldout.meta.get('shape')}", disable=not progress):
        r = simulate(heldout, capacity, policy, _instance(pred, fitted), depth, batch=b, max_steps=max_steps, **timing)
        rows.append(r.as_dict() | {"shape": heldout.meta.get("shape"), "mimics": model, "capacity": capacity,
                                   "layer_us": layer_seconds(model, b) * 1e6} | timing)
    return rows


def batch_table(rows: list[dict]) -> str:
    """Markdown from ``batch_rows``: hit rate / landed in time / stall per token, one column per batch."""
    batches = sorted({r["batch"] for r in rows})
    layer_us = {r["batch"]: r["layer_us"] for r in rows}
    lines = ["| configuration | " + " | ".join(f"B={b} ({layer_us[b]:.0f} us/layer)" for b in batches) + " |",
             "|---|" + "---|" * len(batches)]
    cells: dict = {}
    for r in rows:
        cells.setdefault(_label(r), {})[r["batch"]] = (
            f"{r['hit_rate']:.1%} / {r['ready_hit_rate']:.1%} / {r['stall_us_per_token']:.0f}")
    lines += [f"| {label} | " + " | ".join(v.get(b, "") for b in batches) + " |" for label, v in cells.items()]
    return "\n".join(lines)
