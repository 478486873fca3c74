"""Quantized experts' quality on the routing study's trained models (fp8: issue 28; int4: issue 44):
held-out bits per byte of the OLMoE- and Mixtral-shaped checkpoints (`prophet trace train`,
docs/routing.md) with

    fp32 experts          transformers' own experts (the reference)
    bf16 experts          the experts rounded to bf16 in place (what a bf16 checkpoint holds)
    Prophet, fp32         the same experts served through enable_prophet (buffer 100%)
    Prophet, fp8          enable_prophet(expert_dtype="fp8"): e4m3 with per-output-channel scales,
                          quantized as the experts move into the store (what the plugin serves)
    fp8 blocks 16x16      the model's experts quantized with 16 x 16 block scales and dequantized in
                          place (the block layout's error; blocks of 128 would span whole matrices of
                          these tiny models)
    Prophet, int4 g32     enable_prophet(expert_dtype="int4", int4_group_size=32): symmetric int4
                          codes, an fp32 scale per 32 inputs (what the plugin serves; g128 alike)
    Prophet, int4 g32 zp  the same with int4_zero_points: a zero point per group too (AWQ's and
                          GPTQ's asymmetric convention, as an int4 checkpoint would carry them)

on held-out windows of the tokenized corpus (64 windows of 128 tokens, seed 1234). Everything but
the experts stays fp32. A variant whose group does not divide a shape's expert sizes (the OLMoE
shape's I = 64 and group 128) is skipped, said so. Prints a table; rows go to
bench/results/expert_quality.jsonl (fp8 rows of 2026-12-02: fp8_quality.jsonl).

    .venv/bin/python bench/expert_quality.py                      # checkpoints/olmoe, checkpoints/mixtral
    .venv/bin/python bench/expert_quality.py --shapes olmoe --windows 16 --variants prophet-int4-g32
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


VARIANTS = ["fp32", "bf16", "prophet-fp32", "prophet-fp8", "fp8-block16", "prophet-int4-g32", "prophet-int4-g32-zp",
            "prophet-int4-g128", "prophet-int4-g128-zp"]


def bits_per_byte(checkpoint: Path, shape: str, windows, token_bytes, variant: str) -> float | None:
    """Held-out bits per byte of the checkpoint with its experts as ``variant`` makes them; None
    where the variant's int4 group does not divide the experts' input sizes."""
    from prophet_kernels.integration.transformers_experts import enable_prophet
    from prophet_kernels.kernels.weight_format import WeightFormat
    from prophet_kernels.memory.store import expert_modules
    from prophet_kernels.routing.traces.train import evaluate, get_shape, model_class

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    model = model_class(get_shape(shape)).from_pretrained(checkpoint, dtype=torch.float32)
    group = int(variant.split("-g")[1].split("-")[0]) if "-g" in variant else None
    if group and min(model.config.hidden_size, get_shape(shape).intermediate) % group:
        return None
    if variant == "prophet-fp32":
        enable_prophet(model, buffer=1.0, device="cpu")
    elif variant == "prophet-fp8":
        enable_prophet(model, buffer=1.0, device="cpu", expert_dtype="fp8")
    elif variant.startswith("prophet-int4"):
        enable_prophet(model, buffer=1.0, device="cpu", expert_dtype="int4", int4_group_size=group,
                       int4_zero_points=variant.endswith("-zp"))
    elif variant in ("bf16", "fp8-block16"):  # rounded, or quantized and dequantized, in place
        fmt = WeightFormat("fp8", block_shape=(16, 16))
        with torch.no_grad():
            for m in expert_modules(model):
                for p in (m.gate_up_proj, m.down_proj):
                    p.copy_(p.to(torch.bfloat16).float() if variant == "bf16" else fmt.dequantize(*fmt.quantize(p)))
    return evaluate(model, windows, token_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="olmoe,mixtral")
    p.add_argument("--checkpoints", default="checkpoints", help="folder with one checkpoint folder per shape")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (default 64, as training)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128, as frontier_inputs.py)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)} "
                                                                   "(fp32 always runs: the reference)")
    args = p.parse_args(argv)
    from tqdm import tqdm

    from prophet_kernels.routing.traces.tokenizer import tokenize_corpus
    from prophet_kernels.routing.traces.train import heldout_windows

    torch.manual_seed(0)
    corpus = tokenize_corpus()
    windows = heldout_windows(corpus, args.windows, args.seq_len)
    variants = ["fp32"] + [v for v in args.variants.split(",") if v != "fp32"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for shape in args.shapes.split(","):
        ckpt = Path(args.checkpoints) / shape
        if not (ckpt / "config.json").is_file():
            raise SystemExit(f"no checkpoint at {ckpt}: train it first (docs/routing.md, `prophet trace train`)")
        bpb = {v: bits_per_byte(ckpt, shape, windows, corpus.token_bytes, v) for v in tqdm(variants, desc=shape)}
        for v in variants:
            if bpb[v] is None:
                print(f"{shape}: {v} skipped (its group does not divide the experts' sizes)")
                continue
            rows.append(provenance(torch.device("cpu")) | {
                "shape": shape, "variant": v, "windows": args.windows, "bits_per_byte": bpb[v],
                "relative_to_fp32": bpb[v] / bpb["fp32"] - 1})
    print(f"{'shape':8s} {'experts':18s} {'bits/byte':>10s} {'vs fp32':>9s}")
    for r in rows:
        print(f"{r['shape']:8s} {r['variant']:18s} {r['bits_per_byte']:10.5f} {100 * r['relative_to_fp32']:+8.3f}%")
    print(f"rows: {write_rows('expert_quality', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
