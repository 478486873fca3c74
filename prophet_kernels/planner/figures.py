"""Planner figures (matplotlib, written as PNG): memory breakdown, KV extension by model,
extension vs batch size, expert count vs savings."""

from __future__ import annotations

from pathlib import Path

from .catalog import get_gpu, get_model
from .memory import PARTS, BufferSetting, Plan, count_params, expected_unique_experts, plan, seed_unique_experts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def memory_breakdown(models: list[str], gpus: list[str], out: Path, batch: int = 1) -> Path:
    """Left: share of the weights by part. Right: total bf16 weights vs the Prophet footprint at
    `batch` (log scale, unstacked) and each GPU's memory."""
    plt = _plt()
    specs = [get_model(m) for m in models]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.4 * len(specs) + 2.2), sharey=True)
    colors = plt.get_cmap("tab10").colors
    params = [count_params(m) for m in specs]
    total = [sum(p.values()) for p in params]
    left = [0.0] * len(specs)
    for j, part in enumerate(PARTS):
        vals = [100 * p[part] / n for p, n in zip(params, total)]
        if any(vals):
            ax.barh(range(len(specs)), vals, left=left, color=colors[j % 10], label=part.replace("_", " "))
            left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(specs)), [m.name for m in specs])
    ax.set_xlabel("share of parameters (%)")
    ax.set_title("Weights by part")
    ax.legend(fontsize=7, loc="lower left", framealpha=0.9)
    g = get_gpu(gpus[0])
    prophet = [plan(m, g, batch).prophet_weight_bytes / 1e9 for m in specs]
    ax2.barh(range(len(specs)), [2 * n / 1e9 for n in total], color="lightgray", label="all weights (baseline)")
    ax2.scatter(prophet, range(len(specs)), marker="D", color="black", zorder=3,
                label=f"on the GPU with Prophet (B={batch})")
    for name in gpus:
        cap = get_gpu(name).memory_bytes / 1e9
        ax2.axvline(cap, ls="--", lw=1, color="tab:red")
        ax2.text(cap, -0.6, f" {name}", rotation=90, va="bottom", fontsize=7, color="tab:red")
    ax2.set_xscale("log")
    ax2.set_xlabel("GB (bf16)")
    ax2.set_title("Weights on the GPU vs GPU memory")
    ax2.legend(fontsize=7, loc="lower right")
    return _save(fig, out / "memory_breakdown.png")


def kv_extension_by_model(rows: list[Plan], out: Path, gpu: str, batches=(1, 16), buffer: str = "batch") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.4 * len({r.model for r in rows}) + 2))
    models = sorted({r.model for r in rows})
    width = 0.8 / len(batches)
    for i, b in enumerate(batches):
        sel = {r.model: r for r in rows if r.gpu == gpu and r.batch == b and r.buffer == buffer}
        ys = [k + i * width for k in range(len(models))]
        vals = [(sel[m].extension or 0.0) if m in sel else 0.0 for m in models]
        ax.barh(ys, vals, height=width, label=f"B={b}")
        for y, m in zip(ys, models):
            r = sel.get(m)
            if r is not None and r.extension is None:
                what = f"Prophet: {r.prophet_kv_tokens:,} tokens" if r.prophet_fits else "Prophet does not fit either"
                ax.text(0.05, y, f"B={b}: baseline does not fit; {what}", va="center", fontsize=7)
    ax.set_yticks([k + 0.4 - width / 2 for k in range(len(models))], models)
    ax.axvline(1.0, color="gray", lw=1)
    ax.set_xlabel("KV tokens with Prophet / without")
    ax.set_title(f"KV-cache extension on {gpu} (buffer '{buffer}')")
    ax.legend(fontsize=8)
    return _save(fig, out / "kv_extension_by_model.png")


def extension_vs_batch(rows: list[Plan], out: Path, gpu: str, buffer: str = "batch") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in sorted({r.model for r in rows}):
        pts = sorted((r.batch, r.extension) for r in rows
                     if r.model == m and r.gpu == gpu and r.buffer == buffer and r.extension is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (tokens per decode step)")
    ax.set_ylabel("KV extension (x)")
    ax.set_title(f"KV extension vs batch on {gpu} (models whose baseline fits)")
    ax.legend(fontsize=7)
    return _save(fig, out / "extension_vs_batch.png")


def experts_vs_savings(models: list[str], out: Path, batches=(1, 16, 64)) -> Path:
    """Share of one layer's routed experts not needed at batch B: uniform expectation vs the seed law."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    specs = [get_model(m) for m in models]
    for b in batches:
        xs = [m.moe.experts for m in specs]
        ys = [100 * (1 - expected_unique_experts(m.moe.experts, m.moe.top_k, b) / m.moe.experts) for m in specs]
        ax.scatter(xs, ys, label=f"B={b}, uniform expectation")
        seed = [max(-100.0, 100 * (1 - seed_unique_experts(m.moe.top_k, b) / m.moe.experts)) for m in specs]
        ax.scatter(xs, seed, marker="x", label=f"B={b}, seed law k*B^0.932")
    ax.axhline(0, color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("routed experts per layer (E)")
    ax.set_ylabel("experts of a layer not needed (%)")
    ax.set_ylim(-105, 105)
    ax.set_title("Expert count vs savings\n(below 0: the seed law asks for more than E experts; clipped at -100%)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, out / "experts_vs_savings.png")


def write_all(rows: list[Plan], models: list[str], gpus: list[str], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    batches = sorted({r.batch for r in rows})
    buffer = rows[0].buffer if rows else BufferSetting().label()
    shown = tuple(dict.fromkeys((batches[0], batches[-1]))) if batches else (1,)
    main_gpu = "H100-80GB" if "H100-80GB" in gpus else gpus[0]  # the per-GPU figures show one GPU
    return [
        memory_breakdown(models, gpus, out),
        kv_extension_by_model(rows, out, main_gpu, batches=shown, buffer=buffer),
        extension_vs_batch(rows, out, main_gpu, buffer=buffer),
        experts_vs_savings(models, out),
    ]
