"""FP8 experts' quality on the routing study's trained models (issue 28): held-out bits per byte of
the OLMoE- and Mixtral-shaped checkpoints (`prophet trace train`, docs/routing.md) with

    fp32 experts          transformers' own experts (the reference)
    Prophet, fp32         the same experts served through enable_prophet (buffer 100%)
    Prophet, fp8          enable_prophet(expert_dtype="fp8"): e4m3 with per-output-channel scales,
                          quantized as the experts move into the store (what the plugin serves)
    fp8 blocks 16x16      the model's experts quantized with 16 x 16 block scales and dequantized in
                          place (the block layout's error; blocks of 128 would span whole matrices of
                          these tiny models)

on the same held-out windows as training's evaluation (64 x 256 bytes, seed 1234). Everything but
the experts stays fp32. Prints a table; rows go to bench/results/fp8_quality.jsonl.

    .venv/bin/python bench/fp8_quality.py                      # checkpoints/olmoe, checkpoints/mixtral
    .venv/bin/python bench/fp8_quality.py --shapes olmoe --windows 16
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "0")  # the CPU's PyTorch path (the interpreter is ~100x slower)

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prophet_kernels.benchmark.common import provenance, write_rows  # noqa: E402


def bits_per_byte(checkpoint: Path, shape: str, windows, variant: str) -> float:
    from prophet_kernels.integration.transformers_experts import enable_prophet
    from prophet_kernels.kernels.fp8 import dequantize_fp8, quantize_fp8
    from prophet_kernels.memory.store import expert_modules
    from prophet_kernels.routing.traces.train import evaluate, get_shape, model_class

    model = model_class(get_shape(shape)).from_pretrained(checkpoint, dtype=torch.float32)
    if variant == "prophet-fp32":
        enable_prophet(model, buffer=1.0, device="cpu")
    elif variant == "prophet-fp8":
        enable_prophet(model, buffer=1.0, device="cpu", expert_dtype="fp8")
    elif variant == "fp8-block16":
        with torch.no_grad():
            for m in expert_modules(model):
                for p in (m.gate_up_proj, m.down_proj):
                    p.copy_(dequantize_fp8(*quantize_fp8(p, (16, 16)), (16, 16)))
    return evaluate(model, windows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="olmoe,mixtral")
    p.add_argument("--checkpoints", default="checkpoints", help="folder with one checkpoint folder per shape")
    p.add_argument("--windows", type=int, default=64, help="held-out windows of 256 bytes (default 64, as training)")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from prophet_kernels.routing.traces.corpus import load_corpus
    from prophet_kernels.routing.traces.train import heldout_windows

    torch.manual_seed(0)
    corpus = load_corpus()
    windows = heldout_windows(corpus, args.windows, 256)
    variants = ["fp32", "prophet-fp32", "prophet-fp8", "fp8-block16"]
    rows = []
    for shape in args.shapes.split(","):
        ckpt = Path(args.checkpoints) / shape
        if not (ckpt / "config.json").is_file():
            raise SystemExit(f"no checkpoint at {ckpt}: train it first (docs/routing.md, `prophet trace train`)")
        bpb = {v: bits_per_byte(ckpt, shape, windows, v) for v in tqdm(variants, desc=shape)}
        for v in variants:
            rows.append(provenance(torch.device("cpu")) | {
                "shape": shape, "variant": v, "windows": args.windows, "bits_per_byte": bpb[v],
                "relative_to_fp32": bpb[v] / bpb["fp32"] - 1})
    print(f"{'shape':8s} {'experts':14s} {'bits/byte':>10s} {'vs fp32':>9s}")
    for r in rows:
        print(f"{r['shape']:8s} {r['variant']:14s} {r['bits_per_byte']:10.5f} {100 * r['relative_to_fp32']:+8.3f}%")
    print(f"rows: {write_rows('fp8_quality', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
