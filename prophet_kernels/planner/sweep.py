"""The planner's sweep: models x GPUs x batch sizes x buffer settings -> rows, table, CSV."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from .catalog import GPUS, MODELS, get_gpu, get_model
from .memory import BufferSetting, Plan, ServingConfig, UniqueCurve, plan, smallest_layouts

DEFAULT_MODELS = ("OLMoE-1B-7B", "Mixtral-8x7B")
DEFAULT_GPUS = ("H100-80GB", "A100-40GB")
DEFAULT_BATCHES = (1, 4, 8, 16, 32, 64)  # the seed analysis's batch sizes
DEFAULT_BUFFERS = ("batch", "25%", "50%")

CSV_FIELDS = [f.name for f in dataclasses.fields(Plan)]
GB = 1e9


def load_unique_curve(path: str | Path) -> UniqueCurve:
    """A measured unique-experts curve: JSON {"batch": unique, ...} (e.g. {"1": 8, "16": 41.3})."""
    data = json.loads(Path(path).read_text())
    return UniqueCurve({int(b): float(u) for b, u in data.items()})


def run_sweep(
    models=DEFAULT_MODELS,
    gpus=DEFAULT_GPUS,
    batches=DEFAULT_BATCHES,
    buffers=DEFAULT_BUFFERS,
    cfg: ServingConfig = ServingConfig(),
    context: int | None = None,
    unique=None,
    gpu_memory_bytes: int | None = None,
    expert_dtypes=(None,),
) -> list[Plan]:
    """One plan per model, GPU, batch, buffer setting and Prophet expert dtype (innermost, so that
    e.g. fp8 rows sit next to bf16 ones; None: ``cfg``'s)."""
    specs = [get_model(m) for m in models]
    gpu_specs = [get_gpu(g) for g in gpus]
    settings = [b if isinstance(b, BufferSetting) else BufferSetting.parse(b) for b in buffers]
    cfgs = [cfg if d is None else dataclasses.replace(cfg, expert_dtype=d) for d in expert_dtypes]
    return [
        plan(m, g, b, s, c, context=context, unique=unique, gpu_memory_bytes=gpu_memory_bytes)
        for m in specs
        for g in gpu_specs
        for b in batches
        for s in settings
        for c in cfgs
    ]


def write_csv(rows: list[Plan], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            d = dataclasses.asdict(r)
            d["unique_experts_per_layer"] = f"{r.unique_experts_per_layer:.3f}"
            d["extension"] = "" if r.extension is None else f"{r.extension:.4f}"
            w.writerow(d)
    return path


def _tokens(n: int, fits: bool) -> str:
    if not fits:
        return "no fit"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def format_table(rows: list[Plan]) -> str:
    head = (
        f"{'model':<18} {'gpu':<12} {'tp':>5} {'B':>3} {'buffer':>7} {'experts':>7} {'slots':>6} {'weights GB':>15} "
        f"{'KV tokens':>17} {'ext':>6} {'seqs@ctx':>14} {'host GB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        weights = f"{r.baseline_weight_bytes / GB:6.1f} -> {r.prophet_weight_bytes / GB:5.1f}"
        kv = f"{_tokens(r.baseline_kv_tokens, r.baseline_fits):>7} -> {_tokens(r.prophet_kv_tokens, r.prophet_fits):>7}"
        ext = "-" if r.extension is None else f"{r.extension:.2f}x"
        slots = f"{r.buffer_slots}" + ("" if r.buffer_ok else "!")
        seqs = f"{r.baseline_max_seqs}->{r.prophet_max_seqs}@{r.context // 1024}K"
        lines.append(
            f"{r.model:<18} {r.gpu:<12} {_layout(r):>5} {r.batch:>3} {r.buffer:>7} {r.expert_dtype:>7} {slots:>6} {weights:>15} "
            f"{kv:>17} {ext:>6} {seqs:>14} {r.host_expert_bytes / GB:>8.1f}"
        )
    lines.append(
        "experts: Prophet's expert dtype (fp8: e4m3 + fp32 scale per output row; the baseline keeps the weight "
        "dtype); weights: baseline -> Prophet (non-expert weights + expert buffer); KV tokens: what fits after weights "
        "and workspace; ext = Prophet/baseline KV tokens; seqs@ctx: concurrent sequences at the context length; "
        "'!' = buffer below one layer's worst case min(E, kB) at this batch; tp: GPUs, bytes per GPU ('ep': experts "
        "spread whole over them, slots of the busiest GPU's experts; 'xN': N pipeline stages, each side's numbers of "
        "the stage that bounds its KV cache); host GB: Prophet's pinned host store, every routed expert in its "
        "expert dtype (all ranks and stages together)."
    )
    return "\n".join(lines)


def _layout(r: Plan) -> str:
    return f"{r.tp}{'ep' if r.ep else ''}" + (f"x{r.pp}" if r.pp > 1 else "")


def layouts_table(models, gpus, batch: int, buffer: str, cfg: ServingConfig = ServingConfig(),
                  context: int | None = None, native: bool = False) -> str:
    """GPUs and nodes each model needs on each GPU, all weights resident vs Prophet, in ``cfg``'s
    weight dtype or, with `native`, each model's published one (``ModelSpec.native_dtype``)."""
    import dataclasses

    setting = BufferSetting.parse(buffer)
    head = (f"{'model':<18} {'gpu':<12} {'weights':<7} {'all resident':>26} "
            f"{'Prophet (' + setting.label() + ' buffer)':>26}")
    lines = [head, "-" * len(head)]

    def cell(lay) -> str:
        if lay.gpus is None:
            return "does not fit"
        return (f"{lay.gpus} GPU{'s' if lay.gpus > 1 else ''} ({lay.tp}x{lay.pp}), {lay.nodes} node"
                f"{'s' if lay.nodes > 1 else ''}")
    for m in models:
        spec = get_model(m)
        c = dataclasses.replace(cfg, weight_dtype=spec.native_dtype) if native else cfg
        for g in gpus:
            base, prophet = smallest_layouts(spec, get_gpu(g), batch, setting, c, context)
            lines.append(f"{spec.name:<18} {get_gpu(g).name:<12} {c.weight_dtype:<7} {cell(base):>26} "
                         f"{cell(prophet):>26}")
    lines.append(f"The fewest GPUs (tensor x pipeline; tensor parallel within a node of 8, pipeline stages across "
                 f"nodes) whose every GPU holds its weights, workspace and the KV cache of one sequence at the "
                 f"context length; Prophet's buffers also hold one layer's unique experts at batch {batch}. "
                 f"Weights: fp8 and int4 quantize the linear layers (int4: an fp16 scale per 128 inputs resident, "
                 f"Prophet's store an fp32 scale), embeddings, routers and norms stay bf16; KV cache "
                 f"{cfg.kv_dtype}.")
    return "\n".join(lines)


def catalogue_table() -> str:
    from .memory import expert_bytes, kv_bytes_per_token, total_params

    head = (f"{'model':<18} {'params':>9} {'published':>9} {'diff':>7} {'E':>4} {'k':>2} {'MoE L':>5} {'expert MB':>10} "
            f"{'fp8 MB':>8} {'KV B/tok':>9} {'context':>8}")
    lines = [head, "-" * len(head)]
    for m in MODELS.values():
        t = total_params(m)
        lines.append(
            f"{m.name:<18} {t / 1e9:8.2f}B {m.published_total / 1e9:8.1f}B {100 * (t / m.published_total - 1):+6.2f}% "
            f"{m.moe.experts:>4} {m.moe.top_k:>2} {m.moe_layers:>5} {expert_bytes(m) / 1e6:>10.2f} "
            f"{expert_bytes(m, 'fp8') / 1e6:>8.2f} "
            f"{kv_bytes_per_token(m):>9} {m.max_context:>8}"
        )
    lines.append("expert MB: one routed expert in bf16; fp8 MB: e4m3 with fp32 per-row scales (Prophet's expert_dtype fp8)")
    lines.append("GPUs: " + ", ".join(f"{g.name} ({g.memory_bytes / 2**30:.1f} GiB)" for g in GPUS.values()))
    return "\n".join(lines)
