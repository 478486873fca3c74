"""The ``prophet`` command line.

    prophet plan [OPTIONS]   capacity planner: KV cache Prophet frees per model, GPU, batch, buffer
    prophet info             versions, device, which kernel path runs here, native library
    prophet bench [ARGS]     the MoE kernel benchmark (bench/bench_moe.py; small CPU run without a GPU)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _info() -> int:
    import torch
    import triton

    from . import __version__, native
    from .kernels import use_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (no GPU)"
    print(f"prophet {__version__}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"device: {name}")
    print(f"kernel path: {'Triton' if use_triton(dev) else 'PyTorch reference (no GPU, no TRITON_INTERPRET=1)'}")
    print(f"native library: {'loaded' if native.is_available() else 'not built (optional)'}")
    return 0


def _bench(args: list[str]) -> int:
    # bench_moe.main picks the Triton interpreter without a GPU before any kernel module loads
    # (the package loads its kernels lazily, see __init__).
    if not (REPO / "bench" / "bench_moe.py").exists():
        print("prophet bench needs the source checkout (bench/ is not installed)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from bench.bench_moe import main as bench_main

    bench_main(args)
    return 0


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    from .planner import sweep

    p.add_argument("--model", type=_csv_list, help=f"models, comma-separated (default: {','.join(sweep.DEFAULT_MODELS)})")
    p.add_argument("--gpu", type=_csv_list, help=f"GPUs, comma-separated (default: {','.join(sweep.DEFAULT_GPUS)})")
    p.add_argument("--all", action="store_true", help="the full sweep: every catalogue model on every GPU")
    p.add_argument("--batch", type=lambda t: [int(x) for x in _csv_list(t)],
                   help=f"batch sizes (default: {','.join(map(str, sweep.DEFAULT_BATCHES))})")
    p.add_argument("--buffer", type=_csv_list,
                   help="buffer settings: 'batch' (current + next layer's unique experts at the batch), "
                        f"'batch+D', or a fraction of all experts like 25%% (default: {','.join(sweep.DEFAULT_BUFFERS)})")
    p.add_argument("--dtype", default="bf16", help="weight dtype: bf16, fp16, fp8 (default bf16)")
    p.add_argument("--kv-dtype", help="KV-cache dtype (default: the weight dtype)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size; numbers are per GPU (default 1)")
    p.add_argument("--util", type=float, default=0.9, help="gpu_memory_utilization (default 0.9, vLLM's)")
    p.add_argument("--context", type=int, help="context length for max concurrent sequences (default: the model's)")
    p.add_argument("--gpu-memory-gib", type=float, help="override the GPU's memory (GiB), e.g. what the driver reports")
    p.add_argument("--workspace-gib", type=float, help="override the activation/workspace estimate (GiB per GPU)")
    p.add_argument("--unique-curve", help="JSON {batch: unique experts per layer} measured from a routing trace")
    p.add_argument("--out", default="plan_out", help="output folder for plan.csv and figures (default plan_out/)")
    p.add_argument("--no-figures", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--list", action="store_true", help="print the model and GPU catalogue and exit")
    p.add_argument("--seed-report", metavar="PATH", help="write the seed-vs-corrected section (markdown) to PATH and exit")


def _plan(args: argparse.Namespace) -> int:
    from .planner import GPUS, MODELS, ServingConfig, figures, seed, sweep

    if args.list:
        print(sweep.catalogue_table())
        return 0
    if args.seed_report:
        path = Path(args.seed_report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(seed.render())
        print(f"wrote {path}")
        return 0
    models = list(MODELS) if args.all and not args.model else (args.model or list(sweep.DEFAULT_MODELS))
    gpus = list(GPUS) if args.all and not args.gpu else (args.gpu or list(sweep.DEFAULT_GPUS))
    cfg = ServingConfig(
        gpu_memory_utilization=args.util, weight_dtype=args.dtype, kv_dtype=args.kv_dtype or args.dtype, tp=args.tp,
        workspace_override=None if args.workspace_gib is None else int(args.workspace_gib * 2**30),
    )
    rows = sweep.run_sweep(
        models, gpus, args.batch or sweep.DEFAULT_BATCHES, args.buffer or sweep.DEFAULT_BUFFERS, cfg,
        context=args.context,
        unique=sweep.load_unique_curve(args.unique_curve) if args.unique_curve else None,
        gpu_memory_bytes=None if args.gpu_memory_gib is None else int(args.gpu_memory_gib * 2**30),
    )
    print(sweep.format_table(rows))
    out = Path(args.out)
    print(f"\n{len(rows)} configurations -> {sweep.write_csv(rows, out / 'plan.csv')}")
    if not args.no_figures:
        names = list(dict.fromkeys(r.model for r in rows))  # catalogue spellings, in sweep order
        for path in figures.write_all(rows, names, list(dict.fromkeys(r.gpu for r in rows)), out):
            print(f"figure: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="prophet", description="Prophet: MoE serving from a paged expert buffer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_plan_args(sub.add_parser("plan", help="capacity planner: KV cache freed per model/GPU/batch/buffer"))
    sub.add_parser("info", help="versions, device, kernel path, native library")
    sub.add_parser("bench", help="MoE kernel benchmark (pass bench_moe.py options after it)", add_help=False)
    args, rest = ap.parse_known_args(argv)
    if args.cmd == "plan":
        if rest:
            ap.error(f"unrecognized arguments: {' '.join(rest)}")
        try:
            return _plan(args)
        except ValueError as e:  # unknown model/GPU/dtype, bad buffer setting: one line, no traceback
            print(f"prophet plan: error: {e}", file=sys.stderr)
            return 2
    if args.cmd == "info":
        return _info()
    return _bench(rest)


if __name__ == "__main__":
    sys.exit(main())
